#pragma once
// pread/pwrite loops over short transfers and EINTR.
#include <supermachine/error.hpp>

#include <unistd.h>

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

} // namespace supermachine::storage::detail
