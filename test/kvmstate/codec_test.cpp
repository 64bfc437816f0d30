// The KVM state blobs without KVM: round trips, and hostile blobs
// (truncations, huge counts, bad versions, repeated or unknown sections).
#include "sample_state.hpp"

#include <supermachine/backend/kvm_state.hpp>
#include <supermachine/snapshot/records.hpp>

#include <boost/test/unit_test.hpp>

#include <cstring>
#include <map>

using namespace supermachine;
namespace ks = supermachine::backend::kvm_state;

namespace {

std::uint32_t read_u32(const std::vector<std::byte>& blob, std::size_t at) {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i)
        v |= std::uint32_t{std::to_integer<std::uint8_t>(blob[at + i])} << (8 * i);
    return v;
}

void write_u32(std::vector<std::byte>& blob, std::size_t at, std::uint32_t v) {
    for (int i = 0; i < 4; ++i)
        blob[at + i] = static_cast<std::byte>(v >> (8 * i));
}

void append_u32(std::vector<std::byte>& blob, std::uint32_t v) {
    blob.resize(blob.size() + 4);
    write_u32(blob, blob.size() - 4, v);
}

// tag -> offset of the section's tag field.
std::map<std::uint32_t, std::size_t> sections(const std::vector<std::byte>& blob) {
    std::map<std::uint32_t, std::size_t> at;
    for (std::size_t p = 12; p + 8 <= blob.size(); p += 8 + read_u32(blob, p + 4))
        at[read_u32(blob, p)] = p;
    return at;
}

std::vector<std::byte> section_bytes(const std::vector<std::byte>& blob, std::size_t at) {
    const auto length = read_u32(blob, at + 4);
    return {blob.begin() + static_cast<std::ptrdiff_t>(at),
            blob.begin() + static_cast<std::ptrdiff_t>(at + 8 + length)};
}

// Tests that add or remove sections keep the header's body length right,
// so the decoder gets to the part under test.
std::vector<std::byte> reframed(std::vector<std::byte> blob) {
    write_u32(blob, 8, static_cast<std::uint32_t>(blob.size() - 12));
    return blob;
}

supermachine::error_code vcpu_error(const std::vector<std::byte>& blob) {
    auto r = ks::decode_vcpu_state(blob);
    return r ? supermachine::error_code{} : r.error();
}

supermachine::error_code vm_error(const std::vector<std::byte>& blob) {
    auto r = ks::decode_vm_state(blob);
    return r ? supermachine::error_code{} : r.error();
}

} // namespace

BOOST_AUTO_TEST_CASE(vcpu_state_round_trips_with_xsave_and_with_fpu) {
    for (bool xsave : {true, false}) {
        auto state = test::sample_vcpu_state(xsave);
        auto blob = ks::encode_vcpu_state(state);
        BOOST_REQUIRE(blob);
        auto back = ks::decode_vcpu_state(blob.value());
        BOOST_REQUIRE(back);
        BOOST_TEST(test::same_vcpu_state(state, back.value()));
        // Encoding is deterministic.
        BOOST_TEST((ks::encode_vcpu_state(back.value()).value() == blob.value()));
        BOOST_TEST(read_u32(blob.value(), 0) == ks::vcpu_state_magic);
        BOOST_TEST(read_u32(blob.value(), 4) == ks::vcpu_state_version);
    }
}

BOOST_AUTO_TEST_CASE(vm_state_round_trips) {
    auto state = test::sample_vm_state();
    auto blob = ks::encode_vm_state(state);
    BOOST_REQUIRE(blob);
    auto back = ks::decode_vm_state(blob.value());
    BOOST_REQUIRE(back);
    BOOST_TEST(test::same_bytes(back.value().pic_master, state.pic_master));
    BOOST_TEST(test::same_bytes(back.value().pic_slave, state.pic_slave));
    BOOST_TEST(test::same_bytes(back.value().ioapic, state.ioapic));
    BOOST_REQUIRE(back.value().pit.has_value());
    BOOST_TEST(test::same_bytes(*back.value().pit, *state.pit));
    BOOST_TEST(test::same_bytes(back.value().clock, state.clock));
    BOOST_TEST(back.value().captured_at_realtime_ns == state.captured_at_realtime_ns);
    // Without a PIT.
    state.pit.reset();
    auto no_pit = ks::decode_vm_state(ks::encode_vm_state(state).value());
    BOOST_REQUIRE(no_pit);
    BOOST_TEST(!no_pit.value().pit.has_value());
}

