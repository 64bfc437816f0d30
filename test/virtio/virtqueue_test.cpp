#include "test_driver.hpp"

#include <supermachine/virtio/chain_views.hpp>
#include <supermachine/virtio/virtqueue.hpp>

#include <range/v3/range/conversion.hpp>

#include <boost/test/unit_test.hpp>

#include <limits>

namespace sm = supermachine;
namespace vio = supermachine::virtio;
using sm::test::test_driver;

namespace {
constexpr std::uint64_t all_features = vio::common_features;

vio::virtqueue make_queue(test_driver& d, std::uint64_t features = all_features) {
    return vio::virtqueue::create(d.memory(), d.layout(), features).value();
}

vio::descriptor_chain pop_ok(vio::virtqueue& q) {
    auto popped = q.pop();
    BOOST_REQUIRE(popped.has_value());
    BOOST_REQUIRE(popped.value().has_value());
    BOOST_REQUIRE(popped.value()->chain.has_value());
    return std::move(popped.value()->chain).value();
}

supermachine::error_code pop_error(vio::virtqueue& q) {
    auto popped = q.pop();
    BOOST_REQUIRE(popped.has_value());
    BOOST_REQUIRE(popped.value().has_value());
    BOOST_REQUIRE(!popped.value()->chain.has_value());
    return popped.value()->chain.error();
}
} // namespace

BOOST_AUTO_TEST_SUITE(virtqueue)

BOOST_AUTO_TEST_CASE(layout_is_validated) {
    test_driver d(16);
    auto layout = d.layout();
    BOOST_TEST(vio::virtqueue::validate(d.memory(), layout).has_value());
    auto bad = layout;
    bad.size = 12; // not a power of two
    BOOST_TEST(!vio::virtqueue::validate(d.memory(), bad));
    bad.size = 65536;
    BOOST_TEST(!vio::virtqueue::validate(d.memory(), bad));
    bad.size = 0;
    BOOST_TEST(!vio::virtqueue::validate(d.memory(), bad));
    bad = layout;
    bad.descriptor_table += 8; // misaligned
    BOOST_TEST(!vio::virtqueue::validate(d.memory(), bad));
    bad = layout;
    bad.used_ring = 0x10000 + (4 << 20) - 8; // runs off the end of RAM
    BOOST_TEST(vio::virtqueue::validate(d.memory(), bad).error() == sm::errc::address_out_of_range);
    bad = layout;
    bad.available_ring = std::numeric_limits<std::uint64_t>::max() - 1; // wraps
    BOOST_TEST(!vio::virtqueue::validate(d.memory(), bad));
}

BOOST_AUTO_TEST_CASE(normal_chain_separates_readable_and_writable) {
    test_driver d(8);
    auto q = make_queue(d);
    const auto header = d.allocate(16), data = d.allocate(512), status = d.allocate(1);
    const auto head = d.add_chain({{header, 16, false}, {data, 512, true}, {status, 1, true}});
    auto chain = pop_ok(q);
    BOOST_TEST(chain.head() == head);
    BOOST_TEST(chain.readable().size() == 1u);
    BOOST_TEST(chain.writable().size() == 2u);
    BOOST_TEST(chain.readable_bytes() == 16u);
    BOOST_TEST(chain.writable_bytes() == 513u);
    BOOST_TEST(chain.readable()[0].address == header);
    BOOST_TEST(chain.readable()[0].host.data() == d.host(header, 16).data());
    BOOST_TEST(!q.pop().value().has_value()); // nothing more
    BOOST_TEST(vio::total_length(chain.writable()) == 513u);
    const auto buffers = vio::host_buffers(chain.writable()) | ranges::to<std::vector>();
    BOOST_TEST(buffers.size() == 2u);
    BOOST_TEST(buffers[0].data() == d.host(data, 512).data());
    BOOST_TEST((vio::io_vectors(chain.readable()) | ranges::to<std::vector>())[0].iov_len == 16u);

    BOOST_REQUIRE(q.push_used(head, 513));
    BOOST_TEST(d.used_index() == 1);
    BOOST_TEST(d.used(0).id == head);
    BOOST_TEST(d.used(0).length == 513u);
}

