#pragma once
// A fake virtio-net driver for tests: the rx and tx split rings in a buffer
// seen as guest memory, activation without a transport (as the vsock fake
// guest does), frames sent and buffers posted the way Linux's virtio_net
// does, plus raw descriptors for hostile chains.
#include <supermachine/memory.hpp>
#include <supermachine/virtio/net.hpp>
#include <supermachine/virtio/net_loopback.hpp>

#include <boost/asio/io_context.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <vector>

namespace supermachine::test {

template <class Backend>
class basic_net_driver {
public:
    using device_type = virtio::net<Backend>;
    static constexpr std::uint64_t base = 0x100000;
    static constexpr std::uint32_t queue_size = 64;
    static constexpr std::size_t rx = 0, tx = 1;

    struct descriptor {
        std::uint64_t address;
        std::uint32_t length;
        bool device_writable = false;
    };
    struct used_element {
        std::uint32_t id, length;
    };

    explicit basic_net_driver(typename device_type::config config = {}, bool start = true)
        : storage_(16 << 20) {
        memory_ = guest_memory::view(base, std::span(storage_));
        std::uint64_t at = base;
        for (std::size_t q = 0; q < 2; ++q) {
            layouts_[q] = {queue_size, at, at + 16 * queue_size, at + 4096};
            at += 8192;
            kick_[q] = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        }
        irq_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        config_irq_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        next_free_ = at;
        // A backend that runs on an executor (net_slirp) gets this driver's.
        if constexpr (requires { config.backend.executor; })
            if (!config.backend.executor) config.backend.executor = io.get_executor();
        if constexpr (requires { config.backend.slirp.executor; }) // net_user
            if (!config.backend.slirp.executor) config.backend.slirp.executor = io.get_executor();
        device = device_type::create(config).value();
        if (start) activate();
    }
    ~basic_net_driver() {
        device->reset();
        for (int fd : {kick_[0], kick_[1], irq_, config_irq_})
            ::close(fd);
    }
    basic_net_driver(const basic_net_driver&) = delete;
    basic_net_driver& operator=(const basic_net_driver&) = delete;

    /// DRIVER_OK; again after pause()/reset(), over the same rings (positions kept).
    void activate(std::uint64_t features = device_type::features) {
        for (std::size_t q = 0; q < 2; ++q) {
            auto position = queues_[q] ? queues_[q]->position() : virtio::queue_position{};
            queues_[q] = std::make_unique<virtio::virtqueue>(
                virtio::virtqueue::create(memory_, layouts_[q], features, position).value());
            bindings_[q] = {queues_[q].get(), kick_[q],
                            virtio::interrupt_sink(interrupt_line(irq_))};
        }
        virtio::activation act{memory_,
                               io.get_executor(),
                               features,
                               std::span(bindings_),
                               virtio::interrupt_sink(interrupt_line(config_irq_)),
                               [this] { broken = true; }};
        if (!device->activate(act)) throw std::runtime_error("activate failed");
    }

    std::uint64_t allocate(std::uint64_t length) {
        const std::uint64_t at = (next_free_ + 15) / 16 * 16;
        next_free_ = at + length;
        if (next_free_ > base + storage_.size()) throw std::runtime_error("test memory full");
        return at;
    }
    std::span<std::byte> host(std::uint64_t address, std::uint64_t length) {
        return memory_.span(address, length).value();
    }
    const guest_memory& memory() const { return memory_; }

