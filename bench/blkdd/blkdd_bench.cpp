// In-guest dd to and from a virtio-blk disk (O_DIRECT), ours vs QEMU's own,
// on the same engine: the Debian cloud kernel under the QEMU engine (TCG on
// this host), with
//   ours: virtio::blk<raw_file> served over vhost-user (vhost-user-blk on microvm's virtio-mmio)
//   qemu: QEMU microvm's own virtio-blk-device (-drive format=raw, default cache) on the same file
// The guest prints a marker before and after each dd; the host times the
// interval between the markers on the console (the guest clock runs on
// -icount here and cannot be trusted for wall time). Runs are interleaved.
//
//   blkdd_bench [--runs N] [--mib M] [--dir DIR]
#include <supermachine/backend/qemu.hpp>
#include <supermachine/boot/demo_initramfs.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "../support/statistics.hpp"

namespace sm = supermachine;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

using supermachine::bench::median;

namespace {

struct dd_result {
    bool ok = false;
    double write_seconds = 0, read_seconds = 0;
    std::string console_tail;
};

dd_result run_once(bool ours, const sm::boot::kernel_files& kernel, const fs::path& initrd,
                   const fs::path& disk) {
    dd_result result;
    boost::asio::io_context io;
    sm::backend::qemu_config config;
    if (const char* q = std::getenv("SUPERMACHINE_QEMU")) config.qemu_binary = q;
    config.kernel = kernel.vmlinuz;
    config.initrd = initrd;
    config.cmdline = "console=ttyS0 panic=-1 quiet";
    config.memory_bytes = 256u << 20;
    config.icount = "shift=4,sleep=off"; // as the engine's tests: a stable TCG boot under load
    config.accelerator = sm::backend::qemu_accelerator::automatic;
    std::unique_ptr<sm::virtio::blk<sm::storage::raw_file>> device;
    if (ours) {
        sm::virtio::blk<sm::storage::raw_file>::config c;
        c.storage = {disk.string(), false};
        device = sm::value_or_throw(sm::virtio::blk<sm::storage::raw_file>::create(c));
    } else {
        config.extra_arguments = {"-drive", "file=" + disk.string() + ",format=raw,if=none,id=own0",
                                  "-device", "virtio-blk-device,drive=own0"};
    }
    sm::backend::qemu_machine vm(io.get_executor(), config);
    if (ours && !vm.attach(sm::backend::vhost_user_device_kind::blk, *device)) return result;
    std::string console;
    std::map<std::string, clock_type::time_point> seen;
    const char* markers[] = {"DD-W-START", "DD-W-END", "DD-R-START", "DD-R-END"};
    auto started = vm.start([&](std::string_view s) {
        const auto now = clock_type::now();
        console.append(s);
        for (const char* m : markers)
            if (!seen.count(m) && console.find(m) != std::string::npos) seen[m] = now;
    });
    if (!started) {
        std::fprintf(stderr, "blkdd_bench: %s\n", started.error().message().c_str());
        return result;
    }
    boost::asio::steady_timer deadline(io, std::chrono::seconds(600));
    deadline.async_wait([&](const boost::system::error_code& ec) {
        if (!ec) vm.kill();
    });
    vm.async_wait([&](supermachine::error_code, int) { deadline.cancel(); });
    io.run();
    result.console_tail = console.substr(console.size() > 1500 ? console.size() - 1500 : 0);
    if (seen.size() != 4 || console.find("DD-FAILED") != std::string::npos) return result;
    auto seconds = [](clock_type::duration d) { return std::chrono::duration<double>(d).count(); };
    result.write_seconds = seconds(seen["DD-W-END"] - seen["DD-W-START"]);
    result.read_seconds = seconds(seen["DD-R-END"] - seen["DD-R-START"]);
    result.ok = true;
    return result;
}

} // namespace

