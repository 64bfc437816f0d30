#pragma once
// The conformance guest in count mode on basic_machine<kvm, ...>: its
// console collected in memory, its "count=N" lines parsed.
#include <console_text.hpp>
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

using console = sm::test::console;

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
