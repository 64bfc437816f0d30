#pragma once
// Content-addressed blob store under $XDG_CACHE_HOME/supermachine
// (default ~/.cache/supermachine):
//
//   blobs/<algorithm>/<hex>        verified blobs, read-only, never modified
//   ingest/<algorithm>-<hex>.partial  the download in progress (kept for Range resume)
//   images.json                    reference -> manifest digest records (`supermachine images`)
//
// A blob is written to a temp file while hashing, verified, and renamed into
// place atomically; a mismatch unlinks the temp file, so nothing is left
// behind. Concurrent writers of one blob are safe: the .partial file is
// flock()ed; a second writer uses a private temp file instead, and whoever
// renames last replaces identical bytes.
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/image_config.hpp>
#include <supermachine/oci/manifest.hpp>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace supermachine::oci {

namespace detail {
inline error_code last_errno() {
    return errno_code(errno);
}

inline result<void> write_all(int fd, const void* data, std::size_t size) {
    auto* p = static_cast<const char*>(data);
    while (size > 0) {
        auto n = ::write(fd, p, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            return last_errno();
        }
        p += n;
        size -= std::size_t(n);
    }
    return success();
}
} // namespace detail

/// Streams one blob into the store. Obtained from content_store::begin_write.
/// Destroying it without commit() keeps a resumable .partial file (so an
/// interrupted download can continue with Range) but removes private temps.
class blob_writer {
public:
    blob_writer(blob_writer&& o) noexcept
        : final_path_(std::move(o.final_path_))
        , temp_path_(std::move(o.temp_path_))
        , fd_(std::move(o.fd_))
        , hasher_(std::move(o.hasher_))
        , expected_(std::move(o.expected_))
        , received_(std::move(o.received_))
        , expected_size_(o.expected_size_)
        , resumable_(o.resumable_)
        , finished_(std::exchange(o.finished_, true)) {}
    blob_writer& operator=(blob_writer&&) = delete;
    ~blob_writer() {
        if (!finished_ && !resumable_) std::filesystem::remove(temp_path_, ignored_);
    }

    /// Bytes already in the temp file (a resumed download starts here).
    std::uint64_t offset() const noexcept { return hasher_.bytes_hashed(); }
    std::int64_t expected_size() const noexcept { return expected_size_; }
    const digest& expected() const noexcept { return expected_; }
    const std::filesystem::path& temp_path() const noexcept { return temp_path_; }
    /// The digest of the bytes received, once commit() has run.
    const digest& received() const noexcept { return received_; }

    /// Append bytes. More bytes than the descriptor's size is a size
    /// mismatch: the temp file is removed at once.
    result<void> write(std::span<const std::byte> bytes) {
        if (finished_) return errc::invalid_argument;
        if (expected_size_ >= 0 && offset() + bytes.size() > std::uint64_t(expected_size_)) {
            discard();
            return errc::size_mismatch;
        }
        if (auto r = detail::write_all(fd_.get(), bytes.data(), bytes.size()); !r) {
            discard();
            return r.error();
        }
        hasher_.update(bytes);
        return success();
    }
    result<void> write(std::string_view bytes) { return write(std::as_bytes(std::span(bytes))); }

    /// Start over (the server ignored our Range request).
    result<void> restart() {
        if (finished_) return errc::invalid_argument;
        if (::ftruncate(fd_.get(), 0) != 0 || ::lseek(fd_.get(), 0, SEEK_SET) != 0)
            return detail::last_errno();
        hasher_ = hasher(expected_.algorithm());
        return success();
    }

    /// Verify size and digest, then rename into place. On mismatch the temp
    /// file is removed and errc::size_mismatch (fewer bytes than the
    /// descriptor's size) or errc::digest_mismatch returned; received() then
    /// says what the bytes did hash to.
    result<void> commit() {
        if (finished_) return errc::invalid_argument;
        finished_ = true;
        received_ = hasher_.finish();
        bool size_ok = expected_size_ < 0 || offset() == std::uint64_t(expected_size_);
        if (!size_ok || received_ != expected_) {
            std::filesystem::remove(temp_path_, ignored_);
            return size_ok ? errc::digest_mismatch : errc::size_mismatch;
        }
        ::fchmod(fd_.get(), 0444);
        if (::fdatasync(fd_.get()) != 0) {
            auto ec = detail::last_errno();
            std::filesystem::remove(temp_path_, ignored_);
            return ec;
        }
        if (::rename(temp_path_.c_str(), final_path_.c_str()) != 0) {
            auto ec = detail::last_errno();
            std::filesystem::remove(temp_path_, ignored_);
            return ec;
        }
        fd_.reset(); // releases the flock after the rename: a waiter then sees the blob
        return success();
    }

