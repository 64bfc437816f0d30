#pragma once
// The vhost-user wire protocol (QEMU docs/interop/vhost-user.rst): a 12-byte
// header (request, flags, payload size), a payload whose layout depends on the
// request, and file descriptors passed alongside with SCM_RIGHTS.
//
// Everything here comes from the frontend, which is hostile: validate() checks
// each request's payload size and fd count against what the spec allows for
// it before any payload is interpreted; the parse_* functions are only called
// on validated messages and copy fields out (the structures are packed on the
// wire, so nothing is read in place).
#include <supermachine/detail/unique_fd.hpp>
#include <supermachine/error.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace supermachine::vhost_user {

/// Front-end → back-end requests (numbering from the spec).
enum class request : std::uint32_t {
    none = 0,
    get_features = 1,
    set_features = 2,
    set_owner = 3,
    reset_owner = 4,
    set_mem_table = 5,
    set_log_base = 6,
    set_log_fd = 7,
    set_vring_num = 8,
    set_vring_addr = 9,
    set_vring_base = 10,
    get_vring_base = 11,
    set_vring_kick = 12,
    set_vring_call = 13,
    set_vring_err = 14,
    get_protocol_features = 15,
    set_protocol_features = 16,
    get_queue_num = 17,
    set_vring_enable = 18,
    send_rarp = 19,
    net_set_mtu = 20,
    set_backend_req_fd = 21,
    iotlb_msg = 22,
    set_vring_endian = 23,
    get_config = 24,
    set_config = 25,
    create_crypto_session = 26,
    close_crypto_session = 27,
    postcopy_advise = 28,
    postcopy_listen = 29,
    postcopy_end = 30,
    get_inflight_fd = 31,
    set_inflight_fd = 32,
    gpu_set_socket = 33,
    reset_device = 34,
    vring_kick = 35,
    get_max_mem_slots = 36,
    add_mem_reg = 37,
    rem_mem_reg = 38,
    set_status = 39,
    get_status = 40,
};

/// Header flag bits.
namespace header_flag {
inline constexpr std::uint32_t version_mask = 0x3;
inline constexpr std::uint32_t version = 0x1;
inline constexpr std::uint32_t reply = 1u << 2;
inline constexpr std::uint32_t need_reply = 1u << 3;
} // namespace header_flag

/// Virtio feature bit the vhost-user layer adds to the device's features.
inline constexpr std::uint64_t protocol_features_bit = std::uint64_t{1}
                                                       << 30; // VHOST_USER_F_PROTOCOL_FEATURES

/// VHOST_F_LOG_ALL: the back-end can log its writes for live migration.
/// QEMU blocks every migration of a vhost device that does not offer it.
inline constexpr std::uint64_t log_all_bit = std::uint64_t{1} << 26;

/// Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
namespace protocol_feature {
inline constexpr std::uint64_t multiqueue = 1u << 0;
inline constexpr std::uint64_t log_shmfd = 1u << 1;
inline constexpr std::uint64_t rarp = 1u << 2;
inline constexpr std::uint64_t reply_ack = 1u << 3;
inline constexpr std::uint64_t mtu = 1u << 4;
inline constexpr std::uint64_t backend_req = 1u << 5;
inline constexpr std::uint64_t cross_endian = 1u << 6;
inline constexpr std::uint64_t crypto_session = 1u << 7;
inline constexpr std::uint64_t pagefault = 1u << 8;
inline constexpr std::uint64_t config = 1u << 9;
inline constexpr std::uint64_t backend_send_fd = 1u << 10;
inline constexpr std::uint64_t host_notifier = 1u << 11;
inline constexpr std::uint64_t inflight_shmfd = 1u << 12;
inline constexpr std::uint64_t reset_device = 1u << 13;
inline constexpr std::uint64_t inband_notifications = 1u << 14;
inline constexpr std::uint64_t configure_mem_slots = 1u << 15;
inline constexpr std::uint64_t status = 1u << 16;
} // namespace protocol_feature

inline constexpr std::size_t header_size = 12;
/// VHOST_MEMORY_BASELINE_NREGIONS: regions per SET_MEM_TABLE, and so the
/// most fds one message can carry.
inline constexpr std::size_t max_memory_regions = 8;
inline constexpr std::size_t max_fds = max_memory_regions;
/// VHOST_USER_MAX_CONFIG_SIZE.
inline constexpr std::size_t max_config_size = 256;
/// Largest payload of any request we accept (config: 12 + 256; memory table: 8 + 8 * 32).
inline constexpr std::size_t max_payload_size = 12 + max_config_size;

