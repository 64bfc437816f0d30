#pragma once
// Where a registry's TLS trust comes from, the way docker finds it:
//
//   certs.d/HOST:PORT/*.crt         CA certificates trusted for that registry
//   certs.d/HOST:PORT/NAME.cert     a client certificate (mutual TLS) ...
//   certs.d/HOST:PORT/NAME.key      ... and its key
//
// under /etc/docker/certs.d (docker), $XDG_CONFIG_HOME/docker/certs.d
// (rootless docker) and /etc/containers/certs.d (podman, skopeo), or the
// directories listed in $SUPERMACHINE_CERTS_D (colon-separated) instead.
// Plus the words for a failed certificate verification: which certificate,
// the verifier's reason, and what the user can do about it.
#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace supermachine::oci {

/// The certs.d roots searched, in order: $SUPERMACHINE_CERTS_D if set, else
/// docker's, rootless docker's and the containers tools' directories.
inline std::vector<std::filesystem::path> default_certs_d_dirs() {
    std::vector<std::filesystem::path> out;
    if (const char* list = std::getenv("SUPERMACHINE_CERTS_D"); list) {
        std::string_view rest = list;
        while (!rest.empty()) {
            auto colon = rest.find(':');
            auto item = rest.substr(0, colon);
            if (!item.empty()) out.emplace_back(item);
            if (colon == std::string_view::npos) break;
            rest.remove_prefix(colon + 1);
        }
        return out;
    }
    out.emplace_back("/etc/docker/certs.d");
    if (const char* config = std::getenv("XDG_CONFIG_HOME"); config && *config)
        out.push_back(std::filesystem::path(config) / "docker/certs.d");
    else if (const char* home = std::getenv("HOME"); home && *home)
        out.push_back(std::filesystem::path(home) / ".config/docker/certs.d");
    out.emplace_back("/etc/containers/certs.d");
    return out;
}

/// What one registry's certs.d directory holds.
struct host_certificates {
    std::filesystem::path dir;                            // empty: no directory for this host
    std::vector<std::filesystem::path> ca_files;          // *.crt
    std::filesystem::path client_certificate, client_key; // NAME.cert + NAME.key
    std::string problem; // e.g. a .cert without its .key (docker refuses those too)
};

/// The first `root/HOST:PORT` (or `root/HOST` for port 443) directory that
/// exists. Bounded: at most 64 entries are looked at.
inline host_certificates find_host_certificates(const std::vector<std::filesystem::path>& roots,
                                                std::string_view authority_with_port,
                                                std::string_view authority_default_port = {}) {
    host_certificates out;
    std::error_code ec;
    for (const auto& root : roots) {
        for (auto name : {authority_with_port, authority_default_port}) {
            if (name.empty() || name.find('/') != std::string_view::npos || name == "." ||
                name == "..")
                continue;
            auto dir = root / std::string(name);
            if (std::filesystem::is_directory(dir, ec)) {
                out.dir = dir;
                break;
            }
        }
        if (!out.dir.empty()) break;
    }
    if (out.dir.empty()) return out;
    std::vector<std::filesystem::path> entries;
    for (auto it = std::filesystem::directory_iterator(out.dir, ec);
         !ec && it != std::filesystem::directory_iterator() && entries.size() < 64;
         it.increment(ec))
        entries.push_back(it->path());
    std::sort(entries.begin(), entries.end());
    for (const auto& path : entries) {
        auto extension = path.extension();
        if (extension == ".crt") {
            out.ca_files.push_back(path);
        } else if (extension == ".cert") {
            auto key = std::filesystem::path(path).replace_extension(".key");
            if (!std::filesystem::exists(key, ec)) {
                out.problem =
                    "missing key " + key.string() + " for client certificate " + path.string();
            } else if (out.client_certificate.empty()) {
                out.client_certificate = path;
                out.client_key = key;
            }
        } else if (extension == ".key") {
            auto cert = std::filesystem::path(path).replace_extension(".cert");
            if (!std::filesystem::exists(cert, ec))
                out.problem =
                    "missing client certificate " + cert.string() + " for key " + path.string();
        }
    }
    return out;
}

