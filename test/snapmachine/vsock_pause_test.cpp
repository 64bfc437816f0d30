// The vsock core across a snapshot's pause and a restore's reset, driven by a
// test "guest" that builds the three split rings in memory
// (test/support/vsock_fake_guest.hpp): a pause keeps connections and their data
// flows again after the next activation; a pending TRANSPORT_RESET is
// delivered at activation without a kick; a device no driver started queues
// no event.
#include <vsock_fake_guest.hpp>

#include <supermachine/virtio/vsock.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/write.hpp>
#include <boost/test/unit_test.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <vector>

using namespace supermachine::test::vsock_guest;

namespace {

std::string read_available(fake_guest& g, local_socket& s, std::size_t want,
                           std::chrono::milliseconds limit) {
    std::string out;
    g.pump(
        [&] {
            char buffer[4096];
            boost::system::error_code ec;
            s.non_blocking(true);
            const std::size_t n = s.read_some(boost::asio::buffer(buffer), ec);
            if (!ec) out.append(buffer, n);
            if (ec == boost::asio::error::eof) out += "<EOF>";
            return out.size() >= want;
        },
        limit);
    return out;
}

} // namespace

BOOST_AUTO_TEST_CASE(pause_keeps_connections_and_activation_serves_them_again) {
    fake_guest g;
    auto [socket, host_port] = connect(g);
    g.device->pause();
    BOOST_CHECK_EQUAL(g.device->connection_count(), 1u);

    // Host to guest while paused: nothing moves (the socket wait ends, finding the device
    // stopped); after the activation the device watches the socket again.
    boost::asio::write(socket, boost::asio::buffer(std::string("host-to-guest")));
    BOOST_CHECK(!g.expect(op::rw, std::chrono::milliseconds(100)));
    g.activate(); // resume after the capture
    auto rw = g.expect(op::rw, std::chrono::seconds(5));
    BOOST_REQUIRE(rw);
    BOOST_CHECK_EQUAL(rw->payload, "host-to-guest");

    // Guest to host while paused: the tx kick is not served until the activation.
    g.device->pause();
    g.send(g.header(op::rw, 1024, host_port), "guest-to-host");
    BOOST_CHECK_EQUAL(read_available(g, socket, 1, std::chrono::milliseconds(100)), "");
    g.activate();
    BOOST_CHECK_EQUAL(read_available(g, socket, 13, std::chrono::seconds(10)), "guest-to-host");
    BOOST_CHECK_EQUAL(g.device->connection_count(), 1u);
    BOOST_CHECK_EQUAL(g.event_used(), 0u); // a pause is not a transport reset
    BOOST_CHECK(!g.broken);

    // A reset (machine stop) still drops it: the host end sees EOF.
    g.device->reset();
    BOOST_CHECK_EQUAL(g.device->connection_count(), 0u);
    BOOST_CHECK_EQUAL(read_available(g, socket, 5, std::chrono::seconds(10)), "<EOF>");
}

BOOST_AUTO_TEST_CASE(pending_reset_is_delivered_at_activation_without_a_kick) {
    fake_guest g({}, 1);
    g.device->transport_reset(); // into the one posted buffer, at once
    BOOST_CHECK_EQUAL(g.event_used(), 1u);
    BOOST_CHECK_EQUAL(g.event_id(0), 0u);
    g.device->transport_reset(); // no buffer: pending
    BOOST_CHECK_EQUAL(g.event_used(), 1u);
    g.device->pause();
    g.post_event(); // posted while paused; its kick is not served
    g.activate();   // the executor has not run: delivered by activate() itself
    BOOST_CHECK_EQUAL(g.event_used(), 2u);
    BOOST_CHECK_EQUAL(g.event_id(1), 0u);
    g.pump([] { return false; }, std::chrono::milliseconds(50));
    BOOST_CHECK_EQUAL(g.event_used(), 2u); // exactly once
    BOOST_CHECK(!g.broken);
}

BOOST_AUTO_TEST_CASE(device_never_started_queues_no_reset) {
    fake_guest g({}, 2, false);
    g.device->transport_reset(); // no driver running: nothing to tell
    g.activate();
    g.pump([] { return false; }, std::chrono::milliseconds(50));
    BOOST_CHECK_EQUAL(g.event_used(), 0u);
    BOOST_CHECK(!g.broken);
}
