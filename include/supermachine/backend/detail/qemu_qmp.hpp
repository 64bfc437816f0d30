#pragma once
// A minimal blocking QMP (QEMU Machine Protocol) client for the QEMU engine's
// snapshots: connect, negotiate, run commands, wait for migration to finish.
// Blocking with deadlines on purpose: it runs on its own thread, because
// while QEMU pauses it waits for our vhost-user back-ends (GET_VRING_BASE),
// which run on the machine's executor and must stay free.
#include <supermachine/error.hpp>

#include <nlohmann/json.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>

namespace supermachine::backend::detail {

class qmp_client {
public:
    qmp_client() = default;
    qmp_client(const qmp_client&) = delete;
    qmp_client& operator=(const qmp_client&) = delete;
    ~qmp_client() {
        if (fd_ >= 0) ::close(fd_);
    }

    result<void> connect(const std::filesystem::path& socket, std::chrono::milliseconds timeout) {
        sockaddr_un address{};
        address.sun_family = AF_UNIX;
        const auto path = socket.string();
        if (path.size() >= sizeof address.sun_path) return errc::invalid_argument;
        std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) { // QEMU creates the socket during startup: retry until it exists
            fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd_ < 0) return errno_code(errno);
            if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) break;
            ::close(fd_);
            fd_ = -1;
            if (std::chrono::steady_clock::now() > deadline) return errc::timeout;
            std::this_thread::sleep_for(std::chrono::milliseconds(2)); // a restore waits on this
        }
        SUPERMACHINE_TRY(greeting, read_message(timeout));
        if (!greeting.contains("QMP")) return errc::engine_failed;
        SUPERMACHINE_TRY(execute("qmp_capabilities", nullptr, timeout));
        return success();
    }

    /// Run a command; its "return" value, or the error's description in `error`.
    result<nlohmann::json> execute(const std::string& command, const nlohmann::json& arguments,
                                   std::chrono::milliseconds timeout,
                                   std::string* error = nullptr) {
        nlohmann::json request{{"execute", command}};
        if (!arguments.is_null()) request["arguments"] = arguments;
        const std::string line = request.dump() + "\n";
        if (::send(fd_, line.data(), line.size(), MSG_NOSIGNAL) !=
            static_cast<ssize_t>(line.size()))
            return boost::outcome_v2::failure(errno_code(errno));
        for (;;) {
            SUPERMACHINE_TRY(reply, read_message(timeout));
            if (reply.contains("event")) continue; // asynchronous events interleave
            if (reply.contains("return"))
                return result<nlohmann::json>(boost::outcome_v2::in_place_type<nlohmann::json>,
                                              reply["return"]);
            if (reply.contains("error")) {
                if (error) *error = reply["error"].value("desc", std::string("unknown QMP error"));
                return boost::outcome_v2::failure(make_error_code(errc::engine_failed));
            }
        }
    }

private:
    result<nlohmann::json> read_message(std::chrono::milliseconds timeout) {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            if (auto newline = buffer_.find('\n'); newline != std::string::npos) {
                const std::string line = buffer_.substr(0, newline);
                buffer_.erase(0, newline + 1);
                auto parsed = nlohmann::json::parse(line, nullptr, false);
                if (parsed.is_discarded() || !parsed.is_object())
                    return boost::outcome_v2::failure(make_error_code(errc::engine_failed));
                return result<nlohmann::json>(boost::outcome_v2::in_place_type<nlohmann::json>,
                                              std::move(parsed));
            }
            if (buffer_.size() > (1u << 20))
                return boost::outcome_v2::failure(
                    make_error_code(errc::engine_failed)); // QEMU never says this much
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0)
                return boost::outcome_v2::failure(make_error_code(errc::timeout));
            pollfd p{fd_, POLLIN, 0};
            const int ready = ::poll(&p, 1, static_cast<int>(left.count()));
            if (ready < 0 && errno == EINTR) continue;
            if (ready <= 0) return boost::outcome_v2::failure(make_error_code(errc::timeout));
            char chunk[4096];
            const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
            if (n <= 0) return boost::outcome_v2::failure(make_error_code(errc::engine_failed));
            buffer_.append(chunk, static_cast<std::size_t>(n));
        }
    }

    int fd_ = -1;
    std::string buffer_;
};

} // namespace supermachine::backend::detail
