// Our devices under Linux's own drivers, on our kvm engine (nested here, label
// linux-kvm): virtio-blk over virtio-mmio (an ext4 root mounted from
// /dev/vda and switched to, a read-only disk that refuses writes, a data
// disk whose sha256 in the guest is the host's), virtio-rng as the kernel's
// hwrng, and virtio-vsock both ways with Linux's vsock transport. e2fsck and
// debugfs check what the guest wrote to its root.
#include "vsock_line_peer.hpp"

#include <linux_guest.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>
#include <supermachine/virtio/vsock.hpp>

#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

using namespace supermachine;
using namespace linuxkvm_test;
using test::console;
namespace fs = std::filesystem;

namespace {

using disk = virtio::blk<storage::raw_file>;
using machine = basic_machine<backend::kvm, devices::serial, devices::i8042, devices::acpi_power,
                              disk, disk, disk, virtio::rng, virtio::vsock>;
constexpr std::size_t vsock_slot = 7;

std::string run(const std::string& command) {
    std::string out;
    if (FILE* p = ::popen(command.c_str(), "r")) {
        char buf[4096];
        for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;)
            out.append(buf, n);
        const int status = ::pclose(p);
        if (status != 0) out += "\n[exit status " + std::to_string(status) + "]";
    }
    return out;
}

void write_random_file(const fs::path& path, std::size_t bytes, unsigned seed) {
    std::mt19937 random(seed);
    std::string data(bytes, '\0');
    for (auto& c : data)
        c = static_cast<char>(random());
    std::ofstream(path, std::ios::binary) << data;
}

/// The text after `key` up to the end of its line ("" when absent).
std::string line_after(const std::string& text, const std::string& key) {
    const auto at = text.find(key);
    if (at == std::string::npos) return {};
    const auto start = at + key.size();
    return text.substr(start, text.find_first_of("\r\n", start) - start);
}

// The guest: checks through Linux's drivers, then switches to the ext4 root
// on /dev/vda, whose /init2 writes a file and powers off.
const char* guest_script = R"sh(stty -echo # the host's input must not land inside a line the test reads
echo "ro: vda=$(cat /sys/block/vda/ro) vdb=$(cat /sys/block/vdb/ro)"
echo "sha256 vdc: $(sha256sum /dev/vdc | cut -d' ' -f1)"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 2>/dev/null; then echo "vdb write: accepted"; else echo "vdb write: refused"; fi
echo "rng current: $(cat /sys/class/misc/hw_random/rng_current)"
echo "rng bytes: $(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
/bin/vsock_probe listen 5000 &
/bin/vsock_probe connect 6000 ping-from-linux
read -r go
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || echo "mount vda failed"
exec switch_root /newroot /init2
)sh";

const char* root_init = R"sh(#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "root: $(/bin/busybox cat /etc/marker) on $(/bin/busybox grep ' / ' /proc/mounts | /bin/busybox cut -d' ' -f1-3)"
/bin/busybox echo written-by-linux > /written
/bin/busybox sync
/bin/busybox poweroff -f
)sh";

} // namespace

