// Layer merging: our tree against `umoci unpack --rootless` of the same OCI
// image, the same layers recompressed, and hostile entries.
#include <supermachine/oci/filesystem_tree.hpp>
#include <supermachine/oci/layer.hpp>

#include "rootfs_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>

using namespace rootfs_test;
namespace sm = supermachine;

namespace {

struct fixture {
    temp_dir dir;
    temp_dir escape; // the place hostile archives aim at, outside every image
    fs::path layers;
    fs::path spool;
    fixture()
        : layers(dir.path / "layers")
        , spool(dir.path / "spool") {
        fs::create_directories(spool);
        make_layers(layers, escape.path / "target");
    }
    std::vector<fs::path> gzip_plain_gzip() const {
        return {layers / "l1.tar.gz", layers / "l2.tar", layers / "l3.tar.gz"};
    }
    supermachine::error_code hostile(const char* name) const {
        auto tree = merge(spool, {layers / "hostile" / name});
        return tree ? supermachine::error_code{} : tree.error();
    }
};

std::string at(const std::map<std::string, std::string>& listing, const std::string& path) {
    auto it = listing.find(path);
    return it == listing.end() ? "<missing>" : it->second;
}

} // namespace

BOOST_AUTO_TEST_SUITE(rootfs_tree)

BOOST_AUTO_TEST_CASE(merged_tree_matches_umoci_unpack) {
    supermachine::test::skip_unless(have_tool("umoci"), "umoci not installed");
    fixture f;
    auto tree = merge(f.spool, f.gzip_plain_gzip());
    BOOST_REQUIRE_MESSAGE(tree, (tree ? "" : tree.error().message()));
    auto ours = list_tree(tree.value());

    auto bundle = f.dir.path / "bundle";
    auto [rc, out] =
        run("umoci unpack --rootless --image " + shell_quote((f.layers / "oci").string()) +
            ":test " + shell_quote(bundle.string()) + " 2>&1");
    BOOST_REQUIRE_MESSAGE(rc == 0, out);
    auto theirs = list_host(bundle / "rootfs");
    // umoci --rootless makes empty files for device nodes: compare the rest.
    for (auto it = ours.begin(); it != ours.end();) {
        if (it->second == "device") {
            theirs.erase(it->first);
            it = ours.erase(it);
        } else {
            ++it;
        }
    }
    BOOST_TEST(ours.size() > 40u);
    for (auto& [path, line] : theirs)
        BOOST_TEST(at(ours, path) == line, path);
    for (auto& [path, line] : ours)
        BOOST_TEST(theirs.count(path) == 1u, path << " only in ours: " << line);
}

