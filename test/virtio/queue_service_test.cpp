#include "test_driver.hpp"

#include <supermachine/virtio/queue_service.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <thread>

namespace sm = supermachine;
namespace vio = supermachine::virtio;

namespace {
struct fds {
    int kick = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int call = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ~fds() {
        ::close(kick);
        ::close(call);
    }
    void ring() const {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(kick, &one, sizeof one);
    }
};
} // namespace

BOOST_AUTO_TEST_SUITE(queue_service)

BOOST_AUTO_TEST_CASE(kicks_polls_and_stop) {
    sm::test::test_driver d(8);
    boost::asio::io_context io;
    fds f;
    auto queue = vio::virtqueue::create(d.memory(), d.layout(), vio::common_features).value();
    vio::queue_binding binding{&queue, f.kick, vio::interrupt_sink(sm::interrupt_line(f.call))};
    vio::activation act{d.memory(), io.get_executor(), vio::common_features, {&binding, 1}, {}, {}};
    vio::queue_service service;
    int calls = 0;
    std::thread::id handler_thread;
    BOOST_REQUIRE(service.start(act, [&](std::size_t index) {
        BOOST_TEST(index == 0u);
        handler_thread = std::this_thread::get_id();
        ++calls;
    }));
    io.poll();
    BOOST_TEST(calls == 1);                                     // the initial poll
    BOOST_TEST((handler_thread == std::this_thread::get_id())); // on the executor's thread
    f.ring();
    f.ring(); // two kicks before the executor runs: one pass
    io.poll();
    BOOST_TEST(calls == 2);
    service.poll(0);
    service.poll(7); // not bound: ignored
    io.poll();
    BOOST_TEST(calls == 3);

    const auto generation = service.generation();
    BOOST_TEST(service.run_if_current(generation, [] {}));
    service.stop();
    BOOST_TEST(!service.run_if_current(generation, [] {}));
    f.ring();
    service.poll(0);
    io.poll();
    BOOST_TEST(calls == 3); // nothing after stop
    service.stop();         // idempotent

    // The kick eventfd the transport owns is still open after stop.
    BOOST_TEST(::fcntl(f.kick, F_GETFD) != -1);
}

BOOST_AUTO_TEST_CASE(stop_waits_for_io_in_flight) {
    sm::test::test_driver d(8);
    boost::asio::io_context io;
    fds f;
    auto queue = vio::virtqueue::create(d.memory(), d.layout(), vio::common_features).value();
    vio::queue_binding binding{&queue, f.kick, {}};
    vio::activation act{d.memory(), io.get_executor(), vio::common_features, {&binding, 1}, {}, {}};
    vio::queue_service service;
    std::atomic<bool> finished{false};
    std::thread worker;
    BOOST_REQUIRE(service.start(act, [&](std::size_t) {
        if (worker.joinable()) return;
        service.begin_io();
        const auto generation = service.generation_in_handler();
        worker = std::thread([&, generation] {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            // Completions during stop() still count: stop drains.
            service.run_if_current(generation, [&] { finished = true; });
            service.end_io();
        });
    }));
    io.poll();
    service.stop();
    BOOST_TEST(finished.load());
    worker.join();
}

BOOST_AUTO_TEST_SUITE_END()
