// The vm API against a real Linux guest (QEMU TCG, our vhost-user devices,
// the agent as /init): concurrent execs, files, and a guest that dies under
// pending operations. Every wait is bounded by io_context::run_for.
#include "vm_fixture.hpp"

#include <supermachine/image.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>
#include <boost/test/unit_test.hpp>

#include <memory>
#include <optional>

using namespace supermachine::test;
using namespace std::chrono_literals;
namespace sm = supermachine;

namespace {

vm_environment& env() {
    static vm_environment e;
    return e;
}

// Boot the demo image; fail the test (not hang) if it does not come up in 120 s.
std::shared_ptr<sm::vm> boot(boost::asio::io_context& io) {
    std::string why;
    auto ready = sm::image::from_oci(env().image).prepare(&why);
    BOOST_TEST_REQUIRE(ready.has_value(), "prepare: " << why);
    std::shared_ptr<sm::vm> machine;
    std::optional<supermachine::error_code> result;
    sm::vm::async_start(io.get_executor(), ready.value(), {},
                        [&](supermachine::error_code ec, std::shared_ptr<sm::vm> v) {
                            result = ec;
                            machine = std::move(v);
                        });
    io.restart();
    while (!result && io.run_one_for(150s)) {
    }
    BOOST_TEST_REQUIRE(result.has_value(), "the VM did not come up within 150 s");
    BOOST_TEST_REQUIRE(!*result, result->message() << "\n"
                                                   << (machine ? machine->console_tail() : ""));
    return machine;
}

// Run the io_context until `done()` or `limit`; true if done.
template <class Done>
bool run_until(boost::asio::io_context& io, Done done, std::chrono::seconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    io.restart();
    while (!done() && std::chrono::steady_clock::now() < deadline)
        io.run_one_for(deadline - std::chrono::steady_clock::now());
    return done();
}

} // namespace

BOOST_AUTO_TEST_CASE(concurrent_execs_files_and_errors) {
    boost::asio::io_context io;
    auto machine = boot(io);

    // 20 concurrent execs in one VM, each sleeping so they overlap.
    constexpr int count = 20;
    int finished = 0;
    std::vector<std::optional<sm::agent::exec_output>> outputs(count);
    std::vector<supermachine::error_code> errors(count);
    for (int i = 0; i < count; ++i) {
        sm::agent::exec_request request;
        request.argv = {"sh", "-c",
                        "sleep 1; echo exec-" + std::to_string(i) + "; exit " + std::to_string(i)};
        machine->async_exec(request, [&, i](supermachine::error_code ec, sm::agent::exec_output out) {
            errors[i] = ec;
            outputs[i] = std::move(out);
            ++finished;
        });
    }
    const auto started = std::chrono::steady_clock::now();
    BOOST_TEST_REQUIRE(run_until(
                           io, [&] { return finished == count; }, 120s),
                       finished << " of " << count << " execs finished");
    BOOST_TEST_MESSAGE(
        "20 concurrent `sleep 1` execs: "
        << std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()
        << " s");
    for (int i = 0; i < count; ++i) {
        BOOST_TEST(!errors[i], i << ": " << errors[i].message());
        BOOST_TEST(outputs[i]->exit_code == i);
        BOOST_TEST(outputs[i]->stdout_data == "exec-" + std::to_string(i) + "\n");
    }

    // Files: write (binary, 1 MiB + odd bytes), read back, and from a command.
    std::string data;
    for (std::size_t i = 0; i < (1u << 20) + 77; ++i)
        data += static_cast<char>((i * 131 + i / 7) & 0xff);
    std::optional<supermachine::error_code> wrote;
    machine->async_write_file("/tmp/blob.bin", data, 0640, [&](supermachine::error_code ec) { wrote = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return wrote.has_value(); }, 60s));
    BOOST_TEST(!*wrote, wrote->message());
    std::optional<supermachine::error_code> read_error;
    std::string read_back;
    machine->async_read_file("/tmp/blob.bin", 8u << 20, [&](supermachine::error_code ec, std::string s) {
        read_error = ec;
        read_back = std::move(s);
    });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return read_error.has_value(); }, 60s));
    BOOST_TEST(!*read_error, read_error->message());
    BOOST_TEST(read_back.size() == data.size());
    BOOST_TEST((read_back == data));
    std::optional<sm::agent::exec_output> stat;
    machine->async_exec(
        {.argv = {"sh", "-c", "stat -c '%a %s' /tmp/blob.bin; cat /etc/os-release"}},
        [&](supermachine::error_code, sm::agent::exec_output out) { stat = std::move(out); });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return stat.has_value(); }, 60s));
    BOOST_TEST(stat->stdout_data.starts_with("640 " + std::to_string(data.size()) + "\n"),
               stat->stdout_data);
    BOOST_TEST(stat->stdout_data.find("ID=busybox") != std::string::npos, stat->stdout_data);

    // Missing file, over-limit read, missing command: clear errors.
    std::optional<supermachine::error_code> missing;
    machine->async_read_file("/no/such/file", 1024,
                             [&](supermachine::error_code ec, std::string) { missing = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return missing.has_value(); }, 60s));
    BOOST_TEST((*missing == sm::errc::not_found), missing->message());
    std::optional<supermachine::error_code> too_big;
    machine->async_read_file("/tmp/blob.bin", 1024,
                             [&](supermachine::error_code ec, std::string) { too_big = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return too_big.has_value(); }, 60s));
    BOOST_TEST((*too_big == std::errc::file_too_large), too_big->message());
    std::optional<supermachine::error_code> not_found;
    std::string agent_message;
    machine->async_exec({.argv = {"no-such-program-abc"}},
                        [&](supermachine::error_code ec, sm::agent::exec_output out) {
                            not_found = ec;
                            agent_message = out.agent_message;
                        });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return not_found.has_value(); }, 60s));
    BOOST_TEST((*not_found == sm::errc::command_not_found), not_found->message());
    BOOST_TEST(agent_message.find("no-such-program-abc") != std::string::npos, agent_message);

    machine->kill();
}

