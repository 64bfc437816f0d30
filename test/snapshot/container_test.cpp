// The container format against hostile files: truncations, huge counts and
// lengths, bad tags, duplicates, wrong magic and version, RAM past EOF.
#include "sample.hpp"

#include <supermachine/snapshot/container.hpp>

#include <boost/test/unit_test.hpp>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <string>

namespace s = supermachine::snapshot;
namespace t = supermachine::test;
using supermachine::errc;

namespace {

constexpr std::uint64_t small_ram = 4 * s::page_size;

std::vector<std::byte> valid_file() {
    const auto ram = t::sample_ram(small_ram);
    return s::encode_snapshot(t::sample_records(small_ram), ram).value();
}

errc parse_error(std::span<const std::byte> file) {
    auto r = s::parse_snapshot(file);
    return r ? errc::success : r.error();
}

/// Offsets of every record's length field, and of every u32 count/length
/// inside the record payloads we know how to locate.
std::set<std::size_t> record_length_offsets(std::span<const std::byte> body) {
    std::set<std::size_t> offsets;
    s::byte_reader in(body);
    while (!in.at_end()) {
        const auto at = in.position();
        const auto tag = in.u16().value();
        in.u16().value();
        const auto length = in.u32().value();
        offsets.insert(s::header_size + at + 4);
        const auto payload = s::header_size + at + 8;
        if (tag == static_cast<std::uint16_t>(s::record_tag::vcpu))
            offsets.insert(payload + 4); // state length
        if (tag == static_cast<std::uint16_t>(s::record_tag::interrupt_controller))
            offsets.insert(payload);
        if (tag == static_cast<std::uint16_t>(s::record_tag::machine))
            offsets.insert(payload + 12); // identity
        if (tag == static_cast<std::uint16_t>(s::record_tag::virtio_device))
            offsets.insert(payload + 16); // transport
        in.skip(length).value();
    }
    return offsets;
}

} // namespace

BOOST_AUTO_TEST_SUITE(snapshot_container)

BOOST_AUTO_TEST_CASE(round_trip_keeps_every_record_and_the_ram) {
    const auto ram = t::sample_ram(small_ram);
    const auto records = t::sample_records(small_ram);
    auto file = s::encode_snapshot(records, ram).value();
    auto parsed = s::parse_snapshot(file);
    BOOST_REQUIRE(parsed.has_value());
    BOOST_TEST((parsed.value().records == records));
    BOOST_TEST(
        std::equal(ram.begin(), ram.end(), parsed.value().ram.begin(), parsed.value().ram.end()));
    BOOST_TEST(parsed.value().header.ram_offset % s::page_size == 0u);
    BOOST_TEST(parsed.value().header.ram_offset >=
               s::header_size + parsed.value().header.body_length);
}

BOOST_AUTO_TEST_CASE(every_truncation_is_a_clean_error) {
    const auto file = valid_file();
    for (std::size_t n = 0; n < file.size(); ++n) {
        const auto e = parse_error(std::span(file).first(n));
        BOOST_TEST_REQUIRE((e == errc::snapshot_truncated), "length " << n);
    }
    auto longer = file;
    longer.push_back(std::byte{0});
    BOOST_TEST((parse_error(longer) == errc::snapshot_bad_record));
}

BOOST_AUTO_TEST_CASE(every_truncation_of_the_body_is_an_error_or_a_record_boundary) {
    const auto body = s::encode_body(t::sample_records(small_ram)).value();
    std::set<std::size_t> boundaries;
    for (std::size_t at : record_length_offsets(body))
        boundaries.insert(at - 4 - s::header_size);
    boundaries.insert(body.size());
    std::size_t errors = 0;
    for (std::size_t n = 0; n < body.size(); ++n) {
        auto r = s::decode_body(std::span(body).first(n));
        if (r) {
            // Dropping whole trailing optional records leaves a valid, smaller body.
            BOOST_TEST_REQUIRE(boundaries.count(n) == 1u, "length " << n);
        } else {
            ++errors;
        }
    }
    BOOST_TEST(errors > body.size() - 20);
}

BOOST_AUTO_TEST_CASE(all_ones_in_any_body_word_is_clean) {
    // Every 4-byte window of the body set to 0xFFFFFFFF (checksums fixed so the
    // parser sees it): never a crash, never a huge allocation, and an error
    // wherever it lands on a count or length.
    const auto file = valid_file();
    const auto header = s::decode_header(file).value();
    const auto lengths =
        record_length_offsets(std::span(file).subspan(s::header_size, header.body_length));
    for (std::size_t at = s::header_size; at + 4 <= s::header_size + header.body_length; ++at) {
        auto edited = file;
        for (int i = 0; i < 4; ++i)
            edited[at + i] = std::byte{0xff};
        t::reseal(edited);
        const auto e = parse_error(edited);
        if (lengths.count(at)) BOOST_TEST_REQUIRE((e != errc::success), "offset " << at);
    }
}

