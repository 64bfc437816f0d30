#pragma once
// bzImage: the x86 Linux boot protocol's setup header (Documentation/arch/
// x86/boot.rst), parsed from hostile bytes. Every field we use is bounded;
// fields past the end the header itself declares (0x202 + the jump byte at
// 0x201) are treated as zero, as the protocol asks.
#include <supermachine/boot/detail/byte_io.hpp>
#include <supermachine/error.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace supermachine::boot {

/// struct setup_header, at offset 0x1f1 of the file and of the zero page.
struct __attribute__((packed)) setup_header {
    std::uint8_t setup_sects;
    std::uint16_t root_flags;
    std::uint32_t syssize;
    std::uint16_t ram_size;
    std::uint16_t vid_mode;
    std::uint16_t root_dev;
    std::uint16_t boot_flag;
    std::uint16_t jump;
    std::uint32_t header;
    std::uint16_t version;
    std::uint32_t realmode_swtch;
    std::uint16_t start_sys_seg;
    std::uint16_t kernel_version;
    std::uint8_t type_of_loader;
    std::uint8_t loadflags;
    std::uint16_t setup_move_size;
    std::uint32_t code32_start;
    std::uint32_t ramdisk_image;
    std::uint32_t ramdisk_size;
    std::uint32_t bootsect_kludge;
    std::uint16_t heap_end_ptr;
    std::uint8_t ext_loader_ver;
    std::uint8_t ext_loader_type;
    std::uint32_t cmd_line_ptr;
    std::uint32_t initrd_addr_max;
    std::uint32_t kernel_alignment;
    std::uint8_t relocatable_kernel;
    std::uint8_t min_alignment;
    std::uint16_t xloadflags;
    std::uint32_t cmdline_size;
    std::uint32_t hardware_subarch;
    std::uint64_t hardware_subarch_data;
    std::uint32_t payload_offset;
    std::uint32_t payload_length;
    std::uint64_t setup_data;
    std::uint64_t pref_address;
    std::uint32_t init_size;
    std::uint32_t handover_offset;
    std::uint32_t kernel_info_offset;
};

/// Offsets inside the file / zero page (boot.rst "THE REAL-MODE KERNEL HEADER").
namespace setup_offsets {
inline constexpr std::size_t header_start = 0x1f1;
inline constexpr std::size_t boot_flag = 0x1fe;
inline constexpr std::size_t jump = 0x200;
inline constexpr std::size_t magic = 0x202;
inline constexpr std::size_t version = 0x206;
inline constexpr std::size_t header_end = 0x26c; // end of the 2.15 header
} // namespace setup_offsets

static_assert(sizeof(setup_header) == setup_offsets::header_end - setup_offsets::header_start);
static_assert(offsetof(setup_header, boot_flag) == 0x1fe - 0x1f1);
static_assert(offsetof(setup_header, header) == 0x202 - 0x1f1);
static_assert(offsetof(setup_header, version) == 0x206 - 0x1f1);
static_assert(offsetof(setup_header, type_of_loader) == 0x210 - 0x1f1);
static_assert(offsetof(setup_header, loadflags) == 0x211 - 0x1f1);
static_assert(offsetof(setup_header, code32_start) == 0x214 - 0x1f1);
static_assert(offsetof(setup_header, ramdisk_image) == 0x218 - 0x1f1);
static_assert(offsetof(setup_header, heap_end_ptr) == 0x224 - 0x1f1);
static_assert(offsetof(setup_header, cmd_line_ptr) == 0x228 - 0x1f1);
static_assert(offsetof(setup_header, initrd_addr_max) == 0x22c - 0x1f1);
static_assert(offsetof(setup_header, kernel_alignment) == 0x230 - 0x1f1);
static_assert(offsetof(setup_header, relocatable_kernel) == 0x234 - 0x1f1);
static_assert(offsetof(setup_header, xloadflags) == 0x236 - 0x1f1);
static_assert(offsetof(setup_header, cmdline_size) == 0x238 - 0x1f1);
static_assert(offsetof(setup_header, setup_data) == 0x250 - 0x1f1);
static_assert(offsetof(setup_header, pref_address) == 0x258 - 0x1f1);
static_assert(offsetof(setup_header, init_size) == 0x260 - 0x1f1);
static_assert(offsetof(setup_header, kernel_info_offset) == 0x268 - 0x1f1);

inline constexpr std::uint16_t boot_flag_value = 0xaa55;
inline constexpr std::uint32_t header_magic = 0x53726448; // "HdrS"
inline constexpr std::uint8_t loadflag_loaded_high = 0x01;
inline constexpr std::uint8_t loadflag_keep_segments = 0x40;
inline constexpr std::uint8_t loadflag_can_use_heap = 0x80;
inline constexpr std::uint16_t xloadflag_kernel_64 = 0x01;
inline constexpr std::uint16_t xloadflag_can_be_loaded_above_4g = 0x02;
inline constexpr std::uint16_t minimum_protocol = 0x0206;   // cmdline_size
inline constexpr std::uint16_t kernel_64_protocol = 0x020c; // xloadflags
inline constexpr std::uint64_t entry_64_offset =
    0x200; // startup_64 within the protected-mode kernel

/// Largest values we accept from a header; beyond them the file is lying.
inline constexpr std::uint64_t max_protected_mode_size = 512ull << 20;
inline constexpr std::uint64_t max_init_size = 1ull << 30;
inline constexpr std::uint64_t max_kernel_alignment = 1ull << 30;

