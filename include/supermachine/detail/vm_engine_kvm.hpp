#pragma once
// The kvm engine of an image vm (vm.hpp): basic_machine on backend::kvm in
// this process, with the image's devices as compile-time policies: the
// 16550 console, the i8042 reset line, ACPI power-off, virtio-blk over a
// copy-on-write overlay of the cached rootfs (the base is opened read-only
// and shared by every vm), up to eight data disks (virtio-blk on the files
// themselves), virtio-vsock for the agent channel, virtio-rng
// and, on the user network, virtio-net on our slirp NAT (virtio/net_user.hpp;
// the slot stays empty with --network none). No other process runs.
//
// The device cores serve their queues on a private io_context thread, not
// on the vm's executor: a caller blocking its own executor can never stall
// the guest's disk, and the machine's teardown does not depend on the
// caller's io_context still running.
#include <supermachine/backend/kvm.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/error.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/snapshot/records.hpp>
#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/net.hpp>
#include <supermachine/virtio/net_user.hpp>
#include <supermachine/virtio/rng.hpp>
#include <supermachine/virtio/vsock.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace supermachine::detail {

// A template (on the vm's executor, which it does not otherwise use) so that
// basic_machine<kvm, ...> is compiled only where a vm is, not wherever
// vm.hpp is included.
template <class Executor>
class basic_kvm_image_engine {
public:
    using root_disk = virtio::blk<storage::cow_file<storage::raw_file>>;
    using data_disk = virtio::blk<storage::raw_file>; // the file itself, no overlay
    // Eight data-disk slots (vm.hpp's max_data_disks) after the others, so
    // the guest names them /dev/vdb... in order; unused ones stay empty.
    using machine =
        basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power, root_disk,
                      virtio::vsock, virtio::rng, virtio::net<virtio::net_user>, data_disk,
                      data_disk, data_disk, data_disk, data_disk, data_disk, data_disk, data_disk>;
    static constexpr std::size_t vsock_slot = 4;
    static constexpr std::size_t network_slot = 6;
    static constexpr std::size_t first_data_disk_slot = 7;
    static constexpr std::size_t data_disk_slots = 8;

    struct data_disk_file {
        std::filesystem::path path;
        bool read_only = false;
    };

    struct config {
        std::filesystem::path kernel, initrd, rootfs;
        std::string disk_id;
        std::uint32_t memory_mib = 512;
        std::uint32_t cpus = 1;
        std::string cmdline; // the image vm's (agent, root, channel), after the machine's own
        std::uint64_t guest_cid = 3;
        std::function<void(std::string_view)> console; // from vCPU threads
        /// The user network's NAT (its executor is the engine's; ignored
        /// here); none: no network device at all.
        std::optional<virtio::net_user::config> network;
        std::vector<data_disk_file> data_disks; // at most data_disk_slots
    };

    static result<std::unique_ptr<basic_kvm_image_engine>> create(config c) {
        if (c.data_disks.size() > data_disk_slots) return errc::out_of_resources;
        std::unique_ptr<basic_kvm_image_engine> self(new basic_kvm_image_engine());
        auto cfg = self->machine_config(std::move(c));
        SUPERMACHINE_TRY(made, machine::create(self->io_.get_executor(), std::move(cfg)));
        self->machine_ = std::move(made);
        return self;
    }

    /// A machine from a warm snapshot file (snapshot/container.hpp): read and
    /// validated as hostile input, RAM mapped MAP_PRIVATE (clones share the
    /// file, restore cost follows pages touched), the root disk's overlay
    /// chunks from its device record, vsock TRANSPORT_RESET by the restore.
    /// The file must carry the agent record and the kernel command line `c`
    /// would boot; `token` receives the agent's token. Nothing runs until start().
    static result<std::unique_ptr<basic_kvm_image_engine>>
    restore(config c, const std::filesystem::path& file, std::string& token, std::string* why) {
        auto refuse = [why](error_code ec, std::string text) {
            if (why) *why = std::move(text);
            return ec;
        };
        auto loaded = snapshot::read_snapshot(file);
        if (!loaded)
            return refuse(loaded.error(),
                          file.string() + " is not a valid snapshot: " + loaded.error().message());
        const auto& records = loaded.value().records;
        if (!records.agent || records.agent->token.empty())
            return refuse(errc::snapshot_bad_record, file.string() + " has no agent record");
        // (The machine's own fragments surround it: devices, backend workarounds.)
        if (records.machine.kernel_identity.find(c.cmdline) == std::string::npos)
            return refuse(errc::snapshot_mismatch,
                          "the snapshot's kernel command line differs from this vm's");
        token.assign(reinterpret_cast<const char*>(records.agent->token.data()),
                     records.agent->token.size());
        std::unique_ptr<basic_kvm_image_engine> self(new basic_kvm_image_engine());
        auto cfg = self->machine_config(std::move(c));
        auto made =
            machine::restore(self->io_.get_executor(), std::move(cfg), std::move(loaded).value());
        if (!made)
            return refuse(made.error(), "the kvm engine could not restore " + file.string() + ": " +
                                            made.error().message());
        self->machine_ = std::move(made).value();
        return self;
    }

