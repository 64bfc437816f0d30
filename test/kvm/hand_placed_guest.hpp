#pragma once
// A guest with no loader: GDT, identity page tables and code bytes written
// straight into guest memory, and the entry state filled by hand. Lets the
// backend and devices be tested without the boot layer.
#include <supermachine/backend/hypervisor_backend.hpp>
#include <supermachine/memory.hpp>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace supermachine::test {

inline constexpr std::uint64_t hand_code_address = 0x100000;

/// Write flat 64-bit GDT (code 0x10, data 0x18), an empty IDT, page tables
/// identity-mapping the first 1 GiB with 2 MiB pages, and `code` at 1 MiB.
inline backend::entry_state place_hand_guest(const guest_memory& memory,
                                             const std::vector<std::uint8_t>& code) {
    const std::uint64_t gdt[] = {0, 0, 0x00af9b000000ffffull, 0x00cf93000000ffffull};
    (void)memory.write(x86_layout::boot_gdt, std::as_bytes(std::span(gdt)));
    (void)memory.write_object<std::uint64_t>(x86_layout::pml4, x86_layout::pdpt | 3);
    (void)memory.write_object<std::uint64_t>(x86_layout::pdpt, x86_layout::pd | 3);
    for (std::uint64_t i = 0; i < 512; ++i)
        (void)memory.write_object<std::uint64_t>(x86_layout::pd + i * 8, (i << 21) | 0x83);
    (void)memory.write(hand_code_address, std::as_bytes(std::span(code)));
    backend::entry_state entry;
    entry.long_mode = true;
    entry.rip = hand_code_address;
    entry.rsp = x86_layout::boot_stack_pointer;
    entry.cr3 = x86_layout::pml4;
    entry.gdt_base = x86_layout::boot_gdt;
    entry.gdt_limit = sizeof gdt - 1;
    entry.idt_base = x86_layout::boot_idt;
    entry.idt_limit = 0; // any exception becomes a triple fault
    return entry;
}

/// Machine code: `out` of each byte of `text` to `port`.
inline std::vector<std::uint8_t> code_print(std::uint16_t port, std::string_view text) {
    std::vector<std::uint8_t> c = {0x66, 0xba, std::uint8_t(port),
                                   std::uint8_t(port >> 8)}; // mov dx, port
    for (char ch : text) {
        c.push_back(0xb0); // mov al, imm8
        c.push_back(static_cast<std::uint8_t>(ch));
        c.push_back(0xee); // out dx, al
    }
    return c;
}

/// Machine code: write `value` to 8-bit `port`.
inline std::vector<std::uint8_t> code_out(std::uint16_t port, std::uint8_t value) {
    return {0x66, 0xba, std::uint8_t(port), std::uint8_t(port >> 8), 0xb0, value, 0xee};
}

inline void append(std::vector<std::uint8_t>& to, const std::vector<std::uint8_t>& more) {
    to.insert(to.end(), more.begin(), more.end());
}

} // namespace supermachine::test
