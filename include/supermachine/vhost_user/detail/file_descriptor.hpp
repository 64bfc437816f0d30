#pragma once
// An owning file descriptor: fds arrive from a hostile peer over SCM_RIGHTS,
// and every one of them must be closed on every path, including rejection.
#include <unistd.h>

#include <utility>

namespace supermachine::vhost_user::detail {

class file_descriptor {
public:
    file_descriptor() = default;
    explicit file_descriptor(int fd) noexcept
        : fd_(fd) {}
    file_descriptor(const file_descriptor&) = delete;
    file_descriptor& operator=(const file_descriptor&) = delete;
    file_descriptor(file_descriptor&& other) noexcept
        : fd_(std::exchange(other.fd_, -1)) {}
    file_descriptor& operator=(file_descriptor&& other) noexcept {
        if (this != &other) reset(std::exchange(other.fd_, -1));
        return *this;
    }
    ~file_descriptor() { reset(); }

    int get() const noexcept { return fd_; }
    int release() noexcept { return std::exchange(fd_, -1); }
    void reset(int fd = -1) noexcept {
        if (fd_ >= 0) ::close(fd_);
        fd_ = fd;
    }
    explicit operator bool() const noexcept { return fd_ >= 0; }

private:
    int fd_ = -1;
};

} // namespace supermachine::vhost_user::detail
