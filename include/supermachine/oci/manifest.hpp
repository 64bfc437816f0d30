#pragma once
// Image manifests and indexes: OCI image manifest / index and Docker v2
// schema 2 manifest / manifest list. Parsed from bounded JSON and validated
// (schemaVersion, mediaType, digests, sizes, counts) before anyone uses them.
#include <supermachine/error.hpp>
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/media_types.hpp>
#include <supermachine/oci/platform.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace supermachine::oci {

inline constexpr std::size_t max_manifest_bytes = 4 << 20; // as containerd and distribution
inline constexpr std::size_t max_config_bytes = 8 << 20;
inline constexpr std::size_t max_json_depth = 64;
inline constexpr std::size_t max_layers = 1024;
inline constexpr std::size_t max_index_entries = 1024;
inline constexpr std::int64_t max_blob_bytes = std::int64_t(64) << 30;

struct descriptor {
    std::string media_type;
    oci::digest digest;
    std::int64_t size = 0;
    std::vector<std::string> urls;
    std::map<std::string, std::string> annotations;
    std::optional<oci::platform> platform; // index entries only
};

struct image_manifest {
    std::string media_type; // oci_manifest or docker_manifest
    descriptor config;
    std::vector<descriptor> layers;
    std::map<std::string, std::string> annotations;

    /// Config plus layers, as stored.
    std::int64_t total_size() const {
        std::int64_t total = config.size;
        for (const auto& layer : layers)
            total += layer.size;
        return total;
    }
};

struct image_index {
    std::string media_type; // oci_index or docker_manifest_list
    std::vector<descriptor> manifests;
    std::map<std::string, std::string> annotations;
};

using any_manifest = std::variant<image_manifest, image_index>;

namespace detail {

/// Reject nesting deeper than `limit` before handing text to a parser.
inline bool json_depth_within(std::string_view text, std::size_t limit) {
    std::size_t depth = 0;
    bool in_string = false, escaped = false;
    for (char c : text) {
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
        } else if (c == '"')
            in_string = true;
        else if (c == '{' || c == '[') {
            if (++depth > limit) return false;
        } else if ((c == '}' || c == ']') && depth > 0)
            --depth;
    }
    return true;
}

/// Parse bounded JSON; null on any error (size, depth, syntax, not an object).
inline std::optional<nlohmann::json> parse_bounded_json(std::string_view text,
                                                        std::size_t max_bytes) {
    if (text.size() > max_bytes || !json_depth_within(text, max_json_depth)) return std::nullopt;
    auto value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (value.is_discarded() || !value.is_object()) return std::nullopt;
    return value;
}

inline result<std::map<std::string, std::string>> parse_string_map(const nlohmann::json& object,
                                                                   const char* key) {
    std::map<std::string, std::string> out;
    auto it = object.find(key);
    if (it == object.end() || it->is_null()) return out;
    if (!it->is_object() || it->size() > 4096) return errc::manifest_invalid;
    for (auto& [k, v] : it->items()) {
        if (!v.is_string()) return errc::manifest_invalid;
        out.emplace(k, v.get<std::string>());
    }
    return out;
}

inline result<std::string> optional_string(const nlohmann::json& object, const char* key) {
    auto it = object.find(key);
    if (it == object.end() || it->is_null()) return std::string();
    if (!it->is_string()) return errc::manifest_invalid;
    return it->get<std::string>();
}

inline result<descriptor> parse_descriptor(const nlohmann::json& j, bool require_media_type) {
    if (!j.is_object()) return errc::manifest_invalid;
    descriptor d;
    SUPERMACHINE_TRY(media_type, optional_string(j, "mediaType"));
    if (media_type.empty() && require_media_type) return errc::manifest_invalid;
    if (media_type.size() > 255) return errc::manifest_invalid;
    d.media_type = std::move(media_type);
    auto digest_it = j.find("digest");
    if (digest_it == j.end() || !digest_it->is_string()) return errc::manifest_invalid;
    auto parsed_digest = digest::parse(digest_it->get_ref<const std::string&>());
    if (!parsed_digest) return errc::manifest_invalid;
    d.digest = std::move(parsed_digest).value();
    auto size_it = j.find("size");
    if (size_it == j.end() || !size_it->is_number_integer()) return errc::manifest_invalid;
    auto size = size_it->get<std::int64_t>();
    if (size < 0 || size > max_blob_bytes) return errc::manifest_invalid;
    if (size_it->is_number_unsigned() &&
        size_it->get<std::uint64_t>() > std::uint64_t(max_blob_bytes))
        return errc::manifest_invalid;
    d.size = size;
    if (auto urls = j.find("urls"); urls != j.end() && !urls->is_null()) {
        if (!urls->is_array() || urls->size() > 64) return errc::manifest_invalid;
        for (auto& u : *urls) {
            if (!u.is_string()) return errc::manifest_invalid;
            d.urls.push_back(u.get<std::string>());
        }
    }
    SUPERMACHINE_TRY(annotations, parse_string_map(j, "annotations"));
    d.annotations = std::move(annotations);
    if (auto p = j.find("platform"); p != j.end() && !p->is_null()) {
        if (!p->is_object()) return errc::manifest_invalid;
        platform plat;
        SUPERMACHINE_TRY(os, optional_string(*p, "os"));
        SUPERMACHINE_TRY(arch, optional_string(*p, "architecture"));
        SUPERMACHINE_TRY(variant, optional_string(*p, "variant"));
        plat.os = std::move(os);
        plat.architecture = std::move(arch);
        plat.variant = std::move(variant);
        d.platform = std::move(plat);
    }
    return d;
}

