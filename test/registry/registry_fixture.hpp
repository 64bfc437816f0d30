#pragma once
// Test fixtures around real tools: a temp directory, Debian's docker-registry
// on 127.0.0.1:<free port> with a config of our own, and images built with
// umoci from busybox-static and pushed with skopeo.
#include <skip.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

namespace supermachine::test {

namespace fs = std::filesystem;

inline bool have_program(const char* path) {
    return ::access(path, X_OK) == 0;
}

struct temp_dir {
    fs::path path;
    temp_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-registry-XXXXXX").string();
        if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp");
        path = pattern;
    }
    ~temp_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    temp_dir(const temp_dir&) = delete;
    temp_dir& operator=(const temp_dir&) = delete;
};

/// Run a shell command; throw with its output if it fails.
inline std::string run(const std::string& command) {
    std::string full = "( " + command + " ) 2>&1";
    FILE* pipe = ::popen(full.c_str(), "r");
    if (!pipe) throw std::runtime_error("popen");
    std::string out;
    char buffer[4096];
    while (auto n = std::fread(buffer, 1, sizeof buffer, pipe))
        out.append(buffer, n);
    int status = ::pclose(pipe);
    if (status != 0) throw std::runtime_error("command failed: " + command + "\n" + out);
    return out;
}

inline std::string read_text(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

inline void write_text(const fs::path& p, const std::string& text) {
    std::ofstream out(p, std::ios::binary);
    out << text;
}

inline unsigned short free_port() {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(fd);
    return ntohs(a.sin_port);
}

inline bool port_open(unsigned short port) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    return ok;
}

/// docker-registry serving from a temp dir; `extra_config` is appended under
/// the top level (auth:) or http: (tls:) by the caller's YAML.
class registry_server {
public:
    struct options {
        std::string auth_yaml; // e.g. "auth:\n  htpasswd:\n    realm: r\n    path: /x\n"
        std::string tls_certificate, tls_key;
        std::string tls_client_ca; // mutual TLS: clients must present a certificate it signed
    };

    explicit registry_server(const fs::path& dir, options opts = {}) {
        skip_unless(have_program("/usr/bin/docker-registry"), "docker-registry not installed");
        port_ = free_port();
        auto config = dir / "registry.yml";
        std::string yaml = "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                           "storage:\n  filesystem:\n    rootdirectory: " +
                           (dir / "registry-data").string() + "\n  delete:\n    enabled: true\n" +
                           opts.auth_yaml + "http:\n  addr: 127.0.0.1:" + std::to_string(port_) +
                           "\n";
        if (!opts.tls_certificate.empty())
            yaml += "  tls:\n    certificate: " + opts.tls_certificate +
                    "\n    key: " + opts.tls_key + "\n";
        if (!opts.tls_client_ca.empty())
            yaml += "    clientcas:\n      - " + opts.tls_client_ca + "\n";
        write_text(config, yaml);
        auto log = (dir / "registry.log").string();
        std::fflush(nullptr); // the child must not replay our buffered output
        pid_ = ::fork();
        if (pid_ == 0) {
            std::freopen(log.c_str(), "w", stdout);
            std::freopen(log.c_str(), "a", stderr);
            ::execl("/usr/bin/docker-registry", "docker-registry", "serve", config.c_str(),
                    nullptr);
            ::_exit(127);
        }
        for (int i = 0; i < 200 && !port_open(port_); ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(25));
        if (!port_open(port_))
            throw std::runtime_error("docker-registry did not start:\n" + read_text(log));
    }
    ~registry_server() {
        if (pid_ > 0) {
            ::kill(pid_, SIGTERM);
            int status = 0;
            ::waitpid(pid_, &status, 0);
        }
    }
    registry_server(const registry_server&) = delete;
    registry_server& operator=(const registry_server&) = delete;

    unsigned short port() const { return port_; }
    std::string host() const { return "127.0.0.1:" + std::to_string(port_); }

private:
    pid_t pid_ = -1;
    unsigned short port_ = 0;
};

/// An OCI layout with one busybox-static image tagged `tag`, made by umoci.
/// Returns the layout directory.
inline fs::path make_busybox_layout(const fs::path& dir, const std::string& tag = "latest",
                                    const std::string& arch = "amd64") {
    skip_unless(have_program("/usr/bin/umoci"), "umoci not installed");
    skip_unless(have_program("/bin/busybox"), "busybox-static not installed");
    auto layout = dir / "layout";
    auto bundle = dir / ("bundle-" + tag);
    if (!fs::exists(layout / "oci-layout")) run("umoci init --layout " + layout.string());
    run("umoci new --image " + layout.string() + ":" + tag);
    run("umoci unpack --image " + layout.string() + ":" + tag + " " + bundle.string());
    fs::create_directories(bundle / "rootfs/bin");
    fs::copy_file("/bin/busybox", bundle / "rootfs/bin/busybox");
    fs::create_symlink("busybox", bundle / "rootfs/bin/sh");
    write_text(bundle / ("rootfs/tag-" + tag), tag + "\n");
    run("umoci repack --image " + layout.string() + ":" + tag + " " + bundle.string());
    run("umoci config --image " + layout.string() + ":" + tag +
        " --config.cmd /bin/sh --config.env FOO=bar --config.workingdir /tmp"
        " --config.user 1000:1000 --config.exposedports 8080/tcp --config.label test=yes"
        " --architecture " +
        arch);
    fs::remove_all(bundle);
    return layout;
}

/// skopeo copy with TLS verification off (our registries are plain HTTP).
inline void skopeo_copy(const std::string& from, const std::string& to,
                        const std::string& extra = "") {
    skip_unless(have_program("/usr/bin/skopeo"), "skopeo not installed");
    run("skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false " + extra + " " + from +
        " " + to);
}

} // namespace supermachine::test
