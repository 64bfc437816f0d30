// virtio-blk end to end without KVM: a ring in a guest_memory::view, the
// real virtio-mmio transport, real files, the real thread pool.
#include "temp_dir.hpp"
#include "test_driver.hpp"
#include "test_environment.hpp"

#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/storage/read_only.hpp>
#include <supermachine/virtio/blk.hpp>
#include <supermachine/virtio/mmio_transport.hpp>

#include <boost/test/unit_test.hpp>

#include <cstring>
#include <sys/eventfd.h>

namespace sm = supermachine;
namespace vio = supermachine::virtio;
namespace st = supermachine::storage;
using sm::test::pattern;

static_assert(sm::bus_device<sm::bus_device_for<vio::blk<st::raw_file>>>);
static_assert(sm::bus_device<sm::bus_device_for<vio::blk<st::cow_file<st::raw_file>>>>);
static_assert(sm::bus_device<sm::bus_device_for<vio::blk<st::read_only<st::raw_file>>>>);

namespace {

using raw_config = vio::blk<st::raw_file>::config;

template <class Storage>
struct blk_fixture {
    using device = vio::blk<Storage>;
    using transport = vio::mmio_transport<device>;

    sm::test::test_driver driver{64, 8 << 20};
    sm::test::test_environment env{driver.memory()};
    std::unique_ptr<transport> t;
    std::uint64_t header = driver.allocate(16), status = driver.allocate(1),
                  data = driver.allocate(1 << 20, 4096);

    explicit blk_fixture(const typename device::config& cfg, bool bring_up = true) {
        auto made = transport::create(env.env, cfg);
        BOOST_REQUIRE(made.has_value());
        t = std::move(made).value();
        if (bring_up) BOOST_REQUIRE(mmio().bring_up(negotiable(), {driver.layout()}));
    }
    sm::test::mmio_access<transport> mmio() { return {*t}; }
    std::uint64_t negotiable() {
        auto m = mmio();
        m.write32(vio::mmio_register::device_features_select, 0);
        std::uint64_t f = m.read32(vio::mmio_register::device_features);
        m.write32(vio::mmio_register::device_features_select, 1);
        return f | std::uint64_t{m.read32(vio::mmio_register::device_features)} << 32;
    }

    struct outcome {
        std::uint8_t status;
        std::uint32_t used_length;
    };
    /// Issue one request and wait for its completion.
    outcome request(std::uint32_t type, std::uint64_t sector,
                    std::vector<sm::test::buffer_spec> middle, bool indirect = false) {
        sm::virtio::blk_request_header h{type, 0, sector};
        driver.memory().write_object(header, h).value();
        driver.memory().write_object<std::uint8_t>(status, 0xee).value();
        std::vector<sm::test::buffer_spec> chain{{header, 16, false}};
        chain.insert(chain.end(), middle.begin(), middle.end());
        chain.push_back({status, 1, true});
        const std::uint16_t before = driver.used_index();
        if (indirect)
            driver.add_indirect_chain(chain);
        else
            driver.add_chain(chain);
        env.ring_doorbell(0);
        BOOST_REQUIRE(env.run_until([&] { return driver.used_index() != before; }));
        const auto used = driver.used(before);
        return {driver.memory().template read_object<std::uint8_t>(status).value(), used.length};
    }
    std::span<std::byte> data_bytes(std::size_t n) { return driver.host(data, n); }
};

} // namespace

BOOST_AUTO_TEST_SUITE(blk)

