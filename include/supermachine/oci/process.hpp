#pragma once
// Image config + `docker run`-style overrides → the process to start.
//
// Docker's rules: `--entrypoint` replaces ENTRYPOINT and drops the image's
// CMD; arguments after the image replace CMD; argv = entrypoint + cmd.
// Env is the image's, then each override (`KEY=VALUE`, or `KEY` alone to
// take the host's value); PATH and HOME get defaults when still unset.
// The user is resolved against the image's /etc/passwd and /etc/group.
#include <supermachine/error.hpp>
#include <supermachine/oci/image_config.hpp>
#include <supermachine/oci/passwd.hpp>

#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::oci {

struct process_overrides {
    std::optional<std::string> entrypoint;  // --entrypoint ("" clears it)
    std::vector<std::string> command;       // arguments after the image name
    std::vector<std::string> env;           // -e KEY=VALUE or -e KEY
    std::optional<std::string> working_dir; // -w
    std::optional<std::string> user;        // -u
};

struct process_spec {
    std::vector<std::string> argv;
    std::vector<std::string> env; // KEY=VALUE, each key once
    std::string working_dir = "/";
    process_user user;
};

inline constexpr std::string_view default_path =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

namespace detail {
inline std::string_view env_key(std::string_view entry) {
    return entry.substr(0, entry.find('='));
}

/// Set or replace KEY in `env`, keeping first-seen order.
inline void env_set(std::vector<std::string>& env, std::string entry) {
    const auto key = env_key(entry);
    for (auto& e : env)
        if (env_key(e) == key) {
            e = std::move(entry);
            return;
        }
    env.push_back(std::move(entry));
}
} // namespace detail

/// The process `docker run [overrides] IMAGE [command...]` would start.
/// errc::invalid_argument when there is no command at all, or an env entry
/// has an empty key; errc::not_found for a user or group the image lacks.
inline result<process_spec> make_process(const image_config& config,
                                         const process_overrides& overrides,
                                         std::string_view passwd_text,
                                         std::string_view group_text) {
    process_spec spec;

    std::vector<std::string> entrypoint = config.entrypoint.value_or(std::vector<std::string>{});
    std::vector<std::string> cmd = config.cmd.value_or(std::vector<std::string>{});
    if (overrides.entrypoint) {
        entrypoint.clear();
        if (!overrides.entrypoint->empty()) entrypoint.push_back(*overrides.entrypoint);
        cmd.clear(); // docker: --entrypoint resets the image's CMD
    }
    if (!overrides.command.empty()) cmd = overrides.command;
    spec.argv = std::move(entrypoint);
    spec.argv.insert(spec.argv.end(), cmd.begin(), cmd.end());
    if (spec.argv.empty()) return errc::invalid_argument;

    for (const auto& e : config.env) {
        if (detail::env_key(e).empty()) return errc::manifest_invalid;
        detail::env_set(spec.env, e);
    }
    for (const auto& e : overrides.env) {
        if (detail::env_key(e).empty()) return errc::invalid_argument;
        if (e.find('=') != std::string::npos) {
            detail::env_set(spec.env, e);
        } else if (const char* host = std::getenv(e.c_str())) {
            detail::env_set(spec.env, e + "=" + host); // -e KEY: the host's value, if any
        }
    }

    auto user = resolve_user(overrides.user.value_or(config.user), passwd_text, group_text);
    if (!user) return user.error();
    spec.user = std::move(user).value();

    auto has = [&](std::string_view key) {
        for (const auto& e : spec.env)
            if (detail::env_key(e) == key) return true;
        return false;
    };
    if (!has("PATH")) spec.env.push_back("PATH=" + std::string(default_path));
    if (!has("HOME")) spec.env.push_back("HOME=" + spec.user.home);

    spec.working_dir = overrides.working_dir.value_or(config.working_dir);
    if (spec.working_dir.empty()) spec.working_dir = "/";
    if (spec.working_dir.front() != '/') return errc::invalid_argument;
    return spec;
}

} // namespace supermachine::oci
