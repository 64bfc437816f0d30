// The vm API against a real Linux guest (QEMU TCG, our vhost-user devices,
// the agent as /init): concurrent execs, files, and a guest that dies under
// pending operations. Every wait is bounded by io_context::run_for.
#include "vm_fixture.hpp"

#include <supermachine/image.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>
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
    std::optional<std::error_code> result;
    sm::vm::async_start(io.get_executor(), ready.value(), {},
                        [&](std::error_code ec, std::shared_ptr<sm::vm> v) {
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
    std::vector<std::error_code> errors(count);
    for (int i = 0; i < count; ++i) {
        sm::agent::exec_request request;
        request.argv = {"sh", "-c",
                        "sleep 1; echo exec-" + std::to_string(i) + "; exit " + std::to_string(i)};
        machine->async_exec(request, [&, i](std::error_code ec, sm::agent::exec_output out) {
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
    std::optional<std::error_code> wrote;
    machine->async_write_file("/tmp/blob.bin", data, 0640, [&](std::error_code ec) { wrote = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return wrote.has_value(); }, 60s));
    BOOST_TEST(!*wrote, wrote->message());
    std::optional<std::error_code> read_error;
    std::string read_back;
    machine->async_read_file("/tmp/blob.bin", 8u << 20, [&](std::error_code ec, std::string s) {
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
        [&](std::error_code, sm::agent::exec_output out) { stat = std::move(out); });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return stat.has_value(); }, 60s));
    BOOST_TEST(stat->stdout_data.starts_with("640 " + std::to_string(data.size()) + "\n"),
               stat->stdout_data);
    BOOST_TEST(stat->stdout_data.find("ID=busybox") != std::string::npos, stat->stdout_data);

    // Missing file, over-limit read, missing command: clear errors.
    std::optional<std::error_code> missing;
    machine->async_read_file("/no/such/file", 1024,
                             [&](std::error_code ec, std::string) { missing = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return missing.has_value(); }, 60s));
    BOOST_TEST((*missing == sm::errc::not_found), missing->message());
    std::optional<std::error_code> too_big;
    machine->async_read_file("/tmp/blob.bin", 1024,
                             [&](std::error_code ec, std::string) { too_big = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return too_big.has_value(); }, 60s));
    BOOST_TEST((*too_big == std::errc::file_too_large), too_big->message());
    std::optional<std::error_code> not_found;
    std::string agent_message;
    machine->async_exec({.argv = {"no-such-program-abc"}},
                        [&](std::error_code ec, sm::agent::exec_output out) {
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
    std::optional<std::error_code> pending;
    machine->async_exec({.argv = {"sleep", "600"}},
                        [&](std::error_code ec, sm::agent::exec_output) { pending = ec; });
    std::optional<std::error_code> trigger;
    machine->async_exec({.argv = {"sh", "-c", "sleep 0.5; echo c > /proc/sysrq-trigger"}},
                        [&](std::error_code ec, sm::agent::exec_output) { trigger = ec; });
    BOOST_TEST_REQUIRE(run_until(
                           io, [&] { return pending && trigger; }, 120s),
                       "pending operations still open 120 s after the panic");
    BOOST_TEST(static_cast<bool>(*pending));
    BOOST_TEST(static_cast<bool>(*trigger));
    // Later operations fail at once too.
    std::optional<std::error_code> after;
    machine->async_read_file("/etc/os-release", 4096,
                             [&](std::error_code ec, std::string) { after = ec; });
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return after.has_value(); }, 10s));
    BOOST_TEST((*after == sm::errc::agent_unavailable), after->message());
    BOOST_TEST(machine->console_tail().find("Kernel panic") != std::string::npos,
               machine->console_tail());
}

BOOST_AUTO_TEST_CASE(kill_ends_pending_operations) {
    boost::asio::io_context io;
    auto machine = boot(io);
    std::optional<std::error_code> pending;
    machine->async_exec({.argv = {"sleep", "600"}},
                        [&](std::error_code ec, sm::agent::exec_output) { pending = ec; });
    run_until(
        io, [] { return false; }, 1s);
    machine->kill();
    BOOST_TEST_REQUIRE(run_until(
        io, [&] { return pending.has_value(); }, 30s));
    // The client was closed under it: an error (operation cancelled), not a hang.
    BOOST_TEST(static_cast<bool>(*pending));
    BOOST_TEST_MESSAGE("pending exec after kill(): " << pending->message());
}
