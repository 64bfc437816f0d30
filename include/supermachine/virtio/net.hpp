#pragma once
// virtio-net (virtio 1.2 section 5.1): queue 0 receive (device -> driver),
// queue 1 transmit (driver -> device), no control queue, one queue pair.
//
// Frames come from and go to a backend (the net_backend concept below): a
// user-mode NAT, a loopback for tests. The core only moves Ethernet frames
// between the rings and the backend, and checks everything the guest says:
//
// - features offered: VERSION_1 (so the header is always the 12-byte
//   virtio_net_hdr_v1), INDIRECT_DESC, EVENT_IDX, MAC, STATUS, MTU. No
//   checksum or segmentation offload (CSUM, GUEST_CSUM, *_TSO*, *_UFO,
//   HOST_USO), no MRG_RXBUF, no CTRL_VQ: the guest computes every checksum,
//   sends frames of at most MTU + 18 bytes and posts receive buffers for a
//   whole frame. A header asking for an offload we did not offer is a bad
//   frame.
// - transmit: one chain is one frame: the header then the frame, all
//   device-readable. A chain that is malformed (outside RAM, loops...), has
//   a device-writable descriptor, is shorter than the header, carries a
//   header with flags or a GSO type, a frame shorter than an Ethernet header
//   or longer than config::mtu + 18 is dropped and counted (net_counters).
//   The frame is copied into a buffer sized once, at creation, for the
//   largest legal frame (the guest's lengths are checked before any copy and
//   never size an allocation), then handed to the backend.
// - receive: frames from the backend wait in a bounded queue
//   (config::rx_queue_frames; more are dropped and counted) until the driver
//   posts a buffer; each frame goes into one chain as header + frame. A
//   chain too small for both, with a device-readable descriptor, or
//   malformed, is returned with nothing written, and the frame is dropped
//   and counted.
// - link status: set_link(up) flips VIRTIO_NET_S_LINK_UP and raises a config
//   interrupt; transport_reset() (after a snapshot restore) flaps the link
//   for config::restore_link_flap so the guest re-announces itself. While
//   the link is down frames are dropped both ways (counted).
#include <supermachine/error.hpp>
#include <supermachine/virtio/device.hpp>
#include <supermachine/virtio/queue_service.hpp>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <concepts>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <utility>
#include <vector>

