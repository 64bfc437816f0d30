#pragma once
// A scripted HTTP/1.1 server on 127.0.0.1 for hostile and protocol tests:
// each request goes to a handler that returns the exact bytes to send (or a
// cut-off / endless reply). One connection at a time, Connection: close.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace supermachine::test {

struct fake_request {
    std::string method, target;
    std::map<std::string, std::string> headers; // names lowercased
    std::string header(const std::string& name) const {
        auto it = headers.find(name);
        return it == headers.end() ? std::string() : it->second;
    }
};

struct fake_reply {
    std::string bytes;                         // status line, headers, body
    std::size_t cut_after = std::string::npos; // close the connection after this many bytes
    bool endless_headers = false;              // then keep sending header lines forever
    int trickle_ms = 0;                        // > 0: send one byte, then sleep this long
    std::size_t piece_bytes = 0;               // > 0: send this many bytes, then sleep piece_ms
    int piece_ms = 0;
    int hold_open_ms = 0; // after sending: keep the connection open and silent this long
};

inline fake_reply http_reply(int status, const std::string& body,
                             const std::string& extra_headers = "",
                             const std::string& content_type = "application/json") {
    return {"HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: " + content_type +
            "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" + extra_headers +
            "Connection: close\r\n\r\n" + body};
}

class fake_server {
public:
    using handler = std::function<fake_reply(const fake_request&)>;

    explicit fake_server(handler h)
        : handler_(std::move(h)) {
        listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
        socklen_t len = sizeof a;
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
        port_ = ntohs(a.sin_port);
        ::listen(listen_fd_, 16);
        thread_ = std::thread([this] { serve(); });
    }
    ~fake_server() {
        stop_ = true;
        thread_.join();
        ::close(listen_fd_);
    }
    fake_server(const fake_server&) = delete;
    fake_server& operator=(const fake_server&) = delete;

    unsigned short port() const { return port_; }
    std::string host() const { return "127.0.0.1:" + std::to_string(port_); }
    std::vector<fake_request> requests() const {
        std::lock_guard lock(mutex_);
        return requests_;
    }

private:
    void serve() {
        while (!stop_) {
            pollfd p{listen_fd_, POLLIN, 0};
            if (::poll(&p, 1, 50) <= 0) continue;
            int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
            if (fd < 0) continue;
            handle(fd);
            ::close(fd);
        }
    }

    void handle(int fd) {
        std::string in;
        char buffer[4096];
        while (in.find("\r\n\r\n") == std::string::npos && in.size() < 65536) {
            pollfd p{fd, POLLIN, 0};
            if (::poll(&p, 1, 5000) <= 0) return;
            auto n = ::recv(fd, buffer, sizeof buffer, 0);
            if (n <= 0) return;
            in.append(buffer, std::size_t(n));
            if (static_cast<unsigned char>(in[0]) == 0x16) return; // a TLS ClientHello: not us
        }
        fake_request request;
        auto line_end = in.find("\r\n");
        auto first = in.substr(0, line_end);
        auto s1 = first.find(' '), s2 = first.rfind(' ');
        request.method = first.substr(0, s1);
        request.target = first.substr(s1 + 1, s2 - s1 - 1);
        std::size_t pos = line_end + 2;
        while (true) {
            auto end = in.find("\r\n", pos);
            if (end == std::string::npos || end == pos) break;
            auto line = in.substr(pos, end - pos);
            auto colon = line.find(':');
            if (colon != std::string::npos) {
                std::string name = line.substr(0, colon);
                for (auto& c : name)
                    c = char(std::tolower(static_cast<unsigned char>(c)));
                auto value = line.substr(colon + 1);
                while (!value.empty() && value.front() == ' ')
                    value.erase(0, 1);
                request.headers[name] = value;
            }
            pos = end + 2;
        }
        {
            std::lock_guard lock(mutex_);
            requests_.push_back(request);
        }
        auto reply = handler_(request);
        auto size = std::min(reply.cut_after, reply.bytes.size());
        if (reply.piece_bytes > 0) {
            for (std::size_t i = 0; i < size && !stop_; i += reply.piece_bytes) {
                if (!send_all(fd, reply.bytes.data() + i, std::min(reply.piece_bytes, size - i)))
                    return;
                if (i + reply.piece_bytes < size)
                    std::this_thread::sleep_for(std::chrono::milliseconds(reply.piece_ms));
            }
        } else if (reply.trickle_ms > 0) {
            for (std::size_t i = 0; i < size && !stop_; ++i) {
                if (!send_all(fd, reply.bytes.data() + i, 1)) return;
                std::this_thread::sleep_for(std::chrono::milliseconds(reply.trickle_ms));
            }
        } else if (!send_all(fd, reply.bytes.data(), size))
            return;
        if (reply.hold_open_ms > 0) { // silent until the time is up or the client hangs up
            auto until =
                std::chrono::steady_clock::now() + std::chrono::milliseconds(reply.hold_open_ms);
            while (!stop_ && std::chrono::steady_clock::now() < until) {
                pollfd p{fd, POLLIN, 0};
                if (::poll(&p, 1, 20) > 0 && ::recv(fd, buffer, sizeof buffer, 0) <= 0) break;
            }
        }
        if (reply.endless_headers) {
            std::string line = "X-Filler: " + std::string(1000, 'a') + "\r\n";
            for (int i = 0; i < 100000 && !stop_; ++i)
                if (!send_all(fd, line.data(), line.size())) break;
        }
        ::shutdown(fd, SHUT_WR);
    }

    static bool send_all(int fd, const char* p, std::size_t n) {
        while (n > 0) {
            auto w = ::send(fd, p, n, MSG_NOSIGNAL);
            if (w <= 0) return false;
            p += w;
            n -= std::size_t(w);
        }
        return true;
    }

    handler handler_;
    int listen_fd_ = -1;
    unsigned short port_ = 0;
    std::atomic<bool> stop_{false};
    std::thread thread_;
    mutable std::mutex mutex_;
    std::vector<fake_request> requests_;
};

/// A port on 127.0.0.1 that completes TCP handshakes (the kernel's backlog)
/// and then says nothing, ever: a registry that accepts and never answers.
class silent_listener {
public:
    silent_listener() {
        fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
        socklen_t len = sizeof a;
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
        port_ = ntohs(a.sin_port);
        ::listen(fd_, 16);
    }
    ~silent_listener() { ::close(fd_); }
    silent_listener(const silent_listener&) = delete;
    silent_listener& operator=(const silent_listener&) = delete;
    std::string host() const { return "127.0.0.1:" + std::to_string(port_); }

private:
    int fd_ = -1;
    unsigned short port_ = 0;
};

} // namespace supermachine::test
