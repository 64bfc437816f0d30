#pragma once
// A client for the OCI distribution API (Docker Registry HTTP API v2) on
// Boost.Beast: HTTP/1.1 over TCP or TLS (system CA store, --ca-file, docker's
// certs.d with client certificates), token and Basic auth, redirects to blob
// storage, blobs streamed into the content store while hashing, Range resume,
// and bounded everything (headers, bodies, redirects, stalls, retries).
//
//   basic_registry_client<Executor>   async_* operations taking completion tokens
//   registry_client                   blocking wrappers (own io_context)
//
// Every operation that fails leaves a human-readable reason in last_error().
// Async handlers are void(boost::system::error_code, T), so use_awaitable
// throws and use_future rethrows as Asio users expect; compare ec with
// supermachine::errc values directly.
// The client must outlive its operations; it is not thread-safe (use a strand).
#include <supermachine/error.hpp>
#include <supermachine/oci/auth.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/detail/http_url.hpp>
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/image_config.hpp>
#include <supermachine/oci/manifest.hpp>
#include <supermachine/oci/media_types.hpp>
#include <supermachine/oci/platform.hpp>
#include <supermachine/oci/progress.hpp>
#include <supermachine/oci/reference.hpp>
#include <supermachine/oci/registry_tls.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace supermachine::oci {

struct registry_options {
    bool insecure = false; // every registry: plain HTTP / unverified TLS allowed
    std::vector<std::string> insecure_registries; // host[:port] treated as with --insecure
    // localhost, 127/8, ::1 as docker does: plain HTTP and unverified TLS
    // allowed; but a CA given for it (ca_file, a certs.d *.crt) asks for its
    // certificate to be verified, and then it is.
    bool loopback_is_insecure = true;
    std::string ca_file; // extra PEM CA bundle, besides the system store and certs.d
    std::vector<std::filesystem::path> certs_d = default_certs_d_dirs(); // docker's HOST:PORT dirs
    std::optional<oci::credentials> credentials; // explicit; else from the docker config
    bool use_docker_config = true;
    std::filesystem::path docker_config = docker_config_path();
    // Inactivity bound: a connect, TLS handshake, write, or read of a blob
    // body that makes no progress for this long fails. A response header and
    // any small body (manifest, token, error) must arrive whole within it.
    std::chrono::milliseconds timeout{std::chrono::seconds(30)};
    unsigned max_redirects = 5;
    unsigned max_retries = 3; // resumptions of a blob after a dropped or stalled connection
    // No retry of a blob starts later than this after its first attempt.
    std::chrono::milliseconds max_retry_time{std::chrono::seconds(60)};
    std::size_t max_header_bytes = 64 * 1024; // response header block
    std::size_t max_error_body = 64 * 1024;   // error / token / redirect bodies
    std::string user_agent = "supermachine/0.1";
};

/// A manifest document as fetched: raw bytes (digest-verified) and the parse.
struct fetched_manifest {
    std::string bytes;
    std::string content_type;
    oci::digest digest;
    any_manifest document;
};

/// What a reference resolved to for one platform.
struct resolved_manifest {
    oci::digest top_digest; // what the tag names (index or manifest)
    std::string top_bytes;
    std::optional<image_index> index; // when the tag names an index
    oci::digest manifest_digest;      // the platform's image manifest
    std::string manifest_bytes;
    image_manifest manifest;
};

namespace detail {

inline bool is_loopback_host(std::string_view host) {
    if (auto colon = host.rfind(':'); colon != std::string_view::npos && host.front() != '[')
        host = host.substr(0, colon);
    return host == "localhost" || host.starts_with("127.") || host == "[::1]" || host == "::1";
}

struct http_response {
    unsigned status = 0;
    std::string content_type, location, www_authenticate, docker_content_digest, content_range;
    std::string body; // bounded; empty when streamed to a blob
};

// Where a response body goes.
struct body_plan {
    std::size_t max_string_body = 64 * 1024;
    std::int64_t string_body_size = -1; // a small blob's descriptor size: longer is refused
    blob_writer* blob = nullptr;        // 200/206 bodies stream here
    const progress_callback* progress = nullptr;
    const char* kind = "layer";
    std::string* error_detail = nullptr;
};

/// "30 s", "0.5 s": a duration as users read it.
inline std::string seconds_text(std::chrono::milliseconds d) {
    if (d.count() % 1000 == 0) return std::to_string(d.count() / 1000) + " s";
    char out[32];
    std::snprintf(out, sizeof out, "%.1f s", double(d.count()) / 1000.0);
    return out;
}

/// "Error: 404 Not Found: MANIFEST_UNKNOWN: manifest unknown" from a
/// registry's {"errors":[{"code","message"}]} body, and the errc it implies.
inline std::pair<errc, std::string> describe_registry_failure(unsigned status,
                                                              std::string_view body) {
    errc code = status == 401 || status == 403 ? errc::unauthorized
                : status == 404                ? errc::not_found
                : status == 429                ? errc::rate_limited
                                               : errc::registry_error;
    std::string text = "HTTP " + std::to_string(status);
    auto j = nlohmann::json::parse(body.substr(0, 64 * 1024), nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("errors") && j["errors"].is_array()) {
        int count = 0;
        for (const auto& e : j["errors"]) {
            if (!e.is_object() || ++count > 4) break;
            std::string c =
                e.contains("code") && e["code"].is_string() ? e["code"].get<std::string>() : "";
            std::string m = e.contains("message") && e["message"].is_string()
                                ? e["message"].get<std::string>()
                                : "";
            text += ": " + c.substr(0, 64) + (m.empty() ? "" : " (" + m.substr(0, 256) + ")");
            if (c == "MANIFEST_UNKNOWN" || c == "BLOB_UNKNOWN" || c == "NAME_UNKNOWN")
                code = errc::not_found;
            else if (c == "UNAUTHORIZED" || c == "DENIED")
                code = errc::unauthorized;
            else if (c == "TOOMANYREQUESTS")
                code = errc::rate_limited;
        }
    }
    if (status == 401)
        text += " (authentication required or credentials rejected)";
    else if (status == 403)
        text += " (access denied)";
    else if (status == 404)
        text += " (not found)";
    else if (status == 429)
        text += " (too many requests: rate limited)";
    else if (status >= 500)
        text += " (registry server error)";
    return {code, text};
}

} // namespace detail

// GCC 12 at -O2 reports Asio's coroutine-frame operator new/delete pair as
// mismatched (-Wmismatched-new-delete); it is a known false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

template <class Executor = boost::asio::any_io_executor>
class basic_registry_client {
public:
    using executor_type = Executor;

    explicit basic_registry_client(Executor executor, registry_options options = {})
        : executor_(std::move(executor))
        , options_(std::move(options)) {}

    executor_type get_executor() const noexcept { return executor_; }
    const registry_options& options() const noexcept { return options_; }
    /// Why the last failed operation failed, for humans.
    const std::string& last_error() const noexcept { return last_error_; }

