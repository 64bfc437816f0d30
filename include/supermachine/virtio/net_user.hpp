#pragma once
// docker's default network for a guest, as a net_backend (virtio/net.hpp):
// the libslirp NAT (net_slirp.hpp) plus the two things an image vm expects
// of it beyond NAT, shared by both engines (doc/virtio.md, "The user
// network"):
//
// - The guest is announced to slirp when the backend is attached (a
//   gratuitous ARP for dhcp_start at config::guest_mac). Slirp learns a MAC
//   only from the guest's own ARP (its DHCP is off: the agent configures
//   eth0), so until the guest sends something a published port's first SYN
//   waits for an ARP answer and a TCP retransmission (≈ 3 s measured), and
//   so would every restored clone's, whose slirp is fresh.
// - DNS: slirp forwards what the guest sends to 10.0.2.3:53 to the host's
//   resolv.conf nameserver. With dns_upstream set, those queries are
//   answered here instead, through a UDP socket to that resolver (tests use
//   a resolver on the host's loopback, which the guest cannot otherwise
//   reach). The frames are the guest's: parse_dns_query checks every length.
//
// Everything runs on slirp's strand. send() (the virtio-net device, any
// thread) copies the frame and posts it there, at most
// slirp.max_pending_frames in flight; a frame source already on the strand
// (detail/qemu_network.hpp) calls input_on_strand() and schedule() itself.
#include <supermachine/detail/qemu_network_frames.hpp>
#include <supermachine/error.hpp>
#include <supermachine/virtio/net.hpp>
#include <supermachine/virtio/net_slirp.hpp>

#include <boost/asio/ip/udp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <arpa/inet.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace supermachine::virtio {

struct net_user_counters {
    std::atomic<std::uint64_t> to_slirp{0}, dns_answered{0}, refused{0};
};

namespace detail {

class user_network_state : public std::enable_shared_from_this<user_network_state> {
public:
    static constexpr std::size_t max_dns_queries = 64;
    using strand_type = slirp_stack::strand_type;

    user_network_state(std::unique_ptr<net_slirp> slirp,
                       std::optional<boost::asio::ip::udp::endpoint> dns_upstream,
                       std::array<std::byte, 6> guest_mac, std::array<std::byte, 4> guest_ip,
                       std::array<std::byte, 4> resolver, std::size_t max_pending)
        : slirp_(std::move(slirp))
        , strand_(slirp_->stack().strand())
        , dns_upstream_(std::move(dns_upstream))
        , guest_mac_(guest_mac)
        , guest_ip_(guest_ip)
        , resolver_(resolver)
        , max_pending_(max_pending) {}

    const strand_type& strand() const noexcept { return strand_; }
    const net_user_counters& counters() const noexcept { return counters_; }

    /// Frames for the guest go to `sink` (on the strand); the guest is then
    /// announced to slirp.
    void attach(net_frame_sink sink) {
        sink_ = sink; // read on the strand only, after this post
        slirp_->attach(std::move(sink));
        boost::asio::post(strand_, [self = shared_from_this()] { self->announce_guest(); });
    }

    bool send(std::span<const std::byte> frame) {
        if (pending_.fetch_add(1, std::memory_order_acq_rel) >= max_pending_) {
            pending_.fetch_sub(1, std::memory_order_acq_rel);
            ++counters_.refused;
            return false;
        }
        boost::asio::post(strand_, [self = shared_from_this(),
                                    copy = std::vector<std::byte>(frame.begin(), frame.end())] {
            self->pending_.fetch_sub(1, std::memory_order_acq_rel);
            self->input_on_strand(copy);
            self->schedule();
        });
        return true;
    }

    /// On the strand: a DNS query for dns_upstream is answered here, any
    /// other frame goes to slirp (which copies it now).
    void input_on_strand(std::span<const std::byte> frame) {
        if (stopped_) return;
        if (dns_upstream_ && dns_query(frame)) return;
        slirp_->stack().input_on_strand(frame);
        ++counters_.to_slirp;
    }

    void schedule() {
        if (slirp_) slirp_->stack().schedule();
    }

