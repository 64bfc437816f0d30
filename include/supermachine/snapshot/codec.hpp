#pragma once
// Little-endian field codecs over byte spans, usable in constant expressions.
//
// byte_reader reads from a std::span<const std::byte>: every read checks the
// bytes left first and returns errc::snapshot_truncated instead of reading
// past the slice. Counts and lengths read from the input are capped by a
// caller limit (errc::snapshot_too_large) and by what the remaining bytes can
// hold (errc::snapshot_truncated) before anything is allocated.
//
// byte_writer writes into a std::span<std::byte>, or only measures when it
// has no buffer: encode once to learn the size, allocate, encode again. Its
// errors are sticky (checked once in finish()) so encoders stay linear.
//
// A record is a struct that lists its fields once, in a static constexpr
// fields() function; encode_record / decode_record / encoded_size_min all
// work from that one list (see records.hpp).
//
// Outcome's result<T> holds a error_code, which is not a literal type,
// so this layer returns codec_result<T> (a literal value-or-errc) which
// converts to result<T> and works with SUPERMACHINE_TRY on both sides.
#include <supermachine/error.hpp>

#include <array>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace supermachine::snapshot {

/// A value or an errc, usable in constant expressions.
template <class T>
class [[nodiscard]] codec_result {
public:
    // Two overloads, not one by-value parameter: GCC 12 cannot move a
    // by-value std::string parameter in a constant expression.
    constexpr codec_result(T&& value) noexcept(std::is_nothrow_move_constructible_v<T>)
        : value_(std::move(value)) {}
    constexpr codec_result(const T& value)
        : value_(value) {}
    constexpr codec_result(errc error) noexcept(std::is_nothrow_default_constructible_v<T>)
        : error_(error == errc::success ? errc::invalid_argument : error) {}
    // What SUPERMACHINE_TRY returns on failure.
    template <class E>
    requires std::same_as<E, errc>
    constexpr codec_result(boost::outcome_v2::failure_type<E> failure) noexcept
        : codec_result(failure.error()) {}

    constexpr bool has_value() const noexcept { return error_ == errc::success; }
    constexpr explicit operator bool() const noexcept { return has_value(); }
    constexpr errc error() const noexcept { return error_; }

    constexpr T& value() & {
        check();
        return value_;
    }
    constexpr const T& value() const& {
        check();
        return value_;
    }
    constexpr T&& value() && {
        check();
        return std::move(value_);
    }

    operator result<T>() const& {
        if (has_value()) return value_;
        return error_;
    }
    operator result<T>() && {
        if (has_value()) return std::move(value_);
        return error_;
    }

private:
    constexpr void check() const {
        if (error_ != errc::success) throw boost::system::system_error(make_error_code(error_));
    }
    T value_{};
    errc error_ = errc::success;
};

template <>
class [[nodiscard]] codec_result<void> {
public:
    constexpr codec_result() noexcept = default;
    constexpr codec_result(errc error) noexcept
        : error_(error) {}
    template <class E>
    requires std::same_as<E, errc>
    constexpr codec_result(boost::outcome_v2::failure_type<E> failure) noexcept
        : error_(failure.error()) {}
    constexpr codec_result(boost::outcome_v2::success_type<void>) noexcept {}

    constexpr bool has_value() const noexcept { return error_ == errc::success; }
    constexpr explicit operator bool() const noexcept { return has_value(); }
    constexpr errc error() const noexcept { return error_; }
    constexpr void value() const {
        if (error_ != errc::success) throw boost::system::system_error(make_error_code(error_));
    }
    operator result<void>() const {
        if (has_value()) return success();
        return error_;
    }

private:
    errc error_ = errc::success;
};

/// Reads little-endian fields from a slice; never reads past its end.
class byte_reader {
public:
    constexpr explicit byte_reader(std::span<const std::byte> input) noexcept
        : input_(input) {}

    constexpr std::size_t position() const noexcept { return position_; }
    constexpr std::size_t remaining() const noexcept { return input_.size() - position_; }
    constexpr bool at_end() const noexcept { return position_ == input_.size(); }

    template <std::unsigned_integral T>
    constexpr codec_result<T> unsigned_le() noexcept {
        if (remaining() < sizeof(T)) return errc::snapshot_truncated;
        T value = 0;
        for (std::size_t i = 0; i < sizeof(T); ++i)
            value |= static_cast<T>(
                static_cast<T>(std::to_integer<std::uint8_t>(input_[position_ + i])) << (8 * i));
        position_ += sizeof(T);
        return value;
    }
    constexpr codec_result<std::uint8_t> u8() noexcept { return unsigned_le<std::uint8_t>(); }
    constexpr codec_result<std::uint16_t> u16() noexcept { return unsigned_le<std::uint16_t>(); }
    constexpr codec_result<std::uint32_t> u32() noexcept { return unsigned_le<std::uint32_t>(); }
    constexpr codec_result<std::uint64_t> u64() noexcept { return unsigned_le<std::uint64_t>(); }

