#pragma once
// KVM state capture and restore (x86-64): what a snapshot needs besides RAM
// and device models, as free functions over the KVM file descriptors.
//
// - vcpu_state: regs, sregs, XSAVE (or the legacy FPU where KVM has no
//   XSAVE), XCRs, every MSR from KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS
//   returns, LAPIC, MP state, vCPU events, debug registers, TSC frequency,
//   CPUID. One versioned blob per vCPU (encode_vcpu_state).
// - vm_state: PIC master, PIC slave, IOAPIC, PIT, KVM clock. One versioned
//   blob (encode_vm_state).
//
// Capture only from a vCPU that is not inside KVM_RUN, and after KVM_RUN has
// been re-entered since its last I/O exit (kvm::run_vcpu returning
// `interrupted` guarantees both): KVM finishes a port/MMIO read or a string
// instruction only on the next KVM_RUN, and that pending part is not in any
// state userspace can read. Restore into a freshly created VM before its
// vCPUs first run: restore_vm first, then restore_vcpu for each vCPU.
//
// Decoding is hostile-input safe: every count and length is bounded before
// anything is allocated, every section size is checked, unknown versions and
// tags are errors. What KVM itself must validate (register values) it does.
// See doc/kvm-state.md for the restore order and why.
#include <supermachine/backend/detail/kvm_fd.hpp>
#include <supermachine/backend/detail/kvm_state_ioctl.hpp>
#include <supermachine/backend/detail/kvm_state_sections.hpp>
#include <supermachine/error.hpp>
#include <supermachine/snapshot/codec.hpp>
#include <supermachine/snapshot/records.hpp>

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

namespace supermachine::backend::kvm_state {

// ---------------------------------------------------------------------------
// Bounds a decoder enforces (what a real capture stays far below).

inline constexpr std::uint32_t max_msrs = 4096;
inline constexpr std::uint32_t max_cpuid_entries = 256;
/// XSAVE areas are 4 KiB, larger only with dynamic features (AMX: ~11 KiB).
inline constexpr std::uint64_t max_xsave_bytes = 256 * 1024;
inline constexpr std::uint32_t max_xcrs = 16; // KVM_MAX_XCRS

inline constexpr std::uint32_t vcpu_state_magic = 0x5643'4d53; // "SMCV" little-endian
inline constexpr std::uint32_t vcpu_state_version = 1;
inline constexpr std::uint32_t vm_state_magic = 0x4d56'4d53; // "SMVM" little-endian
inline constexpr std::uint32_t vm_state_version = 1;

struct msr_value {
    std::uint32_t index = 0;
    std::uint64_t value = 0;
    friend bool operator==(const msr_value&, const msr_value&) = default;
};

/// One vCPU's architectural state as KVM reports it.
struct vcpu_state {
    kvm_regs regs{};
    kvm_sregs sregs{};
    /// KVM_GET_XSAVE(2) area; empty where KVM has no XSAVE (then `fpu`).
    std::vector<std::byte> xsave;
    std::optional<kvm_fpu> fpu;
    std::optional<kvm_xcrs> xcrs;
    /// In KVM_GET_MSR_INDEX_LIST order; restore reorders (TSC first, TSC deadline last).
    std::vector<msr_value> msrs;
    /// Listed by KVM_GET_MSR_INDEX_LIST but refused by KVM_GET_MSRS here.
    std::vector<std::uint32_t> msrs_refused;
    kvm_lapic_state lapic{};
    kvm_mp_state mp_state{};
    std::optional<kvm_vcpu_events> events;
    std::optional<kvm_debugregs> debug_registers;
    std::uint32_t tsc_khz = 0; // 0: KVM could not say
    /// The vCPU's CPUID; empty when none was set (e.g. kvm_pvm).
    std::vector<kvm_cpuid_entry2> cpuid;

