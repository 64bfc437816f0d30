#pragma once
// The QEMU engine's guest network (doc/virtio.md, "The QEMU engine's
// network"): QEMU's own virtio-net frontend on `-netdev socket,fd=N`, the
// other end of a socketpair served here by our libslirp NAT
// (virtio::net_user) on the vm's executor. On a SOCK_STREAM socket QEMU
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
// The NAT behind it, with the guest's announcement and the DNS upstream,
// is virtio::net_user (virtio/net_user.hpp), the kvm engine's too; this
// file is only the stream transport to QEMU.
#include <supermachine/detail/qemu_network_frames.hpp>
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>
#include <supermachine/virtio/net_user.hpp>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>

#include <sys/socket.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace supermachine::detail {

struct qemu_network_counters {
    std::atomic<std::uint64_t> to_guest{0}, runts{0}, guest_drops{0};
};

class qemu_network : public std::enable_shared_from_this<qemu_network> {
public:
    /// Largest frame either way: QEMU's NET_BUFSIZE is 4096 + 65536.
    static constexpr std::size_t max_frame = 65536 + 4096;
    static constexpr std::size_t min_frame = 14; // an Ethernet header
    static constexpr std::size_t max_queued_bytes = std::size_t{8} << 20;

    using config = virtio::net_user::config; // guest_mac: what QEMU's NIC is given

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
        SUPERMACHINE_TRY(user, virtio::net_user::create(c));
        // On slirp's own strand: frames go in and come out without a post
        // and a copy of ours each, one slirp cycle per batch read.
        auto n = std::shared_ptr<qemu_network>(new qemu_network(user->strand()));
        n->user_ = std::move(user);
        n->qemu_end_ = std::move(theirs);
        boost::system::error_code ec;
        n->socket_.assign(ours.release(), ec);
        if (ec) return error_code(ec.value(), boost::system::system_category());
        return n;
    }

    int qemu_end() const noexcept { return qemu_end_.get(); }
    void close_qemu_end() noexcept { qemu_end_.reset(); }
    const qemu_network_counters& counters() const noexcept { return counters_; }
    /// The NAT's own (frames it took, DNS answered): valid until stop().
    const virtio::net_user_counters& user_counters() const noexcept { return user_->counters(); }

    /// Start moving frames (after QEMU has its end).
    void start() {
        std::weak_ptr<qemu_network> weak = shared_from_this();
        user_->attach([weak](std::span<const std::byte> frame) {
            if (auto self = weak.lock()) self->to_guest(frame);
        });
        boost::asio::post(strand_, [self = shared_from_this()] { self->read(); });
    }

    /// No frame moves after this; the slirp stack closes on its strand.
    void stop() {
        boost::asio::post(strand_, [self = shared_from_this()] {
            self->stopped_ = true;
            boost::system::error_code ignored;
            self->socket_.close(ignored);
            self->user_.reset();
        });
    }

private:
    explicit qemu_network(const boost::asio::strand<boost::asio::any_io_executor>& strand)
        : strand_(strand)
        , socket_(strand_) {}

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
        bool any = false;
        const auto consumed = split_length_prefixed(
            std::span<const std::byte>(in_.data(), filled_), max_frame,
            [&](std::span<const std::byte> frame) { any |= from_guest(frame); });
        if (!consumed) {
            boost::system::error_code ignored;
            socket_.close(ignored);
            return false;
        }
        std::memmove(in_.data(), in_.data() + *consumed, filled_ - *consumed);
        filled_ -= *consumed;
        // One slirp cycle for the batch (what the frames opened or sent).
        if (any && user_) user_->schedule();
        return true;
    }

    /// true: handed to the NAT (which then needs a cycle).
    bool from_guest(std::span<const std::byte> frame) {
        if (frame.size() < min_frame) {
            ++counters_.runts;
            return false;
        }
        if (!user_) return false;
        user_->input_on_strand(frame); // we run on slirp's strand
        return true;
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

    boost::asio::strand<boost::asio::any_io_executor> strand_;
    boost::asio::posix::stream_descriptor socket_;
    unique_fd qemu_end_;
    std::unique_ptr<virtio::net_user> user_;
    std::vector<std::byte> in_;
    std::size_t filled_ = 0;
    std::deque<std::vector<std::byte>> out_;
    std::vector<std::byte> batch_;
    std::size_t queued_bytes_ = 0;
    bool writing_ = false;
    bool stopped_ = false;
    qemu_network_counters counters_;
};

} // namespace supermachine::detail