    /// A view of the next `length` bytes (no copy).
    constexpr codec_result<std::span<const std::byte>> bytes(std::uint64_t length) noexcept {
        if (length > remaining()) return errc::snapshot_truncated;
        auto view = input_.subspan(position_, static_cast<std::size_t>(length));
        position_ += static_cast<std::size_t>(length);
        return view;
    }

    constexpr codec_result<void> skip(std::uint64_t length) noexcept {
        if (length > remaining()) return errc::snapshot_truncated;
        position_ += static_cast<std::size_t>(length);
        return {};
    }

    /// A u32 element count, checked before the caller allocates: larger than
    /// `limit` is snapshot_too_large; more elements than the remaining bytes
    /// can hold (each at least `min_element_size` bytes) is snapshot_truncated.
    constexpr codec_result<std::uint32_t> count(std::uint64_t limit,
                                                std::uint64_t min_element_size) noexcept {
        auto n = u32();
        if (!n) return n;
        if (n.value() > limit) return errc::snapshot_too_large;
        if (min_element_size == 0) min_element_size = 1;
        if (n.value() > remaining() / min_element_size) return errc::snapshot_truncated;
        return n;
    }

    /// A u32 length-prefixed byte string of at most `limit` bytes (a view).
    constexpr codec_result<std::span<const std::byte>> blob(std::uint64_t limit) noexcept {
        auto n = u32();
        if (!n) return n.error();
        if (n.value() > limit) return errc::snapshot_too_large;
        return bytes(n.value());
    }

    /// A u32 length-prefixed string of at most `limit` bytes.
    constexpr codec_result<std::string> string(std::uint64_t limit) {
        auto view = blob(limit);
        if (!view) return view.error();
        std::string text(view.value().size(), '\0');
        for (std::size_t i = 0; i < text.size(); ++i)
            text[i] = static_cast<char>(std::to_integer<std::uint8_t>(view.value()[i]));
        return text;
    }

    /// Trailing bytes where the input should end are a malformed record.
    constexpr codec_result<void> expect_end() const noexcept {
        if (!at_end()) return errc::snapshot_bad_record;
        return {};
    }

private:
    std::span<const std::byte> input_;
    std::size_t position_ = 0;
};

/// Writes little-endian fields into a buffer, or only measures (no buffer).
class byte_writer {
public:
    /// Measuring writer: counts bytes, stores nothing.
    constexpr byte_writer() noexcept = default;
    constexpr explicit byte_writer(std::span<std::byte> output) noexcept
        : output_(output)
        , measuring_(false) {}

    constexpr std::size_t position() const noexcept { return position_; }
    constexpr errc error() const noexcept { return error_; }
    constexpr void fail(errc error) noexcept {
        if (error_ == errc::success) error_ = error;
    }

    template <std::unsigned_integral T>
    constexpr void unsigned_le(T value) noexcept {
        if (!reserve(sizeof(T))) return;
        for (std::size_t i = 0; i < sizeof(T); ++i)
            output_[position_ + i] =
                static_cast<std::byte>(static_cast<std::uint8_t>(value >> (8 * i)));
        position_ += sizeof(T);
    }
    constexpr void u8(std::uint8_t value) noexcept { unsigned_le(value); }
    constexpr void u16(std::uint16_t value) noexcept { unsigned_le(value); }
    constexpr void u32(std::uint32_t value) noexcept { unsigned_le(value); }
    constexpr void u64(std::uint64_t value) noexcept { unsigned_le(value); }

    constexpr void bytes(std::span<const std::byte> data) noexcept {
        if (!reserve(data.size())) return;
        for (std::size_t i = 0; i < data.size(); ++i)
            output_[position_ + i] = data[i];
        position_ += data.size();
    }

    /// u32 length + bytes; longer than `limit` fails with snapshot_too_large
    /// (the writer refuses what the reader would refuse).
    constexpr void blob(std::span<const std::byte> data, std::uint64_t limit) noexcept {
        if (data.size() > limit || data.size() > UINT32_MAX) return fail(errc::snapshot_too_large);
        u32(static_cast<std::uint32_t>(data.size()));
        bytes(data);
    }

