#pragma once
// The QEMU engine: QEMU (TCG, or KVM where the host's KVM can run Linux)
// runs the vCPUs and the virtio-mmio transports of a microvm; this process
// serves the devices over vhost-user, with guest RAM shared through a memfd.
// It is how a real Linux guest runs on hosts whose KVM cannot run one (a
// software KVM such as kvm_pvm) or that have no KVM at all.
//
//   boost::asio::io_context io;
//   backend::qemu_machine vm(io.get_executor(), config);
//   vm.attach(backend::vhost_user_device_kind::blk, my_blk);   // any vhost_user::device_core
//   vm.start([](std::string_view console) { ... });
//   vm.async_wait([](error_code ec, int status) { ... });
//   io.run();
//
// Engine choice: select_engine("auto") picks kvm when the host's KVM can run
// Linux and qemu otherwise, and says which and why once on stderr.
#include <supermachine/backend/detail/qemu_command.hpp>
#include <supermachine/backend/detail/qemu_process.hpp>
#include <supermachine/backend/detail/qemu_qmp.hpp>
#include <supermachine/detail/runtime_directory.hpp>
#include <supermachine/detail/trace.hpp>
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/engine.hpp>
#include <supermachine/error.hpp>
#include <supermachine/snapshot_report.hpp>
#include <supermachine/vhost_user/backend.hpp>
#include <supermachine/virtio/device.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace supermachine::backend {

// ---------------------------------------------------------------- engine choice

/// "kvm" | "qemu" | "auto". For auto, prints the choice and its reason once
/// per process on `announce` (stderr by default; null: silent).
inline result<engine_decision> select_engine(std::string_view requested,
                                             std::ostream* announce = &std::cerr) {
    if (requested == "kvm") return engine_decision{engine_kind::kvm, "requested"};
    if (requested == "qemu") return engine_decision{engine_kind::qemu, "requested"};
    if (requested != "auto" && !requested.empty()) return errc::invalid_argument;
    std::string why;
    const bool kvm = host_kvm_runs_linux(&why);
    engine_decision d{kvm ? engine_kind::kvm : engine_kind::qemu, why};
    static std::atomic<bool> announced{false};
    if (announce && !announced.exchange(true))
        *announce << "supermachine: engine auto: " << (kvm ? "kvm" : "qemu") << " (" << why
                  << ")\n";
    return d;
}

// ---------------------------------------------------------------- QEMU discovery

struct qemu_installation {
    std::filesystem::path binary;
    std::string device_list; // `-device help` output
    bool has_device(std::string_view name) const {
        return device_list.find("name \"" + std::string(name) + "\"") != std::string::npos;
    }
};

/// Find QEMU (a name is looked up on PATH) and list its devices, once per binary.
inline result<qemu_installation> find_qemu(const std::filesystem::path& name_or_path) {
    static std::mutex mutex;
    static std::map<std::string, qemu_installation> cache;
    std::lock_guard lock(mutex);
    if (auto it = cache.find(name_or_path.string()); it != cache.end()) return it->second;
    auto binary = detail::find_program(name_or_path.string());
    if (!binary) return errc::engine_unavailable;
    auto devices = detail::capture_output(
        {binary->string(), "-nodefaults", "-machine", "none", "-device", "help"});
    if (!devices) return errc::engine_unavailable;
    qemu_installation q{*binary, std::move(devices).value()};
    cache.emplace(name_or_path.string(), q);
    return q;
}

// ---------------------------------------------------------------- the machine

class qemu_machine {
public:
    using executor_type = boost::asio::any_io_executor;
    using console_sink = std::function<void(std::string_view)>;
    using local = boost::asio::local::stream_protocol;

    qemu_machine(executor_type executor, qemu_config config)
        : executor_(std::move(executor))
        , config_(std::move(config)) {}
    qemu_machine(const qemu_machine&) = delete;
    qemu_machine& operator=(const qemu_machine&) = delete;
    ~qemu_machine() {
        kill();
        if (snapshot_thread_.joinable()) snapshot_thread_.join();
        if (child_.pid > 0 && !exited_) detail::reap_in_background(child_.pid);
        stop_file_servers(/*wait=*/false);
        for (auto& d : devices_) {
            boost::system::error_code ignored;
            d.acceptor->close(ignored);
            // A vhost-user session may outlive us (until its executor runs or
            // is destroyed) and keeps the backend alive; the device it refers
            // to may not. Detach now, while the device surely exists.
            if (d.stop_serving) d.stop_serving();
        }
        if (!runtime_directory_.empty()) {
            std::error_code ignored;
            std::filesystem::remove_all(runtime_directory_, ignored);
        }
    }