    std::optional<std::uint64_t> msr(std::uint32_t index) const noexcept {
        for (const auto& m : msrs)
            if (m.index == index) return m.value;
        return std::nullopt;
    }
};

/// The VM's interrupt controllers and timers.
struct vm_state {
    kvm_irqchip pic_master{};
    kvm_irqchip pic_slave{};
    kvm_irqchip ioapic{};
    std::optional<kvm_pit_state2> pit; // absent when the VM has no in-kernel PIT
    kvm_clock_data clock{};
    /// Host CLOCK_REALTIME (ns) when `clock` was read: restore advances the
    /// guest clock by the time since.
    std::uint64_t captured_at_realtime_ns = 0;
};

/// How restore_vm sets the guest's KVM clock.
enum class clock_policy {
    /// The saved clock plus the host wall time elapsed since capture (never
    /// less than the saved clock): guest time moves on as the host's did.
    advance_by_elapsed_time,
    /// Exactly the saved clock: the guest sees no time pass while saved.
    resume_at_capture,
};

namespace detail {
using supermachine::backend::detail::kvm_error;

inline std::uint64_t realtime_ns() noexcept {
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME, &now);
    return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000u +
           static_cast<std::uint64_t>(now.tv_nsec);
}

// A kvm_msrs buffer: the 8-byte header and `count` entries, 8-byte aligned.
class msr_buffer {
public:
    explicit msr_buffer(std::uint32_t count)
        : storage_(1 + std::size_t{count} * 2, 0) {
        const supermachine::backend::detail::list_header header{count, 0};
        std::memcpy(storage_.data(), &header, sizeof header);
    }
    kvm_msr_entry* entries() noexcept {
        return reinterpret_cast<kvm_msr_entry*>(storage_.data() + 1);
    }
    void* data() noexcept { return storage_.data(); }

private:
    std::vector<std::uint64_t> storage_;
};

// A KVM_SET_MSRS of `entries`: all of them or an error. KVM stops at the
// first MSR it refuses and returns how many it set.
inline result<void> set_msrs(int vcpu_fd, std::span<const msr_value> entries) {
    using supermachine::backend::detail::ioctl_set_msrs;
    using supermachine::backend::detail::msrs_per_ioctl;
    for (std::size_t first = 0; first < entries.size(); first += msrs_per_ioctl) {
        const auto n = static_cast<std::uint32_t>(
            std::min<std::size_t>(msrs_per_ioctl, entries.size() - first));
        msr_buffer buffer(n);
        for (std::uint32_t i = 0; i < n; ++i)
            buffer.entries()[i] = {
                .index = entries[first + i].index, .reserved = 0, .data = entries[first + i].value};
        const int written = ::ioctl(vcpu_fd, ioctl_set_msrs, buffer.data());
        if (written < 0) return kvm_error();
        if (static_cast<std::uint32_t>(written) != n) return errc::kvm_failed;
    }
    return success();
}

inline std::uint32_t lapic_u32(const kvm_lapic_state& lapic, std::size_t offset) noexcept {
    std::uint32_t value;
    std::memcpy(&value, lapic.regs + offset, 4);
    return value;
}

// Restore order for MSRs: the TSC before anything measured against it, the
// TSC deadline (an absolute guest TSC value) last.
inline std::vector<msr_value> msrs_in_restore_order(const vcpu_state& state) {
    using namespace supermachine::backend::detail;
    std::vector<msr_value> ordered;
    ordered.reserve(state.msrs.size());
    for (const auto& m : state.msrs)
        if (m.index == msr::tsc) ordered.push_back(m);
    for (const auto& m : state.msrs)
        if (m.index != msr::tsc && m.index != msr::tsc_deadline) ordered.push_back(m);
    for (const auto& m : state.msrs) {
        if (m.index != msr::tsc_deadline) continue;
        msr_value deadline = m;
        // A deadline that had fired but whose interrupt was still only
        // "pending" inside KVM reads as 0 and the interrupt is in no saved
        // state; with the timer in TSC-deadline mode and unmasked, re-arm
        // at the saved TSC so it fires at once (Firecracker does the same).
        const std::uint32_t lvt = lapic_u32(state.lapic, lapic_register::lvt_timer);
        const bool deadline_mode = ((lvt >> 17) & 3) == 2;
        const bool masked = (lvt >> 16) & 1;
        if (deadline.value == 0 && deadline_mode && !masked)
            if (auto tsc = state.msr(msr::tsc)) deadline.value = *tsc;
        ordered.push_back(deadline);
    }
    return ordered;
}
} // namespace detail

// ---------------------------------------------------------------------------
// Capture

/// The MSR indexes KVM saves and restores (KVM_GET_MSR_INDEX_LIST on the
/// /dev/kvm fd). Bounded by max_msrs.
inline result<std::vector<std::uint32_t>> msr_index_list(int system_fd) {
    using supermachine::backend::detail::ioctl_get_msr_index_list;
    std::uint32_t probe = 0;
    // E2BIG with the count filled in: the list's size.
    if (::ioctl(system_fd, ioctl_get_msr_index_list, &probe) != 0 && errno != E2BIG)
        return detail::kvm_error();
    if (probe > max_msrs) return errc::kvm_failed;
    std::vector<std::uint32_t> buffer(1 + std::size_t{probe});
    buffer[0] = probe;
    if (::ioctl(system_fd, ioctl_get_msr_index_list, buffer.data()) != 0)
        return detail::kvm_error();
    const std::uint32_t n = std::min(buffer[0], probe);
    return std::vector<std::uint32_t>(buffer.begin() + 1, buffer.begin() + 1 + n);
}

