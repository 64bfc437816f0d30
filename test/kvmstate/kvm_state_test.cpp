// KVM state capture/restore on the real /dev/kvm: a hand-placed guest counts
// in a register, in memory and on a port (XMM0 holds a marker); we stop it,
// capture, restore RAM and state into a second VM, and check the count goes
// on from exactly where it was.
#include "hand_guest.hpp"
#include "sample_state.hpp"

#include <skip.hpp>
#include <supermachine/backend/kvm.hpp>
#include <supermachine/backend/kvm_state.hpp>
#include <supermachine/snapshot/file_store.hpp>

#include <boost/test/unit_test.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <unistd.h>

using namespace supermachine;
namespace ks = supermachine::backend::kvm_state;
using supermachine::backend::vcpu_exit;

namespace {

constexpr std::uint64_t ram_bytes = 32u << 20;
constexpr std::uint64_t counter_address = 0x300000;
constexpr std::uint16_t count_port = 0x510;

void require_kvm() {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) test::skip("no usable /dev/kvm on this host");
}

// Forever: rbx += 1; [counter] += 1; out count_port, ebx. (No x87/SSE:
// kvm_pvm fails to emulate every FPU instruction of these guests, so the
// FPU state is set and checked from the host instead; see set_xmm0.)
std::vector<std::uint8_t> counting_guest() {
    return {
        0x66, 0xba, 0x10, 0x05, // mov dx, 0x510
        // loop:
        0x48, 0xff, 0xc3,                               // inc rbx
        0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, // inc qword [0x300000]
        0x89, 0xd8,                                     // mov eax, ebx
        0xef,                                           // out dx, eax
        0xeb, 0xf0,                                     // jmp loop (-16)
    };
}

constexpr std::uint64_t xmm0_marker = 0x5eed'0000'1234'5678;

// Put `value` in the low half of XMM0 through KVM (XSAVE area or legacy FPU).
void set_xmm0(int vcpu_fd, std::uint64_t value) {
    backend::detail::xsave_legacy_area area{};
    if (::ioctl(vcpu_fd, backend::detail::ioctl_get_xsave, &area) == 0) {
        auto* bytes = reinterpret_cast<std::uint8_t*>(&area);
        std::memcpy(bytes + 160, &value, 8);
        bytes[512] |= 2; // XSTATE_BV: SSE state present, else XRSTOR loads its init state
        BOOST_REQUIRE(::ioctl(vcpu_fd, backend::detail::ioctl_set_xsave, &area) == 0);
        return;
    }
    kvm_fpu fpu{};
    BOOST_REQUIRE(::ioctl(vcpu_fd, KVM_GET_FPU, &fpu) == 0);
    std::memcpy(fpu.xmm[0], &value, 8);
    BOOST_REQUIRE(::ioctl(vcpu_fd, KVM_SET_FPU, &fpu) == 0);
}

// Records the port writes; kicks its own vCPU once the count reaches `stop_at`.
struct counter_handler {
    backend::kvm* vm = nullptr;
    std::uint32_t stop_at = 0;
    std::vector<std::uint32_t> seen;
    bool other_access = false;
    void operator()(address_space space, std::uint64_t address, std::span<std::byte> data,
                    bool is_write) {
        if (space == address_space::port_io && address == count_port && is_write &&
            data.size() == 4) {
            std::uint32_t value;
            std::memcpy(&value, data.data(), 4);
            seen.push_back(value);
            if (value >= stop_at) vm->kick(0); // KVM_RUN completes this OUT, then returns EINTR
            return;
        }
        other_access = true;
        for (auto& b : data)
            b = std::byte{0xff};
    }
};

struct counting_vm {
    guest_memory memory;
    std::unique_ptr<backend::kvm> vm;
};

counting_vm start_counting_vm(std::uint32_t vcpus = 1) {
    require_kvm();
    counting_vm c{value_or_throw(guest_memory::allocate_x86(ram_bytes)), nullptr};
    c.vm = value_or_throw(backend::kvm::create(c.memory, {.vcpus = vcpus}));
    auto entry = test::place_flat_guest(c.memory, counting_guest());
    value_or_throw(c.vm->set_entry_state(0, entry));
    set_xmm0(c.vm->vcpu_fd(0), xmm0_marker);
    return c;
}

