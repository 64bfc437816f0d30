#pragma once
// Asio's completion tokens (use_awaitable, use_future) recognize failure only
// in a boost::system::error_code first argument, and Boost 1.74 cannot hold a
// std::error_code. So async registry operations complete with a
// boost::system::error_code whose category is this bridge to supermachine's
// category; from_asio_error() turns it back into the library's std::error_code.
#include <supermachine/error.hpp>

#include <boost/system/error_code.hpp>

#include <string>
#include <system_error>

namespace supermachine::oci {

namespace detail {
class asio_bridge_category final : public boost::system::error_category {
public:
    const char* name() const noexcept override { return "supermachine"; }
    std::string message(int value) const override {
        return supermachine::error_category().message(value);
    }
};
} // namespace detail

inline const boost::system::error_category& asio_bridge_category() noexcept {
    static const detail::asio_bridge_category category;
    return category;
}

/// std::error_code (ours, system or generic) -> boost::system::error_code.
inline boost::system::error_code to_asio_error(const std::error_code& ec) noexcept {
    if (!ec) return {};
    if (ec.category() == supermachine::error_category())
        return {ec.value(), asio_bridge_category()};
    if (ec.category() == std::system_category())
        return {ec.value(), boost::system::system_category()};
    if (ec.category() == std::generic_category())
        return {ec.value(), boost::system::generic_category()};
    return {static_cast<int>(errc::io_error), asio_bridge_category()};
}

/// The inverse: compare the result with supermachine::errc values.
inline std::error_code from_asio_error(const boost::system::error_code& ec) noexcept {
    if (!ec) return {};
    if (ec.category() == asio_bridge_category())
        return make_error_code(static_cast<errc>(ec.value()));
    if (ec.category() == boost::system::system_category())
        return {ec.value(), std::system_category()};
    if (ec.category() == boost::system::generic_category())
        return {ec.value(), std::generic_category()};
    return static_cast<std::error_code>(ec);
}

} // namespace supermachine::oci
