#pragma once
// A streaming tar reader: ustar, GNU (long names 'L', long links 'K') and
// PAX (local 'x' and global 'g' headers: path, linkpath, uid, gid, size,
// mtime, SCHILY.xattr.*), base-256 numbers, checksums verified.
//
// The stream is hostile: every length is bounded before anything is
// allocated, a short stream is errc::archive_malformed, and GNU sparse
// files (never produced by image tools) are rejected with not_supported.
#include <supermachine/error.hpp>
#include <supermachine/oci/decompress.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace supermachine::oci {

enum class entry_type : std::uint8_t {
    regular,
    hard_link,
    symlink,
    char_device,
    block_device,
    directory,
    fifo,
};

struct xattr {
    std::string name; ///< full name, e.g. "security.capability"
    std::string value;
    friend bool operator==(const xattr&, const xattr&) = default;
};

struct tar_entry {
    std::string path;        ///< as written in the archive (not yet normalized)
    std::string link_target; ///< symlink target or hard-link target path
    entry_type type = entry_type::regular;
    std::uint32_t mode = 0; ///< permission bits 07777 only
    std::uint32_t uid = 0, gid = 0;
    std::uint64_t size = 0; ///< data bytes (regular files; 0 for everything else)
    std::int64_t mtime = 0;
    std::uint32_t mtime_nsec = 0;
    std::uint32_t device_major = 0, device_minor = 0;
    std::vector<xattr> xattrs;
};

struct tar_limits {
    std::size_t max_path = 4096;                           ///< PATH_MAX
    std::size_t max_extended_header = 1 << 20;             ///< one PAX / GNU long-name block
    std::size_t max_xattr_bytes = 64 * 1024;               ///< names + values of one entry
    std::uint64_t max_entry_size = std::uint64_t{1} << 40; ///< one file's data
};

