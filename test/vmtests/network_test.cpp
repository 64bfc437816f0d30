// The guest network of `supermachine run` (issue 17), built twice:
// vm_network_test on the QEMU engine (QEMU's virtio-net on our libslirp NAT,
// detail/qemu_network.hpp), and vm_kvm_network_test (NETWORK_TEST_KVM) on
// the kvm engine (our virtio::net on the same NAT, virtio/net_user.hpp),
// labelled linux-kvm: inside the nested L1 here, where "the host" is the L1.
// Every peer is on the host's loopback, reached through --add-host
// NAME:host-gateway, or a port the run publishes: no traffic leaves the host.
#include "vm_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <fstream>
#include <future>
#include <iterator>
#include <random>
#include <sstream>
#include <thread>

using namespace supermachine::test;
using namespace std::chrono_literals;

namespace {

#ifdef NETWORK_TEST_KVM
// The environment's runs with --engine kvm (every run below goes through it).
struct kvm_environment : vm_environment {
    kvm_environment() {
        // Inside the nested L1 the layout umoci writes there does not load;
        // the one scripts/setup.sh made on the host does (kvm_cli_test.cpp).
        const char* home = std::getenv("HOME");
        const fs::path host_made =
            fs::path(home ? home : "/root") / ".cache" / "supermachine" / "demo-image";
        if (std::getenv("NESTED_KVM") && fs::exists(host_made / "index.json"))
            image = "oci:" + host_made.string() + ":busybox";
    }
    process_result run(std::vector<std::string> options, const std::vector<std::string>& command,
                       const std::string& input = "",
                       std::chrono::seconds limit = std::chrono::seconds(240)) {
        options.insert(options.begin(), {"--engine", "kvm"});
        return vm_environment::run(options, command, input, limit);
    }
};
kvm_environment& env() {
    static kvm_environment e;
    return e;
}
#else
vm_environment& env() {
    static vm_environment e;
    return e;
}
#endif

/// A socket on 127.0.0.1 (port 0: any), listening for TCP.
struct loopback_socket {
    int fd = -1;
    std::uint16_t port = 0;
    explicit loopback_socket(int type) {
        fd = ::socket(AF_INET, type | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
            throw std::runtime_error("bind");
        if (type == SOCK_STREAM && ::listen(fd, 16) != 0) throw std::runtime_error("listen");
        socklen_t len = sizeof a;
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
        port = ntohs(a.sin_port);
    }
    ~loopback_socket() {
        if (fd >= 0) ::close(fd);
    }
    /// An accepted connection within `limit`, or -1.
    int accept_within(std::chrono::milliseconds limit) const {
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(limit.count())) != 1) return -1;
        return ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    }
};

std::string sha256_of(const std::string& data) {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    EVP_DigestUpdate(ctx, data.data(), data.size());
    auto hex = sha256_hex(ctx);
    EVP_MD_CTX_free(ctx);
    return hex;
}

std::string read_all(int fd, std::size_t max) {
    std::string out;
    char buffer[65536];
    while (out.size() < max) {
        const auto n = ::read(fd, buffer, std::min(sizeof buffer, max - out.size()));
        if (n <= 0) break;
        out.append(buffer, static_cast<std::size_t>(n));
    }
    return out;
}

bool write_all(int fd, const std::string& data) {
    std::size_t done = 0;
    while (done < data.size()) {
        const auto n = ::write(fd, data.data() + done, data.size() - done);
        if (n <= 0) return false;
        done += static_cast<std::size_t>(n);
    }
    return true;
}

std::string random_bytes(std::size_t n) {
    std::mt19937_64 rng(n);
    std::string out(n, '\0');
    for (auto& c : out)
        c = static_cast<char>(rng());
    return out;
}

/// A free port on the host (bound and released).
std::uint16_t free_port(int type = SOCK_STREAM) {
    loopback_socket s(type);
    return s.port;
}

