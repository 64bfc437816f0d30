#pragma once
// virtio-vsock (virtio 1.2 section 5.10) in userspace: no vhost-vsock module.
// The guest is CID config::guest_cid, the host CID 2. Stream sockets only.
//
// Host side: every connection is a socketpair; the device keeps one end and
// the host program gets the other, as an ordinary Asio Unix stream socket
// (so agent::basic_client, or anything else, runs over it unchanged):
//   - async_connect(executor, guest_port, token): host -> guest (REQUEST/RESPONSE, RST = refused);
//   - listen(host_port, on_accept): guest -> host connections to host_port.
//
// Flow control is credit-based both ways (buf_alloc / fwd_cnt on every
// packet): the device never buffers more than config::buffer_size bytes per
// connection in either direction, and never sends the guest more than the
// guest's advertised credit. A guest that exceeds our credit, or sends
// malformed packets, gets an RST for that connection; a broken ring marks
// the device as needing reset. Queues: 0 rx (device -> driver), 1 tx
// (driver -> device), 2 event (TRANSPORT_RESET, sent by transport_reset()
// after a snapshot restore).
#include <supermachine/error.hpp>
#include <supermachine/virtio/device.hpp>
#include <supermachine/virtio/queue_service.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace supermachine::virtio {

/// struct virtio_vsock_hdr (little-endian on the wire; we are little-endian).
struct vsock_header {
    std::uint64_t src_cid;
    std::uint64_t dst_cid;
    std::uint32_t src_port;
    std::uint32_t dst_port;
    std::uint32_t len;
    std::uint16_t type;
    std::uint16_t op;
    std::uint32_t flags;
    std::uint32_t buf_alloc;
    std::uint32_t fwd_cnt;
} __attribute__((packed));
static_assert(sizeof(vsock_header) == 44);

namespace vsock_op {
inline constexpr std::uint16_t request = 1;
inline constexpr std::uint16_t response = 2;
inline constexpr std::uint16_t rst = 3;
inline constexpr std::uint16_t shutdown = 4;
inline constexpr std::uint16_t rw = 5;
inline constexpr std::uint16_t credit_update = 6;
inline constexpr std::uint16_t credit_request = 7;
} // namespace vsock_op
inline constexpr std::uint16_t vsock_type_stream = 1;
inline constexpr std::uint32_t vsock_shutdown_receive = 1;
inline constexpr std::uint32_t vsock_shutdown_send = 2;
inline constexpr std::uint64_t vsock_host_cid = 2;

namespace detail {

class vsock_impl : public std::enable_shared_from_this<vsock_impl> {
public:
    struct config_type {
        std::uint64_t guest_cid = 3;
        std::uint32_t buffer_size = 256 * 1024; // per connection, each direction
        std::size_t max_connections = 1024;
        std::chrono::milliseconds connect_timeout{10000};
    };
    using accept_handler = std::function<void(int fd, std::uint32_t guest_port)>;
    using connect_handler = std::function<void(error_code, int fd, std::uint32_t host_port)>;

    explicit vsock_impl(const config_type& c)
        : config_(c) {}

    // ---- device side -------------------------------------------------------------

    result<void> activate(const activation& act) {
        if (act.queues.size() != 3) return errc::invalid_argument;
        {
            std::lock_guard lock(mutex_);
            queues_[0] = act.queues[0];
            queues_[1] = act.queues[1];
            queues_[2] = act.queues[2];
            executor_ = act.executor;
            needs_reset_ = act.needs_reset;
            active_ = true;
        }
        auto self = shared_from_this();
        SUPERMACHINE_TRY(service_.start(act, [self](std::size_t index) { self->on_kick(index); }));
        std::lock_guard lock(mutex_);
        // After a pause: connections kept their state; their socket waits found the device
        // inactive and stopped, so they are re-armed here.
        std::vector<std::shared_ptr<connection>> kept;
        kept.reserve(connections_.size());
        for (auto& [key, c] : connections_)
            kept.push_back(c);
        for (auto& c : kept) {
            write_to_host(c);
            watch_read(c);
        }
        fill_rx();
        // A reset still pending (no event buffer was posted when it came, and the device
        // was paused since) goes into the buffers the driver posted long ago: it will not
        // kick the event queue again.
        deliver_event();
        return success();
    }

