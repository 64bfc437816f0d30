#pragma once
// A running microVM of an image, and the commands run in it.
//
//   boost::asio::io_context io;
//   auto ready = supermachine::image::from_oci("oci:/images:busybox").prepare().value();
//   supermachine::vm::async_start(io.get_executor(), ready, {},
//       [](error_code ec, std::shared_ptr<supermachine::vm> vm) {
//           vm->async_exec({.argv = {"echo", "hi"}}, [vm](error_code,
//           supermachine::agent::exec_output out) {});
//       });
//   io.run();
//
// What runs where: the engine runs the vCPUs (vm_options::engine: the kvm
// engine, basic_machine in this process, where the host's KVM runs Linux;
// else QEMU, see doc/engines.md); this process serves the root disk
// (virtio-blk, a copy-on-write overlay in memory over the image's cached
// ext4, so the base is never written) and virtio-vsock (and, on kvm,
// virtio-rng, the serial console and ACPI power-off); the guest agent (/init of our initramfs)
// mounts the disk and serves exec/file/TCP requests over vsock, authenticated by a per-VM token
// passed on the kernel command line.
//
// Every async operation takes an Asio completion token and completes on the
// vm's executor. Blocking set-up work (reading the kernel modules, writing
// the initramfs) runs on a small private thread pool, not the caller's executor.
#include <supermachine/agent/client.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/detail/agent_initramfs.hpp>
#include <supermachine/detail/runtime_directory.hpp>
#include <supermachine/detail/trace.hpp>
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/detail/vm_engine_kvm.hpp>
#include <supermachine/detail/vm_engine_qemu.hpp>
#include <supermachine/detail/warm_snapshot.hpp>
#include <supermachine/detail/warm_snapshot_contents.hpp>
#include <supermachine/engine.hpp>
#include <supermachine/error.hpp>
#include <supermachine/network.hpp>
#include <supermachine/prepared_image.hpp>
#include <supermachine/shared_directory.hpp>
#include <supermachine/snapshot_report.hpp>
#include <supermachine/virtio/net_user.hpp>
#include <supermachine/virtio/vsock.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace supermachine {

/// A data disk (docker has none; `run --disk FILE[:ro]`, `boot --disk ROOT
/// --disk DATA[,ro] -- CMD`): the guest sees it as /dev/vdb, /dev/vdc, ...
/// in order, in its /dev too. Writes go to the file itself unless read_only.
struct data_disk {
    std::filesystem::path path;
    bool read_only = false;
};
inline constexpr std::size_t max_data_disks = 8;

struct vm_options {
    // Not an aggregate on purpose (a declared constructor): GCC 12
    // miscompiles an aggregate temporary built inside a co_await expression
    // (`co_await vm::async_start(ex, image, {}, use_awaitable)` copies it
    // bitwise and frees its strings twice); a class with a constructor is
    // built correctly (doc/embedding.md, "GCC 12").
    vm_options() = default;

    std::uint32_t memory_mib = 512;
    std::uint32_t cpus = 1;
    /// kvm: basic_machine on backend::kvm in this process (no QEMU);
    /// qemu: QEMU runs the vCPUs; automatic: kvm where the host's KVM runs
    /// Linux, else qemu (decide_engine, engine.hpp).
    engine_choice engine = engine_choice::automatic;
    /// The guest kernel; default: boot::default_kernel(), fetched on first use.
    std::optional<boot::kernel_files> kernel;
    /// Guest console lines (kernel + agent). Default: kept only as a tail
    /// for error messages (console_tail()).
    std::function<void(std::string_view)> console;
    std::chrono::milliseconds ready_timeout{120'000};
    std::vector<std::string> extra_cmdline;
    /// Directory for sockets and the initramfs; default: a fresh one in /tmp.
    std::filesystem::path runtime_dir;
    /// QEMU engine: boot so that the vm can be snapshotted (doc/warm-start.md):
    /// guest RAM in a file under runtime_dir, QEMU's own virtio-blk over a
    /// qcow2 overlay of the rootfs, the agent on a virtio-serial port. Needs
    /// qemu-img. async_restore always runs this way.
    bool snapshottable = false;
    /// async_restore: copy the snapshot's RAM file into runtime_dir (a
    /// reflink where the filesystem has them, else a sparse copy of its data)
    /// and let QEMU map that copy shared, so this restored vm can itself be
    /// snapshotted again (doc/warm-start.md, "Re-snapshots"). Without it the
    /// restore maps the snapshot's RAM privately (copy-on-write: no copy, the
    /// fastest restore) and async_snapshot refuses. The snapshot's files are
    /// never changed either way.
    bool snapshottable_after_restore = false;
    /// Host directories mounted in the guest (docker -v; doc/vm.md,
    /// "Volumes"), at most max_shared_directories. A vm with volumes cannot
    /// be snapshottable (virtio-fs does not migrate) nor restored.
    std::vector<shared_directory> volumes;
    /// Data disks after the root disk (at most max_data_disks). Like
    /// volumes, a vm with them cannot be snapshottable nor restored.
    std::vector<data_disk> disks;
    /// The guest network (doc/vm.md, "Network"): docker's default, a
    /// user-mode NAT (eth0 10.0.2.15/24), or none (no device). Part of the
    /// kernel command line, so of a warm snapshot's identity.
    network_mode network = network_mode::user;
    /// docker's -p on the user network: host ports forwarded to the guest.
    /// (expose_tcp() forwards over the agent channel instead, any network.)
    std::vector<published_port> publish;
    /// docker's --add-host: /etc/hosts lines, written with the hostname
    /// (async_set_hostname). A "host-gateway" entry is what lets the guest
    /// reach the host's loopback (10.0.2.2); without one it cannot.
    std::vector<extra_host> add_hosts;
    /// The resolver the guest's DNS (10.0.2.3) forwards to, "IP:PORT";
    /// default: $SUPERMACHINE_DNS_UPSTREAM, else the host's resolv.conf
    /// nameserver (libslirp's own forwarding).
    std::string dns_upstream;
    /// Appended to the engine's command line as they are (QEMU: e.g. its
    /// own devices beside ours, for benchmarks). Cold boots only.
    std::vector<std::string> engine_arguments;
};

/// What the caller still chooses when a vm starts from a snapshot directory
/// alone; the rest (image, memory, vCPUs, kernel, command line) is the
/// snapshot's. Fields as in vm_options.
struct snapshot_start_options {
    snapshot_start_options() = default; // not an aggregate: see vm_options

    std::function<void(std::string_view)> console;
    std::chrono::milliseconds ready_timeout{120'000};
    std::filesystem::path runtime_dir;
    /// The content store the snapshot's image was prepared in.
    std::filesystem::path cache_dir = oci::content_store::default_root();
    /// As vm_options::snapshottable_after_restore: the restored vm can be
    /// snapshotted again (its RAM a copy of the snapshot's, mapped shared).
    bool snapshottable_after_restore = false;
};

template <class Executor = boost::asio::any_io_executor>
class basic_vm : public std::enable_shared_from_this<basic_vm<Executor>> {
public:
    using executor_type = Executor;
    using socket_type = boost::asio::local::stream_protocol::socket;
    using client_type = agent::basic_client<socket_type>;
    using kvm_engine = detail::basic_kvm_image_engine<Executor>;
    using qemu_engine = detail::basic_qemu_image_engine<Executor>;
    static_assert(kvm_engine::data_disk_slots == max_data_disks);

    static constexpr std::uint32_t agent_port = detail::kvm_agent_port;
    static constexpr std::uint64_t guest_cid = 3;
    /// A kvm engine snapshot directory holds this one container file.
    static constexpr const char* kvm_snapshot_file = "machine.snap";

    ~basic_vm() {
        detail::trace_point("vm teardown");
        kill();
        client_.reset();
        qemu_.reset(); // reaps QEMU, then its devices go
        kvm_.reset();  // joins the vCPUs, then its devices go
        detail::trace_point("engine reaped");
        if (owns_runtime_dir_) { // sockets, initramfs and (snapshottable) the RAM file
            std::error_code ignored;
            std::filesystem::remove_all(options_.runtime_dir, ignored);
        }
        detail::trace_point("vm gone");
    }

