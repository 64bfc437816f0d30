#pragma once
// Snapshot I/O on a file descriptor, shared by file_store and memory_store:
// the sparse RAM writer and the validating, mapping reader.
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

/// Write the non-zero pages of ram[begin, end) to fd at ram_offset + page
/// offset, in runs of at most 8 MiB. Zero pages are skipped (left as holes).
inline result<void> write_nonzero_pages(int fd, std::uint64_t ram_offset,
                                        std::span<const std::byte> ram, std::uint64_t begin,
                                        std::uint64_t end, std::uint64_t& data_bytes) noexcept {
    constexpr std::uint64_t max_run = 8u << 20;
    std::uint64_t run_start = begin, run_length = 0;
    auto flush = [&]() -> result<void> {
        if (run_length == 0) return success();
        SUPERMACHINE_TRY(
            write_all_at(fd, ram.subspan(run_start, run_length), ram_offset + run_start));
        data_bytes += run_length;
        run_length = 0;
        return success();
    };
    for (std::uint64_t page = begin; page < end; page += page_size) {
        if (page_is_zero(ram.data() + page)) {
            SUPERMACHINE_TRY(flush());
            continue;
        }
        if (run_length == 0) run_start = page;
        run_length += page_size;
        if (run_length == max_run) {
            SUPERMACHINE_TRY(flush());
        }
    }
    return flush();
}

/// Write guest RAM sparsely into fd (already sized to hold it: holes read as
/// zero). Returns the bytes of data written.
inline result<std::uint64_t> write_ram_sparse(int fd, std::uint64_t ram_offset,
                                              std::span<const std::byte> ram, int hint_fd,
                                              std::uint64_t hint_offset) noexcept {
    std::uint64_t data_bytes = 0;
    const std::uint64_t size = ram.size();
    if (hint_fd < 0) {
        SUPERMACHINE_TRY(write_nonzero_pages(fd, ram_offset, ram, 0, size, data_bytes));
        return data_bytes;
    }
    // Visit only the hint fd's data extents (rounded out to pages).
    std::uint64_t position = 0;
    while (position < size) {
        const off_t data = ::lseek(hint_fd, static_cast<off_t>(hint_offset + position), SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) break; // no data past here: the rest is holes
            if (errno == EINVAL) {     // fd cannot report holes: scan everything left
                SUPERMACHINE_TRY(
                    write_nonzero_pages(fd, ram_offset, ram, position, size, data_bytes));
                break;
            }
            return errno_code(errno);
        }
        off_t hole = ::lseek(hint_fd, data, SEEK_HOLE);
        if (hole < 0) return errno_code(errno);
        auto clamp = [&](off_t at) {
            const auto relative = static_cast<std::uint64_t>(at) < hint_offset
                                      ? 0
                                      : static_cast<std::uint64_t>(at) - hint_offset;
            return std::min(relative, size);
        };
        const std::uint64_t begin = clamp(data) / page_size * page_size;
        const std::uint64_t end = round_up_to_page(clamp(hole));
        if (end <= position) break; // no progress: defensive
        SUPERMACHINE_TRY(
            write_nonzero_pages(fd, ram_offset, ram, std::max(begin, position), end, data_bytes));
        position = end;
    }
    return data_bytes;
}

/// Write a whole snapshot into an empty fd. Returns RAM data bytes written.
inline result<std::uint64_t> write_snapshot_fd(int fd, const snapshot_image& image) {
    if (image.ram.size() != image.records.machine.memory_size) return errc::invalid_argument;
    SUPERMACHINE_TRY(meta, result<encoded_metadata>(encode_metadata(image.records)));
    SUPERMACHINE_TRY(write_all_at(fd, meta.bytes, 0));
    // Size the file first: everything not written below stays a hole.
    if (::ftruncate(fd, static_cast<off_t>(meta.header.ram_offset + meta.header.ram_size)) != 0)
        return errno_code(errno);
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
    return loaded_snapshot{metadata.header, std::move(metadata.records), std::move(memory)};
}

} // namespace supermachine::snapshot::detail
