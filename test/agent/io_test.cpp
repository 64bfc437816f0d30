// Files, TCP forwarding, RNG reseed and shutdown through the real agent.
#include "agent_fixture.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include <sys/stat.h>

using namespace supermachine;
using namespace supermachine::test;

BOOST_AUTO_TEST_SUITE(agent_io)

namespace {
std::string temp_path(const char* name) {
    return "/tmp/supermachine-agent-io-" + std::to_string(::getpid()) + "-" + name;
}
} // namespace

BOOST_AUTO_TEST_CASE(write_then_read_a_file) {
    connected_agent a;
    std::string path = temp_path("file");
    std::string data;
    for (int i = 0; data.size() < 700 * 1024; ++i)
        data += "line " + std::to_string(i) + "\n";
    auto [wec] =
        await<>(a.io, [&](auto h) { a.client.async_write_file(path, data, 0640, std::move(h)); });
    BOOST_REQUIRE_MESSAGE(!wec, wec.message());
    struct stat st {};
    BOOST_REQUIRE(::stat(path.c_str(), &st) == 0);
    BOOST_TEST((st.st_mode & 07777) == 0640u);
    BOOST_TEST(static_cast<std::size_t>(st.st_size) == data.size());

    auto [rec, back] = await<std::string>(
        a.io, [&](auto h) { a.client.async_read_file(path, 1 << 20, std::move(h)); });
    BOOST_TEST(!rec);
    BOOST_TEST((back == data));

    // Larger than the bound: an error, not a truncated file.
    auto [bec, bounded] = await<std::string>(
        a.io, [&](auto h) { a.client.async_read_file(path, 1000, std::move(h)); });
    BOOST_TEST(bec == boost::system::errc::make_error_code(boost::system::errc::file_too_large));
    BOOST_TEST(bounded.empty());

    // Files whose size stat does not know (procfs) still read, up to the bound.
    auto [pec, proc] = await<std::string>(a.io, [&](auto h) {
        a.client.async_read_file("/proc/self/status", 1 << 16, std::move(h));
    });
    BOOST_TEST(!pec);
    BOOST_TEST(proc.find("Name:") != std::string::npos);
    ::unlink(path.c_str());
}

BOOST_AUTO_TEST_CASE(file_errors_are_clean) {
    connected_agent a;
    auto [ec, s] = await<std::string>(
        a.io, [&](auto h) { a.client.async_read_file("/no/such/file", 100, std::move(h)); });
    BOOST_TEST(ec == make_error_code(errc::not_found));
    auto [dec, d] =
        await<std::string>(a.io, [&](auto h) { a.client.async_read_file("/", 100, std::move(h)); });
    BOOST_TEST(dec);
    auto [wec] = await<>(a.io, [&](auto h) {
        a.client.async_write_file("/no/such/dir/file", "x", 0644, std::move(h));
    });
    BOOST_TEST(wec == make_error_code(errc::not_found));
    // The connection keeps working.
    auto out = a.exec(shell("echo still-here"));
    BOOST_TEST(out.stdout_data == "still-here\n");
}