/// The same, opening the KVM device itself.
inline result<std::vector<std::uint32_t>> msr_index_list(const char* device_path = "/dev/kvm") {
    supermachine::detail::unique_fd system(::open(device_path, O_RDWR | O_CLOEXEC));
    if (!system) return errc::kvm_unavailable;
    return msr_index_list(system.get());
}

/// Every MSR in `indexes` that KVM_GET_MSRS returns for this vCPU; the ones
/// it refuses go to `refused`. KVM stops a KVM_GET_MSRS at the first MSR it
/// cannot read and returns how many it read; skip that one and go on.
inline result<std::vector<msr_value>> read_msrs(int vcpu_fd, std::span<const std::uint32_t> indexes,
                                                std::vector<std::uint32_t>& refused) {
    using namespace supermachine::backend::detail;
    if (indexes.size() > max_msrs) return errc::invalid_argument;
    std::vector<msr_value> values;
    values.reserve(indexes.size());
    std::size_t next = 0;
    while (next < indexes.size()) {
        const auto n = static_cast<std::uint32_t>(
            std::min<std::size_t>(msrs_per_ioctl, indexes.size() - next));
        detail::msr_buffer buffer(n);
        for (std::uint32_t i = 0; i < n; ++i)
            buffer.entries()[i] = {.index = indexes[next + i], .reserved = 0, .data = 0};
        const int read = ::ioctl(vcpu_fd, ioctl_get_msrs, buffer.data());
        if (read < 0) return detail::kvm_error();
        const auto got = std::min(static_cast<std::uint32_t>(read), n);
        for (std::uint32_t i = 0; i < got; ++i)
            values.push_back({buffer.entries()[i].index, buffer.entries()[i].data});
        if (got < n) {
            refused.push_back(indexes[next + got]);
            next += got + 1;
        } else {
            next += n;
        }
    }
    return values;
}

/// Capture one vCPU. `vm_fd` answers capability checks (XSAVE2 size, ...);
/// `msr_indexes` is msr_index_list() (read it once per VM).
inline result<vcpu_state> capture_vcpu(int vm_fd, int vcpu_fd,
                                       std::span<const std::uint32_t> msr_indexes) {
    using namespace supermachine::backend::detail;
    vcpu_state s;
    // MP state first: reading it makes KVM accept pending INIT/SIPI, which
    // changes vCPU and LAPIC state the later reads must see.
    if (::ioctl(vcpu_fd, KVM_GET_MP_STATE, &s.mp_state) != 0) return detail::kvm_error();
    if (::ioctl(vcpu_fd, KVM_GET_REGS, &s.regs) != 0) return detail::kvm_error();
    if (::ioctl(vcpu_fd, KVM_GET_SREGS, &s.sregs) != 0) return detail::kvm_error();

    if (check_extension(vm_fd, KVM_CAP_XSAVE)) {
        // KVM_CAP_XSAVE2 on the VM fd is the area's size (>= 4096).
        const int size2 = check_extension(vm_fd, KVM_CAP_XSAVE2);
        std::size_t size = sizeof(xsave_legacy_area);
        if (size2 > 0) size = std::max<std::size_t>(size, static_cast<std::size_t>(size2));
        if (size > max_xsave_bytes) return errc::kvm_failed;
        std::vector<std::uint32_t> area((size + 3) / 4, 0);
        const unsigned long request = size2 > 0 ? ioctl_get_xsave2 : ioctl_get_xsave;
        if (::ioctl(vcpu_fd, request, area.data()) != 0) return detail::kvm_error();
        s.xsave.resize(size);
        std::memcpy(s.xsave.data(), area.data(), size);
    } else {
        kvm_fpu fpu{};
        if (::ioctl(vcpu_fd, KVM_GET_FPU, &fpu) != 0) return detail::kvm_error();
        s.fpu = fpu;
    }
    if (check_extension(vm_fd, KVM_CAP_XCRS)) {
        kvm_xcrs xcrs{};
        if (::ioctl(vcpu_fd, KVM_GET_XCRS, &xcrs) != 0) return detail::kvm_error();
        s.xcrs = xcrs;
    }
    if (check_extension(vm_fd, KVM_CAP_DEBUGREGS)) {
        kvm_debugregs debug{};
        if (::ioctl(vcpu_fd, KVM_GET_DEBUGREGS, &debug) != 0) return detail::kvm_error();
        s.debug_registers = debug;
    }
    if (::ioctl(vcpu_fd, KVM_GET_LAPIC, &s.lapic) != 0) return detail::kvm_error();
    if (check_extension(vm_fd, KVM_CAP_GET_TSC_KHZ)) {
        const int khz = ::ioctl(vcpu_fd, KVM_GET_TSC_KHZ, 0);
        if (khz > 0) s.tsc_khz = static_cast<std::uint32_t>(khz);
    }
    {
        // KVM_GET_CPUID2 answers E2BIG while the buffer is too small.
        std::vector<std::uint64_t> storage(1 + max_cpuid_entries * sizeof(kvm_cpuid_entry2) / 8, 0);
        const list_header header{max_cpuid_entries, 0};
        std::memcpy(storage.data(), &header, sizeof header);
        if (::ioctl(vcpu_fd, ioctl_get_cpuid2, storage.data()) == 0) {
            list_header got{};
            std::memcpy(&got, storage.data(), sizeof got);
            const std::uint32_t n = std::min(got.count, max_cpuid_entries);
            s.cpuid.resize(n);
            std::memcpy(s.cpuid.data(), storage.data() + 1, n * sizeof(kvm_cpuid_entry2));
        } else if (errno != EINVAL && errno != ENOTTY) {
            return detail::kvm_error();
        }
    }
    SUPERMACHINE_TRY(msrs, read_msrs(vcpu_fd, msr_indexes, s.msrs_refused));
    s.msrs = std::move(msrs);
    // Events last: the other reads may change what is pending.
    if (check_extension(vm_fd, KVM_CAP_VCPU_EVENTS)) {
        kvm_vcpu_events events{};
        if (::ioctl(vcpu_fd, KVM_GET_VCPU_EVENTS, &events) != 0) return detail::kvm_error();
        s.events = events;
    }
    return s;
}

