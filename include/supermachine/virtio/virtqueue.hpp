#pragma once
// A split virtqueue (virtio 1.2 section 2.7) over guest memory, seen from the
// device side: take available chains, return used ones, decide when to
// interrupt the driver and ask it (not) to kick us.
//
// Hostile-guest rules: the ring addresses are checked once, when the queue
// is made (inside guest RAM, aligned as the spec requires); every index read
// from the guest is copied out once and checked before use; an available
// index that jumps further than the queue size marks the queue broken
// (errc::device_broken, the device should signal DEVICE_NEEDS_RESET); a bad
// chain fails only its request (errc::descriptor_chain_malformed).
//
// Threading: one thread at a time uses a virtqueue (the device's executor).
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/virtio/descriptor_chain.hpp>
#include <supermachine/virtio/features.hpp>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>

namespace supermachine::virtio {

/// Where the driver put a queue, and how big it is.
struct queue_layout {
    std::uint32_t size = 0;             // power of two, 1..32768
    std::uint64_t descriptor_table = 0; // 16-byte aligned, 16 * size bytes
    std::uint64_t available_ring = 0;   // "driver area": 2-byte aligned, 6 + 2 * size bytes
    std::uint64_t used_ring = 0;        // "device area": 4-byte aligned, 6 + 8 * size bytes
};

/// The device-side indices: what a snapshot must keep to resume a queue.
struct queue_position {
    std::uint16_t next_available = 0; // next avail ring slot to take
    std::uint16_t next_used = 0;      // used idx we publish next
    std::uint16_t signalled_used = 0; // used idx at the last interrupt (event index)
    bool signalled_valid = false;     // false: interrupt on the next push regardless

    friend bool operator==(const queue_position&, const queue_position&) = default;
};

/// vring_need_event from the spec (2.7.7.2 / 2.7.10): true when `new_index`
/// has moved past `event` since `old_index`, with 16-bit wrap-around.
constexpr bool need_event(std::uint16_t event, std::uint16_t new_index,
                          std::uint16_t old_index) noexcept {
    return static_cast<std::uint16_t>(new_index - event - 1) <
           static_cast<std::uint16_t>(new_index - old_index);
}

namespace ring_flag {
inline constexpr std::uint16_t used_no_notify = 1;         // VRING_USED_F_NO_NOTIFY
inline constexpr std::uint16_t available_no_interrupt = 1; // VRING_AVAIL_F_NO_INTERRUPT
} // namespace ring_flag

class virtqueue {
public:
    static constexpr std::uint64_t descriptor_table_bytes(std::uint32_t size) noexcept {
        return std::uint64_t{16} * size;
    }
    static constexpr std::uint64_t available_ring_bytes(std::uint32_t size) noexcept {
        return 6 + std::uint64_t{2} * size; // flags, idx, ring[size], used_event
    }
    static constexpr std::uint64_t used_ring_bytes(std::uint32_t size) noexcept {
        return 6 + std::uint64_t{8} * size; // flags, idx, ring[size]{id, len}, avail_event
    }

    /// Check a layout against guest memory: what QueueReady must verify.
    static result<void> validate(const guest_memory& memory, const queue_layout& layout) noexcept {
        if (layout.size == 0 || layout.size > max_queue_size || !std::has_single_bit(layout.size))
            return errc::invalid_argument;
        if (layout.descriptor_table % 16 != 0 || layout.available_ring % 2 != 0 ||
            layout.used_ring % 4 != 0)
            return errc::invalid_argument;
        if (!memory.contains(layout.descriptor_table, descriptor_table_bytes(layout.size)) ||
            !memory.contains(layout.available_ring, available_ring_bytes(layout.size)) ||
            !memory.contains(layout.used_ring, used_ring_bytes(layout.size)))
            return errc::address_out_of_range;
        return success();
    }

    /// The used index the driver currently sees (for transports that learn a
    /// queue's position from the rings, e.g. vhost-user SET_VRING_BASE gives
    /// only the available side).
    static result<std::uint16_t> read_used_index(const guest_memory& memory,
                                                 const queue_layout& layout) noexcept {
        return memory.read_object<std::uint16_t>(layout.used_ring + 2);
    }

    /// A queue over `layout` with the negotiated `driver_features` (indirect
    /// descriptors and event index are honoured when negotiated).
    static result<virtqueue> create(const guest_memory& memory, const queue_layout& layout,
                                    std::uint64_t driver_features,
                                    queue_position position = {}) noexcept {
        SUPERMACHINE_TRY(validate(memory, layout));
        virtqueue q;
        q.memory_ = &memory;
        q.size_ = layout.size;
        q.descriptors_ =
            memory.span(layout.descriptor_table, descriptor_table_bytes(layout.size)).value();
        q.available_ =
            memory.span(layout.available_ring, available_ring_bytes(layout.size)).value();
        q.used_ = memory.span(layout.used_ring, used_ring_bytes(layout.size)).value();
        q.indirect_ = has_feature(driver_features, feature::indirect_descriptors);
        q.event_index_ = has_feature(driver_features, feature::event_index);
        q.position_ = position;
        q.layout_ = layout;
        return q;
    }

