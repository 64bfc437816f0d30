#pragma once
// The snapshot file format (see doc/snapshot-format.md):
//
//   [0, 64)                   header: magic, version, body and RAM placement, checksums
//   [64, 64 + body_length)    body: tagged records (machine, vCPUs, devices, ...)
//   padding to ram_offset     (page aligned)
//   [ram_offset, +ram_size)   guest RAM, byte for byte; all-zero pages are holes
//
// Each body record is: u16 tag, u16 flags, u32 length, then `length` bytes
// decoded by the record's codec, which must consume them exactly. A reader
// skips a record with an unknown tag only if its flags mark it optional, so
// later versions can add records old readers may ignore.
//
// Everything here is pure (bytes in, records out) and constexpr: the file
// store (file_store.hpp) does the I/O and maps RAM.
#include <supermachine/snapshot/codec.hpp>
#include <supermachine/snapshot/detail/crc32.hpp>
#include <supermachine/snapshot/records.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace supermachine::snapshot {

inline constexpr std::array<std::byte, 8> magic{std::byte{'S'}, std::byte{'M'}, std::byte{'S'},
                                                std::byte{'N'}, std::byte{'A'}, std::byte{'P'},
                                                std::byte{0},   std::byte{0}};
inline constexpr std::uint16_t format_version = 1;
inline constexpr std::uint64_t header_size = 64;
/// The body is read into memory: refuse more than this (vCPU and device
/// blobs are bounded far below it).
inline constexpr std::uint64_t max_body_bytes = 512u << 20;

enum class record_tag : std::uint16_t {
    machine = 1,
    vcpu = 2,
    interrupt_controller = 3,
    uart = 4,
    virtio_device = 5,
    agent = 6,
    port_forward = 7,
};

/// Record flags. An unknown tag is skipped only when `optional` is set.
inline constexpr std::uint16_t record_optional = 0x0001;
inline constexpr std::uint16_t known_record_flags = record_optional;
inline constexpr std::uint64_t record_header_size = 8;

struct snapshot_header {
    std::uint16_t version = format_version;
    std::uint32_t flags = 0;
    std::uint64_t body_offset = header_size;
    std::uint64_t body_length = 0;
    std::uint32_t body_crc32 = 0;
    std::uint64_t ram_offset = 0;
    std::uint64_t ram_size = 0;
    friend constexpr bool operator==(const snapshot_header&, const snapshot_header&) = default;
};

constexpr std::uint64_t round_up_to_page(std::uint64_t n) noexcept {
    return (n + page_size - 1) / page_size * page_size;
}

/// Header layout (little-endian):
///   0 magic[8]  8 u16 version  10 u16 header_size  12 u32 flags
///  16 u64 body_offset  24 u64 body_length  32 u64 ram_offset  40 u64 ram_size
///  48 u32 body_crc32  52 u32 page_size  56 u32 reserved (0)  60 u32 header_crc32
constexpr std::array<std::byte, header_size> encode_header(const snapshot_header& h) noexcept {
    std::array<std::byte, header_size> out{};
    byte_writer w(out);
    w.bytes(magic);
    w.u16(h.version);
    w.u16(static_cast<std::uint16_t>(header_size));
    w.u32(h.flags);
    w.u64(h.body_offset);
    w.u64(h.body_length);
    w.u64(h.ram_offset);
    w.u64(h.ram_size);
    w.u32(h.body_crc32);
    w.u32(static_cast<std::uint32_t>(page_size));
    w.u32(0);
    w.u32(detail::crc32(std::span<const std::byte>(out).first(60)));
    return out;
}

/// Decode and check the header alone: magic, version, fixed fields, checksum.
constexpr codec_result<snapshot_header> decode_header(std::span<const std::byte> bytes) noexcept {
    if (bytes.size() < header_size) return errc::snapshot_truncated;
    byte_reader in(bytes.first(header_size));
    auto file_magic = in.bytes(magic.size()).value();
    for (std::size_t i = 0; i < magic.size(); ++i)
        if (file_magic[i] != magic[i]) return errc::snapshot_bad_magic;
    snapshot_header h;
    h.version = in.u16().value();
    if (h.version != format_version) return errc::snapshot_unsupported_version;
    const auto size = in.u16().value();
    h.flags = in.u32().value();
    h.body_offset = in.u64().value();
    h.body_length = in.u64().value();
    h.ram_offset = in.u64().value();
    h.ram_size = in.u64().value();
    h.body_crc32 = in.u32().value();
    const auto file_page_size = in.u32().value();
    const auto reserved = in.u32().value();
    const auto header_crc = in.u32().value();
    if (header_crc != detail::crc32(bytes.first(60))) return errc::snapshot_bad_record;
    if (size != header_size || reserved != 0) return errc::snapshot_bad_record;
    if (h.flags != 0) return errc::snapshot_unsupported_version; // no flags defined in version 1
    if (file_page_size != page_size) return errc::snapshot_mismatch;
    return h;
}

