#pragma once
// Kept for code that names the old type: fds are owned by supermachine::detail::unique_fd.
#include <supermachine/detail/unique_fd.hpp>

namespace supermachine::snapshot::detail {
using supermachine::detail::unique_fd;
} // namespace supermachine::snapshot::detail
