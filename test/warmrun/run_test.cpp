// supermachine run's warm start through the real CLI, QEMU and the Debian
// cloud kernel (label qemu): the first run creates the cached snapshot or,
// where QEMU refuses, says why in one line and carries on; later runs
// restore it; exit codes stay exact; --no-snapshot cold boots; a corrupted
// cached snapshot is detected and rebuilt, never restored.
#include "../../tools/supermachine/warm_start.hpp"
#include "warmrun_fixture.hpp"

#include <supermachine/backend/qemu.hpp>
#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/image.hpp>

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

environment& state() {
    static environment s = make_environment("warmrun-test");
    return s;
}

outcome run(const std::string& arguments) {
    return run_cli(state(), "run --verbose " + arguments); // the decisions are --verbose lines
}

[[maybe_unused]] int count(const std::string& text, std::string_view needle) {
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

std::int64_t host_seconds() {
    return std::chrono::duration_cast<std::chrono::seconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

// The meta record re-sealed over the current files (a "valid-looking"
// snapshot whose contents were tampered with).
void reseal(const fs::path& dir) {
    auto bytes = sm::detail::read_small_file(dir / "meta", 1 << 16);
    BOOST_REQUIRE(bytes);
    auto meta = sm::detail::warm_snapshot_meta::decode(bytes.value());
    BOOST_REQUIRE(meta);
    meta.value().stream = sm::detail::fingerprint_file(dir / "state").value();
    meta.value().devices = sm::detail::fingerprint_file(dir / "disk.qcow2").value();
    meta.value().ram = sm::detail::stat_fingerprint(dir / "ram").value();
    const auto out = meta.value().encode();
    std::ofstream f(dir / "meta", std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size()));
}

} // namespace

BOOST_AUTO_TEST_CASE(first_run_snapshots_then_later_runs_restore) {
    const auto image = quote(state().image);
    auto first = run(image + " sh -c 'echo hi; exit 42'");
    BOOST_TEST(first.status == 42);
    BOOST_TEST(first.out == "hi\n");
    BOOST_TEST(has(first.err, "cold boot: creating the warm snapshot"));
    BOOST_TEST(has(first.err, "snapshot created"));
    // The first run itself goes on in a restored clone (the cold VM wrote the RAM file).
    BOOST_TEST(has(first.err, "warm start: restored from snapshot"));
    BOOST_REQUIRE(fs::exists(snapshot_dir() / "meta"));
    for (const char* f : {"state", "ram", "disk.qcow2"})
        BOOST_TEST(fs::exists(snapshot_dir() / f), f);
    // A restore loads no initramfs: the snapshot keeps none.
    BOOST_TEST(!fs::exists(snapshot_dir() / "initramfs.cpio"));
    auto second = run(image + " sh -c 'echo hi; exit 42'");
    BOOST_TEST(second.status == 42);
    BOOST_TEST(second.out == "hi\n");
    BOOST_TEST(has(second.err, "warm start: restored from snapshot"));
    BOOST_TEST(!has(second.err, "cold boot"));
}

BOOST_AUTO_TEST_CASE(clones_differ_in_randomness_and_run_on_the_host_clock) {
    const auto image = quote(state().image);
    const auto command = image + " sh -c 'head -c 16 /dev/urandom | od -An -tx1 | tr -d \" \\n\"; "
                                 "echo; date +%s'";
    auto a = run(command);
    const auto host_a = host_seconds();
    auto b = run(command);
    const auto host_b = host_seconds();
    BOOST_REQUIRE(a.status == 0);
    BOOST_REQUIRE(b.status == 0);
    BOOST_TEST(has(a.err, "restored from snapshot"));
    BOOST_TEST(has(b.err, "restored from snapshot"));
    const auto a_nl = a.out.find('\n'), b_nl = b.out.find('\n');
    BOOST_REQUIRE(a_nl == 32u);
    BOOST_REQUIRE(b_nl == 32u);
    BOOST_TEST(a.out.substr(0, 32) != b.out.substr(0, 32)); // the RNG was reseeded per clone
    // The snapshot's clock is minutes old by now; set_clock puts each clone on the host's.
    const auto guest_a = std::stoll(a.out.substr(a_nl + 1));
    const auto guest_b = std::stoll(b.out.substr(b_nl + 1));
    BOOST_TEST(std::llabs(guest_a - host_a) <= 3, guest_a << " vs host " << host_a);
    BOOST_TEST(std::llabs(guest_b - host_b) <= 3, guest_b << " vs host " << host_b);
}

