#pragma once
// A 16550A UART on COM1 (platform.hpp): enough of the chip for Linux's 8250
// driver and for polling guests. Guest output goes to a sink the caller
// chooses; host input is queued and delivered through RBR with the
// "data ready" status and interrupt. Transmission is instantaneous, so THR
// is always empty and the THRE interrupt fires as soon as it is enabled or a
// byte is written.
//
// Interrupts go out on an interrupt_line (irqfd: an edge on IOAPIC pin 4,
// the ISA wiring Linux assumes for COM1) each time a new cause arises.
//
// Optionally watches the output for Linux's "Kernel panic - not syncing"
// and reports exit_request::panic (see exit_request.hpp).
#include <supermachine/device.hpp>
#include <supermachine/devices/exit_request.hpp>
#include <supermachine/platform.hpp>
#include <supermachine/snapshot/records.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>

namespace supermachine::devices {

class serial {
public:
    struct config {
        /// Receives guest output as it is written (on a vCPU thread). Empty: discarded.
        std::function<void(std::string_view)> sink;
        /// Report exit_request::panic when the guest prints Linux's panic banner.
        bool detect_linux_panic = true;
        /// Host input beyond this many queued bytes is refused (send_input returns less).
        std::size_t input_limit = 64 * 1024;
    };

    static constexpr device_requirements
        requirements{}; // fixed port and ISA IRQ, nothing allocated

    static result<std::unique_ptr<serial>> create(device_environment& env, const config& cfg) {
        std::unique_ptr<serial> self(new serial(cfg));
        if (env.make_interrupt_line) {
            SUPERMACHINE_TRY(line, env.make_interrupt_line(platform::com1_gsi));
            self->interrupt_ = line;
        }
        return self;
    }

    /// For tests and other transports: a UART with the given interrupt line.
    static std::unique_ptr<serial> create_with(interrupt_line line, const config& cfg) {
        std::unique_ptr<serial> self(new serial(cfg));
        self->interrupt_ = line;
        return self;
    }

    std::span<const address_range> ranges() const noexcept { return ranges_; }

    void set_exit_handler(exit_request_handler handler) {
        std::lock_guard lock(mutex_);
        on_exit_ = std::move(handler);
    }

    /// Queue host input for the guest. Thread-safe. Returns how many bytes were accepted.
    std::size_t send_input(std::string_view text) {
        bool raise = false;
        std::size_t accepted = 0;
        {
            std::lock_guard lock(mutex_);
            const bool was_empty = input_.empty();
            for (char c : text) {
                if (input_.size() >= input_limit_) break;
                input_.push_back(static_cast<std::uint8_t>(c));
                ++accepted;
            }
            raise = was_empty && accepted > 0 && (ier_ & ier_receive);
        }
        if (raise) interrupt_.trigger();
        return accepted;
    }

    std::size_t pending_input() const {
        std::lock_guard lock(mutex_);
        return input_.size();
    }

    /// The registers and queued host input, for a snapshot (take it while
    /// the vCPUs are paused). At most snapshot::max_uart_fifo_bytes of queued
    /// input are kept; the rest (host input the guest never read) is dropped.
    snapshot::uart_record save_state() const {
        std::lock_guard lock(mutex_);
        snapshot::uart_record r;
        r.divisor_latch_low = static_cast<std::uint8_t>(divisor_);
        r.divisor_latch_high = static_cast<std::uint8_t>(divisor_ >> 8);
        r.interrupt_enable = ier_;
        r.interrupt_identification = fifo_enabled_ ? iir_fifo_enabled : 0; // informational
        r.fifo_control = fifo_enabled_ ? 1 : 0;
        r.line_control = lcr_;
        r.modem_control = mcr_;
        r.line_status = lsr_thr_empty | lsr_idle | (input_.empty() ? 0 : lsr_data_ready);
        r.modem_status = modem_status_value();
        r.scratch = scr_;
        r.transmit_interrupt_pending = thre_pending_;
        const std::size_t kept =
            std::min<std::size_t>(input_.size(), snapshot::max_uart_fifo_bytes);
        r.receive_fifo.reserve(kept);
        for (std::size_t i = 0; i < kept; ++i)
            r.receive_fifo.push_back(std::byte{input_[i]});
        return r;
    }

