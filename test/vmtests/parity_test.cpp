// `supermachine run` beside `docker run` (issue 16), end to end on the QEMU
// engine: the guest's security boundary (the agent's token out of the
// workload's reach, the agent serving only the host) and the container
// surface a docker user expects (/dev, working directory, TERM, users).
// docker's outcome is the oracle each case asserts.
#include "exec_contract.hpp"
#include "vm_fixture.hpp"

#include <supermachine/detail/warm_snapshot.hpp>

#include <boost/test/unit_test.hpp>

#include <pty.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <thread>

using namespace supermachine::test;
using namespace std::chrono_literals;

namespace {

vm_environment& env() {
    static vm_environment e;
    return e;
}

/// The token of the warm snapshot `run` made for the demo image (the
/// record's: the host's own copy), or "" if there is none.
std::string warm_snapshot_token() {
    const auto root = env().work / "cache" / "supermachine" / "snapshots";
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(root, ec)) {
        auto bytes = supermachine::detail::read_small_file(entry.path() / "meta", 1 << 16);
        if (!bytes) continue;
        auto meta = supermachine::detail::warm_snapshot_meta::decode(bytes.value());
        if (meta) return meta.value().token;
    }
    return {};
}

/// The guest probe (guest_probe.cpp) and the kernel's vsock_loopback module
/// in a host directory, for a volume.
fs::path probe_dir() {
    const auto dir = env().work / "probe";
    fs::create_directories(dir);
    fs::copy_file(GUEST_PROBE, dir / "guest_probe", fs::copy_options::overwrite_existing);
    auto kernel = supermachine::boot::default_kernel();
    BOOST_REQUIRE(kernel.has_value());
    fs::path module;
    for (const auto& e : fs::recursive_directory_iterator(kernel.value().modules_dir))
        if (e.path().filename() == "vsock_loopback.ko") module = e.path();
    BOOST_REQUIRE_MESSAGE(!module.empty(), "the guest kernel has no vsock_loopback.ko");
    fs::copy_file(module, dir / "vsock_loopback.ko", fs::copy_options::overwrite_existing);
    return dir;
}

} // namespace

// The token is neither on the kernel command line nor in any file: a
// non-root workload (and root too: the file is gone) reads no secret, the
// boot log holds none, and the agent's virtio-serial port is not in /dev.
// This is the warm path: the snapshot's clone still authenticates its host.
BOOST_AUTO_TEST_CASE(the_token_is_out_of_the_workloads_reach) {
    auto r = env().run({"-u", "1000"},
                       {"sh", "-c",
                        "cat /proc/cmdline; if cat /etc/supermachine/token; then echo TOKEN-READ; "
                        "fi; ls /dev/vport* /dev/vd* 2>/dev/null; echo end"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "supermachine.root=/dev/vda"), describe(r)); // cmdline was read
    BOOST_TEST(!contains(r.out, "token"), describe(r));
    BOOST_TEST(!contains(r.out, "TOKEN-READ"), describe(r));
    BOOST_TEST(!contains(r.out, "/dev/vport"), describe(r));
    BOOST_TEST(contains(r.out, "end\n"), describe(r));

    const auto token = warm_snapshot_token();
    BOOST_TEST_REQUIRE(token.size() == 32u, "no warm snapshot with a token was made");
    auto root = env().run({}, {"sh", "-c",
                               "cat /proc/cmdline /etc/supermachine/token /init "
                               "/proc/1/environ; dmesg; echo end"});
    BOOST_TEST(contains(root.out, "end\n"), describe(root));
    BOOST_TEST(contains(root.out, "Command line:"), describe(root)); // dmesg was read
    BOOST_TEST(!contains(root.out, token), describe(root));
    BOOST_TEST(!contains(root.err, token), describe(root));
}