BOOST_AUTO_TEST_CASE(no_snapshot_cold_boots) {
    auto r = run("--no-snapshot " + quote(state().image) + " sh -c 'exit 7'");
    BOOST_TEST(r.status == 7);
    BOOST_TEST(has(r.err, "cold boot"));
    BOOST_TEST(!has(r.err, "snapshot"));
}

// A state file QEMU cannot load, behind a record whose fingerprints match
// (tampered and re-sealed): QEMU fails the incoming migration, the run says
// so, cold boots, rebuilds the snapshot and gives the right result.
BOOST_AUTO_TEST_CASE(corrupted_state_is_rebuilt_not_trusted) {
    const auto dir = snapshot_dir();
    if (!fs::exists(dir / "meta")) run(quote(state().image) + " true");
    BOOST_REQUIRE(fs::exists(dir / "state"));
    {
        std::fstream f(dir / "state", std::ios::binary | std::ios::in | std::ios::out);
        f.seekp(64);
        const std::string junk(4096, '\xa5');
        f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
    }
    reseal(dir);
    auto r = run(quote(state().image) + " sh -c 'echo ok; exit 5'");
    BOOST_TEST(r.status == 5);
    BOOST_TEST(r.out == "ok\n");
    BOOST_TEST(has(r.err, "cached snapshot unusable"));
    BOOST_TEST(has(r.err, "snapshot created"));
    // And a plain byte flip without re-sealing: refused before QEMU starts.
    {
        std::fstream f(dir / "state", std::ios::binary | std::ios::in | std::ios::out);
        f.seekp(100);
        f.put('\x5a');
    }
    auto again = run(quote(state().image) + " sh -c 'echo ok2; exit 6'");
    BOOST_TEST(again.status == 6);
    BOOST_TEST(again.out == "ok2\n");
    BOOST_TEST(has(again.err, "cached snapshot unusable"));
    auto bytes = sm::detail::read_small_file(dir / "meta", 1 << 16);
    BOOST_REQUIRE(bytes);
    BOOST_TEST(static_cast<bool>(sm::detail::warm_snapshot_meta::decode(bytes.value())));
    // Garbage everywhere: refused, rebuilt.
    for (const char* name : {"meta", "state", "disk.qcow2"}) {
        std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
        out << "WARM garbage that must never reach QEMU";
    }
    auto third = run(quote(state().image) + " sh -c 'exit 9'");
    BOOST_TEST(third.status == 9);
    BOOST_TEST(has(third.err, "cached snapshot unusable"));
}

