// The registry protocol against scripted servers: the Bearer token flow, a
// cross-host redirect to blob storage, resume after a dropped connection, and
// hostile responses (huge lengths, endless headers, bad JSON, wrong bytes).
#include "fake_server.hpp"
#include "registry_fixture.hpp"

#include <supermachine/oci/registry_client.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/test/unit_test.hpp>

namespace oci = supermachine::oci;
namespace fs = std::filesystem;
using supermachine::errc;
using supermachine::make_error_code;
using namespace supermachine::test;

namespace {

oci::image_reference parse(const std::string& text) {
    return oci::parse_reference(text).value();
}

oci::registry_options quick_options() {
    oci::registry_options o;
    o.use_docker_config = false;
    o.timeout = std::chrono::seconds(5);
    return o;
}

std::size_t count_files(const fs::path& dir) {
    std::size_t n = 0;
    std::error_code ec;
    if (!fs::exists(dir, ec)) return 0;
    for (auto& e : fs::recursive_directory_iterator(dir))
        if (e.is_regular_file()) ++n;
    return n;
}

// A real image (from umoci) whose blobs the fake registries serve.
struct real_image {
    temp_dir dir;
    fs::path layout;
    std::string manifest_bytes;
    oci::digest manifest_digest;
    oci::image_manifest manifest;
    real_image() {
        layout = make_busybox_layout(dir.path);
        auto index = nlohmann::json::parse(read_text(layout / "index.json"));
        manifest_digest =
            oci::digest::parse(index["manifests"][0]["digest"].get<std::string>()).value();
        manifest_bytes = blob(manifest_digest);
        manifest = oci::parse_image_manifest(manifest_bytes).value();
    }
    std::string blob(const oci::digest& d) const {
        return read_text(layout / "blobs/sha256" / d.hex());
    }
    std::string blob_for_target(const std::string& target) const {
        auto at = target.rfind("sha256:");
        if (at == std::string::npos) return {};
        auto d = oci::digest::parse(target.substr(at, 7 + 64));
        if (!d || !fs::exists(layout / "blobs/sha256" / d.value().hex())) return {};
        return blob(d.value());
    }
};

real_image& image() {
    static real_image instance;
    return instance;
}

fake_reply manifest_reply(const std::string& body, const std::string& extra = "") {
    return http_reply(200, body, extra, std::string(oci::media_type::oci_manifest));
}

} // namespace

BOOST_AUTO_TEST_SUITE(registry_protocol)

BOOST_AUTO_TEST_CASE(bearer_token_flow_and_cross_host_redirect) {
    auto& img = image();
    fake_server storage([&](const fake_request& r) {
        auto body = img.blob_for_target(r.target);
        if (body.empty()) return http_reply(404, "");
        return http_reply(200, body, "", "application/octet-stream");
    });
    std::string registry_host;
    fake_server registry([&](const fake_request& r) -> fake_reply {
        // Scheme and parameter names in odd case, quoted values, as servers send them.
        std::string challenge =
            "WWW-Authenticate: BEARER Realm=\"http://" + registry_host +
            "/token\",SERVICE=\"fake-registry\",scope=\"repository:test/img:pull\"\r\n";
        if (r.target.starts_with("/token")) {
            if (r.target.find("scope=repository%3Atest%2Fimg%3Apull") == std::string::npos ||
                r.target.find("service=fake-registry") == std::string::npos)
                return http_reply(400, "{}");
            return http_reply(200, R"({"access_token":"tok-123","expires_in":300})");
        }
        if (r.header("authorization") != "Bearer tok-123")
            return http_reply(
                401, R"({"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]})",
                challenge);
        if (r.target == "/v2/") return http_reply(200, "{}");
        if (r.target == "/v2/test/img/manifests/1") return manifest_reply(img.manifest_bytes);
        if (r.target.starts_with("/v2/test/img/blobs/")) {
            auto hex = r.target.substr(r.target.rfind(':') + 1);
            return {"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://" + storage.host() +
                    "/storage/sha256:" + hex + "?sig=abc\r\nContent-Length: 0\r\n\r\n"};
        }
        return http_reply(404, R"({"errors":[{"code":"NAME_UNKNOWN","message":"no"}]})");
    });
    registry_host = registry.host();

    temp_dir cache;
    oci::content_store store(cache.path);
    oci::registry_client client(quick_options());
    auto pulled = client.pull(parse(registry.host() + "/test/img:1"), store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(pulled.has_value());
    BOOST_TEST(pulled.value().manifest_digest.str() == img.manifest_digest.str());
    BOOST_TEST(read_text(pulled.value().layers.at(0)) ==
               img.blob(img.manifest.layers.at(0).digest));

    // One token request, then the token on every registry request...
    int token_requests = 0;
    for (auto& r : registry.requests()) {
        if (r.target.starts_with("/token")) {
            ++token_requests;
            BOOST_TEST(r.header("authorization").empty()); // anonymous
        } else if (r.target != "/v2/") {
            BOOST_TEST(r.header("authorization") == "Bearer tok-123");
        }
    }
    BOOST_TEST(token_requests == 1);
    // ...but never to the other host the blobs were redirected to.
    auto stored = storage.requests();
    BOOST_REQUIRE(stored.size() == 2u); // config and layer
    for (auto& r : stored) {
        BOOST_TEST(r.header("authorization").empty());
        BOOST_TEST(r.target.find("?sig=abc") != std::string::npos);
    }
}

