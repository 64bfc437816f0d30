#pragma once
// basic_machine<Backend, Devices...>: guest memory, a hypervisor backend, a
// compile-time device bus, the Linux boot, one thread per vCPU, and an exit
// status the caller can tell apart (power-off, reboot, triple fault, panic,
// emulation failure, KVM error).
//
//   using machine = basic_machine<backend::kvm, devices::serial, devices::i8042,
//   devices::acpi_power>; machine::config cfg; cfg.kernel_path = "vmlinuz";
//   std::get<devices::serial::config>(cfg.devices).sink = [](std::string_view s) { ... };
//   auto vm = value_or_throw(machine::create(io.get_executor(), std::move(cfg)));
//   vm->start();
//   machine_exit e = vm->wait();          // or co_await vm->async_wait(use_awaitable)
//
// Threads: create/start on the caller's thread; each vCPU on its own thread
// serving port I/O and MMIO through the bus; stop() and device input from
// any thread; async_wait completions on the handler's associated executor.
//
// Snapshots (doc/snapshot-machine.md), on a backend with KVM state access:
//   vm->snapshot_to(snapshot::file_store{"vm.snap"});   // pause, capture, resume
//   vm->async_snapshot("vm.snap", token);               // the same on a helper thread
//   auto loaded = snapshot::read_snapshot("vm.snap");   // validated, RAM MAP_PRIVATE
//   auto clone = machine::restore(executor, cfg, std::move(loaded).value());
//   clone.value()->start();                             // continues where it was
#include <supermachine/backend/hypervisor_backend.hpp>
#include <supermachine/backend/kvm_state.hpp>
#include <supermachine/boot/linux_loader.hpp>
#include <supermachine/device.hpp>
#include <supermachine/devices/bus.hpp>
#include <supermachine/devices/exit_request.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/snapshot/records.hpp>
#include <supermachine/snapshot/store.hpp>
#include <supermachine/virtio/mmio_state.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <vector>

namespace supermachine {

/// How a machine ended.
struct machine_exit {
    enum class reason {
        power_off,         // ACPI S5 (or a hypervisor system event)
        reboot,            // i8042 reset, ACPI reset register, system reset event
        triple_fault,      // KVM_EXIT_SHUTDOWN (Linux's reboot=t ends here too)
        panic,             // the guest kernel reported a panic
        emulation_failure, // KVM could not emulate an instruction: rip + bytes
        kvm_error,         // any other KVM failure (error holds the errno or errc)
        halted,            // a vCPU halted with nothing to wake it (no in-kernel irqchip)
        stopped,           // stop() from the host
    };
    reason what = reason::stopped;
    std::uint32_t vcpu = 0;
    std::uint64_t rip = 0;
    std::vector<std::byte> instruction; // bytes at rip, as far as readable
    error_code error;
    std::uint64_t detail = 0; // KVM exit/suberror code for kvm_error

    /// Power-off, reboot and stop are how a healthy guest (or host) ends it.
    bool clean() const noexcept {
        return what == reason::power_off || what == reason::reboot || what == reason::stopped;
    }

