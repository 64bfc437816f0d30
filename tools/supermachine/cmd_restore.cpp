// supermachine restore FILE [--timeout S]
// supermachine restore [OPTIONS] DIR [--] [COMMAND [ARG...]]
//
// A directory is an image snapshot (image_restore.hpp: start it, run a
// command like `run`). A file restores a snapshot written by `supermachine boot ... --snapshot-to
// FILE` (the same machine: kvm, COM1, i8042, ACPI power) and streams its console to stdout. The
// vCPU count and memory size come from the snapshot; RAM is mapped MAP_PRIVATE from FILE, so any
// number of restores share it and none changes it. Exit status as for `boot`: 0 power-off/reboot, 2
// bad input (unreadable, corrupt or foreign snapshot, no KVM), 3 guest crashed, 4 VMM/KVM failure,
// 5 --timeout reached.
#include "command.hpp"
#include "image_restore.hpp"

#include <supermachine/backend/kvm.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/snapshot/file_store.hpp>

#include <boost/asio/io_context.hpp>

#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

namespace supermachine::cli {
namespace {

void restore_error(const std::string& message) {
    std::fprintf(stderr, "supermachine restore: %s\n", message.c_str());
}

// The first operand, skipping option values: a directory means an image
// snapshot, anything else the kvm engine's snapshot file.
bool names_image_snapshot(std::span<char*> args) {
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view a = args[i];
        if (a == "--") return false;
        if (a == "--timeout" || a == "-e" || a == "--env" || a == "-w" || a == "--workdir" ||
            a == "-u" || a == "--user" || a == "-p" || a == "--publish" || a == "--entrypoint" ||
            a == "--snapshot-to") {
            ++i;
            continue;
        }
        if (a.starts_with('-')) continue;
        std::error_code ec;
        return std::filesystem::is_directory(std::string(a), ec);
    }
    return false;
}

int run_kvm_restore(std::span<char*> args);

int run_restore(std::span<char*> args) {
    if (names_image_snapshot(args)) return run_image_restore(args);
    return run_kvm_restore(args);
}

int run_kvm_restore(std::span<char*> args) {
    using machine =
        basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power>;
    std::string file;
    std::uint32_t timeout_seconds = 0;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view arg = args[i];
        if (arg == "--help" || arg == "-h") {
            std::printf("usage: supermachine restore FILE [--timeout SECONDS]\n"
                        "Restores a snapshot from `supermachine boot --snapshot-to FILE` on KVM;\n"
                        "the serial console is stdout. Exit status as for boot.\n\n");
            std::fflush(stdout);
            return image_restore_usage(stdout, 0);
        }
        if (arg == "--timeout" && i + 1 < args.size()) {
            const std::string_view value = args[++i];
            auto [end, ec] =
                std::from_chars(value.data(), value.data() + value.size(), timeout_seconds);
            if (ec != std::errc() || end != value.data() + value.size()) {
                restore_error("--timeout '" + std::string(value) + "': need a number of seconds");
                return 2;
            }
        } else if (file.empty() && !arg.starts_with("--")) {
            file = arg;
        } else {
            restore_error("unknown or incomplete option '" + std::string(arg) +
                          "' (see supermachine restore --help)");
            return 2;
        }
    }
    if (file.empty()) {
        restore_error("no snapshot given: a kvm snapshot FILE or an image snapshot DIR (see "
                      "supermachine restore --help)");
        return 2;
    }

    auto loaded = snapshot::read_snapshot(file);
    if (!loaded) {
        restore_error("'" + file + "': " + loaded.error().message());
        return 2;
    }
    machine::config cfg;
    const auto& record = loaded.value().records.machine;
    if (record.memory_size % (1u << 20) != 0) {
        restore_error("'" + file + "': " + make_error_code(errc::snapshot_mismatch).message());
        return 2;
    }
    cfg.memory_mib = record.memory_size >> 20;
    cfg.vcpus = record.vcpu_count;
    if (const char* device = std::getenv("SUPERMACHINE_KVM_DEVICE"))
        cfg.backend.device_path = device;
    // Whole lines to stdout (the UART delivers a byte per call).
    struct console_writer {
        std::mutex mutex;
        std::string pending;
        void flush_locked() {
            std::string_view text = pending;
            while (!text.empty()) {
                const ssize_t n = ::write(STDOUT_FILENO, text.data(), text.size());
                if (n < 0 && errno == EINTR) continue; // a vCPU kick landed here
                if (n <= 0) break;
                text.remove_prefix(static_cast<std::size_t>(n));
            }
            pending.clear();
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
    auto restored = machine::restore(io.get_executor(), std::move(cfg), std::move(loaded).value());
    if (!restored) {
        restore_error("'" + file + "': " + restored.error().message());
        return 2;
    }
    auto& vm = *restored.value();
    if (auto started = vm.start(); !started) {
        restore_error(started.error().message());
        return 4;
    }
    std::optional<machine_exit> exit;
    if (timeout_seconds)
        exit = vm.wait_for(std::chrono::seconds(timeout_seconds));
    else
        exit = vm.wait();
    if (!exit) {
        vm.stop();
        vm.wait();
    }
    {
        std::lock_guard lock(console->mutex);
        console->flush_locked();
    }
    if (!exit) {
        restore_error("guest still running after " + std::to_string(timeout_seconds) +
                      " s; stopped");
        return 5;
    }
    switch (exit->what) {
    case machine_exit::reason::power_off:
    case machine_exit::reason::reboot:
        return 0;
    case machine_exit::reason::panic:
    case machine_exit::reason::triple_fault:
        restore_error(exit->describe());
        return 3;
    default:
        restore_error(exit->describe());
        return 4;
    }
}

const command_registration registration{
    "restore",
    "start an image snapshot directory and run a command in it, or restore a kvm snapshot file",
    &run_restore};

} // namespace
} // namespace supermachine::cli
