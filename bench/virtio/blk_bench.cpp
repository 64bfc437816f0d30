// Requests per second the virtio-blk device core sustains with no guest:
// a synthetic split ring in guest memory, 4 KiB reads, a cow_file disk with
// its overlay in memory over a base file on tmpfs. The "driver" here keeps
// `depth` requests in flight, kicking through the queue's eventfd; the core
// runs on an io_context thread and its pool, exactly as under a transport.
//
// usage: virtio_blk_bench [seconds=3] [depth=64] [io_threads=2] [dir=/dev/shm] [cow|raw]
#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace sm = supermachine;
namespace vio = supermachine::virtio;
namespace st = supermachine::storage;
using cow = st::cow_file<st::raw_file>;

namespace {
struct ring {
    const sm::guest_memory& memory;
    vio::queue_layout layout;
    std::uint64_t data_base;
    std::uint16_t avail = 0;

    void write16(std::uint64_t a, std::uint16_t v) { memory.write_object(a, v).value(); }
    std::uint16_t used_index() const {
        std::uint16_t v;
        std::memcpy(&v, memory.span(layout.used_ring + 2, 2).value().data(), 2);
        return v;
    }
    // Request slot r: descriptors 3r..3r+2, header/status/data at fixed places.
    void submit(std::uint16_t r, std::uint64_t sector) {
        const std::uint64_t header = data_base + r * 8192, status = header + 16,
                            data = header + 4096;
        memory.write_object(header, vio::blk_request_header{vio::blk_request::in, 0, sector})
            .value();
        const std::uint64_t d = layout.descriptor_table + 3ull * r * 16;
        memory.write_object(d, vio::raw_descriptor{header, 16, 1, std::uint16_t(3 * r + 1)})
            .value();
        memory.write_object(d + 16, vio::raw_descriptor{data, 4096, 3, std::uint16_t(3 * r + 2)})
            .value();
        memory.write_object(d + 32, vio::raw_descriptor{status, 1, 2, 0}).value();
        write16(layout.available_ring + 4 + 2ull * (avail % layout.size), std::uint16_t(3 * r));
        std::atomic_thread_fence(std::memory_order_release);
        write16(layout.available_ring + 2, ++avail);
    }
};
} // namespace

template <class Storage>
int run(double seconds, int depth, std::size_t threads, const std::string& dir, const char* label) {
    constexpr std::uint64_t disk_bytes = 256ull << 20;
    const std::string base = dir + "/sm-blk-bench-" + std::to_string(::getpid());
    {
        std::ofstream f(base, std::ios::binary);
        std::vector<char> chunk(1 << 20);
        for (std::size_t i = 0; i < chunk.size(); ++i)
            chunk[i] = char(i * 131);
        for (std::uint64_t i = 0; i < disk_bytes / chunk.size(); ++i)
            f.write(chunk.data(), chunk.size());
    }

    auto memory = sm::guest_memory::allocate_x86(64 << 20, sm::memory_backing::anonymous).value();
    ring r{memory, {256, 0x100000, 0x101000, 0x102000}, 0x200000};
    auto device =
        vio::blk<cow>::create({cow::config{{base, true}, "", 64 * 1024}, "", 256, threads}).value();
    // Dirty a quarter of the disk, so reads hit both overlay and base.
    {
        std::vector<std::byte> page(4096, std::byte{7});
        for (std::uint64_t at = 0; at < disk_bytes; at += 4 * 64 * 1024)
            (void)device->storage().write(at, page);
    }

    boost::asio::io_context io;
    auto guard = boost::asio::make_work_guard(io);
    const int kick = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    const int irq = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    auto queue = vio::virtqueue::create(memory, r.layout, vio::common_features).value();
    vio::queue_binding binding{&queue, kick, vio::interrupt_sink(sm::interrupt_line(irq))};
    vio::activation act{memory, io.get_executor(), vio::common_features, {&binding, 1}, {}, {}};
    if (!device->activate(act)) return 1;
    std::thread runner([&] { io.run(); });

    auto ring_kick = [&] {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(kick, &one, sizeof one);
    };
    const std::uint64_t sectors = disk_bytes / 512;
    std::uint64_t next_sector = 0, completed = 0;
    std::uint16_t seen_used = 0;
    std::vector<std::uint16_t> free_slots;
    for (int i = 0; i < depth; ++i)
        r.submit(std::uint16_t(i), (next_sector += 8 * 97) % (sectors - 8));
    ring_kick();
    const auto start = std::chrono::steady_clock::now();
    const auto end = start + std::chrono::duration<double>(seconds);
    std::uint64_t kicks = 1;
    while (std::chrono::steady_clock::now() < end) {
        const std::uint16_t used = r.used_index();
        if (used == seen_used) {
            std::this_thread::yield();
            continue;
        }
        std::atomic_thread_fence(std::memory_order_acquire);
        for (; seen_used != used; ++seen_used) {
            std::uint32_t id;
            std::memcpy(
                &id,
                memory.span(r.layout.used_ring + 4 + 8ull * (seen_used % 256), 4).value().data(),
                4);
            ++completed;
            r.submit(std::uint16_t(id / 3), (next_sector += 8 * 97) % (sectors - 8));
        }
        ring_kick();
        ++kicks;
    }
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    device->reset();
    guard.reset();
    io.stop();
    runner.join();
    ::unlink(base.c_str());
    std::printf("virtio-blk core, %s on %s, 4 KiB reads, depth %d, %zu I/O threads:\n", label,
                dir.c_str(), depth, threads);
    std::printf("  %.0f requests/s  (%.1f MiB/s), %llu requests in %.2f s, %llu kicks\n",
                completed / elapsed, completed * 4096.0 / elapsed / (1 << 20),
                static_cast<unsigned long long>(completed), elapsed,
                static_cast<unsigned long long>(kicks));
    return 0;
}

int main(int argc, char** argv) {
    const double seconds = argc > 1 ? std::atof(argv[1]) : 3.0;
    const int depth = argc > 2 ? std::atoi(argv[2]) : 64;
    const std::size_t threads = argc > 3 ? std::strtoul(argv[3], nullptr, 10) : 2;
    const std::string dir = argc > 4 ? argv[4] : "/dev/shm";
    const std::string kind = argc > 5 ? argv[5] : "cow";
    if (depth < 1 || depth > 80 || threads < 1 || threads > 64) {
        std::fprintf(stderr, "depth must be 1..80, io_threads 1..64\n");
        return 2;
    }
    if (kind == "raw") return run<st::raw_file>(seconds, depth, threads, dir, "raw_file");
    return run<cow>(seconds, depth, threads, dir, "cow_file<raw_file> (memory overlay)");
}