    /// One line for humans, e.g. "emulation failure at rip 0xffffffff81000000: 0f ae 2f".
    std::string describe() const {
        char buf[160];
        switch (what) {
        case reason::power_off:
            return "guest powered off";
        case reason::reboot:
            return "guest rebooted";
        case reason::stopped:
            return "stopped by the host";
        case reason::panic:
            return "guest kernel panicked";
        case reason::halted:
            return "vCPU " + std::to_string(vcpu) + " halted with nothing to wake it";
        case reason::triple_fault:
            std::snprintf(buf, sizeof buf, "guest triple-faulted (vCPU %u, rip 0x%llx)", vcpu,
                          static_cast<unsigned long long>(rip));
            return buf;
        case reason::emulation_failure: {
            std::snprintf(buf, sizeof buf,
                          "KVM emulation failure on vCPU %u at rip 0x%llx, instruction bytes:",
                          vcpu, static_cast<unsigned long long>(rip));
            std::string s = buf;
            if (instruction.empty()) s += " (unreadable)";
            for (auto b : instruction) {
                std::snprintf(buf, sizeof buf, " %02x", std::to_integer<unsigned>(b));
                s += buf;
            }
            return s;
        }
        case reason::kvm_error:
            std::snprintf(buf, sizeof buf, "KVM error on vCPU %u (code %llu, rip 0x%llx): ", vcpu,
                          static_cast<unsigned long long>(detail),
                          static_cast<unsigned long long>(rip));
            return buf + (error ? error.message() : std::string("internal error"));
        }
        return "unknown exit";
    }
};

/// An exit with only its reason (the other fields keep their defaults).
inline machine_exit make_exit(machine_exit::reason what) {
    machine_exit e;
    e.what = what;
    return e;
}

inline std::string_view to_string(machine_exit::reason r) noexcept {
    using R = machine_exit::reason;
    switch (r) {
    case R::power_off:
        return "power_off";
    case R::reboot:
        return "reboot";
    case R::triple_fault:
        return "triple_fault";
    case R::panic:
        return "panic";
    case R::emulation_failure:
        return "emulation_failure";
    case R::kvm_error:
        return "kvm_error";
    case R::halted:
        return "halted";
    case R::stopped:
        return "stopped";
    }
    return "?";
}

/// The kernel command line a machine uses unless told otherwise:
///   console=ttyS0   kernel messages on COM1, our serial device
///   reboot=k        reboot by the i8042 reset line, which ends the machine as "reboot"
///   panic=-1        reboot at once after a panic (already reported from the console banner)
///   pci=off         there is no PCI bus; skip probing it
///   i8042.noaux i8042.nomux i8042.dumbkbd   our i8042 has only the reset line: no mouse
///                   port, no multiplexer, no keyboard replies to wait for
inline constexpr std::string_view default_kernel_cmdline =
    "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

namespace detail {
/// Read a whole file of at most `limit` bytes. `too_large` when bigger.
inline result<std::vector<std::byte>>
read_bounded_file(const std::string& path, std::uint64_t limit, errc missing, errc too_large) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return missing;
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        return missing;
    }
    if (static_cast<std::uint64_t>(st.st_size) > limit) {
        ::close(fd);
        return too_large;
    }
    std::vector<std::byte> bytes(static_cast<std::size_t>(st.st_size));
    std::size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break; // shrank under us: keep what we read, the loader checks it
        done += static_cast<std::size_t>(n);
    }
    ::close(fd);
    bytes.resize(done);
    return bytes;
}

inline backend::entry_state to_entry_state(const boot::boot_entry& e) {
    backend::entry_state s;
    s.long_mode = e.mode == boot::entry_mode::long_mode_64;
    s.rip = e.rip;
    s.rsi = e.rsi;
    s.rbx = e.rbx;
    s.rsp = e.rsp;
    s.cr3 = e.cr3;
    s.gdt_base = e.gdt_base;
    s.gdt_limit = e.gdt_limit;
    s.idt_base = e.idt_base;
    s.idt_limit = e.idt_limit;
    s.code_selector = e.code_selector;
    s.data_selector = e.data_selector;
    return s;
}
} // namespace detail

/// What snapshot_to() does with the machine once its state is saved.
enum class after_snapshot { resume, stop };

template <backend::hypervisor_backend Backend, class... Devices>
class basic_machine {
public:
    using backend_type = Backend;
    using bus_type = device_bus<bus_device_for<Devices>...>;

    /// Smallest and largest guest RAM we accept.
    static constexpr std::uint64_t min_memory_mib = 16;
    static constexpr std::uint64_t max_memory_mib = 1024 * 1024; // 1 TiB

    struct config {
        std::uint64_t memory_mib = 256;
        std::uint32_t vcpus = 1;
        /// The kernel: bytes, or a path read at create() when the bytes are empty.
        std::vector<std::byte> kernel;
        std::string kernel_path;
        std::vector<std::byte> initrd;
        std::string initrd_path;
        std::string cmdline = std::string(default_kernel_cmdline);
        /// Appended after cmdline (and after device fragments).
        std::string extra_cmdline;
        std::tuple<typename bus_device_for<Devices>::config...> devices{};
        typename Backend::config backend{}; // its vcpus is overwritten from `vcpus`
        bool prefer_pvh = true;
        /// After the guest prints a panic banner, how long it may take to
        /// reboot or power off before the machine ends anyway (as a panic).
        std::chrono::milliseconds panic_grace{1000};
        /// Replaces load_linux: place a guest in memory yourself and return
        /// its entry state (tests, custom firmware, restore paths).
        std::function<result<backend::entry_state>(const guest_memory&,
                                                   const boot::linux_boot_config&)>
            loader;
    };

    basic_machine(const basic_machine&) = delete;
    basic_machine& operator=(const basic_machine&) = delete;

    ~basic_machine() {
        stop(); // completes every async_wait too
        join();
        for (auto& t : snapshot_threads_)
            if (t.joinable()) t.join();
    }

