// virtio-vsock device core, driven by a test "guest" that builds the three
// split rings in memory and speaks the vsock packet protocol as Linux's
// virtio_transport does: connection setup both ways, data, credit, shutdown,
// RST, hostile packets, TRANSPORT_RESET — and finally the real agent reached
// through the device (the fake guest relays one vsock stream to it).
#include "agent_fixture.hpp"

#include <vsock_fake_guest.hpp>

#include <supermachine/virtio/vsock.hpp>

#include <sys/eventfd.h>

using namespace supermachine;
using namespace supermachine::test;
using namespace supermachine::test::vsock_guest;

namespace {

std::string read_some(fake_guest& g, local_socket& s, std::size_t want) {
    std::string out;
    bool eof = false;
    g.pump([&] {
        char buffer[65536];
        boost::system::error_code ec;
        s.non_blocking(true);
        std::size_t n = s.read_some(boost::asio::buffer(buffer), ec);
        if (!ec) out.append(buffer, n);
        if (ec == boost::asio::error::eof) eof = true;
        return eof || out.size() >= want;
    });
    if (eof) out += "<EOF>";
    return out;
}

} // namespace

BOOST_AUTO_TEST_SUITE(virtio_vsock)

BOOST_AUTO_TEST_CASE(config_space_and_create) {
    fake_guest g;
    std::uint64_t cid = 0;
    g.device->read_config(0, std::as_writable_bytes(std::span(&cid, 1)));
    BOOST_TEST(cid == guest_cid);
    std::byte beyond[4];
    g.device->read_config(6, beyond); // straddles the end: zero-filled, no overrun
    BOOST_TEST(std::to_integer<int>(beyond[2]) == 0);
    BOOST_TEST(!virtio::vsock::create({.guest_cid = 2})); // 2 is the host
    BOOST_TEST(g.device->queue_count() == 3u);
}

BOOST_AUTO_TEST_CASE(host_to_guest_connection_data_and_close) {
    fake_guest g;
    auto [socket, host_port] = connect(g);
    // Host -> guest.
    boost::asio::write(socket, boost::asio::buffer(std::string("hello guest")));
    auto rw = g.expect(op::rw);
    BOOST_REQUIRE(rw);
    BOOST_TEST(rw->payload == "hello guest");
    BOOST_TEST((rw->header.dst_port == 1024u));
    BOOST_TEST((rw->header.src_port == host_port));
    // Guest -> host.
    g.send(g.header(op::rw, 1024, host_port), "hello host");
    BOOST_TEST(read_some(g, socket, 10) == "hello host");
    // Guest closes both ways: the host sees EOF and the device answers RST.
    g.send([&] {
        auto h = g.header(op::shutdown, 1024, host_port);
        h.flags = virtio::vsock_shutdown_receive | virtio::vsock_shutdown_send;
        return h;
    }());
    BOOST_TEST(g.expect(op::rst).has_value());
    BOOST_TEST(read_some(g, socket, 1) == "<EOF>");
    BOOST_TEST(g.device->connection_count() == 0u);
}

BOOST_AUTO_TEST_CASE(host_close_sends_shutdown) {
    fake_guest g;
    auto [socket, host_port] = connect(g);
    socket.shutdown(local_socket::shutdown_send);
    auto sd = g.expect(op::shutdown);
    BOOST_REQUIRE(sd);
    BOOST_TEST((sd->header.flags == virtio::vsock_shutdown_send));
    g.send(g.header(op::rst, 1024, host_port));
    BOOST_TEST(g.pump([&] { return g.device->connection_count() == 0; }));
}

BOOST_AUTO_TEST_CASE(refused_and_unanswered_connects) {
    fake_guest g;
    std::optional<supermachine::error_code> result;
    g.device->async_connect(g.io.get_executor(), 99,
                            [&](supermachine::error_code ec, local_socket) { result = ec; });
    auto request = g.expect(op::request);
    BOOST_REQUIRE(request);
    g.send(g.header(op::rst, 99, request->header.src_port));
    BOOST_REQUIRE(g.pump([&] { return result.has_value(); }));
    BOOST_TEST(*result == boost::system::errc::make_error_code(boost::system::errc::connection_refused));

    fake_guest slow({.connect_timeout = std::chrono::milliseconds(200)});
    std::optional<supermachine::error_code> timed_out;
    slow.device->async_connect(slow.io.get_executor(), 5,
                               [&](supermachine::error_code ec, local_socket) { timed_out = ec; });
    BOOST_REQUIRE(slow.pump([&] { return timed_out.has_value(); }));
    BOOST_TEST(*timed_out == make_error_code(errc::timeout));
}

