// Cold boot under the QEMU engine to a marker printed by /init after it has
// mounted an ext4 disk and read a 16 MiB file from it: our vhost-user blk
// (virtio::blk<raw_file> served from this process) against QEMU's own
// virtio-blk-device on the same file, kernel, initramfs, memory and TCG
// settings. Runs alternate between the two so host load hits both alike.
//
//   engine_bench [runs=5] [icount=shift=auto]
// Prints each run, then medians and the ratio (ours / QEMU's).
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
#include <random>
#include <string>
#include <vector>

namespace sm = supermachine;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

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
    vm.async_wait([&](std::error_code, int status) {
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

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty()      ? 0
           : v.size() % 2 ? v[v.size() / 2]
                          : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

} // namespace

int main(int argc, char** argv) {
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
