#pragma once
// A started virtqueue as the vhost-user backend hands it to a device core:
// the split ring's guest-physical addresses (translated from the front-end's
// user addresses and checked to lie inside guest memory), its size, the
// device's position in it, and the interrupt line (the call eventfd).
//
// The ring contents stay guest-controlled: a device reads them through
// `memory`, copying each structure out once and validating the copy.
#include <supermachine/device.hpp>
#include <supermachine/memory.hpp>

#include <cstdint>

namespace supermachine::vhost_user {

struct vring {
    const guest_memory* memory = nullptr;
    std::uint32_t index = 0;
    std::uint16_t size = 0;       // power of two, <= the device's max_queue_size
    std::uint64_t descriptor = 0; // guest-physical addresses
    std::uint64_t available = 0;
    std::uint64_t used = 0;
    std::uint16_t next_available =
        0; // the device's next avail->ring slot (GET_VRING_BASE reports it)
    std::uint16_t next_used = 0;
    std::uint64_t features = 0; // virtio features the driver acked
    interrupt_line call;        // raise after publishing used entries

    static constexpr std::uint64_t descriptor_table_bytes(std::uint16_t n) noexcept {
        return 16ull * n;
    }
    static constexpr std::uint64_t available_ring_bytes(std::uint16_t n) noexcept {
        return 6ull + 2ull * n;
    }
    static constexpr std::uint64_t used_ring_bytes(std::uint16_t n) noexcept {
        return 6ull + 8ull * n;
    }
};

} // namespace supermachine::vhost_user
