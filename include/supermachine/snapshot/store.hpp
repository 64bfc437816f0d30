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
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/snapshot/container.hpp>
#include <supermachine/snapshot/records.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>

namespace supermachine::snapshot {

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
};

template <class Store>
concept snapshot_store = requires(Store& store, const Store& const_store,
                                  const snapshot_image& image) {
    { store.save(image) } -> std::same_as<result<void>>;
    { const_store.load() } -> std::same_as<result<loaded_snapshot>>;
};

} // namespace supermachine::snapshot
