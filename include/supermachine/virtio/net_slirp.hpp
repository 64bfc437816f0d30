#pragma once
// A net_backend (virtio/net.hpp) on libslirp: user-mode NAT, no root, no host
// network configuration. The guest sees a 10.0.2.0/24 network (QEMU's
// `-netdev user` defaults): gateway 10.0.2.2 (the host; its loopback unless
// disable_host_loopback), DNS forwarder 10.0.2.3, DHCP from 10.0.2.15.
//
// Slirp has no thread of its own here: it runs on a strand of the executor
// the config names. Its timers are Asio steady_timers; its sockets are
// watched through one level-triggered epoll set wrapped in an Asio
// descriptor: each cycle asks slirp for the fds and events it wants
// (slirp_pollfds_fill), checks them with poll(2) without waiting, lets slirp
// handle what is ready (slirp_pollfds_poll), and only when nothing is ready
// waits on the epoll set and slirp's timeout. Frames from the guest are
// copied and posted to the strand (at most config::max_pending_frames in
// flight; more are refused, so the device counts them).
//
// Link with -lslirp (Debian: libslirp-dev; its pkg-config file wants glib's,
// which the header does not need).
#include <supermachine/error.hpp>
#include <supermachine/virtio/net.hpp>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <arpa/inet.h>
#include <poll.h>
#include <slirp/libslirp.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace supermachine::virtio {

namespace detail {

class slirp_stack : public std::enable_shared_from_this<slirp_stack> {
public:
    using strand_type = boost::asio::strand<boost::asio::any_io_executor>;

    explicit slirp_stack(boost::asio::any_io_executor executor)
        : strand_(boost::asio::make_strand(executor))
        , wake_(strand_)
        , timeout_(strand_) {}
    ~slirp_stack() {
        if (slirp_) ::slirp_cleanup(slirp_); // calls timer_free for its timers
    }

    struct forward {
        bool udp = false;
        in_addr host{}, guest{};
        std::uint16_t host_port = 0, guest_port = 0;
    };

    /// `forwards` are bound before any cycle runs (slirp is not thread-safe).
    result<void> start(const SlirpConfig& cfg, std::span<const forward> forwards = {}) {
        const int fd = ::epoll_create1(EPOLL_CLOEXEC);
        if (fd < 0) return errno_code(errno);
        boost::system::error_code ec;
        wake_.assign(fd, ec);
        if (ec) {
            ::close(fd);
            return error_code(ec.value(), boost::system::system_category());
        }
        epoll_fd_ = fd;
        static const SlirpCb callbacks = make_callbacks();
        slirp_ = ::slirp_new(&cfg, &callbacks, this);
        if (!slirp_) return errc::invalid_argument;
        for (const auto& f : forwards)
            if (::slirp_add_hostfwd(slirp_, f.udp, f.host, f.host_port, f.guest, f.guest_port) <
                0) {
                // slirp says only -1: the bind (or listen) failed, e.g. the port is taken.
                return errno_code(EADDRINUSE);
            }
        schedule();
        return success();
    }

    void set_sink(net_frame_sink sink) {
        std::lock_guard lock(sink_mutex_);
        sink_ = std::move(sink);
    }

    /// From the device: the frame is copied; slirp sees it on the strand.
    bool input(std::span<const std::byte> frame, std::size_t max_pending) {
        if (pending_.fetch_add(1, std::memory_order_acq_rel) >= max_pending) {
            pending_.fetch_sub(1, std::memory_order_acq_rel);
            return false;
        }
        boost::asio::post(strand_, [self = shared_from_this(),
                                    copy = std::vector<std::byte>(frame.begin(), frame.end())] {
            self->pending_.fetch_sub(1, std::memory_order_acq_rel);
            if (!self->slirp_ || self->closed_) return;
            ::slirp_input(self->slirp_, reinterpret_cast<const std::uint8_t*>(copy.data()),
                          static_cast<int>(copy.size()));
            self->schedule(); // the frame may have opened a socket
        });
        return true;
    }

