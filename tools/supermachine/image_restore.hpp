#pragma once
// supermachine restore [OPTIONS] DIR [--snapshot-to NEW] [--] [COMMAND [ARG...]]
//
// Starts a vm from an image snapshot directory alone (`supermachine snapshot
// -o DIR IMAGE`): the image, memory, vCPUs and kernel are the snapshot's.
// Then runs COMMAND (default: the image's own process) like `run` does,
// with the image config's env, user and working directory and the -e -w -u
// -i -t -p --timeout options, and exits with its status (125: the vm did
// not come up).
//
// --snapshot-to NEWDIR: restore so that the vm can be snapshotted again
// (snapshottable_after_restore: a copy of the RAM file, mapped shared), run
// COMMAND, then snapshot the stopped guest into NEWDIR (replaced atomically
// when it exists) and say so on stderr. The status stays the command's;
// 125 when the snapshot failed.
#include "exec_session.hpp"
#include "vm_command.hpp"

#include <supermachine/detail/warm_snapshot_cache.hpp>
#include <supermachine/oci/process.hpp>
#include <supermachine/snapshot_image.hpp>

#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace supermachine::cli {

inline int image_restore_usage(std::FILE* to, int status) {
    std::fprintf(to,
                 "usage: supermachine restore [OPTIONS] DIR [--snapshot-to NEW] [--] [COMMAND "
                 "[ARG...]]\n"
                 "Starts a vm from the image snapshot in DIR (supermachine snapshot -o DIR IMAGE)\n"
                 "and runs COMMAND in it (default: the image's process), like run.\n"
                 "%s"
                 "      --entrypoint CMD    override the image's entrypoint\n"
                 "      --snapshot-to NEW   after COMMAND, snapshot the vm into directory NEW\n"
                 "                          (a new template: restore NEW starts from there;\n"
                 "                          an existing NEW is replaced; exit status stays\n"
                 "                          COMMAND's, 125 if the snapshot failed)\n"
                 "  -q, --quiet             no progress output\n"
                 "      --console           show the guest console on stderr\n",
                 exec_options_usage);
    return status;
}

inline int run_image_restore(std::span<char*> args) {
    constexpr std::string_view who = "supermachine restore";
    exec_cli_options exec;
    bool quiet = false, console = false;
    std::filesystem::path snapshot_to;
    std::size_t i = 0;
    for (; i < args.size(); ++i) {
        const std::string_view a = args[i];
        if (!a.starts_with('-') || a == "-") break;
        if (a == "--") {
            ++i;
            break;
        }
        switch (parse_exec_option(args, i, exec, who)) {
        case option_parse::taken:
            continue;
        case option_parse::bad:
            return 125;
        case option_parse::not_ours:
            break;
        }
        if (a == "-q" || a == "--quiet") {
            quiet = true;
        } else if (a == "--console") {
            console = true;
        } else if (a == "--entrypoint" && i + 1 < args.size()) {
            exec.overrides.entrypoint = args[++i];
        } else if (a == "--snapshot-to" && i + 1 < args.size() && *args[i + 1] != '\0') {
            snapshot_to = std::filesystem::absolute(args[++i]);
        } else if (a == "-h" || a == "--help") {
            return image_restore_usage(stdout, 0);
        } else {
            std::fprintf(stderr, "%.*s: unknown option '%.*s'\n", static_cast<int>(who.size()),
                         who.data(), static_cast<int>(a.size()), a.data());
            return image_restore_usage(stderr, 125);
        }
    }
    if (i >= args.size()) return image_restore_usage(stderr, 125);
    if (exec.network != network_mode::user || !exec.add_hosts.empty()) {
        // The network device is the snapshot's; its NAT's options are run's.
        std::fprintf(stderr, "%.*s: --network and --add-host are `run` options\n",
                     static_cast<int>(who.size()), who.data());
        return 125;
    }
    const auto directory = std::filesystem::absolute(args[i++]);
    // `restore DIR --snapshot-to NEW -- CMD` reads naturally too.
    if (i + 1 < args.size() && std::string_view(args[i]) == "--snapshot-to" &&
        *args[i + 1] != '\0') {
        snapshot_to = std::filesystem::absolute(args[i + 1]);
        i += 2;
    }
    if (i < args.size() && std::string_view(args[i]) == "--") ++i;
    for (; i < args.size(); ++i)
        exec.overrides.command.emplace_back(args[i]);

    auto snapshot = image::from_snapshot(directory);
    snapshot.options().snapshottable_after_restore = !snapshot_to.empty();
    if (console)
        snapshot.options().console = [](std::string_view text) {
            write_all_fd(2, std::string(text));
        };
    // The image's config first (the process to run, its user): a bad -u or
    // a missing image is reported before any vm starts.
    std::string why;
    auto contents = snapshot.read(&why);
    if (!contents) {
        std::fprintf(stderr, "%.*s: %s: %s\n", static_cast<int>(who.size()), who.data(),
                     contents.error().message().c_str(), why.c_str());
        return 125;
    }
    const auto& image = contents.value().image;
    auto process = oci::make_process(image.config, exec.overrides, image.passwd, image.group);
    if (!process) {
        std::fprintf(stderr, "%.*s: %s: %s\n", static_cast<int>(who.size()), who.data(),
                     process.error() == errc::not_found ? "unknown user or group"
                                                        : "no command to run",
                     process.error().message().c_str());
        return 125;
    }
    auto request = make_exec_request(process.value(), exec);

    boost::asio::io_context io;
    vm_command command(io);
    const auto started_at = std::chrono::steady_clock::now();
    snapshot.async_start(io.get_executor(), [&](supermachine::error_code ec, std::shared_ptr<vm> started) {
        if (ec) {
            report_start_failure(who, ec, started);
            return command.fail(125);
        }
        // A snapshot in run's cache counts as used (its pruning keeps recent ones).
        detail::mark_warm_snapshot_used(directory);
        if (!quiet) {
            const auto ms = [](auto d) {
                return std::to_string(
                    std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
            };
            const auto& o = started->options();
            std::fprintf(stderr,
                         "supermachine: restored %s (%s, %u MiB, %u vCPU, kernel %s) in %s ms, "
                         "engine to agent %s ms\n",
                         directory.c_str(), image.reference.c_str(), o.memory_mib, o.cpus,
                         o.kernel ? o.kernel->release.c_str() : "?",
                         ms(std::chrono::steady_clock::now() - started_at).c_str(),
                         ms(started->restore_to_agent()).c_str());
        }
        if (!snapshot_to.empty())
            command.after_command([&snapshot_to, who](std::shared_ptr<vm> machine, int status,
                                                      std::function<void(int)> finish) {
                const auto began = std::chrono::steady_clock::now();
                machine->async_snapshot(
                    snapshot_to, false,
                    [=, &snapshot_to](supermachine::error_code ec, vm::snapshot_report report) {
                        if (ec || !report.saved) {
                            std::fprintf(stderr, "%.*s: snapshot to %s failed: %s\n",
                                         static_cast<int>(who.size()), who.data(),
                                         snapshot_to.c_str(),
                                         ec ? ec.message().c_str() : report.refusal.c_str());
                            return finish(125);
                        }
                        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - began);
                        std::fprintf(
                            stderr,
                            "supermachine: snapshot written: %s (state %llu KiB, %lld ms)\n",
                            snapshot_to.c_str(),
                            static_cast<unsigned long long>(report.bytes >> 10),
                            static_cast<long long>(ms.count()));
                        finish(status);
                    });
            });
        command.start(std::move(started), std::move(request), exec, who);
    });
    return command.run(exec);
}

} // namespace supermachine::cli
