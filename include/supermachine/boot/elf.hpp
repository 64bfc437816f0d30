#pragma once
// ELF64 vmlinux for x86-64: loadable segments (by physical address) and the
// PVH entry from the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY. Hostile bytes:
// the program header table and every segment are checked against the file
// before anything is read, and against guest RAM before anything is written.
#include <supermachine/boot/detail/byte_io.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace supermachine::boot {

inline constexpr std::size_t elf64_header_size = 64;
inline constexpr std::size_t elf64_program_header_size = 56;
inline constexpr std::uint16_t elf_machine_x86_64 = 62;
inline constexpr std::uint32_t elf_pt_load = 1;
inline constexpr std::uint32_t elf_pt_note = 4;
inline constexpr std::uint32_t xen_elfnote_phys32_entry = 18;
/// A real vmlinux has a handful; more is a hostile file, not a kernel.
inline constexpr std::uint16_t elf_max_program_headers = 64;

struct elf_segment {
    std::uint64_t physical_address;
    std::uint64_t file_offset;
    std::uint64_t file_size;
    std::uint64_t memory_size;
};

struct elf_kernel {
    std::uint64_t entry = 0;                // e_entry: physical startup_64 for vmlinux
    std::optional<std::uint32_t> pvh_entry; // XEN_ELFNOTE_PHYS32_ENTRY
    std::vector<elf_segment> segments;      // PT_LOAD with memory_size > 0
    std::uint64_t lowest = 0, highest = 0;  // [lowest, highest): what the segments occupy

    bool contains(std::uint64_t address) const noexcept {
        for (const auto& s : segments)
            if (address >= s.physical_address && address - s.physical_address < s.memory_size)
                return true;
        return false;
    }
};

inline bool looks_like_elf(std::span<const std::byte> file) noexcept {
    return file.size() >= 4 && file[0] == std::byte{0x7f} && file[1] == std::byte{'E'} &&
           file[2] == std::byte{'L'} && file[3] == std::byte{'F'};
}

