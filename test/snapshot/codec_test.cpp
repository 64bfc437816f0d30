// The codecs in constant expressions (static_assert) and at run time.
#include <supermachine/snapshot/codec.hpp>
#include <supermachine/snapshot/container.hpp>

#include <boost/test/unit_test.hpp>

#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace s = supermachine::snapshot;
using supermachine::errc;

namespace {

template <std::unsigned_integral T>
constexpr bool scalar_round_trip(T value) {
    std::array<std::byte, sizeof(T)> buffer{};
    s::byte_writer w(buffer);
    w.unsigned_le(value);
    if (!w.finish() || w.finish().value() != sizeof(T)) return false;
    s::byte_reader r(buffer);
    auto back = r.unsigned_le<T>();
    return back && back.value() == value && r.at_end();
}
static_assert(scalar_round_trip<std::uint8_t>(0xab));
static_assert(scalar_round_trip<std::uint16_t>(0xbeef));
static_assert(scalar_round_trip<std::uint32_t>(0xdeadbeef));
static_assert(scalar_round_trip<std::uint64_t>(0x0123456789abcdefull));
static_assert(scalar_round_trip<std::uint64_t>(std::numeric_limits<std::uint64_t>::max()));

// Little-endian on the wire, whatever the host.
constexpr bool little_endian_layout() {
    std::array<std::byte, 4> buffer{};
    s::byte_writer w(buffer);
    w.u32(0x11223344);
    return buffer[0] == std::byte{0x44} && buffer[3] == std::byte{0x11};
}
static_assert(little_endian_layout());

// A short slice is an error, never a read past it.
constexpr bool short_slice_is_truncated() {
    std::array<std::byte, 3> buffer{};
    s::byte_reader r(buffer);
    auto v = r.u32();
    return !v && v.error() == errc::snapshot_truncated && r.position() == 0 &&
           r.u16().has_value() && r.u16().error() == errc::snapshot_truncated;
}
static_assert(short_slice_is_truncated());

// Byte strings and length-prefixed strings.
constexpr bool blob_and_string_round_trip() {
    std::array<std::byte, 64> buffer{};
    const std::array<std::byte, 3> bytes{std::byte{1}, std::byte{2}, std::byte{3}};
    s::byte_writer w(buffer);
    w.blob(bytes, 16);
    w.string("a length-prefixed string", 64);
    w.u8(9);
    const auto size = w.finish();
    if (!size || size.value() != 4 + 3 + 4 + 24 + 1) return false;
    s::byte_reader r(std::span<const std::byte>(buffer).first(size.value()));
    auto view = r.blob(16);
    if (!view || view.value().size() != 3 || view.value()[2] != std::byte{3}) return false;
    auto text = r.string(64);
    if (!text || text.value() != "a length-prefixed string") return false;
    return r.u8().value() == 9 && r.at_end();
}
static_assert(blob_and_string_round_trip());

// Lengths over the caller's limit: the writer refuses to write them and the reader to read them.
constexpr bool limits_are_enforced() {
    std::array<std::byte, 64> buffer{};
    const std::array<std::byte, 8> bytes{};
    s::byte_writer w(buffer);
    w.blob(bytes, 7);
    if (w.finish().error() != errc::snapshot_too_large) return false;
    s::byte_writer ok(buffer);
    ok.blob(bytes, 8);
    s::byte_reader r(buffer);
    return r.blob(7).error() == errc::snapshot_too_large;
}
static_assert(limits_are_enforced());

// A count is capped by the limit and by what the bytes left can hold, before allocation.
constexpr bool counts_are_capped() {
    std::array<std::byte, 4 + 16> buffer{};
    s::byte_writer w(buffer);
    w.u32(0xffffffff);
    s::byte_reader huge(buffer);
    if (huge.count(1000, 4).error() != errc::snapshot_too_large) return false;
    s::byte_writer w2(buffer);
    w2.u32(5); // 5 elements of >= 4 bytes do not fit in 16
    s::byte_reader five(buffer);
    if (five.count(1000, 4).error() != errc::snapshot_truncated) return false;
    s::byte_reader five_small(buffer);
    return five_small.count(1000, 2).value() == 5;
}
static_assert(counts_are_capped());

// A writer with no buffer measures; a buffer too small is an error, not an overrun.
constexpr bool measure_and_overflow() {
    s::byte_writer measure;
    measure.u64(1);
    measure.string("twenty-six characters long", 100);
    if (measure.finish().value() != 8 + 4 + 26) return false;
    std::array<std::byte, 10> small{};
    s::byte_writer w(small);
    w.u64(1);
    w.u64(2);
    return w.finish().error() == errc::snapshot_too_large && w.position() == 8;
}
static_assert(measure_and_overflow());

// Records: one field list drives encode, decode and the minimum size.
struct point {
    std::uint16_t x = 0;
    std::uint16_t y = 0;
    static constexpr auto fields() { return std::tuple{s::field(&point::x), s::field(&point::y)}; }
    constexpr s::codec_result<void> validate() const {
        if (x == 0xffff) return errc::snapshot_bad_record;
        return {};
    }
    friend constexpr bool operator==(const point&, const point&) = default;
};
struct shape {
    std::uint32_t id = 0;
    bool closed = false;
    std::vector<point> points;
    std::vector<std::byte> tag;
    std::optional<point> centre;
    std::array<std::byte, 4> key{};
    static constexpr auto fields() {
        return std::tuple{s::field(&shape::id),        s::field(&shape::closed),
                          s::field(&shape::points, 8), s::field(&shape::tag, 16),
                          s::field(&shape::centre),    s::field(&shape::key)};
    }
    friend constexpr bool operator==(const shape&, const shape&) = default;
};
static_assert(s::encoded_size_min<point>() == 4);
static_assert(s::encoded_size_min<shape>() == 4 + 1 + 4 + 4 + 1 + 4);

constexpr bool record_round_trip() {
    shape a{7,
            true,
            {{1, 2}, {3, 4}},
            {std::byte{9}},
            point{5, 6},
            {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4}}};
    auto bytes = s::encode_to_vector(a);
    if (!bytes) return false;
    auto b = s::decode_exactly<shape>(bytes.value());
    return b && b.value() == a;
}
#if !defined(__clang__) // clang 14 cannot constant-evaluate libstdc++ 12's vector(n)
static_assert(record_round_trip());

