#pragma once
// virtio-blk (virtio 1.2 section 5.2) over a block-storage policy.
//
// One request queue. Each chain is: a 16-byte header (type, reserved,
// sector) and, for writes, the data in device-readable buffers; for reads,
// the data buffers, then one status byte, device-writable. Data moves
// straight between the file and guest buffers (pread/pwrite into the
// validated guest spans) on a bounded thread pool, never on the executor
// or a vCPU thread; the status byte is written after the data, then the
// chain is returned and the driver interrupted if it asked to be.
//
// Guest errors fail the request, never the host: a chain too short for its
// header or without a status byte is returned with 0 bytes written; a data
// length not a multiple of 512, a range past the capacity (overflow-safe) or
// a write to a read-only disk gets VIRTIO_BLK_S_IOERR; an unknown request
// type or flag gets VIRTIO_BLK_S_UNSUPP.
#include <supermachine/error.hpp>
#include <supermachine/storage/block_storage.hpp>
#include <supermachine/virtio/device.hpp>
#include <supermachine/virtio/queue_service.hpp>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/container/small_vector.hpp>

#include <sys/uio.h>

#include <array>
#include <bit>
#include <cstring>
#include <memory>
#include <string>

namespace supermachine::virtio {

namespace blk_feature {
inline constexpr unsigned size_max = 1;
inline constexpr unsigned seg_max = 2;
inline constexpr unsigned read_only = 5;
inline constexpr unsigned block_size = 6;
inline constexpr unsigned flush = 9;
inline constexpr unsigned discard = 13;
inline constexpr unsigned write_zeroes = 14;
} // namespace blk_feature

namespace blk_request {
inline constexpr std::uint32_t in = 0;
inline constexpr std::uint32_t out = 1;
inline constexpr std::uint32_t flush = 4;
inline constexpr std::uint32_t get_id = 8;
inline constexpr std::uint32_t discard = 11;
inline constexpr std::uint32_t write_zeroes = 13;
} // namespace blk_request

namespace blk_status {
inline constexpr std::uint8_t ok = 0;
inline constexpr std::uint8_t io_error = 1;
inline constexpr std::uint8_t unsupported = 2;
} // namespace blk_status

inline constexpr std::uint32_t sector_size = 512;
inline constexpr std::size_t blk_id_bytes = 20;

/// struct virtio_blk_outhdr
struct blk_request_header {
    std::uint32_t type;
    std::uint32_t reserved;
    std::uint64_t sector;
};
static_assert(sizeof(blk_request_header) == 16);

/// struct virtio_blk_discard_write_zeroes
struct blk_discard_segment {
    std::uint64_t sector;
    std::uint32_t sectors;
    std::uint32_t flags; // bit 0: unmap (write zeroes only)
};
static_assert(sizeof(blk_discard_segment) == 16);

template <storage::block_storage Storage>
class blk {
public:
    struct config {
        typename Storage::config storage{};
        std::string id;                 // GET_ID serial; empty: the storage's id()
        std::uint32_t queue_size = 256; // power of two
        std::size_t io_threads = 2;     // the bounded pool for blocking file I/O
        /// false: basic_machine leaves this slot of its device list empty (no
        /// window, GSI or ACPI entry), so a fixed list can hold N optional disks.
        bool attached = true;
    };
    static bool attached(const config& cfg) noexcept { return cfg.attached; }
    static constexpr device_type type = device_type::block;
    /// Largest data segment advertised (size_max) and segments per request (seg_max).
    static constexpr std::uint32_t max_segment_bytes = 1u << 20;

    static result<std::unique_ptr<blk>> create(const config& cfg) {
        if (cfg.queue_size == 0 || cfg.queue_size > max_queue_size ||
            !std::has_single_bit(cfg.queue_size) || cfg.io_threads == 0 || cfg.io_threads > 64)
            return errc::invalid_argument;
        SUPERMACHINE_TRY(storage, Storage::open(cfg.storage));
        return std::unique_ptr<blk>(new blk(cfg, std::move(storage)));
    }

    blk(const blk&) = delete;
    blk& operator=(const blk&) = delete;
    ~blk() {
        reset();
        pool_.join();
    }

    std::uint64_t device_features() const noexcept {
        std::uint64_t f = common_features | feature_bit(blk_feature::seg_max) |
                          feature_bit(blk_feature::size_max) |
                          feature_bit(blk_feature::block_size) | feature_bit(blk_feature::flush);
        if (storage_->is_read_only()) f |= feature_bit(blk_feature::read_only);
        if constexpr (storage::discards<Storage>)
            if (!storage_->is_read_only()) f |= feature_bit(blk_feature::discard);
        if constexpr (storage::writes_zeroes<Storage>)
            if (!storage_->is_read_only()) f |= feature_bit(blk_feature::write_zeroes);
        return f;
    }
    std::size_t queue_count() const noexcept { return 1; }
    std::uint32_t queue_max_size(std::size_t) const noexcept { return queue_size_; }
    std::size_t config_size() const noexcept { return config_space_.size(); }
    void read_config(std::uint32_t offset, std::span<std::byte> out) const noexcept {
        read_config_bytes(config_space_, offset, out);
    }
    void write_config(std::uint32_t, std::span<const std::byte>) noexcept {} // no writable fields

