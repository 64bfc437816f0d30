// A real Linux kernel (Debian's cloud kernel) with a test initramfs boots on
// KVM with 2 vCPUs: its /init prints a marker with the CPU count and powers
// off through ACPI. Hosts whose KVM cannot run stock Linux (kvm_pvm, or an
// emulation failure during boot) skip with one line naming the reason.
#include <skip.hpp>
#include <supermachine/backend/kvm.hpp>
#include <supermachine/boot/initramfs.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>

using namespace supermachine;
namespace fs = std::filesystem;

namespace {

std::string find_kernel() {
    if (const char* k = std::getenv("SUPERMACHINE_LINUX_KERNEL")) return k;
    std::vector<fs::path> folders = {"/tmp/k/x/boot"};
    if (const char* home = std::getenv("HOME")) // the boot layer's kernel cache
        folders.push_back(fs::path(home) / ".cache/supermachine/kernels/current/boot");
    for (const auto& folder : folders) {
        std::error_code ec;
        for (const auto& entry : fs::directory_iterator(folder, ec))
            if (entry.path().filename().string().rfind("vmlinuz", 0) == 0)
                return entry.path().string();
    }
    return {};
}

} // namespace

BOOST_AUTO_TEST_CASE(debian_kernel_boots_to_init_on_two_vcpus) {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) test::skip("no usable /dev/kvm on this host");
    if (backend::host_is_kvm_pvm())
        test::skip("host KVM is kvm_pvm (/sys/module/kvm_pvm): stock Linux kernels stop with KVM "
                   "emulation "
                   "failures here; see doc/kvm-backend.md");
    const std::string kernel = find_kernel();
    if (kernel.empty()) test::skip("no Linux kernel found (set SUPERMACHINE_LINUX_KERNEL)");
    auto busybox = boot::read_host_file("/bin/busybox");
    if (!busybox) test::skip("no /bin/busybox (Debian busybox-static) for the test initramfs");

    using E = boot::initramfs_entry;
    const E entries[] = {
        E::directory("bin"),
        E::directory("dev"),
        E::directory("proc"),
        E::directory("sys"),
        E::file("bin/busybox", busybox.value(), 0755),
        E::text_file("init",
                     "#!/bin/busybox sh\n"
                     "/bin/busybox mount -t proc proc /proc\n"
                     "/bin/busybox echo SUPERMACHINE-LINUX-MARKER cpus=$(/bin/busybox nproc)\n"
                     "/bin/busybox poweroff -f\n",
                     0755),
    };
    using machine =
        basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power>;
    machine::config cfg;
    cfg.memory_mib = 512;
    cfg.vcpus = 2;
    cfg.kernel_path = kernel;
    cfg.initrd = value_or_throw(boot::build_initramfs(entries, boot::initramfs_compression::gzip));
    cfg.extra_cmdline = "quiet";
    auto console = std::make_shared<std::string>();
    auto guard = std::make_shared<std::mutex>();
    std::get<devices::serial::config>(cfg.devices).sink = [console, guard](std::string_view s) {
        std::lock_guard lock(*guard);
        *console += s;
    };
    boost::asio::io_context io;
    auto vm = value_or_throw(machine::create(io.get_executor(), std::move(cfg)));
    BOOST_REQUIRE(vm->start());
    auto e = vm->wait_for(std::chrono::seconds(120));
    if (!e) {
        vm->stop();
        vm->wait();
    }
    std::lock_guard lock(*guard);
    BOOST_TEST_MESSAGE("console:\n" << *console);
    if (e && e->what == machine_exit::reason::emulation_failure)
        test::skip("host KVM cannot run this Linux kernel: " + e->describe());
    BOOST_REQUIRE_MESSAGE(e, "Linux did not power off within 120 s");
    BOOST_TEST(to_string(e->what) == "power_off");
    BOOST_TEST(console->find("SUPERMACHINE-LINUX-MARKER cpus=2") != std::string::npos);
}
