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
// Kicks are waited on with posix::stream_descriptor on the backend's
// executor, exactly as the in-process transport waits on ioeventfds; the
// device processes its queue there and raises the call eventfd.
//
// Error policy: a message that breaks framing (bad header, size or fd count)
// ends the session. A well-formed message we cannot honour is answered with
// a failure ack when the front-end asked for one (REPLY_ACK); without that,
// requests we simply do not implement are ignored, and any other failure
// ends the session, because the front-end would otherwise run on with a
// device in a state it does not know about.
#include <supermachine/device.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/vhost_user/detail/file_descriptor.hpp>
#include <supermachine/vhost_user/detail/memory_map.hpp>
#include <supermachine/vhost_user/message.hpp>
#include <supermachine/vhost_user/vring.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
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

/// What a device core must offer to be served over vhost-user.
///   features(): the virtio feature bits the device offers (VIRTIO_F_VERSION_1 included if wanted)
///   queue_count(), max_queue_size(): its virtqueues
///   read_config(offset, out): bytes of its config space (zero beyond it)
///   process_queue(ring): consume the ring's available buffers, publish used ones, raise ring.call
/// Optional: write_config(offset, bytes), reset(), set_features(acked).
template <class D>
concept device_core = requires(D& d, const D& cd, std::uint32_t offset, std::span<std::byte> out,
                               vring& ring) {
    { cd.features() } -> std::convertible_to<std::uint64_t>;
    { cd.queue_count() } -> std::convertible_to<std::uint32_t>;
    { cd.max_queue_size() } -> std::convertible_to<std::uint16_t>;
    cd.read_config(offset, out);
    d.process_queue(ring);
};

/// Protocol features this back-end implements.
inline constexpr std::uint64_t supported_protocol_features =
    protocol_feature::multiqueue | protocol_feature::reply_ack | protocol_feature::config;

template <device_core Device>
class backend {
public:
    using executor_type = boost::asio::any_io_executor;

    backend(executor_type executor, Device& device)
        : executor_(std::move(executor))
        , device_(device)
        , rings_(device.queue_count()) {
        for (std::uint32_t i = 0; i < rings_.size(); ++i)
            rings_[i].ring.index = i;
    }
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

    /// Stop every ring and cancel pending kick waits (the device stays as is).
    void stop() noexcept {
        for (auto& r : rings_)
            stop_ring(r);
    }

    /// One protocol step. `m` must have passed validate(); its fds are
    /// consumed. Returns the reply bytes to send (maybe empty).
    result<std::vector<std::byte>> handle(message& m) {
        auto r = dispatch(m);
        if (!r) return r.error();
        if (!r.value().empty()) return std::move(r).value();
        if (m.needs_reply() && (protocol_features_ & protocol_feature::reply_ack) &&
            !has_inherent_reply(m.request(), protocol_features_))
            return encode_reply(m.request(), u64_bytes(0));
        return std::vector<std::byte>{};
    }

    /// The reply to send when handle() failed, or empty to end the session / ignore (see top).
    bool failure_is_acked(const message& m) const noexcept {
        return m.needs_reply() && (protocol_features_ & protocol_feature::reply_ack) &&
               !has_inherent_reply(m.request(), protocol_features_);
    }

