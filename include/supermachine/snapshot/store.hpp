#pragma once
// What a snapshot store is: save an image, load it (many times, each load a
// private copy-on-write view of the same RAM).
//
//   struct S {
//       result<void> save(const snapshot_image& image);
//       result<loaded_snapshot> load() const;   // callable concurrently
//   };
//
// Policies: file_store (a file on disk, RAM mapped MAP_PRIVATE from it) and
// memory_store (a sealed memfd: the same mapping semantics, no disk).
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/snapshot/container.hpp>
#include <supermachine/snapshot/records.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

namespace supermachine::snapshot {

/// Where a restored machine's RAM was mapped from (MAP_PRIVATE): the
/// snapshot file, kept open. A later snapshot of that machine uses it to skip
/// pages the guest never wrote and that are holes in the source, without
/// reading them (see snapshot_image::private_source).
struct ram_source {
    supermachine::detail::unique_fd fd;
    std::uint64_t offset = 0; // where RAM starts in the file
};

/// What to save: the records and the guest RAM they go with.
struct snapshot_image {
    snapshot_records records; // records.machine.memory_size == ram.size()
    /// Guest RAM, page aligned in size (guest_memory::host_mapping() of a
    /// paused machine). All-zero pages are not written.
    std::span<const std::byte> ram;
    /// Optional: an fd holding the same bytes as `ram` at `ram_fd_offset`
    /// (guest_memory::backing_fd() of a memfd guest). The writer then skips
    /// the fd's holes with SEEK_DATA/SEEK_HOLE without touching them, which
    /// matters for memfd RAM: reading an untouched shmem page allocates it.
    int ram_fd = -1;
    std::uint64_t ram_fd_offset = 0;
    /// Optional, for a restored machine: `ram` is a MAP_PRIVATE mapping of
    /// this source (loaded_snapshot::source). Pages the guest has not written
    /// (not anonymous in /proc/self/pagemap) equal the source, so those in
    /// its holes are skipped unread. Ignored when ram_fd is set.
    std::shared_ptr<const ram_source> private_source;

    /// An image of `memory` (one library-made mapping: allocate_x86 or a
    /// restore), with the memfd hole hint when it has one, and the restore
    /// source when given.
    static snapshot_image of(const guest_memory& memory, snapshot_records records,
                             std::shared_ptr<const ram_source> source = {}) {
        snapshot_image image;
        image.records = std::move(records);
        image.ram = memory.host_mapping();
        image.ram_fd = memory.backing_fd();
        image.private_source = std::move(source);
        return image;
    }
};

/// A validated snapshot's header and records, without its RAM (to inspect a
/// file, or to check that a cached snapshot matches before restoring it).
struct snapshot_metadata {
    snapshot_header header;
    snapshot_records records;
};

/// A restored snapshot: the parsed records and the RAM, mapped privately
/// and lazily (pages are read from the file when the guest touches them).
struct loaded_snapshot {
    snapshot_header header;
    snapshot_records records;
    guest_memory memory;
    /// The file `memory` maps; keep it with the machine and pass it to
    /// snapshot_image::of() when snapshotting the restored machine again.
    std::shared_ptr<const ram_source> source;
};

template <class Store>
concept snapshot_store = requires(Store& store, const Store& const_store,
                                  const snapshot_image& image) {
    { store.save(image) } -> std::same_as<result<void>>;
    { const_store.load() } -> std::same_as<result<loaded_snapshot>>;
};

} // namespace supermachine::snapshot
