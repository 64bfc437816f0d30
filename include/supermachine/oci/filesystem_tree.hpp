#pragma once
// The merged root filesystem of an image, as a virtual tree: metadata in
// memory, file contents in an unlinked spool file under the cache dir.
//
// Paths are resolved only inside the tree, never on the host. ".." may not
// climb above the root (errc::path_escape); a leading "/" is dropped. A
// symlink met as a *parent* component is resolved inside the tree with the
// tree root as "/" (as umoci's securejoin and containerd's RootPath do), so
// "/bin -> usr/bin" plus an entry "bin/sh" lands in /usr/bin/sh and nothing
// can point outside. The last component is never followed: an entry replaces
// a symlink, it does not write through it.
#include <supermachine/error.hpp>
#include <supermachine/oci/detail/tree_spool.hpp>
#include <supermachine/oci/tar_reader.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::oci {

enum class node_kind : std::uint8_t {
    regular,
    directory,
    symlink,
    char_device,
    block_device,
    fifo,
    socket,
};

using node_id = std::uint32_t;

struct tree_child {
    node_id node;
    std::uint32_t layer; ///< the layer that last wrote this name (for whiteouts)
};

struct tree_node {
    node_kind kind = node_kind::regular;
    std::uint32_t mode = 0; ///< permission bits 07777
    std::uint32_t uid = 0, gid = 0;
    std::int64_t mtime = 0;
    std::uint32_t mtime_nsec = 0;
    std::uint64_t size = 0;        ///< regular: data bytes
    std::uint64_t data_offset = 0; ///< regular: where the data sits in the spool
    std::string link_target;       ///< symlink
    std::uint32_t device_major = 0, device_minor = 0;
    std::vector<xattr> xattrs;
    std::map<std::string, tree_child, std::less<>> children; ///< directory
};

struct tree_limits {
    std::size_t max_nodes = 4u << 20; ///< inodes ever created (~1 GiB of metadata at most)
    std::uint64_t max_total_data = std::uint64_t{256} << 30; ///< bytes spooled over all layers
    std::size_t max_depth = 1024;                            ///< path components
    unsigned max_symlink_hops = 40;                          ///< as Linux ELOOP
};

class filesystem_tree {
public:
    /// An empty tree (root directory 0755 root:root) spooling into `spool_directory`.
    static result<filesystem_tree> create(const std::filesystem::path& spool_directory,
                                          tree_limits limits = {}) {
        SUPERMACHINE_TRY(spool, detail::tree_spool::create(spool_directory));
        filesystem_tree tree;
        tree.spool_ = std::move(spool);
        tree.limits_ = limits;
        tree.nodes_.emplace_back();
        tree.nodes_.back().kind = node_kind::directory;
        tree.nodes_.back().mode = 0755;
        return tree;
    }

    static constexpr node_id root() noexcept { return 0; }
    const tree_node& node(node_id id) const { return nodes_.at(id); }
    std::size_t node_count() const noexcept { return nodes_.size(); }
    const detail::tree_spool& spool() const noexcept { return spool_; }

    /// Split `path` into components: "" and "." dropped, ".." pops, leading "/" ignored.
    /// Climbing above the root is errc::path_escape.
    result<std::vector<std::string>> normalize(std::string_view path) const {
        std::vector<std::string> parts;
        while (!path.empty()) {
            auto slash = path.find('/');
            auto part = path.substr(0, slash);
            path = slash == std::string_view::npos ? std::string_view{} : path.substr(slash + 1);
            if (part.empty() || part == ".") continue;
            if (part == "..") {
                if (parts.empty()) return make_error_code(errc::path_escape);
                parts.pop_back();
                continue;
            }
            if (part.size() > 255) return make_error_code(errc::archive_malformed);
            parts.emplace_back(part);
            if (parts.size() > limits_.max_depth) return make_error_code(errc::archive_malformed);
        }
        return parts;
    }

