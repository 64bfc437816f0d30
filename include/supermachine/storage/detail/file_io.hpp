#pragma once
// pread/pwrite loops over short transfers and EINTR.
#include <supermachine/error.hpp>

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <climits>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <span>

namespace supermachine::storage::detail {

inline result<void> pread_all(int fd, std::span<std::byte> out, std::uint64_t offset) noexcept {
    std::size_t done = 0;
    while (done < out.size()) {
        const ssize_t n =
            ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno_code(errno);
        }
        if (n == 0) return errc::io_error; // the file shrank under us
        done += static_cast<std::size_t>(n);
    }
    return success();
}

inline result<void> pwrite_all(int fd, std::span<const std::byte> in,
                               std::uint64_t offset) noexcept {
    std::size_t done = 0;
    while (done < in.size()) {
        const ssize_t n =
            ::pwrite(fd, in.data() + done, in.size() - done, static_cast<off_t>(offset + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno_code(errno);
        }
        done += static_cast<std::size_t>(n);
    }
    return success();
}

/// preadv/pwritev over `iov` (consumed: entries are advanced in place) until
/// every byte moved; IOV_MAX entries per call.
template <bool Write>
result<void> transfer_vectored(int fd, std::span<::iovec> iov, std::uint64_t offset) noexcept {
    while (!iov.empty()) {
        if (iov.front().iov_len == 0) {
            iov = iov.subspan(1);
            continue;
        }
        const int count = static_cast<int>(std::min<std::size_t>(iov.size(), IOV_MAX));
        const ssize_t n = Write ? ::pwritev(fd, iov.data(), count, static_cast<off_t>(offset))
                                : ::preadv(fd, iov.data(), count, static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno_code(errno);
        }
        if (n == 0) return errc::io_error;
        offset += static_cast<std::uint64_t>(n);
        auto left = static_cast<std::size_t>(n);
        while (left > 0) {
            const std::size_t step = std::min(left, iov.front().iov_len);
            iov.front().iov_base = static_cast<char*>(iov.front().iov_base) + step;
            iov.front().iov_len -= step;
            left -= step;
            if (iov.front().iov_len == 0) iov = iov.subspan(1);
        }
    }
    return success();
}

} // namespace supermachine::storage::detail
