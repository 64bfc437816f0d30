// Module load order from a modules.dep tree (what depmod writes), built-in
// modules skipped, cycles rejected; the .modinfo reader on hostile bytes;
// finding a kernel tree in the cache.
#include "printers.hpp"

#include <supermachine/boot/kernel_cache.hpp>
#include <supermachine/boot/kernel_modules.hpp>

#include <boost/test/unit_test.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>

using namespace supermachine;
using namespace supermachine::boot;
namespace fs = std::filesystem;

namespace {
struct scratch_dir {
    fs::path path;
    scratch_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-modules-XXXXXX").string();
        path = ::mkdtemp(pattern.data());
    }
    ~scratch_dir() { fs::remove_all(path); }
};

void write_text(const fs::path& p, const std::string& text) {
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
}

std::vector<std::string> names(const std::vector<fs::path>& paths) {
    std::vector<std::string> out;
    for (const auto& p : paths)
        out.push_back(p.filename().string());
    return out;
}
} // namespace

BOOST_AUTO_TEST_CASE(modules_dep_gives_dependencies_first) {
    scratch_dir dir;
    const auto m = dir.path / "lib/modules/9.9.9-test";
    write_text(m / "modules.dep",
               "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko "
               "kernel/drivers/virtio/virtio_ring.ko\n"
               "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
               "kernel/drivers/virtio/virtio_ring.ko:\n"
               "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko "
               "kernel/drivers/virtio/virtio_ring.ko\n"
               "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n");
    write_text(m / "modules.builtin", "kernel/fs/ext4/ext4.ko\n");
    const std::vector<std::string> wanted{"virtio_mmio", "virtio-rng", "ext4", "nonexistent"};
    const auto plan = plan_modules(m, wanted).value();
    BOOST_TEST(names(plan.load_order) ==
                   (std::vector<std::string>{"virtio_ring.ko", "virtio.ko", "virtio_mmio.ko",
                                             "virtio-rng.ko"}),
               boost::test_tools::per_element());
    BOOST_TEST(plan.builtin == std::vector<std::string>{"ext4"}, boost::test_tools::per_element());
    BOOST_TEST(plan.missing == std::vector<std::string>{"nonexistent"},
               boost::test_tools::per_element());
    const std::vector<std::string> cyclic{"a"};
    BOOST_TEST(plan_modules(m, cyclic).error() == errc::invalid_argument);
    BOOST_TEST(plan_modules(dir.path / "nope", wanted).error() == errc::not_found);
}

BOOST_AUTO_TEST_CASE(modinfo_reader_survives_hostile_bytes) {
    std::vector<std::byte> junk(4096, std::byte{0xff});
    BOOST_TEST(!module_dependencies(junk));
    junk[0] = std::byte{0x7f};
    junk[1] = std::byte{'E'};
    junk[4] = std::byte{2};
    BOOST_TEST(!module_dependencies(junk)); // section table far outside the file
    BOOST_TEST(!module_dependencies(std::span(junk).first(10)));
}

BOOST_AUTO_TEST_CASE(kernel_tree_is_found_by_layout) {
    scratch_dir dir;
    write_text(dir.path / "boot/vmlinuz-9.9.9-test", "not really a kernel");
    write_text(dir.path / "lib/modules/9.9.9-test/modules.dep", "");
    const std::vector<std::string> none;
    const auto k = open_kernel_tree(dir.path, none).value();
    BOOST_TEST(k.release == "9.9.9-test");
    BOOST_TEST(k.vmlinuz.filename() == "vmlinuz-9.9.9-test");
    BOOST_TEST(open_kernel_tree(dir.path / "missing").error() == errc::kernel_not_found);
    BOOST_TEST(read_kernel_file(dir.path / "missing").error() == errc::kernel_not_found);
    BOOST_TEST(read_kernel_file(dir.path).error() == errc::kernel_not_found); // a directory
    BOOST_TEST(read_kernel_file(k.vmlinuz).value().size() == 19u);
    ::setenv("SUPERMACHINE_KERNEL_DIR", (dir.path / "missing").c_str(), 1);
    BOOST_TEST(default_kernel().error() == errc::kernel_not_found);
    ::unsetenv("SUPERMACHINE_KERNEL_DIR");
    ::setenv("XDG_CACHE_HOME", "/xdg", 1);
    BOOST_TEST(kernel_cache_dir() == fs::path("/xdg/supermachine/kernels"));
    ::unsetenv("XDG_CACHE_HOME");
}