// The agent accepts vsock connections from the host's CID only. The probe
// loads vsock_loopback (so a guest process can reach guest ports at all),
// then connects to the agent's port at the local and the guest's own CID:
// as root and as uid 1000 the agent never answers. A cold boot (volumes do
// not snapshot): the agent on vsock, the channel this guards.
BOOST_AUTO_TEST_CASE(the_agent_serves_only_the_host) {
    skip_unless(::access("/usr/lib/qemu/virtiofsd", X_OK) == 0,
                "/usr/lib/qemu/virtiofsd not installed (Debian: qemu-system-common)");
    const auto dir = probe_dir();
    auto r = env().run({"-v", dir.string() + ":/probe:ro"},
                       {"sh", "-c",
                        "/probe/guest_probe --load /probe/vsock_loopback.ko 1 3; "
                        "/probe/guest_probe --uid 1000 1 3"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "loaded /probe/vsock_loopback.ko"), describe(r));
    BOOST_TEST(contains(r.out, "uid 0\ncid 1: refused"), describe(r));
    BOOST_TEST(contains(r.out, "uid 1000\ncid 1: refused"), describe(r));
    BOOST_TEST(contains(r.out, "cid 3: refused"), describe(r));
    BOOST_TEST(!contains(r.out, "served"), describe(r));
}

// docker's /dev: a tmpfs with exactly these entries; /dev/stdout and
// /dev/stderr reach the streams; /dev/fd lists the process's descriptors.
BOOST_AUTO_TEST_CASE(dev_is_a_containers) {
    auto r = env().run({"-u", "1000"},
                       {"sh", "-c",
                        "ls -A /dev | tr '\\n' ' '; echo; echo to-stdout > /dev/stdout; "
                        "echo to-stderr > /dev/stderr; ls /dev/fd/ | tr '\\n' ' '; echo; "
                        "head -c 5 /dev/urandom | wc -c; echo x > /dev/null && echo null-ok; "
                        "grep ' /dev' /proc/mounts | cut -d' ' -f2,3 | tr '\\n' ' '"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "console fd full mqueue null ptmx pts random shm stderr stdin "
                               "stdout tty urandom zero \n"),
               describe(r));
    BOOST_TEST(contains(r.out, "to-stdout\n"), describe(r));
    BOOST_TEST(r.err == "to-stderr\n", describe(r));
    BOOST_TEST(contains(r.out, "0 1 2 "), describe(r));
    BOOST_TEST(contains(r.out, "5\nnull-ok\n"), describe(r));
    BOOST_TEST(contains(r.out, "/dev tmpfs /dev/pts devpts /dev/shm tmpfs /dev/mqueue mqueue"),
               describe(r));

    // The kernel's devtmpfs only when asked for.
    auto kernel = env().run({"--devtmpfs", "--no-snapshot"}, {"sh", "-c", "ls /dev | wc -l"});
    BOOST_TEST(kernel.status == 0, describe(kernel));
    BOOST_TEST(std::atoi(kernel.out.c_str()) > 40, describe(kernel));
}

