#include "command.hpp"

#include <cstdio>

namespace {
int run_version(std::span<char*>) {
    std::printf("supermachine 0.1.0\n");
    return 0;
}
const supermachine::cli::command_registration registration{"version", "print the version",
                                                           &run_version};
} // namespace
