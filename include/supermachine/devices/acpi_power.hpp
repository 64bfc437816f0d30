#pragma once
// The hardware-reduced ACPI power registers the FADT points at
// (platform.hpp): the sleep control register (writing SLP_TYP = S5 with
// SLP_EN powers off), the sleep status register (reads 0: never asleep) and
// the reset register (writing the FADT's reset value resets).
#include <supermachine/device.hpp>
#include <supermachine/devices/exit_request.hpp>
#include <supermachine/platform.hpp>

#include <array>
#include <memory>

namespace supermachine::devices {

class acpi_power {
public:
    struct config {};
    static constexpr device_requirements requirements{};

    static result<std::unique_ptr<acpi_power>> create(device_environment&, const config&) {
        return std::unique_ptr<acpi_power>(new acpi_power());
    }

    std::span<const address_range> ranges() const noexcept { return ranges_; }

    void set_exit_handler(exit_request_handler handler) { exit_.set(std::move(handler)); }

    void read(std::uint64_t, std::span<std::byte> data) {
        for (auto& b : data)
            b = std::byte{0};
    }

    void write(std::uint64_t address, std::span<const std::byte> data) {
        if (data.empty()) return;
        const auto value = std::to_integer<std::uint8_t>(data[0]);
        if (address == platform::acpi_sleep_control_port) {
            const unsigned sleep_type = (value >> 2) & 0x7;
            if ((value & platform::acpi_sleep_enable) && sleep_type == platform::acpi_s5_sleep_type)
                exit_.request(exit_request::power_off);
        } else if (address == platform::acpi_reset_port && value == platform::acpi_reset_value) {
            exit_.request(exit_request::reset);
        }
    }

private:
    acpi_power() = default;
    static constexpr std::array<address_range, 2> ranges_{
        address_range{address_space::port_io, platform::acpi_sleep_control_port, 2},
        address_range{address_space::port_io, platform::acpi_reset_port, 1}};
    exit_request_slot exit_;
};

static_assert(bus_device<acpi_power>);

} // namespace supermachine::devices
