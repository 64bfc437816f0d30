// Debian's cloud kernel on our kvm engine, with Linux's own drivers as the
// oracle: it boots to /init on two vCPUs, reads what the host types on the
// serial console, and ends through ACPI power-off or a reboot. Runs where
// KVM runs Linux: through scripts/nested-kvm.sh here (label linux-kvm).
#include <linux_guest.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>

#include <boost/test/unit_test.hpp>

#include <chrono>
#include <memory>
#include <string>

using namespace supermachine;
using test::console;

namespace {

using machine = basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power>;

struct linux_run {
    std::shared_ptr<console> out = std::make_shared<console>();
    test::running_io io;
    std::unique_ptr<machine> vm;

    linux_run(std::uint32_t vcpus, std::string script) {
        test::require_linux_kvm();
        const auto kernel = test::guest_kernel();
        machine::config cfg;
        cfg.memory_mib = 512;
        cfg.vcpus = vcpus;
        cfg.kernel_path = kernel.vmlinuz.string();
        cfg.initrd = test::linux_initramfs(kernel, std::move(script));
        cfg.extra_cmdline = "quiet";
        std::get<devices::serial::config>(cfg.devices).sink = [out = out](std::string_view s) {
            out->append(s);
        };
        vm = value_or_throw(machine::create(io.io.get_executor(), std::move(cfg)), "create");
        BOOST_REQUIRE(vm->start());
    }
    /// How it ended (stopped after `timeout`, which fails the check).
    machine_exit end(std::chrono::seconds timeout = std::chrono::seconds(180)) {
        auto e = vm->wait_for(timeout);
        if (!e) {
            vm->stop();
            vm->wait();
        }
        BOOST_TEST_MESSAGE("console:\n" << out->snapshot());
        BOOST_REQUIRE_MESSAGE(e, "Linux did not end within " << timeout.count() << " s");
        BOOST_REQUIRE_MESSAGE(e->what != machine_exit::reason::emulation_failure, e->describe());
        return *e;
    }
};

} // namespace

BOOST_AUTO_TEST_CASE(debian_kernel_boots_on_two_vcpus_reads_the_console_and_powers_off) {
    linux_run run(2, "echo SUPERMACHINE-LINUX-MARKER cpus=$(nproc)\n"
                     "echo 'serial: type a line'\n"
                     "read -r line\n"
                     "echo \"serial got: [$line]\"\n");
    BOOST_REQUIRE_MESSAGE(run.out->wait_for("serial: type a line", std::chrono::seconds(180)),
                          "no prompt: " << run.out->snapshot());
    const std::string typed = "typed on the host 123\n";
    BOOST_CHECK_EQUAL(run.vm->device<devices::serial>().send_input(typed), typed.size());
    const auto e = run.end();
    BOOST_TEST(to_string(e.what) == "power_off");
    const auto text = run.out->snapshot();
    BOOST_TEST(text.find("SUPERMACHINE-LINUX-MARKER cpus=2") != std::string::npos);
    BOOST_TEST(text.find("serial got: [typed on the host 123]") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(debian_kernel_reboot_ends_the_machine_as_a_reboot) {
    linux_run run(1, "echo SUPERMACHINE-LINUX-MARKER cpus=$(nproc)\n"
                     "reboot -f\n");
    const auto e = run.end();
    BOOST_TEST(to_string(e.what) == "reboot");
    BOOST_TEST(run.out->snapshot().find("SUPERMACHINE-LINUX-MARKER cpus=1") != std::string::npos);
}
