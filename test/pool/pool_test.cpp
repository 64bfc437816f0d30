// supermachine::pool with real clones of a real snapshot: leases are
// independent and never reused, max_size bounds them, a waiting acquire is
// cancellable and is served when a lease is dropped. Then the example
// server (example/pool_server) answers HTTP requests over loopback.
#include "../vmtests/vm_fixture.hpp"

#include <supermachine/image.hpp>
#include <supermachine/pool.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/test/unit_test.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <optional>
#include <regex>
#include <thread>

using namespace supermachine::test;
using namespace std::chrono_literals;
namespace sm = supermachine;
namespace asio = boost::asio;

// A pool (and its clones, basic_vm) on an executor that cannot hold a
// strand compiles whole: its clones then run on that executor itself.
template class supermachine::basic_pool<asio::io_context::executor_type>;
template class supermachine::detail::basic_pool_core<asio::io_context::executor_type>;

namespace {

vm_environment& env() {
    static vm_environment e;
    return e;
}

template <class Done>
bool run_until(asio::io_context& io, Done done, std::chrono::seconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    io.restart();
    while (!done() && std::chrono::steady_clock::now() < deadline)
        io.run_one_for(deadline - std::chrono::steady_clock::now());
    return done();
}

// Run a coroutine to completion on `io` (bounded); rethrow what it threw.
template <class Coroutine>
void run_coroutine(asio::io_context& io, Coroutine coroutine, std::chrono::seconds limit) {
    bool finished = false;
    std::exception_ptr failure;
    asio::co_spawn(io, std::move(coroutine), [&](std::exception_ptr e) {
        finished = true;
        failure = e;
    });
    BOOST_TEST_REQUIRE(run_until(io, [&] { return finished; }, limit), "did not finish in time");
    if (failure) std::rethrow_exception(failure);
}

} // namespace

BOOST_AUTO_TEST_CASE(leases_are_fresh_bounded_and_cancellable) {
    asio::io_context io;
    const auto snapshot = env().work / "template";
    run_coroutine(
        io,
        [&]() -> asio::awaitable<void> {
            const auto source = sm::image::from_oci(env().image);
            auto image = co_await source.async_prepare(asio::use_awaitable);
            sm::vm_options options;
            options.snapshottable = true;
            auto booted = co_await sm::vm::async_start(io, image, options, asio::use_awaitable);
            auto report = co_await booted->async_snapshot(snapshot, false, asio::use_awaitable);
            BOOST_TEST_REQUIRE(report.saved, report.refusal);
            co_await booted->async_stop(asio::use_awaitable);
        }(),
        300s);

    sm::pool pool(io, snapshot, {.min_idle = 2, .max_size = 3, .clone = {}});
    run_coroutine(
        io,
        [&]() -> asio::awaitable<void> {
            // Filled, a pool restores a lease's replacement only once the
            // lease is dropped (a restore would compete with its request).
            while (pool.counts().idle < 2) {
                asio::steady_timer wait(io, 20ms);
                co_await wait.async_wait(asio::use_awaitable);
            }
            {
                auto early = co_await pool.async_acquire(asio::use_awaitable);
                const auto c = pool.counts();
                BOOST_TEST(c.idle == 1u);
                BOOST_TEST(c.restoring == 0u);
            }
            auto first = co_await pool.async_acquire(asio::use_awaitable);
            co_await first->async_write_file("/tmp/dirty", "left by the first lease", 0644,
                                             asio::use_awaitable);
            auto second = co_await pool.async_acquire(asio::use_awaitable);
            auto third = co_await pool.async_acquire(asio::use_awaitable);
            BOOST_TEST(first.get() != second.get());
            BOOST_TEST(second.get() != third.get());
            auto c = pool.counts();
            BOOST_TEST(c.leased == 3u);
            BOOST_TEST(c.idle + c.restoring == 0u); // max_size reached

            // Independent clones: a file in one is not in another.
            auto seen = co_await second->async_exec({"sh", "-c", "cat /tmp/dirty || echo absent"},
                                                    asio::use_awaitable);
            BOOST_TEST(seen.stdout_data == "absent\n");

            // A fourth waits; cancelled, it ends with operation_aborted.
            asio::cancellation_signal cancel;
            asio::steady_timer timer(io, 300ms);
            timer.async_wait([&](boost::system::error_code) {
                cancel.emit(asio::cancellation_type::terminal);
            });
            sm::error_code waited;
            try {
                (void)co_await pool.async_acquire(
                    asio::bind_cancellation_slot(cancel.slot(), asio::use_awaitable));
            } catch (const boost::system::system_error& e) {
                waited = e.code();
            }
            BOOST_TEST((waited == asio::error::operation_aborted), waited.message());

            // Dropping a lease discards its clone and serves the next acquire
            // with a fresh one, without the first lease's file.
            first.reset();
            auto fourth = co_await pool.async_acquire(asio::use_awaitable);
            auto clean = co_await fourth->async_exec({"sh", "-c", "cat /tmp/dirty || echo absent"},
                                                     asio::use_awaitable);
            BOOST_TEST(clean.stdout_data == "absent\n");
            c = pool.counts();
            BOOST_TEST(c.discarded == 2u);
            BOOST_TEST(c.restored >= 5u);
            BOOST_TEST(c.failed == 0u);
        }(),
        300s);
    pool.close();
    run_until(io, [] { return false; }, 1s);
}

