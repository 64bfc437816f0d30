#pragma once
// Everything a snapshot directory needs to start, found from the directory
// alone (doc/vm.md, "Starting from a snapshot alone"): its `meta` record
// (hostile input: bounded codec, sealed), the recorded image in the content
// store (config, root filesystem, /etc/passwd and /etc/group beside it), the
// cached kernel of the recorded release, and the vm options it was taken
// with. Anything missing is a clear error with one sentence naming it;
// vm::async_restore then checks every file's fingerprint as for any restore.
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/detail/agent_initramfs.hpp>
#include <supermachine/detail/warm_snapshot.hpp>
#include <supermachine/error.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/rootfs_cache.hpp>
#include <supermachine/prepared_image.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace supermachine::detail {

struct warm_snapshot_contents {
    warm_snapshot_meta meta;
    prepared_image image;      // reference: the first content-store record of its digest
    boot::kernel_files kernel; // identity only (a restore boots no initramfs of its own)
    std::uint32_t memory_mib = 0;
    std::uint32_t cpus = 0;
    /// What followed the image vm's own kernel arguments on the saved command
    /// line (one element, kept verbatim so the line compares equal).
    std::vector<std::string> extra_cmdline;
};

/// Bounds on what a record may ask for (the options' own limits in the CLI).
inline constexpr std::uint32_t max_snapshot_memory_mib = 1u << 20;
inline constexpr std::uint32_t max_snapshot_cpus = 64;
/// The vsock port of the agent on the kvm engine (vm::agent_port).
inline constexpr std::uint32_t kvm_agent_port = 1024;

