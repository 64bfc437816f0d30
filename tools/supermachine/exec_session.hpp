#pragma once
// Run one command in a VM the way `docker run` does at a terminal: stdout
// and stderr stream to ours as they come, stdin is forwarded with -i, the
// exit status is the command's (128 + N when killed by signal N), 127 when
// the command does not exist, 125 when the VMM itself failed.
#include <supermachine/agent/client.hpp>
#include <supermachine/detail/trace.hpp>
#include <supermachine/error.hpp>

#include <boost/asio/post.hpp>

#include <signal.h>
#include <termios.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>

namespace supermachine::cli {

inline bool write_all_fd(int fd, const std::string& data) {
    std::size_t done = 0;
    while (done < data.size()) {
        const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
        if (n < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        done += static_cast<std::size_t>(n);
    }
    return true;
}

/// Puts the host terminal in raw mode for -t -i, restores it on destruction.
class raw_terminal {
public:
    explicit raw_terminal(bool enable) {
        if (!enable || !::isatty(0) || ::tcgetattr(0, &saved_) != 0) return;
        termios raw = saved_;
        ::cfmakeraw(&raw);
        active_ = ::tcsetattr(0, TCSANOW, &raw) == 0;
    }
    ~raw_terminal() {
        if (active_) ::tcsetattr(0, TCSANOW, &saved_);
    }

private:
    termios saved_{};
    bool active_ = false;
};

template <class Stream>
class exec_session : public std::enable_shared_from_this<exec_session<Stream>> {
public:
    using child_type = agent::exec_child<Stream>;

    /// `done(status)` gets the process exit status for our own exit.
    static std::shared_ptr<exec_session> start(agent::basic_client<Stream>& client,
                                               agent::exec_request request, bool forward_stdin,
                                               std::function<void(int)> done) {
        auto self = std::shared_ptr<exec_session>(new exec_session(std::move(done)));
        request.stdin_open = forward_stdin;
        const std::string program = request.argv.empty() ? std::string() : request.argv[0];
        supermachine::detail::trace_point("exec request");
        client.async_spawn(std::move(request), [self, forward_stdin, &client,
                                                program](supermachine::error_code ec, child_type child) {
            supermachine::detail::trace_point("exec started");
            if (ec) {
                // The agent's text names the command or the failing step
                // ("command not found: NAME", "cannot change directory to: DIR").
                const bool missing = ec == errc::command_not_found;
                auto text = client.last_agent_message();
                if (text.empty()) text = missing ? "command not found: " + program : ec.message();
                std::fprintf(stderr, "supermachine: %s\n", text.c_str());
                return self->finish(missing ? 127 : 126);
            }
            self->child_ = std::make_shared<child_type>(std::move(child));
            self->pump(0);
            self->pump(1);
            if (forward_stdin) self->read_stdin();
            self->child_->async_wait([self](supermachine::error_code ec, agent::exit_status status) {
                supermachine::detail::trace_point("exit status");
                self->exit_ = ec ? 125 : status.signal ? 128 + status.signal : status.code;
                if (ec) std::fprintf(stderr, "supermachine: %s\n", ec.message().c_str());
                if (!ec && status.timed_out) std::fprintf(stderr, "supermachine: timed out\n");
                self->maybe_finish();
            });
        });
        return self;
    }

    /// Whether the command runs (or ran): signals reach it.
    bool started() const { return child_ != nullptr; }
    /// Sends `signo` to the command, once it started (before: nothing to signal).
    void signal(int signo) {
        if (child_) child_->signal(signo);
    }
    /// The host terminal's new size, for a command on a tty.
    void resize(agent::tty_size size) {
        if (child_) child_->resize(size);
    }

private:
    explicit exec_session(std::function<void(int)> done)
        : done_(std::move(done)) {}

    void pump(int channel) {
        auto self = this->shared_from_this();
        auto on_chunk = [self, channel](supermachine::error_code ec, std::string data) {
            if (ec) {
                ++self->closed_streams_;
                return self->maybe_finish();
            }
            if (!write_all_fd(channel == 0 ? 1 : 2, data)) {
                // Our reader went away (EPIPE; SIGPIPE is ignored by `run`):
                // stop like a shell pipeline would, and let the caller stop the VM.
                self->child_->signal(SIGKILL);
                return self->finish(128 + SIGPIPE);
            }
            self->pump(channel);
        };
        if (channel == 0)
            child_->async_read_stdout(on_chunk);
        else
            child_->async_read_stderr(on_chunk);
    }

    // Host stdin may be a file, a pipe or a terminal: read it on a thread of
    // its own and hand each chunk to the executor in order, one at a time.
    void read_stdin() {
        auto self = this->shared_from_this();
        std::thread([self] {
            char buffer[64 * 1024];
            for (;;) {
                const ssize_t n = ::read(0, buffer, sizeof buffer);
                if (n < 0 && errno == EINTR) continue;
                auto sent = std::make_shared<std::promise<void>>();
                auto future = sent->get_future();
                if (n <= 0) {
                    self->child_->async_close_stdin([sent](supermachine::error_code) { sent->set_value(); });
                    future.wait();
                    return;
                }
                self->child_->async_write_stdin(std::string(buffer, static_cast<std::size_t>(n)),
                                                [sent](supermachine::error_code) { sent->set_value(); });
                future.wait(); // backpressure: the agent's credit paces us
                if (self->finished_) return;
            }
        }).detach();
    }

    void maybe_finish() {
        if (exit_ >= 0 && closed_streams_ >= 2) finish(exit_);
    }

    void finish(int status) {
        if (finished_.exchange(true)) return;
        if (done_) done_(status);
    }

    std::function<void(int)> done_;
    std::shared_ptr<child_type> child_;
    int closed_streams_ = 0;
    int exit_ = -1;
    std::atomic<bool> finished_{false};
};

} // namespace supermachine::cli
