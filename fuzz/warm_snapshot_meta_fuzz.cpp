// The warm snapshot's record (`meta`, doc/warm-start.md) is read from the
// cache as hostile input: decode never crashes or reads past its input, and
// whatever it accepts encodes back to the same bytes (so nothing it accepted
// was only half understood). A random input rarely passes the trailing
// hash; the fuzzer also gets a valid record with the hash recomputed over
// the mutated body, so the field parsers behind it are reached.
#include <supermachine/detail/warm_snapshot.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

namespace {

void check(std::span<const std::byte> bytes) {
    using supermachine::detail::warm_snapshot_meta;
    auto decoded = warm_snapshot_meta::decode(bytes);
    if (!decoded) return;
    const auto again = decoded.value().encode();
    if (again.size() != bytes.size() || !std::equal(again.begin(), again.end(), bytes.begin()))
        std::abort();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const auto bytes = std::as_bytes(std::span(data, size));
    check(bytes);
    // The same body, sealed: the record's own hash recomputed, so decode
    // goes past the hash check into the fields.
    if (size >= 8) {
        std::vector<std::byte> sealed(bytes.begin(), bytes.end() - 8);
        const auto h = supermachine::detail::hash_bytes(sealed);
        for (int i = 0; i < 8; ++i)
            sealed.push_back(static_cast<std::byte>(h >> (8 * i)));
        check(sealed);
    }
    return 0;
}
