// Restore benchmark: the conformance guest counting (conformance.mode=count,
// 8 MiB working set) is snapshotted once per configuration, then restored
// N times; we time process start -> first console line.
//
//   supermachine: `supermachine boot --snapshot-after-ms --snapshot-to F`,
//                 then `supermachine restore F` (256 MiB and 2 GiB guests);
//                 and in-process: read_snapshot + basic_machine::restore, and
//                 restore -> first console line.
//   QEMU:         the same guest ELF (PVH) on `-M microvm -enable-kvm`,
//                 saved with HMP `migrate "exec:cat > F"` over a monitor
//                 socket, restored with `-incoming "exec:cat F"`.
//
//   snapmachine_bench [--runs N]
#include <supermachine/backend/kvm.hpp>
#include <supermachine/devices/acpi_power.hpp>
#include <supermachine/devices/i8042.hpp>
#include <supermachine/devices/serial.hpp>
#include <supermachine/machine.hpp>
#include <supermachine/snapshot/file_store.hpp>

#include <boost/asio/io_context.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../support/qemu_peer.hpp"
#include "../support/statistics.hpp"

namespace sm = supermachine;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

using supermachine::bench::median;

namespace {

std::string binary_dir() {
    const char* d = std::getenv("SUPERMACHINE_BINARY_DIR");
    return d ? d : "build";
}

double ms_since(clock_type::time_point t) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t).count();
}

struct child {
    pid_t pid = -1;
    int out = -1;
};

child spawn(const std::vector<std::string>& argv) {
    int out[2];
    if (::pipe2(out, O_CLOEXEC)) std::abort();
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(out[1], 1);
        const int null = ::open("/dev/null", O_RDWR);
        ::dup2(null, 0);
        ::dup2(null, 2);
        std::vector<char*> args;
        for (auto& a : argv)
            args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        ::execv(args[0], args.data());
        ::_exit(127);
    }
    ::close(out[1]);
    return {pid, out[0]};
}

// Read the child's stdout until `needle` appears (or timeout); returns ms or -1.
double wait_for_output(const child& c, clock_type::time_point start, const std::string& needle,
                       std::string* seen_out = nullptr, int timeout_ms = 60000) {
    std::string seen;
    char buf[4096];
    while (ms_since(start) < timeout_ms) {
        pollfd p{c.out, POLLIN, 0};
        if (::poll(&p, 1, 50) <= 0) continue;
        const ssize_t n = ::read(c.out, buf, sizeof buf);
        if (n <= 0) break;
        seen.append(buf, static_cast<std::size_t>(n));
        if (seen.find(needle) != std::string::npos) {
            const double t = ms_since(start);
            if (seen_out) *seen_out = seen;
            return t;
        }
    }
    if (seen_out) *seen_out = seen;
    return -1;
}

void finish(child& c) {
    ::kill(c.pid, SIGKILL);
    ::close(c.out);
    int status;
    ::waitpid(c.pid, &status, 0);
}

const std::string count_cmdline = "console=ttyS0 conformance.mode=count conformance.every=200 "
                                  "conformance.touch_mib=8";

// ---- supermachine ----

bool snapshot_ours(const std::string& file, unsigned mib) {
    fs::remove(file);
    const std::string cli = binary_dir() + "/bin/supermachine";
    auto c = spawn({cli, "boot", "--kernel", binary_dir() + "/guest/conformance.elf", "--memory",
                    std::to_string(mib), "--cmdline", count_cmdline, "--snapshot-after-ms", "4000",
                    "--snapshot-to", file});
    std::string seen;
    wait_for_output(c, clock_type::now(), "\x01never", &seen, 30000);
    int status;
    ::close(c.out);
    ::waitpid(c.pid, &status, 0);
    return fs::exists(file) && seen.find("count=") != std::string::npos;
}

double restore_ours_cli(const std::string& file) {
    const auto start = clock_type::now();
    auto c = spawn({binary_dir() + "/bin/supermachine", "restore", file});
    const double t = wait_for_output(c, start, "\n");
    finish(c);
    return t;
}

using machine = sm::basic_machine<sm::backend::kvm, sm::devices::serial, sm::devices::i8042,
                                  sm::devices::acpi_power>;

// In-process: read_snapshot + restore, and start -> first complete line.
std::pair<double, double> restore_ours_library(const std::string& file, unsigned mib) {
    boost::asio::io_context io;
    std::mutex mutex;
    std::condition_variable cv;
    bool line = false;
    machine::config cfg;
    cfg.memory_mib = mib;
    std::get<sm::devices::serial::config>(cfg.devices).sink = [&](std::string_view s) {
        if (s.find('\n') == std::string_view::npos) return;
        std::lock_guard lock(mutex);
        line = true;
        cv.notify_all();
    };
    const auto start = clock_type::now();
    auto loaded = sm::snapshot::read_snapshot(file);
    if (!loaded) return {-1, -1};
    auto vm = machine::restore(io.get_executor(), cfg, std::move(loaded).value());
    if (!vm) return {-1, -1};
    const double restored = ms_since(start);
    (void)vm.value()->start();
    std::unique_lock lock(mutex);
    cv.wait_for(lock, std::chrono::seconds(30), [&] { return line; });
    const double first = line ? ms_since(start) : -1;
    lock.unlock();
    vm.value()->stop();
    vm.value()->wait();
    return {restored, first};
}

// ---- QEMU ----

std::vector<std::string> qemu_argv(unsigned mib, const std::string& monitor) {
    auto a = supermachine::bench::qemu_microvm_kvm_argv(binary_dir() + "/guest/conformance.elf",
                                                        count_cmdline, mib);
    if (!monitor.empty()) {
        a.push_back("-monitor");
        a.push_back("unix:" + monitor + ",server,nowait");
    }
    return a;
}

