// Manifest, index, config, platform, WWW-Authenticate and docker-config
// parsing, and the content store's verify-then-rename discipline.
#include <supermachine/oci/auth.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/detail/http_url.hpp>
#include <supermachine/oci/image_config.hpp>
#include <supermachine/oci/manifest.hpp>

#include <boost/test/unit_test.hpp>

#include <fstream>

namespace oci = supermachine::oci;
namespace fs = std::filesystem;
using supermachine::errc;
using supermachine::make_error_code;

namespace {
const std::string d1 = "sha256:" + std::string(64, '1');
const std::string d2 = "sha256:" + std::string(64, '2');

std::string manifest_json(const std::string& size = "100", const std::string& digest = d2) {
    return R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
      "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":")" +
           d1 +
           R"(","size":10},
      "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":")" +
           digest + R"(","size":)" + size + "}]}";
}
} // namespace

BOOST_AUTO_TEST_SUITE(manifests)

BOOST_AUTO_TEST_CASE(parses_the_four_kinds) {
    auto m = oci::parse_image_manifest(manifest_json());
    BOOST_REQUIRE(m.has_value());
    BOOST_TEST(m.value().layers.size() == 1u);
    BOOST_TEST(m.value().layers[0].size == 100);
    BOOST_TEST(m.value().total_size() == 110);

    // Docker v2 schema 2, typed only by Content-Type.
    auto docker =
        R"({"schemaVersion":2,"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":")" +
        d1 + R"(","size":1},"layers":[]})";
    auto dm = oci::parse_image_manifest(
        docker, "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8");
    BOOST_REQUIRE(dm.has_value());
    BOOST_TEST(dm.value().media_type == oci::media_type::docker_manifest);

    auto list =
        R"({"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
      "manifests":[
        {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":")" +
        d1 +
        R"(","size":5,"platform":{"os":"linux","architecture":"arm","variant":"v7"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":")" +
        std::string(d2) +
        R"(","size":5,"platform":{"os":"unknown","architecture":"unknown"}},
        {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":")" +
        d2 + R"(","size":5,"platform":{"os":"linux","architecture":"amd64"}}]})";
    auto index = oci::parse_image_index(list);
    BOOST_REQUIRE(index.has_value());
    BOOST_TEST(index.value().manifests.size() == 3u);
    BOOST_TEST(oci::select_platform(index.value(), oci::default_platform()).value().digest.str() ==
               d2);
    BOOST_TEST(oci::select_platform(index.value(), oci::parse_platform("linux/arm/v7").value())
                   .value()
                   .digest.str() == d1);
    BOOST_TEST(oci::select_platform(index.value(), oci::parse_platform("arm").value()).has_value());
    BOOST_TEST(!oci::select_platform(index.value(), oci::parse_platform("linux/arm/v6").value()));
    BOOST_TEST(!oci::select_platform(index.value(), oci::parse_platform("windows/amd64").value()));

    // Shape decides when nothing else does (OCI makes mediaType optional).
    auto bare_index = R"({"schemaVersion":2,"manifests":[]})";
    BOOST_TEST(std::holds_alternative<oci::image_index>(oci::parse_manifest(bare_index).value()));
}

BOOST_AUTO_TEST_CASE(rejects_invalid_documents) {
    auto invalid = [](const std::string& text, std::string_view type = {}) {
        auto r = oci::parse_manifest(text, type);
        BOOST_TEST_INFO(text.substr(0, 80));
        BOOST_TEST(!r.has_value());
        return r ? supermachine::error_code() : r.error();
    };
    invalid("");
    invalid("[]");
    invalid("{}");
    invalid("not json");
    invalid(manifest_json("-1"));
    invalid(manifest_json("1.5"));
    invalid(manifest_json("\"100\""));
    invalid(manifest_json("99999999999999999999"));
    invalid(manifest_json(std::to_string(std::int64_t(1) << 40))); // over the blob bound
    invalid(manifest_json("1", "sha256:abc"));
    invalid(manifest_json("1", "md5:" + std::string(32, 'a')));
    invalid(R"({"schemaVersion":3,"config":{},"layers":[]})");
    BOOST_TEST(invalid(R"({"schemaVersion":1,"name":"x"})") ==
               make_error_code(errc::not_supported));
    invalid(manifest_json(), oci::media_type::oci_index); // Content-Type vs mediaType disagree
    invalid(R"({"schemaVersion":2,"mediaType":"text/plain","config":{},"layers":[]})");
    invalid(std::string(100, '[') + std::string(100, ']'));
    invalid(std::string(oci::max_manifest_bytes + 1, ' '));
    std::string many = R"({"schemaVersion":2,"manifests":[)";
    for (int i = 0; i < 1100; ++i)
        many += std::string(i ? "," : "") +
                R"({"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":")" + d1 +
                R"(","size":1})";
    invalid(many + "]}");
}