namespace detail {

using tar_records = std::vector<std::pair<std::string, std::string>>;

struct tar_pending {
    std::optional<std::string> gnu_long_name, gnu_long_link;
    tar_records pax;
};

struct tar_header {
    std::string name, link_name;
    char typeflag = '0';
    std::uint32_t mode = 0;
    std::uint64_t uid = 0, gid = 0;
    std::uint64_t size = 0;      ///< size field (entry data)
    std::uint64_t data_size = 0; ///< bytes that follow this header in the stream
    std::int64_t mtime = 0;
    std::uint32_t device_major = 0, device_minor = 0;
};

inline std::uint64_t tar_padded(std::uint64_t size) noexcept {
    return (size + 511) & ~std::uint64_t{511};
}

inline bool tar_is_zero_block(std::span<const std::byte, 512> block) noexcept {
    for (auto b : block)
        if (b != std::byte{0}) return false;
    return true;
}

inline std::string_view tar_field(std::span<const std::byte, 512> block, std::size_t offset,
                                  std::size_t length) noexcept {
    auto* p = reinterpret_cast<const char*>(block.data()) + offset;
    std::size_t n = 0;
    while (n < length && p[n] != '\0')
        ++n;
    return {p, n};
}

/// Octal (space/NUL padded) or base-256 (high bit set) numeric field.
inline result<std::int64_t> tar_number(std::span<const std::byte, 512> block, std::size_t offset,
                                       std::size_t length) {
    auto* p = reinterpret_cast<const unsigned char*>(block.data()) + offset;
    if (p[0] & 0x80) {
        // Base-256, big-endian. Negative values (lead byte 0xff) are refused: no
        // field we use may be negative except mtime, and no image tool writes one.
        if (p[0] & 0x40) return make_error_code(errc::archive_malformed);
        std::uint64_t value = p[0] & 0x3f;
        for (std::size_t i = 1; i < length; ++i) {
            if (value >> 55) return make_error_code(errc::archive_malformed); // > 63 bits
            value = (value << 8) | p[i];
        }
        return static_cast<std::int64_t>(value);
    }
    std::size_t i = 0;
    while (i < length && (p[i] == ' ' || p[i] == '\0'))
        ++i;
    std::uint64_t value = 0;
    bool any = false;
    for (; i < length && p[i] >= '0' && p[i] <= '7'; ++i) {
        if (value >> 60) return make_error_code(errc::archive_malformed);
        value = value * 8 + (p[i] - '0');
        any = true;
    }
    for (; i < length; ++i)
        if (p[i] != ' ' && p[i] != '\0') return make_error_code(errc::archive_malformed);
    (void)any; // an all-blank field is 0 (some writers leave devmajor empty)
    return static_cast<std::int64_t>(value);
}

template <class Limits>
result<tar_header> tar_parse_header(std::span<const std::byte, 512> block, const Limits& limits) {
    auto* u = reinterpret_cast<const unsigned char*>(block.data());
    SUPERMACHINE_TRY(stored_sum, tar_number(block, 148, 8));
    std::int64_t unsigned_sum = 0, signed_sum = 0;
    for (std::size_t i = 0; i < 512; ++i) {
        unsigned char c = (i >= 148 && i < 156) ? ' ' : u[i];
        unsigned_sum += c;
        signed_sum += static_cast<signed char>(c);
    }
    if (stored_sum != unsigned_sum && stored_sum != signed_sum)
        return make_error_code(errc::archive_malformed);

    tar_header h;
    h.typeflag = static_cast<char>(u[156]);
    SUPERMACHINE_TRY(mode, tar_number(block, 100, 8));
    SUPERMACHINE_TRY(uid, tar_number(block, 108, 8));
    SUPERMACHINE_TRY(gid, tar_number(block, 116, 8));
    SUPERMACHINE_TRY(size, tar_number(block, 124, 12));
    SUPERMACHINE_TRY(mtime, tar_number(block, 136, 12));
    if (mode < 0 || uid < 0 || gid < 0 || size < 0) return make_error_code(errc::archive_malformed);
    h.mode = static_cast<std::uint32_t>(mode & 07777);
    h.uid = static_cast<std::uint64_t>(uid);
    h.gid = static_cast<std::uint64_t>(gid);
    h.size = static_cast<std::uint64_t>(size);
    if (h.size > limits.max_entry_size) return make_error_code(errc::image_too_large);
    h.data_size = h.size;
    h.mtime = mtime;

    auto magic = tar_field(block, 257, 6);
    bool ustar = magic == "ustar" && tar_field(block, 263, 2) == "00";
    bool gnu = magic == "ustar " || std::string_view(reinterpret_cast<const char*>(u) + 257, 8) ==
                                        std::string_view("ustar  \0", 8);
    h.name = std::string(tar_field(block, 0, 100));
    h.link_name = std::string(tar_field(block, 157, 100));
    if (ustar || gnu) {
        SUPERMACHINE_TRY(major, tar_number(block, 329, 8));
        SUPERMACHINE_TRY(minor, tar_number(block, 337, 8));
        // Linux dev_t: 12-bit major, 20-bit minor.
        if (major < 0 || minor < 0 || major > 0xfff || minor > 0xfffff)
            return make_error_code(errc::archive_malformed);
        h.device_major = static_cast<std::uint32_t>(major);
        h.device_minor = static_cast<std::uint32_t>(minor);
    }
    if (ustar) { // GNU puts atime/ctime where ustar has the prefix
        auto prefix = tar_field(block, 345, 155);
        if (!prefix.empty()) h.name = std::string(prefix) + "/" + h.name;
    }
    return h;
}

/// Parse "%d %s=%s\n" records into `records` (later records override earlier ones).
template <class Limits>
result<void> tar_parse_pax(std::span<const char> text, tar_records& records, const Limits& limits) {
    std::string_view rest(text.data(), text.size());
    while (!rest.empty()) {
        if (rest.front() == '\0') break; // some writers pad with NULs
        std::size_t space = rest.find(' ');
        if (space == std::string_view::npos || space == 0 || space > 10)
            return make_error_code(errc::archive_malformed);
        std::uint64_t length = 0;
        for (char c : rest.substr(0, space)) {
            if (c < '0' || c > '9') return make_error_code(errc::archive_malformed);
            length = length * 10 + static_cast<std::uint64_t>(c - '0');
        }
        if (length <= space + 1 || length > rest.size() || rest[length - 1] != '\n')
            return make_error_code(errc::archive_malformed);
        std::string_view record = rest.substr(space + 1, length - space - 2);
        rest.remove_prefix(length);
        std::size_t eq = record.find('=');
        if (eq == std::string_view::npos || eq == 0)
            return make_error_code(errc::archive_malformed);
        std::string key(record.substr(0, eq));
        std::string value(record.substr(eq + 1));
        bool replaced = false;
        for (auto& [k, v] : records)
            if (k == key) {
                v = std::move(value);
                replaced = true;
                break;
            }
        if (!replaced) {
            if (records.size() >= 4096) return make_error_code(errc::archive_malformed);
            records.emplace_back(std::move(key), std::move(value));
        }
    }
    (void)limits;
    return success();
}

inline result<std::uint64_t> tar_decimal(std::string_view text, std::uint64_t max) {
    if (text.empty() || text.size() > 20) return make_error_code(errc::archive_malformed);
    std::uint64_t value = 0;
    for (char c : text) {
        if (c < '0' || c > '9') return make_error_code(errc::archive_malformed);
        if (value > (max - static_cast<unsigned>(c - '0')) / 10)
            return make_error_code(errc::archive_malformed);
        value = value * 10 + static_cast<std::uint64_t>(c - '0');
    }
    return value;
}

/// PAX mtime: [-]seconds[.fraction]
inline result<void> tar_pax_time(std::string_view text, std::int64_t& seconds,
                                 std::uint32_t& nsec) {
    bool negative = !text.empty() && text.front() == '-';
    if (negative) text.remove_prefix(1);
    auto dot = text.find('.');
    SUPERMACHINE_TRY(whole, tar_decimal(text.substr(0, dot), std::uint64_t{1} << 62));
    std::uint32_t fraction = 0;
    if (dot != std::string_view::npos) {
        auto digits = text.substr(dot + 1);
        for (std::size_t i = 0; i < 9; ++i) {
            char c = i < digits.size() ? digits[i] : '0';
            if (c < '0' || c > '9') return make_error_code(errc::archive_malformed);
            fraction = fraction * 10 + static_cast<std::uint32_t>(c - '0');
        }
    }
    seconds = static_cast<std::int64_t>(whole);
    nsec = fraction;
    if (negative) { // -1.5 is 1.5 s before the epoch: seconds -2, nsec 0.5e9
        seconds = -seconds;
        if (nsec) {
            seconds -= 1;
            nsec = 1000000000u - nsec;
        }
    }
    return success();
}

template <class Entry, class Type, class Xattr, class Limits>
result<Entry> tar_make_entry(tar_header& header, tar_pending& pending, const tar_records& global,
                             const Limits& limits) {
    Entry e;
    e.path = std::move(header.name);
    e.link_target = std::move(header.link_name);
    e.mode = header.mode;
    e.mtime = header.mtime;
    std::uint64_t uid = header.uid, gid = header.gid, size = header.size;
    if (pending.gnu_long_name) e.path = std::move(*pending.gnu_long_name);
    if (pending.gnu_long_link) e.link_target = std::move(*pending.gnu_long_link);
    std::size_t xattr_bytes = 0;
    for (const tar_records* records : std::array<const tar_records*, 2>{&global, &pending.pax}) {
        for (auto& [key, value] : *records) {
            std::string_view k = key;
            if (k == "path")
                e.path = value;
            else if (k == "linkpath")
                e.link_target = value;
            else if (k == "uid") {
                SUPERMACHINE_TRY(v, tar_decimal(value, 0xffffffffu));
                uid = v;
            } else if (k == "gid") {
                SUPERMACHINE_TRY(v, tar_decimal(value, 0xffffffffu));
                gid = v;
            } else if (k == "size") {
                SUPERMACHINE_TRY(v, tar_decimal(value, limits.max_entry_size));
                size = v;
            } else if (k == "mtime") {
                SUPERMACHINE_TRY(tar_pax_time(value, e.mtime, e.mtime_nsec));
            } else if (k.starts_with("SCHILY.xattr.")) {
                auto name = k.substr(13);
                if (name.empty() || name.size() > 255)
                    return make_error_code(errc::archive_malformed);
                xattr_bytes += name.size() + value.size();
                if (xattr_bytes > limits.max_xattr_bytes)
                    return make_error_code(errc::image_too_large);
                bool replaced = false;
                for (auto& x : e.xattrs)
                    if (x.name == name) {
                        x.value = value;
                        replaced = true;
                    }
                if (!replaced) e.xattrs.push_back(Xattr{std::string(name), value});
            } else if (k.starts_with("GNU.sparse.")) {
                return make_error_code(errc::not_supported);
            }
        }
    }
    if (uid > 0xffffffffu || gid > 0xffffffffu) return make_error_code(errc::archive_malformed);
    e.uid = static_cast<std::uint32_t>(uid);
    e.gid = static_cast<std::uint32_t>(gid);
    header.data_size = size; // PAX size overrides the header's field for the data that follows
    if (e.path.empty() || e.path.size() > limits.max_path || e.link_target.size() > limits.max_path)
        return make_error_code(errc::archive_malformed);
    if (e.path.find('\0') != std::string::npos || e.link_target.find('\0') != std::string::npos)
        return make_error_code(errc::archive_malformed);
    e.device_major = header.device_major;
    e.device_minor = header.device_minor;
    switch (header.typeflag) {
    case '0':
    case '\0':
    case '7':
        e.type = Type::regular;
        break;
    case '1':
        e.type = Type::hard_link;
        break;
    case '2':
        e.type = Type::symlink;
        break;
    case '3':
        e.type = Type::char_device;
        break;
    case '4':
        e.type = Type::block_device;
        break;
    case '5':
    case 'D':
        e.type = Type::directory;
        break;
    case '6':
        e.type = Type::fifo;
        break;
    case 'S':
    case 'M':
        return make_error_code(errc::not_supported); // GNU sparse / multi-volume
    default:
        return make_error_code(errc::archive_malformed);
    }
    // Old V7 archives mark directories with a trailing slash on a regular entry.
    if (e.type == Type::regular && header.typeflag == '\0' && e.path.ends_with('/'))
        e.type = Type::directory;
    if ((e.type == Type::symlink || e.type == Type::hard_link) && e.link_target.empty())
        return make_error_code(errc::archive_malformed);
    e.size = e.type == Type::regular ? size : 0;
    return e;
}

} // namespace detail

