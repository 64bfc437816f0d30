// QEMU as the real vhost-user front-end: the Debian cloud kernel boots under
// the QEMU engine (TCG here) with two of our vhost-user block devices and
// our entropy device. Linux's own virtio drivers read a file from an ext4 data
// disk and copy it raw onto a second disk; the host checks both checksums.
#include "linux_guest.hpp"

#include <supermachine/backend/qemu.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>
#include <supermachine/virtio/rng.hpp>

#include <skip.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <sys/mman.h>

#include <fstream>
#include <optional>
#include <random>
#include <sstream>

namespace sm = supermachine;
namespace fs = std::filesystem;

namespace {

struct guest_run {
    std::string console;
    int status = -1;
    bool timed_out = false;
    std::string diagnostics;
};

} // namespace

BOOST_AUTO_TEST_SUITE(qemu_engine)

BOOST_AUTO_TEST_CASE(linux_reads_and_writes_our_vhost_user_disks) {
    auto kernel = sm::test::find_linux_kernel();
    if (!kernel)
        sm::test::skip(
            "no Debian cloud kernel (set SUPERMACHINE_TEST_KERNEL or unpack it to /tmp/k/x)");
    if (!sm::backend::find_qemu("qemu-system-x86_64"))
        sm::test::skip("qemu-system-x86_64 not on PATH");
    for (auto tool : {"cpio", "mkfs.ext4"})
        if (!sm::test::have_program(tool)) sm::test::skip(std::string(tool) + " not installed");
    if (!fs::exists("/bin/busybox")) sm::test::skip("busybox-static not installed");

    sm::test::temporary_directory work;
    BOOST_REQUIRE(!work.path.empty());
    // 3 MiB of deterministic noise in an ext4 image.
    std::vector<char> payload(3 << 20);
    std::mt19937_64 random(42);
    for (auto& c : payload)
        c = static_cast<char>(random());
    const auto payload_sha = sm::test::sha256_hex(payload.data(), payload.size());
    fs::create_directories(work.path / "data");
    std::ofstream(work.path / "data/payload.bin", std::ios::binary)
        .write(payload.data(), payload.size());
    BOOST_REQUIRE(sm::test::make_ext4(work.path / "data", work.path / "data.img", 16));
    {
        std::ofstream out(work.path / "out.img", std::ios::binary);
        out.seekp((8 << 20) - 1);
        out.put(0);
    }
    const std::string init =
        R"SH(for i in $(seq 1 200); do [ -b /dev/vda ] && [ -b /dev/vdb ] && break; sleep 0.05; done
mount -t ext4 -o ro /dev/vda /mnt || echo MOUNT-FAILED
echo "SHA=$(sha256sum /mnt/payload.bin | cut -d' ' -f1)"
dd if=/mnt/payload.bin of=/dev/vdb bs=65536 conv=fsync 2>/dev/null && echo COPY-OK
head -c 4096 /dev/hwrng | wc -c | sed 's/^/RNG=/'
echo GUEST-DONE)SH";
    BOOST_REQUIRE(sm::test::make_initramfs(*kernel, work.path, init, work.path / "initramfs.cpio"));

    using disk = sm::virtio::blk<sm::storage::raw_file>;
    disk::config data_config, out_config;
    data_config.storage = {(work.path / "data.img").string(), true};
    out_config.storage = {(work.path / "out.img").string(), false};
    auto data = disk::create(data_config);
    auto out = disk::create(out_config);
    auto rng = sm::virtio::rng::create({});
    BOOST_REQUIRE(data.has_value());
    BOOST_REQUIRE(out.has_value());
    BOOST_REQUIRE(rng.has_value());

    boost::asio::io_context io;
    sm::backend::qemu_config config;
    if (const char* q = std::getenv("SUPERMACHINE_QEMU")) config.qemu_binary = q;
    config.kernel = kernel->image;
    config.initrd = work.path / "initramfs.cpio";
    config.cmdline = "console=ttyS0 panic=-1 quiet";
    config.memory_bytes = 256u << 20;
    config.icount = "shift=4,sleep=off"; // fastest stable TCG boot on a loaded host
    config.accelerator = sm::backend::qemu_accelerator::automatic;
    sm::backend::qemu_machine vm(io.get_executor(), config);
    BOOST_REQUIRE(vm.attach(sm::backend::vhost_user_device_kind::blk, *data.value()).has_value());
    BOOST_REQUIRE(vm.attach(sm::backend::vhost_user_device_kind::blk, *out.value()).has_value());
    BOOST_REQUIRE(vm.attach(sm::backend::vhost_user_device_kind::rng, *rng.value()).has_value());
    guest_run run;
    const bool echo = std::getenv("SUPERMACHINE_TEST_CONSOLE") != nullptr;
    auto started = vm.start([&](std::string_view s) {
        run.console.append(s);
        if (echo) std::fwrite(s.data(), 1, s.size(), stderr);
    });
    BOOST_REQUIRE_MESSAGE(started.has_value(),
                          (started ? std::string() : started.error().message()));
    BOOST_TEST(!vm.uses_kvm()); // kvm_pvm cannot run Linux: TCG
    boost::asio::steady_timer deadline(io, std::chrono::seconds(150));
    deadline.async_wait([&](const boost::system::error_code& ec) {
        if (ec) return;
        run.timed_out = true;
        vm.kill();
    });
    vm.async_wait([&](supermachine::error_code, int status) {
        run.status = status;
        deadline.cancel();
    });
    io.run();
    run.diagnostics = vm.diagnostics();
    BOOST_TEST_MESSAGE("console tail: " << run.console.substr(
                           run.console.size() > 2000 ? run.console.size() - 2000 : 0));
    BOOST_TEST_MESSAGE("qemu stderr: " << run.diagnostics);
    BOOST_TEST(!run.timed_out);
    BOOST_TEST(run.status == 0);
    BOOST_TEST(run.console.find("SHA=" + payload_sha) != std::string::npos);
    BOOST_TEST(run.console.find("COPY-OK") != std::string::npos);
    BOOST_TEST(run.console.find("RNG=4096") != std::string::npos);
    BOOST_TEST(run.console.find("GUEST-DONE") != std::string::npos);
    BOOST_TEST(rng.value()->bytes_served() >= 4096u);
    for (auto reason :
         vm.device_end_reasons()) // sessions ended because QEMU exited, not on an error
        BOOST_TEST(reason == sm::make_error_code(sm::errc::vhost_user_disconnected));
    // The second disk now starts with the payload, byte for byte.
    std::vector<char> written(payload.size());
    std::ifstream(work.path / "out.img", std::ios::binary).read(written.data(), written.size());
    BOOST_TEST(sm::test::sha256_hex(written.data(), written.size()) == payload_sha);
}