/// Local addresses listening on `port` (TCP LISTEN, or any UDP socket),
/// from /proc/net: "0.0.0.0" / "127.0.0.1".
std::vector<std::string> bound_addresses(std::uint16_t port, bool udp) {
    std::ifstream in(udp ? "/proc/net/udp" : "/proc/net/tcp");
    std::vector<std::string> out;
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string slot, local, remote, state;
        fields >> slot >> local >> remote >> state;
        const auto colon = local.find(':');
        if (colon == std::string::npos) continue;
        if (std::stoul(local.substr(colon + 1), nullptr, 16) != port) continue;
        if (!udp && state != "0A") continue;
        in_addr a{};
        a.s_addr = static_cast<std::uint32_t>(std::stoul(local.substr(0, colon), nullptr, 16));
        out.push_back(::inet_ntoa(a));
    }
    return out;
}

#ifdef NETWORK_TEST_KVM
// The guest's CPU is nested under TCG: 64 MiB through sha256sum alone takes minutes.
constexpr std::size_t transfer_bytes = std::size_t{8} << 20;
#else
constexpr std::size_t transfer_bytes = std::size_t{64} << 20;
#endif

/// guest_udp (guest_udp.cpp), sent in on stdin: the command that saves it.
std::string guest_udp_binary() {
    std::ifstream in(GUEST_UDP, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}
constexpr const char* install_guest_udp = "cat > /tmp/guest_udp && chmod +x /tmp/guest_udp && ";

} // namespace

// The check: a server on the host's 127.0.0.1 reached through
// --add-host hostbox:host-gateway, 64 MiB each way, checksummed.
BOOST_AUTO_TEST_CASE(host_gateway_reaches_the_hosts_loopback_both_ways) {
    loopback_socket in(SOCK_STREAM), out(SOCK_STREAM);
    const auto payload = random_bytes(transfer_bytes);
    std::string received;
    std::thread server([&] {
        // Guest -> host: exactly transfer_bytes, then we close.
        if (int c = in.accept_within(180s); c >= 0) {
            received = read_all(c, transfer_bytes);
            ::close(c);
        }
        // Host -> guest.
        if (int c = out.accept_within(60s); c >= 0) {
            write_all(c, payload);
            ::close(c);
        }
    });
    const std::string command =
        "head -c " + std::to_string(transfer_bytes) + " /dev/urandom > /tmp/up && " +
        "sha256sum /tmp/up && nc hostbox " + std::to_string(in.port) + " < /tmp/up; " +
        "echo sent; nc hostbox " + std::to_string(out.port) + " | sha256sum; echo done";
    auto r = env().run({"--add-host", "hostbox:host-gateway"}, {"sh", "-c", command}, "", 400s);
    server.join();
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(received.size() == transfer_bytes, describe(r));
    BOOST_TEST(contains(r.out, sha256_of(received) + "  /tmp/up"), describe(r));
    BOOST_TEST(contains(r.out, "sent\n" + sha256_of(payload) + "  -\ndone"), describe(r));
}

// Without a host-gateway entry the host's loopback is out of reach.
BOOST_AUTO_TEST_CASE(without_host_gateway_the_hosts_loopback_is_unreachable) {
    loopback_socket in(SOCK_STREAM);
    const auto port = std::to_string(in.port);
    auto r = env().run({"--add-host", "other:192.0.2.1"},
                       {"sh", "-c",
                        "if echo hi | nc -w 5 10.0.2.2 " + port +
                            "; then echo CONNECTED; else echo FAILED; fi; grep other /etc/hosts"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "FAILED"), describe(r));
    BOOST_TEST(!contains(r.out, "CONNECTED"), describe(r));
    BOOST_TEST(contains(r.out, "192.0.2.1\tother"), describe(r));
    BOOST_TEST(in.accept_within(0ms) < 0);
}