    /// Look a path up (parents resolved inside the tree; the last component
    /// followed only if `follow_last`). nullopt if it does not exist.
    result<std::optional<node_id>> lookup(std::string_view path, bool follow_last = false) const {
        auto self = const_cast<filesystem_tree*>(this); // resolve() with create=false never mutates
        SUPERMACHINE_TRY(parts, normalize(path));
        if (parts.empty()) return std::optional<node_id>(root());
        std::string last = parts.back();
        parts.pop_back();
        SUPERMACHINE_TRY(parent, self->resolve_directory(parts, false, 0));
        if (!parent) return std::optional<node_id>{};
        unsigned hops = 0;
        for (;;) {
            auto& dir = nodes_[*parent].children;
            auto it = dir.find(last);
            if (it == dir.end()) return std::optional<node_id>{};
            const auto& found = nodes_[it->second.node];
            if (!follow_last || found.kind != node_kind::symlink)
                return std::optional<node_id>(it->second.node);
            if (++hops > limits_.max_symlink_hops) return make_error_code(errc::path_escape);
            // Re-resolve the target relative to the link's directory, clamped at the root.
            std::vector<std::string> target;
            if (!found.link_target.starts_with('/')) {
                SUPERMACHINE_TRY(here, path_of(*parent));
                target = std::move(here);
            }
            SUPERMACHINE_TRY(joined, clamp_join(std::move(target), found.link_target));
            if (joined.empty()) return std::optional<node_id>(root());
            last = joined.back();
            joined.pop_back();
            SUPERMACHINE_TRY(next_parent, self->resolve_directory(joined, false, 0));
            if (!next_parent) return std::optional<node_id>{};
            parent = next_parent;
        }
    }

    /// Contents of a regular file, at most `max_bytes` (else errc::image_too_large).
    result<std::string> read_file(node_id id, std::size_t max_bytes) const {
        const auto& n = nodes_.at(id);
        if (n.kind != node_kind::regular) return make_error_code(errc::invalid_argument);
        if (n.size > max_bytes) return make_error_code(errc::image_too_large);
        std::string text(static_cast<std::size_t>(n.size), '\0');
        SUPERMACHINE_TRY(spool_.read_at(n.data_offset, std::as_writable_bytes(std::span(text))));
        return text;
    }

    /// Apply one tar entry of layer `layer` (layers numbered from 1 upward, in
    /// order). Regular-file data is read from `data` (the tar reader).
    template <class DataReader>
    result<void> apply(const tar_entry& entry, DataReader& data, std::uint32_t layer) {
        SUPERMACHINE_TRY(parts, normalize(entry.path));
        if (parts.empty()) { // the root itself: only its metadata may change
            if (entry.type != entry_type::directory)
                return make_error_code(errc::archive_malformed);
            set_metadata(nodes_[root()], entry);
            return success();
        }
        std::string name = parts.back();
        parts.pop_back();
        SUPERMACHINE_TRY(parent_found, resolve_directory(parts, true, layer));
        node_id parent = *parent_found;

        auto& siblings = nodes_[parent].children;
        auto existing = siblings.find(name);
        if (entry.type == entry_type::directory && existing != siblings.end() &&
            nodes_[existing->second.node].kind == node_kind::directory) {
            // A directory over a directory merges: keep the children, take the metadata.
            set_metadata(nodes_[existing->second.node], entry);
            existing->second.layer = layer;
            return success();
        }

        node_id id;
        if (entry.type == entry_type::hard_link) {
            SUPERMACHINE_TRY(target, lookup_for_link(entry.link_target));
            if (nodes_[target].kind == node_kind::directory)
                return make_error_code(errc::archive_malformed);
            id = target;
        } else {
            SUPERMACHINE_TRY(fresh, new_node());
            id = fresh;
            tree_node& n = nodes_[id];
            set_metadata(n, entry);
            switch (entry.type) {
            case entry_type::regular:
                n.kind = node_kind::regular;
                break;
            case entry_type::directory:
                n.kind = node_kind::directory;
                break;
            case entry_type::symlink:
                n.kind = node_kind::symlink;
                n.link_target = entry.link_target;
                break;
            case entry_type::char_device:
                n.kind = node_kind::char_device;
                break;
            case entry_type::block_device:
                n.kind = node_kind::block_device;
                break;
            case entry_type::fifo:
                n.kind = node_kind::fifo;
                break;
            case entry_type::hard_link:
                break;
            }
            n.device_major = entry.device_major;
            n.device_minor = entry.device_minor;
            if (entry.type == entry_type::regular) {
                SUPERMACHINE_TRY(spool_data(id, entry.size, data));
            }
        }
        // Re-find: new_node() may have grown nodes_, but children maps live in nodes.
        nodes_[parent].children.insert_or_assign(name, tree_child{id, layer});
        return success();
    }