    /// GET /v2/<repository>/manifests/<reference>: the raw document, verified
    /// against the digest when `reference` is one. Handler: void(error_code, fetched_manifest).
    template <class Token>
    auto async_fetch_manifest(image_reference ref, std::string reference, Token&& token) {
        return launch<fetched_manifest>(fetch_manifest_coro(std::move(ref), std::move(reference)),
                                        std::forward<Token>(token));
    }

    /// The image manifest for `wanted`, through the index if the tag names
    /// one. Handler: void(error_code, resolved_manifest).
    template <class Token>
    auto async_pull_manifest(image_reference ref, platform wanted, Token&& token) {
        return launch<resolved_manifest>(pull_manifest_coro(std::move(ref), std::move(wanted)),
                                         std::forward<Token>(token));
    }

    /// Stream one blob into `store` (verified, atomically renamed), resuming
    /// a partial download with Range. Handler: void(error_code, digest).
    template <class Token>
    auto async_fetch_blob(image_reference ref, descriptor blob, content_store& store,
                          progress_callback progress, std::string kind, Token&& token) {
        return launch<digest>(fetch_blob_coro(std::move(ref), std::move(blob), store,
                                              std::move(progress), std::move(kind)),
                              std::forward<Token>(token));
    }

    /// Manifest, config and layers into `store`, plus an image record.
    /// Handler: void(error_code, pulled_image).
    template <class Token>
    auto async_pull(image_reference ref, platform wanted, content_store& store,
                    progress_callback progress, Token&& token) {
        return launch<pulled_image>(
            pull_coro(std::move(ref), std::move(wanted), store, std::move(progress)),
            std::forward<Token>(token));
    }

private:
    template <class T>
    using awaitable = boost::asio::awaitable<T>;
    using tcp = boost::asio::ip::tcp;

    struct host_state {
        bool pinged = false;
        bool plain_http = false;
        bool tls_unverified = false;
        std::optional<auth_challenge> challenge;
        bool credentials_loaded = false;
        std::optional<oci::credentials> credentials;
        std::string credentials_origin; // "user 'alice' from FILE (auths key \"K\")"
        std::string no_credentials_why; // why none were found
        std::map<std::string, std::string> authorization_by_scope;
    };

    // How far the last failed exchange's TLS got, for the ping's fallback
    // rule: only a server that does not speak TLS may be plain HTTP.
    enum class tls_failure { none, setup, verification, protocol, established };

    struct request_spec {
        detail::http_url url;
        std::string authorization;
        std::string accept;
        bool tls_unverified = false;
    };

    template <class T>
    result<T> fail(error_code code, std::string why) {
        last_error_ = std::move(why);
        return code;
    }

    // A stalled peer (our inactivity bound) is a timeout; anything else on the wire is I/O.
    static errc network_failure(const boost::system::error_code& ec) {
        return ec == boost::beast::error::timeout ? errc::timeout : errc::io_error;
    }

    // "<doing what>: <why>", naming the bound for a stall, and what a TLS
    // alert about client certificates means.
    std::string network_text(const std::string& doing, const boost::system::error_code& ec,
                             const detail::http_url& url) const {
        if (ec == boost::beast::error::timeout)
            return doing + ": nothing received for " + detail::seconds_text(options_.timeout) +
                   " (the inactivity timeout)";
        std::string text = doing + ": " + ec.message();
        if (url.tls && ec.category() == boost::asio::error::get_ssl_category() &&
            (text.find("certificate required") != std::string::npos ||
             text.find("bad certificate") != std::string::npos ||
             text.find("alert handshake failure") != std::string::npos))
            text += " (the registry may want a client certificate: docker keeps it as "
                    "client.cert and client.key in /etc/docker/certs.d/" +
                    url.host_port() + "/)";
        return text;
    }

    bool listed_insecure(const detail::http_url& url) const {
        if (options_.insecure) return true;
        for (const auto& h : options_.insecure_registries)
            if (h == url.authority() || h == url.host_port()) return true;
        return false;
    }

    const host_certificates& certificates_for(const detail::http_url& url) {
        auto key = url.host_port();
        auto it = host_certificates_.find(key);
        if (it == host_certificates_.end()) {
            std::string bracketed =
                url.host.find(':') != std::string::npos ? "[" + url.host + "]" : url.host;
            it = host_certificates_
                     .emplace(key, find_host_certificates(options_.certs_d, key,
                                                          url.port == "443" ? bracketed : ""))
                     .first;
        }
        return it->second;
    }

    // A CA named for this host is a request to verify it, loopback or not.
    bool trust_configured(const detail::http_url& url) {
        return !options_.ca_file.empty() || !certificates_for(url).ca_files.empty();
    }

    bool plain_http_allowed(const detail::http_url& url) const {
        return listed_insecure(url) ||
               (options_.loopback_is_insecure && detail::is_loopback_host(url.host));
    }

    bool skip_verification(const detail::http_url& url) {
        return listed_insecure(url) ||
               (options_.loopback_is_insecure && detail::is_loopback_host(url.host) &&
                !trust_configured(url));
    }

    // Where the CAs for `url` come from, for the verification failure's text.
    std::string trusted_text(const detail::http_url& url) {
        std::string out = "the system store";
        if (!options_.ca_file.empty()) out += ", --ca-file " + options_.ca_file;
        const auto& certs = certificates_for(url);
        for (const auto& f : certs.ca_files)
            out += ", " + f.string();
        if (certs.dir.empty()) {
            out += " (no certs.d directory " + url.host_port() + " in";
            for (const auto& root : options_.certs_d)
                out += " " + root.string();
            out += ")";
        }
        return out;
    }

    // One TLS context per host and mode: its certs.d CAs and client
    // certificate are its own.
    result<boost::asio::ssl::context*> tls_context(const detail::http_url& url, bool verify) {
        auto key = url.host_port() + (verify ? " verify" : " no-verify");
        if (auto it = tls_contexts_.find(key); it != tls_contexts_.end()) return it->second.get();
        const auto& certs = certificates_for(url);
        if (!certs.problem.empty())
            return fail<boost::asio::ssl::context*>(errc::invalid_argument, certs.problem);
        auto context =
            std::make_unique<boost::asio::ssl::context>(boost::asio::ssl::context::tls_client);
        boost::system::error_code ec;
        auto load_ca = [&](const std::string& file, const std::string& what) -> result<void> {
            context->load_verify_file(file, ec);
            if (ec)
                return fail<void>(errc::invalid_argument,
                                  "cannot load " + what + " " + file + ": " + ec.message());
            return success();
        };
        if (verify) {
            context->set_default_verify_paths(ec); // a host without a system store still has ours
            if (!options_.ca_file.empty())
                if (auto r = load_ca(options_.ca_file, "the CA file (--ca-file)"); !r)
                    return r.error();
            for (const auto& f : certs.ca_files)
                if (auto r = load_ca(f.string(), "the certs.d CA"); !r) return r.error();
            context->set_verify_mode(boost::asio::ssl::verify_peer);
        } else {
            context->set_verify_mode(boost::asio::ssl::verify_none);
        }
        if (!certs.client_certificate.empty()) {
            context->use_certificate_chain_file(certs.client_certificate.string(), ec);
            if (!ec)
                context->use_private_key_file(certs.client_key.string(),
                                              boost::asio::ssl::context::pem, ec);
            if (ec)
                return fail<boost::asio::ssl::context*>(
                    errc::invalid_argument, "cannot load the client certificate " +
                                                certs.client_certificate.string() + " with " +
                                                certs.client_key.string() + ": " + ec.message());
        }
        auto* raw = context.get();
        tls_contexts_.emplace(key, std::move(context));
        return raw;
    }

