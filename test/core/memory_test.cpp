#include <supermachine/memory.hpp>

#include <boost/test/unit_test.hpp>

#include <array>
#include <limits>

namespace sm = supermachine;

BOOST_AUTO_TEST_SUITE(memory)

BOOST_AUTO_TEST_CASE(view_translation_is_bounds_checked) {
    std::array<std::byte, 4096> buffer{};
    auto mem = sm::guest_memory::view(0x1000, buffer);
    BOOST_TEST(mem.span(0x1000, 4096).has_value());
    BOOST_TEST(mem.span(0x1ff0, 16).has_value());
    BOOST_TEST(mem.span(0x2000, 0).has_value());          // empty range at the end
    BOOST_TEST(!mem.span(0x1ff0, 17).has_value());        // straddles the end
    BOOST_TEST(!mem.span(0xfff, 1).has_value());          // before the region
    BOOST_TEST(!mem.span(0x1001, std::numeric_limits<std::uint64_t>::max()).has_value()); // wraps
    BOOST_TEST(!mem.span(std::numeric_limits<std::uint64_t>::max(), 2).has_value());
    BOOST_TEST(mem.span(0x3000, 1).error() == sm::errc::address_out_of_range);
}

BOOST_AUTO_TEST_CASE(objects_round_trip) {
    std::array<std::byte, 64> buffer{};
    auto mem = sm::guest_memory::view(0, buffer);
    BOOST_REQUIRE(mem.write_object<std::uint32_t>(8, 0xdeadbeef));
    BOOST_TEST(mem.read_object<std::uint32_t>(8).value() == 0xdeadbeefu);
    BOOST_TEST(!mem.read_object<std::uint64_t>(60).has_value());
}

BOOST_AUTO_TEST_CASE(x86_allocation_splits_around_the_mmio_gap) {
    auto small = sm::guest_memory::allocate_x86(64 << 20);
    BOOST_REQUIRE(small.has_value());
    BOOST_TEST(small.value().regions().size() == 1u);
    BOOST_TEST(small.value().backing_fd() >= 0);

    auto big = sm::guest_memory::allocate_x86(std::uint64_t{4} << 30, sm::memory_backing::anonymous);
    BOOST_REQUIRE(big.has_value());
    auto regions = big.value().regions();
    BOOST_REQUIRE(regions.size() == 2u);
    BOOST_TEST(regions[0].size() == sm::x86_layout::mmio_gap_start);
    BOOST_TEST(regions[1].guest_base == sm::x86_layout::mmio_gap_end);
    BOOST_TEST(big.value().size() == (std::uint64_t{4} << 30));
    BOOST_TEST(!big.value().contains(sm::x86_layout::virtio_mmio_base, 4)); // the gap is not RAM
    BOOST_TEST(big.value().contains(sm::x86_layout::mmio_gap_end + 100, 4));
}

BOOST_AUTO_TEST_CASE(bad_sizes_are_refused) {
    BOOST_TEST(sm::guest_memory::allocate_x86(1 << 20).error() == sm::errc::memory_too_small);
    BOOST_TEST(sm::guest_memory::allocate_x86((64 << 20) + 1).error() == sm::errc::invalid_argument);
}

BOOST_AUTO_TEST_CASE(overlapping_regions_are_refused) {
    std::array<std::byte, 4096> a{}, b{};
    auto mem = sm::guest_memory::view(0, a);
    BOOST_TEST(!mem.add_region({2048, b, -1, 0}).has_value());
    BOOST_TEST(mem.add_region({4096, b, -1, 0}).has_value());
    BOOST_TEST(mem.contains(4096, 4096));
}

BOOST_AUTO_TEST_SUITE_END()
