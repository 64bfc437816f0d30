#pragma once
// The host side of the guest-agent protocol, on Asio: a client over any
// connected stream socket (vsock through our device, a Unix socket, a
// socketpair), many concurrent operations multiplexed by stream id.
//
//   agent::basic_client<boost::asio::local::stream_protocol::socket> client(std::move(socket));
//   client.async_hello(token, [](error_code ec, agent::hello_ok) { ... });
//   client.async_exec({.argv = {"sh", "-c", "exit 42"}}, [](error_code ec, agent::exec_output
//   out) {});
//
// Completions carry error_code (boost::system's; compare with
// supermachine::errc): use_awaitable throws it, as for Asio's own objects.
// async_exec honours per-operation cancellation (asio::bind_cancellation_slot,
// awaitable_operators, a coroutine's cancellation). Operations may be started from any thread; they run
// on the socket's executor (use a strand executor when that is multi-threaded).
// A disconnected or misbehaving agent ends every pending operation with
// errc::agent_unavailable or errc::agent_protocol_error; none hangs.
#include <supermachine/agent/detail/client_core.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>

#include <csignal>
#include <type_traits>
#include <vector>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>

namespace supermachine::agent {

namespace asio = boost::asio;

/// A command as plain arguments, for `async_exec({"echo", "hi"}, token)`:
/// a constructor, not an initializer_list (GCC 12 rejects an
/// initializer_list argument inside co_await: "array used as initializer"),
/// and no field left out for -Wmissing-field-initializers to flag.
struct command {
    template <class... Parts>
        requires(sizeof...(Parts) > 0 && (std::is_convertible_v<Parts, std::string> && ...))
    command(Parts&&... parts) { // NOLINT(google-explicit-constructor): braced lists are the point
        argv.reserve(sizeof...(Parts));
        (argv.emplace_back(std::forward<Parts>(parts)), ...);
    }
    std::vector<std::string> argv;
};

/// A process started with basic_client::async_spawn: stream its stdin/stdout/stderr,
/// send signals, wait for its exit. Dropping it leaves the process running, its output discarded.
template <class Stream>
class exec_child {
public:
    exec_child() = default;
    exec_child(std::shared_ptr<detail::client_core<Stream>> core,
               std::shared_ptr<detail::stream_state> state)
        : core_(std::move(core))
        , state_(std::move(state)) {}
    exec_child(exec_child&&) noexcept = default;
    exec_child& operator=(exec_child&& other) noexcept {
        release();
        core_ = std::move(other.core_);
        state_ = std::move(other.state_);
        return *this;
    }
    ~exec_child() { release(); }

    /// The process id in the guest.
    std::int32_t pid() const { return state_ ? state_->pid : 0; }

    /// Sends bytes to stdin; completes once the agent has credit for all of them (backpressure).
    template <class Token>
    auto async_write_stdin(std::string data, Token&& token) {
        return send(message_type::stdin_data, std::move(data), std::forward<Token>(token));
    }
    /// Closes stdin (after what was written).
    template <class Token>
    auto async_close_stdin(Token&& token) {
        return marker(message_type::stdin_close, std::forward<Token>(token));
    }
    /// The next chunk of stdout; errc::end_of_stream once the process is done and all was read.
    template <class Token>
    auto async_read_stdout(Token&& token) {
        return read(0, std::forward<Token>(token));
    }
    template <class Token>
    auto async_read_stderr(Token&& token) {
        return read(1, std::forward<Token>(token));
    }
    /// Delivers a signal to the process (fire and forget; a finished process ignores it).
    void signal(int signo) {
        asio::post(core_->get_executor(),
                   [core = core_, state = state_, signo] { core->send_signal(*state, signo); });
    }
    /// The terminal's new size, for a process on a tty (fire and forget; the
    /// guest kernel sends it SIGWINCH).
    void resize(tty_size size) {
        asio::post(core_->get_executor(),
                   [core = core_, state = state_, size] { core->send_resize(*state, size); });
    }
    /// Completes with the exit status when the process has ended and its output was sent.
    template <class Token>
    auto async_wait(Token&& token) {
        return asio::async_initiate<Token, void(error_code, exit_status)>(
            [core = core_, state = state_](auto handler) {
                auto done = detail::bind_completion<void(error_code, exit_status)>(
                    std::move(handler), core->get_executor());
                asio::post(core->get_executor(), [core, state, done = std::move(done)]() mutable {
                    core->wait_exit(*state, std::move(done));
                });
            },
            token);
    }

private:
    template <class Token>
    auto send(message_type type, std::string data, Token&& token) {
        return asio::async_initiate<Token, void(error_code)>(
            [core = core_, state = state_, type](auto handler, std::string data) {
                auto done = detail::bind_completion<void(error_code)>(std::move(handler),
                                                                           core->get_executor());
                asio::post(core->get_executor(), [core, state, type, data = std::move(data),
                                                  done = std::move(done)]() mutable {
                    core->send_data(*state, type, std::move(data), std::move(done));
                });
            },
            token, std::move(data));
    }
    template <class Token>
    auto marker(message_type type, Token&& token) {
        return asio::async_initiate<Token, void(error_code)>(
            [core = core_, state = state_, type](auto handler) {
                auto done = detail::bind_completion<void(error_code)>(std::move(handler),
                                                                           core->get_executor());
                asio::post(core->get_executor(),
                           [core, state, type, done = std::move(done)]() mutable {
                               core->send_marker(*state, type, 0, std::move(done));
                           });
            },
            token);
    }
    template <class Token>
    auto read(int channel, Token&& token) {
        return asio::async_initiate<Token, void(error_code, std::string)>(
            [core = core_, state = state_, channel](auto handler) {
                auto done = detail::bind_completion<void(error_code, std::string)>(
                    std::move(handler), core->get_executor());
                asio::post(core->get_executor(),
                           [core, state, channel, done = std::move(done)]() mutable {
                               core->read_chunk(state, channel, std::move(done));
                           });
            },
            token);
    }
    void release() {
        if (!core_ || !state_) return;
        asio::post(core_->get_executor(),
                   [core = core_, state = state_] { core->abandon(*state); });
        core_.reset();
        state_.reset();
    }
    template <class>
    friend class tcp_channel;

