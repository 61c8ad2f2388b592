// Configuration: validation with clear messages, observers, set_rate and
// set_capacity with waiters pending, the edges of the integer range, and the
// error category.
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <limits>
#include <string>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

namespace {

auto says(const char* what) {
  return [what](const std::invalid_argument& e) {
    return std::string(e.what()).find(what) != std::string::npos;
  };
}

constexpr std::uint64_t u64max = std::numeric_limits<std::uint64_t>::max();

}  // namespace

BOOST_FIXTURE_TEST_SUITE(validation, clock_fixture)

BOOST_AUTO_TEST_CASE(invalid_configuration_is_rejected_with_a_message) {
  asio::io_context ctx;
  BOOST_CHECK_EXCEPTION(test_bucket(ctx, 0, per_second(1)), std::invalid_argument,
                        says("capacity must be at least 1"));
  BOOST_CHECK_EXCEPTION(test_bucket(ctx, 5, per_second(0)), std::invalid_argument,
                        says("at least one token"));
  BOOST_CHECK_EXCEPTION(test_bucket(ctx, 5, ratelimit::rate{1, 0s}), std::invalid_argument,
                        says("period must be positive"));
  BOOST_CHECK_EXCEPTION(test_bucket(ctx, 5, ratelimit::rate{1, -1s}), std::invalid_argument,
                        says("period must be positive"));
  BOOST_CHECK_EXCEPTION(test_bucket(ctx, 5, per_second(1), ratelimit::initial_tokens{6}),
                        std::invalid_argument, says("exceed the capacity"));
  BOOST_TEST(ctx.poll() == 0u);
}

BOOST_AUTO_TEST_CASE(invalid_changes_throw_and_change_nothing) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(2));
  BOOST_CHECK_EXCEPTION(bucket.set_rate(per_second(0)), std::invalid_argument,
                        says("at least one token"));
  BOOST_CHECK_EXCEPTION(bucket.set_capacity(0), std::invalid_argument,
                        says("capacity must be at least 1"));
  BOOST_TEST((bucket.get_rate() == per_second(2)));
  BOOST_TEST(bucket.capacity() == 5u);
  BOOST_TEST(bucket.available() == 5u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(reconfiguration, clock_fixture)

BOOST_AUTO_TEST_CASE(faster_rate_brings_the_waiter_forward) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1), ratelimit::start_empty);
  auto r = request(bucket, 4);  // due at 4 s
  manual_clock::advance(1s);    // 1 token
  bucket.set_rate(per_second(3));
  manual_clock::advance(999ms);  // 1 + 2.997 tokens
  pump(ctx);
  BOOST_TEST(!r->done());
  manual_clock::advance(1ms);  // 4 tokens at 2 s instead of 4 s
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_CASE(slower_rate_pushes_the_waiter_back) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(2), ratelimit::start_empty);
  auto r = request(bucket, 2);  // due at 1 s
  manual_clock::advance(500ms);  // 1 token
  bucket.set_rate(per_second(1));
  manual_clock::advance(500ms);  // t = 1 s: only 1.5 tokens now
  pump(ctx);
  BOOST_TEST(!r->done());
  manual_clock::advance(500ms);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST((bucket.get_rate() == per_second(1)));
}

BOOST_AUTO_TEST_CASE(lower_capacity_fails_requests_it_cannot_hold) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1), ratelimit::start_empty);
  auto a = request(bucket, 2);
  auto b = request(bucket, 8);
  auto c = request(bucket, 3);
  manual_clock::advance(1s);
  bucket.set_capacity(4);
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  BOOST_TEST(b->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(bucket.waiting() == 2u);
  manual_clock::advance(1s);  // a at 2 s, as before
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ok());
  pump(ctx);
  BOOST_TEST(!c->done());
  manual_clock::advance(3s);  // c at 5 s, no longer behind b
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(c->ok());
  BOOST_TEST(bucket.capacity() == 4u);
}

BOOST_AUTO_TEST_CASE(lower_capacity_drops_the_excess) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1));
  bucket.set_capacity(3);
  BOOST_TEST(bucket.available() == 3u);
  bucket.set_capacity(6);
  BOOST_TEST(bucket.available() == 3u);
  manual_clock::advance(1h);
  BOOST_TEST(bucket.available() == 6u);
}

