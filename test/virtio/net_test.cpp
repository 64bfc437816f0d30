// virtio-net device core, driven by a fake driver (net_driver.hpp) over a
// loopback backend: frames both ways byte-exact, every hostile frame and
// buffer dropped and counted with the device still working after, link
// status, pause/reset, and the core through the virtio-mmio transport.
#include "net_driver.hpp"
#include "test_driver.hpp"
#include "test_environment.hpp"

#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/net.hpp>
#include <supermachine/virtio/net_loopback.hpp>

#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstring>
#include <random>

namespace sm = supermachine;
namespace vio = supermachine::virtio;
using sm::test::net_driver;
using frame = std::vector<std::byte>;

namespace {

/// An Ethernet frame of `length` bytes: destination, source, ethertype, then
/// a payload from `seed`, so frames differ and a wrong byte shows.
frame make_frame(std::size_t length, unsigned seed = 1) {
    frame f(length);
    std::mt19937 rng(seed);
    for (auto& b : f)
        b = static_cast<std::byte>(rng());
    if (length >= 14) {
        const std::uint8_t header[14] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x52,
                                         0x55, 0x0a, 0x00, 0x02, 0x02, 0x08, 0x00};
        std::memcpy(f.data(), header, 14);
    }
    return f;
}

frame rx_frame(net_driver& d, std::uint16_t ring_index, vio::net_header* header = nullptr) {
    const auto u = d.used(net_driver::rx, ring_index);
    BOOST_REQUIRE(u.length >= sizeof(vio::net_header));
    const auto address = d.rx_address(static_cast<std::uint16_t>(u.id));
    if (header) *header = d.memory().read_object<vio::net_header>(address).value();
    auto bytes = d.host(address + sizeof(vio::net_header), u.length - sizeof(vio::net_header));
    return frame(bytes.begin(), bytes.end());
}

/// After any drop: a good frame still goes out, and one still comes in.
void still_works(net_driver& d) {
    const auto out = make_frame(100, 77);
    const auto sent_before = d.device->counters().tx_frames;
    const auto tx_used = d.used_index(net_driver::tx);
    d.send(out);
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::tx) == tx_used + 1; }));
    BOOST_TEST(d.device->counters().tx_frames == sent_before + 1);
    const auto sent = d.device->backend().take_sent();
    BOOST_REQUIRE(!sent.empty());
    BOOST_TEST((sent.back() == out));

    const auto in = make_frame(200, 78);
    const auto rx_used = d.used_index(net_driver::rx);
    d.post_rx();
    d.device->backend().inject(in);
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::rx) == rx_used + 1; }));
    BOOST_TEST((rx_frame(d, rx_used) == in));
}

} // namespace

BOOST_AUTO_TEST_SUITE(net)

