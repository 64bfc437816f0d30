#pragma once
// An image, from its name to a bootable root filesystem.
//
//   auto img = supermachine::image::from_oci("alpine");      // or oci:DIR[:TAG],
//   docker-archive:FILE SUPERMACHINE_TRY(ready, img.prepare());                  // pull if needed,
//   build rootfs once ready.rootfs  // ext4 image, cached per image digest; attach read-only
//
// prepare() is blocking work (network, decompression, ext4 writing);
// async_prepare(token) runs it on a small worker pool of its own (never the
// caller's executor) and completes with void(error_code, prepared_image).
// Progress goes to image_options::pull.progress (per blob) and
// image_options::status (one line per phase), called on a worker thread.
#include <supermachine/error.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/prepared_image.hpp>
#include <supermachine/oci/pull.hpp>
#include <supermachine/oci/reference.hpp>
#include <supermachine/oci/rootfs_builder.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include <atomic>
#include <filesystem>
#include <functional>
#include <memory>
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
        auto explain = [&](error_code ec, std::string text) -> result<prepared_image> {
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

    /// prepare() on a worker pool shared by all images (two threads: pulls
    /// and rootfs builds are disk- and network-bound, and a bound keeps a
    /// burst of requests from starting a thread each). Completes with
    /// void(error_code, prepared_image) on the handler's executor.
    /// Cancellation (any type) completes it at once with errc::cancelled;
    /// work already under way finishes in the background (the cache only
    /// ever gains whole, verified entries), its result discarded.
    template <class Token>
    auto async_prepare(Token&& token) const {
        return boost::asio::async_initiate<Token, void(error_code, prepared_image)>(
            [](auto completion_handler, image self) {
                using handler_type = decltype(completion_handler);
                struct operation {
                    handler_type handler;
                    boost::asio::executor_work_guard<
                        boost::asio::associated_executor_t<handler_type>>
                        work;
                    std::atomic<bool> completed{false};
                    boost::asio::cancellation_slot slot;
                    // Posted, never inline: the slot's own handler may be
                    // what is calling, and clearing the slot destroys it.
                    static void complete(std::shared_ptr<operation> op, error_code ec,
                                         prepared_image ready) {
                        if (op->completed.exchange(true)) return;
                        auto executor = op->work.get_executor();
                        boost::asio::post(executor, [op, ec, ready = std::move(ready)]() mutable {
                            if (op->slot.is_connected()) op->slot.clear();
                            auto work = std::move(op->work);
                            std::move(op->handler)(ec, std::move(ready));
                        });
                    }
                };
                auto slot = boost::asio::get_associated_cancellation_slot(completion_handler);
                auto work = boost::asio::make_work_guard(
                    boost::asio::get_associated_executor(completion_handler));
                auto op = std::shared_ptr<operation>(
                    new operation{std::move(completion_handler), std::move(work), {}, slot});
                if (slot.is_connected())
                    slot.assign([op](boost::asio::cancellation_type) {
                        operation::complete(op, make_error_code(errc::cancelled), {});
                    });
                boost::asio::post(worker_pool(), [op, self = std::move(self)] {
                    if (op->completed) return;
                    auto ready = self.prepare();
                    if (ready) operation::complete(op, {}, std::move(ready).value());
                    else operation::complete(op, ready.error(), {});
                });
            },
            token, *this);
    }

private:
    static boost::asio::thread_pool& worker_pool() {
        static boost::asio::thread_pool pool(2);
        return pool;
    }

    image(std::string reference, image_options options)
        : reference_(std::move(reference))
        , options_(std::move(options)) {}

    std::string reference_;
    image_options options_;
};

} // namespace supermachine
