// Re-snapshots of restored vms (label qemu; doc/warm-start.md,
// "Re-snapshots"): real QEMU, the Debian cloud kernel, the demo image. A vm
// restored with snapshottable_after_restore works on its own copy of the
// RAM file and can be snapshotted again; what it did (a tmpfs file, a
// running process) is in the new snapshot and not in the template, which
// stays byte for byte what it was; chains of generations restore; a vm
// restored without the option refuses with a reason naming it; and the
// CLI's `restore DIR --snapshot-to NEW -- CMD` does the same end to end.
#include "warmrun_fixture.hpp"

#include <supermachine/detail/warm_snapshot.hpp>
#include <supermachine/image.hpp>
#include <supermachine/vm.hpp>

#include <boost/test/unit_test.hpp>

#include <chrono>
#include <string>

namespace sm = supermachine;
namespace fs = std::filesystem;

namespace {

using namespace supermachine::test::warmrun;

environment& state() {
    static environment s = make_environment("resnapshot-test");
    return s;
}

// Everything a snapshot directory holds, by content (the RAM file too) and
// size + mtime, so a template that a clone wrote into would show.
std::string fingerprint(const fs::path& dir) {
    std::string text;
    for (const char* name : {"meta", "state", "disk.qcow2", "ram"}) {
        auto got = sm::detail::fingerprint_file(dir / name);
        BOOST_REQUIRE_MESSAGE(got, (dir / name).string() << " unreadable");
        auto stamp = sm::detail::stat_fingerprint(dir / name);
        BOOST_REQUIRE(stamp);
        text += std::string(name) + ":" + std::to_string(got.value().size) + ":" +
                std::to_string(got.value().hash) + ":" + std::to_string(stamp.value().hash) + " ";
    }
    return text;
}

std::int64_t ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                 t)
        .count();
}

} // namespace

// Template → restore with the option → changes → snapshot → restore: the
// changes are there, the template is unchanged; a second generation
// (resume = true this time) restores with both generations' state.
BOOST_AUTO_TEST_CASE(restored_vm_snapshots_again_in_generations) {
    auto& s = state();
    auto ready = sm::image::from_oci(s.image).prepare();
    BOOST_REQUIRE(ready);
    const auto& image = ready.value();
    const auto base = s.work / "base", gen1 = s.work / "gen1", gen2 = s.work / "gen2";
    auto options = snapshottable_options();
    auto resnapshottable = options;
    resnapshottable.snapshottable_after_restore = true;
    api_driver api;

    {
        auto cold = api.boot(image, options);
        api.exec(*cold, "echo template > /tmp/template");
        api.snapshot(*cold, base, false);
    }
    const auto base_before = fingerprint(base);

    // Generation 1: a file and a background process, snapshotted (resume = false).
    {
        auto t = std::chrono::steady_clock::now();
        auto clone = api.restore(base, image, resnapshottable);
        BOOST_TEST_MESSAGE("restore with snapshottable_after_restore: " << ms_since(t) << " ms");
        BOOST_TEST(api.exec(*clone, "cat /tmp/template") == "template\n");
        api.exec(*clone, "echo first > /tmp/gen1; echo on-disk > /gen1-disk; sync; "
                         "(sleep 100000 </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid1)");
        t = std::chrono::steady_clock::now();
        const auto report = api.snapshot(*clone, gen1, false);
        BOOST_TEST_MESSAGE("re-snapshot (resume = false): " << ms_since(t) << " ms, state "
                                                            << report.bytes << " bytes");
        BOOST_TEST(report.bytes < (4u << 20)); // device state only
    }
    BOOST_TEST(fs::exists(gen1 / "meta"));
    // Its disk is the clone's copy of the template's overlay: still over the
    // cached rootfs, by absolute path.
    {
        auto qemu_img = sm::backend::detail::find_program("qemu-img");
        BOOST_REQUIRE(qemu_img);
        auto info = sm::backend::detail::capture_output(
            {qemu_img->string(), "info", "-U", (gen1 / "disk.qcow2").string()});
        BOOST_REQUIRE(info);
        BOOST_TEST(has(info.value(), "backing file: " + fs::absolute(image.rootfs).string()),
                   info.value());
    }
    BOOST_TEST(fingerprint(base) == base_before, "the template changed");

    // The new snapshot restores like any other (no option): file and process there.
    {
        auto clone = api.restore(gen1, image, options);
        BOOST_TEST(api.exec(*clone, "cat /tmp/template /tmp/gen1; kill -0 $(cat /tmp/pid1) && "
                                    "echo alive; echo 3 > /proc/sys/vm/drop_caches; "
                                    "cat /gen1-disk") == "template\nfirst\nalive\non-disk\n");
        // Without the option it is not snapshotted again, and says which option.
        const auto refused = api.try_snapshot(*clone, s.work / "refused", true);
        BOOST_TEST(!refused.saved);
        BOOST_TEST(has(refused.refusal, "snapshottable_after_restore"), refused.refusal);
        BOOST_TEST(!fs::exists(s.work / "refused"));
        // …and keeps working after the refusal.
        BOOST_TEST(api.exec(*clone, "echo still") == "still\n");
    }
    // The template does not see generation 1.
    {
        auto clone = api.restore(base, image, options);
        BOOST_TEST(api.exec(*clone, "cat /tmp/template; ls /tmp/gen1 /gen1-disk 2>/dev/null; "
                                    "echo end") == "template\nend\n");
    }

    // Generation 2, from the directory alone, snapshotted with resume = true:
    // the vm goes on, the snapshot holds the state at the pause.
    {
        std::shared_ptr<sm::vm> clone;
        supermachine::error_code ec = sm::errc::invalid_argument;
        sm::snapshot_start_options start;
        start.snapshottable_after_restore = true;
        start.ready_timeout = std::chrono::seconds(120);
        api.pending = 1;
        sm::vm::async_restore(api.io.get_executor(), gen1, start,
                              [&](supermachine::error_code e, std::shared_ptr<sm::vm> v) {
                                  ec = e;
                                  clone = v;
                                  --api.pending;
                              });
        api.wait();
        BOOST_REQUIRE_MESSAGE(!ec, ec.message() << ": " << (clone ? clone->failure_detail() : ""));
        BOOST_TEST(clone->options().snapshottable_after_restore);
        api.exec(*clone, "echo second > /tmp/gen2");
        const auto t = std::chrono::steady_clock::now();
        api.snapshot(*clone, gen2, true);
        BOOST_TEST_MESSAGE("re-snapshot (resume = true): " << ms_since(t) << " ms");
        BOOST_TEST(api.exec(*clone, "cat /tmp/gen2; echo after > /tmp/after; echo ok") ==
                   "second\nok\n");
        // The running vm's RAM is its own copy: gen2's file must not follow it.
        const auto gen2_ram = sm::detail::stat_fingerprint(gen2 / "ram");
        BOOST_REQUIRE(gen2_ram);
        BOOST_TEST(api.exec(*clone, "dd if=/dev/zero of=/tmp/fill bs=1M count=8 2>/dev/null; "
                                    "echo filled") == "filled\n");
        BOOST_TEST((sm::detail::stat_fingerprint(gen2 / "ram").value() == gen2_ram.value()));
    }
    {
        auto clone = api.restore(gen2, image, options);
        BOOST_TEST(api.exec(*clone,
                            "cat /tmp/template /tmp/gen1 /tmp/gen2; kill -0 $(cat "
                            "/tmp/pid1) && echo alive; ls /tmp/after /tmp/fill "
                            "2>/dev/null; echo end") == "template\nfirst\nsecond\nalive\nend\n");
    }
    // Generation 1 is unchanged by generation 2 (restores again, no gen2 file).
    {
        auto clone = api.restore(gen1, image, options);
        BOOST_TEST(api.exec(*clone, "cat /tmp/gen1; ls /tmp/gen2 2>/dev/null; echo end") ==
                   "first\nend\n");
    }
    BOOST_TEST(fingerprint(base) == base_before, "the template changed");
}