    executor_type get_executor() const noexcept { return executor_; }
    const qemu_config& config() const noexcept { return config_; }

    /// Serve `device` (a virtio device core) to QEMU as a vhost-user device of `kind`. Call before
    /// start(); `device` must outlive the machine. Devices appear in the
    /// guest in attach order (microvm's virtio-mmio slots).
    template <virtio::device_core Device>
    result<void> attach(vhost_user_device_kind kind, Device& device) {
        if (child_.pid > 0) return errc::invalid_argument;
        SUPERMACHINE_TRY(ensure_runtime_directory());
        const std::string id = "vhost" + std::to_string(devices_.size());
        const auto socket_path = runtime_directory_ / (id + ".sock");
        auto acceptor = std::make_unique<local::acceptor>(executor_);
        boost::system::error_code ec;
        acceptor->open(local(), ec);
        if (!ec) acceptor->bind(local::endpoint(socket_path.string()), ec);
        if (!ec) acceptor->listen(1, ec);
        if (ec) return error_code(ec.value(), boost::system::system_category());
        auto served = std::make_shared<vhost_user::backend<Device>>(executor_, device);
        attached_device d;
        d.attachment = {kind, socket_path, id};
        d.acceptor = std::move(acceptor);
        d.serve = [served, this, index = devices_.size()](local::socket socket) {
            served->async_serve(
                std::move(socket),
                [this, served, index, alive = std::weak_ptr<int>(alive_)](error_code end) {
                    if (alive.expired()) return;
                    devices_[index].end_reason = end;
                });
        };
        d.keep_alive = served;
        d.stop_serving = [served] { served->stop(); };
        if constexpr (virtio::saves_state<Device>) {
            d.save_state = [&device] { return device.save_state(); };
            d.restore_state = [&device](std::span<const std::byte> b) {
                return device.restore_state(b);
            };
        }
        devices_.push_back(std::move(d));
        return success();
    }

    /// The reason each device's session ended (empty while serving).
    std::vector<error_code> device_end_reasons() const {
        std::vector<error_code> r;
        for (const auto& d : devices_)
            r.push_back(d.end_reason);
        return r;
    }

    bool uses_kvm() const noexcept { return use_kvm_; }
    pid_t pid() const noexcept { return child_.pid; }
    const std::filesystem::path& runtime_directory() const noexcept { return runtime_directory_; }
    /// QEMU's own stderr (its error messages), the last 16 KiB.
    std::string diagnostics() const {
        std::lock_guard lock(diagnostics_mutex_);
        return diagnostics_;
    }