    /// Boot `image` and wait until its agent answers. Completes with
    /// void(error_code, std::shared_ptr<vm>); on error the vm is already
    /// stopped and is given only for console_tail().
    template <class Token>
    static auto async_start(executor_type executor, prepared_image image, vm_options options,
                            Token&& token) {
        return boost::asio::async_initiate<Token, void(error_code, std::shared_ptr<basic_vm>)>(
            [executor](auto handler, prepared_image image, vm_options options) {
                start_new(executor, std::move(options), std::nullopt, std::move(handler),
                          [image = std::move(image)](basic_vm& v) { return v.prepare(image); });
            },
            token, std::move(image), std::move(options));
    }

    /// The same on an execution context (an io_context&), as Asio's I/O
    /// objects accept either.
    template <class ExecutionContext, class Token>
        requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
    static auto async_start(ExecutionContext& context, prepared_image image, vm_options options,
                            Token&& token) {
        return async_start(executor_type(context.get_executor()), std::move(image),
                           std::move(options), std::forward<Token>(token));
    }

    /// The same with default vm_options.
    template <class Token>
        requires(!std::is_convertible_v<Token, const vm_options&>)
    static auto async_start(executor_type executor, prepared_image image, Token&& token) {
        return async_start(std::move(executor), std::move(image), vm_options(),
                           std::forward<Token>(token));
    }
    template <class ExecutionContext, class Token>
        requires(std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&> &&
                 !std::is_convertible_v<Token, const vm_options&>)
    static auto async_start(ExecutionContext& context, prepared_image image, Token&& token) {
        return async_start(executor_type(context.get_executor()), std::move(image), vm_options(),
                           std::forward<Token>(token));
    }

    executor_type get_executor() const noexcept { return executor_; }

    /// Stop the guest gracefully: the agent syncs and powers the VM off; if
    /// the engine still runs after `grace`, it is killed. Completes with
    /// void(error_code) once the engine has exited (at once if it had).
    template <class Token>
    auto async_stop(std::chrono::steady_clock::duration grace, Token&& token) {
        return boost::asio::async_initiate<Token, void(error_code)>(
            [self = this->shared_from_this(), grace](auto handler) {
                auto done = agent::detail::bind_completion<void(error_code)>(std::move(handler),
                                                                             self->executor_);
                boost::asio::post(self->executor_, [self, grace, done = std::move(done)]() mutable {
                    self->begin_stop(grace, std::move(done));
                });
            },
            token);
    }
    template <class Token>
    auto async_stop(Token&& token) {
        return async_stop(std::chrono::seconds(10), std::forward<Token>(token));
    }

    /// The agent client, for what the wrappers below do not cover.
    client_type& agent() noexcept { return *client_; }

    /// Run a command to completion, collecting its output:
    /// void(error_code, agent::exec_output).
    template <class Token>
    auto async_exec(agent::exec_request request, Token&& token) {
        return client_->async_exec(std::move(request), std::forward<Token>(token));
    }

    /// The same for a plain argument list: `vm.async_exec({"echo", "hi"}, token)`.
    /// Cancellable: a cancelled exec kills its process and completes with
    /// errc::cancelled (== asio::error::operation_aborted); the vm stays usable.
    template <class Token>
    auto async_exec(agent::command argv, Token&& token) {
        return client_->async_exec(std::move(argv), std::forward<Token>(token));
    }

    /// Start a command and stream it: void(error_code, agent::exec_child<socket_type>).
    template <class Token>
    auto async_spawn(agent::exec_request request, Token&& token) {
        return client_->async_spawn(std::move(request), std::forward<Token>(token));
    }

    template <class Token>
    auto async_read_file(std::string path, std::uint64_t max_bytes, Token&& token) {
        return client_->async_read_file(std::move(path), max_bytes, std::forward<Token>(token));
    }

    template <class Token>
    auto async_write_file(std::string path, std::string data, std::uint32_t mode, Token&& token) {
        return client_->async_write_file(std::move(path), std::move(data), mode,
                                         std::forward<Token>(token));
    }

    /// The guest's hostname (sethostname, /etc/hostname, /etc/hosts) and
    /// vm_options::add_hosts's lines in /etc/hosts: void(error_code).
    template <class Token>
    auto async_set_hostname(std::string name, Token&& token) {
        if (!options_.add_hosts.empty()) name += "\n" + extra_hosts_lines(options_.add_hosts);
        return client_->async_set_hostname(std::move(name), std::forward<Token>(token));
    }

    /// Listen on address:host_port (0: any free port); each connection is
    /// forwarded to guest_port inside the guest through the agent (no guest
    /// network needed). Returns the bound host port.
    result<std::uint16_t> expose_tcp(std::uint16_t host_port, std::uint16_t guest_port,
                                     const std::string& address = "127.0.0.1") {
        namespace ip = boost::asio::ip;
        auto acceptor = std::make_shared<ip::tcp::acceptor>(executor_);
        boost::system::error_code ec;
        const auto bind_address = ip::make_address_v4(address, ec);
        if (ec) return errc::invalid_argument;
        const ip::tcp::endpoint endpoint(bind_address, host_port);
        acceptor->open(endpoint.protocol(), ec);
        if (!ec) acceptor->set_option(ip::tcp::acceptor::reuse_address(true), ec);
        if (!ec) acceptor->bind(endpoint, ec);
        if (!ec) acceptor->listen(64, ec);
        if (ec) return error_code(ec.value(), boost::system::system_category());
        const auto port = acceptor->local_endpoint().port();
        listeners_.push_back(acceptor);
        accept_forward(acceptor, guest_port);
        return port;
    }

    /// Stop the guest at once (the overlay is in memory: nothing to flush).
    void kill() noexcept {
        if (client_) client_->close();
        for (auto& l : listeners_) {
            boost::system::error_code ignored;
            l->close(ignored);
        }
        if (qemu_) qemu_->kill();
        if (kvm_) kvm_->kill();
    }

    /// The guest's last console lines, for error messages. A kernel panic's
    /// first line is kept even when its backtrace pushed it out of the last
    /// 40 (the backtrace's length varies); a last line without its newline
    /// yet is included.
    std::string console_tail() const {
        std::lock_guard lock(console_mutex_);
        std::string out;
        if (!panic_line_.empty() && std::find(console_lines_.begin(), console_lines_.end(),
                                              panic_line_) == console_lines_.end())
            out += panic_line_ + "\n...\n";
        for (const auto& line : console_lines_)
            out += line + "\n";
        if (!partial_line_.empty()) out += partial_line_ + "\n";
        return out;
    }

    /// Which engine runs this VM, and why (for one line on stderr).
    const std::string& engine_description() const noexcept { return engine_description_; }

    // ------------------------------------------------------------ snapshots
    // (doc/warm-start.md) Only a vm started with vm_options::snapshottable
    // can be snapshotted: its RAM is a file, its root disk QEMU's own
    // virtio-blk over a qcow2 overlay, its agent on a virtio-serial port (the
    // vhost-user devices of a plain vm are not migratable by QEMU 7.2).
    // A snapshot is a directory: `state` (QEMU's device state; RAM is not in
    // it: x-ignore-shared), `ram` (the guest RAM file), `disk.qcow2` (the
    // root disk's writes over the cached rootfs) and a validated record
    // `meta` written last. It appears atomically (rename).
    // A restore maps `ram` privately (copy-on-write, faulted in lazily), so
    // many clones share one snapshot and restore cost follows pages touched;
    // with snapshottable_after_restore it copies `ram` instead and the clone
    // can be snapshotted again (chains of any length).
    // On the kvm engine every vm can be snapshotted, restored ones too, with
    // or without resume, and the directory holds one container file
    // (start_snapshot_kvm); `snapshottable` changes nothing there.

    using snapshot_report = supermachine::snapshot_report;

    /// Pause the guest and write a snapshot directory at `path` (replacing
    /// one there). The agent connection is closed first (the saved guest
    /// waits for a new host) and reopened when `resume`; without `resume`
    /// the vm is stopped afterwards (its RAM file moved into the snapshot).
    /// Completion: void(error_code, snapshot_report); a vm that is not
    /// snapshottable (or was restored without snapshottable_after_restore)
    /// gives report.saved == false and report.refusal why.
    template <class Token>
    auto async_snapshot(std::filesystem::path path, bool resume, Token&& token) {
        return boost::asio::async_initiate<Token, void(error_code, snapshot_report)>(
            [this](auto handler, std::filesystem::path path, bool resume) {
                auto done = std::make_shared<decltype(handler)>(std::move(handler));
                auto self = this->shared_from_this();
                start_snapshot(std::move(path), resume,
                               [done](error_code ec, snapshot_report report) {
                                   std::move (*done)(ec, std::move(report));
                               });
            },
            token, std::move(path), resume);
    }

