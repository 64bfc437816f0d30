// exec through the real agent (host process, socketpair): exit codes,
// signals, not-found, timeouts, stdin streaming, 100 MiB of stdout with
// bounded memory, 20 concurrent execs, tty, credentials.
#include "agent_fixture.hpp"

#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <random>

using namespace supermachine;
using namespace supermachine::test;

BOOST_AUTO_TEST_SUITE(agent_exec)

BOOST_AUTO_TEST_CASE(exit_codes_come_back_exactly) {
    connected_agent a;
    BOOST_TEST(a.exec(shell("exit 42")).exit_code == 42);
    auto t = a.exec({.argv = {"/bin/true"}});
    BOOST_TEST(t.exit_code == 0);
    BOOST_TEST(t.signal == 0);
    BOOST_TEST(a.exec({.argv = {"false"}}).exit_code == 1); // PATH lookup with the default PATH
    auto killed = a.exec(shell("kill -9 $$"));
    BOOST_TEST(killed.signal == 9);
    BOOST_TEST(killed.exit_code == 137);
    BOOST_TEST(!killed.timed_out);
}

BOOST_AUTO_TEST_CASE(stdout_and_stderr_are_separate) {
    connected_agent a;
    auto out = a.exec(shell("echo to-out; echo to-err >&2; printf %s \"$FOO\""));
    BOOST_TEST(out.stdout_data == "to-out\n");
    BOOST_TEST(out.stderr_data == "to-err\n");
    auto env = shell("printf %s \"$FOO\"; pwd");
    env.env.push_back("FOO=bar");
    env.cwd = "/tmp";
    BOOST_TEST(a.exec(env).stdout_data == "bar/tmp\n");
}

BOOST_AUTO_TEST_CASE(command_not_found_names_it) {
    connected_agent a;
    supermachine::error_code ec;
    auto out = a.exec({.argv = {"no-such-command-xyz", "arg"}}, &ec);
    BOOST_TEST(ec == make_error_code(errc::command_not_found));
    BOOST_TEST(out.agent_message.find("no-such-command-xyz") != std::string::npos,
               out.agent_message);
    BOOST_TEST(a.client.last_agent_message().find("no-such-command-xyz") != std::string::npos);
    auto abs = a.exec({.argv = {"/nonexistent/bin/tool"}}, &ec);
    BOOST_TEST(ec == make_error_code(errc::command_not_found));
    BOOST_TEST(abs.agent_message.find("/nonexistent/bin/tool") != std::string::npos);
    // A bad working directory is another error, and names the directory.
    auto cwd = shell("true");
    cwd.cwd = "/no/such/dir";
    auto bad = a.exec(cwd, &ec);
    BOOST_TEST(ec);
    BOOST_TEST(ec != make_error_code(errc::command_not_found));
    BOOST_TEST(bad.agent_message.find("/no/such/dir") != std::string::npos, bad.agent_message);
    // The connection still works afterwards.
    BOOST_TEST(a.exec(shell("exit 3")).exit_code == 3);
}

BOOST_AUTO_TEST_CASE(timeout_kills_the_process_group_and_says_so) {
    connected_agent a;
    auto request = shell("sleep 30 & sleep 30; echo never");
    request.timeout_ms = 300;
    auto start = std::chrono::steady_clock::now();
    auto out = a.exec(request);
    auto elapsed = std::chrono::steady_clock::now() - start;
    BOOST_TEST(out.timed_out);
    BOOST_TEST(out.signal == SIGKILL);
    BOOST_TEST(out.stdout_data.empty());
    BOOST_TEST((elapsed < std::chrono::seconds(10))); // the background sleep was killed too
    auto quick = shell("exit 0");
    quick.timeout_ms = 10000;
    auto q = a.exec(quick);
    BOOST_TEST(!q.timed_out);
    BOOST_TEST(q.exit_code == 0);
}

BOOST_AUTO_TEST_CASE(signals_are_delivered) {
    connected_agent a;
    auto [ec, child] = await<client_type::child_type>(
        a.io, [&](auto h) { a.client.async_spawn(shell("exec sleep 30"), std::move(h)); });
    BOOST_REQUIRE(!ec);
    BOOST_TEST(child.pid() > 0);
    child.signal(SIGTERM);
    auto [wec, status] =
        await<agent::exit_status>(a.io, [&](auto h) { child.async_wait(std::move(h)); });
    BOOST_TEST(!wec);
    BOOST_TEST(status.signal == SIGTERM);
    BOOST_TEST(status.code == 128 + SIGTERM);
}

