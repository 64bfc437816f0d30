#pragma once
// The guest kernel for tests that boot Linux, found the way the product finds
// it: the kernel cache scripts/fetch-kernel.sh fills (boot/kernel_cache.hpp),
// fetched into it if missing. No environment variable or fixed path needed.
#include <skip.hpp>
#include <supermachine/boot/kernel_cache.hpp>

namespace supermachine::test {

/// The default guest kernel and its modules (dependencies first).
inline boot::kernel_files guest_kernel() {
    if (auto k = boot::default_kernel()) return k.value();
    if (auto k = boot::fetch_default_kernel()) return k.value();
    skip("no guest kernel in the kernel cache and scripts/fetch-kernel.sh failed");
}

} // namespace supermachine::test
