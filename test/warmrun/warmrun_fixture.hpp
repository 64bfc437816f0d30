#pragma once
// Shared set-up of the warm-start tests (label qemu): the built CLI and
// agent, real QEMU and qemu-img, the cached Debian cloud kernel, the demo
// image (scripts/make-demo-image.sh) in a temp work dir, and a temp
// XDG_CACHE_HOME so the tests never touch the user's snapshots. One
// "SKIP:" line and exit 77 when the host lacks any of them.
#include <supermachine/backend/detail/qemu_process.hpp>
#include <supermachine/backend/qemu.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>

#include <boost/test/unit_test.hpp>

#include <skip.hpp>
#include <vm_api_driver.hpp>

#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>

namespace supermachine::test::warmrun {

namespace fs = std::filesystem;

struct outcome {
    int status = -1;
    std::string out, err;
};

inline std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

inline std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s)
        q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

inline bool has(const std::string& text, std::string_view needle) {
    return text.find(needle) != std::string::npos;
}

struct environment {
    fs::path work, cli, agent, kernel_dir, image_dir;
    std::string image; // oci:DIR:busybox
};

/// Made once per test process; `name` prefixes the temp work dir.
/// A small snapshottable vm for the API cases (256 MiB: less to copy).
inline supermachine::vm_options snapshottable_options() {
    supermachine::vm_options options;
    options.memory_mib = 256;
    options.snapshottable = true;
    options.ready_timeout = std::chrono::seconds(120);
    return options;
}

inline environment make_environment(const char* name) {
    environment s;
    const char* bin = std::getenv("SUPERMACHINE_BINARY_DIR");
    const char* src = std::getenv("SUPERMACHINE_SOURCE_DIR");
    if (!bin || !src) skip("SUPERMACHINE_BINARY_DIR/SOURCE_DIR not set (run via ctest)");
    s.cli = fs::path(bin) / "bin" / "supermachine";
    s.agent = fs::path(bin) / "bin" / "supermachine-agent";
    if (!fs::exists(s.cli) || !fs::exists(s.agent)) skip("the CLI or agent is not built");
    if (!backend::find_qemu("qemu-system-x86_64")) skip("qemu-system-x86_64 not found");
    if (!backend::detail::find_program("qemu-img")) skip("qemu-img not found");
    auto kernel = boot::default_kernel_identity();
    if (!kernel) skip("no guest kernel cached (bash scripts/fetch-kernel.sh)");
    s.kernel_dir = kernel.value().root;
    std::string pattern = "/tmp/" + std::string(name) + "-XXXXXX";
    if (!::mkdtemp(pattern.data())) skip("mkdtemp failed");
    s.work = pattern;
    s.image_dir = s.work / "img";
    const auto make = "bash " + quote((fs::path(src) / "scripts" / "make-demo-image.sh").string()) +
                      " " + quote(s.image_dir.string()) + " busybox >/dev/null 2>&1";
    if (std::system(make.c_str()) != 0) skip("make-demo-image.sh failed (busybox-static, umoci?)");
    s.image = "oci:" + s.image_dir.string() + ":busybox";
    ::setenv("XDG_CACHE_HOME", (s.work / "cache").c_str(), 1);
    ::setenv("SUPERMACHINE_KERNEL_DIR", s.kernel_dir.c_str(), 1);
    ::setenv("SUPERMACHINE_AGENT", s.agent.c_str(), 1); // for the API cases in the test process
    return s;
}

/// `supermachine ARGUMENTS` (a shell line, `prefix` before it, e.g. variable
/// assignments), its output kept in numbered files under `s.work`.
inline outcome run_cli(const environment& s, const std::string& arguments,
                       const std::string& prefix = "") {
    static int n = 0;
    const auto out = s.work / ("out" + std::to_string(n));
    const auto err = s.work / ("err" + std::to_string(n++));
    const auto command = prefix + " timeout 300 " + quote(s.cli.string()) + " " + arguments + " >" +
                         quote(out.string()) + " 2>" + quote(err.string()) + " </dev/null";
    const int raw = std::system(command.c_str());
    outcome o;
    o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
    o.out = slurp(out);
    o.err = slurp(err);
    BOOST_TEST_MESSAGE(arguments << " -> " << o.status << "\n" << o.err);
    return o;
}

using supermachine::test::api_driver; // vm_api_driver.hpp

} // namespace supermachine::test::warmrun
