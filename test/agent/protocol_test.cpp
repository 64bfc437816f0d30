// The wire codec alone: every message round-trips; every bound is enforced
// before allocation; truncations and trailing bytes are caught.
#include <supermachine/agent/protocol.hpp>

#include <boost/test/unit_test.hpp>

using namespace supermachine::agent;

namespace {

/// Encodes, checks the header, decodes the payload, and returns the copy.
template <class Message>
Message round_trip(const Message& m, std::uint32_t stream = 7) {
    std::string frame;
    encode(frame, stream, m);
    frame_header h;
    BOOST_REQUIRE(decode_header(frame, h) == decode_error::none);
    BOOST_TEST(h.stream == stream);
    BOOST_TEST(h.length == frame.size() - frame_header_size);
    std::string_view payload = std::string_view(frame).substr(frame_header_size);
    BOOST_TEST((validate(h.type, payload) == decode_error::none));
    Message back{};
    BOOST_TEST((decode(payload, back) == decode_error::none));
    // Every strict prefix is truncated, never accepted.
    for (std::size_t cut = 0; cut < payload.size(); ++cut) {
        Message partial{};
        BOOST_TEST((decode(payload.substr(0, cut), partial) != decode_error::none));
    }
    Message extra{};
    BOOST_TEST((decode(std::string(payload) + "x", extra) == decode_error::trailing_bytes));
    return back;
}

std::string u32le(std::uint32_t v) {
    std::string s;
    for (int i = 0; i < 4; ++i)
        s.push_back(static_cast<char>(v >> (8 * i)));
    return s;
}

} // namespace

BOOST_AUTO_TEST_SUITE(agent_protocol)

BOOST_AUTO_TEST_CASE(every_message_round_trips) {
    BOOST_TEST((round_trip(ready{3}) == ready{3}));
    BOOST_TEST((round_trip(hello{1, "abc\0def"}) == hello{1, "abc\0def"}));
    BOOST_TEST((round_trip(hello_ok{1, capability_exec | capability_tcp}) ==
                hello_ok{1, capability_exec | capability_tcp}));
    exec_request full;
    full.argv = {"sh", "-c", "echo hi"};
    full.env = {"A=1", "PATH=/bin"};
    full.cwd = "/work";
    full.uid = 1000;
    full.gid = 100;
    full.groups = {4, 24, 27};
    full.tty = tty_size{50, 132};
    full.stdin_open = true;
    full.timeout_ms = 12345;
    BOOST_TEST((round_trip(full) == full));
    exec_request minimal;
    minimal.argv = {"true"};
    BOOST_TEST((round_trip(minimal) == minimal));
    BOOST_TEST(!round_trip(minimal).uid.has_value());
    BOOST_TEST((round_trip(exec_started{4242}) == exec_started{4242}));
    BOOST_TEST((round_trip(signal_request{9}) == signal_request{9}));
    BOOST_TEST((round_trip(exit_status{137, 9, true}) == exit_status{137, 9, true}));
    BOOST_TEST((round_trip(exit_status{-1, 0, false}) == exit_status{-1, 0, false}));
    error_message e{agent_error::command_not_found, 2, "command not found: foo"};
    BOOST_TEST((round_trip(e) == e));
    BOOST_TEST((round_trip(read_file_request{"/etc/passwd", 1 << 20}) ==
                read_file_request{"/etc/passwd", 1 << 20}));
    BOOST_TEST((round_trip(file_end{1ull << 40}) == file_end{1ull << 40}));
    BOOST_TEST(
        (round_trip(write_file_request{"/tmp/x", 0755}) == write_file_request{"/tmp/x", 0755}));
    BOOST_TEST((round_trip(tcp_connect_request{8080}) == tcp_connect_request{8080}));
    BOOST_TEST((round_trip(credit_grant{65536}) == credit_grant{65536}));
    BOOST_TEST((round_trip(set_clock_request{1'795'721'366'123'456'789ull}) ==
                set_clock_request{1'795'721'366'123'456'789ull}));
    BOOST_TEST((round_trip(set_clock_request{max_clock_ns}) == set_clock_request{max_clock_ns}));
}

