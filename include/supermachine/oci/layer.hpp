#pragma once
// Apply one image layer (a possibly compressed tar stream) to a filesystem_tree.
#include <supermachine/error.hpp>
#include <supermachine/oci/decompress.hpp>
#include <supermachine/oci/filesystem_tree.hpp>
#include <supermachine/oci/tar_reader.hpp>
#include <supermachine/oci/whiteout.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace supermachine::oci {

struct layer_limits {
    decompress_limits decompress;
    tar_limits tar;
};

struct layer_stats {
    std::uint64_t entries = 0;
    std::uint64_t whiteouts = 0;
    std::uint64_t compressed_bytes = 0;
    std::uint64_t tar_bytes = 0;
    compression format = compression::none;
};

/// Apply the tar stream in `source` (gzip / zstd / plain, detected) as layer
/// number `layer` (1 for the bottom layer, increasing upward).
template <byte_source Source>
result<layer_stats> apply_layer(filesystem_tree& tree, Source source, std::uint32_t layer,
                                const layer_limits& limits = {}) {
    decompressing_source<Source> stream(std::move(source), limits.decompress);
    tar_reader<decompressing_source<Source>> reader(stream, limits.tar);
    layer_stats stats;
    for (;;) {
        SUPERMACHINE_TRY(next, reader.next());
        if (!next) break;
        const tar_entry& entry = *next;
        ++stats.entries;
        std::string_view path = entry.path;
        while (path.size() > 1 && path.ends_with('/'))
            path.remove_suffix(1);
        auto slash = path.rfind('/');
        std::string_view directory = slash == std::string_view::npos ? "" : path.substr(0, slash);
        std::string_view base = slash == std::string_view::npos ? path : path.substr(slash + 1);
        auto wh = classify_whiteout(base);
        switch (wh.kind) {
        case whiteout_kind::none: {
            SUPERMACHINE_TRY(tree.apply(entry, reader, layer));
            break;
        }
        case whiteout_kind::remove: {
            ++stats.whiteouts;
            SUPERMACHINE_TRY(tree.whiteout(directory, wh.target, layer));
            break;
        }
        case whiteout_kind::opaque: {
            ++stats.whiteouts;
            SUPERMACHINE_TRY(tree.make_opaque(directory, layer));
            break;
        }
        case whiteout_kind::internal:
            break;
        case whiteout_kind::invalid:
            return make_error_code(errc::archive_malformed);
        }
    }
    // Drain what follows the end marker so the compressed stream is checked to its end.
    std::array<std::byte, 16384> rest;
    for (;;) {
        SUPERMACHINE_TRY(got, stream.read_some(rest));
        if (got == 0) break;
    }
    stats.compressed_bytes = stream.compressed_bytes();
    stats.tar_bytes = stream.output_bytes();
    stats.format = stream.format();
    return stats;
}

/// The same for a layer file on disk.
inline result<layer_stats> apply_layer_file(filesystem_tree& tree,
                                            const std::filesystem::path& path, std::uint32_t layer,
                                            const layer_limits& limits = {}) {
    SUPERMACHINE_TRY(file, file_source::open(path));
    return apply_layer(tree, std::move(file), layer, limits);
}

} // namespace supermachine::oci
