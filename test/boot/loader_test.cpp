// load_linux() and its parsers against crafted kernels: the good path writes
// what the boot protocol asks for; every bad input is a clean error.
#include "crafted_kernels.hpp"
#include "printers.hpp"

#include <supermachine/boot/bzimage_builder.hpp>
#include <supermachine/boot/linux_loader.hpp>

#include <boost/test/unit_test.hpp>

#include <cstring>
#include <string>

using namespace supermachine;
using namespace supermachine::boot;
using supermachine::test::make_bzimage;
using supermachine::test::make_elf;

namespace {

guest_memory make_memory(std::uint64_t bytes = 64ull << 20) {
    return guest_memory::allocate_x86(bytes, memory_backing::anonymous).value();
}

supermachine::error_code load_error(const guest_memory& memory, const linux_boot_config& config) {
    auto r = load_linux(memory, config);
    return r ? supermachine::error_code{} : r.error();
}

linux_boot_config config_for(const std::vector<std::byte>& kernel) {
    linux_boot_config c;
    c.kernel = kernel;
    c.cmdline = "console=ttyS0 panic=-1";
    return c;
}

} // namespace

BOOST_AUTO_TEST_SUITE(bzimage_loading)

BOOST_AUTO_TEST_CASE(valid_bzimage_is_loaded_per_the_boot_protocol) {
    auto memory = make_memory();
    const auto kernel = make_bzimage();
    std::vector<std::byte> initrd(3 * 4096 + 17, std::byte{0x5a});
    auto config = config_for(kernel);
    config.initrd = initrd;
    config.virtio_devices = {{0xd000'0000, 0x1000, 5}, {0xd000'1000, 0x1000, 6}};
    config.vcpus = 2;
    auto entry = load_linux(memory, config).value();

    BOOST_TEST(entry.mode == entry_mode::long_mode_64);
    // Relocatable, pref_address 16 MiB aligned to 2 MiB: loaded there, entry +0x200.
    BOOST_TEST(entry.kernel_address == 0x1000000u);
    BOOST_TEST(entry.rip == 0x1000200u);
    BOOST_TEST(entry.kernel_end == 0x1000000u + 0x400000u);
    BOOST_TEST(entry.rsi == x86_layout::zero_page);
    BOOST_TEST(entry.cr3 == x86_layout::pml4);
    BOOST_TEST(entry.gdt_base == x86_layout::boot_gdt);
    BOOST_TEST(entry.gdt_limit == 31);
    BOOST_TEST(entry.idt_base == x86_layout::boot_idt);
    BOOST_TEST(entry.code_selector == 0x10);
    BOOST_TEST(entry.data_selector == 0x18);
    auto loaded = memory.span(0x1000000, 0x2000).value();
    BOOST_TEST(std::memcmp(loaded.data(), kernel.data() + 1024, 0x2000) == 0);

    const auto params = memory.read_object<boot_params>(x86_layout::zero_page).value();
    BOOST_TEST(params.hdr.boot_flag == 0xaa55);
    BOOST_TEST(params.hdr.header == header_magic);
    BOOST_TEST(params.hdr.type_of_loader == 0xff);
    BOOST_TEST(params.hdr.setup_data == 0u); // the file's value is not passed on
    BOOST_TEST(params.hdr.cmd_line_ptr == x86_layout::cmdline);
    BOOST_TEST(params.acpi_rsdp_addr == x86_layout::rsdp);
    const std::string expected_cmdline =
        "console=ttyS0 panic=-1 virtio_mmio.device=0x1000@0xd0000000:5 "
        "virtio_mmio.device=0x1000@0xd0001000:6";
    auto cmdline = memory.span(x86_layout::cmdline, expected_cmdline.size() + 1).value();
    BOOST_TEST(std::string(reinterpret_cast<const char*>(cmdline.data())) == expected_cmdline);

    // initrd: page-aligned, as high as possible, above the kernel, bytes intact.
    BOOST_TEST(params.hdr.ramdisk_image == entry.initrd_address);
    BOOST_TEST(params.hdr.ramdisk_size == initrd.size());
    BOOST_TEST(entry.initrd_address % 4096 == 0u);
    BOOST_TEST(entry.initrd_address + initrd.size() <= (64u << 20));
    BOOST_TEST(entry.initrd_address + initrd.size() + 4096 > (64u << 20));
    BOOST_TEST(entry.initrd_address >= entry.kernel_end);
    BOOST_TEST(memory.span(entry.initrd_address, initrd.size()).value()[initrd.size() - 1] ==
               std::byte{0x5a});

    // e820: low RAM, the reserved EBDA/ACPI area, RAM from 1 MiB.
    BOOST_TEST_REQUIRE(params.e820_entries == 3);
    BOOST_TEST(params.e820_table[0].address == 0u);
    BOOST_TEST(params.e820_table[0].size == x86_layout::ebda_start);
    BOOST_TEST(params.e820_table[0].type == 1u);
    BOOST_TEST(params.e820_table[1].address == x86_layout::ebda_start);
    BOOST_TEST(params.e820_table[1].type == 2u);
    BOOST_TEST(params.e820_table[2].address == 0x100000u);
    BOOST_TEST(params.e820_table[2].size == (64u << 20) - 0x100000u);

    // Identity page tables: PML4[0] → PDPT, PDPT[3] → 4th PD, PD entry for 2 MiB.
    BOOST_TEST(memory.read_object<std::uint64_t>(x86_layout::pml4).value() ==
               (x86_layout::pdpt | 3));
    BOOST_TEST(memory.read_object<std::uint64_t>(x86_layout::pdpt + 3 * 8).value() ==
               ((x86_layout::pd + 0x3000) | 3));
    BOOST_TEST(memory.read_object<std::uint64_t>(x86_layout::pd + 8).value() == (0x200000u | 0x83));
    BOOST_TEST(memory.read_object<std::uint64_t>(x86_layout::pd + 0x3000 + 511 * 8).value() ==
               (0xffe00000u | 0x83));
    // GDT: 64-bit code at 0x10, data at 0x18.
    BOOST_TEST(memory.read_object<std::uint64_t>(x86_layout::boot_gdt + 0x10).value() ==
               0x00af9b000000ffffull);
    BOOST_TEST(memory.read_object<std::uint64_t>(x86_layout::boot_gdt + 0x18).value() ==
               0x00cf93000000ffffull);
    // RSDP signature where the zero page says.
    auto rsdp = memory.span(x86_layout::rsdp, 8).value();
    BOOST_TEST(std::memcmp(rsdp.data(), "RSD PTR ", 8) == 0);
}

