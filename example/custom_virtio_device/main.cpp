// A custom virtio device in ~80 lines: "shout", which answers every request
// with its bytes upper-cased, and counts requests in its config space.
//
// Meeting supermachine::virtio::device_core is all it takes: the same type
// is served by the in-process virtio-mmio transport, so it drops into a
// machine's device list,
//     basic_machine<kvm, serial, virtio::blk<storage::raw_file>, shout>
// and by the vhost-user transport to another VMM. Here we play the guest
// driver ourselves, with no VM, to show the device working.
#include <supermachine/virtio/device.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/queue_service.hpp>

#include <boost/asio/io_context.hpp>

#include <sys/eventfd.h>

#include <cctype>
#include <cstdio>
#include <cstring>

namespace sm = supermachine;
namespace vio = supermachine::virtio;

class shout {
public:
    struct config {};
    // A device id from the range nobody uses; a real device takes its
    // number from the virtio spec.
    static constexpr vio::device_type type = static_cast<vio::device_type>(0xfff0);

    static sm::result<std::unique_ptr<shout>> create(const config&) {
        return std::make_unique<shout>();
    }
    std::uint64_t device_features() const { return vio::common_features; }
    std::size_t queue_count() const { return 1; }
    std::uint32_t queue_max_size(std::size_t) const { return 64; }
    std::size_t config_size() const { return 4; }
    void read_config(std::uint32_t offset, std::span<std::byte> out) const {
        const std::uint32_t n = served_.load();
        vio::read_config_bytes(std::as_bytes(std::span(&n, 1)), offset, out);
    }
    void write_config(std::uint32_t offset, std::span<const std::byte>) {
        if (offset == 0) served_ = 0; // any write to the counter clears it
    }
    sm::result<void> activate(const vio::activation& act) {
        queue_ = act.queues[0];
        return service_.start(act, [this](std::size_t) { serve(); });
    }
    void reset() {
        service_.stop();
        queue_ = {};
    }

private:
    // On the executor, under the core's lock; each chain: input bytes
    // (device-readable) then room for the answer (device-writable).
    void serve() {
        (void)vio::for_each_available(queue_, [&](vio::virtqueue::available_chain&& c) {
            std::uint32_t written = 0;
            if (c.chain) {
                vio::chain_reader in(c.chain.value().readable());
                vio::chain_writer out(c.chain.value().writable());
                while (in.remaining() > 0 && out.remaining() > 0) {
                    std::byte b[1];
                    (void)in.read(b);
                    b[0] = std::byte(std::toupper(static_cast<unsigned char>(b[0])));
                    (void)out.write(b);
                }
                written = static_cast<std::uint32_t>(out.written());
                ++served_;
            }
            (void)vio::complete_chain(queue_, c.head, written);
        });
    }
    vio::queue_service service_;
    vio::queue_binding queue_;
    std::atomic<std::uint32_t> served_{0};
};
static_assert(vio::device_core<shout>);
static_assert(sm::bus_device<sm::bus_device_for<shout>>); // what basic_machine instantiates

int main() {
    // Guest RAM and an environment like the machine gives a device.
    alignas(4096) static std::byte ram[1 << 16];
    auto memory = sm::guest_memory::view(0, ram);
    boost::asio::io_context io;
    const int irq = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    sm::device_environment env{
        memory,
        io.get_executor(),
        {0xd0000000, 0x1000, 5},
        [&](std::uint32_t) -> sm::result<sm::interrupt_line> { return sm::interrupt_line(irq); },
        {}}; // no ioeventfd: QueueNotify takes the slow path
    auto device = vio::mmio_transport<shout>::create(env, shout::config{}).value();

    auto reg = [&](std::uint32_t offset, std::uint32_t value) {
        device->write(0xd0000000 + offset, std::as_bytes(std::span(&value, 1)));
    };
    auto get = [&](std::uint32_t offset) {
        std::uint32_t v = 0;
        device->read(0xd0000000 + offset, std::as_writable_bytes(std::span(&v, 1)));
        return v;
    };
    // The driver's side: negotiate, set up queue 0 at 0x1000/0x2000/0x3000.
    namespace r = vio::mmio_register;
    reg(r::device_status, 1 | 2);
    reg(r::driver_features_select, 1);
    reg(r::driver_features, 1); // VIRTIO_F_VERSION_1
    reg(r::device_status, 1 | 2 | 8);
    reg(r::queue_select, 0);
    reg(r::queue_num, 8);
    reg(r::queue_descriptor_low, 0x1000);
    reg(r::queue_driver_low, 0x2000);
    reg(r::queue_device_low, 0x3000);
    reg(r::queue_ready, 1);
    reg(r::device_status, 1 | 2 | 8 | 4);

    const char text[] = "hello, virtio";
    std::memcpy(ram + 0x8000, text, sizeof text);
    memory.write_object(0x1000, vio::raw_descriptor{0x8000, sizeof text, 1, 1}).value();
    memory.write_object(0x1010, vio::raw_descriptor{0x9000, sizeof text, 2, 0}).value();
    memory.write_object<std::uint16_t>(0x2004, 0).value(); // avail ring[0] = head 0
    memory.write_object<std::uint16_t>(0x2002, 1).value(); // avail idx = 1
    reg(r::queue_notify, 0);

    while (memory.read_object<std::uint16_t>(0x3002).value() == 0)
        io.run_one();
    std::printf("device answered: %s (requests served: %u, interrupt status: %u)\n",
                reinterpret_cast<const char*>(ram + 0x9000), get(r::config),
                get(r::interrupt_status));
    ::close(irq);
    return 0;
}
