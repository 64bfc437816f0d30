#pragma once
// Layer byte streams: a source concept, file and memory sources, and a
// decompressing source that detects gzip / zstd / plain by magic bytes.
//
// Media types are never trusted (registries and tools mislabel layers);
// the first bytes decide. Output is bounded in total and by ratio to the
// compressed input so a zip bomb stops with errc::image_too_large.
#include <supermachine/error.hpp>

#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace supermachine::oci {

/// A byte source: read_some fills up to buffer.size() bytes, returns 0 at end.
template <class S>
concept byte_source = requires(S& s, std::span<std::byte> buffer) {
    { s.read_some(buffer) } -> std::same_as<result<std::size_t>>;
};

/// Reads an open file descriptor (owned: closed on destruction).
class file_source {
public:
    file_source() = default;
    explicit file_source(int fd) noexcept
        : fd_(fd) {}
    file_source(file_source&& other) noexcept
        : fd_(std::exchange(other.fd_, -1)) {}
    file_source& operator=(file_source&& other) noexcept {
        if (this != &other) {
            close();
            fd_ = std::exchange(other.fd_, -1);
        }
        return *this;
    }
    ~file_source() { close(); }

    static result<file_source> open(const std::filesystem::path& path) {
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) return errno_code(errno);
        return file_source(fd);
    }

    result<std::size_t> read_some(std::span<std::byte> buffer) {
        for (;;) {
            ssize_t n = ::read(fd_, buffer.data(), buffer.size());
            if (n >= 0) return static_cast<std::size_t>(n);
            if (errno != EINTR) return errno_code(errno);
        }
    }

private:
    void close() noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }
    int fd_ = -1;
};

/// Reads a span in memory (not owned).
class memory_source {
public:
    explicit memory_source(std::span<const std::byte> data) noexcept
        : data_(data) {}
    result<std::size_t> read_some(std::span<std::byte> buffer) {
        std::size_t n = std::min(buffer.size(), data_.size());
        if (n) std::memcpy(buffer.data(), data_.data(), n);
        data_ = data_.subspan(n);
        return n;
    }

private:
    std::span<const std::byte> data_;
};

enum class compression { none, gzip, zstd };

/// What a zip bomb must not get past.
struct decompress_limits {
    std::uint64_t max_output = std::uint64_t{64} << 30; ///< total decompressed bytes
    /// output / input ratio allowed once output exceeds ratio_grace bytes. gzip
    /// tops out near 1032:1; zstd can reach 10^5:1 on zeros, which no real layer
    /// needs as a whole-stream ratio.
    std::uint64_t max_ratio = 4096;
    std::uint64_t ratio_grace = std::uint64_t{64} << 20;
};

/// Detect the format from the first bytes (gzip 1f 8b, zstd 28 b5 2f fd).
inline compression detect_compression(std::span<const std::byte> head) noexcept {
    auto at = [&](std::size_t i) { return std::to_integer<std::uint8_t>(head[i]); };
    if (head.size() >= 2 && at(0) == 0x1f && at(1) == 0x8b) return compression::gzip;
    if (head.size() >= 4 && at(0) == 0x28 && at(1) == 0xb5 && at(2) == 0x2f && at(3) == 0xfd)
        return compression::zstd;
    return compression::none;
}

/// A byte_source that decompresses another one, format detected on first read.
/// Multi-member gzip and multi-frame zstd streams are read to the end; bytes
/// after the end of a compressed stream that are not another member are an error.
template <byte_source Source>
class decompressing_source {
public:
    explicit decompressing_source(Source source, decompress_limits limits = {})
        : source_(std::move(source))
        , limits_(limits)
        , input_(buffer_size) {}
    decompressing_source(decompressing_source&&) = delete; // zlib keeps pointers into us
    ~decompressing_source() {
        if (zlib_ready_) inflateEnd(&zlib_);
        if (zstd_) ZSTD_freeDStream(zstd_);
    }

    compression format() const noexcept { return format_; }
    std::uint64_t compressed_bytes() const noexcept { return consumed_total_; }
    std::uint64_t output_bytes() const noexcept { return produced_total_; }

    result<std::size_t> read_some(std::span<std::byte> buffer) {
        if (!started_) {
            SUPERMACHINE_TRY(start());
        }
        if (buffer.empty()) return std::size_t{0};
        std::size_t n = 0;
        switch (format_) {
        case compression::none: {
            if (input_pos_ < input_len_) {
                n = std::min(buffer.size(), input_len_ - input_pos_);
                std::memcpy(buffer.data(), input_.data() + input_pos_, n);
                input_pos_ += n;
            } else {
                SUPERMACHINE_TRY(got, source_.read_some(buffer));
                n = got;
                consumed_total_ += n;
            }
            break;
        }
        case compression::gzip: {
            SUPERMACHINE_TRY(got, read_gzip(buffer));
            n = got;
            break;
        }
        case compression::zstd: {
            SUPERMACHINE_TRY(got, read_zstd(buffer));
            n = got;
            break;
        }
        }
        produced_total_ += n;
        if (format_ != compression::none) {
            if (produced_total_ > limits_.max_output) return make_error_code(errc::image_too_large);
            if (produced_total_ > limits_.ratio_grace &&
                produced_total_ / std::max<std::uint64_t>(consumed_total_, 1) > limits_.max_ratio)
                return make_error_code(errc::image_too_large);
        } else if (produced_total_ > limits_.max_output) {
            return make_error_code(errc::image_too_large);
        }
        return n;
    }

private:
    static constexpr std::size_t buffer_size = 128 * 1024;

