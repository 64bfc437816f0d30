#pragma once
// Tests that need something this host cannot give (Linux on KVM, a tool)
// say so in one line and exit 77, which CTest reports as "Skipped".
// Never return early as a pass.
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace supermachine::test {

[[noreturn]] inline void skip(std::string_view reason) {
    std::printf("SKIP: %.*s\n", static_cast<int>(reason.size()), reason.data());
    std::fflush(stdout);
    std::_Exit(77);
}

inline void skip_unless(bool condition, std::string_view reason) {
    if (!condition) skip(reason);
}

} // namespace supermachine::test
