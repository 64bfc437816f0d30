#pragma once
// A vm's guest network as docker describes a container's (doc/vm.md,
// "Network"): `--network none|default`, `-p [IP:]HOST:GUEST[/tcp|/udp]`,
// `--add-host NAME:IP|host-gateway`. The default network is a user-mode NAT
// (libslirp, ours) on QEMU's virtio-net: the guest is 10.0.2.15/24, the
// gateway 10.0.2.2 (the host: its loopback only with a host-gateway entry),
// DNS 10.0.2.3.
#include <arpa/inet.h>

#include <charconv>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine {

enum class network_mode {
    none, // no network device at all: the guest has lo only
    user, // docker's "default": user-mode NAT, no root, no host configuration
};

inline constexpr const char* guest_network_address = "10.0.2.15";
inline constexpr const char* guest_network_gateway = "10.0.2.2"; // the host
inline constexpr const char* guest_network_dns = "10.0.2.3";

/// One `-p`: the host listens on host_address:host_port (0.0.0.0: every
/// interface, docker's default) and forwards to the guest's guest_port.
struct published_port {
    std::string host_address = "0.0.0.0";
    std::uint16_t host_port = 0, guest_port = 0;
    bool udp = false;
};

/// One `--add-host NAME:ADDRESS`; address "host-gateway" is the gateway
/// (10.0.2.2), through which the guest then reaches the host's loopback.
struct extra_host {
    std::string name, address;
};

namespace detail {
inline std::optional<std::uint16_t> parse_port_number(std::string_view s) {
    unsigned v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (s.empty() || ec != std::errc() || end != s.data() + s.size() || v > 65535)
        return std::nullopt;
    return static_cast<std::uint16_t>(v);
}
inline bool valid_ipv4(std::string_view s) {
    in_addr a{};
    return s.size() < 16 && ::inet_pton(AF_INET, std::string(s).c_str(), &a) == 1;
}
} // namespace detail

/// docker's -p forms: GUEST, HOST:GUEST, IP:HOST:GUEST, IP::GUEST (HOST
/// empty: the same as GUEST here), each with /tcp or /udp. IPv4 only.
inline std::optional<published_port> parse_published_port(std::string_view text) {
    published_port p;
    if (text.ends_with("/udp")) {
        p.udp = true;
        text.remove_suffix(4);
    } else if (text.ends_with("/tcp")) {
        text.remove_suffix(4);
    }
    const auto last = text.rfind(':');
    auto guest =
        detail::parse_port_number(text.substr(last == std::string_view::npos ? 0 : last + 1));
    if (!guest || *guest == 0) return std::nullopt;
    p.guest_port = *guest;
    p.host_port = *guest;
    if (last == std::string_view::npos) return p;
    text = text.substr(0, last);
    const auto colon = text.rfind(':');
    const auto host = text.substr(colon == std::string_view::npos ? 0 : colon + 1);
    if (!host.empty()) {
        auto port = detail::parse_port_number(host);
        if (!port) return std::nullopt;
        p.host_port = *port;
    } else if (colon == std::string_view::npos) {
        return std::nullopt; // ":GUEST"
    }
    if (colon != std::string_view::npos) {
        const auto address = text.substr(0, colon);
        if (!detail::valid_ipv4(address)) return std::nullopt;
        p.host_address = std::string(address);
    }
    return p;
}

/// docker's --add-host NAME:IP (IPv4) or NAME:host-gateway; NAME a host
/// name (letters, digits, '-', '.').
inline std::optional<extra_host> parse_extra_host(std::string_view text) {
    const auto colon = text.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon > 253) return std::nullopt;
    extra_host h{std::string(text.substr(0, colon)), std::string(text.substr(colon + 1))};
    for (char c : h.name)
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.'))
            return std::nullopt;
    if (h.address != "host-gateway" && !detail::valid_ipv4(h.address)) return std::nullopt;
    return h;
}

/// Whether any entry names the host gateway (the guest may then reach the
/// host's loopback through 10.0.2.2).
inline bool reaches_host_loopback(std::span<const extra_host> hosts) {
    for (const auto& h : hosts)
        if (h.address == "host-gateway") return true;
    return false;
}

/// The /etc/hosts lines for `hosts` ("IP\tNAME\n"), host-gateway resolved.
inline std::string extra_hosts_lines(std::span<const extra_host> hosts) {
    std::string out;
    for (const auto& h : hosts)
        out += (h.address == "host-gateway" ? std::string(guest_network_gateway) : h.address) +
               "\t" + h.name + "\n";
    return out;
}

} // namespace supermachine