// Through the API: state written before the snapshot (a tmpfs file, a
// running process) is there after restore; two restores from one snapshot
// at once are each private.
BOOST_AUTO_TEST_CASE(api_snapshot_restore_state_and_private_clones) {
    auto& s = state();
    auto ready = sm::image::from_oci(s.image).prepare();
    BOOST_REQUIRE(ready);
    const auto dir = s.work / "api-snapshot";
    const auto options = snapshottable_options();
    api_driver api;
    auto cold = api.boot(ready.value(), options);
    api.exec(*cold, "echo before-snapshot > /tmp/before; "
                    "(sleep 100000 </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid)");
    const auto report = api.snapshot(*cold, dir, false);
    BOOST_TEST(report.bytes < (4u << 20)); // device state only: RAM stays in the file
    cold.reset();

    // Two restores at once.
    std::shared_ptr<sm::vm> clone[2];
    supermachine::error_code clone_ec[2] = {sm::errc::invalid_argument, sm::errc::invalid_argument};
    api.pending = 2;
    for (int k = 0; k < 2; ++k)
        sm::vm::async_restore(api.io.get_executor(), dir, ready.value(), options,
                              [&, k](supermachine::error_code e, std::shared_ptr<sm::vm> v) {
                                  clone_ec[k] = e;
                                  clone[k] = v;
                                  --api.pending;
                              });
    api.wait();
    for (int k = 0; k < 2; ++k) {
        BOOST_REQUIRE_MESSAGE(!clone_ec[k], clone_ec[k].message()
                                                << "\n"
                                                << (clone[k] ? clone[k]->console_tail() : ""));
        BOOST_TEST(clone[k]->restored());
        BOOST_TEST_MESSAGE("clone " << k << " engine to agent: "
                                    << std::chrono::duration_cast<std::chrono::milliseconds>(
                                           clone[k]->restore_to_agent())
                                           .count()
                                    << " ms");
    }
    // And a command in each at once.
    std::string out[2];
    api.pending = 2;
    for (int k = 0; k < 2; ++k) {
        const auto n = std::to_string(k);
        clone[k]->async_exec(
            {.argv = {"sh", "-c",
                      "cat /tmp/before; kill -0 $(cat /tmp/pid) && echo alive; echo clone" + n +
                          " > /tmp/own" + n + "; sleep 1; ls /tmp | grep own | tr '\\n' ' '"}},
            [&, k](supermachine::error_code e, sm::agent::exec_output o) {
                BOOST_TEST(!e);
                BOOST_TEST(o.exit_code == 0);
                out[k] = o.stdout_data;
                --api.pending;
            });
    }
    api.wait();
    for (int k = 0; k < 2; ++k) {
        const auto n = std::to_string(k);
        BOOST_TEST(out[k] == "before-snapshot\nalive\nown" + n + " ", out[k]);
        clone[k]->kill();
    }
}

// resume = true: the RAM file is copied (the vm runs on) and the agent
// reattached; the vm keeps working and the snapshot restores.
BOOST_AUTO_TEST_CASE(api_snapshot_and_resume) {
    auto& s = state();
    auto ready = sm::image::from_oci(s.image).prepare();
    BOOST_REQUIRE(ready);
    const auto dir = s.work / "api-resume";
    const auto options = snapshottable_options();
    api_driver api;
    auto v = api.boot(ready.value(), options);
    api.exec(*v, "echo kept > /tmp/kept");
    api.snapshot(*v, dir, true);
    BOOST_TEST(api.exec(*v, "cat /tmp/kept; echo after > /tmp/after; echo ok") == "kept\nok\n");
    std::shared_ptr<sm::vm> clone;
    supermachine::error_code ec = sm::errc::invalid_argument;
    api.pending = 1;
    sm::vm::async_restore(api.io.get_executor(), dir, ready.value(), options,
                          [&](supermachine::error_code e, std::shared_ptr<sm::vm> c) {
                              ec = e;
                              clone = c;
                              --api.pending;
                          });
    api.wait();
    BOOST_REQUIRE_MESSAGE(!ec, ec.message());
    // The clone has the snapshot's state, not what the original did since.
    BOOST_TEST(api.exec(*clone, "cat /tmp/kept; ls /tmp/after 2>/dev/null; echo end") ==
               "kept\nend\n");
    clone->kill();
    v->kill();
}

