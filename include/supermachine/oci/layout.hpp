#pragma once
// OCI image layout directories (oci-layout, index.json, blobs/<alg>/<hex>):
// resolve a tag (and platform) and import manifest, config and layers into the
// content store, each verified against its descriptor.
#include <supermachine/error.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/image_config.hpp>
#include <supermachine/oci/manifest.hpp>
#include <supermachine/oci/platform.hpp>
#include <supermachine/oci/progress.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::oci {

inline constexpr std::string_view ref_name_annotation = "org.opencontainers.image.ref.name";
inline constexpr std::string_view containerd_name_annotation = "io.containerd.image.name";

/// Where blobs come from when importing: copy the descriptor's bytes into the
/// writer (which enforces size and digest).
using blob_copier = std::function<result<void>(const descriptor&, blob_writer&)>;

namespace detail {

inline result<void> import_blob(content_store& store, const descriptor& d, const blob_copier& copy,
                                const progress_callback& progress, const char* kind) {
    if (store.contains(d.digest)) {
        if (progress) progress({progress_event::phase::cached, d.digest, kind, d.size, d.size});
        return success();
    }
    SUPERMACHINE_TRY(writer, store.begin_write(d.digest, d.size));
    SUPERMACHINE_TRY(writer.restart()); // local sources are re-read whole
    if (progress) progress({progress_event::phase::started, d.digest, kind, d.size, 0});
    if (auto r = copy(d, writer); !r) {
        writer.discard();
        return r.error();
    }
    SUPERMACHINE_TRY(writer.commit());
    if (progress) progress({progress_event::phase::completed, d.digest, kind, d.size, d.size});
    return success();
}

/// From a top-level index (index.json) and a chosen entry, through a nested
/// index if any, to a pulled_image whose blobs are all in the store.
inline result<pulled_image> import_from_index(const image_index& top_index, std::string_view tag,
                                              std::string_view full_name, const platform& wanted,
                                              content_store& store, const blob_copier& copy,
                                              const progress_callback& progress,
                                              std::string record_reference) {
    std::vector<descriptor> candidates;
    for (const auto& m : top_index.manifests) {
        if (tag.empty()) {
            candidates.push_back(m);
            continue;
        }
        auto name = m.annotations.find(std::string(ref_name_annotation));
        auto full = m.annotations.find(std::string(containerd_name_annotation));
        if ((name != m.annotations.end() && name->second == tag) ||
            (!full_name.empty() && full != m.annotations.end() && full->second == full_name))
            candidates.push_back(m);
    }
    if (candidates.empty()) return errc::not_found;
    descriptor top;
    if (candidates.size() == 1)
        top = candidates.front();
    else {
        image_index subset;
        subset.manifests = candidates;
        auto chosen = select_platform(subset, wanted);
        if (!chosen) return tag.empty() ? make_error_code(errc::bad_reference) : chosen.error();
        top = chosen.value();
    }
    if (top.size > std::int64_t(max_manifest_bytes)) return errc::manifest_invalid;
    SUPERMACHINE_TRY(import_blob(store, top, copy, progress, "manifest"));
    SUPERMACHINE_TRY(top_bytes, store.read_blob(top.digest, max_manifest_bytes));
    SUPERMACHINE_TRY(document, parse_manifest(top_bytes, top.media_type));

    pulled_image image;
    image.reference = std::move(record_reference);
    image.manifest_digest = top.digest;
    image.image_manifest_digest = top.digest;
    if (auto* index = std::get_if<image_index>(&document)) {
        SUPERMACHINE_TRY(entry, select_platform(*index, wanted));
        SUPERMACHINE_TRY(import_blob(store, entry, copy, progress, "manifest"));
        SUPERMACHINE_TRY(bytes, store.read_blob(entry.digest, max_manifest_bytes));
        SUPERMACHINE_TRY(manifest, parse_image_manifest(bytes, entry.media_type));
        image.image_manifest_digest = entry.digest;
        image.manifest = std::move(manifest);
    } else {
        image.manifest = std::get<image_manifest>(std::move(document));
    }
    SUPERMACHINE_TRY(import_blob(store, image.manifest.config, copy, progress, "config"));
    SUPERMACHINE_TRY(config_bytes, store.read_blob(image.manifest.config.digest, max_config_bytes));
    SUPERMACHINE_TRY(config, parse_image_config(config_bytes));
    if (!config_platform_fits(wanted, config.platform)) return errc::platform_not_found;
    image.config = std::move(config);
    for (const auto& layer : image.manifest.layers) {
        SUPERMACHINE_TRY(import_blob(store, layer, copy, progress, "layer"));
        image.layers.push_back(store.blob_path(layer.digest));
    }
    SUPERMACHINE_TRY(
        store.record_image({image.reference, image.manifest_digest, image.image_manifest_digest,
                            image.manifest.config.digest, image.manifest.total_size(),
                            image.config.platform.str(), 0}));
    return image;
}

inline result<std::string> read_small_file(const std::filesystem::path& path, std::size_t max) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? make_error_code(errc::not_found) : errno_code(errno);
    std::string out;
    char buffer[65536];
    while (true) {
        auto n = ::read(fd, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            ::close(fd);
            return errc::io_error;
        }
        if (n == 0) break;
        if (out.size() + std::size_t(n) > max) {
            ::close(fd);
            return errc::image_too_large;
        }
        out.append(buffer, std::size_t(n));
    }
    ::close(fd);
    return out;
}

} // namespace detail