BOOST_AUTO_TEST_CASE(offers_no_offloads_and_serves_its_config) {
    using device = net_driver::device_type;
    constexpr auto f = device::features;
    BOOST_TEST(vio::has_feature(f, vio::feature::version_1));
    BOOST_TEST(vio::has_feature(f, vio::net_feature::mac));
    BOOST_TEST(vio::has_feature(f, vio::net_feature::status));
    BOOST_TEST(vio::has_feature(f, vio::net_feature::mtu));
    // Checksum, GSO (bits 6..14), mergeable buffers, control queue: not offered.
    for (unsigned bit : {0u, 1u, 2u, 6u, 7u, 8u, 9u, 10u, 11u, 12u, 13u, 14u, 15u, 17u})
        BOOST_TEST(!vio::has_feature(f, bit), "bit " << bit);

    device::config c;
    c.mac = {0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee};
    c.mtu = 9000;
    auto dev = device::create(c).value();
    std::array<std::byte, 16> out{};
    dev->read_config(0, out);
    BOOST_TEST(std::memcmp(out.data(), c.mac.data(), 6) == 0);
    std::uint16_t status, pairs, mtu;
    std::memcpy(&status, out.data() + 6, 2);
    std::memcpy(&pairs, out.data() + 8, 2);
    std::memcpy(&mtu, out.data() + 10, 2);
    BOOST_TEST(status == vio::net_status_link_up);
    BOOST_TEST(pairs == 1);
    BOOST_TEST(mtu == 9000);
    BOOST_TEST(
        std::all_of(out.begin() + 12, out.end(), [](std::byte b) { return b == std::byte{0}; }));
    std::uint32_t unaligned = 0; // any offset and width: a guest may read oddly
    dev->read_config(5, std::as_writable_bytes(std::span(&unaligned, 1)));
    // mac[5], status (2 bytes), then the low byte of max_virtqueue_pairs.
    BOOST_TEST(unaligned == (0xeeu | (std::uint32_t{vio::net_status_link_up} << 8) | (1u << 24)));
    std::array<std::byte, 4> far{std::byte{1}, std::byte{1}, std::byte{1}, std::byte{1}};
    dev->read_config(0xffff'fffe, far);
    BOOST_TEST(std::all_of(far.begin(), far.end(), [](std::byte b) { return b == std::byte{0}; }));
    dev->write_config(0, std::as_bytes(std::span(&unaligned, 1))); // read-only: ignored
    dev->read_config(0, out);
    BOOST_TEST(std::memcmp(out.data(), c.mac.data(), 6) == 0);

    // Configurations a guest driver would misread are refused.
    auto refused = [](auto change) {
        device::config bad;
        change(bad);
        return !device::create(bad);
    };
    BOOST_TEST(refused([](device::config& x) { x.mac = {}; }));
    BOOST_TEST(refused([](device::config& x) { x.mac[0] = 0x01; })); // multicast
    BOOST_TEST(refused([](device::config& x) { x.mtu = 67; }));
    BOOST_TEST(refused([](device::config& x) { x.mtu = 65535; }));
    BOOST_TEST(refused([](device::config& x) { x.queue_size = 100; }));
    BOOST_TEST(refused([](device::config& x) { x.rx_queue_frames = 0; }));
}

BOOST_AUTO_TEST_CASE(is_a_network_device_on_virtio_mmio) {
    sm::test::test_driver d(16);
    sm::test::test_environment e(d.memory());
    using transport = vio::mmio_transport<net_driver::device_type>;
    auto t = transport::create(e.env, net_driver::device_type::config{}).value();
    sm::test::mmio_access<transport> m{*t};
    BOOST_TEST(m.read32(vio::mmio_register::device_id) == 1u);
    m.write32(vio::mmio_register::device_features_select, 0);
    const std::uint32_t low = m.read32(vio::mmio_register::device_features);
    BOOST_TEST((low & (1u << vio::net_feature::mac)) != 0);
    BOOST_TEST((low & (1u << vio::net_feature::csum)) == 0);
    BOOST_TEST(m.read32(vio::mmio_register::config) == 0x12005452u); // 52:54:00:12 little-endian
    // A driver that asks for checksum offload does not get FEATURES_OK.
    namespace st = vio::status;
    m.write32(vio::mmio_register::device_status, st::acknowledge);
    m.write32(vio::mmio_register::device_status, st::acknowledge | st::driver);
    m.write32(vio::mmio_register::driver_features_select, 0);
    m.write32(vio::mmio_register::driver_features, low | 1u);
    m.write32(vio::mmio_register::driver_features_select, 1);
    m.write32(vio::mmio_register::driver_features, 1u); // VERSION_1
    m.write32(vio::mmio_register::device_status, st::acknowledge | st::driver | st::features_ok);
    BOOST_TEST((m.read32(vio::mmio_register::device_status) & st::features_ok) == 0u);
}

BOOST_AUTO_TEST_CASE(transmits_frames_byte_exact) {
    net_driver d;
    const auto one_buffer = make_frame(60, 1), max_frame = make_frame(1518, 2),
               split = make_frame(1000, 3);
    d.send(one_buffer);
    d.send(max_frame);
    // Header alone, then the frame in two pieces (Linux with scatter-gather does this).
    const auto h = d.allocate(12), a = d.allocate(300), b = d.allocate(700);
    std::memcpy(d.host(a, 300).data(), split.data(), 300);
    std::memcpy(d.host(b, 700).data(), split.data() + 300, 700);
    d.add_chain(net_driver::tx, {{h, 12}, {a, 300}, {b, 700}});
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::tx) == 3; }));
    for (std::uint16_t i = 0; i < 3; ++i)
        BOOST_TEST(d.used(net_driver::tx, i).length == 0u); // nothing written into tx buffers
    BOOST_TEST(d.take_interrupts() > 0u);
    const auto sent = d.device->backend().take_sent();
    BOOST_REQUIRE(sent.size() == 3u);
    BOOST_TEST((sent[0] == one_buffer));
    BOOST_TEST((sent[1] == max_frame));
    BOOST_TEST((sent[2] == split));
    const auto c = d.device->counters();
    BOOST_TEST(c.tx_frames == 3u);
    BOOST_TEST(c.tx_bytes == 60u + 1518u + 1000u);
    BOOST_TEST(c.tx_dropped() == 0u);
}