// docker creates a missing working directory (as root: root:root 0755,
// also for -u 1000) rather than failing with 126.
BOOST_AUTO_TEST_CASE(a_missing_workdir_is_created) {
    auto r = env().run({"-u", "1000", "-w", "/no/such/dir"},
                       {"sh", "-c", "pwd; stat -c '%u:%g %a' /no/such/dir /no/such"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out == "/no/such/dir\n0:0 755\n0:0 755\n", describe(r));
}

// -t sets TERM=xterm unless the image or -e gave one; through a real pty.
BOOST_AUTO_TEST_CASE(tty_sets_term_like_docker) {
    skip_unless(std::system("command -v script >/dev/null 2>&1") == 0, "no script(1)");
    auto in_pty = [](const std::string& options) {
        const std::string command = shell_quote(env().cli.string()) + " run -q " + options + " " +
                                    shell_quote(env().image) + " sh -c 'echo TERM=$TERM.'";
        return run_process({"script", "-qec", command, "/dev/null"}, "", 200s);
    };
    auto t = in_pty("-t");
    BOOST_TEST(t.status == 0, describe(t));
    BOOST_TEST(contains(t.out, "TERM=xterm."), describe(t));
    auto kept = in_pty("-t -e TERM=vt100");
    BOOST_TEST(contains(kept.out, "TERM=vt100."), describe(kept));
    auto plain = env().run({}, {"sh", "-c", "echo TERM=$TERM."});
    BOOST_TEST(plain.out == "TERM=.\n", describe(plain)); // no -t: unset, as docker
}

// Each run its own hostname (docker: the container id's 12 hex digits) in
// the kernel, $HOSTNAME, /etc/hostname and /etc/hosts; --hostname names it.
// The warm snapshot is shared: the name is set per run, not baked in.
BOOST_AUTO_TEST_CASE(hostname_is_per_run) {
    const std::vector<std::string> show = {
        "sh", "-c",
        "echo $HOSTNAME; hostname; cat /etc/hostname; grep -c \"$(hostname)\" /etc/hosts"};
    auto a = env().run({}, show);
    auto b = env().run({}, show);
    BOOST_TEST(a.status == 0, describe(a));
    const auto name = a.out.substr(0, a.out.find('\n'));
    BOOST_TEST(name.size() == 12u, describe(a));
    BOOST_TEST(name.find_first_not_of("0123456789abcdef") == std::string::npos, describe(a));
    BOOST_TEST(a.out == name + "\n" + name + "\n" + name + "\n1\n", describe(a));
    BOOST_TEST(b.out.substr(0, 12) != name, describe(b));
    auto named = env().run({"--hostname", "web1"}, show);
    BOOST_TEST(named.out == "web1\nweb1\nweb1\n1\n", describe(named));
}

// docker's words for a user or group the image lacks; nothing boots.
BOOST_AUTO_TEST_CASE(unknown_user_or_group_is_named) {
    auto user = env().run({"-u", "nosuchuser"}, {"true"});
    BOOST_TEST(user.status == 125, describe(user));
    BOOST_TEST(contains(user.err, "unable to find user nosuchuser: no matching entries in passwd "
                                  "file"),
               describe(user));
    auto group = env().run({"-u", "root:nosuchgroup"}, {"true"});
    BOOST_TEST(group.status == 125, describe(group));
    BOOST_TEST(contains(group.err, "unable to find group nosuchgroup: no matching entries in "
                                   "group file"),
               describe(group));
}

// docker's nofile default (1048576, containerd's spec) and --ulimit
// NAME=SOFT[:HARD], also for a non-root user.
BOOST_AUTO_TEST_CASE(ulimits_like_docker) {
    auto defaults = env().run({"-u", "1000"}, {"sh", "-c", "ulimit -n; ulimit -Hn"});
    BOOST_TEST(defaults.status == 0, describe(defaults));
    BOOST_TEST(defaults.out == "1048576\n1048576\n", describe(defaults));
    auto given = env().run({"--ulimit", "nofile=1024:2048", "--ulimit", "nproc=77"},
                           {"sh", "-c", "ulimit -n; ulimit -Hn; ulimit -u"});
    BOOST_TEST(given.out == "1024\n2048\n77\n", describe(given));
    auto bad = env().run({"--ulimit", "nofile=9:1"}, {"true"});
    BOOST_TEST(bad.status == 125, describe(bad));
    BOOST_TEST(contains(bad.err, "--ulimit"), describe(bad));
}

// Quiet by default: with stderr not a terminal, a run writes nothing but
// the command's output (also the run that creates the warm snapshot);
// --verbose says how it started. At a terminal (-it through a pty) a warm
// run prints nothing of its own either.
BOOST_AUTO_TEST_CASE(quiet_by_default) {
    // Another memory size: another warm snapshot, created by this very run.
    auto plain = run_process(
        {env().cli.string(), "run", "-m", "320m", env().image, "sh", "-c", "echo out"}, "", 200s);
    BOOST_TEST(plain.status == 0, describe(plain));
    BOOST_TEST(plain.out == "out\n", describe(plain));
    BOOST_TEST(plain.err == "", describe(plain));
    auto verbose =
        run_process({env().cli.string(), "run", "--verbose", env().image, "true"}, "", 200s);
    BOOST_TEST(contains(verbose.err, "warm start: restored"), describe(verbose));
    BOOST_TEST(contains(verbose.err, "engine qemu"), describe(verbose));
    skip_unless(std::system("command -v script >/dev/null 2>&1") == 0, "no script(1)");
    const std::string command = shell_quote(env().cli.string()) + " run -it " +
                                shell_quote(env().image) + " sh -c 'echo hi'";
    auto tty = run_process({"script", "-qec", command, "/dev/null"}, "", 200s);
    BOOST_TEST(tty.status == 0, describe(tty));
    BOOST_TEST(contains(tty.out, "hi"), describe(tty));
    BOOST_TEST(!contains(tty.out, "supermachine"), describe(tty));
}

namespace {

/// `supermachine run -q ARGS...` in the background, stdout and stderr into
/// files; `wait_for` polls stdout for a text.
struct background_run {
    pid_t pid = -1;
    fs::path out, err;

    explicit background_run(const std::vector<std::string>& args, const std::string& name) {
        out = env().work / (name + ".out");
        err = env().work / (name + ".err");
        std::vector<std::string> argv = {env().cli.string(), "run", "-q"};
        argv.insert(argv.end(), args.begin(), args.end());
        std::fflush(nullptr);
        pid = ::fork();
        if (pid == 0) {
            const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            const int n = ::open("/dev/null", O_RDONLY);
            ::dup2(n, 0);
            ::dup2(o, 1);
            ::dup2(e, 2);
            std::vector<char*> a;
            for (auto& s : argv)
                a.push_back(const_cast<char*>(s.c_str()));
            a.push_back(nullptr);
            ::execv(a[0], a.data());
            ::_exit(127);
        }
    }
    static std::string read(const fs::path& p) {
        std::ifstream in(p);
        return std::string(std::istreambuf_iterator<char>(in), {});
    }
    bool wait_for(const std::string& text, std::chrono::seconds limit = 150s) const {
        const auto until = std::chrono::steady_clock::now() + limit;
        while (std::chrono::steady_clock::now() < until) {
            if (contains(read(out), text)) return true;
            std::this_thread::sleep_for(50ms);
        }
        return false;
    }
    /// The exit status (128 + N if killed), or -1 if it did not end in time.
    int wait(std::chrono::seconds limit = 60s) {
        const auto until = std::chrono::steady_clock::now() + limit;
        while (std::chrono::steady_clock::now() < until) {
            int status = 0;
            if (::waitpid(pid, &status, WNOHANG) == pid) {
                pid = -1;
                return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            }
            std::this_thread::sleep_for(20ms);
        }
        return -1;
    }
    std::string describe() const { return "stdout: " + read(out) + "\nstderr: " + read(err); }
    ~background_run() {
        if (pid > 0) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
        }
    }
};

const std::string trapping_loop =
    "trap 'echo got-USR1' USR1; trap 'echo got-TERM; exit 7' TERM; trap 'echo got-INT' INT; "
    "echo ready; while :; do sleep 0.1; done";

} // namespace

