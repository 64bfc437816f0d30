#pragma once
// The initramfs every image VM boots: our guest agent as /init, the kernel
// modules it loads (virtio-mmio, blk, vsock, ...), and their load order.
// Layout and cmdline keys: doc/agent.md ("Initramfs layout").
#include <supermachine/boot/initramfs.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/error.hpp>

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::detail {

/// Where the guest agent binary is: $SUPERMACHINE_AGENT, else beside the
/// running program (the build puts both in bin/), else ../libexec/supermachine
/// from it (an installed CLI), else the libexec directory of the installed
/// library this program was compiled against (SUPERMACHINE_LIBEXEC_DIR, set
/// by the installed CMake package), so an embedding program needs no set-up.
inline result<std::filesystem::path> find_agent_binary() {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (const char* env = std::getenv("SUPERMACHINE_AGENT"); env && *env) {
        if (fs::is_regular_file(env, ec)) return fs::path(env);
        return errc::agent_unavailable;
    }
    const auto self = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) {
        for (const auto& candidate :
             {self.parent_path() / "supermachine-agent",
              self.parent_path().parent_path() / "libexec" / "supermachine" / "supermachine-agent"})
            if (fs::is_regular_file(candidate, ec)) return candidate;
    }
#ifdef SUPERMACHINE_LIBEXEC_DIR
    if (const fs::path installed = fs::path(SUPERMACHINE_LIBEXEC_DIR) / "supermachine-agent";
        fs::is_regular_file(installed, ec))
        return installed;
#endif
    return errc::agent_unavailable;
}

/// The kernel command line of an image vm: the root disk, the agent's channel
/// (virtio-serial for snapshottable vms, else vsock `agent_port`), then
/// `extra` separated by spaces. No secret: every guest user reads
/// /proc/cmdline (the token is in the initramfs). A restore compares a
/// snapshot's saved line with this (and recovers `extra` as what follows it).
inline std::string image_vm_cmdline(bool serial_channel, std::uint32_t agent_port,
                                    std::span<const std::string> extra = {}) {
    std::string cmdline = "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init "
                          "supermachine.root=/dev/vda ";
    cmdline += serial_channel ? std::string("supermachine.channel=serial")
                              : "supermachine.port=" + std::to_string(agent_port);
    for (const auto& e : extra)
        cmdline += " " + e;
    return cmdline;
}

/// /init = the agent, /etc/supermachine/modules = `kernel.modules` in load
/// order, the .ko files under /lib/modules/, and /etc/supermachine/token
/// (mode 0400) = `token`: each vm gets its own initramfs. The agent reads
/// the token and removes the file before any workload runs, so no guest
/// process can read it (not the kernel command line: /proc/cmdline is
/// world-readable).
inline result<std::vector<std::byte>> build_agent_initramfs(const std::filesystem::path& agent,
                                                            const boot::kernel_files& kernel,
                                                            std::string_view token) {
    using boot::initramfs_entry;
    std::vector<initramfs_entry> entries;
    std::set<std::string> directories;
    auto add_parents = [&](const std::filesystem::path& path) {
        std::filesystem::path prefix;
        for (const auto& part : path.parent_path()) {
            prefix /= part;
            if (directories.insert(prefix.string()).second)
                entries.push_back(initramfs_entry::directory(prefix.string()));
        }
    };

    SUPERMACHINE_TRY(agent_bytes, boot::read_host_file(agent, 64u << 20));
    entries.push_back(initramfs_entry::file("init", std::move(agent_bytes), 0755));
    add_parents("dev/console");
    entries.push_back(
        initramfs_entry::device("dev/console", boot::cpio_kind::character_device, 5, 1));

    std::string list;
    for (const auto& module : kernel.modules) {
        const auto relative = module.lexically_relative(kernel.modules_dir);
        if (relative.empty() || *relative.begin() == "..") return errc::invalid_argument;
        const auto inside = std::filesystem::path("lib/modules") / relative;
        add_parents(inside);
        SUPERMACHINE_TRY(bytes, boot::read_host_file(module, 64u << 20));
        entries.push_back(initramfs_entry::file(inside.string(), std::move(bytes)));
        list += relative.string() + "\n";
    }
    add_parents("etc/supermachine/modules");
    entries.push_back(initramfs_entry::text_file("etc/supermachine/modules", list));
    entries.push_back(initramfs_entry::text_file("etc/supermachine/token", token, 0400));
    return boot::build_initramfs(entries);
}

} // namespace supermachine::detail
