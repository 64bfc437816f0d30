// libFuzzer target over the KVM state blob decoders.
//
// The first input byte picks a mode:
//   0: the rest is a vCPU blob for decode_vcpu_state
//   1: the rest is a VM blob for decode_vm_state
//   2/3: the rest is a list of (u16 offset, u8 value) edits applied to a
//      valid vCPU (2) or VM (3) blob, so mutations get past the magic and
//      version checks into the sections.
// Whatever decodes must re-encode to a blob that decodes to the same state.
#include "../test/kvmstate/sample_state.hpp"

#include <supermachine/backend/kvm_state.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

namespace ks = supermachine::backend::kvm_state;

namespace {

const std::vector<std::byte>& vcpu_seed() {
    static const auto blob = ks::encode_vcpu_state(supermachine::test::sample_vcpu_state()).value();
    return blob;
}

const std::vector<std::byte>& vm_seed() {
    static const auto blob = ks::encode_vm_state(supermachine::test::sample_vm_state()).value();
    return blob;
}

void check_vcpu(std::span<const std::byte> blob) {
    auto state = ks::decode_vcpu_state(blob);
    if (!state) return;
    auto again = ks::encode_vcpu_state(state.value());
    if (!again) std::abort(); // decoded a state the encoder refuses
    auto back = ks::decode_vcpu_state(again.value());
    if (!back || !supermachine::test::same_vcpu_state(state.value(), back.value())) std::abort();
}

void check_vm(std::span<const std::byte> blob) {
    auto state = ks::decode_vm_state(blob);
    if (!state) return;
    auto again = ks::encode_vm_state(state.value());
    if (!again) std::abort();
    auto back = ks::decode_vm_state(again.value());
    if (!back || again.value() != ks::encode_vm_state(back.value()).value()) std::abort();
}

std::vector<std::byte> edited(std::vector<std::byte> blob, std::span<const std::uint8_t> edits) {
    for (std::size_t i = 0; i + 3 <= edits.size(); i += 3) {
        const std::size_t offset = (std::size_t{edits[i]} | (std::size_t{edits[i + 1]} << 8));
        if (blob.empty()) break;
        blob[offset % blob.size()] = static_cast<std::byte>(edits[i + 2]);
    }
    return blob;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const auto rest = std::as_bytes(std::span(data + 1, size - 1));
    const auto raw = std::span(data + 1, size - 1);
    switch (data[0] % 4) {
    case 0:
        check_vcpu(rest);
        break;
    case 1:
        check_vm(rest);
        break;
    case 2:
        check_vcpu(edited(vcpu_seed(), raw));
        break;
    case 3:
        check_vm(edited(vm_seed(), raw));
        break;
    }
    return 0;
}