BOOST_AUTO_TEST_CASE(stdin_is_streamed) {
    connected_agent a;
    auto request = shell("cat; echo done >&2");
    request.stdin_open = true;
    auto [ec, child] = await<client_type::child_type>(
        a.io, [&](auto h) { a.client.async_spawn(request, std::move(h)); });
    BOOST_REQUIRE(!ec);
    // More than the credit window, so the writer must wait for the agent.
    std::string sent;
    for (int i = 0; sent.size() < 3 * agent::initial_window; ++i)
        sent += std::to_string(i) + ",";
    std::string received;
    bool write_done = false, read_done = false;
    supermachine::error_code write_ec;
    child.async_write_stdin(sent, [&](supermachine::error_code e) {
        write_ec = e;
        child.async_close_stdin([&](supermachine::error_code e2) {
            if (e2) write_ec = e2;
            write_done = true;
        });
    });
    std::function<void()> read_more = [&] {
        child.async_read_stdout([&](supermachine::error_code e, std::string chunk) {
            if (e) {
                BOOST_TEST(e == make_error_code(errc::end_of_stream));
                read_done = true;
                return;
            }
            received += chunk;
            read_more();
        });
    };
    read_more();
    run_until(a.io, [&] { return write_done && read_done; });
    BOOST_TEST(!write_ec);
    BOOST_TEST(received.size() == sent.size());
    BOOST_TEST((received == sent));
    auto [err_ec, err] =
        await<std::string>(a.io, [&](auto h) { child.async_read_stderr(std::move(h)); });
    BOOST_TEST(err == "done\n");
    auto [wec, status] =
        await<agent::exit_status>(a.io, [&](auto h) { child.async_wait(std::move(h)); });
    BOOST_TEST(!wec);
    BOOST_TEST(status.code == 0);
}

namespace {
std::string hex(const unsigned char* p, unsigned n) {
    std::string s;
    char b[3];
    for (unsigned i = 0; i < n; ++i)
        std::snprintf(b, sizeof b, "%02x", p[i]), s += b;
    return s;
}
} // namespace

BOOST_AUTO_TEST_CASE(hundred_mib_of_stdout_intact_with_bounded_memory) {
    // A 100 MiB file of pseudo-random bytes, hashed as it is written.
    constexpr std::size_t total = std::size_t{100} << 20;
    std::string path = "/tmp/supermachine-agent-test-" + std::to_string(::getpid());
    EVP_MD_CTX* want = EVP_MD_CTX_new();
    EVP_DigestInit_ex(want, EVP_sha256(), nullptr);
    {
        std::ofstream file(path, std::ios::binary);
        std::mt19937_64 rng(42);
        std::vector<std::uint64_t> block(1 << 16);
        for (std::size_t done = 0; done < total; done += block.size() * 8) {
            for (auto& w : block)
                w = rng();
            file.write(reinterpret_cast<const char*>(block.data()), block.size() * 8);
            EVP_DigestUpdate(want, block.data(), block.size() * 8);
        }
    }
    unsigned char want_digest[32], got_digest[32];
    unsigned len = 0;
    EVP_DigestFinal_ex(want, want_digest, &len);
    EVP_MD_CTX_free(want);

    long host_before = agent_process::read_hwm(::getpid());
    connected_agent a;
    auto [ec, child] = await<client_type::child_type>(a.io, [&](auto h) {
        a.client.async_spawn({.argv = {"cat", path}}, std::move(h));
    });
    BOOST_REQUIRE(!ec);
    EVP_MD_CTX* got = EVP_MD_CTX_new();
    EVP_DigestInit_ex(got, EVP_sha256(), nullptr);
    std::size_t received = 0;
    bool done = false;
    std::function<void()> read_more = [&] {
        child.async_read_stdout([&](supermachine::error_code e, std::string chunk) {
            if (e) {
                BOOST_TEST(e == make_error_code(errc::end_of_stream));
                done = true;
                return;
            }
            BOOST_TEST_REQUIRE(chunk.size() <= agent::max_data_chunk);
            EVP_DigestUpdate(got, chunk.data(), chunk.size());
            received += chunk.size();
            read_more();
        });
    };
    read_more();
    run_until(
        a.io, [&] { return done; }, std::chrono::seconds(240));
    EVP_DigestFinal_ex(got, got_digest, &len);
    EVP_MD_CTX_free(got);
    auto [wec, status] =
        await<agent::exit_status>(a.io, [&](auto h) { child.async_wait(std::move(h)); });
    ::unlink(path.c_str());
    BOOST_TEST(received == total);
    BOOST_TEST(hex(got_digest, 32) == hex(want_digest, 32));
    BOOST_TEST(status.code == 0);
    long agent_peak = a.process.peak_rss_kib();
    long host_growth = agent_process::read_hwm(::getpid()) - host_before;
    BOOST_TEST_MESSAGE("agent peak RSS " << agent_peak << " KiB, host growth " << host_growth
                                         << " KiB");
    BOOST_TEST(agent_peak > 0);
    if (memory_checks) {
        BOOST_TEST(agent_peak < 16 * 1024);  // the agent buffers a window, not the stream
        BOOST_TEST(host_growth < 32 * 1024); // neither does the client
    }
}

