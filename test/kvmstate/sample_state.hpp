#pragma once
// Synthetic KVM states (no /dev/kvm needed) for the codec tests and the
// fuzz seed: every section present, recognisable byte patterns.
#include <supermachine/backend/kvm_state.hpp>

#include <cstring>

namespace supermachine::test {

template <class T>
void fill_pattern(T& value, std::uint8_t seed) {
    auto* bytes = reinterpret_cast<unsigned char*>(&value);
    for (std::size_t i = 0; i < sizeof(T); ++i)
        bytes[i] = static_cast<unsigned char>(seed + i * 7);
}

inline backend::kvm_state::vcpu_state sample_vcpu_state(bool with_xsave = true) {
    backend::kvm_state::vcpu_state s;
    fill_pattern(s.regs, 1);
    fill_pattern(s.sregs, 2);
    if (with_xsave) {
        s.xsave.resize(4096);
        for (std::size_t i = 0; i < s.xsave.size(); ++i)
            s.xsave[i] = static_cast<std::byte>(i * 13);
    } else {
        kvm_fpu fpu;
        fill_pattern(fpu, 3);
        s.fpu = fpu;
    }
    kvm_xcrs xcrs{};
    xcrs.nr_xcrs = 1;
    xcrs.xcrs[0].value = 7;
    s.xcrs = xcrs;
    s.msrs = {{0x10, 123456789}, {0x174, 0x10}, {0x6e0, 0}, {0xc0000080, 0xd01}};
    s.msrs_refused = {0x4b564d05};
    fill_pattern(s.lapic, 4);
    s.mp_state.mp_state = KVM_MP_STATE_RUNNABLE;
    kvm_vcpu_events events;
    fill_pattern(events, 5);
    s.events = events;
    kvm_debugregs debug;
    fill_pattern(debug, 6);
    s.debug_registers = debug;
    s.tsc_khz = 2'596'120;
    s.cpuid.resize(3);
    for (std::size_t i = 0; i < s.cpuid.size(); ++i)
        fill_pattern(s.cpuid[i], static_cast<std::uint8_t>(10 + i));
    return s;
}

inline backend::kvm_state::vm_state sample_vm_state() {
    backend::kvm_state::vm_state s;
    fill_pattern(s.pic_master, 20);
    s.pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
    fill_pattern(s.pic_slave, 21);
    s.pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    fill_pattern(s.ioapic, 22);
    s.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
    kvm_pit_state2 pit;
    fill_pattern(pit, 23);
    s.pit = pit;
    fill_pattern(s.clock, 24);
    s.captured_at_realtime_ns = 1'700'000'000'000'000'000ull;
    return s;
}

template <class T>
bool same_bytes(const T& a, const T& b) {
    return std::memcmp(&a, &b, sizeof(T)) == 0;
}

inline bool same_vcpu_state(const backend::kvm_state::vcpu_state& a,
                            const backend::kvm_state::vcpu_state& b) {
    auto same_optional = [](const auto& x, const auto& y) {
        return x.has_value() == y.has_value() && (!x || same_bytes(*x, *y));
    };
    return same_bytes(a.regs, b.regs) && same_bytes(a.sregs, b.sregs) && a.xsave == b.xsave &&
           same_optional(a.fpu, b.fpu) && same_optional(a.xcrs, b.xcrs) && a.msrs == b.msrs &&
           a.msrs_refused == b.msrs_refused && same_bytes(a.lapic, b.lapic) &&
           a.mp_state.mp_state == b.mp_state.mp_state && same_optional(a.events, b.events) &&
           same_optional(a.debug_registers, b.debug_registers) && a.tsc_khz == b.tsc_khz &&
           a.cpuid.size() == b.cpuid.size() &&
           (a.cpuid.empty() ||
            std::memcmp(a.cpuid.data(), b.cpuid.data(), a.cpuid.size() * sizeof(a.cpuid[0])) == 0);
}

} // namespace supermachine::test