    std::shared_ptr<detail::client_core<Stream>> core_;
    std::shared_ptr<detail::stream_state> state_;
};

/// A TCP connection to a guest port, carried through the agent (port forwarding).
template <class Stream>
class tcp_channel {
public:
    tcp_channel() = default;
    tcp_channel(std::shared_ptr<detail::client_core<Stream>> core,
                std::shared_ptr<detail::stream_state> state)
        : inner_(std::move(core), std::move(state)) {}

    /// Bytes to the guest socket; completes within the agent's credit (backpressure).
    template <class Token>
    auto async_write(std::string data, Token&& token) {
        return inner_.send(message_type::tcp_data, std::move(data), std::forward<Token>(token));
    }
    /// The next chunk from the guest socket; errc::end_of_stream when it closed its side.
    template <class Token>
    auto async_read(Token&& token) {
        return inner_.read(0, std::forward<Token>(token));
    }
    /// Half-close: no more bytes to the guest.
    template <class Token>
    auto async_close_write(Token&& token) {
        return inner_.marker(message_type::tcp_close, std::forward<Token>(token));
    }

private:
    exec_child<Stream> inner_; // same machinery: one credited data channel each way
};

template <class Stream>
class basic_client {
public:
    using executor_type = typename Stream::executor_type;
    using child_type = exec_child<Stream>;
    using tcp_type = tcp_channel<Stream>;

    explicit basic_client(Stream stream)
        : core_(std::make_shared<detail::client_core<Stream>>(std::move(stream))) {}
    basic_client(basic_client&&) noexcept = default;
    basic_client& operator=(basic_client&&) noexcept = default;
    ~basic_client() {
        if (core_) close();
    }

    executor_type get_executor() { return core_->get_executor(); }

    /// Fails every pending operation with errc::cancelled and closes the connection.
    void close() {
        asio::post(core_->get_executor(),
                   [core = core_] { core->fail(make_error_code(errc::cancelled)); });
    }

    /// Why the connection failed (empty while it works).
    error_code failure() const { return core_->failure(); }
    /// The text of the agent's last error frame (e.g. "command not found: foo").
    std::string last_agent_message() const { return core_->last_agent_message(); }
    /// Bound on what async_exec / async_read_file keep in memory (default 1 GiB).
    void set_max_collected_output(std::uint64_t bytes) { core_->max_collected_output = bytes; }

    /// Authenticates: sends hello{version, token}, completes with the agent's hello_ok.
    /// A wrong token ends in errc::agent_auth_failed.
    template <class Token>
    auto async_hello(std::string token, Token&& completion) {
        return asio::async_initiate<Token, void(error_code, hello_ok)>(
            [core = core_](auto handler, std::string token) {
                auto done = detail::bind_completion<void(error_code, hello_ok)>(
                    std::move(handler), core->get_executor());
                asio::post(core->get_executor(),
                           [core, token = std::move(token), done = std::move(done)]() mutable {
                               core->start_hello(std::move(token), std::move(done));
                           });
            },
            completion, std::move(token));
    }

