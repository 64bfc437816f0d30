#pragma once
// Image references: the docker grammar (as github.com/distribution/reference
// parses and normalizes it) and the skopeo-style transports we read locally.
//
//   alpine                         -> docker.io/library/alpine:latest
//   library/alpine:3.19            -> docker.io/library/alpine:3.19
//   index.docker.io/x/y            -> docker.io/x/y:latest (endpoint registry-1.docker.io)
//   localhost:5000/ns/name:tag@sha256:<hex>
//   docker://REF                   -> the same as REF
//   oci:PATH[:TAG]                 -> an OCI image layout directory
//   docker-archive:PATH[:name:tag] -> a `docker save` tarball
//
// A bad reference is errc::bad_reference; the optional `reason` says why.
#include <supermachine/error.hpp>
#include <supermachine/oci/digest.hpp>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace supermachine::oci {

inline constexpr std::string_view default_registry = "docker.io";
inline constexpr std::string_view docker_hub_endpoint = "registry-1.docker.io";
inline constexpr std::string_view default_tag = "latest";
inline constexpr std::size_t max_name_length = 255; // whole name incl. registry
inline constexpr std::size_t max_tag_length = 128;

/// A normalized registry reference.
struct image_reference {
    std::string registry;   // "docker.io", "localhost:5000", "ghcr.io"
    std::string repository; // "library/alpine"
    std::string tag;        // empty only when pinned by digest alone
    std::optional<oci::digest> digest;

    /// Host[:port] to connect to: Docker Hub's API lives at registry-1.docker.io.
    std::string endpoint() const {
        return registry == default_registry ? std::string(docker_hub_endpoint) : registry;
    }
    /// What to ask the registry for in /v2/<name>/manifests/<reference>.
    std::string manifest_reference() const { return digest ? digest->str() : tag; }
    std::string name() const { return registry + "/" + repository; }
    /// Fully qualified: docker.io/library/alpine:latest[@sha256:...]
    std::string str() const {
        std::string out = name();
        if (!tag.empty()) out += ":" + tag;
        if (digest) out += "@" + digest->str();
        return out;
    }
    /// Short form as docker prints it: alpine:latest, user/app:1, host:5000/x:y.
    std::string familiar() const {
        std::string out;
        if (registry != default_registry)
            out = registry + "/" + repository;
        else if (repository.starts_with("library/") &&
                 repository.find('/', 8) == std::string::npos &&
                 !(repository.size() == 8 + 64 &&
                   repository.find_first_not_of("0123456789abcdef", 8) == std::string::npos))
            out = repository.substr(8); // (a bare 64-hex name would read as an image ID)
        else if (auto first = repository.substr(0, repository.find('/'));
                 repository.find('/') != std::string::npos &&
                 (first.find_first_of(".:") != std::string::npos || first == "localhost"))
            out = registry + "/" + repository; // would read as a registry host otherwise
        else
            out = repository;
        if (!tag.empty()) out += ":" + tag;
        if (digest) out += "@" + digest->str();
        return out;
    }
    friend bool operator==(const image_reference&, const image_reference&) = default;
};

