#pragma once
// virtio-mmio, version 2 (modern only; virtio 1.2 section 4.2), as a bus
// device: the register file, feature negotiation, queue setup, interrupt
// status/ack, config space and reset, around a transport-neutral device core.
//
// The guest is hostile: control registers only answer aligned 32-bit
// accesses (others read as zero and are ignored on write); a queue select
// out of range reads zeros and ignores writes; QueueReady=1 is refused
// (reads back 0) unless QueueNum is a power of two no larger than
// QueueNumMax and all three rings are aligned and inside guest RAM;
// FEATURES_OK is refused (does not stick) for features we did not offer or
// without VIRTIO_F_VERSION_1; status bits can only be added, except by
// writing 0 (reset); queue registers are frozen while the queue is ready.
//
// Queue notifications: each queue gets a doorbell from the machine
// (device_environment::make_doorbell: KVM_IOEVENTFD on QueueNotify with
// datamatch = queue index), so a kick never exits to this code; when no
// doorbell can be made, a QueueNotify write that reaches write() signals the
// queue's own eventfd instead (the slow path). Either way the core waits on
// an eventfd on its executor. Interrupts: InterruptStatus bit, then the
// irqfd from make_interrupt_line.
//
// Threading: read()/write() come from vCPU threads (serialised by a mutex);
// the core runs on the executor from device_environment.
#include <supermachine/device.hpp>
#include <supermachine/error.hpp>
#include <supermachine/virtio/device.hpp>
#include <supermachine/virtio/features.hpp>
#include <supermachine/virtio/mmio_state.hpp>
#include <supermachine/virtio/virtqueue.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace supermachine::virtio {

/// virtio-mmio register offsets (virtio 1.2 table 4.1).
namespace mmio_register {
inline constexpr std::uint32_t magic_value = 0x000;
inline constexpr std::uint32_t version = 0x004;
inline constexpr std::uint32_t device_id = 0x008;
inline constexpr std::uint32_t vendor_id = 0x00c;
inline constexpr std::uint32_t device_features = 0x010;
inline constexpr std::uint32_t device_features_select = 0x014;
inline constexpr std::uint32_t driver_features = 0x020;
inline constexpr std::uint32_t driver_features_select = 0x024;
inline constexpr std::uint32_t queue_select = 0x030;
inline constexpr std::uint32_t queue_num_max = 0x034;
inline constexpr std::uint32_t queue_num = 0x038;
inline constexpr std::uint32_t queue_ready = 0x044;
inline constexpr std::uint32_t queue_notify = 0x050;
inline constexpr std::uint32_t interrupt_status = 0x060;
inline constexpr std::uint32_t interrupt_ack = 0x064;
inline constexpr std::uint32_t device_status = 0x070; // "Status"
inline constexpr std::uint32_t queue_descriptor_low = 0x080;
inline constexpr std::uint32_t queue_descriptor_high = 0x084;
inline constexpr std::uint32_t queue_driver_low = 0x090;
inline constexpr std::uint32_t queue_driver_high = 0x094;
inline constexpr std::uint32_t queue_device_low = 0x0a0;
inline constexpr std::uint32_t queue_device_high = 0x0a4;
inline constexpr std::uint32_t shared_memory_select = 0x0ac;
inline constexpr std::uint32_t shared_memory_length_low = 0x0b0;
inline constexpr std::uint32_t shared_memory_length_high = 0x0b4;
inline constexpr std::uint32_t shared_memory_base_low = 0x0b8;
inline constexpr std::uint32_t shared_memory_base_high = 0x0bc;
inline constexpr std::uint32_t queue_reset = 0x0c0;
inline constexpr std::uint32_t config_generation = 0x0fc;
inline constexpr std::uint32_t config = 0x100;
} // namespace mmio_register

inline constexpr std::uint32_t mmio_magic = 0x74726976; // "virt"
inline constexpr std::uint32_t mmio_version = 2;
inline constexpr std::uint32_t mmio_vendor_id = 0; // no PCI-style vendor; Linux ignores it