    /// The strand slirp runs on: a caller already on it may use
    /// input_on_strand (no copy, no post) and schedule() once per batch.
    const strand_type& strand() const noexcept { return strand_; }

    /// On the strand only: slirp takes (copies) the frame now.
    void input_on_strand(std::span<const std::byte> frame) {
        if (!slirp_ || closed_) return;
        ::slirp_input(slirp_, reinterpret_cast<const std::uint8_t*>(frame.data()),
                      static_cast<int>(frame.size()));
    }

    /// Run a cycle soon, once however many ask (on or off the strand).
    void schedule() {
        if (scheduled_.exchange(true, std::memory_order_acq_rel)) return;
        boost::asio::post(strand_, [self = shared_from_this()] {
            self->scheduled_.store(false, std::memory_order_release);
            self->cycle();
        });
    }

    /// Stop on the strand: no callback into the sink after this runs.
    void close() {
        {
            std::lock_guard lock(sink_mutex_);
            sink_ = nullptr;
        }
        boost::asio::post(strand_, [self = shared_from_this()] {
            self->closed_ = true;
            boost::system::error_code ignored;
            self->timeout_.cancel();
            self->wake_.close(ignored);
            for (auto& [t, s] : self->timers_)
                s->timer.cancel();
            if (self->slirp_) ::slirp_cleanup(std::exchange(self->slirp_, nullptr));
        });
    }

private:
    struct timer_state {
        explicit timer_state(const strand_type& s)
            : timer(s) {}
        boost::asio::steady_timer timer;
        SlirpTimerCb callback = nullptr; // timer_new
        SlirpTimerId id{};               // timer_new_opaque
        void* cb_opaque = nullptr;
        bool opaque_form = false;
    };

