// The default guest kernel (Debian cloud, from the cache filled by
// scripts/fetch-kernel.sh): our loader accepts it, the module plan is
// right, and — under QEMU TCG, since this host's KVM cannot run Linux —
// it boots the demo initramfs: modules load, virtio-mmio is found via
// ACPI, 2 CPUs come up, the greeting appears and power-off ends QEMU.
#include "printers.hpp"

#include <supermachine/boot/acpi.hpp>
#include <supermachine/boot/demo_initramfs.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/boot/linux_loader.hpp>

#include <skip.hpp>

#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <x86intrin.h>

using namespace supermachine;
using namespace supermachine::boot;
namespace fs = std::filesystem;

namespace {

kernel_files kernel_or_skip() {
    if (auto k = default_kernel()) return k.value();
    if (auto k = fetch_default_kernel()) return k.value();
    test::skip(
        "default guest kernel not cached and scripts/fetch-kernel.sh failed (no Debian apt?)");
}

struct scratch_dir {
    fs::path path;
    scratch_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-kernel-XXXXXX").string();
        path = ::mkdtemp(pattern.data());
    }
    ~scratch_dir() { fs::remove_all(path); }
};

std::string read_text(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

/// The host TSC rate. QEMU TCG's guest TSC is the host's; under load, the
/// guest's PIT-based TSC calibration fails and, with hardware-reduced ACPI
/// (no PIT, no HPET), the kernel then hangs waiting for jiffies. Telling it
/// the rate (tsc_early_khz=) makes the boot independent of host load.
std::uint64_t host_tsc_khz() {
    const auto t0 = std::chrono::steady_clock::now();
    const auto c0 = __rdtsc();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto c1 = __rdtsc();
    const auto ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return static_cast<std::uint64_t>(static_cast<double>(c1 - c0) / ms);
}

bool ends_with_name(const fs::path& p, const char* name) {
    return p.filename() == name;
}

} // namespace

BOOST_AUTO_TEST_SUITE(default_kernel_suite)

BOOST_AUTO_TEST_CASE(module_plan_orders_dependencies_first) {
    const auto k = kernel_or_skip();
    BOOST_TEST_MESSAGE("kernel " << k.release << " at " << k.root);
    auto position = [&](const char* name) {
        auto it = std::find_if(k.modules.begin(), k.modules.end(),
                               [&](const fs::path& p) { return ends_with_name(p, name); });
        return it == k.modules.end() ? -1 : static_cast<int>(it - k.modules.begin());
    };
    BOOST_TEST(position("virtio_mmio.ko") >= 0);
    BOOST_TEST(position("virtio.ko") >= 0);
    BOOST_TEST(position("virtio_ring.ko") < position("virtio.ko"));
    BOOST_TEST(position("virtio.ko") < position("virtio_mmio.ko"));
    BOOST_TEST(position("vsock.ko") < position("vmw_vsock_virtio_transport_common.ko"));
    BOOST_TEST(position("vmw_vsock_virtio_transport_common.ko") <
               position("vmw_vsock_virtio_transport.ko"));
    BOOST_TEST(position("virtio_blk.ko") >= 0);
    BOOST_TEST(position("ext4.ko") == -1); // built into Debian's cloud kernel
    for (const auto& m : k.modules)
        BOOST_TEST(fs::is_regular_file(m), m);
}

BOOST_AUTO_TEST_CASE(loader_accepts_the_real_bzimage) {
    const auto k = kernel_or_skip();
    const auto kernel = read_host_file(k.vmlinuz, 64ull << 20).value();
    const auto bz = parse_bzimage(kernel).value();
    BOOST_TEST(bz.header.version >= 0x020cu);
    BOOST_TEST(bz.relocatable);
    BOOST_TEST(bz.init_size > kernel.size());
    auto memory = guest_memory::allocate_x86(256ull << 20, memory_backing::anonymous).value();
    std::vector<std::byte> initrd(4u << 20, std::byte{7});
    linux_boot_config config;
    config.kernel = kernel;
    config.initrd = initrd;
    config.cmdline = "console=ttyS0";
    config.vcpus = 2;
    config.virtio_devices = {{x86_layout::virtio_mmio_base, x86_layout::virtio_mmio_window, 5}};
    const auto entry = load_linux(memory, config).value();
    BOOST_TEST(entry.mode == entry_mode::long_mode_64);
    BOOST_TEST(entry.rip == entry.kernel_address + 0x200);
    BOOST_TEST(entry.kernel_address == bz.pref_address);
    BOOST_TEST(entry.initrd_address >= entry.kernel_end);
    // Too little memory for init_size is a clean error.
    auto small = guest_memory::allocate_x86(32ull << 20, memory_backing::anonymous).value();
    BOOST_TEST(load_linux(small, config).error() == errc::memory_too_small);
}

