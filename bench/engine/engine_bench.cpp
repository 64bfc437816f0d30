// Cold boot under the QEMU engine to a marker printed by /init after it has
// mounted an ext4 disk and read a 16 MiB file from it: our vhost-user blk
// (virtio::blk<raw_file> served from this process) against QEMU's own
// virtio-blk-device on the same file, kernel, initramfs, memory and TCG
// settings. Runs alternate between the two so host load hits both alike.
//
//   engine_boot_bench [runs=5] [icount=shift=auto]
// Prints each run, then medians and the ratio (ours / QEMU's).
//   engine_boot_bench snapshot [runs=5] [icount=shift=auto]
// Cold boot to the first disk-reading tick vs restore (-incoming) of a
// snapshot taken at a pause to the first tick after it, both with our blk.
#include "linux_guest.hpp"

#include <supermachine/backend/qemu.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../support/statistics.hpp"

namespace sm = supermachine;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

using supermachine::bench::median;

namespace {

struct timing {
    double marker_seconds = -1; // spawn → marker on the console
    double exit_seconds = -1;   // spawn → QEMU exited (guest powered off)
    bool ok = false;
};

timing boot_once(const sm::backend::qemu_config& base, const fs::path& disk, bool ours,
                 const std::string& expected) {
    boost::asio::io_context io;
    sm::backend::qemu_config config = base;
    std::unique_ptr<sm::virtio::blk<sm::storage::raw_file>> blk;
    if (!ours) {
        config.extra_arguments = {"-drive",
                                  "file=" + disk.string() + ",if=none,id=d0,format=raw,readonly=on",
                                  "-device", "virtio-blk-device,drive=d0"};
    }
    sm::backend::qemu_machine vm(io.get_executor(), config);
    if (ours) {
        sm::virtio::blk<sm::storage::raw_file>::config c;
        c.storage = {disk.string(), true};
        blk = sm::virtio::blk<sm::storage::raw_file>::create(c).value();
        if (!vm.attach(sm::backend::vhost_user_device_kind::blk, *blk)) return {};
    }
    timing t;
    std::string console;
    const auto start = clock_type::now();
    auto started = vm.start([&](std::string_view s) {
        console.append(s);
        if (t.marker_seconds < 0 && console.find(expected) != std::string::npos)
            t.marker_seconds = std::chrono::duration<double>(clock_type::now() - start).count();
    });
    if (!started) {
        std::fprintf(stderr, "start failed: %s\n", started.error().message().c_str());
        return {};
    }
    boost::asio::steady_timer deadline(io, std::chrono::seconds(300));
    deadline.async_wait([&](const boost::system::error_code& ec) {
        if (!ec) vm.kill();
    });
    vm.async_wait([&](supermachine::error_code, int status) {
        t.exit_seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        t.ok = status == 0 && t.marker_seconds > 0;
        deadline.cancel();
    });
    io.run();
    if (!t.ok)
        std::fprintf(stderr, "run failed; console tail:\n%s\n%s\n",
                     console.substr(console.size() > 1500 ? console.size() - 1500 : 0).c_str(),
                     vm.diagnostics().c_str());
    return t;
}

} // namespace

/// Spawn (optionally restoring `incoming`) with our blk; seconds to the
/// first new "TICK" on the console; optionally snapshot to `save` after ticks.
double ticks_once(const sm::backend::qemu_config& base, const fs::path& disk,
                  std::optional<fs::path> incoming, std::optional<fs::path> save) {
    boost::asio::io_context io;
    auto config = base;
    config.incoming = incoming;
    sm::virtio::blk<sm::storage::raw_file>::config c;
    c.storage = {disk.string(), true};
    auto blk = sm::virtio::blk<sm::storage::raw_file>::create(c).value();
    sm::backend::qemu_machine vm(io.get_executor(), config);
    if (!vm.attach(sm::backend::vhost_user_device_kind::blk, *blk)) return -1;
    std::string console;
    double first_tick = -1;
    const auto start = clock_type::now();
    if (!vm.start([&](std::string_view s) {
            console.append(s);
            if (first_tick < 0 && console.find("TICK") != std::string::npos)
                first_tick = std::chrono::duration<double>(clock_type::now() - start).count();
        }))
        return -1;
    const auto deadline = clock_type::now() + std::chrono::seconds(300);
    auto until = [&](auto done) {
        while (!done() && clock_type::now() < deadline) {
            io.run_for(std::chrono::milliseconds(5));
            if (io.stopped()) io.restart();
        }
        return done();
    };
    if (!until([&] { return first_tick >= 0; })) return -1;
    if (save) {
        bool done = false, saved = false;
        vm.async_save_snapshot(*save, false, [&](supermachine::error_code ec, auto report) {
            saved = !ec && report.saved;
            if (saved)
                std::printf("snapshot: %.1f MiB in %lld ms\n", report.bytes / 1048576.0,
                            static_cast<long long>(report.duration.count()));
            done = true;
        });
        if (!until([&] { return done; }) || !saved) return -1;
    }
    vm.kill();
    return first_tick;
}

