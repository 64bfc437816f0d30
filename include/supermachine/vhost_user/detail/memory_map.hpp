#pragma once
// The front-end's memory table mapped into this process: one shared mapping
// per region fd, exposed as a guest_memory (guest-physical view) plus the
// front-end-user-address view that SET_VRING_ADDR speaks in.
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/memory.hpp>
#include <supermachine/vhost_user/message.hpp>

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <optional>
#include <span>
#include <vector>

namespace supermachine::vhost_user::detail {

class memory_map {
public:
    struct region {
        memory_region_description description;
        void* mapping = nullptr; // page-aligned start of the mmap
        std::size_t mapping_length = 0;
        std::byte* host = nullptr; // host address of guest_address
    };

    memory_map() = default;
    memory_map(const memory_map&) = delete;
    memory_map& operator=(const memory_map&) = delete;
    memory_map(memory_map&& other) noexcept
        : regions_(std::move(other.regions_))
        , memory_(std::move(other.memory_)) {
        other.regions_.clear();
    }
    memory_map& operator=(memory_map&& other) noexcept {
        if (this != &other) {
            unmap();
            regions_ = std::move(other.regions_);
            other.regions_.clear();
            memory_ = std::move(other.memory_);
        }
        return *this;
    }
    ~memory_map() { unmap(); }

    /// Map every region of `table` from its fd. Rejects zero sizes, address
    /// overflow (guest, user or file offset), overlap in guest or user
    /// space, and fds shorter than the range claimed (a later access would
    /// SIGBUS the whole process).
    static result<memory_map> create(const memory_table& table,
                                     std::span<const supermachine::detail::unique_fd> fds) {
        if (table.count == 0 || table.count > max_memory_regions || fds.size() != table.count)
            return errc::vhost_user_protocol_error;
        const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
        memory_map map;
        for (std::size_t i = 0; i < table.count; ++i) {
            const auto& d = table.regions[i];
            if (d.size == 0) return errc::invalid_argument;
            if (d.guest_address + d.size < d.guest_address ||
                d.user_address + d.size < d.user_address || d.mmap_offset + d.size < d.mmap_offset)
                return errc::address_out_of_range;
            if (d.size > std::uint64_t{1} << 46) return errc::memory_too_large;
            for (const auto& other : map.regions_) {
                const auto& o = other.description;
                if (d.user_address < o.user_address + o.size &&
                    o.user_address < d.user_address + d.size)
                    return errc::invalid_argument;
            }
            struct stat st {};
            if (::fstat(fds[i].get(), &st) != 0) return errno_code(errno);
            if (!S_ISREG(st.st_mode)) return errc::invalid_argument; // memfd, shm, hugetlbfs files
            if (static_cast<std::uint64_t>(st.st_size) < d.mmap_offset + d.size)
                return errc::address_out_of_range;
            const std::uint64_t aligned_offset = d.mmap_offset & ~(page - 1);
            const std::uint64_t length = d.size + (d.mmap_offset - aligned_offset);
            void* p = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                             fds[i].get(), static_cast<off_t>(aligned_offset));
            if (p == MAP_FAILED) return errno_code(errno);
            region r{d, p, static_cast<std::size_t>(length),
                     static_cast<std::byte*>(p) + (d.mmap_offset - aligned_offset)};
            map.regions_.push_back(r); // owned from here: unmapped on any later failure
            if (auto added =
                    map.memory_.add_region({d.guest_address, {r.host, d.size}, -1, d.mmap_offset});
                !added)
                return added.error(); // guest-physical overlap
        }
        return map;
    }

    const guest_memory& memory() const noexcept { return memory_; }
    std::span<const region> regions() const noexcept { return regions_; }

    /// Front-end user address → guest-physical address; the whole
    /// [user, user + length) must lie inside one region.
    std::optional<std::uint64_t> user_to_guest(std::uint64_t user,
                                               std::uint64_t length) const noexcept {
        for (const auto& r : regions_) {
            const auto& d = r.description;
            if (user < d.user_address) continue;
            const std::uint64_t offset = user - d.user_address;
            if (offset >= d.size || length > d.size - offset) continue;
            return d.guest_address + offset;
        }
        return std::nullopt;
    }

private:
    void unmap() noexcept {
        for (auto& r : regions_)
            ::munmap(r.mapping, r.mapping_length);
        regions_.clear();
        memory_ = guest_memory{};
    }

    std::vector<region> regions_;
    guest_memory memory_;
};

} // namespace supermachine::vhost_user::detail
