// The QEMU engine's network end (detail/qemu_network.hpp) without QEMU: the
// test plays QEMU on the other end of the socketpair, writing frames as
// `-netdev socket` does (4-byte big-endian length, then the frame). Hostile
// input: runts, a length no QEMU sends, DNS datagrams whose lengths lie.
#include <supermachine/detail/qemu_network.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <poll.h>

#include <array>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace sm = supermachine;
using bytes = std::vector<std::uint8_t>;
using namespace std::chrono_literals;

namespace {

const std::uint8_t guest_mac[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
const std::uint8_t slirp_mac[6] = {0x52, 0x55, 0x0a, 0x00, 0x02, 0x02};

void put16(bytes& b, std::size_t at, std::uint16_t v) {
    b[at] = static_cast<std::uint8_t>(v >> 8);
    b[at + 1] = static_cast<std::uint8_t>(v);
}
std::uint16_t get16(const bytes& b, std::size_t at) {
    return static_cast<std::uint16_t>(b[at] << 8 | b[at + 1]);
}

/// QEMU's side: frames written and read with the stream framing.
struct fake_qemu {
    boost::asio::io_context io;
    std::shared_ptr<sm::detail::qemu_network> net;
    int fd = -1;

    explicit fake_qemu(std::optional<boost::asio::ip::udp::endpoint> dns = {}) {
        sm::detail::qemu_network::config c;
        c.slirp.executor = io.get_executor();
        c.slirp.disable_dhcp = true;
        c.dns_upstream = dns;
        auto made = sm::detail::qemu_network::create(std::move(c));
        BOOST_TEST_REQUIRE(made.has_value());
        net = made.value();
        fd = ::dup(net->qemu_end());
        net->close_qemu_end();
        net->start();
    }
    ~fake_qemu() {
        net->stop();
        io.run_for(100ms);
        ::close(fd);
    }
    void send_raw(const bytes& b) {
        BOOST_TEST_REQUIRE(::write(fd, b.data(), b.size()) == static_cast<ssize_t>(b.size()));
    }
    void send(const bytes& frame) {
        bytes b(4);
        const auto n = static_cast<std::uint32_t>(frame.size());
        put16(b, 0, static_cast<std::uint16_t>(n >> 16));
        put16(b, 2, static_cast<std::uint16_t>(n));
        b.insert(b.end(), frame.begin(), frame.end());
        send_raw(b);
    }
    /// The next frame of `type` toward the guest (others skipped), running
    /// the io_context meanwhile; nullopt after `limit` or at EOF.
    std::optional<bytes> receive(std::uint16_t type, std::chrono::milliseconds limit = 3s,
                                 bool* eof = nullptr) {
        const auto deadline = std::chrono::steady_clock::now() + limit;
        while (std::chrono::steady_clock::now() < deadline) {
            io.run_for(10ms);
            while (true) {
                pollfd p{fd, POLLIN, 0};
                if (::poll(&p, 1, 0) != 1) break;
                std::uint8_t header[4];
                const auto got = ::recv(fd, header, 4, MSG_WAITALL);
                if (got <= 0) {
                    if (eof) *eof = true;
                    return std::nullopt;
                }
                const std::uint32_t n =
                    std::uint32_t{header[0]} << 24 | header[1] << 16 | header[2] << 8 | header[3];
                bytes frame(n);
                if (::recv(fd, frame.data(), n, MSG_WAITALL) != static_cast<ssize_t>(n))
                    return std::nullopt;
                if (frame.size() >= 14 && get16(frame, 12) == type) return frame;
            }
        }
        return std::nullopt;
    }
};

bytes ethernet(const std::uint8_t* dst, std::uint16_t type, const bytes& payload) {
    bytes f(14);
    std::memcpy(f.data(), dst, 6);
    std::memcpy(f.data() + 6, guest_mac, 6);
    put16(f, 12, type);
    f.insert(f.end(), payload.begin(), payload.end());
    return f;
}

bytes arp_request(const char* target) {
    bytes a(28);
    put16(a, 0, 1);
    put16(a, 2, 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, 1);
    std::memcpy(a.data() + 8, guest_mac, 6);
    inet_pton(AF_INET, "10.0.2.15", a.data() + 14);
    inet_pton(AF_INET, target, a.data() + 24);
    const std::uint8_t broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    return ethernet(broadcast, 0x0806, a);
}

/// A UDP datagram from 10.0.2.15:5353 to 10.0.2.3:53; `ip_total` and
/// `udp_length` may lie (0: the true value).
bytes dns_query(const std::string& payload, std::uint16_t ip_total = 0,
                std::uint16_t udp_length = 0) {
    bytes ip(20 + 8);
    ip[0] = 0x45;
    put16(ip, 2, ip_total ? ip_total : static_cast<std::uint16_t>(28 + payload.size()));
    ip[8] = 64;
    ip[9] = 17;
    inet_pton(AF_INET, "10.0.2.15", ip.data() + 12);
    inet_pton(AF_INET, "10.0.2.3", ip.data() + 16);
    put16(ip, 20, 5353);
    put16(ip, 22, 53);
    put16(ip, 24, udp_length ? udp_length : static_cast<std::uint16_t>(8 + payload.size()));
    ip.insert(ip.end(), payload.begin(), payload.end());
    return ethernet(slirp_mac, 0x0800, ip);
}

} // namespace

// Framing both ways: an ARP request for the gateway reaches slirp and its
// reply comes back framed, addressed to the guest.
BOOST_AUTO_TEST_CASE(frames_cross_both_ways) {
    fake_qemu q;
    q.send(arp_request("10.0.2.2"));
    auto reply = q.receive(0x0806);
    BOOST_TEST_REQUIRE(reply.has_value());
    BOOST_TEST(std::memcmp(reply->data(), guest_mac, 6) == 0);
    BOOST_TEST(get16(*reply, 20) == 2); // ARP reply
    BOOST_TEST(q.net->user_counters().to_slirp.load() >= 1u);
}

// A runt is dropped and counted; the stream goes on.
BOOST_AUTO_TEST_CASE(a_runt_is_dropped_and_the_stream_goes_on) {
    fake_qemu q;
    q.send(bytes(10, 0xab));
    q.send(bytes{});
    q.send(arp_request("10.0.2.2"));
    BOOST_TEST(q.receive(0x0806).has_value());
    BOOST_TEST(q.net->counters().runts.load() == 2u);
}

// A length beyond QEMU's buffer means the framing is lost: the stream is
// closed (QEMU's side sees EOF) and nothing else happens.
BOOST_AUTO_TEST_CASE(a_length_no_qemu_sends_closes_the_stream) {
    fake_qemu q;
    q.send_raw({0xff, 0xff, 0xff, 0xff, 1, 2, 3});
    bool eof = false;
    BOOST_TEST(!q.receive(0x0806, 3s, &eof).has_value());
    BOOST_TEST(eof);
}

// DNS to 10.0.2.3:53 goes to the configured upstream; the answer comes back
// from 10.0.2.3:53 with a valid IPv4 header checksum. Datagrams whose
// lengths lie are dropped.
BOOST_AUTO_TEST_CASE(dns_goes_to_the_upstream_and_lying_lengths_are_dropped) {
    boost::asio::io_context upstream_io;
    boost::asio::ip::udp::socket upstream(
        upstream_io,
        boost::asio::ip::udp::endpoint(boost::asio::ip::make_address_v4("127.0.0.1"), 0));
    fake_qemu q(upstream.local_endpoint());
    q.send(dns_query("bad-ip-length", 2000));
    q.send(dns_query("bad-udp-length", 0, 4000));
    q.send(dns_query("question"));
    q.io.run_for(200ms);
    std::array<char, 512> buffer{};
    boost::asio::ip::udp::endpoint from;
    upstream.non_blocking(true);
    boost::system::error_code ec;
    std::size_t n = 0;
    for (int i = 0; i < 200; ++i) {
        n = upstream.receive_from(boost::asio::buffer(buffer), from, 0, ec);
        if (!ec) break;
        q.io.run_for(10ms);
    }
    BOOST_TEST_REQUIRE(!ec);
    BOOST_TEST(std::string(buffer.data(), n) == "question"); // the liars never left
    upstream.send_to(boost::asio::buffer(std::string("answer")), from);
    auto frame = q.receive(0x0800);
    BOOST_TEST_REQUIRE(frame.has_value());
    BOOST_TEST_REQUIRE(frame->size() == 14u + 28u + 6u);
    std::uint32_t sum = 0;
    for (int i = 0; i < 20; i += 2)
        sum += get16(*frame, 14 + static_cast<std::size_t>(i));
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    BOOST_TEST(sum == 0xffffu); // the header checksum holds
    char source[16];
    inet_ntop(AF_INET, frame->data() + 26, source, sizeof source);
    BOOST_TEST(std::string(source) == "10.0.2.3");
    BOOST_TEST(get16(*frame, 34) == 53);
    BOOST_TEST(get16(*frame, 36) == 5353);
    BOOST_TEST(std::string(frame->begin() + 42, frame->end()) == "answer");
    BOOST_TEST(q.net->user_counters().dns_answered.load() == 1u);
}

// The pure readers behind it (detail/qemu_network_frames.hpp), which the
// fuzz target drives: a stream cut anywhere gives the same frames, and the
// DNS parser tells a query from a liar and from everything else.
BOOST_AUTO_TEST_CASE(frame_stream_in_any_pieces_and_dns_verdicts) {
    const auto query = dns_query("q");
    bytes stream;
    for (const auto* frame : {&query, &query}) {
        bytes length(4);
        put16(length, 2, static_cast<std::uint16_t>(frame->size()));
        stream.insert(stream.end(), length.begin(), length.end());
        stream.insert(stream.end(), frame->begin(), frame->end());
    }
    const auto all = std::as_bytes(std::span(stream));
    for (std::size_t cut = 0; cut <= stream.size(); ++cut) {
        std::vector<std::size_t> sizes;
        auto on_frame = [&](std::span<const std::byte> f) { sizes.push_back(f.size()); };
        const auto first = sm::detail::split_length_prefixed(all.first(cut), 65536, on_frame);
        BOOST_TEST_REQUIRE(first.has_value());
        const auto rest = sm::detail::split_length_prefixed(all.subspan(*first), 65536, on_frame);
        BOOST_TEST_REQUIRE(rest.has_value());
        BOOST_TEST(*first + *rest == stream.size());
        BOOST_TEST(sizes == (std::vector<std::size_t>{query.size(), query.size()}));
    }
    bytes huge = {0x00, 0x01, 0x00, 0x01}; // 65537 > max
    BOOST_TEST(!sm::detail::split_length_prefixed(std::as_bytes(std::span(huge)), 65536,
                                                  [](auto) { BOOST_FAIL("no frame"); }));

    const std::array<std::byte, 4> resolver{std::byte{10}, std::byte{0}, std::byte{2},
                                            std::byte{3}};
    using kind = sm::detail::dns_query_view::kind;
    auto verdict = [&](const bytes& f) {
        return sm::detail::parse_dns_query(std::as_bytes(std::span(f)), resolver);
    };
    const auto ok = verdict(query);
    BOOST_TEST((ok.what == kind::query));
    BOOST_TEST(ok.guest_port == 5353);
    BOOST_TEST(std::string(reinterpret_cast<const char*>(ok.payload.data()), ok.payload.size()) ==
               "q");
    BOOST_TEST((verdict(dns_query("q", 2000)).what == kind::malformed));
    BOOST_TEST((verdict(dns_query("q", 0, 4000)).what == kind::malformed));
    auto fragment = query;
    put16(fragment, 14 + 6, 0x2000); // more fragments
    BOOST_TEST((verdict(fragment).what == kind::not_dns));
    auto elsewhere = query;
    elsewhere[14 + 19] = 4; // to 10.0.2.4
    BOOST_TEST((verdict(elsewhere).what == kind::not_dns));
    BOOST_TEST((verdict(bytes(query.begin(), query.begin() + 40)).what == kind::not_dns));
}
