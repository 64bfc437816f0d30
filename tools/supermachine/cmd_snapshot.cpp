// supermachine snapshot [OPTIONS] IMAGE
// Build (or refresh) the warm snapshot `supermachine run IMAGE` restores
// (doc/warm-start.md): cold boot the image snapshottable, snapshot right
// after its agent is ready, stop it. Prints the snapshot directory on
// stdout. With -o DIR the snapshot goes to DIR instead of the cache; use it
// with `supermachine run --snapshot-dir DIR IMAGE ...` or `supermachine
// restore DIR -- CMD`. The engine is resolved here as `run` resolves it
// (auto: kvm where the host's KVM runs Linux), so the cache entry is the one
// `run` restores: the kvm engine's is one container file, QEMU's a directory.
#include "command.hpp"
#include "warm_start.hpp"

#include <supermachine/image.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <string>

namespace {
namespace sm = supermachine;

int usage() {
    std::fprintf(stderr,
                 "usage: supermachine snapshot [OPTIONS] IMAGE\n"
                 "Cold boots IMAGE, snapshots it once its agent is ready, and prints where.\n"
                 "  -o, --output DIR   write the snapshot to DIR (default: the cache entry\n"
                 "                     `supermachine run` uses for these options)\n"
                 "  -m, --memory MIB   guest memory in MiB (default 512)\n"
                 "      --cpus N       vCPUs (default 1)\n"
                 "      --engine E     kvm, qemu or auto (default: as `run` picks)\n"
                 "      --insecure     allow plain HTTP / unverified TLS registries\n"
                 "  -q, --quiet        no progress output\n");
    return 2;
}

bool parse_number(const char* text, std::uint32_t low, std::uint32_t high, std::uint32_t& out) {
    auto [end, ec] = std::from_chars(text, text + std::strlen(text), out);
    return ec == std::errc() && !*end && out >= low && out <= high;
}

int run_snapshot(std::span<char*> args) {
    sm::vm_options options;
    sm::image_options image_options;
    std::filesystem::path output;
    bool quiet = false;
    std::string image_name;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view a = args[i];
        const char* v = i + 1 < args.size() ? args[i + 1] : nullptr;
        if (a == "-h" || a == "--help") {
            usage();
            return 0;
        } else if ((a == "-o" || a == "--output") && v) {
            output = v, ++i;
        } else if ((a == "-m" || a == "--memory") && v) {
            if (!parse_number(v, 64, 1u << 20, options.memory_mib)) return usage();
            ++i;
        } else if (a == "--cpus" && v) {
            if (!parse_number(v, 1, 64, options.cpus)) return usage();
            ++i;
        } else if (a == "--engine" && v) {
            auto engine = sm::parse_engine_choice(v);
            if (!engine) return usage();
            options.engine = *engine;
            ++i;
        } else if (a == "--insecure") {
            image_options.pull.registry.insecure = true;
        } else if (a == "-q" || a == "--quiet") {
            quiet = true;
        } else if (!a.starts_with('-') && image_name.empty()) {
            image_name = a;
        } else {
            return usage();
        }
    }
    if (image_name.empty()) return usage();
    if (!quiet)
        image_options.status = [](std::string_view line) {
            std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
        };
    std::string why;
    auto ready = sm::image::from_oci(image_name, image_options).prepare(&why);
    if (!ready) {
        std::fprintf(stderr, "supermachine snapshot: %s\n",
                     why.empty() ? ready.error().message().c_str() : why.c_str());
        return 1;
    }
    auto kernel = sm::boot::default_kernel();
    if (!kernel) kernel = sm::boot::fetch_default_kernel();
    if (!kernel) {
        std::fprintf(stderr, "supermachine snapshot: no guest kernel: %s\n",
                     kernel.error().message().c_str());
        return 1;
    }
    options.kernel = kernel.value();
    options.engine = sm::decide_engine(options.engine).kind == sm::backend::engine_kind::kvm
                         ? sm::engine_choice::kvm
                         : sm::engine_choice::qemu;
    if (output.empty()) {
        auto dir = sm::cli::warm_snapshot_dir(ready.value(), options);
        if (!dir) {
            std::fprintf(stderr, "supermachine snapshot: %s\n", dir.error().message().c_str());
            return 1;
        }
        output = dir.value();
    }
    output = std::filesystem::absolute(output);
    // The same lock `run` takes while it creates this snapshot.
    std::error_code fs_ec;
    std::filesystem::create_directories(output.parent_path(), fs_ec);
    const int lock = sm::cli::try_creation_lock(output);
    if (lock < 0) {
        std::fprintf(stderr, "supermachine snapshot: another run is creating %s\n", output.c_str());
        return 1;
    }
    if (!quiet) std::fprintf(stderr, "supermachine: cold boot, snapshot at agent-ready\n");
    boost::asio::io_context io;
    int status = 1;
    sm::cli::async_build_snapshot(
        io.get_executor(), ready.value(), options, output,
        [&](supermachine::error_code ec, sm::vm::snapshot_report report) {
            if (ec || !report.saved) {
                std::fprintf(stderr, "supermachine snapshot: %s\n",
                             ec ? ec.message().c_str() : report.refusal.c_str());
            } else {
                if (!quiet)
                    std::fprintf(stderr,
                                 "supermachine: snapshot created "
                                 "(state %llu KiB, %lld ms)\n",
                                 static_cast<unsigned long long>(report.bytes >> 10),
                                 static_cast<long long>(report.duration.count()));
                std::printf("%s\n", output.c_str());
                status = 0;
            }
            io.stop();
        });
    io.run();
    ::close(lock);
    return status;
}

const supermachine::cli::command_registration registration{
    "snapshot", "build the warm snapshot `run` restores for an image", &run_snapshot};

} // namespace