BOOST_AUTO_TEST_CASE(non_relocatable_kernel_goes_to_pref_address) {
    auto memory = make_memory();
    supermachine::test::bzimage_knobs k;
    k.relocatable = 0;
    k.pref_address = 0x200000;
    const auto kernel = make_bzimage(k);
    auto entry = load_linux(memory, config_for(kernel)).value();
    BOOST_TEST(entry.kernel_address == 0x200000u);
    BOOST_TEST(entry.rip == 0x200200u);
}

BOOST_AUTO_TEST_CASE(every_truncation_is_kernel_truncated) {
    const auto kernel = make_bzimage();
    for (std::size_t cut = 2; cut < kernel.size(); ++cut) {
        auto r = parse_bzimage(std::span(kernel).first(cut));
        BOOST_TEST_REQUIRE(!r, "cut " << cut);
        BOOST_TEST_REQUIRE(r.error() == errc::kernel_truncated,
                           "cut " << cut << ": " << r.error().message());
    }
    BOOST_TEST(parse_bzimage(std::span(kernel).first(0)).error() == errc::kernel_invalid);
    BOOST_TEST(parse_bzimage(kernel).has_value());
}

BOOST_AUTO_TEST_CASE(non_kernels_are_kernel_invalid) {
    std::vector<std::byte> text(4096, std::byte{'a'});
    BOOST_TEST(parse_bzimage(text).error() == errc::kernel_invalid);
    auto memory = make_memory();
    BOOST_TEST(load_error(memory, config_for(text)) == errc::kernel_invalid);
    BOOST_TEST(load_error(memory, config_for({})) == errc::kernel_invalid);
    auto no_magic = make_bzimage();
    no_magic[0x202] = std::byte{'X'};
    BOOST_TEST(parse_bzimage(no_magic).error() == errc::kernel_invalid);
    auto no_flag = make_bzimage();
    no_flag[0x1fe] = std::byte{0};
    BOOST_TEST(parse_bzimage(no_flag).error() == errc::kernel_invalid);
}

