#pragma once
// A hand-written vhost-user front-end for the tests: sends raw messages
// (any size, any fds) over a socketpair and reads replies with a deadline,
// so tests can play both a correct and a hostile VMM.
#include <supermachine/vhost_user/message.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

namespace supermachine::test {

class test_frontend {
public:
    explicit test_frontend(int fd)
        : fd_(fd) {}
    ~test_frontend() {
        if (fd_ >= 0) ::close(fd_);
    }
    void close() {
        ::close(fd_);
        fd_ = -1;
    }

    bool send_raw(std::span<const std::byte> bytes, std::span<const int> fds = {}) {
        iovec io{const_cast<std::byte*>(bytes.data()), bytes.size()};
        msghdr msg{};
        msg.msg_iov = &io;
        msg.msg_iovlen = 1;
        alignas(cmsghdr) char control[CMSG_SPACE(16 * sizeof(int))]{};
        if (!fds.empty()) {
            msg.msg_control = control;
            msg.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
            cmsghdr* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
            std::memcpy(CMSG_DATA(c), fds.data(), fds.size() * sizeof(int));
        }
        return ::sendmsg(fd_, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
    }

    bool send(vhost_user::request r, std::span<const std::byte> payload,
              std::span<const int> fds = {}, bool need_reply = false) {
        const auto bytes =
            vhost_user::encode(static_cast<std::uint32_t>(r),
                               vhost_user::header_flag::version |
                                   (need_reply ? vhost_user::header_flag::need_reply : 0),
                               payload);
        return send_raw(bytes, fds);
    }

    /// The reply's payload, or nullopt on EOF / timeout / a malformed reply.
    std::optional<std::vector<std::byte>> reply(vhost_user::request expected,
                                                int timeout_ms = 5000) {
        std::array<std::byte, vhost_user::header_size> head;
        if (!read_exact(head, timeout_ms)) return std::nullopt;
        std::uint32_t req, flags, size;
        std::memcpy(&req, head.data(), 4);
        std::memcpy(&flags, head.data() + 4, 4);
        std::memcpy(&size, head.data() + 8, 4);
        if (req != static_cast<std::uint32_t>(expected) ||
            !(flags & vhost_user::header_flag::reply) || size > 4096)
            return std::nullopt;
        std::vector<std::byte> payload(size);
        if (!read_exact(payload, timeout_ms)) return std::nullopt;
        return payload;
    }

    std::optional<std::uint64_t> reply_u64(vhost_user::request expected) {
        auto p = reply(expected);
        if (!p || p->size() != 8) return std::nullopt;
        std::uint64_t v;
        std::memcpy(&v, p->data(), 8);
        return v;
    }

    /// Send with need_reply and return the ack value (0 = success).
    std::optional<std::uint64_t> call(vhost_user::request r, std::span<const std::byte> payload,
                                      std::span<const int> fds = {}) {
        if (!send(r, payload, fds, true)) return std::nullopt;
        return reply_u64(r);
    }

    /// True when the back-end closed the connection (EOF within the deadline).
    bool closed_by_peer(int timeout_ms = 5000) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, timeout_ms) <= 0) return false;
        std::byte b;
        const ssize_t n = ::recv(fd_, &b, 1, MSG_DONTWAIT);
        // A peer that closes with our bytes still unread resets the connection.
        return n == 0 || (n < 0 && errno == ECONNRESET);
    }

private:
    bool read_exact(std::span<std::byte> out, int timeout_ms) {
        std::size_t done = 0;
        while (done < out.size()) {
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, timeout_ms) <= 0) return false;
            const ssize_t n = ::recv(fd_, out.data() + done, out.size() - done, 0);
            if (n <= 0) return false;
            done += static_cast<std::size_t>(n);
        }
        return true;
    }

    int fd_;
};

} // namespace supermachine::test