    /// Descriptors chained with NEXT from the queue's next free slots; made
    /// available and kicked. Returns the head.
    std::uint16_t add_chain(std::size_t q, const std::vector<descriptor>& chain, bool kick = true) {
        const auto head = static_cast<std::uint16_t>(next_slot_[q] % queue_size);
        for (std::size_t i = 0; i < chain.size(); ++i) {
            const auto slot = static_cast<std::uint16_t>((head + i) % queue_size);
            const bool last = i + 1 == chain.size();
            write_descriptor(q, slot,
                             {chain[i].address, chain[i].length,
                              static_cast<std::uint16_t>(
                                  (last ? 0 : virtio::descriptor_flag::next) |
                                  (chain[i].device_writable ? virtio::descriptor_flag::write : 0)),
                              static_cast<std::uint16_t>((slot + 1) % queue_size)});
        }
        next_slot_[q] += static_cast<std::uint32_t>(chain.size());
        make_available(q, head, kick);
        return head;
    }
    void write_descriptor(std::size_t q, std::uint16_t slot, const virtio::raw_descriptor& d) {
        memory_.write_object(layouts_[q].descriptor_table + 16ull * slot, d).value();
    }
    std::uint16_t reserve_slot(std::size_t q) {
        return static_cast<std::uint16_t>(next_slot_[q]++ % queue_size);
    }
    void make_available(std::size_t q, std::uint16_t head, bool kick = true) {
        const std::uint16_t idx = read16(layouts_[q].available_ring + 2);
        write16(layouts_[q].available_ring + 4 + 2ull * (idx % queue_size), head);
        write16(layouts_[q].available_ring + 2, static_cast<std::uint16_t>(idx + 1));
        if (kick) this->kick(q);
    }
    void set_available_index(std::size_t q, std::uint16_t idx) {
        write16(layouts_[q].available_ring + 2, idx);
    }
    void kick(std::size_t q) {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(kick_[q], &one, sizeof one);
    }

    /// One frame as Linux sends it: a zero header then the frame, in one buffer.
    std::uint16_t send(std::span<const std::byte> frame, virtio::net_header h = {}) {
        const std::uint64_t at = allocate(sizeof h + frame.size());
        memory_.write_object(at, h).value();
        if (!frame.empty())
            std::memcpy(host(at + sizeof h, frame.size()).data(), frame.data(), frame.size());
        return add_chain(tx, {{at, static_cast<std::uint32_t>(sizeof h + frame.size())}});
    }

    /// A receive buffer of `length` bytes (Linux: 12 + 1518).
    std::uint16_t post_rx(std::uint32_t length = 12 + 1518, bool kick = true) {
        const std::uint64_t at = allocate(length);
        const auto head = add_chain(rx, {{at, length, true}}, kick);
        rx_buffers_[head] = at;
        return head;
    }
    std::uint64_t rx_address(std::uint16_t head) const { return rx_buffers_.at(head); }

    std::uint16_t used_index(std::size_t q) { return read16(layouts_[q].used_ring + 2); }
    used_element used(std::size_t q, std::uint16_t ring_index) {
        return memory_
            .read_object<used_element>(layouts_[q].used_ring + 4 + 8ull * (ring_index % queue_size))
            .value();
    }

    /// Interrupts raised since the last call.
    std::uint64_t take_interrupts() { return drain(irq_); }
    std::uint64_t take_config_interrupts() { return drain(config_irq_); }

    bool run_until(const std::function<bool()>& done,
                   std::chrono::milliseconds limit = std::chrono::seconds(10)) {
        const auto end = std::chrono::steady_clock::now() + limit;
        while (!done()) {
            if (std::chrono::steady_clock::now() > end) return false;
            io.restart();
            io.run_for(std::chrono::milliseconds(2));
        }
        return true;
    }
    /// Let the device do whatever it would (for "nothing happens" checks).
    void settle(std::chrono::milliseconds time = std::chrono::milliseconds(50)) {
        io.restart();
        io.run_for(time);
    }

    std::uint16_t read16(std::uint64_t a) { return memory_.read_object<std::uint16_t>(a).value(); }
    void write16(std::uint64_t a, std::uint16_t v) { memory_.write_object(a, v).value(); }

    boost::asio::io_context io;
    std::unique_ptr<device_type> device;
    bool broken = false;

private:
    static std::uint64_t drain(int fd) {
        std::uint64_t n = 0;
        if (::read(fd, &n, sizeof n) != sizeof n) return 0;
        return n;
    }

    std::vector<std::byte> storage_;
    guest_memory memory_;
    virtio::queue_layout layouts_[2]{};
    int kick_[2]{-1, -1};
    int irq_ = -1, config_irq_ = -1;
    std::unique_ptr<virtio::virtqueue> queues_[2];
    virtio::queue_binding bindings_[2]{};
    std::uint32_t next_slot_[2]{};
    std::uint64_t next_free_ = 0;
    std::map<std::uint16_t, std::uint64_t> rx_buffers_;
};

using net_driver = basic_net_driver<virtio::net_loopback>;

} // namespace supermachine::test
