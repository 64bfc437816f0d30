#pragma once
// The peer every kvm-engine benchmark compares against: QEMU's microvm on the
// same /dev/kvm, same guest, same memory, console on stdio, no extra devices.
#include <string>
#include <vector>

namespace supermachine::bench {

inline std::vector<std::string> qemu_microvm_kvm_argv(const std::string& kernel,
                                                      const std::string& cmdline, unsigned mib) {
    return {"/usr/bin/qemu-system-x86_64",
            "-M",
            "microvm,acpi=on",
            "-enable-kvm",
            "-m",
            std::to_string(mib),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            kernel,
            "-append",
            cmdline};
}

} // namespace supermachine::bench
