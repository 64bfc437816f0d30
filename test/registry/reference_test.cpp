// The docker reference grammar and the skopeo-style transports.
#include <supermachine/oci/reference.hpp>

#include <boost/test/unit_test.hpp>

#include <string>
#include <vector>

namespace oci = supermachine::oci;
using supermachine::errc;

namespace {
const std::string hex64(64, 'a');

oci::image_reference ok(std::string_view text) {
    std::string reason;
    auto r = oci::parse_reference(text, &reason);
    BOOST_TEST_INFO("reference: " << text << " reason: " << reason);
    BOOST_REQUIRE(r.has_value());
    return r.value();
}

std::string bad(std::string_view text) {
    std::string reason;
    auto r = oci::parse_reference(text, &reason);
    BOOST_TEST_INFO("reference: " << text);
    BOOST_REQUIRE(!r.has_value());
    BOOST_TEST(r.error() == make_error_code(errc::bad_reference));
    BOOST_TEST(!reason.empty());
    return reason;
}
} // namespace

BOOST_AUTO_TEST_SUITE(reference)

BOOST_AUTO_TEST_CASE(docker_hub_defaults) {
    auto r = ok("alpine");
    BOOST_TEST(r.registry == "docker.io");
    BOOST_TEST(r.repository == "library/alpine");
    BOOST_TEST(r.tag == "latest");
    BOOST_TEST(!r.digest);
    BOOST_TEST(r.endpoint() == "registry-1.docker.io");
    BOOST_TEST(r.str() == "docker.io/library/alpine:latest");
    BOOST_TEST(r.familiar() == "alpine:latest");

    BOOST_TEST(ok("library/alpine:3.19").str() == "docker.io/library/alpine:3.19");
    BOOST_TEST(ok("docker.io/alpine").str() == "docker.io/library/alpine:latest");
    BOOST_TEST(ok("docker.io/library/alpine:edge").tag == "edge");
    BOOST_TEST(ok("index.docker.io/alpine").str() == "docker.io/library/alpine:latest");
    BOOST_TEST(ok("index.docker.io/alpine").endpoint() == "registry-1.docker.io");
    BOOST_TEST(ok("user/app").str() == "docker.io/user/app:latest");
    BOOST_TEST(ok("user/app").familiar() == "user/app:latest");
    BOOST_TEST(ok("a/b/c/d:1").repository == "a/b/c/d");
}

BOOST_AUTO_TEST_CASE(registries_and_ports) {
    auto r = ok("localhost:5000/ns/name:tag@sha256:" + hex64);
    BOOST_TEST(r.registry == "localhost:5000");
    BOOST_TEST(r.repository == "ns/name");
    BOOST_TEST(r.tag == "tag");
    BOOST_REQUIRE(r.digest.has_value());
    BOOST_TEST(r.digest->hex() == hex64);
    BOOST_TEST(r.manifest_reference() == "sha256:" + hex64);
    BOOST_TEST(r.endpoint() == "localhost:5000");
    BOOST_TEST(r.familiar() == "localhost:5000/ns/name:tag@sha256:" + hex64);

    BOOST_TEST(ok("localhost/foo").registry == "localhost");
    BOOST_TEST(ok("localhost/foo").repository == "foo"); // no library/ outside Docker Hub
    BOOST_TEST(ok("127.0.0.1:5000/foo").registry == "127.0.0.1:5000");
    BOOST_TEST(ok("ghcr.io/owner/image:v1.2.3").registry == "ghcr.io");
    BOOST_TEST(ok("quay.io/a/b").tag == "latest");
    BOOST_TEST(ok("my-registry.example.com:443/x").registry == "my-registry.example.com:443");
    BOOST_TEST(ok("host:5000/foo").registry == "host:5000"); // a port makes it a registry
    BOOST_TEST(ok("Registry/foo").registry == "Registry");   // capitals: a host, as docker does
    // "foo" without dot/port/localhost is a namespace on Docker Hub, not a registry.
    BOOST_TEST(ok("foo/bar").registry == "docker.io");
    BOOST_TEST(ok("foo/bar").repository == "foo/bar");
}

BOOST_AUTO_TEST_CASE(digests_and_tags) {
    auto d = ok("alpine@sha256:" + hex64);
    BOOST_TEST(d.tag.empty()); // pinned: no implicit latest
    BOOST_TEST(d.manifest_reference() == "sha256:" + hex64);
    BOOST_TEST(ok("alpine:3@sha512:" + std::string(128, '0')).digest.value().algorithm_name() ==
               "sha512");
    BOOST_TEST(ok("a:_tag").tag == "_tag");
    BOOST_TEST(ok("a:T.a-g_9").tag == "T.a-g_9");
    BOOST_TEST(ok("a:" + std::string(128, 'x')).tag.size() == 128u);
    BOOST_TEST(ok("a__b/c-d---e.f_g").repository == "a__b/c-d---e.f_g");
}

