#pragma once
// Small device cores for the vhost-user tests and the engine benchmark,
// written against vhost_user::device_core until the virtio layer's
// transport-neutral cores are merged: a split-ring walker (no indirect
// descriptors, no EVENT_IDX — neither is offered), a block device over a
// file descriptor and an entropy device. Hostile-guest safe: every ring
// structure is copied out of guest memory once and checked.
#include <supermachine/vhost_user/backend.hpp>

#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

namespace supermachine::test {

inline constexpr std::uint64_t virtio_f_version_1 = std::uint64_t{1} << 32;

struct descriptor_segment {
    std::uint64_t address;
    std::uint32_t length;
    bool device_writable;
};

inline constexpr std::uint64_t virtio_ring_f_indirect_desc = std::uint64_t{1} << 28;
inline constexpr std::uint64_t virtio_ring_f_event_idx = std::uint64_t{1} << 29;
/// Ring features the helpers below implement (QEMU's vhost-user-rng acks them
/// whether or not the back-end offers them, so a device core must offer them).
inline constexpr std::uint64_t ring_features =
    virtio_ring_f_indirect_desc | virtio_ring_f_event_idx;

struct raw_descriptor {
    std::uint64_t address;
    std::uint32_t length;
    std::uint16_t flags;
    std::uint16_t next;
};

/// Pop the next available chain; nullopt when none. An error means the
/// driver broke the ring (the caller stops serving it).
inline result<std::optional<std::pair<std::uint16_t, std::vector<descriptor_segment>>>>
pop_chain(vhost_user::vring& ring) {
    const auto& memory = *ring.memory;
    SUPERMACHINE_TRY(available_index, memory.read_object<std::uint16_t>(ring.available + 2));
    std::atomic_thread_fence(std::memory_order_acquire);
    if (available_index == ring.next_available) return std::nullopt;
    if (static_cast<std::uint16_t>(available_index - ring.next_available) > ring.size)
        return errc::descriptor_chain_malformed;
    SUPERMACHINE_TRY(head, memory.read_object<std::uint16_t>(
                               ring.available + 4 + 2u * (ring.next_available % ring.size)));
    ++ring.next_available;
    if (head >= ring.size) return errc::descriptor_chain_malformed;
    std::vector<descriptor_segment> chain;
    // The table being walked: the ring's own, or one indirect table (no nesting).
    std::uint64_t table = ring.descriptor;
    std::uint32_t table_size = ring.size;
    bool indirect = false;
    std::uint16_t index = head;
    std::uint32_t walked = 0; // descriptors read from the current table
    for (;;) {
        if (walked++ >= table_size) return errc::descriptor_chain_malformed; // a loop
        SUPERMACHINE_TRY(d, memory.read_object<raw_descriptor>(table + 16u * index));
        if (d.flags & 4) {
            if (indirect || !(ring.features & virtio_ring_f_indirect_desc) || (d.flags & 1) ||
                d.length == 0 || d.length % 16 || d.length / 16 > 1024)
                return errc::descriptor_chain_malformed;
            table = d.address;
            table_size = d.length / 16;
            indirect = true;
            index = 0;
            walked = 0;
            continue;
        }
        chain.push_back({d.address, d.length, (d.flags & 2) != 0});
        if (!(d.flags & 1)) break;
        if (d.next >= table_size) return errc::descriptor_chain_malformed;
        index = d.next;
    }
    return std::optional{std::pair{head, std::move(chain)}};
}

inline result<void> push_used(vhost_user::vring& ring, std::uint16_t head, std::uint32_t written) {
    const auto& memory = *ring.memory;
    const std::uint64_t slot = ring.used + 4 + 8u * (ring.next_used % ring.size);
    SUPERMACHINE_TRY(memory.write_object<std::uint32_t>(slot, head));
    SUPERMACHINE_TRY(memory.write_object<std::uint32_t>(slot + 4, written));
    std::atomic_thread_fence(std::memory_order_release);
    ++ring.next_used;
    SUPERMACHINE_TRY(memory.write_object<std::uint16_t>(ring.used + 2, ring.next_used));
    return success();
}

/// EVENT_IDX: tell the driver to kick for anything after what we consumed,
/// then look again — a buffer made available before the driver saw the new
/// avail_event would otherwise wait for a kick that never comes. Returns
/// true when more buffers arrived meanwhile (process again).
inline bool publish_avail_event(vhost_user::vring& ring) {
    if (!(ring.features & virtio_ring_f_event_idx)) return false;
    const auto& memory = *ring.memory;
    (void)memory.write_object<std::uint16_t>(ring.used + 4 + 8u * ring.size, ring.next_available);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    auto available_index = memory.read_object<std::uint16_t>(ring.available + 2);
    return available_index && available_index.value() != ring.next_available;
}

/// After a batch: raise the interrupt if the driver wants one for the used
/// entries from `used_before` on (always, without EVENT_IDX).
inline void notify_if_wanted(vhost_user::vring& ring, std::uint16_t used_before) {
    if (ring.next_used == used_before) return;
    if (!(ring.features & virtio_ring_f_event_idx)) {
        ring.call.trigger();
        return;
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
    auto used_event = ring.memory->read_object<std::uint16_t>(ring.available + 4 + 2u * ring.size);
    if (!used_event) return;
    const std::uint16_t new_used = ring.next_used;
    if (static_cast<std::uint16_t>(new_used - used_event.value() - 1) <
        static_cast<std::uint16_t>(new_used - used_before))
        ring.call.trigger();
}

/// virtio-blk over a file descriptor (raw image). One request queue.
class test_blk {
public:
    explicit test_blk(int fd, std::uint64_t bytes, bool read_only = false)
        : fd_(fd)
        , sectors_(bytes / 512)
        , read_only_(read_only) {}

    std::uint64_t features() const noexcept {
        return virtio_f_version_1 | ring_features | (1u << 9) /*FLUSH*/ |
               (read_only_ ? (1u << 5) : 0u);
    }
    std::uint32_t queue_count() const noexcept { return 1; }
    std::uint16_t max_queue_size() const noexcept { return 1024; } // QEMU asks for 1024
    void read_config(std::uint32_t offset, std::span<std::byte> out) const noexcept {
        std::array<std::byte, 64> config{};
        std::memcpy(config.data(), &sectors_, 8); // capacity in 512-byte sectors
        for (std::size_t i = 0; i < out.size(); ++i)
            out[i] = offset + i < config.size() ? config[offset + i] : std::byte{0};
    }
    void reset() noexcept { broken_ = false; }
    bool broken() const noexcept { return broken_; }
    std::uint64_t requests() const noexcept { return requests_; }

    void process_queue(vhost_user::vring& ring) {
        if (broken_) return;
        const std::uint16_t used_before = ring.next_used;
        do {
            for (;;) {
                auto next = pop_chain(ring);
                if (!next) {
                    if (std::getenv("SUPERMACHINE_VHOST_TRACE"))
                        std::fprintf(stderr, "test_blk: broken ring: %s\n",
                                     next.error().message().c_str());
                    broken_ = true; // a broken ring: stop serving it (needs reset)
                    return;
                }
                if (!next.value()) break;
                auto& [head, chain] = *next.value();
                const std::uint32_t written = serve(*ring.memory, chain);
                if (!push_used(ring, head, written)) {
                    broken_ = true;
                    return;
                }
                ++requests_;
            }
        } while (publish_avail_event(ring));
        notify_if_wanted(ring, used_before);
    }

private:
    std::uint32_t serve(const guest_memory& memory, const std::vector<descriptor_segment>& chain) {
        // header (readable, 16 bytes) ... data ... status (writable, last, >= 1 byte)
        if (chain.size() < 2 || chain.front().device_writable || chain.front().length < 16 ||
            !chain.back().device_writable || chain.back().length < 1)
            return 0;
        auto header = memory.read_object<std::array<std::uint64_t, 2>>(chain.front().address);
        const std::uint64_t status_address = chain.back().address;
        auto finish = [&](std::uint8_t status, std::uint32_t written) {
            if (!memory.write_object<std::uint8_t>(status_address, status)) return 0u;
            return written + 1;
        };
        if (!header) return 0;
        const auto type = static_cast<std::uint32_t>(header.value()[0]);
        std::uint64_t sector = header.value()[1];
        std::uint32_t written = 0;
        switch (type) {
        case 0:   // IN
        case 1: { // OUT
            if (type == 1 && read_only_) return finish(1, 0);
            for (std::size_t i = 1; i + 1 < chain.size(); ++i) {
                const auto& s = chain[i];
                if (s.device_writable != (type == 0) || s.length % 512) return finish(1, written);
                if (sector > sectors_ || s.length / 512 > sectors_ - sector)
                    return finish(1, written);
                auto host = memory.span(s.address, s.length);
                if (!host) return finish(1, written);
                const off_t at = static_cast<off_t>(sector * 512);
                const ssize_t n = type == 0 ? ::pread(fd_, host.value().data(), s.length, at)
                                            : ::pwrite(fd_, host.value().data(), s.length, at);
                if (n != static_cast<ssize_t>(s.length)) return finish(1, written);
                if (type == 0) written += s.length;
                sector += s.length / 512;
            }
            return finish(0, written);
        }
        case 4:
            return finish(::fdatasync(fd_) == 0 ? 0 : 1, 0); // FLUSH
        case 8: {                                            // GET_ID
            if (chain.size() != 3 || !chain[1].device_writable) return finish(1, 0);
            std::array<std::byte, 20> id{};
            std::memcpy(id.data(), "supermachine-vhost", 18);
            const std::uint32_t n = std::min<std::uint32_t>(chain[1].length, 20);
            if (!memory.write(chain[1].address, std::span(id).first(n))) return finish(1, 0);
            return finish(0, n);
        }
        default:
            return finish(2, 0); // UNSUPP
        }
    }

    int fd_;
    std::uint64_t sectors_;
    bool read_only_;
    bool broken_ = false;
    std::uint64_t requests_ = 0;
};

/// virtio-rng: fills every writable buffer with a counter pattern (deterministic for tests).
class test_rng {
public:
    std::uint64_t features() const noexcept { return virtio_f_version_1 | ring_features; }
    std::uint32_t queue_count() const noexcept { return 1; }
    std::uint16_t max_queue_size() const noexcept { return 1024; }
    void read_config(std::uint32_t, std::span<std::byte> out) const noexcept {
        std::fill(out.begin(), out.end(), std::byte{0});
    }
    std::uint64_t bytes_served = 0;
    bool broken = false;

    void process_queue(vhost_user::vring& ring) {
        const std::uint16_t used_before = ring.next_used;
        do {
            for (;;) {
                auto next = pop_chain(ring);
                if (!next) {
                    broken = true;
                    return;
                }
                if (!next.value()) break;
                auto& [head, chain] = *next.value();
                std::uint32_t written = 0;
                for (const auto& s : chain) {
                    if (!s.device_writable) continue;
                    auto host = ring.memory->span(s.address, s.length);
                    if (!host) break;
                    for (auto& b : host.value())
                        b = static_cast<std::byte>(bytes_served++ & 0xff);
                    written += s.length;
                }
                if (!push_used(ring, head, written)) {
                    broken = true;
                    return;
                }
            }
        } while (publish_avail_event(ring));
        notify_if_wanted(ring, used_before);
    }
};

} // namespace supermachine::test
