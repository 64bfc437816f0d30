#pragma once
// A pool of restored clones of one image snapshot, for servers that run a
// command per request: the clones are restored ahead of time, so a request
// pays for an exec, not for a restore.
//
//   supermachine::pool vms(io, snapshot_dir, {.min_idle = 4, .max_size = 16});
//   auto lease = co_await vms.async_acquire(asio::use_awaitable);
//   auto out = co_await lease->async_exec({"sh", "-c", cmd}, asio::use_awaitable);
//   // the lease's destructor discards the clone; the pool restores another
//
// A clone is never reused: whatever a request did to it (files, processes,
// memory) leaves with it. The pool keeps `min_idle` clones ready, at most
// `max_size` alive (idle + leased + restoring); acquires beyond that wait,
// in order, and a waiting acquire is cancellable (Asio cancellation slots).
// A lease's replacement is restored when the lease is dropped (or at once
// when it took the last ready clone), so a restore does not compete with
// the request it replaces.
// Everything runs on a strand of the pool's executor; leases may be dropped
// on any thread.
#include <supermachine/error.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace supermachine {

struct pool_options {
    std::size_t min_idle = 2;     // restored clones kept ready (refilled as leases drop)
    std::size_t max_size = 8;     // clones alive at once: idle + leased + restoring
    snapshot_start_options clone; // how each clone is restored (timeout, cache dir)
    /// Run once in each clone before it is ready (empty: none). A restored
    /// guest's first command pays for faulting in what it touches (its
    /// memory is the snapshot's, mapped copy-on-write); this moves that off
    /// the request path. A clone whose warm-up cannot run, or runs past 30 s,
    /// is discarded and counted as failed (its exit status is not checked).
    std::vector<std::string> warm_up = {"true"};
};

/// What the pool holds now, and what it has done.
struct pool_counts {
    std::size_t idle = 0, leased = 0, restoring = 0, waiting = 0;
    std::uint64_t restored = 0, failed = 0, discarded = 0;
};

namespace detail {

template <class Executor>
class basic_pool_core : public std::enable_shared_from_this<basic_pool_core<Executor>> {
public:
    using strand_type = boost::asio::strand<Executor>;
    using vm_type = basic_vm<Executor>;
    using waiter = std::function<void(error_code, std::shared_ptr<vm_type>)>;

    basic_pool_core(Executor executor, std::filesystem::path snapshot, pool_options options)
        : strand_(boost::asio::make_strand(std::move(executor)))
        , snapshot_(std::move(snapshot))
        , options_(std::move(options)) {
        if (options_.max_size == 0) options_.max_size = 1;
        if (options_.min_idle > options_.max_size) options_.min_idle = options_.max_size;
    }

    strand_type& strand() noexcept { return strand_; }

    // All below: on the strand.

    void start() { refill(); }

    void acquire(std::uint64_t id, waiter done) {
        if (closed_) return done(make_error_code(errc::cancelled), nullptr);
        if (idle_.empty()) {
            waiters_.push_back({id, std::move(done)});
            return refill();
        }
        auto clone = std::move(idle_.front());
        idle_.pop_front();
        ++counts_.leased;
        done({}, std::move(clone));
        // The lease's replacement is restored when the lease is dropped,
        // not while its request runs: a restore competes with that request
        // for the CPU (measured at half the saturated rate: 4x the bare
        // exec instead of 2x). Only the last ready clone's acquire cannot
        // wait: the next request would find none.
        if (idle_.empty())
            refill();
        else
            publish();
    }

    void cancel(std::uint64_t id) {
        for (auto it = waiters_.begin(); it != waiters_.end(); ++it)
            if (it->id == id) {
                auto done = std::move(it->done);
                waiters_.erase(it);
                done(make_error_code(errc::cancelled), nullptr);
                publish();
                return;
            }
    }

    void release(std::shared_ptr<vm_type> clone) {
        --counts_.leased;
        ++counts_.discarded;
        clone->kill(); // never reused: its state leaves with it
        refill();
    }

    void close() {
        closed_ = true;
        auto waiters = std::move(waiters_);
        waiters_.clear();
        for (auto& w : waiters)
            w.done(make_error_code(errc::cancelled), nullptr);
        for (auto& clone : idle_)
            clone->kill();
        idle_.clear();
        for (auto& clone : warming_)
            clone->kill(); // its warm-up fails; restored() sees closed_
        publish();
    }