    constexpr void string(std::string_view text, std::uint64_t limit) noexcept {
        if (text.size() > limit || text.size() > UINT32_MAX) return fail(errc::snapshot_too_large);
        u32(static_cast<std::uint32_t>(text.size()));
        if (!reserve(text.size())) return;
        for (std::size_t i = 0; i < text.size(); ++i)
            output_[position_ + i] = static_cast<std::byte>(static_cast<unsigned char>(text[i]));
        position_ += text.size();
    }

    /// u32 element count; more than `limit` fails with snapshot_too_large.
    constexpr void count(std::uint64_t n, std::uint64_t limit) noexcept {
        if (n > limit || n > UINT32_MAX) return fail(errc::snapshot_too_large);
        u32(static_cast<std::uint32_t>(n));
    }

    /// Bytes written (or measured), or the first error.
    constexpr codec_result<std::size_t> finish() const noexcept {
        if (error_ != errc::success) return error_;
        return position_;
    }

private:
    constexpr bool reserve(std::size_t n) noexcept {
        if (error_ != errc::success) return false;
        if (n > SIZE_MAX - position_) {
            fail(errc::snapshot_too_large);
            return false;
        }
        if (measuring_) {
            position_ += n;
            return false; // counted; nothing to store
        }
        if (n > output_.size() - position_) {
            fail(errc::snapshot_too_large);
            return false;
        }
        return true;
    }

    std::span<std::byte> output_;
    std::size_t position_ = 0;
    errc error_ = errc::success;
    bool measuring_ = true;
};

// ---------------------------------------------------------------------------
// Records: describe the fields once, encode and decode from the description.

/// One field of a record: a member pointer and, for variable-size fields
/// (strings, byte vectors, lists), the largest length or count accepted.
template <class Record, class T>
struct field_descriptor {
    T Record::*member;
    std::uint64_t limit;
};

/// A field; `limit` bounds strings and byte vectors (bytes) and lists
/// (elements), and is ignored for fixed-size fields.
template <class Record, class T>
constexpr field_descriptor<Record, T> field(T Record::*member, std::uint64_t limit = 0) noexcept {
    return {member, limit};
}

/// A record type: `static constexpr auto fields()` returns a std::tuple of
/// field_descriptor. It may add `constexpr codec_result<void> validate() const`,
/// called after decoding and before encoding.
template <class T>
concept record = requires {
    T::fields();
};

namespace detail {
template <class T>
struct is_vector : std::false_type {};
template <class T, class A>
struct is_vector<std::vector<T, A>> : std::true_type {
    using element = T;
};
template <class T>
struct is_optional : std::false_type {};
template <class T>
struct is_optional<std::optional<T>> : std::true_type {
    using element = T;
};
template <class T>
struct is_byte_array : std::false_type {};
template <std::size_t N>
struct is_byte_array<std::array<std::byte, N>> : std::true_type {};

template <class T>
concept scalar = std::unsigned_integral<T> || std::same_as<T, bool> ||
    (std::is_enum_v<T>&& std::unsigned_integral<std::underlying_type_t<T>>);
} // namespace detail

template <class T>
constexpr std::uint64_t encoded_size_min() noexcept;

template <class T>
constexpr codec_result<void> validate_record(const T& value) {
    if constexpr (requires { value.validate(); })
        return value.validate();
    else
        return {};
}

/// Encode one field value of type T.
template <class T>
constexpr void encode_value(byte_writer& out, const T& value, std::uint64_t limit) {
    if constexpr (std::same_as<T, bool>) {
        out.u8(value ? 1 : 0);
    } else if constexpr (std::is_enum_v<T>) {
        out.unsigned_le(static_cast<std::underlying_type_t<T>>(value));
    } else if constexpr (std::unsigned_integral<T>) {
        out.unsigned_le(value);
    } else if constexpr (std::same_as<T, std::string>) {
        out.string(value, limit);
    } else if constexpr (std::same_as<T, std::vector<std::byte>>) {
        out.blob(value, limit);
    } else if constexpr (detail::is_byte_array<T>::value) {
        out.bytes(value);
    } else if constexpr (detail::is_optional<T>::value) {
        out.u8(value.has_value() ? 1 : 0);
        if (value) encode_value(out, *value, limit);
    } else if constexpr (detail::is_vector<T>::value) {
        out.count(value.size(), limit);
        for (const auto& element : value)
            encode_value(out, element, 0);
    } else {
        static_assert(record<T>, "field type has no codec");
        if (auto valid = validate_record(value); !valid) return out.fail(valid.error());
        std::apply(
            [&](const auto&... fields) {
                (encode_value(out, value.*(fields.member), fields.limit), ...);
            },
            T::fields());
    }
}