    /// Spawn QEMU and start serving. Console bytes (the guest's serial
    /// output) go to `console` on the executor.
    result<void> start(console_sink console) {
        if (child_.pid > 0) return errc::invalid_argument;
        // Listing QEMU's devices costs a QEMU start (~0.1-0.2 s): only when
        // vhost-user devices need checking (a warm restore has none).
        std::filesystem::path binary;
        if (devices_.empty() && config_.shared_directories.empty()) {
            auto found = detail::find_program(config_.qemu_binary.string());
            if (!found) return errc::engine_unavailable;
            binary = *found;
        } else {
            SUPERMACHINE_TRY(qemu, find_qemu(config_.qemu_binary));
            for (const auto& d : devices_)
                if (!qemu.has_device(qemu_device_name(d.attachment.kind)))
                    return errc::engine_device_missing;
            if (!config_.shared_directories.empty() && !qemu.has_device("vhost-user-fs-device"))
                return errc::engine_device_missing;
            binary = qemu.binary;
        }
        switch (config_.accelerator) {
        case qemu_accelerator::kvm:
            use_kvm_ = true;
            break;
        case qemu_accelerator::tcg:
            use_kvm_ = false;
            break;
        case qemu_accelerator::automatic:
            use_kvm_ = host_kvm_runs_linux();
            break;
        }
        if (config_.qmp_socket.empty()) { // always a control socket: snapshots need it
            SUPERMACHINE_TRY(ensure_runtime_directory());
            config_.qmp_socket = runtime_directory_ / "qmp.sock";
        }
        std::vector<qemu_vhost_user_attachment> attachments;
        for (const auto& d : devices_)
            attachments.push_back(d.attachment);
        if (!config_.shared_directories.empty()) {
            SUPERMACHINE_TRY(ensure_runtime_directory());
        }
        SUPERMACHINE_TRY(argv, detail::qemu_arguments(binary, config_, attachments, use_kvm_,
                                                      runtime_directory_));
        // QEMU connects to each virtiofsd at startup and fails without it.
        if (auto served = start_file_servers(); !served) {
            stop_file_servers();
            return served.error();
        }
        // Accept before spawning: QEMU connects during its startup and
        // negotiates synchronously, so the back-ends must already be served.
        for (auto& d : devices_)
            accept(d);
        supermachine::detail::unique_fd incoming_stream, monitor_ours, monitor_theirs;
        if (config_.incoming) {
            incoming_stream.reset(::open(config_.incoming->c_str(), O_RDONLY | O_CLOEXEC));
            if (!incoming_stream) return errno_code(errno);
        }
        if (config_.incoming && config_.incoming_ignores_shared_memory) {
            // The restore's QMP commands, waiting in the socket before QEMU
            // exists (qemu_config::incoming_ignores_shared_memory).
            int pair[2];
            if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
                return errno_code(errno);
            monitor_ours.reset(pair[0]);
            monitor_theirs.reset(pair[1]);
            const auto commands = detail::restore_monitor_commands();
            const auto written = ::write(monitor_ours.get(), commands.data(), commands.size());
            if (written < 0) return errno_code(errno);
            if (written != static_cast<ssize_t>(commands.size())) return errc::io_error;
        }
        SUPERMACHINE_TRY(child, detail::spawn(argv, {incoming_stream.get(), monitor_theirs.get(),
                                                     config_.network_socket}));
        supermachine::detail::trace_point("engine spawned");
        child_ = child;
        console_ = std::move(console);
        stdout_ =
            std::make_unique<boost::asio::posix::stream_descriptor>(executor_, child_.stdout_read);
        stderr_ =
            std::make_unique<boost::asio::posix::stream_descriptor>(executor_, child_.stderr_read);
        pidfd_ = std::make_unique<boost::asio::posix::stream_descriptor>(executor_, child_.pidfd);
        read_console();
        read_diagnostics();
        if (monitor_ours) {
            restore_monitor_ = std::make_unique<boost::asio::posix::stream_descriptor>(
                executor_, monitor_ours.release());
            read_restore_monitor();
        }
        if (config_.incoming && !config_.incoming_ignores_shared_memory) {
            // A snapshot is taken paused, and QEMU restores the run state it
            // was saved in: resume once the stream is loaded. (Streams with
            // RAM left in memory_file carry no run state: QEMU resumes
            // those itself, and a stream it cannot load makes it exit: the
            // caller sees the engine end.)
            snapshot_thread_ = std::thread([this] {
                using namespace std::chrono_literals;
                detail::qmp_client qmp;
                if (!qmp.connect(config_.qmp_socket, 30s)) return;
                for (auto deadline = std::chrono::steady_clock::now() + 300s;
                     std::chrono::steady_clock::now() < deadline;) {
                    auto status = qmp.execute("query-status", nullptr, 30s);
                    if (!status) return;
                    const auto state = status.value().value("status", std::string());
                    if (state == "running") break;
                    if (state != "inmigrate") {
                        (void)qmp.execute("cont", nullptr, 30s);
                        break;
                    }
                    std::this_thread::sleep_for(2ms);
                }
                resumed_at_ = std::chrono::steady_clock::now();
            });
        }
        watch_exit();
        return success();
    }