    static SlirpCb make_callbacks() {
        SlirpCb cb{};
        cb.send_packet = [](const void* buf, std::size_t len, void* opaque) -> ssize_t {
            auto* self = static_cast<slirp_stack*>(opaque);
            net_frame_sink sink;
            {
                std::lock_guard lock(self->sink_mutex_);
                sink = self->sink_;
            }
            if (sink) sink(std::span(static_cast<const std::byte*>(buf), len));
            return static_cast<ssize_t>(len);
        };
        cb.guest_error = [](const char*, void*) {}; // counted by the device where it can tell
        cb.clock_get_ns = [](void*) -> std::int64_t {
            return std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::steady_clock::now().time_since_epoch())
                .count();
        };
        cb.timer_new = [](SlirpTimerCb callback, void* cb_opaque, void* opaque) -> void* {
            auto* self = static_cast<slirp_stack*>(opaque);
            auto t = std::make_unique<timer_state>(self->strand_);
            t->callback = callback;
            t->cb_opaque = cb_opaque;
            void* key = t.get();
            self->timers_.emplace(key, std::move(t));
            return key;
        };
        cb.timer_new_opaque = [](SlirpTimerId id, void* cb_opaque, void* opaque) -> void* {
            auto* self = static_cast<slirp_stack*>(opaque);
            auto t = std::make_unique<timer_state>(self->strand_);
            t->id = id;
            t->cb_opaque = cb_opaque;
            t->opaque_form = true;
            void* key = t.get();
            self->timers_.emplace(key, std::move(t));
            return key;
        };
        cb.timer_free = [](void* timer, void* opaque) {
            auto* self = static_cast<slirp_stack*>(opaque);
            self->timers_.erase(timer); // cancels a pending wait (its handler sees it gone)
        };
        cb.timer_mod = [](void* timer, std::int64_t expire_ms, void* opaque) {
            auto* self = static_cast<slirp_stack*>(opaque);
            auto it = self->timers_.find(timer);
            if (it == self->timers_.end()) return;
            // expire_ms is on clock_get_ns's clock (steady_clock), in milliseconds.
            it->second->timer.expires_at(std::chrono::steady_clock::time_point(
                std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                    std::chrono::milliseconds(expire_ms))));
            it->second->timer.async_wait(
                [weak = self->weak_from_this(), timer](boost::system::error_code ec) {
                    if (ec) return;
                    auto self = weak.lock();
                    if (!self || !self->slirp_ || self->closed_) return;
                    auto it = self->timers_.find(timer);
                    if (it == self->timers_.end()) return;
                    if (it->second->opaque_form)
                        ::slirp_handle_timer(self->slirp_, it->second->id, it->second->cb_opaque);
                    else
                        it->second->callback(it->second->cb_opaque);
                    self->schedule();
                });
        };
        cb.register_poll_fd = [](int, void*) {};   // each cycle asks slirp for its fds
        cb.unregister_poll_fd = [](int, void*) {}; // a closed fd leaves the epoll set itself
        cb.notify = [](void* opaque) { static_cast<slirp_stack*>(opaque)->schedule(); };
        return cb;
    }

    void cycle() {
        if (!slirp_ || closed_) return;
        ++generation_;
        boost::system::error_code ignored;
        wake_.cancel(ignored); // the previous cycle's wait, if still pending
        std::uint32_t timeout_ms = 1000;
        // Handle whatever is ready now; bounded, then yield to the executor.
        for (int round = 0;; ++round) {
            pollfds_.clear();
            timeout_ms = 1000;
            ::slirp_pollfds_fill(slirp_, &timeout_ms, &add_poll, this);
            const int ready = ::poll(pollfds_.data(), pollfds_.size(), 0);
            if (ready == 0 && timeout_ms > 0) break;
            ::slirp_pollfds_poll(slirp_, ready < 0, &get_revents, this);
            if (round == 16) return schedule();
        }
        watch(timeout_ms);
    }

    /// Nothing ready: wait for any of the fds slirp asked about, or its timeout.
    void watch(std::uint32_t timeout_ms) {
        std::set<int> now;
        for (const auto& p : pollfds_) {
            epoll_event ev{};
            ev.events = ((p.events & POLLIN) ? EPOLLIN : 0u) |
                        ((p.events & POLLOUT) ? EPOLLOUT : 0u) |
                        ((p.events & POLLPRI) ? EPOLLPRI : 0u);
            ev.data.fd = p.fd;
            if (::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, p.fd, &ev) < 0 && errno == ENOENT)
                ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, p.fd, &ev);
            now.insert(p.fd);
        }
        for (int fd : watched_)
            if (!now.count(fd)) ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
        watched_ = std::move(now);
        const std::uint64_t generation = generation_;
        auto again = [weak = weak_from_this(), generation](boost::system::error_code ec) {
            if (ec) return;
            if (auto self = weak.lock())
                if (self->generation_ == generation) self->schedule();
        };
        wake_.async_wait(boost::asio::posix::stream_descriptor::wait_read, again);
        timeout_.expires_after(std::chrono::milliseconds(timeout_ms));
        timeout_.async_wait(again);
    }

    static int add_poll(int fd, int events, void* opaque) {
        auto* self = static_cast<slirp_stack*>(opaque);
        short e = 0;
        if (events & SLIRP_POLL_IN) e |= POLLIN;
        if (events & SLIRP_POLL_OUT) e |= POLLOUT;
        if (events & SLIRP_POLL_PRI) e |= POLLPRI;
        self->pollfds_.push_back({fd, e, 0});
        return static_cast<int>(self->pollfds_.size() - 1);
    }
    static int get_revents(int index, void* opaque) {
        auto* self = static_cast<slirp_stack*>(opaque);
        if (index < 0 || static_cast<std::size_t>(index) >= self->pollfds_.size()) return 0;
        const short r = self->pollfds_[static_cast<std::size_t>(index)].revents;
        int e = 0;
        if (r & POLLIN) e |= SLIRP_POLL_IN;
        if (r & POLLOUT) e |= SLIRP_POLL_OUT;
        if (r & POLLPRI) e |= SLIRP_POLL_PRI;
        if (r & POLLERR) e |= SLIRP_POLL_ERR;
        if (r & POLLHUP) e |= SLIRP_POLL_HUP;
        return e;
    }

    strand_type strand_;
    boost::asio::posix::stream_descriptor wake_; // the epoll set, readable when an fd is ready
    boost::asio::steady_timer timeout_;
    int epoll_fd_ = -1; // owned by wake_
    Slirp* slirp_ = nullptr;
    bool closed_ = false;
    std::uint64_t generation_ = 0;
    std::atomic<bool> scheduled_{false};
    std::atomic<std::size_t> pending_{0};
    std::vector<pollfd> pollfds_;
    std::set<int> watched_;
    std::map<void*, std::unique_ptr<timer_state>> timers_;
    std::mutex sink_mutex_;
    net_frame_sink sink_;
};

} // namespace detail

