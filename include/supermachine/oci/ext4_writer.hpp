#pragma once
// Write a filesystem_tree as an ext4 image, in-process (no mkfs, no mount).
//
// Format: 4 KiB blocks, 256-byte inodes, extents, filetype, sparse_super,
// large_file, dir_nlink, extra_isize, ext_attr; no journal and no metadata
// checksums (Linux mounts it as ext4; e2fsck -fn finds it clean). Directories
// are linear. The layout is planned from metadata alone, then file data is
// copied from the tree's spool straight to its blocks (copy_file_range), so
// memory stays bounded by metadata. Free blocks are holes in the image file.
#include <supermachine/error.hpp>
#include <supermachine/oci/detail/ext4_format.hpp>
#include <supermachine/oci/filesystem_tree.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace supermachine::oci {

struct ext4_options {
    double free_space_ratio = 0.20; ///< extra free space, share of content
    std::uint64_t free_space_bytes = std::uint64_t{64} << 20; ///< plus this much
    std::uint64_t min_size_bytes = 0;                         ///< at least this big
    std::uint64_t max_size_bytes = std::uint64_t{1} << 40;    ///< refuse larger (image_too_large)
    std::uint32_t bytes_per_inode = 16384; ///< free inodes for the guest, like mke2fs
    std::int64_t timestamp = 0;            ///< filesystem times (mkfs/write)
    std::array<std::uint8_t, 16> uuid{};   ///< all zero: random
    std::string volume_label = "rootfs";
};

struct ext4_stats {
    std::uint64_t blocks_total = 0, blocks_used = 0;
    std::uint32_t inodes_total = 0, inodes_used = 0;
    std::uint32_t groups = 0;
    std::uint64_t image_bytes = 0;
    std::uint64_t dropped_xattrs = 0; ///< namespaces ext4 cannot hold as-is (system.*)
};

namespace detail {

struct ext4_extent {
    std::uint32_t logical;
    std::uint32_t physical;
    std::uint32_t length;
};

struct ext4_planned_inode {
    node_id node = 0;
    std::uint32_t links = 0;
    std::uint32_t parent = 0;      ///< directories: the parent's inode number
    std::uint32_t data_blocks = 0; ///< blocks holding data (dir blocks, file data, symlink)
    std::vector<ext4_extent> extents;
    std::vector<std::uint32_t> leaf_blocks; ///< extent tree leaves when > 4 extents
    std::uint32_t xattr_block = 0;
    bool xattrs_in_inode = false;
    bool synthetic_lost_found = false;
};

class ext4_plan {
public:
    ext4_plan(const filesystem_tree& tree, const ext4_options& options)
        : tree_(tree)
        , options_(options) {}

