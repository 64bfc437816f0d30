#pragma once
// What basic_machine needs from a hypervisor backend (a policy type, chosen at
// compile time; nothing virtual). backend/kvm.hpp is the model on Linux KVM.
//
// The machine owns the vCPU threads; the backend owns the VM, its vCPUs and
// every kernel object (irqfds, ioeventfds). A vCPU thread calls
// run_vcpu(index, handler) in a loop: port-I/O and MMIO exits are handed to
// `handler(space, address, data, is_write)` on that thread, synchronously,
// and run_vcpu returns only for exits the machine must decide about
// (vcpu_exit). kick(index) makes a running (or about-to-run) run_vcpu return
// vcpu_exit::kind::interrupted promptly, from any thread.
#include <supermachine/device.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>

namespace supermachine::backend {

/// Register state at the kernel's entry point (what the boot loader decided).
/// Flat segments; by default code selector 0x10, data selector 0x18 (Linux __BOOT_CS/__BOOT_DS).
struct entry_state {
    bool long_mode = true; // false: 32-bit protected mode, paging off (PVH entry)
    std::uint64_t rip = 0;
    std::uint64_t rsi = 0; // zero page (Linux 64-bit boot protocol)
    std::uint64_t rbx = 0; // PVH start_info
    std::uint64_t rsp = 0;
    std::uint64_t cr3 = 0; // identity page tables (long mode)
    std::uint64_t gdt_base = 0;
    std::uint16_t gdt_limit = 0;
    std::uint64_t idt_base = 0;
    std::uint16_t idt_limit = 0;
    std::uint16_t code_selector = 0x10;
    std::uint16_t data_selector = 0x18;
};

/// Why run_vcpu returned.
struct vcpu_exit {
    enum class kind {
        interrupted,       // kick() or a signal: the machine decides whether to run again
        halted,            // HLT with no in-kernel irqchip to wait in
        shutdown,          // KVM_EXIT_SHUTDOWN: triple fault
        emulation_failure, // KVM_EXIT_INTERNAL_ERROR / EMULATION: rip + bytes
        internal_error,    // other KVM internal errors, FAIL_ENTRY, unknown exits
        system_shutdown,   // KVM_EXIT_SYSTEM_EVENT SHUTDOWN (e.g. PSCI/hyper-call power-off)
        system_reset,      // KVM_EXIT_SYSTEM_EVENT RESET
        system_crash,      // KVM_EXIT_SYSTEM_EVENT CRASH (e.g. Hyper-V crash MSRs)
        run_failed,        // the KVM_RUN ioctl itself failed (error holds errno)
    };
    kind what = kind::interrupted;
    std::uint64_t rip = 0;
    std::array<std::byte, 15> instruction{}; // bytes at rip, as far as readable
    std::uint8_t instruction_length = 0;
    std::uint64_t detail = 0; // exit_reason / suberror / hardware reason, for messages
    error_code error;

    std::span<const std::byte> instruction_bytes() const noexcept {
        return {instruction.data(), instruction_length};
    }
};

/// The access handler a vCPU thread gives run_vcpu.
template <class H>
concept access_handler = requires(H& h, address_space space, std::uint64_t address,
                                  std::span<std::byte> data, bool is_write) {
    h(space, address, data, is_write);
};

/// An access handler that ignores everything (concept checks, tests).
struct null_access_handler {
    void operator()(address_space, std::uint64_t, std::span<std::byte>, bool) const noexcept {}
};

template <class B>
concept hypervisor_backend = requires(B& b, const B& cb, const guest_memory& memory,
                                      const typename B::config& cfg, std::uint32_t index,
                                      const entry_state& entry, std::uint64_t address,
                                      std::uint32_t gsi) {
    typename B::config;
    { B::create(memory, cfg) } -> std::same_as<result<std::unique_ptr<B>>>;
    { cb.vcpu_count() } -> std::convertible_to<std::uint32_t>;
    { b.set_entry_state(index, entry) } -> std::same_as<result<void>>;
    {b.kick(index)};
    { b.make_interrupt_line(gsi) } -> std::same_as<result<interrupt_line>>;
    {
        b.make_doorbell(address, std::uint32_t{4}, std::optional<std::uint64_t>{})
        } -> std::same_as<result<int>>;
    { b.run_vcpu(index, std::declval<null_access_handler&>()) } -> std::same_as<vcpu_exit>;
};

} // namespace supermachine::backend