BOOST_AUTO_TEST_CASE(observers) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 7, ratelimit::rate{3, 2s}, ratelimit::initial_tokens{4});
  BOOST_TEST(bucket.capacity() == 7u);
  BOOST_TEST((bucket.get_rate() == ratelimit::rate{3, 2s}));
  BOOST_TEST(bucket.available() == 4u);
  BOOST_TEST(bucket.waiting() == 0u);
  auto r = request(bucket, 6);
  BOOST_TEST(bucket.waiting() == 1u);
  BOOST_TEST(bucket.available() == 4u);
  manual_clock::advance(1s);  // +1.5 tokens
  BOOST_TEST(bucket.available() == 5u);
  manual_clock::advance(1s);  // +1.5: 7 tokens, 6 taken by the waiter
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(bucket.available() == 1u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(integer_edges, clock_fixture)

BOOST_AUTO_TEST_CASE(one_token_per_hour) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, ratelimit::per_hour(1), ratelimit::start_empty);
  auto r = request(bucket);
  manual_clock::advance(3599s);
  pump(ctx);
  BOOST_TEST(!r->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
}

BOOST_AUTO_TEST_CASE(a_billion_per_second_for_years) {
  asio::io_context ctx;
  test_bucket bucket(ctx, u64max, per_second(1'000'000'000), ratelimit::start_empty);
  manual_clock::advance(std::chrono::hours(24 * 365 * 50));  // 50 years
  const std::uint64_t expected = std::uint64_t{1'000'000'000} * 3600 * 24 * 365 * 50;
  BOOST_TEST(bucket.available() == expected);
  BOOST_TEST(bucket.try_get_token(expected));
  BOOST_TEST(bucket.available() == 0u);
}

BOOST_AUTO_TEST_CASE(requests_of_zero_and_of_two_to_the_64_minus_one) {
  asio::io_context ctx;
  test_bucket small(ctx, 5, per_second(1));
  auto huge = request(small, u64max);
  auto zero = request(small, 0);
  BOOST_TEST(settle(ctx, [&] { return huge->done() && zero->done(); }));
  BOOST_TEST(huge->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(zero->ok());
  BOOST_TEST(!small.try_get_token(u64max));
  BOOST_TEST(small.try_get_token(0));

  // A bucket that can hold 2^64-1 tokens, refilled once per hour, takes
  // that request and schedules it beyond any time point without overflow.
  test_bucket vast(ctx, u64max, ratelimit::per_hour(1), ratelimit::start_empty);
  auto r = request(vast, u64max);
  pump(ctx);
  BOOST_TEST(!r->done());
  manual_clock::advance(std::chrono::hours(24 * 365 * 100));
  pump(ctx);
  BOOST_TEST(!r->done());
  BOOST_TEST(!vast.try_get_token_for(std::chrono::hours(1000), 1));  // the queue is ahead
  vast.cancel();
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
}

BOOST_AUTO_TEST_CASE(a_clock_that_goes_back_mints_nothing) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1), ratelimit::start_empty);
  manual_clock::advance(3s);
  BOOST_TEST(bucket.available() == 3u);
  manual_clock::advance(-2s);
  BOOST_TEST(bucket.available() == 3u);
  manual_clock::advance(2s);  // back where it was: nothing new
  BOOST_TEST(bucket.available() == 3u);
  manual_clock::advance(1s);
  BOOST_TEST(bucket.available() == 4u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(error_category)

BOOST_AUTO_TEST_CASE(codes_have_their_own_category_and_messages) {
  using namespace ratelimit::error;
  const boost::system::error_code ec = exceeds_capacity;
  BOOST_TEST(ec.category().name() == std::string("ratelimit"));
  BOOST_TEST(ec.message() == "request exceeds the bucket's capacity");
  BOOST_TEST(boost::system::error_code(bucket_closed).message() == "token bucket closed");
  BOOST_TEST(boost::system::error_code(would_deadlock).message().find("blocking wait") == 0u);
  for (int e = exceeds_capacity; e <= redis_bad_reply; ++e)
    BOOST_TEST(make_error_code(static_cast<errors>(e)).message() != "unknown ratelimit error");
  BOOST_TEST(ec != boost::asio::error::operation_aborted);
  BOOST_TEST((&get_category() == &make_error_code(bucket_closed).category()));
}

BOOST_AUTO_TEST_SUITE_END()