    result<ext4_stats> write(int fd) {
        SUPERMACHINE_TRY(number_inodes());
        SUPERMACHINE_TRY(size_and_allocate());
        if (::ftruncate(fd, static_cast<off_t>(total_blocks_ * ext4_block_size)) != 0)
            return errno_code(errno);
        SUPERMACHINE_TRY(write_contents(fd));
        SUPERMACHINE_TRY(write_metadata(fd));
        ext4_stats s;
        s.blocks_total = total_blocks_;
        s.blocks_used = used_blocks_;
        s.inodes_total = inodes_per_group_ * groups_;
        s.inodes_used = static_cast<std::uint32_t>(inodes_.size() - 1);
        s.groups = groups_;
        s.image_bytes = total_blocks_ * ext4_block_size;
        s.dropped_xattrs = dropped_xattrs_;
        return s;
    }

private:
    // ---- pass 1: inode numbers, link counts, sizes in blocks ----
    result<void> number_inodes() {
        std::vector<std::uint32_t> ino_of(tree_.node_count(), 0);
        inodes_.resize(ext4_first_inode + 1); // 0 unused, 1..10 reserved, 11 lost+found
        inodes_[ext4_root_inode].node = filesystem_tree::root();
        inodes_[ext4_root_inode].parent = ext4_root_inode;
        ino_of[filesystem_tree::root()] = ext4_root_inode;
        const auto& root_children = tree_.node(filesystem_tree::root()).children;
        auto lf = root_children.find("lost+found");
        if (lf == root_children.end()) {
            inodes_[ext4_first_inode].synthetic_lost_found = true;
            inodes_[ext4_first_inode].parent = ext4_root_inode;
        } else if (tree_.node(lf->second.node).kind == node_kind::directory) {
            inodes_[ext4_first_inode].node = lf->second.node;
            inodes_[ext4_first_inode].parent = ext4_root_inode;
            ino_of[lf->second.node] = ext4_first_inode;
        } else {
            inodes_.pop_back(); // a non-directory lost+found: the first file takes inode 11
        }
        // Depth-first, children in name order: siblings get neighbouring inodes and blocks.
        std::vector<node_id> work{filesystem_tree::root()};
        while (!work.empty()) {
            node_id dir = work.back();
            work.pop_back();
            std::uint32_t dir_ino = ino_of[dir];
            const auto& children = tree_.node(dir).children;
            std::size_t first_pushed = work.size();
            for (auto it = children.begin(); it != children.end(); ++it) {
                node_id child = it->second.node;
                const tree_node& n = tree_.node(child);
                if (ino_of[child] == 0) {
                    if (inodes_.size() >= 0xffffffffu)
                        return make_error_code(errc::image_too_large);
                    ino_of[child] = static_cast<std::uint32_t>(inodes_.size());
                    inodes_.push_back({});
                    inodes_.back().node = child;
                    if (n.kind == node_kind::directory) {
                        inodes_.back().parent = dir_ino;
                        work.push_back(child);
                    }
                } else if (n.kind == node_kind::directory) {
                    if (ino_of[child] == ext4_first_inode)
                        work.push_back(child); // lost+found
                    else
                        return make_error_code(errc::archive_malformed); // a directory twice
                }
                auto& p = inodes_[ino_of[child]];
                if (n.kind != node_kind::directory && ++p.links > ext4_link_max)
                    return make_error_code(errc::image_too_large);
            }
            std::reverse(work.begin() + static_cast<std::ptrdiff_t>(first_pushed), work.end());
        }
        ino_of_ = std::move(ino_of);
        // Directory link counts: 2 + subdirectories (1 when too many: dir_nlink).
        for (std::uint32_t ino = 2; ino < inodes_.size(); ++ino) {
            auto& p = inodes_[ino];
            if (ino < ext4_first_inode && ino != ext4_root_inode) continue;
            if (!is_directory(ino)) continue;
            std::uint64_t subdirs = 0;
            if (!p.synthetic_lost_found)
                for (auto& [name, c] : tree_.node(p.node).children)
                    if (tree_.node(c.node).kind == node_kind::directory) ++subdirs;
            if (ino == ext4_root_inode && inodes_.size() > ext4_first_inode &&
                inodes_[ext4_first_inode].synthetic_lost_found)
                ++subdirs;
            p.links = subdirs + 2 >= ext4_link_max ? 1 : static_cast<std::uint32_t>(subdirs + 2);
        }
        return success();
    }

    bool is_directory(std::uint32_t ino) const {
        const auto& p = inodes_[ino];
        if (p.synthetic_lost_found) return true;
        if (ino < ext4_first_inode && ino != ext4_root_inode) return false;
        return tree_.node(p.node).kind == node_kind::directory;
    }
    bool is_reserved(std::uint32_t ino) const {
        return ino < ext4_first_inode && ino != ext4_root_inode;
    }

    template <class Sink>
    void for_each_dirent(std::uint32_t ino, Sink&& sink) const {
        const auto& p = inodes_[ino];
        sink(std::string_view("."), ino, ft_directory);
        sink(std::string_view(".."), p.parent, ft_directory);
        if (p.synthetic_lost_found) return;
        if (ino == ext4_root_inode && inodes_.size() > ext4_first_inode &&
            inodes_[ext4_first_inode].synthetic_lost_found)
            sink(std::string_view("lost+found"), ext4_first_inode, ft_directory);
        for (auto& [name, c] : tree_.node(p.node).children)
            sink(std::string_view(name), ino_of_[c.node], file_type(tree_.node(c.node).kind));
    }

    static std::uint8_t file_type(node_kind k) {
        switch (k) {
        case node_kind::regular:
            return ft_regular;
        case node_kind::directory:
            return ft_directory;
        case node_kind::symlink:
            return ft_symlink;
        case node_kind::char_device:
            return ft_char_device;
        case node_kind::block_device:
            return ft_block_device;
        case node_kind::fifo:
            return ft_fifo;
        case node_kind::socket:
            return ft_socket;
        }
        return ft_unknown;
    }

