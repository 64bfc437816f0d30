#pragma once
// Content digests ("sha256:<64 hex>", "sha512:<128 hex>"): parsed, validated,
// and computed incrementally through OpenSSL's EVP interface.
#include <supermachine/error.hpp>

#include <openssl/evp.h>

#include <array>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace supermachine::oci {

enum class digest_algorithm { sha256, sha512 };

constexpr std::size_t digest_hex_length(digest_algorithm algorithm) noexcept {
    return algorithm == digest_algorithm::sha256 ? 64 : 128;
}

constexpr std::string_view digest_algorithm_name(digest_algorithm algorithm) noexcept {
    return algorithm == digest_algorithm::sha256 ? "sha256" : "sha512";
}

/// A validated digest. Hex is kept lowercase, as the OCI spec requires.
class digest {
public:
    digest() = default; // sha256 of nothing in particular: only for containers; check valid()

    /// Parse "algorithm:hex". Only sha256 and sha512 are accepted, the hex must
    /// be lowercase and exactly as long as the algorithm's output.
    static result<digest> parse(std::string_view text) noexcept {
        if (text.size() > 7 + 128) return errc::bad_digest;
        auto colon = text.find(':');
        if (colon == std::string_view::npos) return errc::bad_digest;
        auto name = text.substr(0, colon);
        auto hex = text.substr(colon + 1);
        digest_algorithm algorithm;
        if (name == "sha256")
            algorithm = digest_algorithm::sha256;
        else if (name == "sha512")
            algorithm = digest_algorithm::sha512;
        else
            return errc::bad_digest;
        if (hex.size() != digest_hex_length(algorithm)) return errc::bad_digest;
        for (char c : hex)
            if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return errc::bad_digest;
        digest d;
        d.algorithm_ = algorithm;
        d.hex_.assign(hex);
        return d;
    }

    static digest from_raw(digest_algorithm algorithm, std::span<const unsigned char> raw) {
        static constexpr char hexdigits[] = "0123456789abcdef";
        digest d;
        d.algorithm_ = algorithm;
        d.hex_.reserve(raw.size() * 2);
        for (unsigned char b : raw) {
            d.hex_.push_back(hexdigits[b >> 4]);
            d.hex_.push_back(hexdigits[b & 15]);
        }
        return d;
    }

    bool valid() const noexcept { return hex_.size() == digest_hex_length(algorithm_); }
    digest_algorithm algorithm() const noexcept { return algorithm_; }
    std::string_view algorithm_name() const noexcept { return digest_algorithm_name(algorithm_); }
    const std::string& hex() const noexcept { return hex_; }
    std::string str() const { return std::string(algorithm_name()) + ":" + hex_; }

    friend bool operator==(const digest&, const digest&) = default;
    friend auto operator<=>(const digest& a, const digest& b) {
        if (auto c = a.algorithm_ <=> b.algorithm_; c != 0) return c;
        return a.hex_.compare(b.hex_) <=> 0;
    }

private:
    digest_algorithm algorithm_ = digest_algorithm::sha256;
    std::string hex_;
};

/// Incremental hashing: update() with the bytes as they arrive, finish() once.
class hasher {
public:
    explicit hasher(digest_algorithm algorithm = digest_algorithm::sha256)
        : algorithm_(algorithm)
        , context_(EVP_MD_CTX_new()) {
        if (!context_) throw std::bad_alloc();
        const EVP_MD* md = algorithm == digest_algorithm::sha256 ? EVP_sha256() : EVP_sha512();
        if (EVP_DigestInit_ex(context_.get(), md, nullptr) != 1)
            throw boost::system::system_error(make_error_code(errc::io_error), "EVP_DigestInit_ex");
    }

    digest_algorithm algorithm() const noexcept { return algorithm_; }
    std::uint64_t bytes_hashed() const noexcept { return count_; }

    void update(std::span<const std::byte> bytes) noexcept {
        EVP_DigestUpdate(context_.get(), bytes.data(), bytes.size());
        count_ += bytes.size();
    }
    void update(std::string_view bytes) noexcept { update(std::as_bytes(std::span(bytes))); }

    /// The digest of everything passed to update(); the hasher is spent afterwards.
    digest finish() {
        std::array<unsigned char, EVP_MAX_MD_SIZE> raw{};
        unsigned int length = 0;
        EVP_DigestFinal_ex(context_.get(), raw.data(), &length);
        return digest::from_raw(algorithm_, std::span(raw.data(), length));
    }

private:
    struct context_deleter {
        void operator()(EVP_MD_CTX* c) const noexcept { EVP_MD_CTX_free(c); }
    };
    digest_algorithm algorithm_;
    std::unique_ptr<EVP_MD_CTX, context_deleter> context_;
    std::uint64_t count_ = 0;
};

inline digest compute_digest(std::string_view bytes,
                             digest_algorithm algorithm = digest_algorithm::sha256) {
    hasher h(algorithm);
    h.update(bytes);
    return h.finish();
}

} // namespace supermachine::oci