BOOST_AUTO_TEST_CASE(missing_qemu_is_a_clear_error) {
    boost::asio::io_context io;
    sm::backend::qemu_config config;
    config.qemu_binary = "qemu-system-does-not-exist";
    config.kernel = "/nonexistent";
    sm::backend::qemu_machine vm(io.get_executor(), config);
    auto r = vm.start({});
    BOOST_REQUIRE(!r);
    BOOST_TEST(r.error() == sm::make_error_code(sm::errc::engine_unavailable));
}

BOOST_AUTO_TEST_CASE(run_qemu_boot_reports_missing_qemu_as_127) {
    sm::backend::qemu_boot_options options;
    options.qemu.qemu_binary = "qemu-system-does-not-exist";
    options.qemu.kernel = "/nonexistent";
    BOOST_TEST(sm::backend::run_qemu_boot(options, [](std::string_view) {}) == 127);
}

BOOST_AUTO_TEST_CASE(auto_engine_picks_qemu_here_and_says_why) {
    std::ostringstream log;
    auto d = sm::backend::select_engine("auto", &log);
    BOOST_REQUIRE(d.has_value());
    std::string why;
    const bool kvm_linux = sm::backend::host_kvm_runs_linux(&why);
    BOOST_TEST((d.value().kind == sm::backend::engine_kind::kvm) == kvm_linux);
    if (fs::exists("/sys/module/kvm_pvm")) {
        BOOST_TEST((d.value().kind == sm::backend::engine_kind::qemu));
        BOOST_TEST(log.str().find("engine auto: qemu") != std::string::npos);
        BOOST_TEST(log.str().find("kvm_pvm") != std::string::npos);
    }
    std::ostringstream again;
    BOOST_REQUIRE(sm::backend::select_engine("auto", &again).has_value());
    BOOST_TEST(again.str().empty()); // said once per process
    BOOST_TEST(!sm::backend::select_engine("bogus", nullptr).has_value());
    BOOST_TEST((sm::backend::select_engine("qemu", nullptr).value().kind ==
                sm::backend::engine_kind::qemu));
}

