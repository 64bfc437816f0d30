#pragma once
// What a vm's snapshot attempt did (vm::async_snapshot), either engine's.
#include <chrono>
#include <cstdint>
#include <string>

namespace supermachine {

struct snapshot_report {
    bool saved = false;
    /// Why the snapshot was not taken, in the engine's words (QEMU names
    /// the device, e.g. "State blocked by non-migratable device '...'");
    /// empty when saved.
    std::string refusal;
    std::uint64_t bytes = 0; // what was written: QEMU's migration stream, or the container file
    std::chrono::milliseconds duration{0};
};

} // namespace supermachine
