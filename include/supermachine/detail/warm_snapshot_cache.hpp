#pragma once
// The warm-snapshot cache's size policy (doc/warm-start.md). Every key
// (image, memory, cpus, kernel, agent build) gets its own 100+ MiB
// directory, so a changed agent or kernel would otherwise leave the old ones
// forever. A directory's own mtime is its last use (`mark_warm_snapshot_used`
// after each restore); pruning keeps the most recently used few, never one
// used lately (a run may be restoring it) and never one whose creation lock
// is held, and clears creation temp directories a crashed run left behind.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace supermachine::detail {

struct warm_snapshot_prune_policy {
    std::size_t keep = 4; // most recently used kept
    std::filesystem::file_time_type::duration min_idle = std::chrono::minutes(10);
    std::filesystem::file_time_type::duration temp_age = std::chrono::hours(1);
};

/// Records that `dir` was just restored from (its mtime; nothing reads it but
/// the pruning). Best effort: a read-only cache only loses the ordering.
inline void mark_warm_snapshot_used(const std::filesystem::path& dir) {
    std::error_code ignored;
    std::filesystem::last_write_time(dir, std::filesystem::file_time_type::clock::now(), ignored);
}

/// True when another process holds `<dir>.lock` (it is creating `dir`).
inline bool warm_snapshot_lock_held(const std::filesystem::path& dir) {
    const int fd = ::open((dir.string() + ".lock").c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    const bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0;
    ::close(fd);
    return held;
}

/// Removes, under `root`, the snapshot directories beyond the `keep` most
/// recently used (`current` counts among them and is never removed) that
/// have been idle for `min_idle`, and creation temp directories
/// (`.<key>.tmp-*`) older than `temp_age`. Returns what it removed.
inline std::vector<std::filesystem::path>
prune_warm_snapshots(const std::filesystem::path& root, const std::filesystem::path& current,
                     const warm_snapshot_prune_policy& policy = {}) {
    namespace fs = std::filesystem;
    const auto now = fs::file_time_type::clock::now();
    struct entry {
        fs::path dir;
        fs::file_time_type used;
    };
    std::vector<entry> snapshots;
    std::vector<fs::path> removed;
    std::error_code ec;
    for (auto it = fs::directory_iterator(root, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
        std::error_code e;
        if (!it->is_directory(e) || it->is_symlink(e)) continue; // never follow out of the cache
        const auto name = it->path().filename().string();
        const auto mtime = fs::last_write_time(it->path(), e);
        if (e) continue;
        if (name.starts_with(".") && name.find(".tmp-") != std::string::npos) {
            if (now - mtime > policy.temp_age && fs::remove_all(it->path(), e) > 0 && !e)
                removed.push_back(it->path());
        } else if (fs::exists(it->path() / "meta", e) ||
                   fs::exists(it->path() / "machine.snap", e)) { // QEMU's, or the kvm engine's
            snapshots.push_back({it->path(), mtime});
        }
    }
    std::sort(snapshots.begin(), snapshots.end(),
              [](const entry& a, const entry& b) { return a.used > b.used; });
    // `current` takes one of the `keep` places.
    const std::size_t others =
        current.empty() ? policy.keep : (policy.keep > 0 ? policy.keep - 1 : 0);
    std::size_t kept = 0;
    for (const auto& s : snapshots) {
        std::error_code e;
        const bool is_current = !current.empty() && fs::equivalent(s.dir, current, e);
        if (is_current || kept < others) {
            if (!is_current) ++kept;
            continue;
        }
        if (now - s.used < policy.min_idle || warm_snapshot_lock_held(s.dir)) continue;
        if (fs::remove_all(s.dir, e) > 0 && !e) removed.push_back(s.dir);
    }
    return removed;
}

} // namespace supermachine::detail
