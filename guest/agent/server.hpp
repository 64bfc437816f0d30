#pragma once
// The agent's request server: one poll() loop over the listening socket, the
// host connections, and every fd of every running operation. Single-threaded
// on purpose (PID 1 in a small VM); nothing blocks except short regular-file
// writes. Every buffer is bounded by the protocol's credit window.
#include <supermachine/agent/protocol.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

namespace supermachine::agent::guest {

inline void log(const char* fmt, const char* a = "", int b = 0) {
    std::fprintf(stderr, "supermachine-agent: ");
    std::fprintf(stderr, fmt, a, b);
    std::fputc('\n', stderr);
}

inline void set_nonblocking(int fd) {
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
}

inline void close_fd(int& fd) {
    if (fd >= 0) ::close(fd);
    fd = -1;
}

inline std::int64_t now_ms() {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::int64_t{ts.tv_sec} * 1000 + ts.tv_nsec / 1000000;
}

struct server_options {
    std::string token;
    bool power_off_on_shutdown = false; // PID 1: shutdown powers the VM off
    /// Accept vsock connections from the host's CID only: a guest process
    /// reaching the agent (vsock loopback) would be a way to root.
    bool host_only = false;
    std::size_t max_streams_per_connection = 1024;
};

// Limits that keep a misbehaving host from growing our buffers.
inline constexpr std::size_t max_pending_output = std::size_t{4} << 20; // per connection
inline constexpr std::uint64_t max_credit = std::uint64_t{16} << 20;

enum class session_kind { exec, read_file, write_file, tcp };

struct session {
    session_kind kind;
    std::uint32_t stream = 0;
    std::uint64_t send_credit = initial_window; // bytes we may still send to the host
    // exec
    pid_t pid = -1;
    int stdin_fd = -1;
    int out_fd[2] = {-1, -1}; // stdout, stderr (a pty: only [0])
    bool tty = false;
    std::string to_child; // stdin bytes received, not yet written (<= initial_window)
    bool stdin_close_requested = false;
    bool exited = false;
    int wait_status = 0;
    std::int64_t deadline = 0; // 0: none
    bool timed_out = false;
    // read_file / write_file
    int file_fd = -1;
    std::uint64_t total = 0;
    std::uint64_t max_bytes = 0;
    // tcp
    int socket_fd = -1;
    bool connecting = false;
    std::string to_socket;
    bool host_closed = false;   // host sent tcp_close
    bool socket_eof = false;    // we sent tcp_close
    bool shutdown_sent = false; // SHUT_WR done

    ~session() {
        close_fd(stdin_fd);
        close_fd(out_fd[0]);
        close_fd(out_fd[1]);
        close_fd(file_fd);
        close_fd(socket_fd);
    }
};

struct connection {
    std::uint64_t id = 0; // never reused, unlike the address
    int fd = -1;
    std::string in;
    std::string out;
    std::size_t out_pos = 0;
    bool authenticated = false;
    bool closing = false; // flush `out`, then close (after auth failure / shutdown)
    bool dead = false;
    bool serial = false; // on the virtio-serial port (a dup of it)
    std::map<std::uint32_t, std::unique_ptr<session>> sessions;

    std::size_t pending() const { return out.size() - out_pos; }
    ~connection() { close_fd(fd); }
};

class server {
public:
    explicit server(server_options options)
        : options_(std::move(options)) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGCHLD);
        ::sigprocmask(SIG_BLOCK, &set, nullptr);
        child_fd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
        ::signal(SIGPIPE, SIG_IGN);
    }
    ~server() {
        ::close(child_fd_);
        close_fd(serial_fd_);
        close_fd(sigio_fd_);
    }

    /// Serve a virtio-serial port (opened O_RDWR | O_NONBLOCK): one host at a
    /// time. While QEMU's chardev has no client the port reports POLLHUP and
    /// reads return 0; the driver sends SIGIO when the host connects or goes
    /// away. Each new host gets a fresh session (ready, hello, ...), as a new
    /// vsock connection would.
    void set_serial_port(int fd) {
        serial_fd_ = fd;
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGIO);
        ::sigprocmask(SIG_BLOCK, &set, nullptr);
        sigio_fd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
        ::fcntl(fd, F_SETOWN, ::getpid());
        ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_ASYNC | O_NONBLOCK);
    }

    void set_listener(int fd) { listen_fd_ = fd; }
    void add_connection(int fd) {
        set_nonblocking(fd);
        auto c = std::make_unique<connection>();
        c->fd = fd;
        c->id = ++last_connection_id_;
        encode(c->out, 0, ready{});
        connections_.push_back(std::move(c));
    }

    /// Serves until there is neither a listener nor a connection, or a shutdown was served.
    /// Returns true when a shutdown request ended it.
    bool run() {
        while (!stop_ && (listen_fd_ >= 0 || serial_fd_ >= 0 || !connections_.empty()))
            step();
        for (auto& c : connections_)
            flush_blocking(*c);
        return stop_;
    }

