// `supermachine run` end to end as users run it: a real Linux guest (Debian's
// cloud kernel under QEMU TCG), our vhost-user blk + vsock devices, the agent
// as /init, the demo busybox image. Each case boots its own VM.
#include "exec_contract.hpp"
#include "vm_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include <atomic>
#include <thread>

using namespace supermachine::test;
using namespace std::chrono_literals;

namespace {

vm_environment& env() {
    static vm_environment e;
    return e;
}

// One HTTP/1.0 GET to 127.0.0.1:port; the whole response, or "" if refused.
std::string http_get(unsigned short port, const std::string& path) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string response;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
        const std::string request = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
        if (::write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
            char buffer[4096];
            ssize_t n;
            while ((n = ::read(fd, buffer, sizeof buffer)) > 0)
                response.append(buffer, static_cast<std::size_t>(n));
        }
    }
    ::close(fd);
    return response;
}

unsigned short free_port() {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(fd);
    return ntohs(a.sin_port);
}

} // namespace

// The contract every entry point keeps (exec_contract.hpp), through `run`.
const exec_contract::runner run_entry = [](const auto& options, const auto& command,
                                           const std::string& input, std::chrono::seconds limit) {
    return env().run(options, command, input, limit);
};

BOOST_AUTO_TEST_CASE(exit_code_and_separate_streams) {
    exec_contract::exit_status_and_separate_streams(run_entry);
}
BOOST_AUTO_TEST_CASE(killed_by_sigkill_is_137) {
    exec_contract::killed_by_sigkill_is_137(run_entry);
}
BOOST_AUTO_TEST_CASE(missing_command_is_127_and_named) {
    exec_contract::missing_command_is_127_and_named(run_entry);
}
BOOST_AUTO_TEST_CASE(timeout_kills_and_says_so) {
    exec_contract::timeout_kills_and_says_so(run_entry);
}
BOOST_AUTO_TEST_CASE(stdin_is_streamed_with_i) {
    exec_contract::stdin_is_streamed_with_i(run_entry);
}

BOOST_AUTO_TEST_CASE(image_config_defaults) {
    auto r = env().run(
        {}, {"sh", "-c", "cat /etc/os-release; echo ---; id; echo ---; pwd; echo ---; env"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "NAME=\"supermachine demo (busybox)\""), describe(r));
    BOOST_TEST(contains(r.out, "uid=0(root) gid=0(root)"), describe(r));
    BOOST_TEST(contains(r.out, "---\n/\n---"), describe(r)); // WorkingDir /
    BOOST_TEST(contains(r.out, "PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"), describe(r));
    BOOST_TEST(contains(r.out, "HOME=/root\n"), describe(r));
}

BOOST_AUTO_TEST_CASE(overrides_env_workdir_user) {
    auto r = env().run(
        {"-e", "GREETING=hello world", "-e", "PATH=/bin", "-w", "/var/www", "-u", "www-data"},
        {"sh", "-c", "id; echo ---; pwd; echo ---; env"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "uid=33(www-data) gid=33(www-data)"), describe(r));
    BOOST_TEST(contains(r.out, "100(users)"), describe(r)); // supplementary group from /etc/group
    BOOST_TEST(contains(r.out, "---\n/var/www\n---"), describe(r));
    BOOST_TEST(contains(r.out, "GREETING=hello world\n"), describe(r));
    BOOST_TEST(contains(r.out, "PATH=/bin\n"), describe(r));
    BOOST_TEST(!contains(r.out, "PATH=/usr/sbin"), describe(r));
    BOOST_TEST(contains(r.out, "HOME=/var/www\n"), describe(r));

    auto numeric = env().run({"-u", "1234:4321"}, {"id"});
    BOOST_TEST(numeric.status == 0, describe(numeric));
    BOOST_TEST(contains(numeric.out, "uid=1234 gid=4321"), describe(numeric));
}

