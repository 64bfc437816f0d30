#pragma once
// Where the rootfs cache keeps an image's ext4 and, beside it, the image's
// /etc/passwd and /etc/group (rootfs_builder.hpp builds them): alone so that
// what only looks them up (a snapshot's check of its backing) does not
// compile the builder.
#include <supermachine/error.hpp>

#include <cerrno>
#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

#include <fcntl.h>
#include <unistd.h>

namespace supermachine::oci {

/// The most of an image's /etc/passwd or /etc/group the cache keeps or reads.
inline constexpr std::size_t default_max_account_file = 1 << 20;

namespace detail {

/// "sha256:abc…" → "sha256-abc…"; anything that is not a plain digest is errc::bad_digest
/// (it becomes a file name, so no '/', no "..").
inline result<std::string> rootfs_file_stem(std::string_view digest) {
    auto colon = digest.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon + 1 >= digest.size() ||
        digest.size() > 300)
        return make_error_code(errc::bad_digest);
    for (std::size_t i = 0; i < digest.size(); ++i) {
        char c = digest[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  (i < colon ? (c == '+' || c == '.' || c == '_' || c == '-')
                             : (c >= 'A' && c <= 'Z') || c == '=' || c == '_' || c == '-');
        if (i == colon) continue;
        if (!ok) return make_error_code(errc::bad_digest);
    }
    std::string stem(digest);
    stem[colon] = '-';
    return stem;
}

/// A small cached file's text ("" if absent), at most `max` bytes.
inline result<std::string> rootfs_read_small(const std::filesystem::path& path, std::size_t max) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? result<std::string>(std::string{}) : errno_code(errno);
    std::string text;
    char buffer[8192];
    for (;;) {
        ssize_t n = ::read(fd, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            ::close(fd);
            return errno_code(errno);
        }
        if (n == 0) break;
        if (text.size() + static_cast<std::size_t>(n) > max) {
            ::close(fd);
            return make_error_code(errc::image_too_large);
        }
        text.append(buffer, static_cast<std::size_t>(n));
    }
    ::close(fd);
    return text;
}

} // namespace detail

/// Where the image for `image_digest` is (or would be) cached.
inline result<std::filesystem::path> rootfs_path(const std::filesystem::path& cache_dir,
                                                 std::string_view image_digest) {
    SUPERMACHINE_TRY(stem, detail::rootfs_file_stem(image_digest));
    return cache_dir / "rootfs" / (stem + ".ext4");
}

} // namespace supermachine::oci
