// Virtio on our kvm backend, driven by a real guest: the conformance guest's
// virtio-mmio driver (guest/conformance/virtio.c) negotiates features, sets
// up queues and does I/O through our mmio transport, ioeventfd doorbells and
// irqfd interrupts on the real /dev/kvm. The host compares what the guest
// printed with its own view of the files.
#include "../kvm/process.hpp"

#include <skip.hpp>
#include <supermachine/backend/kvm.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/virtio/blk.hpp>
#include <supermachine/virtio/mmio_transport.hpp>
#include <supermachine/virtio/rng.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <openssl/sha.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

using namespace supermachine;
namespace st = supermachine::storage;

namespace {

void require_kvm() {
    if (::access("/dev/kvm", R_OK | W_OK) != 0) test::skip("no usable /dev/kvm on this host");
}

struct temp_dir {
    std::filesystem::path path;
    temp_dir() {
        std::string tmpl =
            (std::filesystem::temp_directory_path() / "sm-virtiokvm-XXXXXX").string();
        path = ::mkdtemp(tmpl.data());
    }
    ~temp_dir() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
}

/// A disk of `bytes` pseudo-random bytes (so "before" checksums mean something).
std::string make_disk(const std::string& path, std::size_t bytes, std::uint32_t seed) {
    std::mt19937 gen(seed);
    std::string s(bytes, '\0');
    for (auto& c : s)
        c = static_cast<char>(gen());
    std::ofstream(path, std::ios::binary | std::ios::trunc) << s;
    return s;
}

std::string sha256(const std::string& bytes) {
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), d);
    char hex[2 * SHA256_DIGEST_LENGTH + 1];
    for (int i = 0; i < SHA256_DIGEST_LENGTH; ++i)
        std::snprintf(hex + 2 * i, 3, "%02x", d[i]);
    return hex;
}

// The guest's checksum and pattern (virtio.c), recomputed on the host.
std::uint64_t fnv1a(std::string_view bytes) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned char c : bytes) {
        h ^= c;
        h *= 0x100000001b3ull;
    }
    return h;
}
std::string pattern(std::uint64_t seed, unsigned disk, std::size_t n = 4096) {
    std::string s(n, '\0');
    for (std::uint64_t i = 0; i < n; ++i) {
        std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + std::uint64_t{disk} * 0x100000001b3ull + i;
        x ^= x >> 30;
        x *= 0xbf58476d1ce4e5b9ull;
        x ^= x >> 27;
        x *= 0x94d049bb133111ebull;
        x ^= x >> 31;
        s[i] = static_cast<char>(x & 0xff);
    }
    return s;
}
std::string hex(std::uint64_t v) {
    char b[24];
    std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
    return b;
}

bool has(const std::string& text, const std::string& what) {
    return text.find(what) != std::string::npos;
}

constexpr std::uint64_t first_sector = 8; // virtio.c's default conformance.virtio.sector
constexpr std::size_t disk_bytes = 1 << 20;

using raw_blk = virtio::blk<st::raw_file>;
using cow_blk = virtio::blk<st::cow_file<st::raw_file>>;
// Slot 4 is left unattached: a fixed device list with a hole.
using machine = basic_machine<backend::kvm, devices::serial, devices::acpi_power, raw_blk, raw_blk,
                              raw_blk, raw_blk, cow_blk, virtio::rng>;

struct run_result {
    machine_exit exit;
    std::string console, cmdline;
};

run_result run_guest(const std::string& a, const std::string& b, const std::string& ro,
                     const std::string& base, std::uint64_t seed) {
    const auto kernel = read_all(test::conformance_bzimage());
    BOOST_REQUIRE(!kernel.empty());
    // The devices' executor must run: their kick handlers live there.
    boost::asio::io_context io;
    auto work = boost::asio::make_work_guard(io);
    std::thread io_thread([&io] { io.run(); });
    struct joiner {
        decltype(work)& w;
        std::thread& t;
        ~joiner() {
            w.reset();
            t.join();
        }
    } join_io{work, io_thread}; // after the machine is gone (declared before it)
    machine::config cfg;
    cfg.memory_mib = 32;
    cfg.kernel.resize(kernel.size());
    std::memcpy(cfg.kernel.data(), kernel.data(), kernel.size());
    cfg.extra_cmdline = "conformance.mode=virtio conformance.virtio=5 conformance.virtio.seed=" +
                        std::to_string(seed);
    auto console = std::make_shared<std::string>();
    auto guard = std::make_shared<std::mutex>();
    std::get<devices::serial::config>(cfg.devices).sink = [console, guard](std::string_view s) {
        std::lock_guard lock(*guard);
        *console += s;
    };
    std::get<2>(cfg.devices) = raw_blk::config{.storage = {a, false}, .id = "disk-a"};
    std::get<3>(cfg.devices) = raw_blk::config{.storage = {b, false}, .id = "disk-b"};
    std::get<4>(cfg.devices) = raw_blk::config{.attached = false};
    std::get<5>(cfg.devices) = raw_blk::config{.storage = {ro, true}, .id = "disk-ro"};
    std::get<6>(cfg.devices) = cow_blk::config{.storage = {.base = {base, true}}, .id = "disk-cow"};
    auto vm = value_or_throw(machine::create(io.get_executor(), std::move(cfg)));
    BOOST_TEST((vm->device_at<4>() == nullptr));
    BOOST_REQUIRE(vm->start());
    auto e = vm->wait_for(std::chrono::seconds(60));
    if (!e) {
        vm->stop();
        e = vm->wait();
    }
    std::lock_guard lock(*guard);
    BOOST_TEST_MESSAGE("console:\n" << *console);
    return {*e, *console, vm->kernel_cmdline()};
}

} // namespace