template <device_core Core>
class mmio_transport {
public:
    using core_type = Core;
    using config = typename Core::config;
    static constexpr device_requirements requirements{true, true};

    /// Whether basic_machine gives this slot a window at all (the core's
    /// config may leave it empty, e.g. blk::config::attached).
    static bool attached(const config& cfg) {
        if constexpr (requires {
                          { Core::attached(cfg) } -> std::convertible_to<bool>;
                      })
            return Core::attached(cfg);
        else
            return true;
    }

    static result<std::unique_ptr<mmio_transport>> create(device_environment& env,
                                                          const config& cfg) {
        SUPERMACHINE_TRY(core, Core::create(cfg));
        return create(env, std::move(core));
    }

    /// Wrap an already-made core (tests, or cores with extra setup).
    static result<std::unique_ptr<mmio_transport>> create(device_environment& env,
                                                          std::unique_ptr<Core> core) {
        if (!core) return errc::invalid_argument;
        const std::size_t count = core->queue_count();
        if (count == 0 || count > max_queues) return errc::invalid_argument;
        for (std::size_t i = 0; i < count; ++i) {
            const std::uint32_t m = core->queue_max_size(i);
            if (m == 0 || m > max_queue_size || (m & (m - 1)) != 0) return errc::invalid_argument;
        }
        if (env.resources.mmio_size < x86_layout::virtio_mmio_window) return errc::invalid_argument;
        if (!env.make_interrupt_line) return errc::not_supported;
        SUPERMACHINE_TRY(line, env.make_interrupt_line(env.resources.gsi));
        std::unique_ptr<mmio_transport> t(new mmio_transport(env, std::move(core), line));
        for (std::size_t i = 0; i < count; ++i) {
            std::optional<int> fd;
            if (env.make_doorbell) {
                auto door = env.make_doorbell(env.resources.mmio_base + mmio_register::queue_notify,
                                              4, std::uint64_t{i});
                if (door) fd = door.value();
            }
            if (!fd) {
                const int own = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
                if (own < 0) return errno_code(errno);
                t->owned_fds_.push_back(own);
                fd = own;
                t->doorbells_missing_ = true;
            }
            t->kick_fds_.push_back(*fd);
        }
        return t;
    }

    mmio_transport(const mmio_transport&) = delete;
    mmio_transport& operator=(const mmio_transport&) = delete;
    ~mmio_transport() {
        core_->reset();
        for (int fd : owned_fds_)
            ::close(fd);
    }

    std::span<const address_range> ranges() const noexcept { return {&range_, 1}; }
    Core& core() noexcept { return *core_; }
    const Core& core() const noexcept { return *core_; }
    /// True when at least one queue kick goes through write() (no ioeventfd).
    bool uses_slow_notify() const noexcept { return doorbells_missing_; }

    void read(std::uint64_t address, std::span<std::byte> data) {
        std::memset(data.data(), 0, data.size());
        if (!range_.contains(address_space::mmio, address, data.size())) return;
        const std::uint64_t offset = address - range_.base;
        if (offset >= mmio_register::config) {
            core_->read_config(static_cast<std::uint32_t>(offset - mmio_register::config), data);
            return;
        }
        if (data.size() != 4 || offset % 4 != 0) return;
        const std::uint32_t value = read_register(static_cast<std::uint32_t>(offset));
        std::memcpy(data.data(), &value, 4);
    }

    void write(std::uint64_t address, std::span<const std::byte> data) {
        if (!range_.contains(address_space::mmio, address, data.size())) return;
        const std::uint64_t offset = address - range_.base;
        if (offset >= mmio_register::config) {
            if (data.size() > 8) return;
            core_->write_config(static_cast<std::uint32_t>(offset - mmio_register::config), data);
            return;
        }
        if (data.size() != 4 || offset % 4 != 0) return;
        std::uint32_t value;
        std::memcpy(&value, data.data(), 4);
        write_register(static_cast<std::uint32_t>(offset), value);
    }

