// supermachine::pool and one io_context thread driving many VMs, on real
// restored clones (QEMU TCG here; engine=kvm inside scripts/nested-kvm.sh: our
// kvm engine, the clones in this process), each figure beside its peer in
// the same run:
//
//   1. bare exec round trip: `true` in one running VM (the floor)
//   2. a request through the pool (acquire + exec `true` + drop the lease),
//      min_idle 4, one client at a time and 4 at once (saturated: the pool
//      serves at its refill rate), then one client at half that rate (the
//      load a server would run it at): p50, p99, requests/s
//   3. a VM per request instead (restore + exec + kill): p50, p99, requests/s,
//      and its restore alone (to the agent's answer: restore -> agent ready)
//   4. N = 4, 8, 16 clones restored at once from one snapshot by one thread:
//      total time, per-VM start latency (median), RSS growth per VM
//
//   bench_pool oci:DIR:TAG [requests=40] [engine=qemu|kvm|auto]
#include <supermachine/image.hpp>
#include <supermachine/pool.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../support/statistics.hpp"

namespace {

namespace sm = supermachine;
namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;
using supermachine::bench::median;
using supermachine::bench::seconds_since;

double percentile(std::vector<double> v, double p) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

// Memory of this process (the kvm engine's clones) and its children (QEMU),
// in MiB: RSS counts a page shared by clones (the snapshot file's page
// cache, mapped privately by each) once per mapping, an upper bound; PSS
// splits it among its mappers, so its growth is what a clone really adds.
struct memory_mib {
    double rss = 0, pss = 0;
};
double status_field_mib(const std::filesystem::path& file, const std::string& field) {
    std::ifstream in(file);
    std::string key;
    while (in >> key) {
        if (key == field) {
            double kib = 0;
            in >> kib;
            return kib / 1024;
        }
        in.ignore(1 << 12, '\n');
    }
    return 0;
}
memory_mib memory_of(pid_t pid) {
    const auto proc = std::filesystem::path("/proc") / std::to_string(pid);
    return {status_field_mib(proc / "status", "VmRSS:"),
            status_field_mib(proc / "smaps_rollup", "Pss:")};
}
memory_mib tree_memory() {
    memory_mib total = memory_of(::getpid());
    for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
        const auto name = entry.path().filename().string();
        if (name.find_first_not_of("0123456789") != std::string::npos) continue;
        std::ifstream stat(entry.path() / "stat");
        std::string pid, comm, state;
        int ppid = 0;
        stat >> pid >> comm >> state >> ppid;
        if (ppid != ::getpid()) continue;
        const auto child = memory_of(std::stoi(pid));
        total.rss += child.rss;
        total.pss += child.pss;
    }
    return total;
}

template <class Coroutine>
void run(asio::io_context& io, Coroutine coroutine) {
    // Until the coroutine ends, not until the io_context runs out of work:
    // live VMs (the pool's idle clones) keep operations pending.
    std::exception_ptr failure;
    bool done = false;
    asio::co_spawn(io, std::move(coroutine), [&](std::exception_ptr e) {
        failure = e;
        done = true;
    });
    io.restart();
    while (!done)
        io.run_one();
    if (failure) std::rethrow_exception(failure);
}

// Until the pool holds 4 idle clones; a pool that cannot get there (its
// restores fail) ends the benchmark with its counts rather than hanging.
asio::awaitable<void> wait_until_filled(asio::io_context& io, sm::pool& pool) {
    const auto deadline = clock_type::now() + std::chrono::minutes(3);
    while (pool.counts().idle < 4) {
        if (clock_type::now() > deadline) {
            const auto c = pool.counts();
            throw std::runtime_error(
                "the pool did not fill in 3 minutes: idle " + std::to_string(c.idle) +
                ", restoring " + std::to_string(c.restoring) + ", restored " +
                std::to_string(c.restored) + ", failed " + std::to_string(c.failed));
        }
        asio::steady_timer wait(io, std::chrono::milliseconds(50));
        co_await wait.async_wait(asio::use_awaitable);
    }
}

