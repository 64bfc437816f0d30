#pragma once
// What image::prepare() gives and a vm boots: split from image.hpp so that
// starting a VM does not compile the registry client (Beast, OpenSSL's TLS).
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/image_config.hpp>

#include <filesystem>
#include <string>

namespace supermachine {

/// An image ready to boot.
struct prepared_image {
    std::string reference; // as the user named it
    oci::digest digest;    // the platform's image manifest digest: the image identity
    oci::image_config config;
    std::filesystem::path rootfs; // ext4, read-only base
    std::string passwd, group;    // the image's /etc/passwd and /etc/group
};

} // namespace supermachine
