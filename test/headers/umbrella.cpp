// <ratelimit.hpp> must compile on its own and bring in the whole API.
#include <ratelimit.hpp>

#include <boost/test/unit_test.hpp>

#include <type_traits>

BOOST_AUTO_TEST_CASE(umbrella_declares_the_api) {
  static_assert(std::is_same_v<ratelimit::token_bucket::clock_type, std::chrono::steady_clock>);
  static_assert(std::is_same_v<ratelimit::token_bucket::executor_type, boost::asio::any_io_executor>);
  static_assert(ratelimit::per_second(5) == ratelimit::rate{5, std::chrono::seconds(1)});
  static_assert(ratelimit::rate{} == ratelimit::per_second(1), "the default rate is 1/s");
  BOOST_TEST(ratelimit::error::make_error_code(ratelimit::error::bucket_closed).category().name() ==
             std::string("ratelimit"));
}
