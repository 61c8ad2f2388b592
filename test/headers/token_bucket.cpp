// <ratelimit/token_bucket.hpp> must compile on its own.
#include <ratelimit/token_bucket.hpp>
#include <ratelimit/token_bucket.hpp>  // and twice

#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_token_bucket) { BOOST_TEST(true); }