    /// Quiesce for a snapshot: stop serving the queues (as reset() does) but keep every
    /// connection, so the machine that resumes after the capture keeps them; activate()
    /// serves them again. (The snapshot does not hold them: a restore resets them.)
    void pause() {
        service_.stop();
        std::lock_guard lock(mutex_);
        active_ = false;
        queues_ = {};
    }

    void reset() {
        service_.stop();
        std::lock_guard lock(mutex_);
        active_ = false;
        drop_all_connections(make_error_code(errc::cancelled));
        queues_ = {};
        control_.clear();
    }

    /// After a snapshot restore: connections are gone; tell the guest (event queue).
    /// Delivered at once into an already-posted event buffer; without one, on the
    /// driver's next event-queue kick or the next activation. A device the driver never
    /// started has nobody to tell: nothing is queued.
    void transport_reset() {
        std::lock_guard lock(mutex_);
        drop_all_connections(make_error_code(errc::cancelled));
        control_.clear();
        if (!active_) return;
        event_pending_ = true;
        deliver_event();
    }

    std::uint64_t guest_cid() const { return config_.guest_cid; }

    // ---- host side ---------------------------------------------------------------

    result<void> listen(std::uint32_t port, accept_handler on_accept) {
        std::lock_guard lock(mutex_);
        if (listeners_.count(port)) return errc::invalid_argument;
        listeners_[port] = std::move(on_accept);
        return success();
    }
    void unlisten(std::uint32_t port) {
        std::lock_guard lock(mutex_);
        listeners_.erase(port);
    }

    void connect(std::uint32_t guest_port, connect_handler done) {
        std::lock_guard lock(mutex_);
        if (!active_) return post_result(std::move(done), errc::queue_not_ready, -1);
        if (connections_.size() >= config_.max_connections)
            return post_result(std::move(done), errc::out_of_resources, -1);
        std::uint32_t local = allocate_port(guest_port);
        int pair[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) < 0)
            return post_result(std::move(done), error_code(errno, boost::system::system_category()), -1);
        auto c = make_connection(local, guest_port, pair[0]);
        c->user_fd = pair[1];
        c->on_connect = std::move(done);
        c->request_pending = true;
        c->timer = std::make_unique<boost::asio::steady_timer>(executor_, config_.connect_timeout);
        c->timer->async_wait(
            [weak = weak_from_this(), key = c->key, id = c->id](boost::system::error_code ec) {
                if (ec) return;
                if (auto self = weak.lock()) {
                    std::lock_guard lock(self->mutex_);
                    auto it = self->connections_.find(key);
                    if (it == self->connections_.end() || it->second->id != id ||
                        it->second->established)
                        return;
                    it->second->rst_pending = true;
                    self->fail_connect(*it->second, make_error_code(errc::timeout));
                    self->fill_rx();
                }
            });
        fill_rx();
    }

    /// Packets or connections in flight (tests, statistics).
    std::size_t connection_count() {
        std::lock_guard lock(mutex_);
        return connections_.size();
    }

private:
    using key_type = std::pair<std::uint32_t, std::uint32_t>; // host port, guest port

    struct connection {
        std::uint64_t id = 0;
        key_type key;
        std::unique_ptr<boost::asio::posix::stream_descriptor> socket; // the device's end
        int user_fd = -1; // host end until handed out (host-initiated connect)
        connect_handler on_connect;
        std::unique_ptr<boost::asio::steady_timer> timer;
        bool established = false;
        bool request_pending = false, response_pending = false, rst_pending = false;
        bool credit_update_pending = false;
        bool shutdown_pending = false; // our SHUTDOWN(SEND) after host EOF
        bool host_eof = false;         // the host end closed its writing side
        bool guest_no_more_send = false, guest_no_more_receive = false;
        bool write_shut = false;
        bool reading = false, writing = false; // an async_wait is pending
        std::string to_host;   // guest data not yet written to the socket (<= buffer_size)
        std::string from_host; // host data not yet in an rx buffer (<= guest credit)
        std::uint32_t fwd_cnt = 0, fwd_cnt_sent = 0; // bytes we consumed / last advertised
        std::uint32_t peer_buf_alloc = 0, peer_fwd_cnt = 0, tx_cnt = 0;

