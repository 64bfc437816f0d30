#pragma once
// Minimal little-endian writer/reader for device state records. The reader
// is bounds-checked: snapshot files are hostile input.
#include <supermachine/error.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace supermachine::virtio::detail {

class le_writer {
public:
    template <class T>
    void put(T value) {
        static_assert(std::is_integral_v<T>);
        for (std::size_t i = 0; i < sizeof(T); ++i)
            bytes_.push_back(static_cast<std::byte>(static_cast<std::uint64_t>(value) >> (8 * i)));
    }
    void put_bytes(std::span<const std::byte> b) {
        bytes_.insert(bytes_.end(), b.begin(), b.end());
    }
    std::vector<std::byte> take() && { return std::move(bytes_); }

private:
    std::vector<std::byte> bytes_;
};

class le_reader {
public:
    explicit le_reader(std::span<const std::byte> bytes) noexcept
        : bytes_(bytes) {}
    template <class T>
    result<T> get() noexcept {
        static_assert(std::is_integral_v<T>);
        if (bytes_.size() - offset_ < sizeof(T)) return errc::snapshot_truncated;
        std::uint64_t v = 0;
        for (std::size_t i = 0; i < sizeof(T); ++i)
            v |= static_cast<std::uint64_t>(bytes_[offset_ + i]) << (8 * i);
        offset_ += sizeof(T);
        return static_cast<T>(v);
    }
    result<std::span<const std::byte>> get_bytes(std::size_t n) noexcept {
        if (bytes_.size() - offset_ < n) return errc::snapshot_truncated;
        auto out = bytes_.subspan(offset_, n);
        offset_ += n;
        return out;
    }
    std::size_t remaining() const noexcept { return bytes_.size() - offset_; }

private:
    std::span<const std::byte> bytes_;
    std::size_t offset_ = 0;
};

} // namespace supermachine::virtio::detail