// Snapshots on the QEMU engine: QEMU's migration stream to a file with our
// vhost-user blk attached, restored with -incoming into a new QEMU whose
// guest keeps reading our disk; and a device QEMU cannot migrate is named.
namespace {

struct snapshot_fixture {
    std::optional<sm::test::linux_kernel> kernel = sm::test::find_linux_kernel();
    sm::test::temporary_directory work;
    sm::backend::qemu_config config;

    snapshot_fixture() {
        if (!kernel) sm::test::skip("no Debian cloud kernel");
        if (!sm::backend::find_qemu("qemu-system-x86_64"))
            sm::test::skip("qemu-system-x86_64 not on PATH");
        for (auto tool : {"cpio", "mkfs.ext4"})
            if (!sm::test::have_program(tool)) sm::test::skip(std::string(tool) + " not installed");
        fs::create_directories(work.path / "data");
        std::ofstream(work.path / "data/hello.txt") << "hello\n";
        BOOST_REQUIRE(sm::test::make_ext4(work.path / "data", work.path / "data.img", 8));
        // Every tick reads a fresh disk block with O_DIRECT: after a restore,
        // ticks prove our back-end serves the restored guest.
        const std::string init =
            R"SH(for i in $(seq 1 200); do [ -b /dev/vda ] && break; sleep 0.05; done
echo READY
i=0
while true; do
  dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$i iflag=direct 2>/dev/null && echo "TICK $i"
  i=$(( (i + 1) % 2000 ))
  sleep 0.1
done)SH";
        BOOST_REQUIRE(
            sm::test::make_initramfs(*kernel, work.path, init, work.path / "initramfs.cpio"));
        config.kernel = kernel->image;
        config.initrd = work.path / "initramfs.cpio";
        config.cmdline = "console=ttyS0 panic=-1 quiet";
        config.memory_bytes = 128u << 20;
        config.icount = "shift=4,sleep=off";
    }
};

/// Run `io` until `done()` or the deadline; false on timeout.
template <class Predicate>
bool run_until(boost::asio::io_context& io, std::chrono::seconds limit, Predicate done) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        io.run_for(std::chrono::milliseconds(20));
        if (io.stopped()) io.restart();
    }
    return true;
}

std::size_t count_of(const std::string& text, const std::string& needle) {
    std::size_t n = 0;
    for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
        ++n;
    return n;
}

} // namespace