        std::uint32_t peer_credit() const {
            std::uint32_t in_flight = tx_cnt - peer_fwd_cnt;
            return in_flight > peer_buf_alloc ? 0 : peer_buf_alloc - in_flight;
        }
        ~connection() {
            if (user_fd >= 0) ::close(user_fd);
        }
    };

    void post_result(connect_handler done, error_code ec, int fd, std::uint32_t port = 0) {
        if (!executor_) {
            done(ec, fd, port);
            return;
        }
        boost::asio::post(executor_,
                          [done = std::move(done), ec, fd, port] { done(ec, fd, port); });
    }

    std::uint32_t allocate_port(std::uint32_t guest_port) {
        for (;;) {
            std::uint32_t p = next_port_++;
            if (next_port_ == 0) next_port_ = 1u << 30;
            if (!connections_.count({p, guest_port}) && !listeners_.count(p)) return p;
        }
    }

    std::shared_ptr<connection> make_connection(std::uint32_t local, std::uint32_t peer, int fd) {
        auto c = std::make_shared<connection>();
        c->id = ++next_id_;
        c->key = {local, peer};
        c->socket = std::make_unique<boost::asio::posix::stream_descriptor>(executor_, fd);
        connections_[c->key] = c;
        return c;
    }

    void fail_connect(connection& c, error_code ec) {
        if (c.on_connect) post_result(std::move(c.on_connect), ec, -1);
        c.on_connect = nullptr;
    }

    void drop_all_connections(error_code ec) {
        for (auto& [k, c] : connections_) {
            fail_connect(*c, ec);
            close_socket(*c);
        }
        connections_.clear();
    }

    /// Closes the device end now (host programs see EOF) even while a wait on it is pending.
    static void close_socket(connection& c) {
        boost::system::error_code ignored;
        if (c.socket) c.socket->close(ignored);
        if (c.timer) c.timer->cancel();
    }

    void erase_connection(const key_type& key) {
        auto it = connections_.find(key);
        if (it == connections_.end()) return;
        auto c = it->second;
        connections_.erase(it);
        close_socket(*c);
    }

    vsock_header header_for(const connection& c, std::uint16_t op) const {
        vsock_header h{};
        h.src_cid = vsock_host_cid;
        h.dst_cid = config_.guest_cid;
        h.src_port = c.key.first;
        h.dst_port = c.key.second;
        h.type = vsock_type_stream;
        h.op = op;
        h.buf_alloc = config_.buffer_size;
        h.fwd_cnt = c.fwd_cnt;
        return h;
    }

    // ---- queues ----------------------------------------------------------------

    void on_kick(std::size_t index) {
        std::lock_guard lock(mutex_);
        if (!active_) return;
        if (index == 1) process_tx();
        if (index == 2) deliver_event();
        fill_rx();
    }

    void broken() {
        if (needs_reset_) needs_reset_();
    }

    void process_tx() {
        queue_binding& q = queues_[1];
        if (!q.queue) return;
        bool any = false;
        auto r = for_each_available(q, [&](virtqueue::available_chain&& c) {
            any = true;
            if (c.chain) handle_packet(c.chain.value());
            (void)q.queue->push_used(c.head, 0);
        });
        if (!r) return broken();
        if (any && q.queue->should_notify()) q.interrupt.used_buffer();
    }

