#pragma once
// How a bus device ends the machine: power-off and reset registers, panic
// notices. A device that can do so provides
//   void set_exit_handler(exit_request_handler handler);
// and basic_machine connects it at creation (detected with exit_requesting).
// The handler is called on the vCPU thread that made the access; it must
// only record the request and kick the vCPUs.
#include <concepts>
#include <functional>
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

template <class D>
concept exit_requesting = requires(D& d, exit_request_handler handler) {
    d.set_exit_handler(std::move(handler));
};

} // namespace supermachine