    /// Allocate memory, open the VM, create every device, load the kernel and
    /// set the boot vCPU's entry state. Nothing runs until start().
    static result<std::unique_ptr<basic_machine>> create(boost::asio::any_io_executor executor,
                                                         config cfg) {
        if (cfg.vcpus == 0) return errc::invalid_argument;
        if (cfg.memory_mib < min_memory_mib) return errc::memory_too_small;
        if (cfg.memory_mib > max_memory_mib) return errc::memory_too_large;
        const std::uint64_t memory_bytes = cfg.memory_mib << 20;

        std::unique_ptr<basic_machine> self(new basic_machine(std::move(executor)));
        if (cfg.kernel.empty() && !cfg.loader) {
            if (cfg.kernel_path.empty()) return errc::kernel_not_found;
            SUPERMACHINE_TRY(bytes, detail::read_bounded_file(cfg.kernel_path, memory_bytes,
                                                              errc::kernel_not_found,
                                                              errc::memory_too_small));
            cfg.kernel = std::move(bytes);
        }
        if (cfg.initrd.empty() && !cfg.initrd_path.empty()) {
            SUPERMACHINE_TRY(bytes,
                             detail::read_bounded_file(cfg.initrd_path, memory_bytes,
                                                       errc::not_found, errc::initrd_too_large));
            cfg.initrd = std::move(bytes);
        }

        SUPERMACHINE_TRY(memory, guest_memory::allocate_x86(memory_bytes));
        self->memory_ = std::move(memory);
        cfg.backend.vcpus = cfg.vcpus;
        SUPERMACHINE_TRY(vm, Backend::create(self->memory_, cfg.backend));
        self->backend_ = std::move(vm);

        boot::linux_boot_config boot_config;
        boot_config.vcpus = cfg.vcpus;
        boot_config.prefer_pvh = cfg.prefer_pvh;
        SUPERMACHINE_TRY(
            self->create_devices(cfg, boot_config, std::index_sequence_for<Devices...>{}));

        std::string cmdline = cfg.cmdline;
        auto append = [&](const std::string& fragment) {
            if (fragment.empty()) return;
            if (!cmdline.empty()) cmdline += ' ';
            cmdline += fragment;
        };
        if constexpr (requires(Backend & b) {
                          { b.kernel_cmdline() } -> std::convertible_to<std::string>;
                      })
            append(self->backend_->kernel_cmdline());
        std::apply([&](auto&... device) { (append(device_cmdline(device.get())), ...); },
                   self->bus_.devices());
        append(cfg.extra_cmdline);
        boot_config.kernel = cfg.kernel;
        boot_config.initrd = cfg.initrd;
        boot_config.cmdline = std::move(cmdline);

        backend::entry_state entry;
        if (cfg.loader) {
            SUPERMACHINE_TRY(e, cfg.loader(self->memory_, boot_config));
            entry = e;
        } else {
            SUPERMACHINE_TRY(e, boot::load_linux(self->memory_, boot_config));
            entry = detail::to_entry_state(e);
        }
        SUPERMACHINE_TRY(self->backend_->set_entry_state(0, entry));
        self->cmdline_ = boot::full_cmdline(boot_config); // what load_linux wrote
        self->panic_grace_ = cfg.panic_grace;
        return self;
    }

    /// A machine from a snapshot: the backend over the snapshot's private RAM
    /// mapping, every vCPU, the interrupt controllers and clock, the UART and
    /// each virtio device as they were. No kernel is loaded and no entry
    /// state set; start() runs the vCPUs (each one's saved MP state decides
    /// whether it runs or waits for a SIPI). `cfg` must describe the same
    /// machine (vCPUs, memory, device list); its kernel fields are ignored.
    /// Another vCPU count, memory size or device set: snapshot_mismatch.
    static result<std::unique_ptr<basic_machine>>
    restore(boost::asio::any_io_executor executor, config cfg, snapshot::loaded_snapshot loaded) {
        if constexpr (!backend::kvm_state::kvm_state_access<Backend>) {
            return errc::not_supported;
        } else {
            const auto& records = loaded.records;
            if (cfg.vcpus == 0) return errc::invalid_argument;
            if (cfg.memory_mib < min_memory_mib || cfg.memory_mib > max_memory_mib)
                return errc::snapshot_mismatch;
            if (records.machine.vcpu_count != cfg.vcpus || records.vcpus.size() != cfg.vcpus ||
                records.machine.memory_size != (cfg.memory_mib << 20) ||
                loaded.memory.size() != records.machine.memory_size)
                return errc::snapshot_mismatch;
            if (!records.interrupt_controller) return errc::snapshot_bad_record;

            std::unique_ptr<basic_machine> self(new basic_machine(std::move(executor)));
            self->memory_ = std::move(loaded.memory);
            self->source_ = std::move(loaded.source);
            cfg.backend.vcpus = cfg.vcpus;
            if constexpr (requires { cfg.backend.restoring = true; }) cfg.backend.restoring = true;
            SUPERMACHINE_TRY(vm, Backend::create(self->memory_, cfg.backend));
            self->backend_ = std::move(vm);
            boot::linux_boot_config unused;
            SUPERMACHINE_TRY(
                self->create_devices(cfg, unused, std::index_sequence_for<Devices...>{}));
            // Everything that can be checked without changing state first.
            SUPERMACHINE_TRY(self->check_device_records(records));
            SUPERMACHINE_TRY(backend::kvm_state::restore_records(*self->backend_, records.vcpus,
                                                                 *records.interrupt_controller));
            SUPERMACHINE_TRY(self->restore_devices(records));
            self->cmdline_ = records.machine.kernel_identity;
            self->panic_grace_ = cfg.panic_grace;
            return self;
        }
    }

