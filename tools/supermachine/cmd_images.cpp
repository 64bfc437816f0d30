// supermachine images [--digests] [--quiet]: the images in the local store.
#include "command.hpp"

#include <supermachine/oci/content_store.hpp>

#include <chrono>
#include <cstdio>
#include <string>

namespace {

namespace oci = supermachine::oci;

std::string human_bytes(double bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) {
        bytes /= 1024;
        ++u;
    }
    char out[32];
    std::snprintf(out, sizeof out, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
    return out;
}

std::string age(std::int64_t then) {
    auto now = std::chrono::duration_cast<std::chrono::seconds>(
                   std::chrono::system_clock::now().time_since_epoch())
                   .count();
    auto s = now - then;
    if (s < 60) return "just now";
    if (s < 3600) return std::to_string(s / 60) + " minutes ago";
    if (s < 86400) return std::to_string(s / 3600) + " hours ago";
    return std::to_string(s / 86400) + " days ago";
}

int run_images(std::span<char*> args) {
    bool full_digests = false, quiet = false;
    for (std::string_view a : args) {
        if (a == "--digests" || a == "--no-trunc")
            full_digests = true;
        else if (a == "-q" || a == "--quiet")
            quiet = true;
        else {
            std::fprintf(stderr, "usage: supermachine images [--digests] [--quiet]\n");
            return a == "-h" || a == "--help" ? 0 : 2;
        }
    }
    auto store = oci::content_store::open_default();
    auto images = store.list_images();
    if (!images) {
        std::fprintf(stderr, "supermachine images: %s (%s)\n", images.error().message().c_str(),
                     store.root().c_str());
        return 1;
    }
    if (quiet) {
        for (const auto& r : images.value())
            std::printf("%s\n", r.reference.c_str());
        return 0;
    }
    std::printf("%-50s %-*s %-12s %-10s %s\n", "REFERENCE", full_digests ? 71 : 19, "DIGEST",
                "PLATFORM", "SIZE", "PULLED");
    for (const auto& r : images.value()) {
        std::string digest = full_digests ? r.manifest_digest.str()
                                          : "sha256:" + r.manifest_digest.hex().substr(0, 12);
        bool complete = store.contains(r.image_manifest_digest) && store.contains(r.config_digest);
        std::printf("%-50s %-*s %-12s %-10s %s%s\n", r.reference.c_str(), full_digests ? 71 : 19,
                    digest.c_str(), r.platform.c_str(), human_bytes(double(r.size)).c_str(),
                    age(r.pulled_at).c_str(), complete ? "" : " (blobs missing)");
    }
    return 0;
}

const supermachine::cli::command_registration registration{
    "images", "list the images in the local store", &run_images};

} // namespace