BOOST_AUTO_TEST_CASE(config_space_and_features) {
    sm::test::temp_dir dir;
    sm::test::write_file(dir.file("d"), pattern(3 << 20, 1));
    blk_fixture<st::raw_file> f(raw_config{{dir.file("d"), false}}, false);
    auto m = f.mmio();
    BOOST_TEST(m.read32(vio::mmio_register::device_id) == 2u);
    BOOST_TEST(m.read32(vio::mmio_register::config) == (3u << 20) / 512); // capacity low
    BOOST_TEST(m.read32(vio::mmio_register::config + 4) == 0u);           // capacity high
    BOOST_TEST(m.read32(vio::mmio_register::config + 12) == 254u);        // seg_max
    BOOST_TEST(m.read32(vio::mmio_register::config + 20) == 512u);        // blk_size
    const auto features = f.negotiable();
    BOOST_TEST(!vio::has_feature(features, vio::blk_feature::read_only));
    BOOST_TEST(vio::has_feature(features, vio::blk_feature::flush));
    BOOST_TEST(vio::has_feature(features, vio::blk_feature::discard));
    std::uint8_t b = 0;
    f.t->read(sm::test::test_environment::mmio_base + 0x100 + 1,
              std::as_writable_bytes(std::span(&b, 1)));
    BOOST_TEST(b == (((3u << 20) / 512) >> 8 & 0xff)); // byte access to config space
    std::uint64_t far = 1;
    f.t->read(sm::test::test_environment::mmio_base + 0xff8,
              std::as_writable_bytes(std::span(&far, 1)));
    BOOST_TEST(far == 0u); // past the config space
}

BOOST_AUTO_TEST_CASE(write_then_read_agrees_with_the_host_file) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    sm::test::write_file(path, pattern(4 << 20, 2));
    blk_fixture<st::raw_file> f(raw_config{{path, false}, "serial-123"});

    // Write 64 KiB at sector 100 from two buffers.
    const auto payload = pattern(64 << 10, 3);
    std::memcpy(f.data_bytes(64 << 10).data(), payload.data(), payload.size());
    auto w = f.request(vio::blk_request::out, 100,
                       {{f.data, 32 << 10, false}, {f.data + (32 << 10), 32 << 10, false}});
    BOOST_TEST(w.status == vio::blk_status::ok);
    BOOST_TEST(w.used_length == 1u);
    BOOST_TEST(f.request(vio::blk_request::flush, 0, {}).status == vio::blk_status::ok);
    const auto host = sm::test::read_file(path);
    BOOST_TEST(sm::test::checksum(std::span(host).subspan(100 * 512, payload.size())) ==
               sm::test::checksum(payload));

    // Read 128 KiB at sector 64 through an indirect table and compare with the host's view.
    std::memset(f.data_bytes(128 << 10).data(), 0, 128 << 10);
    auto r = f.request(vio::blk_request::in, 64, {{f.data, 128 << 10, true}}, true);
    BOOST_TEST(r.status == vio::blk_status::ok);
    BOOST_TEST(r.used_length == (128u << 10) + 1);
    BOOST_TEST(sm::test::checksum(f.data_bytes(128 << 10)) ==
               sm::test::checksum(std::span(host).subspan(64 * 512, 128 << 10)));

    // Header and data in one descriptor (any framing is legal, 2.6.4).
    const auto joined = f.driver.allocate(16 + 1024);
    f.driver.memory()
        .write_object(joined, vio::blk_request_header{vio::blk_request::out, 0, 7})
        .value();
    const auto more = pattern(1024, 13);
    std::memcpy(f.driver.host(joined + 16, 1024).data(), more.data(), 1024);
    const auto before = f.driver.used_index();
    f.driver.add_chain({{joined, 16 + 1024, false}, {f.status, 1, true}});
    f.env.ring_doorbell(0);
    BOOST_REQUIRE(f.env.run_until([&] { return f.driver.used_index() != before; }));
    BOOST_TEST(f.driver.memory().read_object<std::uint8_t>(f.status).value() == 0);
    BOOST_TEST(std::memcmp(sm::test::read_file(path).data() + 7 * 512, more.data(), 1024) == 0);

    // GET_ID
    auto id = f.request(vio::blk_request::get_id, 0, {{f.data, 20, true}});
    BOOST_TEST(id.status == vio::blk_status::ok);
    BOOST_TEST(std::memcmp(f.data_bytes(10).data(), "serial-123", 10) == 0);
    BOOST_TEST(int(f.data_bytes(11)[10]) == 0);
}

