// <ratelimit/prometheus.hpp> must compile on its own.
#include <ratelimit/prometheus.hpp>
#include <ratelimit/prometheus.hpp>  // and twice

#include <boost/test/unit_test.hpp>

#include <string>

BOOST_AUTO_TEST_CASE(header_prometheus) {
  std::string out;
  const ratelimit::prometheus::labelled_metrics one[] = {{{{"limiter", "a"}}, {}}};
  ratelimit::prometheus::write_text(out, one);
  BOOST_TEST(out.find("ratelimit_requests_total{limiter=\"a\"} 0\n") != std::string::npos);
}
