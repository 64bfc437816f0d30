#pragma once
// Which engine runs a VM: the in-process kvm engine (basic_machine on
// backend::kvm) or QEMU. One probe decides "auto" for every caller (vm,
// `run`, `boot`, the tests' linux-kvm wrapper follows the same rule):
// kvm wherever the host's KVM runs Linux, qemu elsewhere.
#include <supermachine/error.hpp>

#include <unistd.h>

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace supermachine {

namespace backend {

enum class engine_kind { kvm, qemu };

struct engine_decision {
    engine_kind kind;
    std::string reason;
};

/// Whether this host's KVM can run a Linux guest. A software KVM (kvm_pvm:
/// /sys/module/kvm_pvm) runs our tiny guests but not Linux (emulation
/// failures at XRSTOR/CMPXCHG16B); no usable /dev/kvm means no KVM at all.
inline bool host_kvm_runs_linux(std::string* why = nullptr) {
    auto say = [&](std::string s) {
        if (why) *why = std::move(s);
    };
    if (::access("/dev/kvm", R_OK | W_OK) != 0) {
        say("/dev/kvm is not usable");
        return false;
    }
    if (std::filesystem::exists("/sys/module/kvm_pvm")) {
        say("the host's KVM is kvm_pvm (software; it cannot run Linux guests)");
        return false;
    }
    say("/dev/kvm is hardware KVM");
    return true;
}

} // namespace backend

/// The engine a caller asks for; strings exist only at the CLI's edge.
enum class engine_choice { automatic, kvm, qemu };

inline std::optional<engine_choice> parse_engine_choice(std::string_view text) {
    if (text == "auto" || text.empty()) return engine_choice::automatic;
    if (text == "kvm") return engine_choice::kvm;
    if (text == "qemu") return engine_choice::qemu;
    return std::nullopt;
}

inline std::string_view to_string(engine_choice c) noexcept {
    switch (c) {
    case engine_choice::kvm:
        return "kvm";
    case engine_choice::qemu:
        return "qemu";
    default:
        return "auto";
    }
}

/// What `choice` means on this host, and why (for --verbose).
inline backend::engine_decision decide_engine(engine_choice choice) {
    if (choice == engine_choice::kvm) return {backend::engine_kind::kvm, "requested"};
    if (choice == engine_choice::qemu) return {backend::engine_kind::qemu, "requested"};
    std::string why;
    const bool kvm = backend::host_kvm_runs_linux(&why);
    return {kvm ? backend::engine_kind::kvm : backend::engine_kind::qemu, "auto: " + why};
}

} // namespace supermachine
