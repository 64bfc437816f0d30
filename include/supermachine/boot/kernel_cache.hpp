#pragma once
// The default guest kernel: Debian's linux-image-cloud-amd64, unpacked by
// scripts/fetch-kernel.sh into $XDG_CACHE_HOME/supermachine/kernels
// (default ~/.cache/supermachine/kernels), never installed. This finds it
// and lists what the guest must load from its initramfs. Debian's cloud
// kernel builds virtio_mmio as a module and has no
// VIRTIO_MMIO_CMDLINE_DEVICES, so devices are found through ACPI.
#include <supermachine/boot/kernel_modules.hpp>
#include <supermachine/error.hpp>

#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::boot {

/// Modules our guests need, in the order they matter; the plan drops
/// built-ins (ext4 and its helpers are built into the cloud kernel) and
/// adds dependencies (virtio, virtio_ring, ...).
inline const std::vector<std::string>& default_guest_modules() {
    static const std::vector<std::string> names{
        "virtio_mmio",
        "virtio_blk",
        "virtio_console",
        "virtio_rng",
        "virtio_net",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
        "crc16",
        "mbcache",
        "jbd2",
        "ext4",
        "overlay",
    };
    return names;
}

struct kernel_files {
    std::filesystem::path root;        // the unpacked package
    std::string release;               // e.g. "6.1.0-56-cloud-amd64"
    std::filesystem::path vmlinuz;     // root/boot/vmlinuz-<release>
    std::filesystem::path modules_dir; // root/lib/modules/<release>
    std::vector<std::filesystem::path>
        modules; // default_guest_modules() resolved, dependencies first
};

/// Read a kernel image (bzImage or vmlinux) from the host: kernel_not_found
/// when missing or unreadable, kernel_invalid when larger than any kernel
/// we load (512 MiB) — checked before reading.
inline result<std::vector<std::byte>> read_kernel_file(const std::filesystem::path& path) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) return errc::kernel_not_found;
    auto bytes = read_host_file(path, 512ull << 20);
    if (!bytes)
        return bytes.error() == errc::invalid_argument ? errc::kernel_invalid
                                                       : errc::kernel_not_found;
    return bytes;
}

/// $XDG_CACHE_HOME/supermachine/kernels, else $HOME/.cache/supermachine/kernels.
inline std::filesystem::path kernel_cache_dir() {
    if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
        return std::filesystem::path(xdg) / "supermachine" / "kernels";
    const char* home = std::getenv("HOME");
    return std::filesystem::path(home && *home ? home : "/tmp") / ".cache" / "supermachine" /
           "kernels";
}

/// The script that fills the cache: $SUPERMACHINE_SOURCE_DIR/scripts/fetch-kernel.sh,
/// or relative to the current directory.
inline std::filesystem::path fetch_kernel_script() {
    if (const char* source = std::getenv("SUPERMACHINE_SOURCE_DIR"); source && *source)
        return std::filesystem::path(source) / "scripts" / "fetch-kernel.sh";
    return "scripts/fetch-kernel.sh";
}

/// An unpacked kernel package's identity (root, newest boot/vmlinuz-<release>,
/// modules_dir) without planning its modules: the plan walks the whole module
/// tree (no modules.dep in an unpacked package), tens of ms a restore does not
/// need (it boots no initramfs of its own).
inline result<kernel_files> kernel_identity(const std::filesystem::path& root) {
    namespace fs = std::filesystem;
    std::error_code ec;
    kernel_files k;
    k.root = fs::canonical(root, ec);
    if (ec) return errc::kernel_not_found;
    for (auto it = fs::directory_iterator(k.root / "boot", ec);
         !ec && it != fs::directory_iterator(); it.increment(ec)) {
        const auto name = it->path().filename().string();
        if (name.starts_with("vmlinuz-") &&
            name.substr(8) > k.release) { // newest release if several
            k.release = name.substr(8);
            k.vmlinuz = it->path();
        }
    }
    if (ec || k.release.empty()) return errc::kernel_not_found;
    k.modules_dir = k.root / "lib" / "modules" / k.release;
    return k;
}

/// Open an unpacked kernel package (boot/vmlinuz-*, lib/modules/<release>)
/// and plan `modules` for it.
inline result<kernel_files>
open_kernel_tree(const std::filesystem::path& root,
                 std::span<const std::string> modules = default_guest_modules()) {
    SUPERMACHINE_TRY(k, kernel_identity(root));
    std::error_code ec;
    if (!std::filesystem::is_directory(k.modules_dir, ec)) return errc::kernel_not_found;
    SUPERMACHINE_TRY(plan, plan_modules(k.modules_dir, modules));
    k.modules = std::move(plan.load_order);
    return k;
}

/// Where the default kernel is: $SUPERMACHINE_KERNEL_DIR if set, else
/// kernel_cache_dir()/current.
inline std::filesystem::path default_kernel_root() {
    if (const char* dir = std::getenv("SUPERMACHINE_KERNEL_DIR"); dir && *dir) return dir;
    return kernel_cache_dir() / "current";
}

/// The cached default kernel's identity only (see kernel_identity).
inline result<kernel_files> default_kernel_identity() {
    return kernel_identity(default_kernel_root());
}

/// The cached kernel of `release` (e.g. a snapshot's), identity only: the
/// default kernel first, then every unpacked package in kernel_cache_dir().
/// `release` may come from a hostile file: anything that is not a plain
/// file-name part is kernel_not_found, never a path.
inline result<kernel_files> find_cached_kernel(std::string_view release) {
    namespace fs = std::filesystem;
    if (release.empty() || release.size() > 200 || release.find('/') != std::string_view::npos ||
        release == "." || release == "..")
        return errc::kernel_not_found;
    const std::string file = "vmlinuz-" + std::string(release);
    auto from = [&](const fs::path& root) -> result<kernel_files> {
        std::error_code ec;
        kernel_files k;
        k.root = fs::canonical(root, ec);
        if (ec || !fs::is_regular_file(k.root / "boot" / file, ec)) return errc::kernel_not_found;
        k.release = std::string(release);
        k.vmlinuz = k.root / "boot" / file;
        k.modules_dir = k.root / "lib" / "modules" / k.release;
        return k;
    };
    if (auto k = from(default_kernel_root())) return k;
    std::error_code ec;
    for (auto it = fs::directory_iterator(kernel_cache_dir(), ec);
         !ec && it != fs::directory_iterator(); it.increment(ec))
        if (auto k = from(it->path())) return k;
    return errc::kernel_not_found;
}

/// The cached default kernel: $SUPERMACHINE_KERNEL_DIR if set, else
/// kernel_cache_dir()/current. kernel_not_found when the cache is empty —
/// run fetch_kernel_script() to fill it.
inline result<kernel_files> default_kernel() {
    return open_kernel_tree(default_kernel_root());
}

/// Run fetch_kernel_script() (apt-get download + dpkg-deb -x), then open the result.
inline result<kernel_files>
fetch_default_kernel(const std::filesystem::path& script = fetch_kernel_script()) {
    std::error_code ec;
    if (!std::filesystem::exists(script, ec)) return errc::kernel_not_found;
    std::string command = "'";
    for (char c : script.string())
        command += c == '\'' ? std::string("'\\''") : std::string(1, c);
    command += "' >/dev/null";
    if (std::system(command.c_str()) != 0) return errc::kernel_not_found;
    return default_kernel();
}

} // namespace supermachine::boot