BOOST_AUTO_TEST_CASE(image_config_fields) {
    auto c = oci::parse_image_config(R"({"architecture":"amd64","os":"linux",
      "config":{"Entrypoint":["/bin/app","--flag"],"Cmd":null,"Env":["PATH=/bin","A=b=c"],
        "WorkingDir":"/srv","User":"app:staff","ExposedPorts":{"80/tcp":{},"53/udp":{}},
        "Labels":{"org.example":"yes"},"StopSignal":"SIGTERM"},
      "rootfs":{"type":"layers","diff_ids":[")" +
                                     d1 + R"("]}})");
    BOOST_REQUIRE(c.has_value());
    auto& v = c.value();
    BOOST_TEST(v.entrypoint.value() == (std::vector<std::string>{"/bin/app", "--flag"}));
    BOOST_TEST(!v.cmd.has_value()); // null: not set, unlike []
    BOOST_TEST(v.env.size() == 2u);
    BOOST_TEST(v.working_dir == "/srv");
    BOOST_TEST(v.user == "app:staff");
    BOOST_TEST(v.exposed_ports.size() == 2u);
    BOOST_TEST(v.labels.at("org.example") == "yes");
    BOOST_TEST(v.diff_ids.size() == 1u);
    BOOST_TEST(v.platform.str() == "linux/amd64");
    BOOST_TEST(oci::parse_image_config(R"({"config":{"Cmd":[]}})").value().cmd.value().empty());

    BOOST_TEST(!oci::parse_image_config(R"({"config":{"Cmd":"sh"}})"));
    BOOST_TEST(!oci::parse_image_config(R"({"config":{"Env":[1]}})"));
    BOOST_TEST(!oci::parse_image_config(R"({"rootfs":{"diff_ids":["sha256:zz"]}})"));
    BOOST_TEST(!oci::parse_image_config("[1]"));
}

