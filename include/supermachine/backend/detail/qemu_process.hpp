#pragma once
// A child process (QEMU) with its stdout and stderr on pipes and a pidfd, so
// its output and its exit are awaited with Asio like any other descriptor.
// The child dies with this process (PR_SET_PDEATHSIG from a dedicated
// thread: child_spawner says why).
#include <supermachine/error.hpp>

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <functional>
#include <future>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace supermachine::backend::detail {

/// Wait for a killed child off the caller's thread: dropping a vm must not
/// block its io thread until QEMU has exited (measured: 119 ms each). One
/// thread for the process; a SIGKILLed child is reaped within milliseconds.
inline void reap_in_background(pid_t pid) {
    struct reaper {
        std::mutex mutex;
        std::condition_variable wake;
        std::deque<pid_t> pids;
        reaper() {
            std::thread([this] {
                for (;;) {
                    std::unique_lock lock(mutex);
                    wake.wait(lock, [this] { return !pids.empty(); });
                    const pid_t next = pids.front();
                    pids.pop_front();
                    lock.unlock();
                    while (::waitpid(next, nullptr, 0) < 0 && errno == EINTR) {
                    }
                }
            }).detach(); // lives as long as the process; never joined at exit
        }
    };
    static reaper* const shared = new reaper; // never destroyed: no join at exit
    {
        std::lock_guard lock(shared->mutex);
        shared->pids.push_back(pid);
    }
    shared->wake.notify_one();
}

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

/// Starts children from one thread that lives as long as the process.
///
/// Why: a child must not outlive us (a SIGKILLed or crashed supermachine
/// would leave QEMU running with nobody to stop it). The child asks for
/// SIGKILL when its parent dies (PR_SET_PDEATHSIG), but Linux sends that
/// signal when the *thread* that created it exits, not the process: a child
/// started from an Asio pool thread would be killed when that thread ends.
/// So every child is started here, on a thread that never returns; it ends
/// only with the process, and then the children get SIGKILL.
class child_spawner {
public:
    /// This process's spawner (after a fork(), the child process gets its own:
    /// threads are not copied by fork).
    static child_spawner& instance() {
        static std::mutex mutex;
        static child_spawner* current = nullptr;
        static pid_t owner = 0;
        std::lock_guard lock(mutex);
        if (!current || owner != ::getpid()) {
            current = new child_spawner(); // never deleted: the thread outlives static destructors
            owner = ::getpid();
        }
        return *current;
    }

    /// Run `job` on the spawner thread; returns its result.
    template <class T>
    T run(std::function<T()> job) {
        std::packaged_task<T()> task(std::move(job));
        auto done = task.get_future();
        {
            std::lock_guard lock(mutex_);
            jobs_.emplace_back([&task] { task(); });
        }
        wake_.notify_one();
        return done.get(); // `task` lives on this stack until the job ran
    }

private:
    child_spawner() {
        // Created with every signal blocked (inherited by the thread), so the
        // process's signals are delivered to other threads, never to this one.
        sigset_t all, old;
        ::sigfillset(&all);
        ::pthread_sigmask(SIG_SETMASK, &all, &old);
        std::thread([this] { serve(); }).detach();
        ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    }

    [[noreturn]] void serve() {
        for (;;) {
            std::function<void()> job;
            {
                std::unique_lock lock(mutex_);
                wake_.wait(lock, [this] { return !jobs_.empty(); });
                job = std::move(jobs_.front());
                jobs_.pop_front();
            }
            job();
        }
    }

    std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<std::function<void()>> jobs_;
};

/// The descriptor numbers a spawned child finds its `inherited` fds at:
/// inherited[i] becomes fd inherited_fd + i.
inline constexpr int inherited_fd = 4;
inline constexpr int max_inherited = 3;
/// fd[i] (-1: none) becomes the child's inherited_fd + i. A brace list
/// shorter than max_inherited leaves the rest -1 (a std::array would leave
/// them 0: the caller's stdin passed on unasked).
struct inherited_fds {
    static_assert(max_inherited == 3, "one -1 per slot below");
    int fd[max_inherited] = {-1, -1, -1};
    constexpr inherited_fds() = default;
    constexpr inherited_fds(std::initializer_list<int> fds) {
        int i = 0;
        for (int f : fds)
            if (i < max_inherited) fd[i++] = f;
    }
    constexpr int& operator[](int i) noexcept { return fd[i]; }
    constexpr int operator[](int i) const noexcept { return fd[i]; }
};

/// What the child of clone_exec needs, all made before the clone: the
/// child shares our memory until it execs and must not allocate.
struct child_plan {
    char* const* argv;
    char* const* env;
    int out_write, err_write;
    int report_write;        // the child's exec failure (errno); EOF when exec succeeded
    inherited_fds inherited; // become the child's fds 4, 5, 6 (not close-on-exec)
    pid_t parent;
};

/// In the child: tell the parent why exec failed, and leave.
[[noreturn]] inline void child_failed(int report_fd, int error) noexcept {
    [[maybe_unused]] auto ignored = ::write(report_fd, &error, sizeof error);
    ::_exit(127);
}