// docker's --sig-proxy: signals reach the command, whose status is ours.
BOOST_AUTO_TEST_CASE(signals_reach_the_command) {
    background_run run({env().image, "sh", "-c", trapping_loop}, "signals");
    BOOST_TEST_REQUIRE(run.wait_for("ready\n"), run.describe());
    ::kill(run.pid, SIGUSR1);
    BOOST_TEST(run.wait_for("got-USR1\n", 30s), run.describe());
    ::kill(run.pid, SIGINT); // one ^C: the command's to handle
    BOOST_TEST(run.wait_for("got-INT\n", 30s), run.describe());
    std::this_thread::sleep_for(1200ms); // not a second ^C within a second
    ::kill(run.pid, SIGTERM);
    BOOST_TEST(run.wait() == 7, run.describe());
    BOOST_TEST(contains(run.read(run.out), "got-TERM\n"), run.describe());
}

// A second SIGINT within a second kills the VM: 130, at once.
BOOST_AUTO_TEST_CASE(a_second_interrupt_kills_the_vm) {
    background_run run({env().image, "sh", "-c", "trap '' INT; echo ready; sleep 600"}, "twice");
    BOOST_TEST_REQUIRE(run.wait_for("ready\n"), run.describe());
    ::kill(run.pid, SIGINT);
    std::this_thread::sleep_for(200ms);
    ::kill(run.pid, SIGINT);
    BOOST_TEST(run.wait(20s) == 130, run.describe());
}

