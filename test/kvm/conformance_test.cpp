// The conformance guest through the real loader, on the real /dev/kvm: via
// the `supermachine boot` CLI (exit statuses, console, stdin, bad input) and
// via basic_machine in-process (exit reasons).
#include "process.hpp"

#include <skip.hpp>
#include <supermachine/backend/kvm.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <fstream>
#include <mutex>
#include <string>

using namespace supermachine;
using supermachine::test::run_process;

namespace {

void require_kvm() {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) test::skip("no usable /dev/kvm on this host");
}

test::process_result boot_cli(std::vector<std::string> extra, const std::string& input = {},
                              std::vector<std::string> env = {}) {
    std::vector<std::string> argv = {test::cli_path(), "boot"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto r = run_process(argv, input, std::chrono::seconds(60), env);
    BOOST_TEST_MESSAGE("status " << r.status << "\nstdout:\n" << r.out << "stderr:\n" << r.err);
    return r;
}

std::string temp_file(const std::string& name, const std::string& content) {
    const std::string path =
        "/tmp/supermachine-kvm-test-" + std::to_string(::getpid()) + "-" + name;
    std::ofstream(path, std::ios::binary) << content;
    return path;
}

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
}

// One clear line on stderr, status 2 (bad input), no crash.
void expect_bad_input(const test::process_result& r, const std::string& words) {
    BOOST_TEST(r.status == 2);
    BOOST_TEST(test::count_lines(r.err) == 1u);
    BOOST_TEST(r.err.find(words) != std::string::npos,
               "stderr '" << r.err << "' names '" << words << "'");
}

} // namespace

