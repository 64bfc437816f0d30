#pragma once
// The shared state behind agent::basic_client: one read loop, one coalescing
// write loop, and a table of streams. Everything here runs on the stream's
// executor (public operations post into it), so there is no locking.
//
// The agent is hostile: each frame's header is checked before its payload is
// read (length <= max_payload_size), each payload is validated, data beyond
// the credit we granted is a protocol error, and any such error fails every
// pending operation with agent_protocol_error; a closed connection fails
// them with agent_unavailable.
#include <supermachine/agent/detail/completion.hpp>
#include <supermachine/agent/protocol.hpp>
#include <supermachine/error.hpp>

#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include <array>
#include <deque>
#include <map>
#include <memory>
#include <string>

namespace supermachine::agent {

/// What a finished process reports.
struct exec_output {
    int exit_code = 0; // the exit code; 128 + signal when killed (as a shell reports it)
    int signal = 0;    // the killing signal, else 0
    bool timed_out = false;
    std::string stdout_data;
    std::string stderr_data;
    std::string agent_message; // when the exec failed: the agent's text (names the command)
};

/// Maps an agent error frame to an error code.
inline error_code to_error_code(const error_message& m) {
    switch (m.code) {
    case agent_error::command_not_found:
        return errc::command_not_found;
    case agent_error::auth_failed:
        return errc::agent_auth_failed;
    case agent_error::not_found:
        return errc::not_found;
    case agent_error::permission_denied:
        return boost::system::errc::make_error_code(boost::system::errc::permission_denied);
    case agent_error::connection_refused:
        return boost::system::errc::make_error_code(boost::system::errc::connection_refused);
    case agent_error::too_many_streams:
        return errc::out_of_resources;
    case agent_error::unsupported:
        return errc::not_supported;
    case agent_error::file_too_large:
        return boost::system::errc::make_error_code(boost::system::errc::file_too_large);
    case agent_error::invalid_request:
        return errc::invalid_argument;
    case agent_error::io_error:
    case agent_error::exec_failed:
        if (m.sys_errno > 0 && m.sys_errno < 4096) return errno_code(m.sys_errno);
        return errc::io_error;
    }
    return errc::agent_protocol_error;
}

namespace detail {

enum class stream_kind { exec, read_file, write_file, tcp };

using error_handler = unique_function<void(error_code)>;
using chunk_handler = unique_function<void(error_code, std::string)>;

struct stream_state {
    stream_kind kind;
    std::uint32_t id = 0;

    // Inbound data: channel 0 is stdout / file / tcp, 1 is stderr.
    std::array<std::deque<std::string>, 2> inbox;
    std::array<bool, 2> inbox_eof{};
    std::array<chunk_handler, 2> reader;
    std::uint64_t receive_window = initial_window; // what the agent may still send us

    // Collected form (async_exec, async_read_file): data is appended here and credited at once.
    bool collect = false;
    std::uint64_t collect_limit = 0;
    std::array<std::string, 2> collected;
    bool discard = false; // nobody reads any more (the exec_child was dropped): credit and drop

    // Outbound data, paced by the agent's credit.
    struct pending_send {
        message_type type;
        std::string data;
        std::size_t offset = 0;
        bool marker = false; // a close/end frame: no payload, no credit
        std::uint64_t marker_value = 0;
        error_handler done;
    };
    std::deque<pending_send> sends;
    std::uint64_t send_credit = initial_window;
    std::uint64_t sent_total = 0;

    // Lifecycle.
    bool started = false; // exec_started / tcp_connected
    std::int32_t pid = 0;
    error_handler on_started;
    bool ended = false;
    bool we_closed = false; // tcp: our tcp_close went out
    error_code end_error;
    std::string end_message;
    exit_status status;
    unique_function<void(error_code, exit_status)> on_exit;
    error_handler on_end; // read_file / write_file
};

/// One async_exec in flight: its completion, called once, by whichever comes
/// first of the process's exit and a cancellation (both on the client's
/// executor).
struct cancellable_exec {
    explicit cancellable_exec(unique_function<void(error_code, exec_output)> d)
        : done(std::move(d)) {}
    void finish(error_code ec, exec_output out) {
        if (!done) return;
        if (slot.is_connected()) slot.clear();
        done.take_and_call(ec, std::move(out));
    }
    unique_function<void(error_code, exec_output)> done;
    std::shared_ptr<stream_state> state;
    boost::asio::cancellation_slot slot;
};

template <class Stream>
class client_core : public std::enable_shared_from_this<client_core<Stream>> {
public:
    using executor_type = typename Stream::executor_type;

    explicit client_core(Stream stream)
        : stream_(std::move(stream)) {}

    executor_type get_executor() { return stream_.get_executor(); }
    Stream& next_layer() { return stream_; }
    error_code failure() const { return failed_; }
    const std::string& last_agent_message() const { return last_agent_message_; }

