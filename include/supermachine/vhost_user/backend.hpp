#pragma once
// The vhost-user back-end: serves one virtio device core to a front-end VMM
// (QEMU, Cloud Hypervisor) over a Unix socket.
//
// Two layers:
//  - backend<Device>::handle(message&): the protocol state machine, one
//    validated message in, the reply bytes out (empty when none is due). It
//    maps the memory table, translates and checks ring addresses, owns the
//    kick/call fds and starts/stops rings. Out-of-order or hostile requests
//    give an error, never a crash; no socket needed (tests, fuzzing).
//  - backend<Device>::async_serve(socket, token): reads messages (with their
//    SCM_RIGHTS fds) from a connected front-end, runs handle() and writes
//    replies, until the front-end disconnects or misbehaves.
//
// The device is any virtio::device_core (blk with any storage policy, rng,
// vsock...). vhost-user has no DRIVER_OK: the core is activated with the
// rings that are started (kick fd given) and enabled, and re-activated
// (reset, then activate) whenever that set, a call fd or the memory table
// changes; GET_VRING_BASE resets it (draining in-flight requests) before it
// reports the ring position. The core waits for kicks with Asio on the
// backend's executor (virtio::queue_service), exactly as with ioeventfds,
// and raises the call eventfd.
//
// Error policy: a message that breaks framing (bad header, size or fd count)
// ends the session. A well-formed message we cannot honour is answered with
// a failure ack when the front-end asked for one (REPLY_ACK); without that,
// requests we simply do not implement are ignored, and any other failure
// ends the session, because the front-end would otherwise run on with a
// device in a state it does not know about.
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/device.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/vhost_user/detail/memory_map.hpp>
#include <supermachine/vhost_user/message.hpp>
#include <supermachine/virtio/device.hpp>
#include <supermachine/virtio/virtqueue.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace supermachine::vhost_user {

/// The largest ring a front-end may ask for regardless of the core's
/// queue_max_size(): vhost-user cannot tell the front-end our maximum, and
/// QEMU's virtio-mmio always offers the driver 1024 (VIRTQUEUE_MAX_SIZE).
inline constexpr std::uint32_t front_end_queue_size = 1024;

/// Protocol features this back-end implements.
/// LOG_SHMFD (with VHOST_F_LOG_ALL) because QEMU blocks migration without
/// it; the log is only accepted, never written: logging is refused while
/// rings run (see SET_FEATURES), so only a paused guest can be migrated.
inline constexpr std::uint64_t supported_protocol_features =
    protocol_feature::multiqueue | protocol_feature::reply_ack | protocol_feature::config |
    protocol_feature::log_shmfd;

template <virtio::device_core Device>
class backend {
public:
    using executor_type = boost::asio::any_io_executor;

    /// Serve `device` (which must outlive the backend) on `executor`: the
    /// core's async work and the protocol both run there.
    backend(executor_type executor, Device& device)
        : executor_(std::move(executor))
        , device_(device)
        , rings_(device.queue_count())
        , bindings_(device.queue_count()) {}
    backend(const backend&) = delete;
    backend& operator=(const backend&) = delete;
    ~backend() { stop(); }

    executor_type get_executor() const noexcept { return executor_; }

    /// Guest memory as the front-end shared it (empty before SET_MEM_TABLE).
    const guest_memory& memory() const noexcept { return memory_.memory(); }
    std::uint64_t acked_features() const noexcept { return features_; }
    std::uint64_t acked_protocol_features() const noexcept { return protocol_features_; }
    bool ring_started(std::uint32_t index) const noexcept {
        return index < rings_.size() && rings_[index].started;
    }
    bool ring_enabled(std::uint32_t index) const noexcept {
        return index < rings_.size() && rings_[index].enabled;
    }
    /// Whether the core is activated (serving at least one ring).
    bool active() const noexcept { return active_; }
    /// The core reported a broken ring (needs_reset) since the last reset.
    bool device_broken() const noexcept { return broken_->load(); }

    /// Deactivate the core and forget the session (a disconnect, or
    /// shutdown): a new front-end connection starts from scratch.
    void stop() noexcept {
        reset();
        owner_ = false;
        protocol_features_ = 0;
        memory_ = detail::memory_map{};
        log_.reset();
        log_event_.reset();
    }