    pool_counts published_counts() const {
        std::lock_guard lock(published_mutex_);
        return published_;
    }

private:
    struct pending_acquire {
        std::uint64_t id;
        waiter done;
    };

    // The clones run on the pool's strand where their executor type can
    // hold it (any_io_executor), else on the pool's executor itself.
    Executor clone_executor() const {
        if constexpr (std::is_constructible_v<Executor, strand_type>)
            return Executor(strand_);
        else
            return strand_.get_inner_executor();
    }

    std::size_t alive() const { return idle_.size() + counts_.leased + restoring_; }

    // Restore until min_idle clones are ready beyond those promised to
    // waiters, within max_size. Every event ends here (or in close), so
    // this is also where the counts are published.
    void refill() {
        while (!closed_ && idle_.size() + restoring_ < options_.min_idle + waiters_.size() &&
               alive() < options_.max_size)
            restore_one();
        publish();
    }

    void publish() {
        std::lock_guard lock(published_mutex_);
        published_ = counts_;
        published_.idle = idle_.size();
        published_.restoring = restoring_;
        published_.waiting = waiters_.size();
    }

    void restore_one() {
        ++restoring_;
        vm_type::async_restore(
            clone_executor(), snapshot_, options_.clone,
            [self = this->shared_from_this()](error_code ec, std::shared_ptr<vm_type> clone) {
                boost::asio::post(self->strand_, [self, ec, clone = std::move(clone)]() mutable {
                    if (ec || !clone || self->options_.warm_up.empty() || self->closed_)
                        return self->restored(ec, std::move(clone));
                    self->warm_up(std::move(clone));
                });
            });
    }

    // The clone stays in warming_ (still counted as restoring) until its
    // warm-up answers; close() kills it meanwhile. The exec's handler holds
    // neither the clone nor the core (weak pointers): it lives inside the
    // clone, so a strong one would keep both alive for ever.
    void warm_up(std::shared_ptr<vm_type> clone) {
        agent::exec_request request;
        request.argv = options_.warm_up;
        request.timeout_ms = 30'000; // a warm-up that hangs fails the clone
        std::weak_ptr<vm_type> weak_clone = clone;
        std::weak_ptr<basic_pool_core> weak_self = this->shared_from_this();
        auto* target = clone.get();
        warming_.push_back(std::move(clone));
        target->async_exec(
            std::move(request), [weak_self, weak_clone](error_code ec, agent::exec_output out) {
                if (!ec && out.timed_out) ec = make_error_code(errc::timeout);
                auto self = weak_self.lock();
                if (!self) return;
                boost::asio::post(self->strand_, [self, weak_clone, ec] {
                    auto clone = weak_clone.lock();
                    const auto it = std::find(self->warming_.begin(), self->warming_.end(), clone);
                    if (!clone || it == self->warming_.end()) return;
                    self->warming_.erase(it);
                    self->restored(ec, std::move(clone));
                });
            });
    }

    // A clone restored (and warmed up), or a failure: on the strand.
    void restored(error_code ec, std::shared_ptr<vm_type> clone) {
        --restoring_;
        if (ec || closed_) {
            if (clone) clone->kill();
            if (ec) {
                ++counts_.failed;
                // A snapshot that cannot be restored would make waiters wait
                // for ever: fail one per failed restore instead.
                if (!waiters_.empty()) {
                    auto w = std::move(waiters_.front());
                    waiters_.pop_front();
                    w.done(ec, nullptr);
                }
            }
            return publish();
        }
        ++counts_.restored;
        if (!waiters_.empty()) {
            auto w = std::move(waiters_.front());
            waiters_.pop_front();
            ++counts_.leased;
            w.done({}, std::move(clone));
        } else {
            idle_.push_back(std::move(clone));
        }
        refill();
    }

    strand_type strand_;
    std::filesystem::path snapshot_;
    pool_options options_;
    std::deque<std::shared_ptr<vm_type>> idle_;
    std::vector<std::shared_ptr<vm_type>> warming_; // restored, running their warm-up
    std::deque<pending_acquire> waiters_;
    std::size_t restoring_ = 0;
    pool_counts counts_;
    bool closed_ = false;
    mutable std::mutex published_mutex_;
    pool_counts published_;
};

} // namespace detail

