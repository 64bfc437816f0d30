#include <supermachine/error.hpp>

#include <boost/test/unit_test.hpp>

namespace sm = supermachine;

namespace {
sm::result<int> parse_positive(int v) {
    if (v <= 0) return sm::errc::invalid_argument;
    return v;
}
sm::result<int> doubled(int v) {
    SUPERMACHINE_TRY(x, parse_positive(v));
    return x * 2;
}
} // namespace

BOOST_AUTO_TEST_SUITE(error)

BOOST_AUTO_TEST_CASE(codes_have_our_category_and_messages) {
    supermachine::error_code ec = sm::errc::kernel_truncated;
    BOOST_TEST(ec.category().name() == std::string("supermachine"));
    BOOST_TEST(ec.message() == "kernel image is truncated");
    BOOST_TEST(ec == sm::errc::kernel_truncated);
    BOOST_TEST(ec != sm::errc::kernel_invalid);
}

BOOST_AUTO_TEST_CASE(try_propagates_errors) {
    BOOST_TEST(doubled(4).value() == 8);
    auto r = doubled(-1);
    BOOST_REQUIRE(!r);
    BOOST_TEST(r.error() == sm::errc::invalid_argument);
    BOOST_CHECK_THROW(sm::value_or_throw(doubled(-1)), boost::system::system_error);
}

BOOST_AUTO_TEST_SUITE_END()
