// The QEMU engine's command line: what a boot and a restore pass, checked
// on the argument vector (no QEMU started).
#include <supermachine/backend/detail/qemu_command.hpp>

#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace backend = supermachine::backend;

namespace {

std::vector<std::string> arguments(const backend::qemu_config& config, bool use_kvm = false) {
    auto argv = backend::detail::qemu_arguments("qemu-system-x86_64", config, {}, use_kvm);
    BOOST_TEST_REQUIRE(argv.has_value());
    return argv.value();
}

bool has(const std::vector<std::string>& argv, std::string_view word) {
    return std::find(argv.begin(), argv.end(), word) != argv.end();
}

// The value after `option` (empty when the option is missing).
std::string after(const std::vector<std::string>& argv, std::string_view option) {
    auto it = std::find(argv.begin(), argv.end(), option);
    return it != argv.end() && it + 1 != argv.end() ? *(it + 1) : std::string();
}

backend::qemu_config boot_config() {
    backend::qemu_config config;
    config.kernel = "/boot/vmlinuz";
    config.initrd = "/tmp/initramfs.cpio";
    config.cmdline = "console=ttyS0";
    return config;
}

} // namespace

BOOST_AUTO_TEST_CASE(a_tcg_boot_runs_without_icount_and_is_told_the_tsc_rate) {
    const auto argv = arguments(boot_config());
    BOOST_TEST(after(argv, "-accel") == "tcg");
    BOOST_TEST(!has(argv, "-icount"));
    BOOST_TEST(after(argv, "-kernel") == "/boot/vmlinuz");
    BOOST_TEST(after(argv, "-initrd") == "/tmp/initramfs.cpio");
    const auto cmdline = after(argv, "-append");
    BOOST_TEST(cmdline.rfind("console=ttyS0", 0) == 0u);
    // A host without a plausible TSC rate leaves calibration to the guest.
    if (backend::detail::host_tsc_khz() >= 100'000)
        BOOST_TEST(cmdline.find(" tsc_early_khz=") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(icount_when_asked_keeps_the_guest_calibrating_itself) {
    auto config = boot_config();
    config.icount = "shift=auto";
    const auto argv = arguments(config);
    BOOST_TEST(after(argv, "-icount") == "shift=auto");
    BOOST_TEST(after(argv, "-append") == "console=ttyS0");
}

BOOST_AUTO_TEST_CASE(two_vcpus_run_multi_threaded_tcg_whatever_icount_says) {
    auto config = boot_config();
    config.vcpus = 2;
    config.icount = "shift=auto";
    const auto argv = arguments(config);
    BOOST_TEST(after(argv, "-accel") == "tcg,thread=multi");
    BOOST_TEST(!has(argv, "-icount"));
}

BOOST_AUTO_TEST_CASE(a_restore_loads_no_kernel_and_needs_none) {
    auto config = boot_config();
    config.incoming = "/snap/state";
    config.incoming_ignores_shared_memory = true;
    auto argv = arguments(config);
    BOOST_TEST(!has(argv, "-kernel"));
    BOOST_TEST(!has(argv, "-initrd"));
    BOOST_TEST(!has(argv, "-append"));
    BOOST_TEST(after(argv, "-incoming") == "defer");

    config.kernel.clear();
    config.incoming_ignores_shared_memory = false;
    argv = arguments(config);
    BOOST_TEST(after(argv, "-incoming") == "fd:4"); // the stream the engine opened
}

BOOST_AUTO_TEST_CASE(a_boot_without_a_kernel_is_refused) {
    auto config = boot_config();
    config.kernel.clear();
    BOOST_TEST(backend::detail::qemu_arguments("qemu-system-x86_64", config, {}, false).error() ==
               supermachine::errc::kernel_not_found);
}

BOOST_AUTO_TEST_CASE(kvm_passes_the_host_cpu_and_no_tcg_settings) {
    auto config = boot_config();
    config.icount = "shift=auto";
    const auto argv = arguments(config, true);
    BOOST_TEST(after(argv, "-accel") == "kvm");
    BOOST_TEST(after(argv, "-cpu") == "host");
    BOOST_TEST(!has(argv, "-icount"));
    BOOST_TEST(after(argv, "-append") == "console=ttyS0");
}
