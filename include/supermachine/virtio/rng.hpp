#pragma once
// virtio-rng (entropy device, virtio 1.2 5.4): one request queue; the device
// fills each chain's device-writable buffers with bytes from getrandom(2).
#include <supermachine/error.hpp>
#include <supermachine/virtio/device.hpp>
#include <supermachine/virtio/queue_service.hpp>

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <vector>

namespace supermachine::virtio {

class rng {
public:
    struct config {
        /// Bytes served per request at most: a guest cannot make one kick
        /// cost unbounded host work.
        std::uint32_t max_bytes_per_request = 64 * 1024;
        /// false: basic_machine leaves this slot empty (see blk::config::attached).
        bool attached = true;
    };
    static bool attached(const config& cfg) noexcept { return cfg.attached; }
    static constexpr device_type type = device_type::entropy;

    explicit rng(const config& cfg)
        : config_(cfg) {}
    static result<std::unique_ptr<rng>> create(const config& cfg) {
        return std::make_unique<rng>(cfg);
    }

    std::uint64_t device_features() const noexcept { return common_features; }
    std::size_t queue_count() const noexcept { return 1; }
    std::uint32_t queue_max_size(std::size_t) const noexcept { return 256; }
    std::size_t config_size() const noexcept { return 0; }
    void read_config(std::uint32_t offset, std::span<std::byte> out) const noexcept {
        read_config_bytes({}, offset, out);
    }
    void write_config(std::uint32_t, std::span<const std::byte>) noexcept {}

    result<void> activate(const activation& act) {
        if (act.queues.size() != 1) return errc::invalid_argument;
        queue_ = act.queues[0];
        needs_reset_ = act.needs_reset;
        return service_.start(act, [this](std::size_t) { serve(); });
    }
    void reset() {
        service_.stop();
        queue_ = {};
    }

    /// Bytes handed to the guest so far (for tests and statistics).
    std::uint64_t bytes_served() const noexcept { return served_; }

private:
    void serve() {
        if (!queue_.queue) return;
        bool any = false;
        auto r = for_each_available(queue_, [&](virtqueue::available_chain&& c) {
            std::uint32_t written = 0;
            if (c.chain) written = fill(c.chain.value());
            // A malformed chain is returned with nothing written.
            (void)queue_.queue->push_used(c.head, written);
            any = true;
        });
        if (!r) {
            if (needs_reset_) needs_reset_();
            return;
        }
        if (any && queue_.queue->should_notify()) queue_.interrupt.used_buffer();
    }

    std::uint32_t fill(const descriptor_chain& chain) {
        chain_writer writer(chain.writable());
        std::uint64_t budget = config_.max_bytes_per_request;
        while (budget > 0) {
            auto out = writer.next_contiguous(budget);
            if (out.empty()) break;
            budget -= out.size();
            std::size_t done = 0;
            while (done < out.size()) {
                // Straight into the guest buffer; getrandom may return short.
                const ssize_t n = ::getrandom(out.data() + done, out.size() - done, 0);
                if (n < 0) {
                    if (errno == EINTR) continue;
                    return static_cast<std::uint32_t>(writer.written() - (out.size() - done));
                }
                done += static_cast<std::size_t>(n);
            }
        }
        served_ += writer.written();
        return static_cast<std::uint32_t>(writer.written());
    }

    config config_;
    queue_service service_;
    queue_binding queue_;
    std::function<void()> needs_reset_;
    std::uint64_t served_ = 0;
};

static_assert(device_core<rng>);

} // namespace supermachine::virtio