    void handle_packet(const descriptor_chain& chain) {
        chain_reader reader(chain.readable());
        auto h = reader.read_object<vsock_header>();
        if (!h) return; // shorter than a header: nothing to answer
        const vsock_header hdr = h.value();
        if (hdr.src_cid != config_.guest_cid || hdr.dst_cid != vsock_host_cid) return;
        if (hdr.type != vsock_type_stream) return reply_rst(hdr);
        if (hdr.len > reader.remaining() || hdr.len > config_.buffer_size) return reply_rst(hdr);
        key_type key{hdr.dst_port, hdr.src_port};
        auto it = connections_.find(key);
        if (hdr.op == vsock_op::request) {
            if (it != connections_.end()) return reply_rst(hdr);
            return accept_request(hdr);
        }
        if (it == connections_.end()) {
            if (hdr.op != vsock_op::rst) reply_rst(hdr);
            return;
        }
        auto c = it->second; // keep alive while we work on it
        c->peer_buf_alloc = hdr.buf_alloc;
        c->peer_fwd_cnt = hdr.fwd_cnt;
        switch (hdr.op) {
        case vsock_op::response:
            if (c->established) return reset_connection(*c);
            c->established = true;
            if (c->timer) c->timer->cancel();
            if (c->on_connect) {
                int fd = std::exchange(c->user_fd, -1);
                post_result(std::move(c->on_connect), {}, fd, c->key.first);
                c->on_connect = nullptr;
            }
            watch_read(c);
            return;
        case vsock_op::rst:
            if (!c->established)
                fail_connect(*c, boost::system::errc::make_error_code(boost::system::errc::connection_refused));
            erase_connection(key);
            return;
        case vsock_op::rw: {
            if (!c->established || c->guest_no_more_send) return reset_connection(*c);
            if (c->to_host.size() + hdr.len > config_.buffer_size)
                return reset_connection(*c); // beyond credit
            std::size_t start = c->to_host.size();
            c->to_host.resize(start + hdr.len);
            (void)reader.read(
                std::as_writable_bytes(std::span(c->to_host.data() + start, hdr.len)));
            write_to_host(c);
            watch_read(c); // its fwd_cnt may have opened our window
            return;
        }
        case vsock_op::credit_update:
            watch_read(c);
            return;
        case vsock_op::credit_request:
            c->credit_update_pending = true;
            watch_read(c);
            return;
        case vsock_op::shutdown:
            if (hdr.flags & vsock_shutdown_send) c->guest_no_more_send = true;
            if (hdr.flags & vsock_shutdown_receive) c->guest_no_more_receive = true;
            if (c->guest_no_more_send && c->guest_no_more_receive) {
                // The guest closed: finish writing what it sent if the socket takes it, then RST.
                write_to_host(c);
                c->rst_pending = true;
                c->from_host.clear();
                return;
            }
            write_to_host(c);
            return;
        default:
            return reset_connection(*c);
        }
    }

