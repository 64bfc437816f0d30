#pragma once
// A net_backend (virtio/net.hpp) in memory, for tests and fuzzing: it keeps
// the frames the guest sent (bounded), can echo each one straight back, and
// lets the host inject frames for the guest.
#include <supermachine/error.hpp>
#include <supermachine/virtio/net.hpp>

#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

namespace supermachine::virtio {

class net_loopback {
public:
    using frame = std::vector<std::byte>;
    struct config {
        bool echo = false;              // send() hands the frame back to the guest
        std::size_t max_recorded = 256; // sent frames kept for take_sent(); older ones go
    };

    explicit net_loopback(const config& c)
        : config_(c) {}
    static result<std::unique_ptr<net_loopback>> create(const config& c) {
        return std::make_unique<net_loopback>(c);
    }

    void attach(net_frame_sink sink) {
        std::lock_guard lock(mutex_);
        sink_ = std::move(sink);
    }

    bool send(std::span<const std::byte> bytes) {
        net_frame_sink sink;
        {
            std::lock_guard lock(mutex_);
            if (!accepting_) return false;
            if (config_.max_recorded > 0) {
                if (sent_.size() == config_.max_recorded) sent_.pop_front();
                sent_.emplace_back(bytes.begin(), bytes.end());
            }
            if (config_.echo) sink = sink_;
        }
        if (sink) sink(bytes);
        return true;
    }

    /// A frame from "the network" for the guest.
    void inject(std::span<const std::byte> bytes) {
        net_frame_sink sink;
        {
            std::lock_guard lock(mutex_);
            sink = sink_;
        }
        if (sink) sink(bytes);
    }

    /// The frames the guest sent since the last call, oldest first.
    std::vector<frame> take_sent() {
        std::lock_guard lock(mutex_);
        std::vector<frame> out(std::make_move_iterator(sent_.begin()),
                               std::make_move_iterator(sent_.end()));
        sent_.clear();
        return out;
    }

    /// false: send() refuses frames (as a backend out of buffers would).
    void set_accepting(bool accepting) {
        std::lock_guard lock(mutex_);
        accepting_ = accepting;
    }

private:
    config config_;
    std::mutex mutex_;
    net_frame_sink sink_;
    std::deque<frame> sent_;
    bool accepting_ = true;
};

static_assert(net_backend<net_loopback>);
static_assert(device_core<net<net_loopback>>);

} // namespace supermachine::virtio