    // Run `op` on our executor and complete the token's handler with its result.
    template <class T, class Token>
    auto launch(awaitable<result<T>> op, Token&& token) {
        return boost::asio::async_initiate<Token, void(boost::system::error_code, T)>(
            [this](auto handler, awaitable<result<T>> op) {
                boost::asio::co_spawn(
                    executor_,
                    [this, op = std::move(op),
                     handler = std::move(handler)]() mutable -> awaitable<void> {
                        std::optional<result<T>> outcome;
                        try {
                            outcome.emplace(co_await std::move(op));
                        } catch (const std::exception& e) {
                            last_error_ = e.what();
                            outcome.emplace(make_error_code(errc::io_error));
                        }
                        auto handler_executor =
                            boost::asio::get_associated_executor(handler, executor_);
                        boost::asio::dispatch(
                            handler_executor,
                            [handler = std::move(handler), r = std::move(*outcome)]() mutable {
                                if (r)
                                    handler(boost::system::error_code{}, std::move(r).value());
                                else
                                    handler(r.error(), T{});
                            });
                    },
                    boost::asio::detached);
            },
            token, std::move(op));
    }

    // ---- one HTTP exchange on a fresh connection ----

    awaitable<result<detail::http_response>> exchange(request_spec spec, detail::body_plan plan) {
        last_tls_failure_ = tls_failure::none;
        boost::system::error_code ec;
        auto use = boost::asio::redirect_error(boost::asio::use_awaitable, ec);
        tcp::resolver resolver(executor_);
        auto endpoints = co_await resolver.async_resolve(spec.url.host, spec.url.port, use);
        if (ec)
            co_return fail<detail::http_response>(
                errc::io_error, "cannot resolve " + spec.url.host + ": " + ec.message());
        boost::beast::tcp_stream stream(executor_);
        stream.expires_after(options_.timeout);
        co_await stream.async_connect(endpoints, use);
        if (ec)
            co_return fail<detail::http_response>(
                network_failure(ec),
                ec == boost::beast::error::timeout
                    ? "cannot connect to " + spec.url.authority() + ": no answer within " +
                          detail::seconds_text(options_.timeout)
                    : "cannot connect to " + spec.url.authority() + ": " + ec.message());

        namespace http = boost::beast::http;
        http::request<http::empty_body> request{http::verb::get, spec.url.target, 11};
        request.set(http::field::host, spec.url.authority());
        request.set(http::field::user_agent, options_.user_agent);
        if (!spec.accept.empty()) request.set(http::field::accept, spec.accept);
        if (!spec.authorization.empty())
            request.set(http::field::authorization, spec.authorization);
        if (plan.blob && plan.blob->offset() > 0)
            request.set(http::field::range, "bytes=" + std::to_string(plan.blob->offset()) + "-");
        request.keep_alive(false);
        if (!spec.url.tls) co_return co_await exchange_on(stream, request, plan, spec.url);

        last_tls_failure_ = tls_failure::setup;
        BOOST_OUTCOME_CO_TRY(auto&& context, tls_context(spec.url, !spec.tls_unverified));
        boost::beast::ssl_stream<boost::beast::tcp_stream> tls(std::move(stream), *context);
        SSL* ssl = tls.native_handle();
        boost::system::error_code address_ec;
        boost::asio::ip::make_address(spec.url.host, address_ec);
        bool is_address = !address_ec;
        if (!is_address) // SNI only for names, never for addresses (RFC 6066)
            SSL_set_tlsext_host_name(ssl, spec.url.host.c_str());
        detail::tls_verify_failure refused;
        if (!spec.tls_unverified) {
            // OpenSSL checks the name itself, so a mismatch comes back as the
            // verifier's own X509_V_ERR_{HOSTNAME,IP_ADDRESS}_MISMATCH.
            X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
            if (is_address)
                X509_VERIFY_PARAM_set1_ip_asc(param, spec.url.host.c_str());
            else {
                X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
                X509_VERIFY_PARAM_set1_host(param, spec.url.host.c_str(), spec.url.host.size());
            }
            tls.set_verify_mode(boost::asio::ssl::verify_peer);
            tls.set_verify_callback(
                [&refused](bool preverified, boost::asio::ssl::verify_context& context) {
                    if (!preverified && refused.error == 0) {
                        X509_STORE_CTX* store = context.native_handle();
                        refused.error = X509_STORE_CTX_get_error(store);
                        refused.depth = X509_STORE_CTX_get_error_depth(store);
                        refused.certificate =
                            detail::describe_certificate(X509_STORE_CTX_get_current_cert(store));
                    }
                    return preverified;
                });
        }
        boost::beast::get_lowest_layer(tls).expires_after(options_.timeout);
        co_await tls.async_handshake(boost::asio::ssl::stream_base::client, use);
        if (ec) {
            if (refused.error == 0 && !spec.tls_unverified)
                if (auto r = SSL_get_verify_result(ssl); r != X509_V_OK) refused.error = int(r);
            if (refused.error != 0) {
                last_tls_failure_ = tls_failure::verification;
                co_return fail<detail::http_response>(
                    errc::io_error, detail::describe_verify_failure(spec.url.authority(), refused,
                                                                    trusted_text(spec.url)));
            }
            if (ec == boost::beast::error::timeout)
                co_return fail<detail::http_response>(
                    errc::timeout, "TLS handshake with " + spec.url.authority() +
                                       ": no answer for " + detail::seconds_text(options_.timeout) +
                                       " (the inactivity timeout)");
            auto text = network_text("TLS handshake with " + spec.url.authority() + " failed", ec,
                                     spec.url);
            // An alert means the server speaks TLS and refused us (e.g. no
            // client certificate): not a plain-HTTP server.
            last_tls_failure_ = text.find(" alert ") != std::string::npos ? tls_failure::established
                                                                          : tls_failure::protocol;
            if (text.find("wrong version number") != std::string::npos ||
                text.find("packet length too long") != std::string::npos ||
                text.find("http request") != std::string::npos)
                text += " (" + spec.url.authority() +
                        " does not seem to speak TLS: if it is a plain-HTTP registry, name it with "
                        "--insecure-registry " +
                        spec.url.authority() + " or use --insecure)";
            co_return fail<detail::http_response>(errc::io_error, text);
        }
        last_tls_failure_ = tls_failure::established;
        co_return co_await exchange_on(tls, request, plan, spec.url);
    }

