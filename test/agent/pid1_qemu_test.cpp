// The agent as PID 1 of a real Linux guest (Debian cloud kernel under QEMU
// TCG; this host's KVM cannot run Linux): the initramfs layout of
// doc/agent.md — /init, /etc/supermachine/modules, the token on the command
// line — loads the virtio and vsock modules (listed out of dependency order
// on purpose), mounts the ext4 root disk from /dev/vda, switches root, and
// listens on vsock port 1024. Exec over vsock needs the vsock device served
// to QEMU (vhost-user), which is wired elsewhere.
#include <boost/test/unit_test.hpp>

#include "guest_kernel.hpp"
#include "skip.hpp"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <x86intrin.h>

namespace fs = std::filesystem;

namespace {

std::uint64_t host_tsc_khz() {
    // Under load the guest's own TSC calibration fails on microvm (no PIT/HPET): tell it.
    auto t0 = std::chrono::steady_clock::now();
    auto c0 = __rdtsc();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto c1 = __rdtsc();
    double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return static_cast<std::uint64_t>(static_cast<double>(c1 - c0) / ms);
}

std::string read_text(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

bool have(const char* tool) {
    return std::system((std::string("command -v ") + tool + " >/dev/null 2>&1").c_str()) == 0;
}

/// Boots QEMU TCG with `initrd` (and `disk` when not empty) until the agent is ready;
/// returns the console.
std::string boot(const fs::path& dir, const fs::path& vmlinuz, const std::string& initrd,
                 const std::string& disk, const std::string& extra_cmdline) {
    std::string cmdline = "console=ttyS0 quiet panic=-1 rdinit=/init tsc_early_khz=" +
                          std::to_string(host_tsc_khz()) + " " + extra_cmdline;
    std::string log = (dir / ("console-" + std::to_string(std::rand()) + ".log")).string();
    std::vector<std::string> args = {"qemu-system-x86_64",
                                     "-M",
                                     "microvm,acpi=on",
                                     "-accel",
                                     "tcg",
                                     "-cpu",
                                     "max",
                                     "-m",
                                     "256",
                                     "-nographic",
                                     "-nodefaults",
                                     "-no-reboot",
                                     "-serial",
                                     "file:" + log,
                                     "-kernel",
                                     vmlinuz.string(),
                                     "-initrd",
                                     initrd,
                                     "-append",
                                     cmdline};
    if (!disk.empty()) {
        args.insert(args.end(), {"-drive", "id=d0,file=" + disk + ",format=raw,if=none", "-device",
                                 "virtio-blk-device,drive=d0"});
    }
    std::vector<char*> argv;
    for (auto& a : args)
        argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t qemu = -1;
    BOOST_REQUIRE(
        ::posix_spawnp(&qemu, "qemu-system-x86_64", nullptr, nullptr, argv.data(), environ) == 0);
    auto start = std::chrono::steady_clock::now();
    std::string console;
    bool exited = false;
    while (std::chrono::steady_clock::now() - start < std::chrono::seconds(180)) {
        console = read_text(log);
        if (console.find("ready on vsock port 1024") != std::string::npos) break;
        if (::waitpid(qemu, nullptr, WNOHANG) == qemu) {
            exited = true;
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!exited) {
        ::kill(qemu, SIGKILL);
        ::waitpid(qemu, nullptr, 0);
    }
    BOOST_TEST_MESSAGE("guest console:\n" << console);
    BOOST_TEST_MESSAGE("agent ready after " << seconds << " s (QEMU TCG, loaded host)");
    return console;
}

} // namespace

BOOST_AUTO_TEST_CASE(agent_is_pid1_in_a_linux_guest) {
    const auto kernel = supermachine::test::guest_kernel();
    for (const char* tool : {"qemu-system-x86_64", "cpio", "gzip", "mkfs.ext4"})
        supermachine::test::skip_unless(have(tool), std::string(tool) + " not installed");
    supermachine::test::skip_unless(fs::exists("/bin/busybox"),
                                    "/bin/busybox (busybox-static) not installed");
    const char* bin = std::getenv("SUPERMACHINE_BINARY_DIR");
    fs::path agent = fs::path(bin ? bin : ".") / "bin/supermachine-agent";
    BOOST_REQUIRE(fs::exists(agent));

    std::string pattern = (fs::temp_directory_path() / "sm-agent-pid1-XXXXXX").string();
    fs::path dir = ::mkdtemp(pattern.data());
    fs::path initrd = dir / "initrd", root = dir / "root";
    fs::create_directories(initrd / "etc/supermachine");
    fs::copy_file(agent, initrd / "init");
    // Dependency order reversed on purpose: the agent retries until a pass makes no progress.
    const char* modules[] = {"kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
                             "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                             "kernel/net/vmw_vsock/vsock.ko",
                             "kernel/drivers/block/virtio_blk.ko",
                             "kernel/drivers/virtio/virtio_mmio.ko",
                             "kernel/drivers/virtio/virtio.ko",
                             "kernel/drivers/virtio/virtio_ring.ko"};
    std::ofstream list(initrd / "etc/supermachine/modules");
    list << "# load order is forgiving\n";
    for (const char* m : modules) {
        fs::create_directories((initrd / "lib/modules" / m).parent_path());
        fs::copy_file(kernel.modules_dir / m, initrd / "lib/modules" / m);
        list << m << "\n";
    }
    list.close();
    fs::create_directories(root / "bin");
    for (const char* d : {"proc", "sys", "dev", "tmp", "run", "etc"})
        fs::create_directories(root / d);
    fs::copy_file("/bin/busybox", root / "bin/busybox");
    std::ofstream(root / "etc/marker") << "root disk\n";
    std::string build = "cd '" + initrd.string() +
                        "' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd.gz && " +
                        "mkfs.ext4 -q -d '" + root.string() + "' '" + (dir / "root.ext4").string() +
                        "' 32M";
    BOOST_REQUIRE(std::system(build.c_str()) == 0);

    std::string initrd_path = (dir / "initrd.gz").string();
    std::string console = boot(dir, kernel.vmlinuz, initrd_path, (dir / "root.ext4").string(),
                               "supermachine.token=0123abcd");
    BOOST_TEST(console.find("switched root to /dev/vda") != std::string::npos);
    BOOST_TEST(console.find("ready on vsock port 1024") != std::string::npos);
    BOOST_TEST(console.find("finit_module") == std::string::npos); // every module loaded
    BOOST_TEST(console.find("Kernel panic") == std::string::npos);
    // The command line is never a token source (every guest user reads /proc/cmdline).
    BOOST_TEST(console.find("no token") != std::string::npos);

    // No disk, token from the initramfs file: the agent stays in the initramfs and serves.
    std::ofstream(initrd / "etc/supermachine/token") << "0123abcd\n";
    std::string again = "cd '" + initrd.string() +
                        "' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd2.gz";
    BOOST_REQUIRE(std::system(again.c_str()) == 0);
    std::string console2 =
        boot(dir, kernel.vmlinuz, (dir / "initrd2.gz").string(), "", "supermachine.root=none");
    BOOST_TEST(console2.find("ready on vsock port 1024") != std::string::npos);
    BOOST_TEST(console2.find("switched root") == std::string::npos);
    BOOST_TEST(console2.find("no token") == std::string::npos); // read from /etc/supermachine/token
    fs::remove_all(dir);
}
