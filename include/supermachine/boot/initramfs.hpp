#pragma once
// Build an initramfs (newc cpio, optionally gzip-compressed) from a list of
// entries, in memory, without touching the host filesystem.
#include <supermachine/boot/cpio.hpp>
#include <supermachine/error.hpp>

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::boot {

struct initramfs_entry {
    std::string path;
    cpio_kind kind = cpio_kind::regular;
    cpio_attributes attributes{};
    std::vector<std::byte> data; // regular file contents
    std::string link_target;     // symlink
    std::uint32_t major = 0, minor = 0;

    static initramfs_entry directory(std::string path, std::uint32_t permissions = 0755) {
        return {std::move(path), cpio_kind::directory, {permissions}, {}, {}, 0, 0};
    }
    static initramfs_entry file(std::string path, std::vector<std::byte> data,
                                std::uint32_t permissions = 0644) {
        return {std::move(path), cpio_kind::regular, {permissions}, std::move(data), {}, 0, 0};
    }
    static initramfs_entry text_file(std::string path, std::string_view text,
                                     std::uint32_t permissions = 0644) {
        const auto bytes = std::as_bytes(std::span(text.data(), text.size()));
        return file(std::move(path), {bytes.begin(), bytes.end()}, permissions);
    }
    static initramfs_entry symlink(std::string path, std::string target) {
        return {std::move(path), cpio_kind::symlink, {0777}, {}, std::move(target), 0, 0};
    }
    static initramfs_entry device(std::string path, cpio_kind kind, std::uint32_t major,
                                  std::uint32_t minor, std::uint32_t permissions = 0600) {
        return {std::move(path), kind, {permissions}, {}, {}, major, minor};
    }
};

enum class initramfs_compression { none, gzip };

/// Write `entries` and the trailer to `writer`.
template <class Sink>
result<void> write_initramfs(cpio_writer<Sink>& writer, std::span<const initramfs_entry> entries) {
    for (const auto& e : entries) {
        switch (e.kind) {
        case cpio_kind::directory: {
            SUPERMACHINE_TRY(writer.add_directory(e.path, e.attributes));
            break;
        }
        case cpio_kind::regular: {
            SUPERMACHINE_TRY(writer.add_file(e.path, e.data, e.attributes));
            break;
        }
        case cpio_kind::symlink: {
            SUPERMACHINE_TRY(writer.add_symlink(e.path, e.link_target, e.attributes));
            break;
        }
        default: {
            SUPERMACHINE_TRY(writer.add_device(e.path, e.kind, e.major, e.minor, e.attributes));
            break;
        }
        }
    }
    return writer.finish();
}

namespace detail {
/// A cpio sink that gzip-compresses into a byte vector (zlib, gzip wrapper).
class gzip_sink {
public:
    explicit gzip_sink(std::vector<std::byte>& out)
        : out_(&out) {
        stream_ = std::make_unique<z_stream>();
        if (deflateInit2(stream_.get(), 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
            stream_.reset();
    }
    gzip_sink(gzip_sink&& other) noexcept = default;
    ~gzip_sink() {
        if (stream_) deflateEnd(stream_.get());
    }
    result<void> operator()(std::span<const std::byte> bytes) { return run(bytes, Z_NO_FLUSH); }
    result<void> finish() { return run({}, Z_FINISH); }

private:
    result<void> run(std::span<const std::byte> bytes, int flush) {
        if (!stream_) return errc::out_of_resources;
        // zlib's avail_in is 32-bit: feed large spans in slices.
        do {
            const std::size_t slice = std::min<std::size_t>(bytes.size(), 1u << 30);
            stream_->next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(bytes.data()));
            stream_->avail_in = static_cast<uInt>(slice);
            const int mode = slice == bytes.size() ? flush : Z_NO_FLUSH;
            int status;
            do {
                std::byte chunk[64 * 1024];
                stream_->next_out = reinterpret_cast<Bytef*>(chunk);
                stream_->avail_out = sizeof chunk;
                status = deflate(stream_.get(), mode);
                if (status == Z_STREAM_ERROR) return errc::io_error;
                out_->insert(out_->end(), chunk, chunk + (sizeof chunk - stream_->avail_out));
            } while (stream_->avail_out == 0 || (mode == Z_FINISH && status != Z_STREAM_END));
            bytes = bytes.subspan(slice);
        } while (!bytes.empty());
        return success();
    }
    std::vector<std::byte>* out_;
    std::unique_ptr<z_stream> stream_;
};
} // namespace detail

/// The whole archive in memory.
inline result<std::vector<std::byte>>
build_initramfs(std::span<const initramfs_entry> entries,
                initramfs_compression compression = initramfs_compression::none) {
    std::vector<std::byte> out;
    if (compression == initramfs_compression::none) {
        cpio_writer writer(
            [&out](std::span<const std::byte> b) { out.insert(out.end(), b.begin(), b.end()); });
        SUPERMACHINE_TRY(write_initramfs(writer, entries));
        return out;
    }
    detail::gzip_sink gzip(out);
    {
        cpio_writer writer([&gzip](std::span<const std::byte> b) { return gzip(b); });
        SUPERMACHINE_TRY(write_initramfs(writer, entries));
    }
    SUPERMACHINE_TRY(gzip.finish());
    return out;
}

/// Read a host file for an initramfs entry; refuses files over `max_size`.
inline result<std::vector<std::byte>> read_host_file(const std::filesystem::path& path,
                                                     std::uint64_t max_size = 256ull << 20) {
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    if (ec) return ec;
    if (size > max_size) return errc::invalid_argument;
    std::ifstream in(path, std::ios::binary);
    if (!in) return errno_code(errno ? errno : EIO);
    std::vector<std::byte> data(size);
    in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(size));
    if (static_cast<std::uint64_t>(in.gcount()) != size) return errc::io_error;
    return data;
}

} // namespace supermachine::boot