    /// One protocol step. `m` must have passed validate(); its fds are
    /// consumed. Returns the reply bytes to send (maybe empty).
    result<std::vector<std::byte>> handle(message& m) {
        auto r = dispatch(m);
        if (!r) return r.error();
        if (!r.value().empty()) return std::move(r).value();
        if (failure_is_acked(m)) return encode_reply(m.request(), u64_bytes(0));
        return std::vector<std::byte>{};
    }

    /// Whether a failure of `m` is answered with a failure ack (else the
    /// session ends, or an unsupported request is ignored; see top).
    bool failure_is_acked(const message& m) const noexcept {
        return m.needs_reply() && (protocol_features_ & protocol_feature::reply_ack) &&
               !has_inherent_reply(m.request(), protocol_features_);
    }

    /// Serve a connected front-end until it disconnects (completes with
    /// vhost_user_disconnected) or a fatal protocol error; the core is
    /// deactivated either way. Signature void(error_code). The backend
    /// must outlive the operation.
    template <class CompletionToken>
    auto async_serve(boost::asio::local::stream_protocol::socket socket, CompletionToken&& token) {
        return boost::asio::async_initiate<CompletionToken, void(error_code)>(
            [this](auto handler, boost::asio::local::stream_protocol::socket s) {
                auto shared = std::make_shared<decltype(handler)>(std::move(handler));
                auto c = std::make_shared<connection>(*this, std::move(s),
                                                      [this, shared](error_code ec) {
                                                          stop();
                                                          std::move (*shared)(ec);
                                                      });
                c->start();
            },
            token, std::move(socket));
    }

private:
    struct ring_state {
        std::uint32_t num = 0;
        std::optional<vring_address> address; // as the front-end gave it (user addresses)
        virtio::queue_layout layout;          // guest-physical, valid when address is set
        std::uint16_t base = 0;               // SET_VRING_BASE: next available index
        bool started = false;                 // kick fd given (and not stopped since)
        bool enabled = false;
        std::optional<virtio::virtqueue> queue; // while started
        supermachine::detail::unique_fd kick;
        supermachine::detail::unique_fd call;
        supermachine::detail::unique_fd error;
    };

    // ---- the state machine ----