    void accept_request(const vsock_header& hdr) {
        auto l = listeners_.find(hdr.dst_port);
        if (l == listeners_.end() || connections_.size() >= config_.max_connections)
            return reply_rst(hdr);
        int pair[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) < 0)
            return reply_rst(hdr);
        auto c = make_connection(hdr.dst_port, hdr.src_port, pair[0]);
        c->peer_buf_alloc = hdr.buf_alloc;
        c->peer_fwd_cnt = hdr.fwd_cnt;
        c->established = true;
        c->response_pending = true;
        auto on_accept = l->second;
        boost::asio::post(executor_,
                          [on_accept, fd = pair[1], port = hdr.src_port] { on_accept(fd, port); });
        watch_read(c);
    }

    void reply_rst(const vsock_header& to) {
        if (to.op == vsock_op::rst) return;
        if (control_.size() >= 1024) return; // a flooding guest loses answers, not memory
        vsock_header h{};
        h.src_cid = vsock_host_cid;
        h.dst_cid = to.src_cid;
        h.src_port = to.dst_port;
        h.dst_port = to.src_port;
        h.type = vsock_type_stream;
        h.op = vsock_op::rst;
        control_.push_back(h);
    }

    void reset_connection(connection& c) {
        c.rst_pending = true;
        c.to_host.clear();
        c.from_host.clear();
        fail_connect(c, boost::system::errc::make_error_code(boost::system::errc::connection_reset));
    }

    // Guest -> host bytes into the socket; credit goes back as the socket takes them.
    void write_to_host(const std::shared_ptr<connection>& c) {
        while (!c->to_host.empty()) {
            ssize_t n = ::send(c->socket->native_handle(), c->to_host.data(), c->to_host.size(),
                               MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) {
                    watch_write(c);
                    return;
                }
                // The host end is gone: tell the guest nobody receives any more.
                c->to_host.clear();
                c->rst_pending = true;
                return;
            }
            c->to_host.erase(0, static_cast<std::size_t>(n));
            c->fwd_cnt += static_cast<std::uint32_t>(n);
        }
        // Advertise consumption in steps (every RW header carries it too); the guest is
        // never stuck: with a full window buffered here, draining crosses the step.
        if (c->fwd_cnt - c->fwd_cnt_sent >= config_.buffer_size / 4)
            c->credit_update_pending = true;
        if (c->guest_no_more_send && !c->write_shut) {
            ::shutdown(c->socket->native_handle(), SHUT_WR);
            c->write_shut = true;
        }
    }

    void watch_write(const std::shared_ptr<connection>& c) {
        if (c->writing) return;
        c->writing = true;
        c->socket->async_wait(boost::asio::posix::stream_descriptor::wait_write,
                              [weak = weak_from_this(), c](boost::system::error_code ec) {
                                  auto self = weak.lock();
                                  if (!self) return;
                                  std::lock_guard lock(self->mutex_);
                                  c->writing = false;
                                  if (ec || !self->alive(*c)) return;
                                  self->write_to_host(c);
                                  self->fill_rx();
                              });
    }

    // Host -> guest: read the socket while the guest has credit and we hold nothing unsent.
    void watch_read(const std::shared_ptr<connection>& c) {
        if (c->reading || !c->established || c->host_eof || c->guest_no_more_receive ||
            c->rst_pending)
            return;
        if (!c->from_host.empty() || c->peer_credit() == 0) return;
        c->reading = true;
        c->socket->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                              [weak = weak_from_this(), c](boost::system::error_code ec) {
                                  auto self = weak.lock();
                                  if (!self) return;
                                  std::lock_guard lock(self->mutex_);
                                  c->reading = false;
                                  if (ec || !self->alive(*c)) return;
                                  self->read_from_host(c);
                                  self->fill_rx();
                              });
    }

    void read_from_host(const std::shared_ptr<connection>& c) {
        std::size_t want = std::min<std::size_t>(c->peer_credit(), 64 * 1024);
        if (want == 0 || !c->from_host.empty()) return;
        c->from_host.resize(want);
        ssize_t n = ::recv(c->socket->native_handle(), c->from_host.data(), want, 0);
        if (n < 0) {
            c->from_host.clear();
            if (errno == EAGAIN) return watch_read(c);
            c->rst_pending = true;
            return;
        }
        c->from_host.resize(static_cast<std::size_t>(n));
        if (n == 0) {
            c->host_eof = true;
            c->shutdown_pending = true;
        }
    }

    bool alive(const connection& c) const {
        auto it = connections_.find(c.key);
        return active_ && it != connections_.end() && it->second.get() == &c;
    }

    /// Fills rx buffers with pending control packets and data, round-robin over connections.
    void fill_rx() {
        queue_binding& q = queues_[0];
        if (!q.queue) return;
        bool any = false;
        for (;;) {
            auto pending = q.queue->pending();
            if (!pending) return broken();
            if (pending.value() == 0) break;
            vsock_header h{};
            std::string_view payload;
            std::shared_ptr<connection> source;
            bool found = next_packet(h, payload, source);
            if (!found) break;
            auto popped = q.queue->pop();
            if (!popped) return broken();
            auto& entry = *popped.value();
            std::uint32_t written = 0;
            if (entry.chain) {
                chain_writer writer(entry.chain.value().writable());
                if (writer.remaining() >= sizeof h) {
                    std::size_t room = writer.remaining() - sizeof h;
                    std::size_t n = std::min(room, payload.size());
                    if (source && h.op == vsock_op::rw) {
                        h.len = static_cast<std::uint32_t>(n);
                        source->tx_cnt += static_cast<std::uint32_t>(n);
                    }
                    h.fwd_cnt = source ? source->fwd_cnt : 0;
                    if (source) source->fwd_cnt_sent = source->fwd_cnt;
                    (void)writer.write_object(h);
                    (void)writer.write(std::as_bytes(std::span(payload.data(), h.len)));
                    written = static_cast<std::uint32_t>(writer.written());
                    if (source && h.op == vsock_op::rw) source->from_host.erase(0, n);
                }
                // A buffer too small for a header is returned empty; the packet stays queued.
            }
            if (!q.queue->push_used(entry.head, written)) return broken();
            any = true;
            if (source && written) after_send(source, h);
        }
        if (any && q.queue->should_notify()) q.interrupt.used_buffer();
    }

    bool next_packet(vsock_header& h, std::string_view& payload,
                     std::shared_ptr<connection>& source) {
        if (!control_.empty()) {
            h = control_.front();
            control_.pop_front(); // (consumed even when the buffer turns out too small)
            return true;
        }
        // Round-robin from after the connection served last, so one busy stream cannot starve
        // others.
        std::vector<std::shared_ptr<connection>> order;
        order.reserve(connections_.size());
        for (auto it = connections_.upper_bound(last_served_); it != connections_.end(); ++it)
            order.push_back(it->second);
        for (auto it = connections_.begin(); it != connections_.end() && it->first <= last_served_;
             ++it)
            order.push_back(it->second);
        for (auto& c : order) {
            source = c;
            last_served_ = c->key;
            payload = {};
            if (c->rst_pending && c->to_host.empty()) {
                h = header_for(*c, vsock_op::rst);
                return true;
            }
            if (c->request_pending) {
                h = header_for(*c, vsock_op::request);
                return true;
            }
            if (c->response_pending) {
                h = header_for(*c, vsock_op::response);
                return true;
            }
            if (!c->established || c->rst_pending) continue;
            if (!c->from_host.empty() && c->peer_credit() > 0) {
                h = header_for(*c, vsock_op::rw);
                payload = std::string_view(c->from_host).substr(0, c->peer_credit());
                return true;
            }
            if (c->shutdown_pending && c->from_host.empty()) {
                h = header_for(*c, vsock_op::shutdown);
                h.flags = vsock_shutdown_send;
                return true;
            }
            if (c->credit_update_pending) {
                h = header_for(*c, vsock_op::credit_update);
                return true;
            }
        }
        source.reset();
        return false;
    }

    void after_send(const std::shared_ptr<connection>& c, const vsock_header& h) {
        switch (h.op) {
        case vsock_op::rst:
            erase_connection(c->key);
            return;
        case vsock_op::request:
            c->request_pending = false;
            return;
        case vsock_op::response:
            c->response_pending = false;
            return;
        case vsock_op::shutdown:
            c->shutdown_pending = false;
            return;
        case vsock_op::credit_update:
            c->credit_update_pending = false;
            return;
        case vsock_op::rw:
            c->credit_update_pending = false; // the header carried fwd_cnt
            if (c->from_host.empty()) watch_read(c);
            return;
        default:
            return;
        }
    }

    void deliver_event() {
        queue_binding& q = queues_[2];
        if (!event_pending_ || !q.queue) return;
        auto popped = q.queue->pop();
        if (!popped) return broken();
        if (!popped.value()) return; // no buffer yet: delivered on the next event-queue kick
        auto& entry = *popped.value();
        // A buffer shorter than the 4-byte event (or a broken chain) still takes the event:
        // it comes back with used length 0, which drivers ignore (Linux does).
        std::uint32_t written = 0;
        if (entry.chain) {
            chain_writer writer(entry.chain.value().writable());
            const std::uint32_t transport_reset_id = 0;
            if (writer.write_object(transport_reset_id)) written = 4;
        }
        event_pending_ = false;
        (void)complete_chain(q, entry.head, written);
    }

    config_type config_;
    queue_service service_;
    std::mutex mutex_; // everything below; taken after the queue_service lock in kick handlers
    bool active_ = false;
    std::array<queue_binding, 3> queues_{};
    boost::asio::any_io_executor executor_;
    std::function<void()> needs_reset_;
    std::map<key_type, std::shared_ptr<connection>> connections_;
    std::map<std::uint32_t, accept_handler> listeners_;
    std::deque<vsock_header> control_;
    key_type last_served_{0, 0};
    bool event_pending_ = false;
    std::uint32_t next_port_ = 1u << 30; // host-side ports for host-initiated connections
    std::uint64_t next_id_ = 0;
};

} // namespace detail

