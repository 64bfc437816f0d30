#pragma once
// The real guest agent binary run as a host process over a socketpair, and
// a client on the other end. Every wait is bounded so a bug fails, not hangs.
#include <supermachine/agent/client.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>

#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

namespace supermachine::test {

/// Sanitizer runtimes keep freed memory in quarantine: resident-size bounds mean nothing there.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool memory_checks = false;
#else
inline constexpr bool memory_checks = true;
#endif

namespace asio = boost::asio;
using socket_type = asio::local::stream_protocol::socket;
using client_type = agent::basic_client<socket_type>;

inline std::string agent_binary() {
    const char* dir = std::getenv("SUPERMACHINE_BINARY_DIR");
    return std::string(dir ? dir : ".") + "/bin/supermachine-agent";
}

/// Spawns the agent serving one end of a socketpair; returns the other end.
class agent_process {
public:
    explicit agent_process(const std::string& token = "s3cret-token") {
        int sv[2];
        BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_adddup2(&actions, sv[1], 3);
        std::string binary = agent_binary();
        std::vector<char*> argv{binary.data(),
                                const_cast<char*>("--fd"),
                                const_cast<char*>("3"),
                                const_cast<char*>("--token"),
                                const_cast<char*>(token.c_str()),
                                nullptr};
        int rc = ::posix_spawn(&pid_, binary.c_str(), &actions, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&actions);
        ::close(sv[1]);
        BOOST_REQUIRE_MESSAGE(rc == 0, "spawn " << binary << ": " << std::strerror(rc));
        fd_ = sv[0];
    }
    ~agent_process() {
        if (fd_ >= 0) ::close(fd_);
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
    }
    /// The host end, handed over once.
    int release_fd() { return std::exchange(fd_, -1); }
    pid_t pid() const { return pid_; }

    /// Peak resident memory of the agent (VmHWM) in KiB.
    long peak_rss_kib() const { return read_hwm(pid_); }

    static long read_hwm(pid_t pid) {
        std::string path = "/proc/" + std::to_string(pid) + "/status";
        FILE* f = std::fopen(path.c_str(), "r");
        if (!f) return -1;
        char line[256];
        long kib = -1;
        while (std::fgets(line, sizeof line, f))
            if (std::sscanf(line, "VmHWM: %ld kB", &kib) == 1) break;
        std::fclose(f);
        return kib;
    }

private:
    pid_t pid_ = -1;
    int fd_ = -1;
};

/// Runs the io_context until `done` or a deadline (then fails the test).
template <class Predicate>
void run_until(asio::io_context& io, Predicate done,
               std::chrono::seconds limit = std::chrono::seconds(60)) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) {
            BOOST_FAIL("operation did not complete in time");
        }
        io.restart();
        io.run_one_for(std::chrono::milliseconds(100));
    }
}

/// Calls an async operation with a callback and waits for its result.
template <class... Results, class Start>
std::tuple<supermachine::error_code, Results...>
await(asio::io_context& io, Start start, std::chrono::seconds limit = std::chrono::seconds(60)) {
    std::optional<std::tuple<supermachine::error_code, Results...>> result;
    start([&](supermachine::error_code ec, Results... values) { result.emplace(ec, std::move(values)...); });
    run_until(
        io, [&] { return result.has_value(); }, limit);
    return std::move(*result);
}

struct connected_agent {
    asio::io_context io;
    agent_process process;
    client_type client;

    explicit connected_agent(bool authenticate = true)
        : client(socket_type(io, asio::local::stream_protocol(), process.release_fd())) {
        if (!authenticate) return;
        auto [ec, ok] = await<agent::hello_ok>(
            io, [&](auto h) { client.async_hello("s3cret-token", std::move(h)); });
        BOOST_REQUIRE_MESSAGE(!ec, "hello: " << ec.message());
    }

    agent::exec_output exec(agent::exec_request request, supermachine::error_code* error = nullptr) {
        auto [ec, out] = await<agent::exec_output>(
            io, [&](auto h) { client.async_exec(std::move(request), std::move(h)); });
        if (error)
            *error = ec;
        else
            BOOST_REQUIRE_MESSAGE(!ec, "exec: " << ec.message() << " " << out.agent_message);
        return out;
    }
};

inline agent::exec_request shell(std::string script) {
    agent::exec_request r;
    r.argv = {"/bin/sh", "-c", std::move(script)};
    r.env = {"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"};
    return r;
}

} // namespace supermachine::test