// Debian ships no vmlinux; its bzImage carries one, LZ4-compressed (legacy
// frame, magic 02 21 4C 18). Unpacked, it is the real-world input for the
// ELF/PVH path: the parser must find its PT_LOADs and the PVH note.
BOOST_AUTO_TEST_CASE(loader_accepts_the_real_vmlinux_with_pvh) {
    const auto k = kernel_or_skip();
    test::skip_unless(std::system("command -v lz4 >/dev/null") == 0,
                      "lz4 not installed (to unpack vmlinux)");
    const auto bz = read_host_file(k.vmlinuz, 64ull << 20).value();
    const std::byte magic[] = {std::byte{0x02}, std::byte{0x21}, std::byte{0x4c}, std::byte{0x18}};
    const auto at = std::search(bz.begin(), bz.end(), std::begin(magic), std::end(magic));
    test::skip_unless(at != bz.end(), "kernel payload is not LZ4 (another Debian kernel config)");
    scratch_dir dir;
    std::ofstream(dir.path / "payload.lz4", std::ios::binary)
        .write(reinterpret_cast<const char*>(&*at), static_cast<std::streamsize>(bz.end() - at));
    const std::string unpack =
        "cd '" + dir.path.string() + "' && lz4 -dc payload.lz4 > vmlinux 2>/dev/null";
    (void)std::system(
        unpack.c_str()); // trailing bytes after the stream make lz4 complain; the ELF is whole
    const auto vmlinux = read_host_file(dir.path / "vmlinux", 512ull << 20).value();
    const auto elf = parse_elf(vmlinux).value();
    BOOST_TEST(elf.entry == 0x1000000u); // phys_startup_64
    BOOST_TEST_REQUIRE(elf.pvh_entry.has_value());
    BOOST_TEST(elf.contains(*elf.pvh_entry));
    BOOST_TEST(elf.segments.size() >= 2u);
    BOOST_TEST(elf.lowest == 0x1000000u);
    BOOST_TEST_MESSAGE("vmlinux " << vmlinux.size() << " bytes, PVH entry 0x" << std::hex
                                  << *elf.pvh_entry << ", segments up to 0x" << elf.highest);

    auto memory = guest_memory::allocate_x86(256ull << 20, memory_backing::anonymous).value();
    std::vector<std::byte> initrd(1u << 20, std::byte{3});
    linux_boot_config config;
    config.kernel = vmlinux;
    config.initrd = initrd;
    config.cmdline = "console=ttyS0";
    const auto pvh = load_linux(memory, config).value();
    BOOST_TEST(pvh.mode == entry_mode::protected_mode_32_pvh);
    BOOST_TEST(pvh.rip == *elf.pvh_entry);
    BOOST_TEST(pvh.rbx == x86_layout::pvh_start_info);
    BOOST_TEST(pvh.initrd_address >= elf.highest);
    // The first loaded bytes are the file's.
    const auto& first = elf.segments.front();
    auto loaded = memory.span(first.physical_address, 4096).value();
    BOOST_TEST(std::memcmp(loaded.data(), vmlinux.data() + first.file_offset, 4096) == 0);
    config.prefer_pvh = false;
    const auto long_mode = load_linux(memory, config).value();
    BOOST_TEST(long_mode.mode == entry_mode::long_mode_64);
    BOOST_TEST(long_mode.rip == 0x1000000u);
}

