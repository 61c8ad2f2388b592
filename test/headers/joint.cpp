// <ratelimit/joint.hpp> must compile on its own.
#include <ratelimit/joint.hpp>
#include <ratelimit/joint.hpp>  // and twice

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_joint) {
  boost::asio::io_context ctx;
  ratelimit::token_bucket a(ctx, 2, ratelimit::per_second(1));
  ratelimit::token_bucket b(ctx, 2, ratelimit::per_second(1));
  auto r = ratelimit::try_acquire({ratelimit::part(a, 1), ratelimit::part(b, 2)});
  BOOST_TEST(r.has_value());
  BOOST_TEST(r->size() == 2u);
  BOOST_TEST(r->give_back_all() == 3u);
}