    /// Machine stopping: the core stops touching guest memory (and, paused or not,
    /// is reset: a core that kept state over a pause drops it now).
    void stop() {
        std::lock_guard lock(mutex_);
        const bool was_active = active_;
        deactivate_locked(false);
        if constexpr (pausable)
            if (!was_active) core_->reset(); // reset() of an inactive core only drops state
    }

    /// Quiesce for a snapshot: requests in flight complete, the core stops (a core with
    /// pause() keeps what the guest cannot re-create, e.g. vsock connections; others reset).
    void pause() {
        std::lock_guard lock(mutex_);
        deactivate_locked(true);
    }
    /// Undo pause(): the core serves the same queues again.
    result<void> resume() {
        std::lock_guard lock(mutex_);
        if (paused_ && (state_.status & status::driver_ok)) {
            paused_ = false;
            return activate_locked();
        }
        return success();
    }

    /// The register state (consistent while paused).
    mmio_state state() const {
        std::lock_guard lock(mutex_);
        mmio_state s = state_;
        s.interrupt_status = interrupt_status_.load();
        if (needs_reset_) s.status |= status::device_needs_reset;
        for (std::size_t i = 0; i < queues_.size(); ++i)
            if (queues_[i]) s.queues[i].position = queues_[i]->position();
        return s;
    }

    /// Load a saved register state (hostile: checked like guest writes) and,
    /// if the driver had the device running, reactivate the core.
    result<void> restore(const mmio_state& s) {
        std::lock_guard lock(mutex_);
        if (s.queues.size() != core_->queue_count()) return errc::snapshot_mismatch;
        if ((s.driver_features & ~core_->device_features()) != 0) return errc::snapshot_mismatch;
        for (std::size_t i = 0; i < s.queues.size(); ++i) {
            const auto& q = s.queues[i];
            if (q.ready && !ready_acceptable(i, q)) return errc::snapshot_bad_record;
        }
        reset_locked();
        state_ = s;
        needs_reset_ = (s.status & status::device_needs_reset) != 0;
        state_.status &= ~status::device_needs_reset;
        interrupt_status_ = s.interrupt_status;
        if (state_.status & status::driver_ok) return activate_locked();
        return success();
    }

private:
    mmio_transport(device_environment& env, std::unique_ptr<Core> core, interrupt_line line)
        : memory_(env.memory)
        , executor_(env.executor)
        , range_{address_space::mmio, env.resources.mmio_base, x86_layout::virtio_mmio_window}
        , core_(std::move(core))
        , line_(line) {
        state_.queues.resize(core_->queue_count());
        queues_.resize(core_->queue_count());
        bindings_.resize(core_->queue_count());
    }

    std::uint32_t read_register(std::uint32_t offset) {
        using namespace mmio_register;
        std::lock_guard lock(mutex_);
        const mmio_queue_state* q = selected_queue();
        switch (offset) {
        case magic_value:
            return mmio_magic;
        case version:
            return mmio_version;
        case device_id:
            return static_cast<std::uint32_t>(Core::type);
        case vendor_id:
            return mmio_vendor_id;
        case device_features:
            if (state_.device_features_select > 1) return 0;
            return static_cast<std::uint32_t>(core_->device_features() >>
                                              (32 * state_.device_features_select));
        case queue_num_max:
            return q ? core_->queue_max_size(state_.queue_select) : 0;
        case queue_num:
            return q ? q->size : 0;
        case queue_ready:
            return q && q->ready ? 1 : 0;
        case interrupt_status:
            return interrupt_status_.load();
        case device_status:
            return state_.status | (needs_reset_ ? status::device_needs_reset : 0);
        case queue_descriptor_low:
            return q ? low(q->descriptor_table) : 0;
        case queue_descriptor_high:
            return q ? high(q->descriptor_table) : 0;
        case queue_driver_low:
            return q ? low(q->available_ring) : 0;
        case queue_driver_high:
            return q ? high(q->available_ring) : 0;
        case queue_device_low:
            return q ? low(q->used_ring) : 0;
        case queue_device_high:
            return q ? high(q->used_ring) : 0;
        // No shared memory regions: length and base of every region read as ~0.
        case shared_memory_length_low:
        case shared_memory_length_high:
        case shared_memory_base_low:
        case shared_memory_base_high:
            return 0xffff'ffff;
        case queue_reset:
            return 0;
        case config_generation:
            return state_.config_generation;
        default:
            return 0;
        }
    }