BOOST_AUTO_TEST_CASE(resume_after_a_dropped_connection) {
    auto& img = image();
    auto layer = img.manifest.layers.at(0);
    auto bytes = img.blob(layer.digest);
    int blob_requests = 0;
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        if (!r.target.starts_with("/v2/test/img/blobs/")) return http_reply(404, "");
        ++blob_requests;
        auto range = r.header("range");
        if (range.empty()) { // the whole blob announced, a third sent, then the line drops
            auto reply = http_reply(200, bytes, "", "application/octet-stream");
            reply.cut_after = reply.bytes.size() - bytes.size() + bytes.size() / 3;
            return reply;
        }
        auto start = std::stoul(range.substr(6));
        auto rest = bytes.substr(start);
        return http_reply(206, rest,
                          "Content-Range: bytes " + std::to_string(start) + "-" +
                              std::to_string(bytes.size() - 1) + "/" +
                              std::to_string(bytes.size()) + "\r\n",
                          "application/octet-stream");
    });
    temp_dir cache;
    oci::content_store store(cache.path);
    oci::registry_client client(quick_options());
    auto fetched = client.fetch_blob(parse(registry.host() + "/test/img:1"), layer, store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(fetched.has_value());
    BOOST_TEST(blob_requests == 2);
    BOOST_TEST(registry.requests().back().header("range") ==
               "bytes=" + std::to_string(bytes.size() / 3) + "-");
    BOOST_TEST(read_text(store.blob_path(layer.digest)) == bytes);
    BOOST_TEST(count_files(cache.path / "ingest") == 0u);
}

BOOST_AUTO_TEST_CASE(range_ignored_means_start_over) {
    auto& img = image();
    auto layer = img.manifest.layers.at(0);
    auto bytes = img.blob(layer.digest);
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        return http_reply(200, bytes, "", "application/octet-stream"); // no Range support
    });
    temp_dir cache;
    oci::content_store store(cache.path);
    {
        auto writer = store.begin_write(layer.digest, layer.size).value();
        BOOST_REQUIRE(writer.write(std::string(100, 'x'))); // garbage, would not verify
    }
    oci::registry_client client(quick_options());
    auto fetched = client.fetch_blob(parse(registry.host() + "/test/img:1"), layer, store);
    BOOST_TEST_INFO(client.last_error());
    BOOST_REQUIRE(fetched.has_value());
    BOOST_TEST(registry.requests().back().header("range") == "bytes=100-");
    BOOST_TEST(read_text(store.blob_path(layer.digest)) == bytes);
}

