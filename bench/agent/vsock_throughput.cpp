// virtio-vsock device throughput, host -> guest, with no VM: a host thread
// writes N MiB (default 1024) into a host-initiated vsock connection; this
// thread plays the guest driver (4 KiB rx buffers like Linux 6.1, credit
// updates every 64 KiB) and runs the device. Beside it, the same stream over
// a loopback Unix socketpair. This is the device's ceiling (no vCPU exits, no
// interrupts), not the in-VM figure, which needs a guest kernel on our vsock.
#include <supermachine/virtio/vsock.hpp>

#include <boost/asio/io_context.hpp>

#include <sys/eventfd.h>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

using namespace supermachine;
using virtio::vsock_header;
namespace asio = boost::asio;

namespace {

constexpr std::uint32_t queue_size = 256;
constexpr std::uint32_t rx_buffer = 44 + 4096;
constexpr std::uint64_t base = 0x100000;

struct driver {
    std::vector<std::byte> storage = std::vector<std::byte>(8 << 20);
    guest_memory memory = guest_memory::view(base, std::span(storage));
    std::array<virtio::queue_layout, 3> layouts{};
    std::array<std::unique_ptr<virtio::virtqueue>, 3> queues;
    std::array<virtio::queue_binding, 3> bindings{};
    std::array<int, 3> kicks{};
    std::uint64_t buffers = 0;
    std::uint16_t rx_seen = 0;
    std::uint32_t tx_slot = 0;

    driver() {
        std::uint64_t at = base;
        for (int q = 0; q < 3; ++q) {
            layouts[q] = {queue_size, at, at + 16 * queue_size, at + 8192};
            at += 16384;
            kicks[q] = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            queues[q] = std::make_unique<virtio::virtqueue>(
                virtio::virtqueue::create(memory, layouts[q], virtio::common_features).value());
            bindings[q] = {queues[q].get(), kicks[q], {}};
        }
        buffers = at;
        for (std::uint32_t i = 0; i < queue_size; ++i)
            post_rx(i, false);
    }
    std::uint64_t rx_address(std::uint32_t id) const {
        return buffers + std::uint64_t{id} * rx_buffer;
    }
    void add(int q, std::uint32_t slot, std::uint64_t address, std::uint32_t length, bool writable,
             bool kick) {
        virtio::raw_descriptor d{
            address, length,
            static_cast<std::uint16_t>(writable ? virtio::descriptor_flag::write : 0), 0};
        memory.write_object(layouts[q].descriptor_table + 16ull * slot, d).value();
        auto idx = memory.read_object<std::uint16_t>(layouts[q].available_ring + 2).value();
        memory
            .write_object(layouts[q].available_ring + 4 + 2ull * (idx % queue_size),
                          static_cast<std::uint16_t>(slot))
            .value();
        memory.write_object(layouts[q].available_ring + 2, static_cast<std::uint16_t>(idx + 1))
            .value();
        if (kick) {
            const std::uint64_t one = 1;
            [[maybe_unused]] auto n = ::write(kicks[q], &one, sizeof one);
        }
    }
    void post_rx(std::uint32_t id, bool kick) { add(0, id, rx_address(id), rx_buffer, true, kick); }
    void send(const vsock_header& h) {
        std::uint32_t slot = tx_slot++ % queue_size;
        std::uint64_t address = buffers + std::uint64_t{queue_size} * rx_buffer + slot * 64ull;
        memory.write_object(address, h).value();
        add(1, slot, address, sizeof h, false, true);
    }
    vsock_header header(std::uint16_t op, std::uint32_t host_port, std::uint32_t fwd_cnt) {
        vsock_header h{};
        h.src_cid = 3;
        h.dst_cid = virtio::vsock_host_cid;
        h.src_port = 1024;
        h.dst_port = host_port;
        h.type = virtio::vsock_type_stream;
        h.op = op;
        h.buf_alloc = 256 * 1024;
        h.fwd_cnt = fwd_cnt;
        return h;
    }
    /// Consumes used rx buffers; returns (payload bytes, request packet port if one arrived).
    std::pair<std::uint64_t, std::uint32_t> drain_rx() {
        std::uint64_t bytes = 0;
        std::uint32_t request_port = 0;
        auto used = memory.read_object<std::uint16_t>(layouts[0].used_ring + 2).value();
        bool any = false;
        while (rx_seen != used) {
            std::uint64_t e = layouts[0].used_ring + 4 + 8ull * (rx_seen % queue_size);
            auto id = memory.read_object<std::uint32_t>(e).value();
            auto h = memory.read_object<vsock_header>(rx_address(id)).value();
            if (h.op == virtio::vsock_op::rw) bytes += h.len;
            if (h.op == virtio::vsock_op::request) request_port = h.src_port;
            ++rx_seen;
            post_rx(id, false);
            any = true;
        }
        if (any) {
            const std::uint64_t one = 1;
            [[maybe_unused]] auto n = ::write(kicks[0], &one, sizeof one);
        }
        return {bytes, request_port};
    }
};

void write_all(int fd, std::uint64_t total) {
    std::vector<char> chunk(64 * 1024, 'v');
    for (std::uint64_t sent = 0; sent < total;) {
        ssize_t n = ::write(fd, chunk.data(), std::min<std::uint64_t>(chunk.size(), total - sent));
        if (n <= 0) return;
        sent += static_cast<std::uint64_t>(n);
    }
}

double loopback_mib_s(std::uint64_t total) {
    int sv[2];
    ::socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    auto t0 = std::chrono::steady_clock::now();
    std::thread writer([&] { write_all(sv[0], total); });
    std::vector<char> buffer(64 * 1024);
    std::uint64_t got = 0;
    while (got < total) {
        ssize_t n = ::read(sv[1], buffer.data(), buffer.size());
        if (n <= 0) break;
        got += static_cast<std::uint64_t>(n);
    }
    writer.join();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ::close(sv[0]);
    ::close(sv[1]);
    return static_cast<double>(got) / (1 << 20) / s;
}

} // namespace

