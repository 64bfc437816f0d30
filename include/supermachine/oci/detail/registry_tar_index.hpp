#pragma once
// A minimal, bounded tar *index* for docker-archive import: member name ->
// (offset, size, symlink target). It never extracts anything to disk; the
// real tar reader for layers is oci/tar*.hpp (the rootfs side). Understands
// ustar (prefix + name), GNU long names/links ('L'/'K') and PAX path/linkpath/size.
#include <supermachine/error.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace supermachine::oci::detail {

struct tar_member {
    std::uint64_t offset = 0; // of the data, in the archive file
    std::uint64_t size = 0;
    char type = '0';
    std::string link_target; // symlinks and hard links
};

inline constexpr std::size_t tar_max_members = 100000;
inline constexpr std::size_t tar_max_name = 4096;
inline constexpr std::uint64_t tar_max_meta = 1 << 20; // PAX / GNU long-name records

inline std::optional<std::uint64_t> tar_number(const unsigned char* field, std::size_t length) {
    if (field[0] & 0x80) {                         // GNU base-256
        if (field[0] != 0x80) return std::nullopt; // negative or absurd
        std::uint64_t v = 0;
        for (std::size_t i = 1; i < length; ++i) {
            if (v >> 56) return std::nullopt;
            v = (v << 8) | field[i];
        }
        return v;
    }
    std::uint64_t v = 0;
    std::size_t i = 0;
    while (i < length && field[i] == ' ')
        ++i;
    bool any = false;
    for (; i < length && field[i] >= '0' && field[i] <= '7'; ++i) {
        if (v >> 60) return std::nullopt;
        v = v * 8 + (field[i] - '0');
        any = true;
    }
    for (; i < length; ++i)
        if (field[i] != ' ' && field[i] != 0) return std::nullopt;
    if (!any) return std::uint64_t(0);
    return v;
}

inline std::string tar_clean_name(std::string name) {
    while (name.starts_with("./"))
        name.erase(0, 2);
    while (!name.empty() && name.back() == '/')
        name.pop_back();
    return name;
}

/// Normalize "a/b/../c" (names inside the archive, never touching the host).
inline std::optional<std::string> tar_normalize(std::string_view path) {
    std::string out;
    std::vector<std::string_view> parts;
    std::size_t start = 0;
    while (start <= path.size()) {
        auto slash = path.find('/', start);
        auto part = path.substr(start, slash == std::string_view::npos ? path.npos : slash - start);
        if (part == "..") {
            if (parts.empty()) return std::nullopt;
            parts.pop_back();
        } else if (!part.empty() && part != ".")
            parts.push_back(part);
        if (slash == std::string_view::npos) break;
        start = slash + 1;
    }
    for (auto p : parts) {
        if (!out.empty()) out += '/';
        out.append(p);
    }
    return out;
}

class registry_tar_index {
public:
    static result<registry_tar_index> open(const std::string& path) {
        registry_tar_index index;
        index.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (index.fd_ < 0)
            return errno == ENOENT ? make_error_code(errc::not_found) : errno_code(errno);
        struct stat st {};
        if (::fstat(index.fd_, &st) != 0 || !S_ISREG(st.st_mode)) return errc::archive_malformed;
        index.file_size_ = std::uint64_t(st.st_size);
        SUPERMACHINE_TRY(index.scan());
        return index;
    }
    registry_tar_index(registry_tar_index&& o) noexcept
        : fd_(std::exchange(o.fd_, -1))
        , file_size_(o.file_size_)
        , members_(std::move(o.members_)) {}
    registry_tar_index& operator=(registry_tar_index&&) = delete;
    ~registry_tar_index() {
        if (fd_ >= 0) ::close(fd_);
    }

    const std::map<std::string, tar_member>& members() const { return members_; }
    int fd() const { return fd_; }

    /// The regular file named `name`, following symlinks inside the archive
    /// (bounded: 8 hops).
    result<tar_member> find_file(std::string_view name) const {
        auto current = tar_normalize(name);
        for (int hop = 0; current && hop < 8; ++hop) {
            auto it = members_.find(*current);
            if (it == members_.end()) return errc::not_found;
            if (it->second.type == '0' || it->second.type == '\0' || it->second.type == '7')
                return it->second;
            if (it->second.type == '1') { // hard link: target named from the archive root
                current = tar_normalize(it->second.link_target);
                continue;
            }
            if (it->second.type != '2') return errc::archive_malformed;
            const auto& target = it->second.link_target;
            if (target.starts_with("/"))
                current = tar_normalize(target);
            else {
                auto slash = current->rfind('/');
                std::string dir = slash == std::string::npos ? "" : current->substr(0, slash + 1);
                current = tar_normalize(dir + target);
            }
        }
        return errc::archive_malformed;
    }

    /// Read a small member fully (bounded).
    result<std::string> read(const tar_member& m, std::size_t max_bytes) const {
        if (m.size > max_bytes) return errc::image_too_large;
        std::string out(std::size_t(m.size), '\0');
        SUPERMACHINE_TRY(read_at(m.offset, out.data(), out.size()));
        return out;
    }

