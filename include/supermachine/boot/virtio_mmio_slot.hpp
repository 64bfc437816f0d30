#pragma once
// One virtio-mmio device as the guest must be told about it: its register
// window and its interrupt (GSI). Described in the DSDT (LNRO0005) and, for
// kernels without ACPI discovery, as virtio_mmio.device= on the cmdline.
#include <cstdint>

namespace supermachine::boot {

struct virtio_mmio_slot {
    std::uint64_t base;
    std::uint64_t size;
    std::uint32_t gsi;
};

} // namespace supermachine::boot