BOOST_AUTO_TEST_CASE(network_none_has_no_eth0) {
    auto r = env().run({"--network", "none"}, {"sh", "-c", "ls /sys/class/net; echo end"});
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(r.out == "lo\nend\n", describe(r));
    auto with =
        env().run({}, {"sh", "-c", "ls /sys/class/net | tr '\\n' ' '; echo; cat /etc/resolv.conf"});
    BOOST_TEST(with.status == 0, describe(with));
    BOOST_TEST(contains(with.out, "eth0 lo \nnameserver 10.0.2.3"), describe(with));
    auto refused = env().run({"--network", "none", "-p", "8080:80"}, {"true"});
    BOOST_TEST(refused.status == 125, describe(refused));
}

BOOST_AUTO_TEST_CASE(udp_echo_through_the_nat) {
    loopback_socket echo(SOCK_DGRAM);
    std::atomic<bool> stop{false};
    std::thread server([&] {
        char buffer[2048];
        while (!stop) {
            pollfd p{echo.fd, POLLIN, 0};
            if (::poll(&p, 1, 100) != 1) continue;
            sockaddr_in from{};
            socklen_t len = sizeof from;
            const auto n = ::recvfrom(echo.fd, buffer, sizeof buffer, 0,
                                      reinterpret_cast<sockaddr*>(&from), &len);
            if (n <= 0) continue;
            std::string reply = "echo:" + std::string(buffer, static_cast<std::size_t>(n));
            ::sendto(echo.fd, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&from),
                     len);
        }
    });
    auto r = env().run({"-i", "--add-host", "hostbox:host-gateway"},
                       {"sh", "-c",
                        std::string(install_guest_udp) + "/tmp/guest_udp send 10.0.2.2 " +
                            std::to_string(echo.port) + " datagram; echo end"},
                       guest_udp_binary());
    stop = true;
    server.join();
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "reply: echo:datagram"), describe(r));
}

// The guest's resolver (10.0.2.3) forwards to the one the run names: a
// dnsmasq on the host's loopback with one record.
BOOST_AUTO_TEST_CASE(dns_resolves_through_the_forwarder) {
    const char* dnsmasq = "/usr/sbin/dnsmasq";
    skip_unless(::access(dnsmasq, X_OK) == 0, "dnsmasq not installed (scripts/install-deps.sh)");
    const auto port = free_port(SOCK_DGRAM);
    const auto pid_file = env().work / "dnsmasq.pid";
    const std::string start =
        std::string(dnsmasq) +
        " --keep-in-foreground --no-resolv --no-hosts --bind-interfaces "
        "--listen-address=127.0.0.1 --port=" +
        std::to_string(port) +
        " --address=/probe.supermachine.test/192.0.2.77 --pid-file=" + pid_file.string() +
        " --user=root >/dev/null 2>&1 & echo $!";
    FILE* p = ::popen(start.c_str(), "r");
    BOOST_TEST_REQUIRE(p != nullptr);
    char line[64] = {};
    std::fgets(line, sizeof line, p);
    ::pclose(p);
    const pid_t pid = std::atoi(line);
    std::this_thread::sleep_for(500ms);
    ::setenv("SUPERMACHINE_DNS_UPSTREAM", ("127.0.0.1:" + std::to_string(port)).c_str(), 1);
    auto r = env().run({}, {"sh", "-c", "nslookup probe.supermachine.test; echo end"});
    ::unsetenv("SUPERMACHINE_DNS_UPSTREAM");
    if (pid > 0) ::kill(pid, SIGTERM);
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "192.0.2.77"), describe(r));
}