/// Which of the four document kinds: from the Content-Type if it names one,
/// else from the mediaType field, else from the shape (OCI makes it optional).
inline result<std::string> manifest_kind(const nlohmann::json& j, std::string_view content_type) {
    SUPERMACHINE_TRY(field, optional_string(j, "mediaType"));
    auto known = [](std::string_view t) {
        return media_type::is_index(t) || media_type::is_manifest(t);
    };
    // Content-Type may carry parameters ("; charset=utf-8").
    if (auto semicolon = content_type.find(';'); semicolon != std::string_view::npos)
        content_type = content_type.substr(0, semicolon);
    while (!content_type.empty() && content_type.back() == ' ')
        content_type.remove_suffix(1);
    if (!field.empty() && !known(field)) {
        if (field == media_type::docker_schema1_signed) return errc::not_supported;
        return errc::manifest_invalid;
    }
    if (known(content_type)) {
        if (!field.empty() && field != content_type) return errc::manifest_invalid;
        return std::string(content_type);
    }
    if (!field.empty()) return field;
    if (j.contains("manifests") && !j.contains("layers")) return std::string(media_type::oci_index);
    if (j.contains("config") && j.contains("layers")) return std::string(media_type::oci_manifest);
    return errc::manifest_invalid;
}

} // namespace detail

/// Parse a manifest or index. `content_type` is the HTTP Content-Type (or
/// the descriptor's mediaType), possibly empty.
inline result<any_manifest> parse_manifest(std::string_view bytes,
                                           std::string_view content_type = {}) {
    auto parsed = detail::parse_bounded_json(bytes, max_manifest_bytes);
    if (!parsed) return errc::manifest_invalid;
    const auto& j = *parsed;
    auto version = j.find("schemaVersion");
    if (version == j.end() || !version->is_number_integer()) return errc::manifest_invalid;
    if (version->get<std::int64_t>() == 1) return errc::not_supported; // schema 1: obsolete
    if (version->get<std::int64_t>() != 2) return errc::manifest_invalid;
    SUPERMACHINE_TRY(kind, detail::manifest_kind(j, content_type));

    if (media_type::is_index(kind)) {
        image_index index;
        index.media_type = kind;
        auto list = j.find("manifests");
        if (list == j.end() || !list->is_array() || list->size() > max_index_entries)
            return errc::manifest_invalid;
        for (const auto& entry : *list) {
            SUPERMACHINE_TRY(d, detail::parse_descriptor(entry, true));
            if (d.size > std::int64_t(max_manifest_bytes)) return errc::manifest_invalid;
            index.manifests.push_back(std::move(d));
        }
        SUPERMACHINE_TRY(annotations, detail::parse_string_map(j, "annotations"));
        index.annotations = std::move(annotations);
        return any_manifest(std::move(index));
    }

    image_manifest manifest;
    manifest.media_type = kind;
    auto config = j.find("config");
    if (config == j.end()) return errc::manifest_invalid;
    SUPERMACHINE_TRY(config_descriptor, detail::parse_descriptor(*config, true));
    if (config_descriptor.size > std::int64_t(max_config_bytes)) return errc::manifest_invalid;
    manifest.config = std::move(config_descriptor);
    auto layers = j.find("layers");
    if (layers == j.end() || !layers->is_array() || layers->size() > max_layers)
        return errc::manifest_invalid;
    for (const auto& entry : *layers) {
        SUPERMACHINE_TRY(d, detail::parse_descriptor(entry, true));
        manifest.layers.push_back(std::move(d));
    }
    SUPERMACHINE_TRY(annotations, detail::parse_string_map(j, "annotations"));
    manifest.annotations = std::move(annotations);
    return any_manifest(std::move(manifest));
}

inline result<image_manifest> parse_image_manifest(std::string_view bytes,
                                                   std::string_view content_type = {}) {
    SUPERMACHINE_TRY(any, parse_manifest(bytes, content_type));
    if (auto* m = std::get_if<image_manifest>(&any)) return std::move(*m);
    return errc::manifest_invalid;
}

inline result<image_index> parse_image_index(std::string_view bytes,
                                             std::string_view content_type = {}) {
    SUPERMACHINE_TRY(any, parse_manifest(bytes, content_type));
    if (auto* i = std::get_if<image_index>(&any)) return std::move(*i);
    return errc::manifest_invalid;
}

/// The index entry for `wanted`: the first manifest whose platform matches.
/// Entries without a platform (attestations, unknown/unknown) never match.
inline result<descriptor> select_platform(const image_index& index, const platform& wanted) {
    for (const auto& entry : index.manifests) {
        if (!entry.platform || !media_type::is_manifest(entry.media_type)) continue;
        if (platform_matches(wanted, *entry.platform)) return entry;
    }
    return errc::platform_not_found;
}

} // namespace supermachine::oci
