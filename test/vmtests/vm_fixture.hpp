#pragma once
// Shared set-up for the VM tests: real QEMU (TCG), the Debian cloud kernel
// from the kernel cache (fetched with scripts/fetch-kernel.sh if absent), the
// demo image made by scripts/make-demo-image.sh into a temp dir, and a temp
// XDG_CACHE_HOME so tests never share image caches. One "SKIP:" line and
// exit 77 when the host lacks QEMU or the kernel cannot be had.
#include <skip.hpp>
#include <supermachine/boot/kernel_cache.hpp>

#include <fcntl.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace supermachine::test {

namespace fs = std::filesystem;

inline std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char c : s)
        out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}

inline bool have_qemu() {
    return std::system("command -v qemu-system-x86_64 >/dev/null 2>&1") == 0;
}

inline std::string sha256_hex(const EVP_MD_CTX* ctx_in) {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_MD_CTX_copy_ex(ctx, ctx_in);
    unsigned char digest[32];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx, digest, &n);
    EVP_MD_CTX_free(ctx);
    static constexpr char hex[] = "0123456789abcdef";
    std::string out;
    for (unsigned i = 0; i < n; ++i) {
        out += hex[digest[i] >> 4];
        out += hex[digest[i] & 15];
    }
    return out;
}

struct process_result {
    int status = -1; // exit code, or 128+signal
    std::string out; // stdout (empty when hashed)
    std::string err; // stderr
    std::string out_sha256;
    std::uint64_t out_bytes = 0;
    long max_rss_kib = 0; // peak RSS of the child itself (VmHWM)
    double seconds = 0;
    bool timed_out = false;
};

/// A process result for a failed check's message: status, then the
/// beginning of stdout and stderr.
inline std::string describe(const process_result& r) {
    return "status " + std::to_string(r.status) + (r.timed_out ? " (test limit hit)" : "") +
           "\nstdout: " + r.out.substr(0, 2000) + "\nstderr: " + r.err.substr(0, 4000);
}

inline bool contains(const std::string& haystack, const std::string& needle) {
    return haystack.find(needle) != std::string::npos;
}

/// Run argv with `input` on stdin (closed at its end), collecting stdout
/// (or only hashing it), stderr; SIGKILL after `limit`.
inline process_result run_process(const std::vector<std::string>& argv, const std::string& input,
                                  std::chrono::seconds limit, bool hash_stdout = false,
                                  const std::function<void(pid_t)>& started = {}) {
    int in[2], out[2], err[2];
    if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC) || ::pipe2(err, O_CLOEXEC))
        throw std::runtime_error("pipe");
    const auto start = std::chrono::steady_clock::now();
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(in[0], 0);
        ::dup2(out[1], 1);
        ::dup2(err[1], 2);
        std::vector<char*> args;
        for (auto& a : argv)
            args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execvp(args[0], args.data());
        ::_exit(127);
    }
    if (started) started(pid);
    ::close(in[0]);
    ::close(out[1]);
    ::close(err[1]);
    process_result r;
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    std::size_t written = 0;
    int stdin_fd = in[1];
    // Non-blocking: a blocking write of the rest would wait for the child to
    // read all of it while the child waits for us to read its stdout.
    ::fcntl(stdin_fd, F_SETFL, ::fcntl(stdin_fd, F_GETFL) | O_NONBLOCK);
    if (input.empty()) {
        ::close(stdin_fd);
        stdin_fd = -1;
    }
    bool out_open = true, err_open = true;
    std::vector<char> buffer(1 << 16);
    // Peak RSS of the child alone (VmHWM), sampled while it runs: wait4's
    // ru_maxrss would include its own children (QEMU and the guest's RAM).
    auto sample_rss = [&] {
        std::FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/status").c_str(), "r");
        if (!f) return;
        char line[256];
        while (std::fgets(line, sizeof line, f)) {
            long kib = 0;
            if (std::sscanf(line, "VmHWM: %ld kB", &kib) == 1 && kib > r.max_rss_kib)
                r.max_rss_kib = kib;
        }
        std::fclose(f);
    };
    auto last_sample = std::chrono::steady_clock::now();
    while (out_open || err_open) {
        if (std::chrono::steady_clock::now() - last_sample > std::chrono::milliseconds(50)) {
            sample_rss();
            last_sample = std::chrono::steady_clock::now();
        }
        const auto left = limit - (std::chrono::steady_clock::now() - start);
        if (left <= std::chrono::seconds(0)) {
            r.timed_out = true;
            // SIGTERM first so the CLI stops its QEMU; SIGKILL if it does not exit.
            ::kill(pid, SIGTERM);
            for (int i = 0; i < 50; ++i) {
                siginfo_t info{};
                if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) ==
                        0 &&
                    info.si_pid == pid)
                    break; // exited; reaped below
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
            }
            ::kill(pid, SIGKILL);
            break;
        }
        pollfd fds[3] = {{out_open ? out[0] : -1, POLLIN, 0},
                         {err_open ? err[0] : -1, POLLIN, 0},
                         {stdin_fd, POLLOUT, 0}};
        const auto wait_ms =
            std::min<long>(50, std::chrono::duration_cast<std::chrono::milliseconds>(left).count());
        ::poll(fds, 3, static_cast<int>(wait_ms));
        for (int i = 0; i < 2; ++i) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            const ssize_t n = ::read(fds[i].fd, buffer.data(), buffer.size());
            if (n <= 0) {
                (i == 0 ? out_open : err_open) = false;
                continue;
            }
            if (i == 1) {
                r.err.append(buffer.data(), static_cast<std::size_t>(n));
            } else {
                r.out_bytes += static_cast<std::uint64_t>(n);
                if (hash_stdout)
                    EVP_DigestUpdate(ctx, buffer.data(), static_cast<std::size_t>(n));
                else
                    r.out.append(buffer.data(), static_cast<std::size_t>(n));
            }
        }
        if (stdin_fd >= 0 && (fds[2].revents & (POLLOUT | POLLERR | POLLHUP))) {
            const ssize_t n = ::write(stdin_fd, input.data() + written, input.size() - written);
            if (n > 0) written += static_cast<std::size_t>(n);
            if ((n < 0 && errno != EAGAIN) || written == input.size()) {
                ::close(stdin_fd);
                stdin_fd = -1;
            }
        }
    }
    if (stdin_fd >= 0) ::close(stdin_fd);
    ::close(out[0]);
    ::close(err[0]);
    int status = 0;
    rusage usage{};
    sample_rss(); // a zombie has no VmHWM any more; the last sample stands
    ::wait4(pid, &status, 0, &usage);
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.out_sha256 = sha256_hex(ctx);
    EVP_MD_CTX_free(ctx);
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return r;
}

