// Registry-supplied documents: manifests/indexes under each Content-Type,
// image configs, WWW-Authenticate headers and URLs must parse or fail cleanly.
#include <supermachine/oci/auth.hpp>
#include <supermachine/oci/detail/http_url.hpp>
#include <supermachine/oci/detail/registry_tar_index.hpp>
#include <supermachine/oci/image_config.hpp>
#include <supermachine/oci/manifest.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    namespace oci = supermachine::oci;
    std::string_view text(reinterpret_cast<const char*>(data), size);
    static constexpr std::string_view types[] = {
        "", oci::media_type::oci_manifest, oci::media_type::oci_index,
        oci::media_type::docker_manifest, oci::media_type::docker_manifest_list};
    for (auto type : types) {
        auto m = oci::parse_manifest(text, type);
        if (!m) continue;
        if (auto* index = std::get_if<oci::image_index>(&m.value())) {
            auto chosen = oci::select_platform(*index, oci::default_platform());
            if (chosen && chosen.value().size < 0) std::abort();
        } else {
            auto& manifest = std::get<oci::image_manifest>(m.value());
            if (manifest.layers.size() > oci::max_layers) std::abort();
            for (auto& l : manifest.layers)
                if (l.size < 0 || l.size > oci::max_blob_bytes || !l.digest.valid()) std::abort();
        }
    }
    (void)oci::parse_image_config(text);
    (void)oci::parse_www_authenticate(text);
    if (auto url = oci::detail::parse_http_url(text))
        if (!oci::detail::valid_http_target(url->target)) std::abort();
    (void)oci::base64_decode(text);

    // The same bytes as a docker-archive tar: index, look up, read bounded.
    static int fd = ::memfd_create("fuzz-tar", 0);
    if (fd >= 0 && ::ftruncate(fd, 0) == 0 && ::pwrite(fd, data, size, 0) == ssize_t(size)) {
        auto tar = oci::detail::registry_tar_index::open("/proc/self/fd/" + std::to_string(fd));
        if (tar) {
            for (auto& [name, member] : tar.value().members())
                if (member.offset + member.size > size) std::abort(); // never past the end
            if (auto m = tar.value().find_file("manifest.json"))
                (void)tar.value().read(m.value(), 1 << 20);
            if (auto m = tar.value().find_file("a/../b/layer.tar"))
                (void)tar.value().read(m.value(), 1 << 20);
        }
    }
    return 0;
}