    /// Give up and remove the temp file (e.g. on a verification failure).
    void discard() noexcept {
        if (finished_) return;
        finished_ = true;
        std::filesystem::remove(temp_path_, ignored_);
        fd_.reset();
    }

private:
    friend class content_store;
    blob_writer(std::filesystem::path final_path, std::filesystem::path temp_path,
                supermachine::detail::unique_fd fd, digest expected, std::int64_t expected_size,
                bool resumable)
        : final_path_(std::move(final_path))
        , temp_path_(std::move(temp_path))
        , fd_(std::move(fd))
        , hasher_(expected.algorithm())
        , expected_(std::move(expected))
        , expected_size_(expected_size)
        , resumable_(resumable) {}

    std::filesystem::path final_path_, temp_path_;
    supermachine::detail::unique_fd fd_;
    hasher hasher_;
    digest expected_, received_;
    std::int64_t expected_size_;
    bool resumable_;
    bool finished_ = false;
    std::error_code ignored_;
};

/// One `supermachine images` record: what a reference resolved to when pulled.
struct image_record {
    std::string reference;        // e.g. "127.0.0.1:5000/test/busybox:1", "oci:/path:tag"
    digest manifest_digest;       // what the reference names (index or manifest)
    digest image_manifest_digest; // the platform's image manifest
    digest config_digest;
    std::int64_t size = 0;      // config + layers as stored (compressed)
    std::string platform;       // "linux/amd64"
    std::int64_t pulled_at = 0; // unix seconds
};

/// An image whose manifest, config and layers are all in the content store:
/// what pull (registry, oci: layout, docker-archive:) hands to the rootfs builder.
struct pulled_image {
    std::string reference;        // as recorded in images.json
    digest manifest_digest;       // what the reference names (index or manifest)
    digest image_manifest_digest; // the platform's image manifest
    image_manifest manifest;
    image_config config;
    std::vector<std::filesystem::path> layers; // blob files, bottom layer first
};

class content_store {
public:
    explicit content_store(std::filesystem::path root)
        : root_(std::move(root)) {}