    /// Pause every vCPU (each returns from KVM_RUN and parks), quiesce the
    /// devices (requests in flight complete), save vCPU, VM, UART, virtio and
    /// RAM state into `store`, then resume (or stop) the machine. From any
    /// thread but a vCPU's; one snapshot at a time.
    template <class Store>
    requires snapshot::snapshot_store<std::remove_cvref_t<Store>> result<void>
    snapshot_to(Store&& store, after_snapshot then = after_snapshot::resume) {
        SUPERMACHINE_TRY(image, pause_and_capture());
        auto saved = store.save(image);
        resume_after_capture(then);
        return saved;
    }

    /// snapshot_to(file_store{path}) on a helper thread; completes with
    /// void(error_code) on the handler's associated executor.
    template <class CompletionToken>
    auto async_snapshot(std::filesystem::path path, CompletionToken&& token,
                        after_snapshot then = after_snapshot::resume) {
        return boost::asio::async_initiate<CompletionToken, void(error_code)>(
            [this, then](auto handler, std::filesystem::path path) {
                auto handler_executor = boost::asio::get_associated_executor(handler, executor_);
                auto work = boost::asio::make_work_guard(handler_executor);
                std::lock_guard lock(snapshot_threads_mutex_);
                snapshot_threads_.emplace_back([this, then, path = std::move(path),
                                                handler = std::move(handler),
                                                work = std::move(work)]() mutable {
                    snapshot::file_store store(path);
                    auto saved = snapshot_to(store, then);
                    error_code error = saved ? error_code{} : saved.error();
                    auto ex = work.get_executor();
                    boost::asio::post(
                        ex, [handler = std::move(handler), error]() mutable { handler(error); });
                    work.reset();
                });
            },
            token, std::move(path));
    }

    /// Pause the machine and return its state as a snapshot image (RAM is
    /// this machine's memory: the vCPUs stay parked until
    /// resume_after_capture()). snapshot_to() is this + save + resume.
    result<snapshot::snapshot_image> pause_and_capture() {
        if constexpr (!backend::kvm_state::kvm_state_access<Backend>) {
            return errc::not_supported;
        } else {
            std::unique_lock snapshot_lock(snapshot_mutex_);
            SUPERMACHINE_TRY(pause_vcpus());
            std::apply([](auto&... device) { (pause_device(device.get()), ...); }, bus_.devices());
            auto image = capture_locked();
            if (!image) {
                resume_locked(after_snapshot::resume);
                return image.error();
            }
            snapshot_lock.release(); // held until resume_after_capture()
            return image;
        }
    }

    /// Resume (or stop) after pause_and_capture().
    void resume_after_capture(after_snapshot then = after_snapshot::resume) {
        resume_locked(then);
        snapshot_mutex_.unlock();
    }

    /// Start one thread per vCPU.
    result<void> start() {
        std::lock_guard lock(mutex_);
        if (started_) return errc::invalid_argument;
        started_ = true;
        for (std::uint32_t i = 0; i < backend_->vcpu_count(); ++i)
            threads_.emplace_back([this, i] { run_vcpu_thread(i); });
        return success();
    }

    /// Block until the machine ends (joins the vCPU threads).
    machine_exit wait() {
        std::unique_lock lock(mutex_);
        exited_.wait(lock, [&] { return exit_.has_value(); });
        auto e = *exit_;
        lock.unlock();
        join();
        return e;
    }

    /// Wait at most `timeout`; nullopt if still running.
    template <class Rep, class Period>
    std::optional<machine_exit> wait_for(std::chrono::duration<Rep, Period> timeout) {
        std::unique_lock lock(mutex_);
        if (!exited_.wait_for(lock, timeout, [&] { return exit_.has_value(); }))
            return std::nullopt;
        auto e = *exit_;
        lock.unlock();
        join();
        return e;
    }

    std::optional<machine_exit> exit_status() const {
        std::lock_guard lock(mutex_);
        return exit_;
    }

