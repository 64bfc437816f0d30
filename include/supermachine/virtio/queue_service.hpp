#pragma once
// The machinery every device core needs between activate() and reset():
// wait for each queue's kick eventfd with Asio (posix::stream_descriptor on
// a strand of the device's executor), run the core's handler for that queue
// under the core's lock, track I/O in flight off the executor, and stop so
// that nothing touches guest memory after stop() returns.
//
// stop() drains rather than abandons: requests already taken from a ring are
// finished and returned to the driver (so a pause for a snapshot loses none),
// then a generation counter invalidates whatever is still queued on the
// executor from the old activation.
#include <supermachine/error.hpp>
#include <supermachine/virtio/device.hpp>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

namespace supermachine::virtio {

class queue_service {
public:
    /// Called with the core's lock held, on the executor, for queue `index`.
    using kick_handler = std::function<void(std::size_t index)>;

    queue_service()
        : shared_(std::make_shared<shared>()) {}
    queue_service(const queue_service&) = delete;
    queue_service& operator=(const queue_service&) = delete;
    ~queue_service() { stop(); }

    /// Start listening on every bound queue's kick fd; each queue is also
    /// polled once at start (buffers made available before DRIVER_OK, or
    /// before a snapshot was restored, get no kick).
    result<void> start(const activation& act, kick_handler on_kick) {
        stop();
        std::lock_guard lock(shared_->mutex);
        const std::uint64_t generation = ++shared_->generation;
        shared_->on_kick = std::move(on_kick);
        shared_->accepting = true;
        for (std::size_t i = 0; i < act.queues.size(); ++i) {
            const auto& q = act.queues[i];
            if (!q.queue) continue;
            auto l = std::make_shared<listener>(act.executor, shared_, i, generation);
            if (q.kick_fd >= 0) {
                // Our own descriptor, so closing it leaves the transport's eventfd open.
                const int fd = ::fcntl(q.kick_fd, F_DUPFD_CLOEXEC, 0);
                if (fd < 0) return errno_code(errno);
                ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
                boost::system::error_code ec;
                l->descriptor.assign(fd, ec);
                if (ec) {
                    ::close(fd);
                    return error_code(ec.value(), boost::system::system_category());
                }
            }
            listeners_.push_back(l);
            boost::asio::post(l->strand, [l] {
                l->fire();
                if (l->descriptor.is_open()) l->wait();
            });
        }
        return success();
    }

    /// Stop serving. When it returns: no kick handler runs, I/O taken from the
    /// rings has finished (and was completed through run_if_current), and
    /// later work stamped with an older generation is dropped. Callable from
    /// any thread; never waits for the executor.
    void stop() {
        {
            std::lock_guard lock(shared_->mutex);
            shared_->accepting = false; // no new requests are taken from the rings
        }
        {
            std::unique_lock lock(shared_->io_mutex);
            shared_->idle.wait(lock, [&] { return shared_->in_flight == 0; });
        }
        std::vector<std::shared_ptr<listener>> old;
        {
            std::lock_guard lock(shared_->mutex);
            ++shared_->generation;
            shared_->on_kick = nullptr;
            old.swap(listeners_);
        }
        for (auto& l : old)
            boost::asio::dispatch(l->strand, [l] {
                boost::system::error_code ignored;
                l->descriptor.close(ignored);
            });
    }

    /// Run queue `index`'s kick handler as if the driver had kicked it, on
    /// the queue's strand: for devices that have new work for a queue from
    /// the host side (e.g. received data for an rx queue). Callable from any
    /// thread; a no-op when stopped or for a queue not bound.
    void poll(std::size_t index) {
        std::shared_ptr<listener> l;
        {
            std::lock_guard lock(shared_->mutex);
            for (auto& x : listeners_)
                if (x->index == index) l = x;
        }
        if (l) boost::asio::post(l->strand, [l] { l->fire(); });
    }

