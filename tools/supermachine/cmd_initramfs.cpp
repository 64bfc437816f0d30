// supermachine initramfs: write the demo initramfs (static busybox, a /init
// that loads the default kernel's guest modules, prints a greeting and
// powers off) — the guest the main job and the Linux tests boot.
#include "command.hpp"

#include <supermachine/boot/demo_initramfs.hpp>
#include <supermachine/boot/kernel_cache.hpp>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>

namespace {

int usage(FILE* out) {
    std::fprintf(out,
                 "usage: supermachine initramfs -o FILE [--kernel-dir DIR] [--greeting TEXT] "
                 "[--busybox PATH]\n"
                 "                              [--no-modules] [--no-gzip] [--fetch]\n"
                 "Writes the demo initramfs for the default guest kernel (Debian cloud, from\n"
                 "%s; --fetch runs %s if it is missing).\n"
                 "Prints the kernel path on stdout, so: qemu -kernel \"$(supermachine initramfs -o "
                 "i.gz)\".\n",
                 supermachine::boot::kernel_cache_dir().c_str(),
                 supermachine::boot::fetch_kernel_script().c_str());
    return out == stdout ? 0 : 2;
}

int run_initramfs(std::span<char*> args) {
    using namespace supermachine::boot;
    std::string output, kernel_dir;
    demo_initramfs_options options;
    bool modules = true, fetch = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string_view a = args[i];
        auto value = [&]() -> const char* { return i + 1 < args.size() ? args[++i] : nullptr; };
        const char* v = nullptr;
        if (a == "-h" || a == "--help")
            return usage(stdout);
        else if ((a == "-o" || a == "--output") && (v = value()))
            output = v;
        else if (a == "--kernel-dir" && (v = value()))
            kernel_dir = v;
        else if (a == "--greeting" && (v = value()))
            options.greeting = v;
        else if (a == "--busybox" && (v = value()))
            options.busybox = v;
        else if (a == "--no-modules")
            modules = false;
        else if (a == "--no-gzip")
            options.compression = initramfs_compression::none;
        else if (a == "--fetch")
            fetch = true;
        else {
            std::fprintf(stderr, "supermachine initramfs: bad argument '%s'\n", args[i]);
            return usage(stderr);
        }
    }
    if (output.empty()) return usage(stderr);
    auto kernel = kernel_dir.empty() ? default_kernel() : open_kernel_tree(kernel_dir);
    if (!kernel && fetch && kernel_dir.empty()) kernel = fetch_default_kernel();
    if (!kernel) {
        std::fprintf(stderr,
                     "supermachine initramfs: no guest kernel (%s): run %s, or pass --fetch\n",
                     kernel.error().message().c_str(), fetch_kernel_script().c_str());
        return 1;
    }
    if (modules) options.modules = kernel.value().modules;
    auto image = build_demo_initramfs(options);
    if (!image) {
        std::fprintf(stderr, "supermachine initramfs: %s\n", image.error().message().c_str());
        return 1;
    }
    std::ofstream out(output, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(image.value().data()),
              static_cast<std::streamsize>(image.value().size()));
    if (!out.flush()) {
        std::fprintf(stderr, "supermachine initramfs: cannot write %s: %s\n", output.c_str(),
                     std::strerror(errno));
        return 1;
    }
    std::fprintf(stderr, "%s: %zu bytes, %zu modules\n", output.c_str(), image.value().size(),
                 options.modules.size());
    std::printf("%s\n", kernel.value().vmlinuz.c_str());
    return 0;
}

const supermachine::cli::command_registration registration{
    "initramfs", "write the demo guest initramfs", &run_initramfs};
} // namespace
