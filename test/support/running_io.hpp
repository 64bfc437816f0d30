#pragma once
// An io_context run on its own thread, for tests whose devices serve their
// queues on an executor while the test thread waits on the guest.
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <thread>

namespace supermachine::test {

struct running_io {
    boost::asio::io_context io;
    boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work{
        io.get_executor()};
    std::thread thread{[this] { io.run(); }};
    ~running_io() {
        work.reset();
        io.stop();
        thread.join();
    }
};

} // namespace supermachine::test
