// Real Linux through OUR boot path, without KVM: load_linux() fills a guest
// memory image (kernel, initrd, cmdline, zero page or PVH start_info, e820,
// GDT, page tables, ACPI tables); QEMU TCG (microvm, acpi=off so QEMU adds
// no tables of its own) gets that image through -device loader and, as its
// firmware, a 64 KiB ROM whose reset vector does only what a VMM's vCPU set-up
// does: load our GDT, enter protected mode with our flat selectors, and for
// the 64-bit entry enable PAE + our CR3 + EFER.LME + paging; then jump to
// boot_entry.rip with %rsi (zero page) or %ebx (PVH start_info). Linux must
// then find its memory, both CPUs (our MADT), the console, its initrd and its
// cmdline from our structures alone. This host's KVM cannot run Linux, so
// this is where the boot path meets a real kernel.
#include "printers.hpp"

#include <supermachine/boot/demo_initramfs.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/boot/linux_loader.hpp>

#include <skip.hpp>

#include <boost/test/unit_test.hpp>

#include <x86intrin.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

using namespace supermachine;
using namespace supermachine::boot;
namespace fs = std::filesystem;

namespace {

struct scratch_dir {
    fs::path path;
    scratch_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-ourboot-XXXXXX").string();
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

void write_bytes(const fs::path& path, std::span<const std::byte> bytes) {
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
}

std::uint64_t host_tsc_khz() { // see kernel_test.cpp: TCG's guest TSC is the host's
    const auto t0 = std::chrono::steady_clock::now();
    const auto c0 = __rdtsc();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto c1 = __rdtsc();
    const auto ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return static_cast<std::uint64_t>(static_cast<double>(c1 - c0) / ms);
}

/// The 64 KiB reset ROM (mapped at 0xffff0000; reset at 0xfffffff0).
std::vector<std::byte> reset_rom(const boot_entry& entry) {
    std::vector<std::uint8_t> rom(0x10000, 0xf4 /*hlt*/);
    auto put = [&](std::size_t at, std::initializer_list<std::uint8_t> bytes) {
        std::copy(bytes.begin(), bytes.end(), rom.begin() + static_cast<std::ptrdiff_t>(at));
        return at + bytes.size();
    };
    auto u32 = [](std::uint64_t v, int i) { return static_cast<std::uint8_t>(v >> (8 * i)); };
    // Reset vector: jmp near 0xff00.
    put(0xfff0, {0xe9, 0x0d, 0xff});
    // GDT pointer at 0xff40: our GDT (limit, 32-bit base).
    put(0xff40, {u32(entry.gdt_limit, 0), u32(entry.gdt_limit, 1), u32(entry.gdt_base, 0),
                 u32(entry.gdt_base, 1), u32(entry.gdt_base, 2), u32(entry.gdt_base, 3)});
    // 16-bit: cli; lgdt cs:[0xff40]; cr0.PE = 1; jmp far 0x08:0xffffff80 (our 32-bit code
    // selector).
    put(0xff00, {0xfa, 0x66, 0x2e, 0x0f, 0x01,
                 0x16, 0x40, 0xff, 0x0f, 0x20,
                 0xc0, 0x66, 0x83, 0xc8, 0x01,
                 0x0f, 0x22, 0xc0, 0x66, 0xea,
                 0x80, 0xff, 0xff, 0xff, code32_selector,
                 0x00});
    // 32-bit at 0xff80: flat data selector everywhere, stack.
    const std::uint8_t ds = static_cast<std::uint8_t>(entry.data_selector);
    std::size_t at = put(0xff80, {0xb8,
                                  ds,
                                  0,
                                  0,
                                  0,
                                  0x8e,
                                  0xd8,
                                  0x8e,
                                  0xc0,
                                  0x8e,
                                  0xd0,
                                  0x8e,
                                  0xe0,
                                  0x8e,
                                  0xe8,
                                  0xbc,
                                  u32(entry.rsp, 0),
                                  u32(entry.rsp, 1),
                                  u32(entry.rsp, 2),
                                  u32(entry.rsp, 3)});
    if (entry.mode == entry_mode::protected_mode_32_pvh) {
        // mov ebx, start_info; mov eax, rip; jmp eax
        put(at, {0xbb, u32(entry.rbx, 0), u32(entry.rbx, 1), u32(entry.rbx, 2), u32(entry.rbx, 3),
                 0xb8, u32(entry.rip, 0), u32(entry.rip, 1), u32(entry.rip, 2), u32(entry.rip, 3),
                 0xff, 0xe0});
    } else {
        const std::uint32_t long_entry = 0xffffffe0u - 0x10; // 0xffffffd0: ROM offset 0xffd0
        // PAE; CR3 = our PML4; EFER.LME; paging; jmp far 0x10:long_entry (our 64-bit code
        // selector).
        put(at, {0x0f,
                 0x20,
                 0xe0,
                 0x83,
                 0xc8,
                 0x20,
                 0x0f,
                 0x22,
                 0xe0,
                 0xb8,
                 u32(entry.cr3, 0),
                 u32(entry.cr3, 1),
                 u32(entry.cr3, 2),
                 u32(entry.cr3, 3),
                 0x0f,
                 0x22,
                 0xd8,
                 0xb9,
                 0x80,
                 0x00,
                 0x00,
                 0xc0,
                 0x0f,
                 0x32,
                 0x0d,
                 0x00,
                 0x01,
                 0x00,
                 0x00,
                 0x0f,
                 0x30,
                 0x0f,
                 0x20,
                 0xc0,
                 0x0d,
                 0x00,
                 0x00,
                 0x00,
                 0x80,
                 0x0f,
                 0x22,
                 0xc0,
                 0xea,
                 u32(long_entry, 0),
                 u32(long_entry, 1),
                 u32(long_entry, 2),
                 u32(long_entry, 3),
                 static_cast<std::uint8_t>(entry.code_selector),
                 0x00});
        // 64-bit: mov esi, zero page; mov eax, rip; jmp rax
        put(long_entry & 0xffff, {0xbe, u32(entry.rsi, 0), u32(entry.rsi, 1), u32(entry.rsi, 2),
                                  u32(entry.rsi, 3), 0xb8, u32(entry.rip, 0), u32(entry.rip, 1),
                                  u32(entry.rip, 2), u32(entry.rip, 3), 0xff, 0xe0});
    }
    std::vector<std::byte> out(rom.size());
    std::memcpy(out.data(), rom.data(), rom.size());
    return out;
}

struct boot_result {
    int status;
    std::string console;
};

/// load_linux into 256 MiB, hand the non-zero parts to QEMU, run to the guest's reboot.
boot_result boot_through_our_loader(const kernel_files& k, std::span<const std::byte> kernel,
                                    bool prefer_pvh, const fs::path& dir) {
    const std::uint64_t ram = 256ull << 20;
    auto memory = guest_memory::allocate_x86(ram, memory_backing::anonymous).value();
    demo_initramfs_options options;
    options.modules = k.modules;
    options.extra_script =
        "echo \"cpus: $(nproc)\"\necho \"cmdline: $(cat /proc/cmdline)\"\n"
        "echo \"acpi virtio devices: $(ls /sys/bus/acpi/devices | grep -c LNRO0005)\"\n";
    options.final_command = "reboot -f"; // reboot=t: a triple fault, which ends QEMU (-no-reboot)
    const auto initrd = build_demo_initramfs(options).value();
    linux_boot_config config;
    config.kernel = kernel;
    config.initrd = initrd;
    config.cmdline =
        "console=ttyS0 reboot=t panic=-1 tsc_early_khz=" + std::to_string(host_tsc_khz());
    config.vcpus = 2;
    config.prefer_pvh = prefer_pvh;
    // Two virtio windows where nothing answers: the DSDT still names them.
    config.virtio_devices = {{x86_layout::virtio_mmio_base, 0x1000, 5},
                             {x86_layout::virtio_mmio_base + 0x1000, 0x1000, 6}};
    const auto entry = load_linux(memory, config).value();
    BOOST_TEST_MESSAGE("entry mode " << entry.mode << " rip 0x" << std::hex << entry.rip
                                     << " kernel [0x" << entry.kernel_address << ", 0x"
                                     << entry.kernel_end << ") initrd 0x" << entry.initrd_address);

    // Low memory: boot structures up to the cmdline's end, and the ACPI tables (below the ROM alias
    // at 0xf0000).
    write_bytes(dir / "low.bin",
                memory.span(0, x86_layout::cmdline + x86_layout::cmdline_max_size).value());
    write_bytes(dir / "acpi.bin", memory.span(x86_layout::rsdp, 0x10000).value());
    write_bytes(dir / "kernel.bin",
                memory.span(entry.kernel_address, entry.kernel_end - entry.kernel_address).value());
    write_bytes(dir / "initrd.bin", memory.span(entry.initrd_address, entry.initrd_size).value());
    write_bytes(dir / "rom.bin", reset_rom(entry));
    auto loader = [](const char* file, std::uint64_t address) {
        char buf[160];
        std::snprintf(buf, sizeof buf, " -device loader,file=%s,addr=0x%llx,force-raw=on", file,
                      static_cast<unsigned long long>(address));
        return std::string(buf);
    };
    const std::string command =
        "cd '" + dir.string() +
        "' && timeout 240 qemu-system-x86_64 -M microvm,acpi=off,rtc=off -accel tcg -cpu max "
        "-m 256 -smp 2 -bios rom.bin" +
        loader("low.bin", 0) + loader("acpi.bin", x86_layout::rsdp) +
        loader("kernel.bin", entry.kernel_address) + loader("initrd.bin", entry.initrd_address) +
        " -nographic -no-reboot -nodefaults -serial stdio > console.log 2>&1";
    const int status = std::system(command.c_str());
    return {status, read_text(dir / "console.log")};
}

void check_linux_used_our_structures(const boot_result& r) {
    std::istringstream lines(r.console);
    for (std::string line; std::getline(lines, line);)
        for (const char* key :
             {"BIOS-e820", "ACPI: RSDP", "ACPI: XSDT", "ACPI: FACP", "ACPI: APIC", "ACPI: DSDT",
              "smp: Brought up", "ttyS0 at", "Run /init", "Power", "reboot:"})
            if (line.find(key) != std::string::npos) BOOST_TEST_MESSAGE("  guest: " << line);
    BOOST_TEST(WEXITSTATUS(r.status) == 0, "qemu exit " << WEXITSTATUS(r.status) << "\n"
                                                        << r.console);
    const auto& c = r.console;
    BOOST_TEST(c.find(demo_greeting) != std::string::npos, c);
    BOOST_TEST(c.find("cpus: 2") != std::string::npos, c);                       // our MADT
    BOOST_TEST(c.find("ACPI: RSDP 0x00000000000E0000") != std::string::npos, c); // our RSDP
    BOOST_TEST(c.find("SUPERM") != std::string::npos, c);                        // our OEM id
    BOOST_TEST(c.find("acpi virtio devices: 2") != std::string::npos, c);        // our DSDT
    BOOST_TEST(c.find("virtio_mmio.device=0x1000@0xd0000000:5") != std::string::npos,
               c); // our cmdline
    BOOST_TEST(c.find("0x000000000009fc00-0x00000000000fffff] reserved") != std::string::npos,
               c);                                        // our e820
    BOOST_TEST(c.find("insmod") == std::string::npos, c); // every module loaded
}

kernel_files kernel_or_skip() {
    test::skip_unless(std::system("command -v qemu-system-x86_64 >/dev/null") == 0,
                      "qemu-system-x86_64 not installed");
    test::skip_unless(fs::exists("/bin/busybox"), "/bin/busybox (busybox-static) not installed");
    if (auto k = default_kernel()) return k.value();
    if (auto k = fetch_default_kernel()) return k.value();
    test::skip("default guest kernel not cached and scripts/fetch-kernel.sh failed");
}

} // namespace

BOOST_AUTO_TEST_SUITE(our_boot_path)

BOOST_AUTO_TEST_CASE(bzimage_64_bit_entry_boots_linux, *boost::unit_test::timeout(280)) {
    const auto k = kernel_or_skip();
    const auto kernel = read_host_file(k.vmlinuz, 64ull << 20).value();
    scratch_dir dir;
    const auto start = std::chrono::steady_clock::now();
    const auto r = boot_through_our_loader(k, kernel, false, dir.path);
    BOOST_TEST_MESSAGE(
        "bzImage via our loader under TCG: "
        << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s");
    check_linux_used_our_structures(r);
}

BOOST_AUTO_TEST_CASE(vmlinux_pvh_entry_boots_linux, *boost::unit_test::timeout(280)) {
    const auto k = kernel_or_skip();
    test::skip_unless(std::system("command -v lz4 >/dev/null") == 0,
                      "lz4 not installed (to unpack vmlinux)");
    const auto bz = read_host_file(k.vmlinuz, 64ull << 20).value();
    const std::byte magic[] = {std::byte{0x02}, std::byte{0x21}, std::byte{0x4c}, std::byte{0x18}};
    const auto at = std::search(bz.begin(), bz.end(), std::begin(magic), std::end(magic));
    test::skip_unless(at != bz.end(), "kernel payload is not LZ4");
    scratch_dir dir;
    write_bytes(dir.path / "payload.lz4", std::span(&*at, static_cast<std::size_t>(bz.end() - at)));
    (void)std::system(
        ("cd '" + dir.path.string() + "' && lz4 -dc payload.lz4 > vmlinux 2>/dev/null").c_str());
    const auto vmlinux = read_host_file(dir.path / "vmlinux", 512ull << 20).value();
    const auto start = std::chrono::steady_clock::now();
    const auto r = boot_through_our_loader(k, vmlinux, true, dir.path);
    BOOST_TEST_MESSAGE(
        "vmlinux PVH via our loader under TCG: "
        << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s");
    check_linux_used_our_structures(r);
}

BOOST_AUTO_TEST_SUITE_END()
