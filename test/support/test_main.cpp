#define BOOST_TEST_MODULE supermachine
#include <boost/test/unit_test.hpp>
