#pragma once
// A test "guest" for the virtio-vsock device core: it builds the three split
// rings in memory and speaks the vsock packet protocol as Linux's
// virtio_transport does (connection set-up both ways, data, credit, events).
// Used by test/agent/vsock_test.cpp and test/snapmachine/vsock_pause_test.cpp.
#include <supermachine/memory.hpp>
#include <supermachine/virtio/vsock.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/test/unit_test.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace supermachine::test::vsock_guest {

namespace virtio = supermachine::virtio;
namespace op = virtio::vsock_op;
using virtio::vsock_header;

inline constexpr std::uint64_t guest_cid = 3;
inline constexpr std::uint32_t queue_size = 64;
inline constexpr std::uint32_t rx_buffer = 44 + 4096; // like Linux's default rx buffers

struct received_packet {
    vsock_header header;
    std::string payload;
};

class fake_guest {
public:
    static constexpr std::uint64_t base = 0x100000;

    /// Rings, 32 rx buffers and `event_buffers` event buffers; DRIVER_OK
    /// (activate()) unless `start` is false.
    explicit fake_guest(virtio::vsock::config config = {}, std::uint32_t event_buffers = 1,
                        bool start = true)
        : storage_(16 << 20) {
        memory_ = supermachine::guest_memory::view(base, std::span(storage_));
        std::uint64_t at = base;
        for (int q = 0; q < 3; ++q) {
            layouts_[q].size = queue_size;
            layouts_[q].descriptor_table = at;
            layouts_[q].available_ring = at + 16 * queue_size;
            layouts_[q].used_ring = at + 4096;
            at += 8192;
            kick_[q] = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        }
        buffers_ = at;
        config.guest_cid = guest_cid;
        device = virtio::vsock::create(config).value();
        for (int q = 0; q < 3; ++q) {
            queues_[q] = std::make_unique<virtio::virtqueue>(
                virtio::virtqueue::create(memory_, layouts_[q], virtio::common_features).value());
            bindings_[q] = {queues_[q].get(), kick_[q], {}};
        }
        // Before DRIVER_OK, as a driver does: rx buffers and event buffers.
        for (std::uint32_t i = 0; i < 32; ++i)
            post_rx(i);
        for (std::uint32_t i = 0; i < event_buffers; ++i)
            post_event();
        if (start) activate();
    }
    ~fake_guest() {
        device->reset();
        for (int fd : kick_)
            ::close(fd);
    }

    /// DRIVER_OK (again after a pause: the same rings, positions kept by the virtqueues).
    void activate() {
        virtio::activation act{
            memory_, io.get_executor(),        virtio::common_features, std::span(bindings_),
            {},      [this] { broken = true; }};
        BOOST_REQUIRE(device->activate(act));
    }

    /// Sends one packet on tx (readable chain: header + payload in one buffer).
    void send(vsock_header h, std::string_view payload = {},
              std::optional<std::uint32_t> claimed = {}) {
        h.len = claimed.value_or(static_cast<std::uint32_t>(payload.size()));
        std::uint32_t slot = tx_slot_++ % queue_size;
        std::uint64_t address = buffers_ + (1 << 20) + slot * 70000ull;
        memory_.write_object(address, h).value();
        auto host = memory_.span(address + sizeof h, payload.size()).value();
        if (!payload.empty()) std::memcpy(host.data(), payload.data(), payload.size());
        add(1, slot, address, static_cast<std::uint32_t>(sizeof h + payload.size()), false);
    }
    /// A raw tx chain of arbitrary bytes (hostile tests).
    void send_raw(std::string_view bytes) {
        std::uint32_t slot = tx_slot_++ % queue_size;
        std::uint64_t address = buffers_ + (1 << 20) + slot * 70000ull;
        auto host = memory_.span(address, bytes.size()).value();
        std::memcpy(host.data(), bytes.data(), bytes.size());
        add(1, slot, address, static_cast<std::uint32_t>(bytes.size()), false);
    }

    vsock_header header(std::uint16_t operation, std::uint32_t guest_port,
                        std::uint32_t host_port) {
        vsock_header h{};
        h.src_cid = guest_cid;
        h.dst_cid = virtio::vsock_host_cid;
        h.src_port = guest_port;
        h.dst_port = host_port;
        h.type = virtio::vsock_type_stream;
        h.op = operation;
        h.buf_alloc = buf_alloc;
        h.fwd_cnt = fwd_cnt;
        return h;
    }

    /// Packets the device put in rx buffers (buffers are re-posted).
    std::vector<received_packet> take_rx() {
        std::vector<received_packet> out;
        std::uint16_t used = read16(layouts_[0].used_ring + 2);
        while (rx_seen_ != used) {
            std::uint64_t e = layouts_[0].used_ring + 4 + 8ull * (rx_seen_ % queue_size);
            std::uint32_t id = memory_.read_object<std::uint32_t>(e).value();
            std::uint32_t len = memory_.read_object<std::uint32_t>(e + 4).value();
            ++rx_seen_;
            std::uint64_t address = rx_address(id);
            received_packet p{};
            BOOST_REQUIRE(len >= sizeof(vsock_header));
            p.header = memory_.read_object<vsock_header>(address).value();
            BOOST_REQUIRE(p.header.len == len - sizeof(vsock_header));
            auto bytes = memory_.span(address + sizeof(vsock_header), p.header.len).value();
            p.payload.assign(reinterpret_cast<const char*>(bytes.data()), bytes.size());
            out.push_back(std::move(p));
            post_rx(id);
        }
        return out;
    }

