#pragma once
// The QEMU engine's guest network (doc/virtio.md, "The QEMU engine's
// network"): QEMU's own virtio-net frontend on `-netdev socket,fd=N`, the
// other end of a socketpair served here by our libslirp NAT
// (virtio::net_slirp) on the vm's executor. On a SOCK_STREAM socket QEMU
// frames each Ethernet frame with a 4-byte big-endian length (net/socket.c);
// we do the same toward it.
//
// The frames come from the guest (QEMU copies them out of its virtqueue
// unchecked): a length beyond max_frame loses the framing, so the stream is
// closed (the guest's link is dead from then on); a runt is dropped and
// counted. Frames toward the guest queue up to max_queued_bytes and are
// dropped beyond (as a NIC would), so a guest that stops reading costs us
// bounded memory.
//
// DNS: slirp forwards what the guest sends to 10.0.2.3:53 to the host's
// resolv.conf nameserver. With `dns_upstream` set, queries to 10.0.2.3:53
// are answered here instead, through a UDP socket to that resolver (tests
// use a resolver on the host's loopback, which the guest cannot otherwise
// reach).
#include <supermachine/detail/qemu_network_frames.hpp>
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>
#include <supermachine/virtio/net_slirp.hpp>

#include <boost/asio/ip/udp.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>

#include <sys/socket.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace supermachine::detail {

struct qemu_network_counters {
    std::atomic<std::uint64_t> to_slirp{0}, to_guest{0}, runts{0}, refused{0}, guest_drops{0},
        dns_answered{0};
};

class qemu_network : public std::enable_shared_from_this<qemu_network> {
public:
    /// Largest frame either way: QEMU's NET_BUFSIZE is 4096 + 65536.
    static constexpr std::size_t max_frame = 65536 + 4096;
    static constexpr std::size_t min_frame = 14; // an Ethernet header
    static constexpr std::size_t max_queued_bytes = std::size_t{8} << 20;
    static constexpr std::size_t max_dns_queries = 64;

    struct config {
        virtio::net_slirp::config slirp; // executor required
        std::optional<boost::asio::ip::udp::endpoint> dns_upstream;
        std::string guest_mac = "52:54:00:12:34:56"; // what QEMU's NIC is given
    };

