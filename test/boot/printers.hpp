#pragma once
// Boost.Test log printers for the boot tests' value types.
#include <supermachine/boot/linux_loader.hpp>

#include <boost/test/unit_test.hpp>

#include <cstddef>
#include <ostream>

// errc's operator<< lives in <supermachine/error.hpp>.
namespace supermachine {
namespace boot {
inline std::ostream& operator<<(std::ostream& out, entry_mode m) {
    return out << (m == entry_mode::long_mode_64 ? "long_mode_64" : "protected_mode_32_pvh");
}
} // namespace boot
} // namespace supermachine

namespace std {
inline std::ostream& boost_test_print_type(std::ostream& out, std::byte b) {
    return out << static_cast<unsigned>(b);
}
} // namespace std