    result<std::vector<std::byte>> dispatch(message& m) {
        const auto req = m.request();
        switch (req) {
        case request::get_features:
            return encode_reply(req, u64_bytes(offered_features()));
        case request::set_features: {
            const auto f = parse_u64(m);
            if (f & ~offered_features()) return errc::invalid_argument;
            // Dirty logging is offered so that QEMU can snapshot a paused guest
            // (rings stopped: nothing to log); while rings run we cannot log
            // the core's writes, so live migration is refused here.
            if ((f & log_all_bit) && active_) return errc::not_supported;
            if (active_ && f != features_) return errc::vhost_user_unexpected_message;
            features_ = f;
            features_set_ = true;
            return std::vector<std::byte>{};
        }
        case request::get_protocol_features:
            return encode_reply(req, u64_bytes(supported_protocol_features));
        case request::set_protocol_features: {
            const auto f = parse_u64(m);
            if (f & ~supported_protocol_features) return errc::invalid_argument;
            protocol_features_ = f;
            return std::vector<std::byte>{};
        }
        case request::set_owner:
            if (owner_) return errc::vhost_user_unexpected_message;
            owner_ = true;
            return std::vector<std::byte>{};
        case request::reset_owner:
        case request::reset_device:
            reset();
            return std::vector<std::byte>{};
        case request::get_queue_num:
            return encode_reply(req, u64_bytes(rings_.size()));
        case request::set_mem_table:
            return set_mem_table(m);
        case request::set_vring_num: {
            const auto s = parse_vring_state(m);
            SUPERMACHINE_TRY(ring_pointer, configurable_ring(s.index));
            auto& r = *ring_pointer;
            const std::uint32_t limit = std::max<std::uint32_t>(
                front_end_queue_size, static_cast<std::uint32_t>(device_.queue_max_size(s.index)));
            if (s.num == 0 || s.num > limit || s.num > virtio::max_queue_size ||
                !std::has_single_bit(s.num))
                return errc::invalid_argument;
            r.num = s.num;
            if (r.address) {
                SUPERMACHINE_TRY(translate(r));
            }
            return std::vector<std::byte>{};
        }
        case request::set_vring_addr: {
            const auto a = parse_vring_address(m);
            SUPERMACHINE_TRY(ring_pointer, configurable_ring(a.index));
            auto& r = *ring_pointer;
            if (!memory_mapped()) return errc::vhost_user_unexpected_message;
            if (a.flags & ~1u) return errc::invalid_argument;
            if (a.flags & 1u) return errc::not_supported; // dirty logging: F_LOG_ALL never offered
            const auto previous = r.address;
            r.address = a;
            if (auto t = translate(r); !t) {
                r.address = previous;
                return t.error();
            }
            return std::vector<std::byte>{};
        }
        case request::set_vring_base: {
            const auto s = parse_vring_state(m);
            SUPERMACHINE_TRY(ring_pointer, configurable_ring(s.index));
            auto& r = *ring_pointer;
            if (s.num > 0xffff) return errc::invalid_argument;
            r.base = static_cast<std::uint16_t>(s.num);
            return std::vector<std::byte>{};
        }
        case request::get_vring_base: {
            const auto s = parse_vring_state(m);
            SUPERMACHINE_TRY(ring_pointer, ring_at(s.index));
            auto& r = *ring_pointer;
            // Reset drains: requests taken from the ring are finished first,
            // so the reported position loses none.
            deactivate();
            const std::uint16_t position = r.queue ? r.queue->position().next_available : r.base;
            r.base = position;
            r.started = false;
            r.queue.reset();
            r.kick.reset();
            schedule_activation(); // the other rings keep running
            return encode_reply(req, vring_state_bytes({s.index, position}));
        }
        case request::set_vring_kick: {
            const auto f = parse_vring_file(m);
            SUPERMACHINE_TRY(ring_pointer, ring_at(f.index));
            auto& r = *ring_pointer;
            if (f.no_fd) return errc::not_supported; // polling mode
            if (!owner_ || !memory_mapped() || !r.address || r.num == 0)
                return errc::vhost_user_unexpected_message;
            return start_ring(r, std::move(m.fds.front()));
        }
        case request::set_vring_call:
        case request::set_vring_err: {
            const auto f = parse_vring_file(m);
            SUPERMACHINE_TRY(ring_pointer, ring_at(f.index));
            auto& r = *ring_pointer;
            if (req == request::set_vring_call && active_) {
                // The core holds the old fd number: stop it before that fd closes.
                deactivate();
                schedule_activation();
            }
            auto& slot = req == request::set_vring_call ? r.call : r.error;
            slot = f.no_fd ? supermachine::detail::unique_fd{} : std::move(m.fds.front());
            return std::vector<std::byte>{};
        }
        case request::set_vring_enable: {
            const auto s = parse_vring_state(m);
            SUPERMACHINE_TRY(ring_pointer, ring_at(s.index));
            auto& r = *ring_pointer;
            if (!features_set_ || !(features_ & protocol_features_bit))
                return errc::vhost_user_unexpected_message; // only meaningful with protocol
                                                            // features
            if (s.num > 1) return errc::invalid_argument;
            if (r.enabled != (s.num == 1)) {
                r.enabled = s.num == 1;
                schedule_activation();
            }
            return std::vector<std::byte>{};
        }
        case request::get_config: {
            if (!(protocol_features_ & protocol_feature::config))
                return errc::vhost_user_unexpected_message;
            const auto c = parse_config(m);
            if (c.offset > max_config_size || c.size > max_config_size - c.offset)
                return errc::invalid_argument;
            std::array<std::byte, max_config_size> data{};
            device_.read_config(c.offset, std::span(data).first(c.size));
            return encode_reply(req,
                                config_bytes(c.offset, c.flags, std::span(data).first(c.size)));
        }
        case request::set_config: {
            if (!(protocol_features_ & protocol_feature::config))
                return errc::vhost_user_unexpected_message;
            const auto c = parse_config(m);
            if (c.offset > max_config_size || c.size > max_config_size - c.offset)
                return errc::invalid_argument;
            device_.write_config(c.offset, c.data);
            return std::vector<std::byte>{};
        }
        case request::set_log_base:
            if (!(protocol_features_ & protocol_feature::log_shmfd))
                return errc::vhost_user_unexpected_message;
            log_ = std::move(m.fds.front()); // kept for the session, never written (see top)
            return encode_reply(req, u64_bytes(0));
        case request::set_log_fd:
            log_event_ = std::move(m.fds.front());
            return std::vector<std::byte>{};
        default:
            // Known requests for features we never offer, and unknown ones.
            return errc::not_supported;
        }
    }

