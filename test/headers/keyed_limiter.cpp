// <ratelimit/keyed_limiter.hpp> must compile on its own.
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/keyed_limiter.hpp>  // and twice

#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_keyed_limiter) { BOOST_TEST(true); }