BOOST_AUTO_TEST_CASE(printed_forms_parse_back) {
    // Found by fuzzing: forms that would read differently when parsed again.
    for (std::string text : std::vector<std::string>{
             "docker.io/b22222ocker.io/b22222", "docker.io/" + hex64, "docker.io/localhost/x",
             "alpine", "a/b:c", "localhost:1/x@sha256:" + hex64}) {
        auto r = ok(text);
        BOOST_TEST(ok(r.str()).str() == r.str());
        BOOST_TEST(ok(r.familiar()).str() == r.str());
    }
    BOOST_TEST(ok("docker.io/b.c/d").familiar() == "docker.io/b.c/d:latest");
    // The 255 bound applies to the normalized name, as in docker.
    bad("a/" + std::string(250, 'b'));
}

BOOST_AUTO_TEST_CASE(rejects_bad_references) {
    bad("");
    BOOST_TEST(bad("Alpine").find("lowercase") != std::string::npos);
    BOOST_TEST(bad("library/Alpine").find("lowercase") != std::string::npos);
    bad("alpine:");
    bad("alpine:-x");
    bad("alpine:.x");
    bad("alpine:" + std::string(129, 'x'));
    bad("alpine:a b");
    bad("alpine@sha256:abc");
    bad("alpine@sha256:" + std::string(64, 'A')); // uppercase hex
    bad("alpine@md5:" + std::string(32, 'a'));
    bad("alpine@sha256:" + hex64 + "@sha256:" + hex64);
    bad("a..b");
    bad("a___b");
    bad("-a");
    bad("a-");
    bad("a/");
    bad("/a");
    bad("a//b");
    bad("_a");
    bad("a-_b");
    bad("localhost:/a");
    bad("localhost:99999/a");
    bad("localhost:0/a");
    bad("local_host.com/a");
    bad("-host.com/a");
    bad("host..com/a");
    bad("a b");
    bad("a/b c");
    bad(":tag");
    bad("@sha256:" + hex64);
    bad(hex64); // an image ID
    bad(std::string(256, 'a'));
    bad("localhost:5000/a:b:c");
    bad("a/b:c/d");
    bad("a\nb");
}

BOOST_AUTO_TEST_CASE(transports) {
    auto s = oci::parse_image_source("oci:/tmp/layout:v1");
    BOOST_REQUIRE(s.has_value());
    BOOST_TEST(int(s.value().transport) == int(oci::image_transport::oci_layout));
    BOOST_TEST(s.value().path == "/tmp/layout");
    BOOST_TEST(s.value().layout_tag == "v1");
    BOOST_TEST(s.value().str() == "oci:/tmp/layout:v1");

    s = oci::parse_image_source("oci:relative/dir");
    BOOST_REQUIRE(s.has_value());
    BOOST_TEST(s.value().path == "relative/dir");
    BOOST_TEST(s.value().layout_tag.empty());

    s = oci::parse_image_source("docker-archive:/tmp/img.tar:busybox:1.36");
    BOOST_REQUIRE(s.has_value());
    BOOST_TEST(int(s.value().transport) == int(oci::image_transport::docker_archive));
    BOOST_TEST(s.value().path == "/tmp/img.tar");
    BOOST_TEST(s.value().has_reference);
    BOOST_TEST(s.value().reference.str() == "docker.io/library/busybox:1.36");

    s = oci::parse_image_source("docker-archive:img.tar");
    BOOST_REQUIRE(s.has_value());
    BOOST_TEST(!s.value().has_reference);

    s = oci::parse_image_source("docker://localhost:5000/x/y:z");
    BOOST_REQUIRE(s.has_value());
    BOOST_TEST(int(s.value().transport) == int(oci::image_transport::registry));
    BOOST_TEST(s.value().reference.str() == "localhost:5000/x/y:z");

    s = oci::parse_image_source("alpine");
    BOOST_REQUIRE(s.has_value());
    BOOST_TEST(s.value().reference.str() == "docker.io/library/alpine:latest");

    std::string reason;
    BOOST_TEST(!oci::parse_image_source("oci:", &reason));
    BOOST_TEST(!reason.empty());
    BOOST_TEST(!oci::parse_image_source("oci:/x:"));
    BOOST_TEST(!oci::parse_image_source("docker-archive:"));
    BOOST_TEST(!oci::parse_image_source("docker-archive:/x.tar:Bad"));
    BOOST_TEST(!oci::parse_image_source("docker-archive:/x.tar:a@sha256:" + hex64));
    BOOST_TEST(!oci::parse_image_source("docker://"));
}

BOOST_AUTO_TEST_CASE(digest_parsing_and_hashing) {
    BOOST_TEST(oci::compute_digest("").str() ==
               "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    BOOST_TEST(oci::compute_digest("abc", oci::digest_algorithm::sha512).hex().substr(0, 16) ==
               "ddaf35a193617aba");
    oci::hasher h;
    h.update("a");
    h.update("bc");
    BOOST_TEST(h.bytes_hashed() == 3u);
    BOOST_TEST(h.finish().str() == oci::compute_digest("abc").str());
    BOOST_TEST(!oci::digest::parse("sha256:" + std::string(63, 'a')));
    BOOST_TEST(!oci::digest::parse("sha256:" + std::string(65, 'a')));
    BOOST_TEST(!oci::digest::parse("sha512:" + hex64));
    BOOST_TEST(!oci::digest::parse("sha256" + hex64));
    BOOST_TEST(!oci::digest::parse("sha256:" + std::string(63, 'a') + "g"));
    BOOST_TEST(oci::digest::parse("sha256:" + hex64).has_value());
}

BOOST_AUTO_TEST_SUITE_END()