namespace supermachine::virtio {

/// struct virtio_net_hdr_v1 (little-endian; we are little-endian).
struct net_header {
    std::uint8_t flags;
    std::uint8_t gso_type;
    std::uint16_t header_length;
    std::uint16_t gso_size;
    std::uint16_t csum_start;
    std::uint16_t csum_offset;
    std::uint16_t num_buffers;
} __attribute__((packed));
static_assert(sizeof(net_header) == 12);

/// virtio-net feature bits (virtio 1.2 5.1.3) this core knows about.
namespace net_feature {
inline constexpr unsigned csum = 0;       // not offered
inline constexpr unsigned guest_csum = 1; // not offered
inline constexpr unsigned mtu = 3;
inline constexpr unsigned mac = 5;
inline constexpr unsigned mrg_rxbuf = 15; // not offered
inline constexpr unsigned status = 16;
inline constexpr unsigned ctrl_vq = 17; // not offered
} // namespace net_feature

inline constexpr std::uint16_t net_status_link_up = 1; // VIRTIO_NET_S_LINK_UP
inline constexpr std::size_t ethernet_header_bytes = 14;
/// Frame bytes beyond the MTU: the Ethernet header and one VLAN tag (Linux
/// sizes its receive buffers the same way, GOOD_PACKET_LEN).
inline constexpr std::size_t net_frame_overhead = ethernet_header_bytes + 4;

using mac_address = std::array<std::uint8_t, 6>;

/// Where a backend hands frames for the guest. Callable from any thread; it
/// copies the frame and returns at once (never waits for the guest).
using net_frame_sink = std::function<void(std::span<const std::byte> frame)>;

/// A frame source/sink behind the device: a user-mode NAT, a loopback.
///
///   static result<std::unique_ptr<B>> create(const config&);
///   void attach(net_frame_sink);  // once, before any frame flows; frames for
///                                 // the guest go there while b lives
///   bool send(std::span<const std::byte> frame);  // from the guest; false:
///                                 // dropped by the backend (counted)
///
/// send() is called on the device's executor under the device's lock with a
/// frame of ethernet_header_bytes .. mtu + net_frame_overhead bytes, valid
/// for the call only; it must not block, nor call the sink and expect the
/// frame to reach the guest before it returns.
template <class B>
concept net_backend = requires(B& b, const typename B::config& cfg,
                               std::span<const std::byte> frame, net_frame_sink sink) {
    { B::create(cfg) } -> std::same_as<result<std::unique_ptr<B>>>;
    b.attach(std::move(sink));
    { b.send(frame) } -> std::same_as<bool>;
};

/// What the device did with frames: every drop has a reason and a count.
struct net_counters {
    std::uint64_t tx_frames = 0, tx_bytes = 0; // handed to the backend (frame bytes)
    std::uint64_t rx_frames = 0, rx_bytes = 0; // written into guest buffers (frame bytes)
    // transmit drops (one per chain)
    std::uint64_t tx_malformed_chain = 0; // descriptor_chain rejected (outside RAM, loop...)
    std::uint64_t tx_writable_descriptor = 0;
    std::uint64_t tx_short_header = 0; // fewer readable bytes than the 12-byte header
    std::uint64_t tx_bad_header = 0;   // flags or gso_type set: offloads not offered
    std::uint64_t tx_runt = 0;         // frame shorter than an Ethernet header
    std::uint64_t tx_oversized = 0;    // frame longer than mtu + net_frame_overhead
    std::uint64_t tx_link_down = 0;
    std::uint64_t tx_backend_dropped = 0; // backend's send() said no
    // receive drops (one per frame)
    std::uint64_t rx_bad_frame = 0;  // backend frame shorter/longer than legal
    std::uint64_t rx_queue_full = 0; // config::rx_queue_frames frames were waiting
    std::uint64_t rx_not_ready = 0;  // the driver had not started the device
    std::uint64_t rx_link_down = 0;
    std::uint64_t rx_buffer_too_small = 0; // the chain could not hold header + frame
    std::uint64_t rx_bad_buffer = 0;       // malformed chain or device-readable descriptor

    std::uint64_t tx_dropped() const noexcept {
        return tx_malformed_chain + tx_writable_descriptor + tx_short_header + tx_bad_header +
               tx_runt + tx_oversized + tx_link_down + tx_backend_dropped;
    }
    std::uint64_t rx_dropped() const noexcept {
        return rx_bad_frame + rx_queue_full + rx_not_ready + rx_link_down + rx_buffer_too_small +
               rx_bad_buffer;
    }
};

namespace detail {

template <net_backend Backend>
class net_impl : public std::enable_shared_from_this<net_impl<Backend>> {
public:
    struct config_type {
        mac_address mac{0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
        std::uint16_t mtu = 1500; // 68 .. 65535 - net_frame_overhead
        std::uint32_t queue_size = 256;
        std::size_t rx_queue_frames = 256; // frames waiting for guest buffers, at most
        /// transport_reset(): link down for this long, then up (0: no flap).
        std::chrono::milliseconds restore_link_flap{100};
        bool attached = true; // false: basic_machine leaves this slot empty
        typename Backend::config backend{};
    };

    net_impl(const config_type& c, std::unique_ptr<Backend> backend)
        : config_(c)
        , max_frame_(std::size_t{c.mtu} + net_frame_overhead)
        , backend_(std::move(backend)) {
        tx_frame_.resize(max_frame_); // the one transmit copy buffer, sized once
    }

    /// After construction (needs shared_from_this): the backend gets our sink.
    void attach() {
        backend_->attach([weak = this->weak_from_this()](std::span<const std::byte> frame) {
            if (auto self = weak.lock()) self->deliver(frame);
        });
    }

    const config_type& config() const noexcept { return config_; }
    Backend& backend() noexcept { return *backend_; }