constexpr bool record_validation() {
    shape bad{1, false, {{0xffff, 0}}, {}, {}, {}};
    if (s::encode_to_vector(bad).error() != errc::snapshot_bad_record) return false;
    // A list longer than its limit is refused on both sides.
    shape long_list{1, false, std::vector<point>(9), {}, {}, {}};
    return s::encode_to_vector(long_list).error() == errc::snapshot_too_large;
}
static_assert(record_validation());

// A whole snapshot file, written and parsed in a constant expression.
constexpr bool container_round_trip() {
    s::snapshot_records r;
    r.machine = {1, 8192, "kernel identity, past the small-string size"};
    r.vcpus = {{0, {std::byte{1}, std::byte{2}}}};
    r.port_forwards = {{8080, 80}};
    std::vector<std::byte> ram(8192, std::byte{0});
    ram[4096] = std::byte{0x77};
    auto file = s::encode_snapshot(r, ram);
    if (!file) return false;
    auto parsed = s::parse_snapshot(file.value());
    return parsed && parsed.value().records == r && parsed.value().ram[4096] == std::byte{0x77} &&
           parsed.value().header.ram_offset % s::page_size == 0;
}
static_assert(container_round_trip());
#endif

} // namespace

BOOST_AUTO_TEST_SUITE(snapshot_codec)

BOOST_AUTO_TEST_CASE(run_time_matches_constant_evaluation) {
    BOOST_TEST(scalar_round_trip<std::uint64_t>(0x8000000000000001ull));
    BOOST_TEST(blob_and_string_round_trip());
    BOOST_TEST(record_round_trip());
    BOOST_TEST(counts_are_capped());
}

BOOST_AUTO_TEST_CASE(every_truncation_of_a_record_is_an_error) {
    shape a{7, true, {{1, 2}, {3, 4}}, {std::byte{9}, std::byte{8}}, point{5, 6}, {}};
    auto bytes = s::encode_to_vector(a).value();
    for (std::size_t n = 0; n < bytes.size(); ++n) {
        auto r = s::decode_exactly<shape>(std::span<const std::byte>(bytes).first(n));
        BOOST_TEST_REQUIRE(!r.has_value(), "length " << n);
        BOOST_TEST((r.error() == errc::snapshot_truncated), "length " << n);
    }
    auto longer = bytes;
    longer.push_back(std::byte{0});
    BOOST_TEST((s::decode_exactly<shape>(longer).error() == errc::snapshot_bad_record));
}

BOOST_AUTO_TEST_CASE(bad_flags_and_optional_markers_are_errors) {
    shape a{7, true, {}, {}, {}, {}};
    auto bytes = s::encode_to_vector(a).value();
    bytes[4] = std::byte{2}; // bool must be 0 or 1
    BOOST_TEST((s::decode_exactly<shape>(bytes).error() == errc::snapshot_bad_record));
}

BOOST_AUTO_TEST_CASE(crc32_matches_zlib) {
    const std::string text = "123456789";
    const auto bytes = std::as_bytes(std::span(text));
    BOOST_TEST(s::detail::crc32(bytes) == 0xcbf43926u); // the standard check value
    constexpr std::array<std::byte, 9> constant{std::byte{'1'}, std::byte{'2'}, std::byte{'3'},
                                                std::byte{'4'}, std::byte{'5'}, std::byte{'6'},
                                                std::byte{'7'}, std::byte{'8'}, std::byte{'9'}};
    static_assert(s::detail::crc32(constant) == 0xcbf43926u);
}

BOOST_AUTO_TEST_CASE(codec_result_converts_to_result) {
    std::array<std::byte, 2> buffer{};
    s::byte_reader r(buffer);
    supermachine::result<std::uint32_t> converted = r.u32();
    BOOST_TEST((converted.error() == errc::snapshot_truncated));
    BOOST_CHECK_THROW(s::byte_reader(buffer).u32().value(), boost::system::system_error);
}

BOOST_AUTO_TEST_SUITE_END()
