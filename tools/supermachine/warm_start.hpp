#pragma once
// `supermachine run`'s warm start (doc/warm-start.md): one snapshot per
// (image digest, memory, cpus, kernel release, agent binary, engine) under
// $XDG_CACHE_HOME/supermachine/snapshots/<key>, taken right after the agent
// is ready. Present and valid: restore it. Missing, stale or corrupt: cold
// boot, snapshot (a progress line at a terminal), continue. Concurrent runs: one creates
// (a lock file, never waited on: the others cold boot meanwhile); the
// directory appears by rename.
#include <supermachine/detail/warm_snapshot.hpp>
#include <supermachine/detail/warm_snapshot_cache.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/vm.hpp>

#include <sys/file.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>

namespace supermachine::cli {

struct warm_start_options {
    bool use_snapshot = true;
    /// Lines about slow work (creating or rebuilding the snapshot): `run`
    /// shows them only when stderr is a terminal.
    bool progress = false;
    /// Every decision (restored, cold boot and why): --verbose.
    bool verbose = false;
    /// Use (and create) the snapshot here instead of the cache's per-key directory.
    std::filesystem::path snapshot_dir;
};

inline std::string warm_snapshot_key(const prepared_image& image, const vm_options& options,
                                     const std::string& agent_identity) {
    // v3: TCG without -icount (a v2 stream does not load into it); v4:
    // streams without QEMU's run state (a restore resumes by itself); v5:
    // the token in the initramfs, not on the command line.
    // kvm v1: the engine's container file, agent on vsock.
    const bool kvm = options.engine == engine_choice::kvm;
    const std::string identity =
        std::string(kvm ? "v1|kvm|vsock|" : "v5|qemu|serial|") + image.digest.str() + "|" +
        image.rootfs.string() + "|" + std::to_string(options.memory_mib) + "|" +
        std::to_string(options.cpus) + "|" + options.kernel->release + "|" + agent_identity +
        (options.network == network_mode::user ? "|net=user" : "");
    std::string extra;
    for (const auto& e : options.extra_cmdline)
        extra += e + "\n";
    const auto h1 = detail::hash_bytes(std::as_bytes(std::span(identity)));
    const auto h2 = detail::hash_bytes(std::as_bytes(std::span(extra)), h1 ^ 0x5bd1e995);
    char text[40];
    std::snprintf(text, sizeof text, "%016llx%016llx", static_cast<unsigned long long>(h1),
                  static_cast<unsigned long long>(h2));
    return text;
}

/// The per-key creation lock, without waiting: -1 when another run holds it
/// (that run is creating the snapshot; this one cold boots meanwhile rather
/// than queueing behind it).
inline int try_creation_lock(const std::filesystem::path& dir) {
    const int fd = ::open((dir.string() + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

/// Where `supermachine run` keeps the warm snapshot of `image` with these
/// options (options.kernel must be set).
inline result<std::filesystem::path> warm_snapshot_dir(const prepared_image& image,
                                                       const vm_options& options) {
    SUPERMACHINE_TRY(agent_binary, detail::find_agent_binary());
    return oci::content_store::default_root() / "snapshots" /
           warm_snapshot_key(image, options, detail::agent_identity(agent_binary));
}

/// Snapshot a freshly booted vm as a run template into `dir` and stop it.
/// First the guest runs `true` once (its result does not matter: an image
/// without it still forks and fails an exec): the snapshot then holds a
/// guest whose kernel has been through fork, exec, the PATH lookup and the
/// image's binaries once (page cache, dentries, slab), so every restored
/// run starts its command sooner (measured: a warm `run IMAGE true`
/// 0.175 s → 0.135 s). Completion: void(supermachine::error_code, vm::snapshot_report).
inline void
async_snapshot_template(std::shared_ptr<vm> v, std::filesystem::path dir,
                        std::function<void(supermachine::error_code, vm::snapshot_report)> done) {
    agent::exec_request warm_up;
    warm_up.argv = {"true"};
    warm_up.timeout_ms = 10'000;
    auto raw = v.get();
    raw->async_exec(std::move(warm_up), [v = std::move(v), dir = std::move(dir),
                                         done = std::move(done)](supermachine::error_code, auto&&...) {
        v->async_snapshot(dir, false,
                          [v, done](supermachine::error_code ec, vm::snapshot_report r) { done(ec, r); });
    });
}

/// `supermachine snapshot`: cold boot a snapshottable vm, snapshot it right
/// after agent-ready into `dir` (replacing one there), stop it.
/// Completion: void(supermachine::error_code, vm::snapshot_report).
inline void async_build_snapshot(boost::asio::any_io_executor executor, prepared_image image,
                                 vm_options options, std::filesystem::path dir,
                                 std::function<void(supermachine::error_code, vm::snapshot_report)> done) {
    options.snapshottable = true;
    options.publish.clear(); // the clones publish
    vm::async_start(executor, std::move(image), std::move(options),
                    [dir, done](supermachine::error_code ec, std::shared_ptr<vm> v) {
                        if (ec) {
                            if (v) std::fprintf(stderr, "%s", v->console_tail().c_str());
                            return done(ec, {});
                        }
                        async_snapshot_template(std::move(v), dir, done);
                    });
}

/// Start a vm for `supermachine run`: restore the cached snapshot, or cold
/// boot (and create it). Completion: void(supermachine::error_code, std::shared_ptr<vm>).
inline void async_warm_start(boost::asio::any_io_executor executor, prepared_image image,
                             vm_options options, warm_start_options warm,
                             std::function<void(supermachine::error_code, std::shared_ptr<vm>)> done) {
    auto say = [verbose = warm.verbose](const std::string& line) {
        if (verbose) std::fprintf(stderr, "supermachine: %s\n", line.c_str());
    };
    auto progress = [shown = warm.progress || warm.verbose](const std::string& line) {
        if (shown) std::fprintf(stderr, "supermachine: %s\n", line.c_str());
    };
    // A boot needs the kernel's module plan (the initramfs); a restore only
    // its identity. When the caller left the kernel to us, boots plan it.
    const bool kernel_defaulted = !options.kernel;
    auto for_boot = [kernel_defaulted](vm_options o) {
        if (kernel_defaulted) o.kernel.reset();
        return o;
    };
    auto cold = [executor, done, say, for_boot](const prepared_image& image,
                                                const vm_options& options) {
        say("cold boot");
        vm::async_start(executor, image, for_boot(options), done);
    };
    if (!warm.use_snapshot) return cold(image, options);
    if (!options.disks.empty()) {
        say("cold boot: data disks (--disk) are not snapshotted");
        return vm::async_start(executor, image, for_boot(options), done);
    }
    if (!options.volumes.empty()) {
        // vhost-user-fs does not migrate: no snapshot can hold such a vm.
        say("cold boot: volumes (-v) cannot be snapshotted (virtio-fs does not migrate)");
        return vm::async_start(executor, image, for_boot(options), done);
    }
    // The engine is fixed here (auto resolved once), so the snapshot, its
    // key and every restore agree: the kvm engine's snapshot is one
    // container file in the key's directory, QEMU's a directory of files.
    const bool kvm = decide_engine(options.engine).kind == backend::engine_kind::kvm;
    options.engine = kvm ? engine_choice::kvm : engine_choice::qemu;
    const std::filesystem::path complete_marker = kvm ? vm::kvm_snapshot_file : "meta";
    if (!options.kernel) {
        auto kernel = boot::default_kernel_identity();
        if (!kernel) {
            auto fetched = boot::fetch_default_kernel();
            if (!fetched) return cold(image, options); // async_start reports it
            kernel = std::move(fetched).value();
        }
        options.kernel = std::move(kernel).value();
    }
    auto agent_binary = detail::find_agent_binary();
    if (!agent_binary) return cold(image, options);
    const auto dir =
        !warm.snapshot_dir.empty()
            ? std::filesystem::absolute(warm.snapshot_dir)
            : oci::content_store::default_root() / "snapshots" /
                  warm_snapshot_key(image, options, detail::agent_identity(agent_binary.value()));
    std::error_code fs_ec;
    std::filesystem::create_directories(dir.parent_path(), fs_ec);

    // Restore `dir`: on success the run goes on in the clone.
    auto restore_then = [executor, image, options, dir,
                         say](std::function<void(supermachine::error_code, std::shared_ptr<vm>)> next) {
        const auto started = std::chrono::steady_clock::now();
        vm::async_restore(
            executor, dir, image, options,
            [dir, say, next, started](supermachine::error_code ec, std::shared_ptr<vm> v) {
                if (!ec) {
                    detail::mark_warm_snapshot_used(dir);
                    const auto ms = [](auto d) {
                        return std::to_string(
                            std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
                    };
                    say("warm start: restored from snapshot " + dir.filename().string() + " (" +
                        ms(std::chrono::steady_clock::now() - started) + " ms, engine to agent " +
                        ms(v->restore_to_agent()) + " ms)");
                }
                next(ec, std::move(v));
            });
    };
    // Cold boot (snapshottable), snapshot right after agent-ready, stop that
    // vm (its RAM file becomes the snapshot's), then restore from it: the
    // first run pays a boot and a restore, every later run a restore.
    // Holds `lock_fd` (closed once the snapshot exists or failed).
    // Only the cache's own directory is pruned, never around a --snapshot-dir.
    const bool prune_cache = warm.snapshot_dir.empty();
    auto create = [executor, image, options, dir, say, progress, done, restore_then, cold, for_boot,
                   prune_cache](int lock_fd) {
        progress("cold boot: creating the warm snapshot " + dir.filename().string());
        auto snapshottable = for_boot(options);
        snapshottable.snapshottable = true;
        // The template binds no published port: the clone that runs the
        // command does (both may live at once).
        snapshottable.publish.clear();
        vm::async_start(
            executor, image, snapshottable,
            [image, options, dir, say, progress, done, lock_fd, restore_then, cold,
             prune_cache](supermachine::error_code ec, std::shared_ptr<vm> v) {
                if (ec) {
                    ::close(lock_fd);
                    say("snapshottable boot failed (" + ec.message() + "); plain cold boot");
                    return cold(image, options);
                }
                async_snapshot_template(
                    std::move(v), dir,
                    [image, options, dir, say, progress, done, lock_fd, restore_then, cold,
                     prune_cache](supermachine::error_code ec, vm::snapshot_report report) {
                        ::close(lock_fd);
                        if (ec || !report.saved) {
                            say("snapshot not created (" + (ec ? ec.message() : report.refusal) +
                                "); plain cold boot");
                            return cold(image, options);
                        }
                        progress("snapshot created: " + dir.string() + " (state " +
                                 std::to_string(report.bytes >> 10) + " KiB, " +
                                 std::to_string(report.duration.count()) + " ms)");
                        if (prune_cache)
                            for (const auto& old :
                                 detail::prune_warm_snapshots(dir.parent_path(), dir))
                                say("removed the unused warm snapshot " + old.filename().string());
                        restore_then([image, options, say, done, cold](supermachine::error_code ec,
                                                                       std::shared_ptr<vm> v) {
                            if (!ec) return done({}, std::move(v));
                            say("restore of the new snapshot failed (" + ec.message() +
                                "); plain cold boot");
                            cold(image, options);
                        });
                    });
            });
    };
    auto restore = [image, options, dir, progress, done, create, cold, restore_then]() {
        restore_then([image, options, dir, progress, done, create, cold](supermachine::error_code ec,
                                                                         std::shared_ptr<vm> v) {
            if (!ec) return done({}, std::move(v));
            // Stale or corrupt: never trusted; rebuilt under the lock.
            const std::string detail =
                v && !v->failure_detail().empty() ? ": " + v->failure_detail() : "";
            progress("cached snapshot unusable (" + ec.message() + detail +
                     "); cold boot, rebuilding it");
            const int fd = try_creation_lock(dir);
            if (fd < 0) return cold(image, options); // another run is rebuilding it
            std::error_code ignored;
            std::filesystem::remove_all(dir, ignored);
            create(fd);
        });
    };
    if (std::filesystem::exists(dir / complete_marker, fs_ec)) return restore();
    const int fd = try_creation_lock(dir);
    if (fd < 0) return cold(image, options); // another run is creating it: do not queue
    if (std::filesystem::exists(dir / complete_marker, fs_ec)) { // made while we looked
        ::close(fd);
        return restore();
    }
    create(fd);
}

} // namespace supermachine::cli
