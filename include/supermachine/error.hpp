#pragma once
// One error category for the whole library, and result<T> on Boost.Outcome.
//
// Every fallible operation returns result<T> (or takes an error_code&), and
// every async operation completes with an error_code: boost::system's, as
// Asio's own objects do, so use_awaitable and use_future throw
// boost::system::system_error and cancellation reads as
// asio::error::operation_aborted. The throwing forms throw the same.
// Codes are grouped by layer; add new ones inside your layer's block.
#include <boost/outcome/boost_result.hpp>
#include <boost/outcome/try.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <cerrno>
#include <ostream>

#include <string>
#include <system_error>

namespace supermachine {

enum class errc {
    success = 0,

    // --- general ---
    invalid_argument = 1,
    io_error,
    not_supported,
    timeout,
    cancelled,
    out_of_resources,

    // --- guest memory ---
    address_out_of_range = 100, // a guest-physical range not inside guest RAM
    memory_too_small,
    memory_too_large,

    // --- boot ---
    kernel_not_found = 200,
    kernel_invalid,   // not a bzImage / ELF kernel we can load
    kernel_truncated, // shorter than its headers say
    kernel_unsupported, // e.g. boot protocol too old, not relocatable where needed
    initrd_too_large,
    cmdline_too_long,
    acpi_too_large,

    // --- hypervisor backend ---
    kvm_unavailable = 300, // no /dev/kvm or no permission
    kvm_api_mismatch,
    kvm_failed,            // an ioctl failed (errno kept alongside where useful)
    too_many_vcpus,
    emulation_failure,     // KVM could not emulate a guest instruction
    guest_triple_fault,
    guest_panicked,

    // --- devices / virtio ---
    descriptor_chain_malformed = 400,
    queue_not_ready,
    device_broken,
    device_read_only,
    sector_out_of_range,

    // --- snapshot ---
    snapshot_truncated = 500,
    snapshot_bad_magic,
    snapshot_unsupported_version,
    snapshot_bad_record,
    snapshot_too_large,
    snapshot_mismatch, // e.g. taken for another device set

    // --- OCI ---
    bad_reference = 600,
    digest_mismatch,
    bad_digest,
    manifest_invalid,
    platform_not_found,
    registry_error,
    unauthorized,
    not_found,
    rate_limited,
    archive_malformed, // tar / compression stream
    path_escape,       // an entry tried to leave the image root
    image_too_large,
    filesystem_full,
    size_mismatch, // content longer or shorter than its descriptor says

    // --- agent ---
    agent_protocol_error = 700,
    agent_auth_failed,
    agent_unavailable,
    command_not_found,
    end_of_stream, // an agent stream (stdout, stderr, tcp) has no more data