    /// Load save_state() output (hostile: values a guest could not have
    /// written are snapshot_bad_record). Raises no interrupt: an edge that
    /// was pending is part of the interrupt controller's saved state.
    result<void> restore_state(const snapshot::uart_record& r) {
        if ((r.interrupt_enable & ~0x0fu) || (r.modem_control & ~0x1fu) || r.fifo_control > 1 ||
            r.receive_fifo.size() > snapshot::max_uart_fifo_bytes)
            return errc::snapshot_bad_record;
        std::lock_guard lock(mutex_);
        divisor_ = static_cast<std::uint16_t>(r.divisor_latch_low | (r.divisor_latch_high << 8));
        ier_ = r.interrupt_enable;
        fifo_enabled_ = r.fifo_control != 0;
        lcr_ = r.line_control;
        mcr_ = r.modem_control;
        scr_ = r.scratch;
        thre_pending_ = r.transmit_interrupt_pending;
        input_.clear();
        for (std::byte b : r.receive_fifo)
            if (input_.size() < input_limit_) input_.push_back(std::to_integer<std::uint8_t>(b));
        panic_matched_ = 0;
        return success();
    }

    void read(std::uint64_t address, std::span<std::byte> data) {
        for (auto& b : data)
            b = std::byte{0};
        if (data.empty()) return;
        std::lock_guard lock(mutex_);
        data[0] = std::byte{read_register(static_cast<unsigned>(address - platform::com1_port))};
    }

    void write(std::uint64_t address, std::span<const std::byte> data) {
        if (data.empty()) return;
        std::string_view out;
        char byte = 0;
        bool raise = false;
        exit_request_handler panic_handler;
        {
            std::lock_guard lock(mutex_);
            raise = write_register(static_cast<unsigned>(address - platform::com1_port),
                                   std::to_integer<std::uint8_t>(data[0]), byte, out);
            if (!out.empty() && detect_panic_ && match_panic(byte) && on_exit_)
                panic_handler = on_exit_;
        }
        if (!out.empty() && sink_) sink_(out);
        if (raise) interrupt_.trigger();
        if (panic_handler) panic_handler(exit_request::panic);
    }

private:
    // Register offsets from the base port.
    static constexpr unsigned data = 0, interrupt_enable = 1, interrupt_identification = 2,
                              line_control = 3, modem_control = 4, line_status = 5,
                              modem_status = 6, scratch = 7;
    static constexpr std::uint8_t ier_receive = 0x01, ier_transmit_empty = 0x02;
    static constexpr std::uint8_t iir_none = 0x01, iir_transmit_empty = 0x02, iir_receive = 0x04,
                                  iir_fifo_enabled = 0xc0;
    static constexpr std::uint8_t lcr_dlab = 0x80;
    static constexpr std::uint8_t mcr_loopback = 0x10;
    static constexpr std::uint8_t lsr_data_ready = 0x01, lsr_thr_empty = 0x20, lsr_idle = 0x40;

    explicit serial(const config& cfg)
        : sink_(cfg.sink)
        , detect_panic_(cfg.detect_linux_panic)
        , input_limit_(cfg.input_limit) {}