    result<std::uint32_t> data_blocks_of(std::uint32_t ino) {
        if (is_directory(ino)) {
            ext4_dir_packer packer(nullptr);
            for_each_dirent(ino, [&](std::string_view name, std::uint32_t, std::uint8_t) {
                packer.add(name, 0, 0);
            });
            return packer.finish();
        }
        const tree_node& n = tree_.node(inodes_[ino].node);
        if (n.kind == node_kind::regular) {
            std::uint64_t blocks = (n.size + ext4_block_size - 1) / ext4_block_size;
            if (blocks > 0xffffffffu / 2) return make_error_code(errc::image_too_large);
            return static_cast<std::uint32_t>(blocks);
        }
        if (n.kind == node_kind::symlink && n.link_target.size() >= 60) {
            if (n.link_target.size() > ext4_block_size - 1)
                return make_error_code(errc::archive_malformed);
            return 1u;
        }
        return 0u;
    }

    // ---- pass 2: geometry and block allocation ----
    result<void> size_and_allocate() {
        std::uint64_t content_blocks = 0;
        block_needs_.assign(inodes_.size(), 0);
        xattr_sets_.resize(inodes_.size());
        for (std::uint32_t ino = 2; ino < inodes_.size(); ++ino) {
            if (is_reserved(ino)) continue;
            SUPERMACHINE_TRY(blocks, data_blocks_of(ino));
            block_needs_[ino] = blocks;
            content_blocks += blocks + blocks / (ext4_extents_per_block * 1024) + 1;
            if (!inodes_[ino].synthetic_lost_found) {
                auto& xs = xattr_sets_[ino];
                for (auto& x : tree_.node(inodes_[ino].node).xattrs) {
                    ext4_xattr e;
                    if (ext4_xattr_from(x, e))
                        xs.push_back(std::move(e));
                    else
                        ++dropped_xattrs_;
                }
                ext4_sort_xattrs(xs);
                if (!xs.empty()) {
                    auto space = ext4_xattr_space(xs);
                    if (space <= ext4_inline_xattr_space)
                        inodes_[ino].xattrs_in_inode = true;
                    else if (space + 32 <= ext4_block_size)
                        ++content_blocks;
                    else
                        return make_error_code(errc::image_too_large);
                }
            }
        }
        std::uint64_t wanted =
            content_blocks +
            static_cast<std::uint64_t>(static_cast<double>(content_blocks) * options_.free_space_ratio) +
            options_.free_space_bytes / ext4_block_size;
        wanted = std::max<std::uint64_t>(wanted, options_.min_size_bytes / ext4_block_size);
        wanted = std::max<std::uint64_t>(wanted, 1024);
        for (int attempt = 0; attempt < 64; ++attempt) {
            if (wanted * ext4_block_size > options_.max_size_bytes ||
                wanted >= (std::uint64_t{1} << 32))
                return make_error_code(errc::image_too_large);
            SUPERMACHINE_TRY(fits, try_layout(wanted));
            if (fits) return success();
            wanted += wanted / 8 + 1024;
        }
        return make_error_code(errc::image_too_large);
    }