BOOST_AUTO_TEST_CASE(guest_errors_fail_the_request_only) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    const auto original = pattern(1 << 20, 4);
    sm::test::write_file(path, original);
    blk_fixture<st::raw_file> f(raw_config{{path, false}});
    const std::uint64_t capacity = (1 << 20) / 512;
    // past the end, and straddling it
    BOOST_TEST(f.request(vio::blk_request::in, capacity, {{f.data, 512, true}}).status ==
               vio::blk_status::io_error);
    BOOST_TEST(f.request(vio::blk_request::out, capacity - 1, {{f.data, 1024, false}}).status ==
               vio::blk_status::io_error);
    BOOST_TEST(
        f.request(vio::blk_request::in, ~std::uint64_t{0} / 2, {{f.data, 512, true}}).status ==
        vio::blk_status::io_error); // sector * 512 overflows
    // not a whole number of sectors
    BOOST_TEST(f.request(vio::blk_request::in, 0, {{f.data, 100, true}}).status ==
               vio::blk_status::io_error);
    // unknown request type
    BOOST_TEST(f.request(77, 0, {}).status == vio::blk_status::unsupported);
    // discard with an unknown flag
    vio::blk_discard_segment seg{0, 8, 0x4};
    f.driver.memory().write_object(f.data, seg).value();
    BOOST_TEST(f.request(vio::blk_request::discard, 0, {{f.data, 16, false}}).status ==
               vio::blk_status::unsupported);
    // a chain with no header at all: returned with nothing written
    const auto before = f.driver.used_index();
    f.driver.add_chain({{f.status, 1, true}});
    f.env.ring_doorbell(0);
    BOOST_REQUIRE(f.env.run_until([&] { return f.driver.used_index() != before; }));
    BOOST_TEST(f.driver.used(before).length == 0u);
    // a data buffer outside guest RAM: malformed, returned with nothing written
    const auto before2 = f.driver.used_index();
    f.driver.add_chain({{f.header, 16, false}, {0x1'0000'0000ull, 512, true}, {f.status, 1, true}});
    f.env.ring_doorbell(0);
    BOOST_REQUIRE(f.env.run_until([&] { return f.driver.used_index() != before2; }));
    BOOST_TEST(f.driver.used(before2).length == 0u);
    // the device still works and the file is unchanged
    BOOST_TEST(f.request(vio::blk_request::in, 0, {{f.data, 512, true}}).status ==
               vio::blk_status::ok);
    BOOST_TEST((sm::test::read_file(path) == original));
}

BOOST_AUTO_TEST_CASE(discard_and_write_zeroes) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    sm::test::write_file(path, pattern(1 << 20, 5));
    blk_fixture<st::raw_file> f(raw_config{{path, false}});
    vio::blk_discard_segment seg{8, 16, 1};
    f.driver.memory().write_object(f.data, seg).value();
    BOOST_TEST(f.request(vio::blk_request::write_zeroes, 0, {{f.data, 16, false}}).status ==
               vio::blk_status::ok);
    const auto host = sm::test::read_file(path);
    BOOST_TEST(std::all_of(host.begin() + 8 * 512, host.begin() + 24 * 512,
                           [](std::byte b) { return b == std::byte{0}; }));
    BOOST_TEST((host[24 * 512] == pattern(1 << 20, 5)[24 * 512]));
}

