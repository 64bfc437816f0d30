#pragma once
// A move-only type-erased callable, and the bridge from an Asio completion
// handler to it: the stored callable posts the handler to its associated
// executor (never invoked inline from the initiating function) and keeps
// that executor's work alive until then. Boost 1.74 has no
// any_completion_handler, hence this.
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

#include <memory>
#include <tuple>
#include <utility>

namespace supermachine::agent::detail {

template <class Signature>
class unique_function;

template <class R, class... Args>
class unique_function<R(Args...)> {
public:
    unique_function() = default;
    template <class F>
    requires(!std::is_same_v<std::decay_t<F>, unique_function>) unique_function(F&& f)
        : impl_(std::make_unique<model<std::decay_t<F>>>(std::forward<F>(f))) {}
    unique_function(unique_function&&) noexcept = default;
    unique_function& operator=(unique_function&&) noexcept = default;

    explicit operator bool() const { return impl_ != nullptr; }
    R operator()(Args... args) { return impl_->call(std::forward<Args>(args)...); }

    /// Calls once and empties: the usual way a completion is delivered.
    R take_and_call(Args... args) {
        auto impl = std::move(impl_);
        return impl->call(std::forward<Args>(args)...);
    }

private:
    struct concept_t {
        virtual ~concept_t() = default;
        virtual R call(Args... args) = 0;
    };
    template <class F>
    struct model final : concept_t {
        explicit model(F f)
            : f(std::move(f)) {}
        R call(Args... args) override { return f(std::forward<Args>(args)...); }
        F f;
    };
    std::unique_ptr<concept_t> impl_;
};

/// Wraps an Asio handler so that calling the result posts the handler with the arguments.
template <class Signature, class Handler, class IoExecutor>
unique_function<Signature> bind_completion(Handler handler, const IoExecutor& io_executor) {
    auto executor = boost::asio::get_associated_executor(handler, io_executor);
    auto work = boost::asio::make_work_guard(executor);
    return [handler = std::move(handler), work = std::move(work)](auto... args) mutable {
        auto executor = work.get_executor();
        boost::asio::post(executor, [handler = std::move(handler), work = std::move(work),
                                     args = std::make_tuple(std::move(args)...)]() mutable {
            std::apply(std::move(handler), std::move(args));
        });
    };
}

} // namespace supermachine::agent::detail