// The API refuses a snapshot that does not match (other memory size), is
// truncated or corrupted, before QEMU starts.
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
    write("state", std::string(4096, 'Q'));
    write("disk.qcow2", std::string(16, 'D'));
    { std::ofstream out(dir / "ram", std::ios::binary | std::ios::trunc); }
    fs::resize_file(dir / "ram", 512u << 20);
    sm::detail::warm_snapshot_meta meta;
    meta.image_digest = ready.value().digest.str();
    meta.rootfs = ready.value().rootfs.string();
    meta.memory_mib = 256;
    meta.cpus = 1;
    meta.kernel_release = sm::boot::default_kernel().value().release;
    meta.agent_identity = sm::detail::agent_identity(s.agent);
    meta.token = "0123456789abcdef0123456789abcdef";
    meta.cmdline = "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init "
                   "supermachine.root=/dev/vda supermachine.channel=serial supermachine.net=user";
    meta.stream = sm::detail::fingerprint_file(dir / "state").value();
    meta.devices = sm::detail::fingerprint_file(dir / "disk.qcow2").value();
    meta.ram = sm::detail::stat_fingerprint(dir / "ram").value();
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
        supermachine::error_code result = sm::errc::invalid_argument;
        sm::vm::async_restore(io.get_executor(), dir, ready.value(), options,
                              [&](supermachine::error_code ec, std::shared_ptr<sm::vm> v) {
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
    write("state", std::string(4095, 'Q')); // truncated
    BOOST_TEST((restore(512) == sm::errc::snapshot_truncated));
    write("state", std::string(4095, 'Q') + "R"); // same size, one byte changed
    BOOST_TEST((restore(512) == sm::errc::snapshot_bad_record));
    write("state", std::string(4096, 'Q'));
    fs::resize_file(dir / "ram", 256u << 20); // the RAM file changed size
    BOOST_TEST((restore(512) == sm::errc::snapshot_truncated));
    write("meta", "WARM");
    BOOST_TEST(static_cast<bool>(restore(512)));
    // Record and fingerprints valid, contents garbage: QEMU refuses the
    // stream and exits; the restore fails, no guest runs.
    fs::resize_file(dir / "ram", 512u << 20);
    meta.ram = sm::detail::stat_fingerprint(dir / "ram").value();
    seal();
    const auto garbage = restore(512);
    BOOST_TEST(static_cast<bool>(garbage));
    BOOST_TEST_MESSAGE("garbage stream: " << garbage.message());
}

// A valid snapshot whose record names another token (re-sealed): the
// agent refuses the hello, so the reseed and clock sent right behind it are
// never run, and the restore fails at once with agent_auth_failed rather
// than waiting for answers that will not come.
BOOST_AUTO_TEST_CASE(a_refused_hello_fails_the_restore_at_once) {
    auto& s = state();
    const auto cached = snapshot_dir();
    if (!fs::exists(cached / "meta")) run(quote(s.image) + " true");
    BOOST_REQUIRE(fs::exists(cached / "meta"));
    const auto dir = s.work / "other-token";
    fs::remove_all(dir);
    fs::create_directories(dir);
    for (const char* name : {"meta", "state", "disk.qcow2"})
        fs::copy_file(cached / name, dir / name);
    fs::create_hard_link(cached / "ram", dir / "ram"); // mapped privately: never written
    auto bytes = sm::detail::read_small_file(dir / "meta", 1 << 16);
    BOOST_REQUIRE(bytes);
    auto meta = sm::detail::warm_snapshot_meta::decode(bytes.value());
    BOOST_REQUIRE(meta);
    const std::string wrong = "ffffffffffffffffffffffffffffffff";
    BOOST_REQUIRE(wrong.size() == meta.value().token.size());
    // The token is in the guest's memory and the record, never on the command line.
    BOOST_TEST(meta.value().cmdline.find(meta.value().token) == std::string::npos);
    meta.value().token = wrong;
    const auto out = meta.value().encode();
    {
        std::ofstream f(dir / "meta", std::ios::binary | std::ios::trunc);
        f.write(reinterpret_cast<const char*>(out.data()),
                static_cast<std::streamsize>(out.size()));
    }
    auto ready = sm::image::from_oci(s.image).prepare();
    BOOST_REQUIRE(ready);
    boost::asio::io_context io;
    sm::vm_options options;
    options.ready_timeout = std::chrono::seconds(60);
    supermachine::error_code result;
    const auto started = std::chrono::steady_clock::now();
    sm::vm::async_restore(io.get_executor(), dir, ready.value(), options,
                          [&](supermachine::error_code ec, std::shared_ptr<sm::vm> v) {
                              result = ec;
                              if (v) v->kill();
                          });
    io.run();
    const auto took = std::chrono::steady_clock::now() - started;
    BOOST_TEST_MESSAGE("restore with another token: " << result.message());
    BOOST_TEST((result == sm::errc::agent_auth_failed));
    BOOST_TEST(took < std::chrono::seconds(20)); // not the 30 s bound on a silent agent
    fs::remove_all(dir);
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
