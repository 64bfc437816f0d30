#pragma once
// The zero page (struct boot_params, arch/x86/include/uapi/asm/bootparam.h)
// and the e820 memory map the boot layer derives from guest_memory.
#include <supermachine/boot/bzimage.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace supermachine::boot {

enum class e820_type : std::uint32_t { ram = 1, reserved = 2, acpi = 3, nvs = 4, unusable = 5 };

struct __attribute__((packed)) e820_entry {
    std::uint64_t address;
    std::uint64_t size;
    std::uint32_t type;
};
static_assert(sizeof(e820_entry) == 20);

inline constexpr std::size_t e820_max_entries = 128; // boot_params.e820_table

struct __attribute__((packed)) boot_params {
    std::uint8_t screen_info[0x40];
    std::uint8_t apm_bios_info[0x14];
    std::uint8_t pad2[4];
    std::uint64_t tboot_addr;
    std::uint8_t ist_info[0x10];
    std::uint64_t acpi_rsdp_addr; // protocol 2.14: where the RSDP is, no scanning
    std::uint8_t pad3[8];
    std::uint8_t hd0_info[16];
    std::uint8_t hd1_info[16];
    std::uint8_t sys_desc_table[0x10];
    std::uint8_t olpc_ofw_header[0x10];
    std::uint32_t ext_ramdisk_image;
    std::uint32_t ext_ramdisk_size;
    std::uint32_t ext_cmd_line_ptr;
    std::uint8_t pad4[112];
    std::uint32_t cc_blob_address;
    std::uint8_t edid_info[0x80];
    std::uint8_t efi_info[0x20];
    std::uint32_t alt_mem_k;
    std::uint32_t scratch;
    std::uint8_t e820_entries;
    std::uint8_t eddbuf_entries;
    std::uint8_t edd_mbr_sig_buf_entries;
    std::uint8_t kbd_status;
    std::uint8_t secure_boot;
    std::uint8_t pad5[2];
    std::uint8_t sentinel;
    std::uint8_t pad6[1];
    setup_header hdr;
    std::uint8_t pad7[0x290 - 0x1f1 - sizeof(setup_header)];
    std::uint32_t edd_mbr_sig_buffer[16];
    e820_entry e820_table[e820_max_entries];
    std::uint8_t pad8[48];
    std::uint8_t eddbuf[6 * 82];
    std::uint8_t pad9[276];
};
static_assert(sizeof(boot_params) == 4096);
static_assert(offsetof(boot_params, tboot_addr) == 0x058);
static_assert(offsetof(boot_params, acpi_rsdp_addr) == 0x070);
static_assert(offsetof(boot_params, ext_ramdisk_image) == 0x0c0);
static_assert(offsetof(boot_params, ext_cmd_line_ptr) == 0x0c8);
static_assert(offsetof(boot_params, cc_blob_address) == 0x13c);
static_assert(offsetof(boot_params, alt_mem_k) == 0x1e0);
static_assert(offsetof(boot_params, e820_entries) == 0x1e8);
static_assert(offsetof(boot_params, sentinel) == 0x1ef);
static_assert(offsetof(boot_params, hdr) == 0x1f1);
static_assert(offsetof(boot_params, edd_mbr_sig_buffer) == 0x290);
static_assert(offsetof(boot_params, e820_table) == 0x2d0);
static_assert(offsetof(boot_params, eddbuf) == 0xd00);

/// The e820 map for `memory`: RAM below the EBDA, the EBDA/ACPI/BIOS area
/// [x86_layout::ebda_start, 1 MiB) reserved (our ACPI tables live there),
/// RAM above. Every region contributes; sorted by address.
/// memory_too_small if the first MiB is not RAM (the boot structures live
/// there); out_of_resources if the map needs more than `max_entries`.
inline result<std::vector<e820_entry>> build_e820(const guest_memory& memory,
                                                  std::size_t max_entries = e820_max_entries) {
    if (!memory.contains(0, x86_layout::high_memory_start)) return errc::memory_too_small;
    std::vector<e820_entry> map;
    auto add = [&](std::uint64_t begin, std::uint64_t end, e820_type type) -> bool {
        if (begin >= end) return true;
        if (map.size() == max_entries) return false;
        map.push_back({begin, end - begin, static_cast<std::uint32_t>(type)});
        return true;
    };
    for (const auto& r : memory.regions()) {
        const std::uint64_t b = r.guest_base, e = r.guest_end();
        const bool ok = add(b, std::min(e, x86_layout::ebda_start), e820_type::ram) &&
                        add(std::max(b, x86_layout::ebda_start),
                            std::min(e, x86_layout::high_memory_start), e820_type::reserved) &&
                        add(std::max(b, x86_layout::high_memory_start), e, e820_type::ram);
        if (!ok) return errc::out_of_resources;
    }
    std::sort(map.begin(), map.end(),
              [](const e820_entry& a, const e820_entry& b) { return a.address < b.address; });
    return map;
}

/// End of the RAM that is contiguous from address 0: where "low memory"
/// (below the MMIO gap) stops. The kernel and initrd live below it.
inline std::uint64_t low_memory_end(const guest_memory& memory) noexcept {
    std::uint64_t end = 0;
    for (const auto& r : memory.regions()) {
        if (r.guest_base > end) break;
        end = std::max(end, r.guest_end());
    }
    return end;
}

} // namespace supermachine::boot
