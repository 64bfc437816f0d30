// Guest -> host TCP through a user-mode NAT, ours vs QEMU's. A server on the
// host's 127.0.0.1 counts what arrives; the guest sends with busybox nc.
// Throughput is bytes over the time from the accept to the sender's EOF, as
// the host sees it. Connections: the guest runs N `echo x | nc` in a loop,
// per second (fork/exec in the guest included on both sides alike). Runs
// alternate ours/QEMU's; medians printed.
//
// engine=qemu (default): one guest on the QEMU engine. eth0 is QEMU's
// virtio-net on our libslirp (detail/qemu_network.hpp, 10.0.2.2 through
// --add-host host-gateway), eth1 QEMU's virtio-net on its own `-netdev user`
// (QEMU's libslirp in its main loop, 10.0.3.2): the same guest, the same VMM.
// engine=kvm (where KVM runs Linux: the nested harness here): two guests of
// the same image and kernel, ours on the kvm engine (our virtio-net core and
// our NAT, virtio/net_user.hpp) and the peer on the QEMU engine (`-accel
// kvm`) with only QEMU's `-netdev user`: whole stack against whole stack.
//
//   bench_net oci:DIR:TAG [mib=64] [rounds=3] [connections=100] [engine=qemu|kvm]
#include <supermachine/image.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../support/statistics.hpp"

