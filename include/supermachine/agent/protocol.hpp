#pragma once
// The host <-> guest-agent wire protocol: one framed binary codec that both
// the host library and the static guest agent compile. Plain C++20, no Boost,
// no exceptions on hostile input: every decoder returns a decode_error.
//
// Frame (all integers little-endian):
//   u32 payload length (<= max_payload_size) | u8 message_type | u32 stream id | payload
//
// Stream 0 carries the session (ready, hello, hello_ok, reseed_rng, shutdown);
// the host picks a fresh stream id (>= 1) for each exec, file or TCP operation,
// and every frame of that operation carries it.
//
// Flow control: data frames (stdin/stdout/stderr/file/tcp data) are credited.
// Each direction of a stream starts with initial_window bytes of credit; the
// receiver returns credit (message_type::credit) as it consumes. A sender
// never has more than the window in flight, so neither side buffers more than
// a window per stream however slow the other is.
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::agent {

inline constexpr std::uint32_t protocol_version = 1;
inline constexpr std::uint32_t default_vsock_port = 1024;
inline constexpr std::size_t frame_header_size = 9;
inline constexpr std::size_t max_payload_size = std::size_t{1} << 20;
/// Largest data payload a sender puts in one frame.
inline constexpr std::size_t max_data_chunk = std::size_t{64} << 10;
/// Credit each side of a data stream starts with.
inline constexpr std::uint32_t initial_window = std::uint32_t{256} << 10;

// Bounds checked while decoding (before anything is allocated).
inline constexpr std::size_t max_token_size = 256;
inline constexpr std::size_t max_string_size = std::size_t{64} << 10; // one argv/env entry
inline constexpr std::size_t max_path_size = 4096;
inline constexpr std::size_t max_strings = 4096; // argv / env entries
inline constexpr std::size_t max_groups = 256;
inline constexpr std::size_t max_message_size = 4096; // error text
inline constexpr std::size_t max_rng_seed = 4096;
inline constexpr std::size_t max_resource_limits = 16; // RLIM_NLIMITS on Linux

/// Capability bits in hello_ok.
inline constexpr std::uint64_t capability_exec = 1u << 0;
inline constexpr std::uint64_t capability_tty = 1u << 1;
inline constexpr std::uint64_t capability_files = 1u << 2;
inline constexpr std::uint64_t capability_tcp = 1u << 3;
inline constexpr std::uint64_t capability_rng = 1u << 4;
inline constexpr std::uint64_t capability_clock = 1u << 5;
inline constexpr std::uint64_t capability_hostname = 1u << 6;

/// A set_hostname name: one DNS label (1..63 of [A-Za-z0-9-], no '-' at
/// either end): what sethostname, /etc/hostname and /etc/hosts all take.
inline bool valid_hostname(std::string_view name) {
    if (name.empty() || name.size() > 63 || name.front() == '-' || name.back() == '-') return false;
    for (char c : name)
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-'))
            return false;
    return true;
}
/// Extra /etc/hosts lines after a set_hostname name (docker's --add-host).
inline constexpr std::size_t max_hosts_lines_size = 16 * 1024;

/// A set_hostname payload: the name, optionally "\n" and /etc/hosts lines
/// (printable ASCII, tabs and newlines only).
inline bool valid_set_hostname_payload(std::string_view payload) {
    const auto newline = payload.find('\n');
    if (!valid_hostname(payload.substr(0, newline))) return false;
    if (newline == std::string_view::npos) return true;
    const auto extra = payload.substr(newline + 1);
    if (extra.size() > max_hosts_lines_size) return false;
    for (char c : extra)
        if (c != '\n' && c != '\t' && (c < 0x20 || c > 0x7e)) return false;
    return true;
}
/// set_clock bound: 2200-01-01T00:00:00Z in ns (a later clock is a hostile or broken host).
inline constexpr std::uint64_t max_clock_ns = 7'258'118'400ull * 1'000'000'000ull;

enum class message_type : std::uint8_t {
    ready = 1,     // agent -> host, stream 0, first frame: {version}
    hello,         // host -> agent, stream 0: {version, token}
    hello_ok,      // agent -> host, stream 0: {version, capabilities}
    exec_request,  // host -> agent, new stream
    exec_started,  // agent -> host: {pid}
    stdin_data,    // host -> agent: raw bytes (credited)
    stdin_close,   // host -> agent: empty
    stdout_data,   // agent -> host: raw bytes (credited)
    stderr_data,   // agent -> host: raw bytes (credited)
    signal,        // host -> agent: {signo}
    exit,          // agent -> host: {code, signal, timed_out}; ends the stream
    error,         // either way: {code, errno, message}; ends the stream
    read_file,     // host -> agent, new stream: {path, max}
    file_data,     // either way: raw bytes (credited)
    file_end,      // either way: {total bytes}; agent's ends a read; host's ends a write
    write_file,    // host -> agent, new stream: {path, mode}; then file_data..., file_end
    tcp_connect,   // host -> agent, new stream: {guest port}
    tcp_connected, // agent -> host: empty
    tcp_data,      // either way: raw bytes (credited)
    tcp_close,     // either way: empty; half-close of the sender's direction
    reseed_rng,    // host -> agent, stream 0: raw seed bytes
    ok,            // agent -> host: acknowledges reseed_rng / write_file completion / shutdown
    shutdown,      // host -> agent, stream 0: empty
    credit,        // either way: {bytes} more may be sent on this stream
    set_clock,     // host -> agent, stream 0: {realtime ns since the epoch} -> ok (after a restore)
    set_hostname,  // host -> agent, stream 0: the name, raw, then optionally "\n" and
                   // /etc/hosts lines (valid_set_hostname_payload) -> ok
    resize,        // host -> agent, exec stream with a tty: {rows, cols} (the host terminal's)
};
inline constexpr std::uint8_t last_message_type = static_cast<std::uint8_t>(message_type::resize);

enum class decode_error : std::uint8_t {
    none = 0,
    truncated,      // fewer bytes than a field needs
    too_large,      // a length or count beyond its bound
    unknown_type,   // frame type not in message_type
    malformed,      // a field value that cannot be (bad flag bits, empty argv, ...)
    trailing_bytes, // payload longer than the message
};

inline const char* to_string(decode_error e) noexcept {
    switch (e) {
    case decode_error::none:
        return "none";
    case decode_error::truncated:
        return "truncated";
    case decode_error::too_large:
        return "length or count exceeds its bound";
    case decode_error::unknown_type:
        return "unknown message type";
    case decode_error::malformed:
        return "malformed field";
    case decode_error::trailing_bytes:
        return "trailing bytes after message";
    }
    return "?";
}

/// Error codes carried in error frames (agent -> host).
enum class agent_error : std::uint32_t {
    command_not_found = 1, // message names the command
    permission_denied,
    not_found,       // a file
    invalid_request, // malformed or out-of-order request
    auth_failed,     // hello with a wrong token
    io_error,
    exec_failed,        // any other exec failure (errno alongside)
    connection_refused, // tcp_connect to a guest port nobody listens on
    too_many_streams,
    unsupported,
    file_too_large, // read_file beyond its max
};

// ---- messages -------------------------------------------------------------

struct ready {
    std::uint32_t version = protocol_version;
    bool operator==(const ready&) const = default;
};
struct hello {
    std::uint32_t version = protocol_version;
    std::string token;
    bool operator==(const hello&) const = default;
};
struct hello_ok {
    std::uint32_t version = protocol_version;
    std::uint64_t capabilities = 0;
    bool operator==(const hello_ok&) const = default;
};
struct tty_size {
    std::uint16_t rows = 24;
    std::uint16_t cols = 80;
    bool operator==(const tty_size&) const = default;
};
/// One setrlimit for an exec (docker's --ulimit): RLIMIT_* number, soft <= hard
/// (~0: unlimited).
struct resource_limit {
    std::uint32_t resource = 0;
    std::uint64_t soft = 0, hard = 0;
    bool operator==(const resource_limit&) const = default;
};
struct exec_request {
    std::vector<std::string> argv;     // argv[0] is looked up in PATH (from env, else a default)
    std::vector<std::string> env;      // "NAME=value"
    std::string cwd;                   // empty: "/"
    std::optional<std::uint32_t> uid;  // unset: the agent's own
    std::optional<std::uint32_t> gid;  // unset: the agent's own
    std::vector<std::uint32_t> groups; // supplementary groups (set when uid or gid is set)
    std::optional<tty_size> tty;       // run on a fresh pty (stdout carries both streams)
    bool stdin_open = false;           // else stdin is /dev/null
    bool make_cwd = false;             // create a missing cwd first (docker run's -w; not exec's)
    std::uint32_t timeout_ms = 0; // 0: none; else SIGKILL the process group and report timed_out
    std::vector<resource_limit> limits; // set before the user is changed (may raise hard limits)
    bool operator==(const exec_request&) const = default;
};
struct exec_started {
    std::int32_t pid = 0;
    bool operator==(const exec_started&) const = default;
};
struct signal_request {
    std::int32_t signo = 0;
    bool operator==(const signal_request&) const = default;
};
struct exit_status {
    std::int32_t code = 0;   // exit code when signal == 0
    std::int32_t signal = 0; // killing signal, else 0
    bool timed_out = false;
    bool operator==(const exit_status&) const = default;
};
struct error_message {
    agent_error code = agent_error::io_error;
    std::int32_t sys_errno = 0;
    std::string message;
    bool operator==(const error_message&) const = default;
};
struct read_file_request {
    std::string path;
    std::uint64_t max_bytes = 0; // larger files end in error file_too_large
    bool operator==(const read_file_request&) const = default;
};
struct file_end {
    std::uint64_t total_bytes = 0;
    bool operator==(const file_end&) const = default;
};
struct write_file_request {
    std::string path;
    std::uint32_t mode = 0644;
    bool operator==(const write_file_request&) const = default;
};
struct tcp_connect_request {
    std::uint16_t port = 0;
    bool operator==(const tcp_connect_request&) const = default;
};
struct credit_grant {
    std::uint32_t bytes = 0;
    bool operator==(const credit_grant&) const = default;
};
struct set_clock_request {
    std::uint64_t realtime_ns = 0; // CLOCK_REALTIME, ns since the epoch; 0 < ns <= max_clock_ns
    bool operator==(const set_clock_request&) const = default;
};

struct frame_header {
    message_type type{};
    std::uint32_t stream = 0;
    std::uint32_t length = 0;
};

namespace detail {

class writer {
public:
    explicit writer(std::string& out)
        : out_(out) {}
    void u8(std::uint8_t v) { out_.push_back(static_cast<char>(v)); }
    void u16(std::uint16_t v) { put(v, 2); }
    void u32(std::uint32_t v) { put(v, 4); }
    void u64(std::uint64_t v) { put(v, 8); }
    void bytes(std::string_view s) {
        u32(static_cast<std::uint32_t>(s.size()));
        out_.append(s);
    }

private:
    void put(std::uint64_t v, int n) {
        for (int i = 0; i < n; ++i)
            out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    }
    std::string& out_;
};

class reader {
public:
    explicit reader(std::string_view in)
        : in_(in) {}
    decode_error status() const { return status_; }
    bool ok() const { return status_ == decode_error::none; }
    std::size_t remaining() const { return in_.size() - pos_; }

    std::uint8_t u8() { return static_cast<std::uint8_t>(get(1)); }
    std::uint16_t u16() { return static_cast<std::uint16_t>(get(2)); }
    std::uint32_t u32() { return static_cast<std::uint32_t>(get(4)); }
    std::uint64_t u64() { return get(8); }
    /// A length-prefixed string, length checked against `bound` and the input before copying.
    std::string bytes(std::size_t bound) {
        std::uint32_t n = u32();
        if (!ok()) return {};
        if (n > bound) return fail(decode_error::too_large), std::string{};
        if (n > remaining()) return fail(decode_error::truncated), std::string{};
        std::string s(in_.substr(pos_, n));
        pos_ += n;
        return s;
    }
    /// A count, checked against `bound` and against what the remaining input could hold
    /// (each element at least `min_element_size` bytes) before anything is reserved.
    std::size_t count(std::size_t bound, std::size_t min_element_size) {
        std::uint32_t n = u32();
        if (!ok()) return 0;
        if (n > bound) return fail(decode_error::too_large), 0;
        if (static_cast<std::uint64_t>(n) * min_element_size > remaining())
            return fail(decode_error::truncated), 0;
        return n;
    }
    decode_error finish() {
        if (ok() && remaining() != 0) status_ = decode_error::trailing_bytes;
        return status_;
    }
    void fail(decode_error e) {
        if (ok()) status_ = e;
    }

private:
    std::uint64_t get(int n) {
        if (!ok()) return 0;
        if (remaining() < static_cast<std::size_t>(n)) return fail(decode_error::truncated), 0;
        std::uint64_t v = 0;
        for (int i = 0; i < n; ++i)
            v |= static_cast<std::uint64_t>(static_cast<unsigned char>(in_[pos_ + i])) << (8 * i);
        pos_ += n;
        return v;
    }
    std::string_view in_;
    std::size_t pos_ = 0;
    decode_error status_ = decode_error::none;
};

inline void put_header(std::string& out, message_type type, std::uint32_t stream,
                       std::uint32_t length) {
    writer w(out);
    w.u32(length);
    w.u8(static_cast<std::uint8_t>(type));
    w.u32(stream);
}

/// Appends a frame whose payload `body` writes; patches the length afterwards.
template <class Body>
void put_frame(std::string& out, message_type type, std::uint32_t stream, Body&& body) {
    std::size_t start = out.size();
    put_header(out, type, stream, 0);
    writer w(out);
    body(w);
    auto length = static_cast<std::uint32_t>(out.size() - start - frame_header_size);
    for (int i = 0; i < 4; ++i)
        out[start + i] = static_cast<char>((length >> (8 * i)) & 0xff);
}

inline void put_strings(writer& w, const std::vector<std::string>& v) {
    w.u32(static_cast<std::uint32_t>(v.size()));
    for (auto& s : v)
        w.bytes(s);
}

inline std::vector<std::string> get_strings(reader& r, std::size_t bound) {
    std::vector<std::string> v;
    std::size_t n = r.count(max_strings, 4);
    if (!r.ok()) return v;
    v.reserve(n);
    for (std::size_t i = 0; i < n && r.ok(); ++i)
        v.push_back(r.bytes(bound));
    return v;
}

} // namespace detail

// ---- header ---------------------------------------------------------------

/// Parses the 9 header bytes; rejects unknown types and lengths over max_payload_size.
inline decode_error decode_header(std::string_view in, frame_header& out) {
    if (in.size() < frame_header_size) return decode_error::truncated;
    detail::reader r(in.substr(0, frame_header_size));
    std::uint32_t length = r.u32();
    std::uint8_t type = r.u8();
    std::uint32_t stream = r.u32();
    if (type == 0 || type > last_message_type) return decode_error::unknown_type;
    if (length > max_payload_size) return decode_error::too_large;
    out = {static_cast<message_type>(type), stream, length};
    return decode_error::none;
}

// ---- encoders (append one whole frame to `out`) -----------------------------

/// A frame with a raw payload: *_data frames and reseed_rng. Callers keep data at most
/// max_data_chunk (reseed: max_rng_seed).
inline void encode_data(std::string& out, message_type type, std::uint32_t stream,
                        std::string_view data) {
    detail::put_header(out, type, stream, static_cast<std::uint32_t>(data.size()));
    out.append(data);
}
/// A frame with no payload: stdin_close, tcp_connected, tcp_close, ok, shutdown.
inline void encode_empty(std::string& out, message_type type, std::uint32_t stream) {
    detail::put_header(out, type, stream, 0);
}

inline void encode(std::string& out, std::uint32_t stream, const ready& m) {
    detail::put_frame(out, message_type::ready, stream,
                      [&](detail::writer& w) { w.u32(m.version); });
}
inline void encode(std::string& out, std::uint32_t stream, const hello& m) {
    detail::put_frame(out, message_type::hello, stream, [&](detail::writer& w) {
        w.u32(m.version);
        w.bytes(m.token);
    });
}
inline void encode(std::string& out, std::uint32_t stream, const hello_ok& m) {
    detail::put_frame(out, message_type::hello_ok, stream, [&](detail::writer& w) {
        w.u32(m.version);
        w.u64(m.capabilities);
    });
}
inline void encode(std::string& out, std::uint32_t stream, const exec_request& m) {
    detail::put_frame(out, message_type::exec_request, stream, [&](detail::writer& w) {
        detail::put_strings(w, m.argv);
        detail::put_strings(w, m.env);
        w.bytes(m.cwd);
        w.u32(m.uid.value_or(0));
        w.u32(m.gid.value_or(0));
        w.u32(static_cast<std::uint32_t>(m.groups.size()));
        for (auto g : m.groups)
            w.u32(g);
        w.u8(static_cast<std::uint8_t>((m.tty ? 1 : 0) | (m.stdin_open ? 2 : 0) | (m.uid ? 4 : 0) |
                                       (m.gid ? 8 : 0) | (m.make_cwd ? 16 : 0)));
        w.u16(m.tty ? m.tty->rows : 0);
        w.u16(m.tty ? m.tty->cols : 0);
        w.u32(m.timeout_ms);
        w.u32(static_cast<std::uint32_t>(m.limits.size()));
        for (const auto& l : m.limits) {
            w.u32(l.resource);
            w.u64(l.soft);
            w.u64(l.hard);
        }
    });
}
inline void encode(std::string& out, std::uint32_t stream, const exec_started& m) {
    detail::put_frame(out, message_type::exec_started, stream,
                      [&](detail::writer& w) { w.u32(static_cast<std::uint32_t>(m.pid)); });
}
inline void encode(std::string& out, std::uint32_t stream, const tty_size& m) {
    detail::put_frame(out, message_type::resize, stream, [&](detail::writer& w) {
        w.u16(m.rows);
        w.u16(m.cols);
    });
}
inline void encode(std::string& out, std::uint32_t stream, const signal_request& m) {
    detail::put_frame(out, message_type::signal, stream,
                      [&](detail::writer& w) { w.u32(static_cast<std::uint32_t>(m.signo)); });
}
inline void encode(std::string& out, std::uint32_t stream, const exit_status& m) {
    detail::put_frame(out, message_type::exit, stream, [&](detail::writer& w) {
        w.u32(static_cast<std::uint32_t>(m.code));
        w.u32(static_cast<std::uint32_t>(m.signal));
        w.u8(m.timed_out ? 1 : 0);
    });
}
inline void encode(std::string& out, std::uint32_t stream, const error_message& m) {
    detail::put_frame(out, message_type::error, stream, [&](detail::writer& w) {
        w.u32(static_cast<std::uint32_t>(m.code));
        w.u32(static_cast<std::uint32_t>(m.sys_errno));
        w.bytes(std::string_view(m.message).substr(0, max_message_size));
    });
}
inline void encode(std::string& out, std::uint32_t stream, const read_file_request& m) {
    detail::put_frame(out, message_type::read_file, stream, [&](detail::writer& w) {
        w.bytes(m.path);
        w.u64(m.max_bytes);
    });
}
inline void encode(std::string& out, std::uint32_t stream, const file_end& m) {
    detail::put_frame(out, message_type::file_end, stream,
                      [&](detail::writer& w) { w.u64(m.total_bytes); });
}
inline void encode(std::string& out, std::uint32_t stream, const write_file_request& m) {
    detail::put_frame(out, message_type::write_file, stream, [&](detail::writer& w) {
        w.bytes(m.path);
        w.u32(m.mode);
    });
}
inline void encode(std::string& out, std::uint32_t stream, const tcp_connect_request& m) {
    detail::put_frame(out, message_type::tcp_connect, stream,
                      [&](detail::writer& w) { w.u16(m.port); });
}
inline void encode(std::string& out, std::uint32_t stream, const credit_grant& m) {
    detail::put_frame(out, message_type::credit, stream,
                      [&](detail::writer& w) { w.u32(m.bytes); });
}
inline void encode(std::string& out, std::uint32_t stream, const set_clock_request& m) {
    detail::put_frame(out, message_type::set_clock, stream,
                      [&](detail::writer& w) { w.u64(m.realtime_ns); });
}

// ---- decoders (payload only; the header was checked by decode_header) -------

inline decode_error decode(std::string_view in, ready& m) {
    detail::reader r(in);
    m.version = r.u32();
    return r.finish();
}
inline decode_error decode(std::string_view in, hello& m) {
    detail::reader r(in);
    m.version = r.u32();
    m.token = r.bytes(max_token_size);
    return r.finish();
}
inline decode_error decode(std::string_view in, hello_ok& m) {
    detail::reader r(in);
    m.version = r.u32();
    m.capabilities = r.u64();
    return r.finish();
}
inline decode_error decode(std::string_view in, exec_request& m) {
    detail::reader r(in);
    m.argv = detail::get_strings(r, max_string_size);
    m.env = detail::get_strings(r, max_string_size);
    m.cwd = r.bytes(max_path_size);
    std::uint32_t uid = r.u32();
    std::uint32_t gid = r.u32();
    std::size_t n = r.count(max_groups, 4);
    m.groups.clear();
    if (r.ok()) {
        m.groups.reserve(n);
        for (std::size_t i = 0; i < n; ++i)
            m.groups.push_back(r.u32());
    }
    std::uint8_t flags = r.u8();
    std::uint16_t rows = r.u16();
    std::uint16_t cols = r.u16();
    m.timeout_ms = r.u32();
    const std::size_t limits = r.count(max_resource_limits, 20);
    m.limits.clear();
    for (std::size_t i = 0; r.ok() && i < limits; ++i) {
        resource_limit l;
        l.resource = r.u32();
        l.soft = r.u64();
        l.hard = r.u64();
        if (r.ok() && (l.resource >= max_resource_limits || l.soft > l.hard))
            return decode_error::malformed;
        m.limits.push_back(l);
    }
    if (!r.ok()) return r.status();
    if (flags & ~31u) return decode_error::malformed;
    if (m.argv.empty()) return decode_error::malformed;
    for (auto& a : m.argv)
        if (a.find('\0') != std::string::npos) return decode_error::malformed;
    for (auto& e : m.env)
        if (e.find('\0') != std::string::npos) return decode_error::malformed;
    if (m.cwd.find('\0') != std::string::npos) return decode_error::malformed;
    if (m.argv[0].empty()) return decode_error::malformed;
    m.tty = (flags & 1) ? std::optional<tty_size>(tty_size{rows, cols}) : std::nullopt;
    m.stdin_open = (flags & 2) != 0;
    m.make_cwd = (flags & 16) != 0;
    m.uid = (flags & 4) ? std::optional<std::uint32_t>(uid) : std::nullopt;
    m.gid = (flags & 8) ? std::optional<std::uint32_t>(gid) : std::nullopt;
    return r.finish();
}
inline decode_error decode(std::string_view in, exec_started& m) {
    detail::reader r(in);
    m.pid = static_cast<std::int32_t>(r.u32());
    return r.finish();
}
inline decode_error decode(std::string_view in, tty_size& m) {
    detail::reader r(in);
    m.rows = r.u16();
    m.cols = r.u16();
    if (r.ok() && (m.rows == 0 || m.cols == 0)) return decode_error::malformed;
    return r.finish();
}
inline decode_error decode(std::string_view in, signal_request& m) {
    detail::reader r(in);
    m.signo = static_cast<std::int32_t>(r.u32());
    if (r.ok() && (m.signo <= 0 || m.signo > 64)) return decode_error::malformed;
    return r.finish();
}
inline decode_error decode(std::string_view in, exit_status& m) {
    detail::reader r(in);
    m.code = static_cast<std::int32_t>(r.u32());
    m.signal = static_cast<std::int32_t>(r.u32());
    std::uint8_t t = r.u8();
    if (r.ok() && t > 1) return decode_error::malformed;
    m.timed_out = t != 0;
    return r.finish();
}
inline decode_error decode(std::string_view in, error_message& m) {
    detail::reader r(in);
    m.code = static_cast<agent_error>(r.u32());
    m.sys_errno = static_cast<std::int32_t>(r.u32());
    m.message = r.bytes(max_message_size);
    return r.finish();
}
inline decode_error decode(std::string_view in, read_file_request& m) {
    detail::reader r(in);
    m.path = r.bytes(max_path_size);
    m.max_bytes = r.u64();
    if (r.ok() && (m.path.empty() || m.path.find('\0') != std::string::npos))
        return decode_error::malformed;
    return r.finish();
}
inline decode_error decode(std::string_view in, file_end& m) {
    detail::reader r(in);
    m.total_bytes = r.u64();
    return r.finish();
}
inline decode_error decode(std::string_view in, write_file_request& m) {
    detail::reader r(in);
    m.path = r.bytes(max_path_size);
    m.mode = r.u32();
    if (r.ok() && (m.path.empty() || m.path.find('\0') != std::string::npos || (m.mode & ~07777u)))
        return decode_error::malformed;
    return r.finish();
}
inline decode_error decode(std::string_view in, tcp_connect_request& m) {
    detail::reader r(in);
    m.port = r.u16();
    if (r.ok() && m.port == 0) return decode_error::malformed;
    return r.finish();
}
inline decode_error decode(std::string_view in, credit_grant& m) {
    detail::reader r(in);
    m.bytes = r.u32();
    return r.finish();
}
inline decode_error decode(std::string_view in, set_clock_request& m) {
    detail::reader r(in);
    m.realtime_ns = r.u64();
    if (r.ok() && (m.realtime_ns == 0 || m.realtime_ns > max_clock_ns))
        return decode_error::malformed;
    return r.finish();
}

/// Checks that a payload is valid for its type without keeping the result
/// (data frames: any bytes up to their bound; empty frames: no bytes).
inline decode_error validate(message_type type, std::string_view payload) {
    auto check = [&](auto message) { return decode(payload, message); };
    switch (type) {
    case message_type::ready:
        return check(ready{});
    case message_type::hello:
        return check(hello{});
    case message_type::hello_ok:
        return check(hello_ok{});
    case message_type::exec_request:
        return check(exec_request{});
    case message_type::exec_started:
        return check(exec_started{});
    case message_type::signal:
        return check(signal_request{});
    case message_type::resize:
        return check(tty_size{});
    case message_type::exit:
        return check(exit_status{});
    case message_type::error:
        return check(error_message{});
    case message_type::read_file:
        return check(read_file_request{});
    case message_type::file_end:
        return check(file_end{});
    case message_type::write_file:
        return check(write_file_request{});
    case message_type::tcp_connect:
        return check(tcp_connect_request{});
    case message_type::credit:
        return check(credit_grant{});
    case message_type::set_clock:
        return check(set_clock_request{});
    case message_type::stdin_data:
    case message_type::stdout_data:
    case message_type::stderr_data:
    case message_type::file_data:
    case message_type::tcp_data:
        return payload.size() <= max_data_chunk ? decode_error::none : decode_error::too_large;
    case message_type::reseed_rng:
        return payload.size() <= max_rng_seed ? decode_error::none : decode_error::too_large;
    case message_type::set_hostname:
        return valid_set_hostname_payload(payload) ? decode_error::none : decode_error::malformed;
    case message_type::stdin_close:
    case message_type::tcp_connected:
    case message_type::tcp_close:
    case message_type::ok:
    case message_type::shutdown:
        return payload.empty() ? decode_error::none : decode_error::trailing_bytes;
    }
    return decode_error::unknown_type;
}

} // namespace supermachine::agent