BOOST_AUTO_TEST_CASE(guest_drives_blk_and_rng_through_ioeventfd_and_irqfd) {
    require_kvm();
    temp_dir dir;
    const auto a = dir.file("a.img"), b = dir.file("b.img"), ro = dir.file("ro.img"),
               base = dir.file("base.img");
    const auto a0 = make_disk(a, disk_bytes, 1), b0 = make_disk(b, disk_bytes, 2),
               ro0 = make_disk(ro, disk_bytes, 3), base0 = make_disk(base, disk_bytes, 4);
    const std::string ro_sha = sha256(ro0), base_sha = sha256(base0);
    const std::uint64_t seed = 0x5eed0001;

    auto r = run_guest(a, b, ro, base, seed);
    BOOST_TEST(to_string(r.exit.what) == "power_off");
    const auto& c = r.console;
    BOOST_TEST(has(c, "conformance: PASS"));
    BOOST_TEST(!has(c, "FAIL"));

    // Discovery: 5 windows (the unattached slot has none), consecutive GSIs.
    BOOST_TEST(has(r.cmdline, "virtio_mmio.device=0x1000@0xd0000000:5"));
    BOOST_TEST(has(r.cmdline, "virtio_mmio.device=0x1000@0xd0004000:9"));
    BOOST_TEST(!has(r.cmdline, "@0xd0005000"));
    BOOST_TEST(has(c, "virtio-mmio devices: DSDT 5, cmdline 5"));
    BOOST_TEST(has(c, "virtio: device 3 at 0xd0003000 gsi 8: id 2 (blk)"));
    BOOST_TEST(has(c, "virtio: device 4 at 0xd0004000 gsi 9: id 4 (rng)"));

    // Feature negotiation, refusals included.
    BOOST_TEST(has(c, "ok: virtio: FEATURES_OK refused for a feature not offered"));
    BOOST_TEST(has(c, "ok: virtio: FEATURES_OK refused without VERSION_1"));
    BOOST_TEST(
        has(c, "virtio-blk 0: features 0x100000240, capacity 2048 sectors, ro 0, id 'disk-a'"));
    BOOST_TEST(
        has(c, "virtio-blk 2: features 0x100000260, capacity 2048 sectors, ro 1, id 'disk-ro'"));
    BOOST_TEST(has(c, "id 'disk-cow'"));

    // What each disk held before: the host's files.
    BOOST_TEST(has(c, "virtio-blk 0: sectors 0..7 before fnv " + hex(fnv1a(a0.substr(0, 4096)))));
    BOOST_TEST(has(c, "virtio-blk 1: sectors 0..7 before fnv " + hex(fnv1a(b0.substr(0, 4096)))));
    BOOST_TEST(has(c, "virtio-blk 2: sectors 0..7 before fnv " + hex(fnv1a(ro0.substr(0, 4096)))));
    BOOST_TEST(
        has(c, "virtio-blk 3: sectors 0..7 before fnv " + hex(fnv1a(base0.substr(0, 4096)))));

    // Two writable disks: the files now hold the guest's pattern at sector 8,
    // nothing else changed, and the guest's checksum agrees with the files.
    const std::size_t at = first_sector * 512;
    for (unsigned disk : {0u, 1u}) {
        const auto& path = disk == 0 ? a : b;
        const auto& before = disk == 0 ? a0 : b0;
        const auto now = read_all(path);
        BOOST_REQUIRE(now.size() == disk_bytes);
        BOOST_TEST((now.substr(at, 4096) == pattern(seed, disk)));
        BOOST_TEST((now.substr(0, at) == before.substr(0, at)));
        BOOST_TEST((now.substr(at + 4096) == before.substr(at + 4096)));
        BOOST_TEST(has(c, "virtio-blk " + std::to_string(disk) +
                              ": sectors 8..15 read back equal, fnv " +
                              hex(fnv1a(now.substr(at, 4096)))));
    }

    // The read-only disk refused the write and is byte-identical.
    BOOST_TEST(has(c, "virtio-blk 2: write refused, status 1"));
    BOOST_TEST(has(c, "virtio-blk 2: sectors 8..15 after refused write, fnv " +
                          hex(fnv1a(ro0.substr(at, 4096)))));
    BOOST_TEST(sha256(read_all(ro)) == ro_sha);

    // The cow disk took the write (the guest read it back) but its base is untouched.
    BOOST_TEST(
        has(c, "virtio-blk 3: sectors 8..15 read back equal, fnv " + hex(fnv1a(pattern(seed, 3)))));
    BOOST_TEST(sha256(read_all(base)) == base_sha);

    // Every completion arrived by interrupt (irqfd -> IOAPIC -> LAPIC), none by polling.
    std::smatch m;
    BOOST_REQUIRE(std::regex_search(
        c, m,
        std::regex("virtio: blk 4, rng 1, completions by interrupt (\\d+), by polling (\\d+)")));
    BOOST_TEST(std::stoul(m[1]) >= 20u);
    BOOST_TEST(std::stoul(m[2]) == 0u);

    // Random bytes, not all zero, different on the next boot.
    std::smatch first;
    BOOST_REQUIRE(std::regex_search(c, first, std::regex("virtio-rng 0: ([0-9a-f]{64})")));
    BOOST_TEST(first[1].str() != std::string(64, '0'));
    auto again = run_guest(a, b, ro, base, seed + 1);
    std::smatch second;
    BOOST_REQUIRE(
        std::regex_search(again.console, second, std::regex("virtio-rng 0: ([0-9a-f]{64})")));
    BOOST_TEST(first[1].str() != second[1].str());
    BOOST_TEST((read_all(a).substr(at, 4096) == pattern(seed + 1, 0)));
    BOOST_TEST(sha256(read_all(base)) == base_sha);
    BOOST_TEST(sha256(read_all(ro)) == ro_sha);
}

