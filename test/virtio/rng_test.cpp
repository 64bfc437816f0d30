#include "test_driver.hpp"
#include "test_environment.hpp"

#include <supermachine/virtio/rng.hpp>

#include <boost/test/unit_test.hpp>

#include <cstring>

namespace sm = supermachine;
namespace vio = supermachine::virtio;

BOOST_AUTO_TEST_SUITE(rng)

BOOST_AUTO_TEST_CASE(fills_writable_buffers_within_its_bound) {
    sm::test::test_driver d(16, 1 << 20);
    sm::test::test_environment e(d.memory());
    auto t = vio::mmio_transport<vio::rng>::create(e.env, vio::rng::config{4096}).value();
    sm::test::mmio_access<vio::mmio_transport<vio::rng>> m{*t};
    BOOST_REQUIRE(m.bring_up(vio::common_features, {d.layout()}));
    const auto a = d.allocate(1024), b = d.allocate(1024), big = d.allocate(16384),
               readable = d.allocate(64);
    d.add_chain({{a, 1024, true}});
    d.add_chain({{b, 1024, true}});
    d.add_chain({{big, 8192, true}, {big + 8192, 8192, true}});
    d.add_chain({{readable, 64, false}}); // nothing to write into
    e.ring_doorbell(0);
    BOOST_REQUIRE(e.run_until([&] { return d.used_index() == 4; }));
    BOOST_TEST(d.used(0).length == 1024u);
    BOOST_TEST(d.used(1).length == 1024u);
    BOOST_TEST(d.used(2).length == 4096u); // capped per request
    BOOST_TEST(d.used(3).length == 0u);
    BOOST_TEST(std::memcmp(d.host(a, 1024).data(), d.host(b, 1024).data(), 1024) != 0);
    auto rest = d.host(big + 4096, 12288);
    BOOST_TEST(
        std::all_of(rest.begin(), rest.end(), [](std::byte x) { return x == std::byte{0}; }));
    BOOST_TEST(t->core().bytes_served() == 1024u + 1024u + 4096u);
    // Byte histogram of 2 KiB is not flat, but a stuck source would be.
    int distinct = 0;
    std::array<bool, 256> seen{};
    for (auto x : d.host(a, 1024))
        if (!seen[static_cast<std::uint8_t>(x)])
            seen[static_cast<std::uint8_t>(x)] = true, ++distinct;
    BOOST_TEST(distinct > 200);
}

BOOST_AUTO_TEST_SUITE_END()
