#pragma once
// Registry authentication pieces: WWW-Authenticate challenges (RFC 7235,
// scheme and parameter names case-insensitive, values token or quoted-string),
// base64 for Basic, and credentials from ~/.docker/config.json
// (auths.<host>.auth = base64("user:password")).
#include <supermachine/error.hpp>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::oci {

struct auth_challenge {
    std::string scheme;                        // lowercased: "bearer", "basic"
    std::map<std::string, std::string> params; // names lowercased: realm, service, scope
};

struct credentials {
    std::string username;
    std::string password;
    std::string identity_token; // docker "identitytoken": an OAuth2 refresh token
    bool empty() const { return username.empty() && password.empty() && identity_token.empty(); }
};

namespace detail {
inline char ascii_lower(char c) {
    return (c >= 'A' && c <= 'Z') ? char(c - 'A' + 'a') : c;
}
inline std::string lowercase(std::string_view s) {
    std::string out(s);
    for (auto& c : out)
        c = ascii_lower(c);
    return out;
}
inline bool is_token_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           std::string_view("!#$%&'*+-.^_`|~/").find(c) != std::string_view::npos;
}
} // namespace detail

/// Parse a WWW-Authenticate value into challenges. Bounded (8 KiB, 32 params).
inline result<std::vector<auth_challenge>> parse_www_authenticate(std::string_view text) {
    if (text.size() > 8192) return errc::registry_error;
    std::vector<auth_challenge> out;
    std::size_t i = 0;
    auto skip_space = [&] {
        while (i < text.size() && (text[i] == ' ' || text[i] == '\t'))
            ++i;
    };
    auto read_token = [&] {
        std::size_t start = i;
        while (i < text.size() && detail::is_token_char(text[i]))
            ++i;
        return text.substr(start, i - start);
    };
    while (true) {
        skip_space();
        while (i < text.size() && text[i] == ',') {
            ++i;
            skip_space();
        }
        if (i >= text.size()) break;
        auto scheme = read_token();
        if (scheme.empty()) return errc::registry_error;
        auth_challenge challenge{detail::lowercase(scheme), {}};
        // auth-params: name=value pairs separated by commas, until the next scheme.
        while (true) {
            skip_space();
            std::size_t mark = i;
            auto name = read_token();
            skip_space();
            if (name.empty() || i >= text.size() || text[i] != '=') {
                i = mark; // not a parameter: the next challenge's scheme (or token68)
                if (!name.empty() && challenge.params.empty() && i < text.size()) {
                    // token68 form ("Basic abc=="): skip it
                    read_token();
                    while (i < text.size() && text[i] == '=')
                        ++i;
                }
                break;
            }
            ++i; // '='
            skip_space();
            std::string value;
            if (i < text.size() && text[i] == '"') {
                ++i;
                bool closed = false;
                while (i < text.size()) {
                    char c = text[i++];
                    if (c == '\\' && i < text.size())
                        value.push_back(text[i++]);
                    else if (c == '"') {
                        closed = true;
                        break;
                    } else
                        value.push_back(c);
                }
                if (!closed) return errc::registry_error;
            } else {
                value.assign(read_token());
            }
            if (challenge.params.size() >= 32) return errc::registry_error;
            challenge.params[detail::lowercase(name)] = std::move(value);
            skip_space();
            if (i < text.size() && text[i] == ',')
                ++i;
            else
                break;
        }
        out.push_back(std::move(challenge));
        if (out.size() > 16) return errc::registry_error;
    }
    return out;
}

inline std::string base64_encode(std::string_view in) {
    static constexpr char table[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    out.reserve((in.size() + 2) / 3 * 4);
    std::size_t i = 0;
    for (; i + 2 < in.size(); i += 3) {
        unsigned v =
            (unsigned char)in[i] << 16 | (unsigned char)in[i + 1] << 8 | (unsigned char)in[i + 2];
        out += {table[v >> 18], table[(v >> 12) & 63], table[(v >> 6) & 63], table[v & 63]};
    }
    if (i + 1 == in.size()) {
        unsigned v = (unsigned char)in[i] << 16;
        out += {table[v >> 18], table[(v >> 12) & 63], '=', '='};
    } else if (i + 2 == in.size()) {
        unsigned v = (unsigned char)in[i] << 16 | (unsigned char)in[i + 1] << 8;
        out += {table[v >> 18], table[(v >> 12) & 63], table[(v >> 6) & 63], '='};
    }
    return out;
}

inline std::optional<std::string> base64_decode(std::string_view in) {
    auto value = [](char c) -> int {
        if (c >= 'A' && c <= 'Z') return c - 'A';
        if (c >= 'a' && c <= 'z') return c - 'a' + 26;
        if (c >= '0' && c <= '9') return c - '0' + 52;
        if (c == '+' || c == '-') return 62;
        if (c == '/' || c == '_') return 63;
        return -1;
    };
    std::string out;
    unsigned buffer = 0;
    int bits = 0;
    for (char c : in) {
        if (c == '=' || c == '\n' || c == '\r') continue;
        int v = value(c);
        if (v < 0) return std::nullopt;
        buffer = (buffer << 6) | unsigned(v);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out.push_back(char((buffer >> bits) & 0xff));
        }
    }
    return out;
}

/// ~/.docker/config.json, or $DOCKER_CONFIG/config.json.
inline std::filesystem::path docker_config_path() {
    if (const char* dir = std::getenv("DOCKER_CONFIG"); dir && *dir)
        return std::filesystem::path(dir) / "config.json";
    const char* home = std::getenv("HOME");
    return std::filesystem::path(home && *home ? home : "/") / ".docker" / "config.json";
}