BOOST_AUTO_TEST_CASE(tcp_forward_to_a_local_listener) {
    connected_agent a;
    // A real listener "in the guest" (here: on the host's loopback) that echoes in upper case.
    asio::ip::tcp::acceptor acceptor(a.io, {asio::ip::make_address("127.0.0.1"), 0});
    std::uint16_t port = acceptor.local_endpoint().port();
    asio::ip::tcp::socket peer(a.io);
    bool accepted = false;
    acceptor.async_accept(peer, [&](boost::system::error_code ec) { accepted = !ec; });

    auto [ec, channel] = await<client_type::tcp_type>(
        a.io, [&](auto h) { a.client.async_open_tcp(port, std::move(h)); });
    BOOST_REQUIRE_MESSAGE(!ec, ec.message());
    run_until(a.io, [&] { return accepted; });

    // Host -> guest: 1 MiB, more than the window, through backpressure.
    std::string payload(1 << 20, '\0');
    for (std::size_t i = 0; i < payload.size(); ++i)
        payload[i] = static_cast<char>('a' + i % 26);
    bool sent = false;
    channel.async_write(payload, [&](supermachine::error_code e) {
        BOOST_TEST(!e);
        channel.async_close_write([&](supermachine::error_code e2) { sent = !e2; });
    });
    std::string at_peer;
    bool peer_eof = false;
    std::array<char, 8192> buffer;
    std::function<void()> peer_read = [&] {
        peer.async_read_some(asio::buffer(buffer), [&](boost::system::error_code e, std::size_t n) {
            at_peer.append(buffer.data(), n);
            if (e) {
                peer_eof = e == asio::error::eof;
                return;
            }
            peer_read();
        });
    };
    peer_read();
    run_until(a.io, [&] { return sent && peer_eof; });
    BOOST_TEST(at_peer.size() == payload.size());
    BOOST_TEST((at_peer == payload));

    // Guest -> host, then the guest side closes.
    std::string reply = "HTTP/1.0 200 OK\r\n\r\nhello from the guest";
    boost::system::error_code werr;
    asio::write(peer, asio::buffer(reply), werr);
    BOOST_TEST(!werr);
    peer.shutdown(asio::ip::tcp::socket::shutdown_send);
    std::string at_host;
    bool host_eof = false;
    std::function<void()> host_read = [&] {
        channel.async_read([&](supermachine::error_code e, std::string chunk) {
            if (e) {
                host_eof = e == make_error_code(errc::end_of_stream);
                return;
            }
            at_host += chunk;
            host_read();
        });
    };
    host_read();
    run_until(a.io, [&] { return host_eof; });
    BOOST_TEST(at_host == reply);
}

BOOST_AUTO_TEST_CASE(tcp_forward_to_a_closed_port_fails_cleanly) {
    connected_agent a;
    std::uint16_t port;
    {
        asio::ip::tcp::acceptor probe(a.io, {asio::ip::make_address("127.0.0.1"), 0});
        port = probe.local_endpoint().port();
    } // closed again: nobody listens there now
    auto [ec, channel] = await<client_type::tcp_type>(
        a.io, [&](auto h) { a.client.async_open_tcp(port, std::move(h)); });
    BOOST_TEST(ec == boost::system::errc::make_error_code(boost::system::errc::connection_refused));
    BOOST_TEST(a.client.last_agent_message().find(std::to_string(port)) != std::string::npos);
}

BOOST_AUTO_TEST_CASE(reseed_and_shutdown) {
    connected_agent a;
    auto [rec] = await<>(
        a.io, [&](auto h) { a.client.async_reseed_rng(std::string(64, '\x5a'), std::move(h)); });
    BOOST_TEST(!rec);
    auto [big] = await<>(a.io, [&](auto h) {
        a.client.async_reseed_rng(std::string(agent::max_rng_seed + 1, 'x'), std::move(h));
    });
    BOOST_TEST(big == make_error_code(errc::invalid_argument));
    auto [sec] = await<>(a.io, [&](auto h) { a.client.async_shutdown(std::move(h)); });
    BOOST_TEST(!sec);
    // The agent process ends; every later operation fails at once with agent_unavailable.
    int status = 0;
    for (int i = 0; i < 200 && ::waitpid(a.process.pid(), &status, WNOHANG) == 0; ++i)
        ::usleep(10000);
    BOOST_TEST(WIFEXITED(status));
    supermachine::error_code ec;
    a.exec(shell("true"), &ec);
    BOOST_TEST(ec == make_error_code(errc::agent_unavailable));
}

BOOST_AUTO_TEST_CASE(a_wrong_token_is_refused) {
    connected_agent a(false);
    auto [ec, ok] =
        await<agent::hello_ok>(a.io, [&](auto h) { a.client.async_hello("wrong", std::move(h)); });
    BOOST_TEST(ec == make_error_code(errc::agent_auth_failed));
    // The agent closed the connection: nothing else gets through.
    supermachine::error_code eec;
    a.exec(shell("true"), &eec);
    BOOST_TEST(eec);
}

BOOST_AUTO_TEST_CASE(requests_before_hello_are_refused) {
    connected_agent a(false);
    supermachine::error_code ec;
    auto out = a.exec(shell("echo should-not-run"), &ec);
    BOOST_TEST(ec);
    BOOST_TEST(out.stdout_data.empty());
}

BOOST_AUTO_TEST_SUITE_END()
