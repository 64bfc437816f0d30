#pragma once
// load_linux(): everything a Linux guest needs in RAM before its first
// instruction — kernel (bzImage or ELF vmlinux), initrd, cmdline, zero page
// with the e820 map, PVH start_info, GDT/IDT, identity page tables and the
// ACPI tables — and the register state to enter it. The kernel bytes are
// hostile; every field is bounded before use and nothing is written outside
// guest RAM. Validation happens before the first write.
#include <supermachine/boot/acpi.hpp>
#include <supermachine/boot/bzimage.hpp>
#include <supermachine/boot/descriptor_tables.hpp>
#include <supermachine/boot/elf.hpp>
#include <supermachine/boot/page_tables.hpp>
#include <supermachine/boot/pvh.hpp>
#include <supermachine/boot/virtio_mmio_slot.hpp>
#include <supermachine/boot/zero_page.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace supermachine::boot {

struct linux_boot_config {
    std::span<const std::byte> kernel; // bzImage or ELF vmlinux bytes (hostile: validate)
    std::span<const std::byte> initrd; // may be empty
    std::string cmdline;
    std::uint32_t vcpus = 1;
    std::vector<virtio_mmio_slot>
        virtio_devices;      // in the DSDT and as virtio_mmio.device= on the cmdline
    bool serial_com1 = true; // COM1 in the DSDT
    bool prefer_pvh = true;  // ELF with a PVH note: use the 32-bit PVH entry
};

enum class entry_mode { long_mode_64, protected_mode_32_pvh };

struct boot_entry {
    entry_mode mode;
    std::uint64_t rip, rsi /*zero page*/, rbx /*PVH start_info*/, rsp;
    std::uint64_t cr3; // identity page tables the loader wrote (long mode), else 0
    std::uint64_t gdt_base;
    std::uint16_t gdt_limit;
    std::uint64_t idt_base;
    std::uint16_t idt_limit;
    // Flat segments: code selector 0x10, data selector 0x18 (Linux __BOOT_CS/__BOOT_DS).
    // In PVH mode the code segment is the 32-bit one at 0x08 (code_selector says which).
    std::uint16_t code_selector = code64_selector;
    std::uint16_t data_selector = boot::data_selector;
    // Where things went (diagnostics, tests, the conformance guest).
    std::uint64_t kernel_address = 0, kernel_end = 0; // range reserved for the kernel
    std::uint64_t initrd_address = 0, initrd_size = 0;
    std::uint64_t rsdp = 0;
};

/// Largest cmdline for an ELF kernel (no setup header to say): x86's COMMAND_LINE_SIZE - 1.
inline constexpr std::size_t elf_cmdline_size = 2047;

/// The cmdline the guest gets: the caller's, then one virtio_mmio.device=
/// per device (for kernels built with VIRTIO_MMIO_CMDLINE_DEVICES).
inline std::string full_cmdline(const linux_boot_config& config) {
    std::string line = config.cmdline;
    for (const auto& slot : config.virtio_devices) {
        char fragment[80];
        std::snprintf(fragment, sizeof fragment, "virtio_mmio.device=0x%llx@0x%llx:%u",
                      static_cast<unsigned long long>(slot.size),
                      static_cast<unsigned long long>(slot.base), slot.gsi);
        if (!line.empty()) line += ' ';
        line += fragment;
    }
    return line;
}

namespace detail {

struct kernel_plan {
    entry_mode mode = entry_mode::long_mode_64;
    std::uint64_t entry = 0;
    std::uint64_t reserved_begin = 0, reserved_end = 0;
    std::uint64_t cmdline_limit = 0;
    std::uint64_t initrd_max = 0; // highest address of the initrd's last byte
    std::optional<bzimage> bz;
    std::optional<elf_kernel> elf;
};

inline result<kernel_plan> plan_kernel(const linux_boot_config& config, std::uint64_t low_end) {
    kernel_plan plan;
    if (looks_like_elf(config.kernel)) {
        SUPERMACHINE_TRY(elf, parse_elf(config.kernel));
        if (elf.lowest < x86_layout::kernel_start) return errc::kernel_invalid;
        if (elf.highest > low_end) return errc::memory_too_small;
        if (config.prefer_pvh && elf.pvh_entry) {
            plan.mode = entry_mode::protected_mode_32_pvh;
            plan.entry = *elf.pvh_entry;
        } else {
            plan.entry = elf.entry;
            if (!elf.contains(plan.entry)) return errc::kernel_invalid; // ELF with only a PVH note
        }
        plan.reserved_begin = elf.lowest;
        plan.reserved_end = elf.highest;
        plan.cmdline_limit = elf_cmdline_size;
        plan.initrd_max = low_end - 1;
        plan.elf = std::move(elf);
        return plan;
    }
    SUPERMACHINE_TRY(bz, parse_bzimage(config.kernel));
    std::uint64_t load = bz.pref_address;
    if (bz.relocatable)
        load = align_up(std::max(bz.pref_address, x86_layout::kernel_start), bz.kernel_alignment);
    const std::uint64_t footprint =
        std::max<std::uint64_t>(bz.init_size, bz.protected_mode_kernel.size());
    if (load >= low_end || footprint > low_end - load) return errc::memory_too_small;
    plan.entry = load + entry_64_offset;
    plan.reserved_begin = load;
    plan.reserved_end = load + footprint;
    plan.cmdline_limit = bz.cmdline_size;
    plan.initrd_max = bz.initrd_addr_max;
    plan.bz = std::move(bz);
    return plan;
}

} // namespace detail

