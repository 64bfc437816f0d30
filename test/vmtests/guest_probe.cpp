// guest_probe: run inside a test guest (static, libc only) to check the
// agent's boundary from the workload's side.
//
//   guest_probe [--load MODULE.ko] [--uid N] CID...
//
// As root it may first load MODULE (vsock_loopback: without it no guest
// process can reach a guest vsock port at all, and the check below could not
// fail), then drops to uid/gid N, then connects to the agent's vsock port
// 1024 at each CID and prints one line per CID:
//   cid C: served        the agent sent a byte (its `ready` frame): a guest
//                        process reached the agent
//   cid C: refused ...   connect failed, or the connection closed unanswered
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fcntl.h>
#include <grp.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char** argv) {
    int i = 1;
    for (; i + 1 < argc && argv[i][0] == '-'; i += 2) {
        if (std::strcmp(argv[i], "--load") == 0) {
            const int fd = ::open(argv[i + 1], O_RDONLY | O_CLOEXEC);
            if (fd < 0 || (::syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST))
                std::printf("load %s: %s\n", argv[i + 1], std::strerror(errno));
            else
                std::printf("loaded %s\n", argv[i + 1]);
        } else if (std::strcmp(argv[i], "--uid") == 0) {
            const auto id = static_cast<unsigned>(std::strtoul(argv[i + 1], nullptr, 10));
            if (::setgroups(0, nullptr) != 0 || ::setgid(id) != 0 || ::setuid(id) != 0) {
                std::printf("cannot become uid %u: %s\n", id, std::strerror(errno));
                return 2;
            }
        }
    }
    std::printf("uid %u\n", ::getuid());
    for (; i < argc; ++i) {
        const unsigned cid = static_cast<unsigned>(std::strtoul(argv[i], nullptr, 10));
        const int fd = ::socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            std::printf("cid %u: refused (socket: %s)\n", cid, std::strerror(errno));
            continue;
        }
        timeval limit{3, 0};
        ::setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &limit, sizeof limit);
        sockaddr_vm addr{};
        addr.svm_family = AF_VSOCK;
        addr.svm_cid = cid;
        addr.svm_port = 1024;
        if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
            std::printf("cid %u: refused (connect: %s)\n", cid, std::strerror(errno));
            ::close(fd);
            continue;
        }
        pollfd p{fd, POLLIN, 0};
        char byte = 0;
        if (::poll(&p, 1, 3000) == 1 && ::read(fd, &byte, 1) == 1)
            std::printf("cid %u: served\n", cid);
        else
            std::printf("cid %u: refused (closed unanswered)\n", cid);
        ::close(fd);
    }
    return 0;
}
