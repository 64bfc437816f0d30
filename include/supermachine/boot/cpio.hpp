#pragma once
// An in-process "newc" cpio writer (the format the Linux initramfs unpacker
// reads: 110-byte ASCII header "070701", name, data, each padded to 4
// bytes, closed by "TRAILER!!!"). It streams to a sink, so an archive never
// has to exist in memory as a whole.
//
// A sink is any callable taking std::span<const std::byte>; it may return
// void or result<void> (errors stop the writer).
#include <supermachine/error.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace supermachine::boot {

enum class cpio_kind : std::uint32_t {
    regular = 0100000,
    directory = 0040000,
    symlink = 0120000,
    character_device = 0020000,
    block_device = 0060000,
    fifo = 0010000,
};

/// Attributes shared by every entry; `permissions` are the low 12 mode bits.
struct cpio_attributes {
    std::uint32_t permissions = 0644;
    std::uint32_t uid = 0;
    std::uint32_t gid = 0;
    std::uint32_t mtime = 0; // seconds since the epoch; 0 keeps archives reproducible
};

inline constexpr std::size_t cpio_max_path = 4095;                // PATH_MAX - 1
inline constexpr std::uint64_t cpio_max_file_size = 0xffff'ffffu; // 8 hex digits

template <class Sink>
class cpio_writer {
public:
    explicit cpio_writer(Sink sink)
        : sink_(std::move(sink)) {}

    result<void> add_directory(std::string_view path, cpio_attributes a = {0755}) {
        return add(path, cpio_kind::directory, a, {}, 0, 0);
    }
    result<void> add_file(std::string_view path, std::span<const std::byte> data,
                          cpio_attributes a = {}) {
        return add(path, cpio_kind::regular, a, data, 0, 0);
    }
    result<void> add_symlink(std::string_view path, std::string_view target,
                             cpio_attributes a = {0777}) {
        if (target.empty() || target.find('\0') != std::string_view::npos)
            return errc::invalid_argument;
        return add(path, cpio_kind::symlink, a,
                   std::as_bytes(std::span(target.data(), target.size())), 0, 0);
    }
    /// kind: character_device, block_device or fifo.
    result<void> add_device(std::string_view path, cpio_kind kind, std::uint32_t major,
                            std::uint32_t minor, cpio_attributes a = {0600}) {
        if (kind != cpio_kind::character_device && kind != cpio_kind::block_device &&
            kind != cpio_kind::fifo)
            return errc::invalid_argument;
        return add(path, kind, a, {}, major, minor);
    }

    /// Writes the trailer. The writer accepts nothing afterwards.
    result<void> finish() {
        if (finished_) return errc::invalid_argument;
        SUPERMACHINE_TRY(write_entry("TRAILER!!!", 0, 0, 1, {}, {}, 0, 0));
        finished_ = true;
        return success();
    }

    std::uint64_t bytes_written() const noexcept { return written_; }

private:
    result<void> add(std::string_view path, cpio_kind kind, const cpio_attributes& a,
                     std::span<const std::byte> data, std::uint32_t major, std::uint32_t minor) {
        if (finished_) return errc::invalid_argument;
        while (!path.empty() && path.front() == '/')
            path.remove_prefix(1); // archive paths are relative
        if (path.empty() || path.size() > cpio_max_path ||
            path.find('\0') != std::string_view::npos || path == "TRAILER!!!")
            return errc::invalid_argument;
        if (data.size() > cpio_max_file_size) return errc::invalid_argument;
        const std::uint32_t mode = static_cast<std::uint32_t>(kind) | (a.permissions & 07777);
        const std::uint32_t links = kind == cpio_kind::directory ? 2 : 1;
        return write_entry(path, ++inode_, mode, links, a, data, major, minor);
    }

    result<void> write_entry(std::string_view name, std::uint32_t inode, std::uint32_t mode,
                             std::uint32_t links, const cpio_attributes& a,
                             std::span<const std::byte> data, std::uint32_t rdev_major,
                             std::uint32_t rdev_minor) {
        char header[111];
        std::snprintf(header, sizeof header,
                      "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X", inode, mode,
                      a.uid, a.gid, links, a.mtime, static_cast<std::uint32_t>(data.size()), 0u, 0u,
                      rdev_major, rdev_minor, static_cast<std::uint32_t>(name.size() + 1), 0u);
        SUPERMACHINE_TRY(emit(std::as_bytes(std::span(header, 110))));
        SUPERMACHINE_TRY(emit(std::as_bytes(std::span(name.data(), name.size()))));
        static constexpr std::byte zeros[4] = {};
        SUPERMACHINE_TRY(emit(std::span(zeros, 1))); // the name's NUL
        SUPERMACHINE_TRY(pad());
        SUPERMACHINE_TRY(emit(data));
        return pad();
    }

    result<void> pad() {
        static constexpr std::byte zeros[4] = {};
        return emit(std::span(zeros, (4 - written_ % 4) % 4));
    }

    result<void> emit(std::span<const std::byte> bytes) {
        if (bytes.empty()) return success();
        if constexpr (std::is_void_v<std::invoke_result_t<Sink&, std::span<const std::byte>>>) {
            sink_(bytes);
        } else {
            SUPERMACHINE_TRY(sink_(bytes));
        }
        written_ += bytes.size();
        return success();
    }

    Sink sink_;
    std::uint64_t written_ = 0;
    std::uint32_t inode_ = 720000; // arbitrary start, away from the kernel's own inode numbers
    bool finished_ = false;
};

} // namespace supermachine::boot
