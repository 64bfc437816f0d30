// supermachine run [OPTIONS] IMAGE [COMMAND [ARG...]]
// Like `docker run`: pull if needed, build (or reuse) the root filesystem,
// boot a microVM, run the image's process (or COMMAND) through the guest
// agent, stream its output, and exit with its status.
#include "command.hpp"
#include "exec_session.hpp"
#include "vm_command.hpp"
#include "warm_start.hpp"

#include <supermachine/detail/trace.hpp>

#include <supermachine/image.hpp>
#include <supermachine/oci/process.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>

#include <sys/ioctl.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

namespace {

namespace sm = supermachine;

int usage() {
    std::fprintf(
        stderr,
        "usage: supermachine run [OPTIONS] IMAGE [COMMAND [ARG...]]\n"
        "%s"
        "      --rm                accepted (every run is ephemeral: writes go to memory)\n"
        "  -m, --memory SIZE       guest memory (512m, 1g; default 512m)\n"
        "      --cpus N            vCPUs (default 1)\n"
        "      --entrypoint CMD    override the image's entrypoint\n"
        "      --platform OS/ARCH  image platform (default linux/amd64)\n"
        "      --engine E          kvm | qemu | auto (default auto)\n"
        "      --insecure          allow plain HTTP / unverified TLS registries\n"
        "  -q, --quiet             no progress output, not even at a terminal\n"
        "      --verbose           say how the VM started (warm or cold, engine); also\n"
        "                          with SUPERMACHINE_TRACE set\n"
        "      --console           show the guest console on stderr\n"
        "      --no-snapshot       cold boot (do not use or create the cached snapshot)\n"
        "      --disk FILE[:ro]    a data disk (raw file or block device): /dev/vdb, ... in\n"
        "                          order; writes reach FILE unless :ro (a cold boot)\n"
        "      --devtmpfs          give the command the kernel's devtmpfs as /dev, not a\n"
        "                          container's minimal one\n"
        "      --snapshot-dir DIR  restore the warm snapshot in DIR (created there if missing)\n"
        "IMAGE: a registry reference, oci:DIR[:TAG] or docker-archive:FILE[:NAME:TAG]\n",
        sm::cli::exec_options_usage);
    return 125;
}

// docker's size syntax: 512m, 1g, 1073741824 (bytes), or a plain MiB count below 1 MiB.
std::optional<std::uint32_t> parse_memory_mib(std::string_view text) {
    std::uint64_t value = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc() || value == 0) return std::nullopt;
    std::string_view unit(end, static_cast<std::size_t>(text.data() + text.size() - end));
    std::uint64_t mib;
    if (unit.empty())
        mib = value >= (1u << 20) ? value >> 20 : value;
    else if (unit == "m" || unit == "M" || unit == "mb" || unit == "MiB")
        mib = value;
    else if (unit == "g" || unit == "G" || unit == "gb" || unit == "GiB")
        mib = value << 10;
    else
        return std::nullopt;
    if (mib < 64 || mib > (1u << 20)) return std::nullopt;
    return static_cast<std::uint32_t>(mib);
}

