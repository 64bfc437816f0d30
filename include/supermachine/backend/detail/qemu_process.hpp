#pragma once
// A child process (QEMU) with its stdout and stderr on pipes and a pidfd, so
// its output and its exit are awaited with Asio like any other descriptor.
#include <supermachine/error.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

extern char** environ;

namespace supermachine::backend::detail {

/// PATH lookup of an executable name (names with a '/' are taken as paths).
inline std::optional<std::filesystem::path> find_program(const std::string& name) {
    if (name.find('/') != std::string::npos)
        return ::access(name.c_str(), X_OK) == 0 ? std::optional<std::filesystem::path>(name)
                                                 : std::nullopt;
    const char* path = std::getenv("PATH");
    std::string all = path ? path : "/usr/local/bin:/usr/bin:/bin";
    std::size_t start = 0;
    while (start <= all.size()) {
        const std::size_t end = std::min(all.find(':', start), all.size());
        std::filesystem::path candidate =
            std::filesystem::path(all.substr(start, end - start)) / name;
        if (end > start && ::access(candidate.c_str(), X_OK) == 0) return candidate;
        start = end + 1;
    }
    return std::nullopt;
}

struct child_process {
    pid_t pid = -1;
    int pidfd = -1;
    int stdout_read = -1; // the child's stdout (QEMU: the serial console)
    int stderr_read = -1;
};

/// Spawn `argv` (argv[0] a path) with stdin from /dev/null and stdout/stderr
/// on fresh pipes. The child gets no other of our fds.
inline result<child_process> spawn(const std::vector<std::string>& argv) {
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return errno_code(errno);
    if (::pipe2(err, O_CLOEXEC) != 0) {
        int e = errno;
        ::close(out[0]);
        ::close(out[1]);
        return errno_code(e);
    }
    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    ::posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    ::posix_spawn_file_actions_adddup2(&actions, err[1], 2);
    // Asio opens sockets without CLOEXEC: close everything else in the child,
    // or QEMU would hold our listening and vhost-user sockets open.
    ::posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    std::vector<char*> args;
    for (const auto& a : argv)
        args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
    ::posix_spawn_file_actions_destroy(&actions);
    ::close(out[1]);
    ::close(err[1]);
    if (rc != 0) {
        ::close(out[0]);
        ::close(err[0]);
        return errno_code(rc);
    }
    child_process c;
    c.pid = pid;
    c.pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    c.stdout_read = out[0];
    c.stderr_read = err[0];
    if (c.pidfd < 0) {
        const int e = errno;
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
        ::close(out[0]);
        ::close(err[0]);
        return errno_code(e);
    }
    return c;
}

/// Run a program to completion and return its stdout (bounded), e.g. `qemu -device help`.
inline result<std::string> capture_output(const std::vector<std::string>& argv,
                                          std::size_t limit = 1 << 20) {
    SUPERMACHINE_TRY(child, spawn(argv));
    std::string output;
    char buffer[4096];
    for (;;) {
        const ssize_t n = ::read(child.stdout_read, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (output.size() < limit) output.append(buffer, static_cast<std::size_t>(n));
    }
    ::close(child.stdout_read);
    ::close(child.stderr_read);
    int status = 0;
    ::waitpid(child.pid, &status, 0);
    ::close(child.pidfd);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return errc::engine_failed;
    return output;
}

} // namespace supermachine::backend::detail
