#pragma once
// Shared by the rootfs tests: a temp dir, running real tools, the generated
// layers (make_layers.py), and listings of a merged tree and of a host dir in
// one format so umoci's unpack and our tree can be compared line by line.
#include <supermachine/oci/filesystem_tree.hpp>
#include <supermachine/oci/layer.hpp>

#include "skip.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace rootfs_test {

namespace fs = std::filesystem;
namespace oci = supermachine::oci;

inline std::string shell_quote(const std::string& s) {
    std::string q = "'";
    for (char c : s)
        q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

/// Run a shell command; returns (exit status, stdout).
inline std::pair<int, std::string> run(const std::string& command) {
    std::string out;
    FILE* p = ::popen(command.c_str(), "r");
    if (!p) return {-1, out};
    char buffer[4096];
    std::size_t n;
    while ((n = std::fread(buffer, 1, sizeof buffer, p)) > 0)
        out.append(buffer, n);
    int status = ::pclose(p);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

inline bool have_tool(const std::string& name) {
    return run("command -v " + name + " >/dev/null 2>&1").first == 0;
}

struct temp_dir {
    fs::path path;
    temp_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-rootfs-XXXXXX").string();
        path = ::mkdtemp(pattern.data());
    }
    ~temp_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

inline std::string source_dir() {
    const char* s = std::getenv("SUPERMACHINE_SOURCE_DIR");
    return s ? s : ".";
}

/// The layers of make_layers.py in `dir` (skips the test if the tools are missing).
inline void make_layers(const fs::path& dir, const fs::path& escape_target) {
    supermachine::test::skip_unless(have_tool("python3") && have_tool("zstd"),
                                    "python3 or zstd missing");
    fs::path busybox = "/bin/busybox";
    supermachine::test::skip_unless(fs::exists(busybox), "busybox-static not installed");
    auto [rc, out] = run("python3 " + shell_quote(source_dir() + "/test/rootfs/make_layers.py") +
                         " " + shell_quote(dir.string()) + " " + busybox.string() + " " +
                         shell_quote(escape_target.string()) + " 2>&1");
    if (rc != 0) throw std::runtime_error("make_layers.py failed: " + out);
}

inline std::uint64_t fnv1a(std::string_view data, std::uint64_t h = 14695981039346656037ull) {
    for (unsigned char c : data)
        h = (h ^ c) * 1099511628211ull;
    return h;
}

inline std::string mode_text(unsigned mode) {
    char b[16];
    std::snprintf(b, sizeof b, "%04o", mode & 07777);
    return b;
}

/// One line per path below the root: "path type perm size target hash [hardlink group]".
/// Directories list no size; device nodes are listed as "device" (umoci --rootless
/// cannot make them, so comparisons drop them).
inline std::map<std::string, std::string> list_tree(const oci::filesystem_tree& tree) {
    std::map<std::string, std::string> lines;
    std::map<oci::node_id, std::vector<std::string>> paths_of;
    std::vector<std::pair<std::string, oci::node_id>> work{{"", oci::filesystem_tree::root()}};
    while (!work.empty()) {
        auto [prefix, dir] = work.back();
        work.pop_back();
        for (auto& [name, child] : tree.node(dir).children) {
            std::string path = prefix + "/" + name;
            paths_of[child.node].push_back(path);
            if (tree.node(child.node).kind == oci::node_kind::directory)
                work.push_back({path, child.node});
        }
    }
    for (auto& [id, paths] : paths_of) {
        std::sort(paths.begin(), paths.end());
        const auto& n = tree.node(id);
        for (auto& path : paths) {
            std::ostringstream line;
            switch (n.kind) {
            case oci::node_kind::regular: {
                auto data = tree.read_file(id, 64 << 20).value();
                line << "file " << mode_text(n.mode) << " " << n.size << " " << std::hex
                     << fnv1a(data) << std::dec;
                if (paths.size() > 1) line << " link-group=" << paths.front();
                break;
            }
            case oci::node_kind::directory:
                line << "dir " << mode_text(n.mode);
                break;
            case oci::node_kind::symlink:
                line << "symlink -> " << n.link_target;
                break;
            case oci::node_kind::fifo:
                line << "fifo " << mode_text(n.mode);
                break;
            default:
                line << "device";
                break;
            }
            lines[path] = line.str();
        }
    }
    return lines;
}

/// The same listing for a directory on the host (lstat, never following links).
inline std::map<std::string, std::string> list_host(const fs::path& root) {
    std::map<std::string, std::string> lines;
    std::map<std::pair<dev_t, ino_t>, std::vector<std::string>> groups;
    std::vector<std::pair<std::string, struct stat>> entries;
    for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator();
         ++it) {
        std::string path = "/" + it->path().lexically_relative(root).string();
        struct stat st;
        ::lstat(it->path().c_str(), &st);
        entries.push_back({path, st});
        if (S_ISREG(st.st_mode)) groups[{st.st_dev, st.st_ino}].push_back(path);
    }
    for (auto& [k, v] : groups)
        std::sort(v.begin(), v.end());
    for (auto& [path, st] : entries) {
        std::ostringstream line;
        if (S_ISREG(st.st_mode)) {
            std::ifstream in(root.string() + path, std::ios::binary);
            std::string data((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
            line << "file " << mode_text(st.st_mode) << " " << st.st_size << " " << std::hex
                 << fnv1a(data) << std::dec;
            auto& g = groups[{st.st_dev, st.st_ino}];
            if (g.size() > 1) line << " link-group=" << g.front();
        } else if (S_ISDIR(st.st_mode)) {
            line << "dir " << mode_text(st.st_mode);
        } else if (S_ISLNK(st.st_mode)) {
            line << "symlink -> " << fs::read_symlink(root.string() + path).string();
        } else if (S_ISFIFO(st.st_mode)) {
            line << "fifo " << mode_text(st.st_mode);
        } else {
            line << "device";
        }
        lines[path] = line.str();
    }
    return lines;
}

/// Apply layer files in order to a fresh tree spooling into `spool_dir`.
inline supermachine::result<oci::filesystem_tree> merge(const fs::path& spool_dir,
                                                        const std::vector<fs::path>& layers,
                                                        oci::layer_limits limits = {}) {
    SUPERMACHINE_TRY(tree, oci::filesystem_tree::create(spool_dir));
    std::uint32_t n = 1;
    for (auto& l : layers) {
        SUPERMACHINE_TRY(oci::apply_layer_file(tree, l, n++, limits));
    }
    return std::move(tree);
}

/// Every file below `dir`, relative (to check nothing unexpected was written).
inline std::set<std::string> files_below(const fs::path& dir) {
    std::set<std::string> out;
    for (auto& e : fs::recursive_directory_iterator(dir))
        out.insert(e.path().lexically_relative(dir).string());
    return out;
}

} // namespace rootfs_test