    void write_register(std::uint32_t offset, std::uint32_t value) {
        using namespace mmio_register;
        std::lock_guard lock(mutex_);
        mmio_queue_state* q = selected_queue();
        // Queue registers are frozen while a queue is ready (4.2.2.2).
        mmio_queue_state* writable_q = q && !q->ready && !active_ ? q : nullptr;
        const bool features_open =
            (state_.status & status::driver) && !(state_.status & status::features_ok);
        switch (offset) {
        case device_features_select:
            state_.device_features_select = value;
            break;
        case driver_features:
            if (!features_open || state_.driver_features_select > 1) break;
            {
                const unsigned shift = 32 * state_.driver_features_select;
                state_.driver_features = (state_.driver_features & ~(0xffff'ffffull << shift)) |
                                         (std::uint64_t{value} << shift);
            }
            break;
        case driver_features_select:
            state_.driver_features_select = value;
            break;
        case queue_select:
            state_.queue_select = value;
            break;
        case queue_num:
            if (writable_q) writable_q->size = value;
            break;
        case queue_ready:
            if (!q || active_) break;
            if (value == 1) {
                if (ready_acceptable(state_.queue_select, *q)) q->ready = true;
            } else if (value == 0) {
                q->ready = false;
            }
            break;
        case queue_notify:
            // Reached only without a matching ioeventfd: the slow path.
            if (value < kick_fds_.size()) {
                const std::uint64_t one = 1;
                [[maybe_unused]] auto n = ::write(kick_fds_[value], &one, sizeof one);
            }
            break;
        case interrupt_ack:
            interrupt_status_.fetch_and(~value);
            break;
        case device_status:
            write_status(value);
            break;
        case queue_descriptor_low:
            if (writable_q) set_low(writable_q->descriptor_table, value);
            break;
        case queue_descriptor_high:
            if (writable_q) set_high(writable_q->descriptor_table, value);
            break;
        case queue_driver_low:
            if (writable_q) set_low(writable_q->available_ring, value);
            break;
        case queue_driver_high:
            if (writable_q) set_high(writable_q->available_ring, value);
            break;
        case queue_device_low:
            if (writable_q) set_low(writable_q->used_ring, value);
            break;
        case queue_device_high:
            if (writable_q) set_high(writable_q->used_ring, value);
            break;
        case shared_memory_select:
            state_.shared_memory_select = value;
            break;
        default:
            break; // read-only or reserved: ignored
        }
    }

    void write_status(std::uint32_t value) {
        if (value == 0) {
            reset_locked();
            return;
        }
        value &= 0xff & ~status::device_needs_reset; // the device's bit, not the driver's
        const std::uint32_t old = state_.status;
        if ((value & old) != old) return; // bits are only cleared by a reset
        const std::uint32_t added = value & ~old;
        if ((added & status::features_ok) && !features_acceptable()) value &= ~status::features_ok;
        if (added & status::driver_ok) {
            if (!(value & status::features_ok)) {
                value &= ~status::driver_ok;
            } else {
                state_.status = value;
                if (!activate_locked()) flag_needs_reset();
                return;
            }
        }
        state_.status = value;
    }

    bool features_acceptable() const {
        const std::uint64_t f = state_.driver_features;
        return (f & ~core_->device_features()) == 0 && has_feature(f, feature::version_1);
    }

    bool ready_acceptable(std::size_t index, const mmio_queue_state& q) const {
        if (index >= core_->queue_count()) return false;
        if (q.size > core_->queue_max_size(index)) return false;
        return virtqueue::validate(memory_, layout_of(q)).has_value();
    }

    static queue_layout layout_of(const mmio_queue_state& q) {
        return {q.size, q.descriptor_table, q.available_ring, q.used_ring};
    }

    result<void> activate_locked() {
        for (std::size_t i = 0; i < queues_.size(); ++i) {
            bindings_[i] = {};
            queues_[i].reset();
            const auto& q = state_.queues[i];
            if (!q.ready) continue;
            SUPERMACHINE_TRY(
                vq, virtqueue::create(memory_, layout_of(q), state_.driver_features, q.position));
            queues_[i].emplace(std::move(vq));
            bindings_[i] = {&*queues_[i], kick_fds_[i], interrupt_sink(line_, &interrupt_status_)};
        }
        activation act{memory_,
                       executor_,
                       state_.driver_features,
                       bindings_,
                       interrupt_sink(line_, &interrupt_status_),
                       [this] { flag_needs_reset(); }};
        SUPERMACHINE_TRY(core_->activate(act));
        active_ = true;
        return success();
    }

    static constexpr bool pausable = requires(Core & c) { c.pause(); };

    void deactivate_locked(bool pausing) {
        if (!active_) return;
        if constexpr (pausable) {
            if (pausing)
                core_->pause();
            else
                core_->reset();
        } else {
            core_->reset();
        }
        active_ = false;
        paused_ = true;
        for (std::size_t i = 0; i < queues_.size(); ++i)
            if (queues_[i]) state_.queues[i].position = queues_[i]->position();
    }

    void reset_locked() {
        if (active_) core_->reset();
        active_ = false;
        paused_ = false;
        for (auto& q : queues_)
            q.reset();
        for (auto& b : bindings_)
            b = {};
        const std::uint32_t generation = state_.config_generation;
        state_ = {};
        state_.config_generation = generation;
        state_.queues.resize(core_->queue_count());
        interrupt_status_ = 0;
        needs_reset_ = false;
    }

    /// From any thread (the core's executor): the device hit a guest error.
    void flag_needs_reset() {
        needs_reset_ = true;
        interrupt_status_.fetch_or(interrupt_reason::config_change);
        line_.trigger();
    }

    mmio_queue_state* selected_queue() {
        return state_.queue_select < state_.queues.size() ? &state_.queues[state_.queue_select]
                                                          : nullptr;
    }
    static std::uint32_t low(std::uint64_t v) { return static_cast<std::uint32_t>(v); }
    static std::uint32_t high(std::uint64_t v) { return static_cast<std::uint32_t>(v >> 32); }
    static void set_low(std::uint64_t& v, std::uint32_t x) { v = (v & ~0xffff'ffffull) | x; }
    static void set_high(std::uint64_t& v, std::uint32_t x) {
        v = (v & 0xffff'ffffull) | (std::uint64_t{x} << 32);
    }

    const guest_memory& memory_;
    boost::asio::any_io_executor executor_;
    address_range range_;
    std::unique_ptr<Core> core_;
    interrupt_line line_;
    mutable std::mutex mutex_;
    mmio_state state_;
    std::atomic<std::uint32_t> interrupt_status_{0};
    std::atomic<bool> needs_reset_{false};
    bool active_ = false, paused_ = false, doorbells_missing_ = false;
    std::vector<int> kick_fds_, owned_fds_;
    std::vector<std::optional<virtqueue>> queues_;
    std::vector<queue_binding> bindings_;
};

} // namespace supermachine::virtio

namespace supermachine {
/// basic_machine<kvm, serial, virtio::blk<raw_file>> serves each virtio
/// device core through its own virtio-mmio window.
template <class D>
requires virtio::device_core<D> &&(!bus_device<D>)struct bus_adapter<D> {
    using type = virtio::mmio_transport<D>;
};
} // namespace supermachine
