// `supermachine run -v HOST:GUEST[:ro]` end to end: a real Linux guest under
// QEMU TCG, a real virtiofsd per volume, the agent mounting virtio-fs inside
// the image's root; and that runs without -v keep their warm snapshot.
#include "vm_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <fstream>
#include <sstream>

using namespace supermachine::test;
using namespace std::chrono_literals;

namespace {

vm_environment& env() {
    static vm_environment e;
    static const bool checked = [] {
        skip_unless(::access("/usr/lib/qemu/virtiofsd", X_OK) == 0,
                    "/usr/lib/qemu/virtiofsd not installed (Debian: qemu-system-common)");
        return true;
    }();
    (void)checked;
    return e;
}

std::string read_text(const fs::path& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

/// A fresh host directory under the test's work directory.
fs::path host_dir(const std::string& name) {
    const auto dir = env().work / name;
    fs::create_directories(dir);
    return dir;
}

} // namespace

BOOST_AUTO_TEST_CASE(guest_reads_a_host_file) {
    const auto dir = host_dir("read");
    std::ofstream(dir / "f") << "hello from the host\n";
    auto r = env().run({"-v", dir.string() + ":/data"}, {"cat", "/data/f"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out == "hello from the host\n", describe(r));
}

BOOST_AUTO_TEST_CASE(guest_writes_reach_the_host_and_say_why_cold) {
    const auto dir = host_dir("write");
    // With --verbose: the run says once why it cold boots.
    auto r =
        run_process({env().cli.string(), "run", "--verbose", "-v", dir.string() + ":/srv/deep/data",
                     env().image, "sh", "-c", "echo x > /srv/deep/data/new"},
                    "", 200s);
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(read_text(dir / "new") == "x\n", describe(r));
    BOOST_TEST(contains(r.err, "volumes (-v) cannot be snapshotted"), describe(r));
    BOOST_TEST(!contains(r.err, "warm start: restored"), describe(r));
}

BOOST_AUTO_TEST_CASE(read_only_volume_refuses_writes) {
    const auto dir = host_dir("readonly");
    std::ofstream(dir / "keep") << "unchanged\n";
    auto r = env().run({"-v", dir.string() + ":/ro:ro"},
                       {"sh", "-c", "cat /ro/keep && echo y > /ro/new"});
    // The guest's root may remount its side rw: the host side stays read-only.
    auto remounted =
        env().run({"-v", dir.string() + ":/ro:ro"},
                  {"sh", "-c", "mount -o remount,rw /ro && echo remounted; echo y > /ro/new"});
    BOOST_TEST(remounted.status != 0, describe(remounted));
    BOOST_TEST(remounted.out == "remounted\n", describe(remounted)); // the guest side went rw
    BOOST_TEST(contains(remounted.err, "Read-only file system"), describe(remounted));
    BOOST_TEST(r.status != 0, describe(r));
    BOOST_TEST(r.out == "unchanged\n", describe(r)); // mounted, readable
    BOOST_TEST(!fs::exists(dir / "new"), describe(r));
    BOOST_TEST(read_text(dir / "keep") == "unchanged\n");
}

BOOST_AUTO_TEST_CASE(two_volumes_and_a_relative_host_path) {
    const auto a = host_dir("two/a");
    const auto b = host_dir("two/b");
    std::ofstream(a / "f") << "A";
    std::ofstream(b / "f") << "B";
    const auto cwd = fs::current_path();
    fs::current_path(env().work / "two");
    auto r = env().run({"-v", "a:/a", "--volume", "./b:/b:rw"},
                       {"sh", "-c", "cat /a/f /b/f; echo C > /b/g"});
    fs::current_path(cwd);
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out == "AB", describe(r));
    BOOST_TEST(read_text(b / "g") == "C\n", describe(r));
}

BOOST_AUTO_TEST_CASE(bad_specs_exit_125_with_one_line) {
    const auto dir = host_dir("bad");
    std::ofstream(dir / "file") << "x";
    const std::vector<std::pair<std::string, std::string>> cases = {
        {(env().work / "missing").string() + ":/data", "does not exist"},
        {dir.string() + ":data", "absolute"},
        {dir.string() + ":/data/../etc", "'..'"},
        {dir.string() + ":/", "cannot be /"},
        {dir.string() + ":/proc/x", "/proc"},
        {dir.string() + ":/data:rx", "ro or rw"},
        {(dir / "file").string() + ":/data", "not a directory"},
        {dir.string(), "HOST:GUEST"},
    };
    for (const auto& [spec, why] : cases) {
        auto r = env().run({"-v", spec}, {"true"}, "", 60s);
        BOOST_TEST(r.status == 125, spec << ": " << describe(r));
        BOOST_TEST(contains(r.err, why), spec << ": " << describe(r));
        BOOST_TEST(std::count(r.err.begin(), r.err.end(), '\n') == 1, spec << ": " << describe(r));
        BOOST_TEST(r.seconds < 30, spec << ": a bad spec must not boot a VM");
    }
}

BOOST_AUTO_TEST_CASE(runs_without_volumes_stay_warm) {
    // Creates the warm snapshot (cold boot, snapshot, restore) and runs restored.
    auto first = run_process({env().cli.string(), "run", "--verbose", env().image, "echo", "warm"},
                             "", 300s);
    BOOST_TEST(first.status == 0, describe(first));
    BOOST_TEST(contains(first.err, "warm start: restored"), describe(first));
    auto second = run_process({env().cli.string(), "run", "--verbose", env().image, "echo", "warm"},
                              "", 200s);
    BOOST_TEST(second.status == 0, describe(second));
    BOOST_TEST(second.out == "warm\n", describe(second));
    BOOST_TEST(contains(second.err, "warm start: restored"), describe(second));
    BOOST_TEST(!contains(second.err, "cold boot"), describe(second));
}

BOOST_AUTO_TEST_CASE(boot_disk_command_mounts_volumes) {
    // The image's ext4 root filesystem, as a run caches it.
    auto cached_rootfs = [] {
        std::error_code ec;
        for (fs::directory_iterator it(env().work / "cache" / "supermachine" / "rootfs", ec), end;
             !ec && it != end; it.increment(ec))
            if (it->path().extension() == ".ext4") return it->path();
        return fs::path();
    };
    auto rootfs = cached_rootfs();
    if (rootfs.empty()) {
        auto made = env().run({"--no-snapshot"}, {"true"});
        BOOST_TEST_REQUIRE(made.status == 0, describe(made));
        rootfs = cached_rootfs();
    }
    BOOST_TEST_REQUIRE(!rootfs.empty(), "no cached root filesystem after a run");
    const auto dir = host_dir("boot");
    std::ofstream(dir / "f") << "via boot\n";
    auto r = run_process({env().cli.string(), "boot", "--disk", rootfs.string(), "-v",
                          dir.string() + ":/mnt/v", "--", "sh", "-c",
                          "cat /mnt/v/f && echo z > /mnt/v/z"},
                         "", 200s);
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out == "via boot\n", describe(r));
    BOOST_TEST(read_text(dir / "z") == "z\n", describe(r));
    auto bad = run_process({env().cli.string(), "boot", "--disk", rootfs.string(), "-v",
                            dir.string() + ":relative", "--", "true"},
                           "", 60s);
    BOOST_TEST(bad.status == 125, describe(bad));
    BOOST_TEST(contains(bad.err, "absolute"), describe(bad));
}

BOOST_AUTO_TEST_CASE(missing_virtiofsd_is_named) {
    const auto dir = host_dir("nofsd");
    ::setenv("SUPERMACHINE_VIRTIOFSD", "/nonexistent/virtiofsd", 1);
    auto r = env().run({"-v", dir.string() + ":/data"}, {"true"}, "", 60s);
    ::unsetenv("SUPERMACHINE_VIRTIOFSD");
    BOOST_TEST(r.status == 125, describe(r));
    BOOST_TEST(contains(r.err, "virtiofsd not found at /nonexistent/virtiofsd"), describe(r));
}