int main(int argc, char** argv) {
    int runs = 3;
    unsigned mib = 256;
    fs::path dir = fs::temp_directory_path();
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        if (a == "--runs")
            runs = std::atoi(argv[i + 1]);
        else if (a == "--mib")
            mib = static_cast<unsigned>(std::atoi(argv[i + 1]));
        else if (a == "--dir")
            dir = argv[i + 1];
    }
    if (runs < 1 || mib < 1 || mib > 4096) {
        std::fprintf(stderr, "usage: blkdd_bench [--runs N] [--mib M] [--dir DIR]\n");
        return 2;
    }
    auto kernel = sm::boot::default_kernel();
    if (!kernel) {
        std::fprintf(stderr, "blkdd_bench: no default kernel (scripts/fetch-kernel.sh): %s\n",
                     kernel.error().message().c_str());
        return 77;
    }
    const fs::path work = dir / ("sm-blkdd-" + std::to_string(::getpid()));
    fs::create_directories(work);
    const std::string count = std::to_string(mib);
    sm::boot::demo_initramfs_options options;
    options.modules = kernel.value().modules;
    options.extra_script =
        "for i in $(busybox seq 1 400); do busybox test -b /dev/vda && break; busybox sleep 0.05; "
        "done\n"
        "echo DD-W-START\n"
        "busybox dd if=/dev/zero of=/dev/vda bs=1M count=" +
        count +
        " oflag=direct 2>/dev/null || echo DD-FAILED\n"
        "echo DD-W-END\n"
        "echo DD-R-START\n"
        "busybox dd if=/dev/vda of=/dev/null bs=1M count=" +
        count +
        " iflag=direct 2>/dev/null || echo DD-FAILED\n"
        "echo DD-R-END\n";
    auto initramfs = sm::value_or_throw(sm::boot::build_demo_initramfs(options));
    const fs::path initrd = work / "initramfs.cpio.gz";
    std::ofstream(initrd, std::ios::binary)
        .write(reinterpret_cast<const char*>(initramfs.data()),
               static_cast<std::streamsize>(initramfs.size()));
    const fs::path disk = work / "disk.img";
    {
        // Non-sparse, so both engines write over allocated blocks.
        std::ofstream f(disk, std::ios::binary);
        std::vector<char> chunk(1 << 20, 1);
        for (unsigned i = 0; i < mib + 1; ++i)
            f.write(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    }

    std::vector<double> ours_w, ours_r, qemu_w, qemu_r;
    int failures = 0;
    for (int r = 0; r < runs; ++r)
        for (bool ours : {true, false}) {
            auto d = run_once(ours, kernel.value(), initrd, disk);
            const char* name = ours ? "supermachine (vhost-user)" : "qemu virtio-blk-device";
            if (!d.ok) {
                ++failures;
                std::fprintf(stderr, "run %d %s failed; console tail:\n%s\n", r, name,
                             d.console_tail.c_str());
                continue;
            }
            std::fprintf(
                stderr, "run %d %-26s write %.2f s (%.1f MiB/s), read %.2f s (%.1f MiB/s)\n", r,
                name, d.write_seconds, mib / d.write_seconds, d.read_seconds, mib / d.read_seconds);
            (ours ? ours_w : qemu_w).push_back(mib / d.write_seconds);
            (ours ? ours_r : qemu_r).push_back(mib / d.read_seconds);
        }
    std::error_code ec;
    fs::remove_all(work, ec);
    std::printf("in-guest dd %u MiB, bs=1M, O_DIRECT; Debian cloud kernel, QEMU microvm TCG; "
                "medians of %zu/%zu runs (MiB/s)\n\n",
                mib, ours_w.size(), qemu_w.size());
    std::printf("| direction | ours (vhost-user blk) | QEMU virtio-blk-device | ratio |\n");
    std::printf("|---|---|---|---|\n");
    const double ow = median(ours_w), orr = median(ours_r), qw = median(qemu_w),
                 qr = median(qemu_r);
    std::printf("| write | %.1f | %.1f | %.2f |\n", ow, qw, qw > 0 ? ow / qw : 0);
    std::printf("| read | %.1f | %.1f | %.2f |\n", orr, qr, qr > 0 ? orr / qr : 0);
    return failures ? 1 : 0;
}
