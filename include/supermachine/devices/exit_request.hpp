#pragma once
// How a bus device ends the machine: power-off and reset registers, panic
// notices. A device that can do so provides
//   void set_exit_handler(exit_request_handler handler);
// and basic_machine connects it at creation (detected with exit_requesting).
// The handler is called on the vCPU thread that made the access; it must
// only record the request and kick the vCPUs.
#include <concepts>
#include <functional>
#include <mutex>
#include <string_view>

namespace supermachine {

enum class exit_request {
    power_off, // ACPI S5
    reset,     // i8042 reset line, ACPI reset register
    panic,     // the guest said it crashed
};

inline constexpr std::string_view to_string(exit_request r) noexcept {
    switch (r) {
    case exit_request::power_off:
        return "power-off";
    case exit_request::reset:
        return "reset";
    case exit_request::panic:
        return "panic";
    }
    return "?";
}

using exit_request_handler = std::function<void(exit_request)>;

/// The handler a device holds: set by the machine, called from vCPU
/// threads. The handler is copied under the lock and called outside it, so
/// it may kick vCPUs (and so re-enter nothing of ours) without deadlock.
class exit_request_slot {
public:
    void set(exit_request_handler handler) {
        std::lock_guard lock(mutex_);
        handler_ = std::move(handler);
    }
    void request(exit_request r) const {
        exit_request_handler handler;
        {
            std::lock_guard lock(mutex_);
            handler = handler_;
        }
        if (handler) handler(r);
    }

private:
    mutable std::mutex mutex_;
    exit_request_handler handler_;
};

template <class D>
concept exit_requesting = requires(D& d, exit_request_handler handler) {
    d.set_exit_handler(std::move(handler));
};

} // namespace supermachine