    std::uint64_t offered_features() const noexcept {
        return device_.device_features() | protocol_features_bit | log_all_bit;
    }
    bool memory_mapped() const noexcept { return !memory_.regions().empty(); }

    result<ring_state*> ring_at(std::uint32_t index) noexcept {
        if (index >= rings_.size()) return errc::invalid_argument;
        return &rings_[index];
    }
    result<ring_state*> configurable_ring(std::uint32_t index) noexcept {
        if (!owner_) return errc::vhost_user_unexpected_message;
        SUPERMACHINE_TRY(ring_pointer, ring_at(index));
        if (ring_pointer->started)
            return errc::vhost_user_unexpected_message; // stop it first (GET_VRING_BASE)
        return ring_pointer;
    }

    /// User addresses → guest-physical, with alignment checked and, once the
    /// size is known, the ring's whole extent inside guest memory.
    result<void> translate(ring_state& r) {
        const auto& a = *r.address;
        if (a.descriptor % 16 || a.available % 2 || a.used % 4) return errc::invalid_argument;
        const std::uint32_t n = r.num ? r.num : 1; // without a size yet, check one entry
        auto d = memory_.user_to_guest(a.descriptor, virtio::virtqueue::descriptor_table_bytes(n));
        auto av = memory_.user_to_guest(a.available, virtio::virtqueue::available_ring_bytes(n));
        auto u = memory_.user_to_guest(a.used, virtio::virtqueue::used_ring_bytes(n));
        if (!d || !av || !u) return errc::address_out_of_range;
        r.layout = {r.num, *d, *av, *u};
        return success();
    }

    result<std::vector<std::byte>> set_mem_table(message& m) {
        if (!owner_) return errc::vhost_user_unexpected_message;
        const auto table = parse_memory_table(m);
        SUPERMACHINE_TRY(map, detail::memory_map::create(table, m.fds));
        m.fds.clear(); // mapped; the fds themselves are not needed any more
        // Queues point into the old mappings: stop the core and remember the
        // positions, swap (unmapping the old), then rebuild each queue over
        // the new table from its user addresses, or stop it if it no longer fits.
        deactivate();
        for (auto& r : rings_)
            if (r.queue) {
                positions_hint(r) = r.queue->position();
                r.queue.reset();
            }
        memory_ = std::move(map);
        for (auto& r : rings_) {
            if (!r.address) continue;
            if (!translate(r)) {
                r.address.reset();
                r.started = false;
                continue;
            }
            if (r.started && !make_queue(r, positions_hint(r))) r.started = false;
        }
        schedule_activation();
        return std::vector<std::byte>{};
    }

    virtio::queue_position& positions_hint(ring_state& r) {
        return saved_positions_[static_cast<std::size_t>(&r - rings_.data())];
    }

    result<void> make_queue(ring_state& r, virtio::queue_position position) {
        SUPERMACHINE_TRY(
            q, virtio::virtqueue::create(memory_.memory(), r.layout, features_, position));
        r.queue.emplace(std::move(q));
        return success();
    }

    result<std::vector<std::byte>> start_ring(ring_state& r, supermachine::detail::unique_fd kick) {
        if (r.started) { // a new kick fd for a running ring: rebind
            deactivate();
            r.kick = std::move(kick);
            schedule_activation();
            return std::vector<std::byte>{};
        }
        if (features_ & log_all_bit) return errc::not_supported; // see SET_FEATURES
        SUPERMACHINE_TRY(translate(r));
        // The driver's used index from the ring itself: after a migration or a
        // reconnect it need not equal the base.
        SUPERMACHINE_TRY(used, virtio::virtqueue::read_used_index(memory_.memory(), r.layout));
        virtio::queue_position position;
        position.next_available = r.base;
        position.next_used = used;
        SUPERMACHINE_TRY(make_queue(r, position));
        r.kick = std::move(kick);
        r.started = true;
        if (!(features_ & protocol_features_bit)) r.enabled = true; // spec: enabled from the start
        schedule_activation();
        return std::vector<std::byte>{};
    }