// A SIGKILLed run leaves its runtime directories (QEMU goes with it); the
// next start removes them: nothing of the killed run stays in $TMPDIR.
BOOST_AUTO_TEST_CASE(nothing_of_a_killed_run_stays_in_tmp) {
    const auto tmp = env().work / "tmp";
    fs::create_directories(tmp);
    const std::string saved = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "";
    ::setenv("TMPDIR", tmp.c_str(), 1);
    auto ours = [&] {
        std::vector<std::string> names;
        for (const auto& e : fs::directory_iterator(tmp))
            if (e.path().filename().string().starts_with("supermachine-"))
                names.push_back(e.path().filename().string());
        return names;
    };
    {
        background_run run({env().image, "sh", "-c", "echo ready; sleep 600"}, "killed");
        BOOST_TEST_REQUIRE(run.wait_for("ready\n"), run.describe());
        BOOST_TEST(!ours().empty()); // the run's directories, while it runs
        ::kill(run.pid, SIGKILL);
        BOOST_TEST(run.wait() == 128 + SIGKILL);
    }
    BOOST_TEST(!ours().empty()); // left behind by the kill
    auto next = env().run({}, {"true"});
    BOOST_TEST(next.status == 0, describe(next));
    BOOST_TEST(ours().empty(), "left in " << tmp << ": " << ours().size());
    if (saved.empty())
        ::unsetenv("TMPDIR");
    else
        ::setenv("TMPDIR", saved.c_str(), 1);
}

// Data disks: exec_contract.hpp.
BOOST_AUTO_TEST_CASE(data_disks_follow_the_root) {
    exec_contract::data_disks_follow_the_root(
        [](const auto& options, const auto& command, const std::string& input,
           std::chrono::seconds limit) { return env().run(options, command, input, limit); },
        env().work);
}

// -t: the host terminal's size reaches the guest's, at the start and on
// SIGWINCH (here the kernel sends it when the test resizes the pty).
BOOST_AUTO_TEST_CASE(tty_size_follows_the_host_terminal) {
    winsize size{24, 80, 0, 0};
    int master = -1;
    std::fflush(nullptr);
    const pid_t pid = ::forkpty(&master, nullptr, nullptr, &size);
    BOOST_TEST_REQUIRE(pid >= 0);
    if (pid == 0) {
        const std::string cli = env().cli.string(), image = env().image;
        ::execl(cli.c_str(), cli.c_str(), "run", "-q", "-t", image.c_str(), "sh", "-c",
                "stty size; trap 'stty size' WINCH; echo ready; while :; do sleep 0.1; done",
                static_cast<char*>(nullptr));
        ::_exit(127);
    }
    std::string seen;
    auto read_until = [&](const std::string& text) {
        const auto until = std::chrono::steady_clock::now() + 150s;
        while (!contains(seen, text) && std::chrono::steady_clock::now() < until) {
            pollfd p{master, POLLIN, 0};
            if (::poll(&p, 1, 100) == 1) {
                char buffer[4096];
                const ssize_t n = ::read(master, buffer, sizeof buffer);
                if (n <= 0) break;
                seen.append(buffer, static_cast<std::size_t>(n));
            }
        }
        return contains(seen, text);
    };
    BOOST_TEST(read_until("ready"), seen);
    BOOST_TEST(contains(seen, "24 80"), seen);
    size = {40, 132, 0, 0};
    ::ioctl(master, TIOCSWINSZ, &size); // the kernel signals the CLI (SIGWINCH)
    BOOST_TEST(read_until("40 132"), seen);
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ::close(master);
    BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 143), seen);
}
