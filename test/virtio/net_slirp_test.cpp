// virtio-net over the libslirp backend, driven by the fake driver: real
// frames a guest would send (ARP, DHCP DISCOVER, UDP) go through the device
// core to slirp on the driver's executor, and slirp's answers come back into
// the guest's receive buffers. The UDP case crosses the NAT to a real socket
// on the host's 127.0.0.1 (10.0.2.2 is the host's loopback). The net_user
// suite: the same device on the user network both engines use (the guest
// announced to slirp, DNS answered by a chosen upstream).
#include "net_driver.hpp"

#include <supermachine/virtio/net_slirp.hpp>
#include <supermachine/virtio/net_user.hpp>

#include <boost/asio/ip/udp.hpp>
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <sys/resource.h>

#include <array>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>

namespace sm = supermachine;
namespace vio = supermachine::virtio;
using driver = sm::test::basic_net_driver<vio::net_slirp>;
using bytes = std::vector<std::uint8_t>;

namespace {

const std::uint8_t guest_mac[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
const std::uint8_t broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

void put16(bytes& b, std::size_t at, std::uint16_t v) {
    b[at] = static_cast<std::uint8_t>(v >> 8);
    b[at + 1] = static_cast<std::uint8_t>(v);
}
std::uint16_t get16(const bytes& b, std::size_t at) {
    return static_cast<std::uint16_t>(b[at] << 8 | b[at + 1]);
}
std::uint32_t ip(const char* text) {
    in_addr a{};
    inet_pton(AF_INET, text, &a);
    return ntohl(a.s_addr);
}
void put32(bytes& b, std::size_t at, std::uint32_t v) {
    put16(b, at, static_cast<std::uint16_t>(v >> 16));
    put16(b, at + 2, static_cast<std::uint16_t>(v));
}
std::uint32_t get32(const bytes& b, std::size_t at) {
    return std::uint32_t{get16(b, at)} << 16 | get16(b, at + 2);
}

bytes ethernet(const std::uint8_t* dst, std::uint16_t type, const bytes& payload) {
    bytes f(14);
    std::memcpy(f.data(), dst, 6);
    std::memcpy(f.data() + 6, guest_mac, 6);
    put16(f, 12, type);
    f.insert(f.end(), payload.begin(), payload.end());
    return f;
}

bytes arp_request(std::uint32_t sender, std::uint32_t target) {
    bytes a(28);
    put16(a, 0, 1);      // Ethernet
    put16(a, 2, 0x0800); // IPv4
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, 1); // request
    std::memcpy(a.data() + 8, guest_mac, 6);
    put32(a, 14, sender);
    put32(a, 24, target);
    return ethernet(broadcast, 0x0806, a);
}

/// IPv4 + UDP (UDP checksum 0: none, legal over IPv4).
bytes udp_frame(const std::uint8_t* dst_mac, std::uint32_t src, std::uint16_t sport,
                std::uint32_t dst, std::uint16_t dport, const bytes& payload) {
    bytes p(28);
    p[0] = 0x45;
    put16(p, 2, static_cast<std::uint16_t>(28 + payload.size()));
    p[8] = 64; // TTL
    p[9] = 17; // UDP
    put32(p, 12, src);
    put32(p, 16, dst);
    std::uint32_t sum = 0;
    for (std::size_t i = 0; i < 20; i += 2)
        sum += get16(p, i);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    put16(p, 10, static_cast<std::uint16_t>(~sum));
    put16(p, 20, sport);
    put16(p, 22, dport);
    put16(p, 24, static_cast<std::uint16_t>(8 + payload.size()));
    p.insert(p.end(), payload.begin(), payload.end());
    return ethernet(dst_mac, 0x0800, p);
}

bytes dhcp_discover(std::uint32_t xid) {
    bytes b(236 + 312); // struct bootp_t: the fixed part, then 312 bytes of options
    b[0] = 1;           // BOOTREQUEST
    b[1] = 1;
    b[2] = 6;
    put32(b, 4, xid);
    put16(b, 10, 0x8000); // broadcast reply
    std::memcpy(b.data() + 28, guest_mac, 6);
    put32(b, 236, 0x63825363); // magic cookie
    b[240] = 53;               // DHCP message type: DISCOVER
    b[241] = 1;
    b[242] = 1;
    b[243] = 255;
    return udp_frame(broadcast, 0, 68, 0xffffffff, 67, b);
}

template <class Driver = driver>
struct basic_guest {
    Driver d;
    std::uint16_t seen = 0;
    std::vector<bytes> received;