    template <class Stream, class Request>
    awaitable<result<detail::http_response>> exchange_on(Stream& stream, Request& request,
                                                         detail::body_plan plan,
                                                         const detail::http_url& url) {
        namespace http = boost::beast::http;
        using response_t = result<detail::http_response>;
        boost::system::error_code ec;
        auto use = boost::asio::redirect_error(boost::asio::use_awaitable, ec);
        auto& lowest = boost::beast::get_lowest_layer(stream);
        lowest.expires_after(options_.timeout);
        co_await http::async_write(stream, request, use);
        if (ec)
            co_return fail<detail::http_response>(
                network_failure(ec),
                network_text("sending request to " + url.authority(), ec, url));

        boost::beast::flat_buffer buffer(options_.max_header_bytes + 256 * 1024);
        // Beast reads as much as the buffer's free capacity (at least 512
        // bytes): without room it would recv() half a KiB at a time.
        buffer.reserve(128 * 1024);
        http::response_parser<http::buffer_body> parser;
        parser.header_limit(std::uint32_t(options_.max_header_bytes));
        std::uint64_t remaining = 0;
        if (plan.blob) {
            auto size = plan.blob->expected_size();
            remaining = size >= 0 ? std::uint64_t(size) - plan.blob->offset()
                                  : std::uint64_t(max_blob_bytes);
            // The whole blob, not just the rest: a server that ignores Range
            // sends it all again. The writer enforces the exact size.
            parser.body_limit(std::max<std::uint64_t>(size >= 0 ? std::uint64_t(size) : remaining,
                                                      options_.max_error_body));
        } else {
            parser.body_limit(plan.max_string_body);
        }
        lowest.expires_after(options_.timeout);
        co_await http::async_read_header(stream, buffer, parser, use);
        if (ec == http::error::header_limit)
            co_return fail<detail::http_response>(
                errc::registry_error, "response header from " + url.authority() + " exceeds " +
                                          std::to_string(options_.max_header_bytes) + " bytes");
        // The descriptor's size is known: a longer announced body is not the blob.
        auto announced_too_long = [&](std::uint64_t length, std::uint64_t size) {
            return fail<detail::http_response>(
                errc::size_mismatch,
                std::string(plan.kind) + " " +
                    (plan.blob ? plan.blob->expected().str() : std::string("blob")) + ": " +
                    url.authority() + " announces a Content-Length of " + std::to_string(length) +
                    " bytes where the descriptor says the blob is " + std::to_string(size) +
                    " bytes (nothing kept)");
        };
        if (ec == http::error::body_limit) {
            if (plan.blob && plan.blob->expected_size() >= 0 && parser.content_length()) {
                plan.blob->discard();
                co_return announced_too_long(*parser.content_length(),
                                             std::uint64_t(plan.blob->expected_size()));
            }
            co_return fail<detail::http_response>(
                plan.blob ? errc::size_mismatch : errc::image_too_large,
                "response from " + url.authority() + " announces a body larger than allowed (" +
                    std::to_string(plan.blob ? remaining : plan.max_string_body) + " bytes)");
        }
        if (ec)
            co_return fail<detail::http_response>(
                network_failure(ec),
                network_text("reading response from " + url.authority(), ec, url));

        auto& message = parser.get();
        detail::http_response response;
        response.status = message.result_int();
        auto header = [&](http::field f) { return std::string(message[f]); };
        response.content_type = header(http::field::content_type);
        response.location = header(http::field::location);
        response.www_authenticate = header(http::field::www_authenticate);
        response.docker_content_digest = std::string(message["Docker-Content-Digest"]);
        response.content_range = header(http::field::content_range);

        bool to_blob = plan.blob && (response.status == 200 || response.status == 206);
        if (to_blob) {
            auto& blob = *plan.blob;
            if (response.status == 206) {
                // "bytes A-B/T": must continue exactly where our partial file ends.
                std::uint64_t start = 0;
                auto& range = response.content_range;
                bool ok = range.starts_with("bytes ");
                std::size_t i = 6, digits = 0;
                for (; ok && i < range.size() && range[i] >= '0' && range[i] <= '9' && digits < 19;
                     ++i, ++digits)
                    start = start * 10 + std::uint64_t(range[i] - '0');
                ok = ok && digits > 0 && i < range.size() && range[i] == '-';
                if (!ok || start != blob.offset())
                    co_return fail<detail::http_response>(
                        errc::registry_error, "bad Content-Range '" + range.substr(0, 80) +
                                                  "' for a resume at byte " +
                                                  std::to_string(blob.offset()));
            } else if (blob.offset() > 0) {
                if (auto r = blob.restart(); !r) co_return r.error(); // Range ignored: start over
                remaining =
                    blob.expected_size() >= 0 ? std::uint64_t(blob.expected_size()) : remaining;
            }
            if (auto length = parser.content_length(); length && *length > remaining) {
                blob.discard();
                co_return announced_too_long(*length, std::uint64_t(blob.expected_size()));
            }
        } else if (response.status == 200 && plan.string_body_size >= 0) {
            if (auto length = parser.content_length();
                length && *length > std::uint64_t(plan.string_body_size))
                co_return announced_too_long(*length, std::uint64_t(plan.string_body_size));
        }
        // Blob bytes gather in a 64 KiB chunk before each write() to the store.
        std::vector<char> chunk(64 * 1024);
        std::size_t filled = 0;
        std::int64_t last_report = -1;
        while (!parser.is_done()) {
            message.body().data = chunk.data() + filled;
            message.body().size = chunk.size() - filled;
            // Blobs may be large: every read gets the whole inactivity bound.
            // Small bodies (manifests, tokens, errors) share the header's
            // deadline, so a peer trickling bytes cannot stretch them.
            if (to_blob) lowest.expires_after(options_.timeout);
            co_await http::async_read_some(stream, buffer, parser, use);
            if (ec == http::error::need_buffer) ec = {};
            filled = chunk.size() - message.body().size;
            bool flush = !to_blob || filled == chunk.size() || parser.is_done() || ec;
            std::size_t n = flush ? std::exchange(filled, 0) : 0;
            if (n > 0) {
                if (to_blob) {
                    if (auto r = plan.blob->write(std::as_bytes(std::span(chunk.data(), n))); !r) {
                        if (r.error() == make_error_code(errc::size_mismatch))
                            co_return fail<detail::http_response>(
                                errc::size_mismatch,
                                std::string(plan.kind) + " " + plan.blob->expected().str() + ": " +
                                    url.authority() + " sent more than the " +
                                    std::to_string(plan.blob->expected_size()) +
                                    " bytes its descriptor says (nothing kept)");
                        co_return fail<detail::http_response>(r.error(), "writing blob: " +
                                                                             r.error().message());
                    }
                    if (plan.progress && *plan.progress) {
                        auto done = std::int64_t(plan.blob->offset());
                        if (last_report < 0 || done - last_report >= 256 * 1024 ||
                            done == plan.blob->expected_size()) {
                            last_report = done;
                            (*plan.progress)({progress_event::phase::progress,
                                              plan.blob->expected(), plan.kind,
                                              plan.blob->expected_size(), done});
                        }
                    }
                } else {
                    if (response.body.size() + n > plan.max_string_body)
                        co_return fail<detail::http_response>(errc::image_too_large,
                                                              "response body from " +
                                                                  url.authority() + " too large");
                    response.body.append(chunk.data(), n);
                }
            }
            if (ec == http::error::body_limit) {
                if (!to_blob)
                    co_return fail<detail::http_response>(errc::image_too_large,
                                                          "response body from " + url.authority() +
                                                              " exceeds its bound");
                plan.blob->discard(); // the limit is the blob's size: this is more
                co_return fail<detail::http_response>(
                    errc::size_mismatch, std::string(plan.kind) + " " +
                                             plan.blob->expected().str() + ": " + url.authority() +
                                             " sent more than the " +
                                             std::to_string(plan.blob->expected_size()) +
                                             " bytes its descriptor says (nothing kept)");
            }
            if (ec)
                co_return fail<detail::http_response>(
                    network_failure(ec),
                    ec == boost::beast::error::timeout
                        ? network_text("reading the body from " + url.authority(), ec, url)
                        : network_text("connection to " + url.authority() +
                                           " broke while reading the body",
                                       ec, url));
        }
        co_return response_t(std::move(response));
    }

