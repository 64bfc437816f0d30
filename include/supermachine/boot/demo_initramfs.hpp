#pragma once
// The demo guest: an initramfs with a static busybox and a shell /init
// that loads the guest modules, prints a greeting and powers off. It proves
// a kernel + initramfs + device set end to end (used by the tests and by
// the CLI's main job).
#include <supermachine/boot/initramfs.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/error.hpp>

#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace supermachine::boot {

inline constexpr const char* demo_greeting = "Hello from supermachine guest";

struct demo_initramfs_options {
    std::string greeting = demo_greeting;
    std::filesystem::path busybox = "/bin/busybox"; // a static busybox (Debian busybox-static)
    std::vector<std::filesystem::path>
        modules;              // .ko files, dependencies first (kernel_files::modules)
    std::string extra_script; // shell lines run after the greeting, before power-off
    /// More host files for the guest: {host file, path in the guest ("bin/tool")}, mode 0755.
    std::vector<std::pair<std::filesystem::path, std::string>> extra_files;
    std::string final_command =
        "poweroff -f"; // "reboot -f" (+ reboot=t) where ACPI power-off is not served
    initramfs_compression compression = initramfs_compression::gzip;
};

/// The /init script alone (exposed for tests and docs).
inline std::string demo_init_script(const demo_initramfs_options& options) {
    std::string s = "#!/bin/sh\n"
                    "export PATH=/bin\n"
                    "mount -t proc proc /proc\n"
                    "mount -t sysfs sysfs /sys\n"
                    "mount -t devtmpfs devtmpfs /dev 2>/dev/null\n";
    for (std::size_t i = 0; i < options.modules.size(); ++i) {
        char name[32];
        std::snprintf(name, sizeof name, "/lib/modules/%02zu.ko", i % 100);
        s += "insmod " + std::string(name) + " || echo \"insmod " +
             options.modules[i].filename().string() + " failed\"\n";
    }
    s += "echo \"" + options.greeting + "\"\n";
    s += options.extra_script;
    if (!s.empty() && s.back() != '\n') s += '\n';
    s += options.final_command + "\n";
    return s;
}

inline result<std::vector<std::byte>> build_demo_initramfs(const demo_initramfs_options& options) {
    if (options.modules.size() > 100) return errc::invalid_argument;
    for (char c : options.greeting)
        if (c == '"' || c == '\\' || c == '$' || c == '`' || c == '\n')
            return errc::invalid_argument;
    SUPERMACHINE_TRY(busybox, read_host_file(options.busybox, 16ull << 20));
    std::vector<initramfs_entry> entries;
    for (const char* dir : {"bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"})
        entries.push_back(initramfs_entry::directory(dir));
    entries.push_back(
        initramfs_entry::device("dev/console", cpio_kind::character_device, 5, 1, 0600));
    entries.push_back(initramfs_entry::device("dev/null", cpio_kind::character_device, 1, 3, 0666));
    entries.push_back(initramfs_entry::file("bin/busybox", std::move(busybox), 0755));
    for (const char* applet : {"sh", "mount", "insmod", "echo", "poweroff", "reboot", "cat", "ls",
                               "grep", "nproc", "sleep"})
        entries.push_back(initramfs_entry::symlink(std::string("bin/") + applet, "busybox"));
    for (std::size_t i = 0; i < options.modules.size(); ++i) {
        SUPERMACHINE_TRY(ko, read_host_file(options.modules[i], 64ull << 20));
        char name[32];
        std::snprintf(name, sizeof name, "lib/modules/%02zu.ko", i % 100);
        entries.push_back(initramfs_entry::file(name, std::move(ko), 0644));
    }
    for (const auto& [host, guest] : options.extra_files) {
        SUPERMACHINE_TRY(bytes, read_host_file(host, 64ull << 20));
        entries.push_back(initramfs_entry::file(guest, std::move(bytes), 0755));
    }
    entries.push_back(initramfs_entry::text_file("init", demo_init_script(options), 0755));
    return build_initramfs(entries, options.compression);
}

} // namespace supermachine::boot
