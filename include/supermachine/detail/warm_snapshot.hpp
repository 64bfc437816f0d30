#pragma once
// What a vm snapshot directory carries beside QEMU's migration stream and
// our devices' states (see doc/warm-start.md):
//
//   DIR/machine          QEMU's migration stream (CPU, RAM, its transports)
//   DIR/machine.devices  our device cores' save_state() (the cow overlay)
//   DIR/initramfs.cpio   the initramfs QEMU was started with (it must match)
//   DIR/meta             this record, written last: token, engine config,
//                        image identity, and a fingerprint of every file
//
// The record is read as hostile input (snapshot codec: every length bounded),
// and the fingerprints are checked before QEMU sees the stream, so a
// truncated or corrupted snapshot is refused, never restored.
#include <supermachine/error.hpp>
#include <supermachine/snapshot/codec.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace supermachine::detail {

/// Size and a fast 64-bit content hash of a file (not cryptographic: it
/// detects truncation and corruption, not an attacker who can write the cache).
struct file_fingerprint {
    std::uint64_t size = 0;
    std::uint64_t hash = 0;
    friend bool operator==(const file_fingerprint&, const file_fingerprint&) = default;
};

inline std::uint64_t hash_mix(std::uint64_t h, std::uint64_t word) noexcept {
    h ^= word + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdULL;
    return h ^ (h >> 32);
}

inline std::uint64_t hash_bytes(std::span<const std::byte> data, std::uint64_t h = 0) noexcept {
    std::size_t i = 0;
    for (; i + 8 <= data.size(); i += 8) {
        std::uint64_t word = 0;
        std::memcpy(&word, data.data() + i, 8);
        h = hash_mix(h, word);
    }
    std::uint64_t tail = 0;
    for (std::size_t k = 0; i + k < data.size(); ++k)
        tail |= std::uint64_t(std::to_integer<std::uint8_t>(data[i + k])) << (8 * k);
    return hash_mix(h, tail ^ (std::uint64_t(data.size()) << 56));
}

inline result<file_fingerprint> fingerprint_file(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno_code(errno);
    file_fingerprint f;
    // Small: a fresh 1 MiB buffer cost ≈ 250 page faults per file here.
    std::vector<std::byte> buffer(64 << 10);
    for (;;) {
        const auto n = ::read(fd, buffer.data(), buffer.size());
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            const int e = errno;
            ::close(fd);
            return errno_code(e);
        }
        if (n == 0) break;
        f.size += static_cast<std::uint64_t>(n);
        f.hash = hash_bytes(std::span(buffer).first(static_cast<std::size_t>(n)), f.hash);
    }
    ::close(fd);
    return f;
}

struct warm_snapshot_meta {
    static constexpr std::uint32_t magic = 0x4d524157; // "WARM"
    // 2: template snapshots (state, disk, ram, initramfs); 3: no initramfs (a
    // restore loads none), streams saved without QEMU's run state.
    static constexpr std::uint32_t version = 3;
    static constexpr std::uint64_t max_text = 4096;

    std::string engine = "qemu";
    std::string image_digest; // "sha256:..."
    std::string rootfs;       // the cached ext4 base the overlay sits on
    std::uint32_t memory_mib = 0;
    std::uint32_t cpus = 0;
    std::string kernel_release;
    std::string kernel_path;
    std::string cmdline;
    std::string agent_identity; // fingerprint of the agent binary the guest runs
    std::string token;          // the guest agent's token (on its saved command line)
    /// stream: QEMU's device state (no RAM); devices: the root disk's qcow2
    /// overlay; ram: the guest RAM file, checked by size and modification
    /// time only (hashing it would cost more than the restore).
    file_fingerprint stream, devices, ram;

    std::vector<std::byte> encode() const {
        auto write = [&](snapshot::byte_writer& w) {
            w.u32(magic);
            w.u32(version);
            for (const std::string* s : {&engine, &image_digest, &rootfs, &kernel_release,
                                         &kernel_path, &cmdline, &agent_identity, &token})
                w.string(*s, max_text);
            w.u32(memory_mib);
            w.u32(cpus);
            for (const file_fingerprint* f : {&stream, &devices, &ram}) {
                w.u64(f->size);
                w.u64(f->hash);
            }
        };
        snapshot::byte_writer measure;
        write(measure);
        std::vector<std::byte> out(measure.position());
        snapshot::byte_writer w(out);
        write(w);
        if (!w.finish()) return {};
        // A trailing hash of the record itself: a flipped bit anywhere is refused.
        const auto h = hash_bytes(out);
        for (int i = 0; i < 8; ++i)
            out.push_back(static_cast<std::byte>(h >> (8 * i)));
        return out;
    }