    // --- vhost-user transport and engines ---
    vhost_user_protocol_error = 800, // malformed message: size, fd count, version
    vhost_user_unexpected_message,   // valid message at the wrong time (ring op before mem table...)
    vhost_user_disconnected,
    engine_unavailable, // the engine's program (qemu-system-x86_64) is missing or unusable
    engine_device_missing, // the engine lacks a device we need (e.g. vhost-user-blk)
    engine_failed,
};

namespace detail {
class error_category_impl final : public boost::system::error_category {
public:
    // A fixed id lets two copies of this category (two shared objects)
    // compare equal, as Boost.System's own do.
    constexpr error_category_impl() noexcept : boost::system::error_category(0x5c4e'7a3d'91b0'e2f1ULL) {}
    const char* name() const noexcept override { return "supermachine"; }
    // Portable conditions, so `ec == std::errc::...` and
    // `ec == boost::system::errc::...` work for ours as for errno codes.
    boost::system::error_condition default_error_condition(int value) const noexcept override {
        using generic = boost::system::errc::errc_t;
        switch (static_cast<errc>(value)) {
        case errc::invalid_argument: return make_error_condition(generic::invalid_argument);
        case errc::not_supported: return make_error_condition(generic::not_supported);
        case errc::out_of_resources: return make_error_condition(generic::not_enough_memory);
        case errc::io_error: return make_error_condition(generic::io_error);
        case errc::not_found:
        case errc::kernel_not_found: return make_error_condition(generic::no_such_file_or_directory);
        case errc::unauthorized: return make_error_condition(generic::permission_denied);
        case errc::kvm_unavailable: return make_error_condition(generic::no_such_device);
        default: return {value, *this};
        }
    }
    std::string message(int value) const override {
        switch (static_cast<errc>(value)) {
        case errc::success: return "success";
        case errc::invalid_argument: return "invalid argument";
        case errc::io_error: return "I/O error";
        case errc::not_supported: return "not supported";
        case errc::timeout: return "timed out";
        case errc::cancelled: return "cancelled";
        case errc::out_of_resources: return "out of resources";

        case errc::address_out_of_range: return "guest address range outside guest memory";
        case errc::memory_too_small: return "guest memory too small";
        case errc::memory_too_large: return "guest memory too large";

        case errc::kernel_not_found: return "kernel file not found or unreadable";
        case errc::kernel_invalid: return "not a bootable x86-64 Linux kernel (bzImage or ELF)";
        case errc::kernel_truncated: return "kernel image is truncated";
        case errc::kernel_unsupported: return "kernel boot protocol not supported";
        case errc::initrd_too_large: return "initramfs does not fit in guest memory below the kernel's limit";
        case errc::cmdline_too_long: return "kernel command line too long";
        case errc::acpi_too_large: return "ACPI tables do not fit their area";

        case errc::kvm_unavailable: return "KVM unavailable (/dev/kvm missing or no permission)";
        case errc::kvm_api_mismatch: return "unsupported KVM API version or missing capability";
        case errc::kvm_failed: return "a KVM operation failed";
        case errc::too_many_vcpus: return "too many vCPUs";
        case errc::emulation_failure: return "KVM could not emulate a guest instruction";
        case errc::guest_triple_fault: return "guest triple-faulted";
        case errc::guest_panicked: return "guest kernel panicked";

        case errc::descriptor_chain_malformed: return "malformed virtqueue descriptor chain";
        case errc::queue_not_ready: return "virtqueue not ready";
        case errc::device_broken: return "device needs reset after a guest error";
        case errc::device_read_only: return "device is read-only";
        case errc::sector_out_of_range: return "sector out of range";

        case errc::snapshot_truncated: return "snapshot file truncated";
        case errc::snapshot_bad_magic: return "not a supermachine snapshot (bad magic)";
        case errc::snapshot_unsupported_version: return "unsupported snapshot format version";
        case errc::snapshot_bad_record: return "malformed record in snapshot";
        case errc::snapshot_too_large: return "snapshot field exceeds its bound";
        case errc::snapshot_mismatch: return "snapshot does not match this machine";

        case errc::bad_reference: return "invalid image reference";
        case errc::digest_mismatch: return "content does not match its digest";
        case errc::bad_digest: return "invalid digest";
        case errc::manifest_invalid: return "invalid image manifest or config";
        case errc::platform_not_found: return "image has no entry for the requested platform";
        case errc::registry_error: return "registry error";
        case errc::unauthorized: return "registry refused access (unauthorized)";
        case errc::not_found: return "not found";
        case errc::rate_limited: return "registry rate limit reached";
        case errc::archive_malformed: return "malformed archive or compressed stream";
        case errc::path_escape: return "archive entry escapes the image root";
        case errc::image_too_large: return "image exceeds a size limit";
        case errc::filesystem_full: return "filesystem image full";
        case errc::size_mismatch: return "content size does not match its descriptor";

        case errc::agent_protocol_error: return "guest agent protocol error";
        case errc::agent_auth_failed: return "guest agent authentication failed";
        case errc::agent_unavailable: return "guest agent unavailable";
        case errc::command_not_found: return "command not found in the guest";
        case errc::end_of_stream: return "end of stream";

        case errc::vhost_user_protocol_error: return "malformed vhost-user message";
        case errc::vhost_user_unexpected_message: return "vhost-user message not valid in this state";
        case errc::vhost_user_disconnected: return "vhost-user frontend disconnected";
        case errc::engine_unavailable: return "engine unavailable (qemu-system-x86_64 not found or unusable)";
        case errc::engine_device_missing: return "engine lacks a required device";
        case errc::engine_failed: return "engine process failed";
        }
        return "unknown supermachine error " + std::to_string(value);
    }
};
} // namespace detail

inline const boost::system::error_category& error_category() noexcept {
    static const detail::error_category_impl category;
    return category;
}

/// The error code every operation completes with: Asio's.
using error_code = boost::system::error_code;

/// errc::cancelled and errc::timeout are Asio's own codes
/// (asio::error::operation_aborted, asio::error::timed_out: errno values in
/// the system category), so a cancelled or timed-out operation of ours and
/// one of Asio's compare equal, and `ec == errc::cancelled` still reads well.
inline error_code make_error_code(errc e) noexcept {
    switch (e) {
    case errc::cancelled: return {ECANCELED, boost::system::system_category()};
    case errc::timeout: return {ETIMEDOUT, boost::system::system_category()};
    default: return {static_cast<int>(e), error_category()};
    }
}

template <class T>
using result = boost::outcome_v2::boost_result<T, error_code>;

using boost::outcome_v2::success;

/// Prints the code's message (Boost.Test prints both sides of a failed
/// `ec == errc::x`).
inline std::ostream& operator<<(std::ostream& out, errc e) {
    return out << make_error_code(e).message();
}

/// An errno value as an error_code (system_category), for syscall failures.
inline error_code errno_code(int value) noexcept { return {value, boost::system::system_category()}; }

/// Throw the error in `r` as boost::system::system_error (what Asio throws),
/// else return its value: the bridge from the error_code& forms to the
/// throwing forms.
template <class T>
T value_or_throw(result<T>&& r, const char* what = "supermachine") {
    if (!r) throw boost::system::system_error(r.error(), what);
    if constexpr (!std::is_void_v<T>) return std::move(r).value();
}

} // namespace supermachine

template <>
struct boost::system::is_error_code_enum<supermachine::errc> : std::true_type {};

// SUPERMACHINE_TRY(name, expr): declare `auto&& name` from a result or return its error.
// SUPERMACHINE_TRY(expr): the same for result<void>. (Outcome 2.2 wants the
// declaration spelled out; this keeps call sites short.)
#define SUPERMACHINE_TRY_DECLARE(name, ...) BOOST_OUTCOME_TRY(auto&& name, __VA_ARGS__)
#define SUPERMACHINE_TRY_VOID(...) BOOST_OUTCOME_TRYV(__VA_ARGS__)
// Two or more arguments (a template argument list may add commas) declare.
#define SUPERMACHINE_TRY_PICK(_1, _2, _3, _4, _5, _6, chosen, ...) chosen
#define SUPERMACHINE_TRY(...)                                                                     \
    SUPERMACHINE_TRY_PICK(__VA_ARGS__, SUPERMACHINE_TRY_DECLARE, SUPERMACHINE_TRY_DECLARE,        \
                          SUPERMACHINE_TRY_DECLARE, SUPERMACHINE_TRY_DECLARE,                     \
                          SUPERMACHINE_TRY_DECLARE, SUPERMACHINE_TRY_VOID, unused)                \
    (__VA_ARGS__)