BOOST_AUTO_TEST_CASE(demo_initramfs_boots_under_qemu_tcg, *boost::unit_test::timeout(280)) {
    const auto k = kernel_or_skip();
    test::skip_unless(std::system("command -v qemu-system-x86_64 >/dev/null") == 0,
                      "qemu-system-x86_64 not installed");
    test::skip_unless(fs::exists("/bin/busybox"), "/bin/busybox (busybox-static) not installed");
    scratch_dir dir;
    demo_initramfs_options options;
    options.modules = k.modules;
    options.extra_script = "echo \"cpus: $(nproc)\"\n"
                           "echo \"vda sectors: $(cat /sys/block/vda/size)\"\n";
    const auto initrd = build_demo_initramfs(options).value();
    {
        std::ofstream(dir.path / "initrd.gz", std::ios::binary)
            .write(reinterpret_cast<const char*>(initrd.data()),
                   static_cast<std::streamsize>(initrd.size()));
        std::ofstream disk(dir.path / "disk.raw", std::ios::binary);
        disk.seekp((1 << 20) - 1);
        disk.put('\0');
    }
    const std::string command =
        "cd '" + dir.path.string() +
        "' && timeout 240 qemu-system-x86_64 -M microvm,acpi=on -accel tcg -cpu max -m 256 -smp 2 "
        "-kernel '" +
        k.vmlinuz.string() +
        "' -initrd initrd.gz "
        "-append 'console=ttyS0 panic=-1 quiet tsc_early_khz=" +
        std::to_string(host_tsc_khz()) +
        "' "
        "-drive id=d0,file=disk.raw,format=raw,if=none -device virtio-blk-device,drive=d0 "
        "-nographic -no-reboot -nodefaults -serial stdio > console.log 2>&1";
    const auto start = std::chrono::steady_clock::now();
    const int status = std::system(command.c_str());
    const auto seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const auto console = read_text(dir.path / "console.log");
    BOOST_TEST_MESSAGE("qemu TCG boot to power-off: " << seconds << " s, initramfs "
                                                      << initrd.size() << " bytes");
    BOOST_TEST(WIFEXITED(status));
    BOOST_TEST(WEXITSTATUS(status) == 0, "qemu exit " << WEXITSTATUS(status) << "\n" << console);
    BOOST_TEST(console.find(demo_greeting) != std::string::npos, console);
    BOOST_TEST(console.find("cpus: 2") != std::string::npos, console);
    BOOST_TEST(console.find("vda sectors: 2048") != std::string::npos, console);
    BOOST_TEST(console.find("failed") == std::string::npos, console);
}

// Our AML read by Linux itself: QEMU's pc machine accepts extra tables
// (-acpitable; microvm does not), so our DSDT body goes in as an SSDT with a
// virtio-mmio device at an address where nothing answers. Linux must create
// the LNRO0005 platform device from our _CRS and the driver must probe the
// window we described (it then finds no virtio magic there, as expected).
BOOST_AUTO_TEST_CASE(linux_reads_our_aml, *boost::unit_test::timeout(280)) {
    const auto k = kernel_or_skip();
    test::skip_unless(std::system("command -v qemu-system-x86_64 >/dev/null") == 0,
                      "qemu-system-x86_64 not installed");
    test::skip_unless(fs::exists("/bin/busybox"), "/bin/busybox (busybox-static) not installed");
    scratch_dir dir;
    acpi_config acpi;
    acpi.serial_com1 = false; // QEMU's own DSDT has COM1 already
    acpi.virtio_devices = {{0xd800'0000, 0x1000, 9}};
    auto ssdt = build_acpi_tables(acpi).value().dsdt.bytes;
    std::memcpy(ssdt.data(), "SSDT", 4);
    ssdt[9] = std::byte{0};
    ssdt[9] = std::byte{boot::detail::checksum_complement(ssdt)};
    demo_initramfs_options options;
    options.modules = k.modules;
    options.compression = initramfs_compression::none;
    const auto initrd = build_demo_initramfs(options).value();
    std::ofstream(dir.path / "initrd", std::ios::binary)
        .write(reinterpret_cast<const char*>(initrd.data()),
               static_cast<std::streamsize>(initrd.size()));
    std::ofstream(dir.path / "ssdt.dat", std::ios::binary)
        .write(reinterpret_cast<const char*>(ssdt.data()),
               static_cast<std::streamsize>(ssdt.size()));
    const std::string command =
        "cd '" + dir.path.string() +
        "' && timeout 240 qemu-system-x86_64 -M pc -accel tcg -cpu max -m 256 "
        "-kernel '" +
        k.vmlinuz.string() +
        "' -initrd initrd -acpitable file=ssdt.dat "
        "-append 'console=ttyS0 panic=-1 tsc_early_khz=" +
        std::to_string(host_tsc_khz()) +
        "' "
        "-nographic -no-reboot -nodefaults -serial stdio > console.log 2>&1";
    const int status = std::system(command.c_str());
    const auto console = read_text(dir.path / "console.log");
    BOOST_TEST(WEXITSTATUS(status) == 0, console);
    BOOST_TEST(console.find("ACPI: SSDT") != std::string::npos, console);
    BOOST_TEST(console.find("SUPERM SMVMACPI") != std::string::npos, console);
    BOOST_TEST(console.find("virtio-mmio LNRO0005:00") != std::string::npos, console);
    BOOST_TEST(console.find(demo_greeting) != std::string::npos, console);
}

BOOST_AUTO_TEST_SUITE_END()
