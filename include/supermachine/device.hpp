#pragma once
// What a device is, to basic_machine<Backend, Devices...>.
//
// A device set is a type list. Each type in it is either a *bus device*
// (claims port-I/O or MMIO ranges and answers accesses synchronously on the
// vCPU thread that trapped them), or a device core that a transport adapts
// into one: bus_adapter<D>::type is what the machine instantiates, and the
// virtio layer specializes it so that virtio::blk<...> is served through
// virtio::mmio_transport<virtio::blk<...>>. Nothing here is virtual; the
// machine dispatches over a std::tuple at compile time.
//
// A bus device type D provides:
//   using config = ...;                                   // default-constructible
//   static constexpr device_requirements requirements{};  // what the machine must allocate
//   static result<std::unique_ptr<D>> create(device_environment& env, const config& cfg);
//   std::span<const address_range> ranges() const;       // stable after create()
//   void read(std::uint64_t address, std::span<std::byte> data);         // data.size() in {1,2,4,8}
//   void write(std::uint64_t address, std::span<const std::byte> data);
// and may provide (detected with requires-expressions):
//   void stop();                 // machine is stopping: cancel async work
//   std::string kernel_cmdline() const;  // fragment appended to the kernel cmdline
#include <supermachine/error.hpp>
#include <supermachine/memory.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <unistd.h>

namespace supermachine {

enum class address_space : std::uint8_t { port_io, mmio };

struct address_range {
    address_space space = address_space::port_io;
    std::uint64_t base = 0;
    std::uint64_t size = 0;

    constexpr bool contains(address_space s, std::uint64_t address, std::uint64_t length) const noexcept {
        return s == space && address >= base && length <= size && address - base <= size - length;
    }
};

/// What a device asks the machine to allocate for it.
struct device_requirements {
    bool mmio_window = false; // one virtio-mmio-sized window (x86_layout::virtio_mmio_window)
    bool interrupt = false;   // one GSI from the device pool (x86_layout::first_device_gsi..)
};

/// What the machine allocated.
struct device_resources {
    std::uint64_t mmio_base = 0;
    std::uint64_t mmio_size = 0;
    std::uint32_t gsi = 0;
};

/// An edge-triggered interrupt into the guest: an irqfd on KVM, a vhost-user
/// call fd on the vhost-user transport. Writing the eventfd raises it.
class interrupt_line {
public:
    interrupt_line() = default;
    explicit interrupt_line(int eventfd) noexcept : fd_(eventfd) {}
    void trigger() const noexcept {
        if (fd_ < 0) return;
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(fd_, &one, sizeof one);
    }
    int native_handle() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }

private:
    int fd_ = -1; // not owned: the backend owns the eventfd for the machine's lifetime
};

/// Everything a device gets from the machine at creation.
struct device_environment {
    const guest_memory& memory;
    boost::asio::any_io_executor executor; // the device's async work runs here
    device_resources resources;
    /// An interrupt line for `gsi` (irqfd). Owned by the backend.
    std::function<result<interrupt_line>(std::uint32_t gsi)> make_interrupt_line;
    /// A doorbell: an eventfd that becomes readable when the guest writes
    /// `value` (or anything, if nullopt) with `length` bytes at MMIO `address`
    /// (ioeventfd). Owned by the backend; the device waits on it with Asio.
    std::function<result<int>(std::uint64_t address, std::uint32_t length,
                              std::optional<std::uint64_t> value)>
        make_doorbell;
};

template <class D>
concept bus_device = requires(D& d, const D& cd, std::uint64_t address, std::span<std::byte> out,
                              std::span<const std::byte> in, device_environment& env,
                              const typename D::config& cfg) {
    { D::requirements } -> std::convertible_to<device_requirements>;
    { D::create(env, cfg) } -> std::same_as<result<std::unique_ptr<D>>>;
    { cd.ranges() } -> std::convertible_to<std::span<const address_range>>;
    d.read(address, out);
    d.write(address, in);
};

/// The type the machine instantiates for device type D. Transports
/// specialize this (virtio/mmio_transport.hpp) to adapt device cores.
template <class D>
struct bus_adapter {
    using type = D;
};

template <class D>
using bus_device_for = typename bus_adapter<D>::type;

} // namespace supermachine
