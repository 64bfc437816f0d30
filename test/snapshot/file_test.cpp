// Snapshot files and the memory store on the real filesystem: atomic
// sparse writes, validating lazy private restores, and their costs.
#include "sample.hpp"

#include <supermachine/memory.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/snapshot/memory_store.hpp>

#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

namespace s = supermachine::snapshot;
namespace t = supermachine::test;
namespace fs = std::filesystem;
using supermachine::errc;
using supermachine::guest_memory;

namespace {

constexpr std::uint64_t mib = 1u << 20;

struct temp_dir {
    fs::path path;
    temp_dir() {
        std::string pattern = (fs::temp_directory_path() / "supermachine-snapshot-XXXXXX").string();
        path = ::mkdtemp(pattern.data());
    }
    ~temp_dir() {
        std::error_code ignored;
        fs::remove_all(path, ignored);
    }
};

std::uint64_t allocated_bytes(const fs::path& p) {
    struct stat st {};
    BOOST_REQUIRE(::stat(p.c_str(), &st) == 0);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

std::uint64_t status_kib(const char* key) {
    std::ifstream status("/proc/self/status");
    std::string line;
    const std::string prefix = std::string(key) + ":";
    while (std::getline(status, line))
        if (line.rfind(prefix, 0) == 0) return std::stoull(line.substr(prefix.size()));
    return 0;
}

std::size_t entries(const fs::path& dir) {
    return static_cast<std::size_t>(
        std::distance(fs::directory_iterator(dir), fs::directory_iterator()));
}

/// A guest whose RAM has `touched` bytes of non-zero data in 1 MiB chunks spread evenly.
guest_memory touched_guest(std::uint64_t size, std::uint64_t touched,
                           supermachine::memory_backing backing) {
    auto memory = guest_memory::allocate_x86(size, backing).value();
    auto ram = memory.host_mapping();
    const std::uint64_t chunks = touched / mib;
    const std::uint64_t stride = size / chunks / mib * mib;
    for (std::uint64_t c = 0; c < chunks; ++c)
        for (std::uint64_t off = 0; off < mib; off += s::page_size)
            ram[c * stride + off + 7] = std::byte(c + 1);
    return memory;
}

s::snapshot_image image_of(const guest_memory& memory) {
    return s::snapshot_image::of(memory, t::sample_records(memory.size()));
}

void write_bytes(const fs::path& p, std::span<const std::byte> bytes) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
}

errc read_error(const fs::path& p) {
    auto r = s::read_snapshot(p);
    return r ? errc::success : errc(r.error().value());
}

} // namespace

BOOST_AUTO_TEST_SUITE(snapshot_file)

BOOST_AUTO_TEST_CASE(write_then_read_round_trips_and_leaves_no_temp_file) {
    temp_dir dir;
    auto memory = touched_guest(16 * mib, 4 * mib, supermachine::memory_backing::memfd);
    const auto image = image_of(memory);
    const auto path = dir.path / "vm.snap";
    auto stats = s::write_snapshot(path, image);
    BOOST_REQUIRE(stats.has_value());
    BOOST_TEST(stats.value().ram_data_bytes == 4 * mib);
    BOOST_TEST(entries(dir.path) == 1u);

    auto loaded = s::read_snapshot(path);
    BOOST_REQUIRE(loaded.has_value());
    BOOST_TEST((loaded.value().records == image.records));
    auto ram = loaded.value().memory.host_mapping();
    BOOST_REQUIRE(ram.size() == memory.size());
    BOOST_TEST(std::equal(ram.begin(), ram.end(), memory.host_mapping().begin()));
    BOOST_TEST(loaded.value().memory.regions().size() == 1u);
    BOOST_TEST(loaded.value().memory.read_object<std::uint8_t>(7).value() ==
               1u); // guest-physical view

    // Replacing an existing snapshot: readers see the new one.
    memory.host_mapping()[7] = std::byte{0x99};
    BOOST_REQUIRE(s::write_snapshot(path, image_of(memory)).has_value());
    BOOST_TEST(s::read_snapshot(path).value().memory.read_object<std::uint8_t>(7).value() == 0x99u);
    BOOST_TEST(entries(dir.path) == 1u);
}

BOOST_AUTO_TEST_CASE(failed_writes_leave_nothing_behind) {
    temp_dir dir;
    auto memory = touched_guest(16 * mib, 1 * mib, supermachine::memory_backing::anonymous);
    auto image = image_of(memory);
    image.records.machine.memory_size = 32 * mib; // does not match the RAM
    BOOST_TEST((s::write_snapshot(dir.path / "a.snap", image).error() == errc::invalid_argument));
    image = image_of(memory);
    image.records.vcpus[0].state.resize(s::max_vcpu_state_bytes + 1);
    BOOST_TEST((s::write_snapshot(dir.path / "b.snap", image).error() == errc::snapshot_too_large));
    BOOST_TEST(entries(dir.path) == 0u);
    BOOST_TEST(!s::write_snapshot(dir.path / "missing" / "c.snap", image_of(memory)).has_value());
}