BOOST_AUTO_TEST_CASE(reader_and_writer_cross_segments) {
    test_driver d(8);
    auto q = make_queue(d);
    const auto a = d.allocate(3), b = d.allocate(5), w1 = d.allocate(2), w2 = d.allocate(6);
    for (int i = 0; i < 3; ++i)
        d.host(a, 3)[i] = std::byte(i);
    for (int i = 0; i < 5; ++i)
        d.host(b, 5)[i] = std::byte(3 + i);
    d.add_chain({{a, 3, false}, {b, 5, false}, {w1, 2, true}, {w2, 6, true}});
    auto chain = pop_ok(q);
    vio::chain_reader reader(chain.readable());
    std::array<std::byte, 6> got{};
    BOOST_REQUIRE(reader.skip(1));
    BOOST_REQUIRE(reader.read(got));
    for (int i = 0; i < 6; ++i)
        BOOST_TEST(int(got[i]) == i + 1);
    BOOST_TEST(reader.remaining() == 1u);
    BOOST_TEST(reader.read(got).error() == sm::errc::descriptor_chain_malformed);

    vio::chain_writer writer(chain.writable());
    const std::array<std::byte, 7> out{std::byte(9), std::byte(8), std::byte(7), std::byte(6),
                                       std::byte(5), std::byte(4), std::byte(3)};
    BOOST_REQUIRE(writer.write(out));
    BOOST_TEST(writer.written() == 7u);
    BOOST_TEST(int(d.host(w1, 2)[1]) == 8);
    BOOST_TEST(int(d.host(w2, 6)[4]) == 3);
    BOOST_TEST(writer.write(out).error() == sm::errc::descriptor_chain_malformed); // only 1 left
}

BOOST_AUTO_TEST_CASE(indirect_chain) {
    test_driver d(8);
    auto q = make_queue(d);
    const auto h = d.allocate(16), x = d.allocate(4096), s = d.allocate(1);
    const auto head = d.add_indirect_chain({{h, 16, false}, {x, 4096, true}, {s, 1, true}});
    auto chain = pop_ok(q);
    BOOST_TEST(chain.head() == head);
    BOOST_TEST(chain.readable_bytes() == 16u);
    BOOST_TEST(chain.writable_bytes() == 4097u);
}

BOOST_AUTO_TEST_CASE(indirect_refused_without_the_feature) {
    test_driver d(8);
    auto q = make_queue(d, vio::feature_bit(vio::feature::version_1));
    const auto h = d.allocate(16);
    d.add_indirect_chain({{h, 16, false}});
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
}

BOOST_AUTO_TEST_CASE(hostile_indirect_tables) {
    test_driver d(8);
    auto q = make_queue(d);
    const auto buf = d.allocate(64);
    const auto table = d.allocate(16 * 4);
    auto indirect_at = [&](std::uint64_t address, std::uint32_t length, std::uint16_t flags) {
        d.write_descriptor(0, {address, length, flags, 0});
        d.make_available(0);
    };
    // length not a multiple of 16
    indirect_at(table, 20, vio::descriptor_flag::indirect);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // zero length
    indirect_at(table, 0, vio::descriptor_flag::indirect);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // INDIRECT together with NEXT
    d.memory().write_object(table, vio::raw_descriptor{buf, 8, 0, 0}).value();
    indirect_at(table, 16, vio::descriptor_flag::indirect | vio::descriptor_flag::next);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // table outside RAM
    indirect_at(0x1'0000'0000ull, 16, vio::descriptor_flag::indirect);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // table bigger than the bound
    indirect_at(table, 16 * (vio::max_indirect_descriptors + 1), vio::descriptor_flag::indirect);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // nested indirect
    d.memory()
        .write_object(table, vio::raw_descriptor{table, 16, vio::descriptor_flag::indirect, 0})
        .value();
    indirect_at(table, 16, vio::descriptor_flag::indirect);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // a loop inside the table: 0 -> 1 -> 0
    d.memory()
        .write_object(table, vio::raw_descriptor{buf, 8, vio::descriptor_flag::next, 1})
        .value();
    d.memory()
        .write_object(table + 16, vio::raw_descriptor{buf, 8, vio::descriptor_flag::next, 0})
        .value();
    indirect_at(table, 32, vio::descriptor_flag::indirect);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // next index beyond the table
    d.memory()
        .write_object(table, vio::raw_descriptor{buf, 8, vio::descriptor_flag::next, 7})
        .value();
    indirect_at(table, 32, vio::descriptor_flag::indirect);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // and a good one still works afterwards
    d.memory().write_object(table, vio::raw_descriptor{buf, 8, 0, 0}).value();
    indirect_at(table, 16,
                vio::descriptor_flag::indirect | vio::descriptor_flag::write); // WRITE ignored
    BOOST_TEST(pop_ok(q).readable_bytes() == 8u);
}

