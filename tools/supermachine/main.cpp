// supermachine — run OCI images as microVMs. `supermachine COMMAND --help`.
#include "command.hpp"

#include <supermachine/detail/trace.hpp>

#include <cstdio>
#include <cstring>
#include <exception>

namespace {
int usage(FILE* out) {
    std::fprintf(out, "usage: supermachine COMMAND [OPTIONS] [ARGS...]\n\ncommands:\n");
    for (const auto& [name, entry] : supermachine::cli::commands())
        std::fprintf(out, "  %-10s %s\n", name.c_str(), entry.summary.c_str());
    return out == stdout ? 0 : 2;
}
} // namespace

int main(int argc, char** argv) {
    supermachine::detail::trace_point("main");
    if (argc < 2) return usage(stderr);
    if (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) return usage(stdout);
    auto& table = supermachine::cli::commands();
    auto it = table.find(argv[1]);
    if (it == table.end()) {
        std::fprintf(stderr, "supermachine: unknown command '%s'\n", argv[1]);
        return usage(stderr);
    }
    try {
        return it->second.run({argv + 2, static_cast<std::size_t>(argc - 2)});
    } catch (const std::exception& e) {
        std::fprintf(stderr, "supermachine %s: %s\n", argv[1], e.what());
        return 125; // like docker: the VMM itself failed
    }
}