    /// No frame moves after this runs on the strand; slirp closes there.
    void stop() {
        boost::asio::post(strand_, [self = shared_from_this()] {
            self->stopped_ = true;
            boost::system::error_code ignored;
            for (auto& q : self->dns_)
                if (q) q->socket.close(ignored);
            self->sink_ = nullptr;
            self->slirp_.reset();
        });
    }

private:
    void announce_guest() {
        if (stopped_) return;
        std::array<std::byte, 60> f{}; // the minimum Ethernet frame, zero padded
        for (int i = 0; i < 6; ++i) {
            f[i] = std::byte{0xff};
            f[6 + i] = guest_mac_[i];
            f[22 + i] = guest_mac_[i]; // sender hardware address
        }
        supermachine::detail::store_be16(&f[12], 0x0806);
        supermachine::detail::store_be16(&f[14], 1);      // Ethernet
        supermachine::detail::store_be16(&f[16], 0x0800); // IPv4
        f[18] = std::byte{6};
        f[19] = std::byte{4};
        supermachine::detail::store_be16(&f[20], 1); // request
        std::memcpy(&f[28], guest_ip_.data(), 4);    // sender = target: gratuitous
        std::memcpy(&f[38], guest_ip_.data(), 4);
        slirp_->stack().input_on_strand(f);
        slirp_->stack().schedule();
    }

    struct dns_query_state {
        explicit dns_query_state(const strand_type& s)
            : socket(s)
            , timer(s) {}
        boost::asio::ip::udp::socket socket;
        boost::asio::steady_timer timer;
        std::array<std::byte, 6> guest_mac{}, our_mac{};
        std::array<std::byte, 4> guest_ip{};
        std::uint16_t guest_port = 0;
        std::array<std::byte, 4096> answer{};
    };

    /// A UDP datagram to the resolver's port 53 (unfragmented IPv4): true
    /// when taken (answered later, or dropped).
    bool dns_query(std::span<const std::byte> f) {
        using supermachine::detail::dns_query_view;
        const auto query = supermachine::detail::parse_dns_query(f, resolver_);
        if (query.what == dns_query_view::kind::not_dns) return false;
        if (query.what == dns_query_view::kind::malformed) return true; // dropped
        std::size_t slot = 0;
        while (slot < dns_.size() && dns_[slot])
            ++slot;
        if (slot == max_dns_queries) return true; // too many in flight: the guest retries
        if (slot == dns_.size()) dns_.emplace_back();
        auto q = std::make_shared<dns_query_state>(strand_);
        q->guest_mac = query.guest_mac;
        q->our_mac = query.our_mac;
        q->guest_ip = query.guest_ip;
        q->guest_port = query.guest_port;
        boost::system::error_code ec;
        q->socket.open(dns_upstream_->protocol(), ec);
        if (!ec) q->socket.connect(*dns_upstream_, ec);
        if (!ec)
            q->socket.send(boost::asio::buffer(query.payload.data(), query.payload.size()), 0, ec);
        if (ec) return true;
        dns_[slot] = q;
        q->timer.expires_after(std::chrono::seconds(5));
        q->timer.async_wait([q](boost::system::error_code e) {
            if (e) return;
            boost::system::error_code ignored;
            q->socket.close(ignored);
        });
        q->socket.async_receive(
            boost::asio::buffer(q->answer),
            [self = shared_from_this(), q, slot](boost::system::error_code e, std::size_t n) {
                q->timer.cancel();
                if (slot < self->dns_.size() && self->dns_[slot] == q) self->dns_[slot].reset();
                if (e || self->stopped_) return;
                self->dns_answer(*q, std::span(q->answer.data(), n));
            });
        return true;
    }