    result<bool> try_layout(std::uint64_t blocks) {
        total_blocks_ = blocks;
        groups_ = static_cast<std::uint32_t>((blocks + ext4_blocks_per_group - 1) /
                                             ext4_blocks_per_group);
        std::uint64_t used_inodes = inodes_.size() - 1;
        std::uint64_t want_inodes =
            std::max<std::uint64_t>(used_inodes + used_inodes / 10 + 64,
                                    blocks * ext4_block_size / options_.bytes_per_inode);
        std::uint64_t per_group = (want_inodes + groups_ - 1) / groups_;
        per_group =
            (per_group + ext4_inodes_per_block - 1) / ext4_inodes_per_block * ext4_inodes_per_block;
        if (per_group > ext4_blocks_per_group) {
            if (used_inodes > std::uint64_t{ext4_blocks_per_group} * groups_) return false;
            per_group = ext4_blocks_per_group;
        }
        inodes_per_group_ = static_cast<std::uint32_t>(per_group);
        gdt_blocks_ = (groups_ * 32 + ext4_block_size - 1) / ext4_block_size;
        inode_table_blocks_ = inodes_per_group_ / ext4_inodes_per_block;
        // The last group must hold its own metadata plus some data.
        if (data_start(groups_ - 1) + 16 > total_blocks_) return false;
        // Allocate in inode order.
        allocated_in_group_.assign(groups_, 0);
        cursor_group_ = 0;
        cursor_ = data_start(0);
        for (std::uint32_t ino = 2; ino < inodes_.size(); ++ino) {
            auto& p = inodes_[ino];
            p.extents.clear();
            p.leaf_blocks.clear();
            p.xattr_block = 0;
            if (is_reserved(ino)) continue;
            std::uint32_t need = block_needs_[ino];
            p.data_blocks = need;
            std::uint32_t logical = 0;
            while (need) {
                std::uint32_t start, length;
                if (!allocate(std::min(need, ext4_max_extent_length), start, length)) return false;
                if (!p.extents.empty() &&
                    p.extents.back().physical + p.extents.back().length == start &&
                    p.extents.back().length + length <= ext4_max_extent_length)
                    p.extents.back().length += length;
                else
                    p.extents.push_back({logical, start, length});
                logical += length;
                need -= length;
            }
            if (p.extents.size() > 4) {
                std::size_t leaves =
                    (p.extents.size() + ext4_extents_per_block - 1) / ext4_extents_per_block;
                if (leaves > 4) return make_error_code(errc::image_too_large); // > ~170 GiB file
                for (std::size_t i = 0; i < leaves; ++i) {
                    std::uint32_t start, length;
                    if (!allocate(1, start, length)) return false;
                    p.leaf_blocks.push_back(start);
                }
            }
            if (!xattr_sets_[ino].empty() && !p.xattrs_in_inode) {
                std::uint32_t start, length;
                if (!allocate(1, start, length)) return false;
                p.xattr_block = start;
            }
        }
        used_blocks_ = 0;
        for (std::uint32_t g = 0; g < groups_; ++g)
            used_blocks_ += (data_start(g) - group_start(g)) + allocated_in_group_[g];
        return true;
    }

    std::uint64_t group_start(std::uint32_t g) const {
        return std::uint64_t{g} * ext4_blocks_per_group;
    }
    std::uint64_t group_end(std::uint32_t g) const {
        return std::min<std::uint64_t>(group_start(g) + ext4_blocks_per_group, total_blocks_);
    }
    std::uint64_t block_bitmap(std::uint32_t g) const {
        return group_start(g) + (ext4_group_has_super(g) ? 1 + gdt_blocks_ : 0);
    }
    std::uint64_t inode_bitmap(std::uint32_t g) const { return block_bitmap(g) + 1; }
    std::uint64_t inode_table(std::uint32_t g) const { return block_bitmap(g) + 2; }
    std::uint64_t data_start(std::uint32_t g) const { return inode_table(g) + inode_table_blocks_; }

    bool allocate(std::uint32_t want, std::uint32_t& start, std::uint32_t& length) {
        while (cursor_group_ < groups_ && cursor_ >= group_end(cursor_group_)) {
            ++cursor_group_;
            if (cursor_group_ < groups_) cursor_ = data_start(cursor_group_);
        }
        if (cursor_group_ >= groups_) return false;
        std::uint64_t room = group_end(cursor_group_) - cursor_;
        length = static_cast<std::uint32_t>(std::min<std::uint64_t>(want, room));
        start = static_cast<std::uint32_t>(cursor_);
        cursor_ += length;
        allocated_in_group_[cursor_group_] += length;
        return true;
    }

    // ---- pass 3: contents ----
    result<void> pwrite_all(int fd, std::span<const std::byte> data, std::uint64_t offset) {
        while (!data.empty()) {
            ssize_t n = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno_code(errno);
            }
            data = data.subspan(static_cast<std::size_t>(n));
            offset += static_cast<std::uint64_t>(n);
        }
        return success();
    }