    /// Upper bound on what the collected forms keep in memory per operation.
    std::uint64_t max_collected_output = std::uint64_t{1} << 30;

    // ---- operations (called on the executor) ----------------------------------

    void start_hello(std::string token, unique_function<void(error_code, hello_ok)> done) {
        if (failed_) return done.take_and_call(failed_, hello_ok{});
        if (hello_done_ || authenticated_)
            return done.take_and_call(make_error_code(errc::invalid_argument), hello_ok{});
        hello_done_ = std::move(done);
        encode(out_, 0, hello{protocol_version, std::move(token)});
        start_io();
    }

    void start_session_request(message_type type, std::string_view payload, error_handler done) {
        if (failed_) return done.take_and_call(failed_);
        session_acks_.push_back(std::move(done));
        if (type == message_type::reseed_rng)
            encode_data(out_, type, 0, payload.substr(0, max_rng_seed));
        else if (type == message_type::set_clock) // payload: the encoded set_clock_request
            encode_data(out_, type, 0, payload.substr(0, 8));
        else if (type == message_type::set_hostname) // payload: the name (validated)
            encode_data(out_, type, 0, payload);
        else
            encode_empty(out_, type, 0);
        start_io();
    }

    std::shared_ptr<stream_state> open_stream(stream_kind kind) {
        auto s = std::make_shared<stream_state>();
        s->kind = kind;
        s->id = next_stream_id_++;
        if (next_stream_id_ == 0) next_stream_id_ = 1;
        streams_[s->id] = s;
        return s;
    }

    template <class Request>
    void send_request(stream_state& s, const Request& request) {
        encode(out_, s.id, request);
        start_io();
    }

    void send_signal(stream_state& s, int signo) {
        if (failed_ || s.ended) return;
        encode(out_, s.id, signal_request{signo});
        start_io();
    }

    void send_resize(stream_state& s, tty_size size) {
        if (failed_ || s.ended || size.rows == 0 || size.cols == 0) return;
        encode(out_, s.id, size);
        start_io();
    }

    /// Queues data (split into chunks as credit allows); `done` when all of it is framed.
    void send_data(stream_state& s, message_type type, std::string data, error_handler done) {
        if (failed_ || s.ended || s.we_closed) {
            error_code ec = failed_ ? failed_ : s.end_error;
            if (!ec) ec = boost::system::errc::make_error_code(boost::system::errc::broken_pipe);
            if (done) done.take_and_call(ec);
            return;
        }
        s.sends.push_back({type, std::move(data), 0, false, 0, std::move(done)});
        pump_sends(s);
    }

    void send_marker(stream_state& s, message_type type, std::uint64_t value, error_handler done) {
        if (failed_ || s.ended || s.we_closed) {
            if (done) done.take_and_call(failed_);
            return;
        }
        s.sends.push_back({type, {}, 0, true, value, std::move(done)});
        pump_sends(s);
    }

    void read_chunk(const std::shared_ptr<stream_state>& s, int channel, chunk_handler done) {
        if (s->reader[channel])
            return done.take_and_call(make_error_code(errc::invalid_argument), {});
        s->reader[channel] = std::move(done);
        pump_reader(*s, channel);
    }

    /// Nobody will read this stream any more: drop what is buffered, credit the rest as it comes.
    void abandon(stream_state& s) {
        if (s.ended) return;
        s.discard = true;
        for (int channel = 0; channel < 2; ++channel) {
            std::size_t n = 0;
            for (auto& chunk : s.inbox[channel])
                n += chunk.size();
            s.inbox[channel].clear();
            grant(s, n);
        }
        if (s.kind == stream_kind::tcp && !s.we_closed)
            send_marker(s, message_type::tcp_close, 0, {});
    }

    void wait_exit(stream_state& s, unique_function<void(error_code, exit_status)> done) {
        if (s.ended) return done.take_and_call(s.end_error, s.status);
        s.on_exit = std::move(done);
    }

    /// Fails everything pending with `ec` and closes the connection.
    void fail(error_code ec) {
        if (failed_) return;
        failed_ = ec;
        boost::system::error_code ignored;
        stream_.close(ignored);
        if (hello_done_) hello_done_.take_and_call(ec, hello_ok{});
        auto acks = std::move(session_acks_);
        for (auto& a : acks)
            a.take_and_call(ec);
        auto streams = std::move(streams_);
        for (auto& [id, s] : streams)
            end_stream(*s, ec);
    }

private:
    // ---- writing ----------------------------------------------------------------