    /// Serve a connected front-end until it disconnects (completes with
    /// vhost_user_disconnected) or a fatal protocol error. Signature void(std::error_code).
    template <class CompletionToken>
    auto async_serve(boost::asio::local::stream_protocol::socket socket, CompletionToken&& token) {
        return boost::asio::async_initiate<CompletionToken, void(std::error_code)>(
            [this](auto handler, boost::asio::local::stream_protocol::socket s) {
                boost::asio::co_spawn(
                    executor_, serve(std::move(s)),
                    [h = std::move(handler)](std::exception_ptr e, std::error_code ec) mutable {
                        if (e) ec = make_error_code(errc::vhost_user_protocol_error);
                        std::move(h)(ec);
                    });
            },
            token, std::move(socket));
    }

private:
    struct ring_state {
        vring ring;
        std::uint32_t num = 0;
        std::optional<vring_address> address; // as the front-end gave it (user addresses)
        bool base_set = false;
        bool started = false;
        bool enabled = false;
        std::unique_ptr<boost::asio::posix::stream_descriptor> kick;
        detail::file_descriptor call;
        detail::file_descriptor error;
        std::uint64_t generation = 0; // invalidates kick handlers of an earlier start
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
            features_ = f;
            features_set_ = true;
            for (auto& r : rings_)
                r.ring.features = f;
            if constexpr (requires { device_.set_features(f); }) device_.set_features(f);
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
            if (s.num == 0 || s.num > device_.max_queue_size() || !std::has_single_bit(s.num))
                return errc::invalid_argument;
            r.num = s.num;
            r.ring.size = static_cast<std::uint16_t>(s.num);
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
            if (a.flags & 1u) return errc::not_supported; // dirty logging: we never offer F_LOG_ALL
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
            r.ring.next_available = static_cast<std::uint16_t>(s.num);
            r.ring.next_used = static_cast<std::uint16_t>(s.num);
            r.base_set = true;
            return std::vector<std::byte>{};
        }
        case request::get_vring_base: {
            const auto s = parse_vring_state(m);
            SUPERMACHINE_TRY(ring_pointer, ring_at(s.index));
            auto& r = *ring_pointer;
            stop_ring(r);
            r.call.reset();
            return encode_reply(req, vring_state_bytes({s.index, r.ring.next_available}));
        }
        case request::set_vring_kick: {
            const auto f = parse_vring_file(m);
            SUPERMACHINE_TRY(ring_pointer, ring_at(f.index));
            auto& r = *ring_pointer;
            if (f.no_fd) return errc::not_supported; // polling mode
            if (!owner_ || !memory_mapped() || !r.address || r.num == 0)
                return errc::vhost_user_unexpected_message;
            stop_ring(r);
            return start_ring(r, std::move(m.fds.front()));
        }
        case request::set_vring_call:
        case request::set_vring_err: {
            const auto f = parse_vring_file(m);
            SUPERMACHINE_TRY(ring_pointer, ring_at(f.index));
            auto& r = *ring_pointer;
            auto& slot = req == request::set_vring_call ? r.call : r.error;
            slot = f.no_fd ? detail::file_descriptor{} : std::move(m.fds.front());
            if (req == request::set_vring_call) r.ring.call = interrupt_line(r.call.get());
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
            r.enabled = s.num == 1;
            if (r.enabled && r.started) process(r);
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
            if constexpr (requires { device_.write_config(c.offset, c.data); })
                device_.write_config(c.offset, c.data);
            return std::vector<std::byte>{};
        }
        default:
            // Known requests for features we never offer, and unknown ones.
            return errc::not_supported;
        }
    }

    std::uint64_t offered_features() const noexcept {
        return device_.features() | protocol_features_bit;
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

    /// User addresses → guest-physical, with the ring's full extent and
    /// alignment checked (when the size is known).
    result<void> translate(ring_state& r) {
        const auto& a = *r.address;
        const std::uint16_t n = r.ring.size;
        if (a.descriptor % 16 || a.available % 2 || a.used % 4) return errc::invalid_argument;
        // Without a size yet, check one entry; SET_VRING_NUM re-checks.
        const std::uint16_t check = n ? n : 1;
        // +2: room for used_event / avail_event, whether or not EVENT_IDX is acked.
        auto d = memory_.user_to_guest(a.descriptor, vring::descriptor_table_bytes(check));
        auto av = memory_.user_to_guest(a.available, vring::available_ring_bytes(check) + 2);
        auto u = memory_.user_to_guest(a.used, vring::used_ring_bytes(check) + 2);
        if (!d || !av || !u) return errc::address_out_of_range;
        r.ring.descriptor = *d;
        r.ring.available = *av;
        r.ring.used = *u;
        r.ring.memory = &memory_.memory();
        return success();
    }

    result<std::vector<std::byte>> set_mem_table(message& m) {
        if (!owner_) return errc::vhost_user_unexpected_message;
        const auto table = parse_memory_table(m);
        SUPERMACHINE_TRY(map, detail::memory_map::create(table, m.fds));
        m.fds.clear(); // mapped; the fds themselves are not needed any more
        // Rings keep their user addresses; re-translate them into the new
        // table before the old mappings go (the swap unmaps them).
        memory_ = std::move(map);
        for (auto& r : rings_) {
            if (!r.address) continue;
            if (!translate(r)) {
                stop_ring(r);
                r.address.reset();
            }
        }
        return std::vector<std::byte>{};
    }

    result<std::vector<std::byte>> start_ring(ring_state& r, detail::file_descriptor kick) {
        SUPERMACHINE_TRY(translate(r));
        // Resume where the driver is: used->idx from guest memory (after migration
        // or a reconnect it need not equal the base).
        auto used_index = memory_.memory().template read_object<std::uint16_t>(r.ring.used + 2);
        if (!used_index) return used_index.error();
        r.ring.next_used = used_index.value();
        if (!r.base_set) r.ring.next_available = r.ring.next_used;
        r.ring.features = features_;
        r.kick = std::make_unique<boost::asio::posix::stream_descriptor>(executor_, kick.release());
        r.started = true;
        if (!(features_ & protocol_features_bit)) r.enabled = true; // spec: enabled from the start
        ++r.generation;
        wait_for_kick(r);
        if (r.enabled) process(r); // buffers made available before the kick fd arrived
        return std::vector<std::byte>{};
    }

    void stop_ring(ring_state& r) noexcept {
        if (r.kick) {
            boost::system::error_code ignored;
            r.kick->cancel(ignored);
            r.kick->close(ignored);
            r.kick.reset();
        }
        r.started = false;
        ++r.generation;
    }

    void reset() noexcept {
        stop();
        for (auto& r : rings_) {
            const auto index = r.ring.index;
            r = ring_state{};
            r.ring.index = index;
        }
        features_ = 0;
        features_set_ = false;
        // Protocol features and the memory table survive RESET_DEVICE; RESET_OWNER is deprecated.
        if constexpr (requires { device_.reset(); }) device_.reset();
    }

    void wait_for_kick(ring_state& r) {
        r.kick->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                           [this, alive = std::weak_ptr<int>(alive_), index = r.ring.index,
                            generation = r.generation](const boost::system::error_code& ec) {
                               if (ec || alive.expired()) return;
                               auto& ring = rings_[index];
                               if (ring.generation != generation || !ring.kick) return;
                               std::uint64_t count = 0;
                               [[maybe_unused]] auto n =
                                   ::read(ring.kick->native_handle(), &count, sizeof count);
                               if (ring.enabled) process(ring);
                               if (ring.generation == generation && ring.kick) wait_for_kick(ring);
                           });
    }

    void process(ring_state& r) { device_.process_queue(r.ring); }

    // ---- the socket side ----

    boost::asio::awaitable<std::error_code>
    serve(boost::asio::local::stream_protocol::socket socket) {
        socket.non_blocking(true);
        for (;;) {
            message m;
            if (auto ec = co_await read_message(socket, m)) {
                trace(m, ec);
                co_return ec;
            }
            if (auto valid = validate(m); !valid) {
                trace(m, valid.error());
                co_return valid.error();
            }
            auto reply = handle(m);
            trace(m, reply ? std::error_code{} : reply.error());
            std::vector<std::byte> bytes;
            if (reply) {
                bytes = std::move(reply).value();
            } else if (failure_is_acked(m)) {
                bytes = encode_reply(m.request(), u64_bytes(1));
            } else if (reply.error() != make_error_code(errc::not_supported) ||
                       has_inherent_reply(m.request(), protocol_features_)) {
                co_return reply.error();
            }
            if (!bytes.empty()) {
                boost::system::error_code ec;
                co_await boost::asio::async_write(
                    socket, boost::asio::buffer(bytes),
                    boost::asio::redirect_error(boost::asio::use_awaitable, ec));
                if (ec) co_return make_error_code(errc::vhost_user_disconnected);
            }
        }
    }

    /// SUPERMACHINE_VHOST_TRACE=1: one stderr line per request (diagnosing front-ends).
    static void trace(const message& m, std::error_code ec) {
        static const bool enabled = std::getenv("SUPERMACHINE_VHOST_TRACE") != nullptr;
        if (!enabled) return;
        std::uint64_t first = 0;
        std::memcpy(&first, m.payload_storage.data(), sizeof first);
        std::fprintf(stderr,
                     "vhost-user: request %u size %u fds %zu flags %#x payload %#llx -> %s\n",
                     m.head.request, m.head.size, m.fds.size(), m.head.flags,
                     static_cast<unsigned long long>(first), ec ? ec.message().c_str() : "ok");
    }

    /// Read `length` bytes into `out`, collecting any SCM_RIGHTS fds into `fds`.
    static boost::asio::awaitable<std::error_code>
    receive(boost::asio::local::stream_protocol::socket& socket, std::span<std::byte> out,
            std::vector<detail::file_descriptor>& fds) {
        std::size_t done = 0;
        while (done < out.size()) {
            alignas(cmsghdr) char control[CMSG_SPACE(max_fds * sizeof(int))];
            iovec io{out.data() + done, out.size() - done};
            msghdr msg{};
            msg.msg_iov = &io;
            msg.msg_iovlen = 1;
            msg.msg_control = control;
            msg.msg_controllen = sizeof control;
            const ssize_t n =
                ::recvmsg(socket.native_handle(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
                boost::system::error_code ec;
                co_await socket.async_wait(
                    boost::asio::socket_base::wait_read,
                    boost::asio::redirect_error(boost::asio::use_awaitable, ec));
                if (ec) co_return make_error_code(errc::vhost_user_disconnected);
                continue;
            }
            if (n < 0) co_return errno_code(errno);
            // Take ownership of every fd first, so rejection below closes them.
            for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
                const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (std::size_t i = 0; i < count; ++i) {
                    int fd;
                    std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                    fds.emplace_back(fd);
                }
            }
            if (msg.msg_flags & MSG_CTRUNC)
                co_return make_error_code(errc::vhost_user_protocol_error);
            if (fds.size() > max_fds) co_return make_error_code(errc::vhost_user_protocol_error);
            if (n == 0) co_return make_error_code(errc::vhost_user_disconnected);
            done += static_cast<std::size_t>(n);
        }
        co_return std::error_code{};
    }

    static boost::asio::awaitable<std::error_code>
    read_message(boost::asio::local::stream_protocol::socket& socket, message& m) {
        std::array<std::byte, header_size> head;
        if (auto ec = co_await receive(socket, head, m.fds)) co_return ec;
        auto h = decode_header(head);
        if (!h) co_return h.error();
        m.head = h.value();
        if (m.head.size)
            if (auto ec = co_await receive(socket, std::span(m.payload_storage).first(m.head.size),
                                           m.fds))
                co_return ec;
        co_return std::error_code{};
    }

    executor_type executor_;
    Device& device_;
    std::vector<ring_state> rings_;
    detail::memory_map memory_;
    std::uint64_t features_ = 0;
    std::uint64_t protocol_features_ = 0;
    bool features_set_ = false;
    bool owner_ = false;
    std::shared_ptr<int> alive_ = std::make_shared<int>(0);
};

} // namespace supermachine::vhost_user
