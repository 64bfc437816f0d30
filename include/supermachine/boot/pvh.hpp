#pragma once
// PVH boot: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h),
// version 1 with the memory map. The kernel's 32-bit PVH entry gets its
// guest-physical address in %ebx.
#include <supermachine/boot/zero_page.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace supermachine::boot {

inline constexpr std::uint32_t hvm_start_info_magic = 0x336ec578;

struct hvm_start_info {
    std::uint32_t magic;
    std::uint32_t version;
    std::uint32_t flags;
    std::uint32_t nr_modules;
    std::uint64_t modlist_paddr;
    std::uint64_t cmdline_paddr;
    std::uint64_t rsdp_paddr;
    std::uint64_t memmap_paddr;
    std::uint32_t memmap_entries;
    std::uint32_t reserved;
};
static_assert(sizeof(hvm_start_info) == 56);
static_assert(offsetof(hvm_start_info, modlist_paddr) == 16);
static_assert(offsetof(hvm_start_info, memmap_paddr) == 40);

struct hvm_modlist_entry {
    std::uint64_t paddr;
    std::uint64_t size;
    std::uint64_t cmdline_paddr;
    std::uint64_t reserved;
};
static_assert(sizeof(hvm_modlist_entry) == 32);

struct hvm_memmap_table_entry {
    std::uint64_t addr;
    std::uint64_t size;
    std::uint32_t type; // e820 types
    std::uint32_t reserved;
};
static_assert(sizeof(hvm_memmap_table_entry) == 24);

/// The PVH structures occupy [pvh_start_info, zero_page): start_info, one
/// module entry, then the memory map.
inline constexpr std::uint64_t pvh_modlist = x86_layout::pvh_start_info + 64;
inline constexpr std::uint64_t pvh_memmap = pvh_modlist + sizeof(hvm_modlist_entry);
inline constexpr std::size_t pvh_max_memmap_entries =
    (x86_layout::zero_page - pvh_memmap) / sizeof(hvm_memmap_table_entry);

struct pvh_boot_info {
    std::uint64_t cmdline = 0;
    std::uint64_t initrd = 0, initrd_size = 0; // size 0: no module
    std::uint64_t rsdp = 0;
};

/// Write start_info, the module list and the memory map; returns the
/// start_info address (for %ebx).
inline result<std::uint64_t> write_pvh_start_info(const guest_memory& memory,
                                                  std::span<const e820_entry> map,
                                                  const pvh_boot_info& info) {
    if (map.size() > pvh_max_memmap_entries) return errc::out_of_resources;
    hvm_start_info start{};
    start.magic = hvm_start_info_magic;
    start.version = 1;
    start.cmdline_paddr = info.cmdline;
    start.rsdp_paddr = info.rsdp;
    if (info.initrd_size != 0) {
        start.nr_modules = 1;
        start.modlist_paddr = pvh_modlist;
        SUPERMACHINE_TRY(memory.write_object(
            pvh_modlist, hvm_modlist_entry{info.initrd, info.initrd_size, 0, 0}));
    }
    start.memmap_paddr = pvh_memmap;
    start.memmap_entries = static_cast<std::uint32_t>(map.size());
    for (std::size_t i = 0; i < map.size(); ++i) {
        const hvm_memmap_table_entry entry{map[i].address, map[i].size, map[i].type, 0};
        SUPERMACHINE_TRY(memory.write_object(pvh_memmap + i * sizeof entry, entry));
    }
    SUPERMACHINE_TRY(memory.write_object(x86_layout::pvh_start_info, start));
    return x86_layout::pvh_start_info;
}

} // namespace supermachine::boot
