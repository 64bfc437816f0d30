#pragma once
// Running the peers' command lines (skopeo, umoci, mkfs.ext4, qemu) from a
// benchmark: one quoting rule, one exit-status rule.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace supermachine::bench {

/// `s` as one single-quoted /bin/sh word.
inline std::string shell_quote(const std::string& s) {
    std::string quoted = "'";
    for (char c : s)
        quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return quoted + "'";
}

/// Runs `command` through /bin/sh; its exit status, or -1 when it did not exit.
inline int run_shell(const std::string& command) {
    std::fflush(nullptr); // our buffered output first, in order
    const int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

} // namespace supermachine::bench
