#pragma once
// Kernel modules the guest must load from its initramfs, in dependency
// order. Dependencies come from modules.dep when the tree has one (a tree
// that went through depmod), else from each module's own .modinfo
// "depends=" (Debian's package ships no modules.dep: depmod runs at install
// time, and we never install). Built-in modules (modules.builtin) are
// skipped. Module files are bounded and parsed as hostile ELF.
#include <supermachine/boot/detail/byte_io.hpp>
#include <supermachine/boot/initramfs.hpp>
#include <supermachine/error.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::boot {

/// Module names use '_' and '-' interchangeably; we compare with '_'.
inline std::string module_name(std::string_view name) {
    std::string out(name);
    for (auto& c : out)
        if (c == '-') c = '_';
    return out;
}

/// "kernel/drivers/virtio/virtio_mmio.ko" → "virtio_mmio" (also .ko.xz/.ko.zst/.ko.gz).
inline std::string module_name_from_path(std::string_view path) {
    auto slash = path.rfind('/');
    if (slash != std::string_view::npos) path.remove_prefix(slash + 1);
    auto dot = path.find(".ko");
    if (dot != std::string_view::npos) path = path.substr(0, dot);
    return module_name(path);
}

/// The "depends=" list from a module's .modinfo section (uncompressed .ko).
inline result<std::vector<std::string>> module_dependencies(std::span<const std::byte> ko) {
    using detail::load_le;
    if (ko.size() < 64 || ko[0] != std::byte{0x7f} || ko[1] != std::byte{'E'} ||
        ko[4] != std::byte{2})
        return errc::invalid_argument;
    const std::uint64_t shoff = load_le<std::uint64_t>(ko, 40);
    const std::uint16_t shentsize = load_le<std::uint16_t>(ko, 58);
    const std::uint16_t shnum = load_le<std::uint16_t>(ko, 60);
    const std::uint16_t shstrndx = load_le<std::uint16_t>(ko, 62);
    if (shentsize != 64 || shnum == 0 || shstrndx >= shnum) return errc::invalid_argument;
    if (shoff > ko.size() || std::uint64_t{shnum} * 64 > ko.size() - shoff)
        return errc::invalid_argument;
    auto section = [&](std::uint16_t i, std::uint64_t& offset, std::uint64_t& size,
                       std::uint32_t& name) {
        const std::uint64_t at = shoff + std::uint64_t{i} * 64;
        name = load_le<std::uint32_t>(ko, at);
        offset = load_le<std::uint64_t>(ko, at + 24);
        size = load_le<std::uint64_t>(ko, at + 32);
        return offset <= ko.size() && size <= ko.size() - offset;
    };
    std::uint64_t str_offset, str_size;
    std::uint32_t ignored;
    if (!section(shstrndx, str_offset, str_size, ignored)) return errc::invalid_argument;
    const std::string_view names(reinterpret_cast<const char*>(ko.data() + str_offset), str_size);
    for (std::uint16_t i = 0; i < shnum; ++i) {
        std::uint64_t offset, size;
        std::uint32_t name;
        if (!section(i, offset, size, name) || name >= names.size()) continue;
        const auto section_name = names.substr(name, names.find('\0', name) - name);
        if (section_name != ".modinfo") continue;
        std::string_view info(reinterpret_cast<const char*>(ko.data() + offset), size);
        std::vector<std::string> deps;
        while (!info.empty()) {
            const auto end = std::min(info.find('\0'), info.size());
            const auto entry = info.substr(0, end);
            if (entry.starts_with("depends=")) {
                auto list = entry.substr(8);
                while (!list.empty()) {
                    const auto comma = std::min(list.find(','), list.size());
                    if (comma > 0) deps.push_back(module_name(list.substr(0, comma)));
                    list.remove_prefix(std::min(comma + 1, list.size()));
                }
            }
            info.remove_prefix(std::min(end + 1, info.size()));
        }
        return deps;
    }
    return std::vector<std::string>{};
}

struct module_plan {
    std::vector<std::filesystem::path> load_order; // absolute paths, dependencies first
    std::vector<std::string> builtin;              // wanted but built into the kernel
    std::vector<std::string> missing;              // wanted, neither module nor built in
};

/// The modules to load for `wanted` (names), dependencies first.
inline result<module_plan> plan_modules(const std::filesystem::path& modules_dir,
                                        std::span<const std::string> wanted) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::is_directory(modules_dir, ec)) return errc::not_found;
    std::set<std::string> builtin;
    {
        std::ifstream in(modules_dir / "modules.builtin");
        for (std::string line; std::getline(in, line);)
            if (!line.empty()) builtin.insert(module_name_from_path(line));
    }
    std::map<std::string, fs::path> files;                // name → path
    std::map<std::string, std::vector<std::string>> deps; // from modules.dep, if present
    const bool have_dep_file = fs::is_regular_file(modules_dir / "modules.dep", ec);
    {
        std::ifstream in(modules_dir / "modules.dep");
        for (std::string line; std::getline(in, line);) {
            const auto colon = line.find(':');
            if (colon == std::string::npos) continue;
            const auto name = module_name_from_path(line.substr(0, colon));
            files[name] = modules_dir / line.substr(0, colon);
            std::string_view rest(line);
            rest.remove_prefix(colon + 1);
            auto& list = deps[name];
            while (!rest.empty()) {
                while (!rest.empty() && rest.front() == ' ')
                    rest.remove_prefix(1);
                const auto space = std::min(rest.find(' '), rest.size());
                if (space > 0) list.push_back(module_name_from_path(rest.substr(0, space)));
                rest.remove_prefix(space);
            }
        }
    }
    if (!have_dep_file && fs::is_directory(modules_dir / "kernel", ec)) {
        for (auto it = fs::recursive_directory_iterator(modules_dir / "kernel", ec);
             !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
            if (it->is_regular_file() && it->path().extension() == ".ko")
                files[module_name_from_path(it->path().string())] = it->path();
        if (ec) return ec;
    }
    auto dependencies_of = [&](const std::string& name) -> result<std::vector<std::string>> {
        if (have_dep_file) return deps[name];
        SUPERMACHINE_TRY(bytes, read_host_file(files.at(name), 64ull << 20));
        return module_dependencies(bytes);
    };

    module_plan plan;
    std::set<std::string> done, visiting;
    // Depth-first, dependencies before dependents; a cycle is a broken tree.
    std::function<result<void>(const std::string&, bool)> visit = [&](const std::string& name,
                                                                      bool top) -> result<void> {
        if (done.count(name)) return success();
        if (builtin.count(name)) {
            if (top) plan.builtin.push_back(name);
            done.insert(name);
            return success();
        }
        if (!files.count(name)) {
            plan.missing.push_back(name);
            done.insert(name);
            return success();
        }
        if (!visiting.insert(name).second) return errc::invalid_argument;
        SUPERMACHINE_TRY(list, dependencies_of(name));
        for (const auto& dep : list) {
            SUPERMACHINE_TRY(visit(dep, false));
        }
        visiting.erase(name);
        done.insert(name);
        plan.load_order.push_back(files.at(name));
        return success();
    };
    for (const auto& name : wanted) {
        SUPERMACHINE_TRY(visit(module_name(name), true));
    }
    return plan;
}

} // namespace supermachine::boot