    // Copy `length` bytes of the spool at `from` to the image at `to` (in the kernel when it can).
    result<void> copy_from_spool(int fd, std::uint64_t from, std::uint64_t to,
                                 std::uint64_t length) {
        int spool = tree_.spool().fd();
        while (length && use_copy_file_range_) {
            loff_t in = static_cast<loff_t>(from), out = static_cast<loff_t>(to);
            ssize_t n = ::copy_file_range(spool, &in, fd, &out, length, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL) {
                    use_copy_file_range_ = false;
                    break;
                }
                return errno_code(errno);
            }
            if (n == 0) return make_error_code(errc::io_error);
            from += static_cast<std::uint64_t>(n);
            to += static_cast<std::uint64_t>(n);
            length -= static_cast<std::uint64_t>(n);
        }
        std::vector<std::byte> buffer;
        while (length) {
            buffer.resize(static_cast<std::size_t>(std::min<std::uint64_t>(length, 1 << 20)));
            SUPERMACHINE_TRY(tree_.spool().read_at(from, buffer));
            SUPERMACHINE_TRY(pwrite_all(fd, buffer, to));
            from += buffer.size();
            to += buffer.size();
            length -= buffer.size();
        }
        return success();
    }

    result<void> write_extents(int fd, const ext4_planned_inode& p,
                               std::span<const std::byte> data) {
        for (auto& e : p.extents) {
            std::uint64_t at = std::uint64_t{e.logical} * ext4_block_size;
            if (at >= data.size()) break;
            std::uint64_t n = std::min<std::uint64_t>(std::uint64_t{e.length} * ext4_block_size,
                                                      data.size() - at);
            SUPERMACHINE_TRY(
                pwrite_all(fd, data.subspan(at, n), std::uint64_t{e.physical} * ext4_block_size));
        }
        return success();
    }

    result<void> write_contents(int fd) {
        std::vector<std::byte> buffer;
        for (std::uint32_t ino = 2; ino < inodes_.size(); ++ino) {
            if (is_reserved(ino)) continue;
            const auto& p = inodes_[ino];
            if (is_directory(ino)) {
                buffer.clear();
                ext4_dir_packer packer(&buffer);
                for_each_dirent(ino, [&](std::string_view name, std::uint32_t child,
                                         std::uint8_t type) { packer.add(name, child, type); });
                packer.finish();
                SUPERMACHINE_TRY(write_extents(fd, p, buffer));
            } else {
                const tree_node& n = tree_.node(p.node);
                if (n.kind == node_kind::regular) {
                    for (auto& e : p.extents) {
                        std::uint64_t at = std::uint64_t{e.logical} * ext4_block_size;
                        std::uint64_t len = std::min<std::uint64_t>(
                            std::uint64_t{e.length} * ext4_block_size, n.size - at);
                        SUPERMACHINE_TRY(
                            copy_from_spool(fd, n.data_offset + at,
                                            std::uint64_t{e.physical} * ext4_block_size, len));
                    }
                } else if (n.kind == node_kind::symlink && !p.extents.empty()) {
                    SUPERMACHINE_TRY(write_extents(fd, p, std::as_bytes(std::span(n.link_target))));
                }
            }
            // Extent tree leaves.
            for (std::size_t leaf = 0; leaf < p.leaf_blocks.size(); ++leaf) {
                std::array<std::byte, ext4_block_size> block{};
                std::size_t first = leaf * ext4_extents_per_block;
                std::size_t count =
                    std::min<std::size_t>(ext4_extents_per_block, p.extents.size() - first);
                write_extent_node(block, std::span(p.extents).subspan(first, count),
                                  ext4_extents_per_block);
                SUPERMACHINE_TRY(
                    pwrite_all(fd, block, std::uint64_t{p.leaf_blocks[leaf]} * ext4_block_size));
            }
            if (p.xattr_block) {
                std::array<std::byte, ext4_block_size> block{};
                put32(block, 0, 0xEA020000);
                put32(block, 4, 1); // refcount
                put32(block, 8, 1); // blocks
                std::uint32_t hash = ext4_pack_xattrs(block, 32, 0, xattr_sets_[ino]);
                put32(block, 12, hash);
                SUPERMACHINE_TRY(
                    pwrite_all(fd, block, std::uint64_t{p.xattr_block} * ext4_block_size));
            }
        }
        return success();
    }

    static void write_extent_node(std::span<std::byte> out, std::span<const ext4_extent> extents,
                                  std::uint32_t max) {
        put16(out, 0, 0xF30A);
        put16(out, 2, static_cast<std::uint16_t>(extents.size()));
        put16(out, 4, static_cast<std::uint16_t>(max));
        put16(out, 6, 0); // depth 0: leaf
        put32(out, 8, 0);
        for (std::size_t i = 0; i < extents.size(); ++i) {
            std::size_t at = 12 + 12 * i;
            put32(out, at, extents[i].logical);
            put16(out, at + 4, static_cast<std::uint16_t>(extents[i].length));
            put16(out, at + 6, 0); // physical high 16 bits
            put32(out, at + 8, extents[i].physical);
        }
    }

    // ---- pass 4: inode tables, bitmaps, descriptors, superblocks ----
    void fill_inode(std::uint32_t ino, std::span<std::byte> out) const {
        const auto& p = inodes_[ino];
        std::uint16_t mode = 0;
        std::uint32_t uid = 0, gid = 0, flags = 0;
        std::uint64_t size = 0;
        std::int64_t mtime = options_.timestamp;
        std::uint32_t nsec = 0;
        bool extents = false;
        const tree_node* n = p.synthetic_lost_found ? nullptr : &tree_.node(p.node);
        if (!n) {
            mode = 040700;
            size = std::uint64_t{p.data_blocks} * ext4_block_size;
            extents = true;
        } else {
            uid = n->uid;
            gid = n->gid;
            mtime = n->mtime;
            nsec = n->mtime_nsec;
            std::uint16_t perm = static_cast<std::uint16_t>(n->mode & 07777);
            switch (n->kind) {
            case node_kind::regular:
                mode = 0100000 | perm;
                size = n->size;
                extents = true;
                break;
            case node_kind::directory:
                mode = 040000 | perm;
                size = std::uint64_t{p.data_blocks} * ext4_block_size;
                extents = true;
                break;
            case node_kind::symlink:
                mode = 0120000 | perm;
                size = n->link_target.size();
                extents = !p.extents.empty();
                if (!extents)
                    std::memcpy(out.data() + 0x28, n->link_target.data(), n->link_target.size());
                break;
            case node_kind::char_device:
                mode = 020000 | perm;
                break;
            case node_kind::block_device:
                mode = 060000 | perm;
                break;
            case node_kind::fifo:
                mode = 010000 | perm;
                break;
            case node_kind::socket:
                mode = 0140000 | perm;
                break;
            }
            if (n->kind == node_kind::char_device || n->kind == node_kind::block_device) {
                std::uint32_t major = n->device_major, minor = n->device_minor;
                if (major < 256 && minor < 256) {
                    put32(out, 0x28, (major << 8) | minor); // old encoding in i_block[0]
                } else {
                    put32(out, 0x2C, (minor & 0xff) | (major << 8) | ((minor & ~0xffu) << 12));
                }
            }
        }
        if (extents) {
            flags |= ext4_extents_flag;
            auto iblock = out.subspan(0x28, 60);
            if (p.leaf_blocks.empty()) {
                write_extent_node(iblock, p.extents, 4);
            } else {
                put16(iblock, 0, 0xF30A);
                put16(iblock, 2, static_cast<std::uint16_t>(p.leaf_blocks.size()));
                put16(iblock, 4, 4);
                put16(iblock, 6, 1); // depth 1: index
                for (std::size_t i = 0; i < p.leaf_blocks.size(); ++i) {
                    std::size_t at = 12 + 12 * i;
                    put32(iblock, at, p.extents[i * ext4_extents_per_block].logical);
                    put32(iblock, at + 4, p.leaf_blocks[i]);
                    put16(iblock, at + 8, 0);
                }
            }
        }
        std::uint64_t blocks = p.data_blocks + p.leaf_blocks.size() + (p.xattr_block ? 1 : 0);
        std::uint32_t time_low, time_extra;
        ext4_encode_time(mtime, nsec, time_low, time_extra);
        put16(out, 0x00, mode);
        put16(out, 0x02, static_cast<std::uint16_t>(uid));
        put32(out, 0x04, static_cast<std::uint32_t>(size));
        put32(out, 0x08, time_low); // atime
        put32(out, 0x0C, time_low); // ctime
        put32(out, 0x10, time_low); // mtime
        put16(out, 0x18, static_cast<std::uint16_t>(gid));
        put16(out, 0x1A, static_cast<std::uint16_t>(p.links));
        put32(out, 0x1C, static_cast<std::uint32_t>(blocks * (ext4_block_size / 512)));
        put32(out, 0x20, flags);
        put32(out, 0x68, p.xattr_block);
        put32(out, 0x6C, static_cast<std::uint32_t>(size >> 32));
        put16(out, 0x74, static_cast<std::uint16_t>((blocks * (ext4_block_size / 512)) >> 32));
        put16(out, 0x78, static_cast<std::uint16_t>(uid >> 16));
        put16(out, 0x7A, static_cast<std::uint16_t>(gid >> 16));
        put16(out, 0x80, ext4_extra_isize);
        put32(out, 0x84, time_extra); // ctime extra
        put32(out, 0x88, time_extra); // mtime extra
        put32(out, 0x8C, time_extra); // atime extra
        put32(out, 0x90, time_low);   // crtime
        put32(out, 0x94, time_extra);
        if (p.xattrs_in_inode) {
            put32(out, 0xA0, 0xEA020000);
            auto region = out.subspan(0xA4);
            ext4_pack_xattrs(region, 0, 0, xattr_sets_[ino]);
        }
    }

    result<void> write_metadata(int fd) {
        std::uint32_t max_ino = static_cast<std::uint32_t>(inodes_.size() - 1);
        std::vector<std::byte> gdt(std::size_t{gdt_blocks_} * ext4_block_size);
        std::vector<std::byte> table(std::size_t{inode_table_blocks_} * ext4_block_size);
        std::array<std::byte, ext4_block_size> bitmap;
        std::uint64_t free_blocks_total = 0, free_inodes_total = 0;
        for (std::uint32_t g = 0; g < groups_; ++g) {
            std::uint32_t first = g * inodes_per_group_ + 1;
            std::uint32_t used_inodes =
                first > max_ino ? 0 : std::min(inodes_per_group_, max_ino - first + 1);
            std::uint32_t dirs = 0;
            std::fill(table.begin(), table.end(), std::byte{0});
            for (std::uint32_t i = 0; i < used_inodes; ++i) {
                std::uint32_t ino = first + i;
                if (is_reserved(ino)) continue;
                if (is_directory(ino)) ++dirs;
                fill_inode(ino, std::span(table).subspan(std::size_t{i} * ext4_inode_size,
                                                         ext4_inode_size));
            }
            SUPERMACHINE_TRY(pwrite_all(fd, table, inode_table(g) * ext4_block_size));
            // Inode bitmap: used prefix, and the bits past inodes_per_group set.
            std::fill(bitmap.begin(), bitmap.end(), std::byte{0});
            set_bits(bitmap, 0, used_inodes);
            set_bits(bitmap, inodes_per_group_, ext4_blocks_per_group);
            SUPERMACHINE_TRY(pwrite_all(fd, bitmap, inode_bitmap(g) * ext4_block_size));
            // Block bitmap: metadata + allocated prefix, and the bits past the end of the disk.
            std::uint64_t used = data_start(g) - group_start(g) + allocated_in_group_[g];
            std::uint64_t in_group = group_end(g) - group_start(g);
            std::fill(bitmap.begin(), bitmap.end(), std::byte{0});
            set_bits(bitmap, 0, static_cast<std::uint32_t>(used));
            set_bits(bitmap, static_cast<std::uint32_t>(in_group), ext4_blocks_per_group);
            SUPERMACHINE_TRY(pwrite_all(fd, bitmap, block_bitmap(g) * ext4_block_size));
            std::uint32_t free_blocks = static_cast<std::uint32_t>(in_group - used);
            std::uint32_t free_inodes = inodes_per_group_ - used_inodes;
            free_blocks_total += free_blocks;
            free_inodes_total += free_inodes;
            auto d = std::span(gdt).subspan(std::size_t{g} * 32, 32);
            put32(d, 0, static_cast<std::uint32_t>(block_bitmap(g)));
            put32(d, 4, static_cast<std::uint32_t>(inode_bitmap(g)));
            put32(d, 8, static_cast<std::uint32_t>(inode_table(g)));
            put16(d, 12, static_cast<std::uint16_t>(free_blocks));
            put16(d, 14, static_cast<std::uint16_t>(free_inodes));
            put16(d, 16, static_cast<std::uint16_t>(dirs));
        }
        std::array<std::byte, 1024> super{};
        fill_superblock(super, free_blocks_total, free_inodes_total);
        for (std::uint32_t g = 0; g < groups_; ++g) {
            if (!ext4_group_has_super(g)) continue;
            put16(super, 0x5A, static_cast<std::uint16_t>(g));
            // Group 0's superblock sits at byte 1024; backups at the start of their group.
            std::uint64_t at = g == 0 ? 1024 : group_start(g) * ext4_block_size;
            SUPERMACHINE_TRY(pwrite_all(fd, super, at));
            SUPERMACHINE_TRY(pwrite_all(fd, gdt, (group_start(g) + 1) * ext4_block_size));
        }
        return success();
    }

    static void set_bits(std::span<std::byte> bitmap, std::uint32_t from, std::uint32_t to) {
        for (std::uint32_t bit = from; bit < to; ++bit)
            bitmap[bit / 8] |= std::byte(1u << (bit % 8));
    }

    void fill_superblock(std::span<std::byte> s, std::uint64_t free_blocks,
                         std::uint64_t free_inodes) const {
        put32(s, 0x00, inodes_per_group_ * groups_);
        put32(s, 0x04, static_cast<std::uint32_t>(total_blocks_));
        put32(s, 0x08, 0); // reserved blocks: none, the guest's root owns it all
        put32(s, 0x0C, static_cast<std::uint32_t>(free_blocks));
        put32(s, 0x10, static_cast<std::uint32_t>(free_inodes));
        put32(s, 0x14, 0); // first data block (4 KiB blocks)
        put32(s, 0x18, 2); // log2(block size) - 10
        put32(s, 0x1C, 2); // cluster size = block size
        put32(s, 0x20, ext4_blocks_per_group);
        put32(s, 0x24, ext4_blocks_per_group);
        put32(s, 0x28, inodes_per_group_);
        auto now = static_cast<std::uint32_t>(options_.timestamp);
        put32(s, 0x2C, 0);      // mount time
        put32(s, 0x30, now);    // write time
        put16(s, 0x34, 0);      // mount count
        put16(s, 0x36, 0xFFFF); // max mount count: no forced checks
        put16(s, 0x38, 0xEF53);
        put16(s, 0x3A, 1);   // state: clean
        put16(s, 0x3C, 1);   // errors: continue
        put32(s, 0x40, now); // last check
        put32(s, 0x4C, 1);   // revision: dynamic
        put32(s, 0x54, ext4_first_inode);
        put16(s, 0x58, ext4_inode_size);
        put32(s, 0x5C, ext4_compat_ext_attr);
        put32(s, 0x60, ext4_incompat_filetype | ext4_incompat_extents);
        put32(s, 0x64,
              ext4_ro_compat_sparse_super | ext4_ro_compat_large_file | ext4_ro_compat_dir_nlink |
                  ext4_ro_compat_extra_isize);
        std::memcpy(s.data() + 0x68, uuid_.data(), 16);
        std::memcpy(s.data() + 0x78, options_.volume_label.data(),
                    std::min<std::size_t>(16, options_.volume_label.size()));
        put32(s, 0x108, now);              // mkfs time
        put16(s, 0x15C, ext4_extra_isize); // min extra isize
        put16(s, 0x15E, ext4_extra_isize); // want extra isize
    }