BOOST_AUTO_TEST_CASE(hostile_manifest_responses) {
    auto& img = image();
    std::string mode;
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        if (mode == "huge")
            return {
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n"
                "Content-Length: 10000000000\r\n\r\n{"};
        if (mode == "endless") return {"HTTP/1.1 200 OK\r\n", std::string::npos, true};
        if (mode == "badjson") return manifest_reply("{\"schemaVersion\":2,\"config\":");
        if (mode == "deep")
            return manifest_reply(std::string(100000, '[') + std::string(100000, ']'));
        if (mode == "wrongdigest")
            return manifest_reply(img.manifest_bytes,
                                  "Docker-Content-Digest: sha256:" + std::string(64, 'a') + "\r\n");
        if (mode == "schema1")
            return http_reply(200, R"({"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]})", "",
                              std::string(oci::media_type::docker_schema1_signed));
        if (mode == "negative") {
            auto j = nlohmann::json::parse(img.manifest_bytes);
            j["layers"][0]["size"] = -5;
            return manifest_reply(j.dump());
        }
        if (mode == "baddigest") {
            auto j = nlohmann::json::parse(img.manifest_bytes);
            j["layers"][0]["digest"] = "sha256:XYZ";
            return manifest_reply(j.dump());
        }
        if (mode == "wrongtype")
            return http_reply(200, img.manifest_bytes, "", std::string(oci::media_type::oci_index));
        if (mode == "429")
            return http_reply(429,
                              R"({"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]})");
        if (mode == "500") return http_reply(500, "<html>oops</html>", "", "text/html");
        if (mode == "403")
            return http_reply(
                403,
                R"({"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]})");
        if (mode == "401bare") return http_reply(401, "");
        if (mode == "loop")
            return {"HTTP/1.1 302 Found\r\nLocation: /v2/x/manifests/again\r\nContent-Length: "
                    "0\r\n\r\n"};
        if (mode == "badlocation")
            return {"HTTP/1.1 302 Found\r\nLocation: ftp://x/y\r\nContent-Length: 0\r\n\r\n"};
        if (mode == "garbage") return {"SSH-2.0-OpenSSH_9.2\r\n\r\n"};
        if (mode == "truncated") {
            auto reply = manifest_reply(img.manifest_bytes);
            reply.cut_after = reply.bytes.size() - 10;
            return reply;
        }
        return http_reply(404, "");
    });
    auto ref = parse(registry.host() + "/x:1");
    auto expect = [&](const std::string& m, errc code, const std::string& words = "") {
        mode = m;
        oci::registry_client client(quick_options());
        auto start = std::chrono::steady_clock::now();
        auto r = client.pull_manifest(ref);
        auto seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        BOOST_TEST_INFO("mode " << m << ": " << client.last_error());
        BOOST_TEST(!r.has_value());
        if (!r) BOOST_TEST(r.error() == make_error_code(code));
        BOOST_TEST(seconds < 4.0); // refused at once, not by a timeout
        if (!words.empty()) BOOST_TEST(client.last_error().find(words) != std::string::npos);
    };
    expect("huge", errc::image_too_large, "larger than allowed");
    expect("endless", errc::registry_error, "header");
    expect("badjson", errc::manifest_invalid);
    expect("deep", errc::manifest_invalid);
    expect("wrongdigest", errc::digest_mismatch, "Docker-Content-Digest");
    expect("schema1", errc::not_supported, "schema 1");
    expect("negative", errc::manifest_invalid);
    expect("baddigest", errc::manifest_invalid);
    expect("wrongtype", errc::manifest_invalid);
    expect("429", errc::rate_limited, "TOOMANYREQUESTS");
    expect("500", errc::registry_error, "500");
    expect("403", errc::unauthorized, "DENIED");
    expect("401bare", errc::unauthorized, "401");
    expect("loop", errc::registry_error, "redirects");
    expect("badlocation", errc::registry_error, "Location");
    expect("garbage", errc::io_error);
    expect("truncated", errc::io_error, "broke");

    // A pinned digest that the bytes do not hash to.
    mode = "plain";
    fake_server pinned([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        return manifest_reply(img.manifest_bytes);
    });
    oci::registry_client client(quick_options());
    auto r = client.pull_manifest(parse(pinned.host() + "/x@sha256:" + std::string(64, 'b')));
    BOOST_REQUIRE(!r);
    BOOST_TEST(r.error() == make_error_code(errc::digest_mismatch));
    BOOST_TEST(
        client.pull_manifest(parse(pinned.host() + "/x@" + img.manifest_digest.str())).has_value());
}