// Run vCPU 0 until the guest has written `stop_at`; a watchdog kicks it
// should it never get there.
std::vector<std::uint32_t> run_until(backend::kvm& vm, std::uint32_t stop_at) {
    counter_handler h{&vm, stop_at, {}, false};
    std::atomic<bool> done{false};
    std::thread watchdog([&] {
        for (int i = 0; i < 600 && !done; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        if (!done) vm.kick(0);
    });
    auto exit = vm.run_vcpu(0, h);
    done = true;
    watchdog.join();
    BOOST_TEST(static_cast<int>(exit.what) == static_cast<int>(vcpu_exit::kind::interrupted),
               "exit " << static_cast<int>(exit.what) << " at rip " << std::hex << exit.rip
                       << " byte " << std::to_integer<int>(exit.instruction[0]) << " "
                       << std::to_integer<int>(exit.instruction[1]) << " after " << std::dec
                       << h.seen.size() << " writes");
    BOOST_TEST(!h.other_access);
    return h.seen;
}

std::uint64_t xmm0_low(const ks::vcpu_state& s) {
    std::uint64_t v = 0;
    if (!s.xsave.empty())
        std::memcpy(&v, s.xsave.data() + 160, 8); // XMM0 in the legacy XSAVE area
    else if (s.fpu)
        std::memcpy(&v, s.fpu->xmm[0], 8);
    return v;
}

std::uint64_t read_counter(const guest_memory& memory) {
    return value_or_throw(memory.read_object<std::uint64_t>(counter_address));
}

// Report (never silently drop) what this host did not give us.
void note_absent_parts(const ks::vcpu_state& s) {
    if (s.xsave.empty()) std::printf("NOTE: KVM has no XSAVE here; saved the legacy FPU state\n");
    if (!s.xcrs) std::printf("NOTE: KVM has no XCRs here\n");
    if (!s.events) std::printf("NOTE: KVM has no vCPU events here\n");
    if (!s.debug_registers) std::printf("NOTE: KVM has no debug registers here\n");
    if (s.tsc_khz == 0) std::printf("NOTE: KVM did not report the TSC frequency\n");
    if (s.cpuid.empty()) std::printf("NOTE: the vCPU has no CPUID set (host default)\n");
    std::printf("NOTE: captured %zu MSRs, XSAVE %zu bytes, %zu CPUID entries, TSC %u kHz\n",
                s.msrs.size(), s.xsave.size(), s.cpuid.size(), s.tsc_khz);
    for (auto index : s.msrs_refused)
        std::printf("NOTE: MSR %#x is listed by KVM but KVM_GET_MSRS refused it\n", index);
}

ks::vcpu_state capture(backend::kvm& vm, std::uint32_t index = 0) {
    static const auto indexes = value_or_throw(ks::msr_index_list());
    return value_or_throw(ks::capture_vcpu(vm.vm_fd(), vm.vcpu_fd(index), indexes));
}

// Through the blob, as a snapshot would carry it.
ks::vcpu_state through_blob(const ks::vcpu_state& s) {
    auto blob = value_or_throw(ks::encode_vcpu_state(s));
    return value_or_throw(ks::decode_vcpu_state(blob));
}

ks::vm_state through_blob(const ks::vm_state& s) {
    auto blob = value_or_throw(ks::encode_vm_state(s));
    return value_or_throw(ks::decode_vm_state(blob));
}

// What legitimately changes between two captures of the same stopped vCPU:
// the TSC (it runs), and the LAPIC timer's current count (read live).
ks::vcpu_state without_time(ks::vcpu_state s) {
    for (auto& m : s.msrs)
        if (m.index == backend::detail::msr::tsc) m.value = 0;
    std::memset(s.lapic.regs + backend::detail::lapic_register::timer_current_count, 0, 4);
    return s;
}

ks::vm_state without_time(ks::vm_state s) {
    s.clock = {};
    s.captured_at_realtime_ns = 0;
    if (s.pit)
        for (auto& channel : s.pit->channels)
            channel.count_load_time = 0;
    return s;
}

struct restored_vm {
    guest_memory memory;
    std::unique_ptr<backend::kvm> vm;
};

// On the heap: the backend keeps a pointer to its guest_memory.
std::unique_ptr<restored_vm> restore_into_new_vm(guest_memory memory, const ks::vm_state& vm_state,
                                                 const std::vector<ks::vcpu_state>& vcpus) {
    auto owner = std::make_unique<restored_vm>(restored_vm{std::move(memory), nullptr});
    auto& r = *owner;
    r.vm = value_or_throw(
        backend::kvm::create(r.memory, {.vcpus = static_cast<std::uint32_t>(vcpus.size())}));
    value_or_throw(ks::restore_vm(r.vm->vm_fd(), vm_state), "restore_vm");
    for (std::uint32_t i = 0; i < vcpus.size(); ++i)
        value_or_throw(ks::restore_vcpu(r.vm->vm_fd(), r.vm->vcpu_fd(i), vcpus[i]), "restore_vcpu");
    return owner;
}

guest_memory copy_of(const guest_memory& from) {
    auto to = value_or_throw(guest_memory::allocate_x86(from.size()));
    std::memcpy(to.host_mapping().data(), from.host_mapping().data(), from.size());
    return to;
}

void check_count_continues(const std::vector<std::uint32_t>& seen, std::uint32_t from,
                           std::uint32_t to) {
    BOOST_REQUIRE(!seen.empty());
    BOOST_TEST(seen.front() == from + 1); // no repeat of the OUT before capture, no gap
    BOOST_TEST(seen.back() == to);
    BOOST_TEST(seen.size() == to - from);
    bool consecutive = true;
    for (std::size_t i = 1; i < seen.size(); ++i)
        consecutive = consecutive && seen[i] == seen[i - 1] + 1;
    BOOST_TEST(consecutive);
}

} // namespace