/// Capture the VM-wide interrupt controllers, PIT and clock.
inline result<vm_state> capture_vm(int vm_fd) {
    vm_state s;
    s.pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
    s.pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    s.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
    for (auto* chip : {&s.pic_master, &s.pic_slave, &s.ioapic})
        if (::ioctl(vm_fd, KVM_GET_IRQCHIP, chip) != 0) return detail::kvm_error();
    kvm_pit_state2 pit{};
    if (::ioctl(vm_fd, KVM_GET_PIT2, &pit) == 0)
        s.pit = pit;
    else if (errno != ENXIO) // ENXIO: this VM has no in-kernel PIT
        return detail::kvm_error();
    if (::ioctl(vm_fd, KVM_GET_CLOCK, &s.clock) != 0) return detail::kvm_error();
    // KVM samples host real time with the clock when it can (REALTIME flag).
    s.captured_at_realtime_ns =
        (s.clock.flags & KVM_CLOCK_REALTIME) ? s.clock.realtime : detail::realtime_ns();
    return s;
}

// ---------------------------------------------------------------------------
// Restore

/// TSC frequencies within this many parts per million count as the same
/// (hosts calibrate slightly differently; Firecracker uses 250 too).
inline constexpr std::uint32_t tsc_tolerance_ppm = 250;