private:
    enum class slot { listener, child, sigio, conn, stdin_fd, out0, out1, file, socket };
    struct watch {
        slot what;
        connection* conn;
        std::uint32_t stream;
    };

    void step() {
        std::vector<pollfd> fds;
        std::vector<watch> watches;
        auto add = [&](int fd, short events, slot what, connection* c, std::uint32_t stream) {
            if (fd < 0 || events == 0) return;
            fds.push_back({fd, events, 0});
            watches.push_back({what, c, stream});
        };
        add(listen_fd_, POLLIN, slot::listener, nullptr, 0);
        add(child_fd_, POLLIN, slot::child, nullptr, 0);
        std::int64_t deadline = 0;
        const bool serial_idle = serial_fd_ >= 0 && connections_.empty() && !serial_attach();
        if (serial_idle) {
            // Waiting for a host: SIGIO says the port's state changed; the
            // timeout only covers a state change the signal raced with.
            add(sigio_fd_, POLLIN, slot::sigio, nullptr, 0);
            deadline = now_ms() + 1000;
        }
        for (auto& c : connections_) {
            short ev = 0;
            if (!c->closing && c->pending() < max_pending_output) ev |= POLLIN;
            if (c->pending()) ev |= POLLOUT;
            add(c->fd, ev, slot::conn, c.get(), 0);
            bool can_send = !c->closing && c->pending() < max_pending_output;
            for (auto& [id, s] : c->sessions) {
                bool credit = can_send && s->send_credit > 0;
                switch (s->kind) {
                case session_kind::exec:
                    add(s->stdin_fd, s->to_child.empty() ? 0 : POLLOUT, slot::stdin_fd, c.get(),
                        id);
                    add(s->out_fd[0], credit ? POLLIN : 0, slot::out0, c.get(), id);
                    add(s->out_fd[1], credit ? POLLIN : 0, slot::out1, c.get(), id);
                    if (s->deadline && !s->exited && !s->timed_out &&
                        (!deadline || s->deadline < deadline))
                        deadline = s->deadline;
                    break;
                case session_kind::read_file:
                    add(s->file_fd, credit ? POLLIN : 0, slot::file, c.get(), id);
                    break;
                case session_kind::write_file:
                    break;
                case session_kind::tcp: {
                    short sev = 0;
                    if (s->connecting || !s->to_socket.empty()) sev |= POLLOUT;
                    if (!s->connecting && !s->socket_eof && credit) sev |= POLLIN;
                    add(s->socket_fd, sev, slot::socket, c.get(), id);
                    break;
                }
                }
            }
        }
        int timeout = -1;
        if (deadline) timeout = static_cast<int>(std::max<std::int64_t>(0, deadline - now_ms()));
        int n = ::poll(fds.data(), fds.size(), timeout);
        if (n < 0 && errno != EINTR) {
            log("poll failed: %s", std::strerror(errno));
            stop_ = true;
            return;
        }
        for (std::size_t i = 0; n > 0 && i < fds.size(); ++i) {
            if (!fds[i].revents) continue;
            auto& w = watches[i];
            if (w.conn && w.conn->dead) continue;
            switch (w.what) {
            case slot::listener:
                accept_one();
                break;
            case slot::child:
                reap_children();
                break;
            case slot::sigio: {
                signalfd_siginfo info;
                while (::read(sigio_fd_, &info, sizeof info) == sizeof info) {
                }
                break;
            }
            case slot::conn:
                if (fds[i].revents & POLLOUT) flush(*w.conn);
                if (!w.conn->dead && (fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
                    read_connection(*w.conn);
                break;
            default: {
                auto it = w.conn->sessions.find(w.stream);
                if (it == w.conn->sessions.end()) break;
                on_session_fd(*w.conn, *it->second, w.what, fds[i].revents);
                break;
            }
            }
        }
        check_timeouts();
        for (auto& c : connections_) {
            finish_sessions(*c);
            if (!c->dead && c->pending()) flush(*c);
            if (!c->dead && c->closing && !c->pending()) drop(*c);
        }
        std::erase_if(connections_, [](auto& c) { return c->dead; });
    }

    // ---- connections --------------------------------------------------------

    /// With no session on the serial port: start one when a host is
    /// connected. After a session ended without the host leaving (auth
    /// failure, protocol error) the host must hang up first.
    bool serial_attach() {
        pollfd p{serial_fd_, POLLIN, 0};
        if (::poll(&p, 1, 0) < 0) return false;
        if (p.revents & POLLHUP) {
            if (serial_session_ended_) log("host detached");
            serial_session_ended_ = false;
            return false;
        }
        if (serial_session_ended_) return false;
        const int fd = ::fcntl(serial_fd_, F_DUPFD_CLOEXEC, 3);
        if (fd < 0) return false;
        add_connection(fd);
        connections_.back()->serial = true;
        return true;
    }

    void accept_one() {
        sockaddr_vm peer{};
        socklen_t length = sizeof peer;
        int fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &length,
                           SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) return;
        if (options_.host_only &&
            (peer.svm_family != AF_VSOCK || peer.svm_cid != VMADDR_CID_HOST)) {
            log("refusing a connection from vsock CID %s (not the host)",
                std::to_string(peer.svm_cid).c_str());
            ::close(fd);
            return;
        }
        add_connection(fd);
    }

    void drop(connection& c) {
        if (c.serial) serial_session_ended_ = true;
        // The host is gone: nobody can receive results, so end everything it started.
        for (auto& [id, s] : c.sessions)
            if (s->kind == session_kind::exec && s->pid > 0 && !s->exited) ::kill(-s->pid, SIGKILL);
        c.sessions.clear();
        close_fd(c.fd);
        c.dead = true;
    }

    void flush(connection& c) {
        while (c.pending()) {
            // write(), not send(): the connection may be a virtio-serial port (a char device).
            ssize_t n = ::write(c.fd, c.out.data() + c.out_pos, c.pending());
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                drop(c);
                return;
            }
            c.out_pos += static_cast<std::size_t>(n);
        }
        if (c.out_pos == c.out.size()) {
            c.out.clear();
            c.out_pos = 0;
        } else if (c.out_pos > (std::size_t{1} << 20)) {
            c.out.erase(0, c.out_pos);
            c.out_pos = 0;
        }
    }

    /// Last words (after shutdown): wait for the host to take them, but not forever.
    void flush_blocking(connection& c) {
        std::int64_t until = now_ms() + 2000;
        while (!c.dead && c.pending() && now_ms() < until) {
            pollfd p{c.fd, POLLOUT, 0};
            if (::poll(&p, 1, 100) > 0) flush(c);
        }
    }

    void read_connection(connection& c) {
        char buffer[64 * 1024];
        ssize_t n = ::read(c.fd, buffer, sizeof buffer);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) {
            drop(c);
            return;
        }
        c.in.append(buffer, static_cast<std::size_t>(n));
        std::size_t pos = 0;
        while (!c.dead && !c.closing && c.in.size() - pos >= frame_header_size) {
            frame_header h;
            auto e = decode_header(std::string_view(c.in).substr(pos), h);
            if (e != decode_error::none) return protocol_violation(c, to_string(e));
            if (c.in.size() - pos - frame_header_size < h.length) break;
            std::string_view payload(c.in.data() + pos + frame_header_size, h.length);
            pos += frame_header_size + h.length;
            handle_frame(c, h, payload);
        }
        if (!c.dead) c.in.erase(0, pos);
    }

    void protocol_violation(connection& c, const char* what) {
        log("closing connection: protocol error (%s)", what);
        encode(
            c.out, 0,
            error_message{agent_error::invalid_request, 0, std::string("protocol error: ") + what});
        c.closing = true;
    }

    void send_error(connection& c, std::uint32_t stream, agent_error code, int err,
                    std::string message) {
        encode(c.out, stream, error_message{code, err, std::move(message)});
    }

    // ---- frames ---------------------------------------------------------------

    void handle_frame(connection& c, const frame_header& h, std::string_view payload) {
        if (auto e = validate(h.type, payload); e != decode_error::none)
            return protocol_violation(c, to_string(e));
        if (!c.authenticated) {
            hello m;
            if (h.type != message_type::hello) return protocol_violation(c, "expected hello");
            decode(payload, m);
            if (!token_matches(m.token)) {
                log("refusing a connection: wrong token");
                send_error(c, 0, agent_error::auth_failed, 0, "wrong token");
                c.closing = true;
                return;
            }
            if (m.version != protocol_version) {
                send_error(c, 0, agent_error::unsupported, 0,
                           "protocol version " + std::to_string(m.version) + " not supported");
                c.closing = true;
                return;
            }
            c.authenticated = true;
            encode(c.out, 0,
                   hello_ok{protocol_version, capability_exec | capability_tty | capability_files |
                                                  capability_tcp | capability_rng |
                                                  capability_clock | capability_hostname});
            return;
        }
        switch (h.type) {
        case message_type::reseed_rng:
            return reseed(c, payload);
        case message_type::set_clock: {
            set_clock_request m;
            decode(payload, m);
            timespec t{static_cast<time_t>(m.realtime_ns / 1'000'000'000),
                       static_cast<long>(m.realtime_ns % 1'000'000'000)};
            if (::clock_settime(CLOCK_REALTIME, &t) != 0)
                return send_error(c, 0, agent_error::io_error, errno, "clock_settime failed");
            encode_empty(c.out, message_type::ok, 0);
            return;
        }
        case message_type::set_hostname:
            return set_hostname(c, payload);
        case message_type::shutdown:
            encode_empty(c.out, message_type::ok, 0);
            c.closing = true;
            stop_ = true;
            return;
        case message_type::exec_request:
        case message_type::read_file:
        case message_type::write_file:
        case message_type::tcp_connect:
            return start_session(c, h, payload);
        default:
            break;
        }
        auto it = c.sessions.find(h.stream);
        if (h.stream == 0) return protocol_violation(c, "unexpected frame on stream 0");
        if (it == c.sessions.end()) return; // a stream that just ended: late frames are fine
        session& s = *it->second;
        switch (h.type) {
        case message_type::credit: {
            credit_grant g;
            decode(payload, g);
            s.send_credit = std::min<std::uint64_t>(s.send_credit + g.bytes, max_credit);
            return;
        }
        case message_type::stdin_data:
            if (s.kind != session_kind::exec) return protocol_violation(c, "stdin on non-exec");
            if (s.stdin_fd < 0) return; // stdin closed or not open: drop
            if (s.to_child.size() + payload.size() > initial_window)
                return protocol_violation(c, "stdin beyond credit");
            s.to_child.append(payload);
            write_stdin(c, s);
            return;
        case message_type::stdin_close:
            if (s.kind != session_kind::exec) return protocol_violation(c, "stdin on non-exec");
            s.stdin_close_requested = true;
            write_stdin(c, s);
            return;
        case message_type::signal: {
            signal_request m;
            decode(payload, m);
            if (s.kind == session_kind::exec && s.pid > 0 && !s.exited) ::kill(s.pid, m.signo);
            return;
        }
        case message_type::resize: {
            tty_size m;
            decode(payload, m);
            winsize ws{m.rows, m.cols, 0, 0};
            // The master: the kernel signals the tty's foreground group.
            if (s.kind == session_kind::exec && s.tty && s.out_fd[0] >= 0)
                ::ioctl(s.out_fd[0], TIOCSWINSZ, &ws);
            return;
        }
        case message_type::file_data:
            return write_file_data(c, s, payload);
        case message_type::file_end: {
            file_end m;
            decode(payload, m);
            return finish_write_file(c, s, m.total_bytes);
        }
        case message_type::tcp_data:
            if (s.kind != session_kind::tcp || s.connecting)
                return protocol_violation(c, "tcp data out of order");
            if (s.host_closed) return;
            if (s.to_socket.size() + payload.size() > initial_window)
                return protocol_violation(c, "tcp data beyond credit");
            s.to_socket.append(payload);
            write_socket(c, s);
            return;
        case message_type::tcp_close:
            if (s.kind != session_kind::tcp) return protocol_violation(c, "tcp close on non-tcp");
            s.host_closed = true;
            write_socket(c, s);
            return;
        default:
            return protocol_violation(c, "unexpected message from host");
        }
    }

    bool token_matches(const std::string& offered) const {
        // Constant-time in the token's length so a guest-side observer learns nothing.
        const std::string& want = options_.token;
        unsigned diff = offered.size() != want.size();
        for (std::size_t i = 0; i < offered.size(); ++i)
            diff |= static_cast<unsigned char>(offered[i]) ^
                    static_cast<unsigned char>(want[i % std::max<std::size_t>(want.size(), 1)]);
        return diff == 0 && !want.empty();
    }

    /// The vm's hostname, as docker sets a container's: the kernel's, and
    /// /etc/hostname and /etc/hosts. Those are tmpfs files bind-mounted at
    /// boot (mount_hostname_files): writing them costs no disk I/O on the
    /// warm path (measured ≈ 15 ms a run when they were written on the root
    /// disk). Without the mounts they are written on the root (the vm's own
    /// copy-on-write disk); a read-only root keeps its files: logged.
    /// The payload may go on after the name with "\n" and lines for
    /// /etc/hosts (docker's --add-host, written by the host as "IP\tNAME\n").
    void set_hostname(connection& c, std::string_view payload) {
        const auto newline = payload.find('\n');
        const std::string_view name = payload.substr(0, newline);
        const std::string_view extra =
            newline == std::string_view::npos ? std::string_view() : payload.substr(newline + 1);
        for (char ch : extra)
            if (ch != '\n' && ch != '\t' && (ch < 0x20 || ch > 0x7e))
                return send_error(c, 0, agent_error::invalid_request, 0, "bad hosts line");
        if (::sethostname(name.data(), name.size()) != 0)
            return send_error(c, 0, agent_error::io_error, errno, "sethostname failed");
        const std::string n(name);
        const std::string hosts = "127.0.0.1\tlocalhost\n"
                                  "::1\tlocalhost ip6-localhost ip6-loopback\n"
                                  "fe00::0\tip6-localnet\n"
                                  "ff00::0\tip6-mcastprefix\n"
                                  "ff00::1\tip6-allnodes\n"
                                  "ff00::2\tip6-allrouters\n"
                                  "127.0.1.1\t" +
                                  n + "\n" + std::string(extra);
        for (const auto& [path, text] :
             {std::pair{"/etc/hostname", n + "\n"}, std::pair{"/etc/hosts", hosts}}) {
            const int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW;
            int fd = ::open(path, flags, 0644);
            if (fd < 0 && errno == ELOOP) { // a symlink in the image: replaced, never followed
                ::unlink(path);
                fd = ::open(path, flags, 0644);
            }
            const bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) ==
                                           static_cast<ssize_t>(text.size());
            if (!ok) log("%s: cannot write (errno %d)", path, errno);
            if (fd >= 0) ::close(fd);
        }
        encode_empty(c.out, message_type::ok, 0);
    }

    void reseed(connection& c, std::string_view seed) {
        int fd = ::open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0) return send_error(c, 0, agent_error::io_error, errno, "open /dev/urandom");
        // RNDADDENTROPY credits the entropy (needs CAP_SYS_ADMIN); a plain write still mixes it.
        alignas(rand_pool_info) unsigned char pool[sizeof(rand_pool_info) + max_rng_seed] = {};
        auto* info = reinterpret_cast<rand_pool_info*>(pool);
        info->entropy_count = static_cast<int>(seed.size() * 8);
        info->buf_size = static_cast<int>(seed.size());
        std::memcpy(pool + sizeof(rand_pool_info), seed.data(), seed.size());
        bool ok = ::ioctl(fd, RNDADDENTROPY, pool) == 0 ||
                  ::write(fd, seed.data(), seed.size()) == static_cast<ssize_t>(seed.size());
        // Mixed in is not yet used: once initialized, Linux (5.18+) reseeds
        // its crng only on a schedule (up to a minute), so two clones would
        // read the same /dev/urandom bytes until then. Reseed it now.
        if (ok) ok = ::ioctl(fd, RNDRESEEDCRNG) == 0;
        int err = errno;
        ::close(fd);
        if (!ok) return send_error(c, 0, agent_error::io_error, err, "reseed failed");
        encode_empty(c.out, message_type::ok, 0);
    }

    void start_session(connection& c, const frame_header& h, std::string_view payload) {
        if (h.stream == 0 || c.sessions.count(h.stream))
            return protocol_violation(c, "request on stream 0 or on a stream in use");
        if (c.sessions.size() >= options_.max_streams_per_connection)
            return send_error(c, h.stream, agent_error::too_many_streams, 0, "too many streams");
        switch (h.type) {
        case message_type::exec_request: {
            exec_request m;
            decode(payload, m);
            return start_exec(c, h.stream, m);
        }
        case message_type::read_file: {
            read_file_request m;
            decode(payload, m);
            return start_read_file(c, h.stream, m);
        }
        case message_type::write_file: {
            write_file_request m;
            decode(payload, m);
            return start_write_file(c, h.stream, m);
        }
        case message_type::tcp_connect: {
            tcp_connect_request m;
            decode(payload, m);
            return start_tcp(c, h.stream, m);
        }
        default:
            return;
        }
    }

    // ---- exec -------------------------------------------------------------------

    // What the child reports through its close-on-exec pipe when it fails before exec.
    struct child_failure {
        int stage; // 0 exec, 1 chdir, 2 credentials, 3 tty, 4 command not found, 5 limits
        int err;
    };

    static std::string lookup_path(const exec_request& m) {
        for (auto& e : m.env)
            if (e.rfind("PATH=", 0) == 0) return e.substr(5);
        return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    }

    [[noreturn]] static void child_fail(int pipe_fd, int stage, int err) {
        child_failure f{stage, err};
        (void)!::write(pipe_fd, &f, sizeof f);
        ::_exit(127);
    }

    // mkdir -p `dir` in the child (async-signal-safe: no allocation).
    static void make_working_dir(const std::string& dir) {
        char path[4096];
        if (dir.size() >= sizeof path || dir.front() != '/' || ::access(dir.c_str(), F_OK) == 0)
            return;
        std::memcpy(path, dir.c_str(), dir.size() + 1);
        for (char* p = path + 1;; ++p) {
            if (*p != '/' && *p != '\0') continue;
            const char end = *p;
            *p = '\0';
            ::mkdir(path, 0755);
            *p = end;
            if (!end) break;
        }
    }

    // Runs in the child between fork and exec: only async-signal-safe calls
    // plus the vectors prepared by the parent.
    [[noreturn]] static void child_main(const exec_request& m, int report_fd, int in_fd, int out_fd,
                                        int err_fd, int tty_slave, char* const* argv,
                                        char* const* envp, const std::vector<std::string>& paths) {
        sigset_t empty;
        sigemptyset(&empty);
        ::sigprocmask(SIG_SETMASK, &empty, nullptr);
        ::signal(SIGPIPE, SIG_DFL);
        ::setsid(); // own session and process group: timeouts kill the whole group
        if (tty_slave >= 0) {
            if (::ioctl(tty_slave, TIOCSCTTY, 0) < 0) child_fail(report_fd, 3, errno);
            in_fd = out_fd = err_fd = tty_slave;
        }
        if (in_fd >= 0) ::dup2(in_fd, 0);
        ::dup2(out_fd, 1);
        ::dup2(err_fd, 2);
        // Everything else the agent holds must not leak into the child.
        ::syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */);
        // docker creates a missing working directory, as root (root:root 0755).
        if (m.make_cwd && !m.cwd.empty()) make_working_dir(m.cwd);
        for (const auto& l : m.limits) {
            const rlimit value{static_cast<rlim_t>(l.soft), static_cast<rlim_t>(l.hard)};
            if (::setrlimit(static_cast<__rlimit_resource>(l.resource), &value) < 0)
                child_fail(report_fd, 5, errno);
        }
        if (m.uid || m.gid) {
            // The user's own stdio, as runc gives it: /dev/stdout (a reopen
            // through /proc/self/fd) of a root-owned 0600 pipe would be refused.
            for (int fd = 0; fd < 3; ++fd) {
                struct stat st {};
                if (::fstat(fd, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)) &&
                    st.st_rdev != makedev(1, 3)) // never /dev/null
                    (void)!::fchown(fd, m.uid ? *m.uid : ~0u, m.gid ? *m.gid : ~0u);
            }
            std::vector<gid_t> groups(m.groups.begin(), m.groups.end());
            if (::setgroups(groups.size(), groups.data()) < 0 && errno != EPERM)
                child_fail(report_fd, 2, errno);
            if (m.gid && ::setgid(*m.gid) < 0) child_fail(report_fd, 2, errno);
            if (m.uid && ::setuid(*m.uid) < 0) child_fail(report_fd, 2, errno);
        }
        if (!m.cwd.empty() && ::chdir(m.cwd.c_str()) < 0) child_fail(report_fd, 1, errno);
        if (m.argv[0].find('/') != std::string::npos) {
            ::execve(argv[0], argv, envp);
            child_fail(report_fd, errno == ENOENT ? 4 : 0, errno);
        }
        int last = ENOENT;
        for (auto& p : paths) {
            ::execve(p.c_str(), argv, envp);
            if (errno != ENOENT && errno != ENOTDIR) last = errno;
        }
        child_fail(report_fd, last == ENOENT ? 4 : 0, last);
    }

    void start_exec(connection& c, std::uint32_t stream, const exec_request& m) {
        auto s = std::make_unique<session>();
        s->kind = session_kind::exec;
        s->stream = stream;
        s->tty = m.tty.has_value();

        // Prepared before fork: the child must not allocate.
        std::vector<std::string> paths;
        if (m.argv[0].find('/') == std::string::npos) {
            std::string path = lookup_path(m);
            std::size_t start = 0;
            while (start <= path.size()) {
                std::size_t end = path.find(':', start);
                if (end == std::string::npos) end = path.size();
                std::string dir = path.substr(start, end - start);
                paths.push_back((dir.empty() ? std::string(".") : dir) + "/" + m.argv[0]);
                start = end + 1;
            }
        }
        std::vector<char*> argv, envp;
        for (auto& a : m.argv)
            argv.push_back(const_cast<char*>(a.c_str()));
        argv.push_back(nullptr);
        for (auto& e : m.env)
            envp.push_back(const_cast<char*>(e.c_str()));
        envp.push_back(nullptr);

        int report[2], in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
        int master = -1, slave = -1;
        auto fail_setup = [&](const char* what) {
            int e = errno;
            for (int fd : {report[0], report[1], in[0], in[1], out[0], out[1], err[0], err[1],
                           master, slave})
                if (fd >= 0) ::close(fd);
            send_error(c, stream, agent_error::exec_failed, e,
                       std::string(what) + ": " + std::strerror(e));
        };
        report[0] = report[1] = -1;
        if (::pipe2(report, O_CLOEXEC) < 0) return fail_setup("pipe");
        if (m.tty) {
            master = ::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
            if (master < 0 || ::grantpt(master) < 0 || ::unlockpt(master) < 0)
                return fail_setup("posix_openpt");
            char name[128];
            if (::ptsname_r(master, name, sizeof name) != 0) return fail_setup("ptsname");
            slave = ::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
            if (slave < 0) return fail_setup("open pty");
            winsize ws{m.tty->rows, m.tty->cols, 0, 0};
            ::ioctl(slave, TIOCSWINSZ, &ws);
        } else {
            if (::pipe2(in, O_CLOEXEC) < 0 || ::pipe2(out, O_CLOEXEC) < 0 ||
                ::pipe2(err, O_CLOEXEC) < 0)
                return fail_setup("pipe");
        }
        pid_t pid = ::fork();
        if (pid < 0) return fail_setup("fork");
        if (pid == 0)
            child_main(m, report[1], in[0], out[1], err[1], slave, argv.data(), envp.data(), paths);

        ::close(report[1]);
        child_failure f{};
        ssize_t got;
        do
            got = ::read(report[0], &f, sizeof f);
        while (got < 0 && errno == EINTR);
        ::close(report[0]);
        if (got == static_cast<ssize_t>(sizeof f)) {
            // Failed before exec: reap it now and report why.
            for (int fd : {in[0], in[1], out[0], out[1], err[0], err[1], master, slave})
                if (fd >= 0) ::close(fd);
            ::waitpid(pid, nullptr, 0);
            static const char* stages[] = {"cannot execute",
                                           "cannot change directory to",
                                           "cannot set user/groups for",
                                           "cannot attach a tty for",
                                           "command not found",
                                           "cannot set resource limits for"};
            std::string subject = f.stage == 1 ? m.cwd : m.argv[0];
            std::string message = std::string(stages[std::clamp(f.stage, 0, 5)]) + ": " + subject;
            if (f.stage != 4) message += std::string(" (") + std::strerror(f.err) + ")";
            agent_error code = f.stage == 4                        ? agent_error::command_not_found
                               : f.err == EACCES || f.err == EPERM ? agent_error::permission_denied
                                                                   : agent_error::exec_failed;
            return send_error(c, stream, code, f.err, message);
        }
        if (m.tty) {
            ::close(slave);
            s->out_fd[0] = master;
            s->stdin_fd = m.stdin_open ? ::dup(master) : -1;
            if (s->stdin_fd >= 0) ::fcntl(s->stdin_fd, F_SETFD, FD_CLOEXEC);
        } else {
            ::close(in[0]);
            ::close(out[1]);
            ::close(err[1]);
            s->out_fd[0] = out[0];
            s->out_fd[1] = err[0];
            if (m.stdin_open)
                s->stdin_fd = in[1];
            else
                ::close(in[1]); // the child reads EOF at once
        }
        for (int fd : {s->stdin_fd, s->out_fd[0], s->out_fd[1]})
            if (fd >= 0) set_nonblocking(fd);
        s->pid = pid;
        if (m.timeout_ms) s->deadline = now_ms() + m.timeout_ms;
        encode(c.out, stream, exec_started{pid});
        pids_[pid] = {c.id, stream};
        c.sessions.emplace(stream, std::move(s));
    }

    void write_stdin(connection& c, session& s) {
        std::size_t written = 0;
        while (s.stdin_fd >= 0 && !s.to_child.empty()) {
            ssize_t n = ::write(s.stdin_fd, s.to_child.data(), s.to_child.size());
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                // The child closed its stdin: drop what is left, keep running.
                s.to_child.clear();
                close_fd(s.stdin_fd);
                break;
            }
            s.to_child.erase(0, static_cast<std::size_t>(n));
            written += static_cast<std::size_t>(n);
        }
        if (written) encode(c.out, s.stream, credit_grant{static_cast<std::uint32_t>(written)});
        if (s.stdin_close_requested && s.to_child.empty() && s.stdin_fd >= 0) {
            if (s.tty) (void)!::write(s.stdin_fd, "\x04", 1); // EOF for the line discipline
            close_fd(s.stdin_fd);
        }
    }

    void reap_children() {
        signalfd_siginfo info;
        while (::read(child_fd_, &info, sizeof info) > 0) {
        }
        // PID 1 adopts every orphan: reap all, report the ones we started.
        for (;;) {
            int status = 0;
            pid_t pid = ::waitpid(-1, &status, WNOHANG);
            if (pid <= 0) break;
            auto it = pids_.find(pid);
            if (it == pids_.end()) continue;
            auto [conn, stream] = it->second;
            pids_.erase(it);
            for (auto& c : connections_) {
                if (c->id != conn || c->dead) continue;
                auto s = c->sessions.find(stream);
                if (s == c->sessions.end()) continue;
                s->second->exited = true;
                s->second->wait_status = status;
            }
        }
    }

    void check_timeouts() {
        std::int64_t now = now_ms();
        for (auto& c : connections_)
            for (auto& [id, s] : c->sessions)
                if (s->kind == session_kind::exec && s->deadline && !s->exited && !s->timed_out &&
                    now >= s->deadline) {
                    s->timed_out = true;
                    ::kill(-s->pid, SIGKILL);
                    ::kill(s->pid, SIGKILL);
                }
    }

    // Sends exit once the process is gone and its output drained; ends finished streams.
    void finish_sessions(connection& c) {
        if (c.dead) return;
        for (auto it = c.sessions.begin(); it != c.sessions.end();) {
            session& s = *it->second;
            bool done = false;
            if (s.kind == session_kind::exec && s.exited && s.out_fd[0] < 0 && s.out_fd[1] < 0) {
                exit_status st;
                if (WIFSIGNALED(s.wait_status)) {
                    st.signal = WTERMSIG(s.wait_status);
                    st.code = 128 + st.signal;
                } else {
                    st.code = WEXITSTATUS(s.wait_status);
                }
                st.timed_out = s.timed_out;
                encode(c.out, s.stream, st);
                done = true;
            }
            if (s.kind == session_kind::tcp && s.socket_eof && s.host_closed && s.to_socket.empty())
                done = true;
            if (done)
                it = c.sessions.erase(it);
            else
                ++it;
        }
    }

    // ---- fd readiness ---------------------------------------------------------

    void on_session_fd(connection& c, session& s, slot what, short revents) {
        switch (what) {
        case slot::stdin_fd:
            if (revents & (POLLERR | POLLHUP)) {
                s.to_child.clear();
                close_fd(s.stdin_fd);
            } else {
                write_stdin(c, s);
            }
            return;
        case slot::out0:
        case slot::out1: {
            int& fd = s.out_fd[what == slot::out0 ? 0 : 1];
            auto type = what == slot::out0 ? message_type::stdout_data : message_type::stderr_data;
            if (!forward_readable(c, s, fd, type)) close_fd(fd);
            return;
        }
        case slot::file:
            return read_file_chunk(c, s);
        case slot::socket:
            return on_socket(c, s, revents);
        default:
            return;
        }
    }

    /// Reads what credit allows from `fd` into data frames. False at EOF or error.
    bool forward_readable(connection& c, session& s, int fd, message_type type) {
        char buffer[max_data_chunk];
        std::size_t want = std::min<std::uint64_t>(s.send_credit, sizeof buffer);
        if (want == 0) return true;
        ssize_t n = ::read(fd, buffer, want);
        if (n < 0) return errno == EAGAIN || errno == EINTR; // EIO: pty slave closed
        if (n == 0) return false;
        encode_data(c.out, type, s.stream, std::string_view(buffer, static_cast<std::size_t>(n)));
        s.send_credit -= static_cast<std::uint64_t>(n);
        s.total += static_cast<std::uint64_t>(n);
        return true;
    }

    // ---- files ----------------------------------------------------------------

    void read_file_chunk(connection& c, session& s) {
        char buffer[max_data_chunk];
        // One byte past the bound tells a file that grew after the size check: fail, not truncate.
        std::uint64_t room = s.max_bytes - s.total + 1;
        std::size_t want = std::min<std::uint64_t>({s.send_credit, sizeof buffer, room});
        if (want == 0) return;
        ssize_t n = ::read(s.file_fd, buffer, want);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        std::uint32_t stream = s.stream;
        if (n < 0) {
            send_error(c, stream, agent_error::io_error, errno,
                       std::string("read: ") + std::strerror(errno));
            c.sessions.erase(stream);
        } else if (n == 0) {
            encode(c.out, stream, file_end{s.total});
            c.sessions.erase(stream);
        } else if (s.total + static_cast<std::uint64_t>(n) > s.max_bytes) {
            send_error(c, stream, agent_error::file_too_large, EFBIG, "file exceeds max bytes");
            c.sessions.erase(stream);
        } else {
            encode_data(c.out, message_type::file_data, stream,
                        std::string_view(buffer, static_cast<std::size_t>(n)));
            s.send_credit -= static_cast<std::uint64_t>(n);
            s.total += static_cast<std::uint64_t>(n);
        }
    }

    static agent_error file_error_code(int err) {
        if (err == ENOENT || err == ENOTDIR) return agent_error::not_found;
        if (err == EACCES || err == EPERM) return agent_error::permission_denied;
        return agent_error::io_error;
    }

    void start_read_file(connection& c, std::uint32_t stream, const read_file_request& m) {
        int fd = ::open(m.path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            return send_error(c, stream, file_error_code(errno), errno,
                              m.path + ": " + std::strerror(errno));
        struct stat st {};
        if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
            ::close(fd);
            return send_error(c, stream, agent_error::io_error, EISDIR,
                              m.path + ": is a directory");
        }
        if (static_cast<std::uint64_t>(st.st_size) > m.max_bytes) {
            ::close(fd);
            return send_error(c, stream, agent_error::file_too_large, EFBIG,
                              m.path + ": larger than " + std::to_string(m.max_bytes) + " bytes");
        }
        auto s = std::make_unique<session>();
        s->kind = session_kind::read_file;
        s->stream = stream;
        s->file_fd = fd;
        s->max_bytes = m.max_bytes;
        c.sessions.emplace(stream, std::move(s));
    }

    void start_write_file(connection& c, std::uint32_t stream, const write_file_request& m) {
        int fd = ::open(m.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, m.mode);
        if (fd < 0)
            return send_error(c, stream, file_error_code(errno), errno,
                              m.path + ": " + std::strerror(errno));
        ::fchmod(fd, m.mode); // the requested mode, not the umask's
        auto s = std::make_unique<session>();
        s->kind = session_kind::write_file;
        s->stream = stream;
        s->file_fd = fd;
        c.sessions.emplace(stream, std::move(s));
    }

    void write_file_data(connection& c, session& s, std::string_view data) {
        if (s.kind != session_kind::write_file)
            return protocol_violation(c, "file data out of order");
        std::size_t done = 0;
        while (done < data.size()) {
            ssize_t n = ::write(s.file_fd, data.data() + done, data.size() - done);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                int e = n < 0 ? errno : ENOSPC;
                send_error(c, s.stream, agent_error::io_error, e,
                           std::string("write: ") + std::strerror(e));
                c.sessions.erase(s.stream);
                return;
            }
            done += static_cast<std::size_t>(n);
        }
        s.total += data.size();
        encode(c.out, s.stream, credit_grant{static_cast<std::uint32_t>(data.size())});
    }

    void finish_write_file(connection& c, session& s, std::uint64_t total) {
        if (s.kind != session_kind::write_file)
            return protocol_violation(c, "file end out of order");
        std::uint32_t stream = s.stream;
        bool complete = total == s.total;
        int rc = ::close(s.file_fd);
        s.file_fd = -1;
        c.sessions.erase(stream);
        if (!complete)
            return send_error(c, stream, agent_error::io_error, EIO, "file length mismatch");
        if (rc < 0) return send_error(c, stream, agent_error::io_error, errno, "close failed");
        encode_empty(c.out, message_type::ok, stream);
    }

    // ---- tcp forwarding ------------------------------------------------------

    void start_tcp(connection& c, std::uint32_t stream, const tcp_connect_request& m) {
        int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return send_error(c, stream, agent_error::io_error, errno, "socket");
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_port = htons(m.port);
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
        if (rc < 0 && errno != EINPROGRESS) {
            int e = errno;
            ::close(fd);
            return send_error(c, stream, agent_error::connection_refused, e,
                              "connect to guest port " + std::to_string(m.port) + ": " +
                                  std::strerror(e));
        }
        auto s = std::make_unique<session>();
        s->kind = session_kind::tcp;
        s->stream = stream;
        s->socket_fd = fd;
        s->connecting = rc < 0;
        s->max_bytes = m.port;
        if (!s->connecting) encode_empty(c.out, message_type::tcp_connected, stream);
        c.sessions.emplace(stream, std::move(s));
    }

    void on_socket(connection& c, session& s, short revents) {
        if (s.connecting) {
            int err = 0;
            socklen_t len = sizeof err;
            ::getsockopt(s.socket_fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                send_error(c, s.stream, agent_error::connection_refused, err,
                           "connect to guest port " + std::to_string(s.max_bytes) + ": " +
                               std::strerror(err));
                c.sessions.erase(s.stream);
                return;
            }
            s.connecting = false;
            encode_empty(c.out, message_type::tcp_connected, s.stream);
            return;
        }
        if (revents & POLLOUT) write_socket(c, s);
        if (c.sessions.count(s.stream) == 0) return;
        if ((revents & (POLLIN | POLLHUP | POLLERR)) && !s.socket_eof) {
            if (!forward_readable(c, s, s.socket_fd, message_type::tcp_data)) {
                s.socket_eof = true;
                encode_empty(c.out, message_type::tcp_close, s.stream);
            }
        }
    }

    void write_socket(connection& c, session& s) {
        if (s.connecting) return;
        std::size_t written = 0;
        while (!s.to_socket.empty()) {
            ssize_t n = ::send(s.socket_fd, s.to_socket.data(), s.to_socket.size(), MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                s.to_socket.clear(); // peer gone: what is left has nowhere to go
                break;
            }
            s.to_socket.erase(0, static_cast<std::size_t>(n));
            written += static_cast<std::size_t>(n);
        }
        if (written) encode(c.out, s.stream, credit_grant{static_cast<std::uint32_t>(written)});
        if (s.host_closed && s.to_socket.empty() && !s.shutdown_sent) {
            ::shutdown(s.socket_fd, SHUT_WR);
            s.shutdown_sent = true;
        }
    }

    server_options options_;
    int listen_fd_ = -1;
    int child_fd_ = -1;
    int serial_fd_ = -1;
    int sigio_fd_ = -1;
    bool serial_session_ended_ = false;
    bool stop_ = false;
    std::vector<std::unique_ptr<connection>> connections_;
    std::uint64_t last_connection_id_ = 0;
    std::map<pid_t, std::pair<std::uint64_t, std::uint32_t>> pids_; // pid -> connection, stream
};

} // namespace supermachine::agent::guest