BOOST_AUTO_TEST_CASE(every_truncation_is_a_clean_error) {
    const auto vcpu = ks::encode_vcpu_state(test::sample_vcpu_state()).value();
    for (std::size_t n = 0; n < vcpu.size(); ++n) {
        std::vector<std::byte> cut(vcpu.begin(), vcpu.begin() + static_cast<std::ptrdiff_t>(n));
        BOOST_TEST_REQUIRE(!ks::decode_vcpu_state(cut), "vcpu blob cut at " << n);
    }
    // A cut at a section boundary, or bytes added after the end, disagree
    // with the header's length even where the sections left would decode.
    auto at = sections(vcpu);
    std::vector<std::byte> at_boundary(
        vcpu.begin(), vcpu.begin() + static_cast<std::ptrdiff_t>(at[ks::tag::cpuid]));
    BOOST_TEST(vcpu_error(at_boundary) == make_error_code(errc::snapshot_truncated));
    BOOST_TEST(!vcpu_error(reframed(at_boundary))); // cpuid is optional
    auto longer = vcpu;
    longer.push_back(std::byte{0});
    BOOST_TEST(vcpu_error(longer) == make_error_code(errc::snapshot_bad_record));
    const auto vm = ks::encode_vm_state(test::sample_vm_state()).value();
    for (std::size_t n = 0; n < vm.size(); ++n) {
        std::vector<std::byte> cut(vm.begin(), vm.begin() + static_cast<std::ptrdiff_t>(n));
        BOOST_TEST_REQUIRE(!ks::decode_vm_state(cut), "vm blob cut at " << n);
    }
}

BOOST_AUTO_TEST_CASE(wrong_magic_and_version_are_named) {
    auto blob = ks::encode_vcpu_state(test::sample_vcpu_state()).value();
    auto bad_magic = blob;
    bad_magic[0] ^= std::byte{1};
    BOOST_TEST(vcpu_error(bad_magic) == make_error_code(errc::snapshot_bad_magic));
    for (std::uint32_t version : {0u, 2u, 0xffffffffu}) {
        auto other = blob;
        write_u32(other, 4, version);
        BOOST_TEST(vcpu_error(other) == make_error_code(errc::snapshot_unsupported_version));
    }
    // A VM blob is not a vCPU blob and the other way round.
    auto vm = ks::encode_vm_state(test::sample_vm_state()).value();
    BOOST_TEST(vcpu_error(vm) == make_error_code(errc::snapshot_bad_magic));
    BOOST_TEST(vm_error(blob) == make_error_code(errc::snapshot_bad_magic));
    auto vm_v2 = vm;
    write_u32(vm_v2, 4, 2);
    BOOST_TEST(vm_error(vm_v2) == make_error_code(errc::snapshot_unsupported_version));
}

BOOST_AUTO_TEST_CASE(huge_counts_and_lengths_are_refused_before_allocating) {
    const auto blob = ks::encode_vcpu_state(test::sample_vcpu_state()).value();
    auto at = sections(blob);
    // Element counts inside sections.
    for (auto t : {ks::tag::msrs, ks::tag::msrs_refused, ks::tag::cpuid}) {
        BOOST_REQUIRE(at.count(t));
        auto bad = blob;
        write_u32(bad, at[t] + 8, 0xffffffff);
        BOOST_TEST(vcpu_error(bad) == make_error_code(errc::snapshot_too_large));
        write_u32(bad, at[t] + 8, 250); // within every bound, beyond the bytes
        BOOST_TEST(vcpu_error(bad) == make_error_code(errc::snapshot_truncated));
    }
    // Section lengths.
    for (auto [t, offset] : at) {
        auto bad = blob;
        write_u32(bad, offset + 4, 0xffffffff);
        BOOST_TEST(vcpu_error(bad) == make_error_code(errc::snapshot_too_large));
    }
    // Every u32 field anywhere set to 0xffffffff: an error or a value, never a crash.
    for (std::size_t p = 0; p + 4 <= blob.size(); ++p) {
        auto bad = blob;
        write_u32(bad, p, 0xffffffff);
        (void)ks::decode_vcpu_state(bad);
    }
    const auto vm = ks::encode_vm_state(test::sample_vm_state()).value();
    for (std::size_t p = 0; p + 4 <= vm.size(); ++p) {
        auto bad = vm;
        write_u32(bad, p, 0xffffffff);
        (void)ks::decode_vm_state(bad);
    }
}