/// index.json of a layout, after checking its oci-layout marker.
inline result<image_index> read_layout_index(const std::filesystem::path& layout) {
    SUPERMACHINE_TRY(marker, detail::read_small_file(layout / "oci-layout", 4096));
    auto j = nlohmann::json::parse(marker, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("imageLayoutVersion") ||
        !j["imageLayoutVersion"].is_string())
        return errc::manifest_invalid;
    SUPERMACHINE_TRY(index_bytes,
                     detail::read_small_file(layout / "index.json", max_manifest_bytes));
    return parse_image_index(index_bytes, media_type::oci_index);
}

/// Import the image tagged `tag` (empty: the only one) from an OCI layout.
/// Recorded in the store as "oci:<absolute path>[:tag]".
inline result<pulled_image> import_layout(const std::filesystem::path& layout, std::string_view tag,
                                          content_store& store,
                                          const platform& wanted = default_platform(),
                                          progress_callback progress = {}) {
    SUPERMACHINE_TRY(index, read_layout_index(layout));
    std::error_code ec;
    auto absolute = std::filesystem::absolute(layout, ec);
    if (ec) absolute = layout;
    blob_copier copy = [&](const descriptor& d, blob_writer& writer) -> result<void> {
        // The digest was validated, so this path cannot leave blobs/.
        auto path = layout / "blobs" / std::string(d.digest.algorithm_name()) / d.digest.hex();
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) return errno == ENOENT ? make_error_code(errc::not_found) : errno_code(errno);
        std::vector<char> buffer(1 << 16);
        result<void> status = success();
        while (true) {
            auto n = ::read(fd, buffer.data(), buffer.size());
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) {
                status = errno_code(errno);
                break;
            }
            if (n == 0) break;
            if (auto r = writer.write(std::as_bytes(std::span(buffer.data(), std::size_t(n))));
                !r) {
                status = r.error();
                break;
            }
            if (progress)
                progress({progress_event::phase::progress, d.digest, "layer", d.size,
                          std::int64_t(writer.offset())});
        }
        ::close(fd);
        return status;
    };
    std::string reference = "oci:" + absolute.lexically_normal().string();
    if (!tag.empty()) reference += ":" + std::string(tag);
    return detail::import_from_index(index, tag, {}, wanted, store, copy, progress, reference);
}

} // namespace supermachine::oci