    void start_io() {
        if (!reading_ && !failed_) {
            reading_ = true;
            read_header();
        }
        if (writing_ || out_.empty() || failed_) return;
        writing_ = true;
        writing_buffer_.clear();
        std::swap(writing_buffer_, out_);
        boost::asio::async_write(
            stream_, boost::asio::buffer(writing_buffer_),
            [self = this->shared_from_this()](boost::system::error_code ec, std::size_t) {
                self->writing_ = false;
                if (ec) return self->fail(make_error_code(errc::agent_unavailable));
                self->start_io();
            });
    }

    void pump_sends(stream_state& s) {
        while (!s.sends.empty() && !failed_) {
            auto& p = s.sends.front();
            if (p.marker) {
                if (p.type == message_type::file_end)
                    encode(out_, s.id, file_end{p.marker_value});
                else
                    encode_empty(out_, p.type, s.id);
                if (p.type == message_type::tcp_close) s.we_closed = true;
            } else {
                while (p.offset < p.data.size() && s.send_credit > 0) {
                    std::size_t n = std::min<std::uint64_t>(
                        {p.data.size() - p.offset, s.send_credit, max_data_chunk});
                    encode_data(out_, p.type, s.id, std::string_view(p.data).substr(p.offset, n));
                    p.offset += n;
                    s.send_credit -= n;
                    s.sent_total += n;
                }
                if (p.offset < p.data.size()) break; // waits for credit
            }
            auto done = std::move(p.done);
            s.sends.pop_front();
            if (done) done.take_and_call({});
        }
        start_io();
        if (s.kind == stream_kind::tcp && s.we_closed && s.inbox_eof[0] && !s.ended) finish(s, {});
    }

    // ---- reading ----------------------------------------------------------------

    void read_header() {
        boost::asio::async_read(
            stream_, boost::asio::buffer(header_),
            [self = this->shared_from_this()](boost::system::error_code ec, std::size_t) {
                if (ec) return self->fail(make_error_code(errc::agent_unavailable));
                frame_header h;
                if (decode_header(std::string_view(self->header_.data(), frame_header_size), h) !=
                    decode_error::none)
                    return self->fail(make_error_code(errc::agent_protocol_error));
                self->current_ = h;
                self->payload_.resize(h.length); // bounded by decode_header
                if (h.length == 0) return self->on_frame();
                boost::asio::async_read(self->stream_, boost::asio::buffer(self->payload_),
                                        [self](boost::system::error_code ec, std::size_t) {
                                            if (ec)
                                                return self->fail(
                                                    make_error_code(errc::agent_unavailable));
                                            self->on_frame();
                                        });
            });
    }

    void on_frame() {
        if (failed_) return;
        if (!dispatch(current_, payload_)) return fail(make_error_code(errc::agent_protocol_error));
        if (!failed_) read_header();
    }

    /// False when the frame is invalid or out of place.
    bool dispatch(const frame_header& h, std::string_view payload) {
        if (validate(h.type, payload) != decode_error::none) return false;
        if (h.stream == 0) return dispatch_session(h, payload);
        auto it = streams_.find(h.stream);
        if (it == streams_.end()) {
            // Frames may trail a stream we ended early (e.g. its output limit): ignore those.
            return h.stream < next_stream_id_;
        }
        auto s = it->second; // keep alive across callbacks
        switch (h.type) {
        case message_type::exec_started: {
            if (s->kind != stream_kind::exec || s->started) return false;
            exec_started m;
            decode(payload, m);
            s->started = true;
            s->pid = m.pid;
            if (s->on_started) s->on_started.take_and_call({});
            return true;
        }
        case message_type::tcp_connected:
            if (s->kind != stream_kind::tcp || s->started) return false;
            s->started = true;
            if (s->on_started) s->on_started.take_and_call({});
            return true;
        case message_type::stdout_data:
        case message_type::stderr_data:
            if (s->kind != stream_kind::exec || !s->started) return false;
            return receive(*s, h.type == message_type::stdout_data ? 0 : 1, payload);
        case message_type::file_data:
            if (s->kind != stream_kind::read_file) return false;
            return receive(*s, 0, payload);
        case message_type::tcp_data:
            if (s->kind != stream_kind::tcp || !s->started || s->inbox_eof[0]) return false;
            return receive(*s, 0, payload);
        case message_type::tcp_close:
            if (s->kind != stream_kind::tcp || !s->started) return false;
            s->inbox_eof[0] = true;
            pump_reader(*s, 0);
            if (s->we_closed) finish(*s, {});
            return true;
        case message_type::credit: {
            credit_grant g;
            decode(payload, g);
            s->send_credit =
                std::min<std::uint64_t>(s->send_credit + g.bytes, std::uint64_t{1} << 32);
            pump_sends(*s);
            return true;
        }
        case message_type::exit: {
            if (s->kind != stream_kind::exec || !s->started) return false;
            decode(payload, s->status);
            if (s->status.signal < 0 || s->status.signal > 64) return false;
            finish(*s, {});
            return true;
        }
        case message_type::file_end: {
            if (s->kind != stream_kind::read_file) return false;
            file_end m;
            decode(payload, m);
            if (m.total_bytes != s->collected[0].size()) return false;
            finish(*s, {});
            return true;
        }
        case message_type::ok:
            if (s->kind != stream_kind::write_file) return false;
            finish(*s, {});
            return true;
        case message_type::error: {
            error_message m;
            decode(payload, m);
            last_agent_message_ = m.message;
            s->end_message = m.message;
            finish(*s, to_error_code(m));
            return true;
        }
        default:
            return false;
        }
    }

