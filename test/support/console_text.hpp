#pragma once
// A guest's serial console collected in memory (the sink runs on a vCPU
// thread), with the waits and parses the VM tests make of it.
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace supermachine::test {

struct console {
    std::mutex mutex;
    std::string text;

    void append(std::string_view s) {
        std::lock_guard lock(mutex);
        text.append(s);
    }
    std::string snapshot() {
        std::lock_guard lock(mutex);
        return text;
    }
    /// Every complete "count=N" line, in order.
    std::vector<std::uint64_t> counts() {
        const std::string t = snapshot();
        std::vector<std::uint64_t> out;
        std::size_t pos = 0;
        while ((pos = t.find("count=", pos)) != std::string::npos) {
            const std::size_t end = t.find('\n', pos);
            if (end == std::string::npos) break;
            out.push_back(std::stoull(t.substr(pos + 6, end - pos - 6)));
            pos = end;
        }
        return out;
    }
    /// The guest address of the conformance guest's counter ("count: at 0x...").
    std::optional<std::uint64_t> counter_address() {
        const std::string t = snapshot();
        const auto pos = t.find("count: at 0x");
        if (pos == std::string::npos) return std::nullopt;
        return std::stoull(t.substr(pos + 12), nullptr, 16);
    }
    /// Wait until at least `n` count lines arrived (false on timeout).
    bool wait_counts(std::size_t n, std::chrono::seconds timeout = std::chrono::seconds(60)) {
        return wait_until([&] { return counts().size() >= n; }, timeout);
    }
    /// Wait until `needle` appears `times` times (false on timeout).
    bool wait_for(std::string_view needle, std::chrono::seconds timeout = std::chrono::seconds(60),
                  std::size_t times = 1) {
        return wait_until([&] { return occurrences(needle) >= times; }, timeout);
    }
    std::size_t occurrences(std::string_view needle) {
        const std::string t = snapshot();
        std::size_t n = 0;
        for (auto pos = t.find(needle); pos != std::string::npos; pos = t.find(needle, pos + 1))
            ++n;
        return n;
    }

private:
    template <class Done>
    static bool wait_until(Done done, std::chrono::seconds timeout) {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        while (std::chrono::steady_clock::now() < deadline) {
            if (done()) return true;
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
        return done();
    }
};

} // namespace supermachine::test
