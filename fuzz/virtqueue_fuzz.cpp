// libFuzzer target: the split-virtqueue chain walker and ring handling over
// guest memory whose every byte comes from the fuzzer. Asserts the walker's
// promises: no access outside guest RAM (ASan), every segment inside the
// memory, readable segments before writable ones, chains bounded.
#include <supermachine/virtio/virtqueue.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace vio = supermachine::virtio;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 8) return 0;
    // Header: queue size exponent, feature bits, ring offsets; the rest is RAM.
    const std::uint32_t queue_size = 1u << (data[0] % 9); // 1..256
    const bool indirect = data[1] & 1, event_index = data[1] & 2;
    const std::uint16_t pops = data[2];
    constexpr std::uint64_t base = 0x4000;
    constexpr std::size_t ram_bytes = 64 * 1024;
    std::vector<std::byte> ram(ram_bytes);
    std::memcpy(ram.data(), data + 8, std::min(size - 8, ram_bytes));
    auto memory = supermachine::guest_memory::view(base, ram);

    vio::queue_layout layout{queue_size, base + (std::uint64_t(data[3]) << 4),
                             base + 0x2000 + (std::uint64_t(data[4]) << 1),
                             base + 0x4000 + (std::uint64_t(data[5]) << 2)};
    std::uint64_t features = vio::feature_bit(vio::feature::version_1);
    if (indirect) features |= vio::feature_bit(vio::feature::indirect_descriptors);
    if (event_index) features |= vio::feature_bit(vio::feature::event_index);
    vio::queue_position start{static_cast<std::uint16_t>(data[6] * 257), data[7], 0, false};
    auto queue = vio::virtqueue::create(memory, layout, features, start);
    if (!queue) return 0;
    auto& q = queue.value();
    const auto* lo = ram.data();
    const auto* hi = ram.data() + ram.size();
    for (std::uint16_t i = 0; i < pops; ++i) {
        auto popped = q.pop();
        if (!popped || !popped.value()) break;
        auto& c = *popped.value();
        std::uint32_t written = 0;
        if (c.chain) {
            const auto& chain = c.chain.value();
            bool seen_writable = false;
            for (const auto& s : chain.segments()) {
                if (s.host.data() < lo || s.host.data() + s.host.size() > hi) std::abort();
                if (s.host.size() != s.length) std::abort();
                if (!s.device_writable && seen_writable) std::abort();
                seen_writable |= s.device_writable;
            }
            if (chain.segments().size() > queue_size + vio::max_indirect_descriptors) std::abort();
            // Exercise the stream helpers over what was validated.
            vio::chain_reader reader(chain.readable());
            std::uint8_t scratch[64];
            (void)reader.read(
                std::as_writable_bytes(std::span(scratch))
                    .first(std::min<std::size_t>(sizeof scratch, reader.remaining())));
            vio::chain_writer writer(chain.writable());
            const std::uint8_t fill[32] = {};
            (void)writer.write(std::as_bytes(std::span(fill))
                                   .first(std::min<std::size_t>(sizeof fill, writer.remaining())));
            written = static_cast<std::uint32_t>(writer.written());
        }
        if (!q.push_used(c.head, written)) break;
        (void)q.should_notify();
        (void)q.enable_notifications();
    }
    return 0;
}