    /// Runs the device until `done`, collecting rx packets into `inbox`.
    bool pump(const std::function<bool()>& done,
              std::chrono::milliseconds limit = std::chrono::seconds(10)) {
        auto end = std::chrono::steady_clock::now() + limit;
        while (!done()) {
            if (std::chrono::steady_clock::now() > end) return false;
            io.restart();
            io.run_for(std::chrono::milliseconds(2));
            for (auto& p : take_rx())
                inbox.push_back(std::move(p));
        }
        return true;
    }
    /// Waits for a packet matching `op` (dropping nothing else: others stay in the inbox).
    std::optional<received_packet>
    expect(std::uint16_t operation, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
        std::optional<received_packet> found;
        pump(
            [&] {
                for (auto it = inbox.begin(); it != inbox.end(); ++it)
                    if (it->header.op == operation) {
                        found = std::move(*it);
                        inbox.erase(it);
                        return true;
                    }
                return false;
            },
            limit);
        return found;
    }

    /// Event-queue entries the device has used, and what it wrote into slot `slot`.
    std::uint16_t event_used() { return read16(layouts_[2].used_ring + 2); }
    std::uint32_t event_id(std::uint32_t slot = 0) {
        return memory_.read_object<std::uint32_t>(event_address(slot)).value();
    }
    /// One more event buffer (4 bytes, filled with 0xff until the device writes it).
    void post_event() {
        const std::uint32_t slot = event_slot_++;
        memory_.write_object(event_address(slot), std::uint32_t{0xffffffff}).value();
        add(2, slot, event_address(slot), 4, true);
    }

    boost::asio::io_context io;
    std::unique_ptr<virtio::vsock> device;
    std::deque<received_packet> inbox;
    std::uint32_t buf_alloc = 256 * 1024;
    std::uint32_t fwd_cnt = 0;
    bool broken = false;

private:
    std::uint64_t rx_address(std::uint32_t id) const {
        return buffers_ + id * std::uint64_t{rx_buffer};
    }
    std::uint64_t event_address(std::uint32_t slot) const {
        return buffers_ + 64ull * rx_buffer + 16ull * slot;
    }
    void post_rx(std::uint32_t id) { add(0, id, rx_address(id), rx_buffer, true); }

    void add(int q, std::uint32_t slot, std::uint64_t address, std::uint32_t length,
             bool writable) {
        virtio::raw_descriptor d{
            address, length,
            static_cast<std::uint16_t>(writable ? virtio::descriptor_flag::write : 0), 0};
        memory_.write_object(layouts_[q].descriptor_table + 16ull * slot, d).value();
        std::uint16_t idx = read16(layouts_[q].available_ring + 2);
        write16(layouts_[q].available_ring + 4 + 2ull * (idx % queue_size),
                static_cast<std::uint16_t>(slot));
        write16(layouts_[q].available_ring + 2, static_cast<std::uint16_t>(idx + 1));
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(kick_[q], &one, sizeof one);
    }
    std::uint16_t read16(std::uint64_t a) { return memory_.read_object<std::uint16_t>(a).value(); }
    void write16(std::uint64_t a, std::uint16_t v) { memory_.write_object(a, v).value(); }

    std::vector<std::byte> storage_;
    supermachine::guest_memory memory_;
    std::array<virtio::queue_layout, 3> layouts_{};
    std::array<std::unique_ptr<virtio::virtqueue>, 3> queues_;
    std::array<virtio::queue_binding, 3> bindings_{};
    std::array<int, 3> kick_{};
    std::uint64_t buffers_ = 0;
    std::uint32_t tx_slot_ = 0, event_slot_ = 0;
    std::uint16_t rx_seen_ = 0;
};

using local_socket = boost::asio::local::stream_protocol::socket;

/// Host connects to guest port 1024; the guest answers; returns the socket and the host port.
inline std::pair<local_socket, std::uint32_t> connect(fake_guest& g) {
    std::optional<std::pair<supermachine::error_code, local_socket>> result;
    g.device->async_connect(g.io.get_executor(), 1024, [&](supermachine::error_code ec, local_socket s) {
        result.emplace(ec, std::move(s));
    });
    auto request = g.expect(op::request);
    BOOST_REQUIRE(request);
    BOOST_TEST((request->header.src_cid == virtio::vsock_host_cid));
    BOOST_TEST((request->header.dst_cid == guest_cid));
    BOOST_TEST((request->header.dst_port == 1024u));
    std::uint32_t host_port = request->header.src_port;
    g.send(g.header(op::response, 1024, host_port));
    BOOST_REQUIRE(g.pump([&] { return result.has_value(); }));
    BOOST_REQUIRE_MESSAGE(!result->first, result->first.message());
    return {std::move(result->second), host_port};
}

} // namespace supermachine::test::vsock_guest
