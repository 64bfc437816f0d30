// `supermachine boot --snapshot-after-ms N --snapshot-to FILE` and
// `supermachine restore FILE`: the real CLI on /dev/kvm.
#include "process.hpp"

#include <console_text.hpp>
#include <skip.hpp>

#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using supermachine::test::run_process;

namespace {

std::vector<std::uint64_t> counts_in(const std::string& t) {
    supermachine::test::console c;
    c.text = t;
    return c.counts();
}

bool consecutive_from_one(const std::vector<std::uint64_t>& v) {
    for (std::size_t i = 0; i < v.size(); ++i)
        if (v[i] != i + 1) return false;
    return !v.empty();
}

} // namespace

BOOST_AUTO_TEST_CASE(boot_snapshot_then_restore_continues_the_count) {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) supermachine::test::skip("no /dev/kvm");
    const fs::path dir =
        fs::temp_directory_path() / ("snapmachine-cli-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const std::string file = (dir / "count.snap").string();
    const std::string cli = supermachine::test::cli_path();

    auto boot = run_process({cli, "boot", "--kernel", supermachine::test::conformance_bzimage(),
                             "--memory", "256", "--append", "conformance.mode=count",
                             "--snapshot-after-ms", "1000", "--snapshot-to", file});
    BOOST_TEST_MESSAGE("boot: " << boot.err);
    BOOST_REQUIRE_EQUAL(boot.status, 0);
    BOOST_CHECK(boot.err.find("snapshot written to") != std::string::npos);
    BOOST_REQUIRE(consecutive_from_one(counts_in(boot.out)));

    // Two restores at once from one file; both continue the count.
    auto restore = [&] { return run_process({cli, "restore", file, "--timeout", "1"}); };
    auto a = std::async(std::launch::async, restore);
    auto b = std::async(std::launch::async, restore);
    for (auto* f : {&a, &b}) {
        auto r = f->get();
        BOOST_CHECK_EQUAL(r.status, 5); // the count guest never ends: --timeout
        BOOST_CHECK(r.err.find("still running after 1 s") != std::string::npos);
        const auto all = counts_in(boot.out + r.out);
        BOOST_CHECK(consecutive_from_one(all));
        BOOST_CHECK_GT(all.size(), counts_in(boot.out).size() + 5);
        BOOST_CHECK(r.out.find("conformance: start") == std::string::npos);
    }

    // Bad files: one line on stderr, exit 2.
    std::string bytes;
    {
        std::ifstream in(file, std::ios::binary);
        bytes.assign(std::istreambuf_iterator<char>(in), {});
    }
    const std::string cut = (dir / "cut.snap").string();
    std::ofstream(cut, std::ios::binary).write(bytes.data(), 100000);
    auto truncated = run_process({cli, "restore", cut});
    BOOST_CHECK_EQUAL(truncated.status, 2);
    BOOST_CHECK(truncated.err.find("snapshot file truncated") != std::string::npos);
    auto missing = run_process({cli, "restore", (dir / "none").string()});
    BOOST_CHECK_EQUAL(missing.status, 2);
    auto kernel = run_process({cli, "restore", supermachine::test::conformance_bzimage()});
    BOOST_CHECK_EQUAL(kernel.status, 2);
    BOOST_CHECK(kernel.err.find("bad magic") != std::string::npos);
    fs::remove_all(dir);
}