BOOST_AUTO_TEST_CASE(set_clock_is_bounded) {
    auto payload = [](std::uint64_t ns) {
        std::string frame;
        encode(frame, 0, set_clock_request{ns});
        return frame.substr(frame_header_size);
    };
    BOOST_TEST((validate(message_type::set_clock, payload(0)) == decode_error::malformed));
    BOOST_TEST(
        (validate(message_type::set_clock, payload(max_clock_ns + 1)) == decode_error::malformed));
    BOOST_TEST((validate(message_type::set_clock, payload(~0ull)) == decode_error::malformed));
    BOOST_TEST(
        (validate(message_type::set_clock, payload(1).substr(0, 7)) == decode_error::truncated));
    BOOST_TEST(
        (validate(message_type::set_clock, payload(1) + "x") == decode_error::trailing_bytes));
}

BOOST_AUTO_TEST_CASE(data_and_empty_frames) {
    std::string frame;
    encode_data(frame, message_type::stdout_data, 3, "hello");
    encode_empty(frame, message_type::stdin_close, 3);
    frame_header h;
    BOOST_REQUIRE(decode_header(frame, h) == decode_error::none);
    BOOST_TEST((h.type == message_type::stdout_data));
    BOOST_TEST(frame.substr(frame_header_size, h.length) == "hello");
    std::string_view second = std::string_view(frame).substr(frame_header_size + h.length);
    BOOST_REQUIRE(decode_header(second, h) == decode_error::none);
    BOOST_TEST((h.type == message_type::stdin_close));
    BOOST_TEST(h.length == 0u);
    BOOST_TEST((validate(message_type::stdin_close, "x") == decode_error::trailing_bytes));
    BOOST_TEST((validate(message_type::stdout_data, std::string(max_data_chunk + 1, 'x')) ==
                decode_error::too_large));
    BOOST_TEST((validate(message_type::reseed_rng, std::string(max_rng_seed + 1, 'x')) ==
                decode_error::too_large));
}

BOOST_AUTO_TEST_CASE(header_checks) {
    frame_header h;
    BOOST_TEST((decode_header("12345678", h) == decode_error::truncated));
    std::string big = u32le(static_cast<std::uint32_t>(max_payload_size + 1)) + '\x01' + u32le(0);
    BOOST_TEST((decode_header(big, h) == decode_error::too_large));
    std::string ok = u32le(static_cast<std::uint32_t>(max_payload_size)) + '\x01' + u32le(0);
    BOOST_TEST((decode_header(ok, h) == decode_error::none));
    BOOST_TEST((decode_header(u32le(0) + '\x00' + u32le(0), h) == decode_error::unknown_type));
    BOOST_TEST((decode_header(u32le(0) + static_cast<char>(last_message_type + 1) + u32le(0), h) ==
                decode_error::unknown_type));
}

BOOST_AUTO_TEST_CASE(lengths_and_counts_are_bounded_before_allocating) {
    hello h;
    // A token claiming 4 GiB in a 12-byte payload.
    BOOST_TEST((decode(u32le(1) + u32le(0xffffffffu) + "abcd", h) == decode_error::too_large));
    // Within the bound but longer than the input: truncated, not allocated.
    BOOST_TEST((decode(u32le(1) + u32le(200) + "abcd", h) == decode_error::truncated));
    BOOST_TEST((decode(u32le(1) + u32le(max_token_size + 1) + std::string(max_token_size + 1, 'x'),
                       h) == decode_error::too_large));
    exec_request r;
    // argv count beyond max_strings.
    BOOST_TEST((decode(u32le(max_strings + 1), r) == decode_error::too_large));
    // A count the remaining bytes cannot hold (each entry needs at least 4 bytes).
    BOOST_TEST((decode(u32le(1000) + "tiny", r) == decode_error::truncated));
    error_message e;
    BOOST_TEST(
        (decode(u32le(1) + u32le(0) + u32le(max_message_size + 1), e) == decode_error::too_large));
}

