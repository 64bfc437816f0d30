#include "temp_dir.hpp"

#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/storage/read_only.hpp>

#include <boost/test/unit_test.hpp>

#include <cstring>
#include <limits>

namespace sm = supermachine;
namespace st = supermachine::storage;
using sm::test::pattern;

BOOST_AUTO_TEST_SUITE(storage)

BOOST_AUTO_TEST_CASE(raw_file_reads_writes_and_bounds) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    sm::test::write_file(path, pattern(1 << 20, 1));
    auto f = st::raw_file::open({path, false}).value();
    BOOST_TEST(f->size() == (1u << 20));
    BOOST_TEST(!f->is_read_only());
    std::vector<std::byte> buf(4096);
    BOOST_REQUIRE(f->read(8192, buf));
    BOOST_TEST(std::memcmp(buf.data(), pattern(1 << 20, 1).data() + 8192, 4096) == 0);
    const auto data = pattern(4096, 2);
    BOOST_REQUIRE(f->write(4096, data));
    BOOST_REQUIRE(f->flush());
    BOOST_TEST(std::memcmp(sm::test::read_file(path).data() + 4096, data.data(), 4096) == 0);
    BOOST_TEST(f->read((1 << 20) - 100, buf).error() == sm::errc::sector_out_of_range);
    BOOST_TEST(f->read(std::numeric_limits<std::uint64_t>::max() - 10, buf).error() ==
               sm::errc::sector_out_of_range);
    BOOST_TEST(f->write(1 << 20, data).error() == sm::errc::sector_out_of_range);
    BOOST_REQUIRE(f->write_zeroes(0, 8192));
    BOOST_REQUIRE(f->read(0, buf));
    BOOST_TEST(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
    BOOST_TEST(!st::raw_file::open({dir.file("missing"), false}).has_value());
}

BOOST_AUTO_TEST_CASE(raw_file_vectored_io) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    sm::test::write_file(path, pattern(1 << 20, 12));
    auto f = st::raw_file::open({path, false}).value();
    std::vector<std::byte> a(1000), b(24), c(3072);
    std::vector<::iovec> iov{
        {a.data(), a.size()}, {b.data(), 0}, {b.data(), b.size()}, {c.data(), c.size()}};
    BOOST_REQUIRE(f->read_vectored(512, iov));
    const auto host = pattern(1 << 20, 12);
    BOOST_TEST(std::memcmp(a.data(), host.data() + 512, 1000) == 0);
    BOOST_TEST(std::memcmp(b.data(), host.data() + 1512, 24) == 0);
    BOOST_TEST(std::memcmp(c.data(), host.data() + 1536, 3072) == 0);
    std::vector<::iovec> back{{c.data(), c.size()}, {a.data(), a.size()}};
    BOOST_REQUIRE(f->write_vectored(8192, back));
    const auto now = sm::test::read_file(path);
    BOOST_TEST(std::memcmp(now.data() + 8192, c.data(), 3072) == 0);
    BOOST_TEST(std::memcmp(now.data() + 8192 + 3072, a.data(), 1000) == 0);
    std::vector<::iovec> past{{c.data(), c.size()}};
    BOOST_TEST(f->read_vectored((1 << 20) - 1024, past).error() == sm::errc::sector_out_of_range);
}

BOOST_AUTO_TEST_CASE(read_only_refuses_writes) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    const auto original = pattern(64 << 10, 3);
    sm::test::write_file(path, original);
    auto ro = st::read_only<st::raw_file>::open({path, false}).value();
    BOOST_TEST(ro->is_read_only());
    BOOST_TEST(ro->write(0, pattern(512, 4)).error() == sm::errc::device_read_only);
    auto flag = st::raw_file::open({path, true}).value();
    BOOST_TEST(flag->is_read_only());
    BOOST_TEST(flag->write(0, pattern(512, 4)).error() == sm::errc::device_read_only);
    BOOST_TEST(flag->discard(0, 512).error() == sm::errc::device_read_only);
    BOOST_TEST((sm::test::read_file(path) == original));
}

BOOST_AUTO_TEST_CASE(cow_leaves_the_base_byte_identical) {
    for (bool in_memory : {true, false}) {
        sm::test::temp_dir dir;
        const auto base = dir.file("base.img");
        const std::size_t size = (1 << 20) + 3 * 512; // not a whole number of chunks
        const auto original = pattern(size, 5);
        sm::test::write_file(base, original);
        st::cow_file<st::raw_file>::config cfg{
            {base, true}, in_memory ? "" : dir.file("overlay"), 64 * 1024};
        auto cow = st::cow_file<st::raw_file>::open(cfg).value();
        BOOST_TEST(cow->size() == size);
        std::vector<std::byte> expect = original;
        auto write = [&](std::uint64_t at, std::size_t n, std::uint32_t seed) {
            const auto d = pattern(n, seed);
            BOOST_REQUIRE(cow->write(at, d));
            std::memcpy(expect.data() + at, d.data(), n);
        };
        write(512, 512, 6);              // partial chunk: copy-up
        write(64 * 1024, 64 * 1024, 7);  // whole chunk: no copy-up
        write(200 * 1024 - 100, 300, 8); // straddles two chunks
        write(size - 512, 512, 9);       // the short last chunk
        BOOST_REQUIRE(cow->write_zeroes(128 * 1024 + 512, 1024));
        std::memset(expect.data() + 128 * 1024 + 512, 0, 1024);
        std::vector<std::byte> all(size);
        BOOST_REQUIRE(cow->read(0, all));
        BOOST_TEST((all == expect));
        BOOST_TEST(cow->overlay_chunks() == 5u);
        BOOST_TEST(cow->write(size - 1, pattern(2, 1)).error() == sm::errc::sector_out_of_range);
        BOOST_REQUIRE(cow->flush());
        BOOST_TEST((sm::test::read_file(base) == original)); // base untouched

        // The overlay state round-trips into a second overlay over the same base.
        const auto state = cow->save_state();
        st::cow_file<st::raw_file>::config cfg2 = cfg;
        if (!in_memory) cfg2.overlay_path = cfg.overlay_path; // same file, bitmap from state
        auto again = st::cow_file<st::raw_file>::open(cfg2).value();
        BOOST_REQUIRE(again->restore_state(state));
        std::vector<std::byte> all2(size);
        BOOST_REQUIRE(again->read(0, all2));
        BOOST_TEST((all2 == expect));
        // Hostile state records.
        for (std::size_t cut : {std::size_t{0}, std::size_t{10}, state.size() - 1})
            BOOST_TEST(!again->restore_state(std::span(state).first(cut)).has_value());
        auto wrong = state;
        wrong[4] = std::byte{0x55}; // size mismatch
        BOOST_TEST(again->restore_state(wrong).error() == sm::errc::snapshot_mismatch);
    }
}

BOOST_AUTO_TEST_CASE(cow_rejects_bad_chunk_sizes) {
    sm::test::temp_dir dir;
    sm::test::write_file(dir.file("b"), pattern(8192, 1));
    BOOST_TEST(!st::cow_file<st::raw_file>::open({{dir.file("b"), true}, "", 3000}).has_value());
    BOOST_TEST(!st::cow_file<st::raw_file>::open({{dir.file("b"), true}, "", 1024}).has_value());
}

BOOST_AUTO_TEST_SUITE_END()