BOOST_AUTO_TEST_CASE(absurd_header_fields_are_rejected) {
    using supermachine::test::bzimage_knobs;
    auto error_for = [](bzimage_knobs k) {
        auto r = parse_bzimage(make_bzimage(k));
        return r ? supermachine::error_code{} : r.error();
    };
    bzimage_knobs k;
    k.syssize = 0xffffffff;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.syssize = 0;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.syssize = (0x2000 / 16) + 1; // claims one paragraph more than the file has
    BOOST_TEST(error_for(k) == errc::kernel_truncated);
    k = {};
    k.setup_sects = 0; // means 4
    BOOST_TEST(error_for(k) == supermachine::error_code{});
    BOOST_TEST(parse_bzimage(make_bzimage(k)).value().setup_size == 5 * 512u);
    k = {};
    k.version = 0x0205;
    BOOST_TEST(error_for(k) == errc::kernel_unsupported);
    k = {};
    k.version = 0x020b; // no xloadflags yet
    BOOST_TEST(error_for(k) == errc::kernel_unsupported);
    k = {};
    k.xloadflags = 0; // no 64-bit entry
    BOOST_TEST(error_for(k) == errc::kernel_unsupported);
    k = {};
    k.loadflags = 0; // zImage
    BOOST_TEST(error_for(k) == errc::kernel_unsupported);
    k = {};
    k.kernel_alignment = 0x300000; // not a power of two
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.init_size = 0;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.init_size = 0xffffffff;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.pref_address = 0x1234; // below 1 MiB and unaligned
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.cmdline_size = 0;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);

    // Fields past the header's own declared end are not trusted: a header
    // that ends before xloadflags has no 64-bit entry, whatever follows.
    auto short_header = make_bzimage();
    short_header[0x201] = std::byte{0x30}; // ends at 0x232
    BOOST_TEST(parse_bzimage(short_header).error() == errc::kernel_unsupported);
    auto no_jump = make_bzimage();
    no_jump[0x200] = std::byte{0x90};
    BOOST_TEST(parse_bzimage(no_jump).error() == errc::kernel_invalid);
}

BOOST_AUTO_TEST_CASE(kernel_that_does_not_fit_is_memory_too_small) {
    auto memory = make_memory(32ull << 20);
    supermachine::test::bzimage_knobs k;
    k.init_size = 20u << 20; // 16 MiB + 20 MiB > 32 MiB
    const auto kernel = make_bzimage(k);
    BOOST_TEST(load_error(memory, config_for(kernel)) == errc::memory_too_small);
    std::vector<std::byte> tiny(512 * 1024);
    auto small = guest_memory::view(0, tiny);
    BOOST_TEST(load_error(small, config_for(make_bzimage())) == errc::memory_too_small);
}