/// Check where the header puts body and RAM against the file's real size,
/// overflow-safe, before anything is read or mapped.
constexpr codec_result<void> check_layout(const snapshot_header& h,
                                          std::uint64_t file_size) noexcept {
    if (h.body_offset != header_size) return errc::snapshot_bad_record;
    if (h.body_length > max_body_bytes) return errc::snapshot_too_large;
    if (h.ram_size > max_memory_bytes) return errc::snapshot_too_large;
    if (h.ram_size == 0 || h.ram_size % page_size != 0 || h.ram_offset % page_size != 0)
        return errc::snapshot_bad_record;
    // body_offset and body_length are bounded above, so this cannot wrap.
    if (h.ram_offset < h.body_offset + h.body_length) return errc::snapshot_bad_record;
    if (file_size < h.ram_offset || file_size - h.ram_offset < h.ram_size)
        return errc::snapshot_truncated;
    if (file_size - h.ram_offset != h.ram_size) return errc::snapshot_bad_record; // trailing bytes
    return {};
}

/// Consistency of a record set (both when writing and after reading).
constexpr codec_result<void> validate_records(const snapshot_records& r) {
    SUPERMACHINE_TRY(validate_record(r.machine));
    if (r.vcpus.size() != r.machine.vcpu_count) return errc::snapshot_bad_record;
    for (std::size_t i = 0; i < r.vcpus.size(); ++i)
        if (r.vcpus[i].index != i) return errc::snapshot_bad_record;
    if (r.virtio_devices.size() > max_virtio_devices) return errc::snapshot_too_large;
    if (r.port_forwards.size() > max_port_forwards) return errc::snapshot_too_large;
    return {};
}

namespace detail {
template <class T>
constexpr void encode_tagged(byte_writer& out, record_tag tag, const T& value) {
    byte_writer measure;
    encode_record(measure, value);
    if (measure.error() != errc::success) return out.fail(measure.error());
    if (measure.position() > UINT32_MAX) return out.fail(errc::snapshot_too_large);
    out.u16(static_cast<std::uint16_t>(tag));
    out.u16(0);
    out.u32(static_cast<std::uint32_t>(measure.position()));
    encode_record(out, value);
}

constexpr void encode_body_into(byte_writer& out, const snapshot_records& r) {
    encode_tagged(out, record_tag::machine, r.machine); // always first
    for (const auto& v : r.vcpus)
        encode_tagged(out, record_tag::vcpu, v);
    if (r.interrupt_controller)
        encode_tagged(out, record_tag::interrupt_controller, *r.interrupt_controller);
    if (r.uart) encode_tagged(out, record_tag::uart, *r.uart);
    for (const auto& d : r.virtio_devices)
        encode_tagged(out, record_tag::virtio_device, d);
    if (r.agent) encode_tagged(out, record_tag::agent, *r.agent);
    for (const auto& p : r.port_forwards)
        encode_tagged(out, record_tag::port_forward, p);
}

template <class T>
constexpr codec_result<void> decode_singleton(std::span<const std::byte> payload,
                                              std::optional<T>& slot) {
    if (slot) return errc::snapshot_bad_record; // duplicate
    SUPERMACHINE_TRY(value, decode_exactly<T>(payload));
    slot = std::move(value);
    return {};
}
} // namespace detail

/// The body bytes for a record set.
constexpr codec_result<std::vector<std::byte>> encode_body(const snapshot_records& r) {
    SUPERMACHINE_TRY(validate_records(r));
    byte_writer measure;
    detail::encode_body_into(measure, r);
    SUPERMACHINE_TRY(size, measure.finish());
    if (size > max_body_bytes) return errc::snapshot_too_large;
    std::vector<std::byte> body(size);
    byte_writer out(body);
    detail::encode_body_into(out, r);
    SUPERMACHINE_TRY(out.finish());
    return body;
}