BOOST_AUTO_TEST_CASE(guest_panic_ends_pending_operations) {
    boost::asio::io_context io;
    auto machine = boot(io);
    // A long exec is pending when the kernel panics (sysrq 'c'); panic=-1
    // and QEMU's -no-reboot end the engine, which must fail everything.
    std::optional<supermachine::error_code> pending;
    machine->async_exec({.argv = {"sleep", "600"}},
                        [&](supermachine::error_code ec, sm::agent::exec_output) { pending = ec; });
    std::optional<supermachine::error_code> trigger;
    machine->async_exec({.argv = {"sh", "-c", "sleep 0.5; echo c > /proc/sysrq-trigger"}},
                        [&](supermachine::error_code ec, sm::agent::exec_output) { trigger = ec; });
    BOOST_TEST_REQUIRE(run_until(
                           io, [&] { return pending && trigger; }, 120s),
                       "pending operations still open 120 s after the panic");
    BOOST_TEST(static_cast<bool>(*pending));
    BOOST_TEST(static_cast<bool>(*trigger));
    // Later operations fail at once too.
    std::optional<supermachine::error_code> after;
    machine->async_read_file("/etc/os-release", 4096,
                             [&](supermachine::error_code ec, std::string) { after = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return after.has_value(); }, 10s));
    BOOST_TEST((*after == sm::errc::agent_unavailable), after->message());
    BOOST_TEST(machine->console_tail().find("Kernel panic") != std::string::npos,
               machine->console_tail());
}

BOOST_AUTO_TEST_CASE(kill_ends_pending_operations) {
    boost::asio::io_context io;
    auto machine = boot(io);
    std::optional<supermachine::error_code> pending;
    machine->async_exec({.argv = {"sleep", "600"}},
                        [&](supermachine::error_code ec, sm::agent::exec_output) { pending = ec; });
    run_until(
        io, [] { return false; }, 1s);
    machine->kill();
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return pending.has_value(); }, 30s));
    // The client was closed under it: an error (operation cancelled), not a hang.
    BOOST_TEST(static_cast<bool>(*pending));
    BOOST_TEST_MESSAGE("pending exec after kill(): " << pending->message());
}

