#pragma once
// The transport-neutral virtio device core.
//
// A device (blk, rng, a user's own) is written once against this concept and
// served by any transport: virtio-mmio in process (mmio_transport.hpp, on the
// kvm backend) or vhost-user (another VMM runs the transport). A core never
// knows which. The transport owns the register file, feature negotiation and
// the virtqueue objects; at DRIVER_OK it hands the core, per queue, the
// virtqueue, a kick source (an eventfd that becomes readable when the driver
// notifies that queue) and an interrupt sink, plus the executor to run on.
//
// A type D is a device core when it provides:
//
//   using config = ...;                                        // what create() needs
//   static constexpr virtio::device_type type = ...;           // virtio device id
//   static result<std::unique_ptr<D>> create(const config&);   // may fail (files...)
//   std::uint64_t device_features() const;     // offered bits, incl. common_features
//   std::size_t queue_count() const;           // number of virtqueues
//   std::uint32_t queue_max_size(std::size_t queue) const;   // power of two <= 32768
//   std::size_t config_size() const;           // bytes of device config space
//   void read_config(std::uint32_t offset, std::span<std::byte> out) const;
//   void write_config(std::uint32_t offset, std::span<const std::byte> in);
//   result<void> activate(const activation&);  // DRIVER_OK: start serving queues
//   void reset();                              // synchronous; see below
//
// Contract:
// - read_config/write_config are called on a vCPU thread (or the vhost-user
//   thread); offsets and lengths come from the guest: out-of-range bytes
//   read as zero and writes outside are ignored.
// - activate() is called once per driver session; the queue_binding span and
//   the virtqueues it points to stay valid until reset() returns. The core
//   waits for kicks with Asio on activation::executor (queue_service.hpp does
//   this), never on the calling thread, and does blocking I/O off it.
// - reset() may be called from any thread, including the executor's; when it
//   returns the core touches neither guest memory nor the virtqueues again
//   (in-flight I/O into guest buffers has finished). It must not block on the
//   executor (the caller may be running on it).
// - Optional (detected with requires-expressions): `std::vector<std::byte>
//   save_state() const` and `result<void> restore_state(std::span<const std::byte>)`
//   for snapshots; `void stop()` when the machine stops; `void pause()`, called by
//   mmio_transport::pause (snapshot quiesce) instead of reset(): the same guarantee
//   as reset() about guest memory and queues, host-side state kept for the next
//   activate(); `void transport_reset()`, called after a machine restore.
#include <supermachine/device.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/virtio/features.hpp>
#include <supermachine/virtio/virtqueue.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

namespace supermachine::virtio {

/// Where a core raises interrupts: an eventfd (irqfd or vhost-user call fd),
/// and, on transports with an interrupt status register (virtio-mmio), the
/// register's bits to set first.
class interrupt_sink {
public:
    interrupt_sink() = default;
    explicit interrupt_sink(interrupt_line line,
                            std::atomic<std::uint32_t>* status = nullptr) noexcept
        : line_(line)
        , status_(status) {}

    /// The device used buffers in a queue.
    void used_buffer() const noexcept { raise(interrupt_reason::used_buffer); }
    /// The device changed its config space.
    void config_changed() const noexcept { raise(interrupt_reason::config_change); }
    void raise(std::uint32_t reason) const noexcept {
        if (status_) status_->fetch_or(reason, std::memory_order_acq_rel);
        line_.trigger();
    }
    explicit operator bool() const noexcept { return static_cast<bool>(line_); }

private:
    interrupt_line line_;
    std::atomic<std::uint32_t>* status_ = nullptr;
};

/// One queue as the transport hands it to the core.
struct queue_binding {
    virtqueue* queue = nullptr; // nullptr: the driver did not enable this queue
    int kick_fd = -1;           // eventfd, readable after a driver notification; not owned
    interrupt_sink interrupt;   // raise after used entries when virtqueue::should_notify()
};

/// Everything a core gets at DRIVER_OK.
struct activation {
    const guest_memory& memory;
    boost::asio::any_io_executor executor; // the core's async work runs here
    std::uint64_t driver_features = 0;     // negotiated (a subset of device_features())
    std::span<queue_binding> queues;       // queue_count() entries
    interrupt_sink config_interrupt;
    /// The core found a ring broken (errc::device_broken): the transport sets
    /// DEVICE_NEEDS_RESET and tells the driver. Callable from any thread.
    std::function<void()> needs_reset;
};

template <class D>
concept device_core = requires(D& d, const D& cd, std::uint32_t offset, std::size_t queue,
                               std::span<std::byte> out, std::span<const std::byte> in,
                               const activation& act, const typename D::config& cfg) {
    { D::type } -> std::convertible_to<device_type>;
    { D::create(cfg) } -> std::same_as<result<std::unique_ptr<D>>>;
    { cd.device_features() } -> std::same_as<std::uint64_t>;
    { cd.queue_count() } -> std::convertible_to<std::size_t>;
    { cd.queue_max_size(queue) } -> std::convertible_to<std::uint32_t>;
    { cd.config_size() } -> std::convertible_to<std::size_t>;
    cd.read_config(offset, out);
    d.write_config(offset, in);
    { d.activate(act) } -> std::same_as<result<void>>;
    d.reset();
};

template <class D>
concept saves_state = requires(const D& cd, D& d, std::span<const std::byte> bytes) {
    { cd.save_state() } -> std::convertible_to<std::vector<std::byte>>;
    { d.restore_state(bytes) } -> std::same_as<result<void>>;
};

/// Helpers for config space: copy the overlap of [offset, offset + out.size())
/// with `config` and zero the rest, so any guest offset/width is safe.
inline void read_config_bytes(std::span<const std::byte> config, std::uint32_t offset,
                              std::span<std::byte> out) noexcept {
    for (std::size_t i = 0; i < out.size(); ++i) {
        const std::uint64_t at = std::uint64_t{offset} + i;
        out[i] = at < config.size() ? config[at] : std::byte{0};
    }
}

} // namespace supermachine::virtio