    /// End the machine from any thread (exit reason `stopped`, unless it already ended).
    void stop() { finish(make_exit(machine_exit::reason::stopped)); }

    /// Completes with the machine_exit when the machine ends: void(machine_exit).
    template <class CompletionToken>
    auto async_wait(CompletionToken&& token) {
        return boost::asio::async_initiate<CompletionToken, void(machine_exit)>(
            [this](auto handler) {
                using handler_type = decltype(handler);
                auto handler_executor = boost::asio::get_associated_executor(handler, executor_);
                auto state =
                    std::make_shared<std::pair<handler_type, decltype(boost::asio::make_work_guard(
                                                                 handler_executor))>>(
                        std::move(handler), boost::asio::make_work_guard(handler_executor));
                auto complete = [state](const machine_exit& e) {
                    auto ex = state->second.get_executor();
                    boost::asio::post(ex, [state, e]() mutable {
                        auto h = std::move(state->first);
                        state->second.reset();
                        h(std::move(e));
                    });
                };
                std::unique_lock lock(mutex_);
                if (exit_) {
                    auto e = *exit_;
                    lock.unlock();
                    complete(e);
                } else {
                    waiters_.push_back(std::move(complete));
                }
            },
            token);
    }

    /// The device of type D (which must be attached and appear once in the list).
    template <class D>
    bus_device_for<D>& device() noexcept {
        return bus_.template get<bus_device_for<D>>();
    }
    /// The device in slot I of the type list (when a type appears twice);
    /// nullptr for a slot that is not attached.
    template <std::size_t I>
    auto* device_at() noexcept {
        return std::get<I>(bus_.devices()).get();
    }
    const guest_memory& memory() const noexcept { return memory_; }
    /// For a restored machine: the snapshot file its RAM maps (else empty).
    const std::shared_ptr<const snapshot::ram_source>& snapshot_source() const noexcept {
        return source_;
    }
    Backend& backend() noexcept { return *backend_; }
    /// The command line the guest was given.
    const std::string& kernel_cmdline() const noexcept { return cmdline_; }

private:
    explicit basic_machine(boost::asio::any_io_executor executor)
        : executor_(std::move(executor)) {}

    template <class D>
    static void stop_device(D* device) {
        if constexpr (requires { device->stop(); })
            if (device) device->stop();
    }

    template <class D>
    static std::string device_cmdline(const D* device) { // nullptr: slot not attached
        if constexpr (requires {
                          { device->kernel_cmdline() } -> std::convertible_to<std::string>;
                      })
            return device ? device->kernel_cmdline() : std::string();
        else
            return {};
    }

    template <std::size_t... I>
    result<void> create_devices(config& cfg, boot::linux_boot_config& boot_config,
                                std::index_sequence<I...>) {
        std::uint64_t next_window = x86_layout::virtio_mmio_base;
        std::uint32_t next_gsi = x86_layout::first_device_gsi;
        result<void> status = success();
        auto one = [&]<std::size_t Index>(std::integral_constant<std::size_t, Index>) {
            if (!status) return;
            using D = bus_device_for<std::tuple_element_t<Index, std::tuple<Devices...>>>;
            // A slot whose config says "not attached" stays empty: no window,
            // no GSI, no ACPI or cmdline entry (a fixed device list, e.g. N
            // disk slots, with only some in use).
            if constexpr (requires(const typename D::config& c) {
                              { D::attached(c) } -> std::convertible_to<bool>;
                          })
                if (!D::attached(std::get<Index>(cfg.devices))) return;
            device_resources resources;
            if (D::requirements.mmio_window) {
                resources.mmio_base = next_window;
                resources.mmio_size = x86_layout::virtio_mmio_window;
                next_window += x86_layout::virtio_mmio_window;
            }
            if (D::requirements.interrupt) {
                if (next_gsi > 23) { // IOAPIC pins
                    status = errc::out_of_resources;
                    return;
                }
                resources.gsi = next_gsi++;
            }
            Backend* vm = backend_.get();
            device_environment env{
                .memory = memory_,
                .executor = executor_,
                .resources = resources,
                .make_interrupt_line =
                    [vm](std::uint32_t gsi) { return vm->make_interrupt_line(gsi); },
                .make_doorbell =
                    [vm](std::uint64_t address, std::uint32_t length,
                         std::optional<std::uint64_t> value) {
                        return vm->make_doorbell(address, length, value);
                    },
            };
            resources_[Index] = resources;
            auto created = D::create(env, std::get<Index>(cfg.devices));
            if (!created) {
                status = created.error();
                return;
            }
            auto device = std::move(created).value();
            if constexpr (exit_requesting<D>)
                device->set_exit_handler([this](exit_request r) { on_exit_request(r); });
            if (D::requirements.mmio_window && D::requirements.interrupt)
                boot_config.virtio_devices.push_back({.base = resources.mmio_base,
                                                      .size = resources.mmio_size,
                                                      .gsi = resources.gsi});
            std::get<Index>(bus_.devices()) = std::move(device);
        };
        (one(std::integral_constant<std::size_t, I>{}), ...);
        return status;
    }

