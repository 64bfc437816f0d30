#pragma once
// On-disk ext4 structures as byte offsets (little-endian), and the pieces of
// the format that need code: xattr hashes and packing, directory blocks,
// device numbers. Offsets follow the kernel's Documentation/filesystems/ext4.
#include <supermachine/error.hpp>
#include <supermachine/oci/tar_reader.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::oci::detail {

inline constexpr std::uint32_t ext4_block_size = 4096;
inline constexpr std::uint32_t ext4_blocks_per_group = 8 * ext4_block_size; // one bitmap block
inline constexpr std::uint32_t ext4_inode_size = 256;
inline constexpr std::uint32_t ext4_inodes_per_block = ext4_block_size / ext4_inode_size;
inline constexpr std::uint32_t ext4_extra_isize = 32;
inline constexpr std::uint32_t ext4_first_inode = 11; // lost+found
inline constexpr std::uint32_t ext4_root_inode = 2;
inline constexpr std::uint32_t ext4_max_extent_length = 32768; // initialized extent
inline constexpr std::uint32_t ext4_extents_per_block = (ext4_block_size - 12) / 12;
inline constexpr std::uint32_t ext4_link_max = 65000;
inline constexpr std::size_t ext4_inline_xattr_space =
    ext4_inode_size - 128 - ext4_extra_isize - 4; // after the 4-byte magic

// Superblock features we set (no journal, no checksums: e2fsck and Linux accept it as ext4).
inline constexpr std::uint32_t ext4_compat_ext_attr = 0x8;
inline constexpr std::uint32_t ext4_incompat_filetype = 0x2;
inline constexpr std::uint32_t ext4_incompat_extents = 0x40;
inline constexpr std::uint32_t ext4_ro_compat_sparse_super = 0x1;
inline constexpr std::uint32_t ext4_ro_compat_large_file = 0x2;
inline constexpr std::uint32_t ext4_ro_compat_dir_nlink = 0x20;
inline constexpr std::uint32_t ext4_ro_compat_extra_isize = 0x40;

inline constexpr std::uint32_t ext4_extents_flag = 0x80000;

enum ext4_file_type : std::uint8_t {
    ft_unknown = 0,
    ft_regular = 1,
    ft_directory = 2,
    ft_char_device = 3,
    ft_block_device = 4,
    ft_fifo = 5,
    ft_socket = 6,
    ft_symlink = 7,
};

inline void put16(std::span<std::byte> b, std::size_t at, std::uint16_t v) {
    b[at] = std::byte(v & 0xff);
    b[at + 1] = std::byte(v >> 8);
}
inline void put32(std::span<std::byte> b, std::size_t at, std::uint32_t v) {
    for (int i = 0; i < 4; ++i)
        b[at + i] = std::byte((v >> (8 * i)) & 0xff);
}
inline std::uint32_t get32(std::span<const std::byte> b, std::size_t at) {
    std::uint32_t v = 0;
    for (int i = 3; i >= 0; --i)
        v = (v << 8) | std::to_integer<std::uint32_t>(b[at + i]);
    return v;
}

/// Sparse-super: groups 0, 1 and powers of 3, 5, 7 carry superblock backups.
inline bool ext4_group_has_super(std::uint32_t group) {
    if (group <= 1) return true;
    for (std::uint32_t base : {3u, 5u, 7u}) {
        std::uint64_t p = base;
        while (p < group)
            p *= base;
        if (p == group) return true;
    }
    return false;
}

/// ext4 seconds + extra field: low 32 bits signed, 2 epoch bits, nanoseconds << 2.
inline void ext4_encode_time(std::int64_t seconds, std::uint32_t nsec, std::uint32_t& low,
                             std::uint32_t& extra) {
    // Representable range: [-2^31, 2^34 - 2^31); clamp outside it.
    constexpr std::int64_t min = -(std::int64_t{1} << 31);
    constexpr std::int64_t max = (std::int64_t{1} << 34) - (std::int64_t{1} << 31) - 1;
    seconds = std::clamp(seconds, min, max);
    low = static_cast<std::uint32_t>(seconds);
    std::uint32_t epoch =
        static_cast<std::uint32_t>(((seconds - static_cast<std::int32_t>(low)) >> 32) & 3);
    extra = epoch | (std::min(nsec, 999999999u) << 2);
}

