// Restore cost vs guest memory size: a 256 MiB and a 2 GiB guest with the
// same touched pages (16 MiB in 1 MiB chunks at the same guest addresses).
// For each: open + validate + map (read_snapshot), and that plus the first
// touch of every data page, with the file in the page cache (warm) and
// dropped from it (cold, POSIX_FADV_DONTNEED). Medians over N runs (default
// 15); a full read of the RAM region is the eager-restore baseline.
//
//   snapshot_restore_bench [runs] [directory]
#include <supermachine/memory.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/snapshot/memory_store.hpp>

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace s = supermachine::snapshot;
namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t mib = 1u << 20;
constexpr std::uint64_t touched_chunks = 16;     // 16 x 1 MiB
constexpr std::uint64_t chunk_stride = 16 * mib; // inside the first 256 MiB

using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point start) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - start).count();
}

struct summary {
    double median, min, max;
};

summary summarize(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const auto n = v.size();
    const double median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    return {median, v.front(), v.back()};
}

void drop_cache(const fs::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) return;
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
}

fs::path make_snapshot(const fs::path& dir, std::uint64_t memory_size) {
    auto memory = supermachine::guest_memory::allocate_x86(memory_size).value();
    auto ram = memory.host_mapping();
    for (std::uint64_t c = 0; c < touched_chunks; ++c)
        for (std::uint64_t off = 0; off < mib; off += s::page_size)
            ram[c * chunk_stride + off + 1] = std::byte(c + 1);
    s::snapshot_image image;
    image.records.machine = {1, memory_size, "bench"};
    image.records.vcpus = {{0, std::vector<std::byte>(4096, std::byte{1})}};
    image.ram = ram;
    image.ram_fd = memory.backing_fd();
    const auto path = dir / ("guest-" + std::to_string(memory_size / mib) + "mib.snap");
    auto stats = s::write_snapshot(path, image);
    if (!stats) {
        std::fprintf(stderr, "write failed: %s\n", stats.error().message().c_str());
        std::exit(1);
    }
    return path;
}

/// One restore; returns {map ms, map+touch ms}.
template <class Load>
std::pair<double, double> restore_once(Load&& load) {
    const auto start = clock_type::now();
    auto loaded = load();
    const double mapped = ms_since(start);
    if (!loaded) {
        std::fprintf(stderr, "read failed: %s\n", loaded.error().message().c_str());
        std::exit(1);
    }
    const auto ram = loaded.value().memory.host_mapping();
    unsigned sum = 0;
    for (std::uint64_t c = 0; c < touched_chunks; ++c)
        for (std::uint64_t off = 0; off < mib; off += s::page_size)
            sum += std::to_integer<unsigned>(ram[c * chunk_stride + off + 1]);
    const double touched = ms_since(start);
    if (sum != 256u * touched_chunks * (touched_chunks + 1) / 2) std::exit(2);
    return {mapped, touched};
}

double eager_read(const fs::path& path, std::uint64_t memory_size) {
    auto loaded = s::read_snapshot(path).value();
    const int fd = ::open(path.c_str(), O_RDONLY);
    std::vector<char> buffer(8 * mib);
    const auto start = clock_type::now();
    for (std::uint64_t off = 0; off < memory_size; off += buffer.size())
        if (::pread(fd, buffer.data(), buffer.size(),
                    static_cast<off_t>(loaded.header.ram_offset + off)) < 0)
            std::exit(3);
    const double ms = ms_since(start);
    ::close(fd);
    return ms;
}

} // namespace

int main(int argc, char** argv) {
    const int runs = argc > 1 ? std::max(1, std::atoi(argv[1])) : 15;
    fs::path dir;
    if (argc > 2) {
        dir = argv[2];
    } else {
        std::string pattern = (fs::temp_directory_path() / "supermachine-bench-XXXXXX").string();
        dir = ::mkdtemp(pattern.data());
    }
    std::printf("restore cost vs guest memory size, %llu MiB touched, %d runs each (median "
                "[min..max] ms)\n",
                static_cast<unsigned long long>(touched_chunks), runs);
    std::printf("%-8s | %-28s | %-28s | %-28s | %-28s | %-28s | %-28s | %s\n", "guest", "map, warm",
                "map+touch, warm", "map, cold", "map+touch, cold", "memory_store map",
                "memory_store map+touch", "eager read (warm)");
    for (std::uint64_t size : {256 * mib, 2048 * mib}) {
        const auto path = make_snapshot(dir, size);
        std::vector<double> map_warm, touch_warm, map_cold, touch_cold, eager;
        auto from_file = [&] { return s::read_snapshot(path); };
        restore_once(from_file); // warm the cache
        for (int i = 0; i < runs; ++i) {
            auto [m, t] = restore_once(from_file);
            map_warm.push_back(m);
            touch_warm.push_back(t);
        }
        for (int i = 0; i < runs; ++i) {
            drop_cache(path);
            auto [m, t] = restore_once(from_file);
            map_cold.push_back(m);
            touch_cold.push_back(t);
        }
        for (int i = 0; i < std::min(runs, 5); ++i)
            eager.push_back(eager_read(path, size));
        // The same image in a memory_store (a pool's view): no disk at all.
        std::vector<double> map_memory, touch_memory;
        {
            s::memory_store store;
            auto image = s::read_snapshot(path).value();
            if (!store.save(s::snapshot_image::of(image.memory, image.records))) std::exit(4);
            auto from_memory = [&] { return store.load(); };
            for (int i = 0; i < runs; ++i) {
                auto [m, t] = restore_once(from_memory);
                map_memory.push_back(m);
                touch_memory.push_back(t);
            }
        }
        auto print = [](const summary& x) {
            char text[64];
            std::snprintf(text, sizeof text, "%8.3f [%.3f..%.3f]", x.median, x.min, x.max);
            return std::string(text);
        };
        std::printf("%5llu MiB | %-28s | %-28s | %-28s | %-28s | %-28s | %-28s | %s\n",
                    static_cast<unsigned long long>(size / mib), print(summarize(map_warm)).c_str(),
                    print(summarize(touch_warm)).c_str(), print(summarize(map_cold)).c_str(),
                    print(summarize(touch_cold)).c_str(), print(summarize(map_memory)).c_str(),
                    print(summarize(touch_memory)).c_str(), print(summarize(eager)).c_str());
        std::error_code ignored;
        fs::remove(path, ignored);
    }
    if (argc <= 2) fs::remove_all(dir);
    return 0;
}