    /// ".wh.NAME" in `directory_path`: remove NAME if a lower layer wrote it.
    result<void> whiteout(std::string_view directory_path, std::string_view name,
                          std::uint32_t layer) {
        SUPERMACHINE_TRY(parts, normalize(directory_path));
        SUPERMACHINE_TRY(parent, resolve_directory(parts, false, layer));
        if (!parent) return success(); // nothing below to hide
        auto& siblings = nodes_[*parent].children;
        auto it = siblings.find(name);
        if (it != siblings.end() && it->second.layer < layer) siblings.erase(it);
        return success();
    }

    /// ".wh..wh..opq" in `directory_path`: hide everything lower layers put there
    /// (recursively: a directory this layer re-created keeps only this layer's children).
    result<void> make_opaque(std::string_view directory_path, std::uint32_t layer) {
        SUPERMACHINE_TRY(parts, normalize(directory_path));
        SUPERMACHINE_TRY(parent, resolve_directory(parts, true, layer));
        std::vector<node_id> work{*parent};
        while (!work.empty()) {
            node_id dir = work.back();
            work.pop_back();
            auto& children = nodes_[dir].children;
            for (auto it = children.begin(); it != children.end();) {
                if (it->second.layer < layer) {
                    it = children.erase(it);
                } else {
                    if (nodes_[it->second.node].kind == node_kind::directory)
                        work.push_back(it->second.node);
                    ++it;
                }
            }
        }
        return success();
    }

private:
    filesystem_tree() = default;

    static void set_metadata(tree_node& n, const tar_entry& e) {
        n.mode = e.mode & 07777;
        n.uid = e.uid;
        n.gid = e.gid;
        n.mtime = e.mtime;
        n.mtime_nsec = e.mtime_nsec;
        n.xattrs = e.xattrs;
    }

    result<node_id> new_node() {
        if (nodes_.size() >= limits_.max_nodes) return make_error_code(errc::image_too_large);
        nodes_.emplace_back();
        return static_cast<node_id>(nodes_.size() - 1);
    }

    template <class DataReader>
    result<void> spool_data(node_id id, std::uint64_t size, DataReader& data) {
        if (spooled_ + size > limits_.max_total_data) return make_error_code(errc::image_too_large);
        nodes_[id].data_offset = spool_.size();
        std::vector<std::byte> buffer(
            static_cast<std::size_t>(std::min<std::uint64_t>(size, 1 << 20)));
        std::uint64_t left = size;
        while (left) {
            auto want = static_cast<std::size_t>(std::min<std::uint64_t>(left, buffer.size()));
            SUPERMACHINE_TRY(got, data.read_data(std::span(buffer).first(want)));
            if (got == 0) return make_error_code(errc::archive_malformed);
            SUPERMACHINE_TRY(spool_.append(std::span(buffer).first(got)));
            left -= got;
        }
        nodes_[id].size = size;
        spooled_ += size;
        return success();
    }

    // The component names from the root to directory `id` (search; used only for
    // relative symlinks met while resolving, which are rare).
    result<std::vector<std::string>> path_of(node_id id) const {
        std::vector<std::string> path;
        if (id == root()) return path;
        // Depth-first search from the root; directories form a tree (no hard links).
        struct frame {
            node_id dir;
            std::map<std::string, tree_child, std::less<>>::const_iterator it;
        };
        std::vector<frame> stack{{root(), nodes_[root()].children.begin()}};
        while (!stack.empty()) {
            auto& top = stack.back();
            if (top.it == nodes_[top.dir].children.end()) {
                stack.pop_back();
                if (!path.empty()) path.pop_back();
                continue;
            }
            auto [name, child] = *top.it++;
            if (nodes_[child.node].kind != node_kind::directory) continue;
            path.push_back(name);
            if (child.node == id) return path;
            stack.push_back({child.node, nodes_[child.node].children.begin()});
        }
        return make_error_code(errc::not_found);
    }

