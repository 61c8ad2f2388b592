// <ratelimit/metrics.hpp> must compile on its own.
#include <ratelimit/metrics.hpp>
#include <ratelimit/metrics.hpp>  // and twice

#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_metrics) {
  ratelimit::limiter_metrics m;
  m += m;
  BOOST_TEST(m.wait_count() == 0u);
  BOOST_TEST(ratelimit::wait_histogram_layout::bucket_of(0) == 0u);
}