// Asio's conventions, as a coroutine user meets them: use_awaitable throws
// boost::system::system_error, a plain argument list is enough for an exec,
// and per-operation cancellation ends an exec at once (its process killed)
// with operation_aborted while the VM stays usable.
BOOST_AUTO_TEST_CASE(awaitable_errors_plain_arguments_and_cancellation) {
    namespace asio = boost::asio;
    asio::io_context io;
    auto machine = boot(io);
    bool finished = false;
    std::string unexpected;
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
            bool threw = false;
            // A named image, not a temporary: GCC 12 destroys a temporary
            // of a co_await expression that throws at the wrong address
            // (ASan: "free on address which was not malloc()-ed", the
            // short-string buffer of image_options; doc/embedding.md).
            const auto missing = sm::image::from_oci("oci:/no/such/layout:tag");
            try {
                (void)co_await missing.async_prepare(asio::use_awaitable);
            } catch (const boost::system::system_error& e) {
                threw = true;
                BOOST_TEST_MESSAGE("missing image: " << e.what());
            }
            BOOST_TEST(threw, "async_prepare of a missing image did not throw");

            auto hi = co_await machine->async_exec({"echo", "hi"}, asio::use_awaitable);
            BOOST_TEST(hi.stdout_data == "hi\n");

            asio::cancellation_signal cancel;
            asio::steady_timer timer(io, 500ms);
            timer.async_wait([&](boost::system::error_code) {
                cancel.emit(asio::cancellation_type::terminal);
            });
            const auto started = std::chrono::steady_clock::now();
            sm::error_code code;
            try {
                (void)co_await machine->async_exec(
                    {"sleep", "30"}, asio::bind_cancellation_slot(cancel.slot(), asio::use_awaitable));
            } catch (const boost::system::system_error& e) {
                code = e.code();
            }
            const auto took = std::chrono::steady_clock::now() - started;
            BOOST_TEST_MESSAGE("cancelled `sleep 30` completed after "
                               << std::chrono::duration<double>(took).count() << " s: "
                               << code.message());
            BOOST_TEST((code == asio::error::operation_aborted), code.message());
            BOOST_TEST((code == sm::errc::cancelled));
            BOOST_TEST((code == std::errc::operation_canceled));
            BOOST_TEST(took < 1500ms); // 500 ms until the cancel, then well under a second

            // Still usable, and the sleep was killed in the guest.
            std::string left;
            for (int i = 0; i < 50; ++i) {
                auto ps = co_await machine->async_exec({"sh", "-c", "pidof sleep; echo status=$?"},
                                                       asio::use_awaitable);
                left = ps.stdout_data;
                if (left.find("status=1") != std::string::npos) break;
                asio::steady_timer pause(io, 100ms);
                co_await pause.async_wait(asio::use_awaitable);
            }
            BOOST_TEST(left.find("status=1") != std::string::npos, "sleep still running: " << left);

            // A start cancelled while the guest boots ends at once, its engine killed.
            const auto demo = sm::image::from_oci(env().image);
            auto ready = co_await demo.async_prepare(asio::use_awaitable);
            asio::cancellation_signal cancel_start;
            asio::steady_timer start_timer(io, 300ms);
            start_timer.async_wait([&](boost::system::error_code) {
                cancel_start.emit(asio::cancellation_type::terminal);
            });
            const auto start_began = std::chrono::steady_clock::now();
            sm::error_code start_code;
            try {
                // `{}` for the options, built inside co_await: what GCC 12
                // copies bitwise for an aggregate (vm_options is not one).
                (void)co_await sm::vm::async_start(
                    io, ready, {}, asio::bind_cancellation_slot(cancel_start.slot(), asio::use_awaitable));
            } catch (const boost::system::system_error& e) {
                start_code = e.code();
            }
            BOOST_TEST((start_code == asio::error::operation_aborted), start_code.message());
            BOOST_TEST((std::chrono::steady_clock::now() - start_began < 5s));
        },
        [&](std::exception_ptr failure) {
            finished = true;
            if (!failure) return;
            try {
                std::rethrow_exception(failure);
            } catch (const std::exception& e) {
                unexpected = e.what();
            }
        });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return finished; }, 180s));
    BOOST_TEST(unexpected.empty(), unexpected);
    machine->kill();
}
