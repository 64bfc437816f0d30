// supermachine run's warm start through the real CLI, QEMU and the Debian
// cloud kernel (label qemu): the first run creates the cached snapshot or,
// where QEMU refuses, says why in one line and carries on; later runs
// restore it; exit codes stay exact; --no-snapshot cold boots; a corrupted
// cached snapshot is detected and rebuilt, never restored.
#include "../../tools/supermachine/warm_start.hpp"

#include <supermachine/backend/qemu.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/image.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <skip.hpp>

#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace sm = supermachine;
namespace fs = std::filesystem;

namespace {

struct outcome {
    int status = -1;
    std::string out, err;
};

std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s)
        q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

struct fixture_state {
    fs::path work, cli, agent, kernel_dir, image_dir;
    std::string image;
};

fixture_state& state() {
    static fixture_state s = [] {
        fixture_state s;
        const char* bin = std::getenv("SUPERMACHINE_BINARY_DIR");
        const char* src = std::getenv("SUPERMACHINE_SOURCE_DIR");
        if (!bin || !src)
            sm::test::skip("SUPERMACHINE_BINARY_DIR/SOURCE_DIR not set (run via ctest)");
        s.cli = fs::path(bin) / "bin" / "supermachine";
        s.agent = fs::path(bin) / "bin" / "supermachine-agent";
        if (!fs::exists(s.cli) || !fs::exists(s.agent))
            sm::test::skip("the CLI or agent is not built");
        if (!sm::backend::find_qemu("qemu-system-x86_64"))
            sm::test::skip("qemu-system-x86_64 not found");
        auto kernel = sm::boot::default_kernel();
        if (!kernel) sm::test::skip("no guest kernel cached (bash scripts/fetch-kernel.sh)");
        s.kernel_dir = kernel.value().root;
        char pattern[] = "/tmp/warmrun-test-XXXXXX";
        if (!::mkdtemp(pattern)) sm::test::skip("mkdtemp failed");
        s.work = pattern;
        s.image_dir = s.work / "img";
        const auto make = "bash " +
                          quote((fs::path(src) / "scripts" / "make-demo-image.sh").string()) + " " +
                          quote(s.image_dir.string()) + " busybox >/dev/null 2>&1";
        if (std::system(make.c_str()) != 0)
            sm::test::skip("make-demo-image.sh failed (busybox-static, umoci?)");
        s.image = "oci:" + s.image_dir.string() + ":busybox";
        ::setenv("XDG_CACHE_HOME", (s.work / "cache").c_str(), 1);
        ::setenv("SUPERMACHINE_KERNEL_DIR", s.kernel_dir.c_str(), 1);
        ::setenv("SUPERMACHINE_AGENT", s.agent.c_str(), 1); // for the API cases in this process
        return s;
    }();
    return s;
}

outcome run(const std::string& arguments) {
    auto& s = state();
    static int n = 0;
    const auto out = s.work / ("out" + std::to_string(n));
    const auto err = s.work / ("err" + std::to_string(n++));
    const auto command = "timeout 300 " + quote(s.cli.string()) + " run " + arguments + " >" +
                         quote(out.string()) + " 2>" + quote(err.string()) + " </dev/null";
    const int raw = std::system(command.c_str());
    outcome o;
    o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
    o.out = slurp(out);
    o.err = slurp(err);
    BOOST_TEST_MESSAGE("run " << arguments << " -> " << o.status << "\n" << o.err);
    return o;
}

bool has(const std::string& text, std::string_view needle) {
    return text.find(needle) != std::string::npos;
}

int count(const std::string& text, std::string_view needle) {
    int n = 0;
    for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
        ++n;
    return n;
}

fs::path snapshot_dir() {
    auto& s = state();
    auto ready = sm::image::from_oci(s.image).prepare();
    BOOST_REQUIRE(ready);
    sm::vm_options options; // the CLI's defaults: 512 MiB, 1 cpu
    options.kernel = sm::boot::default_kernel().value();
    return sm::oci::content_store::default_root() / "snapshots" /
           sm::cli::warm_snapshot_key(ready.value(), options, sm::detail::agent_identity(s.agent));
}

} // namespace