    /// Completes when QEMU has exited and its console is drained:
    /// void(error_code, int exit_status) (status as from waitpid's WEXITSTATUS, 128+signal if
    /// killed, -1 if another waitpid in this process reaped QEMU first).
    template <class CompletionToken>
    auto async_wait(CompletionToken&& token) {
        return boost::asio::async_initiate<CompletionToken, void(error_code, int)>(
            [this](auto handler) {
                auto shared = std::make_shared<decltype(handler)>(std::move(handler));
                waiters_.push_back(
                    [shared](error_code ec, int status) { std::move (*shared)(ec, status); });
                maybe_finish();
            },
            token);
    }

    /// SIGKILL QEMU (idempotent).
    void kill() noexcept {
        if (child_.pid > 0 && !exited_) ::kill(child_.pid, SIGKILL);
    }

    /// The outcome of a snapshot attempt (snapshot_report.hpp).
    using snapshot_report = supermachine::snapshot_report;

    /// Pause the guest and write QEMU's migration stream (CPU, RAM, its
    /// transports) to `file`, and our devices' own state (cores with
    /// save_state()) to `file` + ".devices", at the same pause. Resumes the
    /// guest afterwards when `resume`. A refusal by QEMU (a device without
    /// migration support) is not an error: the report says which, and the
    /// guest is resumed. Completion: void(error_code, snapshot_report),
    /// on the executor; the QMP exchange runs on its own thread so the
    /// executor stays free for the vhost-user back-ends QEMU waits on.
    template <class CompletionToken>
    auto async_save_snapshot(std::filesystem::path file, bool resume, CompletionToken&& token) {
        return boost::asio::async_initiate<CompletionToken, void(error_code, snapshot_report)>(
            [this](auto handler, std::filesystem::path file, bool resume) {
                if (snapshot_thread_.joinable()) snapshot_thread_.join();
                auto shared = std::make_shared<decltype(handler)>(std::move(handler));
                snapshot_thread_ = std::thread([this, shared, file = std::move(file), resume] {
                    snapshot_report report;
                    const auto start = std::chrono::steady_clock::now();
                    auto r = save_snapshot_blocking(file, resume, report);
                    report.duration = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - start);
                    boost::asio::post(executor_, [shared, ec = r ? error_code{} : r.error(),
                                                  report] { std::move (*shared)(ec, report); });
                });
            },
            token, std::move(file), resume);
    }

    /// Run `step` in the next snapshot after QEMU wrote its stream, while the
    /// guest is still paused (on the snapshot thread). A failing step fails
    /// the snapshot.
    void set_snapshot_paused_step(std::function<result<void>()> step) {
        paused_step_ = std::move(step);
    }

    /// Before start() with config.incoming: give each attached core (that
    /// keeps state) the state saved next to the migration stream.
    result<void> restore_device_states(const std::filesystem::path& file) {
        std::ifstream in(file.string() + ".devices", std::ios::binary);
        if (!in) return errc::not_found;
        std::uint32_t count = 0;
        in.read(reinterpret_cast<char*>(&count), sizeof count);
        if (!in || count != devices_.size()) return errc::snapshot_mismatch;
        for (auto& d : devices_) {
            std::uint64_t size = 0;
            in.read(reinterpret_cast<char*>(&size), sizeof size);
            if (!in || size > (std::uint64_t{1} << 30)) return errc::snapshot_bad_record;
            std::vector<std::byte> bytes(size);
            in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
            if (!in) return errc::snapshot_truncated;
            if (size && !d.restore_state) return errc::snapshot_mismatch;
            if (d.restore_state) {
                SUPERMACHINE_TRY(d.restore_state(bytes));
            }
        }
        return success();
    }

    /// With config.incoming (stream with RAM): when the restored guest was
    /// resumed (epoch when not yet, and always for incoming_ignores_shared_memory,
    /// which QEMU resumes itself).
    std::chrono::steady_clock::time_point resumed_at() const noexcept { return resumed_at_.load(); }

    bool exited() const noexcept { return exited_; }
    int exit_status() const noexcept { return exit_status_; }

