#pragma once
// The qemu-system-x86_64 command line for the QEMU engine: a microvm with
// ACPI (the Debian cloud kernel finds virtio-mmio devices only through the
// DSDT), guest RAM in a shared memfd (vhost-user back-ends map it), the
// serial console on stdout, and one vhost-user device per attached socket.
#include <supermachine/backend/detail/qemu_process.hpp>
#include <supermachine/error.hpp>

#include <x86intrin.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace supermachine::backend {

enum class qemu_accelerator { automatic, tcg, kvm };

/// Devices QEMU can attach over vhost-user, by QEMU 7.2 device name.
enum class vhost_user_device_kind { blk, vsock, rng };

constexpr const char* qemu_device_name(vhost_user_device_kind kind) noexcept {
    switch (kind) {
    case vhost_user_device_kind::blk:
        return "vhost-user-blk";
    case vhost_user_device_kind::vsock:
        return "vhost-user-vsock-device";
    case vhost_user_device_kind::rng:
        return "vhost-user-rng";
    }
    return "";
}

struct qemu_vhost_user_attachment {
    vhost_user_device_kind kind;
    std::filesystem::path socket;
    std::string id;
};

/// A host directory QEMU offers the guest as a vhost-user-fs-device; the
/// engine runs one virtiofsd for it (the vm validates `source`).
struct qemu_shared_directory {
    std::filesystem::path source; // host directory (no ',': virtiofsd's -o separator)
    std::string tag;              // the guest mounts it by this name (<= 36 bytes)
    bool read_only = false;       // virtiofsd serves a read-only bind mount of it
};

/// A data disk of an agent vm (raw file or block device).
struct qemu_data_drive {
    std::filesystem::path path;
    bool read_only = false;
};

struct qemu_config {
    std::filesystem::path qemu_binary = "qemu-system-x86_64"; // a name is looked up on PATH
    std::filesystem::path kernel;                             // bzImage or PVH vmlinux
    std::filesystem::path initrd;                             // may be empty
    std::string cmdline = "console=ttyS0 panic=-1";
    std::uint64_t memory_bytes = 256u << 20;
    std::uint32_t vcpus = 1;
    qemu_accelerator accelerator = qemu_accelerator::automatic;
    /// Restore from a migration stream file instead of booting: the engine
    /// opens it and QEMU reads it as an inherited descriptor (-incoming
    /// fd:N; no shell, no `cat` process: the exec: form forked QEMU itself,
    /// ≈ 3 ms of a restore here).
    std::optional<std::filesystem::path> incoming;
    /// A QMP control socket (needed for snapshots); empty: none.
    std::filesystem::path qmp_socket;
    /// TCG only: QEMU's -icount setting; empty = off (the default), and
    /// then the guest is told the host's TSC rate on its command line
    /// (tcg_timer_arguments): without either, on a loaded host the Debian
    /// kernel's PIT/TSC calibration fails and its timer stalls for minutes.
    /// Off is faster and keeps guest time on the host's clock: a cold boot
    /// took 1.7 s instead of 2.3 s under "shift=auto", and a guest restored
    /// from a snapshot no longer sees its first timer ≈ 0.7 s late (guest time
    /// under -icount follows executed instructions). "shift=4,sleep=off"
    /// boots fastest of the -icount settings (guest time runs ahead while it
    /// idles). One vCPU only: with more, SMP bring-up stalls under it.
    std::string icount;
    /// Guest RAM in this file instead of a memfd (warm snapshots,
    /// doc/warm-start.md). Shared: the VM writes the file (the one that
    /// builds a snapshot). Private (MAP_PRIVATE): a clone reads it lazily,
    /// copy-on-write, so many clones share one file. vhost-user back-ends
    /// cannot see a private mapping: a clone uses QEMU's own devices only.
    std::filesystem::path memory_file;
    bool memory_file_shared = true;
    /// With `incoming`: RAM is not in the stream (migrated with x-ignore-shared)
    /// but in `memory_file`. QEMU 7.2 sets that capability only over QMP,
    /// so it starts with -incoming defer and a second monitor on an
    /// inherited socket the engine has already written the commands into
    /// (restore_monitor_commands): QEMU runs them as soon as its main loop
    /// does, and such streams carry no run state (memory_file_shared
    /// below), so the guest runs once loaded: no QMP round trip on the way.
    bool incoming_ignores_shared_memory = false;
    /// QEMU's own virtio-blk (first in the slot order, so /dev/vda) over this
    /// image; format by extension (.qcow2, else raw).
    std::filesystem::path root_drive;
    /// Data disks: QEMU's own virtio-blk over raw files, after every other
    /// block device, so the guest sees them in order after the root disk
    /// (/dev/vdb, /dev/vdc, ...).
    std::vector<qemu_data_drive> data_drives;
    /// A virtio-serial port named `agent_serial_name` on a Unix socket QEMU
    /// listens on (the agent channel QEMU can migrate; vhost-user-vsock cannot).
    std::filesystem::path agent_serial_socket;
    std::string agent_serial_name = "supermachine.agent";
    /// Host directories over virtio-fs (needs guest RAM shared with
    /// virtiofsd: the default memfd, or a shared memory_file).
    std::vector<qemu_shared_directory> shared_directories;
    /// The C virtiofsd of QEMU 7.2 (Debian's qemu-system-common).
    std::filesystem::path virtiofsd_binary = "/usr/lib/qemu/virtiofsd";
    /// A connected SOCK_STREAM socket (not owned) QEMU's own virtio-net
    /// frontend sends and receives Ethernet frames on (-netdev socket,fd=N:
    /// each frame after a 4-byte big-endian length); -1: no network device.
    /// QEMU inherits it as network_fd. The netdev is not migrated, so a
    /// restore passes a fresh one and the guest keeps its eth0.
    int network_socket = -1;
    /// The guest's MAC address (QEMU's default for its first NIC).
    std::string network_mac = "52:54:00:12:34:56";
    /// Appended verbatim (e.g. QEMU's own -drive/-device for comparisons).
    std::vector<std::string> extra_arguments;
};