    template <class D>
    static void pause_device(D* device) {
        if constexpr (requires { device->pause(); })
            if (device) device->pause();
    }

    template <class D>
    static constexpr bool is_uart = requires(D& d, const D& cd, const snapshot::uart_record& r) {
        { cd.save_state() } -> std::same_as<snapshot::uart_record>;
        { d.restore_state(r) } -> std::same_as<result<void>>;
    };
    template <class D>
    static constexpr bool is_virtio_transport = requires(D& d, const D& cd,
                                                         const virtio::mmio_state& s) {
        { cd.state() } -> std::same_as<virtio::mmio_state>;
        { d.restore(s) } -> std::same_as<result<void>>;
        { d.resume() } -> std::same_as<result<void>>;
        D::core_type::type;
    };

    // Kick every vCPU out of KVM_RUN and wait until each thread has returned
    // from run_vcpu and parked (doc/kvm-state.md: only then is a capture
    // correct). A machine not started yet has nothing to park.
    result<void> pause_vcpus() {
        std::unique_lock lock(mutex_);
        if (exit_ || finishing_) return errc::invalid_argument;
        pause_requested_ = true;
        const std::size_t running = threads_.size();
        lock.unlock();
        for (std::uint32_t i = 0; i < backend_->vcpu_count(); ++i)
            backend_->kick(i);
        lock.lock();
        pause_changed_.wait(lock, [&] { return parked_ == running || exit_ || finishing_; });
        if (parked_ != running || exit_ || finishing_) {
            pause_requested_ = false;
            pause_changed_.notify_all();
            return errc::invalid_argument; // the machine ended meanwhile
        }
        return success();
    }

    void park(std::uint32_t) {
        std::unique_lock lock(mutex_);
        ++parked_;
        pause_changed_.notify_all();
        pause_changed_.wait(lock, [&] { return !pause_requested_ || finishing_; });
        --parked_;
    }

    // Devices resume under mutex_ so that a concurrent finish() (which sets
    // finishing_ under it, then stops the devices) always stops them after.
    void resume_locked(after_snapshot then) {
        if (then == after_snapshot::stop) {
            stop();
        } else {
            std::lock_guard lock(mutex_);
            if (!finishing_)
                std::apply([](auto&... device) { (resume_device(device.get()), ...); },
                           bus_.devices());
        }
        std::lock_guard lock(mutex_);
        pause_requested_ = false;
        pause_changed_.notify_all();
    }

    template <class D>
    static void resume_device(D* device) {
        if constexpr (requires { device->resume(); })
            if (device) (void)device->resume();
    }

    result<snapshot::snapshot_image> capture_locked() {
        if (msr_indexes_.empty()) {
            if constexpr (requires { backend_->system_fd(); }) {
                SUPERMACHINE_TRY(list, backend::kvm_state::msr_index_list(backend_->system_fd()));
                msr_indexes_ = std::move(list);
            } else {
                SUPERMACHINE_TRY(list, backend::kvm_state::msr_index_list());
                msr_indexes_ = std::move(list);
            }
        }
        snapshot::snapshot_records records;
        records.machine.vcpu_count = backend_->vcpu_count();
        records.machine.memory_size = memory_.size();
        records.machine.kernel_identity = cmdline_.substr(
            0, std::min<std::size_t>(cmdline_.size(), snapshot::max_kernel_identity_bytes));
        SUPERMACHINE_TRY(kvm_records, backend::kvm_state::capture_records(*backend_, msr_indexes_));
        records.vcpus = std::move(kvm_records.vcpus);
        records.interrupt_controller = std::move(kvm_records.interrupt_controller);
        result<void> status = success();
        auto one = [&]<std::size_t Index>(std::integral_constant<std::size_t, Index>) {
            using D = bus_device_for<std::tuple_element_t<Index, std::tuple<Devices...>>>;
            if (!std::get<Index>(bus_.devices())) return; // an empty slot is not in the snapshot
            const D& device = *std::get<Index>(bus_.devices());
            if constexpr (is_uart<D>) {
                records.uart = device.save_state();
            } else if constexpr (is_virtio_transport<D>) {
                snapshot::virtio_device_record r;
                r.kind = static_cast<snapshot::virtio_device_kind>(D::core_type::type);
                r.mmio_base = resources_[Index].mmio_base;
                r.gsi = resources_[Index].gsi;
                const virtio::mmio_state state = device.state();
                r.transport_state = virtio::encode(state);
                for (std::size_t q = 0; q < state.queues.size(); ++q) {
                    const auto& queue = state.queues[q];
                    const bool size_valid =
                        queue.size <= 32768 && (queue.size & (queue.size - 1)) == 0;
                    r.queues.push_back(
                        {.index = static_cast<std::uint16_t>(q),
                         .size = static_cast<std::uint16_t>(size_valid ? queue.size : 0),
                         .ready = queue.ready,
                         .descriptor_table = queue.descriptor_table,
                         .available_ring = queue.available_ring,
                         .used_ring = queue.used_ring,
                         .next_available = queue.position.next_available,
                         .next_used = queue.position.next_used});
                }
                if constexpr (requires { device.core().save_state(); })
                    r.device_state = device.core().save_state();
                records.virtio_devices.push_back(std::move(r));
            }
        };
        for_each_device_index(one);
        (void)status;
        return snapshot::snapshot_image::of(memory_, std::move(records), source_);
    }