    explicit basic_guest(typename Driver::device_type::config c = config())
        : d(std::move(c)) {
        for (int i = 0; i < 32; ++i)
            d.post_rx();
    }
    static typename Driver::device_type::config config() {
        typename Driver::device_type::config c;
        c.mac = {guest_mac[0], guest_mac[1], guest_mac[2],
                 guest_mac[3], guest_mac[4], guest_mac[5]};
        return c;
    }
    void send(const bytes& frame) { d.send(std::as_bytes(std::span(frame))); }
    /// Run until a received frame satisfies `match`; returns it.
    std::optional<bytes> wait_for(const std::function<bool(const bytes&)>& match) {
        std::optional<bytes> found;
        d.run_until(
            [&] {
                while (seen != d.used_index(Driver::rx)) {
                    const auto u = d.used(Driver::rx, seen++);
                    BOOST_REQUIRE(u.length >= 12);
                    auto host =
                        d.host(d.rx_address(static_cast<std::uint16_t>(u.id)) + 12, u.length - 12);
                    bytes f(reinterpret_cast<const std::uint8_t*>(host.data()),
                            reinterpret_cast<const std::uint8_t*>(host.data()) + host.size());
                    d.post_rx();
                    if (!found && match(f)) found = f;
                    received.push_back(std::move(f));
                }
                return found.has_value();
            },
            std::chrono::seconds(10));
        return found;
    }
};

using guest = basic_guest<>;

bool is_udp(const bytes& f, std::uint16_t sport, std::uint16_t dport) {
    return f.size() >= 42 && get16(f, 12) == 0x0800 && f[23] == 17 && get16(f, 34) == sport &&
           get16(f, 36) == dport;
}

} // namespace

BOOST_AUTO_TEST_SUITE(net_slirp)

BOOST_AUTO_TEST_CASE(answers_arp_and_dhcp) {
    guest g;
    g.send(arp_request(ip("10.0.2.15"), ip("10.0.2.2")));
    auto reply = g.wait_for([](const bytes& f) {
        return f.size() >= 42 && get16(f, 12) == 0x0806 && get16(f, 20) == 2;
    });
    BOOST_REQUIRE(reply);
    BOOST_TEST(std::memcmp(reply->data(), guest_mac, 6) == 0); // to us
    BOOST_TEST(get32(*reply, 28) == ip("10.0.2.2"));           // 10.0.2.2 is at ...
    BOOST_TEST(get32(*reply, 38) == ip("10.0.2.15"));

    g.send(dhcp_discover(0x5eed1234));
    auto offer = g.wait_for([](const bytes& f) { return is_udp(f, 67, 68); });
    BOOST_REQUIRE(offer);
    const std::size_t bootp = 42;
    BOOST_REQUIRE(offer->size() >= bootp + 243);
    BOOST_TEST((*offer)[bootp] == 2);                         // BOOTREPLY
    BOOST_TEST(get32(*offer, bootp + 4) == 0x5eed1234u);      // our xid
    BOOST_TEST(get32(*offer, bootp + 16) == ip("10.0.2.15")); // yiaddr
    BOOST_TEST(get32(*offer, bootp + 236) == 0x63825363u);
    BOOST_TEST((*offer)[bootp + 240] == 53); // first option: message type OFFER
    BOOST_TEST((*offer)[bootp + 242] == 2);
    BOOST_TEST(g.d.device->counters().tx_dropped() == 0u);
}

