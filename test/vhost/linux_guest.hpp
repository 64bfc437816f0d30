#pragma once
// Pieces for booting the Debian cloud kernel under the QEMU engine in tests
// and benchmarks: find the kernel and its virtio modules, build an initramfs
// (busybox-static + modules + an /init script) and ext4 data disks.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <openssl/evp.h>
#include <unistd.h>

namespace supermachine::test {

struct linux_kernel {
    std::filesystem::path image;   // bzImage
    std::filesystem::path modules; // lib/modules/<version>
};

/// $SUPERMACHINE_TEST_KERNEL (a vmlinuz whose modules are at ../lib/modules/<version>),
/// else the boot helper's cache, else the unpacked copy at /tmp/k/x.
inline std::optional<linux_kernel> find_linux_kernel() {
    namespace fs = std::filesystem;
    std::vector<fs::path> candidates;
    if (const char* env = std::getenv("SUPERMACHINE_TEST_KERNEL")) candidates.emplace_back(env);
    if (const char* home = std::getenv("HOME"))
        candidates.push_back(fs::path(home) / ".cache/supermachine/kernels/current");
    candidates.push_back("/tmp/k/x");
    for (const auto& c : candidates) {
        std::error_code ec;
        auto try_image = [&](const fs::path& image,
                             const fs::path& root) -> std::optional<linux_kernel> {
            const auto name = image.filename().string();
            if (name.rfind("vmlinuz-", 0) != 0 || !fs::is_regular_file(image, ec))
                return std::nullopt;
            const auto modules = root / "lib/modules" / name.substr(8);
            if (!fs::is_directory(modules, ec)) return std::nullopt;
            return linux_kernel{image, modules};
        };
        if (fs::is_regular_file(c, ec)) {
            if (auto k = try_image(c, c.parent_path().parent_path())) return k;
        } else if (fs::is_directory(c / "boot", ec)) {
            for (const auto& entry : fs::directory_iterator(c / "boot", ec))
                if (auto k = try_image(entry.path(), c)) return k;
        }
    }
    return std::nullopt;
}

inline bool have_program(const char* name) {
    std::string cmd = std::string("command -v ") + name + " >/dev/null 2>&1";
    return std::system(cmd.c_str()) == 0;
}

inline std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char c : s)
        out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}

inline bool run(const std::string& command) {
    return std::system(command.c_str()) == 0;
}

/// The modules (in load order) a guest needs for virtio-mmio block and entropy.
inline const std::vector<std::string>& virtio_modules() {
    static const std::vector<std::string> m{
        "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/block/virtio_blk.ko",
        "kernel/drivers/char/hw_random/virtio-rng.ko"};
    return m;
}

/// An initramfs (newc cpio) with busybox, the virtio modules under /lib/mods
/// and `init_body` run by /init after the modules are loaded.
inline bool make_initramfs(const linux_kernel& kernel, const std::filesystem::path& work,
                           const std::string& init_body, const std::filesystem::path& output) {
    namespace fs = std::filesystem;
    const fs::path root = work / "initramfs-root";
    fs::remove_all(root);
    for (auto d : {"bin", "proc", "sys", "dev", "mnt", "lib/mods", "tmp"})
        fs::create_directories(root / d);
    fs::copy_file("/bin/busybox", root / "bin/busybox");
    std::string loads;
    for (const auto& m : virtio_modules()) {
        fs::copy_file(kernel.modules / m, root / "lib/mods" / fs::path(m).filename());
        loads += "insmod /lib/mods/" + fs::path(m).filename().string() + "\n";
    }
    {
        std::ofstream init(root / "init");
        init << "#!/bin/busybox sh\n"
                "/bin/busybox --install -s /bin\n"
                "mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n"
             << loads << init_body << "\npoweroff -f\n";
    }
    fs::permissions(root / "init",
                    fs::perms::owner_all | fs::perms::group_read | fs::perms::others_read);
    return run("cd " + shell_quote(root.string()) + " && find . | cpio -o -H newc --quiet > " +
               shell_quote(output.string()));
}

/// An ext4 image of `megabytes` holding the tree at `content`.
inline bool make_ext4(const std::filesystem::path& content, const std::filesystem::path& image,
                      int megabytes) {
    return run("mkfs.ext4 -q -F -d " + shell_quote(content.string()) + " " +
               shell_quote(image.string()) + " " + std::to_string(megabytes) + "M >/dev/null 2>&1");
}

inline std::string sha256_hex(const void* data, std::size_t size) {
    unsigned char digest[32];
    unsigned int length = 0;
    EVP_Digest(data, size, digest, &length, EVP_sha256(), nullptr);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned i = 0; i < length; ++i) {
        out += hex[digest[i] >> 4];
        out += hex[digest[i] & 15];
    }
    return out;
}

/// A fresh temporary directory, removed by the destructor.
struct temporary_directory {
    std::filesystem::path path;
    temporary_directory() {
        std::string pattern =
            (std::filesystem::temp_directory_path() / "sm-vhost-test-XXXXXX").string();
        if (::mkdtemp(pattern.data())) path = pattern;
    }
    ~temporary_directory() {
        std::error_code ec;
        if (!path.empty()) std::filesystem::remove_all(path, ec);
    }
};

} // namespace supermachine::test
