// The snapshot directory's record (detail/warm_snapshot.hpp) is hostile
// input: every truncation, a flipped bit anywhere, a wrong magic or version,
// huge lengths: each a clean error, never a crash or a huge allocation.
#include <supermachine/detail/warm_snapshot.hpp>

#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <fstream>

namespace sm = supermachine;
using sm::detail::warm_snapshot_meta;

namespace {
warm_snapshot_meta sample() {
    warm_snapshot_meta m;
    m.image_digest = "sha256:" + std::string(64, 'a');
    m.rootfs = "/cache/rootfs/x.ext4";
    m.memory_mib = 512;
    m.cpus = 1;
    m.kernel_release = "6.1.0-56-cloud-amd64";
    m.kernel_path = "/k/vmlinuz";
    m.cmdline = "console=ttyS0 supermachine.token=00ff";
    m.agent_identity = "789896:123";
    m.token = "00ff";
    m.stream = {100, 7};
    m.devices = {20, 8};
    m.ram = {512u << 20, 1795721366123456789ull};
    return m;
}
} // namespace

BOOST_AUTO_TEST_CASE(round_trip) {
    const auto bytes = sample().encode();
    BOOST_REQUIRE(!bytes.empty());
    auto back = warm_snapshot_meta::decode(bytes);
    BOOST_REQUIRE(back);
    BOOST_TEST(back.value().token == "00ff");
    BOOST_TEST(back.value().memory_mib == 512u);
    BOOST_TEST(back.value().kernel_release == "6.1.0-56-cloud-amd64");
    BOOST_TEST((back.value().stream == sm::detail::file_fingerprint{100, 7}));
    BOOST_TEST((back.value().devices == sm::detail::file_fingerprint{20, 8}));
    BOOST_TEST(
        (back.value().ram == sm::detail::file_fingerprint{512u << 20, 1795721366123456789ull}));
}

BOOST_AUTO_TEST_CASE(every_truncation_is_an_error) {
    const auto bytes = sample().encode();
    for (std::size_t n = 0; n < bytes.size(); ++n)
        BOOST_TEST(!warm_snapshot_meta::decode(std::span(bytes).first(n)), "length " << n);
}

BOOST_AUTO_TEST_CASE(every_flipped_byte_is_an_error) {
    const auto bytes = sample().encode();
    for (std::size_t i = 0; i < bytes.size(); ++i) {
        auto copy = bytes;
        copy[i] ^= std::byte{0x20};
        BOOST_TEST(!warm_snapshot_meta::decode(copy), "byte " << i);
    }
}

BOOST_AUTO_TEST_CASE(magic_version_and_huge_lengths) {
    auto bytes = sample().encode();
    auto wrong_magic = bytes;
    wrong_magic[0] ^= std::byte{1};
    BOOST_TEST((warm_snapshot_meta::decode(wrong_magic).error() == sm::errc::snapshot_bad_magic));
    auto wrong_version = bytes;
    wrong_version[4] = std::byte{9};
    BOOST_TEST((warm_snapshot_meta::decode(wrong_version).error() ==
                sm::errc::snapshot_unsupported_version));
    // A string length of 0xFFFFFFFF with a valid trailing hash: bounded, refused.
    std::vector<std::byte> hostile(bytes.begin(), bytes.begin() + 8);
    for (int i = 0; i < 4; ++i)
        hostile.push_back(std::byte{0xFF});
    const auto h = sm::detail::hash_bytes(hostile);
    for (int i = 0; i < 8; ++i)
        hostile.push_back(static_cast<std::byte>(h >> (8 * i)));
    BOOST_TEST(!warm_snapshot_meta::decode(hostile));
    // An empty token is refused even when well-formed.
    auto no_token = sample();
    no_token.token.clear();
    BOOST_TEST(!warm_snapshot_meta::decode(no_token.encode()));
    // The writer refuses what the reader would refuse.
    auto long_text = sample();
    long_text.cmdline.assign(warm_snapshot_meta::max_text + 1, 'x');
    BOOST_TEST(long_text.encode().empty());
}

BOOST_AUTO_TEST_CASE(fingerprint_sees_truncation_and_corruption) {
    char path[] = "/tmp/warmrun-fp-XXXXXX";
    const int fd = ::mkstemp(path);
    BOOST_REQUIRE(fd >= 0);
    ::close(fd);
    {
        std::ofstream out(path, std::ios::binary);
        for (int i = 0; i < 300000; ++i)
            out.put(static_cast<char>(i * 7));
    }
    auto a = sm::detail::fingerprint_file(path);
    BOOST_REQUIRE(a);
    BOOST_TEST(a.value().size == 300000u);
    {
        std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
        f.seekp(123457);
        f.put('\x5a');
    }
    auto b = sm::detail::fingerprint_file(path);
    BOOST_REQUIRE(b);
    BOOST_TEST(a.value().size == b.value().size);
    BOOST_TEST(a.value().hash != b.value().hash);
    ::truncate(path, 299999);
    auto c = sm::detail::fingerprint_file(path);
    BOOST_TEST(c.value().size == 299999u);
    BOOST_TEST(!sm::detail::fingerprint_file("/nonexistent/warmrun"));
    std::remove(path);
}
