#pragma once
// A tiny AML encoder (ACPI 6.x, chapter 20): just what our DSDT needs —
// Scope, Device, Name, integers, strings, EISA ids, packages and resource
// templates with IO, IRQNoFlags, Memory32Fixed and extended Interrupt.
// Each function returns the encoded bytes of one term.
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string_view>
#include <vector>

namespace supermachine::boot::detail::aml {

using bytes = std::vector<std::byte>;

inline void append(bytes& out, const bytes& more) {
    out.insert(out.end(), more.begin(), more.end());
}
inline void append_u8(bytes& out, std::uint8_t v) {
    out.push_back(static_cast<std::byte>(v));
}
inline void append_u16(bytes& out, std::uint16_t v) {
    append_u8(out, static_cast<std::uint8_t>(v));
    append_u8(out, static_cast<std::uint8_t>(v >> 8));
}
inline void append_u32(bytes& out, std::uint32_t v) {
    append_u16(out, static_cast<std::uint16_t>(v));
    append_u16(out, static_cast<std::uint16_t>(v >> 16));
}

/// PkgLength: counts itself. One byte up to 63, else a lead byte with the
/// low nibble plus 1-3 bytes. Lengths beyond 2^28 cannot be encoded; our
/// tables are far smaller (the caller bounds the device count).
inline bytes with_package_length(const bytes& body) {
    bytes out;
    const std::size_t n = body.size();
    if (n + 1 < 64) {
        append_u8(out, static_cast<std::uint8_t>(n + 1));
    } else {
        std::size_t extra = n + 2 < (1u << 12) ? 1 : n + 3 < (1u << 20) ? 2 : 3;
        const std::size_t total = n + 1 + extra;
        if (total >= (1u << 28)) throw std::length_error("AML package too long");
        append_u8(out, static_cast<std::uint8_t>((extra << 6) | (total & 0x0f)));
        for (std::size_t i = 0; i < extra; ++i)
            append_u8(out, static_cast<std::uint8_t>(total >> (4 + 8 * i)));
    }
    append(out, body);
    return out;
}

/// A NameString: optional root prefix '\' and one 4-character NameSeg
/// (shorter names are padded with '_').
inline bytes name_string(std::string_view name) {
    bytes out;
    if (!name.empty() && name.front() == '\\') {
        append_u8(out, '\\');
        name.remove_prefix(1);
    }
    if (name.empty() || name.size() > 4)
        throw std::invalid_argument("AML NameSeg must be 1-4 characters");
    for (std::size_t i = 0; i < 4; ++i)
        append_u8(out, static_cast<std::uint8_t>(i < name.size() ? name[i] : '_'));
    return out;
}

inline bytes integer(std::uint64_t v) {
    bytes out;
    if (v == 0)
        append_u8(out, 0x00);
    else if (v == 1)
        append_u8(out, 0x01);
    else if (v <= 0xff) {
        append_u8(out, 0x0a);
        append_u8(out, static_cast<std::uint8_t>(v));
    } else if (v <= 0xffff) {
        append_u8(out, 0x0b);
        append_u16(out, static_cast<std::uint16_t>(v));
    } else if (v <= 0xffff'ffff) {
        append_u8(out, 0x0c);
        append_u32(out, static_cast<std::uint32_t>(v));
    } else {
        append_u8(out, 0x0e);
        append_u32(out, static_cast<std::uint32_t>(v));
        append_u32(out, static_cast<std::uint32_t>(v >> 32));
    }
    return out;
}

inline bytes string(std::string_view text) {
    bytes out;
    append_u8(out, 0x0d);
    for (char c : text)
        append_u8(out, static_cast<std::uint8_t>(c));
    append_u8(out, 0x00);
    return out;
}

/// EisaId("PNP0501"): three letters in 5 bits each and four hex digits, stored big-endian.
inline bytes eisa_id(std::string_view id) {
    if (id.size() != 7) throw std::invalid_argument("EISA id must be 7 characters");
    auto hex = [](char c) -> std::uint32_t { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; };
    const std::uint32_t value = ((static_cast<std::uint32_t>(id[0]) & 0x1f) << 26) |
                                ((static_cast<std::uint32_t>(id[1]) & 0x1f) << 21) |
                                ((static_cast<std::uint32_t>(id[2]) & 0x1f) << 16) |
                                (hex(id[3]) << 12) | (hex(id[4]) << 8) | (hex(id[5]) << 4) |
                                hex(id[6]);
    bytes out;
    append_u8(out, 0x0c);
    for (int shift = 24; shift >= 0; shift -= 8)
        append_u8(out, static_cast<std::uint8_t>(value >> shift));
    return out;
}

inline bytes name(std::string_view path, const bytes& value) {
    bytes out;
    append_u8(out, 0x08);
    append(out, name_string(path));
    append(out, value);
    return out;
}

inline bytes scope(std::string_view path, const std::vector<bytes>& terms) {
    bytes body = name_string(path);
    for (const auto& t : terms)
        append(body, t);
    bytes out;
    append_u8(out, 0x10);
    append(out, with_package_length(body));
    return out;
}

inline bytes device(std::string_view path, const std::vector<bytes>& terms) {
    bytes body = name_string(path);
    for (const auto& t : terms)
        append(body, t);
    bytes out;
    append_u8(out, 0x5b);
    append_u8(out, 0x82);
    append(out, with_package_length(body));
    return out;
}

inline bytes package(const std::vector<bytes>& elements) {
    bytes body;
    append_u8(body, static_cast<std::uint8_t>(elements.size()));
    for (const auto& e : elements)
        append(body, e);
    bytes out;
    append_u8(out, 0x12);
    append(out, with_package_length(body));
    return out;
}

// --- resource descriptors (ACPI 6.4 §6.4) ---

inline bytes io_port(std::uint16_t base, std::uint8_t length) {
    bytes out;
    append_u8(out, 0x47); // small item 0x08, length 7
    append_u8(out, 0x01); // 16-bit decode
    append_u16(out, base);
    append_u16(out, base);
    append_u8(out, 0x01); // alignment
    append_u8(out, length);
    return out;
}

/// IRQNoFlags(){irq}: edge-triggered, active-high, exclusive ISA IRQ.
inline bytes irq_no_flags(std::uint8_t irq) {
    bytes out;
    append_u8(out, 0x22); // small item 0x04, length 2
    append_u16(out, static_cast<std::uint16_t>(1u << (irq & 15)));
    return out;
}

inline bytes memory32_fixed(bool writable, std::uint32_t base, std::uint32_t size) {
    bytes out;
    append_u8(out, 0x86);
    append_u16(out, 9);
    append_u8(out, writable ? 1 : 0);
    append_u32(out, base);
    append_u32(out, size);
    return out;
}

/// Interrupt(ResourceConsumer, edge ? Edge : Level, ActiveHigh, Exclusive){gsi}
inline bytes extended_interrupt(bool edge_triggered, std::uint32_t gsi) {
    bytes out;
    append_u8(out, 0x89);
    append_u16(out, 6);
    append_u8(out, static_cast<std::uint8_t>(0x01 /*consumer*/ | (edge_triggered ? 0x02 : 0x00)));
    append_u8(out, 1);
    append_u32(out, gsi);
    return out;
}

/// ResourceTemplate(){...}: a Buffer holding the descriptors and an end tag.
inline bytes resource_template(const std::vector<bytes>& descriptors) {
    bytes data;
    for (const auto& d : descriptors)
        append(data, d);
    append_u8(data, 0x79); // end tag
    append_u8(data, 0x00); // checksum 0: "treat as correct"
    bytes body = integer(data.size());
    append(body, data);
    bytes out;
    append_u8(out, 0x11);
    append(out, with_package_length(body));
    return out;
}

} // namespace supermachine::boot::detail::aml
