#include <supermachine/vhost_user/message.hpp>

#include <boost/test/unit_test.hpp>

#include <sys/eventfd.h>

namespace sm = supermachine;
namespace vu = supermachine::vhost_user;

namespace {
vu::message make(vu::request r, std::span<const std::byte> payload, std::size_t fds = 0) {
    vu::message m;
    m.head = {static_cast<std::uint32_t>(r), vu::header_flag::version,
              static_cast<std::uint32_t>(payload.size())};
    std::memcpy(m.payload_storage.data(), payload.data(), payload.size());
    for (std::size_t i = 0; i < fds; ++i)
        m.fds.emplace_back(::eventfd(0, EFD_CLOEXEC));
    return m;
}
std::array<std::byte, vu::header_size> head(std::uint32_t r, std::uint32_t flags,
                                            std::uint32_t size) {
    std::array<std::byte, vu::header_size> b;
    std::memcpy(b.data(), &r, 4);
    std::memcpy(b.data() + 4, &flags, 4);
    std::memcpy(b.data() + 8, &size, 4);
    return b;
}
} // namespace

BOOST_AUTO_TEST_SUITE(vhost_user_codec)

BOOST_AUTO_TEST_CASE(header_checks_version_reply_and_size) {
    BOOST_TEST(vu::decode_header(head(1, 1, 0)).has_value());
    BOOST_TEST(vu::decode_header(head(1, 1 | vu::header_flag::need_reply, 8)).has_value());
    BOOST_TEST(!vu::decode_header(head(1, 0, 0)).has_value()); // version 0
    BOOST_TEST(!vu::decode_header(head(1, 2, 0)).has_value()); // version 2
    BOOST_TEST(!vu::decode_header(head(1, 1 | vu::header_flag::reply, 0))
                    .has_value()); // a reply as request
    BOOST_TEST(!vu::decode_header(head(5, 1, vu::max_payload_size + 1)).has_value());
    BOOST_TEST(!vu::decode_header(head(5, 1, 0xffffffffu)).has_value());
    BOOST_TEST(vu::decode_header(head(5, 1, 0xffffffffu)).error() ==
               sm::errc::vhost_user_protocol_error);
}

BOOST_AUTO_TEST_CASE(sizes_and_fd_counts_are_checked_per_request) {
    const std::array<std::byte, 64> zeros{};
    auto p = [&](std::size_t n) { return std::span(zeros).first(n); };
    BOOST_TEST(vu::validate(make(vu::request::get_features, p(0))).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::get_features, p(8))).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::get_features, p(0), 1)).has_value()); // stray fd
    BOOST_TEST(vu::validate(make(vu::request::set_features, p(8))).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::set_features, p(4))).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::set_features, p(16))).has_value());
    BOOST_TEST(vu::validate(make(vu::request::set_vring_addr, p(40))).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::set_vring_addr, p(32))).has_value());
    // KICK: an fd unless bit 8 says none.
    BOOST_TEST(vu::validate(make(vu::request::set_vring_kick, p(8), 1)).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::set_vring_kick, p(8), 0)).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::set_vring_kick, p(8), 2)).has_value());
    const auto no_fd = vu::u64_bytes(0x100);
    BOOST_TEST(vu::validate(make(vu::request::set_vring_call, no_fd, 0)).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::set_vring_call, no_fd, 1)).has_value());
    const auto junk_bits = vu::u64_bytes(0x1000);
    BOOST_TEST(!vu::validate(make(vu::request::set_vring_call, junk_bits, 1)).has_value());
    // Unknown requests: no fds, any (bounded) size.
    BOOST_TEST(vu::validate(make(static_cast<vu::request>(99), p(3))).has_value());
    BOOST_TEST(!vu::validate(make(static_cast<vu::request>(99), p(0), 1)).has_value());
}

BOOST_AUTO_TEST_CASE(memory_table_count_size_and_fds_agree) {
    std::vector<vu::memory_region_description> regions(2, {0, 4096, 0, 0});
    auto bytes = vu::memory_table_bytes(regions);
    BOOST_TEST(vu::validate(make(vu::request::set_mem_table, bytes, 2)).has_value());
    BOOST_TEST(!vu::validate(make(vu::request::set_mem_table, bytes, 1)).has_value()); // missing fd
    BOOST_TEST(!vu::validate(make(vu::request::set_mem_table, bytes, 3)).has_value()); // extra fd
    auto short_bytes = std::span<const std::byte>(bytes).first(bytes.size() - 1);
    BOOST_TEST(!vu::validate(make(vu::request::set_mem_table, short_bytes, 2)).has_value());
    std::vector<vu::memory_region_description> none;
    auto empty = vu::memory_table_bytes(none);
    BOOST_TEST(!vu::validate(make(vu::request::set_mem_table, empty, 0)).has_value());
    // count 9 claimed in the header of the payload
    auto nine = bytes;
    std::uint32_t count = 9;
    std::memcpy(nine.data(), &count, 4);
    BOOST_TEST(!vu::validate(make(vu::request::set_mem_table, nine, 2)).has_value());
    // parse round trip
    regions[1] = {0x100000, 0x2000, 0x7f0000000000, 0x1000};
    auto m = make(vu::request::set_mem_table, vu::memory_table_bytes(regions), 2);
    auto t = vu::parse_memory_table(m);
    BOOST_TEST(t.count == 2u);
    BOOST_TEST(t.regions[1].guest_address == 0x100000u);
    BOOST_TEST(t.regions[1].user_address == 0x7f0000000000u);
    BOOST_TEST(t.regions[1].mmap_offset == 0x1000u);
}

BOOST_AUTO_TEST_CASE(config_and_vring_payloads_round_trip) {
    const std::array<std::byte, 4> data{std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4}};
    auto m = make(vu::request::set_config, vu::config_bytes(8, 0, data));
    BOOST_REQUIRE(vu::validate(m).has_value());
    auto c = vu::parse_config(m);
    BOOST_TEST(c.offset == 8u);
    BOOST_TEST(c.size == 4u);
    BOOST_TEST(std::to_integer<int>(c.data[3]) == 4);
    // size field larger than the payload
    auto bad = vu::config_bytes(0, 0, data);
    std::uint32_t lie = 200;
    std::memcpy(bad.data() + 4, &lie, 4);
    BOOST_TEST(!vu::validate(make(vu::request::get_config, bad)).has_value());
    auto a = vu::parse_vring_address(make(
        vu::request::set_vring_addr, vu::vring_address_bytes({1, 0, 0x1000, 0x3000, 0x2000, 0})));
    BOOST_TEST(a.index == 1u);
    BOOST_TEST(a.descriptor == 0x1000u);
    BOOST_TEST(a.used == 0x3000u);
    BOOST_TEST(a.available == 0x2000u);
}

BOOST_AUTO_TEST_SUITE_END()
