#pragma once
// Minimal absolute-URL handling for the registry client: http(s)://host[:port]/target,
// plus resolving a Location header against the URL it came from.
#include <supermachine/error.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace supermachine::oci::detail {

struct http_url {
    bool tls = true;
    std::string host; // without brackets
    std::string port; // always set
    std::string target = "/";

    /// host[:port] as it goes into the Host header (default ports elided).
    std::string authority() const {
        std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
        if ((tls && port == "443") || (!tls && port == "80")) return h;
        return h + ":" + port;
    }
    /// host:port with the port always written: docker's certs.d directory name.
    std::string host_port() const {
        return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + port;
    }
    std::string str() const {
        return std::string(tls ? "https://" : "http://") + authority() + target;
    }
};

inline bool valid_http_target(std::string_view target) {
    if (target.empty() || target.front() != '/' || target.size() > 8192) return false;
    for (char c : target)
        if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f) return false;
    return true;
}

/// Parse "http://" or "https://" URLs; anything else is nullopt.
inline std::optional<http_url> parse_http_url(std::string_view text) {
    http_url url;
    if (text.starts_with("https://"))
        text.remove_prefix(8);
    else if (text.starts_with("http://")) {
        url.tls = false;
        text.remove_prefix(7);
    } else
        return std::nullopt;
    auto slash = text.find_first_of("/?#");
    auto authority = text.substr(0, slash);
    std::string_view rest = slash == std::string_view::npos ? "" : text.substr(slash);
    if (auto at = authority.rfind('@'); at != std::string_view::npos)
        authority.remove_prefix(at + 1); // userinfo is never used
    if (authority.empty() || authority.size() > 255) return std::nullopt;
    std::string_view host = authority, port;
    if (authority.front() == '[') {
        auto close = authority.find(']');
        if (close == std::string_view::npos) return std::nullopt;
        host = authority.substr(1, close - 1);
        auto after = authority.substr(close + 1);
        if (!after.empty()) {
            if (after.front() != ':') return std::nullopt;
            port = after.substr(1);
        }
    } else if (auto colon = authority.rfind(':'); colon != std::string_view::npos) {
        host = authority.substr(0, colon);
        port = authority.substr(colon + 1);
    }
    if (host.empty()) return std::nullopt;
    for (char c : host)
        if (static_cast<unsigned char>(c) <= 0x20 || c == '/' || c == 0x7f) return std::nullopt;
    if (!port.empty()) {
        if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string_view::npos)
            return std::nullopt;
        if (std::stoul(std::string(port)) == 0 || std::stoul(std::string(port)) > 65535)
            return std::nullopt;
    }
    url.host.assign(host);
    url.port = port.empty() ? (url.tls ? "443" : "80") : std::string(port);
    if (auto hash = rest.find('#'); hash != std::string_view::npos) rest = rest.substr(0, hash);
    url.target =
        rest.empty() ? "/" : (rest.front() == '?' ? "/" + std::string(rest) : std::string(rest));
    if (!valid_http_target(url.target)) return std::nullopt;
    return url;
}

/// Resolve a Location header against the request URL (absolute, scheme-relative,
/// or absolute-path forms).
inline std::optional<http_url> resolve_location(const http_url& base, std::string_view location) {
    if (location.starts_with("http://") || location.starts_with("https://"))
        return parse_http_url(location);
    if (location.starts_with("//"))
        return parse_http_url(std::string(base.tls ? "https:" : "http:") + std::string(location));
    if (location.starts_with("/")) {
        http_url url = base;
        url.target.assign(location);
        if (!valid_http_target(url.target)) return std::nullopt;
        return url;
    }
    return std::nullopt; // relative-path redirects are not used by registries
}

/// Percent-encode a query parameter value.
inline std::string url_encode(std::string_view in) {
    static constexpr char hex[] = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : in) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '_' || c == '.' || c == '~')
            out.push_back(char(c));
        else {
            out.push_back('%');
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 15]);
        }
    }
    return out;
}

} // namespace supermachine::oci::detail
