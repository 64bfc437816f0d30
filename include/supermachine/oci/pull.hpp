#pragma once
// One entry point for every image source: a registry reference, oci:PATH[:TAG]
// or docker-archive:PATH[:name:tag]. The result's blobs are all in the store.
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/docker_archive.hpp>
#include <supermachine/oci/layout.hpp>
#include <supermachine/oci/reference.hpp>
#include <supermachine/oci/registry_client.hpp>

#include <string>

namespace supermachine::oci {

struct pull_options {
    oci::platform platform = default_platform();
    registry_options registry;
    progress_callback progress;
};

/// Blocking: fetch or import `source` into `store`. On failure `error_detail`
/// (if given) says why in words.
inline result<pulled_image> pull_image(const image_source& source, content_store& store,
                                       const pull_options& options = {},
                                       std::string* error_detail = nullptr) {
    auto explain = [&](error_code ec, std::string text) -> result<pulled_image> {
        if (error_detail) *error_detail = std::move(text);
        return ec;
    };
    switch (source.transport) {
    case image_transport::registry: {
        registry_client client(options.registry);
        auto r = client.pull(source.reference, store, options.platform, options.progress);
        if (!r) return explain(r.error(), client.last_error());
        return r;
    }
    case image_transport::oci_layout: {
        auto r = import_layout(source.path, source.layout_tag, store, options.platform,
                               options.progress);
        if (!r) return explain(r.error(), "oci:" + source.path + ": " + r.error().message());
        return r;
    }
    case image_transport::docker_archive: {
        auto r =
            import_docker_archive(source.path, source.has_reference ? &source.reference : nullptr,
                                  store, options.platform, options.progress);
        if (!r)
            return explain(r.error(), "docker-archive:" + source.path + ": " + r.error().message());
        return r;
    }
    }
    return errc::invalid_argument;
}

/// The image recorded for `source` if every blob is still in the store (no
/// network) and its config's platform fits `wanted`. Records are kept per
/// reference, not per platform: an image pulled for another platform (or a
/// two-platform index pulled with --platform) is not this one; the caller
/// pulls again.
inline result<std::optional<pulled_image>>
find_pulled_image(const image_source& source, const content_store& store,
                  const platform& wanted = default_platform()) {
    std::string key = source.str();
    if (source.transport != image_transport::registry) {
        // Local sources are recorded by absolute path.
        std::error_code ec;
        auto absolute = std::filesystem::absolute(source.path, ec).lexically_normal().string();
        if (source.transport == image_transport::oci_layout)
            key = "oci:" + absolute + (source.layout_tag.empty() ? "" : ":" + source.layout_tag);
        else
            key = "docker-archive:" + absolute +
                  (source.has_reference ? ":" + source.reference.familiar() : "");
    }
    SUPERMACHINE_TRY(record, store.find_image(key));
    if (!record) return std::optional<pulled_image>();
    auto image = store.load_image(*record);
    if (!image || !config_platform_fits(wanted, image.value().config.platform))
        return std::optional<pulled_image>();
    return std::optional(std::move(image).value());
}

} // namespace supermachine::oci