namespace detail {

/// The first certificate the verifier refused, as the verify callback saw it.
struct tls_verify_failure {
    int error = 0; // X509_V_ERR_*; 0: none recorded
    int depth = 0;
    std::string certificate; // subject, issuer, validity, names
};

inline std::string x509_name_text(const X509_NAME* name) {
    if (!name) return "?";
    BIO* bio = BIO_new(BIO_s_mem());
    if (!bio) return "?";
    X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253);
    char* data = nullptr;
    auto n = BIO_get_mem_data(bio, &data);
    std::string out(data, std::size_t(std::max<long>(n, 0)));
    BIO_free(bio);
    return out.substr(0, 200);
}

inline std::string asn1_time_text(const ASN1_TIME* time) {
    if (!time) return "?";
    BIO* bio = BIO_new(BIO_s_mem());
    if (!bio) return "?";
    ASN1_TIME_print(bio, time);
    char* data = nullptr;
    auto n = BIO_get_mem_data(bio, &data);
    std::string out(data, std::size_t(std::max<long>(n, 0)));
    BIO_free(bio);
    return out;
}

/// "subject CN=x, issued by CN=ca, valid Dec 1 ... until Dec 2 ..., for DNS:a, IP:1.2.3.4"
inline std::string describe_certificate(X509* cert) {
    if (!cert) return {};
    std::string out = "subject " + x509_name_text(X509_get_subject_name(cert)) + ", issued by " +
                      x509_name_text(X509_get_issuer_name(cert)) + ", valid " +
                      asn1_time_text(X509_get0_notBefore(cert)) + " until " +
                      asn1_time_text(X509_get0_notAfter(cert));
    auto* names =
        static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
    if (names) {
        std::string list;
        int count = sk_GENERAL_NAME_num(names);
        for (int i = 0; i < count && i < 16; ++i) {
            const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, i);
            std::string item;
            if (name->type == GEN_DNS) {
                auto* s = name->d.dNSName;
                item = "DNS:" + std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                            std::size_t(ASN1_STRING_length(s)));
            } else if (name->type == GEN_IPADD) {
                auto* s = name->d.iPAddress;
                const unsigned char* b = ASN1_STRING_get0_data(s);
                int len = ASN1_STRING_length(s);
                item = "IP:";
                if (len == 4) {
                    for (int k = 0; k < 4; ++k)
                        item += (k ? "." : "") + std::to_string(b[k]);
                } else {
                    item += "(IPv6)";
                }
            }
            if (!item.empty()) list += (list.empty() ? "" : ", ") + item.substr(0, 100);
        }
        GENERAL_NAMES_free(names);
        if (!list.empty()) out += ", for " + list;
    }
    return out;
}

/// The verifier's reason in a user's words: "unknown issuer", "expired",
/// "name mismatch", else OpenSSL's own text.
inline std::string_view verify_error_kind(int error) {
    switch (error) {
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_CERT_UNTRUSTED:
        return "unknown issuer";
    case X509_V_ERR_CERT_HAS_EXPIRED:
        return "expired";
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "not yet valid";
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
        return "name mismatch";
    default:
        return "";
    }
}

/// The whole sentence for a failed verification of `authority`'s certificate.
/// `trusted` lists where CAs came from; `insecure_hint` the flags that skip
/// verification.
inline std::string describe_verify_failure(std::string_view authority,
                                           const tls_verify_failure& failure,
                                           std::string_view trusted) {
    std::string reason = X509_verify_cert_error_string(failure.error);
    auto kind = verify_error_kind(failure.error);
    std::string out = "certificate verification failed for " + std::string(authority) + ": " +
                      (kind.empty() ? reason : std::string(kind) + " (" + reason + ")");
    if (!failure.certificate.empty())
        out += "; the " + std::string(failure.depth == 0 ? "server's" : "chain's") +
               " certificate: " + failure.certificate;
    out += "; trusted CAs: " + std::string(trusted) + ". ";
    std::string insecure = "or skip verification with --insecure (or --insecure-registry " +
                           std::string(authority) + ")";
    if (kind == "name mismatch")
        return out +
               "Reach the registry by a name the certificate lists, or have it reissued "
               "with " +
               std::string(authority.substr(0, authority.rfind(':'))) + " in its subjectAltName; " +
               insecure;
    if (kind == "expired" || kind == "not yet valid")
        return out + "Renew the certificate (or check this machine's clock); " + insecure;
    return out +
           "To trust the registry's CA: pass --ca-file CA.pem, add it to the system store "
           "(copy it to /usr/local/share/ca-certificates/ and run update-ca-certificates), "
           "or put it in /etc/docker/certs.d/" +
           std::string(authority) + "/ca.crt (docker's place for it); " + insecure;
}

} // namespace detail

} // namespace supermachine::oci