    std::uint16_t status() const noexcept { return status_.load(std::memory_order_acquire); }

    result<void> activate(const activation& act) {
        if (act.queues.size() != 2) return errc::invalid_argument;
        {
            std::lock_guard lock(state_mutex_);
            queues_ = {act.queues[0], act.queues[1]};
            executor_ = act.executor;
            config_interrupt_ = act.config_interrupt;
            needs_reset_ = act.needs_reset;
            active_ = true;
            paused_ = false;
            rx_poll_posted_ = false;
            // The link changed while paused (a flap ending): tell the driver now.
            if (std::exchange(link_changed_while_paused_, false))
                config_interrupt_.config_changed();
        }
        auto self = this->shared_from_this();
        // The start poll of queue 0 delivers frames that waited over a pause.
        return service_.start(act, [self](std::size_t index) { self->on_kick(index); });
    }

    /// Snapshot quiesce: stop touching the rings, keep frames waiting for the guest.
    void pause() {
        service_.stop();
        std::lock_guard lock(state_mutex_);
        active_ = false;
        paused_ = true;
        queues_ = {};
        // A link flap in progress keeps going: its end is announced at activate().
    }

    void reset() {
        service_.stop();
        std::lock_guard lock(state_mutex_);
        active_ = false;
        paused_ = false;
        link_changed_while_paused_ = false;
        queues_ = {};
        rx_frames_.clear();
        flap_.reset();
    }

    /// After a snapshot restore: frames from the old world are stale; flap the
    /// link so the guest notices (carrier off/on) and re-announces itself.
    void transport_reset() {
        std::lock_guard lock(state_mutex_);
        rx_frames_.clear();
        if (!active_ || config_.restore_link_flap.count() <= 0) return;
        set_link_locked(false);
        flap_ = std::make_unique<boost::asio::steady_timer>(executor_, config_.restore_link_flap);
        flap_->async_wait([weak = this->weak_from_this()](boost::system::error_code ec) {
            if (ec) return;
            if (auto self = weak.lock()) self->set_link(true);
        });
    }

    void set_link(bool up) {
        std::lock_guard lock(state_mutex_);
        set_link_locked(up);
    }

    net_counters counters() const {
        std::lock_guard lock(state_mutex_);
        return counters_;
    }
    std::size_t queued_rx_frames() const {
        std::lock_guard lock(state_mutex_);
        return rx_frames_.size();
    }

private:
    void set_link_locked(bool up) {
        const std::uint16_t next = up ? net_status_link_up : 0;
        if (status_.exchange(next, std::memory_order_acq_rel) == next) return;
        if (!up) rx_frames_.clear();
        if (active_)
            config_interrupt_.config_changed();
        else if (paused_)
            link_changed_while_paused_ = true;
    }

    // ---- backend -> guest ----------------------------------------------------------

    void deliver(std::span<const std::byte> frame) {
        std::lock_guard lock(state_mutex_);
        if (frame.size() < ethernet_header_bytes || frame.size() > max_frame_) {
            ++counters_.rx_bad_frame;
            return;
        }
        if (!active_ && !paused_) {
            ++counters_.rx_not_ready;
            return;
        }
        if (status() != net_status_link_up) {
            ++counters_.rx_link_down;
            return;
        }
        if (rx_frames_.size() >= config_.rx_queue_frames) {
            ++counters_.rx_queue_full;
            return;
        }
        rx_frames_.emplace_back(frame.begin(), frame.end());
        if (!active_ || rx_poll_posted_) return; // activate() polls; a poll is on its way
        // Not service_.poll() here: the caller may be inside a kick handler (a
        // backend answering send() at once) and poll() takes the core's lock.
        rx_poll_posted_ = true;
        boost::asio::post(executor_, [weak = this->weak_from_this()] {
            if (auto self = weak.lock()) {
                {
                    std::lock_guard lock(self->state_mutex_);
                    self->rx_poll_posted_ = false;
                }
                self->service_.poll(0);
            }
        });
    }

    // ---- kick handlers (the core's lock is held) ------------------------------------