    /// Runs a command to completion, collecting its output (bounded by set_max_collected_output).
    /// A command that cannot start ends in an error (errc::command_not_found names it in
    /// exec_output::agent_message and last_agent_message()).
    template <class Token>
    auto async_exec(exec_request request, Token&& completion) {
        return asio::async_initiate<Token, void(error_code, exec_output)>(
            [core = core_](auto handler, exec_request request) {
                // Per-operation cancellation (any type): the process is
                // killed in the guest and the operation completes at once
                // with errc::cancelled (asio::error::operation_aborted); the
                // connection and the VM stay usable.
                auto slot = asio::get_associated_cancellation_slot(handler);
                auto op = std::make_shared<detail::cancellable_exec>(
                    detail::bind_completion<void(error_code, exec_output)>(std::move(handler),
                                                                           core->get_executor()));
                if (slot.is_connected()) {
                    op->slot = slot;
                    slot.assign([core, weak = std::weak_ptr(op)](asio::cancellation_type) {
                        asio::post(core->get_executor(), [core, weak] {
                            auto op = weak.lock();
                            if (!op || !op->done) return;
                            if (op->state) core->send_signal(*op->state, SIGKILL);
                            op->finish(make_error_code(errc::cancelled), exec_output{});
                        });
                    });
                }
                asio::post(core->get_executor(), [core, op, request = std::move(request)]() mutable {
                    if (!op->done) return; // cancelled before it started
                    if (core->failure()) return op->finish(core->failure(), exec_output{});
                    auto state = core->open_stream(detail::stream_kind::exec);
                    op->state = state;
                    state->collect = true;
                    state->collect_limit = core->max_collected_output;
                    core->wait_exit(*state, [state, op](error_code ec, exit_status status) {
                        exec_output out;
                        out.exit_code = status.code;
                        out.signal = status.signal;
                        out.timed_out = status.timed_out;
                        out.stdout_data = std::move(state->collected[0]);
                        out.stderr_data = std::move(state->collected[1]);
                        out.agent_message = state->end_message;
                        op->finish(ec, std::move(out));
                    });
                    core->send_request(*state, request);
                });
            },
            completion, std::move(request));
    }

    /// The same for a plain argument list: `async_exec({"echo", "hi"}, token)`.
    template <class Token>
    auto async_exec(command argv, Token&& completion) {
        exec_request request;
        request.argv = std::move(argv.argv);
        return async_exec(std::move(request), std::forward<Token>(completion));
    }

    /// Starts a command and completes once it runs (exec_started), with the streaming handle.
    template <class Token>
    auto async_spawn(exec_request request, Token&& completion) {
        return asio::async_initiate<Token, void(error_code, child_type)>(
            [core = core_](auto handler, exec_request request) {
                auto done = detail::bind_completion<void(error_code, child_type)>(
                    std::move(handler), core->get_executor());
                asio::post(core->get_executor(),
                           [core, request = std::move(request), done = std::move(done)]() mutable {
                               if (core->failure())
                                   return done.take_and_call(core->failure(), child_type{});
                               auto state = core->open_stream(detail::stream_kind::exec);
                               state->on_started = [core, state, done = std::move(done)](
                                                       error_code ec) mutable {
                                   if (ec) return done.take_and_call(ec, child_type{});
                                   done.take_and_call({}, child_type(core, state));
                               };
                               core->send_request(*state, request);
                           });
            },
            completion, std::move(request));
    }

    /// Reads a whole guest file of at most max_bytes (larger: std::errc::file_too_large).
    template <class Token>
    auto async_read_file(std::string path, std::uint64_t max_bytes, Token&& completion) {
        return asio::async_initiate<Token, void(error_code, std::string)>(
            [core = core_](auto handler, std::string path, std::uint64_t max_bytes) {
                auto done = detail::bind_completion<void(error_code, std::string)>(
                    std::move(handler), core->get_executor());
                asio::post(core->get_executor(), [core, path = std::move(path), max_bytes,
                                                  done = std::move(done)]() mutable {
                    if (core->failure()) return done.take_and_call(core->failure(), std::string{});
                    auto state = core->open_stream(detail::stream_kind::read_file);
                    state->collect = true;
                    state->collect_limit = std::min(max_bytes, core->max_collected_output);
                    state->on_end = [state, done = std::move(done)](error_code ec) mutable {
                        done.take_and_call(ec, ec ? std::string{} : std::move(state->collected[0]));
                    };
                    core->send_request(*state,
                                       read_file_request{std::move(path), state->collect_limit});
                });
            },
            completion, std::move(path), max_bytes);
    }

