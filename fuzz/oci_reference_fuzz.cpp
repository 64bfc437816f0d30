// Image references and transports: any input parses or fails cleanly, and a
// parsed reference re-parses to itself from both its printed forms.
#include <supermachine/oci/platform.hpp>
#include <supermachine/oci/reference.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string text(reinterpret_cast<const char*>(data), size);
    namespace oci = supermachine::oci;
    std::string reason;
    auto ref = oci::parse_reference(text, &reason);
    if (ref) {
        auto again = oci::parse_reference(ref.value().str());
        if (!again || !(again.value() == ref.value())) std::abort();
        auto familiar = oci::parse_reference(ref.value().familiar());
        if (!familiar || !(familiar.value() == ref.value())) std::abort();
    } else if (reason.empty()) {
        std::abort(); // every rejection says why
    }
    (void)oci::parse_image_source(text);
    (void)oci::parse_platform(text);
    return 0;
}
