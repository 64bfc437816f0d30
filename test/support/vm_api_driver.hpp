#pragma once
// Drives the vm API synchronously in a test: boot, restore, snapshot, exec,
// each bounded and stopping the test case on failure.
#include <supermachine/error.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

namespace supermachine::test {

/// Drives the vm API on one io_context for the API cases. The vms keep
/// work on the executor (console, engine), so each wait runs it until the
/// operations under test completed, bounded; every helper stops the test
/// case on failure.
struct api_driver {
    boost::asio::io_context io;
    int pending = 0;

    void wait() {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(4);
        while (pending > 0 && std::chrono::steady_clock::now() < deadline)
            io.run_one_for(std::chrono::milliseconds(200));
        BOOST_REQUIRE(pending == 0);
    }

    /// A vm of `image` booted with `options`.
    std::shared_ptr<vm> boot(const prepared_image& image, const vm_options& options) {
        std::shared_ptr<vm> started;
        supermachine::error_code ec = errc::invalid_argument;
        pending = 1;
        vm::async_start(io.get_executor(), image, options,
                        [&](supermachine::error_code e, std::shared_ptr<vm> v) {
                            ec = e;
                            started = v;
                            --pending;
                        });
        wait();
        BOOST_REQUIRE_MESSAGE(!ec, ec.message() << "\n"
                                                << (started ? started->console_tail() : ""));
        return started;
    }

    /// A vm restored from `dir` (vm::async_restore with the image and options).
    std::shared_ptr<vm> restore(const std::filesystem::path& dir, const prepared_image& image,
                                const vm_options& options) {
        std::shared_ptr<vm> restored;
        supermachine::error_code ec = errc::invalid_argument;
        pending = 1;
        vm::async_restore(io.get_executor(), dir, image, options,
                          [&](supermachine::error_code e, std::shared_ptr<vm> v) {
                              ec = e;
                              restored = v;
                              --pending;
                          });
        wait();
        BOOST_REQUIRE_MESSAGE(
            !ec, ec.message() << ": " << (restored ? restored->failure_detail() : "") << "\n"
                              << (restored ? restored->console_tail() : ""));
        BOOST_REQUIRE(restored->restored());
        return restored;
    }

    /// async_snapshot as it completed (saved or refused); errors stop the test.
    vm::snapshot_report try_snapshot(vm& v, const std::filesystem::path& dir, bool resume) {
        supermachine::error_code ec = errc::invalid_argument;
        vm::snapshot_report report;
        pending = 1;
        v.async_snapshot(dir, resume, [&](supermachine::error_code e, vm::snapshot_report r) {
            ec = e;
            report = r;
            --pending;
        });
        wait();
        BOOST_REQUIRE_MESSAGE(!ec, ec.message());
        return report;
    }

    /// A snapshot that must be saved.
    vm::snapshot_report snapshot(vm& v, const std::filesystem::path& dir, bool resume) {
        auto report = try_snapshot(v, dir, resume);
        BOOST_REQUIRE_MESSAGE(report.saved, report.refusal);
        return report;
    }

    /// `sh -c command` on `v`: its stdout; the exec must succeed with status 0.
    std::string exec(vm& v, const std::string& command) {
        std::string out;
        pending = 1;
        v.async_exec({.argv = {"sh", "-c", command}},
                     [&](supermachine::error_code e, agent::exec_output o) {
                         BOOST_REQUIRE_MESSAGE(!e, e.message());
                         BOOST_TEST(o.exit_code == 0,
                                    command << " exited " << o.exit_code << ": " << o.stderr_data);
                         out = o.stdout_data;
                         --pending;
                     });
        wait();
        return out;
    }
};

} // namespace supermachine::test