    void reset() noexcept {
        deactivate();
        for (auto& r : rings_)
            r = ring_state{};
        features_ = 0;
        features_set_ = false;
        // Protocol features and the memory table survive RESET_DEVICE.
    }

    // ---- activation of the core ----

    void deactivate() noexcept {
        ++activation_generation_;
        if (!active_) return;
        device_.reset(); // synchronous: drains, then never touches the queues again
        active_ = false;
        for (auto& b : bindings_)
            b = {};
    }

    /// Re-activate soon, on the executor: several ring messages in a row
    /// (QEMU sends all KICKs, then all ENABLEs) coalesce into one activation.
    void schedule_activation() {
        const std::uint64_t generation = ++activation_generation_;
        boost::asio::post(executor_, [this, alive = std::weak_ptr<int>(alive_), generation] {
            if (alive.expired() || generation != activation_generation_) return;
            activate_now();
        });
    }

    void activate_now() {
        deactivate();
        bool any = false;
        for (std::size_t i = 0; i < rings_.size(); ++i) {
            auto& r = rings_[i];
            if (!(r.started && r.enabled && r.queue)) continue;
            bindings_[i] = {&*r.queue, r.kick.get(),
                            virtio::interrupt_sink(interrupt_line(r.call.get()))};
            any = true;
        }
        if (!any) return;
        broken_->store(false);
        const virtio::activation act{
            memory_.memory(), executor_, features_,
            bindings_,        {},        [broken = broken_] { broken->store(true); }};
        if (auto a = device_.activate(act); !a) {
            for (auto& b : bindings_)
                b = {};
            broken_->store(true);
            return;
        }
        active_ = true;
    }

    // ---- the socket side ----

    /// SUPERMACHINE_VHOST_TRACE=1: one stderr line per request (diagnosing front-ends).
    static void trace(const message& m, error_code ec) {
        static const bool enabled = std::getenv("SUPERMACHINE_VHOST_TRACE") != nullptr;
        if (!enabled) return;
        std::uint64_t first = 0;
        std::memcpy(&first, m.payload_storage.data(), sizeof first);
        std::fprintf(stderr,
                     "vhost-user: request %u size %u fds %zu flags %#x payload %#llx -> %s\n",
                     m.head.request, m.head.size, m.fds.size(), m.head.flags,
                     static_cast<unsigned long long>(first), ec ? ec.message().c_str() : "ok");
    }

    /// One front-end connection: read a message (header, then payload, fds
    /// from any chunk), handle it, write the reply, repeat. Callback-style
    /// (not C++20 coroutines) so the header builds with every compiler
    /// Asio 1.74 supports.
    class connection : public std::enable_shared_from_this<connection> {
    public:
        connection(backend& owner, boost::asio::local::stream_protocol::socket socket,
                   std::function<void(error_code)> done)
            : owner_(owner)
            , socket_(std::move(socket))
            , done_(std::move(done)) {}

        void start() {
            boost::system::error_code ignored;
            socket_.non_blocking(true, ignored);
            read_header();
        }

    private:
        void read_header() {
            message_ = std::make_unique<message>();
            reading_payload_ = false;
            target_ = head_;
            filled_ = 0;
            pump();
        }

