// The legacy devices and the bus, without a VM: register-level behaviour.
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/bus.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>

#include <boost/test/unit_test.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <optional>
#include <string>

using namespace supermachine;

namespace {
std::uint8_t in8(auto& bus, std::uint64_t port) {
    std::byte b{};
    bus.access(address_space::port_io, port, std::span(&b, 1), false);
    return std::to_integer<std::uint8_t>(b);
}
void out8(auto& bus, std::uint64_t port, std::uint8_t v) {
    std::byte b{v};
    bus.access(address_space::port_io, port, std::span(&b, 1), true);
}
std::uint64_t drain(int fd) {
    std::uint64_t n = 0;
    if (::read(fd, &n, sizeof n) != sizeof n) return 0;
    return n;
}
} // namespace

BOOST_AUTO_TEST_CASE(uart_registers_interrupts_and_input) {
    const int efd = ::eventfd(0, EFD_NONBLOCK);
    std::string out;
    auto uart = devices::serial::create_with(interrupt_line(efd),
                                             {.sink = [&](std::string_view s) { out += s; }});
    device_bus<devices::serial> bus(std::move(uart));
    const std::uint64_t base = platform::com1_port;

    BOOST_TEST(in8(bus, base + 5) == 0x60); // THR empty, idle, no data
    out8(bus, base + 7, 0x5a);
    BOOST_TEST(in8(bus, base + 7) == 0x5a); // scratch
    out8(bus, base + 3, 0x80);              // DLAB
    out8(bus, base + 0, 0x01);
    out8(bus, base + 1, 0x00);
    BOOST_TEST(in8(bus, base + 0) == 0x01); // divisor latch, not RBR
    out8(bus, base + 3, 0x03);
    BOOST_TEST(out.empty());

    out8(bus, base, 'x');
    BOOST_TEST(out == "x");
    BOOST_TEST(drain(efd) == 0u); // no interrupt while IER is 0

    out8(bus, base + 1, 0x02); // enable THRE interrupt: THR is empty, so it fires
    BOOST_TEST(drain(efd) == 1u);
    BOOST_TEST((in8(bus, base + 2) & 0x0f) == 0x02);
    BOOST_TEST((in8(bus, base + 2) & 0x0f) == 0x01); // acknowledged by the read

    out8(bus, base + 1, 0x01); // receive interrupt only
    BOOST_TEST(bus.get<devices::serial>().send_input("ab") == 2u);
    BOOST_TEST(drain(efd) == 1u);
    BOOST_TEST((in8(bus, base + 2) & 0x0f) == 0x04);
    BOOST_TEST((in8(bus, base + 5) & 0x01) == 1);
    BOOST_TEST(in8(bus, base) == 'a');
    BOOST_TEST(in8(bus, base) == 'b');
    BOOST_TEST((in8(bus, base + 5) & 0x01) == 0);

    out8(bus, base + 4, 0x10 | 0x0b); // loopback with DTR, RTS, OUT2
    BOOST_TEST(in8(bus, base + 6) == 0xb0);
    out8(bus, base, 'L');
    BOOST_TEST(in8(bus, base) == 'L'); // looped back, not sent
    BOOST_TEST(out == "x");
    ::close(efd);
}

BOOST_AUTO_TEST_CASE(uart_input_is_bounded) {
    auto uart = devices::serial::create_with({}, {.input_limit = 4});
    BOOST_TEST(uart->send_input("abcdefgh") == 4u);
    BOOST_TEST(uart->pending_input() == 4u);
}

BOOST_AUTO_TEST_CASE(uart_detects_the_linux_panic_banner) {
    auto uart = devices::serial::create_with({}, {});
    std::optional<exit_request> got;
    uart->set_exit_handler([&](exit_request r) { got = r; });
    for (char c : std::string_view("KKernel panic - not syncin")) {
        std::byte b{static_cast<unsigned char>(c)};
        uart->write(platform::com1_port, std::span(&b, 1));
    }
    BOOST_TEST(!got);
    std::byte g{'g'};
    uart->write(platform::com1_port, std::span(&g, 1));
    BOOST_REQUIRE(got);
    BOOST_TEST(to_string(*got) == "panic");
}

BOOST_AUTO_TEST_CASE(unclaimed_ports_read_all_ones_and_requests_reach_the_handler) {
    boost::asio::any_io_executor none;
    guest_memory memory;
    device_environment env{.memory = memory, .executor = none};
    auto keyboard = value_or_throw(devices::i8042::create(env, {}));
    auto power = value_or_throw(devices::acpi_power::create(env, {}));
    std::vector<exit_request> requests;
    keyboard->set_exit_handler([&](exit_request r) { requests.push_back(r); });
    power->set_exit_handler([&](exit_request r) { requests.push_back(r); });
    device_bus<devices::i8042, devices::acpi_power> bus(std::move(keyboard), std::move(power));
    BOOST_TEST(in8(bus, 0x80) == 0xff);
    BOOST_TEST(in8(bus, platform::i8042_command_port) == 0);
    out8(bus, platform::i8042_command_port, 0x20); // not reset
    out8(bus, platform::acpi_sleep_control_port,
         (3 << 2) | platform::acpi_sleep_enable); // S3: ignored
    BOOST_TEST(requests.empty());
    out8(bus, platform::i8042_command_port, platform::i8042_reset_command);
    out8(bus, platform::acpi_sleep_control_port,
         (platform::acpi_s5_sleep_type << 2) | platform::acpi_sleep_enable);
    out8(bus, platform::acpi_reset_port, platform::acpi_reset_value);
    BOOST_REQUIRE(requests.size() == 3u);
    BOOST_TEST(to_string(requests[0]) == "reset");
    BOOST_TEST(to_string(requests[1]) == "power-off");
    BOOST_TEST(to_string(requests[2]) == "reset");
    // A 2-byte access straddling a range end is not claimed.
    std::byte two[2]{};
    BOOST_TEST(!bus.access(address_space::port_io, platform::acpi_sleep_status_port, two, false));
}

// Hostile register traffic: every offset, every access size, random values,
// including the DLAB and loopback paths. Nothing may crash, input stays
// bounded, and the UART keeps answering sanely afterwards.
BOOST_AUTO_TEST_CASE(uart_survives_random_register_traffic) {
    std::size_t output = 0;
    auto uart = devices::serial::create_with(
        {}, {.sink = [&](std::string_view s) { output += s.size(); }, .input_limit = 128});
    device_bus<devices::serial> bus(std::move(uart));
    std::uint64_t state = 0x9e3779b97f4a7c15ull;
    auto next = [&] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return state;
    };
    for (int i = 0; i < 200000; ++i) {
        const std::uint64_t r = next();
        const std::uint64_t port =
            platform::com1_port - 2 + r % 12; // a little outside on both sides
        const std::size_t size = std::size_t{1} << ((r >> 8) % 3);
        std::byte data[4];
        for (auto& b : data)
            b = std::byte(static_cast<unsigned char>(r >> 16));
        bus.access(address_space::port_io, port, std::span(data, size), (r >> 24) & 1);
        if (i % 1000 == 0) bus.get<devices::serial>().send_input("xyz");
        BOOST_REQUIRE(bus.get<devices::serial>().pending_input() <= 128u);
    }
    out8(bus, platform::com1_port + 3, 0x03); // DLAB off
    out8(bus, platform::com1_port + 4, 0x00); // loopback off
    const std::size_t before = output;
    out8(bus, platform::com1_port, 'z');
    BOOST_TEST(output == before + 1);
    BOOST_TEST((in8(bus, platform::com1_port + 5) & 0x60) == 0x60);
}