struct header {
    std::uint32_t request = 0;
    std::uint32_t flags = 0;
    std::uint32_t size = 0;
};

struct vring_state {
    std::uint32_t index = 0;
    std::uint32_t num = 0;
};

struct vring_address {
    std::uint32_t index = 0;
    std::uint32_t flags = 0;      // bit 0: log used-ring writes
    std::uint64_t descriptor = 0; // front-end user addresses
    std::uint64_t used = 0;
    std::uint64_t available = 0;
    std::uint64_t log = 0; // guest address for logging
};
inline constexpr std::size_t vring_address_wire_size = 40;

struct memory_region_description {
    std::uint64_t guest_address = 0;
    std::uint64_t size = 0;
    std::uint64_t user_address = 0; // the front-end's virtual address of the region
    std::uint64_t mmap_offset = 0;  // offset of the region in its fd
};
inline constexpr std::size_t memory_region_wire_size = 32;

struct memory_table {
    std::uint32_t count = 0;
    std::array<memory_region_description, max_memory_regions> regions{};
    std::span<const memory_region_description> used() const noexcept {
        return {regions.data(), count};
    }
};

struct config_access {
    std::uint32_t offset = 0;
    std::uint32_t size = 0;
    std::uint32_t flags = 0;
    std::span<const std::byte> data; // SET_CONFIG: the bytes; GET_CONFIG: ignored
};
inline constexpr std::size_t config_header_size = 12;

/// SET_VRING_KICK / CALL / ERR payload: a ring index, and whether an fd comes with it.
struct vring_file {
    std::uint32_t index = 0;
    bool no_fd = false; // bit 8: polling / no notification
};
inline constexpr std::uint64_t vring_file_index_mask = 0xff;
inline constexpr std::uint64_t vring_file_no_fd = 1u << 8;

/// One received message: header, payload bytes and owned fds.
struct message {
    header head;
    std::array<std::byte, max_payload_size> payload_storage{};
    std::vector<supermachine::detail::unique_fd> fds;

    std::span<const std::byte> payload() const noexcept {
        return {payload_storage.data(), head.size};
    }
    vhost_user::request request() const noexcept {
        return static_cast<vhost_user::request>(head.request);
    }
    bool needs_reply() const noexcept { return (head.flags & header_flag::need_reply) != 0; }
};

namespace detail {
template <class T>
T load(std::span<const std::byte> bytes, std::size_t offset) noexcept {
    T value;
    std::memcpy(&value, bytes.data() + offset, sizeof value); // caller checked bounds
    return value;
}
template <class T>
void store(std::span<std::byte> bytes, std::size_t offset, T value) noexcept {
    std::memcpy(bytes.data() + offset, &value, sizeof value);
}
} // namespace detail

/// Decode and check a header read from the frontend: version 1, not a reply,
/// payload no larger than any request may carry.
inline result<header> decode_header(std::span<const std::byte, header_size> bytes) noexcept {
    header h{detail::load<std::uint32_t>(bytes, 0), detail::load<std::uint32_t>(bytes, 4),
             detail::load<std::uint32_t>(bytes, 8)};
    if ((h.flags & header_flag::version_mask) != header_flag::version)
        return errc::vhost_user_protocol_error;
    if (h.flags & header_flag::reply) return errc::vhost_user_protocol_error;
    if (h.size > max_payload_size) return errc::vhost_user_protocol_error;
    return h;
}

/// Whether the request, when valid, is always answered (independently of REPLY_ACK).
constexpr bool has_inherent_reply(request r, std::uint64_t protocol_features) noexcept {
    switch (r) {
    case request::get_features:
    case request::get_protocol_features:
    case request::get_vring_base:
    case request::get_queue_num:
    case request::get_config:
    case request::get_inflight_fd:
    case request::get_max_mem_slots:
    case request::get_status:
    case request::postcopy_advise:
        return true;
    case request::set_log_base:
        return (protocol_features & protocol_feature::log_shmfd) != 0;
    default:
        return false;
    }
}

