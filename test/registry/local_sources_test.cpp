// oci: layouts (from umoci) and docker-archive: tarballs (from skopeo, both
// the classic format and the OCI-layout-in-tar one) imported into the store.
#include "registry_fixture.hpp"

#include <supermachine/oci/pull.hpp>

#include <boost/test/unit_test.hpp>

namespace oci = supermachine::oci;
namespace fs = std::filesystem;
using supermachine::errc;
using supermachine::make_error_code;
using namespace supermachine::test;

namespace {
struct layout_fixture {
    temp_dir dir;
    fs::path layout;
    std::string manifest_digest;
    layout_fixture() {
        layout = make_busybox_layout(dir.path, "latest");
        make_busybox_layout(dir.path, "second");
        auto index = nlohmann::json::parse(read_text(layout / "index.json"));
        for (auto& m : index["manifests"])
            if (m["annotations"]["org.opencontainers.image.ref.name"] == "latest")
                manifest_digest = m["digest"].get<std::string>();
    }
};
layout_fixture& fixture() {
    static layout_fixture instance;
    return instance;
}
std::size_t count_files(const fs::path& dir) {
    std::size_t n = 0;
    std::error_code ec;
    if (!fs::exists(dir, ec)) return 0;
    for (auto& e : fs::recursive_directory_iterator(dir))
        if (e.is_regular_file()) ++n;
    return n;
}
} // namespace

BOOST_AUTO_TEST_SUITE(local_sources)

BOOST_AUTO_TEST_CASE(oci_layout_import) {
    auto& f = fixture();
    temp_dir cache;
    oci::content_store store(cache.path);
    auto source = oci::parse_image_source("oci:" + f.layout.string() + ":latest").value();
    std::string why;
    auto image = oci::pull_image(source, store, {}, &why);
    BOOST_TEST_INFO(why);
    BOOST_REQUIRE(image.has_value());
    BOOST_TEST(image.value().manifest_digest.str() == f.manifest_digest);
    BOOST_TEST(image.value().reference == "oci:" + f.layout.string() + ":latest");
    BOOST_REQUIRE(image.value().layers.size() == 1u);
    BOOST_TEST(
        read_text(image.value().layers[0]) ==
        read_text(f.layout / "blobs/sha256" / image.value().manifest.layers[0].digest.hex()));
    BOOST_TEST(image.value().config.env.size() >= 1u);
    // Found again without touching the layout.
    auto cached = oci::find_pulled_image(source, store).value();
    BOOST_REQUIRE(cached.has_value());
    BOOST_TEST(cached->image_manifest_digest.str() == f.manifest_digest);
    // ...but not for another platform: `run --platform linux/arm64` of a
    // cached amd64 image must pull (and fail), not run the amd64 one.
    BOOST_TEST(image.value().config.platform.architecture == "amd64");
    auto arm64 = oci::parse_platform("linux/arm64").value();
    BOOST_TEST(!oci::find_pulled_image(source, store, arm64).value().has_value());
    BOOST_TEST(oci::find_pulled_image(source, store, oci::parse_platform("linux/amd64").value())
                   .value()
                   .has_value());

    // Errors: unknown tag, ambiguous (two images, no tag), not a layout.
    auto missing = oci::import_layout(f.layout, "nope", store);
    BOOST_REQUIRE(!missing);
    BOOST_TEST(missing.error() == make_error_code(errc::not_found));
    auto ambiguous = oci::import_layout(f.layout, "", store);
    BOOST_REQUIRE(!ambiguous);
    BOOST_TEST(ambiguous.error() == make_error_code(errc::bad_reference));
    BOOST_TEST(!oci::import_layout(cache.path, "latest", store));
}

BOOST_AUTO_TEST_CASE(oci_layout_with_a_corrupt_blob) {
    auto& f = fixture();
    temp_dir work;
    auto copy = work.path / "layout";
    run("cp -r " + f.layout.string() + " " + copy.string());
    auto image = oci::import_layout(f.layout, "latest",
                                    *std::make_unique<oci::content_store>(work.path / "c0"));
    BOOST_REQUIRE(image.has_value());
    auto layer_file = copy / "blobs/sha256" / image.value().manifest.layers[0].digest.hex();
    fs::permissions(layer_file, fs::perms::owner_write, fs::perm_options::add);
    {
        std::fstream io(layer_file, std::ios::in | std::ios::out | std::ios::binary);
        io.seekp(100);
        io.put('\x42');
    }
    oci::content_store store(work.path / "c1");
    auto bad = oci::import_layout(copy, "latest", store);
    BOOST_REQUIRE(!bad);
    BOOST_TEST(bad.error() == make_error_code(errc::digest_mismatch));
    BOOST_TEST(!store.contains(image.value().manifest.layers[0].digest));
    BOOST_TEST(count_files(work.path / "c1/ingest") == 0u);
}

