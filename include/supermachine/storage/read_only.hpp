#pragma once
// read_only<S>: any block storage, refusing writes (device_read_only); a
// virtio-blk device over it offers VIRTIO_BLK_F_RO.
#include <supermachine/error.hpp>
#include <supermachine/storage/block_storage.hpp>

#include <memory>
#include <string>

namespace supermachine::storage {

template <block_storage S>
class read_only {
public:
    using config = typename S::config;

    static result<std::unique_ptr<read_only>> open(const config& cfg) {
        SUPERMACHINE_TRY(inner, S::open(cfg));
        return std::unique_ptr<read_only>(new read_only(std::move(inner)));
    }

    std::uint64_t size() const noexcept { return inner_->size(); }
    bool is_read_only() const noexcept { return true; }
    result<void> read(std::uint64_t offset, std::span<std::byte> out) {
        return inner_->read(offset, out);
    }
    result<void> write(std::uint64_t, std::span<const std::byte>) noexcept {
        return errc::device_read_only;
    }
    result<void> read_vectored(std::uint64_t offset, std::span<::iovec> iov) requires vectored<S> {
        return inner_->read_vectored(offset, iov);
    }
    result<void> write_vectored(std::uint64_t, std::span<::iovec>) noexcept requires vectored<S> {
        return errc::device_read_only;
    }
    result<void> flush() noexcept { return success(); }
    std::string id() const {
        if constexpr (has_id<S>)
            return inner_->id();
        else
            return {};
    }
    S& inner() noexcept { return *inner_; }

private:
    explicit read_only(std::unique_ptr<S> inner)
        : inner_(std::move(inner)) {}
    std::unique_ptr<S> inner_;
};

} // namespace supermachine::storage
