// libFuzzer target: what the QEMU engine's network reads from the guest
// (detail/qemu_network_frames.hpp): QEMU's length-prefixed frame stream,
// split in pieces the fuzzer chooses (as reads return them), and each frame
// checked as a DNS query to the NAT's resolver. Asserts: frames lie inside
// the input and within max_frame, consumed bytes never exceed what was
// given, splitting in pieces yields the same frames as splitting at once,
// and a query's payload lies inside its frame.
#include <supermachine/detail/qemu_network_frames.hpp>

#include <cstdint>
#include <cstdlib>
#include <vector>

namespace sd = supermachine::detail;

namespace {

constexpr std::size_t max_frame = 65536 + 4096; // qemu_network::max_frame
constexpr std::array<std::byte, 4> resolver{std::byte{10}, std::byte{0}, std::byte{2},
                                            std::byte{3}};

void check_frame(std::span<const std::byte> frame, std::span<const std::byte> whole) {
    if (frame.size() > max_frame) std::abort();
    if (frame.data() < whole.data() || frame.data() + frame.size() > whole.data() + whole.size())
        std::abort();
    const auto query = sd::parse_dns_query(frame, resolver);
    if (query.what == sd::dns_query_view::kind::query) {
        const auto& p = query.payload;
        if (p.data() < frame.data() || p.data() + p.size() > frame.data() + frame.size())
            std::abort();
    } else if (!query.payload.empty()) {
        std::abort();
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1) return 0;
    const std::size_t piece = 1 + data[0]; // bytes per "read"
    const auto input = std::span(reinterpret_cast<const std::byte*>(data + 1), size - 1);

    // All at once.
    std::vector<std::size_t> at_once;
    const auto whole = sd::split_length_prefixed(input, max_frame, [&](auto frame) {
        check_frame(frame, input);
        at_once.push_back(frame.size());
    });
    if (whole && *whole > input.size()) std::abort();

    // The same stream arriving `piece` bytes at a time into a buffer that
    // keeps the unconsumed tail, as qemu_network::read does.
    std::vector<std::byte> buffer;
    std::vector<std::size_t> in_pieces;
    bool lost = false;
    for (std::size_t offset = 0; offset < input.size() && !lost; offset += piece) {
        const auto n = std::min(piece, input.size() - offset);
        buffer.insert(buffer.end(), input.begin() + static_cast<std::ptrdiff_t>(offset),
                      input.begin() + static_cast<std::ptrdiff_t>(offset + n));
        const auto view = std::span<const std::byte>(buffer);
        const auto consumed = sd::split_length_prefixed(view, max_frame, [&](auto frame) {
            check_frame(frame, view);
            in_pieces.push_back(frame.size());
        });
        if (!consumed) {
            lost = true;
            break;
        }
        if (*consumed > buffer.size()) std::abort();
        buffer.erase(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(*consumed));
    }
    // Framing lost at once iff lost in pieces; the frames before it agree.
    if (lost != !whole) std::abort();
    if (!lost && in_pieces != at_once) std::abort();
    return 0;
}
