// The few tests on the real clock, with generous bounds: the steady_clock
// bucket paces grants, and a bucket nobody waits on costs nothing.
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>

namespace asio = boost::asio;
using ratelimit::per_second;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

BOOST_AUTO_TEST_SUITE(real_time)

BOOST_AUTO_TEST_CASE(paces_grants_at_the_rate) {
  asio::io_context ctx;
  // t0 before the bucket: its first token is due 50 ms after its
  // construction, which is no earlier than 50 ms after t0. (Read after the
  // construction, t0 could be late by a preemption, and every grant "early".)
  const auto t0 = steady::now();
  ratelimit::token_bucket bucket(ctx, 1, per_second(20), ratelimit::start_empty);
  std::vector<steady::duration> at;
  for (int i = 0; i < 10; ++i)
    bucket.async_get_token([&](boost::system::error_code ec) {
      if (!ec) at.push_back(steady::now() - t0);
    });
  ctx.run();
  BOOST_REQUIRE(at.size() == 10u);
  // Grant i is due at (i+1) * 50 ms: never early, and not absurdly late.
  for (std::size_t i = 0; i < at.size(); ++i) {
    BOOST_TEST((at[i] >= std::chrono::milliseconds(50 * (i + 1))));
    BOOST_TEST((at[i] < std::chrono::milliseconds(50 * (i + 1)) + 2s));
  }
}

BOOST_AUTO_TEST_CASE(an_idle_bucket_runs_no_handlers) {
  asio::io_context ctx;
  ratelimit::token_bucket bucket(ctx, 5, per_second(1000));
  BOOST_TEST(bucket.try_get_token(5));
  const auto t0 = steady::now();
  BOOST_TEST(ctx.run_for(200ms) == 0u);  // returns at once: no work at all
  BOOST_TEST((steady::now() - t0 < 150ms));
  std::this_thread::sleep_for(20ms);
  BOOST_TEST(bucket.available() == 5u);
}

BOOST_AUTO_TEST_CASE(run_returns_once_the_last_waiter_is_cancelled) {
  asio::io_context ctx;
  ratelimit::token_bucket bucket(ctx, 1, ratelimit::per_hour(1), ratelimit::start_empty);
  asio::cancellation_signal sig;
  boost::system::error_code result;
  bucket.async_get_token(
      asio::bind_cancellation_slot(sig.slot(), [&](boost::system::error_code ec) { result = ec; }));
  asio::steady_timer t(ctx, 50ms);
  t.async_wait([&](auto) { sig.emit(asio::cancellation_type::terminal); });
  const auto t0 = steady::now();
  ctx.run();  // would wait an hour if the bucket's timer stayed armed
  BOOST_TEST((steady::now() - t0 < 10s));
  BOOST_TEST(result == asio::error::operation_aborted);
}

BOOST_AUTO_TEST_CASE(blocking_threads_with_a_running_loop) {
  asio::io_context ctx;
  const auto t0 = steady::now();  // before the bucket, as above
  ratelimit::token_bucket bucket(ctx, 2, per_second(50));
  auto guard = asio::make_work_guard(ctx);
  std::thread loop([&] { ctx.run(); });
  std::vector<std::thread> workers;
  for (int i = 0; i < 4; ++i)
    workers.emplace_back([&] {
      for (int j = 0; j < 3; ++j)
        bucket.get_token();
    });
  for (auto& w : workers)
    w.join();
  const auto took = steady::now() - t0;
  guard.reset();
  loop.join();
  // 12 tokens: 2 at once, 10 more at 50/s = 200 ms at least.
  BOOST_TEST((took >= 200ms));
  BOOST_TEST((took < 10s));
}

BOOST_AUTO_TEST_SUITE_END()
