// Basic auth (htpasswd), TLS with CAs and certificates made by openssl,
// docker's certs.d (CA and client certificate), against the real
// docker-registry; each failure's words are checked, not just its code.
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
    o.certs_d.clear(); // nothing from this machine's /etc/docker/certs.d
    return o;
}

bool has(const std::string& text, const std::string& words) {
    return text.find(words) != std::string::npos;
}

// CAs and certificates made by openssl in one directory (EC keys: fast).
struct test_pki {
    fs::path dir;
    explicit test_pki(fs::path d)
        : dir(std::move(d)) {}
    std::string path(const std::string& file) const { return (dir / file).string(); }
    void make_ca(const std::string& name) {
        run("cd " + dir.string() +
            " && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
            "-keyout " +
            name + ".key -out " + name + ".crt -days 2 -subj /CN=" + name);
    }
    // NAME.crt + NAME.key for `subject`, signed by `ca`, with extension lines `ext`.
    void issue(const std::string& name, const std::string& subject, const std::string& ext,
               const std::string& days = "2", const std::string& ca = "ca") {
        run("cd " + dir.string() +
            " && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout " +
            name + ".key -out " + name + ".csr -subj /CN=" + subject + " && printf '" + ext +
            "' > " + name + ".ext && openssl x509 -req -in " + name + ".csr -CA " + ca +
            ".crt -CAkey " + ca + ".key -CAcreateserial -out " + name + ".crt -days " + days +
            " -extfile " + name + ".ext");
    }
};

const std::string server_ext = "subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n";
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
    // Refused; the text says which credentials went out (or why none did).
    auto refused = [&](oci::registry_options options, const std::string& name) {
        oci::content_store store(dir.path / name);
        oci::registry_client client(options);
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(name << ": " << client.last_error());
        BOOST_TEST(!r.has_value());
        if (!r) BOOST_TEST(r.error() == make_error_code(errc::unauthorized));
        BOOST_TEST(has(client.last_error(), "401"));
        return client.last_error();
    };
    auto config = dir.path / "docker-config.json";
    auto with_config = [&](const std::string& text) {
        write_text(config, text);
        oci::registry_options o;
        o.docker_config = config;
        return o;
    };

    auto none = refused(no_docker_config(), "c1");
    BOOST_TEST(has(none, "no credentials were sent: none were given and the docker config is "
                         "not read"));
    oci::registry_options absent;
    absent.docker_config = dir.path / "nowhere.json";
    BOOST_TEST(has(refused(absent, "c2"),
                   "no credentials were sent: " + (dir.path / "nowhere.json").string() +
                       " does not exist"));
    // A config.json that does not parse is named, with the parser's position.
    auto broken = refused(with_config("{\"auths\": {\"x\": }"), "c3");
    BOOST_TEST(has(broken, "no credentials were sent: cannot parse " + config.string()));
    BOOST_TEST(has(broken, "parse error at line 1"));
    // An entry for another registry only, and a credential helper we do not run.
    auto other = refused(
        with_config(R"({"auths":{"other.example:5000":{"auth":"YTpi"}},"credsStore":"desktop"})"),
        "c4");
    BOOST_TEST(has(other, "no \"auths\" entry for " + server.host() + " in " + config.string()));
    BOOST_TEST(has(other, "docker-credential-desktop, which supermachine does not run"));

    // A wrong password reads differently from no credentials at all.
    auto options = no_docker_config();
    options.credentials = oci::credentials{"alice", "wrong", ""};
    auto wrong = refused(options, "c5");
    BOOST_TEST(has(wrong, "the credentials sent were refused: user 'alice' given by the caller"));
    BOOST_TEST(!has(wrong, "no credentials were sent"));
    auto wrong_from_file =
        refused(with_config("{\"auths\":{\"http://" + server.host() + "\":{\"auth\":\"" +
                            oci::base64_encode("alice:wrong") + "\"}}}"),
                "c6");
    BOOST_TEST(has(wrong_from_file, "the credentials sent were refused: user 'alice' from " +
                                        config.string() + " (auths key \"http://" + server.host() +
                                        "\")"));
    {
        options.credentials = oci::credentials{"alice", "s3cret", ""};
        oci::content_store store(dir.path / "c7");
        oci::registry_client client(options);
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(r.has_value());
        BOOST_TEST(r.value().layers.size() == 1u);
    }
    {
        // Credentials from a docker config.json (auths.<host>.auth = base64 user:pass).
        auto o = with_config("{\"auths\":{\"http://" + server.host() + "\":{\"auth\":\"" +
                             oci::base64_encode("alice:s3cret") + "\"}}}");
        oci::content_store store(dir.path / "c8");
        oci::registry_client client(o);
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(r.has_value());
    }
}

