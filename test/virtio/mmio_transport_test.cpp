#include "test_driver.hpp"
#include "test_environment.hpp"

#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>

#include <boost/test/unit_test.hpp>

#include <algorithm>

namespace sm = supermachine;
namespace vio = supermachine::virtio;
using namespace vio::mmio_register;
namespace st = vio::status;
using transport = vio::mmio_transport<vio::rng>;

static_assert(sm::bus_device<transport>);
static_assert(std::is_same_v<sm::bus_device_for<vio::rng>, transport>);

namespace {
std::unique_ptr<transport> make(sm::test::test_environment& e) {
    auto t = transport::create(e.env, vio::rng::config{});
    BOOST_REQUIRE(t.has_value());
    return std::move(t).value();
}
} // namespace

BOOST_AUTO_TEST_SUITE(mmio_transport)

BOOST_AUTO_TEST_CASE(identity_registers) {
    sm::test::test_driver d(8);
    sm::test::test_environment e(d.memory());
    auto t = make(e);
    sm::test::mmio_access<transport> m{*t};
    BOOST_TEST(m.read32(magic_value) == 0x74726976u);
    BOOST_TEST(m.read32(version) == 2u);
    BOOST_TEST(m.read32(device_id) == 4u);
    BOOST_TEST(t->ranges().size() == 1u);
    BOOST_TEST(t->ranges()[0].base == sm::test::test_environment::mmio_base);
    m.write32(device_features_select, 1);
    BOOST_TEST((m.read32(device_features) & 1u) == 1u); // VERSION_1 is bit 32
    m.write32(device_features_select, 7);
    BOOST_TEST(m.read32(device_features) == 0u);
    BOOST_TEST(m.read32(shared_memory_length_low) == 0xffffffffu);
    BOOST_TEST(m.read32(shared_memory_base_high) == 0xffffffffu);
    m.write32(queue_select, 0);
    BOOST_TEST(m.read32(queue_num_max) == 256u);
    m.write32(queue_select, 1); // out of range
    BOOST_TEST(m.read32(queue_num_max) == 0u);
}

BOOST_AUTO_TEST_CASE(wrong_widths_are_ignored) {
    sm::test::test_driver d(8);
    sm::test::test_environment e(d.memory());
    auto t = make(e);
    std::uint16_t half = 0xffff;
    t->read(sm::test::test_environment::mmio_base + magic_value,
            std::as_writable_bytes(std::span(&half, 1)));
    BOOST_TEST(half == 0);
    std::uint32_t v = 0;
    t->read(sm::test::test_environment::mmio_base + 2, std::as_writable_bytes(std::span(&v, 1)));
    BOOST_TEST(v == 0u); // misaligned
    std::uint8_t byte = st::acknowledge;
    t->write(sm::test::test_environment::mmio_base + device_status,
             std::as_bytes(std::span(&byte, 1)));
    sm::test::mmio_access<transport> m{*t};
    BOOST_TEST(m.read32(device_status) == 0u);
    // outside the window
    t->write(sm::test::test_environment::mmio_base + 0x1000, std::as_bytes(std::span(&v, 1)));
}

BOOST_AUTO_TEST_CASE(feature_negotiation_refuses_what_was_not_offered) {
    sm::test::test_driver d(8);
    sm::test::test_environment e(d.memory());
    auto t = make(e);
    sm::test::mmio_access<transport> m{*t};
    // An unknown feature bit: FEATURES_OK does not stick.
    BOOST_TEST(!m.bring_up(vio::common_features | vio::feature_bit(5), {d.layout()}));
    // No VERSION_1 (a legacy driver): refused too.
    BOOST_TEST(!m.bring_up(vio::feature_bit(vio::feature::event_index), {d.layout()}));
    // Status bits cannot be cleared except by reset.
    m.write32(device_status, 0);
    m.write32(device_status, st::acknowledge | st::driver);
    m.write32(device_status, st::acknowledge);
    BOOST_TEST(m.read32(device_status) == (st::acknowledge | st::driver));
    // DRIVER_OK without FEATURES_OK does not stick.
    m.write32(device_status, st::acknowledge | st::driver | st::driver_ok);
    BOOST_TEST((m.read32(device_status) & st::driver_ok) == 0u);
    BOOST_TEST(m.bring_up(vio::common_features, {d.layout()}));
}