int connect_unix(const std::string& path) {
    for (int i = 0; i < 200; ++i) {
        const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
        if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
        ::close(fd);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
}

std::string hmp(int fd, const std::string& command) {
    [[maybe_unused]] auto n = ::write(fd, command.data(), command.size());
    std::string reply;
    char buf[4096];
    for (;;) { // until the next prompt
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 5000) <= 0) break;
        const ssize_t r = ::read(fd, buf, sizeof buf);
        if (r <= 0) break;
        reply.append(buf, static_cast<std::size_t>(r));
        if (reply.size() >= 7 && reply.rfind("(qemu) ") == reply.size() - 7 &&
            reply.find(command.substr(0, command.size() - 1)) != std::string::npos)
            break;
    }
    return reply;
}

bool snapshot_qemu(const std::string& file, unsigned mib, const std::string& monitor) {
    fs::remove(file);
    fs::remove(monitor);
    auto c = spawn(qemu_argv(mib, monitor));
    std::string seen;
    if (wait_for_output(c, clock_type::now(), "count=3", &seen, 30000) < 0) {
        finish(c);
        return false;
    }
    // Keep draining the console so the guest never blocks on it.
    std::thread drain([fd = c.out] {
        char buf[4096];
        while (::read(fd, buf, sizeof buf) > 0) {
        }
    });
    const int mon = connect_unix(monitor);
    hmp(mon, "");
    hmp(mon, "migrate \"exec:cat > " + file + "\"\n");
    for (int i = 0; i < 600; ++i) {
        if (hmp(mon, "info migrate\n").find("Migration status: completed") != std::string::npos)
            break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    hmp(mon, "quit\n");
    ::close(mon);
    int status;
    ::waitpid(c.pid, &status, 0);
    drain.join();
    ::close(c.out);
    return fs::exists(file) && fs::file_size(file) > 0;
}

double restore_qemu(const std::string& file, unsigned mib) {
    auto argv = qemu_argv(mib, "");
    argv.push_back("-incoming");
    argv.push_back("exec:cat " + file);
    const auto start = clock_type::now();
    auto c = spawn(argv);
    const double t = wait_for_output(c, start, "\n");
    finish(c);
    return t;
}

std::uint64_t allocated_kib(const std::string& file) {
    struct stat st {};
    if (::stat(file.c_str(), &st) != 0) return 0;
    return static_cast<std::uint64_t>(st.st_blocks) / 2;
}

} // namespace

int main(int argc, char** argv) {
    unsigned runs = 11;
    for (int i = 1; i + 1 < argc; i += 2)
        if (!std::strcmp(argv[i], "--runs"))
            runs = static_cast<unsigned>(std::max(1, std::atoi(argv[i + 1])));
    const fs::path dir =
        fs::temp_directory_path() / ("snapmachine-bench-" + std::to_string(::getpid()));
    fs::create_directories(dir);

    struct row {
        std::string what;
        double first_line = -1, library_restore = -1, library_first = -1;
        std::uint64_t file_kib = 0, allocated = 0;
    };
    std::vector<row> rows;
    for (unsigned mib : {256u, 2048u}) {
        const std::string file = (dir / ("ours-" + std::to_string(mib) + ".snap")).string();
        row r{"supermachine restore, " + std::to_string(mib) + " MiB"};
        if (!snapshot_ours(file, mib)) {
            std::fprintf(stderr, "snapshot of the %u MiB guest failed\n", mib);
            return 1;
        }
        r.file_kib = fs::file_size(file) / 1024;
        r.allocated = allocated_kib(file);
        std::vector<double> cli, lib_restore, lib_first;
        for (unsigned i = 0; i < runs; ++i) {
            cli.push_back(restore_ours_cli(file));
            auto [a, b] = restore_ours_library(file, mib);
            lib_restore.push_back(a);
            lib_first.push_back(b);
        }
        r.first_line = median(cli);
        r.library_restore = median(lib_restore);
        r.library_first = median(lib_first);
        rows.push_back(r);
    }
    for (unsigned mib : {256u, 2048u}) {
        const std::string file = (dir / ("qemu-" + std::to_string(mib) + ".mig")).string();
        row r{"qemu -incoming exec:cat, " + std::to_string(mib) + " MiB"};
        if (!snapshot_qemu(file, mib, (dir / "monitor.sock").string())) {
            std::fprintf(stderr, "QEMU migration of the %u MiB guest failed\n", mib);
            continue;
        }
        r.file_kib = fs::file_size(file) / 1024;
        r.allocated = allocated_kib(file);
        std::vector<double> times;
        for (unsigned i = 0; i < runs; ++i)
            times.push_back(restore_qemu(file, mib));
        r.first_line = median(times);
        rows.push_back(r);
    }
    std::printf("conformance guest, count mode, 8 MiB working set; medians of %u runs\n\n", runs);
    std::printf("| restore | process start -> first console line | in-process read_snapshot + "
                "restore | in-process -> first line | file size | allocated |\n"
                "|---|---|---|---|---|---|\n");
    for (const auto& r : rows) {
        std::printf("| %s | %.1f ms | ", r.what.c_str(), r.first_line);
        if (r.library_restore >= 0)
            std::printf("%.2f ms | %.1f ms | ", r.library_restore, r.library_first);
        else
            std::printf("- | - | ");
        std::printf("%llu KiB | %llu KiB |\n", static_cast<unsigned long long>(r.file_kib),
                    static_cast<unsigned long long>(r.allocated));
    }
    fs::remove_all(dir);
    return 0;
}