namespace {
test::process_result boot_cli(std::vector<std::string> extra) {
    std::vector<std::string> argv = {
        test::cli_path(), "boot", "--kernel", test::conformance_bzimage(), "--memory", "32"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto r = test::run_process(argv, {}, std::chrono::seconds(90));
    BOOST_TEST_MESSAGE("status " << r.status << "\nstdout:\n" << r.out << "stderr:\n" << r.err);
    return r;
}
} // namespace

BOOST_AUTO_TEST_CASE(boot_cli_disks_and_rng) {
    require_kvm();
    temp_dir dir;
    const auto a = dir.file("first.img"), b = dir.file("second.img"), ro = dir.file("third.img");
    const auto a0 = make_disk(a, disk_bytes, 11), b0 = make_disk(b, 64 * 1024, 12),
               ro0 = make_disk(ro, disk_bytes, 13);
    const std::uint64_t seed = 77;
    auto r = boot_cli({"--disk", a, "--disk", b, "--disk", ro + ",ro", "--rng", "--append",
                       "conformance.mode=virtio conformance.virtio=4 conformance.virtio.seed=77"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.err.empty());
    BOOST_TEST(has(r.out, "conformance: PASS"));
    BOOST_TEST(!has(r.out, "FAIL"));
    // In command-line order, then the rng; ids are the file names.
    BOOST_TEST(has(r.out, "virtio: device 0 at 0xd0000000 gsi 5: id 2 (blk)"));
    BOOST_TEST(has(r.out, "virtio: device 3 at 0xd0003000 gsi 8: id 4 (rng)"));
    BOOST_TEST(has(r.out, "virtio-blk 0: features 0x100000240, capacity 2048 sectors, ro 0, id "
                          "'first.img'"));
    BOOST_TEST(has(r.out, "virtio-blk 1: features 0x100000240, capacity 128 sectors, ro 0, id "
                          "'second.img'"));
    BOOST_TEST(has(r.out, "virtio-blk 2: features 0x100000260, capacity 2048 sectors, ro 1, id "
                          "'third.img'"));
    const std::size_t at = first_sector * 512;
    for (unsigned disk : {0u, 1u}) {
        const auto& path = disk == 0 ? a : b;
        const auto& before = disk == 0 ? a0 : b0;
        const auto now = read_all(path);
        BOOST_TEST(has(r.out, "virtio-blk " + std::to_string(disk) + ": sectors 0..7 before fnv " +
                                  hex(fnv1a(before.substr(0, 4096)))));
        BOOST_TEST((now.substr(at, 4096) == pattern(seed, disk)));
        BOOST_TEST((now.substr(0, at) == before.substr(0, at)));
        BOOST_TEST((now.substr(at + 4096) == before.substr(at + 4096)));
        BOOST_TEST(has(r.out, "virtio-blk " + std::to_string(disk) +
                                  ": sectors 8..15 read back equal, fnv " +
                                  hex(fnv1a(now.substr(at, 4096)))));
    }
    BOOST_TEST(has(r.out, "virtio-blk 2: write refused, status 1"));
    BOOST_TEST((read_all(ro) == ro0));
    BOOST_TEST(std::regex_search(r.out, std::regex("virtio-rng 0: [0-9a-f]{64}")));
    BOOST_TEST(has(r.out, "by polling 0,"));
}

BOOST_AUTO_TEST_CASE(boot_cli_without_disks_attaches_no_virtio_device) {
    require_kvm();
    auto r = boot_cli({"--append", "conformance.virtio=0"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(has(r.out, "virtio-mmio devices: DSDT 0, cmdline 0"));
    BOOST_TEST(has(r.out, "conformance: PASS"));
}

BOOST_AUTO_TEST_CASE(boot_cli_rejects_bad_disks_with_one_line) {
    require_kvm();
    temp_dir dir;
    const auto a = dir.file("a.img");
    make_disk(a, 4096, 1);
    auto expect_bad = [](const test::process_result& r, const std::string& words) {
        BOOST_TEST(r.status == 2);
        BOOST_TEST(test::count_lines(r.err) == 1u);
        BOOST_TEST(has(r.err, words), "stderr '" << r.err << "' names '" << words << "'");
        BOOST_TEST(r.out.empty());
    };
    expect_bad(boot_cli({"--disk", dir.file("missing.img")}), "cannot open disk");
    expect_bad(boot_cli({"--disk", a + ",rw"}), "the option after ',' is 'ro' or 'cow'");
    expect_bad(boot_cli({"--disk", ",ro"}), "need a file");
    std::vector<std::string> nine;
    for (int i = 0; i < 9; ++i) {
        nine.push_back("--disk");
        nine.push_back(a);
    }
    expect_bad(boot_cli(nine), "too many --disk options (9); at most 8");
    // A directory passes access() but is no disk: still one line, status 2.
    expect_bad(boot_cli({"--disk", dir.path.string()}), "disk");
}

BOOST_AUTO_TEST_CASE(the_guest_tells_interrupts_from_polling) {
    // With its IOAPIC pins left masked the guest must see every completion
    // by polling and none by interrupt: the interrupt count above can fail.
    require_kvm();
    temp_dir dir;
    const auto a = dir.file("a.img");
    make_disk(a, disk_bytes, 5);
    auto r = boot_cli(
        {"--disk", a, "--rng", "--append", "conformance.mode=virtio conformance.virtio.irq=0"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(has(r.out, "virtio: IOAPIC pins left masked"));
    BOOST_TEST(has(r.out, "virtio: a completion came without an interrupt; polling from now on"));
    BOOST_TEST(std::regex_search(
        r.out, std::regex("completions by interrupt 0, by polling [1-9][0-9]*, interrupts 0")));
    BOOST_TEST(has(r.out, "conformance: PASS"));
}

BOOST_AUTO_TEST_CASE(boot_cli_cow_disk_keeps_its_base_file) {
    // --disk PATH,cow: the guest writes and reads its data back, the file
    // (even one the user may not write) stays byte-identical.
    require_kvm();
    temp_dir dir;
    const auto base = dir.file("base.img");
    const auto base0 = make_disk(base, disk_bytes, 21);
    ::chmod(base.c_str(), 0444);
    const std::string base_sha = sha256(base0);
    auto r = boot_cli(
        {"--disk", base + ",cow", "--append", "conformance.mode=virtio conformance.virtio.seed=9"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(has(r.out, "conformance: PASS"));
    BOOST_TEST(has(r.out, "virtio-blk 0: features 0x100000240, capacity 2048 sectors, ro 0"));
    BOOST_TEST(
        has(r.out, "virtio-blk 0: sectors 0..7 before fnv " + hex(fnv1a(base0.substr(0, 4096)))));
    BOOST_TEST(has(r.out, "virtio-blk 0: sectors 8..15 read back equal, fnv " +
                              hex(fnv1a(pattern(9, 0)))));
    BOOST_TEST(sha256(read_all(base)) == base_sha);
}