BOOST_AUTO_TEST_CASE(the_count_continues_in_a_restored_vm_with_copied_ram) {
    auto first = start_counting_vm();
    auto seen = run_until(*first.vm, 1000);
    BOOST_REQUIRE(!seen.empty());
    BOOST_TEST(seen.front() == 1u);
    BOOST_TEST(seen.back() == 1000u);

    auto vm_state = value_or_throw(ks::capture_vm(first.vm->vm_fd()));
    auto state = capture(*first.vm);
    note_absent_parts(state);
    BOOST_TEST(state.regs.rbx == 1000u);
    BOOST_TEST(xmm0_low(state) == xmm0_marker);
    BOOST_TEST(read_counter(first.memory) == 1000u);
    BOOST_TEST(state.mp_state.mp_state == static_cast<std::uint32_t>(KVM_MP_STATE_RUNNABLE));
    BOOST_TEST(state.msr(backend::detail::msr::tsc).has_value());

    auto second =
        restore_into_new_vm(copy_of(first.memory), through_blob(vm_state), {through_blob(state)});
    auto more = run_until(*second->vm, 1500);
    check_count_continues(more, 1000, 1500);
    auto after = capture(*second->vm);
    BOOST_TEST(after.regs.rbx == 1500u);
    BOOST_TEST(xmm0_low(after) == xmm0_marker); // FPU state came across
    BOOST_TEST(read_counter(second->memory) == 1500u);
    BOOST_TEST(read_counter(first.memory) == 1000u); // a copy: the original is untouched
}

BOOST_AUTO_TEST_CASE(two_private_restores_from_one_memory_image_count_on_independently) {
    auto first = start_counting_vm();
    (void)run_until(*first.vm, 300);
    const auto vm_state = through_blob(value_or_throw(ks::capture_vm(first.vm->vm_fd())));
    const auto state = through_blob(capture(*first.vm));
    BOOST_REQUIRE(first.memory.backing_fd() >= 0);

    // MAP_PRIVATE views of the first VM's RAM: what a snapshot restore maps.
    auto a = restore_into_new_vm(
        value_or_throw(guest_memory::map_private_x86(first.memory.backing_fd(), 0, ram_bytes)),
        vm_state, {state});
    auto b = restore_into_new_vm(
        value_or_throw(guest_memory::map_private_x86(first.memory.backing_fd(), 0, ram_bytes)),
        vm_state, {state});
    check_count_continues(run_until(*a->vm, 700), 300, 700);
    check_count_continues(run_until(*b->vm, 400), 300, 400);
    BOOST_TEST(read_counter(a->memory) == 700u);
    BOOST_TEST(read_counter(b->memory) == 400u);
    BOOST_TEST(read_counter(first.memory) == 300u);
    // And the original goes on too.
    check_count_continues(run_until(*first.vm, 350), 300, 350);
}