BOOST_AUTO_TEST_CASE(hostile_direct_chains) {
    test_driver d(8);
    auto q = make_queue(d);
    const auto buf = d.allocate(64);
    // loop: 0 -> 1 -> 0
    d.write_descriptor(0, {buf, 8, vio::descriptor_flag::next, 1});
    d.write_descriptor(1, {buf, 8, vio::descriptor_flag::next, 0});
    d.make_available(0);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // self loop
    d.write_descriptor(2, {buf, 8, vio::descriptor_flag::next, 2});
    d.make_available(2);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // next out of the table
    d.write_descriptor(0, {buf, 8, vio::descriptor_flag::next, 8});
    d.make_available(0);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // head out of the table
    d.make_available(9);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // buffer outside guest RAM / straddling its end / wrapping the address space
    d.write_descriptor(0, {0x100, 8, 0, 0});
    d.make_available(0);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    d.write_descriptor(0, {test_driver::guest_base + (4 << 20) - 4, 8, 0, 0});
    d.make_available(0);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    d.write_descriptor(0, {std::numeric_limits<std::uint64_t>::max() - 3, 8, 0, 0});
    d.make_available(0);
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // readable after writable
    d.add_chain({{buf, 8, true}, {buf + 8, 8, false}});
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
    // the malformed chain is consumed; a good one follows
    d.add_chain({{buf, 8, false}});
    BOOST_TEST(pop_ok(q).readable_bytes() == 8u);
}

BOOST_AUTO_TEST_CASE(buffers_across_adjacent_regions_are_split) {
    test_driver d(8);
    // A second region right after the test memory, plus one with a gap after it.
    const std::uint64_t end = test_driver::guest_base + (4 << 20);
    alignas(4096) static std::byte second[8192], third[4096];
    auto& memory = d.mutable_memory();
    BOOST_REQUIRE(memory.add_region({end, second}));
    BOOST_REQUIRE(memory.add_region({end + 8192 + 4096, third})); // a hole before it
    auto q = make_queue(d);
    d.add_chain({{end - 100, 300, true}}); // 100 bytes in the first region, 200 in the second
    auto chain = pop_ok(q);
    BOOST_TEST(chain.writable().size() == 2u);
    BOOST_TEST(chain.writable_bytes() == 300u);
    BOOST_TEST(chain.writable()[1].host.data() == second);
    d.add_chain({{end + 8000, 300, true}}); // runs into the hole
    BOOST_TEST(pop_error(q) == sm::errc::descriptor_chain_malformed);
}

BOOST_AUTO_TEST_CASE(chain_length_bounded_by_queue_size) {
    test_driver d(4);
    auto q = make_queue(d);
    const auto buf = d.allocate(64);
    // Exactly 4 descriptors is legal; 5 is impossible without a loop.
    d.add_chain({{buf, 1, false}, {buf, 1, false}, {buf, 1, false}, {buf, 1, false}}, 0);
    BOOST_TEST(pop_ok(q).segments().size() == 4u);
}

