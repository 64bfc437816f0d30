#pragma once
// Snapshot I/O on a file descriptor, shared by file_store and memory_store:
// the sparse RAM writer and the validating, mapping reader.
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/snapshot/container.hpp>
#include <supermachine/snapshot/store.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

namespace supermachine::snapshot::detail {

inline result<void> write_all_at(int fd, std::span<const std::byte> data,
                                 std::uint64_t offset) noexcept {
    while (!data.empty()) {
        const ssize_t n = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno_code(errno);
        }
        if (n == 0) return errc::io_error;
        data = data.subspan(static_cast<std::size_t>(n));
        offset += static_cast<std::uint64_t>(n);
    }
    return success();
}

/// Read exactly data.size() bytes at `offset`; end of file first is snapshot_truncated.
inline result<void> read_exact_at(int fd, std::span<std::byte> data,
                                  std::uint64_t offset) noexcept {
    while (!data.empty()) {
        const ssize_t n = ::pread(fd, data.data(), data.size(), static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno_code(errno);
        }
        if (n == 0) return errc::snapshot_truncated;
        data = data.subspan(static_cast<std::size_t>(n));
        offset += static_cast<std::uint64_t>(n);
    }
    return success();
}

inline bool page_is_zero(const std::byte* page) noexcept {
    // Word-wise OR: the compiler vectorizes it; memcmp against itself is not faster.
    std::uint64_t accumulated = 0;
    for (std::size_t i = 0; i < page_size; i += 8) {
        std::uint64_t word;
        std::memcpy(&word, page + i, 8);
        accumulated |= word;
    }
    return accumulated == 0;
}

/// Accumulates runs of non-zero pages and writes each run (at most 8 MiB)
/// at ram_offset + its RAM offset; zero pages end a run and stay holes.
class sparse_run_writer {
public:
    sparse_run_writer(int fd, std::uint64_t ram_offset, std::span<const std::byte> ram) noexcept
        : fd_(fd)
        , ram_offset_(ram_offset)
        , ram_(ram) {}

    /// Page at RAM offset `page` (visited in increasing order): written if
    /// it may hold data and is not all zero.
    result<void> page(std::uint64_t page, bool may_hold_data) noexcept {
        if (!may_hold_data || page_is_zero(ram_.data() + page)) return flush();
        if (run_length_ != 0 && run_start_ + run_length_ != page) {
            SUPERMACHINE_TRY(flush());
        }
        if (run_length_ == 0) run_start_ = page;
        run_length_ += page_size;
        if (run_length_ == max_run) return flush();
        return success();
    }

    result<void> range(std::uint64_t begin, std::uint64_t end) noexcept {
        for (std::uint64_t p = begin; p < end; p += page_size) {
            SUPERMACHINE_TRY(page(p, true));
        }
        return flush();
    }

    result<void> flush() noexcept {
        if (run_length_ == 0) return success();
        SUPERMACHINE_TRY(
            write_all_at(fd_, ram_.subspan(run_start_, run_length_), ram_offset_ + run_start_));
        data_bytes_ += run_length_;
        run_length_ = 0;
        return success();
    }

    std::uint64_t data_bytes() const noexcept { return data_bytes_; }

private:
    static constexpr std::uint64_t max_run = 8u << 20;
    int fd_;
    std::uint64_t ram_offset_;
    std::span<const std::byte> ram_;
    std::uint64_t run_start_ = 0, run_length_ = 0, data_bytes_ = 0;
};

/// Walks an fd's data extents in increasing offsets: has_data(p) for the
/// page at `base + p`, p non-decreasing. Page granular (rounded outwards).
class data_extents {
public:
    data_extents(int fd, std::uint64_t base) noexcept
        : fd_(fd)
        , base_(base) {}

    result<bool> has_data(std::uint64_t p) noexcept {
        if (p >= end_) {
            SUPERMACHINE_TRY(advance(p));
        }
        return p >= begin_ && p < end_;
    }

private:
    result<void> advance(std::uint64_t p) noexcept {
        const off_t data = ::lseek(fd_, static_cast<off_t>(base_ + p), SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) { // only holes from here on
                begin_ = end_ = ~std::uint64_t{0};
                return success();
            }
            if (errno == EINVAL) { // cannot tell holes: treat everything as data
                begin_ = 0;
                end_ = ~std::uint64_t{0};
                return success();
            }
            return errno_code(errno);
        }
        const off_t hole = ::lseek(fd_, data, SEEK_HOLE);
        if (hole < 0) return errno_code(errno);
        auto relative = [&](off_t at) {
            return static_cast<std::uint64_t>(at) < base_ ? 0
                                                          : static_cast<std::uint64_t>(at) - base_;
        };
        begin_ = relative(data) / page_size * page_size;
        end_ = std::max(round_up_to_page(relative(hole)), begin_ + page_size);
        return success();
    }

    int fd_;
    std::uint64_t base_;
    std::uint64_t begin_ = 0, end_ = 0;
};

/// Write guest RAM sparsely into fd (already sized to hold it: holes read as
/// zero). Returns the bytes of data written. With `hint_fd` (holding the same
/// bytes as RAM at `hint_offset`) only its data extents are read.
inline result<std::uint64_t> write_ram_sparse(int fd, std::uint64_t ram_offset,
                                              std::span<const std::byte> ram, int hint_fd,
                                              std::uint64_t hint_offset) noexcept {
    sparse_run_writer writer(fd, ram_offset, ram);
    if (hint_fd < 0) {
        SUPERMACHINE_TRY(writer.range(0, ram.size()));
        return writer.data_bytes();
    }
    data_extents extents(hint_fd, hint_offset);
    for (std::uint64_t p = 0; p < ram.size(); p += page_size) {
        SUPERMACHINE_TRY(data, extents.has_data(p));
        SUPERMACHINE_TRY(writer.page(p, data));
    }
    SUPERMACHINE_TRY(writer.flush());
    return writer.data_bytes();
}