    /// The socketpair and the NAT; QEMU gets qemu_end() (close it here once
    /// QEMU has it: close_qemu_end()).
    static result<std::shared_ptr<qemu_network>> create(config c) {
        int pair[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
            return errno_code(errno);
        unique_fd ours(pair[0]), theirs(pair[1]);
        // Room for bursts both ways without a round trip through the loop.
        const int size = 1 << 20;
        ::setsockopt(ours.get(), SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
        ::setsockopt(ours.get(), SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
        SUPERMACHINE_TRY(slirp, virtio::net_slirp::create(c.slirp));
        // On slirp's own strand: frames go in and come out without a post
        // and a copy of ours each, one slirp cycle per batch read.
        const auto strand = slirp->stack().strand();
        auto n = std::shared_ptr<qemu_network>(new qemu_network(strand, std::move(c)));
        n->slirp_ = std::move(slirp);
        n->qemu_end_ = std::move(theirs);
        boost::system::error_code ec;
        n->socket_.assign(ours.release(), ec);
        if (ec) return error_code(ec.value(), boost::system::system_category());
        return n;
    }

    int qemu_end() const noexcept { return qemu_end_.get(); }
    void close_qemu_end() noexcept { qemu_end_.reset(); }
    const qemu_network_counters& counters() const noexcept { return counters_; }

    /// Start moving frames (after QEMU has its end).
    void start() {
        std::weak_ptr<qemu_network> weak = shared_from_this();
        slirp_->attach([weak](std::span<const std::byte> frame) {
            if (auto self = weak.lock()) self->to_guest(frame);
        });
        boost::asio::post(strand_, [self = shared_from_this()] { self->announce_guest(); });
        boost::asio::post(strand_, [self = shared_from_this()] { self->read(); });
    }

    /// No frame moves after this; the slirp stack closes on its strand.
    void stop() {
        boost::asio::post(strand_, [self = shared_from_this()] {
            self->stopped_ = true;
            boost::system::error_code ignored;
            self->socket_.close(ignored);
            for (auto& q : self->dns_)
                if (q) q->socket.close(ignored);
            self->slirp_.reset();
        });
    }

private:
    /// Slirp learns the guest's MAC only from the guest's ARP (its DHCP is
    /// off): until the guest sends something, a published port's first
    /// SYN waits in slirp for an ARP answer and a TCP retransmission (≈ 3 s
    /// measured), and so would every clone's, whose slirp is fresh. So slirp
    /// hears the guest's gratuitous ARP from us at start: the address and
    /// MAC are ours to know (config::guest_mac, the agent's 10.0.2.15).
    void announce_guest() {
        std::array<std::byte, 60> f{}; // the minimum Ethernet frame, zero padded
        unsigned mac[6] = {};
        if (std::sscanf(config_.guest_mac.c_str(), "%x:%x:%x:%x:%x:%x", &mac[0], &mac[1], &mac[2],
                        &mac[3], &mac[4], &mac[5]) != 6)
            return;
        in_addr guest{};
        if (::inet_pton(AF_INET, config_.slirp.dhcp_start.c_str(), &guest) != 1) return;
        for (int i = 0; i < 6; ++i) {
            f[i] = std::byte{0xff};
            f[6 + i] = std::byte(mac[i]);
            f[22 + i] = std::byte(mac[i]); // sender hardware address
        }
        store_be16(&f[12], 0x0806);
        store_be16(&f[14], 1);      // Ethernet
        store_be16(&f[16], 0x0800); // IPv4
        f[18] = std::byte{6};
        f[19] = std::byte{4};
        store_be16(&f[20], 1);          // request
        std::memcpy(&f[28], &guest, 4); // sender = target: gratuitous
        std::memcpy(&f[38], &guest, 4);
        if (!slirp_) return;
        slirp_->stack().input_on_strand(f);
        slirp_->stack().schedule();
    }

    qemu_network(const boost::asio::strand<boost::asio::any_io_executor>& strand, config c)
        : config_(std::move(c))
        , strand_(strand)
        , socket_(strand_) {
        // Valid: net_slirp::create refused the config otherwise.
        ::inet_pton(AF_INET, config_.slirp.dns.c_str(), resolver_.data());
    }

    void read() {
        if (stopped_) return;
        if (in_.size() - filled_ < 65536) in_.resize(filled_ + 65536 + max_frame);
        socket_.async_read_some(
            boost::asio::buffer(in_.data() + filled_, in_.size() - filled_),
            [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
                if (ec || self->stopped_) return; // QEMU went away (or we stopped)
                self->filled_ += n;
                if (!self->take_frames()) return; // framing lost: the link is dead
                self->read();
            });
    }

    /// Hand every whole frame in in_ on; false when the stream is unusable.
    bool take_frames() {
        const auto before = counters_.to_slirp.load(std::memory_order_relaxed);
        const auto consumed =
            split_length_prefixed(std::span<const std::byte>(in_.data(), filled_), max_frame,
                                  [this](std::span<const std::byte> frame) { from_guest(frame); });
        if (!consumed) {
            boost::system::error_code ignored;
            socket_.close(ignored);
            return false;
        }
        std::memmove(in_.data(), in_.data() + *consumed, filled_ - *consumed);
        filled_ -= *consumed;
        // One slirp cycle for the batch (what the frames opened or sent).
        if (slirp_ && counters_.to_slirp.load(std::memory_order_relaxed) != before)
            slirp_->stack().schedule();
        return true;
    }

    void from_guest(std::span<const std::byte> frame) {
        if (frame.size() < min_frame) {
            ++counters_.runts;
            return;
        }
        if (config_.dns_upstream && dns_query(frame)) return;
        if (!slirp_) {
            ++counters_.refused;
            return;
        }
        slirp_->stack().input_on_strand(frame); // we run on slirp's strand
        ++counters_.to_slirp;
    }

    /// On slirp's strand (ours): framed, queued, written.
    void to_guest(std::span<const std::byte> frame) {
        if (frame.empty() || frame.size() > max_frame) return;
        std::vector<std::byte> framed(4 + frame.size());
        const auto n = static_cast<std::uint32_t>(frame.size());
        framed[0] = std::byte(n >> 24);
        framed[1] = std::byte(n >> 16);
        framed[2] = std::byte(n >> 8);
        framed[3] = std::byte(n);
        std::memcpy(framed.data() + 4, frame.data(), frame.size());
        queue(std::move(framed)); // the sink runs on slirp's strand: ours
    }

    void queue(std::vector<std::byte> framed) {
        if (stopped_) return;
        if (queued_bytes_ + framed.size() > max_queued_bytes) {
            ++counters_.guest_drops;
            return;
        }
        queued_bytes_ += framed.size();
        out_.push_back(std::move(framed));
        ++counters_.to_guest;
        if (!writing_) write();
    }

    void write() {
        if (out_.empty() || stopped_) {
            writing_ = false;
            return;
        }
        writing_ = true;
        // Gather what is queued into one write (frames are small).
        batch_.clear();
        while (!out_.empty() && batch_.size() < (std::size_t{256} << 10)) {
            auto& f = out_.front();
            batch_.insert(batch_.end(), f.begin(), f.end());
            queued_bytes_ -= f.size();
            out_.pop_front();
        }
        boost::asio::async_write(
            socket_, boost::asio::buffer(batch_),
            [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
                if (ec) {
                    self->writing_ = false;
                    return;
                }
                self->write();
            });
    }

    // --- DNS toward dns_upstream ---------------------------------------

    struct dns_query_state {
        explicit dns_query_state(const boost::asio::strand<boost::asio::any_io_executor>& s)
            : socket(s)
            , timer(s) {}
        boost::asio::ip::udp::socket socket;
        boost::asio::steady_timer timer;
        std::array<std::byte, 6> guest_mac{}, our_mac{};
        std::array<std::byte, 4> guest_ip{};
        std::uint16_t guest_port = 0;
        std::array<std::byte, 4096> answer{};
    };

    /// A UDP datagram to 10.0.2.3:53 (unfragmented IPv4): true when taken.
    bool dns_query(std::span<const std::byte> f) {
        const auto query = parse_dns_query(f, resolver_);
        if (query.what == dns_query_view::kind::not_dns) return false;
        if (query.what == dns_query_view::kind::malformed) return true; // dropped
        const auto payload = query.payload;
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
        q->socket.open(config_.dns_upstream->protocol(), ec);
        if (!ec) q->socket.connect(*config_.dns_upstream, ec);
        if (!ec) q->socket.send(boost::asio::buffer(payload.data(), payload.size()), 0, ec);
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
        to_guest(f);
    }

    config config_;
    std::array<std::byte, 4> resolver_{}; // config_.slirp.dns, network order
    boost::asio::strand<boost::asio::any_io_executor> strand_;
    boost::asio::posix::stream_descriptor socket_;
    unique_fd qemu_end_;
    std::unique_ptr<virtio::net_slirp> slirp_;
    std::vector<std::byte> in_;
    std::size_t filled_ = 0;
    std::deque<std::vector<std::byte>> out_;
    std::vector<std::byte> batch_;
    std::size_t queued_bytes_ = 0;
    bool writing_ = false;
    bool stopped_ = false;
    std::vector<std::shared_ptr<dns_query_state>> dns_;
    qemu_network_counters counters_;
};

} // namespace supermachine::detail