    std::uint32_t size() const noexcept { return size_; }
    const queue_layout& layout() const noexcept { return layout_; }
    queue_position position() const noexcept { return position_; }
    bool event_index() const noexcept { return event_index_; }
    /// After a broken ring every call fails with device_broken until reset.
    bool broken() const noexcept { return broken_; }

    /// One available entry: its head index, and its chain or why it is bad.
    /// A bad chain is still consumed: return it with push_used(head, 0).
    struct available_chain {
        std::uint16_t head;
        result<descriptor_chain> chain;
    };

    /// Take the next available chain, if any. errc::device_broken when the
    /// driver's available index is impossible.
    result<std::optional<available_chain>> pop() {
        if (broken_) return errc::device_broken;
        const std::uint16_t available_index = load16(available_, 2);
        const std::uint16_t pending = available_index - position_.next_available;
        if (pending == 0) return std::optional<available_chain>{};
        if (pending > size_) {
            broken_ = true;
            return errc::device_broken;
        }
        // The ring entry and descriptors were written before idx: read them after it.
        std::atomic_thread_fence(std::memory_order_acquire);
        const std::uint16_t head = load16(available_, 4 + 2 * (position_.next_available % size_));
        ++position_.next_available;
        return std::optional<available_chain>(
            available_chain{head, walk_chain(*memory_, descriptors_, size_, head, indirect_)});
    }

    /// How many chains the driver has made available and we have not taken.
    result<std::uint16_t> pending() noexcept {
        if (broken_) return errc::device_broken;
        const std::uint16_t n = load16(available_, 2) - position_.next_available;
        if (n > size_) {
            broken_ = true;
            return errc::device_broken;
        }
        return n;
    }

    /// Return chain `head` to the driver with `written` bytes written into
    /// its device-writable buffers.
    result<void> push_used(std::uint16_t head, std::uint32_t written) noexcept {
        if (broken_) return errc::device_broken;
        const std::size_t slot = 4 + 8 * std::size_t{position_.next_used % size_};
        const std::uint32_t id = head;
        std::memcpy(used_.data() + slot, &id, 4);
        std::memcpy(used_.data() + slot + 4, &written, 4);
        // The element must be visible before the index that publishes it.
        std::atomic_thread_fence(std::memory_order_release);
        ++position_.next_used;
        store16(used_, 2, position_.next_used);
        return success();
    }

    /// After pushing: must the driver be interrupted? Honours the driver's
    /// used_event (event index) or VRING_AVAIL_F_NO_INTERRUPT.
    bool should_notify() noexcept {
        // Our used idx store must be visible before we read the driver's wish.
        std::atomic_thread_fence(std::memory_order_seq_cst);
        const std::uint16_t old_used = position_.signalled_used;
        const bool valid = position_.signalled_valid;
        position_.signalled_used = position_.next_used;
        position_.signalled_valid = true;
        if (event_index_) {
            const std::uint16_t used_event = load16(available_, 4 + 2 * size_);
            return !valid || need_event(used_event, position_.next_used, old_used);
        }
        if (valid && old_used == position_.next_used) return false; // nothing new
        return (load16(available_, 0) & ring_flag::available_no_interrupt) == 0;
    }

    /// Ask the driver to kick us when it adds buffers. Returns true when
    /// buffers arrived meanwhile (process them: no kick will come for them).
    bool enable_notifications() noexcept {
        if (event_index_)
            store16(used_, 4 + 8 * size_, position_.next_available); // avail_event
        else
            store16(used_, 0, 0);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        return load16(available_, 2) != position_.next_available;
    }

    /// Ask the driver not to kick us (we are polling the ring anyway).
    void disable_notifications() noexcept {
        // With event index the driver compares against avail_event, which we
        // simply stop advancing; without it the flag says so.
        if (!event_index_) store16(used_, 0, ring_flag::used_no_notify);
    }

private:
    static std::uint16_t load16(std::span<const std::byte> s, std::size_t offset) noexcept {
        std::uint16_t v;
        std::memcpy(&v, s.data() + offset, 2);
        return v;
    }
    static void store16(std::span<std::byte> s, std::size_t offset, std::uint16_t v) noexcept {
        std::memcpy(s.data() + offset, &v, 2);
    }

    const guest_memory* memory_ = nullptr;
    std::uint32_t size_ = 0;
    std::span<std::byte> descriptors_, available_, used_;
    bool indirect_ = false, event_index_ = false, broken_ = false;
    queue_position position_{};
    queue_layout layout_{};
};

} // namespace supermachine::virtio