    /// $XDG_CACHE_HOME/supermachine, else $HOME/.cache/supermachine.
    static std::filesystem::path default_root() {
        if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg == '/')
            return std::filesystem::path(xdg) / "supermachine";
        const char* home = std::getenv("HOME");
        return std::filesystem::path(home && *home ? home : "/tmp") / ".cache" / "supermachine";
    }
    static content_store open_default() { return content_store(default_root()); }

    const std::filesystem::path& root() const noexcept { return root_; }

    std::filesystem::path blob_path(const digest& d) const {
        return root_ / "blobs" / std::string(d.algorithm_name()) / d.hex();
    }
    bool contains(const digest& d) const {
        std::error_code ec;
        return std::filesystem::is_regular_file(blob_path(d), ec);
    }
    result<std::int64_t> blob_size(const digest& d) const {
        std::error_code ec;
        auto size = std::filesystem::file_size(blob_path(d), ec);
        if (ec) return errc::not_found;
        return std::int64_t(size);
    }

    /// Read a small blob (manifest, config), re-verifying its digest.
    result<std::string> read_blob(const digest& d, std::size_t max_bytes) const {
        supermachine::detail::unique_fd fd(::open(blob_path(d).c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd) return errno == ENOENT ? make_error_code(errc::not_found) : detail::last_errno();
        struct stat st {};
        if (::fstat(fd.get(), &st) != 0) return detail::last_errno();
        if (st.st_size < 0 || std::uint64_t(st.st_size) > max_bytes) return errc::image_too_large;
        std::string bytes(std::size_t(st.st_size), '\0');
        std::size_t done = 0;
        while (done < bytes.size()) {
            auto n = ::read(fd.get(), bytes.data() + done, bytes.size() - done);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return errc::io_error;
            done += std::size_t(n);
        }
        if (compute_digest(bytes, d.algorithm()) != d) return errc::digest_mismatch;
        return bytes;
    }

    /// Open a writer for `expected`. `expected_size` < 0 means unknown. If a
    /// .partial from an earlier attempt exists, its bytes are re-hashed and the
    /// writer resumes after them (offset() says where).
    result<blob_writer> begin_write(const digest& expected, std::int64_t expected_size = -1) {
        if (!expected.valid()) return errc::bad_digest;
        SUPERMACHINE_TRY(ensure_directories(expected));
        auto final_path = blob_path(expected);
        auto ingest = root_ / "ingest";
        auto partial =
            ingest / (std::string(expected.algorithm_name()) + "-" + expected.hex() + ".partial");
        for (int attempt = 0; attempt < 8; ++attempt) {
            supermachine::detail::unique_fd fd(
                ::open(partial.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
            if (!fd) return detail::last_errno();
            if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) break; // busy: private temp below
            // The holder before us may have renamed this very inode into blobs/:
            // only a lock on the file still named .partial counts.
            struct stat by_fd {
            }, by_name{};
            if (::fstat(fd.get(), &by_fd) != 0) return detail::last_errno();
            if (::stat(partial.c_str(), &by_name) != 0 || by_fd.st_ino != by_name.st_ino ||
                by_fd.st_dev != by_name.st_dev)
                continue;
            blob_writer writer(final_path, partial, std::move(fd), expected, expected_size, true);
            SUPERMACHINE_TRY(rehash_partial(writer));
            return writer;
        }
        // Someone else is writing this blob: a private temp file, no resume.
        std::string pattern = (ingest / (expected.hex() + ".XXXXXX")).string();
        supermachine::detail::unique_fd temp(::mkostemp(pattern.data(), O_CLOEXEC));
        if (!temp) return detail::last_errno();
        return blob_writer(final_path, pattern, std::move(temp), expected, expected_size, false);
    }

    /// Store bytes we hold in memory, verified against `expected`.
    result<void> write_blob(const digest& expected, std::string_view bytes) {
        if (contains(expected)) return success();
        SUPERMACHINE_TRY(writer, begin_write(expected, std::int64_t(bytes.size())));
        SUPERMACHINE_TRY(writer.restart());
        SUPERMACHINE_TRY(writer.write(bytes));
        return writer.commit();
    }

    // ---- image records ----

    result<std::vector<image_record>> list_images() const {
        std::vector<image_record> out;
        std::error_code ec;
        auto path = root_ / "images.json";
        if (!std::filesystem::exists(path, ec)) return out;
        auto size = std::filesystem::file_size(path, ec);
        if (ec) return ec;
        if (size > (16u << 20)) return errc::image_too_large;
        std::string text(size, '\0');
        {
            supermachine::detail::unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
            if (!fd) return detail::last_errno();
            auto n = ::read(fd.get(), text.data(), text.size());
            if (n < 0) return detail::last_errno();
            text.resize(std::size_t(n));
        }
        auto j = nlohmann::json::parse(text, nullptr, false);
        if (j.is_discarded() || !j.is_object() || !j.contains("images") || !j["images"].is_array())
            return errc::manifest_invalid;
        for (const auto& e : j["images"]) {
            if (!e.is_object()) continue;
            image_record r;
            try {
                r.reference = e.at("reference").get<std::string>();
                auto md = digest::parse(e.at("manifest_digest").get<std::string>());
                auto imd = digest::parse(e.at("image_manifest_digest").get<std::string>());
                auto cd = digest::parse(e.at("config_digest").get<std::string>());
                if (!md || !imd || !cd) continue;
                r.manifest_digest = md.value();
                r.image_manifest_digest = imd.value();
                r.config_digest = cd.value();
                r.size = e.at("size").get<std::int64_t>();
                r.platform = e.at("platform").get<std::string>();
                r.pulled_at = e.at("pulled_at").get<std::int64_t>();
            } catch (const nlohmann::json::exception&) {
                continue; // a damaged record is skipped, not fatal
            }
            out.push_back(std::move(r));
        }
        return out;
    }

    result<std::optional<image_record>> find_image(std::string_view reference) const {
        SUPERMACHINE_TRY(all, list_images());
        for (auto& r : all)
            if (r.reference == reference) return std::optional(std::move(r));
        return std::optional<image_record>();
    }

    /// Add or replace the record for record.reference (under a lock, atomically).
    result<void> record_image(image_record record) {
        std::error_code ec;
        std::filesystem::create_directories(root_, ec);
        if (ec) return ec;
        supermachine::detail::unique_fd lock(
            ::open((root_ / "images.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
        if (!lock) return detail::last_errno();
        while (::flock(lock.get(), LOCK_EX) != 0)
            if (errno != EINTR) return detail::last_errno();
        auto existing = list_images();
        std::vector<image_record> all =
            existing ? std::move(existing).value() : std::vector<image_record>{};
        if (record.pulled_at == 0)
            record.pulled_at = std::chrono::duration_cast<std::chrono::seconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count();
        std::erase_if(all, [&](const image_record& r) { return r.reference == record.reference; });
        all.push_back(std::move(record));
        nlohmann::json list = nlohmann::json::array();
        for (const auto& r : all)
            list.push_back({{"reference", r.reference},
                            {"manifest_digest", r.manifest_digest.str()},
                            {"image_manifest_digest", r.image_manifest_digest.str()},
                            {"config_digest", r.config_digest.str()},
                            {"size", r.size},
                            {"platform", r.platform},
                            {"pulled_at", r.pulled_at}});
        auto text = nlohmann::json{{"images", list}}.dump(2) + "\n";
        auto temp = root_ / "images.json.tmp";
        supermachine::detail::unique_fd fd(
            ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
        if (!fd) return detail::last_errno();
        SUPERMACHINE_TRY(detail::write_all(fd.get(), text.data(), text.size()));
        fd.reset();
        if (::rename(temp.c_str(), (root_ / "images.json").c_str()) != 0)
            return detail::last_errno();
        return success();
    }

    /// Rebuild a pulled_image from the store (no network): manifest and config
    /// are re-read and re-verified; every layer blob must be present.
    result<pulled_image> load_image(const image_record& record) const {
        pulled_image image;
        image.reference = record.reference;
        image.manifest_digest = record.manifest_digest;
        image.image_manifest_digest = record.image_manifest_digest;
        SUPERMACHINE_TRY(manifest_bytes,
                         read_blob(record.image_manifest_digest, max_manifest_bytes));
        SUPERMACHINE_TRY(manifest, parse_image_manifest(manifest_bytes));
        SUPERMACHINE_TRY(config_bytes, read_blob(manifest.config.digest, max_config_bytes));
        SUPERMACHINE_TRY(config, parse_image_config(config_bytes));
        for (const auto& layer : manifest.layers) {
            if (!contains(layer.digest)) return errc::not_found;
            image.layers.push_back(blob_path(layer.digest));
        }
        image.manifest = std::move(manifest);
        image.config = std::move(config);
        return image;
    }

private:
    result<void> ensure_directories(const digest& d) const {
        std::error_code ec;
        std::filesystem::create_directories(root_ / "blobs" / std::string(d.algorithm_name()), ec);
        if (!ec) std::filesystem::create_directories(root_ / "ingest", ec);
        if (ec) return ec;
        return success();
    }

    // Feed what an earlier attempt left in the .partial through the hasher;
    // a partial longer than the blob can be is garbage: start over.
    static result<void> rehash_partial(blob_writer& writer) {
        int fd = writer.fd_.get();
        struct stat st {};
        if (::fstat(fd, &st) != 0) return detail::last_errno();
        if (writer.expected_size_ >= 0 && st.st_size > writer.expected_size_)
            return writer.restart();
        std::vector<std::byte> buffer(1 << 16);
        if (::lseek(fd, 0, SEEK_SET) != 0) return detail::last_errno();
        while (true) {
            auto n = ::read(fd, buffer.data(), buffer.size());
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return detail::last_errno();
            if (n == 0) break;
            writer.hasher_.update(std::span(buffer.data(), std::size_t(n)));
        }
        return success();
    }

    std::filesystem::path root_;
};

} // namespace supermachine::oci
