#pragma once
// Guest memory: the guest-physical address space as host mappings, with
// bounds-checked, overflow-safe translation. Everything that reads or writes
// guest RAM (boot loader, virtqueues, vhost-user, snapshots) goes through it,
// so one check protects the host from guest-chosen addresses.
//
// The guest can change its memory at any time (other vCPUs, DMA from other
// devices): copy a structure out once, validate the copy, use the copy.
#include <supermachine/error.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef MFD_CLOEXEC
#include <sys/syscall.h>
#endif

namespace supermachine {

/// The x86-64 guest-physical memory map (Firecracker's layout.rs, checked
/// against the Linux boot protocol). One place for every fixed address.
namespace x86_layout {
inline constexpr std::uint64_t boot_gdt = 0x500;
inline constexpr std::uint64_t boot_idt = 0x520;
inline constexpr std::uint64_t zero_page = 0x7000;
inline constexpr std::uint64_t boot_stack_pointer = 0x8ff0;
inline constexpr std::uint64_t pml4 = 0x9000;
inline constexpr std::uint64_t pdpt = 0xa000;
inline constexpr std::uint64_t pd = 0xb000;
inline constexpr std::uint64_t pvh_start_info = 0x6000;
inline constexpr std::uint64_t cmdline = 0x20000;
inline constexpr std::uint64_t cmdline_max_size = 0x10000;
inline constexpr std::uint64_t ebda_start = 0x9fc00;  // ACPI tables and MP area start here
inline constexpr std::uint64_t rsdp = 0xe0000;
inline constexpr std::uint64_t acpi_area_end = 0x100000;
inline constexpr std::uint64_t kernel_start = 0x100000; // 1 MiB
inline constexpr std::uint64_t high_memory_start = 0x100000;
/// The MMIO hole below 4 GiB: RAM beyond it continues at 4 GiB.
inline constexpr std::uint64_t mmio_gap_start = 0xc000'0000; // 3 GiB
inline constexpr std::uint64_t mmio_gap_end = 0x1'0000'0000;  // 4 GiB
/// virtio-mmio device windows, one page each, inside the gap.
inline constexpr std::uint64_t virtio_mmio_base = 0xd000'0000;
inline constexpr std::uint64_t virtio_mmio_window = 0x1000;
inline constexpr std::uint64_t ioapic = 0xfec0'0000;
inline constexpr std::uint64_t lapic = 0xfee0'0000;
/// Legacy GSIs usable by virtio-mmio devices (IOAPIC pins 5..23).
inline constexpr std::uint32_t first_device_gsi = 5;
inline constexpr std::uint32_t last_device_gsi = 23;
} // namespace x86_layout

/// One contiguous guest-physical range backed by host memory.
struct memory_region {
    std::uint64_t guest_base = 0;
    std::span<std::byte> host; // host view of [guest_base, guest_base + host.size())
    int fd = -1;               // backing fd when shareable (memfd / file), else -1
    std::uint64_t fd_offset = 0;

    std::uint64_t size() const noexcept { return host.size(); }
    std::uint64_t guest_end() const noexcept { return guest_base + host.size(); }
};

/// How RAM is backed when the library allocates it.
enum class memory_backing {
    anonymous, // private anonymous memory
    memfd,     // a sealed-size memfd: shareable with vhost-user / QEMU, snapshot-friendly
};

class guest_memory {
public:
    guest_memory() = default;
    guest_memory(const guest_memory&) = delete;
    guest_memory& operator=(const guest_memory&) = delete;
    guest_memory(guest_memory&& other) noexcept { swap(other); }
    guest_memory& operator=(guest_memory&& other) noexcept {
        guest_memory tmp(std::move(other));
        swap(tmp);
        return *this;
    }
    ~guest_memory() { release(); }

