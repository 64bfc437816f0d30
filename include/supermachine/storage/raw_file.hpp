#pragma once
// raw_file: a disk image file (or block device) used as is, with
// pread/pwrite; flush is fdatasync; discard punches holes.
#include <supermachine/error.hpp>
#include <supermachine/storage/block_storage.hpp>
#include <supermachine/storage/detail/file_io.hpp>

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <memory>
#include <string>

namespace supermachine::storage {

class raw_file {
public:
    struct config {
        std::string path;
        bool read_only = false;
    };

    static result<std::unique_ptr<raw_file>> open(const config& cfg) {
        const int fd = ::open(cfg.path.c_str(), (cfg.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
        if (fd < 0) return errno_code(errno);
        std::unique_ptr<raw_file> f(new raw_file(fd, cfg.read_only, cfg.path));
        struct stat st {};
        if (::fstat(fd, &st) != 0) return errno_code(errno);
        if (S_ISREG(st.st_mode)) {
            f->size_ = static_cast<std::uint64_t>(st.st_size);
        } else if (S_ISBLK(st.st_mode)) {
            std::uint64_t bytes = 0;
            if (::ioctl(fd, BLKGETSIZE64, &bytes) != 0) return errno_code(errno);
            f->size_ = bytes;
        } else {
            return errc::invalid_argument;
        }
        return f;
    }

    raw_file(const raw_file&) = delete;
    raw_file& operator=(const raw_file&) = delete;
    ~raw_file() { ::close(fd_); }

    std::uint64_t size() const noexcept { return size_; }
    bool is_read_only() const noexcept { return read_only_; }
    int native_handle() const noexcept { return fd_; }
    /// Up to 20 bytes for GET_ID: the file's name.
    std::string id() const {
        const auto slash = path_.find_last_of('/');
        std::string name = slash == std::string::npos ? path_ : path_.substr(slash + 1);
        return name.substr(0, 20);
    }

    result<void> read(std::uint64_t offset, std::span<std::byte> out) noexcept {
        if (!in_range(offset, out.size(), size_)) return errc::sector_out_of_range;
        return detail::pread_all(fd_, out, offset);
    }
    result<void> write(std::uint64_t offset, std::span<const std::byte> in) noexcept {
        if (read_only_) return errc::device_read_only;
        if (!in_range(offset, in.size(), size_)) return errc::sector_out_of_range;
        return detail::pwrite_all(fd_, in, offset);
    }
    /// One preadv/pwritev per request instead of one pread per segment.
    result<void> read_vectored(std::uint64_t offset, std::span<::iovec> iov) noexcept {
        if (!in_range(offset, total_length(iov), size_)) return errc::sector_out_of_range;
        return detail::transfer_vectored<false>(fd_, iov, offset);
    }
    result<void> write_vectored(std::uint64_t offset, std::span<::iovec> iov) noexcept {
        if (read_only_) return errc::device_read_only;
        if (!in_range(offset, total_length(iov), size_)) return errc::sector_out_of_range;
        return detail::transfer_vectored<true>(fd_, iov, offset);
    }
    result<void> flush() noexcept {
        if (read_only_) return success();
        if (::fdatasync(fd_) != 0) return errno_code(errno);
        return success();
    }
    result<void> discard(std::uint64_t offset, std::uint64_t length) noexcept {
        if (read_only_) return errc::device_read_only;
        if (!in_range(offset, length, size_)) return errc::sector_out_of_range;
        if (length == 0) return success();
        if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                        static_cast<off_t>(length)) != 0)
            return errno_code(errno);
        return success();
    }
    result<void> write_zeroes(std::uint64_t offset, std::uint64_t length) noexcept {
        if (read_only_) return errc::device_read_only;
        if (!in_range(offset, length, size_)) return errc::sector_out_of_range;
        if (length == 0) return success();
        if (::fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                        static_cast<off_t>(length)) == 0)
            return success();
        // Not every filesystem zeroes ranges: write zeros.
        static const std::array<std::byte, 64 * 1024> zeros{};
        while (length > 0) {
            const std::size_t n =
                static_cast<std::size_t>(std::min<std::uint64_t>(length, zeros.size()));
            SUPERMACHINE_TRY(detail::pwrite_all(fd_, std::span(zeros).first(n), offset));
            offset += n;
            length -= n;
        }
        return success();
    }

private:
    raw_file(int fd, bool ro, std::string path)
        : fd_(fd)
        , read_only_(ro)
        , path_(std::move(path)) {}
    int fd_;
    bool read_only_;
    std::string path_;
    std::uint64_t size_ = 0;
};

static_assert(block_storage<raw_file>);

} // namespace supermachine::storage