/// The virtio-vsock device core plus its host-side API.
class vsock {
public:
    using config = detail::vsock_impl::config_type;
    static constexpr device_type type = device_type::vsock;

    explicit vsock(const config& c)
        : impl_(std::make_shared<detail::vsock_impl>(c)) {}
    static result<std::unique_ptr<vsock>> create(const config& c) {
        if (c.guest_cid < 3 || c.guest_cid > 0xffffffffu || c.buffer_size < 4096)
            return errc::invalid_argument;
        return std::make_unique<vsock>(c);
    }
    ~vsock() { impl_->reset(); }

    std::uint64_t device_features() const noexcept { return common_features; }
    std::size_t queue_count() const noexcept { return 3; }
    std::uint32_t queue_max_size(std::size_t) const noexcept { return 256; }
    std::size_t config_size() const noexcept { return 8; }
    void read_config(std::uint32_t offset, std::span<std::byte> out) const noexcept {
        const std::uint64_t cid = impl_->guest_cid();
        read_config_bytes(std::as_bytes(std::span(&cid, 1)), offset, out);
    }
    void write_config(std::uint32_t, std::span<const std::byte>) noexcept {} // read-only
    result<void> activate(const activation& act) { return impl_->activate(act); }
    void reset() { impl_->reset(); }

