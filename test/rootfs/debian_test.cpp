// A real distribution tree: a Debian minbase made by debootstrap, packed by
// umoci into an OCI image; our merge must equal `umoci unpack`, and the ext4
// image must be clean. The tree comes from scripts/make-debian-tree.sh
// (debootstrap once per machine, cached; SUPERMACHINE_DEBIAN_TREE overrides);
// the test skips when no Debian mirror is reachable.
#include <supermachine/oci/ext4_writer.hpp>
#include <supermachine/oci/rootfs_builder.hpp>

#include "debian_tree.hpp"
#include "rootfs_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>

using namespace rootfs_test;

BOOST_AUTO_TEST_CASE(debian_minbase_matches_umoci_and_is_clean) {
    supermachine::test::skip_unless(have_tool("umoci") && have_tool("e2fsck"),
                                    "umoci or e2fsprogs missing");
    const std::string tree_dir = supermachine::test::debian_tree().string();
    temp_dir t;
    auto layout = (t.path / "oci").string();
    auto sh = [](const std::string& command) {
        auto [rc, out] = run(command + " 2>&1");
        BOOST_REQUIRE_MESSAGE(rc == 0, command << ": " << out);
    };
    auto layer_tar = (t.path / "layer.tar").string();
    sh("tar --numeric-owner --xattrs --xattrs-include='*' -C " + shell_quote(tree_dir) + " -cf " +
       shell_quote(layer_tar) + " .");
    sh("umoci init --layout " + shell_quote(layout));
    sh("umoci new --image " + shell_quote(layout) + ":b");
    sh("umoci raw add-layer --image " + shell_quote(layout) + ":b " + shell_quote(layer_tar));
    fs::remove(layer_tar);
    sh("umoci unpack --rootless --image " + shell_quote(layout) + ":b " +
       shell_quote((t.path / "bundle").string()));

    std::ifstream index_file(fs::path(layout) / "index.json");
    auto index = nlohmann::json::parse(index_file);
    auto blob = [&](const std::string& digest) {
        return fs::path(layout) / "blobs/sha256" / digest.substr(7);
    };
    std::ifstream manifest_file(blob(index["manifests"][0]["digest"]));
    auto manifest = nlohmann::json::parse(manifest_file);
    std::vector<fs::path> layers;
    for (auto& l : manifest["layers"])
        layers.push_back(blob(l["digest"]));

    auto spool = t.path / "spool";
    fs::create_directories(spool);
    auto tree = merge(spool, layers);
    BOOST_REQUIRE(tree);
    auto ours = list_tree(tree.value());
    auto theirs = list_host(t.path / "bundle/rootfs");
    std::size_t compared = 0;
    for (auto& [path, line] : ours) {
        if (line == "device") continue; // rootless umoci makes empty files for them
        BOOST_TEST(theirs[path] == line, path);
        ++compared;
    }
    BOOST_TEST(compared > 5000u);
    BOOST_TEST(theirs.size() == ours.size());

    auto image = t.path / "debian.ext4";
    auto stats = supermachine::oci::write_ext4(tree.value(), image);
    BOOST_REQUIRE(stats);
    auto [rc, out] = run("e2fsck -fn " + shell_quote(image.string()) + " 2>&1");
    BOOST_TEST(rc == 0, out);
    auto os_release =
        run("debugfs -R 'cat /usr/lib/os-release' " + shell_quote(image.string()) + " 2>/dev/null")
            .second;
    BOOST_TEST(os_release.find("ID=debian") != std::string::npos, os_release);
}