    /// The current generation: stamp asynchronous work with it. To touch
    /// the queues from outside a kick handler, take it after start() and
    /// use run_if_current().
    std::uint64_t generation() const {
        std::lock_guard lock(shared_->mutex);
        return shared_->generation;
    }

    /// The current generation, from inside a kick handler (the lock is held).
    std::uint64_t generation_in_handler() const noexcept { return shared_->generation; }

    /// Run `f` under the core's lock if `generation` is still current (also
    /// while stop() drains). Not from inside a kick handler: it holds the lock.
    template <class F>
    bool run_if_current(std::uint64_t generation, F&& f) {
        std::lock_guard lock(shared_->mutex);
        if (generation != shared_->generation) return false;
        std::forward<F>(f)();
        return true;
    }

    /// Bracket work that touches guest memory off the executor (thread
    /// pool): stop() waits until every begin_io() has its end_io(). Call
    /// begin_io() from the kick handler (under the lock), end_io() after the
    /// completion was pushed.
    void begin_io() {
        std::lock_guard lock(shared_->io_mutex);
        ++shared_->in_flight;
    }
    void end_io() {
        std::lock_guard lock(shared_->io_mutex);
        if (--shared_->in_flight == 0) shared_->idle.notify_all();
    }

private:
    struct shared {
        std::mutex mutex;    // the core's lock: queues, generation, accepting
        std::mutex io_mutex; // in_flight only, so I/O threads never wait for the core
        std::condition_variable idle;
        std::uint64_t generation = 0;
        std::uint64_t in_flight = 0;
        bool accepting = false;
        kick_handler on_kick;
    };

    struct listener : std::enable_shared_from_this<listener> {
        listener(boost::asio::any_io_executor executor, std::shared_ptr<shared> s, std::size_t i,
                 std::uint64_t g)
            : strand(boost::asio::make_strand(executor))
            , descriptor(strand)
            , state(std::move(s))
            , index(i)
            , generation(g) {}

        void fire() {
            std::lock_guard lock(state->mutex);
            if (state->generation == generation && state->accepting && state->on_kick)
                state->on_kick(index);
        }
        void wait() {
            descriptor.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                                  [self = shared_from_this()](boost::system::error_code ec) {
                                      if (ec) return; // closed by stop()
                                      std::uint64_t count;
                                      // Drain the eventfd counter: many kicks, one pass.
                                      [[maybe_unused]] auto n = ::read(
                                          self->descriptor.native_handle(), &count, sizeof count);
                                      self->fire();
                                      self->wait();
                                  });
        }

        boost::asio::strand<boost::asio::any_io_executor> strand;
        boost::asio::posix::stream_descriptor descriptor;
        std::shared_ptr<shared> state;
        std::size_t index;
        std::uint64_t generation;
    };

    std::shared_ptr<shared> shared_;
    std::vector<std::shared_ptr<listener>> listeners_;
};

/// Take every available chain from `binding`'s queue, calling
/// `on_chain(virtqueue::available_chain&&)` for each, with notifications
/// re-enabled race-free at the end (virtio 1.2 2.7.13 "notification
/// suppression"). A broken ring returns errc::device_broken.
template <class F>
result<void> for_each_available(queue_binding& binding, F&& on_chain) {
    virtqueue& q = *binding.queue;
    for (;;) {
        q.disable_notifications();
        for (;;) {
            SUPERMACHINE_TRY(popped, q.pop());
            if (!popped) break;
            on_chain(std::move(*popped));
        }
        if (!q.enable_notifications()) return success();
    }
}

/// Return a chain to the driver and interrupt it if it asked to be.
inline result<void> complete_chain(queue_binding& binding, std::uint16_t head,
                                   std::uint32_t written) {
    SUPERMACHINE_TRY(binding.queue->push_used(head, written));
    if (binding.queue->should_notify()) binding.interrupt.used_buffer();
    return success();
}

} // namespace supermachine::virtio