BOOST_AUTO_TEST_CASE(guest_to_host_connection) {
    fake_guest g;
    std::optional<int> accepted_fd;
    std::uint32_t accepted_port = 0;
    BOOST_REQUIRE(g.device->listen(5000, [&](int fd, std::uint32_t port) {
        accepted_fd = fd;
        accepted_port = port;
    }));
    g.send(g.header(op::request, 40000, 5000));
    auto response = g.expect(op::response);
    BOOST_REQUIRE(response);
    BOOST_TEST((response->header.dst_port == 40000u));
    BOOST_TEST((response->header.src_port == 5000u));
    BOOST_REQUIRE(g.pump([&] { return accepted_fd.has_value(); }));
    BOOST_TEST(accepted_port == 40000u);
    local_socket s(g.io, boost::asio::local::stream_protocol(), *accepted_fd);
    g.send(g.header(op::rw, 40000, 5000), "from guest");
    BOOST_TEST(read_some(g, s, 10) == "from guest");
    boost::asio::write(s, boost::asio::buffer(std::string("from host")));
    auto rw = g.expect(op::rw);
    BOOST_REQUIRE(rw);
    BOOST_TEST(rw->payload == "from host");
    // Nobody listens on 5001: RST.
    g.send(g.header(op::request, 40001, 5001));
    auto rst = g.expect(op::rst);
    BOOST_REQUIRE(rst);
    BOOST_TEST((rst->header.dst_port == 40001u));
}

BOOST_AUTO_TEST_CASE(host_to_guest_respects_guest_credit) {
    fake_guest g;
    g.buf_alloc = 8192; // the guest can hold 8 KiB until it forwards
    auto [socket, host_port] = connect(g);
    std::string data(100 * 1024, '\0');
    for (std::size_t i = 0; i < data.size(); ++i)
        data[i] = static_cast<char>(i * 7);
    boost::asio::write(socket, boost::asio::buffer(data));
    std::string got;
    for (int round = 0; got.size() < data.size() && round < 100; ++round) {
        // Take what arrives; it never exceeds the credit we advertised.
        g.pump([&] { return false; }, std::chrono::milliseconds(30));
        std::size_t this_round = 0;
        for (auto& p : g.inbox)
            if (p.header.op == op::rw) {
                got += p.payload;
                this_round += p.payload.size();
            }
        g.inbox.clear();
        BOOST_TEST_REQUIRE(this_round <= 8192u);
        g.fwd_cnt = static_cast<std::uint32_t>(got.size());
        g.send(g.header(op::credit_update, 1024, host_port));
    }
    BOOST_TEST(got.size() == data.size());
    BOOST_TEST((got == data));
}

BOOST_AUTO_TEST_CASE(guest_beyond_our_credit_is_reset) {
    fake_guest g({.buffer_size = 8192});
    auto [socket, host_port] = connect(g);
    // The host never reads: once the socket buffer is full, our 8 KiB fills, then RST.
    std::string chunk(4096, 'x');
    bool reset = false;
    for (int i = 0; i < 2000 && !reset; ++i) {
        g.send(g.header(op::rw, 1024, host_port), chunk);
        g.pump([&] { return false; }, std::chrono::milliseconds(1));
        for (auto& p : g.inbox)
            reset = reset || p.header.op == op::rst;
    }
    BOOST_TEST(reset);
    BOOST_TEST(!g.broken);
}

BOOST_AUTO_TEST_CASE(hostile_packets) {
    fake_guest g;
    auto [socket, host_port] = connect(g);
    // Shorter than a header: ignored, the device carries on.
    g.send_raw("short");
    // Claims more payload than the chain has: RST for that connection.
    g.send(g.header(op::rw, 1024, host_port), "abc", 100000);
    BOOST_TEST(g.expect(op::rst).has_value());
    // Spoofed source CID: dropped silently.
    auto spoofed = g.header(op::request, 1, 5000);
    spoofed.src_cid = 77;
    g.send(spoofed);
    // Unknown op and seqpacket type on unknown connections: RST.
    g.send(g.header(42, 2, 3));
    BOOST_TEST(g.expect(op::rst).has_value());
    auto seq = g.header(op::request, 4, 5);
    seq.type = 2;
    g.send(seq);
    BOOST_TEST(g.expect(op::rst).has_value());
    g.pump([&] { return false; }, std::chrono::milliseconds(50));
    for (auto& p : g.inbox)
        BOOST_TEST((p.header.dst_port != 1u)); // nothing for the spoofed one
    BOOST_TEST(!g.broken);
    // The device still works.
    auto [again, port2] = connect(g);
    boost::asio::write(again, boost::asio::buffer(std::string("ok")));
    auto rw = g.expect(op::rw);
    BOOST_REQUIRE(rw);
    BOOST_TEST(rw->payload == "ok");
}

BOOST_AUTO_TEST_CASE(transport_reset_drops_connections_and_tells_the_guest) {
    fake_guest g;
    auto [socket, host_port] = connect(g);
    BOOST_TEST(g.event_used() == 0u);
    g.device->transport_reset();
    BOOST_TEST(g.pump([&] { return g.event_used() == 1; }));
    BOOST_TEST(g.event_id() == 0u); // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    BOOST_TEST(read_some(g, socket, 1) == "<EOF>");
    BOOST_TEST(g.device->connection_count() == 0u);
}