BOOST_AUTO_TEST_CASE(receives_frames_with_the_header) {
    net_driver d;
    const auto small = make_frame(42, 4), full = make_frame(1518, 5), late = make_frame(600, 6);
    d.post_rx();
    d.post_rx();
    d.device->backend().inject(small);
    d.device->backend().inject(full);
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::rx) == 2; }));
    vio::net_header h{};
    BOOST_TEST((rx_frame(d, 0, &h) == small));
    BOOST_TEST(h.flags == 0);
    BOOST_TEST(h.gso_type == 0);
    const std::uint16_t buffers = h.num_buffers;
    BOOST_TEST(buffers == 1);
    BOOST_TEST(d.used(net_driver::rx, 0).length == 12u + 42u);
    BOOST_TEST((rx_frame(d, 1) == full));
    BOOST_TEST(d.take_interrupts() > 0u);

    // No buffer posted: the frame waits, then goes into the next buffer.
    d.device->backend().inject(late);
    d.settle();
    BOOST_TEST(d.used_index(net_driver::rx) == 2);
    BOOST_TEST(d.device->queued_rx_frames() == 1u);
    // A buffer in two descriptors (header apart from the data).
    const auto hb = d.allocate(12), data = d.allocate(1518);
    const auto head = d.add_chain(net_driver::rx, {{hb, 12, true}, {data, 1518, true}});
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::rx) == 3; }));
    BOOST_TEST(d.used(net_driver::rx, 2).id == head);
    BOOST_TEST(d.used(net_driver::rx, 2).length == 612u);
    auto bytes = d.host(data, 600);
    BOOST_TEST((frame(bytes.begin(), bytes.end()) == late));
    const auto c = d.device->counters();
    BOOST_TEST(c.rx_frames == 3u);
    BOOST_TEST(c.rx_bytes == 42u + 1518u + 600u);
    BOOST_TEST(c.rx_dropped() == 0u);
}

BOOST_AUTO_TEST_CASE(echo_round_trip) {
    net_driver::device_type::config c;
    c.backend.echo = true;
    net_driver d(c);
    for (int i = 0; i < 8; ++i)
        d.post_rx();
    std::vector<frame> frames;
    for (unsigned i = 0; i < 8; ++i) {
        frames.push_back(make_frame(64 + 100 * i, 10 + i));
        d.send(frames.back());
    }
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::rx) == 8; }));
    for (std::uint16_t i = 0; i < 8; ++i)
        BOOST_TEST((rx_frame(d, i) == frames[i]));
}