namespace detail {

inline bool reference_fail(std::string* reason, const char* why) {
    if (reason) *reason = why;
    return false;
}
constexpr bool is_lower_alnum(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}
constexpr bool is_alnum(char c) noexcept {
    return is_lower_alnum(c) || (c >= 'A' && c <= 'Z');
}
constexpr bool is_word(char c) noexcept {
    return is_alnum(c) || c == '_';
}

// path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
inline bool valid_path_component(std::string_view s, std::string* reason) {
    if (s.empty()) return reference_fail(reason, "empty path component in repository name");
    std::size_t i = 0;
    while (i < s.size()) {
        if (!is_lower_alnum(s[i])) {
            for (char c : s)
                if (c >= 'A' && c <= 'Z')
                    return reference_fail(reason, "repository name must be lowercase");
            return reference_fail(reason,
                                  "repository path component must start and end with [a-z0-9]");
        }
        while (i < s.size() && is_lower_alnum(s[i]))
            ++i;
        if (i == s.size()) break;
        std::size_t start = i;
        if (s[i] == '.')
            ++i;
        else if (s[i] == '_')
            i += (i + 1 < s.size() && s[i + 1] == '_') ? 2 : 1;
        else if (s[i] == '-')
            while (i < s.size() && s[i] == '-')
                ++i;
        else {
            if (s[i] >= 'A' && s[i] <= 'Z')
                return reference_fail(reason, "repository name must be lowercase");
            return reference_fail(reason, "invalid character in repository name");
        }
        if (i == s.size() || !is_lower_alnum(s[i])) {
            (void)start;
            return reference_fail(reason, "invalid separator sequence in repository name");
        }
    }
    return true;
}

// domain := component ("." component)* [":" port]; component := alnum ([alnum-]* alnum)?
inline bool valid_domain(std::string_view s, std::string* reason) {
    auto colon = s.find(':');
    std::string_view host = s.substr(0, colon);
    if (colon != std::string_view::npos) {
        auto port = s.substr(colon + 1);
        if (port.empty() || port.size() > 5) return reference_fail(reason, "invalid registry port");
        unsigned value = 0;
        for (char c : port) {
            if (c < '0' || c > '9') return reference_fail(reason, "invalid registry port");
            value = value * 10 + unsigned(c - '0');
        }
        if (value == 0 || value > 65535)
            return reference_fail(reason, "registry port out of range");
    }
    if (host.empty()) return reference_fail(reason, "empty registry host");
    std::size_t start = 0;
    while (true) {
        auto dot = host.find('.', start);
        auto part = host.substr(start, dot == std::string_view::npos ? host.npos : dot - start);
        if (part.empty() || !is_alnum(part.front()) || !is_alnum(part.back()))
            return reference_fail(reason, "invalid registry host name");
        for (char c : part)
            if (!is_alnum(c) && c != '-')
                return reference_fail(reason, "invalid character in registry host name");
        if (dot == std::string_view::npos) break;
        start = dot + 1;
    }
    return true;
}

// tag := [\w][\w.-]{0,127}
inline bool valid_tag(std::string_view s, std::string* reason) {
    if (s.empty()) return reference_fail(reason, "empty tag");
    if (s.size() > max_tag_length) return reference_fail(reason, "tag longer than 128 characters");
    if (!is_word(s.front())) return reference_fail(reason, "tag must start with [A-Za-z0-9_]");
    for (char c : s)
        if (!is_word(c) && c != '.' && c != '-')
            return reference_fail(reason, "invalid character in tag");
    return true;
}

} // namespace detail

/// Parse and normalize a docker reference (no transport prefix).
inline result<image_reference> parse_reference(std::string_view text,
                                               std::string* reason = nullptr) {
    using namespace detail;
    auto fail = [&](const char* why) -> result<image_reference> {
        reference_fail(reason, why);
        return errc::bad_reference;
    };
    if (text.empty()) return fail("empty reference");
    if (text.size() > max_name_length + 1 + max_tag_length + 1 + 7 + 128)
        return fail("reference too long");

    image_reference ref;
    std::string_view rest = text;
    if (auto at = rest.find('@'); at != std::string_view::npos) {
        auto parsed = digest::parse(rest.substr(at + 1));
        if (!parsed) return fail("invalid digest (expected sha256:<64 hex> or sha512:<128 hex>)");
        ref.digest = parsed.value();
        rest = rest.substr(0, at);
    }
    auto last_slash = rest.rfind('/');
    auto colon = rest.find(':', last_slash == std::string_view::npos ? 0 : last_slash + 1);
    if (colon != std::string_view::npos) {
        auto tag = rest.substr(colon + 1);
        if (!valid_tag(tag, reason)) return errc::bad_reference;
        ref.tag.assign(tag);
        rest = rest.substr(0, colon);
    }
    if (rest.empty()) return fail("empty repository name");
    if (rest.size() > max_name_length) return fail("repository name longer than 255 characters");

    // The first component is a registry if it looks like a host: has a dot or
    // a port, is "localhost", or has capitals (never valid in a repository).
    std::string_view domain = default_registry;
    std::string_view remainder = rest;
    if (auto slash = rest.find('/'); slash != std::string_view::npos) {
        auto first = rest.substr(0, slash);
        bool has_upper = false;
        for (char c : first)
            has_upper |= (c >= 'A' && c <= 'Z');
        if (first.find_first_of(".:") != std::string_view::npos || first == "localhost" ||
            has_upper) {
            domain = first;
            remainder = rest.substr(slash + 1);
            if (!valid_domain(domain, reason)) return errc::bad_reference;
        }
    }
    if (remainder.empty()) return fail("empty repository name");
    std::size_t start = 0;
    while (true) {
        auto slash = remainder.find('/', start);
        auto part = remainder.substr(start, slash == std::string_view::npos ? remainder.npos
                                                                            : slash - start);
        if (!valid_path_component(part, reason)) return errc::bad_reference;
        if (slash == std::string_view::npos) break;
        start = slash + 1;
    }
    if (remainder.size() == 64 &&
        remainder.find_first_not_of("0123456789abcdef") == std::string_view::npos &&
        domain == default_registry && rest.find('/') == std::string_view::npos)
        return fail("a 64-character hexadecimal string is an image ID, not a repository name");

    ref.registry.assign(domain == "index.docker.io" ? default_registry : domain);
    ref.repository.assign(remainder);
    if (ref.registry == default_registry && ref.repository.find('/') == std::string::npos)
        ref.repository.insert(0, "library/");
    // As docker: the bound applies to the normalized name (registry included).
    if (ref.name().size() > max_name_length)
        return fail("repository name longer than 255 characters once normalized");
    if (ref.tag.empty() && !ref.digest) ref.tag = default_tag;
    return ref;
}

