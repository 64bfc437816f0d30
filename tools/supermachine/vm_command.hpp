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
#include <sys/random.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
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

/// The shared options, as given on the command line.
struct exec_cli_options {
    oci::process_overrides overrides;          // -e, -w, -u (command and entrypoint: the caller's)
    std::vector<published_port> ports;         // -p
    network_mode network = network_mode::user; // --network (run; restore: the snapshot's)
    std::vector<extra_host> add_hosts;         // --add-host
    bool interactive = false;                  // -i
    bool tty = false;                          // -t
    std::uint32_t timeout_seconds = 0;     // --timeout: kill the command after this long (0: never)
    std::vector<shared_directory> volumes; // -v, checked (host path resolved)
    std::string hostname;                  // --hostname; default: a random 12-hex id, like docker's
    std::vector<agent::resource_limit> limits; // --ulimit, in order (a later one of a name wins)

    /// Whether any option that only means something with a command was given.
    bool any_command_option() const {
        return !overrides.env.empty() || overrides.working_dir || overrides.user ||
               !ports.empty() || interactive || tty || !volumes.empty() || !hostname.empty() ||
               !limits.empty() || !add_hosts.empty();
    }
};

inline constexpr const char* exec_options_usage =
    "  -e, --env KEY[=VALUE]   set an environment variable (KEY alone: the host's value)\n"
    "  -w, --workdir DIR       working directory in the guest\n"
    "  -u, --user USER[:GROUP] user to run as (name or id)\n"
    "  -p, --publish [IP:]HOST:GUEST[/tcp|/udp]  forward HOST (on IP, default every\n"
    "                          interface) to the guest's port GUEST; several allowed\n"
    "      --network MODE      default (user-mode NAT: eth0 10.0.2.15, gateway 10.0.2.2)\n"
    "                          or none (no network device; -p is refused)\n"
    "      --add-host NAME:IP  an /etc/hosts line; IP host-gateway: 10.0.2.2, through\n"
    "                          which the guest reaches the host's loopback (without\n"
    "                          such an entry the host's loopback is unreachable)\n"
    "  -v, --volume HOST:GUEST[:ro|:rw]  mount the host directory HOST at GUEST (virtio-fs;\n"
    "                          a relative HOST is from the current directory; up to 8;\n"
    "                          such a run cold boots: volumes are not snapshotted)\n"
    "  -i, --interactive       forward stdin\n"
    "  -t, --tty               allocate a terminal in the guest\n"
    "      --timeout SECONDS   kill the command after this long\n"
    "      --hostname NAME     the guest's hostname (default: a random id, like docker's)\n"
    "      --ulimit NAME=SOFT[:HARD]  a resource limit (nofile, nproc, core, stack, ...;\n"
    "                          -1: unlimited); default nofile=1048576, as docker\n";

/// docker's --ulimit NAME=SOFT[:HARD]: HARD defaults to SOFT; -1 is unlimited.
inline std::optional<agent::resource_limit> parse_ulimit(std::string_view text) {
    static constexpr std::pair<std::string_view, int> names[] = {{"as", RLIMIT_AS},
                                                                 {"core", RLIMIT_CORE},
                                                                 {"cpu", RLIMIT_CPU},
                                                                 {"data", RLIMIT_DATA},
                                                                 {"fsize", RLIMIT_FSIZE},
                                                                 {"locks", RLIMIT_LOCKS},
                                                                 {"memlock", RLIMIT_MEMLOCK},
                                                                 {"msgqueue", RLIMIT_MSGQUEUE},
                                                                 {"nice", RLIMIT_NICE},
                                                                 {"nofile", RLIMIT_NOFILE},
                                                                 {"nproc", RLIMIT_NPROC},
                                                                 {"rss", RLIMIT_RSS},
                                                                 {"rtprio", RLIMIT_RTPRIO},
                                                                 {"rttime", RLIMIT_RTTIME},
                                                                 {"sigpending", RLIMIT_SIGPENDING},
                                                                 {"stack", RLIMIT_STACK}};
    const auto eq = text.find('=');
    if (eq == std::string_view::npos) return std::nullopt;
    const auto name = text.substr(0, eq);
    auto value = [](std::string_view s) -> std::optional<std::uint64_t> {
        if (s == "-1") return ~std::uint64_t{0};
        std::uint64_t v = 0;
        auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
        return v;
    };
    const auto values = text.substr(eq + 1);
    const auto colon = values.find(':');
    auto soft = value(values.substr(0, colon));
    auto hard = colon == std::string_view::npos ? soft : value(values.substr(colon + 1));
    if (!soft || !hard || *soft > *hard) return std::nullopt;
    for (const auto& [known, resource] : names)
        if (known == name)
            return agent::resource_limit{static_cast<std::uint32_t>(resource), *soft, *hard};
    return std::nullopt;
}

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
                             a == "-v" || a == "--volume" || a == "--timeout" ||
                             a == "--hostname" || a == "--ulimit" || a == "--network" ||
                             a == "--net" || a == "--add-host";
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
        auto p = parse_published_port(v);
        if (!p) return fail(": bad port mapping (want [IP:]HOST:GUEST[/tcp|/udp]): ", v);
        options.ports.push_back(*p);
    } else if (a == "--network" || a == "--net") {
        if (v == "none")
            options.network = network_mode::none;
        else if (v == "default" || v == "bridge" || v == "slirp")
            options.network = network_mode::user;
        else
            return fail(": need none or default, not ", v);
    } else if (a == "--add-host") {
        auto h = parse_extra_host(v);
        if (!h) return fail(": need NAME:IP or NAME:host-gateway, not ", v);
        options.add_hosts.push_back(*h);
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
    } else if (a == "--ulimit") {
        auto limit = parse_ulimit(v);
        if (!limit) return fail(": need NAME=SOFT[:HARD] (e.g. nofile=1024:4096), not ", v);
        options.limits.push_back(*limit);
    } else if (a == "--hostname") {
        if (!agent::valid_hostname(v))
            return fail(": need a hostname (letters, digits, '-'; at most 63), not ", v);
        options.hostname = std::string(v);
    } else { // --timeout
        std::uint32_t seconds = 0;
        auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), seconds);
        if (ec != std::errc() || end != v.data() + v.size() || seconds > 100'000'000)
            return fail(": need a number of seconds, not ", v);
        options.timeout_seconds = seconds;
    }
    return option_parse::taken;
}

