#pragma once
// The machinery every device core needs between activate() and reset():
// wait for each queue's kick eventfd with Asio (posix::stream_descriptor on
// a strand of the device's executor), run the core's handler for that queue
// under the core's lock, count I/O in flight off the executor, and stop so
// that nothing touches guest memory after stop() returns.
//
// Why a generation counter: completions and kicks already queued on the
// executor when the driver resets must not touch the old queues. Each
// activation gets a new generation; work from an older one is dropped.
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
    /// after a restore, get no kick).
    result<void> start(const activation& act, kick_handler on_kick) {
        std::lock_guard lock(shared_->mutex);
        const std::uint64_t generation = ++shared_->generation;
        shared_->on_kick = std::move(on_kick);
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
                    return std::error_code(ec.value(), std::system_category());
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

    /// Stop serving: after return no kick handler runs and I/O in flight has
    /// finished. Callable from any thread; never blocks on the executor.
    void stop() {
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
        std::unique_lock lock(shared_->io_mutex);
        shared_->idle.wait(lock, [&] { return shared_->in_flight == 0; });
    }

    /// The current generation: stamp asynchronous work with it.
    std::uint64_t generation() const {
        std::lock_guard lock(shared_->mutex);
        return shared_->generation;
    }

    /// Run `f` under the core's lock if `generation` is still current.
    /// Not from inside a kick handler (it already holds the lock).
    template <class F>
    bool run_if_current(std::uint64_t generation, F&& f) {
        std::lock_guard lock(shared_->mutex);
        if (generation != shared_->generation) return false;
        std::forward<F>(f)();
        return true;
    }

    /// Bracket I/O that writes guest memory off the executor (thread pool):
    /// stop() waits for every begin_io() to be matched by end_io().
    /// Both may be called with or without the core's lock held.
    void begin_io() {
        std::lock_guard lock(shared_->io_mutex);
        ++shared_->in_flight;
    }
    void end_io() {
        std::lock_guard lock(shared_->io_mutex);
        if (--shared_->in_flight == 0) shared_->idle.notify_all();
    }

    /// The lock kick handlers run under (for the core's own state).
    std::mutex& mutex() { return shared_->mutex; }

private:
    struct shared {
        std::mutex mutex;    // the core's lock: queues and generation
        std::mutex io_mutex; // in_flight only, so I/O threads never wait for the core
        std::condition_variable idle;
        std::uint64_t generation = 0;
        std::uint64_t in_flight = 0;
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
            if (state->generation == generation && state->on_kick) state->on_kick(index);
        }
        void wait() {
            descriptor.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                                  [self = shared_from_this()](boost::system::error_code ec) {
                                      if (ec) return; // closed by stop()
                                      std::uint64_t count;
                                      // Drain the eventfd counter; many kicks, one pass.
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

} // namespace supermachine::virtio