// supermachine restore DIR --snapshot-to NEW -- CMD: the command's status,
// the path on stderr; NEW restores with the command's effects, DIR does not
// have them; an existing NEW (here: itself) is replaced.
BOOST_AUTO_TEST_CASE(cli_restore_snapshot_to) {
    auto& s = state();
    const auto base = s.work / "cli-base", next = s.work / "cli-next";
    auto made = run_cli(s, "snapshot -q -m 256 -o " + quote(base.string()) + " " + quote(s.image));
    BOOST_REQUIRE_MESSAGE(made.status == 0, made.err);

    auto first =
        run_cli(s, "restore --snapshot-to " + quote(next.string()) + " " + quote(base.string()) +
                       " -- sh -c 'echo hello > /tmp/mark; "
                       "(sleep 100000 </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid); "
                       "echo done; exit 3'");
    BOOST_TEST(first.status == 3); // the command's status
    BOOST_TEST(first.out == "done\n");
    BOOST_TEST(has(first.err, "snapshot written: " + next.string()), first.err);
    BOOST_TEST(fs::exists(next / "meta"));

    auto again = run_cli(s, "restore " + quote(next.string()) +
                                " -- sh -c 'cat /tmp/mark; kill -0 $(cat /tmp/pid) && echo alive'");
    BOOST_TEST(again.status == 0);
    BOOST_TEST(again.out == "hello\nalive\n");

    auto template_run = run_cli(s, "restore -q " + quote(base.string()) + " -- cat /tmp/mark");
    BOOST_TEST(template_run.status != 0);
    BOOST_TEST(template_run.out.empty());

    // NEW replaced by its own successor (in place), -q, an operand after the option.
    auto in_place = run_cli(s, "restore -q " + quote(next.string()) + " --snapshot-to " +
                                   quote(next.string()) + " -- sh -c 'echo again >> /tmp/mark'");
    BOOST_TEST(in_place.status == 0, in_place.err);
    auto third = run_cli(s, "restore -q " + quote(next.string()) + " -- cat /tmp/mark");
    BOOST_TEST(third.status == 0);
    BOOST_TEST(third.out == "hello\nagain\n");
    // No staging or .old directories left beside it.
    int entries = 0;
    for (const auto& e : fs::directory_iterator(s.work))
        entries += e.path().filename().string().find("cli-next") != std::string::npos;
    BOOST_TEST(entries == 1);

    // A snapshot that cannot be written: 125 and a line saying so.
    auto blocked = s.work / "not-a-dir";
    { std::ofstream(blocked.string()) << "x"; }
    auto failed = run_cli(s, "restore -q --snapshot-to " + quote((blocked / "sub").string()) + " " +
                                 quote(base.string()) + " -- true");
    BOOST_TEST(failed.status == 125);
    BOOST_TEST(has(failed.err, "snapshot to"), failed.err);
}