/// What every CLI-driven VM test needs: the built CLI and agent, QEMU, the
/// guest kernel (pinned with SUPERMACHINE_KERNEL_DIR, so a test's own
/// XDG_CACHE_HOME does not hide it) and a work directory removed at the end.
/// The constructor skips when the host cannot.
struct cli_vm_environment {
    fs::path source_dir, binary_dir, cli, work;

    explicit cli_vm_environment(const std::string& work_prefix) {
        const char* source = std::getenv("SUPERMACHINE_SOURCE_DIR");
        const char* binary = std::getenv("SUPERMACHINE_BINARY_DIR");
        skip_unless(source && binary,
                    "SUPERMACHINE_SOURCE_DIR/BINARY_DIR not set (run through ctest)");
        skip_unless(have_qemu(), "qemu-system-x86_64 not installed");
        source_dir = source;
        binary_dir = binary;
        cli = binary_dir / "bin" / "supermachine";
        skip_unless(fs::exists(cli) && fs::exists(binary_dir / "bin" / "supermachine-agent"),
                    "build supermachine_cli and supermachine-agent first");
        auto kernel = boot::default_kernel();
        if (!kernel)
            kernel = boot::fetch_default_kernel(source_dir / "scripts" / "fetch-kernel.sh");
        skip_unless(kernel.has_value(),
                    "guest kernel not cached and scripts/fetch-kernel.sh failed");
        ::setenv("SUPERMACHINE_KERNEL_DIR", kernel.value().root.c_str(), 1);
        ::setenv("SUPERMACHINE_AGENT", (binary_dir / "bin" / "supermachine-agent").c_str(), 1);

        std::string pattern = (fs::temp_directory_path() / (work_prefix + "-XXXXXX")).string();
        if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp");
        work = pattern;
    }
    ~cli_vm_environment() {
        std::error_code ec;
        fs::remove_all(work, ec);
    }
    cli_vm_environment(const cli_vm_environment&) = delete;
    cli_vm_environment& operator=(const cli_vm_environment&) = delete;
};

/// Everything a VM test of `run` needs: the above and a busybox OCI image.
struct vm_environment : cli_vm_environment {
    fs::path image_dir;
    std::string image; // oci:DIR:busybox

    vm_environment()
        : cli_vm_environment("sm-vmtests") {
        ::setenv("XDG_CACHE_HOME", (work / "cache").c_str(), 1);
        image_dir = work / "image";
        const auto made =
            std::system((shell_quote((source_dir / "scripts" / "make-demo-image.sh").string()) +
                         " " + shell_quote(image_dir.string()) + " busybox >/dev/null 2>&1")
                            .c_str());
        skip_unless(made == 0, "scripts/make-demo-image.sh failed (umoci, busybox-static?)");
        image = "oci:" + image_dir.string() + ":busybox";
    }

    /// `supermachine run -q OPTIONS... IMAGE CMD...`
    process_result run(const std::vector<std::string>& options,
                       const std::vector<std::string>& command, const std::string& input = "",
                       std::chrono::seconds limit = std::chrono::seconds(200),
                       bool hash_stdout = false, const std::string& image_override = "",
                       const std::function<void(pid_t)>& started = {}) const {
        std::vector<std::string> argv = {cli.string(), "run", "-q"};
        argv.insert(argv.end(), options.begin(), options.end());
        argv.push_back(image_override.empty() ? image : image_override);
        argv.insert(argv.end(), command.begin(), command.end());
        return run_process(argv, input, limit, hash_stdout, started);
    }
};

} // namespace supermachine::test