namespace detail {

/// Where QEMU reads an incoming stream: the descriptor the engine hands it.
inline std::string incoming_uri() {
    return "fd:" + std::to_string(inherited_fd);
}

/// A restore's start-up monitor (incoming_ignores_shared_memory): a socket
/// QEMU inherits at this fd, holding restore_monitor_commands().
inline constexpr int restore_monitor_fd = inherited_fd + 1;

/// Where QEMU finds qemu_config::network_socket.
inline constexpr int network_fd = inherited_fd + 2;

/// Written before QEMU starts; QEMU answers on the same socket (the engine
/// drains the answers; a QMP error joins its diagnostics). A stream that
/// cannot be loaded makes QEMU exit.
inline std::string restore_monitor_commands() {
    return R"({"execute":"qmp_capabilities"})"
           R"({"execute":"migrate-set-capabilities","arguments":{"capabilities":)"
           R"([{"capability":"x-ignore-shared","state":true}]}})"
           R"({"execute":"migrate-incoming","arguments":{"uri":")" +
           incoming_uri() + R"("}})";
}

inline std::string shell_quote_for_exec(const std::filesystem::path& p) {
    // exec: migration URIs go through /bin/sh: quote the path.
    std::string out = "'";
    for (char c : p.string()) {
        if (c == '\'')
            out += "'\\''";
        else
            out += c;
    }
    return out + "'";
}

/// QEMU option values separate with ','; a literal comma is written twice.
inline std::string comma_escape(const std::string& value) {
    std::string out;
    for (char c : value) {
        out += c;
        if (c == ',') out += ',';
    }
    return out;
}

/// The host's TSC rate in kHz, measured once per process (10 ms against the
/// steady clock). Under TCG without -icount the guest's TSC is the host's.
inline std::uint64_t host_tsc_khz() {
    static const std::uint64_t khz = [] {
        const auto c0 = std::chrono::steady_clock::now();
        const auto t0 = __rdtsc();
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        const auto t1 = __rdtsc();
        const auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::steady_clock::now() - c0)
                            .count();
        return us > 0 ? (t1 - t0) * 1000 / static_cast<std::uint64_t>(us) : 0;
    }();
    return khz;
}