    // ---- registry conversation: ping, auth, redirects ----

    host_state& host(const image_reference& ref) { return hosts_[ref.endpoint()]; }

    // Which credentials this host gets and where they came from (or why
    // there are none), so that a refusal can say so.
    void load_credentials(const image_reference& ref, host_state& state) {
        if (options_.credentials && !options_.credentials->empty()) {
            state.credentials = options_.credentials;
            state.credentials_origin =
                "user '" + options_.credentials->username.substr(0, 64) + "' given by the caller";
            return;
        }
        if (!options_.use_docker_config) {
            state.no_credentials_why = "none were given and the docker config is not read";
            return;
        }
        auto lookup = find_docker_credentials(ref.registry, options_.docker_config);
        if (lookup.found) {
            state.credentials = std::move(lookup.found);
            state.credentials_origin =
                (state.credentials->username.empty()
                     ? std::string("an identity token")
                     : "user '" + state.credentials->username.substr(0, 64) + "'") +
                " from " + lookup.file.string() + " (auths key \"" + lookup.key + "\")";
            return;
        }
        state.no_credentials_why = lookup.problem;
        if (!lookup.helper.empty())
            state.no_credentials_why += "; the file names the credential helper " + lookup.helper +
                                        ", which supermachine does not run";
    }

    // "; no credentials were sent: ..." / "; the registry refused user 'alice'
    // from FILE ...": appended to a 401 or 403.
    std::string refusal_note(const image_reference& ref, unsigned status) {
        if (status != 401 && status != 403) return {};
        auto& state = host(ref);
        if (!state.credentials)
            return "; no credentials were sent: " + state.no_credentials_why + " (docker login " +
                   ref.registry + " stores them in the docker config)";
        if (status == 401)
            return "; the credentials sent were refused: " + state.credentials_origin +
                   " (wrong user name or password?)";
        return "; credentials sent: " + state.credentials_origin;
    }

    awaitable<result<void>> ensure_pinged(const image_reference& ref) {
        auto endpoint = ref.endpoint();
        auto& state = host(ref);
        if (state.pinged) co_return success();
        if (!state.credentials_loaded) {
            state.credentials_loaded = true;
            load_credentials(ref, state);
        }
        auto https = detail::parse_http_url("https://" + endpoint + "/v2/");
        if (!https)
            co_return fail<void>(errc::bad_reference, "cannot make a URL for registry " + endpoint);
        bool unverified = skip_verification(*https);
        state.tls_unverified = unverified;
        detail::body_plan plan;
        plan.max_string_body = options_.max_error_body;
        request_spec ping{*https, "", "", unverified};
        auto response = co_await exchange(ping, plan);
        // docker's rule: insecure registries fall back to plain HTTP. Only
        // when the server did not speak TLS (or could not be reached): not
        // after a refused certificate (a CA was a request to verify), a TLS
        // session that failed later, or a stall: a plain-HTTP server answers
        // a TLS hello at once (with an error), so one that said nothing would
        // say nothing again.
        if (!response && plain_http_allowed(*https) &&
            (last_tls_failure_ == tls_failure::none ||
             last_tls_failure_ == tls_failure::protocol) &&
            response.error() != make_error_code(errc::timeout)) {
            auto tls_error = last_error_;
            auto http = detail::parse_http_url("http://" + endpoint + "/v2/");
            request_spec plain{*http, "", "", true};
            response = co_await exchange(plain, plan);
            if (response)
                state.plain_http = true;
            else
                last_error_ = tls_error + "; plain HTTP: " + last_error_;
        }
        if (!response) co_return response.error();
        if (response.value().status == 401) {
            auto challenges = parse_www_authenticate(response.value().www_authenticate);
            if (!challenges || challenges.value().empty())
                co_return fail<void>(errc::unauthorized,
                                     "registry " + endpoint +
                                         " answered 401 without a usable WWW-Authenticate "
                                         "challenge" +
                                         refusal_note(ref, 401));
            for (auto& c : challenges.value())
                if (c.scheme == "bearer" || (c.scheme == "basic" && !state.challenge))
                    state.challenge = c;
            if (!state.challenge)
                co_return fail<void>(errc::not_supported,
                                     "registry " + endpoint +
                                         " wants an authentication scheme we do not speak: " +
                                         challenges.value().front().scheme);
        } else if (response.value().status >= 300) {
            auto [code, text] =
                detail::describe_registry_failure(response.value().status, response.value().body);
            co_return fail<void>(code, "GET /v2/ on " + endpoint + ": " + text +
                                           refusal_note(ref, response.value().status));
        }
        state.pinged = true;
        co_return success();
    }