    /// Allocate `bytes` of guest RAM laid out for x86: [0, min(bytes, 3 GiB))
    /// and the rest from 4 GiB. One host mapping, so a snapshot is one range.
    static result<guest_memory> allocate_x86(std::uint64_t bytes,
                                             memory_backing backing = memory_backing::memfd) {
        if (bytes < (16u << 20)) return errc::memory_too_small;
        if (bytes > (std::uint64_t{1} << 40)) return errc::memory_too_large;
        if (bytes % 4096 != 0) return errc::invalid_argument;
        int fd = -1;
        int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
        if (backing == memory_backing::memfd) {
            fd = static_cast<int>(::syscall(SYS_memfd_create, "supermachine-ram", 1u /*MFD_CLOEXEC*/));
            if (fd < 0) return errno_code(errno);
            if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
                int e = errno;
                ::close(fd);
                return errno_code(e);
            }
            flags = MAP_SHARED | MAP_NORESERVE;
        }
        void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            if (fd >= 0) ::close(fd);
            return errno_code(e);
        }
        guest_memory m;
        m.owned_ = {p, bytes};
        m.owned_fd_ = fd;
        m.add_x86_regions(static_cast<std::byte*>(p), bytes, fd, 0);
        return m;
    }

    /// Map `bytes` of guest RAM privately (copy-on-write) from `fd` at
    /// `offset`: the snapshot restore path. Pages are read lazily on first touch.
    /// The caller has checked offset + bytes against the file size.
    static result<guest_memory> map_private_x86(int fd, std::uint64_t offset, std::uint64_t bytes) {
        if (bytes == 0 || bytes % 4096 != 0 || offset % 4096 != 0) return errc::invalid_argument;
        void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd,
                         static_cast<off_t>(offset));
        if (p == MAP_FAILED) return errno_code(errno);
        guest_memory m;
        m.owned_ = {p, bytes};
        m.add_x86_regions(static_cast<std::byte*>(p), bytes, -1, 0);
        return m;
    }

    /// A non-owning view of caller memory as guest RAM at `guest_base`
    /// (tests, and vhost-user regions mapped by their owner).
    static guest_memory view(std::uint64_t guest_base, std::span<std::byte> host) {
        guest_memory m;
        m.regions_.push_back({guest_base, host, -1, 0});
        return m;
    }

    /// Add a non-owning region; rejects overlap and address overflow.
    result<void> add_region(memory_region region) {
        if (region.host.empty()) return errc::invalid_argument;
        if (region.guest_base + region.size() < region.guest_base) return errc::address_out_of_range;
        for (const auto& r : regions_)
            if (region.guest_base < r.guest_end() && r.guest_base < region.guest_end())
                return errc::invalid_argument;
        regions_.push_back(region);
        std::sort(regions_.begin(), regions_.end(),
                  [](const auto& a, const auto& b) { return a.guest_base < b.guest_base; });
        return success();
    }

    std::span<const memory_region> regions() const noexcept { return regions_; }

    /// Total bytes of guest RAM.
    std::uint64_t size() const noexcept {
        std::uint64_t n = 0;
        for (const auto& r : regions_) n += r.size();
        return n;
    }

    /// The single host mapping that holds all RAM, when the library made it
    /// (allocate_x86 / map_private_x86); empty for views.
    std::span<std::byte> host_mapping() const noexcept {
        return {static_cast<std::byte*>(owned_.first), owned_.second};
    }
    /// The memfd behind host_mapping(), or -1.
    int backing_fd() const noexcept { return owned_fd_; }

    /// Host bytes for guest range [address, address + length): the whole
    /// range must lie inside one region. Overflow-safe. length 0 is allowed
    /// at any address inside (or at the end of) a region.
    result<std::span<std::byte>> span(std::uint64_t address, std::uint64_t length) const noexcept {
        for (const auto& r : regions_) {
            if (address < r.guest_base) continue;
            const std::uint64_t offset = address - r.guest_base;
            if (offset > r.size() || (offset == r.size() && length != 0)) continue;
            if (length > r.size() - offset) break; // straddles the end: refuse
            return r.host.subspan(offset, length);
        }
        return errc::address_out_of_range;
    }

    bool contains(std::uint64_t address, std::uint64_t length) const noexcept {
        return span(address, length).has_value();
    }

    result<void> read(std::uint64_t address, std::span<std::byte> out) const noexcept {
        SUPERMACHINE_TRY(src, span(address, out.size()));
        std::memcpy(out.data(), src.data(), out.size());
        return success();
    }

    result<void> write(std::uint64_t address, std::span<const std::byte> in) const noexcept {
        SUPERMACHINE_TRY(dst, span(address, in.size()));
        std::memcpy(dst.data(), in.data(), in.size());
        return success();
    }

    /// Copy a trivially copyable object out of guest memory (one snapshot
    /// of guest-controlled bytes; validate the copy, not the memory).
    template <class T>
    result<T> read_object(std::uint64_t address) const noexcept {
        static_assert(std::is_trivially_copyable_v<T>);
        T value;
        SUPERMACHINE_TRY(read(address, std::as_writable_bytes(std::span(&value, 1))));
        return value;
    }

    template <class T>
    result<void> write_object(std::uint64_t address, const T& value) const noexcept {
        static_assert(std::is_trivially_copyable_v<T>);
        return write(address, std::as_bytes(std::span(&value, 1)));
    }

private:
    void add_x86_regions(std::byte* base, std::uint64_t bytes, int fd, std::uint64_t fd_offset) {
        const std::uint64_t low = std::min(bytes, x86_layout::mmio_gap_start);
        regions_.push_back({0, {base, low}, fd, fd_offset});
        if (bytes > low)
            regions_.push_back({x86_layout::mmio_gap_end, {base + low, bytes - low}, fd, fd_offset + low});
    }

    void release() noexcept {
        if (owned_.first) ::munmap(owned_.first, owned_.second);
        if (owned_fd_ >= 0) ::close(owned_fd_);
        owned_ = {nullptr, 0};
        owned_fd_ = -1;
        regions_.clear();
    }

    void swap(guest_memory& other) noexcept {
        std::swap(regions_, other.regions_);
        std::swap(owned_, other.owned_);
        std::swap(owned_fd_, other.owned_fd_);
    }

    std::vector<memory_region> regions_;
    std::pair<void*, std::size_t> owned_{nullptr, 0};
    int owned_fd_ = -1;
};

} // namespace supermachine