BOOST_AUTO_TEST_CASE(www_authenticate) {
    auto c = oci::parse_www_authenticate(
        R"(Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull")");
    BOOST_REQUIRE(c.has_value());
    BOOST_REQUIRE(c.value().size() == 1u);
    BOOST_TEST(c.value()[0].scheme == "bearer");
    BOOST_TEST(c.value()[0].params.at("realm") == "https://auth.docker.io/token");
    BOOST_TEST(c.value()[0].params.at("scope") == "repository:library/alpine:pull");

    auto mixed = oci::parse_www_authenticate(
        R"(BASIC REALM="Registry Realm", bearer Realm = "http://x/t" , Service=svc, error="a\"b")");
    BOOST_REQUIRE(mixed.has_value());
    BOOST_REQUIRE(mixed.value().size() == 2u);
    BOOST_TEST(mixed.value()[0].scheme == "basic");
    BOOST_TEST(mixed.value()[0].params.at("realm") == "Registry Realm");
    BOOST_TEST(mixed.value()[1].params.at("realm") == "http://x/t");
    BOOST_TEST(mixed.value()[1].params.at("service") == "svc");
    BOOST_TEST(mixed.value()[1].params.at("error") == "a\"b");

    BOOST_TEST(!oci::parse_www_authenticate(R"(Bearer realm="unterminated)"));
    BOOST_TEST(!oci::parse_www_authenticate(std::string(9000, 'a')));
}

BOOST_AUTO_TEST_CASE(base64_and_docker_config) {
    BOOST_TEST(oci::base64_encode("alice:s3cret") == "YWxpY2U6czNjcmV0");
    BOOST_TEST(oci::base64_encode("a") == "YQ==");
    BOOST_TEST(oci::base64_encode("ab") == "YWI=");
    BOOST_TEST(oci::base64_decode("YWxpY2U6czNjcmV0").value() == "alice:s3cret");
    BOOST_TEST(!oci::base64_decode("!!"));

    auto dir = fs::temp_directory_path() / ("sm-auth-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    auto path = dir / "config.json";
    std::ofstream(path) << R"({"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnB3"},
        "localhost:5000":{"auth":"bG9jYWw6cGFzczp3aXRoOmNvbG9ucw=="},
        "https://ghcr.io":{"username":"u","password":"p"}}})";
    auto hub = oci::load_docker_credentials("docker.io", path).value();
    BOOST_REQUIRE(hub.has_value());
    BOOST_TEST(hub->username == "hub");
    BOOST_TEST(hub->password == "pw");
    auto local = oci::load_docker_credentials("localhost:5000", path).value();
    BOOST_REQUIRE(local.has_value());
    BOOST_TEST(local->password == "pass:with:colons");
    BOOST_TEST(oci::load_docker_credentials("ghcr.io", path).value()->username == "u");
    BOOST_TEST(!oci::load_docker_credentials("quay.io", path).value().has_value());
    BOOST_TEST(!oci::load_docker_credentials("x", dir / "absent.json").value().has_value());
    std::ofstream(path) << "{not json";
    BOOST_TEST(!oci::load_docker_credentials("x", path));
    fs::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(urls) {
    using oci::detail::parse_http_url;
    auto u = parse_http_url("https://storage.example.com:8443/a/b?sig=1#frag").value();
    BOOST_TEST(u.tls);
    BOOST_TEST(u.host == "storage.example.com");
    BOOST_TEST(u.port == "8443");
    BOOST_TEST(u.target == "/a/b?sig=1");
    BOOST_TEST(parse_http_url("http://h").value().target == "/");
    BOOST_TEST(parse_http_url("http://h").value().port == "80");
    BOOST_TEST(parse_http_url("http://[::1]:5000/v2/").value().host == "::1");
    BOOST_TEST(parse_http_url("http://[::1]:5000/v2/").value().authority() == "[::1]:5000");
    BOOST_TEST(!parse_http_url("ftp://h/x"));
    BOOST_TEST(!parse_http_url("http://h:99999/"));
    BOOST_TEST(!parse_http_url("http://h/a b"));
    BOOST_TEST(!parse_http_url("http:///x"));
    auto base = parse_http_url("https://reg:5000/v2/x").value();
    BOOST_TEST(oci::detail::resolve_location(base, "/other").value().str() ==
               "https://reg:5000/other");
    BOOST_TEST(oci::detail::resolve_location(base, "//cdn/x").value().host == "cdn");
    BOOST_TEST(!oci::detail::resolve_location(base, "relative"));
}

BOOST_AUTO_TEST_CASE(content_store_verifies_before_renaming) {
    auto root = fs::temp_directory_path() / ("sm-store-" + std::to_string(::getpid()));
    fs::remove_all(root);
    oci::content_store store(root);
    auto good = oci::compute_digest("hello");
    BOOST_TEST(store.write_blob(good, "hello").has_value());
    BOOST_TEST(store.contains(good));
    BOOST_TEST(store.read_blob(good, 100).value() == "hello");
    BOOST_TEST(store.read_blob(good, 3).error() == make_error_code(errc::image_too_large));
    BOOST_TEST(store.blob_path(good).string().ends_with("blobs/sha256/" + good.hex()));

    auto other = oci::compute_digest("other");
    auto wrong = store.write_blob(other, "not other");
    BOOST_REQUIRE(!wrong);
    BOOST_TEST(wrong.error() == make_error_code(errc::digest_mismatch));
    BOOST_TEST(!store.contains(other));
    BOOST_TEST(fs::is_empty(root / "ingest"));

    // Size enforced while writing, before the digest is even known.
    auto writer = store.begin_write(other, 5).value();
    BOOST_TEST(!writer.write("toolong"));
    BOOST_TEST(fs::is_empty(root / "ingest"));

    // A blob changed on disk behind our back is caught when read.
    fs::permissions(store.blob_path(good), fs::perms::owner_write, fs::perm_options::add);
    std::ofstream(store.blob_path(good)) << "HELLO";
    BOOST_TEST(store.read_blob(good, 100).error() == make_error_code(errc::digest_mismatch));

    // Image records replace by reference.
    oci::image_record r{"a:1", good, good, good, 5, "linux/amd64", 0};
    BOOST_TEST(store.record_image(r).has_value());
    r.size = 6;
    BOOST_TEST(store.record_image(r).has_value());
    r.reference = "b:1";
    BOOST_TEST(store.record_image(r).has_value());
    auto all = store.list_images().value();
    BOOST_TEST(all.size() == 2u);
    BOOST_TEST(store.find_image("a:1").value()->size == 6);
    BOOST_TEST(!store.find_image("c:1").value().has_value());
    fs::remove_all(root);
}

BOOST_AUTO_TEST_SUITE_END()