BOOST_AUTO_TEST_CASE(hostile_blob_responses_leave_nothing_behind) {
    auto& img = image();
    auto layer = img.manifest.layers.at(0);
    auto bytes = img.blob(layer.digest);
    std::string mode;
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        if (mode == "wrongbytes") {
            auto wrong = bytes;
            wrong[wrong.size() / 2] ^= 1;
            return http_reply(200, wrong, "", "application/octet-stream");
        }
        if (mode == "longer")
            return http_reply(200, bytes + "extra", "", "application/octet-stream");
        if (mode == "huge")
            return {"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n" +
                    bytes.substr(0, 1000)};
        if (mode == "chunked-longer") {
            std::string body = bytes + std::string(5000, 'z');
            char size[32];
            std::snprintf(size, sizeof size, "%zx", body.size());
            return {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + std::string(size) +
                    "\r\n" + body + "\r\n0\r\n\r\n"};
        }
        if (mode == "badrange")
            return http_reply(206, bytes, "Content-Range: bytes 7-9/10\r\n",
                              "application/octet-stream");
        if (mode == "404")
            return http_reply(
                404,
                R"({"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]})");
        return http_reply(500, "");
    });
    auto ref = parse(registry.host() + "/x:1");
    auto expect = [&](const std::string& m, errc code, const std::string& words = "") {
        mode = m;
        temp_dir cache;
        oci::content_store store(cache.path);
        oci::registry_client client(quick_options());
        auto r = client.fetch_blob(ref, layer, store);
        BOOST_TEST_INFO("mode " << m << ": " << client.last_error());
        BOOST_TEST(!r.has_value());
        if (!r) BOOST_TEST(r.error() == make_error_code(code));
        BOOST_TEST(!store.contains(layer.digest));
        if (code == errc::digest_mismatch || code == errc::size_mismatch)
            BOOST_TEST(count_files(cache.path) == 0u);
        if (!words.empty())
            BOOST_TEST(client.last_error().find(words) != std::string::npos,
                       m << ": " << client.last_error());
    };
    const auto size = std::to_string(bytes.size());
    expect("wrongbytes", errc::digest_mismatch,
           "the " + size + " bytes received (the size the manifest says) hash to sha256:");
    // Too many bytes is a size mismatch, told apart from wrong bytes.
    expect("longer", errc::size_mismatch,
           "announces a Content-Length of " + std::to_string(bytes.size() + 5) +
               " bytes where the descriptor says the blob is " + size + " bytes");
    expect("huge", errc::size_mismatch,
           "announces a Content-Length of 99999999999 bytes where the descriptor says the blob "
           "is " +
               size + " bytes");
    expect("chunked-longer", errc::size_mismatch, "sent more than the " + size + " bytes");
    expect("badrange", errc::registry_error);
    expect("404", errc::not_found);
}

BOOST_AUTO_TEST_CASE(a_silent_server_times_out) {
    // Accepts, reads the request, answers /v2/ and then says nothing.
    std::atomic<bool> release{false};
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        for (int i = 0; i < 100 && !release; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        return http_reply(404, "");
    });
    auto options = quick_options();
    options.timeout = std::chrono::seconds(1);
    oci::registry_client client(options);
    auto start = std::chrono::steady_clock::now();
    auto r = client.pull_manifest(parse(registry.host() + "/x:1"));
    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    release = true;
    BOOST_REQUIRE(!r);
    BOOST_TEST(r.error() == make_error_code(errc::timeout));
    BOOST_TEST(seconds < 3.0);

    // A manifest trickled a byte every 100 ms: each byte is "progress", but
    // the whole response shares one deadline.
    auto& img = image();
    fake_server trickler([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        auto reply = manifest_reply(img.manifest_bytes);
        reply.trickle_ms = 100;
        return reply;
    });
    oci::registry_client slow_client(options);
    start = std::chrono::steady_clock::now();
    auto slow = slow_client.pull_manifest(parse(trickler.host() + "/x:1"));
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    BOOST_REQUIRE(!slow);
    BOOST_TEST(slow.error() == make_error_code(errc::timeout));
    BOOST_TEST(seconds < 3.0);
}

