#pragma once
// The framing of the KVM state blobs: a magic number, a format version, the
// length of what follows (so a cut at a section boundary is still caught),
// then tagged sections (u32 tag, u32 length, bytes), all little-endian, written
// and read with the snapshot codec. The reader checks magic and version
// before anything else, refuses unknown and repeated tags, and bounds every
// section by the bytes left (it never allocates what a header claims).
#include <supermachine/error.hpp>
#include <supermachine/snapshot/codec.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

namespace supermachine::backend::detail {

/// Writes magic, version and sections; measure first, then write.
class section_writer {
public:
    static constexpr std::size_t header_size = 12;

    /// `body_length`: the bytes after the header (0 while measuring).
    section_writer(snapshot::byte_writer& out, std::uint32_t magic, std::uint32_t version,
                   std::uint32_t body_length)
        : out_(out) {
        out_.u32(magic);
        out_.u32(version);
        out_.u32(body_length);
    }

    /// A section holding a trivially copyable KVM struct as its bytes.
    template <class T>
    void raw(std::uint32_t tag, const T& value) {
        static_assert(std::is_trivially_copyable_v<T>);
        out_.u32(tag);
        out_.u32(static_cast<std::uint32_t>(sizeof(T)));
        out_.bytes(std::as_bytes(std::span(&value, 1)));
    }

    void bytes(std::uint32_t tag, std::span<const std::byte> data, std::uint64_t limit) {
        out_.u32(tag);
        out_.blob(data, limit);
    }

    void u32(std::uint32_t tag, std::uint32_t value) {
        out_.u32(tag);
        out_.u32(4);
        out_.u32(value);
    }

    void u64(std::uint32_t tag, std::uint64_t value) {
        out_.u32(tag);
        out_.u32(8);
        out_.u64(value);
    }

    /// A section whose body another function writes (measured first).
    template <class Body>
    void custom(std::uint32_t tag, Body&& body) {
        snapshot::byte_writer measure;
        body(measure);
        auto size = measure.finish();
        if (!size) return out_.fail(size.error());
        if (size.value() > UINT32_MAX) return out_.fail(errc::snapshot_too_large);
        out_.u32(tag);
        out_.u32(static_cast<std::uint32_t>(size.value()));
        body(out_);
    }

private:
    snapshot::byte_writer& out_;
};

/// Encode with `write(section_writer&)` into a new vector.
template <class Write>
result<std::vector<std::byte>> encode_sections(std::uint32_t magic, std::uint32_t version,
                                               Write&& write) {
    snapshot::byte_writer measure;
    {
        section_writer sections(measure, magic, version, 0);
        write(sections);
    }
    auto size = measure.finish();
    if (!size) return size.error();
    if (size.value() - section_writer::header_size > UINT32_MAX) return errc::snapshot_too_large;
    const auto body_length = static_cast<std::uint32_t>(size.value() - section_writer::header_size);
    std::vector<std::byte> bytes(size.value());
    snapshot::byte_writer out(bytes);
    {
        section_writer sections(out, magic, version, body_length);
        write(sections);
    }
    auto written = out.finish();
    if (!written) return written.error();
    if (written.value() != bytes.size()) return errc::snapshot_bad_record;
    return bytes;
}

struct section {
    std::uint32_t tag = 0;
    std::span<const std::byte> bytes;
};

/// Reads the header, then one section at a time.
class section_reader {
public:
    explicit section_reader(std::span<const std::byte> input)
        : in_(input) {}

    result<void> header(std::uint32_t magic, std::uint32_t version) {
        auto m = in_.u32();
        if (!m) return m.error();
        if (m.value() != magic) return errc::snapshot_bad_magic;
        auto v = in_.u32();
        if (!v) return v.error();
        if (v.value() != version) return errc::snapshot_unsupported_version;
        auto length = in_.u32();
        if (!length) return length.error();
        if (length.value() > in_.remaining()) return errc::snapshot_truncated;
        if (length.value() < in_.remaining()) return errc::snapshot_bad_record; // trailing bytes
        return success();
    }

    /// The next section; std::nullopt at the end. `max_tag` < 64: tags
    /// outside [1, max_tag] and repeated tags are malformed records.
    result<std::optional<section>> next(std::uint32_t max_tag, std::uint64_t max_length) {
        if (in_.at_end()) return std::optional<section>{};
        auto tag = in_.u32();
        if (!tag) return tag.error();
        if (tag.value() == 0 || tag.value() > max_tag || tag.value() >= 64)
            return errc::snapshot_bad_record;
        const std::uint64_t bit = std::uint64_t{1} << tag.value();
        if (seen_ & bit) return errc::snapshot_bad_record;
        seen_ |= bit;
        auto body = in_.blob(max_length);
        if (!body) return body.error();
        return std::optional<section>{section{tag.value(), body.value()}};
    }

    bool seen(std::uint32_t tag) const noexcept {
        return tag < 64 && (seen_ & (std::uint64_t{1} << tag)) != 0;
    }

private:
    snapshot::byte_reader in_;
    std::uint64_t seen_ = 0;
};

/// A KVM struct from a section that must be exactly its size.
template <class T>
result<T> raw_from(const section& s) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (s.bytes.size() != sizeof(T)) return errc::snapshot_bad_record;
    T value;
    std::memcpy(&value, s.bytes.data(), sizeof(T));
    return value;
}

inline result<std::uint32_t> u32_from(const section& s) {
    snapshot::byte_reader in(s.bytes);
    auto v = in.u32();
    if (!v || !in.at_end()) return errc::snapshot_bad_record;
    return v.value();
}

inline result<std::uint64_t> u64_from(const section& s) {
    snapshot::byte_reader in(s.bytes);
    auto v = in.u64();
    if (!v || !in.at_end()) return errc::snapshot_bad_record;
    return v.value();
}

} // namespace supermachine::backend::detail