int main(int argc, char** argv) {
    std::uint64_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024;
    std::uint64_t total = mib << 20;

    asio::io_context io;
    driver d;
    auto device = virtio::vsock::create({}).value();
    virtio::activation act{
        d.memory, io.get_executor(), virtio::common_features, std::span(d.bindings), {}, [] {
            std::fprintf(stderr, "device broken\n");
        }};
    if (!device->activate(act)) return 1;

    std::optional<std::pair<supermachine::error_code, int>> connected;
    device->connect(1024,
                    [&](supermachine::error_code ec, int fd, std::uint32_t) { connected.emplace(ec, fd); });
    std::uint32_t host_port = 0;
    while (!host_port) {
        io.poll();
        host_port = d.drain_rx().second;
    }
    d.send(d.header(virtio::vsock_op::response, host_port, 0));
    while (!connected)
        io.run_one();
    if (connected->first)
        return std::fprintf(stderr, "connect: %s\n", connected->first.message().c_str()), 1;
    int fd = connected->second;
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);

    auto t0 = std::chrono::steady_clock::now();
    std::thread writer([&] { write_all(fd, total); });
    std::uint64_t got = 0, credited = 0;
    while (got < total) {
        io.run_one_for(std::chrono::milliseconds(1));
        io.poll();
        got += d.drain_rx().first;
        if (got - credited >= 64 * 1024) {
            credited = got;
            d.send(d.header(virtio::vsock_op::credit_update, host_port,
                            static_cast<std::uint32_t>(got)));
        }
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    writer.join();
    ::close(fd);
    device->reset();

    double device_rate = static_cast<double>(got) / (1 << 20) / s;
    double loopback = loopback_mib_s(total);
    std::printf("vsock device host->guest (no VM, 4 KiB rx buffers): %.0f MiB/s over %llu MiB\n",
                device_rate, static_cast<unsigned long long>(mib));
    std::printf("unix socketpair loopback (same run):                  %.0f MiB/s\n", loopback);
    std::printf("ratio device/loopback: %.0f%%\n", 100.0 * device_rate / loopback);
    return 0;
}
