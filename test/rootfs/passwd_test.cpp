// Image config User → uid, gid, supplementary groups, home (docker's rules).
#include <supermachine/oci/passwd.hpp>

#include <boost/test/unit_test.hpp>

namespace sm = supermachine;
namespace oci = supermachine::oci;

namespace {
const char* passwd = "root:x:0:0:root:/root:/bin/sh\n"
                     "# a comment\n"
                     "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
                     "broken line\n"
                     "app:x:1000:1000:App:/home/app:/bin/sh\r\n"
                     "nohome:x:1001:100::\n"
                     "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const char* group = "root:x:0:\n"
                    "wheel:x:10:root,app\n"
                    "audio:x:29:app\n"
                    "users:x:100:\n"
                    "app:x:1000:\n"
                    "staff:x:50:nohome\n";
using gids = std::vector<std::uint32_t>;
} // namespace

BOOST_AUTO_TEST_SUITE(rootfs_passwd)

BOOST_AUTO_TEST_CASE(empty_is_root) {
    auto u = oci::resolve_user("", passwd, group).value();
    BOOST_TEST(u.uid == 0u);
    BOOST_TEST(u.gid == 0u);
    BOOST_TEST(u.home == "/root");
    BOOST_TEST((u.supplementary_gids == gids{10}));
    auto bare = oci::resolve_user("", "", "").value(); // no /etc/passwd at all
    BOOST_TEST(bare.uid == 0u);
    BOOST_TEST(bare.home == "/");
}

BOOST_AUTO_TEST_CASE(names_and_numbers) {
    auto app = oci::resolve_user("app", passwd, group).value();
    BOOST_TEST(app.uid == 1000u);
    BOOST_TEST(app.gid == 1000u);
    BOOST_TEST(app.home == "/home/app");
    BOOST_TEST((app.supplementary_gids == gids{10, 29}));
    auto by_uid = oci::resolve_user("1000", passwd, group).value();
    BOOST_TEST(by_uid.name == "app");
    BOOST_TEST(by_uid.home == "/home/app");
    BOOST_TEST(by_uid.gid == 1000u);
    auto unknown_uid = oci::resolve_user("4242", passwd, group).value();
    BOOST_TEST(unknown_uid.uid == 4242u);
    BOOST_TEST(unknown_uid.gid == 0u);
    BOOST_TEST(unknown_uid.home == "/");
    BOOST_TEST(unknown_uid.supplementary_gids.empty());
    auto nohome = oci::resolve_user("nohome", passwd, group).value();
    BOOST_TEST(nohome.home == "/");
    BOOST_TEST((nohome.supplementary_gids == gids{50}));
}

BOOST_AUTO_TEST_CASE(explicit_groups) {
    auto a = oci::resolve_user("app:audio", passwd, group).value();
    BOOST_TEST(a.uid == 1000u);
    BOOST_TEST(a.gid == 29u);
    BOOST_TEST(a.supplementary_gids.empty()); // explicit group: no implicit supplementary groups
    auto b = oci::resolve_user("1000:10", passwd, group).value();
    BOOST_TEST(b.gid == 10u);
    auto c = oci::resolve_user("4242:4343", passwd, group).value();
    BOOST_TEST(c.uid == 4242u);
    BOOST_TEST(c.gid == 4343u);
    auto d = oci::resolve_user("daemon:users", passwd, group).value();
    BOOST_TEST(d.uid == 1u);
    BOOST_TEST(d.gid == 100u);
    BOOST_TEST(d.home == "/usr/sbin");
}

BOOST_AUTO_TEST_CASE(errors) {
    BOOST_TEST(oci::resolve_user("ghost", passwd, group).error() == sm::errc::not_found);
    BOOST_TEST(oci::resolve_user("app:ghosts", passwd, group).error() == sm::errc::not_found);
    BOOST_TEST(oci::resolve_user("-1", passwd, group).error() == sm::errc::invalid_argument);
    BOOST_TEST(oci::resolve_user("99999999999", passwd, group).error() ==
               sm::errc::invalid_argument);
    BOOST_TEST(oci::resolve_user("app:", passwd, group).error() == sm::errc::invalid_argument);
    BOOST_TEST(oci::resolve_user("a:b:c", passwd, group).error() == sm::errc::invalid_argument);
}

BOOST_AUTO_TEST_SUITE_END()
