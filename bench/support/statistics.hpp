#pragma once
// What every benchmark here reports: medians of wall-clock samples.
#include <algorithm>
#include <chrono>
#include <limits>
#include <vector>

namespace supermachine::bench {

/// The median (the mean of the two middle samples for an even count); NaN
/// when there are none, so a missing figure prints as "nan", never as 0.
inline double median(std::vector<double> samples) {
    if (samples.empty()) return std::numeric_limits<double>::quiet_NaN();
    std::sort(samples.begin(), samples.end());
    const auto n = samples.size();
    return n % 2 ? samples[n / 2] : (samples[n / 2 - 1] + samples[n / 2]) / 2;
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

} // namespace supermachine::bench
