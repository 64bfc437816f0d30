#pragma once
// The conformance guest in count mode on basic_machine<kvm, ...>: its
// console collected in memory, its "count=N" lines parsed.
#include <skip.hpp>
#include <supermachine/backend/kvm.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace snapmachine_test {

namespace sm = supermachine;
using machine = sm::basic_machine<sm::backend::kvm, sm::devices::serial, sm::devices::i8042,
                                  sm::devices::acpi_power, sm::virtio::rng>;

inline std::string conformance_bzimage() {
    const char* dir = std::getenv("SUPERMACHINE_BINARY_DIR");
    return std::string(dir ? dir : ".") + "/guest/conformance.bzImage";
}

/// Skip (one line) where the guest cannot run: no KVM, or the guest not built.
inline void require_kvm() {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) sm::test::skip("no /dev/kvm");
    if (::access(conformance_bzimage().c_str(), R_OK) != 0)
        sm::test::skip("conformance guest not built");
}

/// A fresh directory for snapshot files, removed with everything in it.
struct temp_dir {
    std::filesystem::path path;
    temp_dir() {
        std::string t = (std::filesystem::temp_directory_path() / "snapmachine-XXXXXX").string();
        path = ::mkdtemp(t.data());
    }
    ~temp_dir() { std::filesystem::remove_all(path); }
};

/// Console text, filled from the vCPU thread.
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
    /// The guest address of its counter ("count: at 0x...").
    std::optional<std::uint64_t> counter_address() {
        const std::string t = snapshot();
        const auto pos = t.find("count: at 0x");
        if (pos == std::string::npos) return std::nullopt;
        return std::stoull(t.substr(pos + 12), nullptr, 16);
    }
    /// Wait until at least `n` count lines arrived (false on timeout).
    bool wait_counts(std::size_t n, std::chrono::seconds timeout = std::chrono::seconds(60)) {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        while (std::chrono::steady_clock::now() < deadline) {
            if (counts().size() >= n) return true;
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
        return false;
    }
};

inline machine::config count_config(std::shared_ptr<console> out, std::uint64_t memory_mib = 256,
                                    std::uint64_t touch_mib = 0, std::uint64_t every = 1000) {
    machine::config cfg;
    cfg.memory_mib = memory_mib;
    cfg.kernel_path = conformance_bzimage();
    cfg.extra_cmdline = "conformance.mode=count conformance.every=" + std::to_string(every);
    if (touch_mib) cfg.extra_cmdline += " conformance.touch_mib=" + std::to_string(touch_mib);
    std::get<sm::devices::serial::config>(cfg.devices).sink = [out](std::string_view s) {
        out->append(s);
    };
    return cfg;
}

} // namespace snapmachine_test