/// The child of clone_exec, on its own stack in our memory (CLONE_VM): only
/// system calls until execve, nothing that takes a lock another thread may
/// hold (malloc's, stdio's).
inline int child_main(void* opaque) noexcept {
    const auto& plan = *static_cast<const child_plan*>(opaque);
    // First out of the way of 0-5 (any may sit there and would be
    // overwritten by the moves below), then into place.
    constexpr int above = inherited_fd + max_inherited;
    int report_fd = ::fcntl(plan.report_write, F_DUPFD_CLOEXEC, above);
    if (report_fd < 0) child_failed(plan.report_write, errno);
    inherited_fds inherited;
    for (int i = 0; i < max_inherited; ++i) {
        if (plan.inherited[i] < 0) continue;
        inherited[i] = ::fcntl(plan.inherited[i], F_DUPFD_CLOEXEC, above);
        if (inherited[i] < 0) child_failed(report_fd, errno);
    }
    const int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || ::dup2(null, 0) < 0 || ::dup2(plan.out_write, 1) < 0 ||
        ::dup2(plan.err_write, 2) < 0)
        child_failed(report_fd, errno);
    // The report pipe becomes fd 3 (close-on-exec), the inherited ones fds
    // 4, 5 and 6 (dup2 clears close-on-exec); every other fd goes: Asio opens
    // sockets without CLOEXEC, and QEMU must not hold our listening and
    // vhost-user sockets open.
    if (::dup3(report_fd, 3, O_CLOEXEC) < 0) child_failed(report_fd, errno);
    report_fd = 3;
    int first_closed = inherited_fd;
    for (int i = 0; i < max_inherited; ++i) {
        if (inherited[i] >= 0 && ::dup2(inherited[i], inherited_fd + i) < 0)
            child_failed(report_fd, errno);
        if (inherited[i] >= 0) first_closed = inherited_fd + i + 1;
    }
    // A gap (only the second given): its slot must not keep what sat there.
    for (int i = 0; i < max_inherited; ++i)
        if (inherited[i] < 0 && inherited_fd + i < first_closed) ::close(inherited_fd + i);
    if (::close_range(first_closed, ~0u, 0) != 0)
        for (int fd = first_closed; fd < 65536; ++fd)
            ::close(fd);
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) child_failed(report_fd, errno);
    // Our process may have died between clone and prctl: then no signal comes.
    if (::getppid() != plan.parent) ::_exit(127);
    // Signals we handle go back to their defaults before they are unblocked
    // (a handler of ours must never run in the child, least of all in our
    // memory); ignored ones stay ignored, as posix_spawn would leave them.
    for (int signo = 1; signo < NSIG; ++signo) {
        struct sigaction action {};
        if (::sigaction(signo, nullptr, &action) != 0) continue;
        if (action.sa_handler != SIG_IGN && action.sa_handler != SIG_DFL) {
            action = {};
            action.sa_handler = SIG_DFL;
            ::sigaction(signo, &action, nullptr);
        }
    }
    sigset_t none;
    ::sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(plan.argv[0], plan.argv, plan.env);
    child_failed(report_fd, errno);
}

/// clone(CLONE_VM | CLONE_VFORK) + exec on the spawner thread (see
/// child_spawner): what posix_spawn does, plus PR_SET_PDEATHSIG. A fork
/// would copy our page tables and then copy-on-write every page our other
/// threads touch while QEMU starts: measured ≈ 5 ms per QEMU start here.
inline result<child_process> clone_exec(const std::vector<std::string>& argv, int out_write,
                                        int err_write, inherited_fds inherited) {
    std::vector<char*> args;
    for (const auto& a : argv)
        args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    int report[2];
    if (::pipe2(report, O_CLOEXEC) != 0) return errno_code(errno);
    const child_plan plan{args.data(), environ,   out_write, err_write,
                          report[1],   inherited, ::getpid()};
    constexpr std::size_t stack_size = 64 * 1024;
    auto stack = std::make_unique<std::byte[]>(stack_size);
    // No signal may reach the child before it resets the handlers: block all
    // (on this thread, whose mask the child inherits) across the clone.
    sigset_t all, previous;
    ::sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &previous);
    // Returns once the child has exec'd or exited (CLONE_VFORK).
    const pid_t pid = ::clone(&child_main, stack.get() + stack_size,
                              CLONE_VM | CLONE_VFORK | SIGCHLD, const_cast<child_plan*>(&plan));
    const int clone_errno = errno;
    ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    ::close(report[1]);
    if (pid < 0) {
        ::close(report[0]);
        return errno_code(clone_errno);
    }
    int error = 0;
    ssize_t n;
    do
        n = ::read(report[0], &error, sizeof error);
    while (n < 0 && errno == EINTR);
    ::close(report[0]);
    if (n > 0) {
        ::waitpid(pid, nullptr, 0);
        return errno_code(error ? error : EIO);
    }
    child_process c;
    c.pid = pid;
    return c;
}

/// Spawn `argv` (argv[0] a path) with stdin from /dev/null and stdout/stderr
/// on fresh pipes. The child gets no other of our fds but `inherited` (as
/// fds inherited_fd + i, those >= 0), and is SIGKILLed by the kernel when
/// this process dies (however it dies; see child_spawner).
inline result<child_process> spawn(const std::vector<std::string>& argv,
                                   inherited_fds inherited = {}) {
    if (argv.empty()) return errc::invalid_argument;
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return errno_code(errno);
    if (::pipe2(err, O_CLOEXEC) != 0) {
        int e = errno;
        ::close(out[0]);
        ::close(out[1]);
        return errno_code(e);
    }
    auto started = child_spawner::instance().run<result<child_process>>(
        [&] { return clone_exec(argv, out[1], err[1], inherited); });
    ::close(out[1]);
    ::close(err[1]);
    if (!started) {
        ::close(out[0]);
        ::close(err[0]);
        return started.error();
    }
    child_process c = started.value();
    c.pidfd = static_cast<int>(::syscall(SYS_pidfd_open, c.pid, 0));
    c.stdout_read = out[0];
    c.stderr_read = err[0];
    if (c.pidfd < 0) {
        const int e = errno;
        ::kill(c.pid, SIGKILL);
        ::waitpid(c.pid, nullptr, 0);
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
