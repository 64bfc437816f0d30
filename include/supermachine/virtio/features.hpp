#pragma once
// Numbers from the virtio 1.2 specification shared by every transport and
// device: feature bits, device status bits, device type ids.
#include <cstdint>

namespace supermachine::virtio {

/// Device type ids (virtio 1.2 section 5).
enum class device_type : std::uint32_t {
    invalid = 0,
    network = 1,
    block = 2,
    console = 3,
    entropy = 4,
    vsock = 19,
};

/// Feature bit numbers common to all devices (virtio 1.2 section 6).
namespace feature {
inline constexpr unsigned indirect_descriptors = 28; // VIRTIO_F_INDIRECT_DESC
inline constexpr unsigned event_index = 29;          // VIRTIO_F_EVENT_IDX
inline constexpr unsigned version_1 = 32;            // VIRTIO_F_VERSION_1
inline constexpr unsigned access_platform = 33;      // VIRTIO_F_ACCESS_PLATFORM
inline constexpr unsigned ring_packed = 34;          // VIRTIO_F_RING_PACKED
inline constexpr unsigned in_order = 35;             // VIRTIO_F_IN_ORDER
} // namespace feature

constexpr std::uint64_t feature_bit(unsigned bit) noexcept {
    return std::uint64_t{1} << bit;
}
constexpr bool has_feature(std::uint64_t features, unsigned bit) noexcept {
    return (features & feature_bit(bit)) != 0;
}

/// The transport-independent features every device core here offers: a
/// modern device with split rings, indirect descriptors and event index.
inline constexpr std::uint64_t common_features = feature_bit(feature::version_1) |
                                                 feature_bit(feature::indirect_descriptors) |
                                                 feature_bit(feature::event_index);

/// Device status bits (virtio 1.2 section 2.1).
namespace status {
inline constexpr std::uint32_t acknowledge = 1;
inline constexpr std::uint32_t driver = 2;
inline constexpr std::uint32_t driver_ok = 4;
inline constexpr std::uint32_t features_ok = 8;
inline constexpr std::uint32_t device_needs_reset = 64;
inline constexpr std::uint32_t failed = 128;
} // namespace status

/// Interrupt status bits (virtio-mmio InterruptStatus, PCI ISR).
namespace interrupt_reason {
inline constexpr std::uint32_t used_buffer = 1;
inline constexpr std::uint32_t config_change = 2;
} // namespace interrupt_reason

} // namespace supermachine::virtio
