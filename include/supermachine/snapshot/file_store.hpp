#pragma once
// Snapshots as files: write_snapshot / read_snapshot and the file_store policy.
//
// Writing: header and body, then RAM with all-zero pages left as holes, into
// a temporary file in the target's directory; fsync; rename over the target;
// fsync the directory. Readers see the old file or the complete new one.
//
// Reading: fstat, header, layout checked against the file size, body read
// and parsed, then RAM mapped MAP_PRIVATE from the file: copy-on-write and
// lazy, so restore cost is the pages the guest touches, and any number of
// restores from one file run side by side, each private.
//
// The file must not be truncated while a restore maps it (a shrunk mapping
// faults with SIGBUS); replace snapshots by rename, as write_snapshot does.
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>
#include <supermachine/snapshot/detail/file_io.hpp>
#include <supermachine/snapshot/store.hpp>

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <string>
#include <utility>

namespace supermachine::snapshot {

/// What write_snapshot did (for logs and tests).
struct write_statistics {
    std::uint64_t file_size = 0;      // apparent size
    std::uint64_t ram_data_bytes = 0; // RAM bytes actually written (non-zero pages)
};

/// Write `image` to `path` atomically (temp file + fsync + rename + dir fsync).
inline result<write_statistics> write_snapshot(const std::filesystem::path& path,
                                               const snapshot_image& image) {
    if (path.filename().empty()) return errc::invalid_argument;
    const auto directory = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
    std::string temp = (directory / ("." + path.filename().string() + ".tmp-XXXXXX")).string();
    supermachine::detail::unique_fd fd(::mkostemp(temp.data(), O_CLOEXEC));
    if (fd.get() < 0) return errno_code(errno);
    auto discard = [&](error_code error) -> result<write_statistics> {
        ::unlink(temp.c_str());
        return error;
    };
    auto written = detail::write_snapshot_fd(fd.get(), image);
    if (!written) return discard(written.error());
    if (::fsync(fd.get()) != 0) return discard(errno_code(errno));
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return discard(errno_code(errno));
    fd.reset();
    if (::rename(temp.c_str(), path.c_str()) != 0) return discard(errno_code(errno));
    supermachine::detail::unique_fd dir(
        ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir.get() < 0 || ::fsync(dir.get()) != 0) return errno_code(errno);
    return write_statistics{static_cast<std::uint64_t>(st.st_size), written.value()};
}

/// Open, validate and map the snapshot at `path`.
inline result<loaded_snapshot> read_snapshot(const std::filesystem::path& path) {
    supermachine::detail::unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return errno_code(errno);
    return detail::read_snapshot_fd(fd.get());
}

/// The same from an open file descriptor (e.g. one passed by another
/// process); the fd stays the caller's.
inline result<loaded_snapshot> read_snapshot(int fd) {
    return detail::read_snapshot_fd(fd);
}

/// Validate the snapshot at `path` and return its records, without mapping RAM.
inline result<snapshot_metadata> inspect_snapshot(const std::filesystem::path& path) {
    supermachine::detail::unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return errno_code(errno);
    return detail::read_metadata_fd(fd.get());
}

/// The file policy: one snapshot at one path.
class file_store {
public:
    explicit file_store(std::filesystem::path path)
        : path_(std::move(path)) {}
    result<void> save(const snapshot_image& image) {
        SUPERMACHINE_TRY(write_snapshot(path_, image));
        return success();
    }
    result<loaded_snapshot> load() const { return read_snapshot(path_); }
    const std::filesystem::path& path() const noexcept { return path_; }

private:
    std::filesystem::path path_;
};

static_assert(snapshot_store<file_store>);

} // namespace supermachine::snapshot