    // Append `target`'s components to `base`, clamping ".." at the root (a
    // symlink's target is resolved inside the image, whatever it says).
    result<std::vector<std::string>> clamp_join(std::vector<std::string> base,
                                                std::string_view target) const {
        if (target.starts_with('/')) base.clear();
        while (!target.empty()) {
            auto slash = target.find('/');
            auto part = target.substr(0, slash);
            target =
                slash == std::string_view::npos ? std::string_view{} : target.substr(slash + 1);
            if (part.empty() || part == ".") continue;
            if (part == "..") {
                if (!base.empty()) base.pop_back();
                continue;
            }
            base.emplace_back(part);
            if (base.size() > limits_.max_depth) return make_error_code(errc::archive_malformed);
        }
        return base;
    }

    // Walk `parts` from the root, following symlinks inside the tree. With
    // `create`, missing directories are made (0755 root) and a non-directory
    // in the way is replaced by one; without, a missing component gives nullopt.
    result<std::optional<node_id>> resolve_directory(const std::vector<std::string>& parts,
                                                     bool create, std::uint32_t layer) {
        std::vector<node_id> stack{root()};
        std::vector<std::string> walked; // names of stack[1..]
        std::deque<std::string> pending(parts.begin(), parts.end());
        unsigned hops = 0;
        while (!pending.empty()) {
            std::string name = std::move(pending.front());
            pending.pop_front();
            if (name.empty() || name == ".") continue;
            if (name == "..") {
                if (stack.size() > 1) {
                    stack.pop_back();
                    walked.pop_back();
                }
                continue;
            }
            node_id dir = stack.back();
            auto it = nodes_[dir].children.find(name);
            if (it != nodes_[dir].children.end()) {
                const tree_node& child = nodes_[it->second.node];
                if (child.kind == node_kind::directory) {
                    stack.push_back(it->second.node);
                    walked.push_back(std::move(name));
                    continue;
                }
                if (child.kind == node_kind::symlink) {
                    if (++hops > limits_.max_symlink_hops)
                        return make_error_code(errc::path_escape);
                    SUPERMACHINE_TRY(target, clamp_join(child.link_target.starts_with('/')
                                                            ? std::vector<std::string>{}
                                                            : walked,
                                                        child.link_target));
                    // Restart from the root with target + the rest.
                    for (auto r = target.rbegin(); r != target.rend(); ++r)
                        pending.push_front(*r);
                    stack.resize(1);
                    walked.clear();
                    if (pending.size() > limits_.max_depth * 4)
                        return make_error_code(errc::archive_malformed);
                    continue;
                }
                if (!create) return std::optional<node_id>{};
                nodes_[dir].children.erase(it); // a file in the way of a directory
            } else if (!create) {
                return std::optional<node_id>{};
            }
            SUPERMACHINE_TRY(fresh, new_node());
            nodes_[fresh].kind = node_kind::directory;
            nodes_[fresh].mode = 0755;
            nodes_[dir].children.insert_or_assign(name, tree_child{fresh, layer});
            stack.push_back(fresh);
            walked.push_back(std::move(name));
            if (stack.size() > limits_.max_depth) return make_error_code(errc::archive_malformed);
        }
        return std::optional<node_id>(stack.back());
    }

    // A hard link's target: normalized like an entry path (no escape), the parents
    // resolved inside the tree, the last component not followed; must exist.
    result<node_id> lookup_for_link(std::string_view target) {
        SUPERMACHINE_TRY(parts, normalize(target));
        if (parts.empty()) return make_error_code(errc::archive_malformed);
        std::string last = parts.back();
        parts.pop_back();
        SUPERMACHINE_TRY(parent, resolve_directory(parts, false, 0));
        if (!parent) return make_error_code(errc::not_found);
        auto& dir = nodes_[*parent].children;
        auto it = dir.find(last);
        if (it == dir.end()) return make_error_code(errc::not_found);
        return it->second.node;
    }

    std::vector<tree_node> nodes_;
    detail::tree_spool spool_;
    tree_limits limits_;
    std::uint64_t spooled_ = 0;
};

} // namespace supermachine::oci
