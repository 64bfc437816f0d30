// libFuzzer target: the virtio-net device core's transmit path (and, with
// echo, its receive path) over guest memory whose every byte comes from the
// fuzzer: descriptor tables, available rings, headers, frames. Asserts the
// core's promises: no access outside guest RAM (ASan), the backend only sees
// frames of legal size, every chain taken is either sent or counted as
// dropped, a frame is never longer than the guest's readable bytes.
#include <supermachine/virtio/net.hpp>
#include <supermachine/virtio/net_loopback.hpp>

#include <boost/asio/io_context.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace vio = supermachine::virtio;
using device = vio::net<vio::net_loopback>;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 8) return 0;
    // Header: queue size exponent, feature/behaviour bits, ring offsets; the rest is RAM.
    const std::uint32_t queue_size = 1u << (data[0] % 9); // 1..256
    const bool indirect = data[1] & 1, event_index = data[1] & 2, echo = data[1] & 4,
               link_down = data[1] & 8, inject = data[1] & 16;
    constexpr std::uint64_t base = 0x4000;
    constexpr std::size_t ram_bytes = 96 * 1024;
    std::vector<std::byte> ram(ram_bytes);
    std::memcpy(ram.data(), data + 8, std::min(size - 8, ram_bytes));
    auto memory = supermachine::guest_memory::view(base, ram);

    // tx rings where the fuzzer says, rx rings in fixed places (its chains still fuzzed).
    const vio::queue_layout tx{queue_size, base + (std::uint64_t(data[2]) << 4),
                               base + 0x2000 + (std::uint64_t(data[3]) << 1),
                               base + 0x4000 + (std::uint64_t(data[4]) << 2)};
    const vio::queue_layout rx{queue_size, base + 0x8000, base + 0x9000, base + 0xa000};
    std::uint64_t features = device::features;
    if (!indirect) features &= ~vio::feature_bit(vio::feature::indirect_descriptors);
    if (!event_index) features &= ~vio::feature_bit(vio::feature::event_index);
    const vio::queue_position start{static_cast<std::uint16_t>(data[5] * 257), data[6], 0, false};
    auto tx_queue = vio::virtqueue::create(memory, tx, features, start);
    auto rx_queue = vio::virtqueue::create(memory, rx, features);
    if (!tx_queue || !rx_queue) return 0;

    device::config config;
    config.rx_queue_frames = 8;
    config.backend.echo = echo;
    config.backend.max_recorded = 64;
    auto dev = device::create(config).value();
    if (link_down) dev->set_link(false);

    boost::asio::io_context io;
    bool broken = false;
    // No kick fds: the queue service polls each queue once at start; echoed
    // frames poll rx again through the executor.
    vio::queue_binding bindings[2] = {{&rx_queue.value(), -1, {}}, {&tx_queue.value(), -1, {}}};
    vio::activation act{memory, io.get_executor(), features, bindings, {}, [&] { broken = true; }};
    if (!dev->activate(act)) std::abort();
    if (inject && size > 16) {
        // A frame from the backend too, of a fuzzer-chosen length (maybe illegal).
        const std::size_t length = std::min<std::size_t>(size - 8, data[7] * 8u);
        dev->backend().inject(std::as_bytes(std::span(data + 8, length)));
    }
    for (int i = 0; i < 64 && io.poll() > 0; ++i)
        io.restart();
    dev->reset();

    const auto c = dev->counters();
    for (const auto& f : dev->backend().take_sent())
        if (f.size() < vio::ethernet_header_bytes || f.size() > 1500 + vio::net_frame_overhead)
            std::abort();
    if (c.tx_bytes > c.tx_frames * (1500 + vio::net_frame_overhead)) std::abort();
    if (!broken && c.tx_frames + c.tx_dropped() !=
                       std::uint16_t(tx_queue.value().position().next_used - start.next_used))
        std::abort(); // every chain taken is accounted for
    if (c.rx_frames > rx_queue.value().position().next_used) std::abort();
    return 0;
}