/// What a docker config file holds for one registry, and where it came
/// from: enough to tell a user which credentials were sent, or why none were.
struct docker_credentials_lookup {
    std::optional<oci::credentials> found;
    std::filesystem::path file; // the config file consulted
    std::string key;            // the "auths" key that matched, as written in the file
    std::string problem;        // why the file gave nothing usable (unreadable, not JSON, ...)
    std::string helper;         // credsStore / credHelpers entry that docker would run
    bool malformed = false;     // the file exists but cannot be used (docker warns and goes on)
};

/// Credentials for `registry` ("docker.io", "host:port") from a docker
/// config file. Docker Hub is stored as "https://index.docker.io/v1/"; other
/// hosts as "host", "https://host" or "http://host" (with or without a path).
/// Never fails: a missing file or entry leaves `found` empty, a file that
/// cannot be read or parsed says so in `problem`. Credential helpers are not
/// run (the one docker would use is named in `helper`).
inline docker_credentials_lookup
find_docker_credentials(std::string_view registry,
                        const std::filesystem::path& config = docker_config_path()) {
    docker_credentials_lookup out;
    out.file = config;
    std::error_code ec;
    if (!std::filesystem::exists(config, ec)) {
        out.problem = config.string() + " does not exist";
        return out;
    }
    if (!std::filesystem::is_regular_file(config, ec)) {
        out.malformed = true;
        out.problem = config.string() + " is not a regular file";
        return out;
    }
    auto size = std::filesystem::file_size(config, ec);
    if (ec || size > (1u << 20)) {
        out.malformed = true;
        out.problem = "cannot read " + config.string() +
                      (ec ? ": " + ec.message() : std::string(": larger than 1 MiB"));
        return out;
    }
    std::ifstream in(config, std::ios::binary);
    std::string text(size, '\0');
    if (!in.read(text.data(), std::streamsize(size))) {
        out.malformed = true;
        out.problem = "cannot read " + config.string();
        return out;
    }
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        // e.what() names the line and column: what the user has to fix.
        out.malformed = true;
        out.problem =
            "cannot parse " + config.string() + ": " + std::string(e.what()).substr(0, 300);
        return out;
    }
    if (!j.is_object()) {
        out.malformed = true;
        out.problem = "cannot parse " + config.string() + ": not a JSON object";
        return out;
    }
    auto host_of = [](std::string key) {
        if (key.starts_with("https://"))
            key.erase(0, 8);
        else if (key.starts_with("http://"))
            key.erase(0, 7);
        if (auto slash = key.find('/'); slash != std::string::npos) key.erase(slash);
        return key;
    };
    bool hub = registry == "docker.io" || registry == "index.docker.io" ||
               registry == "registry-1.docker.io";
    auto matches = [&](const std::string& key) {
        auto host = host_of(key);
        return host == registry || (hub && (host == "index.docker.io" || host == "docker.io" ||
                                            host == "registry-1.docker.io"));
    };
    if (auto helpers = j.find("credHelpers"); helpers != j.end() && helpers->is_object())
        for (auto& [key, value] : helpers->items())
            if (matches(key) && value.is_string())
                out.helper = "docker-credential-" + value.get<std::string>().substr(0, 64);
    if (auto store = j.find("credsStore");
        out.helper.empty() && store != j.end() && store->is_string())
        out.helper = "docker-credential-" + store->get<std::string>().substr(0, 64);
    auto auths = j.find("auths");
    if (auths == j.end() || !auths->is_object()) {
        out.problem = config.string() + " has no \"auths\" entries";
        return out;
    }
    for (auto& [key, entry] : auths->items()) {
        if (!matches(key) || !entry.is_object()) continue;
        out.key = key.substr(0, 256);
        credentials c;
        if (auto a = entry.find("auth"); a != entry.end() && a->is_string()) {
            auto decoded = base64_decode(a->get<std::string>());
            auto colon = decoded ? decoded->find(':') : std::string::npos;
            if (colon == std::string::npos) {
                out.malformed = true;
                out.problem = config.string() + ": auths[\"" + out.key +
                              "\"].auth is not base64 of user:password";
                return out;
            }
            c.username = decoded->substr(0, colon);
            c.password = decoded->substr(colon + 1);
        }
        if (auto u = entry.find("username");
            u != entry.end() && u->is_string() && c.username.empty())
            c.username = u->get<std::string>();
        if (auto p = entry.find("password");
            p != entry.end() && p->is_string() && c.password.empty())
            c.password = p->get<std::string>();
        if (auto t = entry.find("identitytoken"); t != entry.end() && t->is_string())
            c.identity_token = t->get<std::string>();
        if (!c.empty()) {
            out.found = std::move(c);
            return out;
        }
    }
    out.key.clear();
    out.problem = "no \"auths\" entry for " + std::string(registry) + " in " + config.string();
    return out;
}

/// As find_docker_credentials, for callers that only want the credentials:
/// an unreadable or malformed file is errc::invalid_argument.
inline result<std::optional<credentials>>
load_docker_credentials(std::string_view registry,
                        const std::filesystem::path& config = docker_config_path()) {
    auto lookup = find_docker_credentials(registry, config);
    if (lookup.malformed) return errc::invalid_argument;
    return std::move(lookup.found);
}

} // namespace supermachine::oci
