// Fuzzes the agent wire codec: any byte string is split into frames by
// decode_header; every payload is validated and, where it decodes, must
// re-encode to the same bytes (the codec is canonical) and decode again equal.
#include <supermachine/agent/protocol.hpp>

#include <cstdlib>

using namespace supermachine::agent;

namespace {

template <class Message>
void check(std::string_view payload, std::uint32_t stream) {
    Message m{};
    if (decode(payload, m) != decode_error::none) return;
    std::string frame;
    encode(frame, stream, m);
    frame_header h;
    if (decode_header(frame, h) != decode_error::none) std::abort();
    std::string_view again = std::string_view(frame).substr(frame_header_size);
    Message back{};
    if (decode(again, back) != decode_error::none) std::abort();
    if (!(back == m)) std::abort();
}

void check_payload(message_type type, std::string_view payload, std::uint32_t stream) {
    decode_error validated = validate(type, payload);
    switch (type) {
    case message_type::ready:
        return check<ready>(payload, stream);
    case message_type::hello:
        return check<hello>(payload, stream);
    case message_type::hello_ok:
        return check<hello_ok>(payload, stream);
    case message_type::exec_request:
        return check<exec_request>(payload, stream);
    case message_type::exec_started:
        return check<exec_started>(payload, stream);
    case message_type::signal:
        return check<signal_request>(payload, stream);
    case message_type::exit:
        return check<exit_status>(payload, stream);
    case message_type::error:
        return check<error_message>(payload, stream);
    case message_type::read_file:
        return check<read_file_request>(payload, stream);
    case message_type::file_end:
        return check<file_end>(payload, stream);
    case message_type::write_file:
        return check<write_file_request>(payload, stream);
    case message_type::tcp_connect:
        return check<tcp_connect_request>(payload, stream);
    case message_type::credit:
        return check<credit_grant>(payload, stream);
    case message_type::set_clock:
        return check<set_clock_request>(payload, stream);
    case message_type::resize:
        return check<tty_size>(payload, stream);
    default:
        (void)validated;
        return;
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    // As a frame stream, the way both sides read it.
    while (in.size() >= frame_header_size) {
        frame_header h;
        if (decode_header(in, h) != decode_error::none) break;
        if (h.length > max_payload_size) std::abort();
        if (in.size() - frame_header_size < h.length) break;
        check_payload(h.type, in.substr(frame_header_size, h.length), h.stream);
        in.remove_prefix(frame_header_size + h.length);
    }
    // And the whole input as the payload of each type.
    std::string_view whole(reinterpret_cast<const char*>(data), size);
    for (std::uint8_t t = 1; t <= last_message_type; ++t)
        check_payload(static_cast<message_type>(t), whole, 1);
    return 0;
}