BOOST_AUTO_TEST_CASE(twenty_concurrent_execs) {
    connected_agent a;
    constexpr int n = 20;
    std::vector<std::optional<std::pair<supermachine::error_code, agent::exec_output>>> results(n);
    for (int i = 0; i < n; ++i) {
        auto r = shell("sleep 0.2; echo $0; exit $1");
        r.argv.push_back("job" + std::to_string(i));
        r.argv.push_back(std::to_string(i));
        a.client.async_exec(r, [&, i](supermachine::error_code ec, agent::exec_output out) {
            results[i].emplace(ec, std::move(out));
        });
    }
    auto start = std::chrono::steady_clock::now();
    run_until(a.io, [&] {
        return std::all_of(results.begin(), results.end(), [](auto& r) { return r.has_value(); });
    });
    for (int i = 0; i < n; ++i) {
        BOOST_TEST(!results[i]->first);
        BOOST_TEST(results[i]->second.exit_code == i);
        BOOST_TEST(results[i]->second.stdout_data == "job" + std::to_string(i) + "\n");
    }
    // They ran at the same time, not one after another (20 x 0.2 s).
    BOOST_TEST((std::chrono::steady_clock::now() - start < std::chrono::seconds(3)));
}

BOOST_AUTO_TEST_CASE(tty_and_credentials) {
    connected_agent a;
    auto t = shell("tty; stty size");
    t.tty = agent::tty_size{33, 101};
    auto out = a.exec(t);
    BOOST_TEST(out.stdout_data.find("/dev/pts/") != std::string::npos, out.stdout_data);
    BOOST_TEST(out.stdout_data.find("33 101") != std::string::npos, out.stdout_data);
    auto plain = a.exec(shell("tty"));
    BOOST_TEST(plain.stdout_data.find("not a tty") != std::string::npos);
    if (::geteuid() != 0) return; // changing credentials needs root
    auto u = shell("id -u; id -g; id -G");
    u.uid = 65534;
    u.gid = 65534;
    u.groups = {65534, 100};
    BOOST_TEST(a.exec(u).stdout_data == "65534\n65534\n65534 100\n");
}

BOOST_AUTO_TEST_CASE(collected_output_is_bounded) {
    connected_agent a;
    a.client.set_max_collected_output(1 << 20);
    supermachine::error_code ec;
    auto start = std::chrono::steady_clock::now();
    a.exec(shell("exec cat /dev/zero"), &ec); // endless: must end at the bound, not exhaust memory
    BOOST_TEST(ec == make_error_code(errc::out_of_resources));
    BOOST_TEST((std::chrono::steady_clock::now() - start < std::chrono::seconds(20)));
    // The process was killed and the connection still serves.
    BOOST_TEST(a.exec(shell("echo fine")).stdout_data == "fine\n");
}

BOOST_AUTO_TEST_CASE(dropping_a_child_keeps_the_connection_healthy) {
    connected_agent a;
    {
        auto [ec, child] = await<client_type::child_type>(a.io, [&](auto h) {
            a.client.async_spawn(shell("head -c 3000000 /dev/zero; echo done > /dev/null"),
                                 std::move(h));
        });
        BOOST_REQUIRE(!ec);
    } // dropped unread: its output is credited and discarded, so it cannot block
    auto out = a.exec(shell("echo after"));
    BOOST_TEST(out.stdout_data == "after\n");
    // A second reader on the same stream is refused, not queued.
    auto [ec, child] = await<client_type::child_type>(
        a.io, [&](auto h) { a.client.async_spawn(shell("sleep 0.2; echo x"), std::move(h)); });
    BOOST_REQUIRE(!ec);
    std::optional<supermachine::error_code> first, second;
    child.async_read_stdout([&](supermachine::error_code e, std::string) { first = e; });
    child.async_read_stdout([&](supermachine::error_code e, std::string) { second = e; });
    run_until(a.io, [&] { return first.has_value() && second.has_value(); });
    BOOST_TEST(!*first);
    BOOST_TEST(*second == make_error_code(errc::invalid_argument));
}

BOOST_AUTO_TEST_SUITE_END()
