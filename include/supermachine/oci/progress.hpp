#pragma once
// Progress reports from pulls: one event per state change and per chunk.
#include <supermachine/oci/digest.hpp>

#include <cstdint>
#include <functional>
#include <string>

namespace supermachine::oci {

struct progress_event {
    enum class phase {
        started,   // about to fetch; `done` > 0 when resuming a partial download
        progress,  // `done` bytes of `total` so far
        completed, // verified and stored
        cached,    // already in the content store: nothing fetched
    };
    phase state = phase::started;
    oci::digest digest;
    std::string kind;        // "manifest", "config", "layer"
    std::int64_t total = -1; // descriptor size, -1 if unknown
    std::int64_t done = 0;
};

using progress_callback = std::function<void(const progress_event&)>;

} // namespace supermachine::oci
