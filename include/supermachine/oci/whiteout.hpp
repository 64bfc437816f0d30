#pragma once
// OCI / AUFS whiteouts: ".wh.NAME" deletes NAME from the layers below,
// ".wh..wh..opq" makes its directory opaque (hides everything below).
#include <string_view>

namespace supermachine::oci {

inline constexpr std::string_view whiteout_prefix = ".wh.";
inline constexpr std::string_view opaque_whiteout = ".wh..wh..opq";

enum class whiteout_kind {
    none,     ///< an ordinary entry
    remove,   ///< ".wh.NAME": delete NAME from lower layers
    opaque,   ///< ".wh..wh..opq": hide every lower-layer child of the directory
    internal, ///< other ".wh..wh.*" AUFS bookkeeping (e.g. .wh..wh.plnk): ignored
    invalid,  ///< ".wh." with an empty, "." or ".." target
};

struct whiteout_info {
    whiteout_kind kind = whiteout_kind::none;
    std::string_view target; ///< the hidden name for kind::remove
};

/// Classify a path's last component.
constexpr whiteout_info classify_whiteout(std::string_view base_name) noexcept {
    if (!base_name.starts_with(whiteout_prefix)) return {};
    if (base_name == opaque_whiteout) return {whiteout_kind::opaque, {}};
    if (base_name.starts_with(".wh..wh.")) return {whiteout_kind::internal, {}};
    auto target = base_name.substr(whiteout_prefix.size());
    if (target.empty() || target == "." || target == "..") return {whiteout_kind::invalid, {}};
    return {whiteout_kind::remove, target};
}

} // namespace supermachine::oci
