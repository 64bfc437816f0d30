// The registry path end to end: Debian's docker-registry on 127.0.0.1, the
// demo image pushed with skopeo, then `supermachine run HOST:PORT/demo/busybox:1`
// pulls it (plain HTTP on loopback), builds the rootfs and boots it.
#include "../registry/registry_fixture.hpp"
#include "vm_fixture.hpp"

#include <boost/test/unit_test.hpp>

using namespace supermachine::test;
using namespace std::chrono_literals;

BOOST_AUTO_TEST_CASE(run_image_from_local_registry) {
    vm_environment env;
    temp_dir dir;
    registry_server registry(dir.path);
    const auto reference = registry.host() + "/demo/busybox:1";
    skopeo_copy(env.image, "docker://" + reference);

    auto r = env.run({}, {"cat", "/etc/os-release"}, "", 300s, false, reference);
    BOOST_TEST(r.status == 0, r.err);
    BOOST_TEST(r.out.find("NAME=\"supermachine demo (busybox)\"") != std::string::npos, r.out);

    // The exit status comes back through the same path.
    auto again = env.run({}, {"sh", "-c", "exit 7"}, "", 300s, false, reference);
    BOOST_TEST(again.status == 7, again.err);
}
