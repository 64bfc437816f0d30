// A custom bus device in ~40 lines: a POST-code port (0x80) that records what
// the guest writes, next to the stock serial/i8042/ACPI devices. The guest
// here is five instructions placed by hand (config.loader), so the example
// needs no kernel: it writes 0x11, 0x22, 0x33 to port 0x80 and powers off.
//
//   build/example/custom_device/post_code_example
#include <supermachine/backend/kvm.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>

#include <boost/asio/io_context.hpp>

#include <array>
#include <cstdio>
#include <mutex>
#include <vector>

namespace sm = supermachine;

// Meets sm::bus_device (device.hpp): config, requirements, create, ranges, read, write.
class post_code_port {
public:
    struct config {};
    static constexpr sm::device_requirements requirements{}; // no MMIO window, no GSI

    static sm::result<std::unique_ptr<post_code_port>> create(sm::device_environment&,
                                                              const config&) {
        return std::make_unique<post_code_port>();
    }
    std::span<const sm::address_range> ranges() const noexcept { return ranges_; }
    void read(std::uint64_t, std::span<std::byte> data) {
        std::fill(data.begin(), data.end(), std::byte{0});
    }
    void write(std::uint64_t, std::span<const std::byte> data) { // runs on the vCPU thread
        std::lock_guard lock(mutex_);
        codes_.push_back(std::to_integer<std::uint8_t>(data[0]));
    }
    std::vector<std::uint8_t> codes() const {
        std::lock_guard lock(mutex_);
        return codes_;
    }

private:
    static constexpr std::array<sm::address_range, 1> ranges_{
        sm::address_range{sm::address_space::port_io, 0x80, 1}};
    mutable std::mutex mutex_;
    std::vector<std::uint8_t> codes_;
};

using machine = sm::basic_machine<sm::backend::kvm, sm::devices::serial, sm::devices::i8042,
                                  sm::devices::acpi_power, post_code_port>;

int main() {
    machine::config cfg;
    cfg.memory_mib = 16;
    cfg.loader = [](const sm::guest_memory& memory,
                    const sm::boot::linux_boot_config&) -> sm::result<sm::backend::entry_state> {
        // Flat GDT (code 0x10, data 0x18), identity-mapped first GiB, code at 1 MiB.
        const std::uint64_t gdt[] = {0, 0, 0x00af9b000000ffff, 0x00cf93000000ffff};
        SUPERMACHINE_TRY(memory.write(0x500, std::as_bytes(std::span(gdt))));
        SUPERMACHINE_TRY(memory.write_object<std::uint64_t>(0x9000, 0xa000 | 3));
        SUPERMACHINE_TRY(memory.write_object<std::uint64_t>(0xa000, 0xb000 | 3));
        for (std::uint64_t i = 0; i < 512; ++i) { // braces: SUPERMACHINE_TRY is several statements
            SUPERMACHINE_TRY(memory.write_object<std::uint64_t>(0xb000 + i * 8, (i << 21) | 0x83));
        }
        const std::uint8_t code[] = {
            0xb0, 0x11, 0xe6, 0x80,                   // mov al, 0x11; out 0x80, al
            0xb0, 0x22, 0xe6, 0x80,                   // mov al, 0x22; out 0x80, al
            0xb0, 0x33, 0xe6, 0x80,                   // mov al, 0x33; out 0x80, al
            0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, // ACPI S5: out 0x600, (5 << 2) | SLP_EN
            0xeb, 0xfe,                               // jmp $
        };
        SUPERMACHINE_TRY(memory.write(0x100000, std::as_bytes(std::span(code))));
        sm::backend::entry_state entry;
        entry.rip = 0x100000;
        entry.rsp = 0x8ff0;
        entry.cr3 = 0x9000;
        entry.gdt_base = 0x500;
        entry.gdt_limit = sizeof gdt - 1;
        return entry;
    };
    boost::asio::io_context io;
    auto vm = sm::value_or_throw(machine::create(io.get_executor(), std::move(cfg)));
    sm::value_or_throw(vm->start());
    const sm::machine_exit exit = vm->wait();
    std::printf("machine ended: %s; POST codes:", exit.describe().c_str());
    for (auto code : vm->device<post_code_port>().codes())
        std::printf(" %02x", code);
    std::printf("\n");
    return exit.what == sm::machine_exit::reason::power_off ? 0 : 1;
}
