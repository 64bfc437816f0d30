// backend::detail::spawn (how QEMU is started): a child dies with the
// process that spawned it, however that process dies, and does not die when
// the thread that asked for it ends (PR_SET_PDEATHSIG follows the creating
// thread, so spawn starts it from a dedicated thread). Real processes: sleep(1).
#include <supermachine/backend/detail/qemu_process.hpp>

#include <boost/test/unit_test.hpp>

#include <sys/prctl.h>
#include <sys/wait.h>

#include <chrono>
#include <thread>

namespace detail = supermachine::backend::detail;
using namespace std::chrono_literals;

namespace {

std::string sleep_path() {
    auto path = detail::find_program("sleep");
    BOOST_TEST_REQUIRE(path.has_value());
    return path->string();
}

// Whether `pid` (our child, or adopted as subreaper) has exited within `limit`; reaps it.
bool exits_within(pid_t pid, std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    do {
        const pid_t r = ::waitpid(pid, nullptr, WNOHANG);
        if (r == pid) return true;
        if (r < 0) return ::kill(pid, 0) != 0; // not ours: gone when it cannot be signalled
        std::this_thread::sleep_for(20ms);
    } while (std::chrono::steady_clock::now() < deadline);
    return false;
}

} // namespace

BOOST_AUTO_TEST_CASE(child_outlives_the_thread_that_asked_for_it) {
    detail::child_process child;
    const auto program = sleep_path();
    std::thread([&] {
        if (auto started = detail::spawn({program, "600"})) child = started.value();
    }).join();
    BOOST_TEST_REQUIRE(child.pid > 0);
    // The asking thread is gone; a PDEATHSIG tied to it would have fired by now.
    BOOST_TEST(!exits_within(child.pid, 1500ms), "the child died with the thread that spawned it");
    ::kill(child.pid, SIGKILL);
    BOOST_TEST(exits_within(child.pid, 5000ms));
    ::close(child.pidfd);
    ::close(child.stdout_read);
    ::close(child.stderr_read);
}

BOOST_AUTO_TEST_CASE(child_dies_with_a_sigkilled_parent) {
    // A helper process spawns `sleep 600`, tells us its pid, and is SIGKILLed;
    // as subreaper we adopt the orphan and can see whether it exits.
    ::prctl(PR_SET_CHILD_SUBREAPER, 1);
    int report[2];
    BOOST_TEST_REQUIRE(::pipe(report) == 0);
    const auto program = sleep_path();
    std::fflush(nullptr);
    const pid_t helper = ::fork();
    if (helper == 0) {
        ::close(report[0]);
        // In a fresh process: the spawner must start its own thread here.
        auto started = detail::spawn({program, "600"});
        const pid_t pid = started ? started.value().pid : -1;
        [[maybe_unused]] auto n = ::write(report[1], &pid, sizeof pid);
        ::pause();
        ::_exit(0);
    }
    ::close(report[1]);
    pid_t grandchild = -1;
    BOOST_TEST_REQUIRE(::read(report[0], &grandchild, sizeof grandchild) ==
                       static_cast<ssize_t>(sizeof grandchild));
    ::close(report[0]);
    BOOST_TEST_REQUIRE(grandchild > 0);
    BOOST_TEST(::kill(grandchild, 0) == 0); // running
    ::kill(helper, SIGKILL);
    ::waitpid(helper, nullptr, 0);
    const bool gone = exits_within(grandchild, 3000ms);
    BOOST_TEST(gone, "the spawned child outlived its SIGKILLed parent");
    if (!gone) {
        ::kill(grandchild, SIGKILL);
        ::waitpid(grandchild, nullptr, 0);
    }
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}

BOOST_AUTO_TEST_CASE(exec_failure_is_an_error_and_fds_are_not_inherited) {
    auto missing = detail::spawn({"/nonexistent/program"});
    BOOST_TEST(!missing.has_value());
    if (!missing)
        BOOST_TEST((missing.error() == std::errc::no_such_file_or_directory),
                   missing.error().message());

    // An fd of ours without CLOEXEC (as Asio opens sockets) must not reach the child.
    const int opened = ::open("/dev/null", O_RDONLY);
    const int leaked = ::fcntl(opened, F_DUPFD, 100); // a number ls's own fds will not have
    ::close(opened);
    BOOST_TEST_REQUIRE(leaked >= 100);
    auto sh = detail::find_program("sh");
    BOOST_TEST_REQUIRE(sh.has_value());
    auto listed = detail::capture_output(
        {sh->string(), "-c", "ls /proc/self/fd; echo stdin=$(readlink /proc/self/fd/0)"});
    ::close(leaked);
    BOOST_TEST_REQUIRE(listed.has_value());
    BOOST_TEST(listed.value().find("\n" + std::to_string(leaked) + "\n") == std::string::npos,
               listed.value());
    BOOST_TEST(listed.value().find("stdin=/dev/null") != std::string::npos, listed.value());
}

