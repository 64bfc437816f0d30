// A hostile or broken agent: garbage frames, oversized lengths, truncated
// streams, data beyond credit, disconnects. Every pending operation must end
// with agent_protocol_error or agent_unavailable, never hang. And the other
// way: a hostile host against the real agent.
#include "agent_fixture.hpp"

using namespace supermachine;
using namespace supermachine::test;

namespace {

/// The client on one end of a socketpair, the test writing raw bytes on the other.
struct fake_agent {
    asio::io_context io;
    int raw = -1;
    std::optional<client_type> client;

    fake_agent() {
        int sv[2];
        BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        raw = sv[1];
        client.emplace(socket_type(io, asio::local::stream_protocol(), sv[0]));
    }
    ~fake_agent() {
        if (raw >= 0) ::close(raw);
    }
    /// Writes while letting the client run (a full socket must not deadlock the test);
    /// stops quietly once the client has closed its end.
    void send(const std::string& bytes) {
        std::size_t done = 0;
        auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (done < bytes.size()) {
            ssize_t n =
                ::send(raw, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                done += static_cast<std::size_t>(n);
                continue;
            }
            if (n < 0 && errno != EAGAIN) return; // the client hung up on us: fine
            BOOST_REQUIRE(std::chrono::steady_clock::now() < deadline);
            io.restart();
            io.run_for(std::chrono::milliseconds(5));
        }
    }
    void hangup() {
        ::close(raw);
        raw = -1;
    }
    void handshake() {
        std::string frames;
        agent::encode(frames, 0, agent::ready{});
        agent::encode(frames, 0, agent::hello_ok{agent::protocol_version, 0});
        send(frames);
        auto [ec, ok] =
            await<agent::hello_ok>(io, [&](auto h) { client->async_hello("t", std::move(h)); });
        BOOST_REQUIRE(!ec);
    }
    /// Starts `n` collected execs (streams 1..n); returns their result slots.
    std::vector<std::optional<supermachine::error_code>> start_execs(int n) {
        std::vector<std::optional<supermachine::error_code>> results(n);
        for (int i = 0; i < n; ++i)
            client->async_exec(
                shell("true"),
                [&results, i](supermachine::error_code ec, agent::exec_output) { results[i] = ec; });
        return results;
    }
};

std::string raw_header(std::uint32_t length, std::uint8_t type, std::uint32_t stream) {
    std::string h;
    for (int i = 0; i < 4; ++i)
        h.push_back(static_cast<char>(length >> (8 * i)));
    h.push_back(static_cast<char>(type));
    for (int i = 0; i < 4; ++i)
        h.push_back(static_cast<char>(stream >> (8 * i)));
    return h;
}

template <class Results>
void expect_all(fake_agent& f, Results& results, errc expected) {
    run_until(
        f.io,
        [&] {
            return std::all_of(results.begin(), results.end(),
                               [](auto& r) { return r.has_value(); });
        },
        std::chrono::seconds(10));
    for (auto& r : results)
        BOOST_TEST(*r == make_error_code(expected), r->message());
    // Later operations fail at once, too.
    auto [ec, out] = await<agent::exec_output>(
        f.io, [&](auto h) { f.client->async_exec(shell("true"), std::move(h)); });
    BOOST_TEST(ec == make_error_code(expected));
}

} // namespace

BOOST_AUTO_TEST_SUITE(agent_hostile)

BOOST_AUTO_TEST_CASE(unknown_frame_type) {
    fake_agent f;
    f.handshake();
    auto results = f.start_execs(5);
    f.send(raw_header(0, 0xee, 1));
    expect_all(f, results, errc::agent_protocol_error);
}

BOOST_AUTO_TEST_CASE(oversized_length_is_refused_before_allocating) {
    fake_agent f;
    f.handshake();
    auto results = f.start_execs(3);
    f.send(raw_header(0xffffffffu, static_cast<std::uint8_t>(agent::message_type::stdout_data), 1));
    expect_all(f, results, errc::agent_protocol_error);
}

BOOST_AUTO_TEST_CASE(truncated_frame_then_hangup) {
    fake_agent f;
    f.handshake();
    auto results = f.start_execs(4);
    f.send(raw_header(100, static_cast<std::uint8_t>(agent::message_type::exit), 1) + "short");
    f.hangup();
    expect_all(f, results, errc::agent_unavailable);
}

BOOST_AUTO_TEST_CASE(hangup_fails_every_pending_operation) {
    fake_agent f;
    f.handshake();
    auto results = f.start_execs(20);
    std::optional<supermachine::error_code> read_result;
    f.client->async_read_file("/etc/hostname", 100,
                              [&](supermachine::error_code ec, std::string) { read_result = ec; });
    f.hangup();
    expect_all(f, results, errc::agent_unavailable);
    run_until(f.io, [&] { return read_result.has_value(); });
    BOOST_TEST(*read_result == make_error_code(errc::agent_unavailable));
}