BOOST_AUTO_TEST_CASE(every_truncation_of_a_file_is_a_clean_error) {
    temp_dir dir;
    const auto ram = t::sample_ram(4 * s::page_size);
    const auto file = s::encode_snapshot(t::sample_records(ram.size()), ram).value();
    const auto path = dir.path / "t.snap";
    write_bytes(path, file);
    BOOST_REQUIRE(s::read_snapshot(path).has_value());
    const int fd = ::open(path.c_str(), O_RDWR);
    BOOST_REQUIRE(fd >= 0);
    for (std::size_t n = file.size(); n-- > 0;) { // shrinking keeps the prefix
        BOOST_REQUIRE(::ftruncate(fd, static_cast<off_t>(n)) == 0);
        BOOST_TEST_REQUIRE((read_error(path) == errc::snapshot_truncated), "length " << n);
    }
    ::close(fd);
}

BOOST_AUTO_TEST_CASE(hostile_headers_through_the_file_path) {
    temp_dir dir;
    const auto ram = t::sample_ram(4 * s::page_size);
    const auto file = s::encode_snapshot(t::sample_records(ram.size()), ram).value();
    const auto header = s::decode_header(file).value();

    auto past_eof = header;
    past_eof.ram_offset = file.size() + s::page_size;
    auto edited = file;
    auto bytes = s::encode_header(past_eof);
    std::copy(bytes.begin(), bytes.end(), edited.begin());
    write_bytes(dir.path / "eof.snap", edited);
    BOOST_TEST((read_error(dir.path / "eof.snap") == errc::snapshot_truncated));

    auto huge = header;
    huge.ram_size = std::uint64_t{1} << 39; // claims 512 GiB of RAM in a 20 KiB file
    bytes = s::encode_header(huge);
    edited = file;
    std::copy(bytes.begin(), bytes.end(), edited.begin());
    write_bytes(dir.path / "huge.snap", edited);
    BOOST_TEST((read_error(dir.path / "huge.snap") == errc::snapshot_truncated));

    edited = file;
    edited[1] = std::byte{'X'};
    write_bytes(dir.path / "magic.snap", edited);
    BOOST_TEST((read_error(dir.path / "magic.snap") == errc::snapshot_bad_magic));

    edited = file;
    edited[8] = std::byte{7};
    write_bytes(dir.path / "version.snap", edited);
    BOOST_TEST((read_error(dir.path / "version.snap") == errc::snapshot_unsupported_version));

    BOOST_TEST((read_error(dir.path) == errc::invalid_argument)); // a directory
    BOOST_TEST(!s::read_snapshot(dir.path / "absent.snap").has_value());
}

BOOST_AUTO_TEST_CASE(sparse_write_of_1_gib_guest_with_80_mib_touched) {
    temp_dir dir;
    for (auto backing :
         {supermachine::memory_backing::memfd, supermachine::memory_backing::anonymous}) {
        auto memory = touched_guest(1024 * mib, 80 * mib, backing);
        // Pages written with zeros are touched but still become holes.
        auto ram = memory.host_mapping();
        for (std::uint64_t off = 0; off < 40 * mib; off += s::page_size)
            ram[ram.size() / 2 + off + 4096 * 3] = std::byte{0};
        const auto path = dir.path / "sparse.snap";
        const auto start = std::chrono::steady_clock::now();
        auto stats = s::write_snapshot(path, image_of(memory));
        const auto elapsed =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start);
        BOOST_REQUIRE(stats.has_value());
        const auto on_disk = allocated_bytes(path);
        BOOST_TEST_MESSAGE((backing == supermachine::memory_backing::memfd ? "memfd" : "anonymous")
                           << " guest: apparent " << stats.value().file_size / mib
                           << " MiB, data written " << stats.value().ram_data_bytes / mib
                           << " MiB, allocated " << on_disk / 1024 << " KiB, " << elapsed.count()
                           << " ms");
        BOOST_TEST(stats.value().file_size >= 1024 * mib);
        BOOST_TEST(stats.value().ram_data_bytes == 80 * mib);
        BOOST_TEST(on_disk >= 80 * mib);
        BOOST_TEST(on_disk <= 82 * mib);
        // And it reads back.
        auto loaded = s::read_snapshot(path);
        BOOST_REQUIRE(loaded.has_value());
        BOOST_TEST(loaded.value().memory.read_object<std::uint8_t>(7).value() == 1u);
    }
}

