// The -v spec and guest path checks (host side) and the agent's parse of
// supermachine.volume= values from its kernel command line (guest side):
// no crash, bounded output, and whatever the agent accepts is a path the
// host side would accept too (apart from the host-only rules).
#include "../guest/agent/init.hpp"

#include <supermachine/shared_directory.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    if (auto spec = supermachine::parse_volume_spec(text, "/cwd"))
        (void)supermachine::guest_path_problem(spec.value().guest);
    const auto values =
        supermachine::agent::guest::cmdline_values(text, "supermachine.volume", 8, 200);
    if (values.size() > 8) std::abort();
    for (const auto& value : values) {
        if (value.size() > 200) std::abort();
        supermachine::agent::guest::volume_request volume;
        if (!supermachine::agent::guest::parse_volume(value, volume)) continue;
        if (volume.path.empty() || volume.path.front() != '/' ||
            volume.path.find("/../") != std::string::npos || volume.path.ends_with("/..") ||
            volume.path.find("//") != std::string::npos || volume.tag.empty() ||
            volume.tag.size() > 36)
            std::abort();
    }
    return 0;
}