// The manifest gives a layer the wrong size; the registry serves the true
// bytes. Not a digest problem: the words say the size is what is wrong.
BOOST_AUTO_TEST_CASE(size_errors_are_not_digest_errors) {
    auto& img = image();
    auto layer = img.manifest.layers.at(0);
    auto bytes = img.blob(layer.digest);
    auto j = nlohmann::json::parse(img.manifest_bytes);
    j["layers"][0]["size"] = layer.size + 10;
    auto bigger = j.dump();
    j["layers"][0]["size"] = layer.size - 10;
    auto smaller = j.dump();
    std::string mode;
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        if (r.target == "/v2/x/manifests/1")
            return manifest_reply(mode == "bigger" ? bigger : smaller);
        auto body = img.blob_for_target(r.target);
        if (body.empty()) return http_reply(404, "");
        return http_reply(200, body, "", "application/octet-stream");
    });
    auto ref = parse(registry.host() + "/x:1");
    for (std::string m : {"bigger", "smaller"}) {
        mode = m;
        temp_dir cache;
        oci::content_store store(cache.path);
        oci::registry_client client(quick_options());
        auto r = client.pull(ref, store);
        BOOST_TEST_INFO(m << ": " << client.last_error());
        BOOST_REQUIRE(!r);
        BOOST_TEST(r.error() == make_error_code(errc::size_mismatch));
        BOOST_TEST(client.last_error().find("does not match its digest") == std::string::npos);
        if (m == "bigger")
            BOOST_TEST(client.last_error().find(
                           "served " + std::to_string(bytes.size()) +
                           " bytes where the manifest says " + std::to_string(layer.size + 10) +
                           "; the bytes match the digest, so the manifest's size is wrong") !=
                       std::string::npos);
        else
            BOOST_TEST(client.last_error().find("announces a Content-Length of " +
                                                std::to_string(bytes.size())) != std::string::npos);
        // Nothing unreferenced stays: no manifest, no config, no partial layer.
        BOOST_TEST(count_files(cache.path / "blobs") == 0u);
        BOOST_TEST(count_files(cache.path / "ingest") == 0u);
    }
}

// A failed pull leaves no manifest or config blob behind that no image
// record names; the layers that did arrive stay for the next try.
BOOST_AUTO_TEST_CASE(a_failed_pull_leaves_no_unreferenced_manifest_or_config) {
    auto& img = image();
    bool layer_missing = true;
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        if (r.target == "/v2/x/manifests/1") return manifest_reply(img.manifest_bytes);
        if (layer_missing && r.target.ends_with(img.manifest.layers.at(0).digest.str()))
            return http_reply(
                404,
                R"({"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]})");
        auto body = img.blob_for_target(r.target);
        if (body.empty()) return http_reply(404, "");
        return http_reply(200, body, "", "application/octet-stream");
    });
    auto ref = parse(registry.host() + "/x:1");
    temp_dir cache;
    oci::content_store store(cache.path);
    oci::registry_client client(quick_options());
    auto failed = client.pull(ref, store);
    BOOST_REQUIRE(!failed);
    BOOST_TEST(failed.error() == make_error_code(errc::not_found));
    BOOST_TEST(count_files(cache.path / "blobs") == 0u);
    BOOST_TEST(!store.contains(img.manifest_digest));
    BOOST_TEST(!store.contains(img.manifest.config.digest));
    layer_missing = false;
    auto pulled = client.pull(ref, store);
    BOOST_REQUIRE(pulled.has_value());
    BOOST_TEST(store.contains(img.manifest_digest));
    BOOST_TEST(store.contains(img.manifest.config.digest));
    BOOST_TEST(count_files(cache.path / "blobs") == 3u); // manifest, config, layer
}