constexpr bool is_known(request r) noexcept {
    return static_cast<std::uint32_t>(r) >= 1 && static_cast<std::uint32_t>(r) <= 40;
}

/// Check a message's payload size and fd count against what its request
/// allows. Unknown requests pass only with no fds (they are answered as
/// unsupported by the backend, never interpreted).
inline result<void> validate(const message& m) noexcept {
    const std::size_t size = m.head.size;
    const std::size_t fds = m.fds.size();
    auto exact = [&](std::size_t want_size, std::size_t want_fds) -> result<void> {
        if (size != want_size || fds != want_fds) return errc::vhost_user_protocol_error;
        return success();
    };
    switch (m.request()) {
    case request::get_features:
    case request::get_protocol_features:
    case request::set_owner:
    case request::reset_owner:
    case request::get_queue_num:
    case request::reset_device:
    case request::get_max_mem_slots:
    case request::get_status:
    case request::postcopy_advise:
    case request::postcopy_listen:
    case request::postcopy_end:
        return exact(0, 0);
    case request::set_features:
    case request::set_protocol_features:
    case request::set_status:
        return exact(8, 0);
    case request::set_vring_num:
    case request::set_vring_base:
    case request::get_vring_base:
    case request::set_vring_enable:
    case request::set_vring_endian:
    case request::vring_kick:
        return exact(8, 0);
    case request::set_vring_addr:
        return exact(vring_address_wire_size, 0);
    case request::set_vring_kick:
    case request::set_vring_call:
    case request::set_vring_err: {
        if (size != 8) return errc::vhost_user_protocol_error;
        const auto value = detail::load<std::uint64_t>(m.payload(), 0);
        if (value & ~(vring_file_index_mask | vring_file_no_fd))
            return errc::vhost_user_protocol_error;
        const std::size_t want = (value & vring_file_no_fd) ? 0 : 1;
        if (fds != want) return errc::vhost_user_protocol_error;
        return success();
    }
    case request::set_mem_table: {
        if (size < 8) return errc::vhost_user_protocol_error;
        const auto count = detail::load<std::uint32_t>(m.payload(), 0);
        if (count == 0 || count > max_memory_regions) return errc::vhost_user_protocol_error;
        // Exactly the regions sent; some front-ends send the whole 8-slot array.
        if (size != 8 + count * memory_region_wire_size &&
            size != 8 + max_memory_regions * memory_region_wire_size)
            return errc::vhost_user_protocol_error;
        if (fds != count) return errc::vhost_user_protocol_error;
        return success();
    }
    case request::set_log_base:
        return exact(16, 1);
    case request::set_log_fd:
    case request::set_backend_req_fd:
        return exact(0, 1);
    case request::get_config:
    case request::set_config: {
        if (fds != 0 || size < config_header_size) return errc::vhost_user_protocol_error;
        const auto config_size = detail::load<std::uint32_t>(m.payload(), 4);
        if (config_size > max_config_size || size != config_header_size + config_size)
            return errc::vhost_user_protocol_error;
        return success();
    }
    case request::get_inflight_fd:
        return exact(20, 0);
    case request::set_inflight_fd:
        return exact(20, 1);
    case request::add_mem_reg:
    case request::rem_mem_reg: {
        if (size != 8 + memory_region_wire_size) return errc::vhost_user_protocol_error;
        // ADD carries the region's fd; some front-ends also send one with REM (closed unread).
        if (m.request() == request::add_mem_reg ? fds != 1 : fds > 1)
            return errc::vhost_user_protocol_error;
        return success();
    }
    default:
        if (fds != 0) return errc::vhost_user_protocol_error;
        return success();
    }
}

// --- payload parsers (only on validated messages) ---

inline std::uint64_t parse_u64(const message& m) noexcept {
    return detail::load<std::uint64_t>(m.payload(), 0);
}

inline vring_state parse_vring_state(const message& m) noexcept {
    return {detail::load<std::uint32_t>(m.payload(), 0),
            detail::load<std::uint32_t>(m.payload(), 4)};
}

inline vring_address parse_vring_address(const message& m) noexcept {
    const auto p = m.payload();
    return {detail::load<std::uint32_t>(p, 0),  detail::load<std::uint32_t>(p, 4),
            detail::load<std::uint64_t>(p, 8),  detail::load<std::uint64_t>(p, 16),
            detail::load<std::uint64_t>(p, 24), detail::load<std::uint64_t>(p, 32)};
}