BOOST_AUTO_TEST_CASE(hostile_queue_setup_is_refused) {
    sm::test::test_driver d(8);
    sm::test::test_environment e(d.memory());
    auto t = make(e);
    sm::test::mmio_access<transport> m{*t};
    auto try_ready = [&](vio::queue_layout l) {
        m.write32(device_status, 0);
        m.write32(device_status, st::acknowledge | st::driver);
        m.write32(queue_select, 0);
        m.write32(queue_num, l.size);
        m.write32(queue_descriptor_low, static_cast<std::uint32_t>(l.descriptor_table));
        m.write32(queue_descriptor_high, static_cast<std::uint32_t>(l.descriptor_table >> 32));
        m.write32(queue_driver_low, static_cast<std::uint32_t>(l.available_ring));
        m.write32(queue_driver_high, static_cast<std::uint32_t>(l.available_ring >> 32));
        m.write32(queue_device_low, static_cast<std::uint32_t>(l.used_ring));
        m.write32(queue_device_high, static_cast<std::uint32_t>(l.used_ring >> 32));
        m.write32(queue_ready, 1);
        return m.read32(queue_ready);
    };
    auto l = d.layout();
    BOOST_TEST(try_ready(l) == 1u);
    auto bad = l;
    bad.size = 512; // > QueueNumMax (256)
    BOOST_TEST(try_ready(bad) == 0u);
    bad.size = 6; // not a power of two
    BOOST_TEST(try_ready(bad) == 0u);
    bad = l;
    bad.used_ring = 0x7fff'f000'0000ull; // outside RAM
    BOOST_TEST(try_ready(bad) == 0u);
    bad = l;
    bad.descriptor_table = 0xffff'ffff'ffff'fff0ull; // wraps
    BOOST_TEST(try_ready(bad) == 0u);
    // A ready queue's registers are frozen.
    BOOST_TEST(try_ready(l) == 1u);
    m.write32(queue_num, 4);
    BOOST_TEST(m.read32(queue_num) == 8u);
    // Writes to a queue out of range change nothing.
    m.write32(queue_select, 99);
    m.write32(queue_num, 4);
    m.write32(queue_ready, 1);
    BOOST_TEST(m.read32(queue_ready) == 0u);
}