BOOST_AUTO_TEST_CASE(all_ones_in_header_fields_is_clean) {
    const auto file = valid_file();
    for (std::size_t at = 8; at + 4 <= 60; ++at) {
        auto edited = file;
        for (int i = 0; i < 4; ++i)
            edited[at + i] = std::byte{0xff};
        t::reseal(edited);
        if (at != 48) // exactly the body checksum: reseal rewrites it
            BOOST_TEST_REQUIRE((parse_error(edited) != errc::success), "offset " << at);
        // Without the checksum fixed, the header checksum (or version) catches it.
        auto unsealed = file;
        for (int i = 0; i < 4; ++i)
            unsealed[at + i] = std::byte{0xff};
        BOOST_TEST_REQUIRE((parse_error(unsealed) != errc::success), "offset " << at);
    }
}

BOOST_AUTO_TEST_CASE(huge_claims_do_not_allocate_under_a_low_address_space_limit) {
    // In a child process limited to its current size plus 64 MiB, a vector of
    // 0xFFFFFFFF elements (what a trusted count would ask for) cannot be made.
    // Under AddressSanitizer RLIMIT_AS cannot be lowered (its shadow memory
    // is reserved up front); there ASan itself aborts on such an allocation.
    const auto file = valid_file();
    const pid_t child = ::fork();
    BOOST_REQUIRE(child >= 0);
    if (child == 0) {
#if !defined(__SANITIZE_ADDRESS__)
        std::ifstream status("/proc/self/status");
        std::string line;
        std::uint64_t vm_size_kib = 0;
        while (std::getline(status, line))
            if (line.rfind("VmSize:", 0) == 0) vm_size_kib = std::stoull(line.substr(7));
        const rlim_t limit = (vm_size_kib << 10) + (64u << 20);
        const rlimit lim{limit, limit};
        if (::setrlimit(RLIMIT_AS, &lim) != 0) ::_exit(3);
#endif
        try {
            for (std::size_t at = s::header_size; at + 4 <= file.size() - small_ram; ++at) {
                auto edited = file;
                for (int i = 0; i < 4; ++i)
                    edited[at + i] = std::byte{0xff};
                t::reseal(edited);
                (void)s::parse_snapshot(edited);
            }
        } catch (...) {
            ::_exit(2); // bad_alloc: something trusted a count
        }
        ::_exit(0);
    }
    int status = 0;
    BOOST_REQUIRE(::waitpid(child, &status, 0) == child);
    BOOST_TEST(WIFEXITED(status));
    BOOST_TEST(WEXITSTATUS(status) == 0);
}

BOOST_AUTO_TEST_CASE(wrong_magic_and_version) {
    auto file = valid_file();
    auto bad_magic = file;
    bad_magic[0] = std::byte{'X'};
    BOOST_TEST((parse_error(bad_magic) == errc::snapshot_bad_magic));
    auto v2 = file;
    v2[8] = std::byte{2};
    BOOST_TEST((parse_error(v2) == errc::snapshot_unsupported_version));
    t::reseal(v2);
    BOOST_TEST((parse_error(v2) == errc::snapshot_unsupported_version));
    auto flagged = file;
    flagged[12] = std::byte{1};
    t::reseal(flagged);
    BOOST_TEST((parse_error(flagged) == errc::snapshot_unsupported_version));
    auto corrupt_body = file;
    corrupt_body[s::header_size + 3] ^= std::byte{1};
    BOOST_TEST((parse_error(corrupt_body) == errc::snapshot_bad_record)); // body checksum
}

BOOST_AUTO_TEST_CASE(ram_region_is_checked_against_the_file_size) {
    const auto file = valid_file();
    auto header = s::decode_header(file).value();
    auto with = [&](auto edit) {
        auto h = header;
        edit(h);
        auto edited = file;
        const auto bytes = s::encode_header(h);
        std::copy(bytes.begin(), bytes.end(), edited.begin());
        return parse_error(edited);
    };
    BOOST_TEST((with([&](auto& h) { h.ram_offset = file.size() + s::page_size; }) ==
                errc::snapshot_truncated));
    BOOST_TEST((with([&](auto& h) { h.ram_size += s::page_size; }) == errc::snapshot_truncated));
    BOOST_TEST((with([&](auto& h) { h.ram_offset = ~std::uint64_t{0} & ~(s::page_size - 1); }) ==
                errc::snapshot_truncated));
    BOOST_TEST((with([&](auto& h) { h.ram_size = ~std::uint64_t{0} & ~(s::page_size - 1); }) ==
                errc::snapshot_too_large));
    BOOST_TEST((with([&](auto& h) { h.ram_offset += 1; }) ==
                errc::snapshot_bad_record)); // not page aligned
    BOOST_TEST((with([&](auto& h) { h.ram_offset = 0; }) ==
                errc::snapshot_bad_record)); // overlaps the body
    BOOST_TEST(
        (with([&](auto& h) { h.body_length = ~std::uint64_t{0}; }) == errc::snapshot_too_large));
    BOOST_TEST((with([&](auto& h) { h.body_length += 1; }) ==
                errc::snapshot_bad_record)); // checksum of more bytes
    BOOST_TEST((with([&](auto& h) { h.ram_size = 0; }) == errc::snapshot_bad_record));
}