/// A validated bzImage. `protected_mode_kernel` points into the caller's span.
struct bzimage {
    setup_header header{};      // as the file declares it (bytes past its own end zero)
    std::size_t setup_size = 0; // (setup_sects + 1) * 512: where the protected-mode kernel starts
    std::span<const std::byte> protected_mode_kernel;
    std::uint64_t init_size = 0;        // bytes the kernel needs from where it runs
    std::uint64_t pref_address = 0;     // where it prefers to run
    std::uint64_t kernel_alignment = 0; // power of two
    bool relocatable = false;
    std::uint32_t initrd_addr_max = 0; // highest address of the initrd's last byte
    std::uint32_t cmdline_size = 0;    // max cmdline length without the NUL
};

/// True if `file` starts like a bzImage (PE/MZ stub or boot sector with the
/// setup header magic), i.e. a short file is truncated, not foreign.
inline bool looks_like_bzimage(std::span<const std::byte> file) noexcept {
    if (file.size() >= setup_offsets::magic + 4)
        return detail::load_le<std::uint32_t>(file, setup_offsets::magic) == header_magic;
    if (file.size() >= setup_offsets::boot_flag + 2)
        return detail::load_le<std::uint16_t>(file, setup_offsets::boot_flag) == boot_flag_value;
    return file.size() >= 2 && file[0] == std::byte{'M'} && file[1] == std::byte{'Z'};
}

/// Parse and validate a bzImage for the 64-bit boot protocol.
/// kernel_invalid: not a bzImage or inconsistent fields; kernel_truncated:
/// shorter than its header says; kernel_unsupported: too old / not 64-bit.
inline result<bzimage> parse_bzimage(std::span<const std::byte> file) noexcept {
    using namespace setup_offsets;
    if (file.size() < version + 2)
        return looks_like_bzimage(file) ? errc::kernel_truncated : errc::kernel_invalid;
    if (detail::load_le<std::uint16_t>(file, boot_flag) != boot_flag_value)
        return errc::kernel_invalid;
    if (detail::load_le<std::uint32_t>(file, magic) != header_magic) return errc::kernel_invalid;

    bzimage image;
    // The header's own length: a short jump at 0x200 (EB xx) to 0x202 + xx.
    if (file[jump] != std::byte{0xeb}) return errc::kernel_invalid;
    const std::size_t declared_end = magic + std::to_integer<std::size_t>(file[jump + 1]);
    const std::size_t copy_end = std::min(declared_end, header_end);
    if (file.size() < copy_end) return errc::kernel_truncated;
    std::memcpy(&image.header, file.data() + header_start, copy_end - header_start);
    const setup_header& h = image.header;

    if (h.version < minimum_protocol) return errc::kernel_unsupported;
    if (h.version < kernel_64_protocol || !(h.xloadflags & xloadflag_kernel_64))
        return errc::kernel_unsupported;
    if (copy_end < offsetof(setup_header, kernel_info_offset) + header_start)
        return errc::kernel_invalid; // a 2.12 header is at least this long
    if (!(h.loadflags & loadflag_loaded_high)) return errc::kernel_unsupported; // zImage

    const std::size_t sects = h.setup_sects == 0 ? 4 : h.setup_sects;
    image.setup_size = (sects + 1) * 512;
    if (file.size() < image.setup_size) return errc::kernel_truncated;
    const std::uint64_t declared_kernel = std::uint64_t{h.syssize} * 16;
    if (declared_kernel == 0 || declared_kernel > max_protected_mode_size)
        return errc::kernel_invalid;
    if (file.size() - image.setup_size < declared_kernel) return errc::kernel_truncated;
    // The whole tail is loaded (syssize is rounded down to 16 bytes by the build).
    const std::uint64_t tail = file.size() - image.setup_size;
    if (tail > max_protected_mode_size) return errc::kernel_invalid;
    image.protected_mode_kernel = file.subspan(image.setup_size);
    if (image.protected_mode_kernel.size() <= entry_64_offset) return errc::kernel_truncated;

    image.relocatable = h.relocatable_kernel != 0;
    image.kernel_alignment = h.kernel_alignment;
    if (image.relocatable) {
        const auto a = image.kernel_alignment;
        if (a < 4096 || a > max_kernel_alignment || (a & (a - 1)) != 0) return errc::kernel_invalid;
    } else if (image.kernel_alignment == 0 ||
               (image.kernel_alignment & (image.kernel_alignment - 1)) != 0) {
        image.kernel_alignment = 4096; // unused for a fixed-address kernel
    }
    image.pref_address = h.pref_address;
    if (image.pref_address == 0) image.pref_address = 0x100000;
    if (image.pref_address < 0x100000 || image.pref_address > (1ull << 46) ||
        image.pref_address % 4096 != 0)
        return errc::kernel_invalid;
    image.init_size = h.init_size;
    if (image.init_size == 0 || image.init_size > max_init_size) return errc::kernel_invalid;
    image.initrd_addr_max = h.initrd_addr_max == 0 ? 0x37ffffffu : h.initrd_addr_max;
    image.cmdline_size = h.cmdline_size;
    if (image.cmdline_size == 0) return errc::kernel_invalid;
    return image;
}

} // namespace supermachine::boot