/// Restore one vCPU of a freshly created VM, before it first runs. Order
/// (see doc/kvm-state.md): CPUID, TSC frequency, MP state, regs, sregs,
/// XSAVE/FPU, XCRs, debug registers, LAPIC, MSRs, events.
inline result<void> restore_vcpu(int vm_fd, int vcpu_fd, const vcpu_state& s) {
    using namespace supermachine::backend::detail;
    // CPUID first: which MSRs and XSAVE features KVM accepts depends on it.
    if (!s.cpuid.empty()) {
        if (s.cpuid.size() > max_cpuid_entries) return errc::invalid_argument;
        std::vector<std::uint64_t> storage(1 + s.cpuid.size() * sizeof(kvm_cpuid_entry2) / 8, 0);
        const list_header header{static_cast<std::uint32_t>(s.cpuid.size()), 0};
        std::memcpy(storage.data(), &header, sizeof header);
        std::memcpy(storage.data() + 1, s.cpuid.data(), s.cpuid.size() * sizeof(kvm_cpuid_entry2));
        if (::ioctl(vcpu_fd, ioctl_set_cpuid2, storage.data()) != 0) return detail::kvm_error();
    }
    // The guest's TSC runs at the captured rate, or we say why not.
    if (s.tsc_khz != 0 && check_extension(vm_fd, KVM_CAP_GET_TSC_KHZ)) {
        const int here = ::ioctl(vcpu_fd, KVM_GET_TSC_KHZ, 0);
        if (here > 0) {
            const std::uint64_t a = static_cast<std::uint32_t>(here), b = s.tsc_khz;
            const std::uint64_t diff = a > b ? a - b : b - a;
            if (diff * 1'000'000 > b * tsc_tolerance_ppm &&
                ::ioctl(vcpu_fd, KVM_SET_TSC_KHZ, static_cast<unsigned long>(s.tsc_khz)) != 0)
                return errc::snapshot_mismatch; // no TSC scaling on this host
        }
    }
    // MP state before the rest: some SET ioctls behave by whether the vCPU
    // is the BSP / runnable.
    if (::ioctl(vcpu_fd, KVM_SET_MP_STATE, &s.mp_state) != 0) return detail::kvm_error();
    // SET_REGS drops pending exceptions; SET_VCPU_EVENTS (last) restores them.
    if (::ioctl(vcpu_fd, KVM_SET_REGS, &s.regs) != 0) return detail::kvm_error();
    // SREGS carry the APIC base, which SET_LAPIC needs.
    if (::ioctl(vcpu_fd, KVM_SET_SREGS, &s.sregs) != 0) return detail::kvm_error();
    if (!s.xsave.empty()) {
        if (s.xsave.size() > max_xsave_bytes || s.xsave.size() < sizeof(xsave_legacy_area))
            return errc::invalid_argument;
        // KVM_SET_XSAVE reads as many bytes as this VM's XSAVE2 size.
        const int size2 = check_extension(vm_fd, KVM_CAP_XSAVE2);
        const std::size_t here = std::max<std::size_t>(
            sizeof(xsave_legacy_area), static_cast<std::size_t>(std::max(size2, 0)));
        // State beyond what this VM can hold (a dynamic feature in use) cannot be restored.
        for (std::size_t i = here; i < s.xsave.size(); ++i)
            if (s.xsave[i] != std::byte{0}) return errc::snapshot_mismatch;
        std::vector<std::uint32_t> area((std::max(here, s.xsave.size()) + 3) / 4, 0);
        std::memcpy(area.data(), s.xsave.data(), std::min(here, s.xsave.size()));
        if (::ioctl(vcpu_fd, ioctl_set_xsave, area.data()) != 0) return detail::kvm_error();
    } else if (s.fpu) {
        if (::ioctl(vcpu_fd, KVM_SET_FPU, &*s.fpu) != 0) return detail::kvm_error();
    }
    if (s.xcrs) {
        if (s.xcrs->nr_xcrs > max_xcrs) return errc::invalid_argument;
        if (::ioctl(vcpu_fd, KVM_SET_XCRS, &*s.xcrs) != 0) return detail::kvm_error();
    }
    if (s.debug_registers)
        if (::ioctl(vcpu_fd, KVM_SET_DEBUGREGS, &*s.debug_registers) != 0)
            return detail::kvm_error();
    // LAPIC after SREGS (APIC base) and before MSRs (the TSC deadline is
    // only accepted with the LAPIC timer configured).
    if (::ioctl(vcpu_fd, KVM_SET_LAPIC, &s.lapic) != 0) return detail::kvm_error();
    SUPERMACHINE_TRY(detail::set_msrs(vcpu_fd, detail::msrs_in_restore_order(s)));
    if (s.events) {
        kvm_vcpu_events events = *s.events;
        // GET does not set these flags; without them SET ignores the
        // pending NMI and the SIPI vector.
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        if (::ioctl(vcpu_fd, KVM_SET_VCPU_EVENTS, &events) != 0) return detail::kvm_error();
    }
    // Tell a kvmclock guest it was paused (no soft-lockup alarms). EINVAL:
    // the guest has not enabled kvmclock; nothing to tell.
    if (check_extension(vm_fd, KVM_CAP_KVMCLOCK_CTRL))
        if (::ioctl(vcpu_fd, KVM_KVMCLOCK_CTRL, 0) != 0 && errno != EINVAL)
            return detail::kvm_error();
    return success();
}

/// The clock value restore_vm sets for `s` at host real time `now_ns`.
constexpr std::uint64_t restored_clock(const vm_state& s, clock_policy policy,
                                       std::uint64_t now_ns) noexcept {
    if (policy == clock_policy::resume_at_capture || now_ns <= s.captured_at_realtime_ns)
        return s.clock.clock;
    const std::uint64_t elapsed = now_ns - s.captured_at_realtime_ns;
    return elapsed > UINT64_MAX - s.clock.clock ? UINT64_MAX : s.clock.clock + elapsed;
}

/// Restore the interrupt controllers, PIT and clock of a freshly created VM
/// (with the same in-kernel irqchip and PIT), before its vCPUs.
inline result<void> restore_vm(int vm_fd, const vm_state& s,
                               clock_policy policy = clock_policy::advance_by_elapsed_time) {
    if (s.pic_master.chip_id != KVM_IRQCHIP_PIC_MASTER ||
        s.pic_slave.chip_id != KVM_IRQCHIP_PIC_SLAVE || s.ioapic.chip_id != KVM_IRQCHIP_IOAPIC)
        return errc::invalid_argument;
    for (const auto* chip : {&s.pic_master, &s.pic_slave, &s.ioapic})
        if (::ioctl(vm_fd, KVM_SET_IRQCHIP, chip) != 0) return detail::kvm_error();
    if (s.pit) {
        kvm_pit_state2 pit = *s.pit;
        if (::ioctl(vm_fd, KVM_SET_PIT2, &pit) != 0) return detail::kvm_error();
    }
    kvm_clock_data clock{};
    clock.clock = restored_clock(s, policy, detail::realtime_ns());
    if (::ioctl(vm_fd, KVM_SET_CLOCK, &clock) != 0) return detail::kvm_error();
    return success();
}

