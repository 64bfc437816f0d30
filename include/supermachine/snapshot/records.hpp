#pragma once
// The records a snapshot body holds, each described once (fields()) for the
// codec in codec.hpp, with the bound of every variable-size field.
//
// vCPU and interrupt-controller state are opaque byte blobs here: the
// hypervisor backend defines their contents (KVM: regs, sregs, XSAVE, XCRs,
// MSRs, LAPIC, MP state, events, debug regs; PIC, IOAPIC, PIT, clock); the
// container only stores them, bounded.
#include <supermachine/snapshot/codec.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace supermachine::snapshot {

inline constexpr std::uint64_t page_size = 4096;

// Bounds on what a snapshot may claim; a reader refuses larger values before
// allocating anything.
inline constexpr std::uint32_t max_vcpus = 256;
inline constexpr std::uint64_t max_vcpu_state_bytes = 1u << 20;
inline constexpr std::uint64_t max_interrupt_controller_state_bytes = 1u << 20;
inline constexpr std::uint64_t max_kernel_identity_bytes = 1024;
inline constexpr std::uint32_t max_virtio_devices = 64;
inline constexpr std::uint32_t max_virtqueues = 64;
inline constexpr std::uint64_t max_device_state_bytes = 1u << 20;
inline constexpr std::uint64_t max_path_bytes = 4096;
inline constexpr std::uint64_t max_overlay_state_bytes = 64u << 20;
inline constexpr std::uint64_t max_uart_fifo_bytes = 4096;
inline constexpr std::uint64_t max_agent_token_bytes = 1024;
inline constexpr std::uint32_t max_port_forwards = 1024;
/// Guest RAM larger than this (1 TiB) is refused (matches guest_memory).
inline constexpr std::uint64_t max_memory_bytes = std::uint64_t{1} << 40;

/// What machine the snapshot is of.
struct machine_record {
    std::uint32_t vcpu_count = 0;
    std::uint64_t memory_size = 0; // bytes; equals the RAM region of the file
    /// Identifies the kernel/boot configuration the snapshot was taken from
    /// (e.g. a digest of kernel, initrd and cmdline); the restorer compares it.
    std::string kernel_identity;

    static constexpr auto fields() {
        return std::tuple{field(&machine_record::vcpu_count), field(&machine_record::memory_size),
                          field(&machine_record::kernel_identity, max_kernel_identity_bytes)};
    }
    constexpr codec_result<void> validate() const {
        if (vcpu_count == 0 || vcpu_count > max_vcpus) return errc::snapshot_bad_record;
        if (memory_size == 0 || memory_size % page_size != 0 || memory_size > max_memory_bytes)
            return errc::snapshot_bad_record;
        return {};
    }
    friend constexpr bool operator==(const machine_record&, const machine_record&) = default;
};

/// One vCPU's architectural state, opaque to the container.
struct vcpu_record {
    std::uint32_t index = 0;
    std::vector<std::byte> state;

    static constexpr auto fields() {
        return std::tuple{field(&vcpu_record::index),
                          field(&vcpu_record::state, max_vcpu_state_bytes)};
    }
    friend constexpr bool operator==(const vcpu_record&, const vcpu_record&) = default;
};

/// Interrupt controllers and timers (PIC, IOAPIC, PIT, clock), opaque.
struct interrupt_controller_record {
    std::vector<std::byte> state;

    static constexpr auto fields() {
        return std::tuple{
            field(&interrupt_controller_record::state, max_interrupt_controller_state_bytes)};
    }
    friend constexpr bool operator==(const interrupt_controller_record&,
                                     const interrupt_controller_record&) = default;
};

/// The 16550 UART's registers and receive FIFO.
struct uart_record {
    std::uint8_t divisor_latch_low = 0;
    std::uint8_t divisor_latch_high = 0;
    std::uint8_t interrupt_enable = 0;
    std::uint8_t interrupt_identification = 0;
    std::uint8_t fifo_control = 0;
    std::uint8_t line_control = 0;
    std::uint8_t modem_control = 0;
    std::uint8_t line_status = 0;
    std::uint8_t modem_status = 0;
    std::uint8_t scratch = 0;
    bool transmit_interrupt_pending = false;
    std::vector<std::byte> receive_fifo;

    static constexpr auto fields() {
        using r = uart_record;
        return std::tuple{field(&r::divisor_latch_low),
                          field(&r::divisor_latch_high),
                          field(&r::interrupt_enable),
                          field(&r::interrupt_identification),
                          field(&r::fifo_control),
                          field(&r::line_control),
                          field(&r::modem_control),
                          field(&r::line_status),
                          field(&r::modem_status),
                          field(&r::scratch),
                          field(&r::transmit_interrupt_pending),
                          field(&r::receive_fifo, max_uart_fifo_bytes)};
    }
    friend constexpr bool operator==(const uart_record&, const uart_record&) = default;
};

/// Virtio device types (the virtio device IDs) a snapshot may hold.
enum class virtio_device_kind : std::uint32_t {
    net = 1,
    block = 2,
    console = 3,
    entropy = 4,
    vsock = 19,
};