    std::uint64_t guest_cid() const noexcept { return impl_->guest_cid(); }

    /// Connects to `guest_port` in the guest; completes with a connected Unix stream
    /// socket on `executor` (std::errc::connection_refused when nobody listens,
    /// errc::timeout when the guest does not answer).
    template <class Executor, class Token>
    auto async_connect(const Executor& executor, std::uint32_t guest_port, Token&& token) {
        using socket_type = boost::asio::local::stream_protocol::socket;
        return boost::asio::async_initiate<Token, void(error_code, socket_type)>(
            [impl = impl_, executor](auto handler, std::uint32_t port) {
                auto shared = std::make_shared<decltype(handler)>(std::move(handler));
                impl->connect(port, [shared, executor](error_code ec, int fd, std::uint32_t) {
                    socket_type socket(executor);
                    if (!ec) {
                        boost::system::error_code assign_error;
                        socket.assign(boost::asio::local::stream_protocol(), fd, assign_error);
                        if (assign_error) {
                            ::close(fd);
                            ec = error_code(assign_error.value(), boost::system::system_category());
                        }
                    }
                    auto ex = boost::asio::get_associated_executor(*shared, executor);
                    boost::asio::post(ex, [shared, ec, socket = std::move(socket)]() mutable {
                        (*shared)(ec, std::move(socket));
                    });
                });
            },
            token, guest_port);
    }

    /// Guest connections to `host_port` call on_accept(fd, guest_port) with the host end
    /// (owned by the callee), on the device's executor.
    result<void> listen(std::uint32_t host_port,
                        std::function<void(int, std::uint32_t)> on_accept) {
        return impl_->listen(host_port, std::move(on_accept));
    }
    void unlisten(std::uint32_t host_port) { impl_->unlisten(host_port); }

    /// The callback form of async_connect: done(error, fd, host_port) on the device's
    /// executor; the fd (host end) belongs to the callee.
    void connect(std::uint32_t guest_port,
                 std::function<void(error_code, int, std::uint32_t)> done) {
        impl_->connect(guest_port, std::move(done));
    }

    /// Quiesce for a snapshot keeping the connections (device.hpp: optional pause()).
    void pause() { impl_->pause(); }

    /// Drops every connection and queues VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (after a restore).
    void transport_reset() { impl_->transport_reset(); }
    std::size_t connection_count() const { return impl_->connection_count(); }

private:
    std::shared_ptr<detail::vsock_impl> impl_;
};

static_assert(device_core<vsock>);

/// Firecracker's host-side convention, for tools outside this process: a Unix
/// socket at `path`; a client writes "CONNECT <guest port>\n", gets
/// "OK <host port>\n" and then the stream (or the socket closes when the
/// guest refuses or the line is malformed). Bytes are spliced both ways with
/// bounded buffers (64 KiB per direction); half-closes pass through.
class vsock_unix_endpoint : public std::enable_shared_from_this<vsock_unix_endpoint> {
public:
    using protocol = boost::asio::local::stream_protocol;

    static result<std::shared_ptr<vsock_unix_endpoint>>
    create(boost::asio::any_io_executor executor, vsock& device, std::string path) {
        auto e = std::shared_ptr<vsock_unix_endpoint>(
            new vsock_unix_endpoint(executor, device, std::move(path)));
        boost::system::error_code ec;
        ::unlink(e->path_.c_str());
        e->acceptor_.open(protocol(), ec);
        if (!ec) e->acceptor_.bind(protocol::endpoint(e->path_), ec);
        if (!ec) e->acceptor_.listen(64, ec);
        if (ec) return error_code(ec.value(), boost::system::system_category());
        e->accept();
        return e;
    }
    ~vsock_unix_endpoint() { ::unlink(path_.c_str()); }
    void close() {
        boost::system::error_code ignored;
        acceptor_.close(ignored);
    }
    const std::string& path() const { return path_; }

private:
    vsock_unix_endpoint(boost::asio::any_io_executor executor, vsock& device, std::string path)
        : executor_(executor)
        , device_(device)
        , path_(std::move(path))
        , acceptor_(executor) {}