    /// Start a vm from a snapshot directory written by async_snapshot for
    /// `image` with the same memory, cpus, kernel and agent; anything else
    /// (or a truncated/corrupted file) fails with an errc::snapshot_* code
    /// before the engine starts; a state QEMU cannot load ends the engine
    /// (errc::agent_unavailable). After the restore the agent is reconnected
    /// with the saved token, the guest RNG reseeded with fresh host bytes
    /// (clones never share random state) and the guest clock set to the
    /// host's. Completion: void(error_code, std::shared_ptr<vm>).
    template <class Token>
    static auto async_restore(executor_type executor, std::filesystem::path snapshot,
                              prepared_image image, vm_options options, Token&& token) {
        return boost::asio::async_initiate<Token, void(error_code, std::shared_ptr<basic_vm>)>(
            [executor](auto handler, std::filesystem::path snapshot, prepared_image image,
                       vm_options options) {
                options.snapshottable = true;
                start_new(
                    executor, std::move(options), std::move(snapshot), std::move(handler),
                    [image = std::move(image)](basic_vm& v) { return v.prepare_restore(image); });
            },
            token, std::move(snapshot), std::move(image), std::move(options));
    }

    /// Start a vm from a snapshot directory alone: its record names the
    /// image (found by digest in options.cache_dir's content store, with its
    /// root filesystem), the memory size, vCPU count, kernel release (found
    /// in the kernel cache) and command line it was taken with; then as the
    /// overload above. An image, root filesystem or kernel that is not there
    /// fails with errc::not_found / errc::kernel_not_found before the engine
    /// starts, a bad record with its errc::snapshot_* code; failure_detail()
    /// on the vm given to the handler says which in one sentence.
    /// Completion: void(error_code, std::shared_ptr<vm>).
    template <class Token>
    static auto async_restore(executor_type executor, std::filesystem::path snapshot,
                              snapshot_start_options options, Token&& token) {
        return boost::asio::async_initiate<Token, void(error_code, std::shared_ptr<basic_vm>)>(
            [executor](auto handler, std::filesystem::path snapshot,
                       snapshot_start_options options) {
                vm_options vm_opts;
                vm_opts.console = std::move(options.console);
                vm_opts.ready_timeout = options.ready_timeout;
                vm_opts.runtime_dir = std::move(options.runtime_dir);
                vm_opts.snapshottable = true;
                vm_opts.snapshottable_after_restore = options.snapshottable_after_restore;
                start_new(executor, std::move(vm_opts), std::move(snapshot), std::move(handler),
                          [cache_dir = options.cache_dir](basic_vm& v) {
                              return v.prepare_restore_from_directory(cache_dir);
                          });
            },
            token, std::move(snapshot), std::move(options));
    }

    /// After a failed start or restore: one sentence saying what was wrong
    /// beyond the error code (which field of a snapshot did not match, which
    /// image or kernel is missing); empty when there is nothing to add.
    const std::string& failure_detail() const noexcept { return failure_detail_; }

    /// The options this vm runs with (after a restore from a directory alone:
    /// the snapshot's memory, vCPUs, kernel).
    const vm_options& options() const noexcept { return options_; }

    /// Whether this vm was restored from a snapshot (rather than booted).
    bool restored() const noexcept { return restore_from_.has_value(); }

    /// Restored vms: from starting the engine to the agent's hello_ok (the
    /// restore itself), and the whole async_restore (validation included).
    std::chrono::steady_clock::duration restore_to_agent() const noexcept {
        return agent_ready_at_ - launched_at_;
    }

private:
    basic_vm(executor_type executor, vm_options options)
        : executor_(std::move(executor))
        , options_(std::move(options))
        , timer_(executor_)
        , serial_timer_(executor_)
        , snapshot_timer_(executor_)
        , stop_timer_(executor_) {}

    static boost::asio::thread_pool& setup_pool() {
        static boost::asio::thread_pool pool(1);
        return pool;
    }

    // A new vm (restored from `restore_from` when set) whose start completes
    // through the initiating function's `handler`; `set_up` runs off the
    // caller's executor (it reads and writes files).
    template <class Handler, class SetUp>
    static void start_new(executor_type executor, vm_options options,
                          std::optional<std::filesystem::path> restore_from, Handler handler,
                          SetUp set_up) {
        auto self = std::shared_ptr<basic_vm>(new basic_vm(executor, std::move(options)));
        self->restore_from_ = std::move(restore_from);
        // Cancellation (any type) ends the start at once with errc::cancelled
        // (operation_aborted): the engine, if it runs, is killed; a set-up
        // still running on setup_pool() finishes and launches nothing.
        auto slot = boost::asio::get_associated_cancellation_slot(handler);
        auto done = std::make_shared<Handler>(std::move(handler));
        self->start_ = [done, slot](error_code ec, std::shared_ptr<basic_vm> v) mutable {
            if (slot.is_connected()) slot.clear();
            (*done)(ec, std::move(v));
        };
        if (slot.is_connected())
            slot.assign([weak = std::weak_ptr<basic_vm>(self),
                         executor](boost::asio::cancellation_type) {
                boost::asio::post(executor, [weak] {
                    if (auto self = weak.lock(); self && self->start_)
                        self->finish_start(errc::cancelled);
                });
            });
        set_up_then_launch(std::move(self), std::move(set_up));
    }

    // Run `set_up(vm&) -> result<void>` on setup_pool(), then launch (or fail
    // the start) on the vm's executor. A work guard keeps the caller's
    // executor running meanwhile. Everything the pool's job holds (the vm,
    // the guard) moves into the completion: once that has run the caller may
    // destroy its io_context while the pool thread is still unwinding, so
    // nothing tied to it may be released there.
    template <class SetUp>
    static void set_up_then_launch(std::shared_ptr<basic_vm> self, SetUp set_up) {
        auto work = boost::asio::make_work_guard(self->executor_);
        self->setting_up_ = true;
        boost::asio::post(setup_pool(), [self = std::move(self), work = std::move(work),
                                         set_up = std::move(set_up)]() mutable {
            detail::trace_point("vm set-up");
            auto prepared = set_up(*self);
            detail::trace_point("vm set-up done");
            auto executor = self->executor_;
            boost::asio::dispatch(executor,
                                  [self = std::move(self), prepared, work = std::move(work)] {
                                      self->setting_up_ = false;
                                      if (!self->start_) return; // cancelled meanwhile
                                      if (!prepared) return self->finish_start(prepared.error());
                                      self->launch();
                                  });
        });
    }

    // The engine (engine.hpp: kvm where the host's KVM runs Linux), then the
    // kernel: the caller's, else the cached default (fetched on first use
    // when allowed).
    result<void> select_engine_and_kernel(bool may_fetch_kernel, std::string_view suffix) {
        auto decision = decide_engine(options_.engine);
        // What the kvm engine does not serve yet: auto keeps such vms on
        // qemu; an explicit kvm is refused (prepare says which).
        if (decision.kind == backend::engine_kind::kvm &&
            options_.engine == engine_choice::automatic) {
            if (!options_.volumes.empty())
                decision = {backend::engine_kind::qemu, "volumes are served on the qemu engine"};
        }
        kind_ = decision.kind;
        engine_description_ = std::string(kind_ == backend::engine_kind::kvm ? "kvm" : "qemu") +
                              " (" + decision.reason + ")" + std::string(suffix);
        if (!options_.kernel) {
            auto kernel = boot::default_kernel();
            if (!kernel && may_fetch_kernel) kernel = boot::fetch_default_kernel();
            if (!kernel) return kernel.error();
            options_.kernel = std::move(kernel).value();
        }
        return success();
    }

    // Volumes: bounded, valid, resolved (validate_shared_directory), and
    // never with a snapshot (vhost-user-fs has no migration support).
    result<void> check_volumes() {
        if (options_.volumes.empty()) return success();
        if (options_.snapshottable)
            return refuse(errc::invalid_argument,
                          "a vm with volumes cannot be snapshottable (virtio-fs does not migrate)");
        if (options_.volumes.size() > max_shared_directories)
            return refuse(errc::invalid_argument,
                          "more than " + std::to_string(max_shared_directories) + " volumes");
        for (auto& volume : options_.volumes) {
            std::string why;
            if (auto valid = validate_shared_directory(volume, &why); !valid)
                return refuse(valid.error(), why);
        }
        return success();
    }

