#pragma once
// Wrap a flat 64-bit program as a bzImage, so small guests of our own (the
// conformance guest, test kernels) go through the same loader as Linux.
// The program is the protected-mode part: it is loaded at `load_address`
// and entered in long mode at load_address + 0x200 with %rsi = zero page.
#include <supermachine/boot/bzimage.hpp>
#include <supermachine/error.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace supermachine::boot {

struct bzimage_build_options {
    std::uint64_t load_address = 0x100000; // pref_address; the program is linked to run here
    std::uint32_t init_size =
        0; // bytes it needs from load_address (0: its size rounded up to 4 KiB)
    std::uint32_t cmdline_size = 2047;
    std::uint32_t initrd_addr_max = 0x7fff'ffff;
};

/// A bzImage (boot protocol 2.15, not relocatable, XLF_KERNEL_64) around
/// `program`. invalid_argument if the program has no room for the 64-bit
/// entry at 0x200 or the addresses are unusable.
inline result<std::vector<std::byte>> build_bzimage(std::span<const std::byte> program,
                                                    const bzimage_build_options& options = {}) {
    if (program.size() <= entry_64_offset || program.size() > max_protected_mode_size)
        return errc::invalid_argument;
    if (options.load_address < 0x100000 || options.load_address % 4096 != 0 ||
        options.load_address > (1ull << 46))
        return errc::invalid_argument;
    const std::uint64_t padded =
        (program.size() + 15) / 16 * 16; // syssize counts 16-byte paragraphs
    const std::uint64_t init_size =
        options.init_size ? options.init_size : (padded + 4095) / 4096 * 4096;
    if (init_size < padded || init_size > max_init_size) return errc::invalid_argument;
    constexpr std::size_t setup_sects = 1;
    constexpr std::size_t setup_size = (setup_sects + 1) * 512;
    std::vector<std::byte> image(setup_size + padded);
    setup_header h{};
    h.setup_sects = setup_sects;
    h.syssize = static_cast<std::uint32_t>(padded / 16);
    h.boot_flag = boot_flag_value;
    h.jump = static_cast<std::uint16_t>(0xeb |
                                        ((setup_offsets::header_end - setup_offsets::magic) << 8));
    h.header = header_magic;
    h.version = 0x020f;
    h.loadflags = loadflag_loaded_high;
    h.code32_start = static_cast<std::uint32_t>(options.load_address);
    h.initrd_addr_max = options.initrd_addr_max;
    h.kernel_alignment = 0x1000;
    h.relocatable_kernel = 0;
    h.xloadflags = xloadflag_kernel_64;
    h.cmdline_size = options.cmdline_size;
    h.pref_address = options.load_address;
    h.init_size = static_cast<std::uint32_t>(init_size);
    std::memcpy(image.data() + setup_offsets::header_start, &h, sizeof h);
    std::memcpy(image.data() + setup_size, program.data(), program.size());
    return image;
}

} // namespace supermachine::boot
