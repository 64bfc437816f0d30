#pragma once
// Resolve an image config's User ("name", "uid", "uid:gid", "name:group",
// "uid:group", "name:gid", or empty) against the image's /etc/passwd and
// /etc/group, with the rules docker uses (runc's user.GetExecUser):
// - empty: uid 0, gid 0, home from root's passwd entry (else "/");
// - a name must exist in /etc/passwd; a number need not (gid then 0, home "/");
// - an explicit group (name or number) replaces the primary gid, a name must exist;
// - without an explicit group, the groups listing the user's name become the
//   supplementary groups.
#include <supermachine/error.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace supermachine::oci {

struct process_user {
    std::uint32_t uid = 0;
    std::uint32_t gid = 0;
    std::vector<std::uint32_t> supplementary_gids;
    std::string home = "/";
    std::string name; ///< the passwd name, if the user has an entry
};

struct passwd_entry {
    std::string name;
    std::uint32_t uid = 0, gid = 0;
    std::string home, shell;
};

struct group_entry {
    std::string name;
    std::uint32_t gid = 0;
    std::vector<std::string> members;
};

namespace detail {

inline std::vector<std::string_view> passwd_split(std::string_view line, char separator) {
    std::vector<std::string_view> parts;
    for (;;) {
        auto at = line.find(separator);
        parts.push_back(line.substr(0, at));
        if (at == std::string_view::npos) break;
        line.remove_prefix(at + 1);
    }
    return parts;
}

/// A decimal id in [0, 2^31 - 1] (runc's range), like Go's strconv.Atoi accepts.
inline std::optional<std::uint32_t> passwd_id(std::string_view text) {
    if (text.starts_with('+')) text.remove_prefix(1);
    if (text.empty() || text.size() > 10) return std::nullopt;
    std::uint64_t value = 0;
    for (char c : text) {
        if (c < '0' || c > '9') return std::nullopt;
        value = value * 10 + static_cast<std::uint64_t>(c - '0');
    }
    if (value > 0x7fffffffu) return std::nullopt;
    return static_cast<std::uint32_t>(value);
}

template <class Each>
void passwd_lines(std::string_view text, Each&& each) {
    while (!text.empty()) {
        auto end = text.find('\n');
        auto line = text.substr(0, end);
        text = end == std::string_view::npos ? std::string_view{} : text.substr(end + 1);
        while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t'))
            line.remove_suffix(1);
        if (line.empty() || line.front() == '#') continue;
        each(line);
    }
}

} // namespace detail

/// Entries of an /etc/passwd text; malformed lines are skipped.
inline std::vector<passwd_entry> parse_passwd(std::string_view text) {
    std::vector<passwd_entry> out;
    detail::passwd_lines(text, [&](std::string_view line) {
        auto f = detail::passwd_split(line, ':');
        if (f.size() < 4) return;
        auto uid = detail::passwd_id(f[2]);
        auto gid = detail::passwd_id(f[3]);
        if (!uid || !gid || f[0].empty()) return;
        out.push_back({std::string(f[0]), *uid, *gid, f.size() > 5 ? std::string(f[5]) : "",
                       f.size() > 6 ? std::string(f[6]) : ""});
    });
    return out;
}

/// Entries of an /etc/group text; malformed lines are skipped.
inline std::vector<group_entry> parse_group(std::string_view text) {
    std::vector<group_entry> out;
    detail::passwd_lines(text, [&](std::string_view line) {
        auto f = detail::passwd_split(line, ':');
        if (f.size() < 3) return;
        auto gid = detail::passwd_id(f[2]);
        if (!gid || f[0].empty()) return;
        group_entry g{std::string(f[0]), *gid, {}};
        if (f.size() > 3 && !f[3].empty())
            for (auto m : detail::passwd_split(f[3], ','))
                if (!m.empty()) g.members.emplace_back(m);
        out.push_back(std::move(g));
    });
    return out;
}

/// Resolve `user_spec` ("", "name", "uid", "name:group", "uid:gid", ...).
/// An unknown user or group name is errc::not_found; a malformed spec or an
/// id out of range is errc::invalid_argument.
inline result<process_user> resolve_user(std::string_view user_spec, std::string_view passwd_text,
                                         std::string_view group_text) {
    auto trim = [](std::string_view s) {
        while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
            s.remove_prefix(1);
        while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
            s.remove_suffix(1);
        return s;
    };
    user_spec = trim(user_spec);
    auto colon = user_spec.find(':');
    std::string_view user_part = user_spec.substr(0, colon);
    std::string_view group_part =
        colon == std::string_view::npos ? "" : user_spec.substr(colon + 1);
    if (group_part.find(':') != std::string_view::npos)
        return make_error_code(errc::invalid_argument);
    if (colon != std::string_view::npos && group_part.empty())
        return make_error_code(errc::invalid_argument);

    auto users = parse_passwd(passwd_text);
    auto groups = parse_group(group_text);
    process_user result;
    auto uid_number = detail::passwd_id(user_part);

    const passwd_entry* match = nullptr;
    for (auto& u : users) {
        bool hit = user_part.empty() ? u.uid == 0
                   : uid_number      ? u.uid == *uid_number
                                     : u.name == user_part;
        if (hit) {
            match = &u;
            break;
        }
    }
    if (match) {
        result.uid = match->uid;
        result.gid = match->gid;
        result.home = match->home.empty() ? "/" : match->home;
        result.name = match->name;
    } else if (!user_part.empty()) {
        if (!uid_number) {
            // Not a number and not in passwd: "-1" or "abc" alike.
            bool looks_numeric =
                !user_part.empty() && (user_part.front() == '-' ||
                                       (user_part.front() >= '0' && user_part.front() <= '9'));
            return make_error_code(looks_numeric ? errc::invalid_argument : errc::not_found);
        }
        result.uid = *uid_number;
    }

    if (!group_part.empty()) {
        auto gid_number = detail::passwd_id(group_part);
        const group_entry* g = nullptr;
        for (auto& candidate : groups)
            if (gid_number ? candidate.gid == *gid_number : candidate.name == group_part) {
                g = &candidate;
                break;
            }
        if (g)
            result.gid = g->gid;
        else if (gid_number)
            result.gid = *gid_number;
        else {
            bool looks_numeric = group_part.front() == '-' ||
                                 (group_part.front() >= '0' && group_part.front() <= '9');
            return make_error_code(looks_numeric ? errc::invalid_argument : errc::not_found);
        }
    } else if (match) {
        for (auto& g : groups)
            for (auto& m : g.members)
                if (m == match->name) {
                    result.supplementary_gids.push_back(g.gid);
                    break;
                }
    }
    return result;
}

} // namespace supermachine::oci