// ---------------------------------------------------------------------------
// Blobs

namespace tag {
// vCPU blob sections.
inline constexpr std::uint32_t regs = 1, sregs = 2, fpu = 3, xsave = 4, xcrs = 5, msrs = 6,
                               msrs_refused = 7, lapic = 8, mp_state = 9, events = 10,
                               debug_registers = 11, tsc_khz = 12, cpuid = 13, last_vcpu = 13;
// VM blob sections.
inline constexpr std::uint32_t pic_master = 1, pic_slave = 2, ioapic = 3, pit = 4, clock = 5,
                               captured_at = 6, last_vm = 6;
} // namespace tag

/// The versioned blob for one vCPU (vcpu_record::state in a snapshot).
inline result<std::vector<std::byte>> encode_vcpu_state(const vcpu_state& s) {
    if (s.msrs.size() > max_msrs || s.msrs_refused.size() > max_msrs ||
        s.cpuid.size() > max_cpuid_entries || s.xsave.size() > max_xsave_bytes)
        return errc::snapshot_too_large;
    return supermachine::backend::detail::encode_sections(
        vcpu_state_magic, vcpu_state_version, [&](auto& out) {
            out.raw(tag::regs, s.regs);
            out.raw(tag::sregs, s.sregs);
            if (s.fpu) out.raw(tag::fpu, *s.fpu);
            if (!s.xsave.empty()) out.bytes(tag::xsave, s.xsave, max_xsave_bytes);
            if (s.xcrs) out.raw(tag::xcrs, *s.xcrs);
            out.custom(tag::msrs, [&](snapshot::byte_writer& w) {
                w.count(s.msrs.size(), max_msrs);
                for (const auto& m : s.msrs) {
                    w.u32(m.index);
                    w.u64(m.value);
                }
            });
            if (!s.msrs_refused.empty())
                out.custom(tag::msrs_refused, [&](snapshot::byte_writer& w) {
                    w.count(s.msrs_refused.size(), max_msrs);
                    for (auto index : s.msrs_refused)
                        w.u32(index);
                });
            out.raw(tag::lapic, s.lapic);
            out.u32(tag::mp_state, s.mp_state.mp_state);
            if (s.events) out.raw(tag::events, *s.events);
            if (s.debug_registers) out.raw(tag::debug_registers, *s.debug_registers);
            out.u32(tag::tsc_khz, s.tsc_khz);
            if (!s.cpuid.empty())
                out.custom(tag::cpuid, [&](snapshot::byte_writer& w) {
                    w.count(s.cpuid.size(), max_cpuid_entries);
                    w.bytes(std::as_bytes(std::span(s.cpuid)));
                });
        });
}