BOOST_AUTO_TEST_CASE(passes_on_one_vcpu_and_powers_off) {
    require_kvm();
    auto r = boot_cli({"--kernel", test::conformance_bzimage(), "--memory", "64", "--append",
                       "conformance.mode=poweroff conformance.cpus=1 conformance.memory_mib=64"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.out.rfind("conformance: start\n", 0) == 0u);
    BOOST_TEST(r.out.find("conformance: PASS") != std::string::npos);
    BOOST_TEST(r.out.find("FAIL") == std::string::npos);
    BOOST_TEST(r.err.empty());
}

BOOST_AUTO_TEST_CASE(the_elf_build_passes_through_the_pvh_entry) {
    require_kvm();
    const auto initrd = temp_file("pvh-initrd", "pvh-initrd-marker");
    auto r = boot_cli(
        {"--kernel", test::binary_dir() + "/guest/conformance.elf", "--initrd", initrd, "--memory",
         "64", "--append",
         "conformance.cpus=1 conformance.memory_mib=64 conformance.initrd=pvh-initrd-marker"});
    ::unlink(initrd.c_str());
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.out.find("PVH start_info at ") != std::string::npos);
    BOOST_TEST(r.out.find("ok: initrd content") != std::string::npos);
    BOOST_TEST(r.out.find("conformance: PASS") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(two_vcpus_are_in_the_madt_and_the_second_starts) {
    require_kvm();
    auto r =
        boot_cli({"--kernel", test::conformance_bzimage(), "--memory", "128", "--cpus", "2",
                  "--append", "conformance.cpus=2 conformance.smp=1 conformance.memory_mib=128"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.out.find("MADT processors: 2") != std::string::npos);
    BOOST_TEST(r.out.find("application processors running: 1 of 1") != std::string::npos);
    BOOST_TEST(r.out.find("conformance: PASS") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(a_wrong_vcpu_count_fails_the_guest_check) {
    require_kvm(); // the oracle can fail: MADT has 1 processor, the guest is told 3
    auto r = boot_cli({"--kernel", test::conformance_bzimage(), "--memory", "64", "--append",
                       "conformance.cpus=3"});
    BOOST_TEST(r.out.find("FAIL: MADT lists every vCPU") != std::string::npos);
    BOOST_TEST(r.out.find("conformance: FAIL (1 of") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(serial_input_reaches_the_guest) {
    require_kvm();
    auto r = boot_cli({"--kernel", test::conformance_bzimage(), "--memory", "64", "--append",
                       "conformance.mode=echo"},
                      "hello guest\nbye\n");
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.out.find("echo: ready\nhello guest\nbye\n") != std::string::npos);
    BOOST_TEST(r.out.find("conformance: PASS") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(initrd_is_loaded_where_the_guest_finds_it) {
    require_kvm();
    const auto initrd = temp_file("initrd", "conformance-initrd-marker" + std::string(100000, 'x'));
    auto r = boot_cli({"--kernel", test::conformance_bzimage(), "--initrd", initrd, "--memory",
                       "64", "--append", "conformance.initrd=conformance-initrd-marker"});
    ::unlink(initrd.c_str());
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.out.find("ok: initrd content") != std::string::npos);
    BOOST_TEST(r.out.find("conformance: PASS") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(triple_fault_is_reported_by_the_cli) {
    require_kvm();
    auto r = boot_cli({"--kernel", test::conformance_bzimage(), "--memory", "64", "--append",
                       "conformance.mode=triplefault"});
    BOOST_TEST(r.status == 3);
    BOOST_TEST(test::count_lines(r.err) == 1u);
    BOOST_TEST(r.err.find("triple-faulted") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(an_emulation_failure_names_rip_and_bytes) {
    require_kvm();
    auto r = boot_cli({"--kernel", test::conformance_bzimage(), "--memory", "64", "--append",
                       "conformance.mode=popcnt"});
    if (r.out.find("popcnt ran") != std::string::npos) { // the host runs it: a clean power-off
        BOOST_TEST(r.status == 0);
        return;
    }
    BOOST_TEST(r.status == 4);
    BOOST_TEST(test::count_lines(r.err) == 1u);
    BOOST_TEST(r.err.find("emulation failure on vCPU 0 at rip 0x") != std::string::npos);
    BOOST_TEST(r.err.find("instruction bytes: f3 48 0f b8 c0") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(guest_endings_have_distinct_statuses_in_process) {
    require_kvm();
    using machine =
        basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power>;
    const auto kernel = read_file(test::conformance_bzimage());
    BOOST_REQUIRE(!kernel.empty());
    for (auto [mode, expected] : {std::pair{"poweroff", "power_off"},
                                  {"reset", "reboot"},
                                  {"acpireset", "reboot"},
                                  {"triplefault", "triple_fault"},
                                  {"panic", "panic"}}) {
        boost::asio::io_context io;
        machine::config cfg;
        cfg.memory_mib = 32;
        cfg.kernel.resize(kernel.size());
        std::memcpy(cfg.kernel.data(), kernel.data(), kernel.size());
        cfg.extra_cmdline = std::string("conformance.mode=") + mode;
        auto console = std::make_shared<std::string>();
        auto guard = std::make_shared<std::mutex>();
        std::get<devices::serial::config>(cfg.devices).sink = [console, guard](std::string_view s) {
            std::lock_guard lock(*guard);
            *console += s;
        };
        auto vm = value_or_throw(machine::create(io.get_executor(), std::move(cfg)));
        BOOST_REQUIRE(vm->start());
        auto e = vm->wait_for(std::chrono::seconds(30));
        BOOST_REQUIRE(e);
        BOOST_TEST(to_string(e->what) == expected, "mode " << mode);
        std::lock_guard lock(*guard);
        BOOST_TEST(console->find("conformance: PASS") != std::string::npos, "mode " << mode);
        if (std::string_view(mode) == "panic") // the whole banner got out before the machine ended
            BOOST_TEST(
                console->find("Kernel panic - not syncing: conformance guest asked to panic\n") !=
                std::string::npos);
    }
}

BOOST_AUTO_TEST_CASE(bad_input_gets_one_clear_line) {
    require_kvm();
    const auto bz = test::conformance_bzimage();
    expect_bad_input(boot_cli({"--kernel", "/nonexistent/vmlinuz"}),
                     "cannot read kernel '/nonexistent/vmlinuz'");
    expect_bad_input(boot_cli({}, {}, {"SUPERMACHINE_KERNEL_DIR=/nonexistent/kernels"}),
                     "no --kernel given and no default kernel in /nonexistent/kernels");
    const auto text = temp_file("not-a-kernel", "this is not a kernel\n");
    expect_bad_input(boot_cli({"--kernel", text}), "not a bootable");
    const auto truncated = temp_file("truncated", read_file(bz).substr(0, 3000));
    expect_bad_input(boot_cli({"--kernel", truncated}), "truncated");
    const auto big = temp_file("big-initrd", std::string(15u << 20, 'i'));
    expect_bad_input(boot_cli({"--kernel", bz, "--memory", "16", "--initrd", big}), "does not fit");
    expect_bad_input(boot_cli({"--kernel", bz, "--initrd", "/nonexistent/initrd"}),
                     "cannot read initrd");
    expect_bad_input(boot_cli({"--kernel", bz, "--memory", "8"}), "--memory '8'");
    expect_bad_input(boot_cli({"--kernel", bz, "--memory", "lots"}), "--memory 'lots'");
    expect_bad_input(boot_cli({"--kernel", bz, "--cpus", "0"}), "--cpus '0'");
    expect_bad_input(boot_cli({"--kernel", bz, "--cpus", "999"}), "--cpus '999'");
    expect_bad_input(boot_cli({"--kernel", bz, "--bogus", "1"}), "unknown option '--bogus'");
    expect_bad_input(boot_cli({"--kernel", bz}, {}, {"SUPERMACHINE_KVM_DEVICE=/nonexistent/kvm"}),
                     "KVM unavailable");
    for (const auto& f : {text, truncated, big})
        ::unlink(f.c_str());
}

BOOST_AUTO_TEST_CASE(virtio_devices_get_windows_interrupts_and_acpi_entries) {
    require_kvm();
    using machine = basic_machine<backend::kvm, devices::serial, devices::i8042,
                                  devices::acpi_power, virtio::rng, virtio::rng>;
    const auto kernel = read_file(test::conformance_bzimage());
    boost::asio::io_context io;
    machine::config cfg;
    cfg.memory_mib = 32;
    cfg.kernel.resize(kernel.size());
    std::memcpy(cfg.kernel.data(), kernel.data(), kernel.size());
    cfg.extra_cmdline = "conformance.virtio=2";
    auto console = std::make_shared<std::string>();
    auto guard = std::make_shared<std::mutex>();
    std::get<devices::serial::config>(cfg.devices).sink = [console, guard](std::string_view s) {
        std::lock_guard lock(*guard);
        *console += s;
    };
    auto vm = value_or_throw(machine::create(io.get_executor(), std::move(cfg)));
    BOOST_TEST(vm->kernel_cmdline().find("virtio_mmio.device=0x1000@0xd0000000:5") !=
               std::string::npos);
    BOOST_TEST(vm->kernel_cmdline().find("virtio_mmio.device=0x1000@0xd0001000:6") !=
               std::string::npos);
    BOOST_REQUIRE(vm->start());
    auto e = vm->wait_for(std::chrono::seconds(30));
    BOOST_REQUIRE(e);
    BOOST_TEST(to_string(e->what) == "power_off");
    std::lock_guard lock(*guard);
    BOOST_TEST(console->find("virtio-mmio devices: DSDT 2, cmdline 2") != std::string::npos);
    BOOST_TEST(console->find("conformance: PASS") != std::string::npos);
}
