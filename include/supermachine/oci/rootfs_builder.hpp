#pragma once
// Layers → merged tree → ext4 image, once per image digest.
//
// The image lands at <cache>/rootfs/<algorithm>-<hex>.ext4 with the image's
// /etc/passwd and /etc/group beside it (.passwd / .group), so the process
// user can be resolved later without opening the image. Everything is built
// under temporary names in that directory and renamed into place (the image
// last), under an advisory lock so concurrent builders of one digest do the
// work once. Nothing outside <cache>/rootfs is ever written.
#include <supermachine/error.hpp>
#include <supermachine/oci/ext4_writer.hpp>
#include <supermachine/oci/filesystem_tree.hpp>
#include <supermachine/oci/layer.hpp>
#include <supermachine/oci/rootfs_cache.hpp>

#include <cerrno>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace supermachine::oci {

struct rootfs_build_options {
    std::filesystem::path cache_dir; ///< e.g. $XDG_CACHE_HOME/supermachine
    layer_limits layers;
    tree_limits tree;
    ext4_options ext4;
    std::size_t max_account_file =
        default_max_account_file; ///< /etc/passwd and /etc/group read at most this
};

struct rootfs_image {
    std::filesystem::path path; ///< the ext4 image
    std::string passwd;         ///< the image's /etc/passwd ("" if none)
    std::string group;          ///< the image's /etc/group ("" if none)
    bool reused = false;        ///< true: found in the cache, not built now
    ext4_stats ext4;            ///< when built now
    std::vector<layer_stats> layers;
};

namespace detail {

inline result<void> rootfs_write_file(const std::filesystem::path& path, std::string_view text) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return errno_code(errno);
    while (!text.empty()) {
        ssize_t n = ::write(fd, text.data(), text.size());
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            ::close(fd);
            return errno_code(errno);
        }
        text.remove_prefix(static_cast<std::size_t>(n));
    }
    int rc = ::fsync(fd);
    ::close(fd);
    if (rc != 0) return errno_code(errno);
    return success();
}

/// A file's text from the tree ("" if absent or not a regular file; symlinks followed inside).
inline result<std::string> rootfs_account_file(const filesystem_tree& tree, std::string_view path,
                                               std::size_t max) {
    auto found = tree.lookup(path, true);
    if (!found || !*found.value()) return std::string{};
    if (tree.node(*found.value()).kind != node_kind::regular) return std::string{};
    return tree.read_file(*found.value(), max);
}

class rootfs_lock {
public:
    explicit rootfs_lock(int fd)
        : fd_(fd) {}
    rootfs_lock(const rootfs_lock&) = delete;
    ~rootfs_lock() {
        if (fd_ >= 0) ::close(fd_); // closing drops the flock
    }

private:
    int fd_;
};

} // namespace detail

/// Build (or reuse) the root filesystem image of `image_digest`. `layer_count`
/// layers, bottom first; `open_layer(i)` returns result<S> for a byte_source S
/// of layer i (gzip, zstd or plain tar: detected). It is called only when the
/// image is not cached yet.
template <class OpenLayer>
result<rootfs_image> build_rootfs_from(std::string_view image_digest, std::size_t layer_count,
                                       OpenLayer&& open_layer,
                                       const rootfs_build_options& options) {
    if (options.cache_dir.empty()) return make_error_code(errc::invalid_argument);
    SUPERMACHINE_TRY(stem, detail::rootfs_file_stem(image_digest));
    auto dir = options.cache_dir / "rootfs";
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return ec;
    rootfs_image out;
    out.path = dir / (stem + ".ext4");
    auto passwd_path = dir / (stem + ".passwd");
    auto group_path = dir / (stem + ".group");

    int lock_fd = ::open((dir / (stem + ".lock")).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0) return errno_code(errno);
    detail::rootfs_lock lock(lock_fd);
    while (::flock(lock_fd, LOCK_EX) != 0)
        if (errno != EINTR) return errno_code(errno);

    struct stat st;
    if (::stat(out.path.c_str(), &st) == 0) {
        SUPERMACHINE_TRY(passwd, detail::rootfs_read_small(passwd_path, options.max_account_file));
        SUPERMACHINE_TRY(group, detail::rootfs_read_small(group_path, options.max_account_file));
        out.passwd = std::move(passwd);
        out.group = std::move(group);
        out.reused = true;
        return out;
    }

    // Under the lock no other builder of this digest runs: temporaries left by a
    // crashed one are garbage.
    const std::string temp_prefix = stem + ".ext4.tmp-";
    for (auto& entry : std::filesystem::directory_iterator(dir, ec))
        if (entry.path().filename().string().starts_with(temp_prefix))
            std::filesystem::remove(entry.path(), ec);

    SUPERMACHINE_TRY(tree, filesystem_tree::create(dir, options.tree));
    for (std::size_t i = 0; i < layer_count; ++i) {
        SUPERMACHINE_TRY(source, open_layer(i));
        SUPERMACHINE_TRY(stats, apply_layer(tree, std::move(source),
                                            static_cast<std::uint32_t>(i + 1), options.layers));
        out.layers.push_back(stats);
    }
    SUPERMACHINE_TRY(passwd,
                     detail::rootfs_account_file(tree, "/etc/passwd", options.max_account_file));
    SUPERMACHINE_TRY(group,
                     detail::rootfs_account_file(tree, "/etc/group", options.max_account_file));
    out.passwd = std::move(passwd);
    out.group = std::move(group);

    auto temp = dir / (temp_prefix + std::to_string(::getpid()));
    auto fail = [&](error_code e) -> result<rootfs_image> {
        ::unlink(temp.c_str());
        return e;
    };
    ext4_options ext4 = options.ext4;
    if (ext4.timestamp == 0) ext4.timestamp = static_cast<std::int64_t>(::time(nullptr));
    auto written = write_ext4(tree, temp, ext4);
    if (!written) return fail(written.error());
    out.ext4 = written.value();
    if (auto r = detail::rootfs_write_file(passwd_path, out.passwd); !r) return fail(r.error());
    if (auto r = detail::rootfs_write_file(group_path, out.group); !r) return fail(r.error());
    if (::rename(temp.c_str(), out.path.c_str()) != 0) return fail(errno_code(errno));
    return out;
}

/// The same from layer files on disk (e.g. content-store blobs), bottom layer first.
inline result<rootfs_image> build_rootfs(std::string_view image_digest,
                                         std::span<const std::filesystem::path> layer_files,
                                         const rootfs_build_options& options) {
    return build_rootfs_from(
        image_digest, layer_files.size(),
        [&](std::size_t i) { return file_source::open(layer_files[i]); }, options);
}

} // namespace supermachine::oci
