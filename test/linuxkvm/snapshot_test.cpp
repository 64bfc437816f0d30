// Snapshot and restore of a running Linux guest on our kvm engine (nested
// here, label linux-kvm), Linux's own vsock driver as the oracle for
// TRANSPORT_RESET: the guest counts on its console and holds a vsock
// connection to the host across the capture. A restore continues the count
// without booting, resets the held connection (Linux ends it with
// ECONNRESET), and takes new connections both ways; the original keeps its
// connection. The same file restores twice in a row, and two restores of it
// side by side stay independent. Truncated or corrupt files give an error.
#include "vsock_line_peer.hpp"

#include <linux_guest.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>
#include <supermachine/virtio/vsock.hpp>

#include <boost/test/unit_test.hpp>

#include <filesystem>
#include <fstream>
#include <string>

using namespace supermachine;
using namespace linuxkvm_test;
using test::console;
namespace fs = std::filesystem;

namespace {

using machine = basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power,
                              virtio::rng, virtio::vsock>;
constexpr std::size_t vsock_slot = 4;

// Counts every 0.2 s; a console line "connect" makes it connect to the host
// (port 6000); any other line is echoed as "clone got: LINE". (The reader
// names its stdin: a background job of a non-interactive shell gets /dev/null.)
const char* guest_script = R"sh(stty -echo # typed lines must not land inside count lines
/bin/vsock_probe listen 5000 &
/bin/vsock_probe hold 6001 &
(while read -r line; do
   if [ "$line" = connect ]; then /bin/vsock_probe connect 6000 after-restore; else echo "clone got: $line"; fi
 done) < /dev/console &
i=0
while true; do i=$((i+1)); echo count=$i; sleep 0.2; done
)sh";

machine::config guest_config(const std::shared_ptr<console>& out, std::vector<std::byte> initrd) {
    machine::config cfg;
    cfg.memory_mib = 384;
    cfg.kernel_path = test::guest_kernel().vmlinuz.string();
    cfg.initrd = std::move(initrd);
    cfg.extra_cmdline = "quiet";
    std::get<devices::serial::config>(cfg.devices).sink = [out](std::string_view s) {
        out->append(s);
    };
    return cfg;
}

bool consecutive_from_one(const std::vector<std::uint64_t>& v) {
    for (std::size_t i = 0; i < v.size(); ++i)
        if (v[i] != i + 1) return false;
    return true;
}

struct captured {
    std::string before;        // the console up to the capture
    std::uint64_t last_before; // the last count printed before it
};

/// One restored clone, running, with host listeners on 6000 (answer) and 6001 (hold).
struct restored_clone {
    std::shared_ptr<console> out = std::make_shared<console>();
    host_peers peers;
    std::unique_ptr<machine> vm;

    restored_clone(test::running_io& io, const fs::path& file, std::vector<std::byte> initrd) {
        auto loaded = value_or_throw(snapshot::read_snapshot(file), "read_snapshot");
        vm = value_or_throw(machine::restore(io.io.get_executor(),
                                             guest_config(out, std::move(initrd)),
                                             std::move(loaded)),
                            "restore");
        auto& vsock = vm->device_at<vsock_slot>()->core();
        BOOST_REQUIRE(vsock.listen(6000, peers.answer()));
        BOOST_REQUIRE(vsock.listen(6001, peers.hold()));
        BOOST_REQUIRE(vm->start());
    }
    ~restored_clone() {
        vm->stop();
        vm->wait();
    }
    auto& vsock() { return vm->device_at<vsock_slot>()->core(); }
};

/// The restored console continues the count: before + after is 1, 2, ... with no boot.
void check_count_continues(const captured& c, restored_clone& restored) {
    BOOST_REQUIRE_MESSAGE(restored.out->wait_counts(5, std::chrono::seconds(120)),
                          "restored console: " << restored.out->snapshot());
    const auto after = restored.out->snapshot();
    console joined;
    joined.text = c.before + after;
    const auto all = joined.counts();
    BOOST_CHECK_MESSAGE(consecutive_from_one(all), "counts before + after are not 1, 2, ...:\n"
                                                       << after);
    BOOST_CHECK_GT(all.size(), c.last_before + 4);
    BOOST_CHECK(after.find("linux-test: up") == std::string::npos); // no boot
}

/// Linux's vsock driver got TRANSPORT_RESET: the held connection ended with a
/// reset, and new connections work both ways.
void check_vsock_after_restore(restored_clone& restored) {
    BOOST_CHECK_MESSAGE(restored.out->wait_for("vsock hold ended: Connection reset by peer",
                                               std::chrono::seconds(60)),
                        "restored console: " << restored.out->snapshot());
    BOOST_CHECK_EQUAL(ask_guest(restored.vsock(), 5000, "after-restore").value_or("(none)"),
                      "guest got: after-restore");
    restored.vm->device<devices::serial>().send_input("connect\n");
    BOOST_CHECK(
        restored.out->wait_for("vsock reply: host got: after-restore", std::chrono::seconds(60)));
}

