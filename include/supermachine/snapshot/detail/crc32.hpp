#pragma once
// CRC-32 (IEEE, as zlib's crc32): a table-driven constexpr form for
// constant evaluation, zlib's fast one at run time. Same values.
#include <zlib.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace supermachine::snapshot::detail {

inline constexpr std::array<std::uint32_t, 256> crc32_table = [] {
    std::array<std::uint32_t, 256> table{};
    for (std::uint32_t i = 0; i < 256; ++i) {
        std::uint32_t c = i;
        for (int k = 0; k < 8; ++k)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        table[i] = c;
    }
    return table;
}();

constexpr std::uint32_t crc32(std::span<const std::byte> data) noexcept {
    if (!std::is_constant_evaluated()) {
        // zlib takes a uInt length: feed large spans in pieces.
        uLong crc = ::crc32(0L, Z_NULL, 0);
        const auto* p = reinterpret_cast<const Bytef*>(data.data());
        std::size_t left = data.size();
        while (left > 0) {
            const auto n = static_cast<uInt>(left > (1u << 30) ? (1u << 30) : left);
            crc = ::crc32(crc, p, n);
            p += n;
            left -= n;
        }
        return static_cast<std::uint32_t>(crc);
    }
    std::uint32_t c = 0xffffffffu;
    for (std::byte b : data)
        c = crc32_table[(c ^ std::to_integer<std::uint8_t>(b)) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

} // namespace supermachine::snapshot::detail