BOOST_AUTO_TEST_CASE(rng_serves_random_bytes_through_doorbell_and_irqfd) {
    for (bool doorbells : {true, false}) {
        sm::test::test_driver d(8);
        sm::test::test_environment e(d.memory(), doorbells);
        auto t = make(e);
        BOOST_TEST(t->uses_slow_notify() == !doorbells);
        sm::test::mmio_access<transport> m{*t};
        BOOST_REQUIRE(m.bring_up(vio::common_features, {d.layout()}));
        const auto buffer = d.allocate(256);
        d.add_chain({{buffer, 256, true}});
        if (doorbells)
            e.ring_doorbell(0);
        else
            m.write32(queue_notify, 0);
        BOOST_REQUIRE(e.run_until([&] { return d.used_index() == 1; }));
        BOOST_TEST(d.used(0).length == 256u);
        auto bytes = d.host(buffer, 256);
        BOOST_TEST(std::count(bytes.begin(), bytes.end(), std::byte{0}) < 32);
        BOOST_TEST(e.take_interrupts() >= 1u);
        BOOST_TEST((m.read32(interrupt_status) & 1u) == 1u);
        m.write32(interrupt_ack, 1);
        BOOST_TEST(m.read32(interrupt_status) == 0u);

        // A malformed chain is returned empty; the device keeps going.
        d.add_chain({{0x10, 16, true}}); // outside RAM
        d.add_chain({{buffer, 16, true}});
        m.write32(queue_notify, 0);
        if (doorbells) e.ring_doorbell(0);
        BOOST_REQUIRE(e.run_until([&] { return d.used_index() == 3; }));
        BOOST_TEST(d.used(1).length == 0u);
        BOOST_TEST(d.used(2).length == 16u);

        // Avail idx jumping past the queue size: DEVICE_NEEDS_RESET + config interrupt.
        d.set_available_index(static_cast<std::uint16_t>(d.available_index() + 100));
        m.write32(queue_notify, 0);
        if (doorbells) e.ring_doorbell(0);
        BOOST_REQUIRE(
            e.run_until([&] { return (m.read32(device_status) & st::device_needs_reset) != 0; }));
        BOOST_TEST((m.read32(interrupt_status) & 2u) == 2u);

        // Reset clears everything.
        m.write32(device_status, 0);
        BOOST_TEST(m.read32(device_status) == 0u);
        BOOST_TEST(m.read32(interrupt_status) == 0u);
        m.write32(queue_select, 0);
        BOOST_TEST(m.read32(queue_ready) == 0u);
    }
}

BOOST_AUTO_TEST_CASE(state_codec_round_trips_and_rejects_garbage) {
    sm::test::test_driver d(8);
    sm::test::test_environment e(d.memory());
    auto t = make(e);
    sm::test::mmio_access<transport> m{*t};
    BOOST_REQUIRE(m.bring_up(vio::common_features, {d.layout()}));
    const auto buffer = d.allocate(32);
    d.add_chain({{buffer, 32, true}});
    e.ring_doorbell(0);
    BOOST_REQUIRE(e.run_until([&] { return d.used_index() == 1; }));
    // pause() quiesces; resume() serves the same queues again.
    t->pause();
    d.add_chain({{buffer, 32, true}});
    e.ring_doorbell(0);
    e.run_until([] { return false; }, std::chrono::milliseconds(30));
    BOOST_TEST(d.used_index() == 1); // paused: not served
    BOOST_REQUIRE(t->resume());
    BOOST_REQUIRE(e.run_until([&] { return d.used_index() == 2; })); // polled at start
    t->pause();
    const auto s = t->state();
    BOOST_TEST(s.queues.size() == 1u);
    BOOST_TEST(s.queues[0].position.next_available == 2);
    BOOST_TEST(s.queues[0].position.next_used == 2);
    const auto bytes = vio::encode(s);
    auto back = vio::decode_mmio_state(bytes);
    BOOST_REQUIRE(back.has_value());
    BOOST_TEST((back.value() == s));
    for (std::size_t cut = 0; cut < bytes.size(); ++cut)
        BOOST_TEST(!vio::decode_mmio_state(std::span(bytes).first(cut)).has_value());
    auto corrupt = bytes;
    corrupt[0] = std::byte{0};
    BOOST_TEST(!vio::decode_mmio_state(corrupt).has_value());

    // Restore into a fresh transport and keep serving from the same position.
    sm::test::test_environment e2(d.memory());
    auto t2 = make(e2);
    BOOST_REQUIRE(t2->restore(back.value()));
    d.add_chain({{buffer, 32, true}});
    e2.ring_doorbell(0);
    BOOST_REQUIRE(e2.run_until([&] { return d.used_index() == 3; }));
    // A restored state whose rings are outside RAM is refused.
    auto hostile = back.value();
    hostile.queues[0].used_ring = 0x7000'0000'0000ull;
    sm::test::test_environment e3(d.memory());
    auto t3 = make(e3);
    BOOST_TEST(!t3->restore(hostile).has_value());
}

BOOST_AUTO_TEST_SUITE_END()