class net_slirp {
public:
    struct config {
        boost::asio::any_io_executor executor; // slirp runs on a strand of it (required)
        std::string network = "10.0.2.0", netmask = "255.255.255.0", host = "10.0.2.2",
                    dhcp_start = "10.0.2.15", dns = "10.0.2.3";
        std::string hostname;               // offered by DHCP when not empty
        bool restricted = false;            // true: the guest reaches only the host-side services
        bool disable_host_loopback = false; // true: 10.0.2.2 does not reach 127.0.0.1
        bool disable_dhcp = false;
        std::size_t mtu = 1500;
        std::size_t max_pending_frames = 1024; // guest frames posted to slirp, not yet taken
        /// Host ports forwarded to the guest (docker's -p): host_address
        /// "0.0.0.0" is every interface; the guest end is dhcp_start.
        struct port_forward {
            bool udp = false;
            std::string host_address = "0.0.0.0";
            std::uint16_t host_port = 0, guest_port = 0;
        };
        std::vector<port_forward> forwards;
    };

    static result<std::unique_ptr<net_slirp>> create(const config& c) {
        if (!c.executor || c.mtu < 68 || c.mtu > 65521 || c.max_pending_frames == 0)
            return errc::invalid_argument;
        SlirpConfig cfg{};
        cfg.version = 4;
        cfg.restricted = c.restricted;
        cfg.in_enabled = true;
        if (!parse(c.network, cfg.vnetwork) || !parse(c.netmask, cfg.vnetmask) ||
            !parse(c.host, cfg.vhost) || !parse(c.dhcp_start, cfg.vdhcp_start) ||
            !parse(c.dns, cfg.vnameserver))
            return errc::invalid_argument;
        cfg.in6_enabled = false;
        cfg.if_mtu = c.mtu;
        cfg.if_mru = c.mtu;
        cfg.disable_host_loopback = c.disable_host_loopback;
        cfg.disable_dhcp = c.disable_dhcp;
        auto b = std::unique_ptr<net_slirp>(new net_slirp(c));
        if (!c.hostname.empty()) cfg.vhostname = b->config_.hostname.c_str();
        std::vector<detail::slirp_stack::forward> forwards;
        for (const auto& f : c.forwards) {
            detail::slirp_stack::forward out;
            out.udp = f.udp;
            out.host_port = f.host_port;
            out.guest_port = f.guest_port;
            out.guest = cfg.vdhcp_start;
            if (f.guest_port == 0 || !parse(f.host_address, out.host))
                return errc::invalid_argument;
            forwards.push_back(out);
        }
        SUPERMACHINE_TRY(b->stack_->start(cfg, forwards));
        return b;
    }
    ~net_slirp() { stack_->close(); }

    void attach(net_frame_sink sink) { stack_->set_sink(std::move(sink)); }
    /// The stack behind (its strand, input_on_strand): for a frame source
    /// that runs on slirp's strand itself (detail/qemu_network.hpp).
    detail::slirp_stack& stack() noexcept { return *stack_; }
    bool send(std::span<const std::byte> frame) {
        return stack_->input(frame, config_.max_pending_frames);
    }

private:
    explicit net_slirp(const config& c)
        : config_(c)
        , stack_(std::make_shared<detail::slirp_stack>(c.executor)) {}
    static bool parse(const std::string& text, in_addr& out) {
        return ::inet_pton(AF_INET, text.c_str(), &out) == 1;
    }

    config config_;
    std::shared_ptr<detail::slirp_stack> stack_;
};

static_assert(net_backend<net_slirp>);

} // namespace supermachine::virtio
