#pragma once
// The port-I/O and MMIO bus: a std::tuple of bus devices, dispatched at
// compile time. An access goes to the first device whose ranges() contain it
// entirely; an access nobody claims reads as all-ones (an empty ISA bus) and
// its writes are dropped, so a probing guest never stops the machine.
#include <supermachine/device.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <tuple>
#include <utility>

namespace supermachine {

template <bus_device... Devices>
class device_bus {
public:
    device_bus() = default;
    template <class... Owned>
    requires(sizeof...(Owned) == sizeof...(Devices) &&
             sizeof...(Devices) > 0) explicit device_bus(Owned&&... devices)
        : devices_(std::forward<Owned>(devices)...) {}

    /// Serve one access; false when no device claimed it.
    bool access(address_space space, std::uint64_t address, std::span<std::byte> data,
                bool is_write) {
        const bool claimed = std::apply(
            [&](auto&... device) {
                return (try_device(device.get(), space, address, data, is_write) || ...);
            },
            devices_);
        if (!claimed && !is_write)
            for (auto& b : data)
                b = std::byte{0xff};
        return claimed;
    }

    /// The access-handler form the backend's run_vcpu takes.
    void operator()(address_space space, std::uint64_t address, std::span<std::byte> data,
                    bool is_write) {
        access(space, address, data, is_write);
    }

    template <class D>
    D& get() noexcept {
        return *std::get<std::unique_ptr<D>>(devices_);
    }
    template <std::size_t I>
    auto& get() noexcept {
        return *std::get<I>(devices_);
    }

    auto& devices() noexcept { return devices_; }
    const auto& devices() const noexcept { return devices_; }

private:
    template <class D>
    static bool try_device(D* device, address_space space, std::uint64_t address,
                           std::span<std::byte> data, bool is_write) {
        if (!device) return false;
        for (const address_range& range : device->ranges()) {
            if (!range.contains(space, address, data.size())) continue;
            if (is_write)
                device->write(address, std::span<const std::byte>(data.data(), data.size()));
            else
                device->read(address, data);
            return true;
        }
        return false;
    }

    std::tuple<std::unique_ptr<Devices>...> devices_;
};

} // namespace supermachine
