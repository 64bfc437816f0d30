#pragma once
// CPUID for our vCPUs: what KVM supports (KVM_GET_SUPPORTED_CPUID), filtered.
//
// Filters, per vCPU (each explained where it is applied):
//  - leaf 0x1: hypervisor bit, initial APIC id, logical-processor count, HTT;
//  - leaf 0x4: cores per package (one socket, one thread per core);
//  - leaves 0xB and 0x1F: x2APIC topology (SMT level 1 thread, core level N);
//  - on a kvm_pvm host only: features its instruction emulator cannot
//    handle are hidden (XSAVE/AVX, POPCNT, CMPXCHG16B, FSGSBASE, INVPCID,
//    SMAP, RDPID) — the same set the cmdline work-around
//    `noxsave nofsgsbase noinvpcid clearcpuid=151,141,308,534` hides.
#include <supermachine/backend/detail/kvm_fd.hpp>
#include <supermachine/error.hpp>

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <vector>

namespace supermachine::backend::detail {

class cpuid_table {
public:
    std::vector<kvm_cpuid_entry2> entries;

    /// The 8-byte kvm_cpuid2 header followed by the entries, for KVM_SET_CPUID2.
    void* header() {
        const std::size_t bytes = sizeof(list_header) + entries.size() * sizeof(kvm_cpuid_entry2);
        buffer_.assign((bytes + 7) / 8, 0);
        const list_header h{static_cast<std::uint32_t>(entries.size()), 0};
        std::memcpy(buffer_.data(), &h, sizeof h);
        std::memcpy(buffer_.data() + 1, entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
        return buffer_.data();
    }

private:
    std::vector<std::uint64_t> buffer_; // 8-byte aligned storage for the header
};

inline result<cpuid_table> supported_cpuid(int system_fd) {
    // KVM says E2BIG until the buffer is large enough; it never needs
    // thousands, so the doubling is bounded.
    for (std::uint32_t capacity = 128; capacity <= 4096; capacity *= 2) {
        std::vector<std::uint64_t> buffer(
            (sizeof(list_header) + capacity * sizeof(kvm_cpuid_entry2) + 7) / 8);
        list_header h{capacity, 0};
        std::memcpy(buffer.data(), &h, sizeof h);
        if (::ioctl(system_fd, ioctl_get_supported_cpuid, buffer.data()) == 0) {
            std::memcpy(&h, buffer.data(), sizeof h);
            cpuid_table table;
            const std::uint32_t n = std::min(h.count, capacity);
            table.entries.resize(n);
            std::memcpy(table.entries.data(), buffer.data() + 1, n * sizeof(kvm_cpuid_entry2));
            return table;
        }
        if (errno != E2BIG) return kvm_error();
    }
    return errc::kvm_failed;
}

inline cpuid_table filter_cpuid(const cpuid_table& supported, std::uint32_t apic_id,
                                std::uint32_t vcpus, bool hide_pvm_unsupported) {
    cpuid_table out;
    out.entries = supported.entries;
    const std::uint32_t core_bits =
        vcpus <= 1 ? 0 : static_cast<std::uint32_t>(std::bit_width(vcpus - 1));
    for (auto& e : out.entries) {
        switch (e.function) {
        case 0x1:
            e.ecx |= 1u << 31; // running under a hypervisor: Linux enables its KVM paravirt paths
            e.ebx = (e.ebx & 0x0000ffff) | (apic_id << 24) | (std::min(vcpus, 255u) << 16);
            if (vcpus > 1) e.edx |= 1u << 28; // HTT: the logical count above is valid
            if (hide_pvm_unsupported) {
                e.ecx &= ~((1u << 13)     // CMPXCHG16B (SLUB's LOCK CMPXCHG16B)
                           | (1u << 23)   // POPCNT
                           | (1u << 26)   // XSAVE (XRSTOR at FPU init)
                           | (1u << 27)   // OSXSAVE
                           | (1u << 28)   // AVX (needs XSAVE)
                           | (1u << 12)); // FMA (needs AVX)
            }
            break;
        case 0x4:
            // Cores per package - 1 in EAX[31:26]; one socket holds every vCPU.
            if ((e.eax & 0x1f) != 0) e.eax = (e.eax & 0x03ffffff) | ((vcpus - 1) << 26);
            break;
        case 0x7:
            if (hide_pvm_unsupported && e.index == 0) {
                e.ebx &= ~((1u << 0)                 // FSGSBASE
                           | (1u << 5)               // AVX2
                           | (1u << 10)              // INVPCID
                           | (1u << 16)              // AVX512F and friends (need XSAVE)
                           | (1u << 17) | (1u << 20) // SMAP (CLAC/STAC)
                           | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                           (1u << 31));
                e.ecx &= ~(1u << 22); // RDPID
            }
            break;
        case 0xb:
        case 0x1f:
            // x2APIC topology: level 0 = SMT (one thread per core), level 1 = core.
            e.edx = apic_id;
            if (e.index == 0) {
                e.eax = 0;
                e.ebx = 1;
                e.ecx = (1u << 8) | 0;
            } else if (e.index == 1) {
                e.eax = core_bits;
                e.ebx = vcpus;
                e.ecx = (2u << 8) | 1;
            } else {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = e.index; // level type 0: no further levels
            }
            break;
        case 0xd:
            if (hide_pvm_unsupported)
                e.eax = e.ebx = e.ecx = e.edx = 0; // no XSAVE state components
            break;
        default:
            break;
        }
    }
    return out;
}

} // namespace supermachine::backend::detail
