#pragma once
// A 64-bit guest with no loader, for the state tests: flat GDT, identity page
// tables over the first 1 GiB (2 MiB pages), code at 1 MiB, entry state by
// hand. (Like test/kvm's helper, kept here so the two areas change apart.)
#include <supermachine/backend/hypervisor_backend.hpp>
#include <supermachine/memory.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace supermachine::test {

inline constexpr std::uint64_t state_test_code_address = 0x100000;

inline backend::entry_state place_flat_guest(const guest_memory& memory,
                                             const std::vector<std::uint8_t>& code) {
    const std::uint64_t gdt[] = {0, 0, 0x00af9b000000ffffull, 0x00cf93000000ffffull};
    value_or_throw(memory.write(x86_layout::boot_gdt, std::as_bytes(std::span(gdt))));
    value_or_throw(memory.write_object<std::uint64_t>(x86_layout::pml4, x86_layout::pdpt | 3));
    value_or_throw(memory.write_object<std::uint64_t>(x86_layout::pdpt, x86_layout::pd | 3));
    for (std::uint64_t i = 0; i < 512; ++i)
        value_or_throw(
            memory.write_object<std::uint64_t>(x86_layout::pd + i * 8, (i << 21) | 0x83));
    value_or_throw(memory.write(state_test_code_address, std::as_bytes(std::span(code))));
    backend::entry_state entry;
    entry.long_mode = true;
    entry.rip = state_test_code_address;
    entry.rsp = x86_layout::boot_stack_pointer;
    entry.cr3 = x86_layout::pml4;
    entry.gdt_base = x86_layout::boot_gdt;
    entry.gdt_limit = sizeof gdt - 1;
    entry.idt_base = x86_layout::boot_idt;
    entry.idt_limit = 0; // any exception is a triple fault
    return entry;
}

} // namespace supermachine::test
