// The vsock core across a snapshot's pause and a restore's reset, driven by a
// test "guest" that builds the three split rings in memory (as
// test/agent/vsock_test.cpp does): a pause keeps connections and their data
// flows again after the next activation; a pending TRANSPORT_RESET is
// delivered at activation without a kick; a device no driver started queues
// no event.
#include <supermachine/virtio/vsock.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/write.hpp>
#include <boost/test/unit_test.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace sm = supermachine;
namespace virtio = supermachine::virtio;
namespace op = virtio::vsock_op;
using virtio::vsock_header;
using local_socket = boost::asio::local::stream_protocol::socket;

namespace {

constexpr std::uint64_t guest_cid = 3;
constexpr std::uint32_t queue_size = 64;
constexpr std::uint32_t rx_buffer = 44 + 4096;

struct received_packet {
    vsock_header header;
    std::string payload;
};

class fake_guest {
public:
    static constexpr std::uint64_t base = 0x100000;

    /// Rings and 32 rx buffers; `event_buffers` event buffers; activated unless told not to.
    explicit fake_guest(std::uint32_t event_buffers = 1, bool start = true)
        : storage_(16 << 20) {
        memory_ = sm::guest_memory::view(base, std::span(storage_));
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
        virtio::vsock::config config;
        config.guest_cid = guest_cid;
        device = virtio::vsock::create(config).value();
        for (int q = 0; q < 3; ++q) {
            queues_[q] = std::make_unique<virtio::virtqueue>(
                virtio::virtqueue::create(memory_, layouts_[q], virtio::common_features).value());
            bindings_[q] = {queues_[q].get(), kick_[q], {}};
        }
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

    void send(vsock_header h, std::string_view payload = {}) {
        h.len = static_cast<std::uint32_t>(payload.size());
        const std::uint32_t slot = tx_slot_++ % queue_size;
        const std::uint64_t address = buffers_ + (1 << 20) + slot * 70000ull;
        memory_.write_object(address, h).value();
        auto host = memory_.span(address + sizeof h, payload.size()).value();
        if (!payload.empty()) std::memcpy(host.data(), payload.data(), payload.size());
        add(1, slot, address, static_cast<std::uint32_t>(sizeof h + payload.size()), false);
    }

    vsock_header header(std::uint16_t operation, std::uint32_t guest_port,
                        std::uint32_t host_port) const {
        vsock_header h{};
        h.src_cid = guest_cid;
        h.dst_cid = virtio::vsock_host_cid;
        h.src_port = guest_port;
        h.dst_port = host_port;
        h.type = virtio::vsock_type_stream;
        h.op = operation;
        h.buf_alloc = 256 * 1024;
        h.fwd_cnt = 0;
        return h;
    }

    std::vector<received_packet> take_rx() {
        std::vector<received_packet> out;
        const std::uint16_t used = read16(layouts_[0].used_ring + 2);
        while (rx_seen_ != used) {
            const std::uint64_t e = layouts_[0].used_ring + 4 + 8ull * (rx_seen_ % queue_size);
            const auto id = memory_.read_object<std::uint32_t>(e).value();
            const auto len = memory_.read_object<std::uint32_t>(e + 4).value();
            ++rx_seen_;
            const std::uint64_t address = rx_address(id);
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

    bool pump(const std::function<bool()>& done,
              std::chrono::milliseconds limit = std::chrono::seconds(10)) {
        const auto end = std::chrono::steady_clock::now() + limit;
        while (!done()) {
            if (std::chrono::steady_clock::now() > end) return false;
            io.restart();
            io.run_for(std::chrono::milliseconds(2));
            for (auto& p : take_rx())
                inbox.push_back(std::move(p));
        }
        return true;
    }
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

    std::uint16_t event_used() { return read16(layouts_[2].used_ring + 2); }
    std::uint32_t event_id(std::uint32_t slot) {
        return memory_.read_object<std::uint32_t>(event_address(slot)).value();
    }
    void post_event() {
        const std::uint32_t slot = event_slot_++;
        memory_.write_object(event_address(slot), std::uint32_t{0xffffffff}).value();
        add(2, slot, event_address(slot), 4, true);
    }

    boost::asio::io_context io;
    std::unique_ptr<virtio::vsock> device;
    std::deque<received_packet> inbox;
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
        const std::uint16_t idx = read16(layouts_[q].available_ring + 2);
        write16(layouts_[q].available_ring + 4 + 2ull * (idx % queue_size),
                static_cast<std::uint16_t>(slot));
        write16(layouts_[q].available_ring + 2, static_cast<std::uint16_t>(idx + 1));
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(kick_[q], &one, sizeof one);
    }
    std::uint16_t read16(std::uint64_t a) { return memory_.read_object<std::uint16_t>(a).value(); }
    void write16(std::uint64_t a, std::uint16_t v) { memory_.write_object(a, v).value(); }

    std::vector<std::byte> storage_;
    sm::guest_memory memory_;
    std::array<virtio::queue_layout, 3> layouts_{};
    std::array<std::unique_ptr<virtio::virtqueue>, 3> queues_;
    std::array<virtio::queue_binding, 3> bindings_{};
    std::array<int, 3> kick_{};
    std::uint64_t buffers_ = 0;
    std::uint32_t tx_slot_ = 0, event_slot_ = 0;
    std::uint16_t rx_seen_ = 0;
};

/// Host connects to guest port 1024, the guest accepts: the host's socket and port.
std::pair<local_socket, std::uint32_t> connect(fake_guest& g) {
    std::optional<std::pair<std::error_code, local_socket>> result;
    g.device->async_connect(g.io.get_executor(), 1024, [&](std::error_code ec, local_socket s) {
        result.emplace(ec, std::move(s));
    });
    auto request = g.expect(op::request);
    BOOST_REQUIRE(request);
    const std::uint32_t host_port = request->header.src_port;
    g.send(g.header(op::response, 1024, host_port));
    BOOST_REQUIRE(g.pump([&] { return result.has_value(); }));
    BOOST_REQUIRE_MESSAGE(!result->first, result->first.message());
    return {std::move(result->second), host_port};
}

std::string read_available(fake_guest& g, local_socket& s, std::size_t want,
                           std::chrono::milliseconds limit) {
    std::string out;
    g.pump(
        [&] {
            char buffer[4096];
            boost::system::error_code ec;
            s.non_blocking(true);
            const std::size_t n = s.read_some(boost::asio::buffer(buffer), ec);
            if (!ec) out.append(buffer, n);
            if (ec == boost::asio::error::eof) out += "<EOF>";
            return out.size() >= want;
        },
        limit);
    return out;
}

} // namespace

BOOST_AUTO_TEST_CASE(pause_keeps_connections_and_activation_serves_them_again) {
    fake_guest g;
    auto [socket, host_port] = connect(g);
    g.device->pause();
    BOOST_CHECK_EQUAL(g.device->connection_count(), 1u);

    // Host to guest while paused: nothing moves (the socket wait ends, finding the device
    // stopped); after the activation the device watches the socket again.
    boost::asio::write(socket, boost::asio::buffer(std::string("host-to-guest")));
    BOOST_CHECK(!g.expect(op::rw, std::chrono::milliseconds(100)));
    g.activate(); // resume after the capture
    auto rw = g.expect(op::rw, std::chrono::seconds(5));
    BOOST_REQUIRE(rw);
    BOOST_CHECK_EQUAL(rw->payload, "host-to-guest");

    // Guest to host while paused: the tx kick is not served until the activation.
    g.device->pause();
    g.send(g.header(op::rw, 1024, host_port), "guest-to-host");
    BOOST_CHECK_EQUAL(read_available(g, socket, 1, std::chrono::milliseconds(100)), "");
    g.activate();
    BOOST_CHECK_EQUAL(read_available(g, socket, 13, std::chrono::seconds(10)), "guest-to-host");
    BOOST_CHECK_EQUAL(g.device->connection_count(), 1u);
    BOOST_CHECK_EQUAL(g.event_used(), 0u); // a pause is not a transport reset
    BOOST_CHECK(!g.broken);

    // A reset (machine stop) still drops it: the host end sees EOF.
    g.device->reset();
    BOOST_CHECK_EQUAL(g.device->connection_count(), 0u);
    BOOST_CHECK_EQUAL(read_available(g, socket, 5, std::chrono::seconds(10)), "<EOF>");
}

BOOST_AUTO_TEST_CASE(pending_reset_is_delivered_at_activation_without_a_kick) {
    fake_guest g(1);
    g.device->transport_reset(); // into the one posted buffer, at once
    BOOST_CHECK_EQUAL(g.event_used(), 1u);
    BOOST_CHECK_EQUAL(g.event_id(0), 0u);
    g.device->transport_reset(); // no buffer: pending
    BOOST_CHECK_EQUAL(g.event_used(), 1u);
    g.device->pause();
    g.post_event(); // posted while paused; its kick is not served
    g.activate();   // the executor has not run: delivered by activate() itself
    BOOST_CHECK_EQUAL(g.event_used(), 2u);
    BOOST_CHECK_EQUAL(g.event_id(1), 0u);
    g.pump([] { return false; }, std::chrono::milliseconds(50));
    BOOST_CHECK_EQUAL(g.event_used(), 2u); // exactly once
    BOOST_CHECK(!g.broken);
}

BOOST_AUTO_TEST_CASE(device_never_started_queues_no_reset) {
    fake_guest g(2, false);
    g.device->transport_reset(); // no driver running: nothing to tell
    g.activate();
    g.pump([] { return false; }, std::chrono::milliseconds(50));
    BOOST_CHECK_EQUAL(g.event_used(), 0u);
    BOOST_CHECK(!g.broken);
}
