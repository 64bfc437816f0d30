// Starting a vm from an image snapshot directory alone (label qemu): real
// QEMU, the Debian cloud kernel, the demo image. `supermachine snapshot -o
// DIR` makes the snapshot (256 MiB, not the 512 MiB default, so the memory
// size visibly comes from the snapshot); then image::from_snapshot(DIR)
// starts it through the API and `supermachine restore DIR -- CMD` through
// the CLI. Hostile and stale directories (garbage or truncated record, an
// image the content store does not hold, a kernel the cache does not hold,
// a release that tries to be a path) fail cleanly with a sentence naming
// what is missing, before any engine starts.
#include "warmrun_fixture.hpp"

#include <supermachine/backend/qemu.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/detail/warm_snapshot.hpp>
#include <supermachine/snapshot_image.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <skip.hpp>

#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace sm = supermachine;
namespace fs = std::filesystem;

namespace {

using namespace supermachine::test::warmrun;

struct fixture_state : environment {
    fs::path snapshot;
};

fixture_state& state() {
    static fixture_state s = [] {
        fixture_state s{make_environment("fromsnap-test"), {}};
        s.snapshot = s.work / "snap";
        return s;
    }();
    return s;
}

outcome run_cli(const std::string& arguments, const std::string& prefix = "") {
    return supermachine::test::warmrun::run_cli(state(), arguments, prefix);
}

// The snapshot every case uses, made once by the CLI.
const fs::path& snapshot() {
    auto& s = state();
    static const bool made = [&] {
        auto r =
            run_cli("snapshot -q -m 256 -o " + quote(s.snapshot.string()) + " " + quote(s.image));
        BOOST_TEST_MESSAGE("snapshot: " << r.status << " " << r.out << r.err);
        return r.status == 0 && r.out == s.snapshot.string() + "\n";
    }();
    BOOST_REQUIRE_MESSAGE(made, "supermachine snapshot -o failed");
    return s.snapshot;
}

sm::detail::warm_snapshot_meta snapshot_meta() {
    auto bytes = sm::detail::read_small_file(snapshot() / "meta", 1 << 16);
    BOOST_REQUIRE(bytes);
    auto meta = sm::detail::warm_snapshot_meta::decode(bytes.value());
    BOOST_REQUIRE(meta);
    return meta.value();
}

void write_file(const fs::path& path, std::span<const std::byte> bytes) {
    fs::create_directories(path.parent_path());
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// A directory holding only a (re-sealed) record: the contents are read from
// the record before any other file, so that is all these cases need.
fs::path directory_with(const std::string& name, const sm::detail::warm_snapshot_meta& meta) {
    const auto dir = state().work / name;
    write_file(dir / "meta", meta.encode());
    return dir;
}

struct started {
    supermachine::error_code ec = sm::errc::invalid_argument;
    std::shared_ptr<sm::vm> vm;
};

// Start `snap` on `io` and run until the start completed (bounded).
started start(boost::asio::io_context& io, const sm::snapshot_image& snap) {
    started result;
    bool done = false;
    snap.async_start(io.get_executor(), [&](supermachine::error_code ec, std::shared_ptr<sm::vm> v) {
        result.ec = ec;
        result.vm = std::move(v);
        done = true;
    });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(4);
    while (!done && std::chrono::steady_clock::now() < deadline)
        io.run_one_for(std::chrono::milliseconds(200));
    BOOST_REQUIRE(done);
    if (result.ec)
        BOOST_TEST_MESSAGE("start: " << result.ec.message() << ": "
                                     << (result.vm ? result.vm->failure_detail() : ""));
    return result;
}

} // namespace

BOOST_AUTO_TEST_CASE(api_starts_a_vm_from_the_directory_alone) {
    const auto& dir = snapshot();
    auto snap = sm::image::from_snapshot(dir);
    std::string why;
    auto contents = snap.read(&why);
    BOOST_REQUIRE_MESSAGE(contents, why);
    BOOST_TEST(contents.value().memory_mib == 256u);
    BOOST_TEST(contents.value().image.reference == state().image);
    BOOST_TEST(contents.value().image.digest.str() == contents.value().meta.image_digest);

    boost::asio::io_context io;
    std::vector<std::string> console;
    snap.options().console = [&](std::string_view text) { console.emplace_back(text); };
    auto vm = start(io, snap);
    BOOST_REQUIRE_MESSAGE(!vm.ec, vm.ec.message()
                                      << ": " << (vm.vm ? vm.vm->failure_detail() : "") << "\n"
                                      << (vm.vm ? vm.vm->console_tail() : ""));
    BOOST_TEST(vm.vm->restored());
    BOOST_TEST(vm.vm->options().memory_mib == 256u); // the snapshot's, not the 512 default
    BOOST_TEST(vm.vm->options().cpus == 1u);
    bool done = false;
    sm::agent::exec_output output;
    supermachine::error_code exec_ec = sm::errc::invalid_argument;
    vm.vm->async_exec({.argv = {"sh", "-c",
                                "echo out; echo err >&2; "
                                "awk '/MemTotal/ {print ($2 > 200000 && $2 < 262144)}' "
                                "/proc/meminfo; exit 4"}},
                      [&](supermachine::error_code ec, sm::agent::exec_output o) {
                          exec_ec = ec;
                          output = std::move(o);
                          done = true;
                      });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(2);
    while (!done && std::chrono::steady_clock::now() < deadline)
        io.run_one_for(std::chrono::milliseconds(200));
    BOOST_REQUIRE(done);
    BOOST_TEST(!exec_ec, exec_ec.message());
    BOOST_TEST(output.exit_code == 4);
    BOOST_TEST(output.stdout_data == "out\n1\n"); // a 256 MiB guest
    BOOST_TEST(output.stderr_data == "err\n");
    vm.vm->kill();
}

BOOST_AUTO_TEST_CASE(cli_restore_runs_a_command_with_its_exit_status) {
    const auto dir = quote(snapshot().string());
    auto r = run_cli("restore " + dir + " -- sh -c 'echo hi; exit 3'");
    BOOST_TEST(r.status == 3);
    BOOST_TEST(r.out == "hi\n");
    BOOST_TEST(has(r.err, "supermachine: restored "));
    BOOST_TEST(has(r.err, "256 MiB"));
    // Options as for run, the image config's defaults otherwise; -q: no note.
    auto options = run_cli("restore -q -e GREETING=hello -w /tmp " + dir +
                           " sh -c 'echo $GREETING; pwd; id -u; echo $PATH'");
    BOOST_TEST(options.status == 0);
    BOOST_TEST(options.out.starts_with("hello\n/tmp\n0\n"), options.out);
    BOOST_TEST(has(options.out, "/bin")); // the image config's PATH
    BOOST_TEST(options.err == "");
    auto user = run_cli("restore -q -u 1234 " + dir + " id -u");
    BOOST_TEST(user.status == 0);
    BOOST_TEST(user.out == "1234\n");
    auto missing = run_cli("restore -q " + dir + " /no/such/command");
    BOOST_TEST(missing.status == 127);
}

BOOST_AUTO_TEST_CASE(cli_restore_of_a_file_is_still_the_kvm_snapshot) {
    auto r = run_cli("restore " + quote((state().work / "no-such-file").string()));
    BOOST_TEST(r.status == 2); // the kvm restore's "bad input"
    BOOST_TEST(has(r.err, "no-such-file"));
}

BOOST_AUTO_TEST_CASE(garbage_and_truncated_records_are_clean_errors) {
    const auto valid = snapshot_meta().encode();
    const auto dir = state().work / "garbage";
    fs::create_directories(dir);
    auto expect_refused = [&](const char* what) {
        std::string why;
        auto contents = sm::image::from_snapshot(dir).read(&why);
        BOOST_TEST(!contents, what);
        BOOST_TEST(!why.empty(), what);
        boost::asio::io_context io;
        auto r = start(io, sm::image::from_snapshot(dir));
        BOOST_TEST(static_cast<bool>(r.ec), what);
        BOOST_TEST((r.vm && !r.vm->failure_detail().empty()), what);
    };
    const std::string text = "WARM garbage that is not a record";
    write_file(dir / "meta", std::as_bytes(std::span(text)));
    expect_refused("garbage");
    // Every truncation of a valid record.
    for (std::size_t n = 0; n < valid.size(); n += 7) {
        write_file(dir / "meta", std::span(valid).first(n));
        std::string why;
        BOOST_TEST(!sm::image::from_snapshot(dir).read(&why), n);
    }
    write_file(dir / "meta", std::span(valid).first(valid.size() / 2));
    expect_refused("truncated");
    // Larger than any record: refused before it is read whole.
    std::vector<std::byte> huge(1 << 20, std::byte{0x41});
    write_file(dir / "meta", huge);
    expect_refused("huge");
    // Sealed but asking for absurd resources.
    auto meta = snapshot_meta();
    meta.cpus = 100000;
    write_file(dir / "meta", meta.encode());
    std::string why;
    auto r = sm::image::from_snapshot(dir).read(&why);
    BOOST_TEST((!r && r.error() == sm::errc::snapshot_bad_record), why);
    // No record at all, and not a directory.
    fs::remove(dir / "meta");
    r = sm::image::from_snapshot(dir).read(&why);
    BOOST_TEST((!r && r.error() == sm::errc::not_found));
    BOOST_TEST(has(why, "no meta record"), why);
    auto cli = run_cli("restore " + quote(dir.string()) + " -- true");
    BOOST_TEST(cli.status == 125);
    BOOST_TEST(has(cli.err, "no meta record"), cli.err);
}

BOOST_AUTO_TEST_CASE(an_image_the_content_store_lacks_is_named) {
    const auto& dir = snapshot();
    const auto digest = snapshot_meta().image_digest;
    // A fresh, empty cache (the kernel still found through SUPERMACHINE_KERNEL_DIR).
    const auto empty = state().work / "empty-cache";
    fs::create_directories(empty);
    auto cli = run_cli("restore " + quote(dir.string()) + " -- true",
                       "XDG_CACHE_HOME=" + quote(empty.string()));
    BOOST_TEST(cli.status == 125);
    BOOST_TEST(has(cli.err, digest), cli.err);
    BOOST_TEST(has(cli.err, "not in the content store"), cli.err);
    // Through the API, with the store given explicitly.
    auto snap = sm::image::from_snapshot(dir);
    snap.options().cache_dir = empty / "supermachine";
    boost::asio::io_context io;
    auto r = start(io, snap);
    BOOST_TEST((r.ec == sm::errc::not_found), r.ec.message());
    BOOST_REQUIRE(r.vm);
    BOOST_TEST(has(r.vm->failure_detail(), digest), r.vm->failure_detail());
    // A re-sealed record naming an image nobody pulled.
    auto meta = snapshot_meta();
    meta.image_digest = "sha256:" + std::string(64, '0');
    std::string why;
    auto contents = sm::image::from_snapshot(directory_with("other-image", meta)).read(&why);
    BOOST_TEST((!contents && contents.error() == sm::errc::not_found));
    BOOST_TEST(has(why, meta.image_digest), why);
    // ... or a digest that is not one.
    meta.image_digest = "sha256:../../etc/passwd";
    contents = sm::image::from_snapshot(directory_with("bad-digest", meta)).read(&why);
    BOOST_TEST(!contents);
    // The image is there but its root filesystem is another cache's.
    meta = snapshot_meta();
    meta.rootfs = "/elsewhere/rootfs/x.ext4";
    contents = sm::image::from_snapshot(directory_with("other-rootfs", meta)).read(&why);
    BOOST_TEST((!contents && contents.error() == sm::errc::snapshot_mismatch));
    BOOST_TEST(has(why, "/elsewhere/rootfs/x.ext4"), why);
}

BOOST_AUTO_TEST_CASE(a_kernel_the_cache_lacks_is_named) {
    auto meta = snapshot_meta();
    meta.kernel_release = "9.9.9-not-cached";
    const auto dir = directory_with("other-kernel", meta);
    std::string why;
    auto contents = sm::image::from_snapshot(dir).read(&why);
    BOOST_TEST((!contents && contents.error() == sm::errc::kernel_not_found));
    BOOST_TEST(has(why, "9.9.9-not-cached"), why);
    auto cli = run_cli("restore " + quote(dir.string()) + " -- true");
    BOOST_TEST(cli.status == 125);
    BOOST_TEST(has(cli.err, "9.9.9-not-cached"), cli.err);
    // The real snapshot with no kernel cache at all.
    cli = run_cli("restore " + quote(snapshot().string()) + " -- true",
                  "SUPERMACHINE_KERNEL_DIR=/nonexistent");
    BOOST_TEST(cli.status == 125);
    BOOST_TEST(has(cli.err, "is not in the kernel cache"), cli.err);
    // A release that tries to be a path is never one.
    for (const char* release : {"../../../../etc", "..", "a/b", ""}) {
        BOOST_TEST(!sm::boot::find_cached_kernel(release), release);
        meta.kernel_release = release;
        BOOST_TEST(!sm::image::from_snapshot(directory_with("path-kernel", meta)).read());
    }
    // The cached one is found by its release.
    auto found = sm::boot::find_cached_kernel(snapshot_meta().kernel_release);
    BOOST_REQUIRE(found);
    BOOST_TEST(fs::exists(found.value().vmlinuz));
    BOOST_TEST(found.value().release == snapshot_meta().kernel_release);
}

BOOST_AUTO_TEST_CASE(cleanup) {
    std::error_code ec;
    fs::remove_all(state().work, ec);
}
