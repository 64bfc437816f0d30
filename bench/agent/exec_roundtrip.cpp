// Exec round trip of `true` through the guest agent, run as a host process
// and reached over a Unix socket, beside the host floor: posix_spawn + wait
// of the same `true`, measured in the same run, interleaved. Median of N (default 200).
//
//   bench_agent_exec [runs]       (finds the agent next to itself, or $SUPERMACHINE_AGENT)
#include <supermachine/agent/client.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

namespace asio = boost::asio;
using namespace supermachine;
using clock_type = std::chrono::steady_clock;

namespace {

double median_us(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

template <class... R, class Start>
std::tuple<supermachine::error_code, R...> wait_for(asio::io_context& io, Start start) {
    std::optional<std::tuple<supermachine::error_code, R...>> result;
    start([&](supermachine::error_code ec, R... r) { result.emplace(ec, std::move(r)...); });
    while (!result) {
        io.restart();
        io.run_one();
    }
    return std::move(*result);
}

} // namespace

extern char** environ;

int main(int argc, char** argv) {
    int runs = argc > 1 ? std::max(1, std::atoi(argv[1])) : 200;
    std::string agent =
        std::getenv("SUPERMACHINE_AGENT")
            ? std::getenv("SUPERMACHINE_AGENT")
            : (std::filesystem::path(argv[0]).parent_path() / "supermachine-agent").string();
    std::string true_path = "/bin/true";

    // The agent on a Unix socket.
    std::string socket_path = "/tmp/supermachine-bench-agent-" + std::to_string(getpid()) + ".sock";
    char* agent_args[] = {agent.data(),
                          const_cast<char*>("--unix"),
                          socket_path.data(),
                          const_cast<char*>("--token"),
                          const_cast<char*>("bench"),
                          nullptr};
    pid_t agent_pid;
    if (posix_spawn(&agent_pid, agent.c_str(), nullptr, nullptr, agent_args, environ) != 0) {
        std::fprintf(stderr, "cannot start %s\n", agent.c_str());
        return 1;
    }
    asio::io_context io;
    asio::local::stream_protocol::socket socket(io);
    boost::system::error_code connect_error;
    for (int i = 0; i < 500; ++i) {
        socket.connect(asio::local::stream_protocol::endpoint(socket_path), connect_error);
        if (!connect_error) break;
        socket = asio::local::stream_protocol::socket(io);
        usleep(10000);
    }
    if (connect_error) {
        std::fprintf(stderr, "cannot connect to the agent: %s\n", connect_error.message().c_str());
        kill(agent_pid, SIGKILL);
        return 1;
    }
    agent::basic_client<asio::local::stream_protocol::socket> client(std::move(socket));
    auto [hello_error, ok] =
        wait_for<agent::hello_ok>(io, [&](auto h) { client.async_hello("bench", h); });
    if (hello_error) return std::fprintf(stderr, "hello: %s\n", hello_error.message().c_str()), 1;

    // Interleaved with the floor, so both see the same (shared, noisy) machine.
    auto spawn_true = [&]() -> double {
        char* args[] = {true_path.data(), nullptr};
        auto t0 = clock_type::now();
        pid_t pid;
        if (posix_spawn(&pid, true_path.c_str(), nullptr, nullptr, args, environ) != 0) return -1;
        int status;
        waitpid(pid, &status, 0);
        return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
    };
    std::vector<double> floor, round_trip;
    for (int i = 0; i < runs + 10; ++i) {
        double spawn_us = spawn_true();
        if (spawn_us < 0)
            return std::fprintf(stderr, "posix_spawn %s failed\n", true_path.c_str()), 1;
        if (i >= 10) floor.push_back(spawn_us);
        auto t0 = clock_type::now();
        auto [ec, out] = wait_for<agent::exec_output>(
            io, [&](auto h) { client.async_exec({.argv = {true_path}}, h); });
        double us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
        if (ec || out.exit_code != 0)
            return std::fprintf(stderr, "exec failed: %s\n", ec.message().c_str()), 1;
        if (i >= 10) round_trip.push_back(us); // the first few warm caches up
    }
    kill(agent_pid, SIGTERM);
    waitpid(agent_pid, nullptr, 0);
    unlink(socket_path.c_str());

    double f = median_us(floor), r = median_us(round_trip);
    std::printf("posix_spawn true (host floor): median %.1f us over %d runs\n", f, runs);
    std::printf("agent exec true (unix socket): median %.1f us over %d runs\n", r, runs);
    std::printf("ratio agent/floor: %.2fx\n", r / f);
    return 0;
}
