#pragma once
// A representative record set and helpers to forge snapshot files.
#include <supermachine/snapshot/container.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace supermachine::test {

inline snapshot::snapshot_records sample_records(std::uint64_t memory_size,
                                                 std::uint32_t vcpus = 2) {
    namespace s = snapshot;
    s::snapshot_records r;
    r.machine = {vcpus, memory_size, "sha256:0123456789abcdef kernel+initrd+cmdline"};
    for (std::uint32_t i = 0; i < vcpus; ++i) {
        std::vector<std::byte> state(300 + i * 17);
        for (std::size_t k = 0; k < state.size(); ++k)
            state[k] = std::byte(k * 7 + i);
        r.vcpus.push_back({i, std::move(state)});
    }
    r.interrupt_controller =
        s::interrupt_controller_record{std::vector<std::byte>(64, std::byte{0x5a})};
    s::uart_record uart;
    uart.line_control = 3;
    uart.scratch = 0x42;
    uart.receive_fifo = {std::byte{'o'}, std::byte{'k'}};
    r.uart = uart;
    s::virtio_device_record blk;
    blk.kind = s::virtio_device_kind::block;
    blk.mmio_base = 0xd000'0000;
    blk.gsi = 5;
    blk.transport_state = std::vector<std::byte>(24, std::byte{1});
    blk.queues = {{0, 256, true, 0x10000, 0x11000, 0x12000, 17, 17}};
    blk.device_state = std::vector<std::byte>(8, std::byte{2});
    blk.block_backing = s::block_backing_record{"/var/cache/supermachine/rootfs/abc.ext4", 1u << 30,
                                                true, std::vector<std::byte>(40, std::byte{3})};
    r.virtio_devices.push_back(blk);
    s::virtio_device_record vsock;
    vsock.kind = s::virtio_device_kind::vsock;
    vsock.mmio_base = 0xd000'1000;
    vsock.gsi = 6;
    vsock.queues = {{0, 128, true, 1, 2, 3, 0, 0},
                    {1, 128, true, 4, 5, 6, 0, 0},
                    {2, 128, true, 7, 8, 9, 0, 0}};
    r.virtio_devices.push_back(vsock);
    r.agent = s::agent_record{std::vector<std::byte>(32, std::byte{0xaa}), 1024};
    r.port_forwards = {{8080, 80}, {2222, 22}};
    return r;
}

/// RAM with a recognisable pattern in some pages, zero elsewhere.
inline std::vector<std::byte> sample_ram(std::uint64_t size) {
    std::vector<std::byte> ram(size);
    for (std::uint64_t page = 0; page < size; page += 2 * snapshot::page_size)
        for (std::uint64_t i = 0; i < snapshot::page_size; i += 64)
            ram[page + i] = std::byte(page / 4096 + i + 1);
    return ram;
}

/// A file from a raw body (possibly malformed) and RAM: the header is made
/// consistent (lengths, offsets, checksums) so the body parser is reached.
inline std::vector<std::byte> forge_file(std::span<const std::byte> body,
                                         std::span<const std::byte> ram) {
    namespace s = snapshot;
    s::snapshot_header h;
    h.body_length = body.size();
    h.body_crc32 = s::detail::crc32(body);
    h.ram_offset = s::round_up_to_page(s::header_size + body.size());
    h.ram_size = ram.size();
    std::vector<std::byte> file(h.ram_offset + ram.size());
    const auto head = s::encode_header(h);
    std::copy(head.begin(), head.end(), file.begin());
    std::copy(body.begin(), body.end(), file.begin() + s::header_size);
    std::copy(ram.begin(), ram.end(), file.begin() + static_cast<std::ptrdiff_t>(h.ram_offset));
    return file;
}

/// Recompute the body and header checksums after editing a file in place,
/// so an edit reaches the parser instead of failing the checksum.
inline void reseal(std::vector<std::byte>& file) {
    namespace s = snapshot;
    if (file.size() < s::header_size) return;
    s::byte_reader in(std::span<const std::byte>(file).subspan(24, 8));
    const auto body_length = in.u64().value();
    if (body_length <= file.size() - s::header_size) {
        s::byte_writer w{std::span(file).subspan(48, 4)};
        w.u32(s::detail::crc32(
            std::span<const std::byte>(file).subspan(s::header_size, body_length)));
    }
    s::byte_writer w{std::span(file).subspan(60, 4)};
    w.u32(s::detail::crc32(std::span<const std::byte>(file).first(60)));
}

/// Append one tagged record (raw payload) to a body.
inline void append_record(std::vector<std::byte>& body, std::uint16_t tag, std::uint16_t flags,
                          std::span<const std::byte> payload) {
    std::byte head[8];
    snapshot::byte_writer w(head);
    w.u16(tag);
    w.u16(flags);
    w.u32(static_cast<std::uint32_t>(payload.size()));
    body.insert(body.end(), head, head + 8);
    body.insert(body.end(), payload.begin(), payload.end());
}

} // namespace supermachine::test
