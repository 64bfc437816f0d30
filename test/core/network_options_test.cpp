// docker's network options as vm_options take them (network.hpp): -p and
// --add-host forms, and what a bad one is.
#include <supermachine/network.hpp>

#include <boost/test/unit_test.hpp>

namespace sm = supermachine;

BOOST_AUTO_TEST_CASE(published_port_forms) {
    auto p = sm::parse_published_port("8080");
    BOOST_TEST_REQUIRE(p.has_value());
    BOOST_TEST(p->host_address == "0.0.0.0");
    BOOST_TEST(p->host_port == 8080);
    BOOST_TEST(p->guest_port == 8080);
    BOOST_TEST(!p->udp);
    p = sm::parse_published_port("9000:80/tcp");
    BOOST_TEST_REQUIRE(p.has_value());
    BOOST_TEST(p->host_port == 9000);
    BOOST_TEST(p->guest_port == 80);
    BOOST_TEST(p->host_address == "0.0.0.0"); // docker: every interface
    p = sm::parse_published_port("127.0.0.1:9000:80");
    BOOST_TEST_REQUIRE(p.has_value());
    BOOST_TEST(p->host_address == "127.0.0.1");
    p = sm::parse_published_port("127.0.0.1::53/udp");
    BOOST_TEST_REQUIRE(p.has_value());
    BOOST_TEST(p->udp);
    BOOST_TEST(p->host_port == 53);
    for (const char* bad : {"", "0", "x", "80:0", ":80", "1.2.3:80:80", "80:80/sctp", "70000",
                            "localhost:80:80", "1:2:3:4"})
        BOOST_TEST(!sm::parse_published_port(bad).has_value(), bad);
}

BOOST_AUTO_TEST_CASE(extra_host_forms) {
    auto h = sm::parse_extra_host("hostbox:host-gateway");
    BOOST_TEST_REQUIRE(h.has_value());
    BOOST_TEST(h->name == "hostbox");
    const std::vector<sm::extra_host> hosts{*h, {"db.local", "192.0.2.5"}};
    BOOST_TEST(sm::reaches_host_loopback(hosts));
    BOOST_TEST(!sm::reaches_host_loopback(std::span(hosts).subspan(1)));
    BOOST_TEST(sm::extra_hosts_lines(hosts) == "10.0.2.2\thostbox\n192.0.2.5\tdb.local\n");
    for (const char* bad : {"", "name", ":1.2.3.4", "a b:1.2.3.4", "x:1.2.3", "x:\n1.2.3.4",
                            "x:1.2.3.4\nevil"})
        BOOST_TEST(!sm::parse_extra_host(bad).has_value(), bad);
}