struct fixture {
    test::running_io io;
    test::scratch_directory dir;
    fs::path file = dir.path / "linux.snap";
    std::vector<std::byte> initrd;
    captured capture{};

    fixture() {
        test::require_linux_kvm();
        const auto kernel = test::guest_kernel();
        initrd = test::linux_initramfs(kernel, guest_script,
                                       {{test::guest_program("vsock_probe"), "bin/vsock_probe"}});
        auto out = std::make_shared<console>();
        host_peers peers;
        auto vm = value_or_throw(machine::create(io.io.get_executor(), guest_config(out, initrd)),
                                 "create");
        auto& vsock = vm->device_at<vsock_slot>()->core();
        BOOST_REQUIRE(vsock.listen(6001, peers.hold()));
        BOOST_REQUIRE(vm->start());
        BOOST_REQUIRE_MESSAGE(out->wait_for("vsock held", std::chrono::seconds(240)) &&
                                  out->wait_counts(5, std::chrono::seconds(60)),
                              "console:\n"
                                  << out->snapshot());
        {
            auto image = value_or_throw(vm->pause_and_capture(), "capture");
            capture = {out->snapshot(), out->counts().back()};
            auto written = snapshot::write_snapshot(file, image);
            vm->resume_after_capture();
            BOOST_REQUIRE(written);
        }
        // The original runs on and keeps its connection (a pause is no reset).
        const auto seen = out->counts().size();
        BOOST_CHECK(out->wait_counts(seen + 5));
        BOOST_CHECK(consecutive_from_one(out->counts()));
        BOOST_CHECK_EQUAL(out->occurrences("vsock hold ended"), 0u);
        BOOST_CHECK_EQUAL(vsock.connection_count(), 1u);
        vm->stop();
        vm->wait();
    }
};

} // namespace

BOOST_FIXTURE_TEST_SUITE(linux_snapshot, fixture)

BOOST_AUTO_TEST_CASE(restores_twice_in_a_row_and_side_by_side) {
    for (int round = 0; round < 2; ++round) { // the same file, one restore after another
        BOOST_TEST_CONTEXT("restore " << round) {
            restored_clone restored(io, file, initrd);
            check_count_continues(capture, restored);
            check_vsock_after_restore(restored);
        }
    }
    // Two clones of one file at once: each continues and answers only its own input.
    restored_clone a(io, file, initrd), b(io, file, initrd);
    check_count_continues(capture, a);
    check_count_continues(capture, b);
    a.vm->device<devices::serial>().send_input("to-a\n");
    b.vm->device<devices::serial>().send_input("to-b\n");
    BOOST_CHECK(a.out->wait_for("clone got: to-a"));
    BOOST_CHECK(b.out->wait_for("clone got: to-b"));
    BOOST_CHECK_EQUAL(a.out->occurrences("to-b"), 0u);
    BOOST_CHECK_EQUAL(b.out->occurrences("to-a"), 0u);
    check_vsock_after_restore(a);
    check_vsock_after_restore(b);
}

BOOST_AUTO_TEST_CASE(truncated_or_corrupt_files_are_refused_with_an_error) {
    const auto size = fs::file_size(file);
    const fs::path bad = dir.path / "bad.snap";
    for (const std::uintmax_t keep : {std::uintmax_t{0}, std::uintmax_t{7}, std::uintmax_t{4096},
                                      size / 2, size - 4096, size - 1}) {
        fs::copy_file(file, bad, fs::copy_options::overwrite_existing);
        fs::resize_file(bad, keep);
        auto loaded = snapshot::read_snapshot(bad);
        BOOST_TEST(!loaded, "a file cut to " << keep << " of " << size << " bytes was accepted");
        if (!loaded) BOOST_TEST(!loaded.error().message().empty());
    }
    // A flipped byte in the header's magic, then in the body (it starts after the 64-byte header).
    for (const std::streamoff at : {std::streamoff{0}, std::streamoff{64}}) {
        fs::copy_file(file, bad, fs::copy_options::overwrite_existing);
        std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
        f.seekg(at);
        char c = 0;
        f.get(c);
        f.seekp(at);
        f.put(static_cast<char>(c ^ 0x5a));
        f.close();
        auto loaded = snapshot::read_snapshot(bad); // the header and body carry CRC32s
        BOOST_TEST(!loaded, "a file with byte " << at << " flipped was accepted");
        if (!loaded) BOOST_TEST_MESSAGE("flipped byte " << at << ": " << loaded.error().message());
    }
    BOOST_TEST(!snapshot::read_snapshot(dir.path / "missing.snap"));
}

BOOST_AUTO_TEST_SUITE_END()