template <byte_source Source>
class tar_reader {
public:
    explicit tar_reader(Source& source, tar_limits limits = {})
        : source_(source)
        , limits_(limits) {}

    /// The next entry (after skipping what is left of the current one's data),
    /// or nullopt at the end-of-archive marker.
    result<std::optional<tar_entry>> next() {
        if (finished_) return std::optional<tar_entry>{};
        SUPERMACHINE_TRY(skip_rest());
        detail::tar_pending pending; // long names and PAX records for the next real entry
        for (;;) {
            std::array<std::byte, 512> block;
            SUPERMACHINE_TRY(got, read_exact(block));
            if (!got) return make_error_code(errc::archive_malformed); // no end marker
            if (detail::tar_is_zero_block(block)) {
                // End of archive: a second zero block normally follows; tolerate its absence.
                finished_ = true;
                return std::optional<tar_entry>{};
            }
            SUPERMACHINE_TRY(header, detail::tar_parse_header(block, limits_));
            switch (header.typeflag) {
            case 'L':
            case 'K': {
                if (header.size > limits_.max_path + 1)
                    return make_error_code(errc::archive_malformed);
                SUPERMACHINE_TRY(text, read_blob(header.size));
                std::string value(text.begin(), text.end());
                if (auto nul = value.find('\0'); nul != std::string::npos) value.resize(nul);
                (header.typeflag == 'L' ? pending.gnu_long_name : pending.gnu_long_link) =
                    std::move(value);
                continue;
            }
            case 'x':
            case 'g': {
                if (header.size > limits_.max_extended_header)
                    return make_error_code(errc::archive_malformed);
                SUPERMACHINE_TRY(text, read_blob(header.size));
                // A global header overrides earlier ones key by key (POSIX), for all entries after
                // it.
                auto& records = header.typeflag == 'x' ? pending.pax : global_pax_;
                SUPERMACHINE_TRY(detail::tar_parse_pax(text, records, limits_));
                continue;
            }
            case 'V': { // volume label: not a file
                SUPERMACHINE_TRY(skip_bytes(detail::tar_padded(header.size)));
                continue;
            }
            default:
                break;
            }
            SUPERMACHINE_TRY(entry, detail::tar_make_entry<tar_entry, entry_type, xattr>(
                                        header, pending, global_pax_, limits_));
            remaining_ = entry.type == entry_type::regular ? entry.size : 0;
            // Data of non-regular entries (hard links may carry some) is skipped.
            padding_ = detail::tar_padded(header.data_size) - remaining_;
            return std::optional<tar_entry>(std::move(entry));
        }
    }