    bool dispatch_session(const frame_header& h, std::string_view payload) {
        switch (h.type) {
        case message_type::ready: {
            ready m;
            decode(payload, m);
            return !got_ready_ && (got_ready_ = true);
        }
        case message_type::hello_ok: {
            if (!hello_done_) return false;
            hello_ok m;
            decode(payload, m);
            if (m.version != protocol_version) return false;
            authenticated_ = true;
            hello_done_.take_and_call({}, m);
            return true;
        }
        case message_type::ok:
            if (session_acks_.empty()) return false;
            take_ack({});
            return true;
        case message_type::error: {
            error_message m;
            decode(payload, m);
            last_agent_message_ = m.message;
            if (hello_done_) {
                hello_done_.take_and_call(to_error_code(m), hello_ok{});
                return true;
            }
            if (!session_acks_.empty()) {
                take_ack(to_error_code(m));
                return true;
            }
            return false; // the agent rejected something of ours as a protocol error
        }
        default:
            return false;
        }
    }

    void take_ack(error_code ec) {
        auto done = std::move(session_acks_.front());
        session_acks_.pop_front();
        done.take_and_call(ec);
    }

    bool receive(stream_state& s, int channel, std::string_view data) {
        if (data.size() > s.receive_window) return false; // beyond the credit we gave
        if (s.ended) return false;
        s.receive_window -= data.size();
        if (s.discard) {
            grant(s, data.size());
            return true;
        }
        if (s.collect) {
            auto& into = s.collected[channel];
            if (into.size() + s.collected[1 - channel].size() + data.size() > s.collect_limit) {
                if (s.kind == stream_kind::read_file) return false; // more than the agent promised
                encode(out_, s.id, signal_request{9});
                finish(s, make_error_code(errc::out_of_resources));
                return true;
            }
            into.append(data);
            grant(s, data.size());
            return true;
        }
        s.inbox[channel].emplace_back(data);
        pump_reader(s, channel);
        return true;
    }

    void grant(stream_state& s, std::size_t n) {
        if (s.ended || n == 0) return;
        s.receive_window += n;
        encode(out_, s.id, credit_grant{static_cast<std::uint32_t>(n)});
        start_io();
    }

    void pump_reader(stream_state& s, int channel) {
        if (!s.reader[channel]) return;
        auto& box = s.inbox[channel];
        if (!box.empty()) {
            std::string chunk = std::move(box.front());
            box.pop_front();
            grant(s, chunk.size());
            return s.reader[channel].take_and_call({}, std::move(chunk));
        }
        if (s.ended || s.inbox_eof[channel]) {
            error_code ec = make_error_code(errc::end_of_stream);
            if (s.ended && s.end_error) ec = s.end_error;
            s.reader[channel].take_and_call(ec, {});
        }
    }

    void finish(stream_state& s, error_code ec) {
        streams_.erase(s.id);
        end_stream(s, ec);
    }

    void end_stream(stream_state& s, error_code ec) {
        if (s.ended) return;
        s.ended = true;
        s.end_error = ec;
        if (s.on_started)
            s.on_started.take_and_call(ec ? ec : make_error_code(errc::agent_protocol_error));
        auto sends = std::move(s.sends);
        for (auto& p : sends)
            if (p.done)
                p.done.take_and_call(ec ? ec : boost::system::errc::make_error_code(boost::system::errc::broken_pipe));
        pump_reader(s, 0);
        pump_reader(s, 1);
        if (s.on_exit) s.on_exit.take_and_call(ec, s.status);
        if (s.on_end) s.on_end.take_and_call(ec);
    }

    Stream stream_;
    std::string out_;            // frames waiting for the write loop
    std::string writing_buffer_; // frames being written
    bool writing_ = false;
    bool reading_ = false;
    std::array<char, frame_header_size> header_{};
    frame_header current_{};
    std::string payload_;
    error_code failed_;
    bool got_ready_ = false;
    bool authenticated_ = false;
    unique_function<void(error_code, hello_ok)> hello_done_;
    std::deque<error_handler> session_acks_;
    std::map<std::uint32_t, std::shared_ptr<stream_state>> streams_;
    std::uint32_t next_stream_id_ = 1;
    std::string last_agent_message_;
};

} // namespace detail
} // namespace supermachine::agent