// End to end: agent::basic_client -> vsock device -> (this fake guest relays the
// stream as the guest kernel would) -> the real agent process.
BOOST_AUTO_TEST_CASE(agent_client_through_the_device) {
    fake_guest g;
    agent_process agent;
    int agent_fd = agent.release_fd();
    ::fcntl(agent_fd, F_SETFL, O_NONBLOCK);

    std::optional<std::pair<supermachine::error_code, local_socket>> connected;
    g.device->async_connect(
        g.io.get_executor(), agent::default_vsock_port,
        [&](supermachine::error_code ec, local_socket s) { connected.emplace(ec, std::move(s)); });
    auto request = g.expect(op::request);
    BOOST_REQUIRE(request);
    std::uint32_t host_port = request->header.src_port;
    g.send(g.header(op::response, 1024, host_port));
    BOOST_REQUIRE(g.pump([&] { return connected.has_value(); }));
    BOOST_REQUIRE(!connected->first);

    client_type client(std::move(connected->second));
    std::string to_agent;
    std::uint32_t received_total = 0;
    // The relay: rx RW payloads go to the agent; agent output goes back as tx RW
    // within the device's credit (we never send more than 64 KiB unacknowledged here).
    auto relay = [&] {
        for (auto& p : g.inbox)
            if (p.header.op == op::rw) {
                to_agent += p.payload;
                received_total += static_cast<std::uint32_t>(p.payload.size());
            }
        g.inbox.clear();
        while (!to_agent.empty()) {
            ssize_t n = ::write(agent_fd, to_agent.data(), to_agent.size());
            if (n <= 0) break;
            to_agent.erase(0, static_cast<std::size_t>(n));
        }
        g.fwd_cnt = received_total - static_cast<std::uint32_t>(to_agent.size());
        char buffer[4000];
        ssize_t n = ::read(agent_fd, buffer, sizeof buffer);
        if (n > 0)
            g.send(g.header(op::rw, 1024, host_port),
                   std::string_view(buffer, static_cast<std::size_t>(n)));
    };
    auto run_op = [&](auto start) {
        bool done = false;
        start([&] { done = true; });
        g.pump(
            [&] {
                relay();
                return done;
            },
            std::chrono::seconds(20));
        return done;
    };
    supermachine::error_code hello_error;
    BOOST_REQUIRE(run_op([&](auto finish) {
        client.async_hello("s3cret-token", [&, finish](supermachine::error_code ec, agent::hello_ok) {
            hello_error = ec;
            finish();
        });
    }));
    BOOST_TEST(!hello_error);
    agent::exec_output out;
    supermachine::error_code exec_error;
    BOOST_REQUIRE(run_op([&](auto finish) {
        client.async_exec(shell("echo through vsock; exit 42"),
                          [&, finish](supermachine::error_code ec, agent::exec_output o) {
                              exec_error = ec;
                              out = std::move(o);
                              finish();
                          });
    }));
    BOOST_TEST(!exec_error);
    BOOST_TEST(out.exit_code == 42);
    BOOST_TEST(out.stdout_data == "through vsock\n");
    ::close(agent_fd);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(virtio_vsock_unix)

BOOST_AUTO_TEST_CASE(firecracker_style_connect_line) {
    fake_guest g;
    std::string path = "/tmp/sm-vsock-" + std::to_string(::getpid()) + ".sock";
    auto endpoint =
        virtio::vsock_unix_endpoint::create(g.io.get_executor(), *g.device, path).value();
    // A tool outside the process.
    local_socket tool(g.io);
    tool.connect(boost::asio::local::stream_protocol::endpoint(path));
    boost::asio::write(tool, boost::asio::buffer(std::string("CONNECT 1024\nearly bytes")));
    auto request = g.expect(op::request);
    BOOST_REQUIRE(request);
    BOOST_TEST((request->header.dst_port == 1024u));
    std::uint32_t host_port = request->header.src_port;
    g.send(g.header(op::response, 1024, host_port));
    BOOST_TEST(read_some(g, tool, 3 + std::to_string(host_port).size() + 1) ==
               "OK " + std::to_string(host_port) + "\n");
    // What followed the line, then more, reaches the guest in order.
    std::string at_guest;
    boost::asio::write(tool, boost::asio::buffer(std::string(" and later")));
    g.pump([&] {
        for (auto& p : g.inbox)
            if (p.header.op == op::rw) at_guest += p.payload;
        g.inbox.clear();
        return at_guest.size() >= 21;
    });
    BOOST_TEST(at_guest == "early bytes and later");
    g.send(g.header(op::rw, 1024, host_port), "reply");
    BOOST_TEST(read_some(g, tool, 5) == "reply");

    // A malformed line or a refused port closes the tool's socket.
    for (std::string line :
         {std::string("HELLO 1\n"), std::string("CONNECT 99999999999\n"), std::string(100, 'C')}) {
        local_socket bad(g.io);
        bad.connect(boost::asio::local::stream_protocol::endpoint(path));
        boost::asio::write(bad, boost::asio::buffer(line));
        BOOST_TEST(read_some(g, bad, 1) == "<EOF>", line.substr(0, 20));
    }
    endpoint->close();
}

BOOST_AUTO_TEST_SUITE_END()
