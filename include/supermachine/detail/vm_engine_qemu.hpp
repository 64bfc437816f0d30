#pragma once
// The QEMU engine of an image vm (vm.hpp): QEMU runs the vCPUs
// (backend/qemu.hpp) and our device cores are served to it over vhost-user:
// virtio-blk over a copy-on-write overlay of the cached rootfs (the base
// opened read-only and shared by every vm) and virtio-vsock for the agent.
// Data disks and volumes (virtio-fs, virtiofsd) are QEMU's own devices, the
// user network our slirp NAT on one end of a socketpair with QEMU's
// virtio-net on the other (detail/qemu_network.hpp).
//
// A snapshottable vm is what QEMU 7.2 can migrate: its own virtio-blk over
// a qcow2 overlay, the agent on a virtio-serial port, RAM in a file shared
// with us. Its snapshot is a directory (doc/warm-start.md): `state` (QEMU's
// device state; RAM is not in it: x-ignore-shared), `ram`, `disk.qcow2` and
// the record `meta`, written last and moved into place at once.
//
// The kvm engine (detail/vm_engine_kvm.hpp) has the same shape: the vm
// builds one of the two from the same options and drives it through
// create/restore, start, async_wait, kill, its agent channel and its
// snapshot; everything else in vm.hpp is engine-neutral.
#include <supermachine/backend/qemu.hpp>
#include <supermachine/detail/qemu_network.hpp>
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/detail/warm_snapshot.hpp>
#include <supermachine/error.hpp>
#include <supermachine/snapshot_report.hpp>
#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>
#include <supermachine/virtio/net_user.hpp>
#include <supermachine/virtio/vsock.hpp>