    /// Read the current entry's data; returns 0 at its end.
    result<std::size_t> read_data(std::span<std::byte> buffer) {
        if (remaining_ == 0 || buffer.empty()) return std::size_t{0};
        auto want = static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), remaining_));
        SUPERMACHINE_TRY(got, source_.read_some(buffer.first(want)));
        if (got == 0) return make_error_code(errc::archive_malformed);
        remaining_ -= got;
        return got;
    }

    std::uint64_t data_remaining() const noexcept { return remaining_; }

private:
    // Read exactly one block; false only at a clean end of stream before any byte.
    result<bool> read_exact(std::span<std::byte> out) {
        std::size_t have = 0;
        while (have < out.size()) {
            SUPERMACHINE_TRY(got, source_.read_some(out.subspan(have)));
            if (got == 0) {
                if (have == 0) return false;
                return make_error_code(errc::archive_malformed);
            }
            have += got;
        }
        return true;
    }

    result<std::vector<char>> read_blob(std::uint64_t size) {
        std::vector<char> text(static_cast<std::size_t>(size));
        auto bytes = std::as_writable_bytes(std::span(text));
        std::size_t have = 0;
        while (have < bytes.size()) {
            SUPERMACHINE_TRY(got, source_.read_some(bytes.subspan(have)));
            if (got == 0) return make_error_code(errc::archive_malformed);
            have += got;
        }
        SUPERMACHINE_TRY(skip_bytes(detail::tar_padded(size) - size));
        return text;
    }

    result<void> skip_bytes(std::uint64_t count) {
        std::array<std::byte, 16384> scratch;
        while (count) {
            auto want = static_cast<std::size_t>(std::min<std::uint64_t>(count, scratch.size()));
            SUPERMACHINE_TRY(got, source_.read_some(std::span(scratch).first(want)));
            if (got == 0) return make_error_code(errc::archive_malformed);
            count -= got;
        }
        return success();
    }

    result<void> skip_rest() {
        SUPERMACHINE_TRY(skip_bytes(remaining_ + padding_));
        remaining_ = padding_ = 0;
        return success();
    }

    Source& source_;
    tar_limits limits_;
    detail::tar_records global_pax_;
    std::uint64_t remaining_ = 0, padding_ = 0;
    bool finished_ = false;
};

} // namespace supermachine::oci