// The fds a child may get (QEMU's incoming stream, a restore's monitor)
// arrive as fds 4 and 5 and nothing else of ours does, wherever they were:
// also when one sits at fd 3, where the exec-failure report pipe is moved
// to, or at the other's target.
BOOST_AUTO_TEST_CASE(the_inherited_fds_arrive_as_fds_4_and_5_from_any_number) {
    char path[] = "/tmp/spawn-inherit-XXXXXX";
    const int file = ::mkstemp(path);
    BOOST_TEST_REQUIRE(file >= 0);
    ::unlink(path);
    const std::string text = "stream contents\n";
    BOOST_TEST_REQUIRE(::write(file, text.data(), text.size()) ==
                       static_cast<ssize_t>(text.size()));
    const auto shell = detail::find_program("sh");
    BOOST_TEST_REQUIRE(shell.has_value());
    auto read_child = [&](int inherited, int second = -1) {
        ::lseek(inherited, 0, SEEK_SET);
        auto started = detail::spawn({shell->string(), "-c",
                                      "cat <&4; [ -e /proc/self/fd/5 ] && cat <&5; ls "
                                      "/proc/self/fd | sort -n | tr '\\n' ' '"},
                                     {inherited, second});
        BOOST_TEST_REQUIRE(started.has_value());
        std::string out;
        char buffer[256];
        for (ssize_t n; (n = ::read(started.value().stdout_read, buffer, sizeof buffer)) > 0;)
            out.append(buffer, static_cast<std::size_t>(n));
        ::waitpid(started.value().pid, nullptr, 0);
        ::close(started.value().pidfd);
        ::close(started.value().stdout_read);
        ::close(started.value().stderr_read);
        return out;
    };
    // fds 0-2, the stream at 4, and the one `ls` opens to list them.
    BOOST_TEST(read_child(file) == text + "0 1 2 3 4 ");

    const int saved = ::fcntl(3, F_DUPFD_CLOEXEC, 100); // whatever the test runner keeps at 3
    BOOST_TEST_REQUIRE(::dup2(file, 3) == 3);
    BOOST_TEST(read_child(3) == text + "0 1 2 3 4 ");

    // Two: the second arrives at 5, also from where the first one goes (4)
    // and the first from where the second goes (5).
    int pair[2];
    BOOST_TEST_REQUIRE(::pipe2(pair, O_CLOEXEC) == 0);
    const std::string second = "monitor commands\n";
    BOOST_TEST_REQUIRE(::write(pair[1], second.data(), second.size()) ==
                       static_cast<ssize_t>(second.size()));
    ::close(pair[1]);
    // Both out of the way of 4 and 5 first (either may sit there now).
    const int high_pipe = ::fcntl(pair[0], F_DUPFD_CLOEXEC, 200);
    const int high_file = ::fcntl(file, F_DUPFD_CLOEXEC, 200);
    BOOST_TEST_REQUIRE((high_pipe >= 0 && high_file >= 0));
    ::close(pair[0]);
    ::close(file);
    const int saved4 = ::fcntl(4, F_DUPFD_CLOEXEC, 100);
    const int saved5 = ::fcntl(5, F_DUPFD_CLOEXEC, 100);
    BOOST_TEST_REQUIRE(::dup3(high_pipe, 4, O_CLOEXEC) == 4);
    BOOST_TEST_REQUIRE(::dup3(high_file, 5, O_CLOEXEC) == 5);
    BOOST_TEST(read_child(5, 4) == text + second + "0 1 2 3 4 5 ");
    ::close(high_pipe);
    ::close(high_file);
    for (auto [fd, was] : {std::pair{4, saved4}, std::pair{5, saved5}}) {
        if (was >= 0) {
            ::dup2(was, fd);
            ::close(was);
        } else {
            ::close(fd);
        }
    }
    if (saved >= 0) {
        ::dup2(saved, 3);
        ::close(saved);
    } else {
        ::close(3);
    }
}