BOOST_AUTO_TEST_CASE(hundred_mib_of_stdout_intact_with_bounded_rss) {
    // 100 MiB of 'abcdefghij\n' lines, generated in the guest, hashed here.
    constexpr std::size_t total = 100u << 20;
    const std::string line = "abcdefghij\n";
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    std::string block;
    while (block.size() < (1u << 20))
        block += line;
    std::size_t done = 0;
    std::size_t phase = 0;
    while (done < total) {
        // Keep the line phase continuous across blocks.
        std::string chunk;
        const std::size_t want = std::min<std::size_t>(total - done, 1u << 20);
        chunk.reserve(want);
        while (chunk.size() < want) {
            chunk += line[phase];
            phase = (phase + 1) % line.size();
        }
        EVP_DigestUpdate(ctx, chunk.data(), chunk.size());
        done += chunk.size();
    }
    const auto expected = sha256_hex(ctx);
    EVP_MD_CTX_free(ctx);

    // The CLI's own peak with a trivial command, in this run, as the reference.
    auto idle = env().run({}, {"true"});
    BOOST_TEST_REQUIRE(idle.status == 0, describe(idle));
    auto r = env().run({}, {"sh", "-c", "yes abcdefghij | head -c 104857600"}, "", 600s, true);
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out_bytes == total);
    BOOST_TEST(r.out_sha256 == expected);
    BOOST_TEST_MESSAGE("100 MiB stdout: " << r.seconds << " s, CLI peak RSS " << r.max_rss_kib
                                          << " KiB");
    // The CLI must stream, not hold the output: far below the 100 MiB it passed on.
    BOOST_TEST_MESSAGE("CLI peak RSS running `true`: " << idle.max_rss_kib << " KiB");
    BOOST_TEST(r.max_rss_kib > 0);
    BOOST_TEST(r.max_rss_kib < idle.max_rss_kib + 16 * 1024,
               "peak RSS " << r.max_rss_kib << " KiB vs " << idle.max_rss_kib << " KiB for `true`");
}

BOOST_AUTO_TEST_CASE(publish_port_to_busybox_httpd) {
    const auto port = free_port();
    std::atomic<pid_t> cli{0};
    process_result result;
    std::thread runner([&] {
        result = env().run({"-p", std::to_string(port) + ":80"},
                           {"busybox", "httpd", "-f", "-p", "80", "-h", "/var/www"}, "", 120s,
                           false, "", [&](pid_t pid) { cli = pid; });
    });
    std::string response;
    const auto deadline = std::chrono::steady_clock::now() + 90s;
    while (std::chrono::steady_clock::now() < deadline) {
        response = http_get(port, "/index.html");
        if (contains(response, "200 OK")) break;
        std::this_thread::sleep_for(300ms);
    }
    // A second connection through the same forward.
    const auto again = http_get(port, "/index.html");
    while (cli == 0)
        std::this_thread::sleep_for(10ms);
    ::kill(cli, SIGTERM);
    runner.join();
    BOOST_TEST(contains(response, "200 OK"), response);
    BOOST_TEST(contains(response, "hello from a supermachine microVM"), response);
    BOOST_TEST(contains(again, "hello from a supermachine microVM"), again);
    BOOST_TEST(!result.timed_out, describe(result)); // SIGTERM ends the CLI
    BOOST_TEST(result.status == 143, describe(result));
}

BOOST_AUTO_TEST_CASE(closed_stdout_ends_the_run_and_qemu) {
    // Orphans (QEMU, if the CLI died without stopping it) become our children.
    ::prctl(PR_SET_CHILD_SUBREAPER, 1);
    const std::string command = shell_quote(env().cli.string()) + " run -q " +
                                shell_quote(env().image) + " yes | head -c 10";
    auto r = run_process({"sh", "-c", command}, "", 120s);
    BOOST_TEST(!r.timed_out, describe(r));
    BOOST_TEST(r.out == "y\ny\ny\ny\ny\n", describe(r));
    // Every descendant is gone within a few seconds: nothing left running.
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    bool all_gone = false;
    while (!all_gone && std::chrono::steady_clock::now() < deadline) {
        const pid_t pid = ::waitpid(-1, nullptr, WNOHANG);
        if (pid < 0 && errno == ECHILD)
            all_gone = true;
        else if (pid == 0)
            std::this_thread::sleep_for(100ms);
    }
    BOOST_TEST(all_gone, "a process (QEMU?) outlived `supermachine run` whose stdout closed");
    if (!all_gone) { // end the orphans we adopted (our children, by pid), then reap them
        for (const auto& entry : fs::directory_iterator("/proc")) {
            const auto name = entry.path().filename().string();
            if (name.find_first_not_of("0123456789") != std::string::npos) continue;
            std::FILE* f = std::fopen((entry.path() / "stat").c_str(), "r");
            if (!f) continue;
            int pid = 0, ppid = 0;
            char state = 0;
            char comm[256];
            if (std::fscanf(f, "%d (%255[^)]) %c %d", &pid, comm, &state, &ppid) == 4 &&
                ppid == ::getpid())
                ::kill(pid, SIGKILL);
            std::fclose(f);
        }
        while (::waitpid(-1, nullptr, 0) > 0) {
        }
    }
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}
