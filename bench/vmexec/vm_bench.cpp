// VM benchmarks on a real Linux guest (Debian cloud kernel under QEMU TCG,
// our vhost-user blk + vsock, the agent as /init), each beside a host
// baseline measured in the same run:
//
//   1. exec round trip of `true` on a running VM   vs  posix_spawn+wait of `true` on the host
//   2. guest -> host stream through the agent      vs  a host Unix socketpair stream
//      (`dd if=/dev/zero bs=1M count=N` as the exec's stdout, counted, not kept)
//   3. `supermachine run IMAGE true`, cold VM      vs  qemu-system-x86_64 with the same
//      kernel + initramfs, same machine flags, to the first userspace instruction
//      (/init replaced by busybox `reboot -f`, so it exits there)
//
//   bench_vm oci:DIR:TAG [exec_runs=200] [stream_mib=1024] [cold_runs=5]
#include <supermachine/image.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/io_context.hpp>

#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../support/statistics.hpp"

extern char** environ;

using supermachine::bench::median;

namespace {

namespace sm = supermachine;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t) {
    return std::chrono::duration<double>(clock_type::now() - t).count();
}

template <class Done>
void run_until(boost::asio::io_context& io, Done done) {
    io.restart();
    while (!done())
        io.run_one();
}

// posix_spawn + wait; returns the exit status (or -1).
int spawn_wait(std::vector<std::string> argv) {
    std::vector<char*> args;
    for (auto& a : argv)
        args.push_back(a.data());
    args.push_back(nullptr);
    pid_t pid;
    if (::posix_spawnp(&pid, args[0], nullptr, nullptr, args.data(), environ) != 0) return -1;
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Host baseline for the stream: `mib` MiB through a Unix socketpair, 1 MiB writes, 64 KiB reads.
double socketpair_mib_per_s(std::size_t mib) {
    int fds[2];
    ::socketpair(AF_UNIX, SOCK_STREAM, 0, fds);
    const auto start = clock_type::now();
    std::thread writer([&] {
        std::vector<char> block(1 << 20, 0);
        for (std::size_t i = 0; i < mib; ++i) {
            std::size_t done = 0;
            while (done < block.size()) {
                const ssize_t n = ::write(fds[0], block.data() + done, block.size() - done);
                if (n <= 0) return;
                done += static_cast<std::size_t>(n);
            }
        }
        ::close(fds[0]);
    });
    std::vector<char> buffer(64 << 10);
    std::size_t total = 0;
    for (ssize_t n; (n = ::read(fds[1], buffer.data(), buffer.size())) > 0;)
        total += static_cast<std::size_t>(n);
    writer.join();
    ::close(fds[1]);
    const double s = seconds_since(start);
    return static_cast<double>(total) / (1 << 20) / s;
}

} // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: bench_vm oci:DIR:TAG [exec_runs] [stream_mib] [cold_runs]\n");
        return 2;
    }
    const std::string image_name = argv[1];
    const int exec_runs = argc > 2 ? std::max(1, std::atoi(argv[2])) : 200;
    const std::size_t stream_mib =
        argc > 3 ? static_cast<std::size_t>(std::max(1, std::atoi(argv[3]))) : 1024;
    const int cold_runs = argc > 4 ? std::max(1, std::atoi(argv[4])) : 5;
    const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
    if (!std::getenv("SUPERMACHINE_AGENT"))
        ::setenv("SUPERMACHINE_AGENT", (bin / "supermachine-agent").c_str(), 1);

    auto ready = sm::image::from_oci(image_name).prepare();
    if (!ready) {
        std::fprintf(stderr, "bench_vm: %s: %s\n", image_name.c_str(),
                     ready.error().message().c_str());
        return 1;
    }

    // Boot one VM (image already cached: this is the warm-cache boot).
    boost::asio::io_context io;
    char runtime[] = "/tmp/sm-bench-vm-XXXXXX";
    if (!::mkdtemp(runtime)) return 1;
    sm::vm_options options;
    options.runtime_dir = runtime;
    std::shared_ptr<sm::vm> machine;
    std::optional<supermachine::error_code> started;
    auto boot_start = clock_type::now();
    sm::vm::async_start(io.get_executor(), ready.value(), options,
                        [&](supermachine::error_code ec, std::shared_ptr<sm::vm> v) {
                            started = ec;
                            machine = std::move(v);
                        });
    run_until(io, [&] { return started.has_value(); });
    const double boot_seconds = seconds_since(boot_start);
    if (*started) {
        std::fprintf(stderr, "bench_vm: VM did not start: %s\n%s", started->message().c_str(),
                     machine ? machine->console_tail().c_str() : "");
        return 1;
    }

    // 1. exec round trip, interleaved with the host floor.
    std::vector<double> vm_us, host_us;
    for (int i = 0; i < exec_runs + 5; ++i) {
        auto t = clock_type::now();
        std::optional<supermachine::error_code> done;
        int code = -1;
        machine->async_exec({.argv = {"true"}},
                            [&](supermachine::error_code ec, sm::agent::exec_output out) {
                                done = ec;
                                code = out.exit_code;
                            });
        run_until(io, [&] { return done.has_value(); });
        const double vm_t = seconds_since(t) * 1e6;
        if (*done || code != 0) {
            std::fprintf(stderr, "bench_vm: exec failed: %s\n", done->message().c_str());
            return 1;
        }
        t = clock_type::now();
        if (spawn_wait({"/bin/true"}) != 0) return 1;
        const double host_t = seconds_since(t) * 1e6;
        if (i >= 5) { // warm-up
            vm_us.push_back(vm_t);
            host_us.push_back(host_t);
        }
    }

    // 2. guest -> host stream through the agent (stdout of dd), bytes counted.
    double vm_mib_s = 0;
    std::uint64_t streamed = 0;
    {
        std::optional<supermachine::error_code> spawned;
        std::optional<sm::agent::exec_child<sm::vm::socket_type>> child;
        const auto t = clock_type::now();
        machine->async_spawn(
            {.argv = {"dd", "if=/dev/zero", "bs=1M", "count=" + std::to_string(stream_mib)}},
            [&](supermachine::error_code ec, sm::agent::exec_child<sm::vm::socket_type> c) {
                spawned = ec;
                if (!ec) child.emplace(std::move(c));
            });
        run_until(io, [&] { return spawned.has_value(); });
        if (*spawned) return 1;
        bool eof = false;
        std::function<void()> pump = [&] {
            child->async_read_stdout([&](supermachine::error_code ec, std::string data) {
                if (ec) {
                    eof = true;
                    return;
                }
                streamed += data.size();
                pump();
            });
        };
        pump();
        std::optional<sm::agent::exit_status> status;
        child->async_wait([&](supermachine::error_code, sm::agent::exit_status s) { status = s; });
        run_until(io, [&] { return eof && status.has_value(); });
        vm_mib_s = static_cast<double>(streamed) / (1 << 20) / seconds_since(t);
    }
    const double host_mib_s = socketpair_mib_per_s(stream_mib);
    std::printf("(progress) exec median %.0f us vs host %.0f us; stream %.1f MiB/s vs %.0f MiB/s\n",
                median(vm_us), median(host_us), vm_mib_s, host_mib_s);
    std::fflush(stdout);
    machine->kill();
    io.restart();
    io.run_for(std::chrono::milliseconds(200));
    machine.reset();

    // 3. cold `supermachine run IMAGE true` vs bare QEMU to the first userspace instruction.
    const fs::path initrd = fs::path(runtime) / "initramfs.cpio";
    const fs::path baseline_initrd = fs::path(runtime) / "baseline.cpio";
    auto kernel = sm::boot::default_kernel();
    if (!kernel) return 1;
    const std::string quoted_runtime = std::string("'") + runtime + "'";
    const std::string make_baseline =
        "set -e; cd " + quoted_runtime +
        "; mkdir -p base; cp /bin/busybox base/reboot; "
        "(cd base && echo reboot | cpio -o -H newc --quiet) > extra.cpio; "
        "cat initramfs.cpio extra.cpio > baseline.cpio";
    if (std::system(make_baseline.c_str()) != 0) {
        std::fprintf(stderr, "bench_vm: cannot build the baseline initramfs\n");
        return 1;
    }
    std::vector<double> cli_s, qemu_s;
    for (int i = 0; i < cold_runs; ++i) {
        auto t = clock_type::now();
        const int s =
            // Cold against cold: the peer boots, so ours must too.
            spawn_wait({(bin / "supermachine").string(), "run", "-q", "--no-snapshot", image_name,
                        "true"});
        cli_s.push_back(seconds_since(t));
        if (s != 0) {
            std::fprintf(stderr, "bench_vm: supermachine run failed (%d)\n", s);
            return 1;
        }
        t = clock_type::now();
        spawn_wait({"sh", "-c",
                    "exec qemu-system-x86_64 -M microvm,acpi=on,memory-backend=mem -m 512M "
                    "-object memory-backend-memfd,id=mem,size=512M,share=on -smp 1 -nodefaults "
                    "-no-user-config -nographic -serial null -monitor none -no-reboot "
                    "-global virtio-mmio.force-legacy=false -accel tcg -kernel '" +
                        kernel.value().vmlinuz.string() + "' -initrd '" + baseline_initrd.string() +
                        // The engine's TCG timing (no -icount, the host's TSC rate given).
                        "' -append 'console=ttyS0 quiet panic=-1 reboot=t rdinit=/reboot" +
                        supermachine::backend::detail::tcg_timer_arguments() +
                        " -- -f' "
                        "</dev/null >/dev/null 2>&1"});
        qemu_s.push_back(seconds_since(t));
    }
    std::error_code ec;
    fs::remove_all(runtime, ec);

    const double vm_exec = median(vm_us), host_exec = median(host_us);
    std::printf("VM boot to agent ready (vm::async_start, image cached): %.2f s\n\n", boot_seconds);
    std::printf("| measurement | supermachine | host baseline | ratio |\n|---|---|---|---|\n");
    std::printf(
        "| exec round trip `true`, median of %d | %.0f us | %.0f us (posix_spawn+wait) | %.1fx |\n",
        exec_runs, vm_exec, host_exec, vm_exec / host_exec);
    std::printf("| guest -> host stream, %zu MiB (dd stdout via agent+vsock) | %.0f MiB/s | %.0f "
                "MiB/s (Unix socketpair) | %.0f%% |\n",
                stream_mib, vm_mib_s, host_mib_s, 100 * vm_mib_s / host_mib_s);
    std::printf("| `supermachine run --no-snapshot IMAGE true`, median of %d | %.2f s | %.2f s "
                "(bare QEMU, same "
                "kernel+initramfs, to userspace) | %.2fx |\n",
                cold_runs, median(cli_s), median(qemu_s), median(cli_s) / median(qemu_s));
    if (streamed != (std::uint64_t{stream_mib} << 20)) {
        std::fprintf(stderr, "bench_vm: streamed %llu bytes, expected %zu MiB\n",
                     static_cast<unsigned long long>(streamed), stream_mib);
        return 1;
    }
    return 0;
}
