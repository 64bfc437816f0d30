#pragma once
// What `supermachine run` and `supermachine boot --disk ROOT -- CMD` share:
// the docker-style options that say what to run and how (-e -w -u -i -t -p
// -v --timeout), parsed in one place, and the driver that runs the command in a
// started vm (ports, signals, streaming, exit status, stopping the VM).
#include "exec_session.hpp"

#include <supermachine/agent/protocol.hpp>
#include <supermachine/oci/process.hpp>
#include <supermachine/shared_directory.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <sys/ioctl.h>
#include <unistd.h>

#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::cli {

struct port_mapping {
    std::uint16_t host = 0, guest = 0;
};

/// docker's -p forms: GUEST, HOST:GUEST, 127.0.0.1:HOST:GUEST, each with an optional /tcp.
inline std::optional<port_mapping> parse_port(std::string_view text) {
    auto number = [](std::string_view s) -> std::optional<std::uint16_t> {
        unsigned v = 0;
        auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (ec != std::errc() || end != s.data() + s.size() || v > 65535) return std::nullopt;
        return static_cast<std::uint16_t>(v);
    };
    if (text.ends_with("/tcp")) text.remove_suffix(4);
    if (text.starts_with("127.0.0.1:")) text.remove_prefix(10);
    const auto colon = text.find(':');
    if (colon == std::string_view::npos) {
        auto p = number(text);
        if (!p || *p == 0) return std::nullopt;
        return port_mapping{*p, *p};
    }
    auto host = number(text.substr(0, colon));
    auto guest = number(text.substr(colon + 1));
    if (!host || !guest || *guest == 0) return std::nullopt;
    return port_mapping{*host, *guest};
}

/// The shared options, as given on the command line.
struct exec_cli_options {
    oci::process_overrides overrides;      // -e, -w, -u (command and entrypoint: the caller's)
    std::vector<port_mapping> ports;       // -p
    bool interactive = false;              // -i
    bool tty = false;                      // -t
    std::uint32_t timeout_seconds = 0;     // --timeout: kill the command after this long (0: never)
    std::vector<shared_directory> volumes; // -v, checked (host path resolved)

    /// Whether any option that only means something with a command was given.
    bool any_command_option() const {
        return !overrides.env.empty() || overrides.working_dir || overrides.user ||
               !ports.empty() || interactive || tty || !volumes.empty();
    }
};

inline constexpr const char* exec_options_usage =
    "  -e, --env KEY[=VALUE]   set an environment variable (KEY alone: the host's value)\n"
    "  -w, --workdir DIR       working directory in the guest\n"
    "  -u, --user USER[:GROUP] user to run as (name or id)\n"
    "  -p, --publish HOST:GUEST  forward 127.0.0.1:HOST to the guest's port GUEST\n"
    "  -v, --volume HOST:GUEST[:ro|:rw]  mount the host directory HOST at GUEST (virtio-fs;\n"
    "                          a relative HOST is from the current directory; up to 8;\n"
    "                          such a run cold boots: volumes are not snapshotted)\n"
    "  -i, --interactive       forward stdin\n"
    "  -t, --tty               allocate a terminal in the guest\n"
    "      --timeout SECONDS   kill the command after this long\n";

enum class option_parse { not_ours, taken, bad };

/// Try args[i] as one of the shared options, consuming its value (i moves
/// on). `bad`: one line naming the problem is already on stderr, as `who: ...`.
inline option_parse parse_exec_option(std::span<char*> args, std::size_t& i,
                                      exec_cli_options& options, std::string_view who) {
    const std::string_view a = args[i];
    // Combined short flags: -it, -ti, -i, -t.
    if (a.size() > 1 && a[0] == '-' && a[1] != '-' &&
        a.find_first_not_of("it", 1) == std::string_view::npos) {
        options.interactive |= a.find('i') != std::string_view::npos;
        options.tty |= a.find('t') != std::string_view::npos;
        return option_parse::taken;
    }
    if (a == "--interactive") {
        options.interactive = true;
        return option_parse::taken;
    }
    if (a == "--tty") {
        options.tty = true;
        return option_parse::taken;
    }
    const bool takes_value = a == "-e" || a == "--env" || a == "-w" || a == "--workdir" ||
                             a == "-u" || a == "--user" || a == "-p" || a == "--publish" ||
                             a == "-v" || a == "--volume" || a == "--timeout";
    if (!takes_value) return option_parse::not_ours;
    auto fail = [&](const char* what, std::string_view value) {
        std::fprintf(stderr, "%.*s: %.*s%s%.*s\n", static_cast<int>(who.size()), who.data(),
                     static_cast<int>(a.size()), a.data(), what, static_cast<int>(value.size()),
                     value.data());
        return option_parse::bad;
    };
    if (i + 1 >= args.size()) return fail(" needs a value", "");
    const std::string_view v = args[++i];
    if (a == "-e" || a == "--env") {
        if (v.empty() || v.front() == '=') return fail(": need KEY or KEY=VALUE, not ", v);
        options.overrides.env.emplace_back(v);
    } else if (a == "-w" || a == "--workdir") {
        if (!v.starts_with('/')) return fail(": need an absolute path, not ", v);
        options.overrides.working_dir = std::string(v);
    } else if (a == "-u" || a == "--user") {
        options.overrides.user = std::string(v);
    } else if (a == "-p" || a == "--publish") {
        auto p = parse_port(v);
        if (!p) return fail(": bad port mapping (want HOST:GUEST): ", v);
        options.ports.push_back(*p);
    } else if (a == "-v" || a == "--volume") {
        if (options.volumes.size() >= max_shared_directories)
            return fail(": too many volumes (at most 8): ", v);
        std::error_code ec;
        const auto cwd = std::filesystem::current_path(ec);
        std::string why;
        auto volume = parse_volume_spec(v, cwd, &why);
        if (!volume) return fail((": " + why).c_str(), "");
        if (auto valid = validate_shared_directory(volume.value(), &why); !valid)
            return fail((": " + why).c_str(), "");
        options.volumes.push_back(std::move(volume).value());
    } else { // --timeout
        std::uint32_t seconds = 0;
        auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), seconds);
        if (ec != std::errc() || end != v.data() + v.size() || seconds > 100'000'000)
            return fail(": need a number of seconds, not ", v);
        options.timeout_seconds = seconds;
    }
    return option_parse::taken;
}