BOOST_AUTO_TEST_CASE(malformed_payloads) {
    fake_agent f;
    f.handshake();
    auto results = f.start_execs(2);
    std::string frames;
    agent::encode(frames, 1, agent::exec_started{77});
    // exit with timed_out = 7: not a boolean.
    frames += raw_header(9, static_cast<std::uint8_t>(agent::message_type::exit), 1);
    frames += std::string("\0\0\0\0\0\0\0\0\x07", 9);
    f.send(frames);
    expect_all(f, results, errc::agent_protocol_error);
}

BOOST_AUTO_TEST_CASE(data_beyond_credit_is_a_protocol_error) {
    fake_agent f;
    f.handshake();
    auto results = f.start_execs(1);
    std::string frames;
    agent::encode(frames, 1, agent::exec_started{77});
    std::string chunk(agent::max_data_chunk, 'x');
    // A collected exec credits as it goes, so flood a streaming one instead: stream 2.
    std::optional<supermachine::error_code> spawn_result;
    std::optional<client_type::child_type> child;
    f.client->async_spawn(shell("true"), [&](supermachine::error_code ec, client_type::child_type c) {
        spawn_result = ec;
        child.emplace(std::move(c));
    });
    agent::encode(frames, 2, agent::exec_started{78});
    f.send(frames);
    run_until(f.io, [&] { return spawn_result.has_value(); });
    BOOST_REQUIRE(!*spawn_result);
    // Nobody reads stdout, so no credit returns: the fifth 64 KiB chunk exceeds the 256 KiB window.
    for (int i = 0; i < 5; ++i) {
        std::string frame;
        agent::encode_data(frame, agent::message_type::stdout_data, 2, chunk);
        f.send(frame);
    }
    std::optional<supermachine::error_code> wait_result;
    child->async_wait([&](supermachine::error_code ec, agent::exit_status) { wait_result = ec; });
    run_until(f.io, [&] { return wait_result.has_value(); });
    BOOST_TEST(*wait_result == make_error_code(errc::agent_protocol_error));
    expect_all(f, results, errc::agent_protocol_error);
}

BOOST_AUTO_TEST_CASE(unsolicited_hello_ok_and_ok) {
    fake_agent f;
    f.handshake();
    auto results = f.start_execs(1);
    std::string frame;
    agent::encode_empty(frame, agent::message_type::ok, 0); // no request waits for an ok
    f.send(frame);
    expect_all(f, results, errc::agent_protocol_error);
}

BOOST_AUTO_TEST_CASE(killed_agent_ends_a_running_exec) {
    connected_agent a;
    std::optional<supermachine::error_code> result;
    a.client.async_exec(shell("sleep 30"),
                        [&](supermachine::error_code ec, agent::exec_output) { result = ec; });
    // Let the exec start, then kill the agent as a guest crash would.
    for (int i = 0; i < 10; ++i) {
        a.io.restart();
        a.io.run_for(std::chrono::milliseconds(20));
    }
    ::kill(a.process.pid(), SIGKILL);
    run_until(
        a.io, [&] { return result.has_value(); }, std::chrono::seconds(10));
    BOOST_TEST(*result == make_error_code(errc::agent_unavailable));
}

// The other direction: the real agent against a hostile host.
BOOST_AUTO_TEST_CASE(agent_closes_on_garbage_without_allocating_it) {
    agent_process process;
    int fd = process.release_fd();
    // A frame claiming 4 GiB: refused from the header alone.
    std::string garbage =
        raw_header(0xfffffff0u, static_cast<std::uint8_t>(agent::message_type::hello), 0);
    BOOST_REQUIRE(::write(fd, garbage.data(), garbage.size()) ==
                  static_cast<ssize_t>(garbage.size()));
    std::string received;
    char buffer[4096];
    for (;;) {
        pollfd p{fd, POLLIN, 0};
        BOOST_REQUIRE_MESSAGE(::poll(&p, 1, 10000) == 1, "agent did not close the connection");
        ssize_t n = ::read(fd, buffer, sizeof buffer);
        if (n <= 0) break;
        received.append(buffer, static_cast<std::size_t>(n));
    }
    ::close(fd);
    // ready, then an error frame saying why.
    agent::frame_header h;
    BOOST_REQUIRE(agent::decode_header(received, h) == agent::decode_error::none);
    BOOST_TEST((h.type == agent::message_type::ready));
    std::string_view rest = std::string_view(received).substr(agent::frame_header_size + h.length);
    BOOST_REQUIRE(agent::decode_header(rest, h) == agent::decode_error::none);
    BOOST_TEST((h.type == agent::message_type::error));
    agent::error_message m;
    BOOST_REQUIRE(agent::decode(rest.substr(agent::frame_header_size, h.length), m) ==
                  agent::decode_error::none);
    BOOST_TEST(m.message.find("protocol error") != std::string::npos);
    if (memory_checks) BOOST_TEST(process.peak_rss_kib() < 8 * 1024);
}

BOOST_AUTO_TEST_SUITE_END()
