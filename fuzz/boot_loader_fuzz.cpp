// libFuzzer: hostile kernel bytes through the bzImage and ELF parsers and
// the whole load_linux() into a small guest memory view, plus the module
// .modinfo reader. Any crash, sanitizer report or write outside the view
// is a bug; errors are the expected outcome for most inputs.
#include <supermachine/boot/kernel_modules.hpp>
#include <supermachine/boot/linux_loader.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

using namespace supermachine;
using namespace supermachine::boot;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1) return 0;
    const auto control = data[0];
    const auto kernel = std::as_bytes(std::span(data + 1, size - 1));

    (void)parse_bzimage(kernel);
    (void)parse_elf(kernel);
    (void)module_dependencies(kernel);

    // 20 MiB of guest RAM: enough for crafted kernels at 1-16 MiB to load,
    // small enough that big claims hit memory_too_small. One buffer, reused.
    static std::vector<std::byte> ram(20u << 20);
    const auto memory = guest_memory::view(0, ram);
    static const std::vector<std::byte> initrd(64 * 1024, std::byte{0x11});
    linux_boot_config config;
    config.kernel = kernel;
    if (control & 1) config.initrd = initrd;
    config.cmdline = (control & 2) ? std::string(300, 'x') : "console=ttyS0";
    config.vcpus = 1 + (control >> 4);
    config.prefer_pvh = (control & 4) != 0;
    if (control & 8) config.virtio_devices = {{x86_layout::virtio_mmio_base, 0x1000, 5}};
    auto entry = load_linux(memory, config);
    if (entry) {
        // Whatever loaded must lie in RAM and the entry inside the kernel's range.
        if (entry.value().kernel_end > ram.size()) __builtin_trap();
        if (entry.value().initrd_size && entry.value().initrd_address < entry.value().kernel_end)
            __builtin_trap();
    }
    return 0;
}
