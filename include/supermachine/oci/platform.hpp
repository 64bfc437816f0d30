#pragma once
// Platforms ("linux/amd64", "linux/arm64/v8") and matching an index entry
// against the one requested, with the usual normalizations (aarch64 = arm64,
// x86_64 = amd64, arm64's default variant v8).
#include <supermachine/error.hpp>

#include <string>
#include <string_view>

namespace supermachine::oci {

struct platform {
    std::string os = "linux";
    std::string architecture = "amd64";
    std::string variant; // may be empty

    std::string str() const {
        return os + "/" + architecture + (variant.empty() ? "" : "/" + variant);
    }
    friend bool operator==(const platform&, const platform&) = default;
};

namespace detail {
inline std::string normalize_architecture(std::string_view arch) {
    if (arch == "x86_64" || arch == "x86-64") return "amd64";
    if (arch == "aarch64") return "arm64";
    if (arch == "armhf" || arch == "armel") return "arm";
    if (arch == "i386" || arch == "i686") return "386";
    return std::string(arch);
}
inline std::string normalize_variant(std::string_view arch, std::string_view variant) {
    if (arch == "arm64" && (variant == "v8" || variant.empty())) return "";
    if (arch == "amd64" && (variant == "v1" || variant.empty())) return "";
    return std::string(variant);
}
inline bool valid_platform_word(std::string_view s) {
    if (s.empty() || s.size() > 64) return false;
    for (char c : s)
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.'))
            return false;
    return true;
}
} // namespace detail

/// The platform we run: supermachine boots x86-64 guests.
inline platform default_platform() {
    return {"linux", "amd64", ""};
}

/// The platform of the guests this host can run: supermachine boots an
/// x86-64 kernel and has no emulation for other architectures.
inline platform host_platform() {
    return {"linux", "amd64", ""};
}

/// Parse "os/arch[/variant]" (or just "arch", meaning linux/arch).
inline result<platform> parse_platform(std::string_view text) {
    platform p;
    p.variant.clear();
    std::string_view parts[3];
    std::size_t count = 0;
    while (true) {
        if (count == 3) return errc::invalid_argument;
        auto slash = text.find('/');
        parts[count++] = text.substr(0, slash);
        if (slash == std::string_view::npos) break;
        text.remove_prefix(slash + 1);
    }
    for (std::size_t i = 0; i < count; ++i)
        if (!detail::valid_platform_word(parts[i])) return errc::invalid_argument;
    if (count == 1) {
        p.architecture = detail::normalize_architecture(parts[0]);
    } else {
        p.os.assign(parts[0]);
        p.architecture = detail::normalize_architecture(parts[1]);
        if (count == 3) p.variant.assign(parts[2]);
    }
    return p;
}

/// Does an index entry's platform satisfy the requested one? An empty
/// requested variant accepts any variant (docker picks the first listed).
inline bool platform_matches(const platform& wanted, const platform& candidate) {
    if (wanted.os != candidate.os) return false;
    auto arch = detail::normalize_architecture(candidate.architecture);
    if (detail::normalize_architecture(wanted.architecture) != arch) return false;
    if (wanted.variant.empty()) return true;
    return detail::normalize_variant(arch, wanted.variant) ==
           detail::normalize_variant(arch, candidate.variant);
}

/// For an image reached without an index: does its config's platform fit?
/// Configs that do not say are accepted.
inline bool config_platform_fits(const platform& wanted, const platform& config) {
    if (config.architecture.empty()) return true;
    platform candidate = config;
    if (candidate.os.empty()) candidate.os = wanted.os;
    return platform_matches(wanted, candidate);
}

} // namespace supermachine::oci