    struct session : std::enable_shared_from_this<session> {
        explicit session(protocol::socket s)
            : client(std::move(s))
            , guest(client.get_executor()) {}
        protocol::socket client, guest;
        std::string line;
        std::array<char, 65536> up{}, down{}; // client -> guest, guest -> client
        int open_directions = 2;

        void pump(protocol::socket& from, protocol::socket& to, std::array<char, 65536>& buffer) {
            from.async_read_some(
                boost::asio::buffer(buffer), [self = shared_from_this(), &from, &to, &buffer](
                                                 boost::system::error_code ec, std::size_t n) {
                    if (ec) {
                        boost::system::error_code ignored;
                        to.shutdown(protocol::socket::shutdown_send, ignored);
                        if (--self->open_directions == 0) self->finish();
                        return;
                    }
                    boost::asio::async_write(
                        to, boost::asio::buffer(buffer.data(), n),
                        [self, &from, &to, &buffer](boost::system::error_code ec, std::size_t) {
                            if (ec) return self->finish();
                            self->pump(from, to, buffer);
                        });
                });
        }
        void finish() {
            boost::system::error_code ignored;
            client.close(ignored);
            guest.close(ignored);
        }
    };

    void accept() {
        acceptor_.async_accept(
            [self = shared_from_this()](boost::system::error_code ec, protocol::socket socket) {
                if (ec) return; // closed
                auto s = std::make_shared<session>(std::move(socket));
                self->read_line(s);
                self->accept();
            });
    }

    void read_line(const std::shared_ptr<session>& s) {
        // "CONNECT 4294967295\n" is 19 bytes: a longer line is refused without reading it all.
        boost::asio::async_read_until(
            s->client, boost::asio::dynamic_buffer(s->line, 32), '\n',
            [self = shared_from_this(), s](boost::system::error_code ec, std::size_t n) {
                if (ec) return s->finish();
                std::string line = s->line.substr(0, n - 1);
                s->line.erase(0, n); // bytes after the line belong to the stream
                std::uint32_t port = 0;
                if (!parse_connect(line, port)) return s->finish();
                self->device_.connect(
                    port, [s](error_code ec, int fd, std::uint32_t host_port) {
                        if (ec) return s->finish();
                        boost::system::error_code assign_error;
                        s->guest.assign(protocol(), fd, assign_error);
                        if (assign_error) {
                            ::close(fd);
                            return s->finish();
                        }
                        auto reply =
                            std::make_shared<std::string>("OK " + std::to_string(host_port) + "\n");
                        boost::asio::async_write(
                            s->client, boost::asio::buffer(*reply),
                            [s, reply](boost::system::error_code ec, std::size_t) {
                                if (ec) return s->finish();
                                // Anything the client sent after its line goes first.
                                auto early = std::make_shared<std::string>(std::move(s->line));
                                boost::asio::async_write(
                                    s->guest, boost::asio::buffer(*early),
                                    [s, early](boost::system::error_code ec, std::size_t) {
                                        if (ec) return s->finish();
                                        s->pump(s->client, s->guest, s->up);
                                        s->pump(s->guest, s->client, s->down);
                                    });
                            });
                    });
            });
    }

    static bool parse_connect(const std::string& line, std::uint32_t& port) {
        static constexpr std::string_view prefix = "CONNECT ";
        if (line.size() <= prefix.size() || line.compare(0, prefix.size(), prefix) != 0)
            return false;
        std::uint64_t value = 0;
        for (std::size_t i = prefix.size(); i < line.size(); ++i) {
            char c = line[i];
            if (c == '\r' && i + 1 == line.size()) break;
            if (c < '0' || c > '9') return false;
            value = value * 10 + static_cast<unsigned>(c - '0');
            if (value > 0xffffffffu) return false;
        }
        port = static_cast<std::uint32_t>(value);
        return true;
    }

    boost::asio::any_io_executor executor_;
    vsock& device_;
    std::string path_;
    protocol::acceptor acceptor_;
};

} // namespace supermachine::virtio
