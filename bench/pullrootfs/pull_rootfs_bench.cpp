// Pull + root filesystem build of one image from a local registry, the whole
// pipeline `supermachine run` pays on first use: ours (image::prepare, the
// library path the CLI uses: pull into a fresh content store, then
// build_rootfs) against `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d`, in
// the same run, from the same registry.
//
// usage: pull_rootfs_bench [TREE] [RUNS]
//   TREE  the image's content (default: the Debian minbase tree of
//         scripts/make-debian-tree.sh, debootstrapped once and cached)
//   RUNS  default 5
// The image is one gzip layer made by umoci, pushed by skopeo to Debian's
// docker-registry on 127.0.0.1 (the tests' fixture starts it). Each of our
// runs is a child process; it reports its peak RSS (VmHWM) for the pull and,
// after resetting the peak (/proc/self/clear_refs 5), for the build alone.
#include <supermachine/image.hpp>

#include "debian_tree.hpp"
#include "registry_fixture.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../support/shell.hpp"
#include "../support/statistics.hpp"

namespace fs = std::filesystem;
namespace test = supermachine::test;

using supermachine::bench::median;
using supermachine::bench::run_shell;
using supermachine::bench::seconds_since;
using supermachine::bench::shell_quote;

namespace {

// VmHWM (peak) or VmRSS (now) of this process, KiB.
long status_kib(const char* field) {
    std::FILE* f = std::fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    long kib = -1;
    const std::string format = std::string(field) + ": %ld kB";
    while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, format.c_str(), &kib) == 1) break;
    std::fclose(f);
    return kib;
}

void reset_peak_rss() {
    if (std::FILE* f = std::fopen("/proc/self/clear_refs", "w")) {
        std::fputs("5", f);
        std::fclose(f);
    }
}

struct our_run {
    double seconds = 0;
    long pull_peak_kib = -1, build_start_kib = -1, build_peak_kib = -1;
    std::uint64_t image_bytes = 0;
    bool ok = false;
};

// image::prepare in a child, so each run starts cold and its memory is its own.
our_run run_ours(const std::string& reference, const fs::path& cache) {
    int report[2];
    if (::pipe(report) != 0) return {};
    std::fflush(nullptr);
    const auto t0 = std::chrono::steady_clock::now();
    const pid_t child = ::fork();
    if (child == 0) {
        ::close(report[0]);
        our_run r;
        supermachine::image_options options;
        options.cache_dir = cache;
        // The status line before the build marks the end of the pull.
        options.status = [&](std::string_view line) {
            if (line.rfind("root filesystem", 0) == 0) {
                r.pull_peak_kib = status_kib("VmHWM");
                reset_peak_rss();
                r.build_start_kib = status_kib("VmRSS");
            }
        };
        std::string why;
        auto ready = supermachine::image::from_oci(reference, options).prepare(&why);
        r.build_peak_kib = status_kib("VmHWM");
        r.ok = ready.has_value();
        if (!ready)
            std::fprintf(stderr, "ours failed: %s\n", why.c_str());
        else
            r.image_bytes = fs::file_size(ready.value().rootfs);
        [[maybe_unused]] auto n = ::write(report[1], &r, sizeof r);
        std::_Exit(r.ok ? 0 : 1);
    }
    ::close(report[1]);
    our_run r;
    if (::read(report[0], &r, sizeof r) != static_cast<ssize_t>(sizeof r)) r.ok = false;
    ::close(report[0]);
    int status = 0;
    ::waitpid(child, &status, 0);
    r.seconds = seconds_since(t0);
    r.ok = r.ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    return r;
}

} // namespace

