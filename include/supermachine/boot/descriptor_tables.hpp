#pragma once
// The boot GDT and IDT. One GDT serves both entry modes:
//   0x00 null, 0x08 flat 32-bit code (PVH entry), 0x10 flat 64-bit code
//   (__BOOT_CS), 0x18 flat data (__BOOT_DS).
// It is exactly 4 entries so it ends where the IDT begins (0x500 + 32 = 0x520).
// The IDT is one zero entry: no exceptions are expected before the kernel
// installs its own; a fault then triple-faults, which the VMM reports.
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <array>
#include <cstdint>

namespace supermachine::boot {

inline constexpr std::uint16_t code32_selector = 0x08;
inline constexpr std::uint16_t code64_selector = 0x10;
inline constexpr std::uint16_t data_selector = 0x18;

/// A segment descriptor from access/flags (bits 0-7 access byte, 12-15 flags
/// nibble: G, D/B, L, AVL), base and 20-bit limit.
constexpr std::uint64_t segment_descriptor(std::uint16_t flags, std::uint32_t base,
                                           std::uint32_t limit) noexcept {
    return ((std::uint64_t{base} & 0xff00'0000u) << 32) | ((std::uint64_t{flags} & 0xf0ffu) << 40) |
           ((std::uint64_t{limit} & 0x000f'0000u) << 32) |
           ((std::uint64_t{base} & 0x00ff'ffffu) << 16) | (std::uint64_t{limit} & 0xffffu);
}

inline constexpr std::array<std::uint64_t, 4> boot_gdt_entries{
    0, segment_descriptor(0xc09b, 0, 0xfffff), // code, 32-bit (D=1), 4 KiB granularity
    segment_descriptor(0xa09b, 0, 0xfffff),    // code, 64-bit (L=1)
    segment_descriptor(0xc093, 0, 0xfffff),    // data, read/write
};
static_assert(x86_layout::boot_gdt + sizeof(boot_gdt_entries) <= x86_layout::boot_idt);

/// A GDT entry decoded into what a VMM loads into a segment register's hidden
/// part (KVM's struct kvm_segment): limit in bytes (granularity applied).
struct segment_register {
    std::uint64_t base;
    std::uint32_t limit;
    std::uint16_t selector;
    std::uint8_t type, present, dpl, db, s, l, g, avl;
};

constexpr segment_register decode_segment(std::uint16_t selector,
                                          std::uint64_t descriptor) noexcept {
    const auto bit = [&](int n) { return static_cast<std::uint8_t>((descriptor >> n) & 1); };
    const std::uint32_t raw_limit =
        static_cast<std::uint32_t>((descriptor & 0xffff) | ((descriptor >> 32) & 0xf0000));
    const std::uint8_t g = bit(55);
    return {((descriptor >> 16) & 0xffffff) | (((descriptor >> 56) & 0xff) << 24),
            g ? (raw_limit << 12) | 0xfff : raw_limit,
            selector,
            static_cast<std::uint8_t>((descriptor >> 40) & 0xf),
            bit(47),
            static_cast<std::uint8_t>((descriptor >> 45) & 3),
            bit(54),
            bit(44),
            bit(53),
            g,
            bit(52)};
}

/// The boot GDT's segment for `selector` (0x08, 0x10 or 0x18).
constexpr segment_register boot_segment(std::uint16_t selector) noexcept {
    return decode_segment(selector, boot_gdt_entries[(selector >> 3) & 3]);
}

static_assert(boot_segment(code64_selector).l == 1 && boot_segment(code64_selector).db == 0);
static_assert(boot_segment(code32_selector).l == 0 && boot_segment(code32_selector).db == 1);
static_assert(boot_segment(data_selector).type == 3 &&
              boot_segment(data_selector).limit == 0xffffffffu);
static_assert(boot_segment(code64_selector).type == 0xb &&
              boot_segment(code64_selector).present == 1);

struct descriptor_tables {
    std::uint64_t gdt_base;
    std::uint16_t gdt_limit;
    std::uint64_t idt_base;
    std::uint16_t idt_limit;
};

inline result<descriptor_tables> write_descriptor_tables(const guest_memory& memory) {
    SUPERMACHINE_TRY(memory.write_object(x86_layout::boot_gdt, boot_gdt_entries));
    SUPERMACHINE_TRY(memory.write_object(x86_layout::boot_idt, std::uint64_t{0}));
    return descriptor_tables{
        x86_layout::boot_gdt, static_cast<std::uint16_t>(sizeof(boot_gdt_entries) - 1),
        x86_layout::boot_idt, static_cast<std::uint16_t>(sizeof(std::uint64_t) - 1)};
}

} // namespace supermachine::boot