/// Kernel arguments a multi-threaded TCG guest needs on a loaded host: its
/// TSC calibration against the PIT fails there ("Unable to calibrate against
/// PIT … Marking TSC unstable") and the timer then stalls for minutes
/// (measured: no boot within 45 s beside 3 busy loops; with these, 2.7 s).
/// So tell it the rate instead (lpj for Debian's HZ=250).
inline std::string tcg_timer_arguments() {
    const auto khz = host_tsc_khz();
    if (khz < 100'000 || khz > 10'000'000) return {}; // not a plausible TSC: let it calibrate
    return " tsc_early_khz=" + std::to_string(khz) + " lpj=" + std::to_string(khz * 4);
}

/// Where the virtiofsd of shared directory `index` listens.
inline std::filesystem::path shared_directory_socket(const std::filesystem::path& runtime_directory,
                                                     std::size_t index) {
    return runtime_directory / ("fs" + std::to_string(index) + ".sock");
}

/// The argument vector (argv[0] = resolved binary). `use_kvm` is decided by
/// the caller; `runtime_directory` holds the virtiofsd sockets.
inline result<std::vector<std::string>>
qemu_arguments(const std::filesystem::path& binary, const qemu_config& config,
               const std::vector<qemu_vhost_user_attachment>& devices, bool use_kvm,
               const std::filesystem::path& runtime_directory = {}) {
    if (config.kernel.empty() && !config.incoming) return errc::kernel_not_found;
    if (config.memory_bytes < (16u << 20) || config.memory_bytes % (1u << 20))
        return errc::invalid_argument;
    if (config.vcpus == 0 || config.vcpus > 255) return errc::too_many_vcpus;
    const std::string megabytes = std::to_string(config.memory_bytes >> 20) + "M";
    std::vector<std::string> a{
        binary.string(),
        "-M",
        "microvm,acpi=on,memory-backend=mem",
        "-m",
        megabytes,
        "-object",
        config.memory_file.empty() ? "memory-backend-memfd,id=mem,size=" + megabytes + ",share=on"
                                   : "memory-backend-file,id=mem,size=" + megabytes +
                                         ",mem-path=" + comma_escape(config.memory_file.string()) +
                                         (config.memory_file_shared ? ",share=on" : ",share=off"),
        "-smp",
        std::to_string(config.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        // Modern virtio-mmio (version 2): the same transport the kvm engine offers.
        "-global",
        "virtio-mmio.force-legacy=false",
    };
    // A restore loads no kernel: the guest in the stream booted long ago, and
    // QEMU would read and copy the kernel and initramfs (≈ 9 MB, 3500 page
    // faults, ≈ 7 ms here) into firmware tables it never reads again.
    if (!config.incoming) {
        const bool tcg_without_icount = !use_kvm && (config.vcpus > 1 || config.icount.empty());
        a.insert(a.end(),
                 {"-kernel", config.kernel.string(), "-append",
                  tcg_without_icount ? config.cmdline + tcg_timer_arguments() : config.cmdline});
        if (!config.initrd.empty()) a.insert(a.end(), {"-initrd", config.initrd.string()});
    }
    if (use_kvm) {
        a.insert(a.end(), {"-accel", "kvm", "-cpu", "host"});
    } else if (config.vcpus > 1) {
        // -icount makes TCG run every vCPU round-robin on one thread, and
        // Linux's secondary-CPU bring-up then stalls (measured: no AP within
        // 60 s; with lpj= 3-40 s). Multi-threaded TCG brings 2 CPUs up in
        // ~1.6 s; the calibration -icount protects is given on the cmdline
        // instead (tcg_timer_arguments).
        a.insert(a.end(), {"-accel", "tcg,thread=multi"});
    } else {
        a.insert(a.end(), {"-accel", "tcg"});
        if (!config.icount.empty()) a.insert(a.end(), {"-icount", config.icount});
    }
    if (!config.root_drive.empty()) {
        const bool qcow2 = config.root_drive.extension() == ".qcow2";
        a.insert(a.end(), {"-drive",
                           "if=none,id=root,file=" + comma_escape(config.root_drive.string()) +
                               (qcow2 ? ",format=qcow2" : ",format=raw"),
                           "-device", "virtio-blk-device,drive=root"});
    }
    if (!config.agent_serial_socket.empty()) {
        a.insert(a.end(),
                 {"-device", "virtio-serial-device", "-chardev",
                  "socket,id=agent,path=" + comma_escape(config.agent_serial_socket.string()) +
                      ",server=on,wait=off",
                  "-device", "virtserialport,chardev=agent,name=" + config.agent_serial_name});
    }
    if (config.network_socket >= 0) {
        // After the agent's channel in the slot order: adding the NIC moves
        // no existing device (a snapshot's stream names them by slot).
        if (config.network_mac.size() != 17 ||
            config.network_mac.find_first_not_of("0123456789abcdefABCDEF:") != std::string::npos)
            return errc::invalid_argument;
        a.insert(a.end(), {"-netdev", "socket,id=net0,fd=" + std::to_string(network_fd), "-device",
                           "virtio-net-device,netdev=net0,mac=" + config.network_mac});
    }
    for (const auto& d : devices) {
        a.insert(a.end(), {"-chardev", "socket,id=" + d.id + ",path=" + d.socket.string()});
        std::string device = std::string(qemu_device_name(d.kind)) + ",chardev=" + d.id;
        if (d.kind == vhost_user_device_kind::blk) device += ",num-queues=1";
        a.insert(a.end(), {"-device", device});
    }
    for (std::size_t i = 0; i < config.data_drives.size(); ++i) {
        const auto& d = config.data_drives[i];
        const std::string id = "data" + std::to_string(i);
        a.insert(a.end(), {"-drive",
                           "if=none,id=" + id + ",file=" + comma_escape(d.path.string()) +
                               ",format=raw" + (d.read_only ? ",readonly=on" : ""),
                           "-device", "virtio-blk-device,drive=" + id});
    }
    if (!config.shared_directories.empty() && !config.memory_file.empty() &&
        !config.memory_file_shared)
        return errc::invalid_argument; // virtiofsd cannot see a private mapping
    for (std::size_t i = 0; i < config.shared_directories.size(); ++i) {
        const auto& d = config.shared_directories[i];
        if (d.tag.empty() || d.tag.size() > 36 || d.tag.find_first_of(", =") != std::string::npos)
            return errc::invalid_argument;
        const std::string id = "fs" + std::to_string(i);
        a.insert(a.end(), {"-chardev",
                           "socket,id=" + id + ",path=" +
                               comma_escape(shared_directory_socket(runtime_directory, i).string()),
                           "-device", "vhost-user-fs-device,chardev=" + id + ",tag=" + d.tag});
    }
    if (!config.qmp_socket.empty())
        a.insert(a.end(), {"-qmp", "unix:" + config.qmp_socket.string() + ",server=on,wait=off"});
    if (!config.memory_file.empty() && config.memory_file_shared) {
        // A snapshot source: its streams leave out the run state ("paused"
        // at the snapshot), so a restore resumes by itself once loaded
        // instead of waiting for a `cont`.
        a.insert(a.end(), {"-global", "migration.store-global-state=off"});
    }
    if (config.incoming && config.incoming_ignores_shared_memory)
        a.insert(a.end(), {"-chardev", "socket,id=restore,fd=" + std::to_string(restore_monitor_fd),
                           "-mon", "chardev=restore,mode=control", "-incoming", "defer"});
    else if (config.incoming)
        a.insert(a.end(), {"-incoming", incoming_uri()});
    a.insert(a.end(), config.extra_arguments.begin(), config.extra_arguments.end());
    return a;
}

} // namespace detail
} // namespace supermachine::backend