#include <fcntl.h>
#include <linux/fs.h> // FICLONE
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace supermachine::detail {

template <class Executor>
class basic_qemu_image_engine {
public:
    using root_disk = virtio::blk<storage::cow_file<storage::raw_file>>;

    struct config {
        std::filesystem::path kernel, initrd, rootfs;
        std::string disk_id;
        std::uint32_t memory_mib = 512;
        std::uint32_t cpus = 1;
        std::string cmdline; // the guest's whole command line (agent, root, channel)
        std::uint64_t guest_cid = 3;
        std::function<void(std::string_view)> console;
        /// The user network's NAT (run on the vm's executor); none: no network device.
        std::optional<virtio::net_user::config> network;
        std::vector<backend::qemu_data_drive> data_disks;
        std::vector<backend::qemu_shared_directory> volumes; // tags already in cmdline
        /// QEMU's own migratable devices, RAM in runtime_dir/ram (see above).
        bool snapshottable = false;
        std::filesystem::path runtime_dir; // this vm's: overlay, RAM file, sockets
        std::vector<std::string> extra_arguments;
    };

    /// Why a create or restore failed beyond its error code.
    struct failure {
        std::string why;
        bool network = false; // the NAT could not be set up (a published port taken)
    };

    /// A booting vm; nothing runs until start().
    static result<std::unique_ptr<basic_qemu_image_engine>> create(Executor executor, config c,
                                                                   failure& failed) {
        std::unique_ptr<basic_qemu_image_engine> self(new basic_qemu_image_engine());
        backend::qemu_config q;
        q.kernel = c.kernel;
        q.initrd = c.initrd;
        q.memory_bytes = std::uint64_t{c.memory_mib} << 20;
        q.vcpus = c.cpus;
        q.cmdline = c.cmdline;
        // Another virtiofsd (same options as the C one of QEMU 7.2) may be named.
        if (const char* virtiofsd = std::getenv("SUPERMACHINE_VIRTIOFSD"); virtiofsd && *virtiofsd)
            q.virtiofsd_binary = virtiofsd;
        q.data_drives = std::move(c.data_disks);
        q.shared_directories = std::move(c.volumes);
        if (c.snapshottable) {
            SUPERMACHINE_TRY(create_overlay(c.rootfs, c.runtime_dir / "disk.qcow2"));
            q.root_drive = c.runtime_dir / "disk.qcow2";
            q.memory_file = c.runtime_dir / "ram";
            q.memory_file_shared = true;
            self->serial_socket_ = c.runtime_dir / "agent.sock";
            q.agent_serial_socket = self->serial_socket_;
        } else {
            typename root_disk::config disk;
            disk.storage.base.path = c.rootfs.string();
            disk.storage.base.read_only = true; // one cached base serves every vm
            disk.id = c.disk_id;
            SUPERMACHINE_TRY(blk, root_disk::create(disk));
            self->disk_ = std::move(blk);
            virtio::vsock::config socket_config;
            socket_config.guest_cid = c.guest_cid;
            SUPERMACHINE_TRY(vsock, virtio::vsock::create(socket_config));
            self->vsock_ = std::move(vsock);
        }
        SUPERMACHINE_TRY(self->finish(executor, std::move(q), std::move(c), failed));
        return self;
    }

    /// A vm from the snapshot directory `dir` whose record `meta` the vm
    /// has already compared with its options: every file is checked against
    /// the record's fingerprints before QEMU starts (-incoming), RAM mapped
    /// privately from the snapshot (or, with `own_ram_copy`, copied into
    /// runtime_dir so the clone can be snapshotted again), the root disk's
    /// writes to a copy of the snapshot's overlay.
    static result<std::unique_ptr<basic_qemu_image_engine>>
    restore(Executor executor, config c, const std::filesystem::path& dir,
            const warm_snapshot_meta& meta, bool own_ram_copy, failure& failed) {
        auto refuse = [&failed](error_code ec, std::string why) {
            failed.why = std::move(why);
            return ec;
        };
        for (auto [name, want] :
             {std::pair{"state", meta.stream}, std::pair{"disk.qcow2", meta.devices}}) {
            const auto path = (dir / name).string();
            auto got = fingerprint_file(dir / name);
            if (!got) return refuse(errc::snapshot_truncated, path + " cannot be read");
            if (got.value().size != want.size)
                return refuse(errc::snapshot_truncated, path + " changed size since the snapshot");
            if (!(got.value() == want))
                return refuse(errc::snapshot_bad_record, path + " changed since the snapshot");
        }
        {
            const auto path = (dir / "ram").string();
            auto got = stat_fingerprint(dir / "ram");
            if (!got || got.value().size != meta.ram.size)
                return refuse(errc::snapshot_truncated, path + " is missing or changed size");
            if (!(got.value() == meta.ram))
                return refuse(errc::snapshot_bad_record, path + " changed since the snapshot");
            if (meta.ram.size != std::uint64_t{c.memory_mib} << 20)
                return refuse(errc::snapshot_mismatch, path + " is not the guest memory's size");
        }
        std::unique_ptr<basic_qemu_image_engine> self(new basic_qemu_image_engine());
        backend::qemu_config q;
        q.kernel = c.kernel;
        q.memory_bytes = std::uint64_t{c.memory_mib} << 20;
        q.vcpus = c.cpus;
        q.cmdline = c.cmdline;
        q.incoming = dir / "state";
        q.incoming_ignores_shared_memory = true;
        if (own_ram_copy) {
            // This clone's own copy of the RAM, mapped shared like a booted
            // snapshottable vm's: a later snapshot takes the file. QEMU sees
            // a shared block on both sides, so x-ignore-shared still loads
            // no pages and the copy's contents stand.
            q.memory_file = c.runtime_dir / "ram";
            q.memory_file_shared = true;
            if (auto copied = copy_file_data(dir / "ram", q.memory_file); !copied)
                return refuse(copied.error(), (dir / "ram").string() +
                                                  " could not be copied for a re-snapshottable "
                                                  "restore: " +
                                                  copied.error().message());
        } else {
            q.memory_file = dir / "ram";
            q.memory_file_shared = false; // MAP_PRIVATE: this clone's writes are its own
        }
        // The clone writes to its own copy of the snapshot's overlay (a few
        // hundred KiB; the rootfs stays its read-only backing file). QEMU's
        // own throw-away overlay (snapshot=on) would create and format a
        // temporary qcow2 at start-up: measured ≈ 3 ms more per restore.
        q.root_drive = c.runtime_dir / "disk.qcow2";
        std::error_code copy_error;
        std::filesystem::copy_file(dir / "disk.qcow2", q.root_drive, copy_error);
        if (copy_error) return errc::io_error;
        self->serial_socket_ = c.runtime_dir / "agent.sock";
        q.agent_serial_socket = self->serial_socket_;
        // A fresh NAT on a fresh socketpair (QEMU does not migrate the
        // netdev): the guest's eth0 and its configuration are in the stream.
        SUPERMACHINE_TRY(self->finish(executor, std::move(q), std::move(c), failed));
        return self;
    }

    basic_qemu_image_engine(const basic_qemu_image_engine&) = delete;
    basic_qemu_image_engine& operator=(const basic_qemu_image_engine&) = delete;

    ~basic_qemu_image_engine() {
        machine_.reset(); // reaps QEMU, then the devices it used go
        if (network_) network_->stop();
    }

    /// Attach our devices and start QEMU; on failure `diagnostics` holds
    /// what QEMU said (e.g. which helper program is missing).
    result<void> start(std::string& diagnostics) {
        if (disk_) {
            SUPERMACHINE_TRY(machine_->attach(backend::vhost_user_device_kind::blk, *disk_));
        }
        if (vsock_) {
            SUPERMACHINE_TRY(machine_->attach(backend::vhost_user_device_kind::vsock, *vsock_));
        }
        auto started = machine_->start(console_);
        if (network_) {
            network_->close_qemu_end(); // QEMU holds its own now (or failed to start)
            if (started) network_->start();
        }
        if (!started) {
            auto said = machine_->diagnostics();
            while (!said.empty() && (said.back() == '\n' || said.back() == '\r'))
                said.pop_back();
            if (said.size() > 500) said.erase(0, said.size() - 500);
            diagnostics = std::move(said);
        }
        return started;
    }

    /// void() on the vm's executor once QEMU has exited.
    void async_wait(std::function<void()> done) {
        machine_->async_wait([done = std::move(done)](error_code, int) { done(); });
    }

    void kill() noexcept { machine_->kill(); }

    /// The agent's channel: our virtio-vsock, or (snapshottable vms) null
    /// and the virtio-serial socket QEMU listens on.
    virtio::vsock* vsock() noexcept { return vsock_.get(); }
    const std::filesystem::path& serial_socket() const noexcept { return serial_socket_; }

    /// Pause the guest and save its state into the directory `staging`
    /// (QEMU's `state`; `ram` and `disk.qcow2` taken from the vm at the same
    /// pause: moved when it stops afterwards, else copied), then resume or
    /// not. void(error_code, snapshot_report) on the vm's executor.
    void async_save(const std::filesystem::path& staging, bool resume,
                    std::function<void(error_code, snapshot_report)> done) {
        machine_->set_snapshot_paused_step(
            [runtime = runtime_dir_, staging, resume]() -> result<void> {
                SUPERMACHINE_TRY(take_file(runtime / "ram", staging / "ram", resume));
                return take_file(runtime / "disk.qcow2", staging / "disk.qcow2", resume);
            });
        machine_->async_save_snapshot(staging / "state", resume, std::move(done));
    }

    /// Blocking: fsync the saved files, fingerprint them into `meta`, write
    /// the record last and move `staging` into place at `path` (replacing an
    /// older snapshot there). On failure `staging` is removed.
    static result<void> seal(const std::filesystem::path& staging,
                             const std::filesystem::path& path, warm_snapshot_meta meta) {
        auto cleanup = [&](error_code ec) -> result<void> {
            std::error_code ignored;
            std::filesystem::remove_all(staging, ignored);
            return ec;
        };
        for (const char* name : {"state", "disk.qcow2", "ram"}) {
            const int fd = ::open((staging / name).c_str(), O_RDONLY | O_CLOEXEC);
            if (fd < 0 || ::fsync(fd) != 0) {
                if (fd >= 0) ::close(fd);
                return cleanup(errc::io_error);
            }
            ::close(fd);
        }
        auto stream = fingerprint_file(staging / "state");
        auto disk = fingerprint_file(staging / "disk.qcow2");
        auto ram = stat_fingerprint(staging / "ram");
        if (!stream || !disk || !ram) return cleanup(errc::io_error);
        meta.stream = stream.value();
        meta.devices = disk.value();
        meta.ram = ram.value();
        if (auto written = write_warm_snapshot_meta(meta, staging / "meta"); !written)
            return cleanup(written.error());
        if (auto moved = replace_directory(staging, path); !moved) return cleanup(moved.error());
        return success();
    }

private:
    basic_qemu_image_engine() = default;

    // What create and restore end with alike: the NAT, then the QEMU
    // process object (nothing runs until start()).
    result<void> finish(const Executor& executor, backend::qemu_config q, config c,
                        failure& failed) {
        SUPERMACHINE_TRY(make_network(executor, q, std::move(c.network), failed));
        q.extra_arguments = std::move(c.extra_arguments);
        console_ = std::move(c.console);
        runtime_dir_ = std::move(c.runtime_dir);
        machine_ = std::make_unique<backend::qemu_machine>(executor, std::move(q));
        return success();
    }

    // Our slirp NAT on one end of a socketpair, QEMU's virtio-net on the other.
    result<void> make_network(const Executor& executor, backend::qemu_config& q,
                              std::optional<virtio::net_user::config> wanted, failure& failed) {
        if (!wanted) return success();
        wanted->slirp.executor = executor;
        const std::string mac = wanted->guest_mac;
        auto made = qemu_network::create(std::move(*wanted));
        if (!made) {
            failed.network = true;
            return made.error();
        }
        network_ = std::move(made).value();
        q.network_socket = network_->qemu_end();
        q.network_mac = mac;
        return success();
    }

    /// A qcow2 overlay over the read-only cached rootfs (QEMU's own blk
    /// writes into it; the base is never written).
    static result<void> create_overlay(const std::filesystem::path& base,
                                       const std::filesystem::path& overlay) {
        auto qemu_img = backend::detail::find_program("qemu-img");
        if (!qemu_img) return errc::engine_unavailable;
        SUPERMACHINE_TRY(backend::detail::capture_output(
            {qemu_img->string(), "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
             std::filesystem::absolute(base).string(), overlay.string()}));
        return success();
    }

    /// Copy `from` to `to` as cheaply as the filesystem allows: a reflink
    /// (FICLONE: shared blocks, copy-on-write, cost per extent) where both
    /// are on one btrfs/XFS, else only the data, keeping holes (a RAM file is
    /// mostly holes). `to` is replaced, never written in place: a stale file
    /// there may still be mapped by a gone vm.
    static result<void> copy_file_data(const std::filesystem::path& from,
                                       const std::filesystem::path& to) {
        const unique_fd in(::open(from.c_str(), O_RDONLY | O_CLOEXEC));
        if (!in) return errno_code(errno);
        ::unlink(to.c_str());
        const unique_fd out(::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
        if (!out) return errno_code(errno);
        if (::ioctl(out.get(), FICLONE, in.get()) == 0) return success();
        // EOPNOTSUPP (ext4, tmpfs), EXDEV (another filesystem), …: the data.
        struct stat st {};
        bool ok = ::fstat(in.get(), &st) == 0 && ::ftruncate(out.get(), st.st_size) == 0;
        for (off_t data = 0; ok;) {
            data = ::lseek(in.get(), data, SEEK_DATA);
            if (data < 0) break; // ENXIO: no data after this point
            off_t hole = ::lseek(in.get(), data, SEEK_HOLE);
            if (hole < 0) hole = st.st_size;
            for (off_t position = data; ok && position < hole;) {
                off_t out_position = position;
                const ssize_t n = ::copy_file_range(in.get(), &position, out.get(), &out_position,
                                                    static_cast<std::size_t>(hole - position), 0);
                ok = n > 0;
            }
            data = hole;
        }
        const int e = errno;
        return ok ? success() : result<void>(errno_code(e ? e : EIO));
    }

    /// Take a file of the running vm into the snapshot: moved when the vm
    /// stops afterwards, else copied.
    static result<void> take_file(const std::filesystem::path& from,
                                  const std::filesystem::path& to, bool copy) {
        if (!copy && ::rename(from.c_str(), to.c_str()) == 0) return success();
        return copy_file_data(from, to);
    }

    // Destroyed in reverse order: QEMU before the NAT and the devices it uses.
    std::unique_ptr<root_disk> disk_;
    std::unique_ptr<virtio::vsock> vsock_;
    std::shared_ptr<qemu_network> network_;
    std::unique_ptr<backend::qemu_machine> machine_;
    std::function<void(std::string_view)> console_;
    std::filesystem::path serial_socket_;
    std::filesystem::path runtime_dir_;
};

} // namespace supermachine::detail
