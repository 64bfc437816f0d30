// An Asio HTTP server (Beast) that runs each POSTed command in a microVM
// from a pool of restored clones, and answers with the command's output.
//
//   pool_server IMAGE [--port N] [--pool N] [--fresh | --one-vm]
//   curl -d 'uname -a' http://127.0.0.1:8080/run
//
// At start it boots IMAGE once and snapshots it (the template); the pool
// keeps N clones of that snapshot restored. Each request leases a clone,
// runs `sh -c BODY` in it, and drops it (never reused). --fresh starts a
// VM per request instead, --one-vm runs every request in one running VM
// (the floor bench/pool/server_bench.py compares against: requests see
// each other's files, so not for serving). The answer's
// body is the command's stdout; its X-Exit-Code header the exit status.
// One thread, one io_context: every VM and every connection on it.
#include <supermachine/image.hpp>
#include <supermachine/pool.hpp>
#include <supermachine/vm.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>

namespace asio = boost::asio;
namespace http = boost::beast::http;
namespace sm = supermachine;
using tcp = asio::ip::tcp;

struct server_config {
    std::string image;
    unsigned short port = 8080;
    std::size_t pool_size = 4;
    bool fresh = false;  // a VM per request, no pool
    bool one_vm = false; // every request in one VM, no pool
};

// Boot the image once and snapshot it: the template every clone restores.
asio::awaitable<std::filesystem::path> make_template(const sm::prepared_image& image) {
    const auto dir = std::filesystem::temp_directory_path() /
                     ("pool-server-template." + std::to_string(::getpid()));
    sm::vm_options options;
    options.snapshottable = true;
    auto booted = co_await sm::vm::async_start(co_await asio::this_coro::executor, image,
                                               std::move(options), asio::use_awaitable);
    auto report = co_await booted->async_snapshot(dir, /*resume=*/false, asio::use_awaitable);
    booted->kill();
    if (!report.saved) throw std::runtime_error("the engine refused the snapshot: " + report.refusal);
    co_return dir;
}

struct command_runner {
    sm::pool* pool = nullptr;          // a pooled clone per request
    std::shared_ptr<sm::vm> one_vm;    // or every request in this one
    const sm::prepared_image* image{}; // or a VM per request
};

asio::awaitable<sm::agent::exec_output> run_command(const command_runner& runner,
                                                    std::string command) {
    if (runner.one_vm)
        co_return co_await runner.one_vm->async_exec({"sh", "-c", command}, asio::use_awaitable);
    if (auto* pool = runner.pool) {
        auto lease = co_await pool->async_acquire(asio::use_awaitable);
        co_return co_await lease->async_exec({"sh", "-c", command}, asio::use_awaitable);
    } // the lease is dropped here: the clone is discarded, the pool refills
    auto fresh = co_await sm::vm::async_start(co_await asio::this_coro::executor, *runner.image,
                                              asio::use_awaitable);
    auto out = co_await fresh->async_exec({"sh", "-c", command}, asio::use_awaitable);
    fresh->kill();
    co_return out;
}

// The open connections, so that a stop can close idle keep-alive ones
// (they would otherwise keep io_context::run, and the server, alive).
using open_connections = std::set<tcp::socket*>;