    void dns_answer(const dns_query_state& q, std::span<const std::byte> payload) {
        using supermachine::detail::load_be16;
        using supermachine::detail::store_be16;
        std::vector<std::byte> f(14 + 20 + 8 + payload.size());
        std::memcpy(&f[0], q.guest_mac.data(), 6);
        std::memcpy(&f[6], q.our_mac.data(), 6);
        store_be16(&f[12], 0x0800);
        std::byte* ip = &f[14];
        ip[0] = std::byte{0x45};
        store_be16(ip + 2, static_cast<std::uint16_t>(20 + 8 + payload.size()));
        ip[8] = std::byte{64};
        ip[9] = std::byte{17};
        std::memcpy(ip + 12, resolver_.data(), 4);
        std::memcpy(ip + 16, q.guest_ip.data(), 4);
        std::uint32_t sum = 0;
        for (int i = 0; i < 20; i += 2)
            sum += load_be16(ip + i);
        while (sum >> 16)
            sum = (sum & 0xffff) + (sum >> 16);
        store_be16(ip + 10, static_cast<std::uint16_t>(~sum));
        std::byte* udp = ip + 20;
        store_be16(udp, 53);
        store_be16(udp + 2, q.guest_port);
        store_be16(udp + 4, static_cast<std::uint16_t>(8 + payload.size()));
        // UDP checksum 0: none (allowed over IPv4).
        if (!payload.empty()) std::memcpy(udp + 8, payload.data(), payload.size());
        ++counters_.dns_answered;
        if (sink_) sink_(f);
    }

    std::unique_ptr<net_slirp> slirp_;
    strand_type strand_;
    std::optional<boost::asio::ip::udp::endpoint> dns_upstream_;
    std::array<std::byte, 6> guest_mac_;
    std::array<std::byte, 4> guest_ip_, resolver_; // network order
    std::size_t max_pending_;
    std::atomic<std::size_t> pending_{0};
    bool stopped_ = false;
    net_frame_sink sink_;
    std::vector<std::shared_ptr<dns_query_state>> dns_;
    net_user_counters counters_;
};

} // namespace detail

class net_user {
public:
    struct config {
        net_slirp::config slirp; // executor required
        std::optional<boost::asio::ip::udp::endpoint> dns_upstream;
        std::string guest_mac = "52:54:00:12:34:56"; // the guest NIC's (gratuitous ARP)
    };

    static result<std::unique_ptr<net_user>> create(const config& c) {
        unsigned mac[6] = {};
        char tail = 0;
        if (std::sscanf(c.guest_mac.c_str(), "%x:%x:%x:%x:%x:%x%c", &mac[0], &mac[1], &mac[2],
                        &mac[3], &mac[4], &mac[5], &tail) != 6)
            return errc::invalid_argument;
        std::array<std::byte, 6> guest_mac{};
        for (int i = 0; i < 6; ++i) {
            if (mac[i] > 0xff) return errc::invalid_argument;
            guest_mac[i] = std::byte(mac[i]);
        }
        std::array<std::byte, 4> guest_ip{}, resolver{};
        if (::inet_pton(AF_INET, c.slirp.dhcp_start.c_str(), guest_ip.data()) != 1 ||
            ::inet_pton(AF_INET, c.slirp.dns.c_str(), resolver.data()) != 1)
            return errc::invalid_argument;
        SUPERMACHINE_TRY(slirp, net_slirp::create(c.slirp));
        std::unique_ptr<net_user> n(new net_user());
        n->state_ = std::make_shared<detail::user_network_state>(std::move(slirp), c.dns_upstream,
                                                                 guest_mac, guest_ip, resolver,
                                                                 c.slirp.max_pending_frames);
        return n;
    }
    ~net_user() { state_->stop(); }
    net_user(const net_user&) = delete;
    net_user& operator=(const net_user&) = delete;

    void attach(net_frame_sink sink) { state_->attach(std::move(sink)); }
    bool send(std::span<const std::byte> frame) { return state_->send(frame); }

    /// For a frame source on slirp's strand itself (detail/qemu_network.hpp):
    /// input_on_strand() per frame, schedule() once per batch.
    const detail::user_network_state::strand_type& strand() const noexcept {
        return state_->strand();
    }
    void input_on_strand(std::span<const std::byte> frame) { state_->input_on_strand(frame); }
    void schedule() { state_->schedule(); }
    const net_user_counters& counters() const noexcept { return state_->counters(); }

private:
    net_user() = default;
    std::shared_ptr<detail::user_network_state> state_;
};

static_assert(net_backend<net_user>);

} // namespace supermachine::virtio