int run_run(std::span<char*> args) {
    sm::cli::exec_cli_options exec;
    sm::vm_options vm_options;
    sm::image_options image_options;
    // Quiet by default, as docker: stderr carries the command's own output and
    // real errors; progress (pulls, rootfs builds, the first snapshot) only at
    // a terminal, and always before the terminal goes raw; the rest --verbose.
    bool quiet = false, console = false, verbose = false;
    if (const char* trace = std::getenv("SUPERMACHINE_TRACE"); trace && *trace && *trace != '0')
        verbose = true;
    std::string image_name;
    sm::cli::warm_start_options warm;

    std::size_t i = 0;
    auto value = [&](std::string_view flag) -> const char* {
        if (i + 1 >= args.size()) {
            std::fprintf(stderr, "supermachine run: %.*s needs a value\n",
                         static_cast<int>(flag.size()), flag.data());
            return nullptr;
        }
        return args[++i];
    };
    for (; i < args.size(); ++i) {
        std::string_view a = args[i];
        if (!a.starts_with('-') || a == "-") break;
        if (a == "--") {
            ++i;
            break;
        }
        switch (sm::cli::parse_exec_option(args, i, exec, "supermachine run")) {
        case sm::cli::option_parse::taken:
            continue;
        case sm::cli::option_parse::bad:
            return 125;
        case sm::cli::option_parse::not_ours:
            break;
        }
        const char* v = nullptr;
        if (a == "--rm") {
        } else if (a == "-m" || a == "--memory") {
            if (!(v = value(a))) return usage();
            auto mib = parse_memory_mib(v);
            if (!mib) {
                std::fprintf(stderr, "supermachine run: bad memory size '%s' (64m..1024g)\n", v);
                return 125;
            }
            vm_options.memory_mib = *mib;
        } else if (a == "--cpus") {
            if (!(v = value(a))) return usage();
            unsigned n = 0;
            auto [end, ec] = std::from_chars(v, v + std::strlen(v), n);
            if (ec != std::errc() || *end || n < 1 || n > 64) {
                std::fprintf(stderr, "supermachine run: bad --cpus '%s' (1..64)\n", v);
                return 125;
            }
            vm_options.cpus = n;
        } else if (a == "--entrypoint") {
            if (!(v = value(a))) return usage();
            exec.overrides.entrypoint = v;
        } else if (a == "--platform") {
            if (!(v = value(a))) return usage();
            auto p = sm::oci::parse_platform(v);
            if (!p) {
                std::fprintf(stderr, "supermachine run: bad platform '%s'\n", v);
                return 125;
            }
            image_options.pull.platform = p.value();
        } else if (a == "--engine") {
            if (!(v = value(a))) return usage();
            auto engine = sm::parse_engine_choice(v);
            if (!engine) {
                std::fprintf(stderr, "supermachine run: --engine '%s': kvm, qemu or auto\n", v);
                return 125;
            }
            vm_options.engine = *engine;
        } else if (a == "--insecure") {
            image_options.pull.registry.insecure = true;
        } else if (a == "-q" || a == "--quiet") {
            quiet = true;
        } else if (a == "--verbose") {
            verbose = true;
        } else if (a == "--console") {
            console = true;
        } else if (a == "--disk") {
            if (!(v = value(a))) return usage();
            std::string_view spec = v;
            sm::data_disk disk;
            if (spec.ends_with(":ro")) {
                disk.read_only = true;
                spec.remove_suffix(3);
            }
            disk.path = std::string(spec);
            if (spec.empty() || vm_options.disks.size() >= sm::max_data_disks) {
                std::fprintf(stderr, "supermachine run: --disk: need FILE[:ro] (at most %zu)\n",
                             sm::max_data_disks);
                return 125;
            }
            vm_options.disks.push_back(std::move(disk));
        } else if (a == "--devtmpfs") {
            // On the command line, so the warm snapshot's key and check see it.
            vm_options.extra_cmdline.push_back("supermachine.dev=devtmpfs");
        } else if (a == "--no-snapshot") {
            warm.use_snapshot = false;
        } else if (a == "--snapshot-dir") {
            if (!(v = value(a))) return usage();
            warm.snapshot_dir = v;
        } else if (a == "-h" || a == "--help") {
            usage();
            return 0;
        } else {
            std::fprintf(stderr, "supermachine run: unknown option '%.*s'\n",
                         static_cast<int>(a.size()), a.data());
            return usage();
        }
    }
    if (i >= args.size()) return usage();
    image_name = args[i++];
    for (; i < args.size(); ++i)
        exec.overrides.command.emplace_back(args[i]);

    // Before any pull or boot: a guest of another architecture would only
    // boot to fail with "Exec format error".
    const auto& wanted = image_options.pull.platform;
    if (const auto host = sm::oci::host_platform(); !sm::oci::platform_matches(host, wanted)) {
        std::fprintf(stderr,
                     "supermachine run: %s: cannot run a %s image on this %s host (supermachine "
                     "boots an x86-64 kernel and has no emulation for other architectures; "
                     "`supermachine pull --platform %s` still fetches it)\n",
                     image_name.c_str(), wanted.str().c_str(), host.str().c_str(),
                     wanted.str().c_str());
        return 125;
    }

    const bool progress = !quiet && (verbose || ::isatty(2));
    if (progress) {
        image_options.status = [](std::string_view line) {
            std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
        };
        image_options.pull.progress = [](const sm::oci::progress_event& e) {
            if (e.state == sm::oci::progress_event::phase::completed)
                std::fprintf(stderr, "  %s %s: %lld bytes\n", e.kind.c_str(),
                             e.digest.hex().substr(0, 12).c_str(), static_cast<long long>(e.done));
        };
    }
    auto img = sm::image::from_oci(image_name, image_options);
    std::string why;
    auto ready = img.prepare(&why);
    if (!ready) {
        std::fprintf(stderr, "supermachine run: %s\n",
                     why.empty() ? ready.error().message().c_str() : why.c_str());
        return 125;
    }
    sm::detail::trace_point("image ready");
    auto process = sm::oci::make_process(ready.value().config, exec.overrides, ready.value().passwd,
                                         ready.value().group);
    if (!process) {
        if (process.error() == sm::errc::not_found)
            std::fprintf(
                stderr, "supermachine run: %s\n",
                sm::cli::unknown_user_message(
                    exec.overrides.user.value_or(ready.value().config.user), ready.value().passwd)
                    .c_str());
        else
            std::fprintf(stderr, "supermachine run: no command to run: %s\n",
                         process.error().message().c_str());
        return 125;
    }
    auto request = sm::cli::make_exec_request(process.value(), exec);
    vm_options.volumes = exec.volumes;
    vm_options.network = exec.network;
    vm_options.add_hosts = exec.add_hosts;
    if (exec.network == sm::network_mode::none && !exec.ports.empty()) {
        // docker: "conflicting options: port publishing and the container type network mode".
        std::fprintf(stderr, "supermachine run: -p needs a network (not --network none)\n");
        return 125;
    }
    // The user network publishes them (bound where asked, TCP and UDP).
    vm_options.publish = std::move(exec.ports);
    exec.ports.clear();
    if (console)
        vm_options.console = [](std::string_view text) {
            sm::cli::write_all_fd(2, std::string(text));
        };

    boost::asio::io_context io;
    sm::cli::vm_command command(io);
    warm.progress = progress;
    warm.verbose = verbose && !quiet;
    sm::cli::async_warm_start(
        io.get_executor(), ready.value(), vm_options, warm,
        [&](supermachine::error_code ec, std::shared_ptr<sm::vm> started) {
            if (ec) {
                sm::cli::report_start_failure("supermachine run", ec, started);
                return command.fail(125);
            }
            if (verbose && !quiet)
                std::fprintf(stderr, "supermachine: engine %s\n",
                             started->engine_description().c_str());
            command.start(std::move(started), std::move(request), exec, "supermachine run");
        });
    return command.run(exec);
}

const supermachine::cli::command_registration registration{
    "run", "run a command in a new microVM of an image (like docker run)", &run_run};

} // namespace