namespace {

namespace sm = supermachine;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

template <class Done>
void run_until(boost::asio::io_context& io, Done done) {
    io.restart();
    while (!done())
        io.run_one();
}

/// A TCP server on 127.0.0.1 that accepts in a loop, drains each
/// connection and records (bytes, seconds from accept to EOF).
class sink_server {
public:
    sink_server() {
        fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
        ::listen(fd_, 128);
        socklen_t len = sizeof a;
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
        port_ = ntohs(a.sin_port);
        thread_ = std::thread([this] { serve(); });
    }
    ~sink_server() {
        stop_ = true;
        thread_.join();
        ::close(fd_);
    }
    std::uint16_t port() const { return port_; }
    std::atomic<std::uint64_t> last_bytes{0}, connections{0};
    std::atomic<double> last_seconds{0};

private:
    void serve() {
        std::vector<char> buffer(1 << 20);
        while (!stop_) {
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, 100) != 1) continue;
            const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
            if (c < 0) continue;
            const auto t = clock_type::now();
            std::uint64_t bytes = 0;
            for (;;) {
                const auto n = ::read(c, buffer.data(), buffer.size());
                if (n <= 0) break;
                bytes += static_cast<std::uint64_t>(n);
            }
            ::close(c);
            last_seconds = std::chrono::duration<double>(clock_type::now() - t).count();
            last_bytes = bytes;
            ++connections;
        }
    }
    int fd_ = -1;
    std::uint16_t port_ = 0;
    std::atomic<bool> stop_{false};
    std::thread thread_;
};

} // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: bench_net oci:DIR:TAG [mib=64] [rounds=3] [connections=100] "
                             "[engine=qemu|kvm]\n");
        return 2;
    }
    const std::string image_name = argv[1];
    const int mib = argc > 2 ? std::max(1, std::atoi(argv[2])) : 64;
    const int rounds = argc > 3 ? std::max(1, std::atoi(argv[3])) : 3;
    const int connections = argc > 4 ? std::max(0, std::atoi(argv[4])) : 100;
    const std::string engine = argc > 5 ? argv[5] : "qemu";
    if (engine != "qemu" && engine != "kvm") {
        std::fprintf(stderr, "bench_net: engine is qemu or kvm, not %s\n", engine.c_str());
        return 2;
    }
    const bool two_vms = engine == "kvm";
    const bool progress = std::getenv("BENCH_PROGRESS") != nullptr; // per round, on stderr
    const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
    if (!std::getenv("SUPERMACHINE_AGENT"))
        ::setenv("SUPERMACHINE_AGENT", (bin / "supermachine-agent").c_str(), 1);
    auto ready = sm::image::from_oci(image_name).prepare();
    if (!ready) {
        std::fprintf(stderr, "bench_net: %s: %s\n", image_name.c_str(),
                     ready.error().message().c_str());
        return 1;
    }
    boost::asio::io_context io;
    // QEMU's own user network, 10.0.3.0/24: a second NIC beside ours (one
    // vm), or the peer vm's only one.
    const std::vector<std::string> qemu_user_nic = {
        "-netdev", "user,id=qemunet,net=10.0.3.0/24", "-device",
        "virtio-net-device,netdev=qemunet,mac=52:54:00:12:34:57"};
    auto start = [&](sm::vm_options options) -> std::shared_ptr<sm::vm> {
        std::shared_ptr<sm::vm> machine;
        std::optional<supermachine::error_code> started;
        sm::vm::async_start(io.get_executor(), ready.value(), options,
                            [&](supermachine::error_code ec, std::shared_ptr<sm::vm> v) {
                                started = ec;
                                machine = std::move(v);
                            });
        run_until(io, [&] { return started.has_value(); });
        if (*started) {
            std::fprintf(stderr, "bench_net: VM did not start: %s\n%s", started->message().c_str(),
                         machine ? machine->console_tail().c_str() : "");
            return nullptr;
        }
        return machine;
    };
    auto exec = [&](sm::vm& machine, const std::string& script) {
        std::optional<supermachine::error_code> done;
        sm::agent::exec_output out;
        machine.async_exec({.argv = {"sh", "-c", script}},
                           [&](supermachine::error_code ec, sm::agent::exec_output o) {
                               done = ec;
                               out = std::move(o);
                           });
        run_until(io, [&] { return done.has_value(); });
        if (*done || out.exit_code != 0)
            std::fprintf(stderr, "bench_net: `%s`: %s, status %d: %s%s\n", script.c_str(),
                         done->message().c_str(), out.exit_code, out.stdout_data.c_str(),
                         out.stderr_data.c_str());
        return !*done && out.exit_code == 0;
    };
    sm::vm_options ours_options;
    ours_options.add_hosts = {{"hostbox", "host-gateway"}};
    std::shared_ptr<sm::vm> ours, peer;
    if (two_vms) {
        ours_options.engine = sm::engine_choice::kvm;
        sm::vm_options peer_options;
        peer_options.engine = sm::engine_choice::qemu;
        peer_options.network = sm::network_mode::none; // QEMU's NIC is its eth0
        peer_options.engine_arguments = qemu_user_nic;
        if (!(ours = start(ours_options)) || !(peer = start(peer_options))) return 1;
        if (!exec(*peer, "ifconfig eth0 10.0.3.15 netmask 255.255.255.0 up")) return 1;
        std::printf("ours: %s; peer: %s\n", ours->engine_description().c_str(),
                    peer->engine_description().c_str());
    } else {
        ours_options.engine_arguments = qemu_user_nic;
        if (!(ours = start(ours_options))) return 1;
        peer = ours;
        if (!exec(*peer, "ifconfig eth1 10.0.3.15 netmask 255.255.255.0 up")) return 1;
    }

    sink_server server;
    const std::string port = std::to_string(server.port());
    struct path {
        const char* name;
        const char* gateway;
        sm::vm* machine;
        std::vector<double> mib_per_s, connections_per_s;
    } paths[] = {{two_vms ? "ours (kvm engine, our virtio-net)" : "ours (libslirp on our executor)",
                  "10.0.2.2",
                  ours.get(),
                  {},
                  {}},
                 {two_vms ? "QEMU -accel kvm, -netdev user" : "QEMU -netdev user",
                  "10.0.3.2",
                  peer.get(),
                  {},
                  {}}};
    for (int round = 0; round < rounds + 1; ++round) { // round 0 warms up
        for (auto& p : paths) {
            const auto before = server.connections.load();
            if (!exec(*p.machine, "dd if=/dev/zero bs=64k count=" + std::to_string(mib * 16) +
                                      " 2>/dev/null | nc " + p.gateway + " " + port))
                return 1;
            const auto waited = clock_type::now();
            while (server.connections.load() == before) {
                if (clock_type::now() - waited > std::chrono::seconds(120)) {
                    std::fprintf(stderr, "bench_net: %s: the transfer never reached the host\n",
                                 p.name);
                    return 1;
                }
                std::this_thread::sleep_for(std::chrono::milliseconds(1));
            }
            const double bytes = static_cast<double>(server.last_bytes.load());
            if (bytes != static_cast<double>(mib) * (1 << 20))
                std::fprintf(stderr, "bench_net: %s: %.0f bytes arrived\n", p.name, bytes);
            if (round > 0) p.mib_per_s.push_back(bytes / (1 << 20) / server.last_seconds.load());
            if (progress)
                std::fprintf(stderr, "bench_net: round %d, %s: %.1f MiB/s\n", round, p.name,
                             bytes / (1 << 20) / server.last_seconds.load());
            if (connections > 0 && round > 0) {
                const auto t = clock_type::now();
                if (!exec(*p.machine, "i=0; while [ $i -lt " + std::to_string(connections) +
                                          " ]; do echo x | nc " + p.gateway + " " + port +
                                          " || exit 1; i=$((i+1)); done"))
                    return 1;
                p.connections_per_s.push_back(
                    connections / std::chrono::duration<double>(clock_type::now() - t).count());
            }
        }
    }
    std::printf("guest -> host TCP over a user-mode NAT, %d MiB x %d rounds (medians)\n", mib,
                rounds);
    for (const auto& p : paths) {
        std::printf("  %-34s %8.1f MiB/s", p.name, sm::bench::median(p.mib_per_s));
        if (!p.connections_per_s.empty())
            std::printf("   %7.1f connections/s", sm::bench::median(p.connections_per_s));
        std::printf("\n");
    }
    std::printf("  ratio ours/QEMU: throughput %.2fx",
                sm::bench::median(paths[0].mib_per_s) / sm::bench::median(paths[1].mib_per_s));
    if (connections > 0)
        std::printf(", connections %.2fx", sm::bench::median(paths[0].connections_per_s) /
                                               sm::bench::median(paths[1].connections_per_s));
    std::printf("\n");
    ours->kill();
    peer->kill();
    return 0;
}