    awaitable<result<std::string>> authorization_for(const image_reference& ref,
                                                     const std::string& scope) {
        auto& state = host(ref);
        if (!state.challenge) co_return std::string();
        if (state.challenge->scheme == "basic") {
            if (!state.credentials) co_return std::string();
            co_return "Basic " +
                base64_encode(state.credentials->username + ":" + state.credentials->password);
        }
        if (auto cached = state.authorization_by_scope.find(scope);
            cached != state.authorization_by_scope.end())
            co_return cached->second;
        auto& params = state.challenge->params;
        auto realm = detail::parse_http_url(params["realm"]);
        if (!realm)
            co_return fail<std::string>(errc::unauthorized, "token realm '" +
                                                                params["realm"].substr(0, 200) +
                                                                "' is not an http(s) URL");
        if (!realm->tls && !plain_http_allowed(*realm) && !state.plain_http)
            co_return fail<std::string>(errc::unauthorized,
                                        "refusing a plain-HTTP token realm " + realm->authority());
        std::string query;
        if (auto service = params.find("service"); service != params.end())
            query += "service=" + detail::url_encode(service->second);
        query += std::string(query.empty() ? "" : "&") + "scope=" + detail::url_encode(scope);
        realm->target += (realm->target.find('?') == std::string::npos ? "?" : "&") + query;
        std::string basic;
        if (state.credentials && !state.credentials->username.empty())
            basic = "Basic " +
                    base64_encode(state.credentials->username + ":" + state.credentials->password);
        detail::body_plan plan;
        plan.max_string_body = 1 << 20;
        request_spec token_request{*realm, basic, "application/json",
                                   realm->tls && skip_verification(*realm)};
        auto response = co_await exchange(token_request, plan);
        if (!response) co_return response.error();
        if (response.value().status != 200) {
            auto [code, text] =
                detail::describe_registry_failure(response.value().status, response.value().body);
            co_return fail<std::string>(code == errc::not_found ? errc::unauthorized : code,
                                        "token request to " + realm->authority() + ": " + text +
                                            refusal_note(ref, response.value().status));
        }
        nlohmann::json j = nlohmann::json::parse(response.value().body, nullptr, false);
        std::string token;
        if (!j.is_discarded() && j.is_object()) {
            if (j.contains("token") && j["token"].is_string())
                token = j["token"].get<std::string>();
            else if (j.contains("access_token") && j["access_token"].is_string())
                token = j["access_token"].get<std::string>();
        }
        if (token.empty() || token.size() > 64 * 1024 ||
            token.find_first_of("\r\n") != std::string::npos)
            co_return fail<std::string>(errc::unauthorized, "token server " + realm->authority() +
                                                                " returned no usable token");
        auto value = "Bearer " + token;
        state.authorization_by_scope[scope] = value;
        co_return value;
    }

    awaitable<result<detail::http_response>> registry_get(image_reference ref, std::string target,
                                                          std::string accept,
                                                          detail::body_plan plan) {
        BOOST_OUTCOME_CO_TRYV(co_await ensure_pinged(ref));
        auto& state = host(ref);
        std::string scope = "repository:" + ref.repository + ":pull";
        BOOST_OUTCOME_CO_TRY(auto&& authorization, co_await authorization_for(ref, scope));
        auto url = detail::parse_http_url(std::string(state.plain_http ? "http://" : "https://") +
                                          ref.endpoint() + target);
        if (!url)
            co_return fail<detail::http_response>(errc::bad_reference,
                                                  "cannot make a URL for " + target);
        const auto registry_host = url->host, registry_port = url->port;
        unsigned redirects = 0;
        bool reauthenticated = false;
        while (true) {
            bool same_host = url->host == registry_host && url->port == registry_port;
            request_spec spec{*url, same_host ? authorization : std::string(), accept,
                              same_host ? state.tls_unverified : skip_verification(*url)};
            BOOST_OUTCOME_CO_TRY(auto&& response, co_await exchange(spec, plan));
            if (response.status == 401 && same_host && !reauthenticated &&
                !response.www_authenticate.empty()) {
                // The challenge may name a scope or realm of its own; learn it and retry once.
                reauthenticated = true;
                if (auto c = parse_www_authenticate(response.www_authenticate);
                    c && !c.value().empty()) {
                    for (auto& challenge : c.value())
                        if (challenge.scheme == "bearer" || challenge.scheme == "basic") {
                            state.challenge = challenge;
                            break;
                        }
                    state.authorization_by_scope.erase(scope);
                    if (state.challenge && state.challenge->scheme == "bearer")
                        if (auto it = state.challenge->params.find("scope");
                            it != state.challenge->params.end() && it->second.size() < 1024)
                            scope = it->second;
                    BOOST_OUTCOME_CO_TRY(auto&& fresh, co_await authorization_for(ref, scope));
                    if (!fresh.empty() && fresh != authorization) {
                        authorization = fresh;
                        continue;
                    }
                }
            }
            if (response.status == 301 || response.status == 302 || response.status == 303 ||
                response.status == 307 || response.status == 308) {
                if (++redirects > options_.max_redirects)
                    co_return fail<detail::http_response>(
                        errc::registry_error, "more than " +
                                                  std::to_string(options_.max_redirects) +
                                                  " redirects for " + target);
                auto next = detail::resolve_location(*url, response.location);
                if (!next)
                    co_return fail<detail::http_response>(
                        errc::registry_error,
                        "bad redirect Location '" + response.location.substr(0, 200) + "'");
                url = next;
                continue;
            }
            co_return response;
        }
    }

    // ---- operations ----

    awaitable<result<fetched_manifest>> fetch_manifest_coro(image_reference ref,
                                                            std::string reference) {
        detail::body_plan plan;
        plan.max_string_body = max_manifest_bytes;
        std::string target = "/v2/" + ref.repository + "/manifests/" + reference;
        std::string accept(media_type::manifest_accept);
        BOOST_OUTCOME_CO_TRY(auto&& response, co_await registry_get(ref, target, accept, plan));
        if (response.status != 200) {
            auto [code, text] = detail::describe_registry_failure(response.status, response.body);
            co_return fail<fetched_manifest>(code, "manifest " + ref.repository + ":" + reference +
                                                       " on " + ref.endpoint() + ": " + text +
                                                       refusal_note(ref, response.status));
        }
        fetched_manifest out;
        out.bytes = std::move(response.body);
        out.content_type = std::move(response.content_type);
        out.digest = compute_digest(out.bytes);
        auto check = [&](const digest& expected) {
            return compute_digest(out.bytes, expected.algorithm()) == expected;
        };
        if (auto pinned = digest::parse(reference); pinned) {
            if (!check(pinned.value()))
                co_return fail<fetched_manifest>(
                    errc::digest_mismatch,
                    "manifest bytes do not match the requested digest " + reference);
            out.digest = pinned.value();
        } else if (auto announced = digest::parse(response.docker_content_digest); announced) {
            if (!check(announced.value()))
                co_return fail<fetched_manifest>(
                    errc::digest_mismatch, "manifest bytes do not match Docker-Content-Digest " +
                                               response.docker_content_digest);
        }
        auto parsed = parse_manifest(out.bytes, out.content_type);
        if (!parsed)
            co_return fail<fetched_manifest>(
                parsed.error(), "manifest " + ref.repository + ":" + reference + " is " +
                                    (parsed.error() == make_error_code(errc::not_supported)
                                         ? "schema 1 or an unsupported type"
                                         : "invalid") +
                                    " (Content-Type '" + out.content_type.substr(0, 100) + "')");
        out.document = std::move(parsed).value();
        co_return out;
    }

