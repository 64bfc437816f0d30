#pragma once
// What the user network reads from the guest, as pure functions (no
// sockets, no slirp) so a fuzz target can drive them: QEMU's length-prefixed
// frame stream (`-netdev socket` on a stream socket: a 4-byte big-endian
// length, then the frame; net/socket.c; detail/qemu_network.hpp), and the
// one kind of frame the network answers itself, a DNS query to the NAT's
// resolver address (virtio/net_user.hpp, both engines). Every byte here
// comes from the guest (QEMU copies frames out of its virtqueue unchecked).
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

namespace supermachine::detail {

inline std::uint16_t load_be16(const std::byte* p) noexcept {
    return static_cast<std::uint16_t>((std::to_integer<unsigned>(p[0]) << 8) |
                                      std::to_integer<unsigned>(p[1]));
}

inline void store_be16(std::byte* p, std::uint16_t v) noexcept {
    p[0] = std::byte(v >> 8);
    p[1] = std::byte(v & 0xff);
}

/// Hands each whole frame in `in` to `on_frame(std::span<const std::byte>)`
/// (a view into `in`, valid for the call). Returns how many bytes were
/// consumed (a partial frame at the end waits for more), or nullopt when a
/// length exceeds `max_frame`: the stream's framing is lost and nothing after
/// that length can be trusted.
template <class OnFrame>
std::optional<std::size_t> split_length_prefixed(std::span<const std::byte> in,
                                                 std::size_t max_frame, OnFrame&& on_frame) {
    std::size_t at = 0;
    while (in.size() - at >= 4) {
        const auto* p = in.data() + at;
        const std::uint32_t length = (std::uint32_t{std::to_integer<unsigned>(p[0])} << 24) |
                                     (std::uint32_t{std::to_integer<unsigned>(p[1])} << 16) |
                                     (std::uint32_t{std::to_integer<unsigned>(p[2])} << 8) |
                                     std::to_integer<unsigned>(p[3]);
        if (length > max_frame) return std::nullopt;
        if (in.size() - at - 4 < length) break;
        on_frame(in.subspan(at + 4, length));
        at += 4 + length;
    }
    return at;
}

/// A frame's verdict as a DNS query to `resolver` (IPv4, network order).
struct dns_query_view {
    enum class kind {
        not_dns,   // anything else: the NAT's
        malformed, // UDP to the resolver whose IP or UDP length lies: dropped
        query,     // a query: the fields below are set
    } what = kind::not_dns;
    std::array<std::byte, 6> guest_mac{}, our_mac{};
    std::array<std::byte, 4> guest_ip{};
    std::uint16_t guest_port = 0;
    std::span<const std::byte> payload; // the DNS message, a view into the frame
};

/// An unfragmented IPv4 UDP datagram to resolver:53 in an Ethernet frame.
inline dns_query_view parse_dns_query(std::span<const std::byte> f,
                                      const std::array<std::byte, 4>& resolver) noexcept {
    dns_query_view v;
    if (f.size() < 14 + 20 + 8 || load_be16(&f[12]) != 0x0800) return v;
    const auto ip = f.subspan(14);
    const unsigned ihl = (std::to_integer<unsigned>(ip[0]) & 15) * 4;
    if ((std::to_integer<unsigned>(ip[0]) >> 4) != 4 || ihl < 20 || ip.size() < ihl + 8 ||
        std::to_integer<unsigned>(ip[9]) != 17)
        return v;
    if ((load_be16(&ip[6]) & 0x3fff) != 0) return v; // a fragment: the NAT's to reassemble
    for (std::size_t i = 0; i < 4; ++i)
        if (ip[16 + i] != resolver[i]) return v;
    const std::size_t total = load_be16(&ip[2]);
    if (total < ihl + 8 || total > ip.size()) {
        v.what = dns_query_view::kind::malformed;
        return v;
    }
    const auto udp = ip.subspan(ihl, total - ihl);
    if (load_be16(&udp[2]) != 53) return v;
    const std::size_t udp_length = load_be16(&udp[4]);
    if (udp_length < 8 || udp_length > udp.size()) {
        v.what = dns_query_view::kind::malformed;
        return v;
    }
    v.what = dns_query_view::kind::query;
    for (std::size_t i = 0; i < 6; ++i) {
        v.guest_mac[i] = f[6 + i];
        v.our_mac[i] = f[i];
    }
    for (std::size_t i = 0; i < 4; ++i)
        v.guest_ip[i] = ip[12 + i];
    v.guest_port = load_be16(&udp[0]);
    v.payload = udp.subspan(8, udp_length - 8);
    return v;
}

} // namespace supermachine::detail