/// Clones of one snapshot, ready ahead of requests (see above). A template
/// on its executor as Asio's I/O objects are (and as basic_vm, its clones'
/// type, is): it is compiled where it is used.
template <class Executor = boost::asio::any_io_executor>
class basic_pool {
    using core_type = detail::basic_pool_core<Executor>;

public:
    using executor_type = Executor;
    using vm_type = basic_vm<Executor>;

    /// One clone, leased: use it like a std::shared_ptr<vm_type>. Dropping it
    /// discards the clone (killed at once) and the pool restores another.
    class lease {
    public:
        lease() = default;
        lease(lease&&) noexcept = default;
        lease& operator=(lease&& other) noexcept {
            reset();
            core_ = std::move(other.core_);
            clone_ = std::move(other.clone_);
            return *this;
        }
        ~lease() { reset(); }

        vm_type* operator->() const noexcept { return clone_.get(); }
        vm_type& operator*() const noexcept { return *clone_; }
        const std::shared_ptr<vm_type>& get() const noexcept { return clone_; }
        explicit operator bool() const noexcept { return clone_ != nullptr; }

        /// Give the clone back now (it is discarded, as on destruction).
        void reset() {
            if (!clone_) return;
            auto strand = core_->strand(); // before core_ moves into the handler
            boost::asio::post(strand, [core = std::move(core_), clone = std::move(clone_)] {
                core->release(clone);
            });
        }

    private:
        friend class basic_pool;
        lease(std::shared_ptr<core_type> core, std::shared_ptr<vm_type> clone)
            : core_(std::move(core))
            , clone_(std::move(clone)) {}
        std::shared_ptr<core_type> core_;
        std::shared_ptr<vm_type> clone_;
    };

    /// Clones of the snapshot directory `snapshot` (vm::async_snapshot,
    /// `supermachine snapshot -o DIR`). Restoring starts at once.
    basic_pool(executor_type executor, std::filesystem::path snapshot, pool_options options = {})
        : core_(std::make_shared<core_type>(std::move(executor), std::move(snapshot),
                                            std::move(options))) {
        boost::asio::post(core_->strand(), [core = core_] { core->start(); });
    }
    template <class ExecutionContext>
    requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
    basic_pool(ExecutionContext& context, std::filesystem::path snapshot, pool_options options = {})
        : basic_pool(executor_type(context.get_executor()), std::move(snapshot),
                     std::move(options)) {}

    basic_pool(const basic_pool&) = delete;
    basic_pool& operator=(const basic_pool&) = delete;
    /// Fails waiting acquires (errc::cancelled) and kills idle clones;
    /// leases already handed out stay usable.
    ~basic_pool() { close(); }

    executor_type get_executor() const noexcept { return core_->strand().get_inner_executor(); }

    /// A ready clone: void(error_code, pool::lease). Waits (in order) when
    /// max_size clones are alive; cancellable while it waits.
    template <class Token>
    auto async_acquire(Token&& token) {
        return boost::asio::async_initiate<Token, void(error_code, lease)>(
            [core = core_](auto handler) {
                const std::uint64_t id = next_id();
                auto slot = boost::asio::get_associated_cancellation_slot(handler);
                auto done = agent::detail::bind_completion<void(error_code, lease)>(
                    std::move(handler), core->strand());
                auto shared = std::make_shared<decltype(done)>(std::move(done));
                if (slot.is_connected())
                    slot.assign([core, id](boost::asio::cancellation_type) {
                        boost::asio::post(core->strand(), [core, id] { core->cancel(id); });
                    });
                boost::asio::post(core->strand(), [core, id, shared, slot]() mutable {
                    core->acquire(id, [core, shared, slot](error_code ec,
                                                           std::shared_ptr<vm_type> clone) mutable {
                        if (slot.is_connected()) slot.clear();
                        if (!*shared) return;
                        shared->take_and_call(ec, clone ? lease(core, std::move(clone)) : lease());
                    });
                });
            },
            token);
    }

    /// What the pool holds now (from any thread; a copy published after
    /// every event on the pool's strand).
    pool_counts counts() const { return core_->published_counts(); }

    /// Stop refilling; fail waiting acquires; kill idle clones.
    void close() {
        boost::asio::post(core_->strand(), [core = core_] { core->close(); });
    }

private:
    static std::uint64_t next_id() {
        static std::atomic<std::uint64_t> id{0};
        return ++id;
    }

    std::shared_ptr<core_type> core_;
};

/// The pool on any executor, its clones `vm`s.
using pool = basic_pool<>;

} // namespace supermachine