BOOST_AUTO_TEST_CASE(malformed_fields) {
    auto payload_of = [](const exec_request& m) {
        std::string f;
        encode(f, 1, m);
        return f.substr(frame_header_size);
    };
    exec_request r;
    r.argv = {};
    exec_request out;
    BOOST_TEST((decode(payload_of(r), out) == decode_error::malformed)); // empty argv
    r.argv = {std::string("a\0b", 3)};
    BOOST_TEST((decode(payload_of(r), out) == decode_error::malformed)); // NUL inside an argument
    r.argv = {"ok"};
    std::string p = payload_of(r);
    // Flags byte sits 13 bytes from the end (flags, rows, cols, timeout, limit count).
    p[p.size() - 13] = static_cast<char>(0x80);
    BOOST_TEST((decode(p, out) == decode_error::malformed));
    signal_request s;
    BOOST_TEST((decode(u32le(0), s) == decode_error::malformed));
    BOOST_TEST((decode(u32le(1000), s) == decode_error::malformed));
    tcp_connect_request t;
    BOOST_TEST((decode(std::string("\0\0", 2), t) == decode_error::malformed));
    write_file_request w;
    BOOST_TEST((decode(u32le(2) + "/x" + u32le(010000), w) == decode_error::malformed));
    read_file_request rf;
    BOOST_TEST((decode(u32le(0) + std::string(8, '\0'), rf) == decode_error::malformed));
}

BOOST_AUTO_TEST_SUITE_END()

// issue 16: an exec's resource limits, a tty resize, the hostname.
BOOST_AUTO_TEST_CASE(limits_resize_and_hostname_are_bounded) {
    exec_request m;
    m.argv = {"sh"};
    m.limits = {{7, 1024, 1u << 20}, {6, ~0ull, ~0ull}};
    BOOST_TEST((round_trip(m) == m));
    auto payload_of = [](const exec_request& r) {
        std::string frame;
        encode(frame, 1, r);
        return frame.substr(frame_header_size);
    };
    auto soft_above_hard = m;
    soft_above_hard.limits = {{7, 2, 1}};
    BOOST_TEST((validate(message_type::exec_request, payload_of(soft_above_hard)) ==
                decode_error::malformed));
    auto unknown_resource = m;
    unknown_resource.limits = {{max_resource_limits, 1, 1}};
    BOOST_TEST((validate(message_type::exec_request, payload_of(unknown_resource)) ==
                decode_error::malformed));
    auto too_many = m;
    too_many.limits.assign(max_resource_limits + 1, {7, 1, 1});
    BOOST_TEST(
        (validate(message_type::exec_request, payload_of(too_many)) == decode_error::too_large));

    BOOST_TEST((round_trip(tty_size{50, 132}) == tty_size{50, 132}));
    std::string zero;
    encode(zero, 1, tty_size{0, 80});
    BOOST_TEST((validate(message_type::resize, zero.substr(frame_header_size)) ==
                decode_error::malformed));

    for (const char* good : {"a", "web-1", "0123456789ab"})
        BOOST_TEST((validate(message_type::set_hostname, good) == decode_error::none), good);
    for (std::string bad : {std::string(), std::string("-a"), std::string("a-"), std::string("a.b"),
                            std::string("a b"), std::string(64, 'a'), std::string("a\0b", 3)})
        BOOST_TEST((validate(message_type::set_hostname, bad) == decode_error::malformed), bad);
    // docker's --add-host lines may follow the name (printable ASCII, tabs, newlines).
    BOOST_TEST((validate(message_type::set_hostname, "web\n10.0.2.2\thostbox\n") ==
                decode_error::none));
    for (std::string bad : {std::string("web\n\x01"), std::string("-a\n1.2.3.4\tx\n"),
                            std::string("web\n") + std::string(16 * 1024 + 1, 'a')})
        BOOST_TEST((validate(message_type::set_hostname, bad) == decode_error::malformed));
}
