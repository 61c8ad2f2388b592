// <ratelimit/error.hpp> must compile on its own.
#include <ratelimit/error.hpp>
#include <ratelimit/error.hpp>  // and twice

#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_error) { BOOST_TEST(true); }
