// Root filesystem build: ours (layers → tree → ext4, in-process) against
// `umoci unpack` + `mkfs.ext4 -d`, from the same gzip layer blob, same run.
//
// usage: rootfs_bench [TREE] [RUNS]
//   TREE  a directory to make the image from, e.g. a Debian minbase tree:
//         debootstrap --variant=minbase bookworm /tmp/deb && rootfs_bench /tmp/deb
//         (default: a busybox-static tree made here)
// Prints medians, the ratio, and the peak RSS of one of our builds (measured
// in a child process with wait4, so it is that build's alone).
#include <supermachine/oci/rootfs_builder.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../support/shell.hpp"
#include "../support/statistics.hpp"

namespace fs = std::filesystem;
namespace oci = supermachine::oci;

using supermachine::bench::median;
using supermachine::bench::run_shell;
using supermachine::bench::seconds_since;
using supermachine::bench::shell_quote;

int main(int argc, char** argv) {
    int runs = argc > 2 ? std::max(1, std::atoi(argv[2])) : 5;
    char pattern[] = "/tmp/sm-rootfs-bench-XXXXXX";
    fs::path work = ::mkdtemp(pattern);
    fs::path tree;
    if (argc > 1 && argv[1][0] != '\0') {
        tree = argv[1];
    } else {
        tree = work / "busybox";
        fs::create_directories(tree / "bin");
        fs::create_directories(tree / "etc");
        fs::copy_file("/bin/busybox", tree / "bin" / "busybox");
        run_shell("for a in $(/bin/busybox --list); do ln -s busybox " +
                  shell_quote((tree / "bin").string()) + "/$a 2>/dev/null; done");
        std::ofstream(tree / "etc" / "passwd") << "root:x:0:0:root:/root:/bin/sh\n";
    }
    // One layer, gzip-compressed by umoci itself: both sides read the same blob.
    fs::path layout = work / "oci";
    if (run_shell(
            "tar --numeric-owner --xattrs --xattrs-include='*' -C " + shell_quote(tree.string()) +
            " -cf " + shell_quote((work / "layer.tar").string()) + " . && umoci init --layout " +
            shell_quote(layout.string()) + " && umoci new --image " + shell_quote(layout.string()) +
            ":b && umoci raw add-layer --image " + shell_quote(layout.string()) + ":b " +
            shell_quote((work / "layer.tar").string())) != 0) {
        std::fprintf(stderr, "could not make the OCI image (tar/umoci)\n");
        fs::remove_all(work);
        return 1;
    }
    fs::remove(work / "layer.tar");
    auto read_json = [&](const fs::path& p) {
        std::ifstream in(p);
        return nlohmann::json::parse(in);
    };
    auto blob = [&](const std::string& digest) {
        return layout / "blobs" / "sha256" / digest.substr(7);
    };
    auto index = read_json(layout / "index.json");
    std::string manifest_digest = index["manifests"][0]["digest"];
    auto manifest = read_json(blob(manifest_digest));
    std::vector<fs::path> layers;
    for (auto& l : manifest["layers"])
        layers.push_back(blob(l["digest"]));
    std::uint64_t compressed = 0;
    for (auto& l : layers)
        compressed += fs::file_size(l);

    std::vector<double> ours, theirs;
    std::uint64_t image_bytes = 0;
    fs::path last_image;
    for (int run = 0; run < runs; ++run) {
        // ours
        auto cache = work / ("cache" + std::to_string(run));
        oci::rootfs_build_options options;
        options.cache_dir = cache;
        run_shell("sync");
        auto t0 = std::chrono::steady_clock::now();
        auto built = oci::build_rootfs(manifest_digest, layers, options);
        double t_ours = seconds_since(t0);
        if (!built) {
            std::fprintf(stderr, "ours failed: %s\n", built.error().message().c_str());
            fs::remove_all(work);
            return 1;
        }
        ours.push_back(t_ours);
        image_bytes = built.value().ext4.image_bytes;
        if (run + 1 < runs)
            fs::remove_all(cache);
        else
            last_image = built.value().path;

        // umoci unpack + mkfs.ext4 -d, into an image of the same size
        auto bundle = work / ("bundle" + std::to_string(run));
        auto image = work / ("mkfs" + std::to_string(run) + ".ext4");
        run_shell("sync");
        t0 = std::chrono::steady_clock::now();
        int rc = run_shell(
            "umoci unpack --rootless --image " + shell_quote(layout.string()) + ":b " +
            shell_quote(bundle.string()) + " >/dev/null 2>&1 && mkfs.ext4 -q -F -d " +
            shell_quote((bundle / "rootfs").string()) + " " + shell_quote(image.string()) + " " +
            std::to_string(image_bytes / 1024) + "k >/dev/null 2>&1");
        double t_theirs = seconds_since(t0);
        if (rc != 0) {
            std::fprintf(stderr, "umoci unpack + mkfs.ext4 -d failed\n");
            fs::remove_all(work);
            return 1;
        }
        theirs.push_back(t_theirs);
        fs::remove_all(bundle);
        fs::remove(image);
        std::printf("run %d: ours %.3f s, umoci+mkfs %.3f s\n", run + 1, t_ours, t_theirs);
    }

    // Peak RSS of one build, alone, in a child.
    pid_t child = ::fork();
    if (child == 0) {
        oci::rootfs_build_options options;
        options.cache_dir = work / "rss";
        auto built = oci::build_rootfs(manifest_digest, layers, options);
        std::_Exit(built ? 0 : 1);
    }
    int status = 0;
    struct rusage usage {};
    ::wait4(child, &status, 0, &usage);

    int fsck = run_shell("e2fsck -fn " + shell_quote(last_image.string()) + " >/dev/null 2>&1");
    double m_ours = median(ours), m_theirs = median(theirs);
    std::printf("input: %s, %llu bytes of gzip layers\n", tree.c_str(),
                static_cast<unsigned long long>(compressed));
    std::printf("image: %llu bytes, e2fsck -fn %s\n", static_cast<unsigned long long>(image_bytes),
                fsck == 0 ? "clean" : "NOT CLEAN");
    std::printf(
        "median over %d runs: ours %.3f s, umoci unpack + mkfs.ext4 -d %.3f s, ratio %.2fx\n", runs,
        m_ours, m_theirs, m_ours / m_theirs);
    std::printf("peak RSS of one build (child, wait4): %.1f MiB\n", usage.ru_maxrss / 1024.0);
    fs::remove_all(work);
    return fsck == 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
