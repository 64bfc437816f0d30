#pragma once
// What every way of running a command in a VM promises, like `docker run`
// (`run IMAGE CMD`, `boot --disk ROOT -- CMD`): exit status and separate
// streams, 128+N for a signal, 127 for a missing command, the command's own
// --timeout, stdin only with -i. Each CLI test file runs these through its
// own entry point.
#include "vm_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace supermachine::test::exec_contract {

/// Runs `command` through one entry point with these CLI options and stdin,
/// bounded by `limit`.
using runner = std::function<process_result(const std::vector<std::string>& options,
                                            const std::vector<std::string>& command,
                                            const std::string& input, std::chrono::seconds limit)>;

inline void exit_status_and_separate_streams(const runner& run) {
    auto r = run({}, {"sh", "-c", "echo out-line; echo err-line >&2; exit 42"}, "",
                 std::chrono::seconds(240));
    BOOST_TEST(r.status == 42, describe(r));
    BOOST_TEST(r.out == "out-line\n", describe(r));
    BOOST_TEST(contains(r.err, "err-line"), describe(r));
    BOOST_TEST(!contains(r.out, "err-line"), describe(r));
}

inline void killed_by_sigkill_is_137(const runner& run) {
    auto r = run({}, {"sh", "-c", "kill -9 $$"}, "", std::chrono::seconds(240));
    BOOST_TEST(r.status == 137, describe(r));
}

inline void missing_command_is_127_and_named(const runner& run) {
    auto r = run({}, {"no-such-command-xyz", "arg"}, "", std::chrono::seconds(240));
    BOOST_TEST(r.status == 127, describe(r));
    BOOST_TEST(contains(r.err, "no-such-command-xyz"), describe(r));
}

/// --timeout is the command's: SIGKILL (137) and a line saying so, long
/// before the test's own limit.
inline void timeout_kills_and_says_so(const runner& run) {
    auto r = run({"--timeout", "3"}, {"sleep", "600"}, "", std::chrono::seconds(90));
    BOOST_TEST(!r.timed_out, describe(r));
    BOOST_TEST(r.status == 137, describe(r));
    BOOST_TEST(contains(r.err, "timed out"), describe(r));
    BOOST_TEST(r.seconds < 60, describe(r));
}

/// -i streams 2 MiB of stdin through `cat` intact; without -i the command
/// sees EOF at once, even if the host has stdin.
inline void stdin_is_streamed_with_i(const runner& run) {
    std::string input;
    for (int i = 0; input.size() < (2u << 20); ++i)
        input += "line " + std::to_string(i) + " of the stdin stream\n";
    auto r = run({"-i"}, {"cat"}, input, std::chrono::seconds(240));
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out.size() == input.size());
    BOOST_TEST((r.out == input));

    auto counted = run({"-i"}, {"wc", "-c"}, "data\n", std::chrono::seconds(240));
    BOOST_TEST(counted.status == 0, describe(counted));
    BOOST_TEST(contains(counted.out, "5"), describe(counted));

    auto closed = run({}, {"wc", "-c"}, "ignored\n", std::chrono::seconds(240));
    BOOST_TEST(closed.status == 0, describe(closed));
    BOOST_TEST(contains(closed.out, "0"), describe(closed));
    BOOST_TEST(!contains(closed.out, "8"), describe(closed));
}

// Data disks with a command: --disk FILE[:ro] are /dev/vdb, /dev/vdc... in
// order (the root disk is not in /dev); a read-only one refuses writes, a
// read-write one is written in place; a missing one is named (125).
inline void data_disks_follow_the_root(const runner& run, const std::filesystem::path& work) {
    const auto a = work / "a.img", b = work / "b.img";
    for (const auto& [path, text] : {std::pair{a, "disk-a"}, std::pair{b, "disk-b"}}) {
        std::ofstream out(path, std::ios::binary);
        out << text << std::string(1 << 20, '\0');
    }
    auto r = run(
        {"--disk", a.string() + ":ro", "--disk", b.string()},
        {"sh", "-c",
         "head -c 6 /dev/vdb; echo; head -c 6 /dev/vdc; echo; ls /dev | grep vd | tr '\\n' ' '; "
         "echo; echo x 2>/dev/null > /dev/vdb || echo ro-refused; "
         "printf hi-b | dd of=/dev/vdc conv=notrunc,fsync 2>/dev/null && echo written"},
        "", std::chrono::seconds(240));
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out == "disk-a\ndisk-b\nvdb vdc \nro-refused\nwritten\n", describe(r));
    std::ifstream in(b, std::ios::binary);
    std::string head(6, '\0');
    in.read(head.data(), 6);
    BOOST_TEST(head == "hi-b-b", describe(r)); // "hi-b" over "disk-b"
    auto missing =
        run({"--disk", (work / "none.img").string()}, {"true"}, "", std::chrono::seconds(240));
    BOOST_TEST(missing.status == 125, describe(missing));
    BOOST_TEST(contains(missing.err, "none.img"), describe(missing));
}

} // namespace supermachine::test::exec_contract
