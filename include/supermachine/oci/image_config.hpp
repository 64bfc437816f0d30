#pragma once
// The image configuration (OCI image config / Docker container config): what
// to run and how, plus the rootfs diff_ids. Parsed from bounded JSON.
#include <supermachine/error.hpp>
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/manifest.hpp>
#include <supermachine/oci/platform.hpp>

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::oci {

struct image_config {
    oci::platform platform;
    // nullopt = not set (docker's override rules distinguish it from []).
    std::optional<std::vector<std::string>> entrypoint;
    std::optional<std::vector<std::string>> cmd;
    std::vector<std::string> env; // "KEY=value"
    std::string working_dir;
    std::string user;
    std::vector<std::string> exposed_ports; // "80/tcp"
    std::vector<std::string> volumes;
    std::map<std::string, std::string> labels;
    std::string stop_signal;
    std::vector<digest> diff_ids; // uncompressed layer digests, in order
};

namespace detail {
inline result<std::optional<std::vector<std::string>>>
parse_string_list(const nlohmann::json& object, const char* key, std::size_t limit = 65536) {
    auto it = object.find(key);
    if (it == object.end() || it->is_null()) return std::optional<std::vector<std::string>>();
    if (!it->is_array() || it->size() > limit) return errc::manifest_invalid;
    std::vector<std::string> out;
    for (const auto& v : *it) {
        if (!v.is_string()) return errc::manifest_invalid;
        out.push_back(v.get<std::string>());
    }
    return std::optional(std::move(out));
}
inline result<std::vector<std::string>> parse_key_set(const nlohmann::json& object,
                                                      const char* key) {
    std::vector<std::string> out;
    auto it = object.find(key);
    if (it == object.end() || it->is_null()) return out;
    if (!it->is_object() || it->size() > 65536) return errc::manifest_invalid;
    for (auto& [k, v] : it->items())
        out.push_back(k);
    return out;
}
} // namespace detail

inline result<image_config> parse_image_config(std::string_view bytes) {
    auto parsed = detail::parse_bounded_json(bytes, max_config_bytes);
    if (!parsed) return errc::manifest_invalid;
    const auto& j = *parsed;
    image_config c;
    SUPERMACHINE_TRY(os, detail::optional_string(j, "os"));
    SUPERMACHINE_TRY(arch, detail::optional_string(j, "architecture"));
    SUPERMACHINE_TRY(variant, detail::optional_string(j, "variant"));
    c.platform = {std::move(os), std::move(arch), std::move(variant)};

    if (auto config = j.find("config"); config != j.end() && !config->is_null()) {
        if (!config->is_object()) return errc::manifest_invalid;
        SUPERMACHINE_TRY(entrypoint, detail::parse_string_list(*config, "Entrypoint"));
        SUPERMACHINE_TRY(cmd, detail::parse_string_list(*config, "Cmd"));
        SUPERMACHINE_TRY(env, detail::parse_string_list(*config, "Env"));
        SUPERMACHINE_TRY(working_dir, detail::optional_string(*config, "WorkingDir"));
        SUPERMACHINE_TRY(user, detail::optional_string(*config, "User"));
        SUPERMACHINE_TRY(ports, detail::parse_key_set(*config, "ExposedPorts"));
        SUPERMACHINE_TRY(volumes, detail::parse_key_set(*config, "Volumes"));
        SUPERMACHINE_TRY(labels, detail::parse_string_map(*config, "Labels"));
        SUPERMACHINE_TRY(stop_signal, detail::optional_string(*config, "StopSignal"));
        c.entrypoint = std::move(entrypoint);
        c.cmd = std::move(cmd);
        if (env) c.env = std::move(*env);
        c.working_dir = std::move(working_dir);
        c.user = std::move(user);
        c.exposed_ports = std::move(ports);
        c.volumes = std::move(volumes);
        c.labels = std::move(labels);
        c.stop_signal = std::move(stop_signal);
    }
    if (auto rootfs = j.find("rootfs"); rootfs != j.end() && !rootfs->is_null()) {
        if (!rootfs->is_object()) return errc::manifest_invalid;
        SUPERMACHINE_TRY(ids, detail::parse_string_list(*rootfs, "diff_ids", max_layers));
        if (ids)
            for (const auto& id : *ids) {
                auto d = digest::parse(id);
                if (!d) return errc::manifest_invalid;
                c.diff_ids.push_back(std::move(d).value());
            }
    }
    return c;
}

} // namespace supermachine::oci