constexpr bool known_virtio_device_kind(virtio_device_kind kind) noexcept {
    switch (kind) {
    case virtio_device_kind::net:
    case virtio_device_kind::block:
    case virtio_device_kind::console:
    case virtio_device_kind::entropy:
    case virtio_device_kind::vsock:
        return true;
    }
    return false;
}

/// One split virtqueue as the transport and device left it.
struct virtqueue_record {
    std::uint16_t index = 0;
    std::uint16_t size = 0;
    bool ready = false;
    std::uint64_t descriptor_table = 0;
    std::uint64_t available_ring = 0;
    std::uint64_t used_ring = 0;
    std::uint16_t next_available = 0; // next avail index the device will read
    std::uint16_t next_used = 0;      // next used index the device will write

    static constexpr auto fields() {
        using r = virtqueue_record;
        return std::tuple{field(&r::index),          field(&r::size),
                          field(&r::ready),          field(&r::descriptor_table),
                          field(&r::available_ring), field(&r::used_ring),
                          field(&r::next_available), field(&r::next_used)};
    }
    constexpr codec_result<void> validate() const {
        if (index >= max_virtqueues) return errc::snapshot_bad_record;
        if (size > 32768 || (size & (size - 1)) != 0) return errc::snapshot_bad_record;
        return {};
    }
    friend constexpr bool operator==(const virtqueue_record&, const virtqueue_record&) = default;
};

/// A block device's host backing, inline so a restore needs nothing else.
struct block_backing_record {
    std::string path; // the disk (or the read-only base of a cow overlay)
    std::uint64_t size_bytes = 0;
    bool read_only = false;
    std::vector<std::byte> overlay_state; // the cow overlay's own state; empty if none

    static constexpr auto fields() {
        using r = block_backing_record;
        return std::tuple{field(&r::path, max_path_bytes), field(&r::size_bytes),
                          field(&r::read_only), field(&r::overlay_state, max_overlay_state_bytes)};
    }
    friend constexpr bool operator==(const block_backing_record&,
                                     const block_backing_record&) = default;
};

/// One virtio device: its kind, where it sat, transport and queue state,
/// device state, and (block devices) its host backing.
struct virtio_device_record {
    virtio_device_kind kind = virtio_device_kind::block;
    std::uint64_t mmio_base = 0;
    std::uint32_t gsi = 0;
    std::vector<std::byte> transport_state; // feature bits, status, config generation, ...
    std::vector<virtqueue_record> queues;
    std::vector<std::byte> device_state; // device-specific (config space, vsock cid, ...)
    std::optional<block_backing_record> block_backing;

    static constexpr auto fields() {
        using r = virtio_device_record;
        return std::tuple{field(&r::kind),
                          field(&r::mmio_base),
                          field(&r::gsi),
                          field(&r::transport_state, max_device_state_bytes),
                          field(&r::queues, max_virtqueues),
                          field(&r::device_state, max_device_state_bytes),
                          field(&r::block_backing)};
    }
    constexpr codec_result<void> validate() const {
        if (!known_virtio_device_kind(kind)) return errc::snapshot_bad_record;
        for (std::size_t i = 0; i < queues.size(); ++i)
            for (std::size_t j = i + 1; j < queues.size(); ++j)
                if (queues[i].index == queues[j].index) return errc::snapshot_bad_record;
        return {};
    }
    friend constexpr bool operator==(const virtio_device_record&,
                                     const virtio_device_record&) = default;
};

/// The guest agent's credentials.
struct agent_record {
    std::vector<std::byte> token;
    std::uint32_t vsock_port = 0;

    static constexpr auto fields() {
        return std::tuple{field(&agent_record::token, max_agent_token_bytes),
                          field(&agent_record::vsock_port)};
    }
    friend constexpr bool operator==(const agent_record&, const agent_record&) = default;
};

/// A live port-forward listener: host port -> guest port.
struct port_forward_record {
    std::uint16_t host_port = 0;
    std::uint16_t guest_port = 0;

    static constexpr auto fields() {
        return std::tuple{field(&port_forward_record::host_port),
                          field(&port_forward_record::guest_port)};
    }
    constexpr codec_result<void> validate() const {
        if (guest_port == 0) return errc::snapshot_bad_record;
        return {};
    }
    friend constexpr bool operator==(const port_forward_record&,
                                     const port_forward_record&) = default;
};

/// Everything in a snapshot besides RAM.
struct snapshot_records {
    machine_record machine;
    std::vector<vcpu_record> vcpus; // exactly machine.vcpu_count, indexes 0..n-1 in order
    std::optional<interrupt_controller_record> interrupt_controller;
    std::optional<uart_record> uart;
    std::vector<virtio_device_record> virtio_devices;
    std::optional<agent_record> agent;
    std::vector<port_forward_record> port_forwards;

    friend constexpr bool operator==(const snapshot_records&, const snapshot_records&) = default;
};

} // namespace supermachine::snapshot