BOOST_AUTO_TEST_CASE(restore_of_2_gib_guest_reads_only_the_touched_8_mib) {
    temp_dir dir;
    const auto path = dir.path / "big.snap";
    {
        auto memory = touched_guest(2048 * mib, 8 * mib, supermachine::memory_backing::memfd);
        BOOST_REQUIRE(s::write_snapshot(path, image_of(memory)).has_value());
    }
    // Drop the file from the page cache so the restore really reads it.
    {
        const int fd = ::open(path.c_str(), O_RDONLY);
        BOOST_REQUIRE(fd >= 0);
        ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        ::close(fd);
    }
    rusage before{}, after{};
    const auto rss_start = status_kib("VmRSS");
    ::getrusage(RUSAGE_SELF, &before);
    const auto start = std::chrono::steady_clock::now();
    auto loaded = s::read_snapshot(path);
    const auto restore_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start);
    BOOST_REQUIRE(loaded.has_value());
    const auto rss_mapped = status_kib("VmRSS");

    // The guest touches what it had touched: 8 chunks of 1 MiB.
    const auto ram = loaded.value().memory.host_mapping();
    BOOST_REQUIRE(ram.size() == 2048 * mib);
    const std::uint64_t stride = 2048 * mib / 8;
    unsigned sum = 0;
    for (std::uint64_t c = 0; c < 8; ++c)
        for (std::uint64_t off = 0; off < mib; off += s::page_size)
            sum += std::to_integer<unsigned>(ram[c * stride + off + 7]);
    ::getrusage(RUSAGE_SELF, &after);
    const auto rss_touched = status_kib("VmRSS");
    BOOST_TEST_MESSAGE("2 GiB restore: open+validate+map "
                       << restore_ms.count() << " ms, RSS +" << (rss_mapped - rss_start)
                       << " KiB after mapping, +" << (rss_touched - rss_start)
                       << " KiB after touching 8 MiB; faults major "
                       << (after.ru_majflt - before.ru_majflt) << " minor "
                       << (after.ru_minflt - before.ru_minflt));
    BOOST_TEST(sum == 256u * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8));
    BOOST_TEST(rss_mapped - rss_start < 1024u);       // mapping reads no RAM
    BOOST_TEST(rss_touched - rss_start >= 8u * 1024); // the touched pages came in
    BOOST_TEST(rss_touched - rss_start < 12u * 1024); // and little else (read-around)
}

BOOST_AUTO_TEST_CASE(two_restores_from_one_file_are_private) {
    temp_dir dir;
    auto memory = touched_guest(16 * mib, 2 * mib, supermachine::memory_backing::memfd);
    s::file_store store(dir.path / "shared.snap");
    BOOST_REQUIRE(store.save(image_of(memory)).has_value());
    auto a = store.load();
    auto b = store.load();
    BOOST_REQUIRE(a.has_value());
    BOOST_REQUIRE(b.has_value());
    BOOST_REQUIRE(a.value().memory.write_object<std::uint32_t>(0x1000, 0xfeedface).has_value());
    BOOST_REQUIRE(a.value().memory.write_object<std::uint32_t>(7, 0x12345678).has_value());
    BOOST_TEST(a.value().memory.read_object<std::uint32_t>(0x1000).value() == 0xfeedfaceu);
    BOOST_TEST(b.value().memory.read_object<std::uint32_t>(0x1000).value() == 0u);
    BOOST_TEST(b.value().memory.read_object<std::uint8_t>(7).value() == 1u);
    // The file is unchanged, and a third restore sees the original.
    const int fd = ::open(store.path().c_str(), O_RDONLY);
    std::uint8_t byte = 0;
    BOOST_REQUIRE(::pread(fd, &byte, 1, static_cast<off_t>(a.value().header.ram_offset + 7)) == 1);
    ::close(fd);
    BOOST_TEST(byte == 1u);
    BOOST_TEST(store.load().value().memory.read_object<std::uint8_t>(7).value() == 1u);
}