BOOST_AUTO_TEST_CASE(hostile_transmit_chains_are_dropped_and_counted) {
    net_driver d;
    const auto good = make_frame(100, 20);
    std::uint16_t expected_used = 0;
    auto sent_and_dropped = [&](std::uint64_t net_counters_field_value_before,
                                std::uint64_t vio::net_counters::*field) {
        ++expected_used;
        BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::tx) == expected_used; }));
        BOOST_TEST(d.used(net_driver::tx, expected_used - 1).length == 0u);
        const std::uint64_t now = d.device->counters().*field;
        BOOST_TEST(now == net_counters_field_value_before + 1);
        BOOST_TEST(d.device->backend().take_sent().empty());
    };
    using C = vio::net_counters;

    // Oversized: one byte past MTU + Ethernet header + VLAN tag.
    d.send(make_frame(1519, 21));
    sent_and_dropped(0, &C::tx_oversized);
    // A 64 KiB frame (the guest claims it; we never allocate for it).
    d.send(make_frame(65536, 22));
    sent_and_dropped(1, &C::tx_oversized);
    // Truncated header: 8 of 12 bytes.
    {
        const auto at = d.allocate(8);
        d.add_chain(net_driver::tx, {{at, 8}});
        sent_and_dropped(0, &C::tx_short_header);
    }
    // Header only, and a runt frame shorter than an Ethernet header.
    d.send({});
    sent_and_dropped(0, &C::tx_runt);
    d.send(make_frame(13, 23));
    sent_and_dropped(1, &C::tx_runt);
    // Offloads we did not offer: checksum request, GSO.
    {
        vio::net_header h{};
        h.flags = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        h.csum_start = 34;
        h.csum_offset = 6;
        d.send(good, h);
        sent_and_dropped(0, &C::tx_bad_header);
        h = {};
        h.gso_type = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        h.gso_size = 1448;
        d.send(good, h);
        sent_and_dropped(1, &C::tx_bad_header);
    }
    // A device-writable descriptor in a tx chain, alone and after the frame.
    {
        const auto at = d.allocate(112);
        d.memory().write_object(at, vio::net_header{}).value();
        std::memcpy(d.host(at + 12, 100).data(), good.data(), 100);
        d.add_chain(net_driver::tx, {{at, 112, true}});
        sent_and_dropped(0, &C::tx_writable_descriptor);
        const auto extra = d.allocate(64);
        d.add_chain(net_driver::tx, {{at, 112}, {extra, 64, true}});
        sent_and_dropped(1, &C::tx_writable_descriptor);
    }
    // Chains pointing outside guest RAM: past its end, below it, wrapping.
    {
        d.add_chain(net_driver::tx, {{net_driver::base + (16 << 20) - 8, 112}});
        sent_and_dropped(0, &C::tx_malformed_chain);
        d.add_chain(net_driver::tx, {{0x1000, 112}});
        sent_and_dropped(1, &C::tx_malformed_chain);
        d.add_chain(net_driver::tx, {{~std::uint64_t{0} - 16, 112}});
        sent_and_dropped(2, &C::tx_malformed_chain);
        const auto at = d.allocate(12);
        d.add_chain(net_driver::tx, {{at, 12}, {at, 0xffff'ffff}});
        sent_and_dropped(3, &C::tx_malformed_chain);
    }
    // A descriptor loop: NEXT back to itself.
    {
        const auto slot = d.reserve_slot(net_driver::tx);
        const auto at = d.allocate(112);
        d.write_descriptor(net_driver::tx, slot, {at, 112, vio::descriptor_flag::next, slot});
        d.make_available(net_driver::tx, slot);
        sent_and_dropped(4, &C::tx_malformed_chain);
    }
    // The backend refusing a frame is counted too.
    d.device->backend().set_accepting(false);
    d.send(good);
    sent_and_dropped(0, &C::tx_backend_dropped);
    d.device->backend().set_accepting(true);

    const auto c = d.device->counters();
    BOOST_TEST(c.tx_frames == 0u);
    BOOST_TEST(c.tx_dropped() == expected_used);
    BOOST_TEST(!d.broken);
    still_works(d);
}

BOOST_AUTO_TEST_CASE(hostile_receive_buffers_are_dropped_and_counted) {
    net_driver::device_type::config config;
    config.rx_queue_frames = 4;
    net_driver d(config);
    auto& backend = d.device->backend();

    // Frames the backend may not hand the guest: runt and oversized.
    backend.inject(make_frame(10, 30));
    backend.inject(make_frame(1519, 31));
    BOOST_TEST(d.device->counters().rx_bad_frame == 2u);

    // Bounded waiting queue: 4 frames wait, the rest are dropped.
    for (unsigned i = 0; i < 6; ++i)
        backend.inject(make_frame(500, 40 + i));
    BOOST_TEST(d.device->queued_rx_frames() == 4u);
    BOOST_TEST(d.device->counters().rx_queue_full == 2u);

    // Too small for header + frame; a device-readable buffer; outside RAM.
    d.post_rx(12 + 499);
    const auto readable = d.allocate(2048);
    d.add_chain(net_driver::rx, {{readable, 2048, false}});
    d.add_chain(net_driver::rx, {{net_driver::base + (16 << 20) - 100, 2048, true}});
    d.post_rx(); // a good one takes the fourth frame
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::rx) == 4; }));
    BOOST_TEST(d.used(net_driver::rx, 0).length == 0u);
    BOOST_TEST(d.used(net_driver::rx, 1).length == 0u);
    BOOST_TEST(d.used(net_driver::rx, 2).length == 0u);
    BOOST_TEST(d.used(net_driver::rx, 3).length == 512u);
    BOOST_TEST((rx_frame(d, 3) == make_frame(500, 43)));
    const auto c = d.device->counters();
    BOOST_TEST(c.rx_buffer_too_small == 1u);
    BOOST_TEST(c.rx_bad_buffer == 2u);
    BOOST_TEST(c.rx_frames == 1u);
    BOOST_TEST(d.device->queued_rx_frames() == 0u);
    BOOST_TEST(!d.broken);
    still_works(d);
}

