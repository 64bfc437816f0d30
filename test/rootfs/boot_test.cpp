// The end of the line: Linux (Debian's cloud kernel under QEMU TCG, since this
// host's KVM cannot run Linux) boots with our ext4 image as its root
// filesystem and runs the image's busybox, which reads back what the layers said.
// The kernel: the default guest kernel from the kernel cache (as the product finds it).
// Its NVMe driver is built in, so no initramfs is needed.
#include <supermachine/oci/rootfs_builder.hpp>

#include "rootfs_fixture.hpp"

#include <guest_kernel.hpp>

#include <boost/test/unit_test.hpp>

using namespace rootfs_test;

BOOST_AUTO_TEST_CASE(linux_boots_from_the_image_and_runs_its_busybox) {
    const auto kernel = supermachine::test::guest_kernel().vmlinuz;
    supermachine::test::skip_unless(have_tool("qemu-system-x86_64"),
                                    "qemu-system-x86_64 not installed");
    temp_dir t;
    temp_dir escape;
    auto layers_dir = t.path / "layers";
    make_layers(layers_dir, escape.path / "target");

    // One more layer: /init, a busybox script that prints what we check.
    auto init_dir = t.path / "init";
    fs::create_directories(init_dir);
    std::ofstream(init_dir / "init") << R"(#!/bin/sh
echo SM-BEGIN
/bin/busybox cat /etc/motd
/bin/busybox ls -ln /dev/null /dev/sda /home/app/owned /highuid /bin/sh
/bin/busybox stat -c 'mode %a %n' /usr/bin/setuid /tmp
/bin/busybox cat /dup /usr/bin/through-link
/bin/busybox md5sum /big
/bin/busybox ls /opaque /wh
echo SM-END
/bin/busybox sync
echo o > /proc/sysrq-trigger 2>/dev/null || /bin/busybox poweroff -f
)";
    fs::permissions(init_dir / "init", fs::perms(0755));
    auto init_tar = t.path / "init.tar";
    auto [tar_rc, tar_out] = run("tar --owner=0 --group=0 -C " + shell_quote(init_dir.string()) +
                                 " -cf " + shell_quote(init_tar.string()) + " init 2>&1");
    BOOST_REQUIRE_MESSAGE(tar_rc == 0, tar_out);

    supermachine::oci::rootfs_build_options options;
    options.cache_dir = t.path / "cache";
    std::vector<fs::path> layers{layers_dir / "l1.tar.gz", layers_dir / "l2.tar.zst",
                                 layers_dir / "l3.tar.gz", init_tar};
    auto image = supermachine::oci::build_rootfs("sha256:" + std::string(64, 'e'), layers, options);
    BOOST_REQUIRE_MESSAGE(image, (image ? "" : image.error().message()));

    // The image has no /proc, so the script ends with busybox poweroff -f.
    auto [rc, out] =
        run("timeout 600 qemu-system-x86_64 -machine q35 -m 512 -nographic -no-reboot -kernel " +
            shell_quote(kernel.string()) +
            " -append 'console=ttyS0 root=/dev/nvme0n1 rootfstype=ext4 ro init=/init panic=-1 "
            "loglevel=7'"
            " -drive file=" +
            shell_quote(image.value().path.string()) +
            ",if=none,id=root,format=raw,readonly=on -device nvme,drive=root,serial=rootfs 2>&1 | "
            "tr -d '\\r'");
    auto begin = out.find("SM-BEGIN");
    auto end = out.find("SM-END");
    BOOST_REQUIRE_MESSAGE(begin != std::string::npos && end != std::string::npos, out);
    std::string said = out.substr(begin, end - begin);
    BOOST_TEST_MESSAGE(said);
    auto has = [&](const std::string& what) { return said.find(what) != std::string::npos; };
    BOOST_TEST(out.find("EXT4-fs (nvme0n1): mounted filesystem") != std::string::npos);
    BOOST_TEST(out.find("VFS: Mounted root (ext4 filesystem) readonly") != std::string::npos);
    BOOST_TEST(out.find("EXT4-fs error") == std::string::npos);
    BOOST_TEST(has("layer three"));
    BOOST_TEST(has("1,   3"));                // /dev/null char 1:3
    BOOST_TEST(has("8,   0"));                // /dev/sda block 8:0
    BOOST_TEST(has("3000000000 3000000001")); // 32-bit ids
    BOOST_TEST(has("1000     1000"));         // /home/app/owned
    BOOST_TEST(has("/bin/sh -> busybox"));
    BOOST_TEST(has("mode 4755 /usr/bin/setuid"));
    BOOST_TEST(has("mode 1777 /tmp"));
    BOOST_TEST(has("second wins"));
    BOOST_TEST(has("via symlinked parent"));
    BOOST_TEST(has("465b64fab8b4460ca2057e55a29b4ca7  /big")); // md5 of the 3 MiB pattern
    BOOST_TEST(!has("\na\n")); // /opaque/a hidden by the opaque marker
    BOOST_TEST(has("keep"));
    BOOST_TEST(!has("gone")); // whited out
}