// Bounded stalls: the idle timeout is per read, a silent server costs one
// timeout (no plain-HTTP second try), retries stop at max_retry_time.
BOOST_AUTO_TEST_CASE(stalls_are_bounded) {
    using namespace std::chrono_literals;
    auto elapsed = [](auto start) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    {
        // Accepts (the kernel's backlog) and never answers: loopback may fall
        // back to plain HTTP, but not after a stall.
        silent_listener silent;
        auto options = quick_options();
        options.timeout = 700ms;
        oci::registry_client client(options);
        auto start = std::chrono::steady_clock::now();
        auto r = client.pull_manifest(parse(silent.host() + "/x:1"));
        auto seconds = elapsed(start);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(!r);
        BOOST_TEST(r.error() == make_error_code(errc::timeout));
        BOOST_TEST(seconds < 1.3); // one timeout, not two
        BOOST_TEST(client.last_error().find("TLS handshake with " + silent.host() +
                                            ": no answer for 0.7 s (the inactivity timeout)") !=
                   std::string::npos);
        BOOST_TEST(client.last_error().find("plain HTTP") == std::string::npos);
    }
    auto& img = image();
    auto layer = img.manifest.layers.at(0);
    auto bytes = img.blob(layer.digest);
    {
        // A blob in four pieces 400 ms apart: 1.2 s in all, more than the
        // 700 ms timeout, but never 700 ms without a byte.
        fake_server registry([&](const fake_request& r) -> fake_reply {
            if (r.target == "/v2/") return http_reply(200, "{}");
            auto reply = http_reply(200, bytes, "", "application/octet-stream");
            reply.piece_bytes = reply.bytes.size() / 4 + 1;
            reply.piece_ms = 400;
            return reply;
        });
        auto options = quick_options();
        options.timeout = 700ms;
        options.max_retries = 0;
        temp_dir cache;
        oci::content_store store(cache.path);
        oci::registry_client client(options);
        auto start = std::chrono::steady_clock::now();
        auto r = client.fetch_blob(parse(registry.host() + "/x:1"), layer, store);
        BOOST_TEST_INFO(client.last_error());
        BOOST_TEST(r.has_value());
        BOOST_TEST(elapsed(start) > 1.1);
    }
    {
        // Half the blob, then silence, every time: retried (with Range) until
        // max_retry_time, not max_retries x timeout.
        int attempts = 0;
        fake_server registry([&](const fake_request& r) -> fake_reply {
            if (r.target == "/v2/") return http_reply(200, "{}");
            ++attempts;
            auto start = r.header("range").empty() ? 0 : std::stoul(r.header("range").substr(6));
            auto rest = bytes.substr(start);
            auto reply = start == 0 ? http_reply(200, rest, "", "application/octet-stream")
                                    : http_reply(206, rest,
                                                 "Content-Range: bytes " + std::to_string(start) +
                                                     "-" + std::to_string(bytes.size() - 1) + "/" +
                                                     std::to_string(bytes.size()) + "\r\n",
                                                 "application/octet-stream");
            reply.cut_after =
                reply.bytes.size() - rest.size() + std::min<std::size_t>(rest.size() / 2, 4096);
            reply.hold_open_ms = 5000;
            return reply;
        });
        auto options = quick_options();
        options.timeout = 400ms;
        options.max_retries = 10;
        options.max_retry_time = 1000ms;
        temp_dir cache;
        oci::content_store store(cache.path);
        oci::registry_client client(options);
        auto start = std::chrono::steady_clock::now();
        auto r = client.fetch_blob(parse(registry.host() + "/x:1"), layer, store);
        auto seconds = elapsed(start);
        BOOST_TEST_INFO(client.last_error());
        BOOST_REQUIRE(!r);
        BOOST_TEST(r.error() == make_error_code(errc::timeout));
        BOOST_TEST(seconds < 2.0); // max_retry_time + one timeout at most
        BOOST_TEST(attempts >= 2);
        BOOST_TEST(attempts < 6);
        BOOST_TEST(client.last_error().find("nothing received for 0.4 s") != std::string::npos);
        BOOST_TEST(client.last_error().find("attempts in") != std::string::npos);
        BOOST_TEST(client.last_error().find("past the retry time limit of 1 s") !=
                   std::string::npos);
    }
}

