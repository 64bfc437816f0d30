// supermachine pull [--platform OS/ARCH[/VARIANT]] [--insecure] [--insecure-registry HOST]
//                   [--ca-file PEM] [--quiet] IMAGE
// IMAGE is a registry reference, oci:PATH[:TAG] or docker-archive:PATH[:NAME:TAG].
#include "command.hpp"

#include <supermachine/oci/pull.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {

namespace oci = supermachine::oci;
using clock_type = std::chrono::steady_clock;

std::string human_bytes(double bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024 && u < 4) {
        bytes /= 1024;
        ++u;
    }
    char out[32];
    std::snprintf(out, sizeof out, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
    return out;
}

// One line per blob: a redrawn bar on a terminal, plain lines otherwise.
class progress_printer {
public:
    explicit progress_printer(bool terminal)
        : terminal_(terminal) {}

    void operator()(const oci::progress_event& e) {
        auto key = e.digest.str();
        auto [it, inserted] = rows_.try_emplace(key);
        auto& row = it->second;
        if (inserted) {
            order_.push_back(key);
            row.kind = e.kind;
            row.short_digest = e.digest.hex().substr(0, 12);
            row.start = clock_type::now();
            row.first = e.done;
        }
        row.total = e.total;
        row.done = e.done;
        row.state = e.state;
        if (terminal_) {
            auto now = clock_type::now();
            bool final = e.state != oci::progress_event::phase::progress;
            if (final || now - last_draw_ > std::chrono::milliseconds(100)) {
                redraw();
                last_draw_ = now;
            }
            return;
        }
        switch (e.state) {
        case oci::progress_event::phase::started:
            std::printf("%s %s: fetching %s%s\n", row.kind.c_str(), row.short_digest.c_str(),
                        human_bytes(double(e.total)).c_str(),
                        e.done > 0 ? (" (resuming at " + human_bytes(double(e.done)) + ")").c_str()
                                   : "");
            break;
        case oci::progress_event::phase::completed:
            std::printf("%s %s: done, %s\n", row.kind.c_str(), row.short_digest.c_str(),
                        rate(row).c_str());
            break;
        case oci::progress_event::phase::cached:
            std::printf("%s %s: already present\n", row.kind.c_str(), row.short_digest.c_str());
            break;
        case oci::progress_event::phase::progress:
            break;
        }
        std::fflush(stdout);
    }

    void finish() {
        if (terminal_ && !order_.empty()) redraw();
    }

private:
    struct row_state {
        std::string kind, short_digest;
        std::int64_t total = -1, done = 0, first = 0;
        oci::progress_event::phase state{};
        clock_type::time_point start;
    };

    static std::string rate(const row_state& row) {
        double seconds = std::chrono::duration<double>(clock_type::now() - row.start).count();
        double fetched = double(row.done - row.first);
        if (seconds <= 0) seconds = 1e-3;
        return human_bytes(double(row.done)) + " in " + std::to_string(int(seconds * 1000)) +
               " ms (" + human_bytes(fetched / seconds) + "/s)";
    }

    void redraw() {
        if (drawn_ > 0) std::printf("\x1b[%zuA", drawn_);
        for (const auto& key : order_) {
            const auto& row = rows_.at(key);
            constexpr int width = 30;
            double fraction = row.total > 0 ? double(row.done) / double(row.total) : 0;
            int filled = int(fraction * width);
            std::string bar(std::size_t(filled), '=');
            if (filled < width) bar += '>';
            bar.resize(width, ' ');
            const char* status = row.state == oci::progress_event::phase::cached      ? "exists"
                                 : row.state == oci::progress_event::phase::completed ? "done"
                                                                                      : "";
            std::printf("\x1b[2K%-8s %s [%s] %s / %s %s%s\n", row.kind.c_str(),
                        row.short_digest.c_str(), bar.c_str(),
                        human_bytes(double(row.done)).c_str(),
                        human_bytes(double(row.total)).c_str(), status,
                        row.state == oci::progress_event::phase::progress ||
                                row.state == oci::progress_event::phase::completed
                            ? ("  " + rate(row)).c_str()
                            : "");
        }
        drawn_ = order_.size();
        std::fflush(stdout);
    }

    bool terminal_;
    std::map<std::string, row_state> rows_;
    std::vector<std::string> order_;
    std::size_t drawn_ = 0;
    clock_type::time_point last_draw_{};
};