/// Read `dir`'s record and find what it names in the content store at
/// `cache_dir` and in the kernel cache. `why` (if given) gets one sentence
/// on failure. Errors: not_found (no directory, no record, image not in the
/// store, root filesystem missing), kernel_not_found, the record's codec
/// errors (snapshot_truncated, snapshot_bad_magic, snapshot_bad_record, ...),
/// snapshot_mismatch (an unknown engine or another cache's root filesystem).
inline result<warm_snapshot_contents> read_warm_snapshot(const std::filesystem::path& dir,
                                                         const std::filesystem::path& cache_dir,
                                                         std::string* why = nullptr) {
    auto refuse = [&](error_code ec, std::string text) -> result<warm_snapshot_contents> {
        if (why) *why = std::move(text);
        return ec;
    };
    std::error_code fs_ec;
    if (!std::filesystem::is_directory(dir, fs_ec))
        return refuse(errc::not_found, dir.string() + " is not a snapshot directory");
    auto raw = read_small_file(dir / "meta", 64 * 1024);
    if (!raw) {
        if (raw.error() == std::errc::no_such_file_or_directory)
            return refuse(errc::not_found,
                          dir.string() + " has no meta record: not an image snapshot (made by "
                                         "`supermachine snapshot -o DIR`)");
        return refuse(raw.error(), (dir / "meta").string() + " cannot be read");
    }
    auto decoded = warm_snapshot_meta::decode(raw.value());
    if (!decoded)
        return refuse(decoded.error(), (dir / "meta").string() + " is not a valid snapshot record");
    warm_snapshot_contents out;
    out.meta = std::move(decoded).value();
    const auto& meta = out.meta;
    if (meta.engine != "qemu" && meta.engine != "kvm")
        return refuse(errc::snapshot_mismatch,
                      "the snapshot was taken on engine '" + meta.engine + "', unknown here");
    if (meta.memory_mib > max_snapshot_memory_mib || meta.cpus > max_snapshot_cpus)
        return refuse(errc::snapshot_bad_record,
                      (dir / "meta").string() + ": memory or vCPU count out of range");
    out.memory_mib = meta.memory_mib;
    out.cpus = meta.cpus;

    // The image: its config from the content store, its rootfs where that
    // cache keeps it. The snapshot's overlay names the rootfs as its backing
    // file, so it must be the very file the snapshot was taken over.
    auto digest = oci::digest::parse(meta.image_digest);
    if (!digest)
        return refuse(errc::snapshot_bad_record,
                      (dir / "meta").string() + ": the image digest is not a digest");
    const oci::content_store store(cache_dir);
    auto records = store.list_images();
    if (!records)
        return refuse(records.error(), "the content store at " + cache_dir.string() +
                                           " cannot be read: " + records.error().message());
    std::optional<oci::pulled_image> pulled;
    error_code load_error = errc::not_found;
    for (const auto& record : records.value()) {
        if (record.image_manifest_digest != digest.value()) continue;
        auto loaded = store.load_image(record);
        if (loaded) {
            pulled = std::move(loaded).value();
            break;
        }
        load_error = loaded.error();
    }
    if (!pulled)
        return refuse(load_error == errc::not_found ? error_code(errc::not_found) : load_error,
                      "the snapshot's image " + meta.image_digest +
                          (load_error == errc::not_found
                               ? " is not in the content store at " + cache_dir.string() +
                                     " (pull or prepare the image there again)"
                               : " is damaged in the content store at " + cache_dir.string() +
                                     ": " + load_error.message()));
    auto rootfs = oci::rootfs_path(cache_dir, meta.image_digest);
    if (!rootfs) return refuse(rootfs.error(), "bad image digest " + meta.image_digest);
    if (rootfs.value().string() != meta.rootfs)
        return refuse(errc::snapshot_mismatch, "the snapshot was taken over the root filesystem " +
                                                   meta.rootfs + ", not this cache's " +
                                                   rootfs.value().string());
    if (!std::filesystem::is_regular_file(rootfs.value(), fs_ec))
        return refuse(errc::not_found, "the snapshot's root filesystem " + meta.rootfs +
                                           " is missing (prepare the image again: `supermachine "
                                           "run IMAGE true` rebuilds it; the snapshot may not "
                                           "match a rebuilt one)");
    // The accounts the rootfs builder keeps beside the image (bounded as there).
    auto accounts = [&](const char* extension) {
        auto path = rootfs.value();
        path.replace_extension(extension);
        return oci::detail::rootfs_read_small(path, oci::default_max_account_file);
    };
    auto passwd = accounts(".passwd");
    auto group = accounts(".group");
    if (!passwd || !group)
        return refuse(errc::not_found, "the snapshot's image accounts beside " + meta.rootfs +
                                           " (.passwd, .group) cannot be read");
    out.image.reference = pulled->reference;
    out.image.digest = digest.value();
    out.image.config = std::move(pulled->config);
    out.image.rootfs = rootfs.value();
    out.image.passwd = std::move(passwd).value();
    out.image.group = std::move(group).value();

    auto kernel = boot::find_cached_kernel(meta.kernel_release);
    if (!kernel)
        return refuse(errc::kernel_not_found, "the snapshot's kernel " + meta.kernel_release +
                                                  " is not in the kernel cache (" +
                                                  boot::kernel_cache_dir().string() +
                                                  ", or $SUPERMACHINE_KERNEL_DIR)");
    out.kernel = std::move(kernel).value();

    // The saved line is the image vm's own (QEMU's snapshottable vms: agent
    // on serial; the kvm engine's: on vsock) followed by the extra arguments
    // it was booted with.
    const auto own = image_vm_cmdline(meta.engine == "qemu", kvm_agent_port);
    if (!meta.cmdline.starts_with(own))
        return refuse(errc::snapshot_mismatch,
                      "the snapshot's kernel command line is not an image vm's of this version");
    const auto rest = std::string_view(meta.cmdline).substr(own.size());
    if (!rest.empty()) {
        if (rest.size() < 2 || rest.front() != ' ')
            return refuse(errc::snapshot_mismatch,
                          "the snapshot's kernel command line is not an image vm's of this "
                          "version");
        out.extra_cmdline.emplace_back(rest.substr(1));
    }
    return out;
}

} // namespace supermachine::detail