BOOST_AUTO_TEST_CASE(repeated_unknown_missing_and_missized_sections_are_malformed) {
    const auto blob = ks::encode_vcpu_state(test::sample_vcpu_state()).value();
    auto at = sections(blob);
    const auto bad_record = make_error_code(errc::snapshot_bad_record);

    auto repeated = blob;
    auto regs = section_bytes(blob, at[ks::tag::regs]);
    repeated.insert(repeated.end(), regs.begin(), regs.end());
    BOOST_TEST(vcpu_error(reframed(repeated)) == bad_record);

    for (std::uint32_t unknown : {0u, ks::tag::last_vcpu + 1, 63u, 64u, 0xffffffffu}) {
        auto extra = blob;
        append_u32(extra, unknown);
        append_u32(extra, 0);
        BOOST_TEST(vcpu_error(reframed(extra)) == bad_record);
    }

    // Dropping any required section.
    for (auto t : {ks::tag::regs, ks::tag::sregs, ks::tag::msrs, ks::tag::lapic, ks::tag::mp_state,
                   ks::tag::tsc_khz, ks::tag::xsave}) {
        auto without = blob;
        const auto begin = at[t];
        const auto end = begin + 8 + read_u32(blob, begin + 4);
        without.erase(without.begin() + static_cast<std::ptrdiff_t>(begin),
                      without.begin() + static_cast<std::ptrdiff_t>(end));
        BOOST_TEST(vcpu_error(reframed(without)) == bad_record, "without section " << t);
    }

    // XSAVE and FPU both present.
    auto fpu_blob = ks::encode_vcpu_state(test::sample_vcpu_state(false)).value();
    auto both = blob;
    auto fpu = section_bytes(fpu_blob, sections(fpu_blob)[ks::tag::fpu]);
    both.insert(both.end(), fpu.begin(), fpu.end());
    BOOST_TEST(vcpu_error(reframed(both)) == bad_record);

    // A fixed-size struct one byte short (and the blob still consistent).
    {
        auto state = test::sample_vcpu_state();
        auto bytes = blob;
        const auto p = at[ks::tag::regs];
        write_u32(bytes, p + 4, sizeof(kvm_regs) - 1);
        bytes.erase(bytes.begin() + static_cast<std::ptrdiff_t>(p + 8));
        BOOST_TEST(vcpu_error(reframed(bytes)) == bad_record);
    }
}

BOOST_AUTO_TEST_CASE(field_values_are_checked) {
    const auto bad_record = make_error_code(errc::snapshot_bad_record);
    auto duplicate_msr = test::sample_vcpu_state();
    duplicate_msr.msrs.push_back({0x10, 1});
    BOOST_TEST(vcpu_error(ks::encode_vcpu_state(duplicate_msr).value()) == bad_record);

    auto xcrs = test::sample_vcpu_state();
    xcrs.xcrs->nr_xcrs = ks::max_xcrs + 1;
    BOOST_TEST(vcpu_error(ks::encode_vcpu_state(xcrs).value()) == bad_record);

    auto mp = test::sample_vcpu_state();
    mp.mp_state.mp_state = 99;
    BOOST_TEST(vcpu_error(ks::encode_vcpu_state(mp).value()) == bad_record);

    auto xsave = test::sample_vcpu_state();
    xsave.xsave.resize(4095);
    BOOST_TEST(vcpu_error(ks::encode_vcpu_state(xsave).value()) == bad_record);

    auto vm = test::sample_vm_state();
    std::swap(vm.pic_master, vm.pic_slave);
    BOOST_TEST(vm_error(ks::encode_vm_state(vm).value()) == bad_record);
}

BOOST_AUTO_TEST_CASE(encoder_refuses_what_the_decoder_would) {
    auto many = test::sample_vcpu_state();
    many.msrs.resize(ks::max_msrs + 1);
    BOOST_TEST(!ks::encode_vcpu_state(many));
    auto big = test::sample_vcpu_state();
    big.xsave.resize(ks::max_xsave_bytes + 4);
    BOOST_TEST(!ks::encode_vcpu_state(big));
}

BOOST_AUTO_TEST_CASE(the_largest_valid_state_fits_a_snapshot_vcpu_record) {
    auto s = test::sample_vcpu_state();
    s.msrs.clear();
    for (std::uint32_t i = 0; i < ks::max_msrs; ++i)
        s.msrs.push_back({i, i});
    s.msrs_refused.assign(ks::max_msrs, 1);
    s.cpuid.resize(ks::max_cpuid_entries);
    s.xsave.assign(ks::max_xsave_bytes, std::byte{1});
    auto blob = ks::encode_vcpu_state(s);
    BOOST_REQUIRE(blob);
    BOOST_TEST(blob.value().size() <= snapshot::max_vcpu_state_bytes);
    auto back = ks::decode_vcpu_state(blob.value());
    BOOST_REQUIRE(back);
    BOOST_TEST(back.value().msrs.size() == ks::max_msrs);
    // And the VM blob fits its record.
    BOOST_TEST(ks::encode_vm_state(test::sample_vm_state()).value().size() <=
               snapshot::max_interrupt_controller_state_bytes);
}

BOOST_AUTO_TEST_CASE(restored_clock_never_goes_backwards) {
    ks::vm_state s;
    s.clock.clock = 1'000;
    s.captured_at_realtime_ns = 5'000;
    using ks::clock_policy;
    static_assert(ks::restored_clock(ks::vm_state{}, clock_policy::resume_at_capture, 9) == 0);
    BOOST_TEST(ks::restored_clock(s, clock_policy::advance_by_elapsed_time, 7'000) == 3'000u);
    BOOST_TEST(ks::restored_clock(s, clock_policy::advance_by_elapsed_time, 4'000) == 1'000u);
    BOOST_TEST(ks::restored_clock(s, clock_policy::resume_at_capture, 7'000) == 1'000u);
    s.clock.clock = UINT64_MAX - 10;
    BOOST_TEST(ks::restored_clock(s, clock_policy::advance_by_elapsed_time, UINT64_MAX) ==
               UINT64_MAX);
}