BOOST_AUTO_TEST_CASE(umoci_repacked_layers_with_its_own_whiteouts) {
    supermachine::test::skip_unless(have_tool("umoci"), "umoci not installed");
    supermachine::test::skip_unless(fs::exists("/bin/busybox"), "busybox-static not installed");
    temp_dir t;
    auto layout = (t.path / "oci").string();
    auto bundle = t.path / "bundle";
    auto rootfs = bundle / "rootfs";
    auto sh = [](const std::string& command) {
        auto [rc, out] = run(command + " 2>&1");
        BOOST_REQUIRE_MESSAGE(rc == 0, command << ": " << out);
    };
    sh("umoci init --layout " + shell_quote(layout));
    sh("umoci new --image " + shell_quote(layout) + ":t");
    sh("umoci unpack --rootless --image " + shell_quote(layout) + ":t " +
       shell_quote(bundle.string()));
    // Layer 1: busybox and its applet links, a small tree.
    fs::create_directories(rootfs / "bin");
    fs::copy_file("/bin/busybox", rootfs / "bin/busybox");
    for (auto applet : {"sh", "ls", "cat", "id"})
        fs::create_symlink("busybox", rootfs / "bin" / applet);
    fs::create_directories(rootfs / "etc");
    std::ofstream(rootfs / "etc/passwd") << "root:x:0:0:root:/root:/bin/sh\n";
    fs::create_directories(rootfs / "d/sub/deeper");
    std::ofstream(rootfs / "d/sub/deeper/f") << "f\n";
    std::ofstream(rootfs / "d/keep") << "keep\n";
    std::ofstream(rootfs / "gone") << "gone\n";
    fs::create_hard_link(rootfs / "d/keep", rootfs / "d/keep-link");
    sh("umoci repack --image " + shell_quote(layout) + ":t " + shell_quote(bundle.string()));
    // repack diffs against the image the bundle came from: unpack the new one to go on.
    fs::remove_all(bundle);
    sh("umoci unpack --rootless --image " + shell_quote(layout) + ":t " +
       shell_quote(bundle.string()));
    // Layer 2: deletions (umoci writes the whiteouts), a replacement, an addition.
    fs::remove(rootfs / "gone");
    fs::remove_all(rootfs / "d/sub");
    fs::remove(rootfs / "bin/cat");
    std::ofstream(rootfs / "bin/cat") << "not busybox any more\n";
    std::ofstream(rootfs / "etc/motd") << "hello\n";
    fs::permissions(rootfs / "etc/motd", fs::perms(0600));
    sh("umoci repack --image " + shell_quote(layout) + ":t " + shell_quote(bundle.string()));

    // The layer blobs, in order, as the manifest lists them.
    auto read_json = [](const fs::path& p) {
        std::ifstream in(p);
        return nlohmann::json::parse(in);
    };
    auto blob = [&](const std::string& digest) {
        return fs::path(layout) / "blobs/sha256" / digest.substr(7);
    };
    auto index = read_json(fs::path(layout) / "index.json");
    auto manifest = read_json(blob(index["manifests"][0]["digest"]));
    std::vector<fs::path> layers;
    for (auto& l : manifest["layers"])
        layers.push_back(blob(l["digest"]));
    BOOST_REQUIRE(layers.size() == 2u);

    auto spool = t.path / "spool";
    fs::create_directories(spool);
    auto tree = oci::filesystem_tree::create(spool).value();
    BOOST_REQUIRE(oci::apply_layer_file(tree, layers[0], 1));
    auto second = oci::apply_layer_file(tree, layers[1], 2);
    BOOST_REQUIRE(second);
    BOOST_TEST(second.value().whiteouts == 2u); // umoci's own .wh.gone and .wh.sub
    BOOST_TEST((second.value().format == oci::compression::gzip));

    auto check = t.path / "check";
    sh("umoci unpack --rootless --image " + shell_quote(layout) + ":t " +
       shell_quote(check.string()));
    auto ours = list_tree(tree);
    auto theirs = list_host(check / "rootfs");
    BOOST_TEST(at(ours, "/gone") == "<missing>");
    BOOST_TEST(at(ours, "/d/sub") == "<missing>");
    BOOST_TEST(at(ours, "/bin/cat").starts_with("file 0644 21 "));
    BOOST_TEST(at(ours, "/etc/motd").starts_with("file 0600 6 "));
    BOOST_TEST(at(ours, "/d/keep-link").find("link-group=/d/keep") != std::string::npos);
    for (auto& [path, line] : theirs)
        BOOST_TEST(at(ours, path) == line, path);
    BOOST_TEST(ours.size() == theirs.size());
}

BOOST_AUTO_TEST_CASE(layer_semantics) {
    fixture f;
    auto tree = merge(f.spool, f.gzip_plain_gzip());
    BOOST_REQUIRE(tree);
    auto l = list_tree(tree.value());
    BOOST_TEST(at(l, "/wh/gone") == "<missing>");  // .wh.gone
    BOOST_TEST(at(l, "/wh/dir/x") == "<missing>"); // .wh.x in a subdirectory
    BOOST_TEST(at(l, "/wh/keep").starts_with("file"));
    BOOST_TEST(at(l, "/opaque/a") == "<missing>"); // opaque: lower children hidden
    BOOST_TEST(at(l, "/opaque/sub") == "<missing>");
    BOOST_TEST(at(l, "/opaque/new").starts_with("file")); // this layer's child kept
    BOOST_TEST(at(l, "/replace/f") == "dir 0755");        // file → directory
    BOOST_TEST(at(l, "/replace/f/inside").starts_with("file"));
    BOOST_TEST(at(l, "/replace/d").starts_with("file 0644 11 ")); // directory → file
    BOOST_TEST(at(l, "/replace/d/child") == "<missing>");
    BOOST_TEST(at(l, "/replace/l").starts_with("file 0644 17 "));   // symlink → file
    BOOST_TEST(at(l, "/usr/bin/through-link").starts_with("file")); // via usrlink -> usr
    BOOST_TEST(at(l, "/usrlink") == "symlink -> usr");
    BOOST_TEST(at(l, "/dup").starts_with("file 0644 12 ")); // "second wins\n"
    BOOST_TEST(at(l, "/bin/ls") == at(l, "/bin/busybox"));
    BOOST_TEST(at(l, "/bin/ls").find("link-group=/bin/busybox") != std::string::npos);
    BOOST_TEST(at(l, "/etc/passwd-hardlink").find("link-group=/etc/passwd") != std::string::npos);
    BOOST_TEST(at(l, "/etc/motd").starts_with("file"));
    auto& t = tree.value();
    auto motd = t.lookup("/etc/motd").value();
    BOOST_REQUIRE(motd);
    BOOST_TEST(t.read_file(*motd, 100).value() == "layer three\n");
    // lookup follows an intermediate symlink inside the tree and, when asked, the last one.
    auto via = t.lookup("usrlink/bin/through-link").value();
    BOOST_TEST((via && t.node(*via).kind == oci::node_kind::regular));
    auto sh = t.lookup("/bin/sh", true).value();
    auto busybox = t.lookup("/bin/busybox").value();
    BOOST_TEST((sh && busybox && *sh == *busybox));
}