// The Bearer flow's refusals say which credentials were sent, or why none were.
BOOST_AUTO_TEST_CASE(token_flow_refusals_name_the_credentials) {
    std::string registry_host;
    fake_server registry([&](const fake_request& r) -> fake_reply {
        std::string challenge = "WWW-Authenticate: Bearer realm=\"http://" + registry_host +
                                "/token\",service=\"fake\"\r\n";
        if (r.target.starts_with("/token")) {
            auto basic = r.header("authorization");
            if (basic.empty()) return http_reply(200, R"({"token":"anonymous"})");
            if (basic == "Basic " + oci::base64_encode("bob:right"))
                return http_reply(200, R"({"token":"bob"})");
            return http_reply(
                401, R"({"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]})");
        }
        if (r.header("authorization") == "Bearer bob" && r.target == "/v2/")
            return http_reply(200, "{}");
        if (r.header("authorization") == "Bearer bob")
            return manifest_reply(image().manifest_bytes);
        return http_reply(
            401, R"({"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]})",
            challenge);
    });
    registry_host = registry.host();
    auto ref = parse(registry.host() + "/x:1");
    temp_dir dir;
    auto config = dir.path / "config.json";
    auto attempt = [&](const std::string& auth) {
        write_text(config, "{\"auths\":{\"" + registry.host() + "\":{\"auth\":\"" +
                               oci::base64_encode(auth) + "\"}}}");
        auto options = quick_options();
        options.use_docker_config = true;
        options.docker_config = config;
        oci::registry_client client(options);
        auto r = client.pull_manifest(ref);
        return std::pair(r.has_value(), client.last_error());
    };
    auto [ok, wrong] = attempt("bob:wrong");
    BOOST_TEST(!ok);
    BOOST_TEST(wrong.find("token request to " + registry.host() + ": HTTP 401") !=
                   std::string::npos,
               wrong);
    BOOST_TEST(wrong.find("the credentials sent were refused: user 'bob' from " + config.string() +
                          " (auths key \"" + registry.host() + "\")") != std::string::npos,
               wrong);
    write_text(config, "{\"auths\":{}}");
    auto options = quick_options();
    options.use_docker_config = true;
    options.docker_config = config;
    oci::registry_client anonymous(options);
    BOOST_TEST(!anonymous.pull_manifest(ref));
    BOOST_TEST(anonymous.last_error().find("no credentials were sent: no \"auths\" entry for " +
                                           registry.host() + " in " + config.string()) !=
                   std::string::npos,
               anonymous.last_error());
    BOOST_TEST(attempt("bob:right").first);
}

BOOST_AUTO_TEST_CASE(async_api_with_completion_tokens) {
    auto& img = image();
    fake_server registry([&](const fake_request& r) -> fake_reply {
        if (r.target == "/v2/") return http_reply(200, "{}");
        if (r.target == "/v2/test/img/manifests/1") return manifest_reply(img.manifest_bytes);
        auto body = img.blob_for_target(r.target);
        if (body.empty()) return http_reply(404, "");
        return http_reply(200, body, "", "application/octet-stream");
    });
    auto ref = parse(registry.host() + "/test/img:1");
    temp_dir cache;
    oci::content_store store(cache.path);
    boost::asio::io_context io;
    // On a strand: the client is an I/O object templated on its executor.
    oci::basic_registry_client client(boost::asio::make_strand(io), quick_options());

    // A plain callback.
    std::optional<oci::fetched_manifest> by_callback;
    client.async_fetch_manifest(ref, "1",
                                [&](boost::system::error_code ec, oci::fetched_manifest m) {
                                    BOOST_TEST(!ec);
                                    by_callback = std::move(m);
                                });
    // A coroutine.
    std::optional<oci::resolved_manifest> by_coroutine;
    boost::asio::co_spawn(
        io,
        [&]() -> boost::asio::awaitable<void> {
            by_coroutine = co_await client.async_pull_manifest(ref, oci::default_platform(),
                                                               boost::asio::use_awaitable);
        },
        boost::asio::detached);
    io.run();
    BOOST_REQUIRE(by_callback.has_value());
    BOOST_TEST(by_callback->digest.str() == img.manifest_digest.str());
    BOOST_REQUIRE(by_coroutine.has_value());
    BOOST_TEST(by_coroutine->manifest.layers.size() == 1u);

    // A future, with the io_context running on another thread.
    io.restart();
    auto work = boost::asio::make_work_guard(io);
    std::thread runner([&] { io.run(); });
    auto future =
        client.async_pull(ref, oci::default_platform(), store, {}, boost::asio::use_future);
    auto pulled = future.get(); // throws boost::system::system_error on failure
    BOOST_TEST(pulled.manifest_digest.str() == img.manifest_digest.str());
    BOOST_TEST(store.contains(img.manifest.layers.at(0).digest));
    // Errors arrive as the handler's error_code (a future rethrows them).
    auto missing = client.async_fetch_manifest(ref, "nope", boost::asio::use_future);
    try {
        missing.get();
        BOOST_FAIL("a missing manifest must fail");
    } catch (const boost::system::system_error& e) {
        BOOST_TEST(e.code() == make_error_code(errc::not_found));
        BOOST_TEST(std::string(e.code().category().name()) == "supermachine");
    }
    work.reset();
    runner.join();
}

BOOST_AUTO_TEST_SUITE_END()