BOOST_AUTO_TEST_CASE(udp_crosses_the_nat_to_the_hosts_loopback) {
    guest g;
    using boost::asio::ip::udp;
    udp::socket server(g.d.io, udp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    const std::uint16_t port = server.local_endpoint().port();
    std::array<char, 2048> buffer{};
    udp::endpoint peer;
    std::string heard;
    server.async_receive_from(boost::asio::buffer(buffer), peer,
                              [&](boost::system::error_code ec, std::size_t n) {
                                  if (ec) return;
                                  heard.assign(buffer.data(), n);
                                  std::string reply = "pong: " + heard;
                                  server.send_to(boost::asio::buffer(reply), peer);
                              });

    g.send(arp_request(ip("10.0.2.15"), ip("10.0.2.2"))); // slirp learns our MAC
    BOOST_REQUIRE(g.wait_for([](const bytes& f) { return get16(f, 12) == 0x0806; }));
    const std::string text = "ping through slirp";
    const std::uint8_t gateway_mac[6] = {0x52, 0x55, 0x0a, 0x00, 0x02, 0x02};
    g.send(udp_frame(gateway_mac, ip("10.0.2.15"), 40000, ip("10.0.2.2"), port,
                     bytes(text.begin(), text.end())));
    auto answer = g.wait_for([&](const bytes& f) { return is_udp(f, port, 40000); });
    BOOST_TEST(heard == text);
    BOOST_REQUIRE(answer);
    BOOST_TEST(get32(*answer, 26) == ip("10.0.2.2"));
    BOOST_TEST(get32(*answer, 30) == ip("10.0.2.15"));
    const std::string payload(answer->begin() + 42, answer->begin() + 42 + get16(*answer, 38) - 8);
    BOOST_TEST(payload == "pong: " + text);
}

BOOST_AUTO_TEST_CASE(idles_without_spinning) {
    // Slirp's fds and timers wait on the executor: an idle stack (a NAT socket
    // open) costs next to no CPU.
    guest g;
    g.send(arp_request(ip("10.0.2.15"), ip("10.0.2.2")));
    BOOST_REQUIRE(g.wait_for([](const bytes& f) { return get16(f, 12) == 0x0806; }));
    const std::uint8_t gateway_mac[6] = {0x52, 0x55, 0x0a, 0x00, 0x02, 0x02};
    g.send(udp_frame(gateway_mac, ip("10.0.2.15"), 40001, ip("10.0.2.2"), 9, bytes(16, 0x55)));
    g.d.settle(std::chrono::milliseconds(100)); // slirp now has a UDP socket to watch
    auto cpu = [] {
        rusage u{};
        getrusage(RUSAGE_SELF, &u);
        return std::chrono::seconds(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
               std::chrono::microseconds(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
    };
    const auto before = cpu();
    g.d.settle(std::chrono::milliseconds(1500));
    BOOST_TEST((cpu() - before) < std::chrono::milliseconds(150));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(net_user)

using user_driver = sm::test::basic_net_driver<vio::net_user>;
using user_guest = basic_guest<user_driver>;
const std::uint8_t gateway_mac[6] = {0x52, 0x55, 0x0a, 0x00, 0x02, 0x02};

BOOST_AUTO_TEST_CASE(the_guest_is_announced_so_slirp_never_asks) {
    // No ARP from the guest: slirp already knows 10.0.2.15's MAC from the
    // announcement, so the answer comes without an ARP request first.
    user_guest g;
    using boost::asio::ip::udp;
    udp::socket server(g.d.io, udp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    const std::uint16_t port = server.local_endpoint().port();
    std::array<char, 256> buffer{};
    udp::endpoint peer;
    server.async_receive_from(boost::asio::buffer(buffer), peer,
                              [&](boost::system::error_code ec, std::size_t n) {
                                  if (!ec)
                                      server.send_to(boost::asio::buffer(buffer.data(), n), peer);
                              });
    g.send(udp_frame(gateway_mac, ip("10.0.2.15"), 40002, ip("10.0.2.2"), port, bytes(8, 0x42)));
    auto answer = g.wait_for([&](const bytes& f) { return is_udp(f, port, 40002); });
    BOOST_REQUIRE(answer);
    BOOST_TEST(std::memcmp(answer->data(), guest_mac, 6) == 0);
    for (const auto& f : g.received)
        BOOST_TEST(get16(f, 12) != 0x0806); // slirp asked nothing
    BOOST_TEST(g.d.device->backend().counters().to_slirp.load() >= 1u);
}

BOOST_AUTO_TEST_CASE(dns_goes_to_the_upstream_and_a_lying_length_is_dropped) {
    // The upstream: a UDP socket on 127.0.0.1 answering one query on its own thread.
    const int resolver = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in at{};
    at.sin_family = AF_INET;
    at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    BOOST_REQUIRE(::bind(resolver, reinterpret_cast<sockaddr*>(&at), sizeof at) == 0);
    socklen_t length = sizeof at;
    ::getsockname(resolver, reinterpret_cast<sockaddr*>(&at), &length);
    timeval limit{10, 0};
    ::setsockopt(resolver, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    std::string asked;
    std::thread upstream([&] {
        char buffer[512];
        sockaddr_in peer{};
        socklen_t peer_length = sizeof peer;
        const auto n = ::recvfrom(resolver, buffer, sizeof buffer, 0,
                                  reinterpret_cast<sockaddr*>(&peer), &peer_length);
        if (n <= 0) return;
        asked.assign(buffer, static_cast<std::size_t>(n));
        const std::string reply = "answer-to-" + asked;
        ::sendto(resolver, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&peer),
                 peer_length);
    });
    auto c = user_guest::config();
    c.backend.dns_upstream = boost::asio::ip::udp::endpoint(
        boost::asio::ip::make_address("127.0.0.1"), ntohs(at.sin_port));
    c.backend.slirp.disable_dhcp = true;
    std::optional<bytes> answer;
    {
        user_guest g(c);
        // The lie first: a UDP length beyond the datagram. Dropped, not forwarded.
        auto lie = udp_frame(gateway_mac, ip("10.0.2.15"), 5353, ip("10.0.2.3"), 53, bytes(12, 1));
        put16(lie, 38, 400);
        g.send(lie);
        const std::string query = "query-bytes";
        g.send(udp_frame(gateway_mac, ip("10.0.2.15"), 5354, ip("10.0.2.3"), 53,
                         bytes(query.begin(), query.end())));
        answer = g.wait_for([](const bytes& f) { return is_udp(f, 53, 5354); });
        upstream.join();
        BOOST_TEST(asked == query); // only the honest one reached the upstream
        BOOST_TEST(g.d.device->backend().counters().dns_answered.load() == 1u);
    }
    ::close(resolver);
    BOOST_REQUIRE(answer);
    BOOST_TEST(get32(*answer, 26) == ip("10.0.2.3"));
    const std::string payload(answer->begin() + 42, answer->begin() + 42 + get16(*answer, 38) - 8);
    BOOST_TEST(payload == "answer-to-query-bytes");
}

BOOST_AUTO_TEST_CASE(a_bad_configuration_is_refused) {
    vio::net_user::config c;
    boost::asio::io_context io;
    c.slirp.executor = io.get_executor();
    c.guest_mac = "52:54:00:12:34";
    BOOST_TEST(!vio::net_user::create(c).has_value());
    c.guest_mac = "52:54:00:12:34:5g6";
    BOOST_TEST(!vio::net_user::create(c).has_value());
    c.guest_mac = "52:54:00:12:34:56";
    c.slirp.dns = "not-an-address";
    BOOST_TEST(!vio::net_user::create(c).has_value());
}

BOOST_AUTO_TEST_SUITE_END()
