#pragma once
// An append-only, unlinked temporary file that holds file contents while the
// layers are merged, so memory holds only metadata.
#include <supermachine/error.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include <fcntl.h>
#include <unistd.h>

namespace supermachine::oci::detail {

class tree_spool {
public:
    tree_spool() = default;
    tree_spool(tree_spool&& other) noexcept
        : fd_(std::exchange(other.fd_, -1))
        , size_(std::exchange(other.size_, 0)) {}
    tree_spool& operator=(tree_spool&& other) noexcept {
        if (this != &other) {
            if (fd_ >= 0) ::close(fd_);
            fd_ = std::exchange(other.fd_, -1);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    ~tree_spool() {
        if (fd_ >= 0) ::close(fd_);
    }

    /// An anonymous file in `directory` (O_TMPFILE, else mkstemp + unlink).
    static result<tree_spool> create(const std::filesystem::path& directory) {
        tree_spool spool;
        spool.fd_ = ::open(directory.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (spool.fd_ < 0) {
            std::string name = (directory / ".spool-XXXXXX").string();
            spool.fd_ = ::mkostemp(name.data(), O_CLOEXEC);
            if (spool.fd_ < 0) return errno_code(errno);
            ::unlink(name.c_str());
        }
        return spool;
    }

    int fd() const noexcept { return fd_; }
    std::uint64_t size() const noexcept { return size_; }

    result<void> append(std::span<const std::byte> data) {
        while (!data.empty()) {
            ssize_t n = ::pwrite(fd_, data.data(), data.size(), static_cast<off_t>(size_));
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno_code(errno);
            }
            size_ += static_cast<std::uint64_t>(n);
            data = data.subspan(static_cast<std::size_t>(n));
        }
        return success();
    }

    result<void> read_at(std::uint64_t offset, std::span<std::byte> out) const {
        while (!out.empty()) {
            ssize_t n = ::pread(fd_, out.data(), out.size(), static_cast<off_t>(offset));
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno_code(errno);
            }
            if (n == 0) return make_error_code(errc::io_error);
            offset += static_cast<std::uint64_t>(n);
            out = out.subspan(static_cast<std::size_t>(n));
        }
        return success();
    }

private:
    int fd_ = -1;
    std::uint64_t size_ = 0;
};

} // namespace supermachine::oci::detail