    /// Pause, write the machine with `agent` into `file` (atomically:
    /// temp file, fsync, rename), then resume or stop. A restored machine
    /// is captured the same way (its RAM read through its private mapping).
    /// Blocking: not on a vCPU thread. The file's size.
    result<std::uint64_t> snapshot(const std::filesystem::path& file, snapshot::agent_record agent,
                                   after_snapshot then) {
        SUPERMACHINE_TRY(image, machine_->pause_and_capture());
        image.records.agent = std::move(agent);
        auto written = snapshot::write_snapshot(file, image);
        machine_->resume_after_capture(then);
        if (!written) return written.error();
        return written.value().file_size;
    }

    basic_kvm_image_engine(const basic_kvm_image_engine&) = delete;
    basic_kvm_image_engine& operator=(const basic_kvm_image_engine&) = delete;

    ~basic_kvm_image_engine() {
        machine_.reset(); // stops and joins the vCPUs, then the devices go
        work_.reset();
        // The NAT closes on its strand (sockets, timers): let that run out
        // rather than destroy its handlers inside io_context's destructor.
        if (ran_out_.wait_for(std::chrono::seconds(2)) != std::future_status::ready) io_.stop();
        if (thread_.joinable()) thread_.join();
    }

    result<void> start() { return machine_->start(); }

    /// void(machine_exit), on the engine's own thread.
    void async_wait(std::function<void(machine_exit)> done) {
        machine_->async_wait([done = std::move(done)](machine_exit e) { done(std::move(e)); });
    }

    void kill() noexcept { machine_->stop(); }

    virtio::vsock& vsock() noexcept { return machine_->template device_at<vsock_slot>()->core(); }

private:
    machine::config machine_config(config c) {
        machine::config cfg;
        cfg.memory_mib = c.memory_mib;
        cfg.vcpus = c.cpus;
        cfg.kernel_path = c.kernel.string();
        cfg.initrd_path = c.initrd.string();
        cfg.extra_cmdline = std::move(c.cmdline);
        if (const char* device = std::getenv("SUPERMACHINE_KVM_DEVICE"); device && *device)
            cfg.backend.device_path = device;
        std::get<0>(cfg.devices).sink = std::move(c.console);
        auto& disk = std::get<3>(cfg.devices);
        disk.storage.base.path = c.rootfs.string();
        disk.storage.base.read_only = true; // one cached base serves every vm
        disk.id = std::move(c.disk_id);
        std::get<vsock_slot>(cfg.devices).guest_cid = c.guest_cid;
        auto& network = std::get<network_slot>(cfg.devices);
        network.attached = c.network.has_value();
        if (c.network) {
            network.backend = std::move(*c.network);
            network.backend.slirp.executor = io_.get_executor();
            // No link flap on restore: the NAT announces the guest itself
            // (net_user.hpp) and keeps the gateway's MAC, so the guest has
            // nothing to re-learn, and a command connecting at once (the
            // agent answers in milliseconds on hardware) would otherwise
            // lose its SYN to a down link and wait a retransmission.
            network.restore_link_flap = std::chrono::milliseconds(0);
        }
        attach_data_disks(cfg, c.data_disks, std::make_index_sequence<data_disk_slots>());
        return cfg;
    }

    template <std::size_t... I>
    static void attach_data_disks(typename machine::config& cfg,
                                  const std::vector<data_disk_file>& disks,
                                  std::index_sequence<I...>) {
        auto one = [&disks](typename data_disk::config& slot, std::size_t i) {
            slot.attached = i < disks.size();
            if (!slot.attached) return;
            slot.storage.path = disks[i].path.string();
            slot.storage.read_only = disks[i].read_only;
            slot.io_threads = 1;
        };
        (one(std::get<first_data_disk_slot + I>(cfg.devices), I), ...);
    }

    basic_kvm_image_engine()
        : work_(boost::asio::make_work_guard(io_))
        , ran_out_(ran_out_promise_.get_future())
        , thread_([this] {
            io_.run();
            ran_out_promise_.set_value();
        }) {}

    boost::asio::io_context io_;
    boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
    std::promise<void> ran_out_promise_;
    std::future<void> ran_out_;
    std::thread thread_;
    std::unique_ptr<machine> machine_;
};

} // namespace supermachine::detail