    static result<warm_snapshot_meta> decode(std::span<const std::byte> in) {
        if (in.size() < 16) return errc::snapshot_truncated;
        const auto body = in.first(in.size() - 8);
        std::uint64_t stored = 0;
        for (int i = 0; i < 8; ++i)
            stored |= std::uint64_t(std::to_integer<std::uint8_t>(in[body.size() + i])) << (8 * i);
        snapshot::byte_reader r(body);
        auto m = r.u32();
        if (!m) return m.error();
        if (m.value() != magic) return errc::snapshot_bad_magic;
        auto v = r.u32();
        if (!v) return v.error();
        if (v.value() != version) return errc::snapshot_unsupported_version;
        if (hash_bytes(body) != stored) return errc::snapshot_bad_record;
        warm_snapshot_meta meta;
        for (std::string* s :
             {&meta.engine, &meta.image_digest, &meta.rootfs, &meta.kernel_release,
              &meta.kernel_path, &meta.cmdline, &meta.agent_identity, &meta.token}) {
            auto text = r.string(max_text);
            if (!text) return text.error();
            *s = std::move(text).value();
        }
        auto memory = r.u32();
        if (!memory) return memory.error();
        auto cpus = r.u32();
        if (!cpus) return cpus.error();
        meta.memory_mib = memory.value();
        meta.cpus = cpus.value();
        for (file_fingerprint* f : {&meta.stream, &meta.devices, &meta.ram}) {
            auto size = r.u64();
            if (!size) return size.error();
            auto hash = r.u64();
            if (!hash) return hash.error();
            *f = {size.value(), hash.value()};
        }
        if (auto end = r.expect_end(); !end) return end.error();
        if (meta.token.empty() || meta.memory_mib == 0 || meta.cpus == 0)
            return errc::snapshot_bad_record;
        return meta;
    }
};

/// A large file's cheap identity: size and modification time (ns).
inline result<file_fingerprint> stat_fingerprint(const std::filesystem::path& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return errno_code(errno);
    return file_fingerprint{static_cast<std::uint64_t>(st.st_size),
                            static_cast<std::uint64_t>(st.st_mtim.tv_sec) * 1'000'000'000u +
                                static_cast<std::uint64_t>(st.st_mtim.tv_nsec)};
}

/// The agent binary's fingerprint, hashed once per process while the file
/// stays the same (same inode, size and modification time): a warm run
/// needs it twice (the snapshot key, then the restore's check).
inline std::string agent_identity(const std::filesystem::path& agent_binary) {
    struct stat st {};
    if (::stat(agent_binary.c_str(), &st) != 0) return {};
    struct remembered {
        std::string path;
        dev_t device = 0;
        ino_t inode = 0;
        off_t size = 0;
        timespec modified{};
        std::string identity;
    };
    static std::mutex mutex;
    static remembered last;
    std::lock_guard lock(mutex);
    if (last.path == agent_binary.string() && last.device == st.st_dev && last.inode == st.st_ino &&
        last.size == st.st_size && last.modified.tv_sec == st.st_mtim.tv_sec &&
        last.modified.tv_nsec == st.st_mtim.tv_nsec)
        return last.identity;
    auto f = fingerprint_file(agent_binary);
    if (!f) return {};
    last = {agent_binary.string(),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtim,
            std::to_string(f.value().size) + ":" + std::to_string(f.value().hash)};
    return last.identity;
}

inline result<std::vector<std::byte>> read_small_file(const std::filesystem::path& path,
                                                      std::size_t limit) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno_code(errno);
    std::vector<std::byte> out;
    std::array<std::byte, 4096> buffer;
    for (;;) {
        const auto n = ::read(fd, buffer.data(), buffer.size());
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (out.size() + static_cast<std::size_t>(n) > limit) {
            ::close(fd);
            return errc::snapshot_too_large;
        }
        out.insert(out.end(), buffer.begin(), buffer.begin() + n);
    }
    ::close(fd);
    return out;
}

/// Write the record `meta` to `file` and fsync it.
inline result<void> write_warm_snapshot_meta(const warm_snapshot_meta& meta,
                                             const std::filesystem::path& file) {
    const auto bytes = meta.encode();
    if (bytes.empty()) return errc::snapshot_too_large;
    const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return errno_code(errno);
    const bool ok = ::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()) &&
                    ::fsync(fd) == 0;
    ::close(fd);
    if (!ok) return errc::io_error;
    return success();
}

/// Move the finished snapshot directory `staging` to `path`, replacing an
/// older snapshot there: moved aside first (rename(2) will not replace a
/// non-empty directory), then dropped. Clones still running on its files
/// keep them (unlinked files stay mapped). `staging` stays where it was on
/// failure.
inline result<void> replace_directory(const std::filesystem::path& staging,
                                      const std::filesystem::path& path) {
    if (::rename(staging.c_str(), path.c_str()) == 0) return success();
    if (errno != ENOTEMPTY && errno != EEXIST) return errno_code(errno);
    const auto old = staging.string() + ".old";
    if (::rename(path.c_str(), old.c_str()) != 0) return errno_code(errno);
    if (::rename(staging.c_str(), path.c_str()) != 0) {
        const int e = errno;
        ::rename(old.c_str(), path.c_str()); // put the older one back
        return errno_code(e);
    }
    std::error_code ignored;
    std::filesystem::remove_all(old, ignored);
    return success();
}

/// A staging directory beside `path` (same filesystem, so the final
/// rename is atomic), hidden by its leading dot.
inline result<std::filesystem::path> make_staging_directory(const std::filesystem::path& path) {
    std::error_code ec;
    const auto parent =
        path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
    std::filesystem::create_directories(parent, ec);
    if (ec) return ec;
    std::string pattern = (parent / ("." + path.filename().string() + ".tmp-XXXXXX")).string();
    if (!::mkdtemp(pattern.data())) return errno_code(errno);
    return std::filesystem::path(pattern);
}

} // namespace supermachine::detail
