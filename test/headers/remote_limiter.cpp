// <ratelimit/remote_limiter.hpp> must compile on its own.
#include <ratelimit/remote_limiter.hpp>
#include <ratelimit/remote_limiter.hpp>  // and twice

#include <boost/test/unit_test.hpp>

#include <type_traits>

BOOST_AUTO_TEST_CASE(header_remote_limiter) {
  BOOST_TEST(std::is_abstract_v<ratelimit::remote_limiter>);
  BOOST_TEST(std::has_virtual_destructor_v<ratelimit::remote_limiter>);
  ratelimit::remote_limiter::reservation r;
  BOOST_TEST(r.n == 0u);
}