namespace detail {
// Walk the notes in [offset, offset+size) of `file` for the PVH entry.
inline result<std::optional<std::uint32_t>>
find_pvh_note(std::span<const std::byte> file, std::uint64_t offset, std::uint64_t size) {
    std::optional<std::uint32_t> entry;
    std::uint64_t at = offset;
    const std::uint64_t end = offset + size; // caller checked against file size
    while (end - at >= 12) {
        const std::uint64_t name_size = load_le<std::uint32_t>(file, at);
        const std::uint64_t desc_size = load_le<std::uint32_t>(file, at + 4);
        const std::uint32_t type = load_le<std::uint32_t>(file, at + 8);
        const std::uint64_t name_at = at + 12;
        const std::uint64_t desc_at = name_at + align_up(name_size, 4);
        if (align_up(name_size, 4) > end - name_at) return errc::kernel_invalid;
        if (align_up(desc_size, 4) > end - desc_at) return errc::kernel_invalid;
        const bool xen = name_size == 4 && file[name_at] == std::byte{'X'} &&
                         file[name_at + 1] == std::byte{'e'} &&
                         file[name_at + 2] == std::byte{'n'} && file[name_at + 3] == std::byte{0};
        if (xen && type == xen_elfnote_phys32_entry) {
            std::uint64_t value = 0;
            if (desc_size == 4)
                value = load_le<std::uint32_t>(file, desc_at);
            else if (desc_size == 8)
                value = load_le<std::uint64_t>(file, desc_at);
            else
                return errc::kernel_invalid;
            if (value > 0xffff'ffffu) return errc::kernel_invalid; // a 32-bit entry by definition
            entry = static_cast<std::uint32_t>(value);
        }
        at = desc_at + align_up(desc_size, 4);
    }
    return entry;
}
} // namespace detail

/// Parse an x86-64 ELF kernel. kernel_invalid for anything inconsistent,
/// kernel_truncated when a header or segment lies past the end of the file.
inline result<elf_kernel> parse_elf(std::span<const std::byte> file) {
    using detail::load_le;
    if (!looks_like_elf(file)) return errc::kernel_invalid;
    if (file.size() < elf64_header_size) return errc::kernel_truncated;
    if (file[4] != std::byte{2} /*ELFCLASS64*/ || file[5] != std::byte{1} /*little-endian*/ ||
        file[6] != std::byte{1} /*EV_CURRENT*/)
        return errc::kernel_invalid;
    const auto type = load_le<std::uint16_t>(file, 16);
    if (type != 2 /*ET_EXEC*/ && type != 3 /*ET_DYN*/) return errc::kernel_invalid;
    if (load_le<std::uint16_t>(file, 18) != elf_machine_x86_64) return errc::kernel_invalid;
    elf_kernel kernel;
    kernel.entry = load_le<std::uint64_t>(file, 24);
    const std::uint64_t phoff = load_le<std::uint64_t>(file, 32);
    const std::uint16_t phentsize = load_le<std::uint16_t>(file, 54);
    const std::uint16_t phnum = load_le<std::uint16_t>(file, 56);
    if (phnum == 0 || phnum > elf_max_program_headers)
        return errc::kernel_invalid; // 0xffff = PN_XNUM too
    if (phentsize != elf64_program_header_size) return errc::kernel_invalid;
    if (phoff > file.size() || std::uint64_t{phnum} * phentsize > file.size() - phoff)
        return errc::kernel_truncated;

    kernel.lowest = ~std::uint64_t{0};
    for (std::uint16_t i = 0; i < phnum; ++i) {
        const std::uint64_t at = phoff + std::uint64_t{i} * phentsize;
        const auto p_type = load_le<std::uint32_t>(file, at);
        const auto offset = load_le<std::uint64_t>(file, at + 8);
        const auto paddr = load_le<std::uint64_t>(file, at + 24);
        const auto filesz = load_le<std::uint64_t>(file, at + 32);
        const auto memsz = load_le<std::uint64_t>(file, at + 40);
        if (p_type != elf_pt_load && p_type != elf_pt_note) continue;
        if (offset > file.size() || filesz > file.size() - offset) return errc::kernel_truncated;
        if (p_type == elf_pt_note) {
            SUPERMACHINE_TRY(note, detail::find_pvh_note(file, offset, filesz));
            if (note) kernel.pvh_entry = note;
            continue;
        }
        if (memsz == 0) continue;
        if (filesz > memsz) return errc::kernel_invalid;
        if (paddr + memsz < paddr) return errc::kernel_invalid;
        kernel.segments.push_back({paddr, offset, filesz, memsz});
        kernel.lowest = std::min(kernel.lowest, paddr);
        kernel.highest = std::max(kernel.highest, paddr + memsz);
    }
    if (kernel.segments.empty()) return errc::kernel_invalid;
    // Loadable segments must not overlap each other (a hostile file could make
    // a later one overwrite an earlier one's checks).
    for (std::size_t i = 0; i < kernel.segments.size(); ++i)
        for (std::size_t j = i + 1; j < kernel.segments.size(); ++j) {
            const auto& a = kernel.segments[i];
            const auto& b = kernel.segments[j];
            if (a.physical_address < b.physical_address + b.memory_size &&
                b.physical_address < a.physical_address + a.memory_size)
                return errc::kernel_invalid;
        }
    if (kernel.pvh_entry && !kernel.contains(*kernel.pvh_entry)) return errc::kernel_invalid;
    if (!kernel.pvh_entry && !kernel.contains(kernel.entry)) return errc::kernel_invalid;
    return kernel;
}

/// Copy the segments into guest memory. Every segment must lie in RAM at or
/// above x86_layout::kernel_start (below it are our boot structures):
/// memory_too_small otherwise.
inline result<void> load_elf_segments(const guest_memory& memory, const elf_kernel& kernel,
                                      std::span<const std::byte> file) {
    for (const auto& s : kernel.segments) {
        if (s.physical_address < x86_layout::kernel_start) return errc::kernel_invalid;
        auto target = memory.span(s.physical_address, s.memory_size);
        if (!target) return errc::memory_too_small;
        std::memcpy(target.value().data(), file.data() + s.file_offset, s.file_size);
        std::memset(target.value().data() + s.file_size, 0, s.memory_size - s.file_size);
    }
    return success();
}

} // namespace supermachine::boot
