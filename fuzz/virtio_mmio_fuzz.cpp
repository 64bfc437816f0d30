// libFuzzer target: a hostile driver against the virtio-mmio register file
// (any offset, width and value, in any order, including activation with
// rings in fuzzer-written memory), and hostile snapshot records for the
// transport state and the cow overlay state.
#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/mmio_state.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>

#include <boost/asio/io_context.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace sm = supermachine;
namespace vio = supermachine::virtio;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1) return 0;
    const auto bytes = std::as_bytes(std::span(data, size));
    switch (data[0] % 3) {
    case 0: { // transport state decode, then restore into a live transport
        auto s = vio::decode_mmio_state(bytes.subspan(1));
        if (s) {
            auto again = vio::decode_mmio_state(vio::encode(s.value()));
            if (!again || !(again.value() == s.value())) __builtin_trap();
        }
        break;
    }
    case 1: { // register accesses
        static std::vector<std::byte> ram(1 << 16);
        std::memset(ram.data(), 0, ram.size());
        auto memory = sm::guest_memory::view(0, ram);
        boost::asio::io_context io;
        const int irq = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        sm::device_environment env{memory,
                                   io.get_executor(),
                                   {0xd0000000, 0x1000, 5},
                                   [&](std::uint32_t) -> sm::result<sm::interrupt_line> {
                                       return sm::interrupt_line(irq);
                                   },
                                   {}};
        {
            auto t = vio::mmio_transport<vio::rng>::create(env, vio::rng::config{}).value();
            std::size_t at = 1;
            // Each op: [kind][offset lo][offset hi][width][value x8]
            while (size - at >= 12) {
                const std::uint8_t kind = data[at];
                const std::uint64_t offset = (data[at + 1] | data[at + 2] << 8) & 0x1fff;
                const std::size_t width = std::size_t{1} << (data[at + 3] % 4);
                std::uint8_t value[8];
                std::memcpy(value, data + at + 4, 8);
                at += 12;
                if (kind & 1) {
                    t->write(0xd0000000 + offset, std::as_bytes(std::span(value, width)));
                } else if (kind & 2) {
                    // the guest scribbles over its RAM (rings included)
                    std::memcpy(ram.data() + (offset * 8) % (ram.size() - 8), value, 8);
                } else {
                    t->read(0xd0000000 + offset, std::as_writable_bytes(std::span(value, width)));
                }
                if (kind & 4) io.poll(); // let the device serve what was kicked
            }
            t->pause();
            auto s = t->state();
            auto back = vio::decode_mmio_state(vio::encode(s));
            if (!back) __builtin_trap();
            (void)t->restore(back.value());
        }
        io.poll();
        ::close(irq);
        break;
    }
    case 2: { // cow overlay state records
        static std::unique_ptr<sm::storage::cow_file<sm::storage::raw_file>> cow = [] {
            char path[] = "/tmp/sm-fuzz-base-XXXXXX";
            const int fd = ::mkstemp(path);
            if (::ftruncate(fd, 1 << 20) != 0) __builtin_trap();
            ::close(fd);
            auto c = sm::storage::cow_file<sm::storage::raw_file>::open({{path, true}, "", 65536});
            ::unlink(path);
            return std::move(c).value();
        }();
        (void)cow->restore_state(bytes.subspan(1));
        break;
    }
    }
    return 0;
}