inline vring_file parse_vring_file(const message& m) noexcept {
    const auto value = parse_u64(m);
    return {static_cast<std::uint32_t>(value & vring_file_index_mask),
            (value & vring_file_no_fd) != 0};
}

inline memory_table parse_memory_table(const message& m) noexcept {
    const auto p = m.payload();
    memory_table t;
    t.count = detail::load<std::uint32_t>(p, 0);
    for (std::size_t i = 0; i < t.count; ++i) {
        const std::size_t at = 8 + i * memory_region_wire_size;
        t.regions[i] = {detail::load<std::uint64_t>(p, at), detail::load<std::uint64_t>(p, at + 8),
                        detail::load<std::uint64_t>(p, at + 16),
                        detail::load<std::uint64_t>(p, at + 24)};
    }
    return t;
}

inline config_access parse_config(const message& m) noexcept {
    const auto p = m.payload();
    config_access c{detail::load<std::uint32_t>(p, 0),
                    detail::load<std::uint32_t>(p, 4),
                    detail::load<std::uint32_t>(p, 8),
                    {}};
    c.data = p.subspan(config_header_size, c.size);
    return c;
}

// --- encoding (replies from us; requests from the test front-ends) ---

/// Header + payload bytes for one message.
inline std::vector<std::byte> encode(std::uint32_t request_code, std::uint32_t flags,
                                     std::span<const std::byte> payload) {
    std::vector<std::byte> out(header_size + payload.size());
    detail::store(std::span(out), 0, request_code);
    detail::store(std::span(out), 4, flags);
    detail::store(std::span(out), 8, static_cast<std::uint32_t>(payload.size()));
    if (!payload.empty()) std::memcpy(out.data() + header_size, payload.data(), payload.size());
    return out;
}

inline std::vector<std::byte> encode_reply(request r, std::span<const std::byte> payload) {
    return encode(static_cast<std::uint32_t>(r), header_flag::version | header_flag::reply,
                  payload);
}

inline std::array<std::byte, 8> u64_bytes(std::uint64_t value) noexcept {
    std::array<std::byte, 8> b;
    std::memcpy(b.data(), &value, 8);
    return b;
}

inline std::array<std::byte, 8> vring_state_bytes(vring_state s) noexcept {
    std::array<std::byte, 8> b;
    std::memcpy(b.data(), &s.index, 4);
    std::memcpy(b.data() + 4, &s.num, 4);
    return b;
}

inline std::array<std::byte, vring_address_wire_size>
vring_address_bytes(const vring_address& a) noexcept {
    std::array<std::byte, vring_address_wire_size> b;
    detail::store(std::span(b), 0, a.index);
    detail::store(std::span(b), 4, a.flags);
    detail::store(std::span(b), 8, a.descriptor);
    detail::store(std::span(b), 16, a.used);
    detail::store(std::span(b), 24, a.available);
    detail::store(std::span(b), 32, a.log);
    return b;
}

inline std::vector<std::byte>
memory_table_bytes(std::span<const memory_region_description> regions) {
    std::vector<std::byte> b(8 + regions.size() * memory_region_wire_size);
    detail::store(std::span(b), 0, static_cast<std::uint32_t>(regions.size()));
    for (std::size_t i = 0; i < regions.size(); ++i) {
        const std::size_t at = 8 + i * memory_region_wire_size;
        detail::store(std::span(b), at, regions[i].guest_address);
        detail::store(std::span(b), at + 8, regions[i].size);
        detail::store(std::span(b), at + 16, regions[i].user_address);
        detail::store(std::span(b), at + 24, regions[i].mmap_offset);
    }
    return b;
}

inline std::vector<std::byte> config_bytes(std::uint32_t offset, std::uint32_t flags,
                                           std::span<const std::byte> data) {
    std::vector<std::byte> b(config_header_size + data.size());
    detail::store(std::span(b), 0, offset);
    detail::store(std::span(b), 4, static_cast<std::uint32_t>(data.size()));
    detail::store(std::span(b), 8, flags);
    if (!data.empty()) std::memcpy(b.data() + config_header_size, data.data(), data.size());
    return b;
}

} // namespace supermachine::vhost_user
