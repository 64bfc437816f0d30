// vsock_probe: Linux's AF_VSOCK from inside a test guest, one line at a time.
//
//   vsock_probe listen PORT        accept connections on PORT forever; answer
//                                  each line L with "guest got: L"
//   vsock_probe connect PORT MSG   connect to the host (CID 2) on PORT, send
//                                  MSG, print "vsock reply: R" for its answer
//   vsock_probe hold PORT          connect to the host on PORT, print
//                                  "vsock held", then block reading; print
//                                  "vsock hold ended: REASON" when the
//                                  connection ends (a transport reset after a
//                                  snapshot restore ends it with ECONNRESET)
//
// Every line it prints starts with "vsock", so a test can find it in the
// console between the kernel's own messages.
#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char* what) {
    printf("vsock %s failed: %s\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

static unsigned port_of(const char* s) { return (unsigned)strtoul(s, NULL, 10); }

static int connect_host(unsigned port) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
    if (connect(fd, (struct sockaddr*)&a, sizeof a) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

// Reads one line (without its '\n') into buf; returns its length, or -1 with errno.
static ssize_t read_line(int fd, char* buf, size_t size) {
    size_t n = 0;
    while (n + 1 < size) {
        ssize_t r = read(fd, buf + n, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0 || buf[n] == '\n') break;
        ++n;
    }
    buf[n] = 0;
    return (ssize_t)n;
}

static int listen_forever(unsigned port) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) return fail("socket");
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (bind(fd, (struct sockaddr*)&a, sizeof a) != 0) return fail("bind");
    if (listen(fd, 8) != 0) return fail("listen");
    printf("vsock listening on %u\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR) continue;
            return fail("accept");
        }
        char line[256], reply[300];
        if (read_line(c, line, sizeof line) >= 0) {
            int n = snprintf(reply, sizeof reply, "guest got: %s\n", line);
            if (write(c, reply, (size_t)n) != n) fail("write");
        }
        close(c);
    }
}

int main(int argc, char** argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "listen") == 0) return listen_forever(port_of(argv[2]));
    if (argc == 4 && strcmp(argv[1], "connect") == 0) {
        int fd = connect_host(port_of(argv[2]));
        if (fd < 0) return fail("connect");
        char line[256];
        int n = snprintf(line, sizeof line, "%s\n", argv[3]);
        if (write(fd, line, (size_t)n) != n) return fail("write");
        if (read_line(fd, line, sizeof line) < 0) return fail("read");
        printf("vsock reply: %s\n", line);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "hold") == 0) {
        int fd = connect_host(port_of(argv[2]));
        if (fd < 0) return fail("hold connect");
        printf("vsock held\n");
        char c;
        ssize_t r;
        while ((r = read(fd, &c, 1)) > 0 || (r < 0 && errno == EINTR)) {
        }
        printf("vsock hold ended: %s\n", r == 0 ? "closed by the host" : strerror(errno));
        return 0;
    }
    fprintf(stderr, "usage: vsock_probe listen PORT | connect PORT MSG | hold PORT\n");
    return 2;
}
