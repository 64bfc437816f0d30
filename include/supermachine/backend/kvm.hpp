#pragma once
// The kvm backend policy: one VM on /dev/kvm with an in-kernel irqchip and
// PIT, guest memory as memory slots, vCPUs with filtered CPUID, boot MSRs and
// the kernel's entry state, irqfd interrupt lines and ioeventfd doorbells.
//
// Threads: create() and set_entry_state() run on the caller's thread before
// the vCPUs start; run_vcpu(i, ...) runs on vCPU i's own thread; kick() and
// make_interrupt_line()/make_doorbell() are safe from any thread.
#include <supermachine/backend/detail/kvm_cpuid.hpp>
#include <supermachine/backend/detail/kvm_fd.hpp>
#include <supermachine/backend/hypervisor_backend.hpp>
#include <supermachine/device.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace supermachine::backend {

/// True when /dev/kvm is kvm_pvm (software virtualization for PVM guests):
/// stock Linux kernels do not run on it (see doc/kvm-backend.md).
inline bool host_is_kvm_pvm() noexcept {
    struct stat st {};
    return ::stat("/sys/module/kvm_pvm", &st) == 0;
}

class kvm {
public:
    struct config {
        std::uint32_t vcpus = 1;
        /// On a kvm_pvm host, hide CPU features its instruction emulator
        /// cannot handle (see detail/kvm_cpuid.hpp). Never applied elsewhere.
        bool host_workarounds = true;
        const char* device_path = "/dev/kvm";
        /// A snapshot restore will set every vCPU's state: skip the boot
        /// MSRs and LAPIC LINT wiring it would overwrite anyway.
        bool restoring = false;
    };

    /// The most vCPUs we describe: xAPIC ids in the MADT are 8-bit and 0xff is broadcast.
    static constexpr std::uint32_t max_vcpus = 254;

    kvm(const kvm&) = delete;
    kvm& operator=(const kvm&) = delete;
    ~kvm() {
        for (auto& v : vcpus_)
            if (v.run) ::munmap(v.run, run_size_);
    }

