#pragma once
// Run a program with stdin text, capture stdout/stderr and the exit status,
// with a deadline: the tests drive the real `supermachine` CLI this way.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

namespace supermachine::test {

struct process_result {
    int status = -1; // exit status, or 128 + signal
    bool timed_out = false;
    std::string out, err;
    double first_line_seconds = -1; // until the first '\n' on stdout
    double seconds = 0;
};

inline process_result run_process(std::vector<std::string> argv, const std::string& input = {},
                                  std::chrono::seconds deadline = std::chrono::seconds(60),
                                  std::vector<std::string> env = {}) {
    int in[2], out[2], err[2];
    if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC) || ::pipe2(err, O_CLOEXEC)) std::abort();
    const auto start = std::chrono::steady_clock::now();
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(in[0], 0);
        ::dup2(out[1], 1);
        ::dup2(err[1], 2);
        for (auto& e : env)
            ::putenv(e.data());
        std::vector<char*> args;
        for (auto& a : argv)
            args.push_back(a.data());
        args.push_back(nullptr);
        ::execv(args[0], args.data());
        ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    ::close(err[1]);
    if (!input.empty()) {
        [[maybe_unused]] auto n = ::write(in[1], input.data(), input.size());
    }
    ::close(in[1]);
    process_result r;
    pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    int open = 2;
    auto elapsed = [&] {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    while (open > 0) {
        const double left = static_cast<double>(deadline.count()) - elapsed();
        if (left <= 0) {
            r.timed_out = true;
            ::kill(pid, SIGKILL);
            break;
        }
        if (::poll(fds, 2, static_cast<int>(left * 1000) + 1) <= 0) continue;
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP))) continue;
            char buf[4096];
            const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
            if (n <= 0) {
                ::close(fds[i].fd);
                fds[i].fd = -1;
                --open;
                continue;
            }
            std::string& to = i == 0 ? r.out : r.err;
            to.append(buf, static_cast<std::size_t>(n));
            if (i == 0 && r.first_line_seconds < 0 && r.out.find('\n') != std::string::npos)
                r.first_line_seconds = elapsed();
        }
    }
    for (auto& f : fds)
        if (f.fd >= 0) ::close(f.fd);
    int status = 0;
    ::waitpid(pid, &status, 0);
    r.seconds = elapsed();
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return r;
}

inline std::string binary_dir() {
    const char* d = std::getenv("SUPERMACHINE_BINARY_DIR");
    return d ? d : ".";
}
inline std::string cli_path() {
    return binary_dir() + "/bin/supermachine";
}
inline std::string conformance_bzimage() {
    return binary_dir() + "/guest/conformance.bzImage";
}

inline std::size_t count_lines(const std::string& s) {
    std::size_t n = 0;
    for (char c : s)
        n += c == '\n';
    return n;
}

} // namespace supermachine::test