void report(const char* what, const std::vector<double>& ms, double seconds) {
    std::printf("  %-44s p50 %7.1f ms  p99 %7.1f ms  %6.1f req/s\n", what, median(ms),
                percentile(ms, 0.99), static_cast<double>(ms.size()) / seconds);
}

} // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: bench_pool oci:DIR:TAG [requests=40] [qemu|kvm|auto]\n");
        return 2;
    }
    std::setvbuf(stdout, nullptr, _IOLBF, 0); // each row as it comes (a killed run keeps them)
    const std::string reference = argv[1];
    const int requests = argc > 2 ? std::atoi(argv[2]) : 40;
    const std::string engine = argc > 3 ? argv[3] : "auto";
    const auto choice = sm::parse_engine_choice(engine);
    if (!choice) {
        std::fprintf(stderr, "bench_pool: engine is qemu, kvm or auto, not %s\n", engine.c_str());
        return 2;
    }
    asio::io_context io;
    const auto snapshot = std::filesystem::temp_directory_path() /
                          ("bench-pool." + std::to_string(::getpid()));

    sm::prepared_image image;
    std::vector<double> bare;
    run(io, [&]() -> asio::awaitable<void> {
        const auto source = sm::image::from_oci(reference); // named: doc/embedding.md (GCC 12)
        image = co_await source.async_prepare(asio::use_awaitable);
        sm::vm_options options;
        options.snapshottable = true;
        // auto keeps a snapshottable vm on qemu; the snapshot's record
        // carries the engine to every restore below.
        options.engine = *choice;
        auto booted = co_await sm::vm::async_start(io, image, options, asio::use_awaitable);
        for (int i = 0; i < requests; ++i) {
            const auto t = clock_type::now();
            co_await booted->async_exec({"true"}, asio::use_awaitable);
            bare.push_back(seconds_since(t) * 1000);
        }
        co_await booted->async_snapshot(snapshot, false, asio::use_awaitable);
        booted->kill();
    }());

    std::printf("pool benchmark: %d requests of `true`, busybox image, engine %s, one io_context "
                "thread\n\n",
                requests, engine.c_str());
    std::printf("  %-44s p50 %7.1f ms  p99 %7.1f ms\n", "bare exec round trip (one running VM)",
                median(bare), percentile(bare, 0.99));

    double pool_p50 = 0, paced_p50 = 0;
    {
        sm::pool pool(io, snapshot, {.min_idle = 4, .max_size = 8, .clone = {}});
        std::vector<double> one, four;
        double one_s = 0, four_s = 0;
        run(io, [&]() -> asio::awaitable<void> {
            // Let the pool fill before timing (a server starts before its first request).
            co_await wait_until_filled(io, pool);
            auto started = clock_type::now();
            for (int i = 0; i < requests; ++i) {
                const auto t = clock_type::now();
                auto lease = co_await pool.async_acquire(asio::use_awaitable);
                co_await lease->async_exec({"true"}, asio::use_awaitable);
                one.push_back(seconds_since(t) * 1000);
            }
            one_s = seconds_since(started);
        }());
        run(io, [&]() -> asio::awaitable<void> { co_await wait_until_filled(io, pool); }());
        const auto started = clock_type::now();
        int remaining = requests;
        for (int client = 0; client < 4; ++client)
            asio::co_spawn(
                io,
                [&]() -> asio::awaitable<void> {
                    while (remaining > 0) {
                        --remaining;
                        const auto t = clock_type::now();
                        auto lease = co_await pool.async_acquire(asio::use_awaitable);
                        co_await lease->async_exec({"true"}, asio::use_awaitable);
                        four.push_back(seconds_since(t) * 1000);
                    }
                },
                asio::detached);
        io.restart();
        while (static_cast<int>(four.size()) < requests)
            io.run_one();
        four_s = seconds_since(started);
        // Half the saturated rate: requests arrive at fixed times (an open
        // loop: a slow answer does not delay the next arrival's clock).
        const auto period = std::chrono::duration<double>(2 * one_s / requests);
        std::vector<double> paced;
        double paced_s = 0;
        run(io, [&]() -> asio::awaitable<void> {
            co_await wait_until_filled(io, pool);
            const auto started = clock_type::now();
            for (int i = 0; i < requests; ++i) {
                asio::steady_timer arrival(
                    io, started + std::chrono::duration_cast<clock_type::duration>(period * i));
                co_await arrival.async_wait(asio::use_awaitable);
                const auto t = clock_type::now();
                auto lease = co_await pool.async_acquire(asio::use_awaitable);
                co_await lease->async_exec({"true"}, asio::use_awaitable);
                paced.push_back(seconds_since(t) * 1000);
            }
            paced_s = seconds_since(started);
        }());
        report("pool (min_idle 4), 1 client", one, one_s);
        report("pool (min_idle 4), 4 clients", four, four_s);
        char paced_label[64];
        std::snprintf(paced_label, sizeof paced_label, "pool, 1 client, a request every %.0f ms",
                      period.count() * 1000);
        report(paced_label, paced, paced_s);
        pool_p50 = median(one);
        paced_p50 = median(paced);
        pool.close();
        io.restart();
        io.run_for(std::chrono::seconds(2));
    }

    {
        std::vector<double> fresh, restore_only;
        const auto started = clock_type::now();
        run(io, [&]() -> asio::awaitable<void> {
            for (int i = 0; i < requests; ++i) {
                const auto t = clock_type::now();
                // async_restore completes once the agent has answered hello,
                // reseed and clock: restore -> agent ready.
                auto clone = co_await sm::vm::async_restore(io.get_executor(), snapshot,
                                                            sm::snapshot_start_options{},
                                                            asio::use_awaitable);
                restore_only.push_back(seconds_since(t) * 1000);
                co_await clone->async_exec({"true"}, asio::use_awaitable);
                clone->kill();
                fresh.push_back(seconds_since(t) * 1000);
            }
        }());
        report("a VM per request (restore + exec + kill)", fresh, seconds_since(started));
        std::printf("  %-44s p50 %7.1f ms  p99 %7.1f ms\n", "  of which restore -> agent ready",
                    median(restore_only), percentile(restore_only, 0.99));
        std::printf("\n  pool p50 / bare exec p50: saturated %.2fx, at half that rate %.2fx "
                    "(goal <= 3x); VM-per-request p50 / pool p50: %.1fx\n\n",
                    pool_p50 / median(bare), paced_p50 / median(bare), median(fresh) / pool_p50);
    }

    for (int n : {4, 8, 16}) {
        const auto memory_before = tree_memory();
        std::vector<std::shared_ptr<sm::vm>> clones;
        std::vector<double> latency;
        const auto started = clock_type::now();
        for (int i = 0; i < n; ++i)
            sm::vm::async_restore(io.get_executor(), snapshot, sm::snapshot_start_options{},
                                  [&, t = clock_type::now()](sm::error_code ec,
                                                             std::shared_ptr<sm::vm> v) {
                                      if (ec) throw boost::system::system_error(ec, "restore");
                                      latency.push_back(seconds_since(t) * 1000);
                                      clones.push_back(std::move(v));
                                  });
        io.restart();
        while (static_cast<int>(clones.size()) < n)
            io.run_one();
        const double total = seconds_since(started);
        const auto memory_after = tree_memory();
        std::printf("  %2d clones at once, one thread: total %6.2f s, start latency p50 %7.1f "
                    "ms, per VM: RSS +%.1f MiB, PSS +%.1f MiB\n",
                    n, total, median(latency), (memory_after.rss - memory_before.rss) / n,
                    (memory_after.pss - memory_before.pss) / n);
        for (auto& c : clones)
            c->kill();
        clones.clear();
        io.restart();
        io.run_for(std::chrono::seconds(1));
    }
    std::error_code ignored;
    std::filesystem::remove_all(snapshot, ignored);
}
