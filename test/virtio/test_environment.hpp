#pragma once
// A device_environment without KVM: interrupt lines and doorbells are plain
// eventfds this fixture owns, the executor an io_context the test runs.
#include <supermachine/device.hpp>
#include <supermachine/virtio/mmio_transport.hpp>

#include <boost/asio/io_context.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <vector>

namespace supermachine::test {

class test_environment {
public:
    static constexpr std::uint64_t mmio_base = 0xd000'0000;

    explicit test_environment(const guest_memory& memory, bool doorbells = true)
        : env{memory, io.get_executor(), {mmio_base, 0x1000, 5}, {}, {}} {
        env.make_interrupt_line = [this](std::uint32_t) -> result<interrupt_line> {
            irq_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            fds.push_back(irq_fd);
            return interrupt_line(irq_fd);
        };
        if (doorbells)
            env.make_doorbell = [this](std::uint64_t, std::uint32_t,
                                       std::optional<std::uint64_t>) -> result<int> {
                const int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
                fds.push_back(fd);
                doorbell_fds.push_back(fd);
                return fd;
            };
    }
    ~test_environment() {
        for (int fd : fds)
            ::close(fd);
    }

    /// Interrupts raised since the last call (reads the irqfd counter).
    std::uint64_t take_interrupts() {
        std::uint64_t n = 0;
        if (::read(irq_fd, &n, sizeof n) != sizeof n) return 0;
        return n;
    }
    /// What the ioeventfd would do on a guest QueueNotify write.
    void ring_doorbell(std::size_t queue) {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(doorbell_fds.at(queue), &one, sizeof one);
    }
    /// Run the executor until `done()` or a time limit.
    bool run_until(const std::function<bool()>& done,
                   std::chrono::milliseconds limit = std::chrono::seconds(10)) {
        const auto end = std::chrono::steady_clock::now() + limit;
        while (!done()) {
            if (std::chrono::steady_clock::now() > end) return false;
            io.restart();
            io.run_for(std::chrono::milliseconds(5));
        }
        return true;
    }

    boost::asio::io_context io;
    device_environment env;
    int irq_fd = -1;
    std::vector<int> fds, doorbell_fds;
};

/// Register access helpers for a virtio-mmio transport, as a driver does.
template <class Transport>
struct mmio_access {
    Transport& t;
    std::uint32_t read32(std::uint32_t offset) {
        std::uint32_t v = 0;
        t.read(test_environment::mmio_base + offset, std::as_writable_bytes(std::span(&v, 1)));
        return v;
    }
    void write32(std::uint32_t offset, std::uint32_t v) {
        t.write(test_environment::mmio_base + offset, std::as_bytes(std::span(&v, 1)));
    }
    /// The Linux virtio_mmio probe + setup sequence for queue 0..n-1.
    bool bring_up(std::uint64_t features, const std::vector<virtio::queue_layout>& queues) {
        using namespace virtio::mmio_register;
        namespace st = virtio::status;
        write32(device_status, 0);
        write32(device_status, st::acknowledge);
        write32(device_status, st::acknowledge | st::driver);
        write32(driver_features_select, 0);
        write32(driver_features, static_cast<std::uint32_t>(features));
        write32(driver_features_select, 1);
        write32(driver_features, static_cast<std::uint32_t>(features >> 32));
        write32(device_status, st::acknowledge | st::driver | st::features_ok);
        if (!(read32(device_status) & st::features_ok)) return false;
        for (std::uint32_t i = 0; i < queues.size(); ++i) {
            write32(queue_select, i);
            write32(queue_num, queues[i].size);
            write32(queue_descriptor_low, static_cast<std::uint32_t>(queues[i].descriptor_table));
            write32(queue_descriptor_high,
                    static_cast<std::uint32_t>(queues[i].descriptor_table >> 32));
            write32(queue_driver_low, static_cast<std::uint32_t>(queues[i].available_ring));
            write32(queue_driver_high, static_cast<std::uint32_t>(queues[i].available_ring >> 32));
            write32(queue_device_low, static_cast<std::uint32_t>(queues[i].used_ring));
            write32(queue_device_high, static_cast<std::uint32_t>(queues[i].used_ring >> 32));
            write32(queue_ready, 1);
            if (read32(queue_ready) != 1) return false;
        }
        write32(device_status, st::acknowledge | st::driver | st::features_ok | st::driver_ok);
        return (read32(device_status) & st::driver_ok) != 0;
    }
};

} // namespace supermachine::test