int main(int argc, char** argv) {
    const int runs = argc > 2 ? std::max(1, std::atoi(argv[2])) : 5;
    if (!std::getenv("SUPERMACHINE_SOURCE_DIR"))
        ::setenv("SUPERMACHINE_SOURCE_DIR", SUPERMACHINE_DEFAULT_SOURCE_DIR, 1);
    const fs::path tree = argc > 1 && argv[1][0] ? fs::path(argv[1]) : test::debian_tree();
    test::temp_dir work;

    // One layer, gzip-compressed by umoci; pushed as is by skopeo.
    const auto layout = work.path / "oci";
    const auto layer = work.path / "layer.tar";
    if (run_shell("tar --numeric-owner --xattrs --xattrs-include='*' -C " +
                  shell_quote(tree.string()) + " -cf " + shell_quote(layer.string()) +
                  " . && umoci init --layout " + shell_quote(layout.string()) +
                  " && umoci new --image " + shell_quote(layout.string()) +
                  ":b && umoci raw add-layer --image " + shell_quote(layout.string()) + ":b " +
                  shell_quote(layer.string())) != 0) {
        std::fprintf(stderr, "could not make the OCI image (tar/umoci)\n");
        return 1;
    }
    fs::remove(layer);
    std::uint64_t compressed = 0;
    for (auto& entry : fs::directory_iterator(layout / "blobs/sha256"))
        compressed = std::max<std::uint64_t>(compressed, entry.file_size());
    test::registry_server registry(work.path);
    const std::string reference = registry.host() + "/bench/image:1";
    test::skopeo_copy("oci:" + layout.string() + ":b", "docker://" + reference);

    std::vector<double> ours, theirs;
    std::vector<long> pull_peaks, build_peaks, build_growths;
    std::uint64_t image_bytes = 0;
    for (int run = 0; run < runs; ++run) {
        const auto cache = work.path / ("cache" + std::to_string(run));
        run_shell("sync");
        const auto r = run_ours(reference, cache);
        if (!r.ok) return 1;
        ours.push_back(r.seconds);
        pull_peaks.push_back(r.pull_peak_kib);
        build_peaks.push_back(r.build_peak_kib);
        build_growths.push_back(r.build_peak_kib - r.build_start_kib);
        image_bytes = r.image_bytes;
        if (run + 1 == runs && run_shell("e2fsck -fn " + shell_quote(cache.string()) +
                                         "/rootfs/*.ext4 >/dev/null 2>&1") != 0) {
            std::fprintf(stderr, "our image is not clean (e2fsck -fn)\n");
            return 1;
        }
        fs::remove_all(cache);

        // skopeo copy + umoci unpack + mkfs.ext4 -d, into an image of the same size.
        const auto copy = work.path / ("copy" + std::to_string(run));
        const auto bundle = work.path / ("bundle" + std::to_string(run));
        const auto image = work.path / ("mkfs" + std::to_string(run) + ".ext4");
        run_shell("sync");
        const auto t0 = std::chrono::steady_clock::now();
        const int rc = run_shell(
            "skopeo copy --quiet --src-tls-verify=false docker://" + reference +
            " oci:" + shell_quote(copy.string()) + ":b >/dev/null 2>&1 && " +
            "umoci unpack --rootless --image " + shell_quote(copy.string()) + ":b " +
            shell_quote(bundle.string()) + " >/dev/null 2>&1 && mkfs.ext4 -q -F -d " +
            shell_quote((bundle / "rootfs").string()) + " " + shell_quote(image.string()) + " " +
            std::to_string(image_bytes / 1024) + "k >/dev/null 2>&1");
        const double t_theirs = seconds_since(t0);
        if (rc != 0) {
            std::fprintf(stderr, "skopeo copy + umoci unpack + mkfs.ext4 -d failed\n");
            return 1;
        }
        theirs.push_back(t_theirs);
        fs::remove_all(copy);
        fs::remove_all(bundle);
        fs::remove(image);
        std::printf("run %d: ours %.3f s (peak RSS pull %.1f MiB, build %.1f MiB = %.1f + %.1f), "
                    "skopeo+umoci+mkfs %.3f s\n",
                    run + 1, r.seconds, r.pull_peak_kib / 1024.0, r.build_peak_kib / 1024.0,
                    r.build_start_kib / 1024.0, (r.build_peak_kib - r.build_start_kib) / 1024.0,
                    t_theirs);
        std::fflush(stdout);
    }
    const double m_ours = median(ours), m_theirs = median(theirs);
    std::printf("input: %s, layer %llu bytes (gzip); image %llu bytes, e2fsck -fn clean\n",
                tree.c_str(), static_cast<unsigned long long>(compressed),
                static_cast<unsigned long long>(image_bytes));
    std::printf("median over %d runs: ours %.3f s, skopeo copy + umoci unpack + mkfs.ext4 -d "
                "%.3f s, ratio %.2fx\n",
                runs, m_ours, m_theirs, m_ours / m_theirs);
    std::printf("peak RSS (VmHWM, max over runs): pull %.1f MiB, build %.1f MiB "
                "(%.1f MiB above the process's RSS when the build started)\n",
                *std::max_element(pull_peaks.begin(), pull_peaks.end()) / 1024.0,
                *std::max_element(build_peaks.begin(), build_peaks.end()) / 1024.0,
                *std::max_element(build_growths.begin(), build_growths.end()) / 1024.0);
    return 0;
}
