#pragma once
// Little-endian loads and stores at byte offsets, alignment-safe. Callers
// bound the offset first; these functions assume [offset, offset+sizeof(T))
// is inside the span.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace supermachine::boot::detail {

template <class T>
T load_le(std::span<const std::byte> bytes, std::size_t offset) noexcept {
    static_assert(std::is_integral_v<T>);
    T value{};
    std::memcpy(&value, bytes.data() + offset, sizeof(T)); // x86-64 host: already little-endian
    return value;
}

template <class T>
void store_le(std::span<std::byte> bytes, std::size_t offset, T value) noexcept {
    static_assert(std::is_integral_v<T>);
    std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

/// Appends little-endian values to a growing byte vector (table builders).
class byte_writer {
public:
    std::vector<std::byte>& bytes() noexcept { return bytes_; }
    std::size_t size() const noexcept { return bytes_.size(); }

    template <class T>
    void put(T value) {
        static_assert(std::is_integral_v<T>);
        const auto at = bytes_.size();
        bytes_.resize(at + sizeof(T));
        std::memcpy(bytes_.data() + at, &value, sizeof(T));
    }
    void put_bytes(std::span<const std::byte> data) {
        bytes_.insert(bytes_.end(), data.begin(), data.end());
    }
    /// Exactly `width` bytes of `text`, space- or zero-padded.
    void put_text(std::string_view text, std::size_t width, char pad = ' ') {
        for (std::size_t i = 0; i < width; ++i)
            bytes_.push_back(static_cast<std::byte>(i < text.size() ? text[i] : pad));
    }
    void put_zeros(std::size_t count) { bytes_.insert(bytes_.end(), count, std::byte{0}); }

    template <class T>
    void patch(std::size_t offset, T value) noexcept {
        std::memcpy(bytes_.data() + offset, &value, sizeof(T));
    }

private:
    std::vector<std::byte> bytes_;
};

/// The byte that makes the sum of `bytes` zero modulo 256 (ACPI checksums).
inline std::uint8_t checksum_complement(std::span<const std::byte> bytes) noexcept {
    std::uint8_t sum = 0;
    for (auto b : bytes)
        sum = static_cast<std::uint8_t>(sum + static_cast<std::uint8_t>(b));
    return static_cast<std::uint8_t>(0u - sum);
}

constexpr std::uint64_t align_up(std::uint64_t value, std::uint64_t alignment) noexcept {
    return (value + alignment - 1) & ~(alignment - 1);
}
constexpr std::uint64_t align_down(std::uint64_t value, std::uint64_t alignment) noexcept {
    return value & ~(alignment - 1);
}

} // namespace supermachine::boot::detail
