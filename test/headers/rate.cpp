// <ratelimit/rate.hpp> must compile on its own.
#include <ratelimit/rate.hpp>
#include <ratelimit/rate.hpp>  // and twice

#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_rate) { BOOST_TEST(true); }
