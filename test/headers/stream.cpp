// <ratelimit/stream.hpp> must compile on its own.
#include <ratelimit/stream.hpp>
#include <ratelimit/stream.hpp>  // and twice

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_stream) {
  boost::asio::io_context ctx;
  ratelimit::token_bucket bucket(ctx, 100, ratelimit::per_second(10));
  ratelimit::rate_limited_stream<boost::asio::ip::tcp::socket> s(ctx);
  s.set_limits({ratelimit::part(bucket)});
  BOOST_TEST(s.slice() == 16384u);
  BOOST_TEST(!s.is_closed());
  s.close();
  BOOST_TEST(s.is_closed());
}