/// Where an initrd of `size` bytes goes: as high as allowed below
/// min(initrd_max + 1, low_end), page-aligned, above the kernel's reserved
/// range. initrd_too_large when it cannot fit.
inline result<std::uint64_t> place_initrd(std::uint64_t size, std::uint64_t initrd_max,
                                          std::uint64_t low_end, std::uint64_t kernel_end) {
    const std::uint64_t top = std::min(initrd_max, low_end - 1) + 1;
    if (top <= kernel_end || size > top - kernel_end) return errc::initrd_too_large;
    const std::uint64_t address = detail::align_down(top - size, 4096);
    if (address < kernel_end) return errc::initrd_too_large;
    return address;
}

inline result<boot_entry> load_linux(const guest_memory& memory, const linux_boot_config& config) {
    if (config.kernel.empty()) return errc::kernel_invalid;
    for (const auto& slot : config.virtio_devices)
        if (slot.gsi > 23) return errc::invalid_argument; // the IOAPIC has 24 pins
    if (config.cmdline.find('\0') != std::string::npos) return errc::invalid_argument;

    // --- validate and plan everything before writing anything ---
    const std::uint64_t low_end = low_memory_end(memory);
    if (low_end < x86_layout::high_memory_start) return errc::memory_too_small;
    SUPERMACHINE_TRY(map, build_e820(memory));
    SUPERMACHINE_TRY(acpi,
                     build_acpi_tables({config.vcpus, config.virtio_devices, config.serial_com1}));
    SUPERMACHINE_TRY(plan, detail::plan_kernel(config, low_end));
    const std::string cmdline = full_cmdline(config);
    if (cmdline.size() > plan.cmdline_limit || cmdline.size() + 1 > x86_layout::cmdline_max_size)
        return errc::cmdline_too_long;
    std::uint64_t initrd_address = 0;
    if (!config.initrd.empty()) {
        SUPERMACHINE_TRY(address, place_initrd(config.initrd.size(), plan.initrd_max, low_end,
                                               plan.reserved_end));
        initrd_address = address;
    }

    // --- write ---
    if (plan.elf) {
        SUPERMACHINE_TRY(load_elf_segments(memory, *plan.elf, config.kernel));
    } else {
        SUPERMACHINE_TRY(memory.write(plan.reserved_begin, plan.bz->protected_mode_kernel));
    }
    if (!config.initrd.empty()) {
        SUPERMACHINE_TRY(memory.write(initrd_address, config.initrd));
    }
    {
        SUPERMACHINE_TRY(target, memory.span(x86_layout::cmdline, cmdline.size() + 1));
        std::memcpy(target.data(), cmdline.data(), cmdline.size());
        target[cmdline.size()] = std::byte{0};
    }
    SUPERMACHINE_TRY(rsdp, write_acpi_tables(memory, acpi));
    SUPERMACHINE_TRY(tables, write_descriptor_tables(memory));

    boot_entry entry{};
    entry.mode = plan.mode;
    entry.rip = plan.entry;
    entry.rsp = x86_layout::boot_stack_pointer;
    entry.gdt_base = tables.gdt_base;
    entry.gdt_limit = tables.gdt_limit;
    entry.idt_base = tables.idt_base;
    entry.idt_limit = tables.idt_limit;
    entry.kernel_address = plan.reserved_begin;
    entry.kernel_end = plan.reserved_end;
    entry.initrd_address = initrd_address;
    entry.initrd_size = config.initrd.size();
    entry.rsdp = rsdp;

    if (plan.mode == entry_mode::protected_mode_32_pvh) {
        SUPERMACHINE_TRY(start_info, write_pvh_start_info(memory, map,
                                                          {x86_layout::cmdline, initrd_address,
                                                           config.initrd.size(), rsdp}));
        entry.rbx = start_info;
        entry.code_selector = code32_selector;
        return entry;
    }

    boot_params params{};
    if (plan.bz) {
        params.hdr = plan.bz->header;
        params.hdr.code32_start = static_cast<std::uint32_t>(plan.reserved_begin);
        params.hdr.loadflags =
            static_cast<std::uint8_t>(params.hdr.loadflags | loadflag_can_use_heap);
        params.hdr.heap_end_ptr = 0xfe00;
        // Pointers and modes a hostile file could have pre-set: ours, or none.
        params.hdr.setup_data = 0;
        params.hdr.hardware_subarch = 0;
        params.hdr.hardware_subarch_data = 0;
    } else {
        params.hdr.boot_flag = boot_flag_value;
        params.hdr.header = header_magic;
        params.hdr.version = 0x020f;
        params.hdr.loadflags = loadflag_loaded_high;
        params.hdr.kernel_alignment = 0x0100'0000;
        params.hdr.cmdline_size = static_cast<std::uint32_t>(elf_cmdline_size);
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.vid_mode = 0xffff;     // normal VGA
    params.hdr.cmd_line_ptr = static_cast<std::uint32_t>(x86_layout::cmdline);
    params.ext_cmd_line_ptr = 0;
    params.hdr.ramdisk_image = static_cast<std::uint32_t>(initrd_address);
    params.hdr.ramdisk_size = static_cast<std::uint32_t>(config.initrd.size());
    params.ext_ramdisk_image = static_cast<std::uint32_t>(initrd_address >> 32);
    params.ext_ramdisk_size = static_cast<std::uint32_t>(std::uint64_t{config.initrd.size()} >> 32);
    params.acpi_rsdp_addr = rsdp;
    params.e820_entries = static_cast<std::uint8_t>(map.size());
    std::memcpy(params.e820_table, map.data(), map.size() * sizeof(e820_entry));
    SUPERMACHINE_TRY(memory.write_object(x86_layout::zero_page, params));
    SUPERMACHINE_TRY(cr3, write_identity_page_tables(memory));
    entry.rsi = x86_layout::zero_page;
    entry.cr3 = cr3;
    return entry;
}

} // namespace supermachine::boot
