#pragma once
// Milestones of a start or restore on stderr, for finding where the time
// goes (doc/warm-start.md, "Where the time goes"): with SUPERMACHINE_TRACE
// set, trace_point("what") prints "supermachine-trace: +12.3 ms what",
// milliseconds since the first trace point of the process. Unset, it costs a
// cached flag test.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace supermachine::detail {

inline void trace_point(std::string_view what) {
    static const bool enabled = [] {
        const char* v = std::getenv("SUPERMACHINE_TRACE");
        return v && *v && *v != '0';
    }();
    if (!enabled) return;
    static const auto epoch = std::chrono::steady_clock::now();
    const std::chrono::duration<double, std::milli> since =
        std::chrono::steady_clock::now() - epoch;
    std::fprintf(stderr, "supermachine-trace: +%.1f ms %.*s\n", since.count(),
                 static_cast<int>(what.size()), what.data());
}

} // namespace supermachine::detail
