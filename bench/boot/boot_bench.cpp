// Boot benchmark: the conformance guest (ELF with a PVH note, so both VMMs
// load it directly) under `supermachine boot` and under
// `qemu-system-x86_64 -M microvm,acpi=on -enable-kvm`, same memory, same
// cmdline. Medians of N runs for process start -> first console line and
// process start -> exit, and each VMM's resident memory beyond guest RAM
// (measured while the guest waits in echo mode).
//
//   boot_bench [--runs N] [--memory MiB]
#include "process.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "../support/qemu_peer.hpp"
#include "../support/statistics.hpp"

using supermachine::test::run_process;

using supermachine::bench::median;

namespace {

struct engine {
    std::string name;
    std::vector<std::string> (*argv)(const std::string& guest, const std::string& cmdline,
                                     unsigned mib);
};

std::vector<std::string> ours(const std::string& guest, const std::string& cmdline, unsigned mib) {
    return {supermachine::test::cli_path(),
            "boot",
            "--kernel",
            guest,
            "--memory",
            std::to_string(mib),
            "--cmdline",
            cmdline};
}

std::vector<std::string> qemu(const std::string& guest, const std::string& cmdline, unsigned mib) {
    return supermachine::bench::qemu_microvm_kvm_argv(guest, cmdline, mib);
}

// Resident KiB of the process outside mappings at least as large as guest
// RAM (those are guest RAM: our memfd, QEMU's anonymous RAM block).
long overhead_kib(pid_t pid, unsigned mib) {
    std::ifstream smaps("/proc/" + std::to_string(pid) + "/smaps");
    std::string line;
    long total = 0, size = 0;
    bool guest_ram = false;
    while (std::getline(smaps, line)) {
        unsigned long begin, end;
        if (std::sscanf(line.c_str(), "%lx-%lx ", &begin, &end) == 2 &&
            line.find(':') != std::string::npos && line.find(" kB") == std::string::npos) {
            size = static_cast<long>((end - begin) / 1024);
            guest_ram = size >= static_cast<long>(mib) * 1024;
            continue;
        }
        long kib;
        if (std::sscanf(line.c_str(), "Rss: %ld kB", &kib) == 1 && !guest_ram) total += kib;
    }
    return total;
}

// Start the engine with the guest in echo mode, wait for "echo: ready",
// measure, then let the guest power off.
long measure_rss(const engine& e, const std::string& guest, unsigned mib) {
    int in[2], out[2];
    if (::pipe(in) || ::pipe(out)) return -1;
    auto argv = e.argv(guest, "console=ttyS0 conformance.mode=echo", mib);
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(in[0], 0);
        ::dup2(out[1], 1);
        const int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, 2);
        ::close(in[1]);
        ::close(out[0]);
        std::vector<char*> args;
        for (auto& a : argv)
            args.push_back(a.data());
        args.push_back(nullptr);
        ::execv(args[0], args.data());
        ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    std::string seen;
    char buf[4096];
    long kib = -1;
    for (;;) {
        const ssize_t n = ::read(out[0], buf, sizeof buf);
        if (n <= 0) break;
        seen.append(buf, static_cast<std::size_t>(n));
        if (seen.find("echo: ready") != std::string::npos) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            kib = overhead_kib(pid, mib);
            [[maybe_unused]] auto w = ::write(in[1], "bye\n", 4);
            break;
        }
    }
    ::close(in[1]);
    while (::read(out[0], buf, sizeof buf) > 0) {
    }
    ::close(out[0]);
    int status;
    ::waitpid(pid, &status, 0);
    return kib;
}

} // namespace

int main(int argc, char** argv) {
    unsigned runs = 5, mib = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--runs"))
            runs = static_cast<unsigned>(std::max(1, std::atoi(argv[i + 1])));
        if (!std::strcmp(argv[i], "--memory"))
            mib = static_cast<unsigned>(std::max(16, std::atoi(argv[i + 1])));
    }
    const std::string guest = supermachine::test::binary_dir() + "/guest/conformance.elf";
    if (::access(guest.c_str(), R_OK) != 0 || ::access("/dev/kvm", R_OK | W_OK) != 0) {
        std::printf("SKIP: needs %s and /dev/kvm\n", guest.c_str());
        return 77;
    }
    const engine engines[] = {{"supermachine", &ours}, {"qemu microvm", &qemu}};
    struct figures {
        double first_line, exit;
        long rss_kib;
        unsigned ok;
    } results[2];
    for (int e = 0; e < 2; ++e) {
        std::vector<double> first, total;
        unsigned ok = 0;
        for (unsigned r = 0; r < runs; ++r) {
            auto p =
                run_process(engines[e].argv(guest, "console=ttyS0 conformance.mode=poweroff", mib),
                            {}, std::chrono::seconds(60));
            if (p.status == 0 && !p.timed_out && p.out.find("conformance: ") != std::string::npos)
                ++ok;
            if (p.first_line_seconds >= 0) first.push_back(p.first_line_seconds * 1000);
            total.push_back(p.seconds * 1000);
        }
        results[e] = {median(first), median(total), measure_rss(engines[e], guest, mib), ok};
    }
    std::printf("conformance guest (ELF/PVH), %u MiB, %u runs each, medians\n\n", mib, runs);
    std::printf("| metric | supermachine | qemu -M microvm | ratio |\n|---|---|---|---|\n");
    std::printf("| process start -> first console line | %.1f ms | %.1f ms | %.2f |\n",
                results[0].first_line, results[1].first_line,
                results[0].first_line / results[1].first_line);
    std::printf("| process start -> exit | %.1f ms | %.1f ms | %.2f |\n", results[0].exit,
                results[1].exit, results[0].exit / results[1].exit);
    std::printf("| VMM resident memory beyond guest RAM | %.1f MiB | %.1f MiB | %.2f |\n",
                static_cast<double>(results[0].rss_kib) / 1024,
                static_cast<double>(results[1].rss_kib) / 1024,
                static_cast<double>(results[0].rss_kib) / static_cast<double>(results[1].rss_kib));
    std::printf("| runs that powered off cleanly | %u/%u | %u/%u | |\n", results[0].ok, runs,
                results[1].ok, runs);
    return results[0].ok == runs ? 0 : 1;
}