    result<void> read_at(std::uint64_t offset, char* buffer, std::size_t size) const {
        std::size_t done = 0;
        while (done < size) {
            auto n = ::pread(fd_, buffer + done, size - done, off_t(offset + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return errc::archive_malformed;
            done += std::size_t(n);
        }
        return success();
    }

private:
    registry_tar_index() = default;

    result<void> scan() {
        std::uint64_t position = 0;
        std::string long_name, long_link;
        std::optional<std::uint64_t> pax_size;
        unsigned char block[512];
        int zero_blocks = 0;
        while (position + 512 <= file_size_) {
            SUPERMACHINE_TRY(read_at(position, reinterpret_cast<char*>(block), 512));
            position += 512;
            bool all_zero = true;
            for (auto b : block)
                all_zero &= b == 0;
            if (all_zero) {
                if (++zero_blocks == 2) return success();
                continue;
            }
            zero_blocks = 0;
            // Header checksum: the sum of all bytes with the checksum field as spaces.
            auto stored = tar_number(block + 148, 8);
            std::uint64_t sum = 0;
            for (int i = 0; i < 512; ++i)
                sum += (i >= 148 && i < 156) ? ' ' : block[i];
            if (!stored || *stored != sum) return errc::archive_malformed;
            auto size = tar_number(block + 124, 12);
            if (!size) return errc::archive_malformed;
            char type = char(block[156]);
            std::uint64_t data_size = pax_size && type != 'x' && type != 'g' ? *pax_size : *size;
            if (data_size > file_size_ || position + data_size > file_size_)
                return errc::archive_malformed;
            std::uint64_t data_offset = position;
            position += (data_size + 511) / 512 * 512;

            if (type == 'L' || type == 'K' || type == 'x' || type == 'g') {
                if (data_size > tar_max_meta) return errc::archive_malformed;
                std::string data(std::size_t(data_size), '\0');
                SUPERMACHINE_TRY(read_at(data_offset, data.data(), data.size()));
                if (type == 'L')
                    long_name = data.c_str();
                else if (type == 'K')
                    long_link = data.c_str();
                else if (type == 'x') {
                    SUPERMACHINE_TRY(parse_pax(data, long_name, long_link, pax_size));
                }
                continue;
            }
            std::string name;
            if (!long_name.empty())
                name = std::move(long_name);
            else {
                std::string base(reinterpret_cast<const char*>(block),
                                 strnlen(reinterpret_cast<const char*>(block), 100));
                std::string prefix;
                if (std::memcmp(block + 257, "ustar", 5) == 0)
                    prefix.assign(reinterpret_cast<const char*>(block + 345),
                                  strnlen(reinterpret_cast<const char*>(block + 345), 155));
                name = prefix.empty() ? base : prefix + "/" + base;
            }
            std::string link =
                !long_link.empty()
                    ? std::move(long_link)
                    : std::string(reinterpret_cast<const char*>(block + 157),
                                  strnlen(reinterpret_cast<const char*>(block + 157), 100));
            long_name.clear();
            long_link.clear();
            pax_size.reset();
            if (name.size() > tar_max_name || link.size() > tar_max_name)
                return errc::archive_malformed;
            if (members_.size() >= tar_max_members) return errc::image_too_large;
            auto clean = tar_normalize(tar_clean_name(name));
            if (!clean || clean->empty())
                continue; // "." or an escaping name: not something we look up
            members_[*clean] = tar_member{data_offset, data_size, type, link};
        }
        // Archives may end without the two zero blocks (truncated): accept
        // only if we consumed exactly the file.
        if (position != file_size_) return errc::archive_malformed;
        return success();
    }

    static result<void> parse_pax(std::string_view data, std::string& path, std::string& link,
                                  std::optional<std::uint64_t>& size) {
        // records: "<length> <key>=<value>\n"
        while (!data.empty()) {
            auto space = data.find(' ');
            if (space == std::string_view::npos || space > 20) return errc::archive_malformed;
            std::uint64_t length = 0;
            for (char c : data.substr(0, space)) {
                if (c < '0' || c > '9') return errc::archive_malformed;
                length = length * 10 + std::uint64_t(c - '0');
            }
            if (length <= space + 1 || length > data.size()) return errc::archive_malformed;
            auto record = data.substr(space + 1, length - space - 1);
            data.remove_prefix(length);
            if (!record.empty() && record.back() == '\n') record.remove_suffix(1);
            auto eq = record.find('=');
            if (eq == std::string_view::npos) return errc::archive_malformed;
            auto key = record.substr(0, eq);
            auto value = record.substr(eq + 1);
            if (key == "path")
                path.assign(value);
            else if (key == "linkpath")
                link.assign(value);
            else if (key == "size") {
                std::uint64_t v = 0;
                if (value.empty() || value.size() > 19) return errc::archive_malformed;
                for (char c : value) {
                    if (c < '0' || c > '9') return errc::archive_malformed;
                    v = v * 10 + std::uint64_t(c - '0');
                }
                size = v;
            }
        }
        return success();
    }

    int fd_ = -1;
    std::uint64_t file_size_ = 0;
    std::map<std::string, tar_member> members_;
};

} // namespace supermachine::oci::detail