BOOST_AUTO_TEST_CASE(read_only_disk_answers_writes_with_ioerr) {
    sm::test::temp_dir dir;
    const auto path = dir.file("ro.img");
    const auto original = pattern(1 << 20, 6);
    sm::test::write_file(path, original);
    blk_fixture<st::read_only<st::raw_file>> f(
        vio::blk<st::read_only<st::raw_file>>::config{{path, false}});
    BOOST_TEST(vio::has_feature(f.negotiable(), vio::blk_feature::read_only));
    BOOST_TEST(!vio::has_feature(f.negotiable(), vio::blk_feature::discard));
    std::memcpy(f.data_bytes(4096).data(), pattern(4096, 7).data(), 4096);
    auto w = f.request(vio::blk_request::out, 0, {{f.data, 4096, false}});
    BOOST_TEST(w.status == vio::blk_status::io_error);
    BOOST_TEST(f.request(vio::blk_request::in, 0, {{f.data, 4096, true}}).status ==
               vio::blk_status::ok);
    BOOST_TEST(std::memcmp(f.data_bytes(4096).data(), original.data(), 4096) == 0);
    BOOST_TEST((sm::test::read_file(path) == original));

    // raw_file opened read-only behaves the same.
    blk_fixture<st::raw_file> g(raw_config{{path, true}});
    BOOST_TEST(vio::has_feature(g.negotiable(), vio::blk_feature::read_only));
    BOOST_TEST(g.request(vio::blk_request::out, 0, {{g.data, 512, false}}).status ==
               vio::blk_status::io_error);
    BOOST_TEST((sm::test::read_file(path) == original));
}

BOOST_AUTO_TEST_CASE(cow_disk_keeps_its_base_byte_identical) {
    sm::test::temp_dir dir;
    const auto base = dir.file("base.img");
    const auto original = pattern(2 << 20, 8);
    sm::test::write_file(base, original);
    using cow = st::cow_file<st::raw_file>;
    blk_fixture<cow> f(vio::blk<cow>::config{cow::config{{base, true}, "", 64 * 1024}});
    const auto payload = pattern(8192, 9);
    std::memcpy(f.data_bytes(8192).data(), payload.data(), payload.size());
    BOOST_TEST(f.request(vio::blk_request::out, 3, {{f.data, 8192, false}}).status ==
               vio::blk_status::ok);
    std::memset(f.data_bytes(16384).data(), 0, 16384);
    BOOST_TEST(f.request(vio::blk_request::in, 0, {{f.data, 16384, true}}).status ==
               vio::blk_status::ok);
    BOOST_TEST(std::memcmp(f.data_bytes(16384).data(), original.data(), 3 * 512) == 0);
    BOOST_TEST(std::memcmp(f.data_bytes(16384).data() + 3 * 512, payload.data(), 8192) == 0);
    BOOST_TEST(std::memcmp(f.data_bytes(16384).data() + 3 * 512 + 8192,
                           original.data() + 3 * 512 + 8192, 16384 - 3 * 512 - 8192) == 0);
    BOOST_TEST((sm::test::read_file(base) == original));

    // The device carries its overlay into a snapshot: a second device over
    // the same base, restored from it, reads the written data.
    static_assert(vio::saves_state<vio::blk<cow>>);
    static_assert(!vio::saves_state<vio::blk<st::raw_file>>);
    f.t->pause();
    const auto overlay = f.t->core().save_state();
    blk_fixture<cow> g(vio::blk<cow>::config{cow::config{{base, true}, "", 64 * 1024}});
    BOOST_REQUIRE(g.t->core().restore_state(overlay));
    std::memset(g.data_bytes(8192).data(), 0, 8192);
    BOOST_TEST(g.request(vio::blk_request::in, 3, {{g.data, 8192, true}}).status ==
               vio::blk_status::ok);
    BOOST_TEST(std::memcmp(g.data_bytes(8192).data(), payload.data(), 8192) == 0);
}

