#pragma once
// Linux guests for the linux-kvm tests (test/linuxkvm): Debian's cloud kernel
// found the way the product finds it (the kernel cache that
// scripts/fetch-kernel.sh fills), a busybox initramfs that loads the guest
// modules and runs a test's script.
//
// These tests carry the CTest label linux-kvm: where the host's KVM cannot
// run Linux (kvm_pvm here) ctest runs them inside scripts/nested-kvm.sh, so
// they never skip on this machine (doc/nested-kvm.md).
#include <console_text.hpp>
#include <guest_kernel.hpp>
#include <running_io.hpp>
#include <skip.hpp>
#include <supermachine/backend/kvm.hpp>
#include <supermachine/boot/demo_initramfs.hpp>

#include <boost/test/unit_test.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace supermachine::test {

/// Skip (one line) where this host's KVM cannot run Linux: run the test
/// through ctest (label linux-kvm) or scripts/nested-kvm.sh instead.
inline void require_linux_kvm() {
    if (::access("/dev/kvm", R_OK | W_OK) != 0)
        skip("no usable /dev/kvm (run it with ctest -L linux-kvm, which uses "
             "scripts/nested-kvm.sh)");
    if (backend::host_is_kvm_pvm())
        skip("host KVM is kvm_pvm and cannot run Linux (run it with ctest -L linux-kvm, which "
             "uses scripts/nested-kvm.sh)");
}

/// A guest program built into the build tree's bin/ (e.g. vsock_probe).
inline std::filesystem::path guest_program(const char* name) {
    const char* dir = std::getenv("SUPERMACHINE_BINARY_DIR");
    const auto path = std::filesystem::path(dir ? dir : ".") / "bin" / name;
    if (::access(path.c_str(), X_OK) != 0) skip(std::string("guest program not built: ") + name);
    return path;
}

/// An initramfs whose /init loads the guest modules, prints "linux-test: up",
/// installs busybox's applets, runs `script` and powers off. `files` are
/// more host programs ({host file, "bin/name"}).
inline std::vector<std::byte>
linux_initramfs(const boot::kernel_files& kernel, std::string script,
                std::vector<std::pair<std::filesystem::path, std::string>> files = {}) {
    boot::demo_initramfs_options o;
    o.greeting = "linux-test: up";
    o.modules = kernel.modules;
    o.extra_script = "/bin/busybox --install -s /bin\n" + std::move(script);
    o.extra_files = std::move(files);
    auto built = boot::build_demo_initramfs(o);
    if (!built) BOOST_FAIL("test initramfs: " << built.error().message());
    return std::move(built).value();
}

/// A fresh directory, removed with everything in it.
struct scratch_directory {
    std::filesystem::path path;
    scratch_directory() {
        std::string t = (std::filesystem::temp_directory_path() / "linuxkvm-XXXXXX").string();
        path = ::mkdtemp(t.data());
    }
    ~scratch_directory() { std::filesystem::remove_all(path); }
};

} // namespace supermachine::test
