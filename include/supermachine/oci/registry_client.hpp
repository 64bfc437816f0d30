#pragma once
// A client for the OCI distribution API (Docker Registry HTTP API v2) on
// Boost.Beast: HTTP/1.1 over TCP or TLS (system CA store), token and Basic
// auth, redirects to blob storage, blobs streamed into the content store while
// hashing, Range resume, and bounded everything (headers, bodies, redirects).
//
//   basic_registry_client<Executor>   async_* operations taking completion tokens
//   registry_client                   blocking wrappers (own io_context)
//
// Every operation that fails leaves a human-readable reason in last_error().
// Async handlers are void(boost::system::error_code, T), so use_awaitable
// throws and use_future rethrows as Asio users expect; from_asio_error(ec)
// gives back the std::error_code to compare with supermachine::errc.
// The client must outlive its operations; it is not thread-safe (use a strand).
#include <supermachine/error.hpp>
#include <supermachine/oci/auth.hpp>
#include <supermachine/oci/content_store.hpp>
#include <supermachine/oci/detail/http_url.hpp>
#include <supermachine/oci/detail/registry_asio_error.hpp>
#include <supermachine/oci/digest.hpp>
#include <supermachine/oci/image_config.hpp>
#include <supermachine/oci/manifest.hpp>
#include <supermachine/oci/media_types.hpp>
#include <supermachine/oci/platform.hpp>
#include <supermachine/oci/progress.hpp>
#include <supermachine/oci/reference.hpp>

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
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace supermachine::oci {

struct registry_options {
    bool insecure = false; // every registry: plain HTTP / unverified TLS allowed
    std::vector<std::string> insecure_registries; // host[:port] treated as with --insecure
    bool loopback_is_insecure = true;             // localhost, 127/8, ::1 (as docker does)
    std::string ca_file;                          // extra PEM CA bundle, besides the system store
    std::optional<oci::credentials> credentials;  // explicit; else from the docker config
    bool use_docker_config = true;
    std::filesystem::path docker_config = docker_config_path();
    std::chrono::seconds timeout{60}; // per connect/read/write step
    unsigned max_redirects = 5;
    unsigned max_retries = 3;                 // resumptions of a blob after a dropped connection
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
    blob_writer* blob = nullptr; // 200/206 bodies stream here
    const progress_callback* progress = nullptr;
    const char* kind = "layer";
    std::string* error_detail = nullptr;
};

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
        , options_(std::move(options))
        , verified_tls_(boost::asio::ssl::context::tls_client)
        , unverified_tls_(boost::asio::ssl::context::tls_client) {
        boost::system::error_code ignored;
        verified_tls_.set_default_verify_paths(ignored);
        if (!options_.ca_file.empty()) verified_tls_.load_verify_file(options_.ca_file, ignored);
        verified_tls_.set_verify_mode(boost::asio::ssl::verify_peer);
        unverified_tls_.set_verify_mode(boost::asio::ssl::verify_none);
    }

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
        std::map<std::string, std::string> authorization_by_scope;
    };

    struct request_spec {
        detail::http_url url;
        std::string authorization;
        std::string accept;
        bool tls_unverified = false;
    };

    template <class T>
    result<T> fail(std::error_code code, std::string why) {
        last_error_ = std::move(why);
        return code;
    }

    // A stalled peer (our per-step deadline) is a timeout; anything else on the wire is I/O.
    static errc network_failure(const boost::system::error_code& ec) {
        return ec == boost::beast::error::timeout ? errc::timeout : errc::io_error;
    }

    bool insecure_allowed(std::string_view endpoint) const {
        if (options_.insecure) return true;
        if (options_.loopback_is_insecure && detail::is_loopback_host(endpoint)) return true;
        for (const auto& h : options_.insecure_registries)
            if (h == endpoint) return true;
        return false;
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
                                    handler(to_asio_error(r.error()), T{});
                            });
                    },
                    boost::asio::detached);
            },
            token, std::move(op));
    }

    // ---- one HTTP exchange on a fresh connection ----

    awaitable<result<detail::http_response>> exchange(request_spec spec, detail::body_plan plan) {
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
            co_return fail<detail::http_response>(network_failure(ec), "cannot connect to " +
                                                                           spec.url.authority() +
                                                                           ": " + ec.message());

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

        boost::beast::ssl_stream<boost::beast::tcp_stream> tls(
            std::move(stream), spec.tls_unverified ? unverified_tls_ : verified_tls_);
        boost::system::error_code address_ec;
        boost::asio::ip::make_address(spec.url.host, address_ec);
        if (address_ec) // SNI only for names, never for addresses (RFC 6066)
            SSL_set_tlsext_host_name(tls.native_handle(), spec.url.host.c_str());
        if (!spec.tls_unverified) {
            tls.set_verify_mode(boost::asio::ssl::verify_peer);
            tls.set_verify_callback(boost::asio::ssl::host_name_verification(spec.url.host));
        }
        boost::beast::get_lowest_layer(tls).expires_after(options_.timeout);
        co_await tls.async_handshake(boost::asio::ssl::stream_base::client, use);
        if (ec)
            co_return fail<detail::http_response>(network_failure(ec),
                                                  "TLS handshake with " + spec.url.authority() +
                                                      " failed: " + ec.message());
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
                network_failure(ec), "sending request to " + url.authority() + ": " + ec.message());

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
        if (ec == http::error::body_limit)
            co_return fail<detail::http_response>(
                plan.blob ? errc::digest_mismatch : errc::image_too_large,
                "response from " + url.authority() + " announces a body larger than allowed (" +
                    std::to_string(plan.blob ? remaining : plan.max_string_body) + " bytes)");
        if (ec)
            co_return fail<detail::http_response>(network_failure(ec), "reading response from " +
                                                                           url.authority() + ": " +
                                                                           ec.message());

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
                co_return fail<detail::http_response>(errc::digest_mismatch,
                                                      "server sends " + std::to_string(*length) +
                                                          " bytes where the descriptor leaves " +
                                                          std::to_string(remaining));
            }
        }
        std::vector<char> chunk(64 * 1024);
        std::int64_t last_report = -1;
        while (!parser.is_done()) {
            message.body().data = chunk.data();
            message.body().size = chunk.size();
            // Blobs may be large: the deadline restarts per chunk. Small bodies
            // (manifests, tokens, errors) share the header's deadline, so a
            // peer trickling bytes cannot stretch them.
            if (to_blob) lowest.expires_after(options_.timeout);
            co_await http::async_read(stream, buffer, parser, use);
            if (ec == http::error::need_buffer) ec = {};
            std::size_t n = chunk.size() - message.body().size;
            if (n > 0) {
                if (to_blob) {
                    if (auto r = plan.blob->write(std::as_bytes(std::span(chunk.data(), n))); !r) {
                        if (r.error() == make_error_code(errc::digest_mismatch))
                            co_return fail<detail::http_response>(
                                errc::digest_mismatch,
                                "server sent more bytes than the descriptor's size " +
                                    std::to_string(plan.blob->expected_size()));
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
            if (ec == http::error::body_limit)
                co_return fail<detail::http_response>(
                    to_blob ? errc::digest_mismatch : errc::image_too_large,
                    "response body from " + url.authority() + " exceeds its bound");
            if (ec)
                co_return fail<detail::http_response>(
                    network_failure(ec), "connection to " + url.authority() +
                                             " broke while reading the body: " + ec.message());
        }
        co_return response_t(std::move(response));
    }

    // ---- registry conversation: ping, auth, redirects ----

    host_state& host(const image_reference& ref) { return hosts_[ref.endpoint()]; }

    awaitable<result<void>> ensure_pinged(const image_reference& ref) {
        auto endpoint = ref.endpoint();
        auto& state = host(ref);
        if (state.pinged) co_return success();
        if (!state.credentials_loaded) {
            state.credentials_loaded = true;
            if (options_.credentials)
                state.credentials = options_.credentials;
            else if (options_.use_docker_config) {
                auto loaded = load_docker_credentials(ref.registry, options_.docker_config);
                if (loaded) state.credentials = loaded.value();
            }
        }
        bool insecure = insecure_allowed(endpoint);
        state.tls_unverified = insecure;
        auto https = detail::parse_http_url("https://" + endpoint + "/v2/");
        if (!https)
            co_return fail<void>(errc::bad_reference, "cannot make a URL for registry " + endpoint);
        detail::body_plan plan;
        plan.max_string_body = options_.max_error_body;
        request_spec ping{*https, "", "", insecure};
        auto response = co_await exchange(ping, plan);
        if (!response && insecure) { // docker's rule: insecure registries fall back to plain HTTP
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
                co_return fail<void>(
                    errc::unauthorized,
                    "registry " + endpoint +
                        " answered 401 without a usable WWW-Authenticate challenge");
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
            co_return fail<void>(code, "GET /v2/ on " + endpoint + ": " + text);
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
        if (!realm->tls && !insecure_allowed(realm->authority()) && !state.plain_http)
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
                                   insecure_allowed(realm->authority())};
        auto response = co_await exchange(token_request, plan);
        if (!response) co_return response.error();
        if (response.value().status != 200) {
            auto [code, text] =
                detail::describe_registry_failure(response.value().status, response.value().body);
            co_return fail<std::string>(code == errc::not_found ? errc::unauthorized : code,
                                        "token request to " + realm->authority() + ": " + text);
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
        BOOST_OUTCOME_CO_TRY(authorization, co_await authorization_for(ref, scope));
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
                              same_host ? state.tls_unverified
                                        : insecure_allowed(url->authority())};
            BOOST_OUTCOME_CO_TRY(response, co_await exchange(spec, plan));
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
                    BOOST_OUTCOME_CO_TRY(fresh, co_await authorization_for(ref, scope));
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
        BOOST_OUTCOME_CO_TRY(response, co_await registry_get(ref, target, accept, plan));
        if (response.status != 200) {
            auto [code, text] = detail::describe_registry_failure(response.status, response.body);
            co_return fail<fetched_manifest>(code, "manifest " + ref.repository + ":" + reference +
                                                       " on " + ref.endpoint() + ": " + text);
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
        BOOST_OUTCOME_CO_TRY(top, co_await fetch_manifest_coro(ref, top_reference));
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
        BOOST_OUTCOME_CO_TRY(chosen, co_await fetch_manifest_coro(ref, chosen_reference));
        if (std::int64_t(chosen.bytes.size()) != entry.value().size)
            co_return fail<resolved_manifest>(errc::digest_mismatch,
                                              "manifest size differs from its index entry");
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
        for (unsigned attempt = 0;; ++attempt) {
            if (std::int64_t(writer.offset()) == blob.size)
                break; // a complete partial: just verify
            std::string target = "/v2/" + ref.repository + "/blobs/" + blob.digest.str();
            std::string no_accept;
            auto response = co_await registry_get(ref, target, no_accept, plan);
            if (!response) {
                // A dropped connection keeps what arrived; retry with Range.
                if ((response.error() == make_error_code(errc::io_error) ||
                     response.error() == make_error_code(errc::timeout)) &&
                    attempt < options_.max_retries)
                    continue;
                // More bytes than the descriptor allows: nothing of it may stay.
                if (response.error() == make_error_code(errc::digest_mismatch)) writer.discard();
                co_return response.error();
            }
            if (response.value().status != 200 && response.value().status != 206) {
                auto [code, text] = detail::describe_registry_failure(response.value().status,
                                                                      response.value().body);
                co_return fail<digest>(code, kind + " " + blob.digest.str() + " on " +
                                                 ref.endpoint() + ": " + text);
            }
            break;
        }
        auto bytes = writer.offset();
        if (auto committed = writer.commit(); !committed) {
            if (committed.error() == make_error_code(errc::digest_mismatch))
                co_return fail<digest>(errc::digest_mismatch,
                                       kind + " " + blob.digest.str() + ": the " +
                                           std::to_string(bytes) +
                                           " bytes received do not match the digest (discarded)");
            co_return fail<digest>(committed.error(), "storing " + blob.digest.str() + ": " +
                                                          committed.error().message());
        }
        report(progress_event::phase::completed, blob.size);
        co_return blob.digest;
    }

    awaitable<result<pulled_image>> pull_coro(image_reference ref, platform wanted,
                                              content_store& store, progress_callback progress) {
        BOOST_OUTCOME_CO_TRY(resolved, co_await pull_manifest_coro(ref, wanted));
        if (auto r = store.write_blob(resolved.top_digest, resolved.top_bytes); !r)
            co_return fail<pulled_image>(r.error(), "storing manifest: " + r.error().message());
        if (auto r = store.write_blob(resolved.manifest_digest, resolved.manifest_bytes); !r)
            co_return fail<pulled_image>(r.error(), "storing manifest: " + r.error().message());
        std::string config_kind = "config", layer_kind = "layer";
        BOOST_OUTCOME_CO_TRYV(
            co_await fetch_blob_coro(ref, resolved.manifest.config, store, progress, config_kind));
        auto config_bytes = store.read_blob(resolved.manifest.config.digest, max_config_bytes);
        if (!config_bytes)
            co_return fail<pulled_image>(config_bytes.error(),
                                         "reading config back: " + config_bytes.error().message());
        auto config = parse_image_config(config_bytes.value());
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
    boost::asio::ssl::context verified_tls_, unverified_tls_;
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
                out.emplace(from_asio_error(ec));
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
