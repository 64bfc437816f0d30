// supermachine boot --kernel K [--initrd I] [--append A] [--memory MiB] [--cpus N] [--timeout S]
//
// Boots a kernel on KVM with a serial console, streams the console to stdout
// and stdin to the guest, and exits 0 when the guest powers off or reboots.
// Anything else (panic, triple fault, emulation failure, KVM error, bad
// input) is one line on stderr and a non-zero status.
//
// boot_with_kvm() is the engine-specific part, so an --engine switch can
// pick between it and another engine later.
#include "command.hpp"

#include <supermachine/backend/kvm.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/snapshot/file_store.hpp>

#include <boost/asio/io_context.hpp>

#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

namespace supermachine::cli {

struct boot_options {
    std::string kernel;
    std::string initrd;
    std::string append;                 // added to the default cmdline
    std::optional<std::string> cmdline; // replaces the default cmdline
    std::uint64_t memory_mib = 256;
    std::uint32_t cpus = 1;
    std::uint32_t timeout_seconds = 0; // 0: none
    // --snapshot-after-ms N --snapshot-to FILE: snapshot, then stop (supermachine restore FILE).
    std::uint32_t snapshot_after_ms = 0;
    std::string snapshot_to;
};

/// Exit statuses of `supermachine boot`.
enum boot_status : int {
    boot_ok = 0,            // guest powered off or rebooted
    boot_bad_input = 2,     // usage, files, sizes, no KVM
    boot_guest_crashed = 3, // panic, triple fault
    boot_vmm_failure = 4,   // emulation failure, KVM error
    boot_timed_out = 5,
};

inline void print_error(const char* fmt, const std::string& a, const std::string& b = {}) {
    std::fprintf(stderr, "supermachine boot: ");
    std::fprintf(stderr, fmt, a.c_str(), b.c_str());
    std::fputc('\n', stderr);
}

/// The default guest kernel: the boot layer's cache ($SUPERMACHINE_KERNEL_DIR,
/// else kernel_cache_dir()/current), filled by scripts/fetch-kernel.sh.
inline std::string default_kernel() {
    auto k = boot::default_kernel();
    return k ? k.value().vmlinuz.string() : std::string();
}

inline std::string default_kernel_folder() {
    if (const char* dir = std::getenv("SUPERMACHINE_KERNEL_DIR"); dir && *dir) return dir;
    return (boot::kernel_cache_dir() / "current").string();
}

/// Boot on /dev/kvm (set SUPERMACHINE_KVM_DEVICE to use another device node).
inline int boot_with_kvm(const boot_options& options) {
    using machine =
        basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power>;
    if (options.kernel.empty()) {
        print_error("no --kernel given and no default kernel in %s (run scripts/fetch-kernel.sh)",
                    default_kernel_folder());
        return boot_bad_input;
    }
    if (::access(options.kernel.c_str(), R_OK) != 0) {
        print_error("cannot read kernel '%s': %s", options.kernel, std::strerror(errno));
        return boot_bad_input;
    }
    if (!options.initrd.empty() && ::access(options.initrd.c_str(), R_OK) != 0) {
        print_error("cannot read initrd '%s': %s", options.initrd, std::strerror(errno));
        return boot_bad_input;
    }

    machine::config cfg;
    cfg.memory_mib = options.memory_mib;
    cfg.vcpus = options.cpus;
    cfg.kernel_path = options.kernel;
    cfg.initrd_path = options.initrd;
    if (options.cmdline) cfg.cmdline = *options.cmdline;
    cfg.extra_cmdline = options.append;
    if (const char* device = std::getenv("SUPERMACHINE_KVM_DEVICE"))
        cfg.backend.device_path = device;
    // The UART delivers one byte per call: write whole lines (or 4 KiB) at
    // once, and anything pending (a prompt) within 20 ms.
    struct console_writer {
        std::mutex mutex;
        std::string pending;
        void flush_locked() {
            std::string_view text = pending;
            while (!text.empty()) {
                const ssize_t n = ::write(STDOUT_FILENO, text.data(), text.size());
                if (n <= 0) break;
                text.remove_prefix(static_cast<std::size_t>(n));
            }
            pending.clear();
        }
        void flush() {
            std::lock_guard lock(mutex);
            flush_locked();
        }
    };
    auto console = std::make_shared<console_writer>();
    std::get<devices::serial::config>(cfg.devices).sink = [console](std::string_view text) {
        std::lock_guard lock(console->mutex);
        console->pending += text;
        if (console->pending.size() >= 4096 || text.find('\n') != std::string_view::npos)
            console->flush_locked();
    };

    boost::asio::io_context io;
    auto created = machine::create(io.get_executor(), std::move(cfg));
    if (!created) {
        const std::error_code e = created.error();
        if (e == errc::kernel_not_found)
            print_error("cannot read kernel '%s'", options.kernel);
        else if (e == errc::not_found)
            print_error("cannot read initrd '%s'", options.initrd);
        else if (e == errc::kernel_invalid || e == errc::kernel_truncated ||
                 e == errc::kernel_unsupported)
            print_error("kernel '%s': %s", options.kernel, e.message());
        else if (e == errc::initrd_too_large)
            print_error("initrd '%s' does not fit in %s MiB of guest memory", options.initrd,
                        std::to_string(options.memory_mib));
        else if (e == errc::memory_too_small)
            print_error("%s MiB of guest memory is too little for this kernel and initrd",
                        std::to_string(options.memory_mib));
        else
            print_error("%s", e.message());
        return boot_bad_input;
    }
    auto& vm = *created.value();
    if (auto started = vm.start(); !started) {
        print_error("%s", started.error().message());
        return boot_vmm_failure;
    }

    // Host stdin -> guest UART, until EOF or the machine ends.
    std::atomic<bool> done{false};
    std::thread flusher([&] {
        while (!done.load()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            console->flush();
        }
    });
    std::thread input([&] {
        char buffer[256];
        while (!done.load()) {
            pollfd p{STDIN_FILENO, POLLIN, 0};
            const int ready = ::poll(&p, 1, 50);
            if (ready < 0 && errno != EINTR) return;
            if (ready <= 0) continue;
            const ssize_t n = ::read(STDIN_FILENO, buffer, sizeof buffer);
            if (n <= 0) return;
            std::string_view pending(buffer, static_cast<std::size_t>(n));
            while (!pending.empty() && !done.load()) {
                pending.remove_prefix(vm.device<devices::serial>().send_input(pending));
                if (!pending.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
            }
        }
    });

    std::optional<std::error_code> snapshot_result;
    std::thread snapshotter;
    if (!options.snapshot_to.empty())
        snapshotter = std::thread([&] {
            if (vm.wait_for(std::chrono::milliseconds(options.snapshot_after_ms))) return;
            auto saved =
                vm.snapshot_to(snapshot::file_store(options.snapshot_to), after_snapshot::stop);
            snapshot_result = saved ? std::error_code{} : saved.error();
        });
    std::optional<machine_exit> exit;
    if (options.timeout_seconds)
        exit = vm.wait_for(std::chrono::seconds(options.timeout_seconds));
    else
        exit = vm.wait();
    done = true;
    if (snapshotter.joinable()) snapshotter.join();
    input.join();
    flusher.join();
    console->flush(); // the console before any error line
    if (snapshot_result) {
        if (*snapshot_result) {
            print_error("snapshot to '%s' failed: %s", options.snapshot_to,
                        snapshot_result->message());
            return boot_vmm_failure;
        }
        std::fprintf(stderr, "supermachine boot: snapshot written to %s\n",
                     options.snapshot_to.c_str());
        return boot_ok;
    }
    if (!exit) {
        vm.stop();
        vm.wait();
        console->flush();
        print_error("guest still running after %s s; stopped",
                    std::to_string(options.timeout_seconds));
        return boot_timed_out;
    }
    switch (exit->what) {
    case machine_exit::reason::power_off:
    case machine_exit::reason::reboot:
        return boot_ok;
    case machine_exit::reason::panic:
    case machine_exit::reason::triple_fault:
        print_error("%s", exit->describe());
        return boot_guest_crashed;
    default:
        print_error("%s", exit->describe());
        return boot_vmm_failure;
    }
}

namespace {

template <class T>
bool parse_number(std::string_view text, T& out) {
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    return ec == std::errc() && end == text.data() + text.size();
}

void usage(FILE* to) {
    std::fprintf(
        to,
        "usage: supermachine boot --kernel FILE [--initrd FILE] [--append ARGS] [--cmdline ARGS]\n"
        "                         [--memory MiB] [--cpus N] [--timeout SECONDS]\n"
        "                         [--snapshot-after-ms N --snapshot-to FILE]\n"
        "Boots FILE (bzImage or ELF vmlinux) on KVM; the serial console is stdin/stdout.\n"
        "Exit status: 0 guest powered off or rebooted, 2 bad input, 3 guest crashed,\n"
        "4 VMM/KVM failure, 5 timed out.\n");
}

int run_boot(std::span<char*> args) {
    boot_options options;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view arg = args[i];
        if (arg == "--help" || arg == "-h") {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= args.size()) {
            print_error("unknown or incomplete option '%s' (see supermachine boot --help)",
                        std::string(arg));
            return boot_bad_input;
        }
        const std::string_view value = args[++i];
        if (arg == "--kernel")
            options.kernel = value;
        else if (arg == "--initrd")
            options.initrd = value;
        else if (arg == "--append")
            options.append = value;
        else if (arg == "--cmdline")
            options.cmdline = std::string(value);
        else if (arg == "--memory") {
            using M = basic_machine<backend::kvm>;
            if (!parse_number(value, options.memory_mib) ||
                options.memory_mib < M::min_memory_mib || options.memory_mib > M::max_memory_mib) {
                print_error("--memory '%s': need a whole number of MiB from 16 to 1048576",
                            std::string(value));
                return boot_bad_input;
            }
        } else if (arg == "--cpus") {
            if (!parse_number(value, options.cpus) || options.cpus < 1 ||
                options.cpus > backend::kvm::max_vcpus) {
                print_error("--cpus '%s': need a number from 1 to %s", std::string(value),
                            std::to_string(backend::kvm::max_vcpus));
                return boot_bad_input;
            }
        } else if (arg == "--timeout") {
            if (!parse_number(value, options.timeout_seconds)) {
                print_error("--timeout '%s': need a number of seconds", std::string(value));
                return boot_bad_input;
            }
        } else if (arg == "--snapshot-after-ms") {
            if (!parse_number(value, options.snapshot_after_ms)) {
                print_error("--snapshot-after-ms '%s': need a number", std::string(value));
                return boot_bad_input;
            }
        } else if (arg == "--snapshot-to") {
            options.snapshot_to = value;
        } else {
            print_error("unknown option '%s' (see supermachine boot --help)", std::string(arg));
            return boot_bad_input;
        }
    }
    if (options.kernel.empty()) options.kernel = default_kernel();
    return boot_with_kvm(options);
}

const command_registration registration{"boot", "boot a kernel on KVM with a serial console",
                                        &run_boot};

} // namespace
} // namespace supermachine::cli
