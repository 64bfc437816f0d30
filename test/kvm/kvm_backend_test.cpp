// The kvm backend on the real /dev/kvm with hand-placed guests (no loader).
#include "hand_placed_guest.hpp"

#include <skip.hpp>
#include <supermachine/backend/kvm.hpp>

#include <boost/test/unit_test.hpp>

#include <chrono>
#include <string>
#include <thread>
#include <unistd.h>

using namespace supermachine;
using supermachine::backend::vcpu_exit;

namespace {

void require_kvm() {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) test::skip("no usable /dev/kvm on this host");
}

struct recorder {
    std::string text;
    std::uint16_t stop_port = 0x604;
    bool stopped = false;
    void operator()(address_space space, std::uint64_t address, std::span<std::byte> data,
                    bool is_write) {
        if (space != address_space::port_io || !is_write) {
            for (auto& b : data)
                b = std::byte{0xff};
            return;
        }
        if (address == 0x3f8) text.push_back(static_cast<char>(data[0]));
        if (address == stop_port) stopped = true;
    }
};

struct hand_vm {
    guest_memory memory = value_or_throw(guest_memory::allocate_x86(32u << 20));
    std::unique_ptr<backend::kvm> vm;
    explicit hand_vm(std::uint32_t vcpus = 1) {
        require_kvm();
        vm = value_or_throw(backend::kvm::create(memory, {.vcpus = vcpus}));
    }
};

} // namespace

BOOST_AUTO_TEST_CASE(port_io_reaches_the_handler_in_order) {
    hand_vm h;
    auto code = test::code_print(0x3f8, "hello");
    test::append(code, test::code_out(0x604, 1));
    code.insert(code.end(), {0xeb, 0xfe}); // jmp $
    BOOST_REQUIRE(h.vm->set_entry_state(0, test::place_hand_guest(h.memory, code)));
    recorder r;
    // The handler sees "hello" then the stop port; the guest then spins, so kick it.
    std::thread kicker([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        h.vm->kick(0);
    });
    auto exit = h.vm->run_vcpu(0, r);
    kicker.join();
    BOOST_TEST(static_cast<int>(exit.what) == static_cast<int>(vcpu_exit::kind::interrupted));
    BOOST_TEST(r.text == "hello");
    BOOST_TEST(r.stopped);
}

BOOST_AUTO_TEST_CASE(triple_fault_is_a_shutdown_exit) {
    hand_vm h;
    std::vector<std::uint8_t> code = {0x0f, 0x0b}; // ud2 with an empty IDT
    BOOST_REQUIRE(h.vm->set_entry_state(0, test::place_hand_guest(h.memory, code)));
    recorder r;
    auto exit = h.vm->run_vcpu(0, r);
    BOOST_TEST(static_cast<int>(exit.what) == static_cast<int>(vcpu_exit::kind::shutdown));
}

BOOST_AUTO_TEST_CASE(kick_before_run_returns_at_once) {
    hand_vm h;
    std::vector<std::uint8_t> code = {0xeb, 0xfe};
    BOOST_REQUIRE(h.vm->set_entry_state(0, test::place_hand_guest(h.memory, code)));
    h.vm->kick(0);
    recorder r;
    auto exit = h.vm->run_vcpu(0, r);
    BOOST_TEST(static_cast<int>(exit.what) == static_cast<int>(vcpu_exit::kind::interrupted));
}

BOOST_AUTO_TEST_CASE(instruction_bytes_are_read_through_the_page_tables) {
    hand_vm h;
    std::vector<std::uint8_t> code = {0x90, 0x90, 0xeb, 0xfe};
    BOOST_REQUIRE(h.vm->set_entry_state(0, test::place_hand_guest(h.memory, code)));
    auto at = h.vm->read_instruction_at(0);
    BOOST_TEST(at.rip == test::hand_code_address);
    BOOST_REQUIRE(at.instruction_length == 15);
    BOOST_TEST(static_cast<int>(at.instruction[0]) == 0x90);
    BOOST_TEST(static_cast<int>(at.instruction[2]) == 0xeb);
}

BOOST_AUTO_TEST_CASE(interrupt_lines_and_doorbells) {
    hand_vm h;
    auto line = h.vm->make_interrupt_line(5);
    BOOST_REQUIRE(line);
    BOOST_TEST(bool(line.value()));
    auto again = h.vm->make_interrupt_line(5);
    BOOST_REQUIRE(again);
    BOOST_TEST(again.value().native_handle() == line.value().native_handle());
    BOOST_TEST(!h.vm->make_interrupt_line(24)); // beyond the IOAPIC
    auto doorbell = h.vm->make_doorbell(x86_layout::virtio_mmio_base + 0x50, 4, std::nullopt);
    BOOST_REQUIRE(doorbell);
    BOOST_TEST(doorbell.value() >= 0);
    BOOST_TEST(!h.vm->make_doorbell(x86_layout::virtio_mmio_base, 3, std::nullopt));
}

BOOST_AUTO_TEST_CASE(bad_configurations_are_refused) {
    require_kvm();
    auto memory = value_or_throw(guest_memory::allocate_x86(32u << 20));
    auto zero = backend::kvm::create(memory, {.vcpus = 0});
    BOOST_TEST(!zero);
    auto many = backend::kvm::create(memory, {.vcpus = 100000});
    BOOST_REQUIRE(!many);
    BOOST_TEST(many.error() == make_error_code(errc::too_many_vcpus));
    auto missing = backend::kvm::create(memory, {.vcpus = 1, .device_path = "/nonexistent/kvm"});
    BOOST_REQUIRE(!missing);
    BOOST_TEST(missing.error() == make_error_code(errc::kvm_unavailable));
}
