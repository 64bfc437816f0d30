// Pulls from a real docker-registry (Debian's) on 127.0.0.1, with images built
// by umoci and pushed by skopeo; skopeo's own pull is the oracle.
#include "registry_fixture.hpp"

#include <supermachine/oci/registry_client.hpp>

#include <boost/test/unit_test.hpp>

#include <fstream>

namespace oci = supermachine::oci;
namespace fs = std::filesystem;
using supermachine::errc;
using supermachine::make_error_code;
using namespace supermachine::test;

namespace {

// One registry and one pushed busybox image for the whole binary.
struct shared_registry {
    temp_dir dir;
    fs::path layout;
    std::unique_ptr<registry_server> server;
    shared_registry() {
        layout = make_busybox_layout(dir.path, "latest", "amd64");
        make_busybox_layout(dir.path, "arm", "arm64");
        server = std::make_unique<registry_server>(dir.path);
        skopeo_copy("oci:" + layout.string() + ":latest",
                    "docker://" + server->host() + "/test/busybox:1");
    }
    std::string ref(const std::string& rest) const { return server->host() + "/" + rest; }
};

shared_registry& shared() {
    static shared_registry instance;
    return instance;
}

oci::image_reference parse(const std::string& text) {
    return oci::parse_reference(text).value();
}

// What skopeo pulls for the same reference: the manifest digest it records.
std::string skopeo_manifest_digest(const std::string& reference, const fs::path& dir,
                                   const std::string& extra = "") {
    auto out = dir / "skopeo-oracle";
    fs::remove_all(out);
    skopeo_copy("docker://" + reference, "oci:" + out.string() + ":x", extra);
    auto index = nlohmann::json::parse(read_text(out / "index.json"));
    return index["manifests"][0]["digest"].get<std::string>();
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

BOOST_AUTO_TEST_SUITE(registry_pull)

BOOST_AUTO_TEST_CASE(anonymous_pull_matches_skopeo) {
    auto& r = shared();
    temp_dir cache;
    oci::content_store store(cache.path);
    oci::registry_client client;
    std::vector<oci::progress_event> events;
    auto pulled = client.pull(parse(r.ref("test/busybox:1")), store, oci::default_platform(),
                              [&](const oci::progress_event& e) { events.push_back(e); });
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(pulled.has_value());
    auto& image = pulled.value();
    BOOST_TEST(image.manifest_digest.str() ==
               skopeo_manifest_digest(r.ref("test/busybox:1"), cache.path));
    BOOST_REQUIRE(image.manifest.layers.size() == 1u);
    BOOST_REQUIRE(image.layers.size() == 1u);
    // Every blob is in the store, under its digest, and hashes to it.
    for (auto& layer : image.manifest.layers) {
        auto bytes = read_text(store.blob_path(layer.digest));
        BOOST_TEST(bytes.size() == std::size_t(layer.size));
        BOOST_TEST(oci::compute_digest(bytes).str() == layer.digest.str());
        BOOST_TEST(fs::exists(r.layout / "blobs/sha256" / layer.digest.hex()));
    }
    BOOST_TEST(image.config.cmd.value() == std::vector<std::string>{"/bin/sh"});
    BOOST_TEST(image.config.working_dir == "/tmp");
    BOOST_TEST(image.config.user == "1000:1000");
    BOOST_TEST(image.config.exposed_ports == std::vector<std::string>{"8080/tcp"});
    BOOST_TEST(image.config.labels.at("test") == "yes");
    BOOST_TEST(image.config.platform.architecture == "amd64");
    BOOST_TEST(image.config.diff_ids.size() == 1u);
    // Progress: started, some progress, completed, for config and layer.
    BOOST_TEST(events.size() >= 5u);
    BOOST_TEST(int(events.back().state) == int(oci::progress_event::phase::completed));
    BOOST_TEST(events.back().done == image.manifest.layers[0].size);
    // The record for `images`, and reload from the store without network.
    auto record = store.find_image(r.ref("test/busybox:1")).value();
    BOOST_REQUIRE(record.has_value());
    BOOST_TEST(record->manifest_digest.str() == image.manifest_digest.str());
    BOOST_TEST(record->size == image.manifest.total_size());
    auto reloaded = store.load_image(*record);
    BOOST_REQUIRE(reloaded.has_value());
    BOOST_TEST(reloaded.value().layers == image.layers);
    // No temp files remain.
    BOOST_TEST(count_files(cache.path / "ingest") == 0u);

    // A second pull fetches nothing: everything is cached.
    events.clear();
    auto again = client.pull(parse(r.ref("test/busybox:1")), store, oci::default_platform(),
                             [&](const oci::progress_event& e) { events.push_back(e); });
    BOOST_REQUIRE(again.has_value());
    for (auto& e : events)
        BOOST_TEST(int(e.state) == int(oci::progress_event::phase::cached));
}

BOOST_AUTO_TEST_CASE(pull_by_digest_and_errors) {
    auto& r = shared();
    temp_dir cache;
    oci::content_store store(cache.path);
    oci::registry_client client;
    auto by_tag = client.pull_manifest(parse(r.ref("test/busybox:1")));
    BOOST_REQUIRE(by_tag.has_value());
    auto pinned = parse(r.ref("test/busybox@" + by_tag.value().manifest_digest.str()));
    auto by_digest = client.pull(pinned, store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(by_digest.has_value());
    BOOST_TEST(by_digest.value().image_manifest_digest.str() ==
               by_tag.value().manifest_digest.str());

    auto missing = client.pull(parse(r.ref("test/busybox:nope")), store);
    BOOST_REQUIRE(!missing);
    BOOST_TEST(missing.error() == make_error_code(errc::not_found));
    BOOST_TEST(client.last_error().find("MANIFEST_UNKNOWN") != std::string::npos);

    auto no_repo = client.pull(parse(r.ref("nobody/here:1")), store);
    BOOST_REQUIRE(!no_repo);
    BOOST_TEST(no_repo.error() == make_error_code(errc::not_found));

    // A digest that exists nowhere.
    auto ghost = client.pull(parse(r.ref("test/busybox@sha256:" + std::string(64, '0'))), store);
    BOOST_REQUIRE(!ghost);
    BOOST_TEST(ghost.error() == make_error_code(errc::not_found));

    // A single-platform amd64 image is not an arm64 one.
    auto arm = client.pull(parse(r.ref("test/busybox:1")), store,
                           oci::parse_platform("linux/arm64").value());
    BOOST_REQUIRE(!arm);
    BOOST_TEST(arm.error() == make_error_code(errc::platform_not_found));
    BOOST_TEST(client.last_error().find("linux/amd64") != std::string::npos);

    // Nothing listens on this port.
    oci::registry_client refused;
    auto down = refused.pull(parse("127.0.0.1:" + std::to_string(free_port()) + "/a:b"), store);
    BOOST_REQUIRE(!down);
    BOOST_TEST(down.error() == make_error_code(errc::io_error));
    BOOST_TEST(refused.last_error().find("connect") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(range_resume_of_a_partial_blob) {
    auto& r = shared();
    oci::registry_client client;
    auto manifest = client.pull_manifest(parse(r.ref("test/busybox:1")));
    BOOST_REQUIRE(manifest.has_value());
    auto layer = manifest.value().manifest.layers.at(0);
    auto original = read_text(r.layout / "blobs/sha256" / layer.digest.hex());
    BOOST_REQUIRE(original.size() > 1000u);

    // A correct half is resumed: the rest comes with Range and verifies.
    {
        temp_dir cache;
        oci::content_store store(cache.path);
        {
            auto writer = store.begin_write(layer.digest, layer.size).value();
            BOOST_REQUIRE(writer.write(std::string_view(original).substr(0, original.size() / 2)));
        } // dropped without commit: the .partial stays for resume
        BOOST_TEST(count_files(cache.path / "ingest") == 1u);
        std::vector<oci::progress_event> events;
        auto fetched =
            client.fetch_blob(parse(r.ref("test/busybox:1")), layer, store,
                              [&](const oci::progress_event& e) { events.push_back(e); });
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(fetched.has_value());
        BOOST_REQUIRE(!events.empty());
        BOOST_TEST(events.front().done == std::int64_t(original.size() / 2)); // started mid-way
        BOOST_TEST(read_text(store.blob_path(layer.digest)) == original);
        BOOST_TEST(count_files(cache.path / "ingest") == 0u);
    }
    // A corrupt prefix proves the rest was fetched with Range (a full
    // re-download would have succeeded): digest mismatch, nothing left behind.
    {
        temp_dir cache;
        oci::content_store store(cache.path);
        {
            auto writer = store.begin_write(layer.digest, layer.size).value();
            std::string corrupt = original.substr(0, original.size() / 2);
            corrupt[10] ^= 0x55;
            BOOST_REQUIRE(writer.write(corrupt));
        }
        auto fetched = client.fetch_blob(parse(r.ref("test/busybox:1")), layer, store);
        BOOST_REQUIRE(!fetched);
        BOOST_TEST(fetched.error() == make_error_code(errc::digest_mismatch));
        BOOST_TEST(!store.contains(layer.digest));
        BOOST_TEST(count_files(cache.path) == 0u);
    }
}

BOOST_AUTO_TEST_CASE(index_with_two_platforms) {
    auto& r = shared();
    skopeo_copy("oci:" + r.layout.string() + ":arm", "docker://" + r.ref("test/multi:arm"));
    skopeo_copy("oci:" + r.layout.string() + ":latest", "docker://" + r.ref("test/multi:amd"));
    oci::registry_client client;
    auto amd = client.fetch_manifest(parse(r.ref("test/multi:amd")), "amd").value();
    auto arm = client.fetch_manifest(parse(r.ref("test/multi:arm")), "arm").value();
    nlohmann::json index = {
        {"schemaVersion", 2},
        {"mediaType", std::string(oci::media_type::oci_index)},
        {"manifests",
         {{{"mediaType", std::string(oci::media_type::oci_manifest)},
           {"digest", arm.digest.str()},
           {"size", arm.bytes.size()},
           {"platform", {{"os", "linux"}, {"architecture", "arm64"}, {"variant", "v8"}}}},
          {{"mediaType", std::string(oci::media_type::oci_manifest)},
           {"digest", amd.digest.str()},
           {"size", amd.bytes.size()},
           {"platform", {{"os", "linux"}, {"architecture", "amd64"}}}}}}};
    temp_dir work;
    write_text(work.path / "index.json", index.dump());
    run("curl -sf -X PUT -H 'Content-Type: " + std::string(oci::media_type::oci_index) +
        "' --data-binary @" + (work.path / "index.json").string() + " http://" +
        r.ref("v2/test/multi/manifests/both"));

    oci::content_store store(work.path / "cache");
    auto pulled = client.pull(parse(r.ref("test/multi:both")), store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(pulled.has_value());
    BOOST_TEST(pulled.value().image_manifest_digest.str() == amd.digest.str());
    BOOST_TEST(pulled.value().manifest_digest.str() != amd.digest.str()); // the index's
    BOOST_TEST(pulled.value().config.platform.architecture == "amd64");
    // skopeo picks the same one for linux/amd64.
    BOOST_TEST(skopeo_manifest_digest(r.ref("test/multi:both"), work.path,
                                      "--override-arch amd64 --override-os linux") ==
               amd.digest.str());

    auto on_arm = client.pull_manifest(parse(r.ref("test/multi:both")),
                                       oci::parse_platform("linux/arm64").value());
    BOOST_REQUIRE(on_arm.has_value());
    BOOST_TEST(on_arm.value().manifest_digest.str() == arm.digest.str());
    BOOST_TEST(on_arm.value().index.has_value());
    BOOST_TEST(client
                   .pull_manifest(parse(r.ref("test/multi:both")),
                                  oci::parse_platform("linux/arm64/v8").value())
                   .value()
                   .manifest_digest.str() == arm.digest.str());

    auto s390 = client.pull_manifest(parse(r.ref("test/multi:both")),
                                     oci::parse_platform("linux/s390x").value());
    BOOST_REQUIRE(!s390);
    BOOST_TEST(s390.error() == make_error_code(errc::platform_not_found));
    BOOST_TEST(client.last_error().find("linux/arm64/v8") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(zstd_layers) {
    auto& r = shared();
    // Recompress into a fresh layout first: pushing straight to the registry
    // would reuse the gzip blob it already holds.
    temp_dir cache;
    auto zstd_layout = cache.path / "zstd-layout";
    skopeo_copy("oci:" + r.layout.string() + ":latest", "oci:" + zstd_layout.string() + ":z",
                "--dest-compress-format zstd");
    skopeo_copy("oci:" + zstd_layout.string() + ":z", "docker://" + r.ref("test/zstd:1"));
    oci::content_store store(cache.path);
    oci::registry_client client;
    auto pulled = client.pull(parse(r.ref("test/zstd:1")), store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(pulled.has_value());
    auto& layer = pulled.value().manifest.layers.at(0);
    BOOST_TEST(layer.media_type == oci::media_type::oci_layer_zstd);
    auto bytes = read_text(store.blob_path(layer.digest));
    BOOST_REQUIRE(bytes.size() > 4u);
    BOOST_TEST(bytes.substr(0, 4) == std::string("\x28\xb5\x2f\xfd", 4)); // zstd frame magic
    BOOST_TEST(pulled.value().manifest_digest.str() ==
               skopeo_manifest_digest(r.ref("test/zstd:1"), cache.path));
}

BOOST_AUTO_TEST_CASE(docker_schema2_manifest) {
    auto& r = shared();
    skopeo_copy("oci:" + r.layout.string() + ":latest", "docker://" + r.ref("test/docker:1"),
                "--format v2s2");
    temp_dir cache;
    oci::content_store store(cache.path);
    oci::registry_client client;
    auto pulled = client.pull(parse(r.ref("test/docker:1")), store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(pulled.has_value());
    BOOST_TEST(pulled.value().manifest.media_type == oci::media_type::docker_manifest);
    BOOST_TEST(pulled.value().manifest.layers.at(0).media_type ==
               oci::media_type::docker_layer_gzip);
    // skopeo's view of the same manifest: its raw bytes' digest.
    auto raw = run("skopeo inspect --raw --tls-verify=false docker://" + r.ref("test/docker:1"));
    BOOST_TEST(pulled.value().manifest_digest.str() == oci::compute_digest(raw).str());
    auto inspected = nlohmann::json::parse(
        run("skopeo inspect --tls-verify=false docker://" + r.ref("test/docker:1")));
    BOOST_TEST(inspected["Layers"][0].get<std::string>() ==
               pulled.value().manifest.layers.at(0).digest.str());
}

BOOST_AUTO_TEST_CASE(mislabelled_layer_is_fetched_as_is) {
    // A manifest that calls an uncompressed tar "tar+gzip", pushed with the raw
    // registry API (skopeo would repair it). The registry client moves bytes
    // by digest; the layer reader decides by magic bytes, not the label.
    auto& r = shared();
    temp_dir work;
    write_text(work.path / "hello.txt", "hello\n");
    run("tar -cf " + (work.path / "layer.tar").string() + " -C " + work.path.string() +
        " hello.txt");
    auto layer = read_text(work.path / "layer.tar");
    auto layer_digest = oci::compute_digest(layer);
    std::string config =
        R"({"architecture":"amd64","os":"linux","config":{"Cmd":["/hello"]},"rootfs":{"type":"layers","diff_ids":[")" +
        layer_digest.str() + R"("]}})";
    write_text(work.path / "config.json", config);
    auto config_digest = oci::compute_digest(config);
    auto upload = [&](const fs::path& file, const oci::digest& d) {
        run("loc=$(curl -sf -i -X POST http://" + r.ref("v2/test/mislabelled/blobs/uploads/") +
            " | tr -d '\\r' | sed -n 's/^[Ll]ocation: //p') && curl -sf -X PUT -H "
            "'Content-Type: application/octet-stream' --data-binary @" +
            file.string() + " \"$loc&digest=" + d.str() + "\"");
    };
    upload(work.path / "layer.tar", layer_digest);
    upload(work.path / "config.json", config_digest);
    nlohmann::json manifest = {{"schemaVersion", 2},
                               {"mediaType", std::string(oci::media_type::oci_manifest)},
                               {"config",
                                {{"mediaType", std::string(oci::media_type::oci_config)},
                                 {"digest", config_digest.str()},
                                 {"size", config.size()}}},
                               {"layers",
                                {{{"mediaType", std::string(oci::media_type::oci_layer_gzip)},
                                  {"digest", layer_digest.str()},
                                  {"size", layer.size()}}}}};
    write_text(work.path / "manifest.json", manifest.dump());
    run("curl -sf -X PUT -H 'Content-Type: " + std::string(oci::media_type::oci_manifest) +
        "' --data-binary @" + (work.path / "manifest.json").string() + " http://" +
        r.ref("v2/test/mislabelled/manifests/1"));

    oci::content_store store(work.path / "cache");
    oci::registry_client client;
    auto pulled = client.pull(parse(r.ref("test/mislabelled:1")), store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(pulled.has_value());
    BOOST_TEST(pulled.value().manifest.layers.at(0).media_type == oci::media_type::oci_layer_gzip);
    auto bytes = read_text(pulled.value().layers.at(0));
    BOOST_TEST(bytes == layer);
    BOOST_TEST(!(bytes.size() > 2 && bytes[0] == '\x1f' && bytes[1] == '\x8b')); // not gzip at all
    BOOST_TEST(bytes.substr(257, 5) == "ustar");
}

BOOST_AUTO_TEST_CASE(concurrent_pulls_of_one_image) {
    auto& r = shared();
    temp_dir cache;
    std::vector<std::thread> threads;
    std::atomic<int> ok{0};
    for (int i = 0; i < 4; ++i)
        threads.emplace_back([&] {
            oci::content_store store(cache.path);
            oci::registry_client client;
            if (client.pull(parse(r.ref("test/busybox:1")), store)) ++ok;
        });
    for (auto& t : threads)
        t.join();
    BOOST_TEST(ok.load() == 4);
    BOOST_TEST(count_files(cache.path / "ingest") == 0u);
    oci::content_store store(cache.path);
    auto images = store.list_images().value();
    BOOST_TEST(images.size() == 1u);
}

BOOST_AUTO_TEST_SUITE_END()