/// docker's words for a -u naming a user or group the image lacks (make_process's
/// errc::not_found): "unable to find user NAME: no matching entries in passwd
/// file", or the same for the group.
inline std::string unknown_user_message(std::string_view spec, std::string_view passwd_text) {
    const auto colon = spec.find(':');
    const auto user = spec.substr(0, colon);
    bool user_known =
        user.empty() || user.find_first_not_of("0123456789") == std::string_view::npos;
    for (const auto& entry : oci::parse_passwd(passwd_text))
        user_known |= entry.name == user;
    if (!user_known || colon == std::string_view::npos)
        return "unable to find user " + std::string(user) + ": no matching entries in passwd file";
    return "unable to find group " + std::string(spec.substr(colon + 1)) +
           ": no matching entries in group file";
}

/// The agent request for `process` with the shared options' tty and timeout.
inline agent::exec_request make_exec_request(const oci::process_spec& process,
                                             const exec_cli_options& options) {
    agent::exec_request request;
    request.argv = process.argv;
    request.env = process.env;
    request.cwd = process.working_dir;
    request.make_cwd = true; // docker run creates a missing working directory
    request.uid = process.user.uid;
    request.gid = process.user.gid;
    request.groups = process.user.supplementary_gids;
    request.timeout_ms = options.timeout_seconds * 1000u;
    // docker's default (containerd's spec): nofile 1048576 unless --ulimit names it.
    if (std::none_of(options.limits.begin(), options.limits.end(),
                     [](const auto& l) { return l.resource == RLIMIT_NOFILE; }))
        request.limits.push_back({RLIMIT_NOFILE, 1u << 20, 1u << 20});
    request.limits.insert(request.limits.end(), options.limits.begin(), options.limits.end());
    if (options.tty) {
        // docker: TERM=xterm with -t, unless the image or -e set one.
        if (std::none_of(request.env.begin(), request.env.end(),
                         [](const std::string& e) { return e.starts_with("TERM="); }))
            request.env.push_back("TERM=xterm");
        winsize size{};
        if (::isatty(1) && ::ioctl(1, TIOCGWINSZ, &size) == 0 && size.ws_row > 0)
            request.tty = agent::tty_size{size.ws_row, size.ws_col};
        else
            request.tty = agent::tty_size{24, 80};
    }
    return request;
}

/// docker's default hostname: the container id's first 12 hex digits; ours is random.
inline std::string random_hostname() {
    unsigned char bytes[6] = {};
    if (::getrandom(bytes, sizeof bytes, 0) != static_cast<ssize_t>(sizeof bytes))
        return "supermachine";
    static constexpr char hex[] = "0123456789abcdef";
    std::string name;
    for (unsigned char b : bytes) {
        name += hex[b >> 4];
        name += hex[b & 15];
    }
    return name;
}

