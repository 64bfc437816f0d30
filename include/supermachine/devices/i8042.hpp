#pragma once
// The i8042 keyboard controller, reduced to what a microVM needs: its reset
// line. Writing command 0xfe to port 0x64 (pulse the CPU reset line) is how
// Linux reboots with `reboot=k`; it asks the machine for exit_request::reset.
// Everything else reads as an idle controller with no keyboard: status 0
// (nothing to read, ready for input), data 0.
#include <supermachine/device.hpp>
#include <supermachine/devices/exit_request.hpp>
#include <supermachine/platform.hpp>

#include <array>
#include <memory>

namespace supermachine::devices {

class i8042 {
public:
    struct config {};
    static constexpr device_requirements requirements{};

    static result<std::unique_ptr<i8042>> create(device_environment&, const config&) {
        return std::unique_ptr<i8042>(new i8042());
    }

    std::span<const address_range> ranges() const noexcept { return ranges_; }

    void set_exit_handler(exit_request_handler handler) { exit_.set(std::move(handler)); }

    void read(std::uint64_t, std::span<std::byte> data) {
        for (auto& b : data)
            b = std::byte{0};
    }

    void write(std::uint64_t address, std::span<const std::byte> data) {
        if (data.empty() || address != platform::i8042_command_port) return;
        if (std::to_integer<std::uint8_t>(data[0]) != platform::i8042_reset_command) return;
        exit_.request(exit_request::reset);
    }

private:
    i8042() = default;
    static constexpr std::array<address_range, 2> ranges_{
        address_range{address_space::port_io, platform::i8042_data_port, 1},
        address_range{address_space::port_io, platform::i8042_command_port, 1}};
    exit_request_slot exit_;
};

static_assert(bus_device<i8042>);

} // namespace supermachine::devices
