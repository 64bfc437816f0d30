#pragma once
// Private runtime directories under the temp directory (the vm's sockets,
// initramfs, RAM file and overlay; QEMU's sockets) that leave nothing behind
// when their owner is SIGKILLed. Each holds `.owner`, a file its owner keeps
// flock()ed (close-on-exec) for as long as it lives; the kernel drops the
// lock with the process however it dies. Making a directory first removes
// the same prefix's directories whose `.owner` lock is free: a killed run's
// leftovers go on the next start.
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

namespace supermachine::detail {

struct runtime_directory {
    std::filesystem::path path;
    unique_fd owner; // the held lock: the directory is in use while it is open
};

/// Removes `parent`/`prefix`-* directories of this user whose owner is gone
/// (`.owner` present and not locked). A directory without `.owner` (being
/// made, or another program's) is left alone. Best effort.
inline void remove_stale_runtime_directories(const std::filesystem::path& parent,
                                             std::string_view prefix) {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (auto it = fs::directory_iterator(parent, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
        const auto name = it->path().filename().string();
        if (!name.starts_with(std::string(prefix) + "-")) continue;
        struct stat st {};
        if (::lstat(it->path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) ||
            st.st_uid != ::geteuid())
            continue;
        const int fd = ::open((it->path() / ".owner").c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) continue;
        const bool orphaned = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
        if (orphaned) {
            std::error_code ignored;
            fs::remove_all(it->path(), ignored);
        }
        ::close(fd); // after the removal: a new owner cannot take the name meanwhile
    }
}

/// A fresh `prefix`-XXXXXX directory (mode 0700) under the temp directory
/// ($TMPDIR, else /tmp), its `.owner` lock held; stale ones removed first.
inline result<runtime_directory> make_runtime_directory(std::string_view prefix) {
    const auto parent = std::filesystem::temp_directory_path();
    remove_stale_runtime_directories(parent, prefix);
    std::string pattern = (parent / (std::string(prefix) + "-XXXXXX")).string();
    if (!::mkdtemp(pattern.data())) return errno_code(errno);
    runtime_directory dir;
    dir.path = pattern;
    // Locked before it gets its name: a scan never sees an unlocked `.owner`.
    const auto staging = dir.path / ".owner.new";
    dir.owner.reset(
        ::open(staging.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!dir.owner || ::flock(dir.owner.get(), LOCK_EX) != 0 ||
        ::rename(staging.c_str(), (dir.path / ".owner").c_str()) != 0) {
        const auto error = errno_code(errno);
        std::error_code ignored;
        std::filesystem::remove_all(dir.path, ignored);
        return error;
    }
    return dir;
}

} // namespace supermachine::detail