private:
    struct attached_device {
        qemu_vhost_user_attachment attachment;
        std::unique_ptr<local::acceptor> acceptor;
        std::function<void(local::socket)> serve;
        std::shared_ptr<void> keep_alive;
        std::function<void()> stop_serving; // detach the backend from the device
        error_code end_reason;
        std::function<std::vector<std::byte>()> save_state; // empty: the core keeps no state
        std::function<result<void>(std::span<const std::byte>)> restore_state;
    };

    result<void> save_snapshot_blocking(const std::filesystem::path& file, bool resume,
                                        snapshot_report& report) {
        using namespace std::chrono_literals;
        detail::qmp_client qmp;
        SUPERMACHINE_TRY(qmp.connect(config_.qmp_socket, 10s));
        // Ask before pausing: QEMU (>= 6.0) lists what blocks a migration, and
        // a refused snapshot must leave the guest untouched (a stop/cont
        // cycle restarts the vhost-user rings under live connections).
        if (auto info = qmp.execute("query-migrate", nullptr, 30s); info) {
            if (auto reasons = info.value().find("blocked-reasons");
                reasons != info.value().end() && reasons->is_array() && !reasons->empty()) {
                for (const auto& reason : *reasons) {
                    if (!report.refusal.empty()) report.refusal += "; ";
                    report.refusal += reason.is_string() ? reason.get<std::string>() : "blocked";
                }
                return success();
            }
        }
        SUPERMACHINE_TRY(qmp.execute("stop", nullptr, 30s));
        // Our devices' state at this pause: QEMU has stopped the vhost-user
        // rings (GET_VRING_BASE drained them) before "stop" returned.
        std::vector<std::vector<std::byte>> states;
        for (auto& d : devices_)
            states.push_back(d.save_state ? d.save_state() : std::vector<std::byte>{});
        if (!config_.memory_file.empty() && config_.memory_file_shared) {
            // RAM is the file itself: keep it out of the stream.
            const nlohmann::json caps{
                {"capabilities",
                 nlohmann::json::array({{{"capability", "x-ignore-shared"}, {"state", true}}})}};
            SUPERMACHINE_TRY(qmp.execute("migrate-set-capabilities", caps, 30s));
        }
        std::string refusal;
        const nlohmann::json migrate{{"uri", "exec:cat > " + detail::shell_quote_for_exec(file)}};
        auto started = qmp.execute("migrate", migrate, 30s, &refusal);
        if (!started && !refusal.empty()) {
            report.refusal = refusal;
            if (resume) (void)qmp.execute("cont", nullptr, 30s);
            return success();
        }
        if (!started) return started.error();
        for (auto deadline = std::chrono::steady_clock::now() + 300s;;) {
            SUPERMACHINE_TRY(status, qmp.execute("query-migrate", nullptr, 30s));
            const auto state = status.value("status", std::string());
            if (state == "completed") break;
            if (state == "failed" || state == "cancelled") {
                report.refusal = status.value("error-desc", std::string("migration ") + state);
                if (resume) (void)qmp.execute("cont", nullptr, 30s);
                return success();
            }
            if (std::chrono::steady_clock::now() > deadline) return errc::timeout;
            std::this_thread::sleep_for(20ms);
        }
        {
            std::ofstream out(file.string() + ".devices", std::ios::binary | std::ios::trunc);
            const auto count = static_cast<std::uint32_t>(states.size());
            out.write(reinterpret_cast<const char*>(&count), sizeof count);
            for (const auto& st : states) {
                const std::uint64_t size = st.size();
                out.write(reinterpret_cast<const char*>(&size), sizeof size);
                out.write(reinterpret_cast<const char*>(st.data()),
                          static_cast<std::streamsize>(size));
            }
            if (!out) return errc::io_error;
        }
        std::error_code ignored;
        report.bytes = std::filesystem::file_size(file, ignored);
        if (paused_step_) { // still paused: e.g. take the RAM file and the disk image
            auto step = std::move(paused_step_);
            paused_step_ = nullptr;
            if (auto r = step(); !r) {
                if (resume) (void)qmp.execute("cont", nullptr, 30s);
                return r.error();
            }
        }
        report.saved = true;
        if (resume) {
            auto resumed = qmp.execute("cont", nullptr, 30s);
            if (!resumed) return resumed.error();
        }
        return success();
    }

    /// One virtiofsd per shared directory (children of ours: they die with
    /// us), each listening on its socket before QEMU starts. Missing
    /// virtiofsd: engine_unavailable; one that exits or does not listen
    /// within 10 s: engine_failed, its stderr in diagnostics().
    result<void> start_file_servers() {
        if (config_.shared_directories.empty()) return success();
        const auto binary = detail::find_program(config_.virtiofsd_binary.string());
        if (!binary) {
            add_diagnostics("virtiofsd not found at " + config_.virtiofsd_binary.string() +
                            " (Debian: qemu-system-common)\n");
            return errc::engine_unavailable;
        }
        for (std::size_t i = 0; i < config_.shared_directories.size(); ++i) {
            const auto socket = detail::shared_directory_socket(runtime_directory_, i);
            std::error_code ignored;
            std::filesystem::remove(socket, ignored);
            // cache=auto: the guest sees host changes within a second (docker
            // semantics for a bind mount are immediate; "none" would cost
            // every lookup a round trip under TCG).
            const auto& shared = config_.shared_directories[i];
            std::vector<std::string> argv{binary->string(),
                                          "--socket-path=" + socket.string(),
                                          "-o",
                                          "source=" + shared.source.string(),
                                          "-o",
                                          "cache=auto",
                                          "-o",
                                          "log_level=warn"};
            if (shared.read_only) {
                // The C virtiofsd has no read-only mode, and a guest's root
                // can remount its side rw: so virtiofsd runs in a mount
                // namespace of its own where the directory is a read-only
                // bind mount of itself (the host's mounts are untouched;
                // the namespace ends with virtiofsd). Paths go to the shell
                // as "$1".., never into the script.
                const auto unshare = detail::find_program("unshare");
                if (!unshare) {
                    add_diagnostics("unshare (util-linux) not found: read-only volumes need it\n");
                    return errc::engine_unavailable;
                }
                argv = {unshare->string(),
                        "--mount",
                        "--propagation",
                        "private",
                        "/bin/sh",
                        "-c",
                        "mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\" && "
                        "exec \"$2\" --socket-path=\"$3\" -o source=\"$1\" -o cache=auto "
                        "-o log_level=warn",
                        "sh",
                        shared.source.string(),
                        binary->string(),
                        socket.string()};
            }
            SUPERMACHINE_TRY(child, detail::spawn(argv));
            file_servers_.push_back(child);
            drain_into_diagnostics(child.stdout_read);
            drain_into_diagnostics(child.stderr_read);
        }
        using namespace std::chrono_literals;
        for (std::size_t i = 0; i < file_servers_.size(); ++i) {
            const auto socket = detail::shared_directory_socket(runtime_directory_, i);
            for (auto deadline = std::chrono::steady_clock::now() + 10s;;) {
                std::error_code ec;
                if (std::filesystem::is_socket(socket, ec)) break;
                int status = 0;
                if (::waitpid(file_servers_[i].pid, &status, WNOHANG) == file_servers_[i].pid) {
                    file_servers_[i].pid = -1; // reaped
                    return errc::engine_failed;
                }
                if (std::chrono::steady_clock::now() > deadline) return errc::engine_failed;
                std::this_thread::sleep_for(1ms);
            }
        }
        return success();
    }

    void stop_file_servers(bool wait = true) noexcept {
        for (auto& server : file_servers_) {
            if (server.pid > 0) {
                ::kill(server.pid, SIGKILL);
                if (wait) ::waitpid(server.pid, nullptr, 0);
                else detail::reap_in_background(server.pid);
                server.pid = -1;
            }
            if (server.pidfd >= 0) ::close(server.pidfd);
            server.pidfd = -1;
        }
        for (auto& output : file_outputs_) { // pending reads end (operation_aborted)
            boost::system::error_code ignored;
            output->close(ignored);
        }
        file_outputs_.clear();
        file_servers_.clear();
    }

    /// Read a helper's output pipe into diagnostics() (so it never blocks on a full pipe).
    void drain_into_diagnostics(int fd) {
        auto stream = std::make_shared<boost::asio::posix::stream_descriptor>(executor_, fd);
        file_outputs_.push_back(stream);
        auto buffer = std::make_shared<std::array<char, 1024>>();
        auto read = std::make_shared<std::function<void()>>();
        *read = [this, stream, buffer, weak_read = std::weak_ptr<std::function<void()>>(read),
                 alive = std::weak_ptr<int>(alive_)] {
            stream->async_read_some(boost::asio::buffer(*buffer),
                                    [this, buffer, weak_read,
                                     alive](const boost::system::error_code& ec, std::size_t n) {
                                        if (alive.expired()) return;
                                        add_diagnostics({buffer->data(), n});
                                        if (auto again = weak_read.lock(); again && !ec) (*again)();
                                    });
        };
        file_readers_.push_back(read);
        (*read)();
    }

    result<void> ensure_runtime_directory() {
        if (!runtime_directory_.empty()) return success();
        // Locked while we live; a killed run's is removed by the next start.
        SUPERMACHINE_TRY(made, ::supermachine::detail::make_runtime_directory("supermachine-qemu"));
        runtime_directory_ = made.path;
        runtime_owner_ = std::move(made.owner);
        return success();
    }

    void accept(attached_device& d) {
        d.acceptor->async_accept([this, &d, alive = std::weak_ptr<int>(alive_)](
                                     const boost::system::error_code& ec, local::socket socket) {
            if (ec || alive.expired()) return;
            d.serve(std::move(socket));
            // One front-end per device; QEMU reconnects only after a restart.
        });
    }

    void read_console() {
        stdout_->async_read_some(boost::asio::buffer(console_buffer_),
                                 [this, alive = std::weak_ptr<int>(alive_)](
                                     const boost::system::error_code& ec, std::size_t n) {
                                     if (alive.expired()) return;
                                     if (n && console_)
                                         console_(std::string_view(console_buffer_.data(), n));
                                     if (ec) {
                                         console_closed_ = true;
                                         maybe_finish();
                                         return;
                                     }
                                     read_console();
                                 });
    }

    /// QEMU's and its helpers' messages, kept as a bounded tail (16 KiB).
    void add_diagnostics(std::string_view text) {
        std::lock_guard lock(diagnostics_mutex_);
        diagnostics_.append(text);
        if (diagnostics_.size() > 16384) diagnostics_.erase(0, diagnostics_.size() - 16384);
    }

    void read_diagnostics() {
        stderr_->async_read_some(boost::asio::buffer(diagnostics_buffer_),
                                 [this, alive = std::weak_ptr<int>(alive_)](
                                     const boost::system::error_code& ec, std::size_t n) {
                                     if (alive.expired()) return;
                                     add_diagnostics({diagnostics_buffer_.data(), n});
                                     if (!ec) read_diagnostics();
                                 });
    }

    // The restore monitor's answers: drained so they never fill the socket;
    // a QMP error (a refused capability or stream) joins the diagnostics.
    void read_restore_monitor() {
        restore_monitor_->async_read_some(
            boost::asio::buffer(monitor_buffer_),
            [this, alive = std::weak_ptr<int>(alive_)](const boost::system::error_code& ec,
                                                       std::size_t n) {
                if (alive.expired()) return;
                const std::string_view answer(monitor_buffer_.data(), n);
                if (answer.find("\"RESUME\"") != std::string_view::npos)
                    supermachine::detail::trace_point("guest resumed (stream loaded)");
                if (answer.find("\"error\"") != std::string_view::npos) add_diagnostics(answer);
                if (!ec) read_restore_monitor();
            });
    }

    // QEMU's exit, seen on its pidfd. A wake-up is only a hint: the reactor
    // may report an fd whose number and state were recycled (an epoll
    // registration outlives a close while a forked child, not yet exec'd,
    // still holds the old file). So reap without blocking and wait again if
    // QEMU still runs; a blocking waitpid here once hung the executor on a
    // live QEMU (pool_test, CI).
    void watch_exit() {
        pidfd_->async_wait(
            boost::asio::posix::stream_descriptor::wait_read,
            [this, alive = std::weak_ptr<int>(alive_)](const boost::system::error_code& ec) {
                if (ec || alive.expired()) return;
                if (!reap_if_exited()) return watch_exit();
                maybe_finish();
            });
    }

    bool reap_if_exited() noexcept {
        if (child_.pid <= 0 || exited_) return true;
        int status = 0;
        pid_t reaped;
        do
            reaped = ::waitpid(child_.pid, &status, WNOHANG);
        while (reaped < 0 && errno == EINTR);
        if (reaped == 0) return false; // still running: a spurious wake-up
        exited_ = true;
        // Not ours to reap any more (ECHILD: someone else's waitpid took it):
        // gone all the same, its status unknown (-1), so waiters still finish.
        exit_status_ = reaped != child_.pid ? -1
                       : WIFEXITED(status)  ? WEXITSTATUS(status)
                                            : 128 + WTERMSIG(status);
        return true;
    }

    void maybe_finish() {
        if (!exited_ || !console_closed_ || waiters_.empty()) return;
        auto waiters = std::move(waiters_);
        waiters_.clear();
        for (auto& w : waiters)
            boost::asio::post(executor_, [w = std::move(w), status = exit_status_] {
                w(error_code{}, status);
            });
    }

    executor_type executor_;
    qemu_config config_;
    std::filesystem::path runtime_directory_;
    ::supermachine::detail::unique_fd runtime_owner_; // held while the directory is ours
    std::vector<attached_device> devices_;
    detail::child_process child_;
    std::vector<detail::child_process> file_servers_; // virtiofsd, one per shared directory
    std::vector<std::shared_ptr<boost::asio::posix::stream_descriptor>> file_outputs_;
    std::vector<std::shared_ptr<std::function<void()>>> file_readers_;
    bool use_kvm_ = false;
    bool exited_ = false;
    bool console_closed_ = false;
    int exit_status_ = -1;
    console_sink console_;
    std::unique_ptr<boost::asio::posix::stream_descriptor> stdout_, stderr_, pidfd_;
    std::unique_ptr<boost::asio::posix::stream_descriptor> restore_monitor_;
    std::array<char, 1024> monitor_buffer_{};
    std::array<char, 4096> console_buffer_{};
    std::array<char, 1024> diagnostics_buffer_{};
    mutable std::mutex diagnostics_mutex_;
    std::string diagnostics_;
    std::vector<std::function<void(error_code, int)>> waiters_;
    std::thread snapshot_thread_;
    std::function<result<void>()> paused_step_;
    std::atomic<std::chrono::steady_clock::time_point> resumed_at_{};
    std::shared_ptr<int> alive_ = std::make_shared<int>(0);
};