    result<void> check_device_records(const snapshot::snapshot_records& records) const {
        bool has_uart = false;
        std::size_t virtio_index = 0;
        result<void> status = success();
        auto one = [&]<std::size_t Index>(std::integral_constant<std::size_t, Index>) {
            using D = bus_device_for<std::tuple_element_t<Index, std::tuple<Devices...>>>;
            if (!std::get<Index>(bus_.devices())) return; // empty slots are not captured
            if constexpr (is_uart<D>) {
                has_uart = true;
            } else if constexpr (is_virtio_transport<D>) {
                if (virtio_index >= records.virtio_devices.size()) {
                    status = errc::snapshot_mismatch;
                    return;
                }
                const auto& r = records.virtio_devices[virtio_index++];
                if (r.kind != static_cast<snapshot::virtio_device_kind>(D::core_type::type) ||
                    r.mmio_base != resources_[Index].mmio_base || r.gsi != resources_[Index].gsi)
                    status = errc::snapshot_mismatch;
            }
        };
        for_each_device_index(one);
        if (!status) return status;
        if (virtio_index != records.virtio_devices.size()) return errc::snapshot_mismatch;
        if (has_uart != records.uart.has_value()) return errc::snapshot_mismatch;
        return success();
    }

    result<void> restore_devices(const snapshot::snapshot_records& records) {
        std::size_t virtio_index = 0;
        result<void> status = success();
        auto one = [&]<std::size_t Index>(std::integral_constant<std::size_t, Index>) {
            if (!status) return;
            using D = bus_device_for<std::tuple_element_t<Index, std::tuple<Devices...>>>;
            if (!std::get<Index>(bus_.devices())) return; // empty slots are not captured
            D& device = *std::get<Index>(bus_.devices());
            if constexpr (is_uart<D>) {
                status = device.restore_state(*records.uart);
            } else if constexpr (is_virtio_transport<D>) {
                const auto& r = records.virtio_devices[virtio_index++];
                auto state = virtio::decode_mmio_state(r.transport_state);
                if (!state) {
                    status = state.error();
                    return;
                }
                if constexpr (requires { device.core().restore_state(r.device_state); }) {
                    status = device.core().restore_state(r.device_state);
                    if (!status) return;
                } else if (!r.device_state.empty()) {
                    status = errc::snapshot_mismatch;
                    return;
                }
                status = device.restore(state.value());
                if (!status) return;
                // A vsock's host ends stayed with the old process: once its queues are live
                // again, the guest is told to drop its connections (TRANSPORT_RESET, virtio
                // 1.2 5.10.6.7), into the event buffers it posted before the snapshot.
                if constexpr (requires { device.core().transport_reset(); })
                    device.core().transport_reset();
            }
        };
        for_each_device_index(one);
        return status;
    }