    void on_kick(std::size_t index) {
        if (index == 1) serve_tx();
        serve_rx(); // new rx buffers, or frames a tx answered
    }

    void broken() {
        if (needs_reset_) needs_reset_();
    }

    void serve_tx() {
        queue_binding q;
        {
            std::lock_guard lock(state_mutex_);
            q = queues_[1];
        }
        if (!q.queue) return;
        bool any = false;
        auto r = for_each_available(q, [&](virtqueue::available_chain&& c) {
            transmit(c);
            (void)q.queue->push_used(c.head, 0); // nothing written into a tx chain
            any = true;
        });
        if (!r) return broken();
        if (any && q.queue->should_notify()) q.interrupt.used_buffer();
    }

    void transmit(const virtqueue::available_chain& c) {
        auto count = [&](std::uint64_t net_counters::*field) {
            std::lock_guard lock(state_mutex_);
            ++(counters_.*field);
        };
        if (!c.chain) return count(&net_counters::tx_malformed_chain);
        const descriptor_chain& chain = c.chain.value();
        if (!chain.writable().empty()) return count(&net_counters::tx_writable_descriptor);
        chain_reader reader(chain.readable());
        auto header = reader.read_object<net_header>();
        if (!header) return count(&net_counters::tx_short_header);
        if (header.value().flags != 0 || header.value().gso_type != 0)
            return count(&net_counters::tx_bad_header);
        const std::uint64_t length = reader.remaining();
        if (length < ethernet_header_bytes) return count(&net_counters::tx_runt);
        if (length > max_frame_) return count(&net_counters::tx_oversized);
        if (status() != net_status_link_up) return count(&net_counters::tx_link_down);
        // A private copy: the guest may rewrite its buffer while the backend reads.
        const std::span<std::byte> frame(tx_frame_.data(), static_cast<std::size_t>(length));
        if (!reader.read(frame)) return count(&net_counters::tx_short_header);
        if (!backend_->send(frame)) return count(&net_counters::tx_backend_dropped);
        std::lock_guard lock(state_mutex_);
        ++counters_.tx_frames;
        counters_.tx_bytes += length;
    }

    void serve_rx() {
        std::unique_lock lock(state_mutex_);
        queue_binding q = queues_[0];
        if (!q.queue) return;
        bool any = false;
        while (!rx_frames_.empty()) {
            auto popped = q.queue->pop();
            if (!popped) {
                lock.unlock();
                return broken();
            }
            if (!popped.value()) {
                // No buffer: wait for the driver's kick (or take what came meanwhile).
                if (q.queue->enable_notifications()) continue;
                break;
            }
            const auto& entry = *popped.value();
            std::vector<std::byte> frame = std::move(rx_frames_.front());
            rx_frames_.pop_front();
            std::uint32_t written = 0;
            if (!entry.chain || !entry.chain.value().readable().empty()) {
                ++counters_.rx_bad_buffer;
            } else if (entry.chain.value().writable_bytes() < sizeof(net_header) + frame.size()) {
                ++counters_.rx_buffer_too_small;
            } else {
                chain_writer writer(entry.chain.value().writable());
                net_header h{};
                h.num_buffers = 1; // 5.1.6.4: one chain per frame without MRG_RXBUF
                (void)writer.write_object(h);
                (void)writer.write(frame);
                written = static_cast<std::uint32_t>(writer.written());
                ++counters_.rx_frames;
                counters_.rx_bytes += frame.size();
            }
            if (!q.queue->push_used(entry.head, written)) {
                lock.unlock();
                return broken();
            }
            any = true;
        }
        if (any && q.queue->should_notify()) q.interrupt.used_buffer();
    }

    config_type config_;
    std::size_t max_frame_;
    std::unique_ptr<Backend> backend_;
    queue_service service_;
    std::vector<std::byte> tx_frame_; // only touched in the tx kick handler
    std::atomic<std::uint16_t> status_{net_status_link_up};