BOOST_AUTO_TEST_CASE(concurrent_restores_from_one_file_each_see_their_own_writes) {
    temp_dir dir;
    auto memory = touched_guest(64 * mib, 4 * mib, supermachine::memory_backing::memfd);
    s::file_store store(dir.path / "pool.snap");
    BOOST_REQUIRE(store.save(image_of(memory)).has_value());
    constexpr int machines = 8;
    std::vector<std::thread> threads;
    std::atomic<int> ok{0};
    for (int id = 0; id < machines; ++id)
        threads.emplace_back([&, id] {
            auto loaded = store.load();
            if (!loaded) return;
            const auto& mem = loaded.value().memory;
            for (int round = 0; round < 100; ++round) {
                const std::uint64_t address = 0x10000 + static_cast<std::uint64_t>(round) * 4096;
                if (mem.read_object<std::uint32_t>(address).value() != 0)
                    return; // untouched in the image
                (void)mem.write_object<std::uint32_t>(address, static_cast<std::uint32_t>(id + 1));
                std::this_thread::yield();
                if (mem.read_object<std::uint32_t>(address).value() !=
                    static_cast<std::uint32_t>(id + 1))
                    return;
            }
            if (mem.read_object<std::uint8_t>(7).value() != 1) return;
            ++ok;
        });
    for (auto& thread : threads)
        thread.join();
    BOOST_TEST(ok.load() == machines);
}

BOOST_AUTO_TEST_CASE(snapshot_of_a_restored_guest_skips_unwritten_source_holes) {
    temp_dir dir;
    const std::uint64_t size = 512 * mib;
    {
        auto memory = touched_guest(size, 8 * mib, supermachine::memory_backing::memfd);
        BOOST_REQUIRE(s::write_snapshot(dir.path / "first.snap", image_of(memory)).has_value());
    }
    auto loaded = s::read_snapshot(dir.path / "first.snap");
    BOOST_REQUIRE(loaded.has_value());
    BOOST_REQUIRE(loaded.value().source);
    auto& memory = loaded.value().memory;
    auto ram = memory.host_mapping();
    // The restored guest: writes data into a former hole, zeroes one data
    // page, reads (but does not write) a few holes, leaves the rest alone.
    ram[300 * mib + 5] = std::byte{0xee};
    const std::uint64_t stride = size / 8;
    for (std::uint64_t i = 0; i < s::page_size; ++i)
        ram[stride + 4 * s::page_size + i] = std::byte{0};
    unsigned sum = 0;
    for (std::uint64_t off = 0; off < 4 * mib; off += s::page_size)
        sum += std::to_integer<unsigned>(ram[200 * mib + off]);
    BOOST_TEST(sum == 0u);

    const auto rss_before = status_kib("VmRSS");
    auto image = s::snapshot_image::of(memory, t::sample_records(size), loaded.value().source);
    auto stats = s::write_snapshot(dir.path / "second.snap", image);
    const auto rss_after = status_kib("VmRSS");
    BOOST_REQUIRE(stats.has_value());
    BOOST_TEST_MESSAGE("re-snapshot of a restored 512 MiB guest: wrote "
                       << stats.value().ram_data_bytes / 1024 << " KiB, RSS +"
                       << (rss_after - rss_before) << " KiB");
    BOOST_TEST(stats.value().ram_data_bytes == 8 * mib); // -1 zeroed page +1 new page
    BOOST_TEST(rss_after - rss_before < 16u * 1024);     // did not read the 504 MiB of holes

    auto again = s::read_snapshot(dir.path / "second.snap");
    BOOST_REQUIRE(again.has_value());
    const auto copy = again.value().memory.host_mapping();
    BOOST_TEST(std::memcmp(copy.data(), ram.data(), ram.size()) == 0);
    BOOST_TEST(allocated_bytes(dir.path / "second.snap") <= 9 * mib);
}

BOOST_AUTO_TEST_CASE(memory_store_is_sealed_sparse_and_private) {
    s::memory_store store;
    BOOST_TEST((store.load().error() == errc::not_found));
    auto memory = touched_guest(256 * mib, 4 * mib, supermachine::memory_backing::memfd);
    BOOST_REQUIRE(store.save(image_of(memory)).has_value());
    BOOST_TEST(store.allocated_bytes() >= 4 * mib);
    BOOST_TEST(store.allocated_bytes() < 5 * mib);
    auto a = store.load();
    auto b = store.load();
    BOOST_REQUIRE(a.has_value());
    BOOST_REQUIRE(b.has_value());
    BOOST_TEST((a.value().records == t::sample_records(256 * mib)));
    BOOST_REQUIRE(a.value().memory.write_object<std::uint8_t>(7, 0x55).has_value());
    BOOST_TEST(b.value().memory.read_object<std::uint8_t>(7).value() == 1u);
    BOOST_TEST(::ftruncate(store.native_handle(), 0) != 0); // sealed: restores can never SIGBUS
    auto copy = store;                                      // copies share the image
    BOOST_TEST(copy.load().value().memory.read_object<std::uint8_t>(7).value() == 1u);
}

BOOST_AUTO_TEST_SUITE_END()
