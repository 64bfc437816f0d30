#pragma once
// The host ends of vsock connections in the linux-kvm tests: a line out, a
// line back, each wait bounded (an fd may be non-blocking: it is the device's
// socketpair end, handed over as Asio would use it).
#include <supermachine/error.hpp>

#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace linuxkvm_test {

/// One line (without '\n') from `fd`, or nullopt on EOF, error or timeout.
inline std::optional<std::string> read_line(int fd, std::chrono::milliseconds timeout) {
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) return std::nullopt;
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
        char c;
        const ssize_t n = ::read(fd, &c, 1);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (n <= 0) return std::nullopt;
        if (c == '\n') return line;
        line += c;
    }
}

inline bool write_all(int fd, std::string_view text) {
    while (!text.empty()) {
        pollfd p{fd, POLLOUT, 0};
        ::poll(&p, 1, 1000);
        const ssize_t n = ::write(fd, text.data(), text.size());
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (n <= 0) return false;
        text.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
}

/// Host listeners for guest -> host connections: answer(), for each
/// accepted connection, answers one line L with "host got: L" on a thread of
/// its own (never on the device's executor); hold() keeps the connection open
/// and idle until this object goes.
class host_peers {
public:
    std::function<void(int, std::uint32_t)> answer() {
        return [this](int fd, std::uint32_t) {
            ++accepted;
            std::lock_guard lock(mutex_);
            threads_.emplace_back([fd] {
                if (auto line = read_line(fd, std::chrono::seconds(120)))
                    write_all(fd, "host got: " + *line + "\n");
                ::close(fd);
            });
        };
    }
    std::function<void(int, std::uint32_t)> hold() {
        return [this](int fd, std::uint32_t) {
            ++accepted;
            std::lock_guard lock(mutex_);
            held_.push_back(fd);
        };
    }
    ~host_peers() {
        std::lock_guard lock(mutex_);
        for (auto& t : threads_)
            t.join();
        for (int fd : held_)
            ::close(fd);
    }
    std::atomic<int> accepted{0};

private:
    std::mutex mutex_;
    std::vector<std::thread> threads_;
    std::vector<int> held_;
};

/// Host -> guest: connect `core` to `guest_port`, send `line`, return the answer.
template <class VsockCore>
std::optional<std::string> ask_guest(VsockCore& core, std::uint32_t guest_port,
                                     const std::string& line) {
    auto connected = std::make_shared<std::promise<int>>(); // outlives a timed-out wait
    auto done = connected->get_future();
    core.connect(guest_port, [connected](supermachine::error_code ec, int fd, std::uint32_t) {
        connected->set_value(ec ? -1 : fd);
    });
    if (done.wait_for(std::chrono::seconds(60)) != std::future_status::ready) return std::nullopt;
    const int fd = done.get();
    if (fd < 0) return std::nullopt;
    std::optional<std::string> answer;
    if (write_all(fd, line + "\n")) answer = read_line(fd, std::chrono::seconds(60));
    ::close(fd);
    return answer;
}

} // namespace linuxkvm_test
