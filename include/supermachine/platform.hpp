#pragma once
// Fixed platform I/O addresses shared by the boot layer (which describes them
// in ACPI) and the devices (which serve them). One place, so the two agree.
#include <cstdint>

namespace supermachine::platform {

// 16550 UART, COM1, ISA IRQ 4.
inline constexpr std::uint16_t com1_port = 0x3f8;
inline constexpr std::uint16_t com1_port_count = 8;
inline constexpr std::uint32_t com1_gsi = 4;

// i8042 keyboard controller: only the reset line (command 0xfe on port 0x64).
inline constexpr std::uint16_t i8042_data_port = 0x60;
inline constexpr std::uint16_t i8042_command_port = 0x64;
inline constexpr std::uint8_t i8042_reset_command = 0xfe;

// Hardware-reduced ACPI (FADT flag HW_REDUCED_ACPI): the FADT points its
// SLEEP_CONTROL_REG / SLEEP_STATUS_REG / RESET_REG at these 8-bit I/O ports.
// Power-off: the guest writes (SLP_TYP << 2) | SLP_EN to the control port,
// with SLP_TYP from the DSDT's \_S5_ package.
inline constexpr std::uint16_t acpi_sleep_control_port = 0x600;
inline constexpr std::uint16_t acpi_sleep_status_port = 0x601;
inline constexpr std::uint16_t acpi_reset_port = 0x604;
inline constexpr std::uint8_t acpi_reset_value = 0x01;
inline constexpr std::uint8_t acpi_s5_sleep_type = 5;
inline constexpr std::uint8_t acpi_sleep_enable = 1u << 5; // SLP_EN in the sleep control register

} // namespace supermachine::platform