    static result<std::unique_ptr<kvm>> create(const guest_memory& memory, const config& cfg) {
        if (cfg.vcpus == 0) return errc::invalid_argument;
        if (cfg.vcpus > max_vcpus) return errc::too_many_vcpus;
        std::unique_ptr<kvm> self(new kvm());
        self->system_ =
            supermachine::detail::unique_fd(::open(cfg.device_path, O_RDWR | O_CLOEXEC));
        if (!self->system_) return errc::kvm_unavailable;
        const int version = ::ioctl(self->system_.get(), KVM_GET_API_VERSION, 0);
        if (version != KVM_API_VERSION) return errc::kvm_api_mismatch;
        for (int cap : {KVM_CAP_IRQCHIP, KVM_CAP_USER_MEMORY, KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_IRQFD,
                        KVM_CAP_IOEVENTFD, KVM_CAP_EXT_CPUID, KVM_CAP_PIT2})
            if (::ioctl(self->system_.get(), KVM_CHECK_EXTENSION, cap) <= 0)
                return errc::kvm_api_mismatch;
        int kvm_max = ::ioctl(self->system_.get(), KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
        if (kvm_max <= 0)
            kvm_max = ::ioctl(self->system_.get(), KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS);
        if (kvm_max > 0 && cfg.vcpus > static_cast<std::uint32_t>(kvm_max))
            return errc::too_many_vcpus;
        const int run_size = ::ioctl(self->system_.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
        if (run_size < static_cast<int>(sizeof(kvm_run))) return errc::kvm_api_mismatch;
        self->run_size_ = static_cast<std::size_t>(run_size);
        self->pvm_ = host_is_kvm_pvm();
        self->workarounds_ = cfg.host_workarounds;
        self->memory_ = &memory; // the machine keeps guest memory alive longer than the backend

        self->vm_ = supermachine::detail::unique_fd(::ioctl(self->system_.get(), KVM_CREATE_VM, 0));
        if (!self->vm_) return detail::kvm_error();
        // VMX needs three pages for the real-mode TSS and one for the identity
        // map, inside the 4 GiB space but outside RAM and our MMIO: just below
        // the BIOS area at 4 GiB, as QEMU and Firecracker do. Other KVM
        // implementations (SVM, PVM) may refuse; they do not need them.
        (void)::ioctl(self->vm_.get(), KVM_SET_IDENTITY_MAP_ADDR, &identity_map_address);
        (void)::ioctl(self->vm_.get(), KVM_SET_TSS_ADDR, tss_address);
        if (::ioctl(self->vm_.get(), KVM_CREATE_IRQCHIP, 0) != 0) return detail::kvm_error();
        kvm_pit_config pit{};
        pit.flags = KVM_PIT_SPEAKER_DUMMY; // port 0x61 served in-kernel, no PC speaker
        if (::ioctl(self->vm_.get(), KVM_CREATE_PIT2, &pit) != 0) return detail::kvm_error();

        std::uint32_t slot = 0;
        for (const auto& region : memory.regions()) {
            kvm_userspace_memory_region r{};
            r.slot = slot++;
            r.guest_phys_addr = region.guest_base;
            r.memory_size = region.size();
            r.userspace_addr = reinterpret_cast<std::uint64_t>(region.host.data());
            if (::ioctl(self->vm_.get(), KVM_SET_USER_MEMORY_REGION, &r) != 0)
                return detail::kvm_error();
        }

        // kvm_pvm answers KVM_GET_SUPPORTED_CPUID with EINVAL: its guests
        // see the host's CPUID as it is, and there is nothing to filter.
        auto supported = detail::supported_cpuid(self->system_.get());
        if (!supported && !self->pvm_) return supported.error();
        self->vcpus_ = std::vector<vcpu>(cfg.vcpus);
        for (std::uint32_t i = 0; i < cfg.vcpus; ++i) {
            auto& v = self->vcpus_[i];
            v.fd = supermachine::detail::unique_fd(
                ::ioctl(self->vm_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(i)));
            if (!v.fd) return detail::kvm_error();
            void* p =
                ::mmap(nullptr, self->run_size_, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd.get(), 0);
            if (p == MAP_FAILED) return errno_code(errno);
            v.run = static_cast<kvm_run*>(p);
            if (supported) {
                auto cpuid = detail::filter_cpuid(supported.value(), i, cfg.vcpus,
                                                  self->pvm_ && cfg.host_workarounds);
                if (::ioctl(v.fd.get(), detail::ioctl_set_cpuid2, cpuid.header()) != 0)
                    return detail::kvm_error();
            }
            if (!cfg.restoring) {
                SUPERMACHINE_TRY(self->set_boot_msrs(v));
                SUPERMACHINE_TRY(self->set_local_interrupts(v));
            }
        }
        install_kick_signal();
        return self;
    }

    std::uint32_t vcpu_count() const noexcept { return static_cast<std::uint32_t>(vcpus_.size()); }

    /// Kernel parameters this host needs: on kvm_pvm (with host_workarounds)
    /// the instruction work-arounds from doc/kvm-backend.md — harmless on
    /// other kernels, and never added on other hosts.
    std::string kernel_cmdline() const {
        if (!pvm_ || !workarounds_) return {};
        return "noxsave no_int3_selftest nofsgsbase noinvpcid clearcpuid=151,141,308,534";
    }
    bool host_is_pvm() const noexcept { return pvm_; }
    int vm_fd() const noexcept { return vm_.get(); }
    /// The open /dev/kvm (e.g. for kvm_state::msr_index_list).
    int system_fd() const noexcept { return system_.get(); }
    int vcpu_fd(std::uint32_t index) const noexcept { return vcpus_.at(index).fd.get(); }

    /// Registers, segments, control registers and FPU for the kernel entry.
    /// Only the boot vCPU gets one: with the in-kernel irqchip the others
    /// wait for INIT/SIPI from the guest.
    result<void> set_entry_state(std::uint32_t index, const entry_state& entry) {
        if (index >= vcpus_.size()) return errc::invalid_argument;
        const int fd = vcpus_[index].fd.get();
        kvm_sregs sregs{};
        if (::ioctl(fd, KVM_GET_SREGS, &sregs) != 0) return detail::kvm_error();
        auto flat = [](std::uint16_t selector, std::uint8_t type, bool code64) {
            kvm_segment s{};
            s.base = 0;
            s.limit = 0xffffffff;
            s.selector = selector;
            s.type = type;
            s.present = 1;
            s.dpl = 0;
            s.db = code64 ? 0 : 1;
            s.s = 1;
            s.l = code64 ? 1 : 0;
            s.g = 1;
            return s;
        };
        sregs.cs = flat(entry.code_selector, 0xb, entry.long_mode); // execute/read, accessed
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss =
            flat(entry.data_selector, 0x3, false); // read/write, accessed
        sregs.tr = {};
        sregs.tr.selector = 0x20;
        sregs.tr.limit = 0x67;
        sregs.tr.type = 0xb; // busy 32/64-bit TSS: what VMX requires on entry
        sregs.tr.present = 1;
        sregs.ldt = {};
        sregs.ldt.type = 0x2;
        sregs.ldt.present = 1;
        sregs.ldt.limit = 0xffff;
        sregs.gdt.base = entry.gdt_base;
        sregs.gdt.limit = entry.gdt_limit;
        sregs.idt.base = entry.idt_base;
        sregs.idt.limit = entry.idt_limit;
        constexpr std::uint64_t cr0_pe = 1, cr0_et = 1u << 4, cr0_ne = 1u << 5, cr0_pg = 1ull << 31;
        constexpr std::uint64_t cr4_pae = 1u << 5;
        constexpr std::uint64_t efer_lme = 1u << 8, efer_lma = 1u << 10;
        if (entry.long_mode) {
            sregs.cr0 = cr0_pe | cr0_et | cr0_ne | cr0_pg;
            sregs.cr3 = entry.cr3;
            sregs.cr4 = cr4_pae;
            sregs.efer = efer_lme | efer_lma;
        } else {
            sregs.cr0 = cr0_pe | cr0_et | cr0_ne;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        if (::ioctl(fd, KVM_SET_SREGS, &sregs) != 0) return detail::kvm_error();

        kvm_regs regs{};
        regs.rflags = 0x2; // bit 1 is reserved-one; interrupts off
        regs.rip = entry.rip;
        regs.rsp = entry.rsp;
        regs.rbp = entry.rsp;
        regs.rsi = entry.rsi;
        regs.rbx = entry.rbx;
        if (::ioctl(fd, KVM_SET_REGS, &regs) != 0) return detail::kvm_error();

        kvm_fpu fpu{};
        fpu.fcw = 0x37f;    // x87 default control word (all exceptions masked)
        fpu.mxcsr = 0x1f80; // SSE default: all exceptions masked
        if (::ioctl(fd, KVM_SET_FPU, &fpu) != 0) return detail::kvm_error();
        return success();
    }

    /// Run vCPU `index` until an exit the machine must see. Port I/O and
    /// MMIO go to `handler` on this thread.
    template <access_handler Handler>
    vcpu_exit run_vcpu(std::uint32_t index, Handler& handler) {
        auto& v = vcpus_.at(index);
        v.thread.store(::pthread_self(), std::memory_order_release);
        if (!v.has_thread.load(std::memory_order_acquire)) {
            // The kick must reach this thread even if the application blocks signals.
            sigset_t kick;
            ::sigemptyset(&kick);
            ::sigaddset(&kick, kick_signal());
            ::pthread_sigmask(SIG_UNBLOCK, &kick, nullptr);
        }
        v.has_thread.store(true, std::memory_order_release);
        kvm_run* run = v.run;
        for (;;) {
            if (::ioctl(v.fd.get(), KVM_RUN, 0) != 0) {
                const int e = errno;
                if (e == EINTR) {
                    // kick(): clear the request so the next run really runs.
                    __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                    return {.what = vcpu_exit::kind::interrupted};
                }
                if (e == EAGAIN) continue;
                return {.what = vcpu_exit::kind::run_failed, .error = errno_code(e)};
            }
            switch (run->exit_reason) {
            case KVM_EXIT_IO: {
                // Bounded by the kvm_run page: KVM chose the offset, but check anyway.
                const std::uint64_t bytes = std::uint64_t{run->io.size} * run->io.count;
                if (run->io.data_offset > run_size_ || bytes > run_size_ - run->io.data_offset)
                    return {.what = vcpu_exit::kind::internal_error, .detail = KVM_EXIT_IO};
                auto* data = reinterpret_cast<std::byte*>(run) + run->io.data_offset;
                const bool is_write = run->io.direction == KVM_EXIT_IO_OUT;
                for (std::uint32_t i = 0; i < run->io.count; ++i)
                    handler(
                        address_space::port_io, run->io.port,
                        std::span<std::byte>(data + std::size_t{i} * run->io.size, run->io.size),
                        is_write);
                break;
            }
            case KVM_EXIT_MMIO: {
                const std::size_t length =
                    std::min<std::size_t>(run->mmio.len, sizeof run->mmio.data);
                handler(address_space::mmio, run->mmio.phys_addr,
                        std::span<std::byte>(reinterpret_cast<std::byte*>(run->mmio.data), length),
                        run->mmio.is_write != 0);
                break;
            }
            case KVM_EXIT_INTR:
                __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                return {.what = vcpu_exit::kind::interrupted};
            case KVM_EXIT_HLT:
                return {.what = vcpu_exit::kind::halted};
            case KVM_EXIT_SHUTDOWN: {
                auto exit = read_instruction_at(index);
                exit.what = vcpu_exit::kind::shutdown;
                return exit;
            }
            case KVM_EXIT_INTERNAL_ERROR: {
                auto exit = read_instruction_at(index);
                exit.what = run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION
                                ? vcpu_exit::kind::emulation_failure
                                : vcpu_exit::kind::internal_error;
                exit.detail = run->internal.suberror;
                // Some KVMs hand us the bytes they fetched; prefer our own read.
                if (exit.instruction_length == 0 &&
                    run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION &&
                    run->internal.ndata >= 2 && run->internal.ndata <= 16 &&
                    (run->internal.data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) {
                    const std::size_t n =
                        std::min<std::uint64_t>(run->internal.data[1], exit.instruction.size());
                    const std::size_t available = (run->internal.ndata - 2) * 8;
                    exit.instruction_length = static_cast<std::uint8_t>(std::min(n, available));
                    std::memcpy(exit.instruction.data(), &run->internal.data[2],
                                exit.instruction_length);
                }
                return exit;
            }
            case KVM_EXIT_SYSTEM_EVENT: {
                vcpu_exit exit{.what = vcpu_exit::kind::internal_error,
                               .detail = run->system_event.type};
                switch (run->system_event.type) {
                case KVM_SYSTEM_EVENT_SHUTDOWN:
                    exit.what = vcpu_exit::kind::system_shutdown;
                    break;
                case KVM_SYSTEM_EVENT_RESET:
                    exit.what = vcpu_exit::kind::system_reset;
                    break;
                case KVM_SYSTEM_EVENT_CRASH:
                    exit.what = vcpu_exit::kind::system_crash;
                    break;
                default:
                    break;
                }
                return exit;
            }
            case KVM_EXIT_FAIL_ENTRY: {
                auto exit = read_instruction_at(index);
                exit.what = vcpu_exit::kind::internal_error;
                exit.detail = run->fail_entry.hardware_entry_failure_reason;
                return exit;
            }
            default: {
                auto exit = read_instruction_at(index);
                exit.what = vcpu_exit::kind::internal_error;
                exit.detail = run->exit_reason;
                return exit;
            }
            }
        }
    }

    /// Make run_vcpu(index) return `interrupted` soon, from any thread: the
    /// immediate_exit flag covers a vCPU about to enter KVM_RUN, the signal
    /// one already inside it.
    void kick(std::uint32_t index) noexcept {
        if (index >= vcpus_.size()) return;
        auto& v = vcpus_[index];
        __atomic_store_n(&v.run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        if (v.has_thread.load(std::memory_order_acquire))
            ::pthread_kill(v.thread.load(std::memory_order_acquire), kick_signal());
    }

    /// The guest RIP of vCPU `index` and up to 15 instruction bytes there,
    /// translated through the guest's own page tables (4-level long mode,
    /// or linear = physical with paging off). Reads guest memory only
    /// through the memory slots KVM knows, via guest_memory bounds checks.
    vcpu_exit read_instruction_at(std::uint32_t index) const {
        vcpu_exit exit{};
        const int fd = vcpus_.at(index).fd.get();
        kvm_regs regs{};
        kvm_sregs sregs{};
        if (::ioctl(fd, KVM_GET_REGS, &regs) != 0 || ::ioctl(fd, KVM_GET_SREGS, &sregs) != 0)
            return exit;
        exit.rip = regs.rip;
        if (!memory_) return exit;
        const bool long_mode = (sregs.efer & (1u << 10)) != 0;
        const std::uint64_t linear = long_mode ? regs.rip : sregs.cs.base + (regs.rip & 0xffffffff);
        for (std::size_t i = 0; i < exit.instruction.size(); ++i) {
            auto physical = translate(sregs, linear + i);
            if (!physical) break;
            auto byte = memory_->read_object<std::byte>(*physical);
            if (!byte) break;
            exit.instruction[i] = byte.value();
            exit.instruction_length = static_cast<std::uint8_t>(i + 1);
        }
        return exit;
    }

    /// An irqfd for `gsi`: writing the eventfd pulses the IOAPIC pin.
    result<interrupt_line> make_interrupt_line(std::uint32_t gsi) {
        std::lock_guard lock(mutex_);
        if (gsi >= 24) return errc::invalid_argument; // IOAPIC pins
        for (const auto& [line_gsi, fd] : interrupt_lines_)
            if (line_gsi == gsi) return interrupt_line(fd.get());
        supermachine::detail::unique_fd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!fd) return errno_code(errno);
        kvm_irqfd request{};
        request.fd = static_cast<std::uint32_t>(fd.get());
        request.gsi = gsi;
        if (::ioctl(vm_.get(), KVM_IRQFD, &request) != 0) return detail::kvm_error();
        interrupt_line line(fd.get());
        interrupt_lines_.emplace_back(gsi, std::move(fd));
        return line;
    }

    /// An ioeventfd on MMIO [address, address + length): readable when the
    /// guest writes there (with `value`, if given) without leaving the kernel.
    result<int> make_doorbell(std::uint64_t address, std::uint32_t length,
                              std::optional<std::uint64_t> value) {
        if (length != 1 && length != 2 && length != 4 && length != 8) return errc::invalid_argument;
        std::lock_guard lock(mutex_);
        supermachine::detail::unique_fd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!fd) return errno_code(errno);
        kvm_ioeventfd request{};
        request.addr = address;
        request.len = length;
        request.fd = fd.get();
        if (value) {
            request.datamatch = *value;
            request.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
        }
        if (::ioctl(vm_.get(), KVM_IOEVENTFD, &request) != 0) return detail::kvm_error();
        const int raw = fd.get();
        doorbells_.push_back(std::move(fd));
        return raw;
    }

    /// The signal kick() sends. Its handler does nothing: the point is that
    /// KVM_RUN returns EINTR.
    static int kick_signal() noexcept { return SIGRTMIN; }

private:
    // Just below the 4 GiB boundary, clear of the LAPIC (0xfee00000) and of
    // RAM (which resumes at 4 GiB): QEMU's and Firecracker's choice.
    static constexpr std::uint64_t identity_map_address = 0xfffb'c000;
    static constexpr unsigned long tss_address = 0xfffb'd000;

    struct vcpu {
        supermachine::detail::unique_fd fd;
        kvm_run* run = nullptr;
        std::atomic<pthread_t> thread{};
        std::atomic<bool> has_thread{false};
        vcpu() = default;
        vcpu(vcpu&& other) noexcept
            : fd(std::move(other.fd))
            , run(std::exchange(other.run, nullptr)) {}
    };

    kvm() = default;

    static void install_kick_signal() {
        static std::once_flag once;
        std::call_once(once, [] {
            struct sigaction action {};
            action.sa_handler = [](int) {};
            ::sigemptyset(&action.sa_mask);
            action.sa_flags = 0; // no SA_RESTART: KVM_RUN must see EINTR
            ::sigaction(kick_signal(), &action, nullptr);
        });
    }

    // Firecracker's boot MSR set: syscall/sysenter MSRs cleared, TSC 0,
    // fast strings on, MTRRs on with write-back default (else Linux maps
    // all RAM uncached).
    result<void> set_boot_msrs(vcpu& v) {
        // The 8-byte kvm_msrs header, then the entries (see detail::list_header).
        constexpr std::size_t count = 11;
        std::uint64_t storage[1 + count * sizeof(kvm_msr_entry) / 8]{};
        auto* entries = reinterpret_cast<kvm_msr_entry*>(storage + 1);
        const std::pair<std::uint32_t, std::uint64_t> values[] = {
            {0x174, 0},              // IA32_SYSENTER_CS
            {0x175, 0},              // IA32_SYSENTER_ESP
            {0x176, 0},              // IA32_SYSENTER_EIP
            {0xc0000081, 0},         // STAR
            {0xc0000083, 0},         // CSTAR
            {0xc0000102, 0},         // KERNEL_GS_BASE
            {0xc0000084, 0},         // SYSCALL_MASK
            {0xc0000082, 0},         // LSTAR
            {0x10, 0},               // TSC
            {0x1a0, 1},              // IA32_MISC_ENABLE: fast strings
            {0x2ff, (1u << 11) | 6}, // MTRRdefType: enabled, default write-back
        };
        std::uint32_t n = 0;
        for (auto [index, data] : values)
            entries[n++] = {.index = index, .reserved = 0, .data = data};
        const detail::list_header header{n, 0};
        std::memcpy(storage, &header, sizeof header);
        const int written = ::ioctl(v.fd.get(), detail::ioctl_set_msrs, storage);
        if (written < 0) return detail::kvm_error();
        // KVM stops at the first MSR it refuses; all of these are architectural.
        if (static_cast<std::uint32_t>(written) != n) return errc::kvm_failed;
        return success();
    }

    // LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, the PC wiring
    // Linux expects of the local APIC at boot.
    result<void> set_local_interrupts(vcpu& v) {
        kvm_lapic_state lapic{};
        if (::ioctl(v.fd.get(), KVM_GET_LAPIC, &lapic) != 0) return detail::kvm_error();
        auto set_mode = [&](std::size_t offset, std::uint32_t mode) {
            std::uint32_t value;
            std::memcpy(&value, lapic.regs + offset, 4);
            value = (value & ~0x700u) | (mode << 8);
            std::memcpy(lapic.regs + offset, &value, 4);
        };
        set_mode(0x350, 7); // LVT LINT0: ExtINT
        set_mode(0x360, 4); // LVT LINT1: NMI
        if (::ioctl(v.fd.get(), KVM_SET_LAPIC, &lapic) != 0) return detail::kvm_error();
        return success();
    }

    std::optional<std::uint64_t> translate(const kvm_sregs& sregs, std::uint64_t linear) const {
        if (!(sregs.cr0 & (1ull << 31))) return linear; // paging off
        if (!(sregs.efer & (1u << 10)))
            return std::nullopt; // 32-bit paging: not used by our guests
        std::uint64_t table = sregs.cr3 & 0x000f'ffff'ffff'f000ull;
        for (int level = 3; level >= 0; --level) {
            const std::uint64_t index = (linear >> (12 + 9 * level)) & 0x1ff;
            auto read = memory_->read_object<std::uint64_t>(table + index * 8);
            if (!read || !(read.value() & 1)) return std::nullopt;
            const std::uint64_t entry = read.value();
            const std::uint64_t frame = entry & 0x000f'ffff'ffff'f000ull;
            if ((level == 1 || level == 2) && (entry & 0x80)) { // 2 MiB / 1 GiB page
                const std::uint64_t page_size = std::uint64_t{1} << (12 + 9 * level);
                return (frame & ~(page_size - 1)) | (linear & (page_size - 1));
            }
            if (level == 0) return frame | (linear & 0xfff);
            table = frame;
        }
        return std::nullopt;
    }

    supermachine::detail::unique_fd system_;
    supermachine::detail::unique_fd vm_;
    std::size_t run_size_ = 0;
    bool pvm_ = false;
    bool workarounds_ = true;
    std::vector<vcpu> vcpus_;
    const guest_memory* memory_ = nullptr;
    std::mutex mutex_;
    std::vector<std::pair<std::uint32_t, supermachine::detail::unique_fd>> interrupt_lines_;
    std::vector<supermachine::detail::unique_fd> doorbells_;
};

static_assert(hypervisor_backend<kvm>);

} // namespace supermachine::backend
