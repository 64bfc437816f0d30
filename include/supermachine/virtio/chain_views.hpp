#pragma once
// range-v3 views over a validated chain's segments: the host buffers (for
// scatter/gather I/O such as preadv) and their total size. Separate from
// descriptor_chain.hpp so translation units that do not use ranges do not
// pay for range-v3.
#include <supermachine/virtio/descriptor_chain.hpp>

#include <range/v3/numeric/accumulate.hpp>
#include <range/v3/view/transform.hpp>

#include <sys/uio.h>

namespace supermachine::virtio {

/// The segments' host buffers, as std::span<std::byte>.
inline auto host_buffers(std::span<const segment> segments) {
    return segments | ranges::views::transform([](const segment& s) { return s.host; });
}

/// The segments as struct iovec, for preadv/pwritev.
inline auto io_vectors(std::span<const segment> segments) {
    return segments | ranges::views::transform([](const segment& s) {
               return ::iovec{s.host.data(), s.host.size()};
           });
}

inline std::uint64_t total_length(std::span<const segment> segments) {
    return ranges::accumulate(segments | ranges::views::transform([](const segment& s) {
                                  return std::uint64_t{s.length};
                              }),
                              std::uint64_t{0});
}

} // namespace supermachine::virtio