        /// Read until the current target is full, waiting with Asio when the socket is empty.
        void pump() {
            for (;;) {
                if (filled_ == target_.size()) {
                    if (!reading_payload_) {
                        auto h = decode_header(head_);
                        if (!h) return finish(h.error());
                        message_->head = h.value();
                        reading_payload_ = true;
                        target_ = std::span(message_->payload_storage).first(message_->head.size);
                        filled_ = 0;
                        continue;
                    }
                    return process();
                }
                alignas(cmsghdr) char control[CMSG_SPACE(max_fds * sizeof(int))];
                iovec io{target_.data() + filled_, target_.size() - filled_};
                msghdr msg{};
                msg.msg_iov = &io;
                msg.msg_iovlen = 1;
                msg.msg_control = control;
                msg.msg_controllen = sizeof control;
                const ssize_t n =
                    ::recvmsg(socket_.native_handle(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
                if (n < 0 && errno == EINTR) continue;
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                    socket_.async_wait(
                        boost::asio::socket_base::wait_read,
                        [self = this->shared_from_this()](const boost::system::error_code& ec) {
                            if (ec)
                                return self->finish(make_error_code(errc::vhost_user_disconnected));
                            self->pump();
                        });
                    return;
                }
                if (n < 0) return finish(errno_code(errno));
                // Own every fd first, so any rejection below closes them.
                for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
                    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
                    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                    for (std::size_t i = 0; i < count; ++i) {
                        int fd;
                        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                        message_->fds.emplace_back(fd);
                    }
                }
                if ((msg.msg_flags & MSG_CTRUNC) || message_->fds.size() > max_fds)
                    return finish(make_error_code(errc::vhost_user_protocol_error));
                if (n == 0) return finish(make_error_code(errc::vhost_user_disconnected));
                filled_ += static_cast<std::size_t>(n);
            }
        }

        void process() {
            message& m = *message_;
            if (auto valid = validate(m); !valid) {
                trace(m, valid.error());
                return finish(valid.error());
            }
            auto reply = owner_.handle(m);
            trace(m, reply ? error_code{} : reply.error());
            if (reply) {
                reply_ = std::move(reply).value();
            } else if (owner_.failure_is_acked(m)) {
                reply_ = encode_reply(m.request(), u64_bytes(1));
            } else if (reply.error() != make_error_code(errc::not_supported) ||
                       has_inherent_reply(m.request(), owner_.protocol_features_)) {
                return finish(reply.error());
            } else {
                reply_.clear(); // an unsupported request without a reply: ignored
            }
            if (reply_.empty()) return continue_later();
            boost::asio::async_write(
                socket_, boost::asio::buffer(reply_),
                [self = this->shared_from_this()](const boost::system::error_code& ec,
                                                  std::size_t) {
                    if (ec) return self->finish(make_error_code(errc::vhost_user_disconnected));
                    self->read_header();
                });
        }

        /// Next message from the executor, not from this stack: a front-end
        /// with many messages buffered must not grow the stack.
        void continue_later() {
            boost::asio::post(socket_.get_executor(),
                              [self = this->shared_from_this()] { self->read_header(); });
        }

        void finish(error_code ec) {
            boost::system::error_code ignored;
            socket_.close(ignored);
            // Completion from the executor, never from inside the initiating call.
            if (auto d = std::move(done_))
                boost::asio::post(socket_.get_executor(), [d = std::move(d), ec] { d(ec); });
        }

        backend& owner_;
        boost::asio::local::stream_protocol::socket socket_;
        std::function<void(error_code)> done_;
        std::unique_ptr<message> message_;
        std::array<std::byte, header_size> head_{};
        std::span<std::byte> target_;
        std::size_t filled_ = 0;
        bool reading_payload_ = false;
        std::vector<std::byte> reply_;
    };

    executor_type executor_;
    Device& device_;
    std::vector<ring_state> rings_;
    std::vector<virtio::queue_binding> bindings_; // what the active core was given
    std::vector<virtio::queue_position> saved_positions_ =
        std::vector<virtio::queue_position>(rings_.size());
    detail::memory_map memory_;
    std::uint64_t features_ = 0;
    std::uint64_t protocol_features_ = 0;
    bool features_set_ = false;
    bool owner_ = false;
    bool active_ = false;
    supermachine::detail::unique_fd log_;       // SET_LOG_BASE's shared log
    supermachine::detail::unique_fd log_event_; // SET_LOG_FD
    std::uint64_t activation_generation_ = 0;
    std::shared_ptr<std::atomic<bool>> broken_ = std::make_shared<std::atomic<bool>>(false);
    std::shared_ptr<int> alive_ = std::make_shared<int>(0);
};

} // namespace supermachine::vhost_user