    // Data disks: bounded, present, readable (and writable unless read-only),
    // and never in a snapshot (QEMU would migrate their device state, not
    // their contents).
    result<void> check_disks() {
        if (options_.disks.empty()) return success();
        if (options_.snapshottable)
            return refuse(errc::invalid_argument, "a vm with data disks cannot be snapshottable");
        if (options_.disks.size() > max_data_disks)
            return refuse(errc::invalid_argument,
                          "more than " + std::to_string(max_data_disks) + " data disks");
        for (auto& disk : options_.disks) {
            struct stat st {};
            if (::access(disk.path.c_str(), disk.read_only ? R_OK : R_OK | W_OK) != 0 ||
                ::stat(disk.path.c_str(), &st) != 0)
                return refuse(errno_code(errno), "cannot open disk " + disk.path.string() + ": " +
                                                     std::strerror(errno));
            if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
                return refuse(errc::invalid_argument,
                              disk.path.string() + " is not a regular file or block device");
            disk.path = std::filesystem::absolute(disk.path);
        }
        return success();
    }

    // fuse and virtiofs (and what they need) join the initramfs's modules,
    // only for vms with volumes: the initramfs of every other vm (and so
    // its warm snapshot) stays as it was.
    static result<void> add_virtiofs_modules(boot::kernel_files& kernel) {
        const std::vector<std::string> wanted{"virtiofs"};
        SUPERMACHINE_TRY(plan, boot::plan_modules(kernel.modules_dir, wanted));
        if (!plan.missing.empty()) return errc::kernel_invalid;
        for (auto& module : plan.load_order)
            if (std::find(kernel.modules.begin(), kernel.modules.end(), module) ==
                kernel.modules.end())
                kernel.modules.push_back(std::move(module));
        return success();
    }

    // The agent waits for the data disks before it makes /dev.
    std::string data_disks_word() const {
        if (options_.disks.empty()) return {};
        return " supermachine.disks=" + std::to_string(options_.disks.size());
    }

    static constexpr const char* network_word = "supermachine.net=user";
    static bool has_network_word(std::string_view cmdline) {
        return cmdline == network_word || cmdline.ends_with(std::string(" ") + network_word) ||
               cmdline.find(std::string(" ") + network_word + " ") != std::string_view::npos;
    }

    // Ours, under $TMPDIR (else /tmp), locked while we live: a SIGKILLed
    // run's directory (its overlay grows with what the guest wrote) is
    // removed by the next start (detail/runtime_directory.hpp).
    result<void> ensure_runtime_dir() {
        if (!options_.runtime_dir.empty()) return success();
        SUPERMACHINE_TRY(made, detail::make_runtime_directory("supermachine-vm"));
        options_.runtime_dir = made.path;
        runtime_owner_ = std::move(made.owner);
        owns_runtime_dir_ = true;
        return success();
    }