/// The agent request for `process` with the shared options' tty and timeout.
inline agent::exec_request make_exec_request(const oci::process_spec& process,
                                             const exec_cli_options& options) {
    agent::exec_request request;
    request.argv = process.argv;
    request.env = process.env;
    request.cwd = process.working_dir;
    request.uid = process.user.uid;
    request.gid = process.user.gid;
    request.groups = process.user.supplementary_gids;
    request.timeout_ms = options.timeout_seconds * 1000u;
    if (options.tty) {
        winsize size{};
        if (::isatty(1) && ::ioctl(1, TIOCGWINSZ, &size) == 0 && size.ws_row > 0)
            request.tty = agent::tty_size{size.ws_row, size.ws_col};
        else
            request.tty = agent::tty_size{24, 80};
    }
    return request;
}

/// A vm that did not come up, on stderr: "WHO: the VM did not come up:
/// ERROR[: the vm's sentence (e.g. a missing helper program)]", then the
/// tail of its console.
inline void report_start_failure(std::string_view who, std::error_code ec,
                                 const std::shared_ptr<vm>& started) {
    const std::string detail = started && !started->failure_detail().empty()
                                   ? ": " + started->failure_detail()
                                   : std::string();
    std::fprintf(stderr, "%.*s: the VM did not come up: %s%s\n", static_cast<int>(who.size()),
                 who.data(), ec.message().c_str(), detail.c_str());
    if (started) std::fprintf(stderr, "%s", started->console_tail().c_str());
}

/// Drives one command in a vm on a single-threaded io_context, the way
/// `docker run` behaves: construct it before starting the VM (so ^C during
/// boot stops us too), call start() once the VM is up, then run().
/// run() returns the command's status (128 + N when killed by signal N),
/// 128 + N when we were stopped by SIGINT/SIGTERM/SIGHUP, or what fail() set.
/// The VM is killed on every way out.
class vm_command {
public:
    explicit vm_command(boost::asio::io_context& io)
        : io_(io)
        , stop_signals_(io, SIGINT, SIGTERM, SIGHUP) {
        // A closed stdout must end the run through our own path (which stops
        // QEMU), not kill us by SIGPIPE.
        ::signal(SIGPIPE, SIG_IGN);
        stop_signals_.async_wait([this](boost::system::error_code e, int signo) {
            if (e) return;
            status_ = 128 + signo; // like docker run / a shell: 130 for ^C, 143 for SIGTERM
            stop();
        });
    }

    /// Forward the -p ports, then run `request` (stdin forwarded with -i).
    void start(std::shared_ptr<vm> machine, agent::exec_request request,
               const exec_cli_options& options, std::string_view who) {
        machine_ = std::move(machine);
        for (const auto& p : options.ports) {
            auto bound = machine_->expose_tcp(p.host, p.guest);
            if (!bound) {
                std::fprintf(stderr, "%.*s: cannot listen on 127.0.0.1:%u: %s\n",
                             static_cast<int>(who.size()), who.data(), p.host,
                             bound.error().message().c_str());
                return fail(125);
            }
        }
        exec_session<vm::socket_type>::start(machine_->agent(), std::move(request),
                                             options.interactive, [this](int exit_status) {
                                                 auto end = [this](int status) {
                                                     status_ = status;
                                                     stop();
                                                 };
                                                 auto after = std::move(after_command_);
                                                 after_command_ = nullptr;
                                                 if (after)
                                                     return after(machine_, exit_status, end);
                                                 end(exit_status);
                                             });
    }

    /// Once the command has ended and before the vm stops (e.g. to snapshot
    /// it): `after(vm, command_status, finish)`; the run ends with
    /// finish(status). A stop signal meanwhile still ends it at once.
    void
    after_command(std::function<void(std::shared_ptr<vm>, int, std::function<void(int)>)> after) {
        after_command_ = std::move(after);
    }

    /// End now with `status` (e.g. 125: the VM did not come up).
    void fail(int status) {
        status_ = status;
        stop();
    }

    /// Run the io_context until the command ends; the terminal is raw for -i -t.
    int run(const exec_cli_options& options) {
        raw_terminal raw(options.tty && options.interactive);
        io_.run();
        return status_;
    }

private:
    void stop() {
        boost::system::error_code ignored;
        stop_signals_.cancel(ignored);
        if (machine_) machine_->kill();
        io_.stop();
    }

    boost::asio::io_context& io_;
    boost::asio::signal_set stop_signals_;
    std::shared_ptr<vm> machine_;
    std::function<void(std::shared_ptr<vm>, int, std::function<void(int)>)> after_command_;
    int status_ = 125;
};

} // namespace supermachine::cli