// -p binds where asked (every interface by default, or the address given),
// several of them, TCP and UDP.
BOOST_AUTO_TEST_CASE(published_ports_bind_where_asked) {
    const auto all = free_port(), local = free_port(), udp = free_port(SOCK_DGRAM);
    std::promise<process_result> finished;
    auto result = finished.get_future();
    std::thread run([&] {
        finished.set_value(
            env().run({"-i", "-p", "0.0.0.0:" + std::to_string(all) + ":8080", "-p",
                       "127.0.0.1:" + std::to_string(local) + ":8081", "-p",
                       std::to_string(udp) + ":9000/udp"},
                      {"sh", "-c",
                       "(echo one | nc -l -p 8080 >/dev/null 2>&1 &); "
                       "(echo two | nc -l -p 8081 >/dev/null 2>&1 &); " +
                           std::string(install_guest_udp) + "/tmp/guest_udp recv 9000 120"},
                      guest_udp_binary(), 200s));
    });
    auto connect_read = [](std::uint16_t port) {
        for (auto deadline = std::chrono::steady_clock::now() + 120s;
             std::chrono::steady_clock::now() < deadline; std::this_thread::sleep_for(200ms)) {
            const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            sockaddr_in a{};
            a.sin_family = AF_INET;
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            a.sin_port = htons(port);
            if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
                timeval tv{5, 0};
                ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
                auto got = read_all(fd, 4);
                ::close(fd);
                if (!got.empty()) return got;
            } else {
                ::close(fd);
            }
        }
        return std::string();
    };
    BOOST_TEST(connect_read(all) == "one\n");
    BOOST_TEST(bound_addresses(all, false) == std::vector<std::string>{"0.0.0.0"});
    BOOST_TEST(bound_addresses(local, false) == std::vector<std::string>{"127.0.0.1"});
    BOOST_TEST(bound_addresses(udp, true) == std::vector<std::string>{"0.0.0.0"});
    BOOST_TEST(connect_read(local) == "two\n");
    // The guest's receiver may not be bound yet: send until the run ends.
    const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(udp);
    const std::string datagram = "over-udp";
    for (int i = 0; i < 300 && result.wait_for(200ms) != std::future_status::ready; ++i)
        ::sendto(fd, datagram.data(), datagram.size(), 0, reinterpret_cast<sockaddr*>(&a),
                 sizeof a);
    ::close(fd);
    if (result.wait_for(10s) != std::future_status::ready) {
        run.detach();
        BOOST_FAIL("the run did not end");
    }
    run.join();
    auto r = result.get();
    BOOST_TEST(r.status == 0, describe(r));
    BOOST_TEST(contains(r.out, "got: over-udp"), describe(r));
}

// Warm runs: a restored clone connects out like a cold vm, and two clones
// restored side by side each get their own connection.
BOOST_AUTO_TEST_CASE(restored_clones_connect_out) {
    loopback_socket in(SOCK_STREAM);
    std::atomic<int> served{0};
    std::atomic<bool> stop{false};
    std::thread server([&] {
        while (!stop) {
            const int c = in.accept_within(200ms);
            if (c < 0) continue;
            const auto line = read_all(c, 6);
            write_all(c, "reply-to-" + line);
            ::close(c);
            ++served;
        }
    });
    const std::vector<std::string> options = {"--add-host", "hostbox:host-gateway"};
    const std::vector<std::string> command = {"sh", "-c",
                                              "echo clone | nc hostbox " + std::to_string(in.port)};
    auto first = env().run(options, command); // makes (or uses) the snapshot
    auto a = std::async(std::launch::async, [&] { return env().run(options, command); });
    auto b = std::async(std::launch::async, [&] { return env().run(options, command); });
    auto ra = a.get(), rb = b.get();
    stop = true;
    server.join();
    for (const auto* r : {&first, &ra, &rb}) {
        BOOST_TEST(r->status == 0, describe(*r));
        BOOST_TEST(contains(r->out, "reply-to-clone"), describe(*r));
    }
    // The runs were warm: the snapshot the first made (or found) is there.
    const auto snapshots = env().work / "cache" / "supermachine" / "snapshots";
    std::error_code ec;
    BOOST_TEST(std::distance(fs::directory_iterator(snapshots, ec), fs::directory_iterator()) > 0);
    BOOST_TEST(served.load() == 3);
}