/// Parse a body: the machine record first, then any order; vCPUs in index
/// order; at most one of each singleton; unknown tags only if optional.
constexpr codec_result<snapshot_records> decode_body(std::span<const std::byte> body) {
    byte_reader in(body);
    snapshot_records r;
    bool have_machine = false;
    while (!in.at_end()) {
        SUPERMACHINE_TRY(tag_value, in.u16());
        SUPERMACHINE_TRY(flags, in.u16());
        SUPERMACHINE_TRY(payload, in.blob(max_body_bytes));
        if ((flags & ~known_record_flags) != 0) return errc::snapshot_bad_record;
        const auto tag = static_cast<record_tag>(tag_value);
        if (!have_machine && tag != record_tag::machine) return errc::snapshot_bad_record;
        switch (tag) {
        case record_tag::machine: {
            if (have_machine) return errc::snapshot_bad_record;
            SUPERMACHINE_TRY(machine, decode_exactly<machine_record>(payload));
            r.machine = std::move(machine);
            r.vcpus.reserve(r.machine.vcpu_count); // <= max_vcpus, validated
            have_machine = true;
            break;
        }
        case record_tag::vcpu: {
            if (r.vcpus.size() >= r.machine.vcpu_count) return errc::snapshot_bad_record;
            SUPERMACHINE_TRY(vcpu, decode_exactly<vcpu_record>(payload));
            if (vcpu.index != r.vcpus.size()) return errc::snapshot_bad_record;
            r.vcpus.push_back(std::move(vcpu));
            break;
        }
        case record_tag::interrupt_controller: {
            SUPERMACHINE_TRY(detail::decode_singleton(payload, r.interrupt_controller));
            break;
        }
        case record_tag::uart: {
            SUPERMACHINE_TRY(detail::decode_singleton(payload, r.uart));
            break;
        }
        case record_tag::virtio_device: {
            if (r.virtio_devices.size() >= max_virtio_devices) return errc::snapshot_too_large;
            SUPERMACHINE_TRY(device, decode_exactly<virtio_device_record>(payload));
            r.virtio_devices.push_back(std::move(device));
            break;
        }
        case record_tag::agent: {
            SUPERMACHINE_TRY(detail::decode_singleton(payload, r.agent));
            break;
        }
        case record_tag::port_forward: {
            if (r.port_forwards.size() >= max_port_forwards) return errc::snapshot_too_large;
            SUPERMACHINE_TRY(forward, decode_exactly<port_forward_record>(payload));
            r.port_forwards.push_back(forward);
            break;
        }
        default:
            if ((flags & record_optional) == 0) return errc::snapshot_bad_record;
            break; // a later version's optional record: skipped by its length
        }
    }
    if (!have_machine) return errc::snapshot_bad_record;
    SUPERMACHINE_TRY(validate_records(r));
    return r;
}

/// Header and body for a snapshot of `records` (RAM size from the machine
/// record), unpadded; RAM goes at header.ram_offset.
struct encoded_metadata {
    snapshot_header header;
    std::vector<std::byte> bytes; // header + body
};

constexpr codec_result<encoded_metadata> encode_metadata(const snapshot_records& records) {
    SUPERMACHINE_TRY(body, encode_body(records));
    snapshot_header h;
    h.body_length = body.size();
    h.body_crc32 = detail::crc32(body);
    h.ram_offset = round_up_to_page(header_size + body.size());
    h.ram_size = records.machine.memory_size;
    encoded_metadata m{h, {}};
    const auto head = encode_header(h);
    m.bytes.reserve(header_size + body.size());
    m.bytes.insert(m.bytes.end(), head.begin(), head.end());
    m.bytes.insert(m.bytes.end(), body.begin(), body.end());
    return m;
}

/// A whole snapshot file in memory (tests, small machines, the fuzzer's seed).
constexpr codec_result<std::vector<std::byte>> encode_snapshot(const snapshot_records& records,
                                                               std::span<const std::byte> ram) {
    if (ram.size() != records.machine.memory_size) return errc::invalid_argument;
    SUPERMACHINE_TRY(meta, encode_metadata(records));
    std::vector<std::byte> file(meta.header.ram_offset + ram.size());
    for (std::size_t i = 0; i < meta.bytes.size(); ++i)
        file[i] = meta.bytes[i];
    for (std::size_t i = 0; i < ram.size(); ++i)
        file[meta.header.ram_offset + i] = ram[i];
    return file;
}

/// Decode and check the body that `h` locates in `prefix` (the file's bytes
/// from offset 0 to at least the body's end).
constexpr codec_result<snapshot_records> decode_metadata(const snapshot_header& h,
                                                         std::span<const std::byte> prefix) {
    if (prefix.size() < h.body_offset || prefix.size() - h.body_offset < h.body_length)
        return errc::snapshot_truncated;
    const auto body = prefix.subspan(h.body_offset, h.body_length);
    if (detail::crc32(body) != h.body_crc32) return errc::snapshot_bad_record;
    SUPERMACHINE_TRY(records, decode_body(body));
    if (records.machine.memory_size != h.ram_size) return errc::snapshot_bad_record;
    return records;
}

/// A parsed in-memory snapshot: records and a view of its RAM.
struct parsed_snapshot {
    snapshot_header header;
    snapshot_records records;
    std::span<const std::byte> ram;
};

/// Parse a whole snapshot file held in memory. Never reads outside `file`.
constexpr codec_result<parsed_snapshot> parse_snapshot(std::span<const std::byte> file) {
    SUPERMACHINE_TRY(h, decode_header(file));
    SUPERMACHINE_TRY(check_layout(h, file.size()));
    SUPERMACHINE_TRY(records, decode_metadata(h, file));
    return parsed_snapshot{h, std::move(records), file.subspan(h.ram_offset, h.ram_size)};
}

} // namespace supermachine::snapshot