BOOST_AUTO_TEST_CASE(first_run_snapshots_or_explains_then_later_runs_restore) {
    const auto image = quote(state().image);
    auto first = run(image + " sh -c 'echo hi; exit 42'");
    BOOST_TEST(first.status == 42);
    BOOST_TEST(first.out == "hi\n");
    const bool created = has(first.err, "snapshot created");
    const bool refused = has(first.err, "cannot snapshot (");
    BOOST_TEST((created != refused), "exactly one of created/refused:\n" << first.err);
    BOOST_TEST(count(first.err, "snapshot") == 1, "one line about the snapshot");
    if (refused) {
        // QEMU 7.2: vhost-user-vsock has no migration support. The refusal
        // names the device and the run carries on untouched (a second run
        // too: the guest was never paused).
        BOOST_TEST(has(first.err, "vhost-user-vsock"));
        BOOST_TEST(!fs::exists(snapshot_dir() / "meta"));
        auto second = run(image + " sh -c 'echo again; exit 3'");
        BOOST_TEST(second.status == 3);
        BOOST_TEST(second.out == "again\n");
        BOOST_TEST_MESSAGE("QEMU refuses to snapshot this device set; restore not exercised");
        return;
    }
    BOOST_TEST(fs::exists(snapshot_dir() / "meta"));
    auto second = run(image + " sh -c 'echo hi; exit 42'");
    BOOST_TEST(second.status == 42);
    BOOST_TEST(second.out == "hi\n");
    BOOST_TEST(has(second.err, "restored from snapshot"));
    // Clones never share random state, and their clocks move on.
    auto a = run(image + " sh -c 'head -c 16 /dev/urandom | od -An -tx1; date +%s'");
    auto b = run(image + " sh -c 'head -c 16 /dev/urandom | od -An -tx1; date +%s'");
    BOOST_TEST(a.status == 0);
    BOOST_TEST(b.status == 0);
    BOOST_TEST(a.out.substr(0, 48) != b.out.substr(0, 48));
}

BOOST_AUTO_TEST_CASE(no_snapshot_cold_boots) {
    auto r = run("--no-snapshot " + quote(state().image) + " sh -c 'exit 7'");
    BOOST_TEST(r.status == 7);
    BOOST_TEST(!has(r.err, "snapshot"));
}

BOOST_AUTO_TEST_CASE(corrupted_snapshot_is_rebuilt_not_trusted) {
    const auto dir = snapshot_dir();
    std::error_code ec;
    fs::remove_all(dir, ec);
    fs::create_directories(dir);
    // A plausible-looking but corrupt snapshot: garbage record and stream.
    for (const char* name : {"meta", "machine", "machine.devices", "initramfs.cpio"}) {
        std::ofstream out(dir / name, std::ios::binary);
        out << "WARM garbage that must never reach QEMU";
    }
    auto r = run(quote(state().image) + " sh -c 'echo ok; exit 5'");
    BOOST_TEST(r.status == 5);
    BOOST_TEST(r.out == "ok\n");
    BOOST_TEST(has(r.err, "cached snapshot unusable"));
    BOOST_TEST(!has(r.err, "restored from snapshot"));
    // Gone, or replaced by a valid one: never the garbage.
    if (fs::exists(dir / "meta")) {
        auto bytes = sm::detail::read_small_file(dir / "meta", 1 << 16);
        BOOST_REQUIRE(bytes);
        BOOST_TEST(static_cast<bool>(sm::detail::warm_snapshot_meta::decode(bytes.value())));
    }
}

