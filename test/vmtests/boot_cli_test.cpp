// `supermachine boot --disk ROOT -- CMD` end to end: a real Linux guest
// (Debian's cloud kernel under QEMU TCG), the agent as /init, and a root
// filesystem the test builds from busybox-static with `mkfs.ext4 -d`. Also:
// `boot` without `--` keeps its statuses, and QEMU dies with a SIGKILLed CLI.
#include "exec_contract.hpp"
#include "vm_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include <atomic>
#include <fstream>
#include <thread>

using namespace supermachine::test;
using namespace std::chrono_literals;

namespace {

struct boot_environment : cli_vm_environment {
    fs::path rootfs;

    boot_environment()
        : cli_vm_environment("sm-bootcli") {
        skip_unless(fs::exists("/bin/busybox"), "busybox-static not installed");
        skip_unless(std::system("command -v mkfs.ext4 >/dev/null 2>&1") == 0,
                    "mkfs.ext4 (e2fsprogs) not installed");
        // The root filesystem: busybox and its applets, the directories the
        // agent mounts over, a passwd/group with a second user.
        const fs::path tree = work / "tree";
        for (const char* dir :
             {"bin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "home/alice", "srv/data"})
            fs::create_directories(tree / dir);
        fs::copy_file("/bin/busybox", tree / "bin" / "busybox");
        std::ofstream(tree / "etc" / "passwd") << "root:x:0:0:root:/root:/bin/sh\n"
                                                  "alice:x:1001:1002:Alice:/home/alice:/bin/sh\n";
        std::ofstream(tree / "etc" / "group") << "root:x:0:\nalice:x:1002:\nstaff:x:50:alice\n";
        const std::string script =
            "set -e; cd " + shell_quote((tree / "bin").string()) +
            "; for a in $(./busybox --list); do [ -e \"$a\" ] || ln -s busybox \"$a\"; done; "
            "truncate -s 64M " +
            shell_quote((work / "root.ext4").string()) + "; mkfs.ext4 -q -F -d " +
            shell_quote(tree.string()) + " " + shell_quote((work / "root.ext4").string()) +
            " >/dev/null";
        skip_unless(std::system(("sh -c " + shell_quote(script)).c_str()) == 0,
                    "building the busybox root filesystem with mkfs.ext4 -d failed");
        rootfs = work / "root.ext4";
    }

    /// `supermachine boot OPTIONS... --disk ROOT -- COMMAND...`
    process_result boot(const std::vector<std::string>& options,
                        const std::vector<std::string>& command, const std::string& input = "",
                        std::chrono::seconds limit = 240s, bool hash_stdout = false) const {
        std::vector<std::string> argv = {cli.string(), "boot", "--disk", rootfs.string()};
        argv.insert(argv.end(), options.begin(), options.end());
        argv.push_back("--");
        argv.insert(argv.end(), command.begin(), command.end());
        return run_process(argv, input, limit, hash_stdout);
    }
};

boot_environment& env() {
    static boot_environment e;
    return e;
}

// The children of `parent` whose command name starts with `prefix`.
std::vector<pid_t> children_named(pid_t parent, const std::string& prefix) {
    std::vector<pid_t> found;
    for (const auto& entry : fs::directory_iterator("/proc")) {
        const auto name = entry.path().filename().string();
        if (name.find_first_not_of("0123456789") != std::string::npos) continue;
        std::FILE* f = std::fopen((entry.path() / "stat").c_str(), "r");
        if (!f) continue;
        int pid = 0, ppid = 0;
        char state = 0;
        char comm[256];
        if (std::fscanf(f, "%d (%255[^)]) %c %d", &pid, comm, &state, &ppid) == 4 &&
            ppid == parent && std::string(comm).starts_with(prefix))
            found.push_back(pid);
        std::fclose(f);
    }
    return found;
}

} // namespace

// The contract every entry point keeps (exec_contract.hpp), through `boot -- CMD`.
const exec_contract::runner boot_entry = [](const auto& options, const auto& command,
                                            const std::string& input, std::chrono::seconds limit) {
    return env().boot(options, command, input, limit);
};

BOOST_AUTO_TEST_CASE(exit_status_and_separate_streams) {
    exec_contract::exit_status_and_separate_streams(boot_entry);
}
BOOST_AUTO_TEST_CASE(killed_by_sigkill_is_137) {
    exec_contract::killed_by_sigkill_is_137(boot_entry);
}
BOOST_AUTO_TEST_CASE(missing_command_is_127_and_named) {
    exec_contract::missing_command_is_127_and_named(boot_entry);
}
BOOST_AUTO_TEST_CASE(timeout_is_the_commands) {
    exec_contract::timeout_kills_and_says_so(boot_entry);
}
BOOST_AUTO_TEST_CASE(stdin_is_streamed_with_i) {
    exec_contract::stdin_is_streamed_with_i(boot_entry);
}

BOOST_AUTO_TEST_CASE(stdout_checksum_of_several_mib) {
    constexpr std::size_t total = 8u << 20;
    const std::string line = "abcdefghij\n";
    std::string expected_bytes;
    expected_bytes.reserve(total);
    while (expected_bytes.size() < total)
        expected_bytes += line;
    expected_bytes.resize(total);
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    EVP_DigestUpdate(ctx, expected_bytes.data(), expected_bytes.size());
    const auto expected = sha256_hex(ctx);
    EVP_MD_CTX_free(ctx);

    auto r = env().boot({}, {"sh", "-c", "yes abcdefghij | head -c " + std::to_string(total)}, "",
                        400s, true);
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out_bytes == total);
    BOOST_TEST(r.out_sha256 == expected);
}

BOOST_AUTO_TEST_CASE(env_workdir_user_from_the_disk) {
    auto r = env().boot({"-e", "GREETING=hello world", "-w", "/srv/data", "-u", "alice"},
                        {"sh", "-c",
                         "echo \"$GREETING\"; pwd; id; echo \"home=$HOME\"; "
                         "echo written > /tmp/f && cat /tmp/f"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "hello world\n/srv/data\n"), describe(r));
    BOOST_TEST(contains(r.out, "uid=1001(alice) gid=1002(alice)"), describe(r));
    BOOST_TEST(contains(r.out, "50(staff)"), describe(r)); // from the disk's /etc/group
    BOOST_TEST(contains(r.out, "home=/home/alice\n"), describe(r));
    BOOST_TEST(contains(r.out, "written\n"), describe(r));

    auto unknown = env().boot({"-u", "nobody-here"}, {"true"});
    BOOST_TEST(unknown.status == 125, describe(unknown));
    BOOST_TEST(contains(unknown.err, "unable to find user nobody-here"), describe(unknown));
}

BOOST_AUTO_TEST_CASE(tty_with_t) {
    auto r = env().boot({"-t"}, {"sh", "-c", "test -t 1 && echo on-a-tty; tty"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "on-a-tty"), describe(r));
    BOOST_TEST(contains(r.out, "/dev/pts/"), describe(r));
    auto plain = env().boot({}, {"sh", "-c", "test -t 1 || echo not-a-tty"});
    BOOST_TEST(contains(plain.out, "not-a-tty"), describe(plain));
}

BOOST_AUTO_TEST_CASE(publish_port_to_busybox_httpd) {
    // A free port: bind 0, read it back, release it.
    const int probe = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(probe, reinterpret_cast<sockaddr*>(&address), sizeof address);
    socklen_t length = sizeof address;
    ::getsockname(probe, reinterpret_cast<sockaddr*>(&address), &length);
    ::close(probe);
    const unsigned short port = ntohs(address.sin_port);

    std::atomic<pid_t> cli{0};
    process_result result;
    std::thread runner([&] {
        std::vector<std::string> argv = {env().cli.string(),
                                         "boot",
                                         "--disk",
                                         env().rootfs.string(),
                                         "-p",
                                         std::to_string(port) + ":80",
                                         "--",
                                         "sh",
                                         "-c",
                                         "echo served-by-the-guest > /tmp/index.html && exec "
                                         "busybox httpd -f -p 80 -h /tmp"};
        result = run_process(argv, "", 180s, false, [&](pid_t pid) { cli = pid; });
    });
    auto get = [&] {
        std::string response;
        const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        timeval tv{5, 0};
        ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_port = htons(port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
            const std::string request = "GET /index.html HTTP/1.0\r\n\r\n";
            if (::write(fd, request.data(), request.size()) ==
                static_cast<ssize_t>(request.size())) {
                char buffer[4096];
                ssize_t n;
                while ((n = ::read(fd, buffer, sizeof buffer)) > 0)
                    response.append(buffer, static_cast<std::size_t>(n));
            }
        }
        ::close(fd);
        return response;
    };
    std::string response;
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    while (std::chrono::steady_clock::now() < deadline) {
        response = get();
        if (contains(response, "200 OK")) break;
        std::this_thread::sleep_for(300ms);
    }
    while (cli == 0)
        std::this_thread::sleep_for(10ms);
    ::kill(cli, SIGTERM);
    runner.join();
    BOOST_TEST(contains(response, "served-by-the-guest"), response);
    BOOST_TEST(result.status == 143, describe(result)); // stopped by SIGTERM, like run
}

BOOST_AUTO_TEST_CASE(explicit_kernel_from_an_unpacked_package) {
    // --kernel ROOT/boot/vmlinuz-R: its modules come from ROOT/lib/modules/R.
    auto kernel = supermachine::boot::default_kernel();
    BOOST_TEST_REQUIRE(kernel.has_value());
    auto r = env().boot({"--kernel", kernel.value().vmlinuz.string(), "--memory", "320"},
                        {"sh", "-c", "uname -r; grep MemTotal /proc/meminfo"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, kernel.value().release + "\n"), describe(r));
    BOOST_TEST(contains(r.out, "MemTotal:"), describe(r));
}

// `boot --disk ROOT --disk DATA[,ro] -- CMD`: the data disks follow the
// root as /dev/vdb, /dev/vdc; ,ro refuses writes, the other is written in place.
BOOST_AUTO_TEST_CASE(data_disks_after_the_root) {
    const auto a = env().work / "data-a.img", b = env().work / "data-b.img";
    for (const auto& [path, text] : {std::pair{a, "disk-a"}, std::pair{b, "disk-b"}}) {
        std::ofstream out(path, std::ios::binary);
        out << text << std::string(1 << 20, '\0');
    }
    auto r = env().boot({"--disk", a.string() + ",ro", "--disk", b.string()},
                        {"sh", "-c",
                         "head -c 6 /dev/vdb; echo; head -c 6 /dev/vdc; echo; "
                         "echo x 2>/dev/null > /dev/vdb || echo ro-refused; "
                         "printf hi-b | dd of=/dev/vdc conv=notrunc,fsync 2>/dev/null && echo ok"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out == "disk-a\ndisk-b\nro-refused\nok\n", describe(r));
    std::ifstream in(b, std::ios::binary);
    std::string head(6, '\0');
    in.read(head.data(), 6);
    BOOST_TEST(head == "hi-b-b");
}

BOOST_AUTO_TEST_CASE(option_errors_are_ours_and_125) {
    const auto cli = env().cli.string();
    const auto root = env().rootfs.string();
    auto cow =
        run_process({cli, "boot", "--disk", root, "--disk", root + ",cow", "--", "true"}, "", 60s);
    BOOST_TEST(cow.status == 125, describe(cow));
    BOOST_TEST(contains(cow.err, ",cow is for the root"), describe(cow));
    auto none = run_process({cli, "boot", "--disk", root, "--"}, "", 60s);
    BOOST_TEST(none.status == 125, describe(none));
    auto missing =
        run_process({cli, "boot", "--disk", "/nonexistent/root.ext4", "--", "true"}, "", 60s);
    BOOST_TEST(missing.status == 125, describe(missing));
    BOOST_TEST(contains(missing.err, "/nonexistent/root.ext4"), describe(missing));
    auto bad_port = run_process({cli, "boot", "--disk", root, "-p", "x:y", "--", "true"}, "", 60s);
    BOOST_TEST(bad_port.status == 125, describe(bad_port));
}

BOOST_AUTO_TEST_CASE(boot_without_command_keeps_its_statuses) {
    const auto cli = env().cli.string();
    // Bad input stays 2, also for the command-only options without a command.
    auto bad = run_process({cli, "boot", "--kernel", "/nonexistent/vmlinuz"}, "", 60s);
    BOOST_TEST(bad.status == 2, describe(bad));
    auto stray = run_process({cli, "boot", "-e", "A=1"}, "", 60s);
    BOOST_TEST(stray.status == 2, describe(stray));
    BOOST_TEST(contains(stray.err, "need a command"), describe(stray));
    auto bad_timeout = run_process({cli, "boot", "--timeout", "soon"}, "", 60s);
    BOOST_TEST(bad_timeout.status == 2, describe(bad_timeout));
    // The default kernel with the demo initramfs greets and powers off: 0.
    auto demo = run_process({cli, "boot", "--engine", "qemu", "--timeout", "200"}, "", 240s);
    BOOST_TEST(demo.status == 0, describe(demo));
}

BOOST_AUTO_TEST_CASE(sigkilled_cli_takes_qemu_with_it) {
    // Orphans become our children, so we can tell "exited" from "still running".
    ::prctl(PR_SET_CHILD_SUBREAPER, 1);
    std::fflush(nullptr);
    const pid_t cli = ::fork();
    if (cli == 0) {
        const int null = ::open("/dev/null", O_RDWR);
        ::dup2(null, 0);
        ::dup2(null, 1);
        ::dup2(null, 2);
        const std::string path = env().cli.string(), root = env().rootfs.string();
        ::execl(path.c_str(), path.c_str(), "boot", "--disk", root.c_str(), "--", "sleep", "600",
                static_cast<char*>(nullptr));
        ::_exit(127);
    }
    std::vector<pid_t> qemu;
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    while (qemu.empty() && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(100ms);
        qemu = children_named(cli, "qemu-system");
    }
    BOOST_TEST_REQUIRE(qemu.size() == 1u, "no QEMU child of the CLI appeared");
    std::this_thread::sleep_for(3s); // QEMU well under way (guest booting)
    ::kill(cli, SIGKILL);
    ::waitpid(cli, nullptr, 0);
    const auto killed = std::chrono::steady_clock::now();
    bool gone = false;
    while (!gone && std::chrono::steady_clock::now() - killed < 5s) {
        const pid_t r = ::waitpid(qemu.front(), nullptr, WNOHANG);
        gone = r == qemu.front() || (r < 0 && errno == ECHILD && ::kill(qemu.front(), 0) != 0);
        if (!gone) std::this_thread::sleep_for(50ms);
    }
    BOOST_TEST(gone, "QEMU (pid " << qemu.front() << ") outlived the SIGKILLed supermachine");
    if (!gone) {
        ::kill(qemu.front(), SIGKILL);
        ::waitpid(qemu.front(), nullptr, 0);
    }
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}