int snapshot_bench(int runs, const std::string& icount) {
    auto kernel = sm::test::find_linux_kernel();
    if (!kernel) {
        std::puts("SKIP: no Debian cloud kernel");
        return 77;
    }
    sm::test::temporary_directory work;
    fs::create_directories(work.path / "data");
    std::ofstream(work.path / "data/hello.txt") << "hello\n";
    if (!sm::test::make_ext4(work.path / "data", work.path / "disk.img", 8)) return 1;
    const std::string init =
        R"SH(for i in $(seq 1 400); do [ -b /dev/vda ] && break; sleep 0.02; done
i=0
while true; do
  dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$i iflag=direct 2>/dev/null && echo "TICK $i"
  i=$(( (i + 1) % 2000 ))
  sleep 0.1
done)SH";
    if (!sm::test::make_initramfs(*kernel, work.path, init, work.path / "initramfs.cpio")) return 1;
    sm::backend::qemu_config config;
    config.kernel = kernel->image;
    config.initrd = work.path / "initramfs.cpio";
    config.cmdline = "console=ttyS0 panic=-1 quiet";
    config.memory_bytes = 256u << 20;
    config.icount = icount;
    const auto file = work.path / "vm.migration";
    std::vector<double> cold, warm;
    for (int i = 0; i < runs; ++i) {
        const double t = ticks_once(config, work.path / "disk.img", std::nullopt,
                                    i == 0 ? std::optional<fs::path>(file) : std::nullopt);
        if (t < 0) return 1;
        std::printf("cold %d: first tick %.3f s\n", i, t);
        cold.push_back(t);
    }
    for (int i = 0; i < runs; ++i) {
        const double t = ticks_once(config, work.path / "disk.img", file, std::nullopt);
        if (t < 0) return 1;
        std::printf("warm %d: first tick %.3f s\n", i, t);
        warm.push_back(t);
    }
    const double c = median(cold), w = median(warm);
    std::printf("median first tick: cold boot %.3f s, snapshot restore %.3f s, speed-up %.1fx "
                "(runs %d, icount %s)\n",
                c, w, c / w, runs, icount.c_str());
    return 0;
}

int main(int argc, char** argv) {
    if (argc > 1 && std::string(argv[1]) == "snapshot")
        return snapshot_bench(argc > 2 ? std::max(1, std::atoi(argv[2])) : 5,
                              argc > 3 ? argv[3] : "shift=auto");
    const int runs = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
    const std::string icount = argc > 2 ? argv[2] : "shift=auto";
    auto kernel = sm::test::find_linux_kernel();
    if (!kernel) {
        std::puts("SKIP: no Debian cloud kernel");
        return 77;
    }
    sm::test::temporary_directory work;
    std::vector<char> payload(16 << 20);
    std::mt19937_64 random(7);
    for (auto& c : payload)
        c = static_cast<char>(random());
    const auto sha = sm::test::sha256_hex(payload.data(), payload.size());
    fs::create_directories(work.path / "data");
    std::ofstream(work.path / "data/payload.bin", std::ios::binary)
        .write(payload.data(), payload.size());
    if (!sm::test::make_ext4(work.path / "data", work.path / "disk.img", 32)) return 1;
    const std::string init =
        R"SH(for i in $(seq 1 400); do [ -b /dev/vda ] && break; sleep 0.02; done
mount -t ext4 -o ro /dev/vda /mnt
echo "BOOT-MARKER $(sha256sum /mnt/payload.bin | cut -d' ' -f1)")SH";
    if (!sm::test::make_initramfs(*kernel, work.path, init, work.path / "initramfs.cpio")) return 1;

    sm::backend::qemu_config config;
    config.kernel = kernel->image;
    config.initrd = work.path / "initramfs.cpio";
    config.cmdline = "console=ttyS0 panic=-1 quiet";
    config.memory_bytes = 256u << 20;
    config.icount = icount;
    const std::string expected = "BOOT-MARKER " + sha;

    std::vector<double> ours_marker, qemu_marker, ours_exit, qemu_exit;
    for (int i = 0; i < runs; ++i) {
        for (bool ours : {true, false}) {
            const auto t = boot_once(config, work.path / "disk.img", ours, expected);
            if (!t.ok) return 1;
            std::printf("run %d %-16s marker %.3f s  poweroff %.3f s\n", i,
                        ours ? "vhost-user-blk" : "virtio-blk (qemu)", t.marker_seconds,
                        t.exit_seconds);
            (ours ? ours_marker : qemu_marker).push_back(t.marker_seconds);
            (ours ? ours_exit : qemu_exit).push_back(t.exit_seconds);
        }
    }
    const double a = median(ours_marker), b = median(qemu_marker);
    std::printf("median to marker: vhost-user-blk %.3f s, qemu virtio-blk %.3f s, ratio %.3f (runs "
                "%d, icount %s)\n",
                a, b, a / b, runs, icount.c_str());
    std::printf("median to poweroff: vhost-user-blk %.3f s, qemu virtio-blk %.3f s\n",
                median(ours_exit), median(qemu_exit));
    return 0;
}
