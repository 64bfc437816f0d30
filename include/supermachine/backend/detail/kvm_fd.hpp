#pragma once
// errno from a failed KVM ioctl as a result, and KVM's list headers. (File
// descriptors are owned by supermachine::detail::unique_fd.)
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>

#include <unistd.h>

#include <cerrno>
#include <cstdint>

namespace supermachine::backend::detail {

/// The errno of the ioctl that just failed, as an error_code (system category,
/// so the message names the errno); errc::kvm_failed when errno is 0.
inline error_code kvm_error() noexcept {
    const int e = errno;
    return e ? errno_code(e) : make_error_code(errc::kvm_failed);
}

} // namespace supermachine::backend::detail

#include <linux/kvm.h>

namespace supermachine::backend::detail {

// <linux/kvm.h> declares kvm_msrs and kvm_cpuid2 with __DECLARE_FLEX_ARRAY,
// which in C++ adds an empty struct of size 1: sizeof grows from 8 to 16/12,
// the entries move, and the ioctl numbers (which encode the size) become
// ones KVM does not know (EINVAL). Use the real 8-byte headers instead.
struct list_header {
    std::uint32_t count;
    std::uint32_t padding;
};
static_assert(sizeof(list_header) == 8);
inline constexpr unsigned long ioctl_get_supported_cpuid = _IOWR(KVMIO, 0x05, list_header);
inline constexpr unsigned long ioctl_set_cpuid2 = _IOW(KVMIO, 0x90, list_header);
inline constexpr unsigned long ioctl_set_msrs = _IOW(KVMIO, 0x89, list_header);

} // namespace supermachine::backend::detail