    result<void> activate(const activation& act) {
        if (act.queues.size() != 1) return errc::invalid_argument;
        queue_ = act.queues[0];
        needs_reset_ = act.needs_reset;
        return service_.start(act, [this](std::size_t) { serve(); });
    }
    /// Drains: requests taken from the ring finish and are returned first.
    void reset() {
        service_.stop();
        queue_ = {};
    }

    Storage& storage() noexcept { return *storage_; }

    /// The storage's own state (a cow overlay's bitmap and bytes), for
    /// snapshots; take it while the device is paused.
    std::vector<std::byte> save_state() const requires storage::saves_state<Storage> {
        return storage_->save_state();
    }
    result<void>
    restore_state(std::span<const std::byte> bytes) requires storage::saves_state<Storage> {
        return storage_->restore_state(bytes);
    }
    std::uint64_t capacity_sectors() const noexcept { return storage_->size() / sector_size; }

private:
    blk(const config& cfg, std::unique_ptr<Storage> storage)
        : storage_(std::move(storage))
        , pool_(cfg.io_threads)
        , queue_size_(cfg.queue_size) {
        if (!cfg.id.empty())
            id_ = cfg.id.substr(0, blk_id_bytes);
        else if constexpr (storage::has_id<Storage>)
            id_ = storage_->id().substr(0, blk_id_bytes);
        build_config_space();
    }