BOOST_AUTO_TEST_CASE(unknown_tags_flags_and_duplicates) {
    const auto records = t::sample_records(small_ram);
    const auto ram = t::sample_ram(small_ram);
    const auto body = s::encode_body(records).value();
    const std::array<std::byte, 5> payload{};
    auto parse_body = [&](const std::vector<std::byte>& b) {
        auto r = s::parse_snapshot(t::forge_file(b, ram));
        return r ? errc::success : r.error();
    };
    BOOST_TEST((parse_body(body) == errc::success));

    auto unknown = body;
    t::append_record(unknown, 99, 0, payload);
    BOOST_TEST((parse_body(unknown) == errc::snapshot_bad_record));

    auto optional_unknown = body;
    t::append_record(optional_unknown, 99, s::record_optional, payload);
    auto parsed = s::parse_snapshot(t::forge_file(optional_unknown, ram));
    BOOST_REQUIRE(parsed.has_value()); // skipped by its length
    BOOST_TEST((parsed.value().records == records));

    auto unknown_flag = body;
    t::append_record(unknown_flag, 99, 0x8000 | s::record_optional, payload);
    BOOST_TEST((parse_body(unknown_flag) == errc::snapshot_bad_record));

    const auto uart = s::encode_to_vector(*records.uart).value();
    auto second_uart = body;
    t::append_record(second_uart, static_cast<std::uint16_t>(s::record_tag::uart), 0, uart);
    BOOST_TEST((parse_body(second_uart) == errc::snapshot_bad_record));

    const auto machine = s::encode_to_vector(records.machine).value();
    auto second_machine = body;
    t::append_record(second_machine, static_cast<std::uint16_t>(s::record_tag::machine), 0,
                     machine);
    BOOST_TEST((parse_body(second_machine) == errc::snapshot_bad_record));

    auto extra_vcpu = body; // machine says 2
    t::append_record(extra_vcpu, static_cast<std::uint16_t>(s::record_tag::vcpu), 0,
                     s::encode_to_vector(s::vcpu_record{2, {}}).value());
    BOOST_TEST((parse_body(extra_vcpu) == errc::snapshot_bad_record));

    std::vector<std::byte> no_machine_first;
    t::append_record(no_machine_first, static_cast<std::uint16_t>(s::record_tag::uart), 0, uart);
    BOOST_TEST((parse_body(no_machine_first) == errc::snapshot_bad_record));

    auto device = records.virtio_devices.front();
    device.kind = static_cast<s::virtio_device_kind>(77);
    BOOST_TEST(
        (s::encode_to_vector(device).error() == errc::snapshot_bad_record)); // writer refuses too
    device.kind = s::virtio_device_kind::block;
    auto bytes = s::encode_to_vector(device).value();
    bytes[0] = std::byte{77}; // kind is the first field
    auto bad_kind = body;
    t::append_record(bad_kind, static_cast<std::uint16_t>(s::record_tag::virtio_device), 0, bytes);
    BOOST_TEST((parse_body(bad_kind) == errc::snapshot_bad_record));

    auto trailing = body;
    auto uart_plus = uart;
    uart_plus.push_back(std::byte{0});
    auto no_uart = records;
    no_uart.uart.reset();
    auto base = s::encode_body(no_uart).value();
    t::append_record(base, static_cast<std::uint16_t>(s::record_tag::uart), 0, uart_plus);
    BOOST_TEST((parse_body(base) == errc::snapshot_bad_record)); // record longer than its fields
}

BOOST_AUTO_TEST_CASE(writer_refuses_what_the_reader_would_refuse) {
    auto records = t::sample_records(small_ram);
    records.vcpus[0].state.resize(s::max_vcpu_state_bytes + 1);
    BOOST_TEST((s::encode_body(records).error() == errc::snapshot_too_large));
    records = t::sample_records(small_ram);
    records.vcpus.pop_back();
    BOOST_TEST((s::encode_body(records).error() == errc::snapshot_bad_record));
    records = t::sample_records(small_ram);
    records.machine.memory_size = 4097;
    BOOST_TEST((s::encode_body(records).error() == errc::snapshot_bad_record));
    const auto ram = t::sample_ram(small_ram);
    BOOST_TEST((s::encode_snapshot(t::sample_records(2 * small_ram), ram).error() ==
                errc::invalid_argument));
}

BOOST_AUTO_TEST_SUITE_END()
