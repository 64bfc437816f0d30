// Snapshots of a running basic_machine on /dev/kvm with the conformance guest
// counting: capture mid-run, restore, the count goes on from where it was;
// two restores from one file are private; a 2 GiB guest that touched 8 MiB
// writes and reads ~8 MiB; bad files and other machines are clean errors.
#include "count_guest.hpp"

#include <skip.hpp>
#include <supermachine/snapshot/file_store.hpp>
#include <supermachine/snapshot/memory_store.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>

using namespace snapmachine_test;
namespace ss = supermachine::snapshot;
namespace fs = std::filesystem;

namespace {

std::string file_bytes(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

std::uint64_t allocated_bytes(const fs::path& p) {
    struct stat st {};
    BOOST_REQUIRE(::stat(p.c_str(), &st) == 0);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

/// Rss (bytes) of the mapping that starts at `address`, from /proc/self/smaps.
std::uint64_t mapping_rss(const void* address) {
    std::ifstream smaps("/proc/self/smaps");
    std::string line;
    bool in_mapping = false;
    char start[32];
    std::snprintf(start, sizeof start, "%lx-", reinterpret_cast<unsigned long>(address));
    while (std::getline(smaps, line)) {
        if (line.find('-') != std::string::npos && line.find(' ') != std::string::npos &&
            std::isxdigit(static_cast<unsigned char>(line[0])) && line.find(':') > 20)
            in_mapping = line.rfind(start, 0) == 0;
        else if (in_mapping && line.rfind("Rss:", 0) == 0)
            return std::stoull(line.substr(4)) * 1024;
    }
    return ~std::uint64_t{0};
}

bool consecutive(const std::vector<std::uint64_t>& v, std::uint64_t first) {
    for (std::size_t i = 0; i < v.size(); ++i)
        if (v[i] != first + i) return false;
    return true;
}

void require_ok(sm::result<void> r, const char* what) {
    if (!r) BOOST_FAIL(what << ": " << r.error().message());
}

template <class T>
T get(sm::result<T> r, const char* what) {
    if (!r) BOOST_FAIL(what << ": " << r.error().message());
    return std::move(r).value();
}

/// Boot the count guest, let it print `ticks` lines, snapshot it to `path`
/// (stopping it). Returns the last count printed before the snapshot.
/// The "count=N" lines of a text (e.g. the console before a snapshot followed
/// by a restored machine's console: a line may be split across the two when
/// the capture fell inside its `rep outsb`).
std::vector<std::uint64_t> counts_in(const std::string& text) {
    console c;
    c.text = text;
    return c.counts();
}

/// The console before the snapshot followed by a restored machine's console
/// counts 1, 2, ... without a gap or repeat, and the restored machine added
/// at least `more` lines after `last` (and did not boot again).
void check_continues(const std::string& before, const std::string& after, std::uint64_t last,
                     std::size_t more = 2) {
    const auto all = counts_in(before + after);
    BOOST_CHECK_MESSAGE(consecutive(all, 1), "counts before + after the restore are not 1, 2, ...");
    BOOST_CHECK_GE(all.size(), last + more);
    BOOST_CHECK(after.find("conformance: start") == std::string::npos);
    const auto restored = counts_in(after);
    BOOST_REQUIRE(!restored.empty());
    BOOST_TEST_MESSAGE("last count before the snapshot " << last << ", first complete line after "
                                                         << restored.front());
    // The first line is last+1, or its tail when the capture split it.
    BOOST_CHECK(restored.front() == last + 1 ||
                (restored.front() == last + 2 && after.rfind("count=", 0) != 0));
}

std::uint64_t boot_count_and_snapshot(boost::asio::io_context& io, const fs::path& path,
                                      std::uint64_t memory_mib = 256, std::uint64_t touch_mib = 0,
                                      std::size_t ticks = 5, std::string* text = nullptr) {
    auto out = std::make_shared<console>();
    auto vm =
        get(machine::create(io.get_executor(), count_config(out, memory_mib, touch_mib)), "create");
    BOOST_REQUIRE(vm->start());
    BOOST_REQUIRE_MESSAGE(out->wait_counts(ticks),
                          "console: " << out->snapshot() << " exit: "
                                      << (vm->exit_status() ? vm->exit_status()->describe()
                                                            : std::string("running")));
    require_ok(vm->snapshot_to(ss::file_store(path), sm::after_snapshot::stop), "snapshot");
    const auto e = vm->wait();
    BOOST_CHECK(e.what == sm::machine_exit::reason::stopped);
    auto counts = out->counts();
    BOOST_REQUIRE(consecutive(counts, 1));
    {
        auto loaded = get(ss::read_snapshot(path), "read back");
        const auto counter =
            get(loaded.memory.read_object<std::uint64_t>(*out->counter_address()), "counter");
        BOOST_TEST_MESSAGE("snapshot after count="
                           << counts.back() << ", counter in RAM " << counter << ", console tail: "
                           << out->snapshot().substr(out->snapshot().size() - 30));
    }
    if (text) *text = out->snapshot();
    return counts.back();
}

} // namespace

BOOST_AUTO_TEST_CASE(count_continues_after_restore_with_state_intact) {
    require_kvm();
    boost::asio::io_context io;
    temp_dir dir;
    const fs::path file = dir.path / "count.snap";

    // Snapshot mid-run but keep the original running: it goes on counting.
    auto out = std::make_shared<console>();
    auto vm = get(machine::create(io.get_executor(), count_config(out)), "create");
    BOOST_REQUIRE(vm->start());
    BOOST_REQUIRE(out->wait_counts(5));
    // The two halves of snapshot_to(), to read the console while paused.
    std::uint64_t last_before = 0;
    std::string before;
    {
        auto image = get(vm->pause_and_capture(), "pause and capture");
        before = out->snapshot();
        last_before = out->counts().back();
        auto written = ss::write_snapshot(file, image);
        vm->resume_after_capture();
        BOOST_REQUIRE(written);
    }
    const auto address = out->counter_address();
    BOOST_REQUIRE(address);
    const std::size_t seen = out->counts().size();
    BOOST_REQUIRE_MESSAGE(out->wait_counts(seen + 3), "the original resumes after the snapshot");
    BOOST_CHECK(consecutive(out->counts(), 1));
    vm->stop();
    vm->wait();

    auto loaded = get(ss::read_snapshot(file), "read_snapshot");
    const ss::snapshot_records original = loaded.records;
    BOOST_CHECK_EQUAL(original.machine.vcpu_count, 1u);
    BOOST_CHECK_EQUAL(original.machine.memory_size, 256ull << 20);
    BOOST_REQUIRE(original.uart);
    BOOST_REQUIRE_EQUAL(original.virtio_devices.size(), 1u);
    BOOST_CHECK(original.virtio_devices[0].kind == ss::virtio_device_kind::entropy);
    BOOST_CHECK_EQUAL(original.virtio_devices[0].mmio_base, sm::x86_layout::virtio_mmio_base);
    // The guest polls the UART: interrupts off, 8N1 after DLAB, divisor 1, FIFO on.
    BOOST_CHECK_EQUAL(original.uart->divisor_latch_low, 1);
    BOOST_CHECK_EQUAL(original.uart->line_control, 0x03);
    BOOST_CHECK_EQUAL(original.uart->modem_control, 0x0b);
    BOOST_CHECK_EQUAL(original.uart->fifo_control, 1);
    // The counter in the snapshot's RAM is the last printed value (or one
    // more: paused between the increment and the print).
    const auto counter = get(loaded.memory.read_object<std::uint64_t>(*address), "counter");
    BOOST_CHECK_MESSAGE(counter == last_before || counter == last_before + 1,
                        "counter " << counter << " last printed " << last_before);

    auto restored_out = std::make_shared<console>();
    auto clone =
        get(machine::restore(io.get_executor(), count_config(restored_out), std::move(loaded)),
            "restore");
    // Before it runs: its state re-captured is the state saved (registers,
    // segments, UART, virtio transport).
    {
        auto image = get(clone->pause_and_capture(), "capture of the restored machine");
        clone->resume_after_capture();
        const auto& again = image.records;
        BOOST_REQUIRE_EQUAL(again.vcpus.size(), 1u);
        auto a = get(sm::backend::kvm_state::decode_vcpu_state(original.vcpus[0].state), "decode");
        auto b = get(sm::backend::kvm_state::decode_vcpu_state(again.vcpus[0].state), "decode");
        BOOST_CHECK(std::memcmp(&a.regs, &b.regs, sizeof a.regs) == 0);
        BOOST_CHECK(std::memcmp(&a.sregs, &b.sregs, sizeof a.sregs) == 0);
        BOOST_CHECK(a.mp_state.mp_state == b.mp_state.mp_state);
        BOOST_CHECK(again.uart == original.uart);
        BOOST_CHECK(again.virtio_devices == original.virtio_devices);
        BOOST_CHECK_EQUAL(again.machine.kernel_identity, original.machine.kernel_identity);
    }
    BOOST_REQUIRE(clone->start());
    BOOST_REQUIRE_MESSAGE(restored_out->wait_counts(5), "restored: " << restored_out->snapshot());
    clone->stop();
    clone->wait();
    check_continues(before, restored_out->snapshot(), last_before, 5);
    BOOST_CHECK(restored_out->snapshot().find("conformance: start") == std::string::npos);
}

BOOST_AUTO_TEST_CASE(two_restores_from_one_file_run_side_by_side_each_private) {
    require_kvm();
    boost::asio::io_context io;
    temp_dir dir;
    const fs::path file = dir.path / "count.snap";
    std::string before;
    const std::uint64_t last = boot_count_and_snapshot(io, file, 256, 0, 5, &before);
    const std::string file_before = file_bytes(file);

    auto out_a = std::make_shared<console>(), out_b = std::make_shared<console>();
    auto a = get(machine::restore(io.get_executor(), count_config(out_a),
                                  get(ss::read_snapshot(file), "read a")),
                 "restore a");
    auto b = get(machine::restore(io.get_executor(), count_config(out_b),
                                  get(ss::read_snapshot(file), "read b")),
                 "restore b");
    BOOST_REQUIRE(a->start());
    BOOST_REQUIRE(b->start());
    BOOST_REQUIRE(out_a->wait_counts(8));
    BOOST_REQUIRE(out_b->wait_counts(3));
    // Write into A's RAM from the host: B and the file must not see it.
    const std::uint64_t marker_address = 32ull << 20;
    const std::uint64_t marker = 0x1122334455667788ull;
    BOOST_REQUIRE(a->memory().write_object(marker_address, marker));
    b->stop();
    b->wait();
    const std::size_t b_lines = out_b->counts().size();
    BOOST_REQUIRE(out_a->wait_counts(b_lines + 5));
    a->stop();
    a->wait();
    check_continues(before, out_a->snapshot(), last);
    check_continues(before, out_b->snapshot(), last);
    BOOST_CHECK_EQUAL(out_b->counts().size(), b_lines);           // B stopped, A went on
    BOOST_CHECK(out_a->counts().size() > out_b->counts().size()); // they ran apart
    BOOST_CHECK_EQUAL(get(a->memory().read_object<std::uint64_t>(marker_address), "a"), marker);
    BOOST_CHECK_EQUAL(get(b->memory().read_object<std::uint64_t>(marker_address), "b"), 0u);
    BOOST_CHECK(file_bytes(file) == file_before);
    // And a third restore still starts at the saved count.
    auto out_c = std::make_shared<console>();
    auto c = get(machine::restore(io.get_executor(), count_config(out_c),
                                  get(ss::read_snapshot(file), "read c")),
                 "restore c");
    BOOST_REQUIRE(c->start());
    BOOST_REQUIRE(out_c->wait_counts(2));
    c->stop();
    c->wait();
    check_continues(before, out_c->snapshot(), last);
}

BOOST_AUTO_TEST_CASE(restored_machine_snapshots_again) {
    require_kvm();
    boost::asio::io_context io;
    temp_dir dir;
    const fs::path first = dir.path / "first.snap", second = dir.path / "second.snap";
    std::string before;
    const std::uint64_t last = boot_count_and_snapshot(io, first, 256, 0, 5, &before);
    auto out = std::make_shared<console>();
    auto vm = get(machine::restore(io.get_executor(), count_config(out),
                                   get(ss::read_snapshot(first), "read")),
                  "restore");
    BOOST_REQUIRE(vm->start());
    BOOST_REQUIRE(out->wait_counts(4));
    // Through the async form, into a memory_store-free file path.
    std::promise<supermachine::error_code> done;
    vm->async_snapshot(
        second, [&](supermachine::error_code e) { done.set_value(e); }, sm::after_snapshot::stop);
    std::thread runner([&] { io.run(); });
    const auto error = done.get_future().get();
    runner.join();
    BOOST_REQUIRE_MESSAGE(!error, error.message());
    vm->wait();
    const std::uint64_t last_second = out->counts().back();
    check_continues(before, out->snapshot(), last);
    auto out2 = std::make_shared<console>();
    auto again = get(machine::restore(io.get_executor(), count_config(out2),
                                      get(ss::read_snapshot(second), "read second")),
                     "restore second");
    BOOST_REQUIRE(again->start());
    BOOST_REQUIRE(out2->wait_counts(2));
    again->stop();
    again->wait();
    check_continues(before + out->snapshot(), out2->snapshot(), last_second);
}

BOOST_AUTO_TEST_CASE(two_vcpus_one_halted_in_kvm_are_paused_and_restored) {
    require_kvm();
    boost::asio::io_context io;
    temp_dir dir;
    const fs::path file = dir.path / "smp.snap";
    auto out = std::make_shared<console>();
    auto cfg = count_config(out);
    cfg.vcpus = 2;
    cfg.extra_cmdline += " conformance.smp=1 conformance.cpus=2";
    auto vm = get(machine::create(io.get_executor(), cfg), "create");
    BOOST_REQUIRE(vm->start());
    BOOST_REQUIRE_MESSAGE(out->wait_counts(3), out->snapshot());
    BOOST_CHECK(out->snapshot().find("application processors running: 1 of 1") !=
                std::string::npos);
    require_ok(vm->snapshot_to(ss::file_store(file), sm::after_snapshot::stop), "snapshot");
    vm->wait();
    const std::string before = out->snapshot();
    const std::uint64_t last = out->counts().back();

    auto loaded = get(ss::read_snapshot(file), "read");
    BOOST_REQUIRE_EQUAL(loaded.records.vcpus.size(), 2u);
    auto ap = get(sm::backend::kvm_state::decode_vcpu_state(loaded.records.vcpus[1].state), "ap");
    BOOST_TEST_MESSAGE("AP MP state " << ap.mp_state.mp_state << ", rip 0x" << std::hex
                                      << ap.regs.rip);
    BOOST_CHECK(ap.mp_state.mp_state == KVM_MP_STATE_HALTED ||
                ap.mp_state.mp_state == KVM_MP_STATE_RUNNABLE);
    auto restored_out = std::make_shared<console>();
    auto restored_cfg = count_config(restored_out);
    restored_cfg.vcpus = 2;
    auto clone =
        get(machine::restore(io.get_executor(), restored_cfg, std::move(loaded)), "restore");
    BOOST_REQUIRE(clone->start());
    BOOST_REQUIRE(restored_out->wait_counts(3));
    clone->stop();
    const auto e = clone->wait();
    BOOST_CHECK(e.what == sm::machine_exit::reason::stopped);
    check_continues(before, restored_out->snapshot(), last);
}

BOOST_AUTO_TEST_CASE(two_gib_guest_that_touched_8_mib_writes_and_reads_about_8_mib) {
    require_kvm();
    boost::asio::io_context io;
    temp_dir dir;
    const fs::path file = dir.path / "big.snap";
    std::string before;
    const std::uint64_t last = boot_count_and_snapshot(io, file, 2048, 8, 2, &before);
    const std::uint64_t allocated = allocated_bytes(file);
    BOOST_TEST_MESSAGE("2 GiB guest, 8 MiB touched: file " << fs::file_size(file) << " bytes, "
                                                           << allocated << " allocated");
    BOOST_CHECK_EQUAL(fs::file_size(file) % 4096, 0u);
    BOOST_CHECK(fs::file_size(file) > (2048ull << 20));
    BOOST_CHECK(allocated >= (8ull << 20));
    BOOST_CHECK(allocated <= (8ull << 20) + (2ull << 20));

    auto loaded = get(ss::read_snapshot(file), "read");
    const void* ram = loaded.memory.host_mapping().data();
    auto out = std::make_shared<console>();
    auto vm =
        get(machine::restore(io.get_executor(), count_config(out, 2048, 8), std::move(loaded)),
            "restore");
    const std::uint64_t rss_mapped = mapping_rss(ram);
    BOOST_REQUIRE(vm->start());
    BOOST_REQUIRE(out->wait_counts(3)); // each tick reads all 8 MiB
    const std::uint64_t rss_running = mapping_rss(ram);
    vm->stop();
    vm->wait();
    BOOST_TEST_MESSAGE("RSS of the restored RAM mapping: " << rss_mapped << " after restore, "
                                                           << rss_running << " after 3 ticks");
    BOOST_CHECK(rss_mapped < (1ull << 20));
    BOOST_CHECK(rss_running >= (8ull << 20));
    BOOST_CHECK(rss_running <= (8ull << 20) + (3ull << 20));
    check_continues(before, out->snapshot(), last);
}

BOOST_AUTO_TEST_CASE(bad_files_and_other_machines_are_clean_errors) {
    require_kvm();
    boost::asio::io_context io;
    temp_dir dir;
    const fs::path file = dir.path / "count.snap";
    boot_count_and_snapshot(io, file, 256, 0, 2);
    auto out = std::make_shared<console>();

    // Another vCPU count, memory size, device set.
    {
        auto cfg = count_config(out);
        cfg.vcpus = 2;
        auto r = machine::restore(io.get_executor(), cfg, get(ss::read_snapshot(file), "read"));
        BOOST_CHECK(!r && r.error() == sm::errc::snapshot_mismatch);
    }
    {
        auto r = machine::restore(io.get_executor(), count_config(out, 512),
                                  get(ss::read_snapshot(file), "read"));
        BOOST_CHECK(!r && r.error() == sm::errc::snapshot_mismatch);
    }
    {
        using other = sm::basic_machine<sm::backend::kvm, sm::devices::serial>;
        other::config cfg;
        cfg.memory_mib = 256;
        auto r = other::restore(io.get_executor(), cfg, get(ss::read_snapshot(file), "read"));
        BOOST_CHECK(!r && r.error() == sm::errc::snapshot_mismatch);
        using two_rng = sm::basic_machine<sm::backend::kvm, sm::devices::serial, sm::virtio::rng,
                                          sm::virtio::rng>;
        two_rng::config cfg2;
        cfg2.memory_mib = 256;
        auto r2 = two_rng::restore(io.get_executor(), cfg2, get(ss::read_snapshot(file), "read"));
        BOOST_CHECK(!r2 && r2.error() == sm::errc::snapshot_mismatch);
    }
    // Truncations (at the header, in the body, in RAM), a bad magic.
    const std::string bytes = file_bytes(file);
    for (std::uint64_t cut :
         {std::uint64_t{0}, std::uint64_t{10}, std::uint64_t{64}, std::uint64_t{200},
          std::uint64_t{4096}, static_cast<std::uint64_t>(bytes.size() - 4096),
          static_cast<std::uint64_t>(bytes.size() - 1)}) {
        const fs::path cut_file = dir.path / ("cut-" + std::to_string(cut));
        std::ofstream(cut_file, std::ios::binary).write(bytes.data(), static_cast<long>(cut));
        auto r = ss::read_snapshot(cut_file);
        BOOST_CHECK_MESSAGE(!r, "truncated at " << cut << " accepted");
    }
    {
        std::string bad = bytes;
        bad[0] = 'X';
        const fs::path bad_file = dir.path / "bad-magic";
        std::ofstream(bad_file, std::ios::binary).write(bad.data(), static_cast<long>(bad.size()));
        auto r = ss::read_snapshot(bad_file);
        BOOST_CHECK(!r && r.error() == sm::errc::snapshot_bad_magic);
    }
    // A vCPU blob that decodes but is not this vCPU's (swapped with the
    // interrupt-controller blob): refused before any state is set.
    {
        auto loaded = get(ss::read_snapshot(file), "read");
        std::swap(loaded.records.vcpus[0].state, loaded.records.interrupt_controller->state);
        auto r = machine::restore(io.get_executor(), count_config(out), std::move(loaded));
        BOOST_CHECK(!r);
    }
    {
        auto loaded = get(ss::read_snapshot(file), "read");
        loaded.records.uart->interrupt_enable = 0xff;
        auto r = machine::restore(io.get_executor(), count_config(out), std::move(loaded));
        BOOST_CHECK_MESSAGE(!r && r.error() == sm::errc::snapshot_bad_record,
                            (r ? std::string("accepted") : r.error().message()));
    }
    {
        auto loaded = get(ss::read_snapshot(file), "read");
        loaded.records.virtio_devices[0].transport_state.resize(3);
        auto r = machine::restore(io.get_executor(), count_config(out), std::move(loaded));
        BOOST_CHECK(!r);
    }
}

BOOST_AUTO_TEST_CASE(pausing_often_loses_no_console_output) {
    require_kvm();
    boost::asio::io_context io;
    auto out = std::make_shared<console>();
    auto vm = get(machine::create(io.get_executor(), count_config(out, 256, 0, 5)), "create");
    BOOST_REQUIRE(vm->start());
    BOOST_REQUIRE(out->wait_counts(2));
    for (int i = 0; i < 1000; ++i) {
        auto image = get(vm->pause_and_capture(), "pause");
        vm->resume_after_capture();
        std::this_thread::sleep_for(std::chrono::microseconds(100 + i % 200));
    }
    vm->stop();
    vm->wait();
    const auto counts = out->counts();
    BOOST_TEST_MESSAGE(counts.size() << " lines over 1000 pauses");
    BOOST_CHECK(consecutive(counts, 1));
    for (std::size_t i = 1; i < counts.size(); ++i)
        if (counts[i] != counts[i - 1] + 1) {
            BOOST_TEST_MESSAGE("after " << counts[i - 1] << " comes " << counts[i]);
            break;
        }
}