BOOST_AUTO_TEST_CASE(compression_does_not_change_the_tree) {
    fixture f;
    auto a = merge(f.spool, f.gzip_plain_gzip());
    auto b = merge(f.spool, {f.layers / "l1.tar.gz", f.layers / "l2.tar.zst", f.layers / "l3.tar"});
    auto c = merge(f.spool,
                   {f.layers / "l1.tar.gz", f.layers / "mislabelled.tar.gz", f.layers / "l3.tar"});
    BOOST_REQUIRE(a);
    BOOST_REQUIRE(b);
    BOOST_REQUIRE(c);
    auto la = list_tree(a.value());
    BOOST_TEST((la == list_tree(b.value())));
    BOOST_TEST((la == list_tree(c.value())));
}

BOOST_AUTO_TEST_CASE(hostile_entries_are_confined_or_rejected) {
    fixture f;
    BOOST_TEST(f.hostile("dotdot.tar") == sm::errc::path_escape);
    BOOST_TEST(f.hostile("dotdot_inner.tar") == sm::errc::path_escape);
    BOOST_TEST(f.hostile("hardlink_escape.tar") == sm::errc::path_escape);
    BOOST_TEST(f.hostile("hardlink_missing.tar") == sm::errc::not_found);
    BOOST_TEST(f.hostile("hardlink_dir.tar") == sm::errc::archive_malformed);
    BOOST_TEST(f.hostile("whiteout_dotdot.tar") == sm::errc::archive_malformed);

    auto abs = merge(f.spool, {f.layers / "hostile" / "absolute.tar"});
    BOOST_REQUIRE(abs);
    auto found = abs.value().lookup("etc/absolute").value();
    BOOST_TEST(found.has_value()); // "/etc/absolute" lands inside the image

    // A symlink to somewhere outside, then a file "through" it: resolved inside the tree.
    auto esc = merge(f.spool, {f.layers / "hostile" / "symlink_escape.tar"});
    BOOST_REQUIRE_MESSAGE(esc, (esc ? "" : esc.error().message()));
    auto inside = (f.escape.path / "target").relative_path().string();
    BOOST_TEST(esc.value().lookup(inside + "/pwned").value().has_value());
    BOOST_TEST(esc.value().lookup(inside + "/pwned2").value().has_value());
    BOOST_TEST(!fs::exists(f.escape.path / "target"));
    BOOST_TEST(fs::is_empty(f.escape.path));
    // The spool is an unlinked file: nothing named is left in the spool directory.
    BOOST_TEST(files_below(f.spool).empty());
}

BOOST_AUTO_TEST_CASE(limits_bound_the_tree) {
    fixture f;
    auto tree = oci::filesystem_tree::create(f.spool, oci::tree_limits{.max_nodes = 10});
    BOOST_REQUIRE(tree);
    auto r = oci::apply_layer_file(tree.value(), f.layers / "l1.tar.gz", 1);
    BOOST_TEST(r.error() == sm::errc::image_too_large);
    auto small = oci::filesystem_tree::create(f.spool, oci::tree_limits{.max_total_data = 1 << 20});
    BOOST_REQUIRE(small);
    BOOST_TEST(oci::apply_layer_file(small.value(), f.layers / "l1.tar.gz", 1).error() ==
               sm::errc::image_too_large);
}

BOOST_AUTO_TEST_CASE(symlink_loops_terminate) {
    temp_dir d;
    auto tree = oci::filesystem_tree::create(d.path).value();
    oci::tar_entry a{.path = "a", .link_target = "b", .type = oci::entry_type::symlink};
    oci::tar_entry b{.path = "b", .link_target = "a", .type = oci::entry_type::symlink};
    oci::tar_entry through{.path = "a/x", .type = oci::entry_type::regular};
    struct no_data {
        sm::result<std::size_t> read_data(std::span<std::byte>) { return std::size_t{0}; }
    } none;
    BOOST_TEST(!tree.apply(a, none, 1).has_error());
    BOOST_TEST(!tree.apply(b, none, 1).has_error());
    BOOST_TEST(tree.apply(through, none, 1).error() == sm::errc::path_escape);
    BOOST_TEST(tree.lookup("a", true).error() == sm::errc::path_escape);
}

BOOST_AUTO_TEST_SUITE_END()