BOOST_AUTO_TEST_CASE(tls_verification_failures_say_why_and_what_to_do) {
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    test_pki pki(dir.path);
    pki.make_ca("ca");
    pki.make_ca("other");
    pki.issue("server", "127.0.0.1", server_ext);
    pki.issue("expired", "127.0.0.1", server_ext, "-1");
    registry_server::options options;
    options.tls_certificate = pki.path("server.crt");
    options.tls_key = pki.path("server.key");
    registry_server server(dir.path, options);
    auto ref = parse(server.host() + "/secure/busybox:1");
    skopeo_copy("oci:" + layout.string() + ":latest", "docker://" + ref.str());
    auto pull = [&](oci::registry_options o, const oci::image_reference& r,
                    const std::string& name) {
        oci::content_store store(dir.path / name);
        oci::registry_client client(o);
        auto pulled = client.pull(r, store);
        BOOST_TEST_INFO(name << ": " << client.last_error());
        return std::pair(pulled.has_value(), client.last_error());
    };
    const std::string failed = "certificate verification failed for " + server.host() + ": ";

    {
        // Verified against our CA; loopback is not exempted here.
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        o.ca_file = pki.path("ca.crt");
        BOOST_TEST(pull(o, ref, "c1").first);
    }
    {
        // No CA: an unknown issuer, and the ways to trust one.
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        oci::content_store store(dir.path / "c2");
        oci::registry_client client(o);
        auto r = client.pull(ref, store);
        BOOST_REQUIRE(!r);
        BOOST_TEST(r.error() == make_error_code(errc::io_error));
        auto text = client.last_error();
        BOOST_TEST_INFO(text);
        BOOST_TEST(has(text, failed + "unknown issuer (unable to get local issuer certificate)"));
        BOOST_TEST(has(text, "issued by CN=ca"));
        BOOST_TEST(has(text, "trusted CAs: the system store"));
        BOOST_TEST(has(text, "--ca-file CA.pem"));
        BOOST_TEST(has(text, "update-ca-certificates"));
        BOOST_TEST(has(text, "/etc/docker/certs.d/" + server.host() + "/ca.crt"));
        BOOST_TEST(has(text, "--insecure"));
    }
    {
        // Loopback is unverified by default (docker's rule)...
        BOOST_TEST(pull(no_docker_config(), ref, "c3").first);
        // ...but an explicit --ca-file asks for verification: one that did
        // not sign the certificate is refused, the right one accepted.
        auto o = no_docker_config();
        o.ca_file = pki.path("other.crt");
        auto [ok, text] = pull(o, ref, "c4");
        BOOST_TEST(!ok);
        BOOST_TEST(has(text, failed + "unknown issuer"), text);
        BOOST_TEST(has(text, "--ca-file " + pki.path("other.crt")), text);
        o.ca_file = pki.path("ca.crt");
        BOOST_TEST(pull(o, ref, "c5").first);
    }
    {
        // The certificate names 127.0.0.1 only; reached as localhost.
        auto o = no_docker_config();
        o.ca_file = pki.path("ca.crt");
        auto by_name = parse("localhost:" + std::to_string(server.port()) + "/secure/busybox:1");
        auto [ok, text] = pull(o, by_name, "c6");
        BOOST_TEST(!ok);
        BOOST_TEST(has(text, "certificate verification failed for localhost:" +
                                 std::to_string(server.port()) +
                                 ": name mismatch (hostname mismatch)"),
                   text);
        BOOST_TEST(has(text, "for IP:127.0.0.1"), text);
        BOOST_TEST(has(text, "subjectAltName"), text);
    }
    {
        // --insecure: TLS without verification (no fallback to plain HTTP needed).
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        o.insecure = true;
        BOOST_TEST(pull(o, ref, "c7").first);
    }
    {
        // An expired certificate from the right CA.
        temp_dir other_dir;
        registry_server::options expired_options;
        expired_options.tls_certificate = pki.path("expired.crt");
        expired_options.tls_key = pki.path("expired.key");
        registry_server expired(other_dir.path, expired_options);
        auto o = no_docker_config();
        o.ca_file = pki.path("ca.crt");
        oci::registry_client client(o);
        auto r = client.pull_manifest(parse(expired.host() + "/secure/busybox:1"));
        BOOST_REQUIRE(!r);
        BOOST_TEST(has(client.last_error(), "certificate verification failed for " +
                                                expired.host() +
                                                ": expired (certificate has expired)"),
                   client.last_error());
        BOOST_TEST(has(client.last_error(), "Renew the certificate"), client.last_error());
    }
}

