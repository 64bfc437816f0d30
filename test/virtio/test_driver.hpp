#pragma once
// A minimal virtio driver side for tests: builds split rings in a buffer
// seen as guest memory, adds chains, reads the used ring. It plays the
// guest, so it can also write whatever hostile values a test wants.
#include <supermachine/memory.hpp>
#include <supermachine/virtio/virtqueue.hpp>

#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

namespace supermachine::test {

struct buffer_spec {
    std::uint64_t address;
    std::uint32_t length;
    bool device_writable;
};

class test_driver {
public:
    static constexpr std::uint64_t guest_base = 0x10000;

    explicit test_driver(std::uint32_t queue_size, std::size_t memory_bytes = 4 << 20)
        : storage_(new std::byte[memory_bytes + 4096])
        , size_(queue_size) {
        // Page-align the host view like a real mapping.
        auto raw = reinterpret_cast<std::uintptr_t>(storage_.get());
        auto aligned = reinterpret_cast<std::byte*>((raw + 4095) & ~std::uintptr_t{4095});
        bytes_ = {aligned, memory_bytes};
        std::memset(bytes_.data(), 0, bytes_.size());
        memory_ = guest_memory::view(guest_base, bytes_);
        layout_.size = queue_size;
        layout_.descriptor_table = guest_base;
        layout_.available_ring = layout_.descriptor_table + 16ull * queue_size;
        layout_.used_ring = align(layout_.available_ring + 6 + 2ull * queue_size, 4096);
        next_free_ = align(layout_.used_ring + 6 + 8ull * queue_size, 4096);
    }

    const guest_memory& memory() const { return memory_; }
    /// For tests that add regions before making a queue.
    guest_memory& mutable_memory() { return memory_; }
    const virtio::queue_layout& layout() const { return layout_; }
    std::uint32_t size() const { return size_; }

    /// Reserve `length` bytes of guest memory for buffers.
    std::uint64_t allocate(std::uint64_t length, std::uint64_t alignment = 16) {
        std::uint64_t at = align(next_free_, alignment);
        next_free_ = at + length;
        if (next_free_ > guest_base + bytes_.size()) throw std::runtime_error("test memory full");
        return at;
    }
    std::span<std::byte> host(std::uint64_t address, std::uint64_t length) {
        return memory_.span(address, length).value();
    }

    void write_descriptor(std::uint32_t index, const virtio::raw_descriptor& d) {
        memory_.write_object(layout_.descriptor_table + 16ull * index, d).value();
    }
    /// Descriptors for `buffers` from slot `first` on, chained with NEXT;
    /// makes the head available. Returns the head.
    std::uint16_t add_chain(const std::vector<buffer_spec>& buffers, std::uint16_t first = 0xffff) {
        if (first == 0xffff) first = static_cast<std::uint16_t>(next_descriptor_ % size_);
        for (std::size_t i = 0; i < buffers.size(); ++i) {
            const auto slot = static_cast<std::uint16_t>((first + i) % size_);
            const bool last = i + 1 == buffers.size();
            write_descriptor(
                slot, {buffers[i].address, buffers[i].length,
                       static_cast<std::uint16_t>(
                           (last ? 0 : virtio::descriptor_flag::next) |
                           (buffers[i].device_writable ? virtio::descriptor_flag::write : 0)),
                       static_cast<std::uint16_t>((slot + 1) % size_)});
        }
        next_descriptor_ = first + static_cast<std::uint32_t>(buffers.size());
        make_available(first);
        return first;
    }
    /// An indirect table with `buffers` in guest memory, referenced from one
    /// descriptor at slot `first`.
    std::uint16_t add_indirect_chain(const std::vector<buffer_spec>& buffers) {
        const std::uint64_t table = allocate(16 * buffers.size(), 16);
        for (std::size_t i = 0; i < buffers.size(); ++i) {
            const bool last = i + 1 == buffers.size();
            virtio::raw_descriptor d{
                buffers[i].address, buffers[i].length,
                static_cast<std::uint16_t>(
                    (last ? 0 : virtio::descriptor_flag::next) |
                    (buffers[i].device_writable ? virtio::descriptor_flag::write : 0)),
                static_cast<std::uint16_t>(i + 1)};
            memory_.write_object(table + 16 * i, d).value();
        }
        const auto slot = static_cast<std::uint16_t>(next_descriptor_++ % size_);
        write_descriptor(slot, {table, static_cast<std::uint32_t>(16 * buffers.size()),
                                virtio::descriptor_flag::indirect, 0});
        make_available(slot);
        return slot;
    }

    void make_available(std::uint16_t head) {
        const std::uint16_t idx = available_index();
        write16(layout_.available_ring + 4 + 2ull * (idx % size_), head);
        set_available_index(static_cast<std::uint16_t>(idx + 1));
    }
    std::uint16_t available_index() { return read16(layout_.available_ring + 2); }
    void set_available_index(std::uint16_t v) { write16(layout_.available_ring + 2, v); }
    void set_available_flags(std::uint16_t v) { write16(layout_.available_ring, v); }
    void set_used_event(std::uint16_t v) { write16(layout_.available_ring + 4 + 2ull * size_, v); }

    std::uint16_t used_index() { return read16(layout_.used_ring + 2); }
    std::uint16_t used_flags() { return read16(layout_.used_ring); }
    std::uint16_t available_event() { return read16(layout_.used_ring + 4 + 8ull * size_); }
    struct used_element {
        std::uint32_t id, length;
    };
    used_element used(std::uint16_t ring_index) {
        return memory_
            .read_object<used_element>(layout_.used_ring + 4 + 8ull * (ring_index % size_))
            .value();
    }

    std::uint16_t read16(std::uint64_t a) { return memory_.read_object<std::uint16_t>(a).value(); }
    void write16(std::uint64_t a, std::uint16_t v) { memory_.write_object(a, v).value(); }

private:
    static std::uint64_t align(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }
    std::unique_ptr<std::byte[]> storage_;
    std::span<std::byte> bytes_;
    guest_memory memory_;
    virtio::queue_layout layout_{};
    std::uint32_t size_;
    std::uint32_t next_descriptor_ = 0;
    std::uint64_t next_free_ = 0;
};

} // namespace supermachine::test
