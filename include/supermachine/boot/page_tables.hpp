#pragma once
// Identity page tables for the 64-bit entry: the first 4 GiB mapped with
// 2 MiB pages at x86_layout::pml4 / pdpt / pd (four PD pages from pd).
// The kernel replaces them early; they only have to cover what it touches
// before that (itself, the zero page, cmdline, initrd below 4 GiB).
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <array>
#include <cstdint>

namespace supermachine::boot {

inline constexpr std::uint64_t page_present = 1u << 0;
inline constexpr std::uint64_t page_writable = 1u << 1;
inline constexpr std::uint64_t page_size_2m = 1u << 7;
inline constexpr std::uint64_t identity_mapped_bytes = 4ull << 30;

/// Writes PML4, PDPT and 4 PDs; returns the CR3 value (x86_layout::pml4).
inline result<std::uint64_t> write_identity_page_tables(const guest_memory& memory) {
    constexpr std::uint64_t pd_pages = identity_mapped_bytes >> 30; // one PD per GiB
    std::array<std::uint64_t, 512> table{};
    table[0] = x86_layout::pdpt | page_present | page_writable;
    SUPERMACHINE_TRY(memory.write_object(x86_layout::pml4, table));
    table.fill(0);
    for (std::uint64_t i = 0; i < pd_pages; ++i)
        table[i] = (x86_layout::pd + i * 0x1000) | page_present | page_writable;
    SUPERMACHINE_TRY(memory.write_object(x86_layout::pdpt, table));
    for (std::uint64_t i = 0; i < pd_pages; ++i) {
        for (std::uint64_t j = 0; j < 512; ++j)
            table[j] = ((i << 30) | (j << 21)) | page_present | page_writable | page_size_2m;
        SUPERMACHINE_TRY(memory.write_object(x86_layout::pd + i * 0x1000, table));
    }
    return x86_layout::pml4;
}

} // namespace supermachine::boot