    result<void> fill() {
        if (input_pos_ < input_len_) return success();
        SUPERMACHINE_TRY(got, source_.read_some(std::span(input_.data(), input_.size())));
        input_pos_ = 0;
        input_len_ = got;
        consumed_total_ += got;
        return success();
    }

    result<void> start() {
        started_ = true;
        // Gather up to 4 bytes for the magic, even from a source that returns 1 at a time.
        while (input_len_ < 4) {
            SUPERMACHINE_TRY(got, source_.read_some(std::span(input_.data() + input_len_,
                                                              input_.size() - input_len_)));
            if (got == 0) break;
            input_len_ += got;
            consumed_total_ += got;
        }
        format_ = detect_compression(std::span(input_.data(), input_len_));
        if (format_ == compression::gzip) {
            std::memset(&zlib_, 0, sizeof zlib_);
            if (inflateInit2(&zlib_, 16 + MAX_WBITS) != Z_OK)
                return make_error_code(errc::out_of_resources);
            zlib_ready_ = true;
        } else if (format_ == compression::zstd) {
            frame_done_ = false;
            zstd_ = ZSTD_createDStream();
            if (!zstd_) return make_error_code(errc::out_of_resources);
            ZSTD_initDStream(zstd_);
            // A zstd frame may ask for a window up to 2 GiB; 128 MiB covers --long=27.
            ZSTD_DCtx_setParameter(zstd_, ZSTD_d_windowLogMax, 27);
        }
        return success();
    }

    result<std::size_t> read_gzip(std::span<std::byte> out) {
        if (stream_done_) return std::size_t{0};
        for (;;) {
            SUPERMACHINE_TRY(fill());
            if (input_pos_ >= input_len_) {
                // End of input: fine only between members.
                if (member_done_) {
                    stream_done_ = true;
                    return std::size_t{0};
                }
                return make_error_code(errc::archive_malformed);
            }
            if (member_done_) {
                // Another member must start with the gzip magic; anything else is junk.
                if (std::to_integer<std::uint8_t>(input_[input_pos_]) != 0x1f)
                    return make_error_code(errc::archive_malformed);
                if (inflateReset(&zlib_) != Z_OK) return make_error_code(errc::archive_malformed);
                member_done_ = false;
            }
            zlib_.next_in = reinterpret_cast<Bytef*>(input_.data() + input_pos_);
            zlib_.avail_in = static_cast<uInt>(input_len_ - input_pos_);
            zlib_.next_out = reinterpret_cast<Bytef*>(out.data());
            zlib_.avail_out = static_cast<uInt>(std::min<std::size_t>(out.size(), 1u << 30));
            int rc = inflate(&zlib_, Z_NO_FLUSH);
            std::size_t used = (input_len_ - input_pos_) - zlib_.avail_in;
            input_pos_ += used;
            std::size_t produced = std::min<std::size_t>(out.size(), 1u << 30) -
                                   static_cast<std::size_t>(zlib_.avail_out);
            if (rc == Z_STREAM_END) {
                member_done_ = true;
            } else if (rc != Z_OK && !(rc == Z_BUF_ERROR && produced == 0 && used == 0)) {
                return make_error_code(errc::archive_malformed);
            }
            if (produced) return produced;
            if (rc == Z_BUF_ERROR && used == 0 && input_pos_ < input_len_)
                return make_error_code(errc::archive_malformed);
        }
    }

    result<std::size_t> read_zstd(std::span<std::byte> out) {
        if (stream_done_) return std::size_t{0};
        for (;;) {
            SUPERMACHINE_TRY(fill());
            if (input_pos_ >= input_len_) {
                if (frame_done_) {
                    stream_done_ = true;
                    return std::size_t{0};
                }
                return make_error_code(errc::archive_malformed);
            }
            ZSTD_inBuffer in{input_.data(), input_len_, input_pos_};
            ZSTD_outBuffer o{out.data(), out.size(), 0};
            std::size_t rc = ZSTD_decompressStream(zstd_, &o, &in);
            if (ZSTD_isError(rc)) return make_error_code(errc::archive_malformed);
            input_pos_ = in.pos;
            frame_done_ = rc == 0;
            if (o.pos) return o.pos;
        }
    }

    Source source_;
    decompress_limits limits_;
    std::vector<std::byte> input_;
    std::size_t input_pos_ = 0, input_len_ = 0;
    std::uint64_t consumed_total_ = 0, produced_total_ = 0;
    compression format_ = compression::none;
    bool started_ = false, stream_done_ = false, member_done_ = false, frame_done_ = true;
    z_stream zlib_{};
    bool zlib_ready_ = false;
    ZSTD_DStream* zstd_ = nullptr;
};

} // namespace supermachine::oci