BOOST_AUTO_TEST_CASE(example_server_answers_over_loopback) {
    const auto server = env().binary_dir / "bin" / "pool_server";
    BOOST_TEST_REQUIRE(fs::exists(server), server);
    int out_pipe[2];
    BOOST_TEST_REQUIRE(::pipe(out_pipe) == 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(out_pipe[1], 1);
        ::close(out_pipe[0]);
        ::execl(server.c_str(), server.c_str(), env().image.c_str(), "--port", "0", "--pool", "2",
                static_cast<char*>(nullptr));
        ::_exit(127);
    }
    ::close(out_pipe[1]);
    // "listening on 127.0.0.1:PORT" once the template snapshot is made.
    std::string banner;
    char c;
    while (banner.find('\n') == std::string::npos && ::read(out_pipe[0], &c, 1) == 1)
        banner += c;
    std::smatch m;
    const bool listening = std::regex_search(banner, m, std::regex(R"(127\.0\.0\.1:(\d+))"));
    if (!listening) ::kill(pid, SIGKILL);
    BOOST_TEST_REQUIRE(listening, "server said: " << banner);
    const auto port = static_cast<unsigned short>(std::stoi(m[1]));

    // Four concurrent requests, each in its own clone.
    namespace http = boost::beast::http;
    asio::io_context io;
    std::vector<std::optional<http::response<http::string_body>>> answers(4);
    for (int i = 0; i < 4; ++i)
        asio::co_spawn(
            io,
            [&, i]() -> asio::awaitable<void> {
                asio::ip::tcp::socket socket(io);
                co_await socket.async_connect({asio::ip::make_address("127.0.0.1"), port},
                                              asio::use_awaitable);
                http::request<http::string_body> request(http::verb::post, "/run", 11);
                request.set(http::field::host, "127.0.0.1");
                request.body() = "echo request-" + std::to_string(i) + "; exit " + std::to_string(i);
                request.prepare_payload();
                co_await http::async_write(socket, request, asio::use_awaitable);
                boost::beast::flat_buffer buffer;
                http::response<http::string_body> response;
                co_await http::async_read(socket, buffer, response, asio::use_awaitable);
                answers[i] = std::move(response);
            },
            asio::detached);
    run_until(io, [&] { return std::all_of(answers.begin(), answers.end(), [](auto& a) { return a.has_value(); }); },
              180s);
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ::close(out_pipe[0]);
    for (int i = 0; i < 4; ++i) {
        BOOST_TEST_REQUIRE(answers[i].has_value(), "request " << i << " got no answer");
        BOOST_TEST(answers[i]->result_int() == 200);
        BOOST_TEST(answers[i]->body() == "request-" + std::to_string(i) + "\n");
        BOOST_TEST(std::string((*answers[i])["X-Exit-Code"]) == std::to_string(i));
    }
    BOOST_TEST(WIFEXITED(status));
}