/// Where an image comes from.
enum class image_transport {
    registry,       // docker://REF or a bare docker reference
    oci_layout,     // oci:PATH[:TAG]
    docker_archive, // docker-archive:PATH[:name:tag]
};

struct image_source {
    image_transport transport = image_transport::registry;
    image_reference reference;  // registry: the image; docker-archive: the name inside, if given
    bool has_reference = false; // docker-archive: was a name:tag given?
    std::string path;           // oci_layout, docker_archive
    std::string layout_tag;     // oci_layout: the org.opencontainers.image.ref.name; may be empty

    /// A string naming the source, for image records and messages.
    std::string str() const {
        switch (transport) {
        case image_transport::registry:
            return reference.str();
        case image_transport::oci_layout:
            return "oci:" + path + (layout_tag.empty() ? "" : ":" + layout_tag);
        case image_transport::docker_archive:
            return "docker-archive:" + path + (has_reference ? ":" + reference.familiar() : "");
        }
        return {};
    }
};

/// Parse a reference with an optional transport prefix. Like skopeo, the path
/// of oci: and docker-archive: ends at the first ':' after the prefix.
inline result<image_source> parse_image_source(std::string_view text,
                                               std::string* reason = nullptr) {
    auto fail = [&](const char* why) -> result<image_source> {
        detail::reference_fail(reason, why);
        return errc::bad_reference;
    };
    image_source source;
    if (text.starts_with("docker://"))
        text.remove_prefix(9);
    else if (text.starts_with("oci:")) {
        text.remove_prefix(4);
        source.transport = image_transport::oci_layout;
        auto colon = text.find(':');
        source.path.assign(text.substr(0, colon));
        if (source.path.empty()) return fail("oci: needs a directory path");
        if (colon != std::string_view::npos) {
            auto tag = text.substr(colon + 1);
            if (tag.empty()) return fail("empty tag after oci:PATH:");
            if (tag.size() > 1024) return fail("oci layout tag too long");
            for (char c : tag)
                if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
                    return fail("control character in oci layout tag");
            source.layout_tag.assign(tag);
        }
        return source;
    } else if (text.starts_with("docker-archive:")) {
        text.remove_prefix(15);
        source.transport = image_transport::docker_archive;
        auto colon = text.find(':');
        source.path.assign(text.substr(0, colon));
        if (source.path.empty()) return fail("docker-archive: needs a file path");
        if (colon != std::string_view::npos) {
            auto name = text.substr(colon + 1);
            if (name.find('@') != std::string_view::npos)
                return fail("docker-archive: takes name:tag, not a digest");
            SUPERMACHINE_TRY(parsed, parse_reference(name, reason));
            source.reference = std::move(parsed);
            source.has_reference = true;
        }
        return source;
    }
    SUPERMACHINE_TRY(parsed, parse_reference(text, reason));
    source.reference = std::move(parsed);
    source.has_reference = true;
    return source;
}

} // namespace supermachine::oci