asio::awaitable<void> serve(tcp::socket socket, command_runner runner,
                            std::shared_ptr<open_connections> open) {
    open->insert(&socket);
    struct forget {
        open_connections& open;
        tcp::socket* socket;
        ~forget() { open.erase(socket); }
    } forget_on_exit{*open, &socket};
    boost::beast::flat_buffer buffer;
    for (;;) {
        http::request<http::string_body> request;
        boost::system::error_code ec;
        co_await http::async_read(socket, buffer, request,
                                  asio::redirect_error(asio::use_awaitable, ec));
        if (ec) co_return; // closed, or not HTTP
        http::response<http::string_body> response;
        response.version(request.version());
        response.keep_alive(request.keep_alive());
        if (request.method() != http::verb::post || request.target() != "/run") {
            response.result(http::status::not_found);
            response.body() = "POST a command to /run\n";
        } else {
            try {
                auto out = co_await run_command(runner, request.body());
                response.result(http::status::ok);
                response.set("X-Exit-Code", std::to_string(out.exit_code));
                response.body() = std::move(out.stdout_data);
            } catch (const boost::system::system_error& e) {
                response.result(http::status::service_unavailable);
                response.body() = std::string(e.what()) + "\n";
            }
        }
        response.prepare_payload();
        co_await http::async_write(socket, response, asio::redirect_error(asio::use_awaitable, ec));
        if (ec || !request.keep_alive()) co_return;
    }
}

asio::awaitable<void> run_server(server_config config) {
    auto executor = co_await asio::this_coro::executor;
    const auto source = sm::image::from_oci(config.image); // named: see doc/embedding.md (GCC 12)
    auto image = co_await source.async_prepare(asio::use_awaitable);
    std::optional<sm::pool> pool;
    std::filesystem::path template_dir;
    command_runner runner{.pool = nullptr, .one_vm = nullptr, .image = &image};
    if (config.one_vm) {
        runner.one_vm = co_await sm::vm::async_start(executor, image, asio::use_awaitable);
    } else if (!config.fresh) {
        template_dir = co_await make_template(image);
        pool.emplace(executor, template_dir,
                     sm::pool_options{.min_idle = config.pool_size,
                                      .max_size = config.pool_size * 2,
                                      .clone = {},
                                      // Every request runs through `sh -c`: fault
                                      // in that path before a clone is ready.
                                      .warm_up = {"sh", "-c", "true"}});
        runner.pool = &*pool;
    }
    tcp::acceptor acceptor(executor, {asio::ip::make_address("127.0.0.1"), config.port});
    std::cout << "listening on 127.0.0.1:" << acceptor.local_endpoint().port() << std::endl;
    asio::signal_set stop(executor, SIGINT, SIGTERM);
    auto open = std::make_shared<open_connections>();
    stop.async_wait([&](boost::system::error_code, int) {
        acceptor.close();
        for (auto* socket : *open) {
            boost::system::error_code ignored;
            socket->close(ignored); // a request in flight loses its answer
        }
    });
    for (;;) {
        boost::system::error_code ec;
        auto socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
        if (ec) break;
        asio::co_spawn(executor, serve(std::move(socket), runner, open), asio::detached);
    }
    if (pool) pool->close();
    if (runner.one_vm) runner.one_vm->kill();
    if (!template_dir.empty()) {
        std::error_code ignored;
        std::filesystem::remove_all(template_dir, ignored);
    }
}

int main(int argc, char** argv) {
    server_config config;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--port" && i + 1 < argc) config.port = static_cast<unsigned short>(std::atoi(argv[++i]));
        else if (arg == "--pool" && i + 1 < argc) config.pool_size = std::strtoul(argv[++i], nullptr, 10);
        else if (arg == "--fresh") config.fresh = true;
        else if (arg == "--one-vm") config.one_vm = true;
        else if (config.image.empty() && !arg.starts_with("-")) config.image = arg;
        else {
            std::cerr << "usage: pool_server IMAGE [--port N] [--pool N] [--fresh | --one-vm]\n";
            return 2;
        }
    }
    if (config.image.empty()) {
        std::cerr << "usage: pool_server IMAGE [--port N] [--pool N] [--fresh | --one-vm]\n";
        return 2;
    }
    asio::io_context io;
    int status = 0;
    asio::co_spawn(io, run_server(config), [&](std::exception_ptr error) {
        if (!error) return;
        try {
            std::rethrow_exception(error);
        } catch (const std::exception& e) {
            std::cerr << "pool_server: " << e.what() << "\n";
            status = 1;
        }
    });
    io.run();
    return status;
}