// The API refuses a snapshot that does not match (other memory size), is
// truncated or corrupted, before QEMU starts; one whose record and
// fingerprints are valid but whose contents are garbage still fails (here:
// the device-state file), never runs a guest.
BOOST_AUTO_TEST_CASE(async_restore_validates_before_it_trusts) {
    auto& s = state();
    auto ready = sm::image::from_oci(s.image).prepare();
    BOOST_REQUIRE(ready);
    const auto dir = s.work / "fabricated";
    fs::create_directories(dir);
    auto write = [&](const char* name, const std::string& text) {
        std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
        out << text;
    };
    write("machine", std::string(4096, 'Q'));
    write("machine.devices", std::string(16, 'D'));
    write("initramfs.cpio", std::string(512, 'I'));
    sm::detail::warm_snapshot_meta meta;
    meta.image_digest = ready.value().digest.str();
    meta.rootfs = ready.value().rootfs.string();
    meta.memory_mib = 256;
    meta.cpus = 1;
    meta.kernel_release = sm::boot::default_kernel().value().release;
    meta.agent_identity = sm::detail::agent_identity(s.agent);
    meta.token = "0123456789abcdef0123456789abcdef";
    meta.cmdline =
        "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init supermachine.token=" + meta.token +
        " supermachine.root=/dev/vda supermachine.port=1024";
    meta.stream = sm::detail::fingerprint_file(dir / "machine").value();
    meta.devices = sm::detail::fingerprint_file(dir / "machine.devices").value();
    meta.initramfs = sm::detail::fingerprint_file(dir / "initramfs.cpio").value();
    auto seal = [&] {
        const auto bytes = meta.encode();
        std::ofstream out(dir / "meta", std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(bytes.data()),
                  static_cast<std::streamsize>(bytes.size()));
    };
    auto restore = [&](std::uint32_t memory_mib) {
        boost::asio::io_context io;
        sm::vm_options options;
        options.memory_mib = memory_mib;
        options.ready_timeout = std::chrono::seconds(60);
        std::error_code result = sm::errc::invalid_argument;
        sm::vm::async_restore(io.get_executor(), dir, ready.value(), options,
                              [&](std::error_code ec, std::shared_ptr<sm::vm> v) {
                                  result = ec;
                                  if (v) v->kill();
                              });
        io.run();
        BOOST_TEST_MESSAGE("restore: " << result.message());
        return result;
    };
    seal();
    BOOST_TEST((restore(512) == sm::errc::snapshot_mismatch)); // taken with 256 MiB
    meta.memory_mib = 512;
    seal();
    write("machine", std::string(4095, 'Q')); // truncated
    BOOST_TEST((restore(512) == sm::errc::snapshot_truncated));
    write("machine", std::string(4095, 'Q') + "R"); // same size, one byte changed
    BOOST_TEST((restore(512) == sm::errc::snapshot_bad_record));
    write("meta", "WARM");
    BOOST_TEST(static_cast<bool>(restore(512)));
    // Record and fingerprints valid, contents garbage.
    write("machine", std::string(4096, 'Q'));
    seal();
    const auto garbage = restore(512);
    BOOST_TEST(static_cast<bool>(garbage));
    BOOST_TEST_MESSAGE("garbage stream: " << garbage.message());
}

// Two runs of one image at once: each its own VM and exit code, each sees
// only its own file; neither waits for the other's snapshot creation.
BOOST_AUTO_TEST_CASE(concurrent_runs_are_private_and_safe) {
    auto& s = state();
    std::string command;
    for (int k : {1, 2}) {
        const auto n = std::to_string(k);
        command += "( timeout 300 " + quote(s.cli.string()) + " run " + quote(s.image) +
                   " sh -c 'echo mine" + n + " > /tmp/own; sleep 1; cat /tmp/own; exit 2" + n +
                   "' >" + quote((s.work / ("cc" + n + ".out")).string()) + " 2>" +
                   quote((s.work / ("cc" + n + ".err")).string()) + " </dev/null; echo $? >" +
                   quote((s.work / ("cc" + n + ".status")).string()) + " ) & ";
    }
    command += "wait";
    BOOST_REQUIRE(std::system(("bash -c " + quote(command)).c_str()) == 0);
    for (int k : {1, 2}) {
        const auto n = std::to_string(k);
        BOOST_TEST(slurp(s.work / ("cc" + n + ".status")) == "2" + n + "\n");
        BOOST_TEST(slurp(s.work / ("cc" + n + ".out")) == "mine" + n + "\n");
        BOOST_TEST_MESSAGE("concurrent " << n << ": " << slurp(s.work / ("cc" + n + ".err")));
    }
}

BOOST_AUTO_TEST_CASE(cleanup) {
    std::error_code ec;
    fs::remove_all(state().work, ec);
}
