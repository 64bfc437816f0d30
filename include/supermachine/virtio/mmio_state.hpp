#pragma once
// The virtio-mmio transport's register state as a plain struct, with a
// codec (encode to / decode from bytes) the snapshot layer saves and
// restores. decode() bounds every count and checks every field it can.
#include <supermachine/error.hpp>
#include <supermachine/virtio/detail/le_codec.hpp>
#include <supermachine/virtio/virtqueue.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace supermachine::virtio {

/// Most queues a transport carries (virtio-net multiqueue stays well below).
inline constexpr std::size_t max_queues = 64;

struct mmio_queue_state {
    std::uint32_t size = 0; // QueueNum as written
    bool ready = false;
    std::uint64_t descriptor_table = 0, available_ring = 0, used_ring = 0;
    queue_position position{};

    friend bool operator==(const mmio_queue_state&, const mmio_queue_state&) = default;
};

struct mmio_state {
    std::uint32_t status = 0;
    std::uint32_t device_features_select = 0;
    std::uint32_t driver_features_select = 0;
    std::uint64_t driver_features = 0;
    std::uint32_t queue_select = 0;
    std::uint32_t interrupt_status = 0;
    std::uint32_t config_generation = 0;
    std::uint32_t shared_memory_select = 0;
    std::vector<mmio_queue_state> queues;

    friend bool operator==(const mmio_state&, const mmio_state&) = default;
};

inline constexpr std::uint32_t mmio_state_magic = 0x6f696d76; // "vmio"
inline constexpr std::uint16_t mmio_state_version = 1;

inline std::vector<std::byte> encode(const mmio_state& s) {
    detail::le_writer w;
    w.put(mmio_state_magic);
    w.put(mmio_state_version);
    w.put(s.status);
    w.put(s.device_features_select);
    w.put(s.driver_features_select);
    w.put(s.driver_features);
    w.put(s.queue_select);
    w.put(s.interrupt_status);
    w.put(s.config_generation);
    w.put(s.shared_memory_select);
    w.put(static_cast<std::uint16_t>(s.queues.size()));
    for (const auto& q : s.queues) {
        w.put(q.size);
        w.put(static_cast<std::uint8_t>(q.ready));
        w.put(q.descriptor_table);
        w.put(q.available_ring);
        w.put(q.used_ring);
        w.put(q.position.next_available);
        w.put(q.position.next_used);
        w.put(q.position.signalled_used);
        w.put(static_cast<std::uint8_t>(q.position.signalled_valid));
    }
    return std::move(w).take();
}

inline result<mmio_state> decode_mmio_state(std::span<const std::byte> bytes) {
    detail::le_reader r(bytes);
    SUPERMACHINE_TRY(magic, r.get<std::uint32_t>());
    if (magic != mmio_state_magic) return errc::snapshot_bad_record;
    SUPERMACHINE_TRY(version, r.get<std::uint16_t>());
    if (version != mmio_state_version) return errc::snapshot_unsupported_version;
    mmio_state s;
    SUPERMACHINE_TRY(status, r.get<std::uint32_t>());
    SUPERMACHINE_TRY(dfs, r.get<std::uint32_t>());
    SUPERMACHINE_TRY(drfs, r.get<std::uint32_t>());
    SUPERMACHINE_TRY(features, r.get<std::uint64_t>());
    SUPERMACHINE_TRY(qsel, r.get<std::uint32_t>());
    SUPERMACHINE_TRY(isr, r.get<std::uint32_t>());
    SUPERMACHINE_TRY(generation, r.get<std::uint32_t>());
    SUPERMACHINE_TRY(shm, r.get<std::uint32_t>());
    SUPERMACHINE_TRY(count, r.get<std::uint16_t>());
    if (status > 0xff || isr > 3) return errc::snapshot_bad_record;
    if (count > max_queues) return errc::snapshot_too_large;
    s.status = status;
    s.device_features_select = dfs;
    s.driver_features_select = drfs;
    s.driver_features = features;
    s.queue_select = qsel;
    s.interrupt_status = isr;
    s.config_generation = generation;
    s.shared_memory_select = shm;
    s.queues.reserve(count);
    for (std::uint16_t i = 0; i < count; ++i) {
        mmio_queue_state q;
        SUPERMACHINE_TRY(size, r.get<std::uint32_t>());
        SUPERMACHINE_TRY(ready, r.get<std::uint8_t>());
        SUPERMACHINE_TRY(desc, r.get<std::uint64_t>());
        SUPERMACHINE_TRY(avail, r.get<std::uint64_t>());
        SUPERMACHINE_TRY(used, r.get<std::uint64_t>());
        SUPERMACHINE_TRY(next_available, r.get<std::uint16_t>());
        SUPERMACHINE_TRY(next_used, r.get<std::uint16_t>());
        SUPERMACHINE_TRY(signalled, r.get<std::uint16_t>());
        SUPERMACHINE_TRY(valid, r.get<std::uint8_t>());
        // QueueNum holds whatever the driver wrote; only a ready queue must be sane.
        if ((ready && size > max_queue_size) || ready > 1 || valid > 1)
            return errc::snapshot_bad_record;
        q.size = size;
        q.ready = ready != 0;
        q.descriptor_table = desc;
        q.available_ring = avail;
        q.used_ring = used;
        q.position = {next_available, next_used, signalled, valid != 0};
        s.queues.push_back(q);
    }
    if (r.remaining() != 0) return errc::snapshot_bad_record;
    return s;
}

} // namespace supermachine::virtio