BOOST_AUTO_TEST_CASE(many_requests_in_flight_and_reset_drains) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    const auto original = pattern(4 << 20, 10);
    sm::test::write_file(path, original);
    blk_fixture<st::raw_file> f(raw_config{{path, false}, "", 64, 4});
    // 32 reads of 4 KiB queued before one kick (indirect: one ring slot each).
    const std::uint16_t before = f.driver.used_index();
    std::vector<std::uint64_t> headers, statuses;
    for (int i = 0; i < 32; ++i) {
        const auto h = f.driver.allocate(16), s = f.driver.allocate(1);
        f.driver.memory()
            .write_object(h, vio::blk_request_header{vio::blk_request::in, 0, std::uint64_t(i) * 8})
            .value();
        f.driver.add_indirect_chain(
            {{h, 16, false}, {f.data + i * 4096, 4096, true}, {s, 1, true}});
        statuses.push_back(s);
    }
    f.env.ring_doorbell(0);
    BOOST_REQUIRE(f.env.run_until([&] { return f.driver.used_index() == before + 32; }));
    BOOST_TEST(std::memcmp(f.data_bytes(32 * 4096).data(), original.data(), 32 * 4096) == 0);
    for (auto s : statuses)
        BOOST_TEST(f.driver.memory().read_object<std::uint8_t>(s).value() == 0);
    // Queue more, kick, and reset at once: every taken request completes
    // before reset returns, and nothing is written afterwards.
    for (int i = 0; i < 16; ++i) {
        const auto h = f.driver.allocate(16), s = f.driver.allocate(1);
        f.driver.memory()
            .write_object(h, vio::blk_request_header{vio::blk_request::in, 0, 0})
            .value();
        f.driver.add_indirect_chain({{h, 16, false}, {f.data, 4096, true}, {s, 1, true}});
    }
    f.env.ring_doorbell(0);
    f.env.io.restart();
    f.env.io.poll(); // the kick handler takes some requests
    f.mmio().write32(vio::mmio_register::device_status, 0);
    const auto used_after_reset = f.driver.used_index();
    f.env.io.restart();
    f.env.io.run_for(std::chrono::milliseconds(50));
    BOOST_TEST(f.driver.used_index() == used_after_reset);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(blk_core)

// The vhost-user transport runs the core and its own protocol on one
// executor: reset() from a handler on that executor must not deadlock.
BOOST_AUTO_TEST_CASE(reset_from_the_executor_thread) {
    sm::test::temp_dir dir;
    const auto path = dir.file("disk.img");
    sm::test::write_file(path, pattern(1 << 20, 11));
    sm::test::test_driver d(64, 8 << 20);
    boost::asio::io_context io;
    auto device = vio::blk<st::raw_file>::create({{path, false}}).value();
    const int kick = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    const int call = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    auto queue = vio::virtqueue::create(d.memory(), d.layout(), vio::common_features).value();
    vio::queue_binding binding{&queue, kick, vio::interrupt_sink(sm::interrupt_line(call))};
    vio::activation act{d.memory(), io.get_executor(), vio::common_features, {&binding, 1}, {}, {}};
    BOOST_REQUIRE(device->activate(act));
    const auto data = d.allocate(4096 * 16, 4096);
    for (int i = 0; i < 16; ++i) {
        const auto h = d.allocate(16), s = d.allocate(1);
        d.memory().write_object(h, vio::blk_request_header{vio::blk_request::in, 0, 0}).value();
        d.add_indirect_chain({{h, 16, false}, {data + i * 4096, 4096, true}, {s, 1, true}});
    }
    const std::uint64_t one = 1;
    BOOST_REQUIRE(::write(kick, &one, sizeof one) == 8);
    bool reset_done = false;
    io.run_for(std::chrono::milliseconds(2)); // the kick is taken, I/O starts
    boost::asio::post(io, [&] {
        device->reset();
        reset_done = true;
    });
    io.run_for(std::chrono::seconds(2));
    BOOST_TEST(reset_done);
    // Whatever was taken from the ring was completed before reset returned.
    BOOST_TEST(d.used_index() == queue.position().next_available);
    std::uint64_t calls = 0;
    BOOST_TEST((d.used_index() == 0 || ::read(call, &calls, 8) == 8));
    ::close(kick);
    ::close(call);
}

BOOST_AUTO_TEST_SUITE_END()
