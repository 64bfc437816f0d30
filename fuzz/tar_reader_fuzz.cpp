// Fuzz the layer path end to end: decompression (format by magic), the tar
// reader, the merged tree (whiteouts, links, hostile paths) and, for inputs
// that merge, the ext4 writer into a memfd. Limits are small so a fuzzed
// "zip bomb" or huge size stops quickly with a clean error.
#include <supermachine/oci/ext4_writer.hpp>
#include <supermachine/oci/filesystem_tree.hpp>
#include <supermachine/oci/layer.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

#include <sys/mman.h>
#include <unistd.h>

namespace oci = supermachine::oci;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    // The spool is an unlinked O_TMPFILE: nothing is left in the directory.
    static const std::filesystem::path spool_dir = std::filesystem::temp_directory_path();
    oci::tree_limits tree_limits;
    tree_limits.max_nodes = 20000;
    tree_limits.max_total_data = 16 << 20;
    auto tree = oci::filesystem_tree::create(spool_dir, tree_limits);
    if (!tree) return 0;
    oci::layer_limits limits;
    limits.decompress.max_output = 32 << 20;
    limits.decompress.ratio_grace = 1 << 20;
    limits.tar.max_entry_size = 8 << 20;
    // The input is one layer; a second pass applies it again as layer 2 so whiteouts,
    // opaque directories and replacement across layers are exercised too.
    auto bytes = std::as_bytes(std::span(data, size));
    auto first = oci::apply_layer(tree.value(), oci::memory_source(bytes), 1, limits);
    if (!first) return 0;
    auto second = oci::apply_layer(tree.value(), oci::memory_source(bytes), 2, limits);
    if (!second) return 0;
    (void)tree.value().lookup("/etc/passwd", true);

    int fd = ::memfd_create("ext4", MFD_CLOEXEC);
    if (fd < 0) return 0;
    oci::ext4_options options;
    options.free_space_bytes = 0;
    options.free_space_ratio = 0;
    options.max_size_bytes = 256 << 20;
    options.uuid[0] = 1;
    (void)oci::write_ext4(tree.value(), fd, options);
    ::close(fd);
    return 0;
}
