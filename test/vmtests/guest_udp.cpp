// guest_udp: UDP from inside a test guest (busybox's nc has no -u). Static,
// libc only; the network tests send it in on stdin.
//
//   guest_udp send IPV4 PORT MESSAGE   send MESSAGE, print "reply: R" (3 s) or "no reply"
//   guest_udp recv PORT SECONDS        print the first datagram to PORT as "got: D" or "timeout"
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace {
bool wait_readable(int fd, int ms) {
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, ms) == 1;
}
} // namespace

int main(int argc, char** argv) {
    const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) return 2;
    char buffer[2048];
    sockaddr_in a{};
    a.sin_family = AF_INET;
    if (argc == 5 && std::strcmp(argv[1], "send") == 0) {
        if (::inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) return 2;
        a.sin_port = htons(static_cast<unsigned short>(std::atoi(argv[3])));
        if (::sendto(fd, argv[4], std::strlen(argv[4]), 0, reinterpret_cast<sockaddr*>(&a),
                     sizeof a) < 0) {
            std::perror("sendto");
            return 1;
        }
        if (!wait_readable(fd, 3000)) return std::puts("no reply"), 1;
        const auto n = ::recv(fd, buffer, sizeof buffer - 1, 0);
        buffer[n > 0 ? n : 0] = 0;
        std::printf("reply: %s\n", buffer);
        return 0;
    }
    if (argc == 4 && std::strcmp(argv[1], "recv") == 0) {
        a.sin_port = htons(static_cast<unsigned short>(std::atoi(argv[2])));
        if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
            return std::perror("bind"), 1;
        std::puts("listening");
        std::fflush(stdout);
        if (!wait_readable(fd, std::atoi(argv[3]) * 1000)) return std::puts("timeout"), 1;
        const auto n = ::recv(fd, buffer, sizeof buffer - 1, 0);
        buffer[n > 0 ? n : 0] = 0;
        std::printf("got: %s\n", buffer);
        return 0;
    }
    std::fputs("usage: guest_udp send IPV4 PORT MESSAGE | recv PORT SECONDS\n", stderr);
    return 2;
}