public:
    void set_uuid(const std::array<std::uint8_t, 16>& uuid) { uuid_ = uuid; }

private:
    const filesystem_tree& tree_;
    const ext4_options& options_;
    std::vector<ext4_planned_inode> inodes_;
    std::vector<std::uint32_t> ino_of_;
    std::vector<std::uint32_t> block_needs_;
    std::vector<std::vector<ext4_xattr>> xattr_sets_;
    std::uint64_t dropped_xattrs_ = 0;
    std::uint64_t total_blocks_ = 0, used_blocks_ = 0;
    std::uint32_t groups_ = 0, inodes_per_group_ = 0, gdt_blocks_ = 0, inode_table_blocks_ = 0;
    std::vector<std::uint64_t> allocated_in_group_;
    std::uint32_t cursor_group_ = 0;
    std::uint64_t cursor_ = 0;
    bool use_copy_file_range_ = true;
    std::array<std::uint8_t, 16> uuid_{};
};

} // namespace detail

/// Write `tree` as an ext4 image to the open, writable, seekable `fd`.
inline result<ext4_stats> write_ext4(const filesystem_tree& tree, int fd,
                                     const ext4_options& options = {}) {
    detail::ext4_plan plan(tree, options);
    auto uuid = options.uuid;
    if (uuid == std::array<std::uint8_t, 16>{}) {
        std::random_device random;
        for (auto& b : uuid)
            b = static_cast<std::uint8_t>(random());
        uuid[6] = static_cast<std::uint8_t>((uuid[6] & 0x0f) | 0x40); // version 4
        uuid[8] = static_cast<std::uint8_t>((uuid[8] & 0x3f) | 0x80);
    }
    plan.set_uuid(uuid);
    return plan.write(fd);
}

/// The same into a new file at `path` (created or truncated).
inline result<ext4_stats> write_ext4(const filesystem_tree& tree, const std::filesystem::path& path,
                                     const ext4_options& options = {}) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return errno_code(errno);
    auto r = write_ext4(tree, fd, options);
    if (r && ::fsync(fd) != 0) r = errno_code(errno);
    ::close(fd);
    return r;
}

} // namespace supermachine::oci
