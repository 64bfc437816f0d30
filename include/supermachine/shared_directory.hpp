#pragma once
// A host directory shared into a vm (docker's -v HOST:GUEST[:ro]), through
// virtio-fs: one virtiofsd per directory serves it to QEMU's
// vhost-user-fs-device, and the guest agent mounts it at GUEST inside the
// image's root (doc/vm.md, "Volumes").
//
// Paths come from users and go into virtiofsd's -o list, QEMU's option
// syntax and the guest kernel's command line: validated here, strictly,
// before any of those sees them.
#include <supermachine/error.hpp>

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

namespace supermachine {

struct shared_directory {
    std::filesystem::path host; // a directory; validate_shared_directory() makes it canonical
    std::string guest;          // absolute path inside the vm's root
    bool read_only = false;     // mounted read-only in the guest
};

/// At most this many per vm (each is a virtiofsd process and a virtio-mmio slot).
inline constexpr std::size_t max_shared_directories = 8;
/// Guest paths travel on the kernel command line (2048 bytes on x86): bounded.
inline constexpr std::size_t max_guest_path_length = 128;

/// Why `guest` cannot be a mount point in the vm (empty: it can). Absolute,
/// no "." or ".." or empty components, printable ASCII without the
/// characters the kernel command line and our spec syntax split on, not
/// "/" and not the API filesystems the agent mounts (/proc, /sys, /dev).
inline std::string guest_path_problem(std::string_view guest) {
    if (guest.empty() || guest.front() != '/') return "the guest path must be absolute";
    if (guest.size() > max_guest_path_length)
        return "the guest path is longer than " + std::to_string(max_guest_path_length);
    for (char c : guest)
        if (c <= ' ' || c > '~' || c == ':' || c == ',' || c == '"' || c == '\\')
            return "the guest path may not contain spaces, ':', ',', quotes or backslashes";
    if (guest == "/") return "the guest path cannot be /";
    std::string_view first;
    for (std::size_t pos = 1; pos <= guest.size();) {
        const auto end = std::min(guest.find('/', pos), guest.size());
        const auto part = guest.substr(pos, end - pos);
        if (part.empty() || part == "." || part == "..")
            return "the guest path may not contain empty, '.' or '..' parts";
        if (first.empty()) first = part;
        pos = end + 1;
    }
    if (first == "proc" || first == "sys" || first == "dev")
        return "the guest path cannot be under /proc, /sys or /dev";
    return {};
}

/// Check and resolve `d` in place: the host path must exist and be a
/// directory (made canonical: virtiofsd serves what the path names now, not
/// what a later symlink swap makes it), without ',' (virtiofsd's -o list
/// separator); the guest path as guest_path_problem. On error, `why` (if
/// given) says what is wrong in one line.
inline result<void> validate_shared_directory(shared_directory& d, std::string* why = nullptr) {
    auto fail = [&](errc code, std::string text) -> result<void> {
        if (why) *why = std::move(text);
        return code;
    };
    if (auto problem = guest_path_problem(d.guest); !problem.empty())
        return fail(errc::invalid_argument, problem + ": '" + d.guest + "'");
    std::error_code ec;
    auto resolved = std::filesystem::canonical(d.host, ec);
    if (ec)
        return fail(errc::not_found,
                    "host directory '" + d.host.string() + "' does not exist: " + ec.message());
    if (!std::filesystem::is_directory(resolved, ec))
        return fail(errc::invalid_argument,
                    "host path '" + resolved.string() + "' is not a directory");
    if (resolved.string().find(',') != std::string::npos)
        return fail(errc::invalid_argument,
                    "host path '" + resolved.string() + "' may not contain ','");
    d.host = std::move(resolved);
    return success();
}

/// docker's -v HOST:GUEST[:ro|:rw]; a relative HOST is taken against `cwd`.
/// Only the syntax: validate_shared_directory() checks the paths.
inline result<shared_directory> parse_volume_spec(std::string_view spec,
                                                  const std::filesystem::path& cwd,
                                                  std::string* why = nullptr) {
    auto fail = [&](std::string text) -> result<shared_directory> {
        if (why) *why = std::move(text);
        return errc::invalid_argument;
    };
    shared_directory d;
    const auto first = spec.find(':');
    if (first == std::string_view::npos || first == 0)
        return fail("need HOST:GUEST[:ro|:rw], not '" + std::string(spec) + "'");
    std::string_view guest = spec.substr(first + 1);
    if (const auto second = guest.find(':'); second != std::string_view::npos) {
        const auto mode = guest.substr(second + 1);
        if (mode == "ro")
            d.read_only = true;
        else if (mode != "rw")
            return fail("the mode after GUEST is ro or rw, not '" + std::string(mode) + "'");
        guest = guest.substr(0, second);
    }
    const std::filesystem::path host(spec.substr(0, first));
    d.host = host.is_absolute() ? host : cwd / host;
    d.guest = std::string(guest);
    return d;
}

} // namespace supermachine