/// The one stderr line when a snapshot cannot be taken on this engine and
/// the caller falls back to a cold boot.
inline void explain_snapshot_fallback(const qemu_machine::snapshot_report& report,
                                      std::ostream& out = std::cerr) {
    out << "supermachine: qemu engine cannot snapshot (" << report.refusal
        << "); cold boot instead\n";
}

// ---------------------------------------------------------------- CLI entry

struct qemu_boot_options {
    qemu_config qemu;
    std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

/// Boot under QEMU until the guest powers off (or the timeout), console to
/// `console`. Returns QEMU's exit status; 124 on timeout, 127 when QEMU is
/// missing; errors are explained in one line on stderr.
/// The CLI's `supermachine boot --engine qemu` calls this.
inline int run_qemu_boot(const qemu_boot_options& options,
                         std::function<void(std::string_view)> console) {
    boost::asio::io_context io;
    qemu_machine vm(io.get_executor(), options.qemu);
    if (auto started = vm.start(std::move(console)); !started) {
        std::cerr << "supermachine: qemu engine: " << started.error().message() << "\n";
        return started.error() == make_error_code(errc::engine_unavailable) ? 127 : 1;
    }
    int status = -1;
    bool timed_out = false;
    boost::asio::steady_timer timer(io, options.timeout);
    timer.async_wait([&](const boost::system::error_code& ec) {
        if (ec) return;
        timed_out = true;
        vm.kill();
    });
    vm.async_wait([&](error_code, int s) {
        status = s;
        timer.cancel();
    });
    io.run();
    if (timed_out) {
        std::cerr << "supermachine: qemu engine: timed out after " << options.timeout.count()
                  << " ms\n";
        return 124;
    }
    if (status != 0) {
        auto d = vm.diagnostics();
        if (!d.empty()) std::cerr << d;
    }
    return status;
}

} // namespace supermachine::backend