BOOST_AUTO_TEST_CASE(linux_drives_our_blk_rng_and_vsock) {
    test::require_linux_kvm();
    const auto kernel = test::guest_kernel();
    const auto probe = test::guest_program("vsock_probe");
    test::scratch_directory dir;

    // /dev/vda: an ext4 root made by mkfs.ext4 (the oracle's own tool).
    const fs::path tree = dir.path / "root";
    fs::create_directories(tree / "bin");
    fs::create_directories(tree / "etc");
    fs::create_directories(tree / "proc");
    fs::copy_file("/bin/busybox", tree / "bin/busybox");
    std::ofstream(tree / "etc/marker") << "root-from-vda\n";
    std::ofstream(tree / "init2") << root_init;
    fs::permissions(tree / "init2",
                    fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec);
    const fs::path root = dir.path / "root.ext4";
    const auto mkfs =
        run("mkfs.ext4 -q -F -d " + tree.string() + " " + root.string() + " 64M 2>&1");
    BOOST_REQUIRE_MESSAGE(mkfs.find("exit status") == std::string::npos, mkfs);
    // /dev/vdb read-only, /dev/vdc writable, both random data.
    write_random_file(dir.path / "ro.img", 1 << 20, 1);
    write_random_file(dir.path / "data.img", 3 << 20, 2);
    const auto host_sha = run("sha256sum " + (dir.path / "data.img").string()).substr(0, 64);
    const auto ro_before = run("sha256sum " + (dir.path / "ro.img").string());

    auto out = std::make_shared<console>();
    machine::config cfg;
    cfg.memory_mib = 512;
    cfg.kernel_path = kernel.vmlinuz.string();
    cfg.initrd = test::linux_initramfs(kernel, guest_script, {{probe, "bin/vsock_probe"}});
    cfg.extra_cmdline = "quiet";
    std::get<devices::serial::config>(cfg.devices).sink = [out](std::string_view s) {
        out->append(s);
    };
    std::get<3>(cfg.devices).storage = {root.string(), false};
    std::get<4>(cfg.devices).storage = {(dir.path / "ro.img").string(), true};
    std::get<5>(cfg.devices).storage = {(dir.path / "data.img").string(), false};
    test::running_io io;
    host_peers peers;
    auto vm = value_or_throw(machine::create(io.io.get_executor(), std::move(cfg)), "create");
    auto& vsock = vm->device_at<vsock_slot>()->core();
    BOOST_REQUIRE(vsock.listen(6000, peers.answer()));
    BOOST_REQUIRE(vm->start());

    // Host -> guest, once the guest's listener is up.
    const bool listening = out->wait_for("vsock listening on 5000", std::chrono::seconds(240));
    BOOST_REQUIRE_MESSAGE(listening, "console:\n" << out->snapshot());
    BOOST_CHECK_EQUAL(ask_guest(vsock, 5000, "hello-from-host").value_or("(none)"),
                      "guest got: hello-from-host");
    BOOST_CHECK(out->wait_for("vsock reply: host got: ping-from-linux", std::chrono::seconds(60)));
    vm->device<devices::serial>().send_input("go\n");

    auto e = vm->wait_for(std::chrono::seconds(180));
    if (!e) {
        vm->stop();
        vm->wait();
    }
    const auto text = out->snapshot();
    BOOST_TEST_MESSAGE("console:\n" << text);
    BOOST_REQUIRE_MESSAGE(e, "Linux did not power off");
    BOOST_TEST(to_string(e->what) == "power_off");

    BOOST_TEST(line_after(text, "ro: ") == "vda=0 vdb=1");
    BOOST_TEST(line_after(text, "sha256 vdc: ") == host_sha);
    BOOST_TEST(line_after(text, "vdb write: ") == "refused");
    BOOST_TEST(run("sha256sum " + (dir.path / "ro.img").string()) == ro_before);
    BOOST_TEST(line_after(text, "rng current: ").starts_with("virtio_rng"));
    const auto rng = line_after(text, "rng bytes: ");
    BOOST_TEST(rng.size() == 64u);
    BOOST_TEST(rng != std::string(64, '0'));
    BOOST_TEST(line_after(text, "vsock reply: ") == "host got: ping-from-linux");
    BOOST_TEST(peers.accepted.load() == 1);
    BOOST_TEST(line_after(text, "root: ") == "root-from-vda on /dev/vda / ext4");

    // What the guest wrote to its root, read by e2fsprogs.
    const auto fsck = run("e2fsck -fn " + root.string() + " 2>&1");
    BOOST_TEST(fsck.find("exit status") == std::string::npos, fsck);
    BOOST_TEST(run("debugfs -R 'cat /written' " + root.string() + " 2>/dev/null") ==
               "written-by-linux\n");
}