/// Write RAM that is a MAP_PRIVATE mapping of `source`: a page may hold data
/// if the guest wrote it (anonymous or swapped in /proc/self/pagemap) or the
/// source has data there; the rest are source holes, skipped unread. Without
/// a readable pagemap every page is scanned.
inline result<std::uint64_t> write_ram_private(int fd, std::uint64_t ram_offset,
                                               std::span<const std::byte> ram,
                                               const ram_source& source) noexcept {
    supermachine::detail::unique_fd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (pagemap.get() < 0) return write_ram_sparse(fd, ram_offset, ram, -1, 0);
    constexpr std::uint64_t present = std::uint64_t{1} << 63, swapped = std::uint64_t{1} << 62,
                            file_or_shared = std::uint64_t{1} << 61;
    constexpr std::size_t batch = 512; // pagemap entries per read (2 MiB of RAM)
    std::array<std::uint64_t, batch> entries{};
    sparse_run_writer writer(fd, ram_offset, ram);
    data_extents extents(source.fd.get(), source.offset);
    const auto first_page = reinterpret_cast<std::uintptr_t>(ram.data()) / page_size;
    for (std::uint64_t p = 0; p < ram.size(); p += batch * page_size) {
        const std::size_t pages =
            static_cast<std::size_t>(std::min<std::uint64_t>(batch, (ram.size() - p) / page_size));
        auto bytes = std::as_writable_bytes(std::span(entries.data(), pages));
        if (!read_exact_at(pagemap.get(), bytes, (first_page + p / page_size) * 8))
            return write_ram_sparse(fd, ram_offset, ram, -1, 0); // pagemap unusable: scan all
        for (std::size_t i = 0; i < pages; ++i) {
            const std::uint64_t page = p + i * page_size;
            const std::uint64_t e = entries[i];
            const bool written = (e & swapped) || ((e & present) && !(e & file_or_shared));
            bool may_hold_data = written;
            if (!written) {
                SUPERMACHINE_TRY(source_data, extents.has_data(page));
                may_hold_data = source_data;
            }
            SUPERMACHINE_TRY(writer.page(page, may_hold_data));
        }
    }
    SUPERMACHINE_TRY(writer.flush());
    return writer.data_bytes();
}

/// Write a whole snapshot into an empty fd. Returns RAM data bytes written.
inline result<std::uint64_t> write_snapshot_fd(int fd, const snapshot_image& image) {
    if (image.ram.size() != image.records.machine.memory_size) return errc::invalid_argument;
    SUPERMACHINE_TRY(meta, result<encoded_metadata>(encode_metadata(image.records)));
    SUPERMACHINE_TRY(write_all_at(fd, meta.bytes, 0));
    // Size the file first: everything not written below stays a hole.
    if (::ftruncate(fd, static_cast<off_t>(meta.header.ram_offset + meta.header.ram_size)) != 0)
        return errno_code(errno);
    if (image.ram_fd < 0 && image.private_source)
        return write_ram_private(fd, meta.header.ram_offset, image.ram, *image.private_source);
    return write_ram_sparse(fd, meta.header.ram_offset, image.ram, image.ram_fd,
                            image.ram_fd_offset);
}

/// Validate a snapshot in fd: header, layout against the file size, body.
/// Reads only the header and body, never RAM.
inline result<snapshot_metadata> read_metadata_fd(int fd) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return errno_code(errno);
    if (!S_ISREG(st.st_mode)) return errc::invalid_argument;
    const auto file_size = static_cast<std::uint64_t>(st.st_size);
    std::array<std::byte, header_size> head{};
    if (file_size < header_size) return errc::snapshot_truncated;
    SUPERMACHINE_TRY(read_exact_at(fd, head, 0));
    SUPERMACHINE_TRY(h, result<snapshot_header>(decode_header(head)));
    // Every region against the real size before reading or mapping it.
    SUPERMACHINE_TRY(result<void>(check_layout(h, file_size)));
    // Bounded: body_length <= max_body_bytes and lies inside the file.
    std::vector<std::byte> prefix(h.body_offset + h.body_length);
    SUPERMACHINE_TRY(read_exact_at(fd, prefix, 0));
    SUPERMACHINE_TRY(records, result<snapshot_records>(decode_metadata(h, prefix)));
    return snapshot_metadata{h, std::move(records)};
}

/// Validate a snapshot in fd and map its RAM privately. The fd may be
/// closed afterwards (the mapping keeps the file).
inline result<loaded_snapshot> read_snapshot_fd(int fd) {
    SUPERMACHINE_TRY(metadata, read_metadata_fd(fd));
    SUPERMACHINE_TRY(memory, guest_memory::map_private_x86(fd, metadata.header.ram_offset,
                                                           metadata.header.ram_size));
    auto source = std::make_shared<ram_source>();
    source->fd = supermachine::detail::unique_fd(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (source->fd.get() < 0) return errno_code(errno);
    source->offset = metadata.header.ram_offset;
    return loaded_snapshot{metadata.header, std::move(metadata.records), std::move(memory),
                           std::move(source)};
}

} // namespace supermachine::snapshot::detail