/// Decode a vCPU blob; hostile input gives an error, never a crash or a
/// large allocation.
inline result<vcpu_state> decode_vcpu_state(std::span<const std::byte> blob) {
    supermachine::backend::detail::section_reader in(blob);
    SUPERMACHINE_TRY(in.header(vcpu_state_magic, vcpu_state_version));
    vcpu_state s;
    for (;;) {
        SUPERMACHINE_TRY(next, in.next(tag::last_vcpu, max_xsave_bytes));
        if (!next) break;
        const auto& sec = *next;
        using supermachine::backend::detail::raw_from;
        using supermachine::backend::detail::u32_from;
        switch (sec.tag) {
        case tag::regs: {
            SUPERMACHINE_TRY(v, raw_from<kvm_regs>(sec));
            s.regs = v;
            break;
        }
        case tag::sregs: {
            SUPERMACHINE_TRY(v, raw_from<kvm_sregs>(sec));
            s.sregs = v;
            break;
        }
        case tag::fpu: {
            SUPERMACHINE_TRY(v, raw_from<kvm_fpu>(sec));
            s.fpu = v;
            break;
        }
        case tag::xsave:
            if (sec.bytes.size() < sizeof(supermachine::backend::detail::xsave_legacy_area) ||
                sec.bytes.size() % 4 != 0)
                return errc::snapshot_bad_record;
            s.xsave.assign(sec.bytes.begin(), sec.bytes.end());
            break;
        case tag::xcrs: {
            SUPERMACHINE_TRY(v, raw_from<kvm_xcrs>(sec));
            if (v.nr_xcrs > max_xcrs) return errc::snapshot_bad_record;
            s.xcrs = v;
            break;
        }
        case tag::msrs: {
            snapshot::byte_reader r(sec.bytes);
            SUPERMACHINE_TRY(n, r.count(max_msrs, 12));
            s.msrs.reserve(n);
            for (std::uint32_t i = 0; i < n; ++i) {
                SUPERMACHINE_TRY(index, r.u32());
                SUPERMACHINE_TRY(value, r.u64());
                s.msrs.push_back({index, value});
            }
            SUPERMACHINE_TRY(r.expect_end());
            // One value per MSR: a repeated index would make restore order ambiguous.
            std::vector<std::uint32_t> indexes;
            indexes.reserve(n);
            for (const auto& m : s.msrs)
                indexes.push_back(m.index);
            std::sort(indexes.begin(), indexes.end());
            if (std::adjacent_find(indexes.begin(), indexes.end()) != indexes.end())
                return errc::snapshot_bad_record;
            break;
        }
        case tag::msrs_refused: {
            snapshot::byte_reader r(sec.bytes);
            SUPERMACHINE_TRY(n, r.count(max_msrs, 4));
            s.msrs_refused.reserve(n);
            for (std::uint32_t i = 0; i < n; ++i) {
                SUPERMACHINE_TRY(index, r.u32());
                s.msrs_refused.push_back(index);
            }
            SUPERMACHINE_TRY(r.expect_end());
            break;
        }
        case tag::lapic: {
            SUPERMACHINE_TRY(v, raw_from<kvm_lapic_state>(sec));
            s.lapic = v;
            break;
        }
        case tag::mp_state: {
            SUPERMACHINE_TRY(v, u32_from(sec));
            if (v > KVM_MP_STATE_SUSPENDED) return errc::snapshot_bad_record;
            s.mp_state.mp_state = v;
            break;
        }
        case tag::events: {
            SUPERMACHINE_TRY(v, raw_from<kvm_vcpu_events>(sec));
            s.events = v;
            break;
        }
        case tag::debug_registers: {
            SUPERMACHINE_TRY(v, raw_from<kvm_debugregs>(sec));
            s.debug_registers = v;
            break;
        }
        case tag::tsc_khz: {
            SUPERMACHINE_TRY(v, u32_from(sec));
            s.tsc_khz = v;
            break;
        }
        case tag::cpuid: {
            snapshot::byte_reader r(sec.bytes);
            SUPERMACHINE_TRY(n, r.count(max_cpuid_entries, sizeof(kvm_cpuid_entry2)));
            SUPERMACHINE_TRY(entries, r.bytes(std::uint64_t{n} * sizeof(kvm_cpuid_entry2)));
            SUPERMACHINE_TRY(r.expect_end());
            if (n == 0) return errc::snapshot_bad_record; // absent, not empty
            s.cpuid.resize(n);
            std::memcpy(s.cpuid.data(), entries.data(), entries.size());
            break;
        }
        default:
            return errc::snapshot_bad_record;
        }
    }
    for (auto required :
         {tag::regs, tag::sregs, tag::msrs, tag::lapic, tag::mp_state, tag::tsc_khz})
        if (!in.seen(required)) return errc::snapshot_bad_record;
    if (s.xsave.empty() == !s.fpu) return errc::snapshot_bad_record; // exactly one of them
    return s;
}

/// The versioned blob for the VM (interrupt_controller_record::state).
inline result<std::vector<std::byte>> encode_vm_state(const vm_state& s) {
    return supermachine::backend::detail::encode_sections(
        vm_state_magic, vm_state_version, [&](auto& out) {
            out.raw(tag::pic_master, s.pic_master);
            out.raw(tag::pic_slave, s.pic_slave);
            out.raw(tag::ioapic, s.ioapic);
            if (s.pit) out.raw(tag::pit, *s.pit);
            out.raw(tag::clock, s.clock);
            out.u64(tag::captured_at, s.captured_at_realtime_ns);
        });
}

