#include <supermachine/oci/process.hpp>

#include <boost/test/unit_test.hpp>

#include <algorithm>

namespace oci = supermachine::oci;
using strings = std::vector<std::string>;

namespace {
const char* passwd = "root:x:0:0:root:/root:/bin/sh\n"
                     "www:x:33:33:www:/var/www:/bin/false\n";
const char* group = "root:x:0:\nwww:x:33:\nstaff:x:50:www\n";

oci::image_config config_with(std::optional<strings> entrypoint, std::optional<strings> cmd) {
    oci::image_config c;
    c.entrypoint = std::move(entrypoint);
    c.cmd = std::move(cmd);
    c.env = {"PATH=/custom/bin", "LANG=C"};
    c.working_dir = "/srv";
    return c;
}

bool contains(const strings& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
}
} // namespace

BOOST_AUTO_TEST_SUITE(process)

BOOST_AUTO_TEST_CASE(entrypoint_and_cmd_follow_docker_rules) {
    auto c = config_with(strings{"/entry", "-x"}, strings{"default"});
    BOOST_TEST(oci::make_process(c, {}, passwd, group).value().argv ==
               (strings{"/entry", "-x", "default"}));

    oci::process_overrides args;
    args.command = {"given", "arg"};
    BOOST_TEST(oci::make_process(c, args, passwd, group).value().argv ==
               (strings{"/entry", "-x", "given", "arg"}));

    oci::process_overrides ep;
    ep.entrypoint = "/other";
    BOOST_TEST(oci::make_process(c, ep, passwd, group).value().argv == (strings{"/other"}));

    oci::process_overrides cleared;
    cleared.entrypoint = "";
    cleared.command = {"sh"};
    BOOST_TEST(oci::make_process(c, cleared, passwd, group).value().argv == (strings{"sh"}));

    auto empty = config_with(std::nullopt, std::nullopt);
    BOOST_TEST(oci::make_process(empty, {}, passwd, group).error() ==
               supermachine::errc::invalid_argument);
}

BOOST_AUTO_TEST_CASE(env_workdir_and_user) {
    auto c = config_with(std::nullopt, strings{"sh"});
    oci::process_overrides o;
    o.env = {"LANG=en_US.UTF-8", "EXTRA=1"};
    o.user = "www";
    auto p = oci::make_process(c, o, passwd, group).value();
    BOOST_TEST(contains(p.env, "PATH=/custom/bin"));
    BOOST_TEST(contains(p.env, "LANG=en_US.UTF-8"));
    BOOST_TEST(!contains(p.env, "LANG=C"));
    BOOST_TEST(contains(p.env, "EXTRA=1"));
    BOOST_TEST(contains(p.env, "HOME=/var/www"));
    BOOST_TEST(p.user.uid == 33u);
    BOOST_TEST(p.user.gid == 33u);
    BOOST_TEST(p.user.supplementary_gids == (std::vector<std::uint32_t>{50}));
    BOOST_TEST(p.working_dir == "/srv");

    c.env.clear();
    o = {};
    o.working_dir = "/tmp";
    p = oci::make_process(c, o, passwd, group).value();
    BOOST_TEST(contains(p.env, "PATH=" + std::string(oci::default_path)));
    BOOST_TEST(contains(p.env, "HOME=/root"));
    BOOST_TEST(p.working_dir == "/tmp");

    o.user = "nobody-here";
    BOOST_TEST(oci::make_process(c, o, passwd, group).error() == supermachine::errc::not_found);
    o.user = "1234:5678";
    p = oci::make_process(c, o, passwd, group).value();
    BOOST_TEST(p.user.uid == 1234u);
    BOOST_TEST(p.user.gid == 5678u);
    o.user.reset();
    o.working_dir = "relative";
    BOOST_TEST(oci::make_process(c, o, passwd, group).error() ==
               supermachine::errc::invalid_argument);
    o.working_dir.reset();
    o.env = {"=bad"};
    BOOST_TEST(oci::make_process(c, o, passwd, group).error() ==
               supermachine::errc::invalid_argument);
}

BOOST_AUTO_TEST_SUITE_END()
