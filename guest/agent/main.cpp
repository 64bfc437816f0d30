// supermachine-agent: the guest agent. As PID 1 it sets the VM up and serves
// the host over AF_VSOCK; as an ordinary process (tests, benchmarks) it
// serves a Unix socket or an already-connected fd.
//
//   supermachine-agent                       PID 1: init, then vsock port 1024 (host only)
//   supermachine-agent --vsock PORT          serve AF_VSOCK (any CID) on PORT
//   supermachine-agent --unix PATH           serve a Unix socket at PATH
//   supermachine-agent --fd N                serve one connected socket fd, exit at its end
//   options: --token T | --token-file F  (else $SUPERMACHINE_AGENT_TOKEN)
#include "init.hpp"
#include "server.hpp"

#include <dirent.h>
#include <linux/vm_sockets.h>
#include <sys/un.h>

using namespace supermachine::agent;
using namespace supermachine::agent::guest;

namespace {

int listen_vsock(unsigned port) {
    int fd = ::socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    sockaddr_vm addr{};
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 || ::listen(fd, 64) < 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

int listen_unix(const char* path) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (std::strlen(path) >= sizeof addr.sun_path) return ::close(fd), -1;
    std::strcpy(addr.sun_path, path);
    ::unlink(path);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 || ::listen(fd, 64) < 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

/// The virtio-serial port named `name` (/sys/class/virtio-ports/*/name;
/// devtmpfs has /dev/vportNpM but no udev names it), opened non-blocking.
int open_serial_port(const std::string& name) {
    DIR* dir = ::opendir("/sys/class/virtio-ports");
    if (!dir) return -1;
    int fd = -1;
    while (dirent* e = ::readdir(dir)) {
        if (e->d_name[0] == '.') continue;
        const std::string entry = e->d_name;
        if (trim(read_small_file(("/sys/class/virtio-ports/" + entry + "/name").c_str())) != name)
            continue;
        fd = ::open(("/dev/" + entry).c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
        break;
    }
    ::closedir(dir);
    return fd;
}

/// The workload's /dev (init.hpp), unless the host asked for the kernel's
/// devtmpfs (supermachine.dev=devtmpfs). After the agent opened its channel:
/// the virtio-serial port's node lives only in devtmpfs.
void set_up_dev(const std::string& cmdline) {
    // Data disks (supermachine.disks=N: /dev/vdb...) probe beside the root
    // disk; wait for the last briefly, so /dev gets them all.
    const auto disks =
        std::strtoul(cmdline_value(cmdline, "supermachine.disks").c_str(), nullptr, 10);
    if (disks > 0 && disks < 25) {
        const std::string last = std::string("/dev/vd") + static_cast<char>('a' + disks);
        for (int i = 0; i < 200 && ::access(last.c_str(), F_OK) != 0; ++i)
            ::usleep(10 * 1000);
        if (::access(last.c_str(), F_OK) != 0) log("data disk %s did not appear", last.c_str());
    }
    if (cmdline_value(cmdline, "supermachine.dev") == "devtmpfs") return;
    std::string root = cmdline_value(cmdline, "supermachine.root");
    make_container_dev(root.empty() ? "/dev/vda" : root);
}

[[noreturn]] void run_as_init() {
    mount_basics();
    int console = ::open("/dev/console", O_RDWR | O_CLOEXEC);
    if (console >= 0) {
        for (int i = 0; i < 3; ++i)
            ::dup2(console, i);
        if (console > 2) ::close(console);
    }
    std::string cmdline = read_small_file("/proc/cmdline");
    // From the initramfs, before switch_root hides it.
    std::string token = take_token();
    load_modules();
    switch_to_root_disk(cmdline);
    mount_volumes(cmdline); // inside the image's root, before any command runs
    bring_up_loopback();
    mount_hostname_files();
    configure_network(cmdline);
    if (token.empty()) log("no token (/etc/supermachine/token in the initramfs): refusing all");
    // Only the host may connect (vsock): never a process of the guest.
    const server_options options{.token = token, .power_off_on_shutdown = true, .host_only = true};
    if (cmdline_value(cmdline, "supermachine.channel") == "serial") {
        // The QEMU engine's migratable channel (doc/warm-start.md): a virtio-serial port.
        const std::string name = "supermachine.agent";
        int port_fd = -1;
        for (int i = 0; i < 500 && port_fd < 0; ++i) {
            port_fd = open_serial_port(name);
            if (port_fd < 0) ::usleep(10 * 1000);
        }
        if (port_fd < 0) {
            log("no virtio-serial port %s (errno %d)", name.c_str(), errno);
            power_off();
        }
        set_up_dev(cmdline);
        std::printf("supermachine-agent: ready on virtio-serial port %s\n", name.c_str());
        std::fflush(stdout);
        server s(options);
        s.set_serial_port(port_fd);
        s.run();
        power_off();
    }
    unsigned port = default_vsock_port;
    if (auto p = cmdline_value(cmdline, "supermachine.port"); !p.empty())
        port = static_cast<unsigned>(std::strtoul(p.c_str(), nullptr, 10));
    // The vsock transport may still be probing: retry briefly.
    int listener = -1;
    for (int i = 0; i < 500 && listener < 0; ++i) {
        listener = listen_vsock(port);
        if (listener < 0) ::usleep(10 * 1000);
    }
    if (listener < 0) {
        log("cannot listen on vsock port %s (errno %d)", std::to_string(port).c_str(), errno);
        power_off();
    }
    set_up_dev(cmdline);
    std::printf("supermachine-agent: ready on vsock port %u\n", port);
    std::fflush(stdout);
    server s(options);
    s.set_listener(listener);
    s.run();
    power_off(); // PID 1 must never exit: that panics the kernel
}

} // namespace

int main(int argc, char** argv) {
    if (::getpid() == 1) run_as_init();
    std::string token;
    if (const char* t = std::getenv("SUPERMACHINE_AGENT_TOKEN")) token = t;
    int listener = -1;
    int connection = -1;
    for (int i = 1; i < argc; ++i) {
        std::string_view arg = argv[i];
        const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
        if (!value) {
            std::fprintf(stderr, "supermachine-agent: %s needs a value\n", argv[i]);
            return 2;
        }
        ++i;
        if (arg == "--token") {
            token = value;
        } else if (arg == "--token-file") {
            token = trim(read_small_file(value, max_token_size));
        } else if (arg == "--fd") {
            connection = std::atoi(value);
        } else if (arg == "--unix") {
            listener = listen_unix(value);
            if (listener < 0) return std::perror("supermachine-agent: unix socket"), 1;
        } else if (arg == "--vsock") {
            listener = listen_vsock(static_cast<unsigned>(std::strtoul(value, nullptr, 10)));
            if (listener < 0) return std::perror("supermachine-agent: vsock"), 1;
        } else {
            std::fprintf(stderr, "supermachine-agent: unknown option %s\n", argv[i - 1]);
            return 2;
        }
    }
    if (token.empty()) {
        std::fprintf(stderr, "supermachine-agent: no token given; refusing to serve\n");
        return 2;
    }
    if (listener < 0 && connection < 0) {
        std::fprintf(stderr, "usage: supermachine-agent (--fd N | --unix PATH | --vsock PORT) "
                             "[--token T | --token-file F]\n");
        return 2;
    }
    server s({token, false});
    if (listener >= 0) s.set_listener(listener);
    if (connection >= 0) {
        ::fcntl(connection, F_SETFD, FD_CLOEXEC);
        s.add_connection(connection);
    }
    s.run();
    return 0;
}
