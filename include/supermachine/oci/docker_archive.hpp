#pragma once
// `docker save` archives: the classic format (manifest.json + <id>/layer.tar
// + <id>.json config) and the newer one whose tar also holds an OCI layout
// (oci-layout, index.json, blobs/). Members are located with a small bounded
// tar index; blobs are copied into the content store and verified.
#include <supermachine/error.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/detail/registry_tar_index.hpp>
#include <supermachine/oci/layout.hpp>
#include <supermachine/oci/media_types.hpp>
#include <supermachine/oci/reference.hpp>

#include <filesystem>
#include <optional>
#include <string>

namespace supermachine::oci {

namespace detail {

// Copy a tar member's bytes into a writer.
inline result<void> copy_member(const registry_tar_index& tar, const tar_member& member,
                                blob_writer& writer) {
    std::vector<char> buffer(1 << 16);
    std::uint64_t done = 0;
    while (done < member.size) {
        auto n = std::size_t(std::min<std::uint64_t>(buffer.size(), member.size - done));
        SUPERMACHINE_TRY(tar.read_at(member.offset + done, buffer.data(), n));
        SUPERMACHINE_TRY(writer.write(std::as_bytes(std::span(buffer.data(), n))));
        done += n;
    }
    return success();
}

inline result<digest> digest_member(const registry_tar_index& tar, const tar_member& member) {
    hasher h;
    std::vector<char> buffer(1 << 16);
    std::uint64_t done = 0;
    while (done < member.size) {
        auto n = std::size_t(std::min<std::uint64_t>(buffer.size(), member.size - done));
        SUPERMACHINE_TRY(tar.read_at(member.offset + done, buffer.data(), n));
        h.update(std::as_bytes(std::span(buffer.data(), n)));
        done += n;
    }
    return h.finish();
}

// Layer bytes tell what they are; media types in archives are not trusted.
inline std::string_view layer_media_type_from_magic(const registry_tar_index& tar,
                                                    const tar_member& member) {
    unsigned char magic[4] = {};
    if (member.size >= 4 && tar.read_at(member.offset, reinterpret_cast<char*>(magic), 4)) {
        if (magic[0] == 0x1f && magic[1] == 0x8b) return media_type::oci_layer_gzip;
        if (magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd)
            return media_type::oci_layer_zstd;
    }
    return media_type::oci_layer;
}

inline bool repo_tag_matches(const std::string& tag, const image_reference& wanted) {
    auto parsed = parse_reference(tag);
    return parsed && parsed.value().registry == wanted.registry &&
           parsed.value().repository == wanted.repository && parsed.value().tag == wanted.tag;
}

} // namespace detail

/// Import an image from a `docker save` tarball. `name` picks one of several
/// images by name:tag (nullptr: the archive must hold exactly one).
/// Recorded in the store as "docker-archive:<absolute path>[:name:tag]".
inline result<pulled_image> import_docker_archive(const std::filesystem::path& archive,
                                                  const image_reference* name, content_store& store,
                                                  const platform& wanted = default_platform(),
                                                  progress_callback progress = {}) {
    SUPERMACHINE_TRY(tar, detail::registry_tar_index::open(archive.string()));
    std::error_code ec;
    auto absolute = std::filesystem::absolute(archive, ec);
    if (ec) absolute = archive;
    std::string reference = "docker-archive:" + absolute.lexically_normal().string();
    if (name) reference += ":" + name->familiar();

    // Newer docker (25+) and skopeo-made OCI-in-tar: use the layout inside.
    auto index_member = tar.find_file("index.json");
    if (index_member && tar.find_file("oci-layout")) {
        SUPERMACHINE_TRY(index_bytes, tar.read(index_member.value(), max_manifest_bytes));
        SUPERMACHINE_TRY(index, parse_image_index(index_bytes, media_type::oci_index));
        blob_copier copy = [&](const descriptor& d, blob_writer& writer) -> result<void> {
            SUPERMACHINE_TRY(member,
                             tar.find_file("blobs/" + std::string(d.digest.algorithm_name()) + "/" +
                                           d.digest.hex()));
            return detail::copy_member(tar, member, writer);
        };
        std::string tag = name ? name->tag : std::string();
        std::string full = name ? name->str() : std::string();
        auto imported =
            detail::import_from_index(index, tag, full, wanted, store, copy, progress, reference);
        if (imported || imported.error() != make_error_code(errc::not_found) || !name)
            return imported;
        // Named but not annotated in index.json: fall back to manifest.json.
    }

    // Classic format.
    SUPERMACHINE_TRY(manifest_member, tar.find_file("manifest.json"));
    SUPERMACHINE_TRY(manifest_text, tar.read(manifest_member, max_manifest_bytes));
    if (!detail::json_depth_within(manifest_text, max_json_depth)) return errc::manifest_invalid;
    auto entries = nlohmann::json::parse(manifest_text, nullptr, false);
    if (entries.is_discarded() || !entries.is_array() || entries.empty() ||
        entries.size() > max_index_entries)
        return errc::manifest_invalid;
    const nlohmann::json* chosen = nullptr;
    for (const auto& entry : entries) {
        if (!entry.is_object()) return errc::manifest_invalid;
        if (!name) {
            if (entries.size() != 1) return errc::bad_reference; // ambiguous: name one
            chosen = &entry;
            break;
        }
        if (auto tags = entry.find("RepoTags"); tags != entry.end() && tags->is_array())
            for (const auto& t : *tags)
                if (t.is_string() && detail::repo_tag_matches(t.get<std::string>(), *name))
                    chosen = &entry;
        if (chosen) break;
    }
    if (!chosen) return errc::not_found;
    auto config_name = chosen->find("Config");
    auto layer_names = chosen->find("Layers");
    if (config_name == chosen->end() || !config_name->is_string() || layer_names == chosen->end() ||
        !layer_names->is_array() || layer_names->size() > max_layers)
        return errc::manifest_invalid;

    SUPERMACHINE_TRY(config_member, tar.find_file(config_name->get<std::string>()));
    SUPERMACHINE_TRY(config_bytes, tar.read(config_member, max_config_bytes));
    SUPERMACHINE_TRY(config, parse_image_config(config_bytes));
    if (!config_platform_fits(wanted, config.platform)) return errc::platform_not_found;

    // The archive has no registry manifest: synthesize an OCI one whose
    // descriptors carry the digests we compute here.
    image_manifest manifest;
    manifest.media_type = std::string(media_type::oci_manifest);
    manifest.config = {std::string(media_type::oci_config),
                       compute_digest(config_bytes),
                       std::int64_t(config_bytes.size()),
                       {},
                       {},
                       std::nullopt};
    SUPERMACHINE_TRY(store.write_blob(manifest.config.digest, config_bytes));
    std::size_t position = 0;
    for (const auto& layer_name : *layer_names) {
        if (!layer_name.is_string()) return errc::manifest_invalid;
        SUPERMACHINE_TRY(member, tar.find_file(layer_name.get<std::string>()));
        SUPERMACHINE_TRY(layer_digest, detail::digest_member(tar, member));
        auto type = detail::layer_media_type_from_magic(tar, member);
        // An uncompressed layer's digest is its diff_id: the config must agree.
        if (type == media_type::oci_layer && position < config.diff_ids.size() &&
            config.diff_ids[position] != layer_digest)
            return errc::digest_mismatch;
        descriptor d{std::string(type), layer_digest, std::int64_t(member.size), {}, {},
                     std::nullopt};
        blob_copier copy = [&](const descriptor&, blob_writer& writer) {
            return detail::copy_member(tar, member, writer);
        };
        SUPERMACHINE_TRY(detail::import_blob(store, d, copy, progress, "layer"));
        manifest.layers.push_back(std::move(d));
        ++position;
    }
    if (!config.diff_ids.empty() && config.diff_ids.size() != manifest.layers.size())
        return errc::manifest_invalid;

    nlohmann::json doc = {{"schemaVersion", 2},
                          {"mediaType", manifest.media_type},
                          {"config",
                           {{"mediaType", manifest.config.media_type},
                            {"digest", manifest.config.digest.str()},
                            {"size", manifest.config.size}}},
                          {"layers", nlohmann::json::array()}};
    for (const auto& l : manifest.layers)
        doc["layers"].push_back(
            {{"mediaType", l.media_type}, {"digest", l.digest.str()}, {"size", l.size}});
    auto manifest_bytes = doc.dump();
    auto manifest_digest = compute_digest(manifest_bytes);
    SUPERMACHINE_TRY(store.write_blob(manifest_digest, manifest_bytes));

    pulled_image image;
    image.reference = reference;
    image.manifest_digest = manifest_digest;
    image.image_manifest_digest = manifest_digest;
    for (const auto& l : manifest.layers)
        image.layers.push_back(store.blob_path(l.digest));
    image.manifest = std::move(manifest);
    image.config = std::move(config);
    SUPERMACHINE_TRY(
        store.record_image({image.reference, image.manifest_digest, image.image_manifest_digest,
                            image.manifest.config.digest, image.manifest.total_size(),
                            image.config.platform.str(), 0}));
    return image;
}

} // namespace supermachine::oci