    /// Writes (creates or truncates) a guest file with `mode`; completes when the agent closed it.
    template <class Token>
    auto async_write_file(std::string path, std::string data, std::uint32_t mode,
                          Token&& completion) {
        return asio::async_initiate<Token, void(error_code)>(
            [core = core_](auto handler, std::string path, std::string data, std::uint32_t mode) {
                auto done = detail::bind_completion<void(error_code)>(std::move(handler),
                                                                           core->get_executor());
                asio::post(core->get_executor(), [core, path = std::move(path),
                                                  data = std::move(data), mode,
                                                  done = std::move(done)]() mutable {
                    if (core->failure()) return done.take_and_call(core->failure());
                    auto state = core->open_stream(detail::stream_kind::write_file);
                    state->on_end = std::move(done);
                    core->send_request(*state, write_file_request{std::move(path), mode & 07777});
                    std::uint64_t size = data.size();
                    core->send_data(*state, message_type::file_data, std::move(data), {});
                    core->send_marker(*state, message_type::file_end, size, {});
                });
            },
            completion, std::move(path), std::move(data), mode);
    }

    /// Connects to 127.0.0.1:guest_port inside the guest; completes with the channel.
    template <class Token>
    auto async_open_tcp(std::uint16_t guest_port, Token&& completion) {
        return asio::async_initiate<Token, void(error_code, tcp_type)>(
            [core = core_](auto handler, std::uint16_t port) {
                auto done = detail::bind_completion<void(error_code, tcp_type)>(
                    std::move(handler), core->get_executor());
                asio::post(core->get_executor(), [core, port, done = std::move(done)]() mutable {
                    if (core->failure()) return done.take_and_call(core->failure(), tcp_type{});
                    auto state = core->open_stream(detail::stream_kind::tcp);
                    state->on_started = [core, state,
                                         done = std::move(done)](error_code ec) mutable {
                        if (ec) return done.take_and_call(ec, tcp_type{});
                        done.take_and_call({}, tcp_type(core, state));
                    };
                    core->send_request(*state, tcp_connect_request{port});
                });
            },
            completion, guest_port);
    }

    /// Mixes host randomness into the guest's RNG (RNDADDENTROPY); at most max_rng_seed bytes.
    template <class Token>
    auto async_reseed_rng(std::string seed, Token&& completion) {
        return session_request(message_type::reseed_rng, std::move(seed),
                               std::forward<Token>(completion));
    }

    /// Sets the guest's CLOCK_REALTIME (after a restore the guest's wall clock
    /// is the snapshot's). Completes on the agent's acknowledgement.
    template <class Token>
    auto async_set_clock(std::chrono::system_clock::time_point now, Token&& completion) {
        const auto ns =
            std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch());
        std::string frame;
        encode(
            frame, 0,
            set_clock_request{static_cast<std::uint64_t>(std::max<std::int64_t>(ns.count(), 1))});
        return session_request(message_type::set_clock, frame.substr(frame_header_size),
                               std::forward<Token>(completion));
    }

    /// Sets the guest's hostname (sethostname, /etc/hostname, /etc/hosts: what
    /// docker gives a container). Completes on the agent's acknowledgement;
    /// errc::invalid_argument, unsent, for a name that is not valid_hostname.
    template <class Token>
    auto async_set_hostname(std::string name, Token&& completion) {
        return session_request(message_type::set_hostname, std::move(name),
                               std::forward<Token>(completion));
    }

    /// Asks the agent to stop (in a VM: power off). Completes on its acknowledgement.
    template <class Token>
    auto async_shutdown(Token&& completion) {
        return session_request(message_type::shutdown, {}, std::forward<Token>(completion));
    }

private:
    template <class Token>
    auto session_request(message_type type, std::string payload, Token&& completion) {
        return asio::async_initiate<Token, void(error_code)>(
            [core = core_, type](auto handler, std::string payload) {
                auto done = detail::bind_completion<void(error_code)>(std::move(handler),
                                                                           core->get_executor());
                asio::post(core->get_executor(), [core, type, payload = std::move(payload),
                                                  done = std::move(done)]() mutable {
                    // What the agent would refuse (as a protocol error) is not sent.
                    if (validate(type, payload) != decode_error::none)
                        return done.take_and_call(make_error_code(errc::invalid_argument));
                    core->start_session_request(type, payload, std::move(done));
                });
            },
            completion, std::move(payload));
    }

    std::shared_ptr<detail::client_core<Stream>> core_;
};

} // namespace supermachine::agent
