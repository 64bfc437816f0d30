// supermachine boot --kernel K [--initrd I] [--append A] [--memory MiB] [--cpus N] [--timeout S]
//                   [--disk PATH[,ro|,cow]]... [--rng]
// supermachine boot [--kernel K] --disk ROOT [-e/-w/-u/-i/-t/-p...] -- CMD [ARG...]
//
// Boots a kernel on KVM with a serial console, streams the console to stdout
// and stdin to the guest, and exits 0 when the guest powers off or reboots.
// Anything else (panic, triple fault, emulation failure, KVM error, bad
// input) is one line on stderr and a non-zero status.
//
// With `-- CMD`, the first --disk is the root filesystem of a VM run by the
// agent (vm.hpp): CMD runs in it like `supermachine run` runs an image's
// command (same options, same exit statuses), see boot_command().
//
// boot_with_kvm() is the engine-specific part, so an --engine switch can
// pick between it and another engine later.
#include "command.hpp"
#include "vm_command.hpp"

#include <supermachine/backend/kvm.hpp>
#include <supermachine/backend/qemu.hpp>
#include <supermachine/boot/bzimage.hpp>
#include <supermachine/boot/demo_initramfs.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/one_of.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
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
#include <utility>
#include <vector>

namespace supermachine::cli {

/// One --disk PATH[,ro|,cow].
struct disk_option {
    std::string path;
    bool read_only = false;
    bool copy_on_write = false; // writes go to an in-memory overlay; the file is never written
};

struct boot_options {
    std::string kernel;
    std::string initrd;
    std::string append;                 // added to the default cmdline
    std::optional<std::string> cmdline; // replaces the default cmdline
    std::uint64_t memory_mib = 256;
    std::uint32_t cpus = 1;
    std::uint32_t timeout_seconds = 0; // 0: none
    std::vector<disk_option> disks;    // virtio-blk, in order: /dev/vda, /dev/vdb, ...
    bool rng = false;                  // a virtio-rng device after the disks
    std::string engine = "auto";       // kvm | qemu | auto (see choose_engine)
    // --snapshot-after-ms N --snapshot-to FILE: snapshot, then stop (supermachine restore FILE).
    std::uint32_t snapshot_after_ms = 0;
    std::string snapshot_to;
};

/// The device list is a compile-time type list, so `boot` has a fixed number
/// of virtio-blk slots; the ones without a --disk are not attached (no
/// window, GSI or ACPI entry: blk::config::attached = false), so the guest
/// sees exactly the disks given, in order, from 0xd0000000 / GSI 5 upward.
inline constexpr std::size_t max_disks = 8;
/// A slot is a plain file or a copy-on-write overlay over one, chosen per --disk.
using boot_disk =
    virtio::blk<storage::one_of<storage::raw_file, storage::cow_file<storage::raw_file>>>;
using boot_machine = basic_machine<backend::kvm, devices::serial, devices::i8042,
                                   devices::acpi_power, boot_disk, boot_disk, boot_disk, boot_disk,
                                   boot_disk, boot_disk, boot_disk, boot_disk, virtio::rng>;
inline constexpr std::size_t first_disk_slot = 3; // after serial, i8042, acpi_power

template <std::size_t... I>
void configure_disks(boot_machine::config& cfg, const std::vector<disk_option>& disks,
                     std::index_sequence<I...>) {
    static_assert(sizeof...(I) == max_disks);
    auto one = [&](boot_disk::config& slot, std::size_t index) {
        if (index >= disks.size()) {
            slot.attached = false;
            return;
        }
        const auto& disk = disks[index];
        if (disk.copy_on_write)
            slot.storage.choice.emplace<1>(
                storage::cow_file<storage::raw_file>::config{.base = {disk.path, true}});
        else
            slot.storage.choice.emplace<0>(storage::raw_file::config{disk.path, disk.read_only});
    };
    (one(std::get<first_disk_slot + I>(cfg.devices), I), ...);
}

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

/// Where the default guest kernel is looked for (the boot layer's cache).
inline std::string default_kernel_folder() {
    if (const char* dir = std::getenv("SUPERMACHINE_KERNEL_DIR"); dir && *dir) return dir;
    return (boot::kernel_cache_dir() / "current").string();
}

/// Boot on /dev/kvm (set SUPERMACHINE_KVM_DEVICE to use another device node).
inline int boot_with_kvm(const boot_options& options) {
    using machine = boot_machine;
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

    if (options.disks.size() > max_disks) {
        print_error("too many --disk options (%s); at most %s",
                    std::to_string(options.disks.size()), std::to_string(max_disks));
        return boot_bad_input;
    }
    for (const auto& disk : options.disks) {
        const bool written = !disk.read_only && !disk.copy_on_write;
        if (::access(disk.path.c_str(), written ? R_OK | W_OK : R_OK) != 0) {
            print_error("cannot open disk '%s': %s", disk.path, std::strerror(errno));
            return boot_bad_input;
        }
        struct stat st {};
        if (::stat(disk.path.c_str(), &st) != 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) {
            print_error("disk '%s' is not a regular file or block device", disk.path);
            return boot_bad_input;
        }
    }

    machine::config cfg;
    configure_disks(cfg, options.disks, std::make_index_sequence<max_disks>{});
    std::get<virtio::rng::config>(cfg.devices).attached = options.rng;
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
                if (n < 0 && errno == EINTR) continue; // a snapshot pause signals vCPU threads
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

    // The virtio devices wait for doorbells and run their kick handlers on
    // this executor: one thread runs it until the machine is gone (the
    // joiner is declared before the machine, so it is destroyed after it).
    boost::asio::io_context io;
    auto work = boost::asio::make_work_guard(io);
    std::thread io_thread([&io] { io.run(); });
    struct io_joiner {
        decltype(work)& guard;
        std::thread& thread;
        ~io_joiner() {
            guard.reset();
            thread.join();
        }
    } join_io{work, io_thread};
    auto created = machine::create(io.get_executor(), std::move(cfg));
    if (!created) {
        const supermachine::error_code e = created.error();
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

    std::optional<supermachine::error_code> snapshot_result;
    std::thread snapshotter;
    if (!options.snapshot_to.empty())
        snapshotter = std::thread([&] {
            if (vm.wait_for(std::chrono::milliseconds(options.snapshot_after_ms))) return;
            auto saved =
                vm.snapshot_to(snapshot::file_store(options.snapshot_to), after_snapshot::stop);
            snapshot_result = saved ? supermachine::error_code{} : saved.error();
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

/// Whether `kernel` is a Linux kernel: a bzImage that names a kernel version
/// (our conformance guest's bzImage does not), or an ELF holding Linux's
/// banner. Only Linux is what some hosts' KVM cannot run (kvm_pvm).
inline bool is_linux_kernel(const std::string& path) {
    auto bytes = boot::read_host_file(path, 1ull << 30);
    if (!bytes) return false;
    const auto& data = bytes.value();
    if (auto image = boot::parse_bzimage(data)) return image.value().header.kernel_version != 0;
    static constexpr std::string_view banner = "Linux version ";
    const auto* begin = reinterpret_cast<const char*>(data.data());
    return std::string_view(begin, data.size()).find(banner) != std::string_view::npos;
}

/// --engine auto: kvm, unless the guest is Linux and this host's KVM cannot
/// run Linux (then qemu, said once on stderr).
inline backend::engine_kind choose_engine(const boot_options& options) {
    if (options.engine == "kvm") return backend::engine_kind::kvm;
    if (options.engine == "qemu") return backend::engine_kind::qemu;
    std::string why;
    if (backend::host_kvm_runs_linux(&why) || !is_linux_kernel(options.kernel))
        return backend::engine_kind::kvm;
    std::fprintf(stderr, "supermachine: engine auto: qemu (%s)\n", why.c_str());
    return backend::engine_kind::qemu;
}

/// Boot under the QEMU engine (TCG where KVM cannot run Linux). The console
/// goes to stdout; a Linux panic banner makes the status "guest crashed".
inline int boot_with_qemu(const boot_options& options) {
    if (!options.disks.empty() || options.rng) {
        std::fprintf(stderr,
                     "supermachine boot: --disk and --rng are served on the kvm engine; under "
                     "qemu run a command instead: `supermachine boot --disk ROOT -- CMD` or "
                     "`supermachine run` (our devices over vhost-user)\n");
        return boot_bad_input;
    }
    backend::qemu_boot_options q;
    q.qemu.kernel = options.kernel;
    q.qemu.initrd = options.initrd;
    q.qemu.memory_bytes = options.memory_mib << 20;
    q.qemu.vcpus = options.cpus;
    q.qemu.cmdline = options.cmdline.value_or("console=ttyS0 panic=-1") +
                     (options.append.empty() ? "" : " " + options.append);
    if (options.timeout_seconds) q.timeout = std::chrono::seconds(options.timeout_seconds);
    std::string tail;
    bool panicked = false;
    const int status = backend::run_qemu_boot(q, [&](std::string_view text) {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
        tail.append(text);
        if (tail.find("Kernel panic - not syncing") != std::string::npos) panicked = true;
        if (tail.size() > 4096) tail.erase(0, tail.size() - 64);
    });
    if (status == 124) return boot_timed_out;
    if (status == 127) return boot_bad_input;
    if (panicked) {
        std::fprintf(stderr, "supermachine boot: the guest kernel panicked\n");
        return boot_guest_crashed;
    }
    return status == 0 ? boot_ok : boot_vmm_failure;
}

/// No --kernel: the default kernel (Debian's cloud kernel from the cache)
/// with, unless --initrd is given, the demo initramfs: its modules, a
/// greeting, power-off.
inline int use_default_kernel(boot_options& options, std::filesystem::path& demo_initrd) {
    auto kernel = boot::default_kernel();
    if (!kernel) {
        print_error("no --kernel given and no default kernel in %s (run scripts/fetch-kernel.sh)",
                    default_kernel_folder());
        return boot_bad_input;
    }
    options.kernel = kernel.value().vmlinuz.string();
    if (!options.initrd.empty()) return boot_ok;
    boot::demo_initramfs_options demo;
    demo.modules = kernel.value().modules;
    auto image = boot::build_demo_initramfs(demo);
    if (!image) {
        print_error("cannot build the demo initramfs: %s", image.error().message());
        return boot_bad_input;
    }
    char pattern[] = "/tmp/supermachine-initrd-XXXXXX";
    const int fd = ::mkstemp(pattern);
    if (fd < 0) {
        print_error("cannot write the demo initramfs: %s", std::strerror(errno));
        return boot_bad_input;
    }
    const auto& bytes = image.value();
    const bool written =
        ::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size());
    ::close(fd);
    demo_initrd = pattern;
    if (!written) {
        print_error("cannot write the demo initramfs %s", demo_initrd.string());
        return boot_bad_input;
    }
    options.initrd = demo_initrd.string();
    if (!options.cmdline) options.cmdline = "console=ttyS0 quiet panic=-1";
    return boot_ok;
}

/// `boot --disk ROOT -- CMD`: the agent's initramfs, ROOT as /dev/vda
/// (served copy-on-write: the guest may write, the file never changes), CMD
/// run through the agent. Our own failures are 125, like `run`.
inline int boot_command(const boot_options& options, const exec_cli_options& exec,
                        std::vector<std::string> command) {
    constexpr int failed = 125;
    auto refuse = [](const char* text) {
        std::fprintf(stderr, "supermachine boot: %s\n", text);
        return failed;
    };
    if (command.empty()) return refuse("nothing to run after --");
    if (options.disks.empty())
        return refuse("-- CMD needs a --disk: the root filesystem (an ext4 image), then any data "
                      "disks");
    if (options.disks.size() > 1 + max_data_disks)
        return refuse("too many --disk options for -- CMD");
    if (options.rng) return refuse("--rng cannot be combined with -- CMD");
    if (!options.initrd.empty() || options.cmdline)
        return refuse("--initrd and --cmdline cannot be combined with -- CMD (the agent's "
                      "initramfs and command line are used; --append adds to it)");
    if (!options.snapshot_to.empty()) return refuse("--snapshot-to cannot be combined with -- CMD");
    const auto& disk = options.disks.front();
    struct stat st {};
    if (::access(disk.path.c_str(), R_OK) != 0 || ::stat(disk.path.c_str(), &st) != 0) {
        print_error("cannot open disk '%s': %s", disk.path, std::strerror(errno));
        return failed;
    }
    if (!(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) {
        print_error("disk '%s' is not a regular file or block device", disk.path);
        return failed;
    }

    vm_options vm_options;
    vm_options.memory_mib = static_cast<std::uint32_t>(options.memory_mib);
    vm_options.cpus = options.cpus;
    // (auto keeps data disks on the qemu engine: vm.hpp)
    vm_options.engine = parse_engine_choice(options.engine).value_or(engine_choice::automatic);
    vm_options.volumes = exec.volumes;
    // The disks after the root: /dev/vdb, ... in order, written in place
    // unless ,ro (,cow has no meaning here: refused).
    for (std::size_t i = 1; i < options.disks.size(); ++i) {
        if (options.disks[i].copy_on_write)
            return refuse("a data disk of -- CMD is written in place or ,ro; ,cow is for the root");
        vm_options.disks.push_back({options.disks[i].path, options.disks[i].read_only});
    }
    if (!options.append.empty()) vm_options.extra_cmdline.push_back(options.append);
    if (!options.kernel.empty()) {
        // A kernel of the user's. When it sits in an unpacked kernel package
        // (ROOT/boot/vmlinuz-R beside ROOT/lib/modules/R, as the kernel cache
        // holds them) its modules go into the initramfs; otherwise virtio-mmio,
        // virtio-blk, ext4 and vsock must be built in.
        if (::access(options.kernel.c_str(), R_OK) != 0) {
            print_error("cannot read kernel '%s': %s", options.kernel, std::strerror(errno));
            return failed;
        }
        const auto path = std::filesystem::absolute(options.kernel);
        const auto name = path.filename().string();
        boot::kernel_files kernel;
        if (path.parent_path().filename() == "boot" && name.starts_with("vmlinuz-")) {
            auto tree = boot::open_kernel_tree(path.parent_path().parent_path());
            if (tree && tree.value().release == name.substr(8)) kernel = std::move(tree).value();
        }
        if (kernel.release.empty()) kernel.release = "user:" + path.string();
        kernel.vmlinuz = path;
        vm_options.kernel = std::move(kernel);
    }

    // The disk stands in for an image: vm.hpp uses only its path and an
    // identity (the virtio-blk serial); the image config is empty, so
    // defaults apply (root, /, the default PATH) unless -u/-w/-e say otherwise.
    prepared_image root;
    root.reference = disk.path;
    root.rootfs = std::filesystem::absolute(disk.path);
    std::array<unsigned char, 32> identity{};
    const std::size_t hashes[] = {
        std::hash<std::string>{}(root.rootfs.string()), static_cast<std::size_t>(st.st_dev),
        static_cast<std::size_t>(st.st_ino), static_cast<std::size_t>(st.st_mtime)};
    std::memcpy(identity.data(), hashes, sizeof hashes);
    root.digest = oci::digest::from_raw(oci::digest_algorithm::sha256, identity);

    boost::asio::io_context io;
    vm_command runner(io);
    auto overrides = exec.overrides;
    overrides.command = std::move(command);
    vm::async_start(
        io.get_executor(), std::move(root), std::move(vm_options),
        [&](supermachine::error_code ec, std::shared_ptr<vm> started) {
            if (ec) {
                report_start_failure("supermachine boot", ec, started);
                return runner.fail(failed);
            }
            // Quiet, as `run`: which engine only when tracing.
            if (const char* trace = std::getenv("SUPERMACHINE_TRACE");
                trace && *trace && *trace != '0')
                std::fprintf(stderr, "supermachine: engine %s\n",
                             started->engine_description().c_str());
            // Users and groups come from the disk itself (none there: root).
            auto passwd = std::make_shared<std::string>();
            started->async_read_file(
                "/etc/passwd", 1u << 20,
                [&, started, passwd](supermachine::error_code ec, std::string text) {
                    if (!ec) *passwd = std::move(text);
                    started->async_read_file(
                        "/etc/group", 1u << 20,
                        [&, started, passwd](supermachine::error_code ec, std::string group) {
                            if (ec) group.clear();
                            auto process = oci::make_process({}, overrides, *passwd, group);
                            if (!process) {
                                std::fprintf(
                                    stderr, "supermachine boot: %s\n",
                                    process.error() == errc::not_found
                                        ? unknown_user_message(overrides.user.value_or(""), *passwd)
                                              .c_str()
                                        : "bad -e, -w or -u value");
                                return runner.fail(failed);
                            }
                            runner.start(started, make_exec_request(process.value(), exec), exec,
                                         "supermachine boot");
                        });
                });
        });
    return runner.run(exec);
}

void usage(FILE* to) {
    std::fprintf(
        to,
        "usage: supermachine boot --kernel FILE [--initrd FILE] [--append ARGS] [--cmdline ARGS]\n"
        "                         [--memory MiB] [--cpus N] [--timeout SECONDS]\n"
        "                         [--disk PATH[,ro|,cow]]... [--rng] [--engine kvm|qemu|auto]\n"
        "                         [--snapshot-after-ms N --snapshot-to FILE]\n"
        "Boots FILE (bzImage or ELF vmlinux) on KVM; the serial console is stdin/stdout.\n"
        "--disk: a virtio-blk disk over the file (up to 8, in order; ,ro: read-only;\n"
        "        ,cow: writable, but writes stay in memory and the file is never changed);\n"
        "--rng: a virtio-rng device. Both are virtio-mmio, in the DSDT and on the cmdline.\n"
        "Without --kernel: the default kernel (Debian's cloud kernel, scripts/fetch-kernel.sh)\n"
        "with a demo initramfs that greets and powers off.\n"
        "--engine: kvm runs the guest in this process; qemu runs it under QEMU (TCG where\n"
        "KVM cannot run Linux); auto (default) picks qemu only for a Linux kernel on a host\n"
        "whose KVM cannot run Linux (kvm_pvm), and says so.\n"
        "Exit status: 0 guest powered off or rebooted, 2 bad input, 3 guest crashed,\n"
        "4 VMM/KVM failure, 5 timed out.\n"
        "\n"
        "usage: supermachine boot [--kernel FILE] --disk ROOT [OPTIONS] -- CMD [ARG...]\n"
        "Boots the kernel (default: the cached one) with the guest agent as /init and the\n"
        "ext4 image ROOT as the root filesystem (copy-on-write: the file is never changed),\n"
        "runs CMD in it and exits with CMD's status (128+N when killed by signal N, 127 when\n"
        "CMD does not exist, 125 when supermachine itself failed), like `supermachine run`:\n"
        "%s"
        "(--timeout here is the command's; --memory, --cpus, --append, --engine apply.)\n",
        exec_options_usage);
}

int run_boot(std::span<char*> args) {
    boot_options options;
    exec_cli_options exec;
    // `-- CMD`: everything after the first "--" is the command; our own
    // failures then exit 125 (the command's statuses are the rest).
    std::optional<std::vector<std::string>> command;
    for (std::size_t i = 0; i < args.size(); ++i)
        if (std::string_view(args[i]) == "--") {
            command.emplace(args.begin() + static_cast<std::ptrdiff_t>(i) + 1, args.end());
            args = args.first(i);
            break;
        }
    const int bad_input = command ? 125 : boot_bad_input;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view arg = args[i];
        if (arg == "--help" || arg == "-h") {
            usage(stdout);
            return 0;
        }
        switch (parse_exec_option(args, i, exec, "supermachine boot")) {
        case option_parse::taken:
            continue;
        case option_parse::bad:
            return bad_input;
        case option_parse::not_ours:
            break;
        }
        if (arg == "--rng") {
            options.rng = true;
            continue;
        }
        if (i + 1 >= args.size()) {
            print_error("unknown or incomplete option '%s' (see supermachine boot --help)",
                        std::string(arg));
            return bad_input;
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
        else if (arg == "--engine") {
            if (value != "kvm" && value != "qemu" && value != "auto") {
                print_error("--engine '%s': kvm, qemu or auto", std::string(value));
                return bad_input;
            }
            options.engine = value;
        } else if (arg == "--disk") {
            disk_option disk{std::string(value)};
            if (const auto comma = disk.path.rfind(','); comma != std::string::npos) {
                const std::string flag = disk.path.substr(comma + 1);
                if (flag == "ro") {
                    disk.read_only = true;
                } else if (flag == "cow") {
                    disk.copy_on_write = true;
                } else {
                    print_error("--disk '%s': the option after ',' is 'ro' or 'cow'",
                                std::string(value));
                    return bad_input;
                }
                disk.path.resize(comma);
            }
            if (disk.path.empty()) {
                print_error("--disk '%s': need a file", std::string(value));
                return bad_input;
            }
            options.disks.push_back(std::move(disk));
        } else if (arg == "--memory") {
            using M = basic_machine<backend::kvm>;
            if (!parse_number(value, options.memory_mib) ||
                options.memory_mib < M::min_memory_mib || options.memory_mib > M::max_memory_mib) {
                print_error("--memory '%s': need a whole number of MiB from 16 to 1048576",
                            std::string(value));
                return bad_input;
            }
        } else if (arg == "--cpus") {
            if (!parse_number(value, options.cpus) || options.cpus < 1 ||
                options.cpus > backend::kvm::max_vcpus) {
                print_error("--cpus '%s': need a number from 1 to %s", std::string(value),
                            std::to_string(backend::kvm::max_vcpus));
                return bad_input;
            }
        } else if (arg == "--snapshot-after-ms") {
            if (!parse_number(value, options.snapshot_after_ms)) {
                print_error("--snapshot-after-ms '%s': need a number", std::string(value));
                return bad_input;
            }
        } else if (arg == "--snapshot-to") {
            options.snapshot_to = value;
        } else {
            print_error("unknown option '%s' (see supermachine boot --help)", std::string(arg));
            return bad_input;
        }
    }
    if (exec.network != supermachine::network_mode::user || !exec.add_hosts.empty()) {
        // boot's disks carry no agent network set-up: `run` has the network.
        std::fprintf(stderr, "supermachine boot: --network and --add-host are `run` options\n");
        return boot_bad_input;
    }
    if (command) return boot_command(options, exec, std::move(*command));
    if (exec.any_command_option()) {
        std::fprintf(stderr, "supermachine boot: -e, -w, -u, -p, -v, -i and -t need a command "
                             "(boot --disk ROOT [OPTIONS] -- CMD)\n");
        return boot_bad_input;
    }
    options.timeout_seconds = exec.timeout_seconds;
    std::filesystem::path demo_initrd;
    if (options.kernel.empty())
        if (int status = use_default_kernel(options, demo_initrd); status != boot_ok) return status;
    struct remove_at_exit {
        std::filesystem::path& path;
        ~remove_at_exit() {
            std::error_code ignored;
            if (!path.empty()) std::filesystem::remove(path, ignored);
        }
    } cleanup{demo_initrd};
    if (::access(options.kernel.c_str(), R_OK) != 0)
        return boot_with_kvm(options); // names the problem
    return choose_engine(options) == backend::engine_kind::qemu ? boot_with_qemu(options)
                                                                : boot_with_kvm(options);
}

const command_registration registration{
    "boot", "boot a kernel with a serial console (kvm or qemu engine)", &run_boot};

} // namespace
} // namespace supermachine::cli
