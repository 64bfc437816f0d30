// A restored machine tells its guest's vsock driver that the transport was
// reset (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET into the event buffers the guest
// posted before the snapshot), on /dev/kvm with the conformance guest counting
// and watching its event queue (conformance.vsock=1, guest/conformance/vsock_events.c).
#include "count_guest.hpp"

#include <running_io.hpp>
#include <skip.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/virtio/vsock.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <atomic>
#include <filesystem>

using namespace snapmachine_test;
namespace ss = supermachine::snapshot;
namespace fs = std::filesystem;

namespace {

using vsock_machine = sm::basic_machine<sm::backend::kvm, sm::devices::serial, sm::devices::i8042,
                                        sm::devices::acpi_power, sm::virtio::vsock>;

/// The machines' executor, run on its own thread (the vsock serves its kicks there).
using sm::test::running_io;

vsock_machine::config vsock_config(std::shared_ptr<console> out, const std::string& guest_args) {
    vsock_machine::config cfg;
    cfg.memory_mib = 256;
    cfg.kernel_path = conformance_bzimage();
    cfg.extra_cmdline = "conformance.mode=count conformance.every=1000 " + guest_args;
    std::get<sm::devices::serial::config>(cfg.devices).sink = [out](std::string_view s) {
        out->append(s);
    };
    // Longer than any test runs: a pending connect ends by the test's doing, not a timer.
    std::get<sm::virtio::vsock::config>(cfg.devices).connect_timeout = std::chrono::minutes(5);
    return cfg;
}

template <class T>
T get(sm::result<T> r, const char* what) {
    if (!r) BOOST_FAIL(what << ": " << r.error().message());
    return std::move(r).value();
}

std::size_t occurrences(const std::string& text, const std::string& what) {
    std::size_t n = 0;
    for (auto pos = text.find(what); pos != std::string::npos; pos = text.find(what, pos + 1))
        ++n;
    return n;
}

std::vector<std::uint64_t> counts_in(const std::string& text) {
    console c;
    c.text = text;
    return c.counts();
}

bool consecutive_from_one(const std::vector<std::uint64_t>& v) {
    for (std::size_t i = 0; i < v.size(); ++i)
        if (v[i] != i + 1) return false;
    return true;
}

struct snapshot_result {
    std::string before;        // the console up to the capture
    std::string original;      // the original's whole console (it ran on after the capture)
    std::uint64_t last_before; // the last count printed before the capture
};

/// Boots the count guest with `guest_args`, snapshots it to `file` mid-run and
/// lets the original count on for a while before stopping it. With
/// `hold_connection` (the guest's driver started the vsock) a host connect to a
/// guest port is in progress across the capture (the guest posts no rx buffer,
/// so its REQUEST stays queued): the original keeps it.
snapshot_result boot_and_snapshot(running_io& io, const fs::path& file,
                                  const std::string& guest_args, bool hold_connection = false) {
    auto out = std::make_shared<console>();
    auto vm =
        get(vsock_machine::create(io.io.get_executor(), vsock_config(out, guest_args)), "create");
    BOOST_REQUIRE(vm->start());
    BOOST_REQUIRE_MESSAGE(out->wait_counts(5), "console: " << out->snapshot());
    auto& device = vm->template device_at<3>()->core();
    auto connect_result = std::make_shared<std::atomic<int>>(-1); // -1: not completed
    if (hold_connection) {
        device.connect(1234, [connect_result](supermachine::error_code ec, int fd, std::uint32_t) {
            if (fd >= 0) ::close(fd);
            connect_result->store(ec.value());
        });
        BOOST_CHECK_EQUAL(device.connection_count(), 1u);
    }
    snapshot_result r;
    {
        auto image = get(vm->pause_and_capture(), "pause and capture");
        r.before = out->snapshot();
        r.last_before = out->counts().back();
        auto written = ss::write_snapshot(file, image);
        vm->resume_after_capture();
        BOOST_REQUIRE(written);
    }
    const std::size_t seen = out->counts().size();
    BOOST_REQUIRE_MESSAGE(out->wait_counts(seen + 10), "the original resumes after the snapshot");
    if (hold_connection) {
        // The pause stopped the device's queues but did not drop the connection.
        BOOST_CHECK_EQUAL(device.connection_count(), 1u);
        BOOST_CHECK_EQUAL(connect_result->load(), -1);
    }
    vm->stop();
    vm->wait();
    if (hold_connection) {
        BOOST_CHECK_EQUAL(device.connection_count(), 0u); // stopping drops it
        for (int i = 0; i < 1000 && connect_result->load() == -1; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
        BOOST_CHECK(connect_result->load() > 0); // failed (cancelled), not left hanging
    }
    r.original = out->snapshot();
    BOOST_CHECK(consecutive_from_one(out->counts()));
    return r;
}

/// Restores `file`, runs it for `ticks` count lines and returns its console.
std::string restore_and_run(running_io& io, const fs::path& file, const std::string& guest_args,
                            std::size_t ticks = 8) {
    auto out = std::make_shared<console>();
    auto loaded = get(ss::read_snapshot(file), "read_snapshot");
    auto clone = get(vsock_machine::restore(io.io.get_executor(), vsock_config(out, guest_args),
                                            std::move(loaded)),
                     "restore");
    BOOST_CHECK_EQUAL(clone->template device_at<3>()->core().connection_count(), 0u);
    BOOST_REQUIRE(clone->start());
    BOOST_REQUIRE_MESSAGE(out->wait_counts(ticks), "restored: " << out->snapshot());
    clone->stop();
    const auto e = clone->wait();
    BOOST_CHECK(e.what == sm::machine_exit::reason::stopped);
    return out->snapshot();
}

/// The restored console continues the count (1, 2, ... across the capture) without booting.
void check_count_continues(const snapshot_result& s, const std::string& after) {
    const auto all = counts_in(s.before + after);
    BOOST_CHECK_MESSAGE(consecutive_from_one(all), "counts before + after are not 1, 2, ...");
    BOOST_CHECK_GT(all.size(), s.last_before + 5);
    BOOST_CHECK(after.find("conformance: start") == std::string::npos);
}

} // namespace

BOOST_AUTO_TEST_CASE(restored_guest_gets_exactly_one_transport_reset) {
    require_kvm();
    running_io io;
    temp_dir dir;
    const fs::path file = dir.path / "vsock.snap";
    const std::string args = "conformance.vsock=1";
    const auto s = boot_and_snapshot(io, file, args, true);
    BOOST_CHECK_EQUAL(occurrences(s.before, "vsock: cid 3\n"), 1u);
    BOOST_CHECK_EQUAL(occurrences(s.before, "vsock: event buffers 4\n"), 1u);
    // The original, paused and resumed for the capture, was never told anything.
    BOOST_CHECK_EQUAL(occurrences(s.original, "vsock event"), 0u);

    for (int restore = 0; restore < 2; ++restore) { // each restore from the file resets once
        const std::string after = restore_and_run(io, file, args);
        BOOST_TEST_MESSAGE("restore " << restore << ", after count=" << s.last_before << ": "
                                      << after.substr(0, 120));
        BOOST_CHECK_EQUAL(occurrences(after, "vsock event: transport reset\n"), 1u);
        BOOST_CHECK_EQUAL(occurrences(after, "vsock event"), 1u);
        check_count_continues(s, after);
        // It came at once, before the guest's next count line (it polls once per tick).
        const auto event = after.find("vsock event: transport reset");
        const auto second_count = after.find("count=", after.find("count=") + 1);
        BOOST_CHECK(event < second_count);
    }
}

BOOST_AUTO_TEST_CASE(guest_without_vsock_driver_restores_and_gets_nothing) {
    require_kvm();
    running_io io;
    temp_dir dir;
    const fs::path file = dir.path / "plain.snap";
    const auto s = boot_and_snapshot(io, file, "");
    BOOST_CHECK_EQUAL(occurrences(s.before, "vsock"), 0u);
    const std::string after = restore_and_run(io, file, "");
    BOOST_CHECK_EQUAL(occurrences(after, "vsock"), 0u);
    check_count_continues(s, after);
}

BOOST_AUTO_TEST_CASE(event_queue_without_buffers_restores_and_gets_nothing) {
    require_kvm();
    running_io io;
    temp_dir dir;
    const fs::path file = dir.path / "nobuffers.snap";
    const std::string args = "conformance.vsock=1 conformance.vsock.buffers=0";
    const auto s = boot_and_snapshot(io, file, args);
    BOOST_CHECK_EQUAL(occurrences(s.before, "vsock: event buffers 0\n"), 1u);
    const std::string after = restore_and_run(io, file, args);
    BOOST_CHECK_EQUAL(occurrences(after, "vsock event"), 0u);
    check_count_continues(s, after);
}

BOOST_AUTO_TEST_CASE(too_short_event_buffer_comes_back_empty) {
    require_kvm();
    running_io io;
    temp_dir dir;
    const fs::path file = dir.path / "short.snap";
    const std::string args = "conformance.vsock=1 conformance.vsock.buffer_len=2";
    const auto s = boot_and_snapshot(io, file, args);
    BOOST_CHECK_EQUAL(occurrences(s.before, "vsock: event buffer bytes 2\n"), 1u);
    const std::string after = restore_and_run(io, file, args);
    // The event took the first (2-byte) buffer, which came back with length 0.
    BOOST_CHECK_EQUAL(occurrences(after, "vsock event: short, length 0\n"), 1u);
    BOOST_CHECK_EQUAL(occurrences(after, "vsock event"), 1u);
    check_count_continues(s, after);
}
