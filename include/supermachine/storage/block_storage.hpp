#pragma once
// The block-storage policy concept: what a virtio-blk device (or anything
// else needing a disk) is parameterised on, chosen at compile time.
//
// A type S is block storage when it provides:
//   using config = ...;
//   static result<std::unique_ptr<S>> open(const config&);
//   std::uint64_t size() const;          // bytes; fixed after open
//   bool is_read_only() const;
//   result<void> read(std::uint64_t offset, std::span<std::byte> out);
//   result<void> write(std::uint64_t offset, std::span<const std::byte> in);
//   result<void> flush();                // completed writes are durable
// and may provide (detected by the device):
//   result<void> discard(std::uint64_t offset, std::uint64_t length);
//   result<void> write_zeroes(std::uint64_t offset, std::uint64_t length);
//   std::string id() const;              // serial for VIRTIO_BLK_T_GET_ID
//   result<void> read_vectored(std::uint64_t offset, std::span<::iovec>);   // preadv
//   result<void> write_vectored(std::uint64_t offset, std::span<::iovec>);  // pwritev
//     (the iovecs may be consumed; their total length is range-checked)
//   std::vector<std::byte> save_state() const; result<void> restore_state(span)
//
// Contract: read/write/flush/discard are called concurrently from I/O
// threads; a range not inside [0, size()) fails with
// errc::sector_out_of_range (overflow-safe) and touches nothing; a write to
// read-only storage fails with errc::device_read_only. Buffers may be guest
// memory: implementations copy, never keep pointers.
#include <supermachine/error.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <sys/uio.h>

namespace supermachine::storage {

template <class S>
concept block_storage = requires(S& s, const S& cs, std::uint64_t offset, std::span<std::byte> out,
                                 std::span<const std::byte> in, const typename S::config& cfg) {
    { S::open(cfg) } -> std::same_as<result<std::unique_ptr<S>>>;
    { cs.size() } -> std::convertible_to<std::uint64_t>;
    { cs.is_read_only() } -> std::convertible_to<bool>;
    { s.read(offset, out) } -> std::same_as<result<void>>;
    { s.write(offset, in) } -> std::same_as<result<void>>;
    { s.flush() } -> std::same_as<result<void>>;
};

template <class S>
concept discards = requires(S& s, std::uint64_t offset, std::uint64_t length) {
    { s.discard(offset, length) } -> std::same_as<result<void>>;
};

template <class S>
concept writes_zeroes = requires(S& s, std::uint64_t offset, std::uint64_t length) {
    { s.write_zeroes(offset, length) } -> std::same_as<result<void>>;
};

template <class S>
concept has_id = requires(const S& s) {
    { s.id() } -> std::convertible_to<std::string>;
};

template <class S>
concept saves_state = requires(const S& cs, S& s, std::span<const std::byte> bytes) {
    { cs.save_state() } -> std::convertible_to<std::vector<std::byte>>;
    { s.restore_state(bytes) } -> std::same_as<result<void>>;
};

template <class S>
concept vectored = requires(S& s, std::uint64_t offset, std::span<::iovec> iov) {
    { s.read_vectored(offset, iov) } -> std::same_as<result<void>>;
    { s.write_vectored(offset, iov) } -> std::same_as<result<void>>;
};

inline std::uint64_t total_length(std::span<const ::iovec> iov) noexcept {
    std::uint64_t n = 0;
    for (const auto& v : iov)
        n += v.iov_len;
    return n;
}

/// [offset, offset + length) inside [0, size)? Overflow-safe.
constexpr bool in_range(std::uint64_t offset, std::uint64_t length, std::uint64_t size) noexcept {
    return offset <= size && length <= size - offset;
}

} // namespace supermachine::storage