BOOST_AUTO_TEST_CASE(docker_archive_classic_from_skopeo) {
    auto& f = fixture();
    temp_dir work;
    auto archive = work.path / "busybox.tar";
    skopeo_copy("oci:" + f.layout.string() + ":latest",
                "docker-archive:" + archive.string() + ":busybox:1.36");
    oci::content_store store(work.path / "cache");
    auto named =
        oci::parse_image_source("docker-archive:" + archive.string() + ":busybox:1.36").value();
    std::string why;
    auto image = oci::pull_image(named, store, {}, &why);
    BOOST_TEST_INFO(why);
    BOOST_REQUIRE(image.has_value());
    auto& m = image.value().manifest;
    BOOST_REQUIRE(m.layers.size() == 1u);
    // skopeo stores layers uncompressed: the layer digest is the config's diff_id.
    BOOST_TEST(m.layers[0].media_type == oci::media_type::oci_layer);
    BOOST_TEST(m.layers[0].digest.str() == image.value().config.diff_ids.at(0).str());
    BOOST_TEST(image.value().config.cmd.value() == std::vector<std::string>{"/bin/sh"});
    // The same config as the layout's: skopeo keeps it byte for byte.
    auto layout_manifest = oci::parse_image_manifest(
                               read_text(f.layout / "blobs/sha256" / f.manifest_digest.substr(7)))
                               .value();
    BOOST_TEST(m.config.digest.str() == layout_manifest.config.digest.str());
    BOOST_TEST(oci::find_pulled_image(named, store).value().has_value());

    // Unnamed works when the archive holds one image; a wrong name does not.
    BOOST_TEST(oci::import_docker_archive(archive, nullptr, store).has_value());
    auto other = oci::parse_reference("busybox:9").value();
    auto wrong = oci::import_docker_archive(archive, &other, store);
    BOOST_REQUIRE(!wrong);
    BOOST_TEST(wrong.error() == make_error_code(errc::not_found));

    // A layer altered after saving no longer matches its diff_id.
    auto unpacked = work.path / "unpacked";
    fs::create_directories(unpacked);
    run("tar -xf " + archive.string() + " -C " + unpacked.string());
    auto layer = unpacked / (m.layers[0].digest.hex() + ".tar");
    fs::permissions(layer, fs::perms::owner_write, fs::perm_options::add);
    run("printf 'x' >> " + layer.string());
    auto tampered = work.path / "tampered.tar";
    run("tar -cf " + tampered.string() + " -C " + unpacked.string() + " .");
    oci::content_store fresh(work.path / "cache2");
    auto bad = oci::import_docker_archive(tampered, nullptr, fresh);
    BOOST_REQUIRE(!bad);
    BOOST_TEST(bad.error() == make_error_code(errc::digest_mismatch));
}

BOOST_AUTO_TEST_CASE(docker_archive_holding_an_oci_layout) {
    // The docker 25+ shape: an OCI layout plus manifest.json, in one tar.
    auto& f = fixture();
    temp_dir work;
    auto tree = work.path / "tree";
    run("cp -r " + f.layout.string() + " " + tree.string());
    auto manifest =
        oci::parse_image_manifest(read_text(tree / "blobs/sha256" / f.manifest_digest.substr(7)))
            .value();
    nlohmann::json classic =
        nlohmann::json::array({{{"Config", "blobs/sha256/" + manifest.config.digest.hex()},
                                {"RepoTags", {"busybox:latest"}},
                                {"Layers", {"blobs/sha256/" + manifest.layers[0].digest.hex()}}}});
    write_text(tree / "manifest.json", classic.dump());
    auto archive = work.path / "new.tar";
    run("tar -cf " + archive.string() + " -C " + tree.string() + " .");
    oci::content_store store(work.path / "cache");
    auto name = oci::parse_reference("busybox:latest").value();
    auto image = oci::import_docker_archive(archive, &name, store);
    BOOST_REQUIRE(image.has_value());
    // Came through index.json (tag "latest"), so the real manifest digest.
    BOOST_TEST(image.value().manifest_digest.str() == f.manifest_digest);
    BOOST_TEST(image.value().manifest.layers[0].media_type == oci::media_type::oci_layer_gzip);
}

BOOST_AUTO_TEST_CASE(malformed_archives) {
    temp_dir work;
    oci::content_store store(work.path / "cache");
    write_text(work.path / "garbage.tar", std::string(5000, 'g'));
    auto garbage = oci::import_docker_archive(work.path / "garbage.tar", nullptr, store);
    BOOST_REQUIRE(!garbage);
    BOOST_TEST(garbage.error() == make_error_code(errc::archive_malformed));
    BOOST_TEST(!oci::import_docker_archive(work.path / "absent.tar", nullptr, store));
    // A valid tar without manifest.json.
    write_text(work.path / "file", "hello");
    run("tar -cf " + (work.path / "plain.tar").string() + " -C " + work.path.string() + " file");
    auto plain = oci::import_docker_archive(work.path / "plain.tar", nullptr, store);
    BOOST_REQUIRE(!plain);
    BOOST_TEST(plain.error() == make_error_code(errc::not_found));
    // Truncated in the middle of a member.
    auto text = read_text(work.path / "plain.tar");
    write_text(work.path / "short.tar", text.substr(0, 600));
    auto truncated = oci::import_docker_archive(work.path / "short.tar", nullptr, store);
    BOOST_REQUIRE(!truncated);
    BOOST_TEST(truncated.error() == make_error_code(errc::archive_malformed));
}

BOOST_AUTO_TEST_SUITE_END()
