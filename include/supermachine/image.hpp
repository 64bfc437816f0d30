#pragma once
// An image, from its name to a bootable root filesystem.
//
//   auto img = supermachine::image::from_oci("alpine");      // or oci:DIR[:TAG],
//   docker-archive:FILE SUPERMACHINE_TRY(ready, img.prepare());                  // pull if needed,
//   build rootfs once ready.rootfs  // ext4 image, cached per image digest; attach read-only
//
// prepare() is blocking work (network, decompression, ext4 writing): run it
// off an I/O executor's thread. Progress goes to image_options::progress
// (per blob) and image_options::status (one line per phase).
#include <supermachine/error.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/pull.hpp>
#include <supermachine/oci/reference.hpp>
#include <supermachine/oci/rootfs_builder.hpp>

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace supermachine {

struct image_options {
    std::filesystem::path cache_dir = oci::content_store::default_root();
    oci::pull_options pull;   // platform, registry options, per-blob progress
    bool always_pull = false; // registry images: fetch the manifest even if cached
    std::function<void(std::string_view)> status; // "pulling ...", "building rootfs ..."
    oci::rootfs_build_options rootfs;             // cache_dir is filled in from cache_dir above
};

class snapshot_image; // <supermachine/snapshot_image.hpp>

/// An image ready to boot.
struct prepared_image {
    std::string reference; // as the user named it
    oci::digest digest;    // the platform's image manifest digest: the image identity
    oci::image_config config;
    std::filesystem::path rootfs; // ext4, read-only base
    std::string passwd, group;    // the image's /etc/passwd and /etc/group
};

class image {
public:
    /// A registry reference ("alpine", "host:5000/ns/app:tag@sha256:..."),
    /// oci:PATH[:TAG] or docker-archive:PATH[:NAME:TAG].
    static image from_oci(std::string reference, image_options options = {}) {
        return image(std::move(reference), std::move(options));
    }

    /// An image snapshot directory (`supermachine snapshot -o DIR`, or
    /// vm::async_snapshot) as something to start: everything it needs comes
    /// from the directory. Include <supermachine/snapshot_image.hpp> to call it.
    static inline snapshot_image from_snapshot(std::filesystem::path directory);

    const std::string& reference() const noexcept { return reference_; }
    image_options& options() noexcept { return options_; }

    /// Pull (unless every blob is cached) and build the root filesystem
    /// (unless built before for this digest). `error_detail` gets a sentence
    /// naming what failed (registry message, bad layer...).
    result<prepared_image> prepare(std::string* error_detail = nullptr) const {
        auto say = [&](std::string_view line) {
            if (options_.status) options_.status(line);
        };
        auto explain = [&](std::error_code ec, std::string text) -> result<prepared_image> {
            if (error_detail) *error_detail = std::move(text);
            return ec;
        };
        std::string why;
        auto source = oci::parse_image_source(reference_, &why);
        if (!source)
            return explain(source.error(), "invalid image reference '" + reference_ + "': " + why);

        oci::content_store store(options_.cache_dir);
        std::optional<oci::pulled_image> pulled;
        if (!options_.always_pull) {
            auto cached = oci::find_pulled_image(source.value(), store, options_.pull.platform);
            if (cached && cached.value()) pulled = std::move(*cached.value());
        }
        if (!pulled) {
            say("pulling " + reference_);
            std::string detail;
            auto fetched = oci::pull_image(source.value(), store, options_.pull, &detail);
            if (!fetched)
                return explain(fetched.error(),
                               "pull " + reference_ + ": " +
                                   (detail.empty() ? fetched.error().message() : detail));
            pulled = std::move(fetched).value();
        }

        auto rootfs_options = options_.rootfs;
        rootfs_options.cache_dir = options_.cache_dir;
        const std::string digest_text = pulled->image_manifest_digest.str();
        say("root filesystem for " + digest_text.substr(0, 19));
        auto built = oci::build_rootfs(digest_text, pulled->layers, rootfs_options);
        if (!built)
            return explain(built.error(), "building the root filesystem of " + reference_ + ": " +
                                              built.error().message());
        prepared_image ready;
        ready.reference = reference_;
        ready.digest = pulled->image_manifest_digest;
        ready.config = std::move(pulled->config);
        ready.rootfs = built.value().path;
        ready.passwd = std::move(built.value().passwd);
        ready.group = std::move(built.value().group);
        return ready;
    }

private:
    image(std::string reference, image_options options)
        : reference_(std::move(reference))
        , options_(std::move(options)) {}

    std::string reference_;
    image_options options_;
};

} // namespace supermachine