    // The state lock: taken after the queue_service (core) lock in kick handlers,
    // and alone by the backend's sink and the host-side API.
    mutable std::mutex state_mutex_;
    std::array<queue_binding, 2> queues_{};
    boost::asio::any_io_executor executor_;
    interrupt_sink config_interrupt_;
    std::function<void()> needs_reset_;
    bool active_ = false, paused_ = false, rx_poll_posted_ = false;
    bool link_changed_while_paused_ = false;
    std::deque<std::vector<std::byte>> rx_frames_;
    std::unique_ptr<boost::asio::steady_timer> flap_;
    net_counters counters_;
};

} // namespace detail

/// The virtio-net device core over a frame backend.
template <net_backend Backend>
class net {
    using impl = detail::net_impl<Backend>;

public:
    using config = typename impl::config_type;
    using backend_type = Backend;
    static bool attached(const config& cfg) noexcept { return cfg.attached; }
    static constexpr device_type type = device_type::network;

    /// The features offered; see the top of this header for why no offloads.
    static constexpr std::uint64_t features = common_features | feature_bit(net_feature::mtu) |
                                              feature_bit(net_feature::mac) |
                                              feature_bit(net_feature::status);
    static constexpr std::uint16_t min_mtu = 68; // RFC 791; Linux refuses less
    static constexpr std::uint16_t max_mtu = 65535 - net_frame_overhead;

    static result<std::unique_ptr<net>> create(const config& c) {
        // A multicast or all-zero MAC would make the guest's driver pick a random one.
        const bool zero = c.mac == mac_address{};
        if (zero || (c.mac[0] & 1) || c.mtu < min_mtu || c.mtu > max_mtu || c.queue_size == 0 ||
            c.queue_size > max_queue_size || (c.queue_size & (c.queue_size - 1)) ||
            c.rx_queue_frames == 0)
            return errc::invalid_argument;
        SUPERMACHINE_TRY(backend, Backend::create(c.backend));
        return std::unique_ptr<net>(new net(c, std::move(backend)));
    }
    ~net() { impl_->reset(); }

    std::uint64_t device_features() const noexcept { return features; }
    std::size_t queue_count() const noexcept { return 2; }
    std::uint32_t queue_max_size(std::size_t) const noexcept { return impl_->config().queue_size; }
    /// struct virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs, mtu.
    std::size_t config_size() const noexcept { return 12; }
    void read_config(std::uint32_t offset, std::span<std::byte> out) const noexcept {
        std::array<std::byte, 12> bytes{};
        const auto& c = impl_->config();
        std::memcpy(bytes.data(), c.mac.data(), 6);
        const std::uint16_t status = impl_->status(), pairs = 1, mtu = c.mtu;
        std::memcpy(bytes.data() + 6, &status, 2);
        std::memcpy(bytes.data() + 8, &pairs, 2);
        std::memcpy(bytes.data() + 10, &mtu, 2);
        read_config_bytes(bytes, offset, out);
    }
    void write_config(std::uint32_t, std::span<const std::byte>) noexcept {} // read-only (1.x)
    result<void> activate(const activation& act) { return impl_->activate(act); }
    void reset() { impl_->reset(); }
    /// Snapshot quiesce (device.hpp): frames waiting for the guest are kept.
    void pause() { impl_->pause(); }
    /// After a snapshot restore: drop stale frames, flap the link.
    void transport_reset() { impl_->transport_reset(); }

    /// The host's side of the cable: link up or down (config interrupt on change).
    void set_link(bool up) { impl_->set_link(up); }
    bool link_up() const noexcept { return impl_->status() == net_status_link_up; }
    net_counters counters() const { return impl_->counters(); }
    std::size_t queued_rx_frames() const { return impl_->queued_rx_frames(); }
    Backend& backend() noexcept { return impl_->backend(); }
    const mac_address& mac() const noexcept { return impl_->config().mac; }

private:
    net(const config& c, std::unique_ptr<Backend> backend)
        : impl_(std::make_shared<impl>(c, std::move(backend))) {
        impl_->attach();
    }
    std::shared_ptr<impl> impl_;
};

} // namespace supermachine::virtio