/// A vm that did not come up, on stderr: "WHO: the VM did not come up:
/// ERROR[: the vm's sentence (e.g. a missing helper program)]", then the
/// tail of its console.
inline void report_start_failure(std::string_view who, supermachine::error_code ec,
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
/// Signals (docker's --sig-proxy): before the command runs, SIGINT, SIGTERM,
/// SIGHUP and SIGQUIT stop us (128 + N); once it runs, they and SIGUSR1/2
/// go to the command, whose status is ours; a second SIGINT within a second
/// kills the VM (130). With -t, SIGWINCH resizes the guest's terminal.
/// run() returns the command's status (128 + N when killed by signal N), or
/// what stop or fail() set. The VM is killed on every way out.
class vm_command {
public:
    explicit vm_command(boost::asio::io_context& io)
        : io_(io)
        , stop_signals_(io, SIGINT, SIGTERM, SIGHUP) {
        // A closed stdout must end the run through our own path (which stops
        // QEMU), not kill us by SIGPIPE.
        ::signal(SIGPIPE, SIG_IGN);
        boost::system::error_code ignored;
        for (int signo : {SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH})
            stop_signals_.add(signo, ignored);
        wait_for_signal();
    }

    /// Forward the -p ports, then run `request` (stdin forwarded with -i).
    void start(std::shared_ptr<vm> machine, agent::exec_request request,
               const exec_cli_options& options, std::string_view who) {
        machine_ = std::move(machine);
        // Raw only now: every progress line of the start is already out.
        if (options.tty && options.interactive) raw_.emplace(true);
        // Ports the vm did not publish itself (vm_options::publish, the
        // user network's): forwarded over the agent channel, TCP only.
        for (const auto& p : options.ports) {
            auto bound = p.udp ? result<std::uint16_t>(errc::not_supported)
                               : machine_->expose_tcp(p.host_port, p.guest_port, p.host_address);
            if (!bound) {
                std::fprintf(stderr, "%.*s: cannot listen on %s:%u%s: %s\n",
                             static_cast<int>(who.size()), who.data(), p.host_address.c_str(),
                             p.host_port, p.udp ? "/udp" : "", bound.error().message().c_str());
                return fail(125);
            }
        }
        // The hostname first: the agent serves frames in order, so it is set
        // before the command starts, without waiting for the answer.
        const std::string hostname =
            options.hostname.empty() ? random_hostname() : options.hostname;
        if (std::none_of(request.env.begin(), request.env.end(),
                         [](const std::string& e) { return e.starts_with("HOSTNAME="); }))
            request.env.push_back("HOSTNAME=" + hostname);
        machine_->async_set_hostname(hostname, [who = std::string(who)](supermachine::error_code ec) {
            if (ec && ec != errc::cancelled && ec != errc::agent_unavailable)
                std::fprintf(stderr, "%s: cannot set the hostname: %s\n", who.c_str(),
                             ec.message().c_str());
        });
        tty_ = options.tty;
        session_ = exec_session<vm::socket_type>::start(
            machine_->agent(), std::move(request), options.interactive, [this](int exit_status) {
                auto end = [this](int status) {
                    status_ = status;
                    stop();
                };
                auto after = std::move(after_command_);
                after_command_ = nullptr;
                if (after) return after(machine_, exit_status, end);
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

    /// Run the io_context until the command ends; the terminal is raw for -i -t
    /// from the command's start (start()) to its end.
    int run(const exec_cli_options&) {
        io_.run();
        raw_.reset();
        return status_;
    }

private:
    void wait_for_signal() {
        stop_signals_.async_wait([this](boost::system::error_code e, int signo) {
            if (e) return;
            on_signal(signo);
            if (!stopped_) wait_for_signal();
        });
    }

    void on_signal(int signo) {
        using clock = std::chrono::steady_clock;
        if (signo == SIGWINCH) {
            winsize size{};
            if (session_ && tty_ && ::isatty(1) && ::ioctl(1, TIOCGWINSZ, &size) == 0)
                session_->resize({size.ws_row, size.ws_col});
            return;
        }
        if (!session_ || !session_->started()) { // nothing runs yet: a stop signal stops us
            if (signo == SIGUSR1 || signo == SIGUSR2) return;
            status_ = 128 + signo; // like docker run / a shell: 130 for ^C, 143 for SIGTERM
            return stop();
        }
        if (signo == SIGINT) {
            const auto now = clock::now();
            if (last_interrupt_ && now - *last_interrupt_ < std::chrono::seconds(1)) {
                status_ = 128 + SIGINT; // the second ^C: the VM goes, the command with it
                return stop();
            }
            last_interrupt_ = now;
        }
        session_->signal(signo); // its status, when it ends, is ours
    }

    void stop() {
        stopped_ = true;
        raw_.reset();
        boost::system::error_code ignored;
        stop_signals_.cancel(ignored);
        if (machine_) machine_->kill();
        io_.stop();
    }

    boost::asio::io_context& io_;
    std::optional<raw_terminal> raw_;
    boost::asio::signal_set stop_signals_;
    std::shared_ptr<vm> machine_;
    std::shared_ptr<exec_session<vm::socket_type>> session_;
    bool tty_ = false;
    bool stopped_ = false;
    std::optional<std::chrono::steady_clock::time_point> last_interrupt_;
    std::function<void(std::shared_ptr<vm>, int, std::function<void(int)>)> after_command_;
    int status_ = 125;
};

} // namespace supermachine::cli