BOOST_AUTO_TEST_CASE(available_index_jump_breaks_the_queue) {
    test_driver d(8);
    auto q = make_queue(d);
    d.set_available_index(9); // 9 new entries in an 8-entry queue
    BOOST_TEST(q.pop().error() == sm::errc::device_broken);
    BOOST_TEST(q.broken());
    BOOST_TEST(q.push_used(0, 0).error() == sm::errc::device_broken);
}

BOOST_AUTO_TEST_CASE(indices_wrap_at_65536) {
    test_driver d(8);
    vio::queue_position start{65534, 65534, 65534, true};
    auto q = vio::virtqueue::create(d.memory(), d.layout(), all_features, start).value();
    d.set_available_index(65534);
    d.write16(d.layout().used_ring + 2, 65534);
    const auto buf = d.allocate(8);
    for (int i = 0; i < 4; ++i)
        d.add_chain({{buf, 8, true}});
    BOOST_TEST(d.available_index() == 2); // wrapped
    for (int i = 0; i < 4; ++i) {
        auto c = pop_ok(q);
        BOOST_REQUIRE(q.push_used(c.head(), 8));
    }
    BOOST_TEST(!q.pop().value().has_value());
    BOOST_TEST(d.used_index() == 2);
    BOOST_TEST(q.position().next_available == 2);
}

BOOST_AUTO_TEST_CASE(event_index_suppresses_interrupts) {
    test_driver d(8);
    auto q = make_queue(d);
    const auto buf = d.allocate(8);
    for (int i = 0; i < 3; ++i)
        d.add_chain({{buf, 8, true}});
    d.set_used_event(1); // driver: interrupt me once used idx passes 1
    auto c0 = pop_ok(q);
    BOOST_REQUIRE(q.push_used(c0.head(), 0));
    BOOST_TEST(q.should_notify()); // first time always
    auto c1 = pop_ok(q);
    BOOST_REQUIRE(q.push_used(c1.head(), 0)); // used idx 2 passes event 1
    BOOST_TEST(q.should_notify());
    auto c2 = pop_ok(q);
    BOOST_REQUIRE(q.push_used(c2.head(), 0)); // used idx 3: event still 1, already signalled
    BOOST_TEST(!q.should_notify());
    d.set_used_event(2);
    BOOST_TEST(!q.should_notify());                 // nothing new pushed
    BOOST_TEST(vio::need_event(0xffff, 0, 0xfffe)); // wrap-around
    BOOST_TEST(!vio::need_event(5, 5, 4));
    BOOST_TEST(vio::need_event(4, 5, 4));
}

BOOST_AUTO_TEST_CASE(event_index_asks_for_kicks) {
    test_driver d(8);
    auto q = make_queue(d);
    const auto buf = d.allocate(8);
    d.add_chain({{buf, 8, true}});
    pop_ok(q);
    BOOST_TEST(!q.enable_notifications());
    BOOST_TEST(d.available_event() == 1); // kick me when avail idx passes 1
    d.add_chain({{buf, 8, true}});
    BOOST_TEST(q.enable_notifications()); // raced: process without a kick
}

BOOST_AUTO_TEST_CASE(flags_without_event_index) {
    test_driver d(8);
    auto q = make_queue(d, vio::feature_bit(vio::feature::version_1));
    const auto buf = d.allocate(8);
    d.add_chain({{buf, 8, true}});
    q.disable_notifications();
    BOOST_TEST(d.used_flags() == vio::ring_flag::used_no_notify);
    BOOST_TEST(q.enable_notifications()); // one is waiting
    BOOST_TEST(d.used_flags() == 0);
    auto c = pop_ok(q);
    BOOST_TEST(!q.enable_notifications());
    BOOST_REQUIRE(q.push_used(c.head(), 0));
    d.set_available_flags(vio::ring_flag::available_no_interrupt);
    BOOST_TEST(!q.should_notify());
    d.add_chain({{buf, 8, true}});
    BOOST_REQUIRE(q.push_used(pop_ok(q).head(), 0));
    d.set_available_flags(0);
    BOOST_TEST(q.should_notify());
}

BOOST_AUTO_TEST_SUITE_END()