BOOST_AUTO_TEST_CASE(cmdline_is_bounded_by_cmdline_size) {
    auto memory = make_memory();
    supermachine::test::bzimage_knobs k;
    k.cmdline_size = 16;
    const auto kernel = make_bzimage(k);
    auto config = config_for(kernel);
    config.cmdline = std::string(16, 'x');
    BOOST_TEST(load_error(memory, config) == supermachine::error_code{});
    config.cmdline = std::string(17, 'x');
    BOOST_TEST(load_error(memory, config) == errc::cmdline_too_long);
    config.cmdline = std::string(10, 'x');
    config.virtio_devices = {{0xd000'0000, 0x1000, 5}}; // the appended fragment counts
    BOOST_TEST(load_error(memory, config) == errc::cmdline_too_long);
    config.virtio_devices.clear();
    config.cmdline = std::string("a\0b", 3);
    BOOST_TEST(load_error(memory, config) == errc::invalid_argument);
}

BOOST_AUTO_TEST_CASE(initrd_never_overlaps_the_kernel) {
    auto memory = make_memory(); // 64 MiB; kernel reserved [16 MiB, 20 MiB)
    const auto kernel = make_bzimage();
    auto config = config_for(kernel);
    std::vector<std::byte> initrd(44u << 20); // exactly fills [20 MiB, 64 MiB)
    config.initrd = initrd;
    auto entry = load_linux(memory, config).value();
    BOOST_TEST(entry.initrd_address == 20u << 20);
    initrd.resize((44u << 20) + 1);
    config.initrd = initrd;
    BOOST_TEST(load_error(memory, config) == errc::initrd_too_large);

    // initrd_addr_max below the end of RAM caps the placement.
    supermachine::test::bzimage_knobs k;
    k.initrd_addr_max = (24u << 20) - 1;
    const auto capped = make_bzimage(k);
    config = config_for(capped);
    std::vector<std::byte> small(1u << 20);
    config.initrd = small;
    entry = load_linux(memory, config).value();
    BOOST_TEST(entry.initrd_address == 23u << 20);
    std::vector<std::byte> big((4u << 20) + 1); // [20, 24) MiB holds only 4 MiB
    config.initrd = big;
    BOOST_TEST(load_error(memory, config) == errc::initrd_too_large);
}

BOOST_AUTO_TEST_CASE(memory_above_the_mmio_gap_is_in_the_e820) {
    // 4 GiB + 64 MiB: low RAM ends at the 3 GiB gap, the rest starts at 4 GiB.
    auto memory =
        guest_memory::allocate_x86((4ull << 30) + (64ull << 20), memory_backing::anonymous).value();
    const auto kernel = make_bzimage();
    auto config = config_for(kernel);
    std::vector<std::byte> initrd(8192, std::byte{9});
    config.initrd = initrd;
    const auto entry = load_linux(memory, config).value();
    const auto params = memory.read_object<boot_params>(x86_layout::zero_page).value();
    BOOST_TEST_REQUIRE(params.e820_entries == 4);
    BOOST_TEST(params.e820_table[2].address + params.e820_table[2].size ==
               x86_layout::mmio_gap_start);
    BOOST_TEST(params.e820_table[3].address == x86_layout::mmio_gap_end);
    BOOST_TEST(params.e820_table[3].size == (1ull << 30) + (64ull << 20));
    BOOST_TEST(params.e820_table[3].type == 1u);
    // initrd_addr_max (2 GiB - 1 here) caps it below the gap.
    BOOST_TEST(entry.initrd_address + initrd.size() <= 0x8000'0000u);
    BOOST_TEST(entry.initrd_address + initrd.size() + 4096 > 0x8000'0000u);
}

BOOST_AUTO_TEST_CASE(failures_write_nothing) {
    // Everything is validated before the first write: a rejected load leaves
    // guest memory untouched (a caller may retry with other settings).
    auto memory = make_memory();
    auto all_zero = [&] {
        for (const auto& r : memory.regions())
            for (auto b : r.host)
                if (b != std::byte{0}) return false;
        return true;
    };
    const auto kernel = make_bzimage();
    auto config = config_for(kernel);
    std::vector<std::byte> huge(70u << 20);
    config.initrd = huge;
    BOOST_TEST(load_error(memory, config) == errc::initrd_too_large);
    BOOST_TEST(all_zero());
    config.initrd = {};
    config.cmdline = std::string(5000, 'x');
    BOOST_TEST(load_error(memory, config) == errc::cmdline_too_long);
    BOOST_TEST(all_zero());
    config.cmdline = "x";
    config.vcpus = 1000;
    BOOST_TEST(load_error(memory, config) == errc::too_many_vcpus);
    BOOST_TEST(all_zero());
    supermachine::test::elf_knobs k;
    k.load_paddr = 0x3f00000;
    k.load_memsz = 0x200000;
    k.entry = k.pvh_entry = 0x3f00000;
    const auto straddling = make_elf(k);
    BOOST_TEST(load_error(memory, config_for(straddling)) == errc::memory_too_small);
    BOOST_TEST(all_zero());
}

BOOST_AUTO_TEST_CASE(built_bzimage_round_trips_through_the_loader) {
    std::vector<std::byte> program(0x1234);
    for (std::size_t i = 0; i < program.size(); ++i)
        program[i] = static_cast<std::byte>(i * 5 + 1);
    const auto image = build_bzimage(program, {.load_address = 0x200000}).value();
    const auto bz = parse_bzimage(image).value();
    BOOST_TEST(!bz.relocatable);
    BOOST_TEST(bz.pref_address == 0x200000u);
    BOOST_TEST(bz.init_size == 0x2000u);
    auto memory = make_memory();
    const auto entry = load_linux(memory, config_for(image)).value();
    BOOST_TEST(entry.rip == 0x200200u);
    BOOST_TEST(std::memcmp(memory.span(0x200000, program.size()).value().data(), program.data(),
                           program.size()) == 0);
    BOOST_TEST(build_bzimage(std::span(program).first(0x100)).error() == errc::invalid_argument);
    BOOST_TEST(build_bzimage(program, {.load_address = 0x1000}).error() == errc::invalid_argument);
}

BOOST_AUTO_TEST_CASE(bad_configurations_are_rejected) {
    auto memory = make_memory();
    const auto kernel = make_bzimage();
    auto config = config_for(kernel);
    config.vcpus = 0;
    BOOST_TEST(load_error(memory, config) == errc::invalid_argument);
    config.vcpus = 300;
    BOOST_TEST(load_error(memory, config) == errc::too_many_vcpus);
    config.vcpus = 1;
    config.virtio_devices = {{0xd000'0000, 0x1000, 24}};
    BOOST_TEST(load_error(memory, config) == errc::invalid_argument);
    config.virtio_devices = {{0x1'0000'0000, 0x1000, 5}}; // not describable with Memory32Fixed
    BOOST_TEST(load_error(memory, config) == errc::invalid_argument);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(elf_loading)

BOOST_AUTO_TEST_CASE(pvh_note_gives_the_32_bit_entry_and_start_info) {
    auto memory = make_memory();
    const auto kernel = make_elf();
    std::vector<std::byte> initrd(8192, std::byte{1});
    auto config = config_for(kernel);
    config.initrd = initrd;
    auto entry = load_linux(memory, config).value();
    BOOST_TEST(entry.mode == entry_mode::protected_mode_32_pvh);
    BOOST_TEST(entry.rip == 0x1000040u);
    BOOST_TEST(entry.rbx == x86_layout::pvh_start_info);
    BOOST_TEST(entry.cr3 == 0u);
    BOOST_TEST(entry.code_selector == 0x08);
    BOOST_TEST(memory.read_object<std::uint64_t>(x86_layout::boot_gdt + 0x08).value() ==
               0x00cf9b000000ffffull);
    const auto start = memory.read_object<hvm_start_info>(x86_layout::pvh_start_info).value();
    BOOST_TEST(start.magic == hvm_start_info_magic);
    BOOST_TEST(start.version == 1u);
    BOOST_TEST(start.cmdline_paddr == x86_layout::cmdline);
    BOOST_TEST(start.rsdp_paddr == x86_layout::rsdp);
    BOOST_TEST(start.nr_modules == 1u);
    const auto module = memory.read_object<hvm_modlist_entry>(start.modlist_paddr).value();
    BOOST_TEST(module.paddr == entry.initrd_address);
    BOOST_TEST(module.size == initrd.size());
    BOOST_TEST_REQUIRE(start.memmap_entries == 3u);
    const auto ram =
        memory.read_object<hvm_memmap_table_entry>(start.memmap_paddr + 2 * 24).value();
    BOOST_TEST(ram.addr == 0x100000u);
    BOOST_TEST(ram.type == 1u);
    // Segment: file bytes then zeroed bss.
    auto loaded = memory.span(0x1000000, 0x3000).value();
    BOOST_TEST(std::memcmp(loaded.data(), kernel.data() + 0x1000, 0x1000) == 0);
    BOOST_TEST(loaded[0x2fff] == std::byte{0});
}

BOOST_AUTO_TEST_CASE(without_pvh_the_64_bit_entry_gets_a_zero_page) {
    auto memory = make_memory();
    supermachine::test::elf_knobs k;
    k.pvh_note = false;
    const auto kernel = make_elf(k);
    auto entry = load_linux(memory, config_for(kernel)).value();
    BOOST_TEST(entry.mode == entry_mode::long_mode_64);
    BOOST_TEST(entry.rip == 0x1000000u);
    BOOST_TEST(entry.rsi == x86_layout::zero_page);
    BOOST_TEST(entry.cr3 == x86_layout::pml4);
    const auto params = memory.read_object<boot_params>(x86_layout::zero_page).value();
    BOOST_TEST(params.hdr.header == header_magic);
    BOOST_TEST(params.e820_entries == 3);
    // prefer_pvh = false on a PVH kernel: also the 64-bit entry.
    const auto pvh_kernel = make_elf();
    auto config = config_for(pvh_kernel);
    config.prefer_pvh = false;
    BOOST_TEST(load_linux(memory, config).value().mode == entry_mode::long_mode_64);
}

BOOST_AUTO_TEST_CASE(hostile_elf_headers_are_clean_errors) {
    auto memory = make_memory();
    using supermachine::test::elf_knobs;
    auto error_for = [&](elf_knobs k) { return load_error(memory, config_for(make_elf(k))); };
    elf_knobs k;
    k.phnum = 0xffff;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.phnum = 60; // plausible count, table runs past the file
    k.phoff = 0x1f00;
    BOOST_TEST(error_for(k) == errc::kernel_truncated);
    k = {};
    k.phoff = ~std::uint64_t{0} - 8;
    BOOST_TEST(error_for(k) == errc::kernel_truncated);
    k = {};
    k.phentsize = 32;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.load_filesz = 0x10'0000; // past the end of the file
    k.load_memsz = 0x10'0000;
    BOOST_TEST(error_for(k) == errc::kernel_truncated);
    k = {};
    k.load_offset = ~std::uint64_t{0};
    BOOST_TEST(error_for(k) == errc::kernel_truncated);
    k = {};
    k.load_filesz = 0x1000;
    k.load_memsz = 0x800; // filesz > memsz
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.load_paddr = 0x8000; // over our boot structures
    k.entry = k.pvh_entry = 0x8000;
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.load_paddr = 0x2'0000'0000; // outside guest RAM
    k.entry = k.pvh_entry = 0x2'0000'0000 & 0xffffffff;
    BOOST_TEST(error_for(k) != supermachine::error_code{});
    k = {};
    k.load_paddr = 0x3f00000; // straddles the end of 64 MiB
    k.load_memsz = 0x200000;
    k.entry = k.pvh_entry = 0x3f00000;
    BOOST_TEST(error_for(k) == errc::memory_too_small);
    k = {};
    k.load_paddr = ~std::uint64_t{0} - 0x100; // wraps
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.pvh_entry = 0x2000000; // PVH entry outside every segment
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.note_descsz = 0xfffffff0; // note runs past its segment
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    k = {};
    k.note_descsz = 2; // neither 4 nor 8 bytes
    BOOST_TEST(error_for(k) == errc::kernel_invalid);
    const auto good = make_elf();
    for (std::size_t cut = 4; cut < 64; ++cut)
        BOOST_TEST(parse_elf(std::span(good).first(cut)).error() == errc::kernel_truncated);
}

BOOST_AUTO_TEST_SUITE_END()