    std::uint8_t read_register(unsigned offset) {
        switch (offset) {
        case data:
            if (lcr_ & lcr_dlab) return static_cast<std::uint8_t>(divisor_);
            if (input_.empty()) return 0;
            {
                const std::uint8_t c = input_.front();
                input_.pop_front();
                return c;
            }
        case interrupt_enable:
            if (lcr_ & lcr_dlab) return static_cast<std::uint8_t>(divisor_ >> 8);
            return ier_;
        case interrupt_identification: {
            const std::uint8_t fifo = fifo_enabled_ ? iir_fifo_enabled : 0;
            if ((ier_ & ier_receive) && !input_.empty()) return fifo | iir_receive;
            if ((ier_ & ier_transmit_empty) && thre_pending_) {
                thre_pending_ = false; // reading IIR acknowledges the THRE cause
                return fifo | iir_transmit_empty;
            }
            return fifo | iir_none;
        }
        case line_control:
            return lcr_;
        case modem_control:
            return mcr_;
        case line_status:
            return lsr_thr_empty | lsr_idle | (input_.empty() ? 0 : lsr_data_ready);
        case modem_status:
            return modem_status_value();
        case scratch:
            return scr_;
        }
        return 0;
    }

    std::uint8_t modem_status_value() const {
        if (mcr_ & mcr_loopback) {
            // Loopback wiring: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (Linux probes this).
            std::uint8_t msr = 0;
            if (mcr_ & 0x01) msr |= 0x20;
            if (mcr_ & 0x02) msr |= 0x10;
            if (mcr_ & 0x04) msr |= 0x40;
            if (mcr_ & 0x08) msr |= 0x80;
            return msr;
        }
        return 0xb0; // DCD, DSR, CTS: a cable with the other end ready
    }

    // Returns whether to raise the interrupt; sets `out` for a byte sent to the host.
    bool write_register(unsigned offset, std::uint8_t value, char& byte, std::string_view& out) {
        switch (offset) {
        case data:
            if (lcr_ & lcr_dlab) {
                divisor_ = static_cast<std::uint16_t>((divisor_ & 0xff00) | value);
                return false;
            }
            if (mcr_ & mcr_loopback) {
                if (input_.size() < input_limit_) input_.push_back(value);
                return (ier_ & ier_receive) != 0;
            }
            byte = static_cast<char>(value);
            out = std::string_view(&byte, 1);
            thre_pending_ = true;
            return (ier_ & ier_transmit_empty) != 0;
        case interrupt_enable: {
            if (lcr_ & lcr_dlab) {
                divisor_ = static_cast<std::uint16_t>((divisor_ & 0x00ff) | (value << 8));
                return false;
            }
            const std::uint8_t enabled = value & 0x0f & ~ier_;
            ier_ = value & 0x0f;
            if (enabled & ier_transmit_empty) thre_pending_ = true; // THR is empty right now
            return (enabled & ier_transmit_empty) || ((enabled & ier_receive) && !input_.empty());
        }
        case interrupt_identification:
            fifo_enabled_ = (value & 0x01) != 0;
            return false; // FCR
        case line_control:
            lcr_ = value;
            return false;
        case modem_control:
            mcr_ = value & 0x1f;
            return false;
        case scratch:
            scr_ = value;
            return false;
        default:
            return false; // LSR and MSR are read-only
        }
    }

    bool match_panic(char c) {
        static constexpr std::string_view banner = "Kernel panic - not syncing";
        if (c == banner[panic_matched_])
            ++panic_matched_;
        else
            panic_matched_ = c == banner[0] ? 1 : 0;
        if (panic_matched_ == banner.size()) {
            panic_matched_ = 0;
            return true;
        }
        return false;
    }

    static constexpr std::array<address_range, 1> ranges_{
        address_range{address_space::port_io, platform::com1_port, platform::com1_port_count}};

    std::function<void(std::string_view)> sink_;
    bool detect_panic_;
    std::size_t input_limit_;
    interrupt_line interrupt_;
    exit_request_handler on_exit_;
    mutable std::mutex mutex_;
    std::deque<std::uint8_t> input_;
    std::uint16_t divisor_ = 12; // 9600 baud, as firmware leaves it
    std::uint8_t ier_ = 0, lcr_ = 0x03, mcr_ = 0x08, scr_ = 0;
    bool thre_pending_ = false, fifo_enabled_ = false;
    std::size_t panic_matched_ = 0;
};

static_assert(bus_device<serial>);

} // namespace supermachine::devices