// ---- extended attributes ----

struct ext4_xattr {
    std::uint8_t index; // 1 user, 4 trusted, 6 security
    std::string name;   // without the prefix
    std::string value;
};

/// A POSIX ACL in the VFS xattr format (what tar layers carry: version 2, 8-byte
/// entries) → ext4's on-disk format (version 1; short 4-byte entries for the
/// owner/group/mask/other tags). False if malformed.
inline bool ext4_acl_from_vfs(std::string_view vfs, std::string& disk) {
    auto u16 = [&](std::size_t at) {
        return static_cast<std::uint16_t>(static_cast<unsigned char>(vfs[at]) |
                                          static_cast<unsigned char>(vfs[at + 1]) << 8);
    };
    if (vfs.size() < 4 || (vfs.size() - 4) % 8 != 0 || vfs.size() > 4 + 8 * 1024) return false;
    if (u16(0) != 2 || vfs[2] != 0 || vfs[3] != 0) return false;
    disk.assign("\x01\x00\x00\x00", 4);
    for (std::size_t at = 4; at < vfs.size(); at += 8) {
        std::uint16_t tag = u16(at);
        switch (tag) {
        case 0x01:
        case 0x04:
        case 0x10:
        case 0x20: // USER_OBJ GROUP_OBJ MASK OTHER
            disk.append(vfs.substr(at, 4));
            break;
        case 0x02:
        case 0x08: // USER GROUP: with the id
            disk.append(vfs.substr(at, 8));
            break;
        default:
            return false;
        }
    }
    return true;
}

/// Map "security.capability" to (6, "capability"), POSIX ACLs to their ext4
/// indexes (2, 3) in ext4's format; false for what ext4 cannot hold.
inline bool ext4_xattr_from(const xattr& x, ext4_xattr& out) {
    struct prefix {
        std::string_view text;
        std::uint8_t index;
    };
    if (x.name == "system.posix_acl_access" || x.name == "system.posix_acl_default") {
        out.index = x.name == "system.posix_acl_access" ? 2 : 3;
        out.name.clear();
        return ext4_acl_from_vfs(x.value, out.value);
    }
    static constexpr prefix prefixes[] = {{"user.", 1}, {"trusted.", 4}, {"security.", 6}};
    for (auto& p : prefixes)
        if (std::string_view(x.name).starts_with(p.text) && x.name.size() > p.text.size()) {
            out.index = p.index;
            out.name = x.name.substr(p.text.size());
            out.value = x.value;
            return out.name.size() <= 255;
        }
    return false;
}

inline std::size_t ext4_xattr_entry_size(const ext4_xattr& x) {
    return (16 + x.name.size() + 3) & ~std::size_t{3};
}
inline std::size_t ext4_xattr_value_size(const ext4_xattr& x) {
    return (x.value.size() + 3) & ~std::size_t{3};
}

/// Bytes the attributes need in a region (entries + 4-byte terminator + values).
inline std::size_t ext4_xattr_space(const std::vector<ext4_xattr>& xs) {
    std::size_t n = 4;
    for (auto& x : xs)
        n += ext4_xattr_entry_size(x) + ext4_xattr_value_size(x);
    return n;
}

inline std::uint32_t ext4_xattr_hash(const ext4_xattr& x) {
    std::uint32_t hash = 0;
    for (char c : x.name) // e2fsprogs hashes the name as signed char
        hash = (hash << 5) ^ (hash >> 27) ^ static_cast<std::uint32_t>(static_cast<signed char>(c));
    if (!x.value.empty()) {
        std::string padded = x.value;
        padded.resize(ext4_xattr_value_size(x), '\0');
        for (std::size_t i = 0; i < padded.size(); i += 4) {
            std::uint32_t word = 0;
            for (int k = 3; k >= 0; --k)
                word = (word << 8) | static_cast<unsigned char>(padded[i + k]);
            hash = (hash << 16) ^ (hash >> 16) ^ word;
        }
    }
    return hash;
}

