#pragma once
// One request on a split virtqueue: the descriptor chain the driver made
// available, walked once, copied out of guest memory and validated.
//
// The guest owns the descriptor table and may rewrite it while we look, so
// the walker reads each descriptor exactly once into a local copy and
// checks the copy: every (address, length) inside guest RAM (overflow-safe,
// through guest_memory::span), chain length bounded by the table size so a
// loop ends, indirect tables bounded and not nested, and no device-readable
// descriptor after a device-writable one (virtio 1.2 2.7.4.2). A chain that
// fails any check is rejected as a whole with errc::descriptor_chain_malformed;
// nothing of it is used.
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <boost/container/small_vector.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace supermachine::virtio {

static_assert(std::endian::native == std::endian::little,
              "virtio 1.x rings are little-endian; this code copies them as host integers");

/// The largest split queue the spec allows (Queue Size is a power of two <= 32768).
inline constexpr std::uint32_t max_queue_size = 32768;
/// The largest indirect table we walk, in descriptors. The spec bounds a
/// chain by the queue size, but Linux sizes indirect tables by the request's
/// segment count; 32768 keeps both legal and bounds the copy to 512 KiB.
inline constexpr std::uint32_t max_indirect_descriptors = 32768;

/// struct virtq_desc, as laid out in guest memory.
struct raw_descriptor {
    std::uint64_t address;
    std::uint32_t length;
    std::uint16_t flags;
    std::uint16_t next;
};
static_assert(sizeof(raw_descriptor) == 16);

namespace descriptor_flag {
inline constexpr std::uint16_t next = 1;
inline constexpr std::uint16_t write = 2; // device-writable
inline constexpr std::uint16_t indirect = 4;
} // namespace descriptor_flag

/// One validated buffer of a chain. `host` is the host view of
/// [address, address + length) in guest RAM; its bytes stay guest-mutable.
struct segment {
    std::uint64_t address = 0;
    std::uint32_t length = 0;
    bool device_writable = false;
    std::span<std::byte> host;
};

/// A validated chain: device-readable segments first, then device-writable.
class descriptor_chain {
public:
    using segment_list = boost::container::small_vector<segment, 8>;

    descriptor_chain() = default;
    descriptor_chain(std::uint16_t head, segment_list segments, std::size_t readable_count)
        : head_(head)
        , segments_(std::move(segments))
        , readable_count_(readable_count) {}

    /// The head descriptor index: the id to return in the used ring.
    std::uint16_t head() const noexcept { return head_; }
    std::span<const segment> segments() const noexcept {
        return {segments_.data(), segments_.size()};
    }
    /// Driver -> device buffers (request data).
    std::span<const segment> readable() const noexcept { return segments().first(readable_count_); }
    /// Device -> driver buffers (responses). Never read as request data.
    std::span<const segment> writable() const noexcept {
        return segments().subspan(readable_count_);
    }
    std::uint64_t readable_bytes() const noexcept { return total(readable()); }
    std::uint64_t writable_bytes() const noexcept { return total(writable()); }

private:
    static std::uint64_t total(std::span<const segment> s) noexcept {
        std::uint64_t n = 0;
        for (const auto& x : s)
            n += x.length;
        return n;
    }
    std::uint16_t head_ = 0;
    segment_list segments_;
    std::size_t readable_count_ = 0;
};

/// Reads the device-readable part of a chain as one byte stream.
class chain_reader {
public:
    explicit chain_reader(std::span<const segment> readable) noexcept
        : segments_(readable) {
        for (const auto& s : segments_)
            remaining_ += s.length;
    }
    std::uint64_t remaining() const noexcept { return remaining_; }

    /// Copy exactly out.size() bytes, or fail with descriptor_chain_malformed
    /// (the driver described a shorter request than its header claims).
    result<void> read(std::span<std::byte> out) noexcept {
        if (out.size() > remaining_) return errc::descriptor_chain_malformed;
        consume(out.size(), [&](std::span<const std::byte> src, std::size_t done) {
            std::memcpy(out.data() + done, src.data(), src.size());
        });
        return success();
    }
    template <class T>
    result<T> read_object() noexcept {
        static_assert(std::is_trivially_copyable_v<T>);
        T value;
        SUPERMACHINE_TRY(read(std::as_writable_bytes(std::span(&value, 1))));
        return value;
    }
    result<void> skip(std::uint64_t n) noexcept {
        if (n > remaining_) return errc::descriptor_chain_malformed;
        consume(n, [](std::span<const std::byte>, std::size_t) {});
        return success();
    }
    /// Hand the next up-to-`limit` contiguous bytes to the caller (zero copy).
    std::span<const std::byte> next_contiguous(std::uint64_t limit) noexcept {
        while (index_ < segments_.size() && offset_ == segments_[index_].length) {
            ++index_;
            offset_ = 0;
        }
        if (index_ == segments_.size() || limit == 0) return {};
        const auto& s = segments_[index_];
        const std::uint64_t n = std::min<std::uint64_t>(limit, s.length - offset_);
        std::span<const std::byte> out = s.host.subspan(offset_, n);
        offset_ += static_cast<std::uint32_t>(n);
        remaining_ -= n;
        return out;
    }

private:
    template <class F>
    void consume(std::uint64_t n, F&& f) {
        std::size_t done = 0;
        while (n > 0) {
            auto chunk = next_contiguous(n);
            f(chunk, done);
            done += chunk.size();
            n -= chunk.size();
        }
    }
    std::span<const segment> segments_;
    std::size_t index_ = 0;
    std::uint32_t offset_ = 0;
    std::uint64_t remaining_ = 0;
};

/// Writes the device-writable part of a chain as one byte stream and counts
/// the bytes written (the used-ring length).
class chain_writer {
public:
    explicit chain_writer(std::span<const segment> writable) noexcept
        : segments_(writable) {
        for (const auto& s : segments_)
            remaining_ += s.length;
    }
    std::uint64_t remaining() const noexcept { return remaining_; }
    std::uint64_t written() const noexcept { return written_; }

    result<void> write(std::span<const std::byte> in) noexcept {
        if (in.size() > remaining_) return errc::descriptor_chain_malformed;
        std::size_t done = 0;
        while (done < in.size()) {
            auto chunk = next_contiguous(in.size() - done);
            std::memcpy(chunk.data(), in.data() + done, chunk.size());
            done += chunk.size();
        }
        return success();
    }
    template <class T>
    result<void> write_object(const T& value) noexcept {
        return write(std::as_bytes(std::span(&value, 1)));
    }
    /// The next up-to-`limit` contiguous writable bytes (zero copy); counted
    /// as written.
    std::span<std::byte> next_contiguous(std::uint64_t limit) noexcept {
        while (index_ < segments_.size() && offset_ == segments_[index_].length) {
            ++index_;
            offset_ = 0;
        }
        if (index_ == segments_.size() || limit == 0) return {};
        const auto& s = segments_[index_];
        const std::uint64_t n = std::min<std::uint64_t>(limit, s.length - offset_);
        std::span<std::byte> out = s.host.subspan(offset_, n);
        offset_ += static_cast<std::uint32_t>(n);
        remaining_ -= n;
        written_ += n;
        return out;
    }

private:
    std::span<const segment> segments_;
    std::size_t index_ = 0;
    std::uint32_t offset_ = 0;
    std::uint64_t remaining_ = 0;
    std::uint64_t written_ = 0;
};

namespace detail {
struct chain_builder {
    const guest_memory& memory;
    descriptor_chain::segment_list segments{};
    std::size_t readable = 0;
    bool seen_writable = false;

    result<void> add(const raw_descriptor& d) {
        const bool writable = (d.flags & descriptor_flag::write) != 0;
        if (!writable && seen_writable) return errc::descriptor_chain_malformed;
        seen_writable = seen_writable || writable;
        if (d.length == 0) return success(); // carries nothing; its address is never used
        if (auto host = memory.span(d.address, d.length)) {
            push(d.address, d.length, writable, host.value());
            return success();
        }
        // A buffer may cross from one memory region into a guest-physically
        // adjacent one (vhost-user hands us RAM in several regions): one
        // segment per region, each bounds-checked on its own.
        std::uint64_t address = d.address, left = d.length;
        while (left > 0) {
            const memory_region* region = nullptr;
            for (const auto& r : memory.regions())
                if (address >= r.guest_base && address - r.guest_base < r.size()) region = &r;
            if (!region) return errc::descriptor_chain_malformed;
            const std::uint64_t n = std::min(left, region->guest_end() - address);
            auto host = memory.span(address, n);
            if (!host) return errc::descriptor_chain_malformed;
            push(address, static_cast<std::uint32_t>(n), writable, host.value());
            address += n;
            left -= n;
        }
        return success();
    }

    void push(std::uint64_t address, std::uint32_t length, bool writable,
              std::span<std::byte> host) {
        segments.push_back({address, length, writable, host});
        if (!writable) ++readable;
    }
};

inline raw_descriptor copy_descriptor(std::span<const std::byte> table, std::uint32_t index) {
    raw_descriptor d;
    std::memcpy(&d, table.data() + std::size_t{index} * sizeof(raw_descriptor), sizeof d);
    return d;
}
} // namespace detail

/// Walk the chain starting at `head` in the descriptor table `table` (the
/// host view of a queue_size-entry table, already bounds-checked). Each
/// descriptor is read once. `indirect_allowed`: VIRTIO_F_INDIRECT_DESC was
/// negotiated.
inline result<descriptor_chain> walk_chain(const guest_memory& memory,
                                           std::span<const std::byte> table,
                                           std::uint32_t queue_size, std::uint16_t head,
                                           bool indirect_allowed) {
    if (queue_size == 0 || queue_size > max_queue_size ||
        table.size() < std::size_t{queue_size} * sizeof(raw_descriptor))
        return errc::invalid_argument;
    if (head >= queue_size) return errc::descriptor_chain_malformed;
    detail::chain_builder builder{memory};
    std::uint32_t index = head;
    for (std::uint32_t walked = 0;; ++walked) {
        if (walked == queue_size) return errc::descriptor_chain_malformed; // a loop
        const raw_descriptor d = detail::copy_descriptor(table, index);
        if (d.flags & descriptor_flag::indirect) {
            // 2.7.5.3.1: only with the feature, never combined with NEXT; the
            // table is a whole number of descriptors. Its WRITE flag is ignored.
            if (!indirect_allowed || (d.flags & descriptor_flag::next) || d.length == 0 ||
                d.length % sizeof(raw_descriptor) != 0 ||
                d.length / sizeof(raw_descriptor) > max_indirect_descriptors)
                return errc::descriptor_chain_malformed;
            auto indirect = memory.span(d.address, d.length);
            if (!indirect) return errc::descriptor_chain_malformed;
            const std::uint32_t count = d.length / sizeof(raw_descriptor);
            std::uint32_t i = 0;
            for (std::uint32_t n = 0;; ++n) {
                if (n == count) return errc::descriptor_chain_malformed; // a loop
                const raw_descriptor e = detail::copy_descriptor(indirect.value(), i);
                if (e.flags & descriptor_flag::indirect) return errc::descriptor_chain_malformed;
                SUPERMACHINE_TRY(builder.add(e));
                if (!(e.flags & descriptor_flag::next)) break;
                if (e.next >= count) return errc::descriptor_chain_malformed;
                i = e.next;
            }
            break; // an indirect descriptor ends the chain (no NEXT)
        }
        SUPERMACHINE_TRY(builder.add(d));
        if (!(d.flags & descriptor_flag::next)) break;
        if (d.next >= queue_size) return errc::descriptor_chain_malformed;
        index = d.next;
    }
    return descriptor_chain(head, std::move(builder.segments), builder.readable);
}

} // namespace supermachine::virtio
