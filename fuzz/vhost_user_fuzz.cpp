// Fuzz the vhost-user codec and back-end state machine: the input is a
// sequence of [fd count byte][12-byte header][payload] records, each decoded,
// validated and (when valid) handled by a backend serving virtio::rng. The
// fds are small memfds, so memory tables, rings and kicks are all reachable.
// The io_context is run after each message so activations and kicks execute.
#include <supermachine/vhost_user/backend.hpp>
#include <supermachine/virtio/rng.hpp>

#include <boost/asio/io_context.hpp>

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace vu = supermachine::vhost_user;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const int memfd = [] {
        const int fd = static_cast<int>(::syscall(SYS_memfd_create, "fuzz-ram", 1u));
        if (fd >= 0 && ::ftruncate(fd, 1 << 20) != 0) return -1;
        return fd;
    }();
    if (memfd < 0) return 0;
    boost::asio::io_context io;
    auto device = supermachine::virtio::rng::create({}).value();
    vu::backend<supermachine::virtio::rng> backend(io.get_executor(), *device);
    std::size_t at = 0;
    for (int messages = 0; messages < 64 && at + 1 + vu::header_size <= size; ++messages) {
        const std::size_t fd_count = data[at++] % 10;
        std::array<std::byte, vu::header_size> head;
        std::memcpy(head.data(), data + at, vu::header_size);
        at += vu::header_size;
        auto h = vu::decode_header(head);
        if (!h) break;
        vu::message m;
        m.head = h.value();
        if (m.head.size > size - at) break;
        std::memcpy(m.payload_storage.data(), data + at, m.head.size);
        at += m.head.size;
        for (std::size_t i = 0; i < fd_count; ++i)
            m.fds.emplace_back(::fcntl(memfd, F_DUPFD_CLOEXEC, 0));
        if (!vu::validate(m)) continue;
        (void)backend.handle(m);
        io.poll();
    }
    backend.stop();
    io.poll();
    return 0;
}