    void build_config_space() {
        auto put32 = [&](std::size_t at, std::uint32_t v) {
            std::memcpy(&config_space_[at], &v, 4);
        };
        const std::uint64_t capacity = capacity_sectors();
        std::memcpy(&config_space_[0], &capacity, 8);
        put32(8, max_segment_bytes);                      // size_max
        put32(12, queue_size_ > 2 ? queue_size_ - 2 : 1); // seg_max: room for header + status
        put32(20, sector_size);                           // blk_size
        const std::uint16_t queues = 1;
        std::memcpy(&config_space_[34], &queues, 2);
        put32(36, 0xffff'ffffu / sector_size); // max_discard_sectors
        put32(40, 1);                          // max_discard_seg
        put32(44, 1);                          // discard_sector_alignment
        put32(48, 0xffff'ffffu / sector_size); // max_write_zeroes_sectors
        put32(52, 1);                          // max_write_zeroes_seg
        config_space_[56] = std::byte{1};      // write_zeroes_may_unmap
    }

    /// Kick handler: on the executor, under the core lock.
    void serve() {
        if (!queue_.queue) return;
        auto r = for_each_available(queue_, [&](virtqueue::available_chain&& c) {
            if (!c.chain) {
                finish_now(c.head, 0);
                return;
            }
            start(c.head, std::move(c.chain).value());
        });
        if (!r && needs_reset_) needs_reset_();
    }

    void finish_now(std::uint16_t head, std::uint32_t written) {
        (void)complete_chain(queue_, head, written);
    }

    /// Parse a request and either complete it at once or hand it to the pool.
    void start(std::uint16_t head, descriptor_chain chain) {
        chain_reader reader(chain.readable());
        auto header = reader.read_object<blk_request_header>();
        const auto writable = chain.writable();
        if (!header || writable.empty()) {
            // No header or nowhere to put the status: nothing to answer with.
            finish_now(head, 0);
            return;
        }
        // The status byte is the last byte of the last writable buffer.
        const segment& last = writable.back();
        std::byte* status = last.host.data() + last.length - 1;
        const std::uint64_t data_in = chain.writable_bytes() - 1;
        auto fail = [&](std::uint8_t code) {
            *status = std::byte{code};
            finish_now(head, 1);
        };
        const auto h = header.value();
        switch (h.type) {
        case blk_request::in:
            if (!check_range(h.sector, data_in)) return fail(blk_status::io_error);
            return submit(head, std::move(chain), status, h, data_in + 1);
        case blk_request::out:
            if (storage_->is_read_only()) return fail(blk_status::io_error);
            if (!check_range(h.sector, reader.remaining())) return fail(blk_status::io_error);
            return submit(head, std::move(chain), status, h, 1);
        case blk_request::flush:
            return submit(head, std::move(chain), status, h, 1);
        case blk_request::get_id: {
            chain_writer writer(writable);
            std::array<std::byte, blk_id_bytes> id{};
            std::memcpy(id.data(), id_.data(), std::min(id_.size(), id.size()));
            const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(data_in, id.size()));
            (void)writer.write(std::span(id).first(n));
            *status = std::byte{blk_status::ok};
            return finish_now(head, static_cast<std::uint32_t>(n + 1));
        }
        case blk_request::discard:
        case blk_request::write_zeroes: {
            const bool zeroes = h.type == blk_request::write_zeroes;
            const bool offered =
                zeroes ? storage::writes_zeroes<Storage> : storage::discards<Storage>;
            if (!offered) return fail(blk_status::unsupported);
            if (storage_->is_read_only()) return fail(blk_status::io_error);
            if (reader.remaining() != sizeof(blk_discard_segment)) // max_*_seg = 1
                return fail(blk_status::io_error);
            auto seg = reader.read_object<blk_discard_segment>().value();
            if (seg.flags & ~std::uint32_t{zeroes ? 1u : 0u}) return fail(blk_status::unsupported);
            if (!check_range(seg.sector, std::uint64_t{seg.sectors} * sector_size))
                return fail(blk_status::io_error);
            blk_request_header as_range{h.type, seg.sectors, seg.sector};
            return submit(head, std::move(chain), status, as_range, 1);
        }
        default:
            return fail(blk_status::unsupported);
        }
    }

    bool check_range(std::uint64_t sector, std::uint64_t bytes) const noexcept {
        if (bytes % sector_size != 0) return false;
        const std::uint64_t capacity = capacity_sectors();
        return sector <= capacity && bytes / sector_size <= capacity - sector;
    }

    /// Blocking I/O on the pool; completion (status byte, used ring,
    /// interrupt) from the pool thread under the core lock, so stop() can
    /// drain without waiting for the executor.
    void submit(std::uint16_t head, descriptor_chain chain, std::byte* status, blk_request_header h,
                std::uint32_t written) {
        service_.begin_io();
        const std::uint64_t generation = service_.generation_in_handler();
        boost::asio::post(pool_, [this, head, chain = std::move(chain), status, h, written,
                                  generation]() mutable {
            const result<void> r = perform(chain, h);
            *status = std::byte{r ? blk_status::ok : blk_status::io_error};
            service_.run_if_current(generation, [&] {
                if (queue_.queue) (void)complete_chain(queue_, head, written);
            });
            service_.end_io();
        });
    }

    result<void> perform(const descriptor_chain& chain, const blk_request_header& h) {
        std::uint64_t offset = h.sector * sector_size;
        switch (h.type) {
        case blk_request::in: {
            if constexpr (storage::vectored<Storage>) {
                auto iov = vectors(chain.writable(), true);
                return storage_->read_vectored(offset, std::span<::iovec>(iov.data(), iov.size()));
            }
            chain_writer writer(chain.writable());
            std::uint64_t left = writer.remaining() - 1; // all but the status byte
            while (left > 0) {
                auto piece = writer.next_contiguous(left);
                SUPERMACHINE_TRY(storage_->read(offset, piece));
                offset += piece.size();
                left -= piece.size();
            }
            return success();
        }
        case blk_request::out: {
            if constexpr (storage::vectored<Storage>) {
                auto iov = vectors(chain.readable(), false);
                // Drop the 16-byte header from the front.
                std::uint64_t skip = sizeof(blk_request_header);
                std::size_t first = 0;
                while (skip > 0 && first < iov.size()) {
                    const std::size_t step = std::min<std::uint64_t>(skip, iov[first].iov_len);
                    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + step;
                    iov[first].iov_len -= step;
                    skip -= step;
                    if (iov[first].iov_len == 0) ++first;
                }
                return storage_->write_vectored(
                    offset, std::span<::iovec>(iov.data(), iov.size()).subspan(first));
            }
            chain_reader reader(chain.readable());
            SUPERMACHINE_TRY(reader.skip(sizeof(blk_request_header)));
            while (reader.remaining() > 0) {
                auto piece = reader.next_contiguous(reader.remaining());
                SUPERMACHINE_TRY(storage_->write(offset, piece));
                offset += piece.size();
            }
            return success();
        }
        case blk_request::flush:
            return storage_->flush();
        case blk_request::discard:
            if constexpr (storage::discards<Storage>)
                return storage_->discard(offset, std::uint64_t{h.reserved} * sector_size);
            return errc::not_supported;
        case blk_request::write_zeroes:
            if constexpr (storage::writes_zeroes<Storage>)
                return storage_->write_zeroes(offset, std::uint64_t{h.reserved} * sector_size);
            return errc::not_supported;
        default:
            return errc::not_supported;
        }
    }

    /// The segments as iovecs; for device-writable ones without the final
    /// status byte.
    static boost::container::small_vector<::iovec, 8> vectors(std::span<const segment> segments,
                                                              bool drop_status_byte) {
        boost::container::small_vector<::iovec, 8> iov;
        for (const auto& s : segments)
            iov.push_back({s.host.data(), s.host.size()});
        if (drop_status_byte) {
            while (!iov.empty() && iov.back().iov_len == 0)
                iov.pop_back();
            if (!iov.empty()) --iov.back().iov_len;
        }
        return iov;
    }

    std::unique_ptr<Storage> storage_;
    boost::asio::thread_pool pool_;
    std::uint32_t queue_size_;
    std::string id_;
    std::array<std::byte, 60> config_space_{};
    queue_service service_;
    queue_binding queue_;
    std::function<void()> needs_reset_;
};

} // namespace supermachine::virtio
