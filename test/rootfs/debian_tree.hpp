#pragma once
// The Debian minbase tree for the slow tests, from scripts/make-debian-tree.sh
// (debootstrap once per machine, cached under the user's cache dir). One
// helper for every test that needs it, so the debootstrap logic lives in the
// script alone. SUPERMACHINE_DEBIAN_TREE names a tree to use instead.
#include "skip.hpp"

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace supermachine::test {

/// The tree's path. Skips the test (one SKIP line, exit 77) when this host
/// cannot make it: not root, no debootstrap, no reachable mirror. A failing
/// debootstrap is a test failure (throws with its log).
/// `cache_home` is the XDG_CACHE_HOME the tree is cached under: pass the
/// user's, not a test's temporary one, or every run pays for debootstrap.
inline std::filesystem::path debian_tree(const std::string& cache_home = "") {
    if (const char* given = std::getenv("SUPERMACHINE_DEBIAN_TREE"); given && *given) {
        skip_unless(std::filesystem::is_directory(std::filesystem::path(given) / "etc"),
                    "SUPERMACHINE_DEBIAN_TREE does not name a root tree");
        return given;
    }
    const char* source = std::getenv("SUPERMACHINE_SOURCE_DIR");
    skip_unless(source != nullptr, "SUPERMACHINE_SOURCE_DIR not set (run through ctest)");
    auto quote = [](const std::string& s) {
        std::string q = "'";
        for (char c : s)
            q += c == '\'' ? std::string("'\\''") : std::string(1, c);
        return q + "'";
    };
    std::string command;
    if (!cache_home.empty()) command = "XDG_CACHE_HOME=" + quote(cache_home) + " ";
    command +=
        "bash " + quote(std::string(source) + "/scripts/make-debian-tree.sh") + " bookworm 2>&1";
    std::fflush(nullptr);
    FILE* pipe = ::popen(command.c_str(), "r");
    if (!pipe) throw std::runtime_error("popen failed");
    std::string out;
    char buffer[4096];
    while (auto n = std::fread(buffer, 1, sizeof buffer, pipe))
        out.append(buffer, n);
    const int status = ::pclose(pipe);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    while (!out.empty() && out.back() == '\n')
        out.pop_back();
    const auto last_line =
        out.substr(out.rfind('\n') == std::string::npos ? 0 : out.rfind('\n') + 1);
    if (code == 77) skip(last_line);
    if (code != 0 || !std::filesystem::is_directory(std::filesystem::path(last_line) / "etc"))
        throw std::runtime_error("scripts/make-debian-tree.sh failed (" + std::to_string(code) +
                                 "):\n" + out);
    return last_line;
}

} // namespace supermachine::test
