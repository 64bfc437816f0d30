#pragma once
// Subcommand registry for the CLI. A command file defines
//   static const supermachine::cli::command_registration reg{"boot", "boot a kernel", &run_boot};
// and main() finds it by name. Commands return the process exit status.
#include <map>
#include <span>
#include <string>
#include <string_view>

namespace supermachine::cli {

using command_fn = int (*)(std::span<char*> args); // args exclude the command name

struct command_entry {
    std::string summary;
    command_fn run;
};

inline std::map<std::string, command_entry, std::less<>>& commands() {
    static std::map<std::string, command_entry, std::less<>> table;
    return table;
}

struct command_registration {
    command_registration(std::string name, std::string summary, command_fn run) {
        commands().emplace(std::move(name), command_entry{std::move(summary), run});
    }
};

} // namespace supermachine::cli