BOOST_AUTO_TEST_CASE(capture_restore_capture_gives_the_same_blob_modulo_time) {
    auto first = start_counting_vm(2); // vCPU 1 never started: waits for INIT/SIPI
    (void)run_until(*first.vm, 200);
    const auto vm_state = value_or_throw(ks::capture_vm(first.vm->vm_fd()));
    std::vector<ks::vcpu_state> states{capture(*first.vm, 0), capture(*first.vm, 1)};
    BOOST_TEST(states[1].mp_state.mp_state != static_cast<std::uint32_t>(KVM_MP_STATE_RUNNABLE));

    auto second = restore_into_new_vm(copy_of(first.memory), vm_state, states);
    for (std::uint32_t i = 0; i < 2; ++i) {
        auto again = capture(*second->vm, i);
        auto a = value_or_throw(ks::encode_vcpu_state(without_time(states[i])));
        auto b = value_or_throw(ks::encode_vcpu_state(without_time(again)));
        BOOST_TEST(a.size() == b.size());
        if (a != b) {
            // Name what differs, to make a failure actionable.
            const auto& x = states[i];
            BOOST_TEST(test::same_bytes(x.regs, again.regs));
            BOOST_TEST(test::same_bytes(x.sregs, again.sregs));
            BOOST_TEST((x.xsave == again.xsave));
            BOOST_TEST(test::same_bytes(without_time(x).lapic, without_time(again).lapic));
            BOOST_TEST(x.mp_state.mp_state == again.mp_state.mp_state);
            for (std::size_t m = 0; m < std::min(x.msrs.size(), again.msrs.size()); ++m)
                BOOST_TEST((without_time(x).msrs[m] == without_time(again).msrs[m]),
                           "MSR " << std::hex << x.msrs[m].index << " " << x.msrs[m].value << " vs "
                                  << again.msrs[m].value);
            if (x.events && again.events) BOOST_TEST(test::same_bytes(*x.events, *again.events));
        }
        BOOST_TEST((a == b), "vCPU " << i << " blob differs after restore");
        // The TSC went on from the saved value, not from zero.
        BOOST_TEST(again.msr(backend::detail::msr::tsc).value() >=
                   states[i].msr(backend::detail::msr::tsc).value());
    }
    auto vm_again = value_or_throw(ks::capture_vm(second->vm->vm_fd()));
    BOOST_TEST((value_or_throw(ks::encode_vm_state(without_time(vm_state))) ==
                value_or_throw(ks::encode_vm_state(without_time(vm_again)))));
}

BOOST_AUTO_TEST_CASE(the_guest_clock_moves_forward_by_the_time_away_or_not_at_all) {
    auto first = start_counting_vm();
    (void)run_until(*first.vm, 10);
    const auto saved = value_or_throw(ks::capture_vm(first.vm->vm_fd()));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));

    auto advanced = restore_into_new_vm(copy_of(first.memory), saved, {capture(*first.vm)});
    kvm_clock_data now{};
    BOOST_REQUIRE(::ioctl(advanced->vm->vm_fd(), KVM_GET_CLOCK, &now) == 0);
    BOOST_TEST(now.clock >= saved.clock.clock + 200'000'000u);
    BOOST_TEST(now.clock < saved.clock.clock + 60'000'000'000u);

    auto frozen_vm = value_or_throw(guest_memory::allocate_x86(ram_bytes));
    auto frozen = value_or_throw(backend::kvm::create(frozen_vm, {.vcpus = 1}));
    BOOST_REQUIRE(ks::restore_vm(frozen->vm_fd(), saved, ks::clock_policy::resume_at_capture));
    kvm_clock_data at{};
    BOOST_REQUIRE(::ioctl(frozen->vm_fd(), KVM_GET_CLOCK, &at) == 0);
    BOOST_TEST(at.clock >= saved.clock.clock);
    BOOST_TEST(at.clock < saved.clock.clock + 200'000'000u);
}