    awaitable<result<resolved_manifest>> pull_manifest_coro(image_reference ref, platform wanted) {
        std::string top_reference = ref.manifest_reference();
        BOOST_OUTCOME_CO_TRY(auto&& top, co_await fetch_manifest_coro(ref, top_reference));
        resolved_manifest out;
        out.top_digest = top.digest;
        out.top_bytes = top.bytes;
        if (auto* manifest = std::get_if<image_manifest>(&top.document)) {
            out.manifest_digest = top.digest;
            out.manifest_bytes = std::move(top.bytes);
            out.manifest = std::move(*manifest);
            co_return out;
        }
        auto& index = std::get<image_index>(top.document);
        auto entry = select_platform(index, wanted);
        if (!entry) {
            std::string available;
            for (auto& m : index.manifests)
                if (m.platform) available += (available.empty() ? "" : ", ") + m.platform->str();
            co_return fail<resolved_manifest>(
                errc::platform_not_found,
                ref.familiar() + " has no " + wanted.str() +
                    " image (available: " + (available.empty() ? "none" : available) + ")");
        }
        std::string chosen_reference = entry.value().digest.str();
        BOOST_OUTCOME_CO_TRY(auto&& chosen, co_await fetch_manifest_coro(ref, chosen_reference));
        if (std::int64_t(chosen.bytes.size()) != entry.value().size)
            co_return fail<resolved_manifest>(
                errc::size_mismatch, "manifest " + chosen_reference + " is " +
                                         std::to_string(chosen.bytes.size()) +
                                         " bytes (its digest matches) where its index entry says " +
                                         std::to_string(entry.value().size));
        auto* manifest = std::get_if<image_manifest>(&chosen.document);
        if (!manifest)
            co_return fail<resolved_manifest>(errc::manifest_invalid,
                                              "index entry for " + wanted.str() +
                                                  " is not an image manifest");
        out.index = std::move(index);
        out.manifest_digest = chosen.digest;
        out.manifest_bytes = std::move(chosen.bytes);
        out.manifest = std::move(*manifest);
        co_return out;
    }

