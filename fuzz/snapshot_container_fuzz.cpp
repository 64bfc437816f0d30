// libFuzzer target over the snapshot container reader.
//
// The first input byte picks a mode:
//   0: the rest is a whole file for parse_snapshot
//   1: the rest is a body for decode_body (no checksum in the way)
//   2: the rest is a list of (u16 offset, u8 value) edits applied to a valid
//      file's header and body, checksums then recomputed, so mutations reach
//      the record parsers instead of stopping at the CRC.
// Whatever parses must re-encode and parse back to the same records.
#include "../test/snapshot/sample.hpp"

#include <supermachine/snapshot/container.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

namespace s = supermachine::snapshot;

namespace {

const std::vector<std::byte>& seed() {
    static const std::vector<std::byte> file = [] {
        const auto ram = supermachine::test::sample_ram(2 * s::page_size);
        return s::encode_snapshot(supermachine::test::sample_records(ram.size()), ram).value();
    }();
    return file;
}

void check_round_trip(const s::snapshot_records& records) {
    auto body = s::encode_body(records);
    if (!body) std::abort(); // parsed records the writer refuses: reader and writer disagree
    auto again = s::decode_body(body.value());
    if (!again || !(again.value() == records)) std::abort();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const auto input = std::as_bytes(std::span(data + 1, size - 1));
    switch (data[0] % 3) {
    case 0: {
        auto parsed = s::parse_snapshot(input);
        if (parsed) check_round_trip(parsed.value().records);
        break;
    }
    case 1: {
        auto records = s::decode_body(input);
        if (records) check_round_trip(records.value());
        break;
    }
    default: {
        auto file = seed();
        const auto header = s::decode_header(file).value();
        const std::size_t editable = s::header_size + header.body_length;
        for (std::size_t i = 0; i + 3 <= input.size(); i += 3) {
            const std::size_t offset = (std::to_integer<std::size_t>(input[i]) |
                                        std::to_integer<std::size_t>(input[i + 1]) << 8) %
                                       editable;
            file[offset] = input[i + 2];
        }
        supermachine::test::reseal(file);
        auto parsed = s::parse_snapshot(file);
        if (parsed) check_round_trip(parsed.value().records);
        break;
    }
    }
    return 0;
}