BOOST_AUTO_TEST_CASE(msr_list_and_partial_reads) {
    require_kvm();
    auto indexes = ks::msr_index_list();
    BOOST_REQUIRE(indexes);
    BOOST_TEST(!indexes.value().empty());
    BOOST_TEST(indexes.value().size() <= ks::max_msrs);
    auto c = start_counting_vm();
    // An index no CPU has, between two real ones: KVM stops at it, we skip
    // it and read the rest.
    std::vector<std::uint32_t> asked{0x10, 0x0badcafe, 0x174};
    std::vector<std::uint32_t> refused;
    auto values = ks::read_msrs(c.vm->vcpu_fd(0), asked, refused);
    BOOST_REQUIRE(values);
    BOOST_TEST(values.value().size() == 2u);
    BOOST_TEST(values.value()[0].index == 0x10u);
    BOOST_TEST(values.value()[1].index == 0x174u);
    BOOST_REQUIRE(refused.size() == 1u);
    BOOST_TEST(refused[0] == 0x0badcafeu);
    BOOST_TEST(!ks::msr_index_list("/nonexistent/kvm"));
}

BOOST_AUTO_TEST_CASE(hostile_or_mismatched_state_is_refused_cleanly) {
    auto c = start_counting_vm();
    (void)run_until(*c.vm, 5);
    auto state = capture(*c.vm);
    auto target = start_counting_vm();

    // An MSR KVM will not set: a clean error, not a partial success.
    auto bad_msr = state;
    bad_msr.msrs.push_back({0x0badcafe, 1});
    BOOST_TEST(!ks::restore_vcpu(target.vm->vm_fd(), target.vm->vcpu_fd(0), bad_msr));

    // XSAVE state beyond what this VM can hold.
    if (!state.xsave.empty()) {
        auto big = state;
        big.xsave.resize(ks::max_xsave_bytes, std::byte{1});
        BOOST_TEST(!ks::restore_vcpu(target.vm->vm_fd(), target.vm->vcpu_fd(0), big));
    }
    // Interrupt controllers in the wrong slots.
    auto vm_state = value_or_throw(ks::capture_vm(c.vm->vm_fd()));
    std::swap(vm_state.pic_master, vm_state.ioapic);
    BOOST_TEST(!ks::restore_vm(target.vm->vm_fd(), vm_state));

    // Every truncation of a real blob fails to decode.
    auto blob = value_or_throw(ks::encode_vcpu_state(state));
    for (std::size_t n = 0; n < blob.size(); ++n)
        BOOST_TEST_REQUIRE(!ks::decode_vcpu_state(std::span(blob).first(n)));
}