BOOST_AUTO_TEST_CASE(docker_certs_d_with_a_ca_and_a_client_certificate) {
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    test_pki pki(dir.path);
    pki.make_ca("ca");
    pki.make_ca("other");
    pki.issue("server", "127.0.0.1", server_ext);
    pki.issue("client", "supermachine-client",
              "extendedKeyUsage=clientAuth\\nbasicConstraints=CA:FALSE\\n");
    registry_server::options options;
    options.tls_certificate = pki.path("server.crt");
    options.tls_key = pki.path("server.key");
    options.tls_client_ca = pki.path("ca.crt");
    registry_server server(dir.path, options);
    auto certs_d = dir.path / "certs.d";
    auto host_dir = certs_d / server.host();
    fs::create_directories(host_dir);
    fs::copy_file(pki.path("ca.crt"), host_dir / "ca.crt");
    fs::copy_file(pki.path("client.crt"), host_dir / "client.cert");
    fs::copy_file(pki.path("client.key"), host_dir / "client.key");
    auto ref = parse(server.host() + "/mtls/busybox:1");
    skopeo_copy("oci:" + layout.string() + ":latest", "docker://" + ref.str(),
                "--dest-cert-dir " + host_dir.string());
    auto pull = [&](oci::registry_options o, const std::string& name) {
        oci::content_store store(dir.path / name);
        oci::registry_client client(o);
        auto pulled = client.pull(ref, store);
        BOOST_TEST_INFO(name << ": " << client.last_error());
        return std::pair(pulled.has_value(), client.last_error());
    };

    {
        // certs.d gives the CA (verified, loopback or not) and the client certificate.
        auto o = no_docker_config();
        o.loopback_is_insecure = false;
        o.certs_d = {dir.path / "elsewhere", certs_d};
        auto [ok, text] = pull(o, "c1");
        BOOST_TEST(ok, text);
    }
    {
        // Without certs.d there is no client certificate to show.
        auto [ok, text] = pull(no_docker_config(), "c2");
        BOOST_TEST(!ok);
        BOOST_TEST(has(text, "client.cert and client.key in /etc/docker/certs.d/" + server.host()),
                   text);
    }
    {
        // $SUPERMACHINE_CERTS_D replaces the default roots (so tests need not write to /etc).
        ::setenv("SUPERMACHINE_CERTS_D", (dir.path.string() + "/none:" + certs_d.string()).c_str(),
                 1);
        oci::registry_options o;
        ::unsetenv("SUPERMACHINE_CERTS_D");
        BOOST_TEST(o.certs_d.size() == 2u);
        o.use_docker_config = false;
        auto [ok, text] = pull(o, "c3");
        BOOST_TEST(ok, text);
    }
    {
        // A certs.d CA is a request to verify, on loopback too: a wrong one is refused.
        auto wrong = dir.path / "wrong.d";
        fs::create_directories(wrong / server.host());
        fs::copy_file(pki.path("other.crt"), wrong / server.host() / "ca.crt");
        fs::copy_file(pki.path("client.crt"), wrong / server.host() / "client.cert");
        fs::copy_file(pki.path("client.key"), wrong / server.host() / "client.key");
        auto o = no_docker_config();
        o.certs_d = {wrong};
        auto [ok, text] = pull(o, "c4");
        BOOST_TEST(!ok);
        BOOST_TEST(has(text, "unknown issuer"), text);
        BOOST_TEST(has(text, (wrong / server.host() / "ca.crt").string()), text);
        // A client certificate without its key: docker's words for it.
        fs::remove(wrong / server.host() / "client.key");
        auto [ok2, text2] = pull(o, "c5");
        BOOST_TEST(!ok2);
        BOOST_TEST(has(text2, "missing key " + (wrong / server.host() / "client.key").string()),
                   text2);
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
        auto r = client.pull(ref, store);
        BOOST_TEST(!r);
        BOOST_TEST(has(client.last_error(), "does not seem to speak TLS"), client.last_error());
        BOOST_TEST(has(client.last_error(), "--insecure-registry " + server.host()),
                   client.last_error());
        BOOST_TEST(!has(client.last_error(), "plain HTTP:")); // not tried
    }
    {
        // A --ca-file makes loopback verified, but a plain-HTTP registry there still works.
        auto loopback = no_docker_config();
        loopback.ca_file = "/etc/ssl/certs/ca-certificates.crt";
        oci::content_store other(dir.path / "c2");
        oci::registry_client client(loopback);
        auto r = client.pull(ref, other);
        BOOST_TEST(r.has_value(), client.last_error());
    }
    o.insecure_registries = {server.host()};
    oci::registry_client client(o);
    auto r = client.pull(ref, store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_TEST(r.has_value());
}

BOOST_AUTO_TEST_SUITE_END()