/// Decode one field value of type T into `value`.
template <class T>
constexpr codec_result<void> decode_value(byte_reader& in, T& value, std::uint64_t limit) {
    if constexpr (std::same_as<T, bool>) {
        SUPERMACHINE_TRY(flag, in.u8());
        if (flag > 1) return errc::snapshot_bad_record;
        value = flag == 1;
    } else if constexpr (std::is_enum_v<T>) {
        SUPERMACHINE_TRY(raw, in.unsigned_le<std::underlying_type_t<T>>());
        value = static_cast<T>(raw); // the record's validate() rejects unknown values
    } else if constexpr (std::unsigned_integral<T>) {
        SUPERMACHINE_TRY(raw, in.unsigned_le<T>());
        value = raw;
    } else if constexpr (std::same_as<T, std::string>) {
        SUPERMACHINE_TRY(text, in.string(limit));
        value = std::move(text);
    } else if constexpr (std::same_as<T, std::vector<std::byte>>) {
        SUPERMACHINE_TRY(view, in.blob(limit));
        value.assign(view.begin(), view.end());
    } else if constexpr (detail::is_byte_array<T>::value) {
        SUPERMACHINE_TRY(view, in.bytes(value.size()));
        for (std::size_t i = 0; i < value.size(); ++i)
            value[i] = view[i];
    } else if constexpr (detail::is_optional<T>::value) {
        SUPERMACHINE_TRY(present, in.u8());
        if (present > 1) return errc::snapshot_bad_record;
        value.reset();
        if (present == 1) {
            typename detail::is_optional<T>::element element{};
            SUPERMACHINE_TRY(decode_value(in, element, limit));
            value = std::move(element);
        }
    } else if constexpr (detail::is_vector<T>::value) {
        using element_type = typename detail::is_vector<T>::element;
        SUPERMACHINE_TRY(n, in.count(limit, encoded_size_min<element_type>()));
        value.clear();
        value.reserve(n); // bounded by the bytes left, checked above
        for (std::uint32_t i = 0; i < n; ++i) {
            element_type element{};
            SUPERMACHINE_TRY(decode_value(in, element, 0));
            value.push_back(std::move(element));
        }
    } else {
        static_assert(record<T>, "field type has no codec");
        codec_result<void> status;
        std::apply(
            [&](const auto&... fields) {
                ((status =
                      status ? decode_value(in, value.*(fields.member), fields.limit) : status),
                 ...);
            },
            T::fields());
        if (!status) return status;
        return validate_record(value);
    }
    return {};
}

/// The fewest bytes any value of T encodes to (bounds list counts).
template <class T>
constexpr std::uint64_t encoded_size_min() noexcept {
    if constexpr (std::same_as<T, bool>)
        return 1;
    else if constexpr (std::is_enum_v<T>)
        return sizeof(std::underlying_type_t<T>);
    else if constexpr (std::unsigned_integral<T>)
        return sizeof(T);
    else if constexpr (detail::is_byte_array<T>::value)
        return std::tuple_size_v<T>;
    else if constexpr (detail::is_optional<T>::value)
        return 1;
    else if constexpr (std::same_as<T, std::string> || detail::is_vector<T>::value)
        return 4;
    else {
        static_assert(record<T>, "field type has no codec");
        return std::apply(
            [](const auto&... fields) {
                return (std::uint64_t{0} + ... +
                        encoded_size_min<
                            std::remove_cvref_t<decltype(std::declval<T>().*(fields.member))>>());
            },
            T::fields());
    }
}

/// Append a record's encoding to `out`.
template <record T>
constexpr void encode_record(byte_writer& out, const T& value) {
    encode_value(out, value, 0);
}

/// Decode one record from `in` (advances past it).
template <record T>
constexpr codec_result<T> decode_record(byte_reader& in) {
    T value{};
    SUPERMACHINE_TRY(decode_value(in, value, 0));
    return value;
}

/// Encode a record into a new byte vector (measure, allocate, write).
template <record T>
constexpr codec_result<std::vector<std::byte>> encode_to_vector(const T& value) {
    byte_writer measure;
    encode_record(measure, value);
    SUPERMACHINE_TRY(size, measure.finish());
    std::vector<std::byte> bytes(size);
    byte_writer writer(bytes);
    encode_record(writer, value);
    SUPERMACHINE_TRY(writer.finish());
    return bytes;
}

/// Decode a record that must fill `bytes` exactly.
template <record T>
constexpr codec_result<T> decode_exactly(std::span<const std::byte> bytes) {
    byte_reader in(bytes);
    SUPERMACHINE_TRY(value, decode_record<T>(in));
    SUPERMACHINE_TRY(in.expect_end());
    return std::move(value);
}

} // namespace supermachine::snapshot