BOOST_AUTO_TEST_CASE(capture_and_restore_cost) {
    // Medians over 21 rounds; printed for doc/kvm-state.md, bounded loosely
    // so a pathological slowdown (e.g. one ioctl per MSR) fails.
    auto c = start_counting_vm();
    (void)run_until(*c.vm, 10);
    const auto indexes = value_or_throw(ks::msr_index_list());
    auto target = start_counting_vm();
    std::vector<double> capture_us, encode_us, restore_us, vm_us;
    using clock = std::chrono::steady_clock;
    auto micros = [](clock::duration d) {
        return std::chrono::duration<double, std::micro>(d).count();
    };
    for (int i = 0; i < 21; ++i) {
        auto t0 = clock::now();
        auto state = value_or_throw(ks::capture_vcpu(c.vm->vm_fd(), c.vm->vcpu_fd(0), indexes));
        auto t1 = clock::now();
        auto blob = value_or_throw(ks::encode_vcpu_state(state));
        auto decoded = value_or_throw(ks::decode_vcpu_state(blob));
        auto t2 = clock::now();
        value_or_throw(ks::restore_vcpu(target.vm->vm_fd(), target.vm->vcpu_fd(0), decoded));
        auto t3 = clock::now();
        auto vm_state = value_or_throw(ks::capture_vm(c.vm->vm_fd()));
        value_or_throw(ks::restore_vm(target.vm->vm_fd(), vm_state));
        auto t4 = clock::now();
        capture_us.push_back(micros(t1 - t0));
        encode_us.push_back(micros(t2 - t1));
        restore_us.push_back(micros(t3 - t2));
        vm_us.push_back(micros(t4 - t3));
    }
    auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
    };
    std::printf("NOTE: per vCPU: capture %.0f us, encode+decode %.0f us, restore %.0f us; "
                "VM capture+restore %.0f us (medians of 21)\n",
                median(capture_us), median(encode_us), median(restore_us), median(vm_us));
    BOOST_TEST(median(capture_us) < 20'000.0);
    BOOST_TEST(median(restore_us) < 20'000.0);
    // The restored target still runs the count from the captured point.
    check_count_continues(run_until(*target.vm, 20), 10, 20);
}

BOOST_AUTO_TEST_CASE(through_a_snapshot_file_and_back) {
    // The whole path below the machine: blobs into the container's records,
    // RAM written sparsely, the file mapped MAP_PRIVATE, state restored.
    auto first = start_counting_vm();
    (void)run_until(*first.vm, 400);
    snapshot::snapshot_records records;
    records.machine = {.vcpu_count = 1, .memory_size = ram_bytes, .kernel_identity = "hand"};
    auto kvm_part = value_or_throw(
        ks::capture_records(*first.vm, value_or_throw(ks::msr_index_list())), "capture_records");
    records.vcpus = std::move(kvm_part.vcpus);
    records.interrupt_controller = std::move(kvm_part.interrupt_controller);
    const auto directory =
        std::filesystem::temp_directory_path() / ("kvm_state_test." + std::to_string(::getpid()));
    std::filesystem::create_directories(directory);
    const auto path = directory / "snapshot";
    auto written = snapshot::write_snapshot(
        path, {records, first.memory.host_mapping(), first.memory.backing_fd(), 0});
    BOOST_REQUIRE(written);
    BOOST_TEST(written.value().ram_data_bytes < (1u << 20)); // a few touched pages, not 32 MiB

    auto loaded = snapshot::read_snapshot(path);
    BOOST_REQUIRE(loaded);
    auto& l = loaded.value();
    BOOST_REQUIRE(l.records.vcpus.size() == 1u);
    BOOST_REQUIRE(l.records.interrupt_controller.has_value());
    auto restored = std::make_unique<restored_vm>(restored_vm{std::move(l.memory), nullptr});
    restored->vm = value_or_throw(backend::kvm::create(restored->memory, {.vcpus = 1}));
    // A record set for another vCPU count is refused before anything is set.
    auto two = l.records.vcpus;
    two.push_back(two.front());
    BOOST_TEST(ks::restore_records(*restored->vm, two, *l.records.interrupt_controller).error() ==
               make_error_code(errc::snapshot_mismatch));
    value_or_throw(
        ks::restore_records(*restored->vm, l.records.vcpus, *l.records.interrupt_controller),
        "restore_records");
    check_count_continues(run_until(*restored->vm, 900), 400, 900);
    BOOST_TEST(read_counter(restored->memory) == 900u);
    std::filesystem::remove_all(directory);
}

namespace {

// A guest driven by the in-kernel LAPIC timer: periodic, vector 0x40, about
// 1 ms; the handler counts ticks in memory and EOIs; the main loop HLTs and
// writes the tick count to the port after each wake-up.
counting_vm start_timer_vm() {
    require_kvm();
    std::vector<std::uint8_t> code = {
        0xb9, 0x00, 0x00, 0xe0, 0xfe,                               // mov ecx, 0xfee00000
        0xc7, 0x81, 0xf0, 0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00, // SVR = 0x1ff (enabled)
        0xc7, 0x81, 0xe0, 0x03, 0x00, 0x00, 0x0b, 0x00, 0x00, 0x00, // divide by 1
        0xc7, 0x81, 0x20, 0x03, 0x00, 0x00, 0x40, 0x00, 0x02, 0x00, // LVT timer: periodic, 0x40
        0xc7, 0x81, 0x80, 0x03, 0x00, 0x00, 0x40, 0x42, 0x0f, 0x00, // initial count 1000000
        0x66, 0xba, 0x10, 0x05,                                     // mov dx, 0x510
        0xfb,                                                       // sti
        0xf4,                                                       // loop: hlt
        0x48, 0x8b, 0x04, 0x25, 0x08, 0x00, 0x30, 0x00,             // mov rax, [0x300008]
        0xef,                                                       // out dx, eax
        0xeb, 0xf4,                                                 // jmp loop
    };
    const std::vector<std::uint8_t> handler = {
        0x50,                                           // push rax
        0x48, 0xff, 0x04, 0x25, 0x08, 0x00, 0x30, 0x00, // inc qword [0x300008]
        0xb8, 0xb0, 0x00, 0xe0, 0xfe,                   // mov eax, 0xfee000b0 (EOI)
        0xc7, 0x00, 0x00, 0x00, 0x00, 0x00,             // mov dword [rax], 0
        0x58,                                           // pop rax
        0x48, 0xcf,                                     // iretq
    };
    code.resize(0x100, 0x90);
    code.insert(code.end(), handler.begin(), handler.end());
    counting_vm c{value_or_throw(guest_memory::allocate_x86(ram_bytes)), nullptr};
    c.vm = value_or_throw(backend::kvm::create(c.memory, {.vcpus = 1}));
    auto entry = test::place_flat_guest(c.memory, code);
    // Map the LAPIC page (2 MiB, uncached) and point vector 0x40 at the handler.
    constexpr std::uint64_t high_pd = 0xc000, idt = 0x2000;
    value_or_throw(c.memory.write_object<std::uint64_t>(x86_layout::pdpt + 3 * 8, high_pd | 3));
    value_or_throw(
        c.memory.write_object<std::uint64_t>(high_pd + 503 * 8, x86_layout::lapic | 0x93));
    const std::uint64_t h = test::state_test_code_address + 0x100;
    const std::uint64_t gate =
        (h & 0xffff) | (0x10ull << 16) | (0x8eull << 40) | (((h >> 16) & 0xffff) << 48);
    value_or_throw(c.memory.write_object<std::uint64_t>(idt + 0x40 * 16, gate));
    value_or_throw(c.memory.write_object<std::uint64_t>(idt + 0x40 * 16 + 8, h >> 32));
    entry.idt_base = idt;
    entry.idt_limit = 0xfff;
    value_or_throw(c.vm->set_entry_state(0, entry));
    return c;
}

} // namespace

BOOST_AUTO_TEST_CASE(lapic_timer_interrupts_go_on_after_restore) {
    auto first = start_timer_vm();
    auto seen = run_until(*first.vm, 30);
    BOOST_REQUIRE(!seen.empty());
    const std::uint32_t ticks = seen.back();
    BOOST_TEST(ticks >= 30u);
    const auto vm_state = through_blob(value_or_throw(ks::capture_vm(first.vm->vm_fd())));
    const auto state = through_blob(capture(*first.vm));
    const std::uint32_t lvt = backend::kvm_state::detail::lapic_u32(
        state.lapic, backend::detail::lapic_register::lvt_timer);
    BOOST_TEST(lvt == 0x20040u); // periodic, vector 0x40, unmasked: the guest's setting
    BOOST_TEST((state.regs.rflags & 0x200) != 0); // interrupts enabled

    auto second = restore_into_new_vm(copy_of(first.memory), vm_state, {state});
    auto more = run_until(*second->vm, ticks + 30);
    BOOST_REQUIRE(!more.empty());
    // Ticks go on from the saved count (a late wake-up may fold two ticks into one write).
    BOOST_TEST(more.front() > ticks);
    BOOST_TEST(more.front() <= ticks + 2);
    BOOST_TEST(more.back() >= ticks + 30);
    BOOST_TEST(std::is_sorted(more.begin(), more.end()));
    BOOST_TEST((std::adjacent_find(more.begin(), more.end()) == more.end()));
}