BOOST_AUTO_TEST_CASE(impossible_available_index_asks_for_reset) {
    net_driver d;
    d.set_available_index(net_driver::tx, 1000); // > queue size ahead
    d.kick(net_driver::tx);
    BOOST_TEST(d.run_until([&] { return d.broken; }));
}

BOOST_AUTO_TEST_CASE(link_status_is_the_hosts_to_flip) {
    net_driver::device_type::config config;
    config.restore_link_flap = std::chrono::milliseconds(30);
    net_driver d(config);
    auto status = [&] {
        std::uint16_t s = 0;
        d.device->read_config(6, std::as_writable_bytes(std::span(&s, 1)));
        return s;
    };
    BOOST_TEST(status() == vio::net_status_link_up);
    d.device->set_link(false);
    BOOST_TEST(status() == 0);
    BOOST_TEST(d.take_config_interrupts() == 1u);
    d.device->set_link(false); // no change, no interrupt
    BOOST_TEST(d.take_config_interrupts() == 0u);

    d.send(make_frame(100, 50));
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::tx) == 1; }));
    d.post_rx();
    d.device->backend().inject(make_frame(100, 51));
    d.settle();
    auto c = d.device->counters();
    BOOST_TEST(c.tx_link_down == 1u);
    BOOST_TEST(c.rx_link_down == 1u);
    BOOST_TEST(d.device->backend().take_sent().empty());
    BOOST_TEST(d.used_index(net_driver::rx) == 0);

    d.device->set_link(true);
    BOOST_TEST(status() == vio::net_status_link_up);
    BOOST_TEST(d.take_config_interrupts() == 1u);
    d.device->backend().inject(make_frame(100, 52));
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::rx) == 1; }));

    // After a snapshot restore: stale frames dropped, link down, then up again.
    d.device->backend().inject(make_frame(100, 53)); // waits: no buffer
    BOOST_TEST(d.device->queued_rx_frames() == 1u);
    d.device->transport_reset();
    BOOST_TEST(d.device->queued_rx_frames() == 0u);
    BOOST_TEST(status() == 0);
    BOOST_TEST(d.take_config_interrupts() == 1u);
    BOOST_REQUIRE(d.run_until([&] { return status() == vio::net_status_link_up; }));
    BOOST_TEST(d.take_config_interrupts() == 1u);
    still_works(d);
}

BOOST_AUTO_TEST_CASE(pause_keeps_waiting_frames_reset_drops_them) {
    net_driver d(net_driver::device_type::config{}, false);
    d.device->backend().inject(make_frame(100, 60)); // before DRIVER_OK: nobody to take it
    BOOST_TEST(d.device->counters().rx_not_ready == 1u);
    d.activate();

    const auto kept = make_frame(300, 61);
    d.device->backend().inject(kept);
    d.device->pause();
    d.post_rx(12 + 1518, false); // posted while paused: no kick reaches the device
    d.activate();
    BOOST_REQUIRE(d.run_until([&] { return d.used_index(net_driver::rx) == 1; }));
    BOOST_TEST((rx_frame(d, 0) == kept));

    d.device->backend().inject(make_frame(300, 62));
    BOOST_TEST(d.device->queued_rx_frames() == 1u);
    d.device->reset();
    BOOST_TEST(d.device->queued_rx_frames() == 0u);
    d.device->backend().inject(make_frame(300, 63));
    BOOST_TEST(d.device->counters().rx_not_ready == 2u);
}

BOOST_AUTO_TEST_SUITE_END()
