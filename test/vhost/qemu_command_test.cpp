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
    // The capability and the load come from a monitor on fd 5 that already
    // holds the commands: no QMP round trip before the guest runs.
    BOOST_TEST(after(argv, "-incoming") == "defer");
    BOOST_TEST(has(argv, "socket,id=restore,fd=5"));
    BOOST_TEST(has(argv, "chardev=restore,mode=control"));
    const auto commands = backend::detail::restore_monitor_commands();
    BOOST_TEST(commands.find("x-ignore-shared") != std::string::npos);
    BOOST_TEST(commands.find(R"("uri":"fd:4")") !=
               std::string::npos); // the stream the engine opened

    config.kernel.clear();
    config.incoming_ignores_shared_memory = false;
    argv = arguments(config);
    BOOST_TEST(after(argv, "-incoming") == "fd:4");
    BOOST_TEST(!has(argv, "chardev=restore,mode=control"));
}

BOOST_AUTO_TEST_CASE(a_snapshot_source_saves_no_run_state_and_a_clone_none_either) {
    // Streams of a vm whose RAM is a shared file carry no run state, so
    // their restores resume without a `cont`; clones (private RAM) and
    // plain vms keep QEMU's default.
    auto config = boot_config();
    config.memory_file = "/run/vm/ram";
    config.memory_file_shared = true;
    BOOST_TEST(has(arguments(config), "migration.store-global-state=off"));
    config.memory_file_shared = false;
    BOOST_TEST(!has(arguments(config), "migration.store-global-state=off"));
    config.memory_file.clear();
    BOOST_TEST(!has(arguments(config), "migration.store-global-state=off"));
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

// The network: QEMU's virtio-net on the inherited socket (fd 6), only when
// a socket is given; a MAC that would break the option string is refused.
BOOST_AUTO_TEST_CASE(the_network_is_virtio_net_on_the_inherited_socket) {
    auto config = boot_config();
    BOOST_TEST(!has(arguments(config), "-netdev"));
    config.network_socket = 42; // the engine passes it on as fd 6
    const auto argv = arguments(config);
    BOOST_TEST(after(argv, "-netdev") == "socket,id=net0,fd=6");
    BOOST_TEST(has(argv, "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56"));
    config.network_mac = "52:54:00:12:34:56,x=y";
    BOOST_TEST(!backend::detail::qemu_arguments("qemu-system-x86_64", config, {}, false));
}