BOOST_AUTO_TEST_CASE(snapshot_to_file_and_restore_with_our_blk) {
    snapshot_fixture f;
    using disk = sm::virtio::blk<sm::storage::raw_file>;
    disk::config dc;
    dc.storage = {(f.work.path / "data.img").string(), true};
    const auto snapshot = f.work.path / "vm.migration";
    sm::backend::qemu_machine::snapshot_report report;
    {
        auto blk = disk::create(dc).value();
        boost::asio::io_context io;
        sm::backend::qemu_machine vm(io.get_executor(), f.config);
        BOOST_REQUIRE(vm.attach(sm::backend::vhost_user_device_kind::blk, *blk).has_value());
        std::string console;
        BOOST_REQUIRE(vm.start([&](std::string_view s) { console.append(s); }).has_value());
        BOOST_REQUIRE_MESSAGE(run_until(io, std::chrono::seconds(120),
                                        [&] { return count_of(console, "TICK") >= 3; }),
                              "guest never ticked: "
                                  << console.substr(console.size() > 800 ? console.size() - 800 : 0)
                                  << vm.diagnostics());
        bool done = false;
        supermachine::error_code error;
        vm.async_save_snapshot(snapshot, false, [&](supermachine::error_code ec, auto r) {
            error = ec;
            report = r;
            done = true;
        });
        BOOST_REQUIRE(run_until(io, std::chrono::seconds(120), [&] { return done; }));
        BOOST_REQUIRE_MESSAGE(!error, error.message());
        BOOST_TEST_MESSAGE("snapshot: saved=" << report.saved << " refusal='" << report.refusal
                                              << "' bytes=" << report.bytes << " in "
                                              << report.duration.count() << " ms");
        vm.kill();
    }
    if (!report.saved) {
        // QEMU refused: the report names why; the engine falls back to a cold boot.
        BOOST_TEST(!report.refusal.empty());
        return;
    }
    BOOST_TEST(report.bytes > 0u);
    // Restore into a new QEMU and new back-end objects over the same disk.
    auto blk = disk::create(dc).value();
    boost::asio::io_context io;
    auto config = f.config;
    config.incoming = snapshot;
    sm::backend::qemu_machine vm(io.get_executor(), config);
    BOOST_REQUIRE(vm.attach(sm::backend::vhost_user_device_kind::blk, *blk).has_value());
    BOOST_REQUIRE(vm.restore_device_states(snapshot).has_value());
    std::string console;
    const auto start = std::chrono::steady_clock::now();
    BOOST_REQUIRE(vm.start([&](std::string_view s) { console.append(s); }).has_value());
    BOOST_REQUIRE_MESSAGE(
        run_until(io, std::chrono::seconds(60), [&] { return count_of(console, "TICK") >= 3; }),
        "restored guest never ticked: " << console << vm.diagnostics());
    const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - start);
    BOOST_TEST_MESSAGE("restore to 3 ticks: " << elapsed.count() << " ms");
    BOOST_TEST(console.find("READY") == std::string::npos); // resumed, not rebooted
    vm.kill();
}

BOOST_AUTO_TEST_CASE(snapshot_refusal_names_the_device) {
    snapshot_fixture f;
    auto rng = sm::virtio::rng::create({}).value();
    using disk = sm::virtio::blk<sm::storage::raw_file>;
    disk::config dc;
    dc.storage = {(f.work.path / "data.img").string(), true};
    auto blk = disk::create(dc).value();
    boost::asio::io_context io;
    sm::backend::qemu_machine vm(io.get_executor(), f.config);
    BOOST_REQUIRE(vm.attach(sm::backend::vhost_user_device_kind::blk, *blk).has_value());
    BOOST_REQUIRE(vm.attach(sm::backend::vhost_user_device_kind::rng, *rng).has_value());
    std::string console;
    BOOST_REQUIRE(vm.start([&](std::string_view s) { console.append(s); }).has_value());
    BOOST_REQUIRE(
        run_until(io, std::chrono::seconds(120), [&] { return count_of(console, "TICK") >= 2; }));
    bool done = false;
    supermachine::error_code error;
    sm::backend::qemu_machine::snapshot_report report;
    vm.async_save_snapshot(f.work.path / "vm.migration", true, [&](supermachine::error_code ec, auto r) {
        error = ec;
        report = r;
        done = true;
    });
    BOOST_REQUIRE(run_until(io, std::chrono::seconds(120), [&] { return done; }));
    BOOST_REQUIRE_MESSAGE(!error, error.message());
    BOOST_TEST_MESSAGE("refusal: " << report.refusal);
    BOOST_TEST(!report.saved);
    BOOST_TEST(report.refusal.find("vhost-user-rng") != std::string::npos);
    std::ostringstream line;
    sm::backend::explain_snapshot_fallback(report, line);
    BOOST_TEST(line.str().find("cold boot") != std::string::npos);
    // The guest was resumed and keeps using our disk.
    const auto ticks = count_of(console, "TICK");
    BOOST_TEST(run_until(io, std::chrono::seconds(60),
                         [&] { return count_of(console, "TICK") >= ticks + 2; }));
    vm.kill();
}

BOOST_AUTO_TEST_SUITE_END()
