#pragma once
// Snapshots in memory: a sealed memfd holding exactly the file format.
// load() maps RAM MAP_PRIVATE from it like file_store does from a file, so a
// pool restores many machines from one saved image without touching disk,
// each private and lazily faulted. Holes stay holes: shmem keeps only the
// pages that were written.
#include <supermachine/error.hpp>
#include <supermachine/snapshot/detail/file_io.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/snapshot/store.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <utility>

namespace supermachine::snapshot {

class memory_store {
public:
    memory_store() = default;

    /// Replace the stored snapshot. Restores already loaded keep theirs.
    /// Not safe concurrently with load() on the same store.
    result<void> save(const snapshot_image& image) {
        supermachine::detail::unique_fd fd(
            ::memfd_create("supermachine-snapshot", MFD_CLOEXEC | MFD_ALLOW_SEALING));
        if (fd.get() < 0) return errno_code(errno);
        SUPERMACHINE_TRY(data_bytes, detail::write_snapshot_fd(fd.get(), image));
        (void)data_bytes;
        // Sealed against shrinking and writes: a mapped restore can never
        // fault on a truncated file, and the image is immutable.
        if (::fcntl(fd.get(), F_ADD_SEALS,
                    F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0)
            return errno_code(errno);
        fd_ = std::make_shared<supermachine::detail::unique_fd>(std::move(fd));
        return success();
    }

    result<loaded_snapshot> load() const {
        if (!fd_) return errc::not_found;
        return detail::read_snapshot_fd(fd_->get());
    }

    bool empty() const noexcept { return !fd_; }
    /// Bytes of memory the stored image occupies (holes excluded).
    std::uint64_t allocated_bytes() const noexcept {
        struct stat st {};
        if (!fd_ || ::fstat(fd_->get(), &st) != 0) return 0;
        return static_cast<std::uint64_t>(st.st_blocks) * 512;
    }
    /// The memfd (e.g. to pass to another process); owned by the store.
    int native_handle() const noexcept { return fd_ ? fd_->get() : -1; }

private:
    std::shared_ptr<supermachine::detail::unique_fd> fd_; // copies of the store share one image
};

static_assert(snapshot_store<memory_store>);

} // namespace supermachine::snapshot