    // Blocking set-up, on setup_pool().
    result<void> prepare(const prepared_image& image) {
        SUPERMACHINE_TRY(select_engine_and_kernel(true, ""));
        if (kind_ == backend::engine_kind::kvm && !options_.volumes.empty())
            return refuse(errc::not_supported,
                          "volumes (-v) are not served on the kvm engine yet (virtio-fs); use "
                          "--engine qemu");
        SUPERMACHINE_TRY(check_volumes());
        SUPERMACHINE_TRY(check_disks());
        SUPERMACHINE_TRY(agent_binary, detail::find_agent_binary());
        auto kernel = *options_.kernel;
        if (!options_.volumes.empty()) {
            SUPERMACHINE_TRY(add_virtiofs_modules(kernel));
        }
        // The agent's token: in this vm's initramfs only (agent_initramfs.hpp).
        std::array<std::byte, 16> secret{};
        if (::getrandom(secret.data(), secret.size(), 0) != static_cast<ssize_t>(secret.size()))
            return errno_code(errno);
        static constexpr char hex[] = "0123456789abcdef";
        for (auto b : secret) {
            token_ += hex[std::to_integer<unsigned>(b) >> 4];
            token_ += hex[std::to_integer<unsigned>(b) & 15];
        }
        SUPERMACHINE_TRY(initramfs, detail::build_agent_initramfs(agent_binary, kernel, token_));

        SUPERMACHINE_TRY(ensure_runtime_dir());
        const auto initrd_path = options_.runtime_dir / "initramfs.cpio";
        {
            // It holds the token: this user's only (the directory is too).
            const int fd = ::open(initrd_path.c_str(),
                                  O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
            std::FILE* f = fd < 0 ? nullptr : ::fdopen(fd, "wb");
            if (!f) {
                const int e = errno;
                if (fd >= 0) ::close(fd);
                return errno_code(e);
            }
            const bool ok =
                std::fwrite(initramfs.data(), 1, initramfs.size(), f) == initramfs.size();
            if (std::fclose(f) != 0 || !ok) return errc::io_error;
        }

        // What both engines are given alike.
        auto cmdline = guest_cmdline() + data_disks_word();
        SUPERMACHINE_TRY(network, user_network_config());
        const bool networked = network.has_value();
        auto common = [&](auto& c) {
            c.kernel = options_.kernel->vmlinuz;
            c.initrd = initrd_path;
            c.rootfs = image.rootfs;
            c.disk_id = image.digest.hex().substr(0, 20);
            c.memory_mib = options_.memory_mib;
            c.cpus = options_.cpus;
            c.guest_cid = guest_cid;
            for (const auto& disk : options_.disks)
                c.data_disks.push_back({disk.path, disk.read_only});
            c.network = std::move(network);
            c.console = console_sink();
        };

        if (kind_ == backend::engine_kind::kvm) {
            typename kvm_engine::config k;
            common(k);
            k.cmdline = cmdline;
            remember_for_snapshot(image, k.cmdline, agent_binary);
            auto made = kvm_engine::create(std::move(k));
            if (!made && networked && made.error() == errno_code(EADDRINUSE))
                return refuse_network(made.error());
            if (!made)
                return refuse(made.error(), "the kvm engine could not create the machine: " +
                                                made.error().message());
            kvm_ = std::move(made).value();
            return success();
        }

        typename qemu_engine::config q;
        common(q);
        for (std::size_t i = 0; i < options_.volumes.size(); ++i) {
            const auto& volume = options_.volumes[i];
            const std::string tag = "supermachine" + std::to_string(i);
            q.volumes.push_back({volume.host, tag, volume.read_only});
            // The agent mounts TAG at the path inside the image's root.
            cmdline += " supermachine.volume=" + tag + ":" + volume.guest +
                       (volume.read_only ? ":ro" : "");
        }
        q.cmdline = cmdline;
        q.snapshottable = options_.snapshottable;
        q.runtime_dir = options_.runtime_dir;
        q.extra_arguments = options_.engine_arguments;
        remember_for_snapshot(image, q.cmdline, agent_binary);
        return adopt_qemu(qemu_engine::create(executor_, std::move(q), qemu_failure_));
    }

    // The QEMU engine made (or not) by create or restore.
    result<void> adopt_qemu(result<std::unique_ptr<qemu_engine>> made) {
        if (!made && qemu_failure_.network) return refuse_network(made.error());
        if (!made && !qemu_failure_.why.empty()) return refuse(made.error(), qemu_failure_.why);
        if (!made) return made.error();
        qemu_ = std::move(made).value();
        return success();
    }

    // The user-mode network's NAT (virtio/net_user.hpp), either engine's;
    // nullopt: no network device (network_mode::none). The host's loopback
    // is reachable (10.0.2.2) only with a host-gateway --add-host. The
    // executor is left to the caller.
    result<std::optional<virtio::net_user::config>> user_network_config() {
        if (options_.network != network_mode::user) {
            if (!options_.publish.empty())
                return refuse(errc::invalid_argument,
                              "published ports need the user network (network_mode::user)");
            return std::optional<virtio::net_user::config>();
        }
        virtio::net_user::config c;
        c.slirp.disable_host_loopback = !reaches_host_loopback(options_.add_hosts);
        c.slirp.disable_dhcp = true; // the agent configures eth0 (init.hpp)
        for (const auto& p : options_.publish)
            c.slirp.forwards.push_back({p.udp, p.host_address, p.host_port, p.guest_port});
        std::string upstream = options_.dns_upstream;
        if (const char* env = std::getenv("SUPERMACHINE_DNS_UPSTREAM");
            upstream.empty() && env && *env)
            upstream = env;
        if (!upstream.empty()) {
            const auto colon = upstream.rfind(':');
            boost::system::error_code ec;
            const auto address = boost::asio::ip::make_address_v4(upstream.substr(0, colon), ec);
            const auto port = colon == std::string::npos
                                  ? std::optional<std::uint16_t>(53)
                                  : detail::parse_port_number(upstream.substr(colon + 1));
            if (ec || !port || *port == 0)
                return refuse(errc::invalid_argument,
                              "the DNS upstream must be IP[:PORT], not " + upstream);
            c.dns_upstream = boost::asio::ip::udp::endpoint(address, *port);
        }
        return std::optional<virtio::net_user::config>(std::move(c));
    }

    // Why the user network could not be made (a published port taken, most often).
    error_code refuse_network(error_code ec) {
        std::string ports;
        for (const auto& p : options_.publish)
            ports += " " + p.host_address + ":" + std::to_string(p.host_port) +
                     (p.udp ? "/udp" : "/tcp");
        return refuse(ec, ec == errno_code(EADDRINUSE)
                              ? "cannot publish a port (address in use?):" + ports
                              : "the user-mode network could not be set up: " + ec.message());
    }

    // On the executor: start the engine, watch for its end, wait for the agent.
    void launch() {
        launched_at_ = std::chrono::steady_clock::now();
        std::weak_ptr<basic_vm> weak = this->shared_from_this();
        detail::trace_point("engine start");
        if (kvm_) {
            // The vCPUs run in this process; the end is seen on the engine's
            // thread and handled on ours. The running engine is outstanding
            // work on the executor (as QEMU's exit watch is): until its end
            // io_context::run() must not run out (the agent connection waits
            // on the engine's own thread, not on the executor).
            engine_work_.emplace(boost::asio::make_work_guard(executor_));
            kvm_->async_wait([weak, executor = executor_](machine_exit e) {
                boost::asio::post(executor, [weak, e] {
                    if (auto self = weak.lock())
                        self->on_engine_exit(e.clean() ? "" : e.describe());
                });
            });
            if (auto started = kvm_->start(); !started) {
                engine_work_.reset();
                return finish_start(started.error());
            }
        } else {
            std::string said; // what QEMU said (e.g. which helper program is missing)
            if (auto started = qemu_->start(said); !started) {
                if (!said.empty()) failure_detail_ = std::move(said);
                return finish_start(started.error());
            }
            qemu_->async_wait([weak] {
                if (auto self = weak.lock()) self->on_engine_exit({});
            });
        }
        deadline_ = std::chrono::steady_clock::now() + options_.ready_timeout;
        try_connect();
    }

    // The engine has gone (on the executor): a start fails (`failure` says
    // why, when the engine knows), pending agent operations fail, stops complete.
    void on_engine_exit(const std::string& failure) {
        engine_work_.reset();
        machine_exited_ = true;
        stop_timer_.cancel();
        auto waiters = std::move(stop_waiters_);
        stop_waiters_.clear();
        for (auto& w : waiters)
            w.take_and_call({});
        if (start_) {
            if (!failure.empty()) failure_detail_ = failure;
            finish_start(errc::agent_unavailable);
        } else if (client_) {
            client_->close(); // pending operations fail
        }
    }

    // The agent's vsock device: the kvm engine's, or ours served to QEMU
    // (null: the agent is on QEMU's virtio-serial).
    virtio::vsock* agent_vsock() noexcept {
        if (kvm_) return &kvm_->vsock();
        if (qemu_) return qemu_->vsock();
        return nullptr;
    }

    void try_connect() {
        auto self = this->shared_from_this();
        auto* vsock = agent_vsock();
        if (!vsock) { // the agent on virtio-serial
            return connect_serial([self](error_code ec, bool may_retry) {
                if (!self->start_) return;
                if (ec && !may_retry) return self->finish_start(ec);
                if (ec) return self->retry_connect();
                self->agent_ready_at_ = std::chrono::steady_clock::now();
                self->finish_start({});
            });
        }
        // Restores always come up on virtio-serial: a vsock vm was booted.
        vsock->async_connect(executor_, agent_port, [self](error_code ec, socket_type socket) {
            if (!self->start_) return;
            if (ec) return self->retry_connect();
            self->client_ = std::make_unique<client_type>(std::move(socket));
            // A restored clone's set-up (new RNG seed, wall clock) goes
            // right behind the hello, as on the serial channel.
            auto outstanding = std::make_shared<int>(1);
            auto first_error = std::make_shared<error_code>();
            auto answered = [self, outstanding, first_error](error_code ec) {
                if (ec && !*first_error) *first_error = ec;
                if (--*outstanding || !self->start_) return;
                self->agent_ready_at_ = std::chrono::steady_clock::now();
                self->finish_start(*first_error);
            };
            self->client_->async_hello(self->token_,
                                       [self, answered](error_code ec, agent::hello_ok) {
                                           if (!self->start_) return;
                                           if (ec == errc::agent_auth_failed)
                                               return self->finish_start(ec);
                                           if (ec) return self->retry_connect();
                                           answered({});
                                       });
            if (self->restore_from_) self->restore_setup(answered, *outstanding);
        });
    }

    void retry_connect() {
        if (machine_exited_) return finish_start(errc::agent_unavailable);
        if (std::chrono::steady_clock::now() >= deadline_) return finish_start(errc::timeout);
        client_.reset();
        // The serial socket appears during QEMU's start (a connect is cheap:
        // poll it closely, a restore waits on it: 1 ms, not 3, is ≈ 1 ms of a
        // warm run); vsock connects go through the guest.
        timer_.expires_after(std::chrono::milliseconds(agent_vsock() ? 50 : 1));
        timer_.async_wait([self = this->shared_from_this()](boost::system::error_code ec) {
            if (!ec) self->try_connect();
        });
    }

    void finish_start(error_code ec) {
        auto done = std::move(start_);
        start_ = nullptr;
        if (!done) return;
        // While the set-up runs on setup_pool() it owns the engine members:
        // a cancelled start leaves them to it (nothing launches after it).
        if (ec && !setting_up_) kill();
        done(ec, this->shared_from_this()); // on error: for console_tail() only
    }

    // What an engine calls with console output (from its own threads); it
    // holds the vm weakly, so a console line never keeps a gone vm alive.
    std::function<void(std::string_view)> console_sink() {
        return [weak = this->weak_from_this()](std::string_view text) {
            if (auto self = weak.lock()) self->on_console(text);
        };
    }

    void on_console(std::string_view text) {
        if (options_.console) options_.console(text);
        std::lock_guard lock(console_mutex_);
        for (char c : text) {
            if (c == '\n') {
                if (partial_line_.find("supermachine-agent: host detached") != std::string::npos)
                    boost::asio::post(executor_, [weak = this->weak_from_this()] {
                        if (auto self = weak.lock()) self->on_detached();
                    });
                if (panic_line_.empty() && partial_line_.find("Kernel panic") != std::string::npos)
                    panic_line_ = partial_line_;
                console_lines_.push_back(std::move(partial_line_));
                partial_line_.clear();
                if (console_lines_.size() > 40) console_lines_.pop_front();
            } else if (c != '\r' && partial_line_.size() < 4096) {
                partial_line_ += c;
            }
        }
    }

    void accept_forward(std::shared_ptr<boost::asio::ip::tcp::acceptor> acceptor,
                        std::uint16_t guest_port) {
        auto self = this->shared_from_this();
        acceptor->async_accept([self, acceptor, guest_port](boost::system::error_code ec,
                                                            boost::asio::ip::tcp::socket peer) {
            if (ec) return; // closed
            self->accept_forward(acceptor, guest_port);
            auto connection = std::make_shared<boost::asio::ip::tcp::socket>(std::move(peer));
            self->client_->async_open_tcp(
                guest_port, [connection](error_code ec, auto channel) {
                    if (ec) return; // dropping the socket closes the host side
                    forward(connection, std::make_shared<decltype(channel)>(std::move(channel)));
                });
        });
    }

    // Splice bytes both ways between a host TCP connection and an agent
    // TCP channel; each side's reader waits for its writer (bounded buffers).
    template <class Channel>
    static void forward(std::shared_ptr<boost::asio::ip::tcp::socket> host,
                        std::shared_ptr<Channel> guest) {
        struct state {
            std::array<char, 64 * 1024> buffer;
        };
        auto host_to_guest = std::make_shared<std::function<void()>>();
        auto s = std::make_shared<state>();
        *host_to_guest = [host, guest, s, host_to_guest]() {
            host->async_read_some(
                boost::asio::buffer(s->buffer),
                [host, guest, s, host_to_guest](boost::system::error_code ec, std::size_t n) {
                    if (ec) {
                        guest->async_close_write([](error_code) {});
                        *host_to_guest = nullptr; // break the cycle
                        return;
                    }
                    guest->async_write(std::string(s->buffer.data(), n),
                                       [host_to_guest](error_code ec) {
                                           if (ec)
                                               *host_to_guest = nullptr; // break the cycle
                                           else if (*host_to_guest)
                                               (*host_to_guest)();
                                       });
                });
        };
        (*host_to_guest)();
        auto guest_to_host = std::make_shared<std::function<void()>>();
        *guest_to_host = [host, guest, guest_to_host]() {
            guest->async_read([host, guest_to_host](error_code ec, std::string data) {
                if (ec || data.empty()) {
                    boost::system::error_code ignored;
                    host->shutdown(boost::asio::ip::tcp::socket::shutdown_send, ignored);
                    *guest_to_host = nullptr;
                    return;
                }
                auto chunk = std::make_shared<std::string>(std::move(data));
                boost::asio::async_write(
                    *host, boost::asio::buffer(*chunk),
                    [chunk, guest_to_host](boost::system::error_code ec, std::size_t) {
                        if (ec)
                            *guest_to_host = nullptr; // break the cycle
                        else if (*guest_to_host)
                            (*guest_to_host)();
                    });
            });
        };
        (*guest_to_host)();
    }

    // ------------------------------------------------------------ snapshot machinery

    struct snapshot_identity {
        std::string token, image_digest, rootfs, kernel_release, kernel_path, cmdline,
            agent_identity;
    };

    void remember_for_snapshot(const prepared_image& image, const std::string& cmdline,
                               const std::filesystem::path& agent_binary) {
        snapshot_.token = token_;
        snapshot_.image_digest = image.digest.str();
        snapshot_.rootfs = image.rootfs.string();
        snapshot_.kernel_release = options_.kernel->release;
        snapshot_.kernel_path = options_.kernel->vmlinuz.string();
        snapshot_.cmdline = cmdline;
        snapshot_.agent_identity = detail::agent_identity(agent_binary);
    }

    /// The kernel command line of an image vm: the root
    /// disk, and its channel (virtio-serial for snapshottable vms, else vsock).
    std::string guest_cmdline() const {
        // The kvm engine's snapshots keep virtio-vsock (TRANSPORT_RESET on restore).
        auto cmdline = detail::image_vm_cmdline(options_.snapshottable &&
                                                    kind_ == backend::engine_kind::qemu,
                                                agent_port, options_.extra_cmdline);
        // The agent configures eth0 at boot: a snapshot with it and one
        // without are different snapshots (the command line is in the key).
        if (options_.network == network_mode::user && !has_network_word(cmdline))
            cmdline += std::string(" ") + network_word;
        return cmdline;
    }

    // The QEMU engine: the agent is told the host goes (the saved guest
    // must wait for a restore's host), QEMU saves into a staging directory
    // beside `path`, which is sealed (fingerprints, record, fsync) on
    // setup_pool() and moved into place; a resumed vm reconnects.
    void start_snapshot(std::filesystem::path path, bool resume,
                        std::function<void(error_code, snapshot_report)> done) {
        if (kvm_) return start_snapshot_kvm(std::move(path), resume, std::move(done));
        auto finish = [this, done](error_code ec, snapshot_report report) {
            boost::asio::post(executor_, [done, ec, report] { done(ec, report); });
        };
        if (!qemu_ || snapshot_.token.empty() || !client_)
            return finish(errc::invalid_argument, {});
        if (!options_.snapshottable || (restore_from_ && !options_.snapshottable_after_restore)) {
            snapshot_report report;
            report.refusal = restore_from_
                                 ? "a restored vm is not snapshotted again unless restored with "
                                   "snapshottable_after_restore (without it its RAM is the "
                                   "snapshot's, mapped privately)"
                                 : "the vm was not started snapshottable "
                                   "(vm_options::snapshottable)";
            return finish({}, report);
        }
        auto staged = detail::make_staging_directory(path);
        if (!staged) return finish(staged.error(), {});
        const std::filesystem::path staging = staged.value();
        auto self = this->shared_from_this();
        auto fail = [self, staging, finish](error_code ec) {
            std::error_code ignored;
            std::filesystem::remove_all(staging, ignored);
            finish(ec, {});
        };
        // The saved guest must wait for a new host (a restore's): close our
        // end and wait until the agent says it saw the host go.
        client_->close();
        detached_ = false;
        detach_waiter_ = [self, staging, path, resume, finish] {
            self->snapshot_timer_.cancel();
            self->qemu_->async_save(
                staging, resume,
                [self, staging, path, resume, finish](error_code ec, snapshot_report report) {
                    if (ec || !report.saved) {
                        if (!resume) self->kill();
                        std::error_code ignored;
                        std::filesystem::remove_all(staging, ignored);
                        return finish(ec, report);
                    }
                    // Fingerprinting and fsync: off the executor. (What the
                    // pool's job holds moves into the completion, as in
                    // set_up_then_launch.)
                    auto work = boost::asio::make_work_guard(self->executor_);
                    boost::asio::post(setup_pool(), [self, staging, path, report, resume, finish,
                                                     work = std::move(work)]() mutable {
                        auto sealed = qemu_engine::seal(staging, path, self->snapshot_meta());
                        auto executor = self->executor_;
                        boost::asio::dispatch(executor, [self = std::move(self), sealed, report,
                                                         resume, finish = std::move(finish),
                                                         work = std::move(work)] {
                            if (!resume) {
                                self->kill(); // its RAM file is the snapshot's now
                                return finish(sealed ? error_code{} : sealed.error(), report);
                            }
                            self->connect_serial(
                                [self, sealed, report, finish](error_code ec, bool) {
                                    finish(!sealed ? sealed.error() : ec, report);
                                });
                        });
                    });
                });
        };
        snapshot_timer_.expires_after(std::chrono::seconds(20));
        snapshot_timer_.async_wait([self, fail](boost::system::error_code ec) {
            if (ec || !self->detach_waiter_) return;
            self->detach_waiter_ = nullptr;
            fail(errc::timeout); // the agent never saw the host go
        });
        if (detached_) on_detached();
    }

    // ------------------------------------------------------------ stopping

    void begin_stop(std::chrono::steady_clock::duration grace,
                    agent::detail::unique_function<void(error_code)> done) {
        if ((!qemu_ && !kvm_) || machine_exited_) return done.take_and_call({});
        stop_waiters_.push_back(std::move(done));
        if (stop_waiters_.size() > 1) return; // already stopping
        if (client_) client_->async_shutdown([](error_code) {});
        else kill();
        stop_timer_.expires_after(grace);
        stop_timer_.async_wait([weak = this->weak_from_this()](boost::system::error_code ec) {
            auto self = weak.lock();
            if (ec || !self || self->machine_exited_) return;
            self->kill(); // the guest did not power off in time
        });
    }

    // The kvm engine: the snapshot is one container file, `path`/machine.snap
    // (snapshot/container.hpp): vCPUs, irqchip, PIT, clock, each device's
    // record (the root disk's overlay chunks with it), the agent's token,
    // then the RAM. Any kvm vm can be captured, a restored one too (its RAM
    // is read through its private mapping: nothing to copy first). The
    // agent connection stays open across the capture when the vm resumes: a
    // restore resets every vsock connection (TRANSPORT_RESET) and connects
    // anew, so the saved guest needs no farewell. Written on setup_pool().
    void start_snapshot_kvm(std::filesystem::path path, bool resume,
                            std::function<void(error_code, snapshot_report)> done) {
        auto finish = [this, done](error_code ec, snapshot_report report) {
            boost::asio::post(executor_, [done, ec, report] { done(ec, report); });
        };
        if (snapshot_.token.empty() || !client_) return finish(errc::invalid_argument, {});
        if (!options_.disks.empty()) {
            // Their contents are the host's files, not the snapshot's: a
            // restore could not give them back (and refuses the devices).
            snapshot_report report;
            report.refusal = "a vm with data disks is not snapshotted (the disks are host files, "
                             "not part of the snapshot)";
            return finish({}, report);
        }
        if (!resume) client_->close();
        auto self = this->shared_from_this();
        auto work = boost::asio::make_work_guard(executor_);
        boost::asio::post(setup_pool(), [self, path, resume, finish,
                                         work = std::move(work)]() mutable {
            const auto started = std::chrono::steady_clock::now();
            snapshot::agent_record agent;
            const auto& token = self->snapshot_.token;
            agent.token.assign(reinterpret_cast<const std::byte*>(token.data()),
                               reinterpret_cast<const std::byte*>(token.data()) + token.size());
            agent.vsock_port = agent_port;
            // Written into a staging directory beside `path` and moved into
            // place whole, as the QEMU engine's: an older snapshot there
            // (either engine's) stays intact until the new one is complete,
            // and clones restored from it keep their mapping.
            auto staged = detail::make_staging_directory(path);
            result<std::uint64_t> written =
                !staged
                    ? result<std::uint64_t>(staged.error())
                    : self->kvm_->snapshot(staged.value() / kvm_snapshot_file, std::move(agent),
                                           resume ? after_snapshot::resume : after_snapshot::stop);
            // The record that makes the directory self-describing (`restore
            // DIR`). (Its fingerprints stay empty: the container checks
            // itself, CRC and bounds, on every read.)
            if (written) {
                auto sealed = detail::write_warm_snapshot_meta(self->snapshot_meta(),
                                                               staged.value() / "meta");
                if (sealed) sealed = detail::replace_directory(staged.value(), path);
                if (!sealed) written = sealed.error();
            }
            if (staged && !written) {
                std::error_code ignored;
                std::filesystem::remove_all(staged.value(), ignored);
            }
            snapshot_report report;
            report.saved = written.has_value();
            if (written) report.bytes = written.value();
            report.duration = std::chrono::duration_cast<std::chrono::milliseconds>(
                std::chrono::steady_clock::now() - started);
            const error_code error = written ? error_code{} : written.error();
            auto executor = self->executor_;
            boost::asio::dispatch(executor, [self = std::move(self), error, report, resume,
                                             finish = std::move(finish), work = std::move(work)] {
                if (!resume) self->kill();
                finish(error, report);
            });
        });
    }

    // Blocking, on setup_pool(): a kvm engine restore of `dir`/machine.snap.
    // The cache key (image, rootfs, memory, vCPUs, kernel, agent, command
    // line) chose the directory; the file is still hostile input, validated
    // by read_snapshot (counts before allocation, RAM within the file) and
    // its command line compared with what these options would boot.
    result<void> prepare_restore_kvm(const prepared_image& image) {
        if (options_.engine == engine_choice::qemu)
            return refuse(errc::snapshot_mismatch,
                          "the snapshot was taken on the kvm engine; --engine qemu was asked for");
        kind_ = backend::engine_kind::kvm;
        engine_description_ = "kvm (the snapshot's engine), restored";
        if (!options_.kernel) {
            auto kernel = boot::default_kernel();
            if (!kernel) return refuse(kernel.error(), "no cached kernel for the restore");
            options_.kernel = std::move(kernel).value();
        }
        auto agent_binary = find_agent_for_restore();
        if (!agent_binary) return agent_binary.error();
        typename kvm_engine::config k;
        k.kernel = options_.kernel->vmlinuz;
        k.rootfs = image.rootfs;
        k.disk_id = image.digest.hex().substr(0, 20);
        k.memory_mib = options_.memory_mib;
        k.cpus = options_.cpus;
        k.cmdline = guest_cmdline();
        k.guest_cid = guest_cid;
        // A fresh NAT (it announces the guest); the guest keeps its
        // configuration (detail/vm_engine_kvm.hpp: no link flap).
        SUPERMACHINE_TRY(network, user_network_config());
        k.network = std::move(network);
        k.console = console_sink();
        const auto cmdline = k.cmdline;
        auto engine = kvm_engine::restore(std::move(k), *restore_from_ / kvm_snapshot_file, token_,
                                          &failure_detail_);
        if (!engine && engine.error() == errno_code(EADDRINUSE))
            return refuse_network(engine.error());
        if (!engine) return engine.error();
        kvm_ = std::move(engine).value();
        remember_for_snapshot(image, cmdline, agent_binary.value());
        return success();
    }

    void on_detached() {
        detached_ = true;
        if (auto waiter = std::move(detach_waiter_)) {
            detach_waiter_ = nullptr;
            boost::asio::post(executor_, std::move(waiter));
        }
    }

    // Connect to the agent's virtio-serial socket (QEMU listens on it) and
    // authenticate. The agent answers once it runs and sees us; bounded by
    // the ready deadline. A restored vm sends its set-up right behind the
    // hello (restore_setup): the agent handles frames in order and none
    // before a successful hello (a refused one ends the session), so the
    // set-up costs no extra round trip (measured: ≈ 5 ms of a warm run).
    // `done(error, may_retry)`: a refused token or a failed set-up is final;
    // an agent not answering yet may be tried again.
    void connect_serial(std::function<void(error_code, bool may_retry)> done) {
        socket_type socket(executor_);
        boost::system::error_code ec;
        socket.connect(socket_type::endpoint_type(qemu_->serial_socket().string()), ec);
        if (ec)
            return boost::asio::post(executor_, [done] { done(errc::agent_unavailable, true); });
        detail::trace_point("agent socket connected");
        client_ = std::make_unique<client_type>(std::move(socket));
        auto self = this->shared_from_this();
        serial_timer_.expires_at(
            std::max(deadline_, std::chrono::steady_clock::now() + std::chrono::seconds(30)));
        serial_timer_.async_wait([self, client = client_.get()](boost::system::error_code ec) {
            if (!ec && self->client_.get() == client) client->close();
        });
        // Completes once the hello and every request behind it answered; the
        // hello's error (e.g. agent_auth_failed) comes first.
        struct replies {
            int outstanding = 1;
            error_code hello_error, setup_error;
            std::function<void(error_code, bool)> done;
        };
        auto pending = std::make_shared<replies>();
        pending->done = std::move(done);
        auto answered = [self, pending](error_code ec, bool is_hello) {
            detail::trace_point(is_hello ? "agent hello answered" : "agent set-up answered");
            if (is_hello)
                pending->hello_error = ec;
            else if (ec && !pending->setup_error)
                pending->setup_error = ec;
            if (--pending->outstanding) return;
            self->serial_timer_.cancel();
            if (pending->hello_error)
                return pending->done(pending->hello_error,
                                     pending->hello_error != errc::agent_auth_failed);
            pending->done(pending->setup_error, false);
        };
        client_->async_hello(
            token_, [self, client = client_.get(), answered](error_code ec, agent::hello_ok) {
                // A refused hello: the agent ignores what followed it, so end the
                // requests waiting behind it now.
                if (ec && self->client_.get() == client) client->close();
                answered(ec, true);
            });
        if (restore_from_)
            restore_setup([answered](error_code ec) { answered(ec, false); },
                          pending->outstanding);
    }

    // The record of what the snapshot needs, for `restore DIR` and
    // image::from_snapshot (detail/warm_snapshot_contents.hpp); the QEMU
    // engine adds its files' fingerprints.
    detail::warm_snapshot_meta snapshot_meta() const {
        detail::warm_snapshot_meta meta;
        meta.engine = kind_ == backend::engine_kind::kvm ? "kvm" : "qemu";
        meta.image_digest = snapshot_.image_digest;
        meta.rootfs = snapshot_.rootfs;
        meta.memory_mib = options_.memory_mib;
        meta.cpus = options_.cpus;
        meta.kernel_release = snapshot_.kernel_release;
        meta.kernel_path = snapshot_.kernel_path;
        meta.cmdline = snapshot_.cmdline;
        meta.agent_identity = snapshot_.agent_identity;
        meta.token = snapshot_.token;
        return meta;
    }

    // Blocking, on setup_pool(): validate the snapshot against this image and
    // these options (the record here, every file's fingerprint in the QEMU
    // engine's restore) before anything starts; a kvm container is the kvm
    // engine's (prepare_restore_kvm).
    result<void> prepare_restore(const prepared_image& image) {
        if (std::error_code ec; std::filesystem::exists(*restore_from_ / kvm_snapshot_file, ec))
            return prepare_restore_kvm(image);
        if (!options_.volumes.empty())
            return refuse(errc::invalid_argument, "a vm with volumes cannot be restored (virtio-fs "
                                                  "state does not migrate)");
        if (!options_.disks.empty())
            return refuse(errc::invalid_argument, "a vm with data disks cannot be restored");
        // A QEMU engine directory is restored by QEMU; auto must not pick
        // kvm for it where the host's KVM runs Linux.
        if (options_.engine == engine_choice::automatic) options_.engine = engine_choice::qemu;
        // A snapshot implies the kernel is cached: no fetch.
        if (auto selected = select_engine_and_kernel(false, ", restored"); !selected)
            return refuse(selected.error(), "no engine or cached kernel for the restore");
        if (kind_ != backend::engine_kind::qemu)
            return refuse(
                errc::snapshot_mismatch,
                "the snapshot directory is the qemu engine's; --engine kvm was asked for");
        auto agent_binary = find_agent_for_restore();
        if (!agent_binary) return agent_binary.error();
        const auto& dir = *restore_from_;
        auto raw = detail::read_small_file(dir / "meta", 64 * 1024);
        if (!raw)
            return refuse(raw.error(), (dir / "meta").string() + ": " + raw.error().message());
        auto decoded = detail::warm_snapshot_meta::decode(raw.value());
        if (!decoded)
            return refuse(decoded.error(),
                          (dir / "meta").string() + " is not a valid snapshot record");
        const auto& meta = decoded.value();
        auto mismatch = [&](std::string what, const std::string& snapshot,
                            const std::string& here) {
            return refuse(errc::snapshot_mismatch,
                          "the snapshot's " + what + " is " + snapshot + ", this vm's " + here);
        };
        if (meta.engine != "qemu") return mismatch("engine", meta.engine, "qemu");
        if (meta.image_digest != image.digest.str())
            return mismatch("image", meta.image_digest, image.digest.str());
        if (meta.rootfs != image.rootfs.string())
            return mismatch("root filesystem", meta.rootfs, image.rootfs.string());
        if (meta.memory_mib != options_.memory_mib)
            return mismatch("memory", std::to_string(meta.memory_mib) + " MiB",
                            std::to_string(options_.memory_mib) + " MiB");
        if (meta.cpus != options_.cpus)
            return mismatch("vCPU count", std::to_string(meta.cpus), std::to_string(options_.cpus));
        if (meta.kernel_release != options_.kernel->release)
            return mismatch("kernel", meta.kernel_release, options_.kernel->release);
        if (meta.agent_identity != detail::agent_identity(agent_binary.value()))
            return refuse(errc::snapshot_mismatch,
                          "the snapshot was taken with another build of the guest agent (" +
                              agent_binary.value().string() + " changed since)");
        // The saved command line must be what these options would boot.
        if (guest_cmdline() != meta.cmdline)
            return refuse(errc::snapshot_mismatch,
                          "the snapshot's kernel command line differs from this vm's");
        token_ = meta.token;
        SUPERMACHINE_TRY(ensure_runtime_dir());
        typename qemu_engine::config q;
        q.kernel = options_.kernel->vmlinuz;
        q.memory_mib = options_.memory_mib;
        q.cpus = options_.cpus;
        q.cmdline = meta.cmdline;
        q.runtime_dir = options_.runtime_dir;
        SUPERMACHINE_TRY(network, user_network_config());
        q.network = std::move(network);
        q.console = console_sink();
        remember_for_snapshot(image, q.cmdline, agent_binary.value());
        return adopt_qemu(qemu_engine::restore(executor_, std::move(q), dir, meta,
                                               options_.snapshottable_after_restore,
                                               qemu_failure_));
    }

    // The agent binary a restore checks the snapshot against (its identity
    // is in the record), or the refusal saying where it was looked for.
    result<std::filesystem::path> find_agent_for_restore() {
        auto agent_binary = detail::find_agent_binary();
        if (!agent_binary)
            return refuse(agent_binary.error(), "the guest agent binary is not found "
                                                "(SUPERMACHINE_AGENT, or beside the program)");
        return agent_binary;
    }

    // A failed start's error with the sentence failure_detail() gives.
    error_code refuse(error_code ec, std::string why) {
        failure_detail_ = std::move(why);
        return ec;
    }

    // Blocking, on setup_pool(): everything the snapshot directory alone
    // says (its record, the image in the content store, the cached kernel),
    // into these options; then the restore as for a caller who had them.
    result<void> prepare_restore_from_directory(const std::filesystem::path& cache_dir) {
        auto contents = detail::read_warm_snapshot(*restore_from_, cache_dir, &failure_detail_);
        if (!contents) return contents.error();
        options_.memory_mib = contents.value().memory_mib;
        options_.cpus = contents.value().cpus;
        options_.kernel = std::move(contents.value().kernel);
        options_.extra_cmdline = std::move(contents.value().extra_cmdline);
        // The snapshot says whether the guest has a network device.
        std::string extra;
        for (const auto& e : options_.extra_cmdline)
            extra += " " + e;
        options_.network = has_network_word(extra) ? network_mode::user : network_mode::none;
        return prepare_restore(contents.value().image);
    }

    // A restored vm's set-up: fresh host randomness into the guest RNG (two
    // clones never share random state), then the host's wall clock (the
    // guest's is the snapshot's). `answered` is called once per request;
    // `outstanding` counts them.
    void restore_setup(const std::function<void(error_code)>& answered, int& outstanding) {
        std::string seed(64, '\0');
        if (::getrandom(seed.data(), seed.size(), 0) != static_cast<ssize_t>(seed.size())) {
            // No fresh seed, no commands: the clone would share the snapshot's RNG.
            const auto error = errno_code(errno);
            ++outstanding;
            boost::asio::post(executor_, [answered, error] { answered(error); });
            return;
        }
        outstanding += 2;
        client_->async_reseed_rng(std::move(seed),
                                  [answered](error_code ec, auto&&...) { answered(ec); });
        client_->async_set_clock(std::chrono::system_clock::now(),
                                 [answered](error_code ec, auto&&...) { answered(ec); });
    }

    std::optional<std::filesystem::path> restore_from_;
    snapshot_identity snapshot_;
    std::string failure_detail_;

    executor_type executor_;
    vm_options options_;
    boost::asio::steady_timer timer_;
    std::chrono::steady_clock::time_point deadline_{};
    std::function<void(error_code, std::shared_ptr<basic_vm>)> start_;
    bool setting_up_ = false; // set_up_then_launch's job runs (read on the executor only)
    std::string token_;
    std::string engine_description_;
    bool owns_runtime_dir_ = false;
    detail::unique_fd runtime_owner_; // closed after the directory is removed
    bool machine_exited_ = false;
    // One of the two engines runs the vm (detail/vm_engine_*.hpp).
    std::unique_ptr<qemu_engine> qemu_;
    typename qemu_engine::failure qemu_failure_; // why its create or restore failed
    std::unique_ptr<kvm_engine> kvm_;
    std::optional<boost::asio::executor_work_guard<executor_type>> engine_work_; // kvm_ runs
    backend::engine_kind kind_ = backend::engine_kind::qemu;
    std::unique_ptr<client_type> client_;
    std::vector<std::shared_ptr<boost::asio::ip::tcp::acceptor>> listeners_;
    // Snapshottable QEMU vms: the bound on one connect + hello to the
    // agent's virtio-serial socket, and a snapshot's wait for the agent to
    // see the host go ("host detached" on the console).
    boost::asio::steady_timer serial_timer_;
    boost::asio::steady_timer snapshot_timer_;
    boost::asio::steady_timer stop_timer_;
    std::vector<agent::detail::unique_function<void(error_code)>> stop_waiters_;
    bool detached_ = false;
    std::function<void()> detach_waiter_;
    std::chrono::steady_clock::time_point launched_at_{}, agent_ready_at_{};
    mutable std::mutex console_mutex_;
    std::deque<std::string> console_lines_;
    std::string partial_line_;
    std::string panic_line_; // the first "Kernel panic" line, kept for console_tail()
};

/// The vm on any executor, as Asio's I/O objects are (`basic_vm` is a
/// template so that its members, the engines and the agent client under them,
/// are compiled where they are used, not in every file that includes this).
using vm = basic_vm<>;

} // namespace supermachine
