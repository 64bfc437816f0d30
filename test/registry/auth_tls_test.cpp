// Basic auth (htpasswd) and TLS with a self-signed CA, against the real
// docker-registry.
#include "registry_fixture.hpp"

#include <supermachine/oci/registry_client.hpp>

#include <boost/test/unit_test.hpp>

namespace oci = supermachine::oci;
namespace fs = std::filesystem;
using supermachine::errc;
using supermachine::make_error_code;
using namespace supermachine::test;

namespace {
// bcrypt("s3cret"), cost 4 so that every request's check stays cheap.
const char* htpasswd_line = "alice:$2b$04$zTfKrLlsiIa0EsPG/XkzReGbQUHmROMFi1OOWgyuSy3zC3d5eP.a2\n";

oci::image_reference parse(const std::string& text) {
    return oci::parse_reference(text).value();
}

oci::registry_options no_docker_config() {
    oci::registry_options o;
    o.use_docker_config = false;
    return o;
}
} // namespace

BOOST_AUTO_TEST_SUITE(registry_auth_tls)

BOOST_AUTO_TEST_CASE(basic_auth_with_htpasswd) {
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    write_text(dir.path / "htpasswd", htpasswd_line);
    registry_server server(dir.path, {"auth:\n  htpasswd:\n    realm: test-realm\n    path: " +
                                      (dir.path / "htpasswd").string() + "\n"});
    auto ref = parse(server.host() + "/private/busybox:1");
    skopeo_copy("oci:" + layout.string() + ":latest", "docker://" + ref.str(),
                "--dest-creds alice:s3cret");

    {
        oci::content_store store(dir.path / "c1");
        oci::registry_client anonymous(no_docker_config());
        auto r = anonymous.pull(ref, store);
        BOOST_REQUIRE(!r);
        BOOST_TEST(r.error() == make_error_code(errc::unauthorized));
        BOOST_TEST(anonymous.last_error().find("401") != std::string::npos);
    }
    {
        auto options = no_docker_config();
        options.credentials = oci::credentials{"alice", "wrong", ""};
        oci::content_store store(dir.path / "c2");
        oci::registry_client client(options);
        auto r = client.pull(ref, store);
        BOOST_REQUIRE(!r);
        BOOST_TEST(r.error() == make_error_code(errc::unauthorized));
    }
    {
        auto options = no_docker_config();
        options.credentials = oci::credentials{"alice", "s3cret", ""};
        oci::content_store store(dir.path / "c3");
        oci::registry_client client(options);
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(r.has_value());
        BOOST_TEST(r.value().layers.size() == 1u);
    }
    {
        // Credentials from a docker config.json (auths.<host>.auth = base64 user:pass).
        auto config = dir.path / "docker-config.json";
        write_text(config, "{\"auths\":{\"http://" + server.host() + "\":{\"auth\":\"" +
                               oci::base64_encode("alice:s3cret") + "\"}}}");
        oci::registry_options options;
        options.docker_config = config;
        oci::content_store store(dir.path / "c4");
        oci::registry_client client(options);
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(r.has_value());
    }
}

BOOST_AUTO_TEST_CASE(tls_with_a_self_signed_ca) {
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    auto d = dir.path.string();
    run("cd " + d +
        " && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 "
        "-subj /CN=supermachine-test-ca"
        " && openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr "
        "-subj /CN=127.0.0.1"
        " && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > "
        "ext.cnf"
        " && openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial "
        "-out server.crt -days 2 -extfile ext.cnf");
    registry_server::options options;
    options.tls_certificate = d + "/server.crt";
    options.tls_key = d + "/server.key";
    registry_server server(dir.path, options);
    auto ref = parse(server.host() + "/secure/busybox:1");
    skopeo_copy("oci:" + layout.string() + ":latest", "docker://" + ref.str());

    {
        // Verified against our CA; loopback is not exempted here.
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        o.ca_file = d + "/ca.crt";
        oci::content_store store(dir.path / "c1");
        oci::registry_client client(o);
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(r.has_value());
    }
    {
        // Without the CA the certificate cannot be verified: a clear failure.
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        oci::content_store store(dir.path / "c2");
        oci::registry_client client(o);
        auto r = client.pull(ref, store);
        BOOST_REQUIRE(!r);
        BOOST_TEST(r.error() == make_error_code(errc::io_error));
        BOOST_TEST(client.last_error().find("TLS handshake") != std::string::npos);
        BOOST_TEST(client.last_error().find("certificate verify failed") != std::string::npos);
    }
    {
        // A CA that did not sign it: refused as well.
        run("cd " + d +
            " && openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key "
            "-out other.crt -days 2 -subj /CN=other-ca");
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        o.ca_file = d + "/other.crt";
        oci::content_store store(dir.path / "c3");
        oci::registry_client client(o);
        BOOST_TEST(!client.pull(ref, store));
    }
    {
        // --insecure: TLS without verification (no fallback to plain HTTP needed).
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        o.insecure = true;
        oci::content_store store(dir.path / "c4");
        oci::registry_client client(o);
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(r.has_value());
    }
}

BOOST_AUTO_TEST_CASE(plain_http_needs_insecure_outside_loopback_rules) {
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    registry_server server(dir.path);
    auto ref = parse(server.host() + "/plain/busybox:1");
    skopeo_copy("oci:" + layout.string() + ":latest", "docker://" + ref.str());
    auto o = no_docker_config();
    o.loopback_is_insecure = false;
    oci::content_store store(dir.path / "c");
    {
        oci::registry_client client(o); // HTTPS only: the plain server cannot answer
        BOOST_TEST(!client.pull(ref, store));
    }
    o.insecure_registries = {server.host()};
    oci::registry_client client(o);
    auto r = client.pull(ref, store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_TEST(r.has_value());
}

BOOST_AUTO_TEST_SUITE_END()