    awaitable<result<digest>> fetch_blob_coro(image_reference ref, descriptor blob,
                                              content_store& store, progress_callback progress,
                                              std::string kind) {
        auto report = [&](progress_event::phase phase, std::int64_t done) {
            if (progress) progress({phase, blob.digest, kind, blob.size, done});
        };
        if (store.contains(blob.digest)) {
            report(progress_event::phase::cached, blob.size);
            co_return blob.digest;
        }
        auto writer_result = store.begin_write(blob.digest, blob.size);
        if (!writer_result)
            co_return fail<digest>(writer_result.error(), "cannot write to the content store " +
                                                              store.root().string() + ": " +
                                                              writer_result.error().message());
        auto writer = std::move(writer_result).value();
        report(progress_event::phase::started, std::int64_t(writer.offset()));
        detail::body_plan plan;
        plan.blob = &writer;
        plan.progress = &progress;
        plan.kind = kind.c_str();
        const auto first_attempt = std::chrono::steady_clock::now();
        for (unsigned attempt = 0;; ++attempt) {
            if (std::int64_t(writer.offset()) == blob.size)
                break; // a complete partial: just verify
            std::string target = "/v2/" + ref.repository + "/blobs/" + blob.digest.str();
            std::string no_accept;
            auto response = co_await registry_get(ref, target, no_accept, plan);
            if (!response) {
                // A dropped or stalled connection keeps what arrived; retry
                // with Range, within max_retries and max_retry_time.
                bool transient = response.error() == make_error_code(errc::io_error) ||
                                 response.error() == make_error_code(errc::timeout);
                auto spent = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::steady_clock::now() - first_attempt);
                if (transient && attempt < options_.max_retries && spent < options_.max_retry_time)
                    continue;
                if (transient && attempt > 0)
                    last_error_ += " (gave up after " + std::to_string(attempt + 1) +
                                   " attempts in " + detail::seconds_text(spent) +
                                   (attempt < options_.max_retries
                                        ? ", past the retry time limit of " +
                                              detail::seconds_text(options_.max_retry_time)
                                        : std::string()) +
                                   "; the " + std::to_string(writer.offset()) +
                                   " bytes received are kept for a resume)";
                // A size or digest mismatch: nothing of it may stay.
                if (response.error() == make_error_code(errc::digest_mismatch) ||
                    response.error() == make_error_code(errc::size_mismatch))
                    writer.discard();
                co_return response.error();
            }
            if (response.value().status != 200 && response.value().status != 206) {
                auto [code, text] = detail::describe_registry_failure(response.value().status,
                                                                      response.value().body);
                co_return fail<digest>(code, kind + " " + blob.digest.str() + " on " +
                                                 ref.endpoint() + ": " + text +
                                                 refusal_note(ref, response.value().status));
            }
            break;
        }
        auto bytes = writer.offset();
        if (auto committed = writer.commit(); !committed) {
            if (committed.error() == make_error_code(errc::size_mismatch))
                co_return fail<digest>(
                    errc::size_mismatch,
                    kind + " " + blob.digest.str() + ": " + ref.endpoint() + " served " +
                        std::to_string(bytes) + " bytes where the manifest says " +
                        std::to_string(blob.size) +
                        (writer.received() == blob.digest
                             ? "; the bytes match the digest, so the manifest's size is wrong"
                             : " (and they do not match the digest either)") +
                        " (discarded)");
            if (committed.error() == make_error_code(errc::digest_mismatch))
                co_return fail<digest>(
                    errc::digest_mismatch,
                    kind + " " + blob.digest.str() + ": the " + std::to_string(bytes) +
                        " bytes received (the size the manifest says) hash to " +
                        writer.received().str() + ", not to the digest (discarded)");
            co_return fail<digest>(committed.error(), "storing " + blob.digest.str() + ": " +
                                                          committed.error().message());
        }
        report(progress_event::phase::completed, blob.size);
        co_return blob.digest;
    }

    // The config into memory (verified), not the store: a pull that fails
    // later leaves no config behind that no image record refers to.
    awaitable<result<std::string>> fetch_config_coro(image_reference ref, descriptor blob,
                                                     content_store& store,
                                                     const progress_callback& progress) {
        auto report = [&](progress_event::phase phase, std::int64_t done) {
            if (progress) progress({phase, blob.digest, "config", blob.size, done});
        };
        if (store.contains(blob.digest)) {
            auto bytes = store.read_blob(blob.digest, max_config_bytes);
            if (!bytes)
                co_return fail<std::string>(bytes.error(), "reading config " + blob.digest.str() +
                                                               " back: " + bytes.error().message());
            report(progress_event::phase::cached, blob.size);
            co_return std::move(bytes).value();
        }
        if (blob.size > std::int64_t(max_config_bytes))
            co_return fail<std::string>(errc::image_too_large,
                                        "config " + blob.digest.str() + " is " +
                                            std::to_string(blob.size) + " bytes, more than " +
                                            std::to_string(max_config_bytes));
        report(progress_event::phase::started, 0);
        detail::body_plan plan;
        plan.max_string_body =
            std::size_t(std::max<std::int64_t>(blob.size, std::int64_t(options_.max_error_body)));
        plan.string_body_size = blob.size;
        plan.kind = "config";
        std::string target = "/v2/" + ref.repository + "/blobs/" + blob.digest.str();
        std::string no_accept;
        const auto first_attempt = std::chrono::steady_clock::now();
        for (unsigned attempt = 0;; ++attempt) {
            auto response = co_await registry_get(ref, target, no_accept, plan);
            if (!response) {
                bool transient = response.error() == make_error_code(errc::io_error) ||
                                 response.error() == make_error_code(errc::timeout);
                if (transient && attempt < options_.max_retries &&
                    std::chrono::steady_clock::now() - first_attempt < options_.max_retry_time)
                    continue;
                co_return response.error();
            }
            if (response.value().status != 200) {
                auto [code, text] = detail::describe_registry_failure(response.value().status,
                                                                      response.value().body);
                co_return fail<std::string>(code, "config " + blob.digest.str() + " on " +
                                                      ref.endpoint() + ": " + text +
                                                      refusal_note(ref, response.value().status));
            }
            auto& bytes = response.value().body;
            bool digest_ok = compute_digest(bytes, blob.digest.algorithm()) == blob.digest;
            if (std::int64_t(bytes.size()) != blob.size)
                co_return fail<std::string>(
                    errc::size_mismatch,
                    "config " + blob.digest.str() + ": " + ref.endpoint() + " served " +
                        std::to_string(bytes.size()) + " bytes where the manifest says " +
                        std::to_string(blob.size) +
                        (digest_ok ? "; the bytes match the digest, so the manifest's size is wrong"
                                   : " (and they do not match the digest either)"));
            if (!digest_ok)
                co_return fail<std::string>(errc::digest_mismatch,
                                            "config " + blob.digest.str() + ": the " +
                                                std::to_string(bytes.size()) +
                                                " bytes received do not match the digest");
            report(progress_event::phase::completed, blob.size);
            co_return std::move(bytes);
        }
    }

    awaitable<result<pulled_image>> pull_coro(image_reference ref, platform wanted,
                                              content_store& store, progress_callback progress) {
        BOOST_OUTCOME_CO_TRY(auto&& resolved, co_await pull_manifest_coro(ref, wanted));
        std::string layer_kind = "layer";
        BOOST_OUTCOME_CO_TRY(auto&& config_bytes, co_await fetch_config_coro(ref, resolved.manifest.config,
                                                                      store, progress));
        auto config = parse_image_config(config_bytes);
        if (!config)
            co_return fail<pulled_image>(config.error(), "image config " +
                                                             resolved.manifest.config.digest.str() +
                                                             " is invalid");
        if (!config_platform_fits(wanted, config.value().platform))
            co_return fail<pulled_image>(errc::platform_not_found,
                                         ref.familiar() + " is a " + config.value().platform.str() +
                                             " image, not " + wanted.str());
        pulled_image image;
        for (const auto& layer : resolved.manifest.layers) {
            BOOST_OUTCOME_CO_TRYV(
                co_await fetch_blob_coro(ref, layer, store, progress, layer_kind));
            image.layers.push_back(store.blob_path(layer.digest));
        }
        // Only now that every layer is here: config and manifests go to the
        // store and the record names them, so a failed pull leaves just
        // layers (kept for the next try) and nothing unreferenced besides.
        for (auto [what, d, bytes] :
             {std::tuple{"config", &resolved.manifest.config.digest, &config_bytes},
              std::tuple{"manifest", &resolved.manifest_digest, &resolved.manifest_bytes},
              std::tuple{"manifest", &resolved.top_digest, &resolved.top_bytes}})
            if (auto r = store.write_blob(*d, *bytes); !r)
                co_return fail<pulled_image>(r.error(), std::string("storing the ") + what + " " +
                                                            d->str() + ": " + r.error().message());
        image.reference = ref.str();
        image.manifest_digest = resolved.top_digest;
        image.image_manifest_digest = resolved.manifest_digest;
        image.config = std::move(config).value();
        image_record record{image.reference,
                            image.manifest_digest,
                            image.image_manifest_digest,
                            resolved.manifest.config.digest,
                            resolved.manifest.total_size(),
                            image.config.platform.str(),
                            0};
        image.manifest = std::move(resolved.manifest);
        if (auto r = store.record_image(std::move(record)); !r)
            co_return fail<pulled_image>(r.error(), "recording the image: " + r.error().message());
        co_return image;
    }

    Executor executor_;
    registry_options options_;
    std::map<std::string, host_certificates> host_certificates_;
    std::map<std::string, std::unique_ptr<boost::asio::ssl::context>> tls_contexts_;
    tls_failure last_tls_failure_ = tls_failure::none;
    std::string last_error_;
    std::map<std::string, host_state> hosts_;
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// Blocking wrappers: each call runs its own io_context until the operation ends.
class registry_client {
public:
    explicit registry_client(registry_options options = {})
        : client_(io_.get_executor(), std::move(options)) {}

    result<fetched_manifest> fetch_manifest(const image_reference& ref, std::string reference) {
        return run<fetched_manifest>([&](auto handler) {
            client_.async_fetch_manifest(ref, std::move(reference), handler);
        });
    }
    result<resolved_manifest> pull_manifest(const image_reference& ref,
                                            const platform& wanted = default_platform()) {
        return run<resolved_manifest>(
            [&](auto handler) { client_.async_pull_manifest(ref, wanted, handler); });
    }
    result<digest> fetch_blob(const image_reference& ref, const descriptor& blob,
                              content_store& store, progress_callback progress = {},
                              std::string kind = "layer") {
        return run<digest>([&](auto handler) {
            client_.async_fetch_blob(ref, blob, store, std::move(progress), std::move(kind),
                                     handler);
        });
    }
    result<pulled_image> pull(const image_reference& ref, content_store& store,
                              const platform& wanted = default_platform(),
                              progress_callback progress = {}) {
        return run<pulled_image>([&](auto handler) {
            client_.async_pull(ref, wanted, store, std::move(progress), handler);
        });
    }
    const std::string& last_error() const noexcept { return client_.last_error(); }

private:
    template <class T, class Start>
    result<T> run(Start start) {
        std::optional<result<T>> out;
        start([&out](boost::system::error_code ec, T value) {
            if (ec)
                out.emplace(ec);
            else
                out.emplace(std::move(value));
        });
        io_.restart();
        io_.run();
        if (!out) return errc::cancelled;
        return std::move(*out);
    }

    boost::asio::io_context io_;
    basic_registry_client<boost::asio::io_context::executor_type> client_;
};

} // namespace supermachine::oci
