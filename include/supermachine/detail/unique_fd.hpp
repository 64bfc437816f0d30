#pragma once
// The one owner of a file descriptor in supermachine: move-only, closes on
// destruction and on reset(). Every layer (kvm, vhost-user, snapshots, the
// OCI content store) uses this type.
#include <unistd.h>

#include <utility>

namespace supermachine::detail {

class unique_fd {
public:
    unique_fd() = default;
    explicit unique_fd(int fd) noexcept
        : fd_(fd) {}
    unique_fd(const unique_fd&) = delete;
    unique_fd& operator=(const unique_fd&) = delete;
    unique_fd(unique_fd&& other) noexcept
        : fd_(std::exchange(other.fd_, -1)) {}
    unique_fd& operator=(unique_fd&& other) noexcept {
        if (this != &other) reset(std::exchange(other.fd_, -1));
        return *this;
    }
    ~unique_fd() { reset(); }

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }
    /// Give up ownership: the caller closes the returned fd.
    int release() noexcept { return std::exchange(fd_, -1); }
    /// Close the current fd (if any) and own `fd` instead.
    void reset(int fd = -1) noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = fd;
    }

private:
    int fd_ = -1;
};

} // namespace supermachine::detail