/// Decode a VM blob; hostile input gives an error.
inline result<vm_state> decode_vm_state(std::span<const std::byte> blob) {
    supermachine::backend::detail::section_reader in(blob);
    SUPERMACHINE_TRY(in.header(vm_state_magic, vm_state_version));
    vm_state s;
    using supermachine::backend::detail::raw_from;
    for (;;) {
        SUPERMACHINE_TRY(next, in.next(tag::last_vm, 4096));
        if (!next) break;
        const auto& sec = *next;
        switch (sec.tag) {
        case tag::pic_master:
        case tag::pic_slave:
        case tag::ioapic: {
            SUPERMACHINE_TRY(chip, raw_from<kvm_irqchip>(sec));
            const std::uint32_t expected = sec.tag == tag::pic_master  ? KVM_IRQCHIP_PIC_MASTER
                                           : sec.tag == tag::pic_slave ? KVM_IRQCHIP_PIC_SLAVE
                                                                       : KVM_IRQCHIP_IOAPIC;
            if (chip.chip_id != expected) return errc::snapshot_bad_record;
            (sec.tag == tag::pic_master  ? s.pic_master
             : sec.tag == tag::pic_slave ? s.pic_slave
                                         : s.ioapic) = chip;
            break;
        }
        case tag::pit: {
            SUPERMACHINE_TRY(v, raw_from<kvm_pit_state2>(sec));
            s.pit = v;
            break;
        }
        case tag::clock: {
            SUPERMACHINE_TRY(v, raw_from<kvm_clock_data>(sec));
            s.clock = v;
            break;
        }
        case tag::captured_at: {
            SUPERMACHINE_TRY(v, supermachine::backend::detail::u64_from(sec));
            s.captured_at_realtime_ns = v;
            break;
        }
        default:
            return errc::snapshot_bad_record;
        }
    }
    for (auto required :
         {tag::pic_master, tag::pic_slave, tag::ioapic, tag::clock, tag::captured_at})
        if (!in.seen(required)) return errc::snapshot_bad_record;
    return s;
}

// ---------------------------------------------------------------------------
// A whole VM as snapshot records

/// What capture_records needs of a backend (backend::kvm has it).
template <class B>
concept kvm_state_access = requires(const B& b, std::uint32_t index) {
    { b.vm_fd() } -> std::convertible_to<int>;
    { b.vcpu_fd(index) } -> std::convertible_to<int>;
    { b.vcpu_count() } -> std::convertible_to<std::uint32_t>;
};

/// The KVM part of a snapshot: one blob per vCPU and the VM blob.
struct kvm_records {
    std::vector<snapshot::vcpu_record> vcpus; // indexes 0..n-1 in order
    snapshot::interrupt_controller_record interrupt_controller;
};

/// Capture every vCPU and the VM into snapshot records. Every vCPU must be
/// paused outside KVM_RUN (see the top of this header) for the whole call.
template <kvm_state_access Backend>
result<kvm_records> capture_records(const Backend& backend,
                                    std::span<const std::uint32_t> msr_indexes) {
    kvm_records out;
    const std::uint32_t n = backend.vcpu_count();
    if (n == 0 || n > snapshot::max_vcpus) return errc::invalid_argument;
    out.vcpus.reserve(n);
    for (std::uint32_t i = 0; i < n; ++i) {
        SUPERMACHINE_TRY(state, capture_vcpu(backend.vm_fd(), backend.vcpu_fd(i), msr_indexes));
        SUPERMACHINE_TRY(blob, encode_vcpu_state(state));
        if (blob.size() > snapshot::max_vcpu_state_bytes) return errc::snapshot_too_large;
        out.vcpus.push_back({i, std::move(blob)});
    }
    // The VM last: the clock is read as close to the end of the pause as we can.
    SUPERMACHINE_TRY(vm, capture_vm(backend.vm_fd()));
    SUPERMACHINE_TRY(vm_blob, encode_vm_state(vm));
    out.interrupt_controller.state = std::move(vm_blob);
    return out;
}

/// Restore snapshot records into a freshly created backend with as many
/// vCPUs, before any vCPU runs. Every blob is decoded (and so validated)
/// before the first KVM state is changed.
template <kvm_state_access Backend>
result<void> restore_records(Backend& backend, std::span<const snapshot::vcpu_record> vcpus,
                             const snapshot::interrupt_controller_record& interrupt_controller,
                             clock_policy policy = clock_policy::advance_by_elapsed_time) {
    const std::uint32_t n = backend.vcpu_count();
    if (vcpus.size() != n) return errc::snapshot_mismatch;
    std::vector<vcpu_state> states;
    states.reserve(n);
    for (std::uint32_t i = 0; i < n; ++i) {
        if (vcpus[i].index != i) return errc::snapshot_bad_record;
        SUPERMACHINE_TRY(state, decode_vcpu_state(vcpus[i].state));
        states.push_back(std::move(state));
    }
    SUPERMACHINE_TRY(vm, decode_vm_state(interrupt_controller.state));
    SUPERMACHINE_TRY(restore_vm(backend.vm_fd(), vm, policy));
    for (std::uint32_t i = 0; i < n; ++i) {
        SUPERMACHINE_TRY(restore_vcpu(backend.vm_fd(), backend.vcpu_fd(i), states[i]));
    }
    return success();
}

} // namespace supermachine::backend::kvm_state
