#pragma once
// ioctl numbers and constants for KVM state capture/restore (x86-64).
//
// <linux/kvm.h> declares several variable-length structs with
// __DECLARE_FLEX_ARRAY, which in C++ adds a one-byte member: sizeof grows
// (kvm_xsave becomes 4100, kvm_msrs 16) and the ioctl numbers, which encode
// the size, become ones KVM does not know (EINVAL). These numbers use the
// real C sizes.
#include <supermachine/backend/detail/kvm_fd.hpp>

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstdint>

namespace supermachine::backend::detail {

struct xsave_legacy_area {
    std::uint32_t region[1024];
};
static_assert(sizeof(xsave_legacy_area) == 4096);

inline constexpr unsigned long ioctl_get_msr_index_list = _IOWR(KVMIO, 0x02, std::uint32_t);
inline constexpr unsigned long ioctl_get_msrs = _IOWR(KVMIO, 0x88, list_header);
inline constexpr unsigned long ioctl_get_cpuid2 = _IOWR(KVMIO, 0x91, list_header);
inline constexpr unsigned long ioctl_get_xsave = _IOR(KVMIO, 0xa4, xsave_legacy_area);
inline constexpr unsigned long ioctl_set_xsave = _IOW(KVMIO, 0xa5, xsave_legacy_area);
inline constexpr unsigned long ioctl_get_xsave2 = _IOR(KVMIO, 0xcf, xsave_legacy_area);

// The fixed-size structs whose layout is the KVM ABI (stored raw in blobs).
static_assert(sizeof(kvm_regs) == 144);
static_assert(sizeof(kvm_sregs) == 312);
static_assert(sizeof(kvm_fpu) == 416);
static_assert(sizeof(kvm_lapic_state) == 1024);
static_assert(sizeof(kvm_vcpu_events) == 64);
static_assert(sizeof(kvm_debugregs) == 128);
static_assert(sizeof(kvm_xcrs) == 392);
static_assert(sizeof(kvm_mp_state) == 4);
static_assert(sizeof(kvm_cpuid_entry2) == 40);
static_assert(sizeof(kvm_msr_entry) == 16);
static_assert(sizeof(kvm_irqchip) == 520);
static_assert(sizeof(kvm_pit_state2) == 112);
static_assert(sizeof(kvm_clock_data) == 48);

/// KVM accepts at most this many entries per KVM_GET_MSRS / KVM_SET_MSRS.
inline constexpr std::uint32_t msrs_per_ioctl = 256;

namespace msr {
inline constexpr std::uint32_t tsc = 0x10;
inline constexpr std::uint32_t tsc_deadline = 0x6e0;
} // namespace msr

namespace lapic_register {
inline constexpr std::size_t lvt_timer = 0x320;
inline constexpr std::size_t timer_current_count = 0x390;
} // namespace lapic_register

/// KVM_CHECK_EXTENSION on `fd` (system or VM fd); <= 0 means absent.
inline int check_extension(int fd, long capability) noexcept {
    const int r = ::ioctl(fd, KVM_CHECK_EXTENSION, capability);
    return r < 0 ? 0 : r;
}

} // namespace supermachine::backend::detail