/// Sorted as the kernel expects in a block: (index, name length, name).
inline void ext4_sort_xattrs(std::vector<ext4_xattr>& xs) {
    std::sort(xs.begin(), xs.end(), [](const ext4_xattr& a, const ext4_xattr& b) {
        if (a.index != b.index) return a.index < b.index;
        if (a.name.size() != b.name.size()) return a.name.size() < b.name.size();
        return a.name < b.name;
    });
}

/// Write entries at `region[entries_at..]` and values packed at the end of `region`;
/// value offsets are relative to `offset_base`. Returns the block hash.
inline std::uint32_t ext4_pack_xattrs(std::span<std::byte> region, std::size_t entries_at,
                                      std::size_t offset_base, const std::vector<ext4_xattr>& xs) {
    std::size_t entry = entries_at;
    std::size_t value_end = region.size();
    std::uint32_t block_hash = 0;
    for (auto& x : xs) {
        std::size_t vsize = ext4_xattr_value_size(x);
        value_end -= vsize;
        std::memcpy(region.data() + value_end, x.value.data(), x.value.size());
        std::uint32_t hash = ext4_xattr_hash(x);
        region[entry] = std::byte(x.name.size());
        region[entry + 1] = std::byte(x.index);
        put16(region, entry + 2,
              static_cast<std::uint16_t>(x.value.empty() ? 0 : value_end - offset_base));
        put32(region, entry + 4, 0);
        put32(region, entry + 8, static_cast<std::uint32_t>(x.value.size()));
        put32(region, entry + 12, hash);
        std::memcpy(region.data() + entry + 16, x.name.data(), x.name.size());
        entry += ext4_xattr_entry_size(x);
        block_hash = (block_hash << 16) ^ (block_hash >> 16) ^ hash;
    }
    put32(region, entry, 0); // end of entries
    return block_hash;
}

// ---- directories ----

inline std::uint32_t ext4_dirent_size(std::size_t name_length) {
    return static_cast<std::uint32_t>((8 + name_length + 3) & ~std::size_t{3});
}

/// Packs directory entries into blocks; with no output span it only counts blocks.
class ext4_dir_packer {
public:
    explicit ext4_dir_packer(std::vector<std::byte>* out)
        : out_(out) {}

    void add(std::string_view name, std::uint32_t inode, std::uint8_t type) {
        std::uint32_t size = ext4_dirent_size(name.size());
        if (blocks_ == 0 || offset_ + size > ext4_block_size) {
            close_block();
            ++blocks_;
            offset_ = 0;
            if (out_) out_->resize(std::size_t{blocks_} * ext4_block_size);
        }
        if (out_) {
            auto b = std::span(*out_).subspan(std::size_t{blocks_ - 1} * ext4_block_size,
                                              ext4_block_size);
            put32(b, offset_, inode);
            put16(b, offset_ + 4, static_cast<std::uint16_t>(size));
            b[offset_ + 6] = std::byte(name.size());
            b[offset_ + 7] = std::byte(type);
            std::memcpy(b.data() + offset_ + 8, name.data(), name.size());
        }
        last_ = offset_;
        offset_ += size;
    }

    /// Finish: the last entry of each block stretches to the block's end.
    std::uint32_t finish() {
        close_block();
        return blocks_;
    }

private:
    void close_block() {
        if (blocks_ == 0 || !out_) return;
        auto b =
            std::span(*out_).subspan(std::size_t{blocks_ - 1} * ext4_block_size, ext4_block_size);
        put16(b, last_ + 4, static_cast<std::uint16_t>(ext4_block_size - last_));
    }
    std::vector<std::byte>* out_;
    std::uint32_t blocks_ = 0, offset_ = 0, last_ = 0;
};

} // namespace supermachine::oci::detail