int usage() {
    std::fprintf(stderr, "usage: supermachine pull [--platform OS/ARCH[/VARIANT]] [--insecure]\n"
                         "                         [--insecure-registry HOST[:PORT]] [--ca-file "
                         "PEM] [--quiet] IMAGE\n"
                         "IMAGE: a registry reference (alpine, host:5000/ns/app:tag@sha256:...),\n"
                         "       oci:PATH[:TAG] or docker-archive:PATH[:NAME:TAG]\n");
    return 2;
}

int run_pull(std::span<char*> args) {
    oci::pull_options options;
    bool quiet = false;
    std::string image;
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string_view a = args[i];
        auto value = [&]() -> const char* { return i + 1 < args.size() ? args[++i] : nullptr; };
        if (a == "--platform") {
            auto v = value();
            auto p = v ? oci::parse_platform(v)
                       : supermachine::result<oci::platform>(supermachine::errc::invalid_argument);
            if (!p) {
                std::fprintf(stderr,
                             "supermachine pull: bad --platform (want os/arch[/variant])\n");
                return 2;
            }
            options.platform = p.value();
        } else if (a == "--insecure")
            options.registry.insecure = true;
        else if (a == "--insecure-registry") {
            auto v = value();
            if (!v) return usage();
            options.registry.insecure_registries.emplace_back(v);
        } else if (a == "--ca-file") {
            auto v = value();
            if (!v) return usage();
            options.registry.ca_file = v;
        } else if (a == "-q" || a == "--quiet")
            quiet = true;
        else if (a == "-h" || a == "--help") {
            usage();
            return 0;
        } else if (a.starts_with("-"))
            return usage();
        else if (image.empty())
            image = a;
        else
            return usage();
    }
    if (image.empty()) return usage();

    std::string reason;
    auto source = oci::parse_image_source(image, &reason);
    if (!source) {
        std::fprintf(stderr, "supermachine pull: invalid reference '%s': %s\n", image.c_str(),
                     reason.c_str());
        return 2;
    }
    // docker warns about a config file it cannot parse and goes on without it.
    if (source.value().transport == oci::image_transport::registry &&
        options.registry.use_docker_config) {
        auto lookup = oci::find_docker_credentials(source.value().reference.registry,
                                                   options.registry.docker_config);
        if (lookup.malformed)
            std::fprintf(stderr, "supermachine pull: warning: %s (no credentials from it)\n",
                         lookup.problem.c_str());
    }
    progress_printer printer(::isatty(STDOUT_FILENO) == 1);
    if (!quiet) options.progress = [&](const oci::progress_event& e) { printer(e); };
    auto store = oci::content_store::open_default();
    std::string why;
    if (!quiet)
        std::printf("pulling %s (%s)\n", source.value().str().c_str(),
                    options.platform.str().c_str());
    auto pulled = oci::pull_image(source.value(), store, options, &why);
    printer.finish();
    if (!pulled) {
        std::fprintf(stderr, "supermachine pull: %s: %s\n", pulled.error().message().c_str(),
                     why.empty() ? image.c_str() : why.c_str());
        return 1;
    }
    const auto& p = pulled.value();
    if (quiet) {
        std::printf("%s\n", p.manifest_digest.str().c_str());
        return 0;
    }
    std::printf("Image:    %s\nDigest:   %s\n", p.reference.c_str(),
                p.manifest_digest.str().c_str());
    if (p.image_manifest_digest != p.manifest_digest)
        std::printf("Manifest: %s (%s)\n", p.image_manifest_digest.str().c_str(),
                    p.config.platform.str().c_str());
    std::printf("Layers:   %zu, %s\nStore:    %s\n", p.layers.size(),
                human_bytes(double(p.manifest.total_size())).c_str(), store.root().c_str());
    // What the image says it listens on (ExposedPorts): `run -p HOST:GUEST` forwards them.
    if (!p.config.exposed_ports.empty()) {
        std::string ports;
        for (const auto& port : p.config.exposed_ports)
            ports += (ports.empty() ? "" : " ") + port;
        std::printf("Ports:    %s\n", ports.c_str());
    }
    return 0;
}

const supermachine::cli::command_registration registration{
    "pull", "fetch an image (registry, oci:, docker-archive:) into the local store", &run_pull};

} // namespace
