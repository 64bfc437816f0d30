#pragma once
// The qemu-system-x86_64 command line for the QEMU engine: a microvm with
// ACPI (the Debian cloud kernel finds virtio-mmio devices only through the
// DSDT), guest RAM in a shared memfd (vhost-user back-ends map it), the
// serial console on stdout, and one vhost-user device per attached socket.
#include <supermachine/error.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
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

struct qemu_config {
    std::filesystem::path qemu_binary = "qemu-system-x86_64"; // a name is looked up on PATH
    std::filesystem::path kernel;                             // bzImage or PVH vmlinux
    std::filesystem::path initrd;                             // may be empty
    std::string cmdline = "console=ttyS0 panic=-1";
    std::uint64_t memory_bytes = 256u << 20;
    std::uint32_t vcpus = 1;
    qemu_accelerator accelerator = qemu_accelerator::automatic;
    /// Restore from a migration stream file instead of booting (-incoming "exec:cat FILE").
    std::optional<std::filesystem::path> incoming;
    /// A QMP control socket (needed for snapshots); empty: none.
    std::filesystem::path qmp_socket;
    /// TCG only: QEMU's -icount setting; empty = off. Without it, on a loaded
    /// host the Debian kernel's PIT/TSC calibration fails and its timer stalls
    /// for minutes; with it guest time follows executed instructions.
    /// "shift=auto" keeps guest time near real time; "shift=4,sleep=off"
    /// boots fastest (guest time runs ahead while it idles).
    std::string icount = "shift=auto";
    /// Appended verbatim (e.g. QEMU's own -drive/-device for comparisons).
    std::vector<std::string> extra_arguments;
};

namespace detail {

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

/// The argument vector (argv[0] = resolved binary). `use_kvm` is decided by the caller.
inline result<std::vector<std::string>>
qemu_arguments(const std::filesystem::path& binary, const qemu_config& config,
               const std::vector<qemu_vhost_user_attachment>& devices, bool use_kvm) {
    if (config.kernel.empty()) return errc::kernel_not_found;
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
        "memory-backend-memfd,id=mem,size=" + megabytes + ",share=on",
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
        "-kernel",
        config.kernel.string(),
        "-append",
        config.cmdline,
    };
    if (use_kvm) {
        a.insert(a.end(), {"-accel", "kvm", "-cpu", "host"});
    } else {
        a.insert(a.end(), {"-accel", "tcg"});
        if (!config.icount.empty()) a.insert(a.end(), {"-icount", config.icount});
    }
    if (!config.initrd.empty()) a.insert(a.end(), {"-initrd", config.initrd.string()});
    for (const auto& d : devices) {
        a.insert(a.end(), {"-chardev", "socket,id=" + d.id + ",path=" + d.socket.string()});
        std::string device = std::string(qemu_device_name(d.kind)) + ",chardev=" + d.id;
        if (d.kind == vhost_user_device_kind::blk) device += ",num-queues=1";
        a.insert(a.end(), {"-device", device});
    }
    if (!config.qmp_socket.empty())
        a.insert(a.end(), {"-qmp", "unix:" + config.qmp_socket.string() + ",server=on,wait=off"});
    if (config.incoming)
        a.insert(a.end(), {"-incoming", "exec:cat " + shell_quote_for_exec(*config.incoming)});
    a.insert(a.end(), config.extra_arguments.begin(), config.extra_arguments.end());
    return a;
}

} // namespace detail
} // namespace supermachine::backend
