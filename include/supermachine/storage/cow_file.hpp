#pragma once
// cow_file<Base>: a copy-on-write overlay over a shared read-only base, so
// many VMs boot from one base image and each keeps only what it wrote.
//
// The disk is cut into chunks (64 KiB by default); a bitmap says which
// chunks live in the overlay. Reads of absent chunks go to the base; the
// first write to a chunk copies it up (unless the write covers the whole
// chunk) under a lock, later writes go straight to the overlay. The base is
// never written. The overlay is a sparse file: a memfd ("in memory") or a
// file at a path. save_state()/restore_state() carry the bitmap (and, for a
// memory overlay, the chunks' bytes) for snapshots.
#include <supermachine/error.hpp>
#include <supermachine/storage/block_storage.hpp>
#include <supermachine/storage/detail/file_io.hpp>

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace supermachine::storage {

template <block_storage Base>
class cow_file {
public:
    struct config {
        typename Base::config base;           // opened as given: make it read-only where it can be
        std::string overlay_path;             // empty: the overlay lives in memory (a memfd)
        std::uint32_t chunk_size = 64 * 1024; // power of two, 4 KiB .. 4 MiB
    };
    /// Largest disk we overlay: bounds the bitmap (1 bit per chunk) and the state record.
    static constexpr std::uint64_t max_size = std::uint64_t{1} << 44; // 16 TiB

    static result<std::unique_ptr<cow_file>> open(const config& cfg) {
        if (4096 > cfg.chunk_size || cfg.chunk_size > (4u << 20) ||
            !std::has_single_bit(cfg.chunk_size))
            return errc::invalid_argument;
        SUPERMACHINE_TRY(base, Base::open(cfg.base));
        if (base->size() > max_size) return errc::invalid_argument;
        int fd;
        const bool in_memory = cfg.overlay_path.empty();
        if (in_memory)
            fd = static_cast<int>(::syscall(SYS_memfd_create, "supermachine-cow", 1u /*CLOEXEC*/));
        else
            fd = ::open(cfg.overlay_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) return errno_code(errno);
        std::unique_ptr<cow_file> f(new cow_file(std::move(base), fd, in_memory, cfg.chunk_size));
        if (::ftruncate(fd, static_cast<off_t>(f->size())) != 0) return errno_code(errno);
        return f;
    }

    cow_file(const cow_file&) = delete;
    cow_file& operator=(const cow_file&) = delete;
    ~cow_file() { ::close(overlay_); }

    std::uint64_t size() const noexcept { return base_->size(); }
    bool is_read_only() const noexcept { return false; }
    std::string id() const {
        if constexpr (has_id<Base>)
            return base_->id();
        else
            return {};
    }
    std::uint32_t chunk_size() const noexcept { return chunk_; }
    /// Chunks copied into the overlay so far.
    std::uint64_t overlay_chunks() const noexcept {
        std::uint64_t n = 0;
        for (std::size_t i = 0; i < words_; ++i)
            n += std::popcount(bitmap_[i].load());
        return n;
    }

    result<void> read(std::uint64_t offset, std::span<std::byte> out) {
        if (!in_range(offset, out.size(), size())) return errc::sector_out_of_range;
        return for_each_piece(
            offset, out.size(),
            [&](std::uint64_t chunk, std::uint64_t at, std::size_t done, std::size_t n) {
                auto piece = out.subspan(done, n);
                if (present(chunk)) return detail::pread_all(overlay_, piece, at);
                return base_->read(at, piece);
            });
    }

    result<void> write(std::uint64_t offset, std::span<const std::byte> in) {
        if (!in_range(offset, in.size(), size())) return errc::sector_out_of_range;
        return for_each_piece(
            offset, in.size(),
            [&](std::uint64_t chunk, std::uint64_t at, std::size_t done, std::size_t n) {
                auto piece = in.subspan(done, n);
                if (present(chunk)) return detail::pwrite_all(overlay_, piece, at);
                return first_write(chunk, at, n,
                                   [&] { return detail::pwrite_all(overlay_, piece, at); });
            });
    }

    result<void> flush() noexcept {
        if (in_memory_) return success();
        if (::fdatasync(overlay_) != 0) return errno_code(errno);
        return success();
    }

    /// Zeroes in the overlay (a hole); the base is untouched.
    result<void> write_zeroes(std::uint64_t offset, std::uint64_t length) {
        if (!in_range(offset, length, size())) return errc::sector_out_of_range;
        return for_each_piece(
            offset, length, [&](std::uint64_t chunk, std::uint64_t at, std::size_t, std::size_t n) {
                auto zero = [&] { return punch(at, n); };
                if (present(chunk)) return zero();
                return first_write(chunk, at, n, zero);
            });
    }
    result<void> discard(std::uint64_t offset, std::uint64_t length) {
        return write_zeroes(offset, length);
    }

    /// The overlay's bookkeeping (and its bytes, for a memory overlay).
    std::vector<std::byte> save_state() const {
        std::vector<std::byte> out;
        auto put = [&](std::uint64_t v, int bytes) {
            for (int i = 0; i < bytes; ++i)
                out.push_back(static_cast<std::byte>(v >> (8 * i)));
        };
        put(state_magic, 4);
        put(size(), 8);
        put(chunk_, 4);
        put(in_memory_ ? 1 : 0, 1);
        for (std::size_t i = 0; i < words_; ++i)
            put(bitmap_[i].load(), 8);
        if (in_memory_) {
            std::vector<std::byte> buffer(chunk_);
            for (std::uint64_t c = 0; c < chunks_; ++c) {
                if (!present(c)) continue;
                auto piece = std::span(buffer).first(chunk_length(c));
                if (!detail::pread_all(overlay_, piece, c * chunk_)) return {};
                out.insert(out.end(), piece.begin(), piece.end());
            }
        }
        return out;
    }

    /// Load save_state() output (hostile: every length checked first).
    result<void> restore_state(std::span<const std::byte> in) {
        std::size_t at = 0;
        auto get = [&](int bytes) -> result<std::uint64_t> {
            if (in.size() - at < static_cast<std::size_t>(bytes)) return errc::snapshot_truncated;
            std::uint64_t v = 0;
            for (int i = 0; i < bytes; ++i)
                v |= std::uint64_t(in[at + i]) << (8 * i);
            at += bytes;
            return v;
        };
        SUPERMACHINE_TRY(magic, get(4));
        if (magic != state_magic) return errc::snapshot_bad_record;
        SUPERMACHINE_TRY(disk_size, get(8));
        SUPERMACHINE_TRY(chunk, get(4));
        SUPERMACHINE_TRY(memory, get(1));
        if (disk_size != size() || chunk != chunk_ || memory != (in_memory_ ? 1u : 0u))
            return errc::snapshot_mismatch;
        if (in.size() - at < words_ * 8) return errc::snapshot_truncated;
        std::vector<std::uint64_t> words(words_);
        for (auto& w : words)
            w = get(8).value();
        if (chunks_ % 64 != 0 && (words.back() >> (chunks_ % 64)) != 0)
            return errc::snapshot_bad_record; // bits for chunks past the end
        if (in_memory_) {
            std::uint64_t need = 0;
            for (std::uint64_t c = 0; c < chunks_; ++c)
                if (words[c / 64] >> (c % 64) & 1) need += chunk_length(c);
            if (in.size() - at != need) return errc::snapshot_bad_record;
            for (std::uint64_t c = 0; c < chunks_; ++c) {
                if (!(words[c / 64] >> (c % 64) & 1)) continue;
                const auto n = chunk_length(c);
                SUPERMACHINE_TRY(detail::pwrite_all(overlay_, in.subspan(at, n), c * chunk_));
                at += n;
            }
        } else if (at != in.size()) {
            return errc::snapshot_bad_record;
        }
        for (std::size_t i = 0; i < words_; ++i)
            bitmap_[i].store(words[i]);
        return success();
    }

private:
    static constexpr std::uint32_t state_magic = 0x776f6373; // "scow"

    cow_file(std::unique_ptr<Base> base, int fd, bool in_memory, std::uint32_t chunk)
        : base_(std::move(base))
        , overlay_(fd)
        , in_memory_(in_memory)
        , chunk_(chunk) {
        chunks_ = (base_->size() + chunk_ - 1) / chunk_;
        words_ = static_cast<std::size_t>((chunks_ + 63) / 64);
        bitmap_ = std::make_unique<std::atomic<std::uint64_t>[]>(words_);
    }

    std::size_t chunk_length(std::uint64_t c) const noexcept {
        return static_cast<std::size_t>(std::min<std::uint64_t>(chunk_, size() - c * chunk_));
    }
    bool present(std::uint64_t c) const noexcept {
        return (bitmap_[c / 64].load(std::memory_order_acquire) >> (c % 64)) & 1;
    }
    void mark(std::uint64_t c) noexcept {
        bitmap_[c / 64].fetch_or(std::uint64_t{1} << (c % 64), std::memory_order_release);
    }

    template <class F>
    result<void> for_each_piece(std::uint64_t offset, std::uint64_t length, F&& f) {
        std::size_t done = 0;
        while (length > 0) {
            const std::uint64_t chunk = offset / chunk_;
            const std::uint64_t n = std::min<std::uint64_t>(length, (chunk + 1) * chunk_ - offset);
            SUPERMACHINE_TRY(f(chunk, offset, done, static_cast<std::size_t>(n)));
            offset += n;
            length -= n;
            done += static_cast<std::size_t>(n);
        }
        return success();
    }

    /// The first change to an absent chunk: copy it up unless `n` covers it
    /// all, then apply `change`, then mark it present; one writer at a time so
    /// a copy-up never overwrites another writer's fresh data.
    template <class F>
    result<void> first_write(std::uint64_t c, std::uint64_t at, std::size_t n, F&& change) {
        std::lock_guard lock(copy_mutex_);
        if (!present(c) && n != chunk_length(c)) {
            std::vector<std::byte> buffer(chunk_length(c));
            SUPERMACHINE_TRY(base_->read(c * chunk_, buffer));
            SUPERMACHINE_TRY(detail::pwrite_all(overlay_, buffer, c * chunk_));
        }
        (void)at;
        SUPERMACHINE_TRY(change());
        mark(c);
        return success();
    }

    result<void> punch(std::uint64_t at, std::uint64_t n) {
        if (::fallocate(overlay_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        static_cast<off_t>(at), static_cast<off_t>(n)) == 0)
            return success();
        std::vector<std::byte> zeros(static_cast<std::size_t>(n));
        return detail::pwrite_all(overlay_, zeros, at);
    }

    std::unique_ptr<Base> base_;
    int overlay_;
    bool in_memory_;
    std::uint32_t chunk_;
    std::uint64_t chunks_ = 0;
    std::size_t words_ = 0;
    std::unique_ptr<std::atomic<std::uint64_t>[]> bitmap_;
    std::mutex copy_mutex_;
};

} // namespace supermachine::storage