    template <class F>
    static void for_each_device_index(F& f) {
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            (f(std::integral_constant<std::size_t, I>{}), ...);
        }
        (std::index_sequence_for<Devices...>{});
    }

    void on_exit_request(exit_request r) {
        machine_exit e;
        switch (r) {
        case exit_request::power_off:
            e.what = machine_exit::reason::power_off;
            break;
        case exit_request::reset:
            e.what = machine_exit::reason::reboot;
            break;
        case exit_request::panic: {
            // Let the guest finish its panic message and reboot (panic=-1):
            // whatever ends it next is reported as the panic. If it hangs
            // instead, the grace period ends it.
            std::lock_guard lock(mutex_);
            if (panic_pending_ || exit_ || finishing_) return;
            panic_pending_ = true;
            panic_timer_ = std::thread([this] {
                std::unique_lock lock(mutex_);
                if (exited_.wait_for(lock, panic_grace_, [&] { return exit_.has_value(); })) return;
                lock.unlock();
                finish(make_exit(machine_exit::reason::panic));
            });
            return;
        }
        }
        finish(std::move(e));
    }

    void run_vcpu_thread(std::uint32_t index) {
        for (;;) {
            if (stopping_.load(std::memory_order_acquire)) return;
            if (pause_requested_.load(std::memory_order_acquire)) {
                park(index); // outside KVM_RUN, after its re-entry: safe to capture
                continue;
            }
            const backend::vcpu_exit e = backend_->run_vcpu(index, bus_);
            using K = backend::vcpu_exit::kind;
            using R = machine_exit::reason;
            if (e.what == K::interrupted) continue; // the loop head decides
            machine_exit m{.vcpu = index, .rip = e.rip, .error = e.error, .detail = e.detail};
            auto bytes = e.instruction_bytes();
            m.instruction.assign(bytes.begin(), bytes.end());
            switch (e.what) {
            case K::interrupted:
                break;
            case K::halted:
                m.what = R::halted;
                break;
            case K::shutdown:
                m.what = R::triple_fault;
                break;
            case K::emulation_failure:
                m.what = R::emulation_failure;
                break;
            case K::system_shutdown:
                m.what = R::power_off;
                break;
            case K::system_reset:
                m.what = R::reboot;
                break;
            case K::system_crash:
                m.what = R::panic;
                break;
            case K::internal_error:
            case K::run_failed:
                m.what = R::kvm_error;
                break;
            }
            finish(std::move(m));
            return;
        }
    }

    // The first ending wins; every vCPU is kicked out of KVM_RUN. exit_ is
    // published only after the kicks, so nobody joins (and frees) a thread
    // that is still being signalled.
    void finish(machine_exit e) {
        {
            std::lock_guard lock(mutex_);
            if (exit_ || finishing_) return;
            finishing_ = true;
            if (panic_pending_ && e.what != machine_exit::reason::stopped)
                e.what = machine_exit::reason::panic;
            stopping_.store(true, std::memory_order_release);
        }
        // Devices with async work stop it now (thread-safe by contract).
        std::apply([](auto&... device) { (stop_device(device.get()), ...); }, bus_.devices());
        if (backend_)
            for (std::uint32_t i = 0; i < backend_->vcpu_count(); ++i)
                backend_->kick(i);
        std::vector<std::function<void(const machine_exit&)>> waiters;
        {
            std::lock_guard lock(mutex_);
            exit_ = std::move(e);
            waiters.swap(waiters_);
        }
        exited_.notify_all();
        pause_changed_.notify_all();
        for (auto& waiter : waiters)
            waiter(*exit_);
    }

    void join() {
        {
            std::unique_lock lock(mutex_);
            exited_.wait(lock, [&] { return exit_.has_value(); });
        }
        std::lock_guard lock(join_mutex_);
        if (panic_timer_.joinable()) {
            if (panic_timer_.get_id() == std::this_thread::get_id())
                panic_timer_.detach();
            else
                panic_timer_.join();
        }
        for (auto& t : threads_)
            if (t.joinable()) {
                if (t.get_id() == std::this_thread::get_id())
                    t.detach(); // stop() from a device handler on a vCPU thread: it ends by itself
                else
                    t.join();
            }
    }

    boost::asio::any_io_executor executor_;
    guest_memory memory_;
    std::unique_ptr<Backend> backend_;
    bus_type bus_;
    std::string cmdline_;
    mutable std::mutex mutex_;
    std::mutex join_mutex_;
    std::condition_variable exited_;
    std::optional<machine_exit> exit_;
    std::atomic<bool> stopping_{false};
    bool finishing_ = false;
    bool panic_pending_ = false;
    std::chrono::milliseconds panic_grace_{1000};
    std::thread panic_timer_;
    bool started_ = false;
    std::vector<std::thread> threads_;
    std::vector<std::function<void(const machine_exit&)>> waiters_;
    // Snapshots.
    std::array<device_resources, sizeof...(Devices)> resources_{};
    std::shared_ptr<const snapshot::ram_source> source_;
    std::vector<std::uint32_t> msr_indexes_;
    std::mutex snapshot_mutex_;
    std::atomic<bool> pause_requested_{false};
    std::size_t parked_ = 0;
    std::condition_variable pause_changed_;
    std::mutex snapshot_threads_mutex_;
    std::vector<std::thread> snapshot_threads_;
};

} // namespace supermachine
