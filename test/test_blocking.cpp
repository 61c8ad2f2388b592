// The blocking calls: get_token (throwing and error_code forms),
// try_get_token_for, FIFO with asynchronous waiters, and the refusal to block
// a thread that runs the bucket's own event loop.
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

BOOST_FIXTURE_TEST_SUITE(get_token, clock_fixture)

BOOST_AUTO_TEST_CASE(returns_at_once_when_tokens_are_there) {
  asio::io_context ctx;  // not even running: no wait is needed
  test_bucket bucket(ctx, 3, per_second(1));
  bucket.get_token();
  bucket.get_token(2);
  BOOST_TEST(bucket.available() == 0u);
}

BOOST_AUTO_TEST_CASE(blocks_until_the_tokens_are_due) {
  running_context rc;
  test_bucket bucket(rc.ctx, 2, per_second(1), ratelimit::start_empty);
  std::atomic<int> done{0};
  std::thread worker([&] {
    bucket.get_token(2);
    done = 1;
  });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1; }));
  manual_clock::advance(1s);
  std::this_thread::sleep_for(20ms);
  BOOST_TEST(done.load() == 0);
  manual_clock::advance(1s);
  BOOST_TEST(eventually([&] { return done.load() == 1; }));
  worker.join();
  BOOST_TEST(bucket.available() == 0u);
}

BOOST_AUTO_TEST_CASE(threads_are_served_in_arrival_order_with_async_waiters) {
  running_context rc;
  test_bucket bucket(rc.ctx, 1, per_second(1), ratelimit::start_empty);
  std::mutex m;
  std::vector<int> order;
  auto note = [&](int who) {
    std::lock_guard lk(m);
    order.push_back(who);
  };
  std::thread t1([&] {
    bucket.get_token();
    note(1);
  });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1; }));
  bucket.async_get_token([&](boost::system::error_code ec) {
    if (!ec) note(2);
  });
  std::thread t3([&] {
    bucket.get_token();
    note(3);
  });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 3; }));
  for (int i = 1; i <= 3; ++i) {
    manual_clock::advance(1s);
    BOOST_TEST(eventually([&] {
      std::lock_guard lk(m);
      return order.size() == static_cast<std::size_t>(i);
    }));
  }
  t1.join();
  t3.join();
  BOOST_TEST((order == std::vector<int>{1, 2, 3}));
}

BOOST_AUTO_TEST_CASE(errors_throw_system_error_or_set_the_code) {
  running_context rc;
  test_bucket bucket(rc.ctx, 2, per_second(1));
  try {
    bucket.get_token(3);
    BOOST_FAIL("expected exceeds_capacity");
  } catch (const boost::system::system_error& e) {
    BOOST_TEST(e.code() == ratelimit::error::exceeds_capacity);
  }
  boost::system::error_code ec;
  bucket.get_token(3, ec);
  BOOST_TEST(ec == ratelimit::error::exceeds_capacity);
  bucket.get_token(ec);
  BOOST_TEST(!ec);
  BOOST_TEST(bucket.available() == 1u);
  bucket.close();
  bucket.get_token(ec);
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_CHECK_THROW(bucket.get_token(), boost::system::system_error);
}

BOOST_AUTO_TEST_CASE(close_and_cancel_wake_blocked_threads) {
  running_context rc;
  test_bucket bucket(rc.ctx, 1, per_second(1), ratelimit::start_empty);
  boost::system::error_code ec1, ec2;
  std::thread a([&] { bucket.get_token(1, ec1); });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1; }));
  BOOST_TEST(bucket.cancel() == 1u);
  a.join();
  BOOST_TEST(ec1 == asio::error::operation_aborted);
  std::thread b([&] { bucket.get_token(1, ec2); });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1; }));
  bucket.close();
  b.join();
  BOOST_TEST(ec2 == ratelimit::error::bucket_closed);
}

BOOST_AUTO_TEST_CASE(destroying_the_bucket_wakes_blocked_threads) {
  running_context rc;
  auto bucket = std::make_unique<test_bucket>(rc.ctx, 1, per_second(1), ratelimit::start_empty);
  boost::system::error_code ec;
  std::thread a([&, b = bucket.get()] { b->get_token(1, ec); });
  BOOST_TEST(eventually([&] { return bucket->waiting() == 1; }));
  bucket.reset();
  a.join();
  BOOST_TEST(ec == asio::error::operation_aborted);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(on_the_event_loop_thread, clock_fixture)

BOOST_AUTO_TEST_CASE(fails_at_once_instead_of_deadlocking) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1));
  boost::system::error_code first, second;
  bool threw = false;
  asio::post(ctx, [&] {
    bucket.get_token(first);   // the token is there: fine even here
    bucket.get_token(second);  // must wait: would deadlock
    try {
      bucket.get_token();
    } catch (const boost::system::system_error& e) {
      threw = e.code() == ratelimit::error::would_deadlock;
    }
  });
  ctx.run();
  BOOST_TEST(!first);
  BOOST_TEST(second == ratelimit::error::would_deadlock);
  BOOST_TEST(threw);
  BOOST_TEST(bucket.waiting() == 0u);  // nothing was queued
}

BOOST_AUTO_TEST_CASE(detected_through_a_strand_too) {
  asio::io_context ctx;
  auto strand = asio::make_strand(ctx);
  test_bucket bucket(strand, 1, per_second(1), ratelimit::start_empty);
  boost::system::error_code ec;
  asio::post(strand, [&] { bucket.get_token(ec); });
  ctx.run();
  BOOST_TEST(ec == ratelimit::error::would_deadlock);
}

BOOST_AUTO_TEST_CASE(detected_on_a_thread_pool) {
  asio::thread_pool pool(2);
  ratelimit::basic_token_bucket<manual_clock, manual_wait_traits> bucket(
      pool.get_executor(), 1, per_second(1), ratelimit::start_empty);
  std::promise<boost::system::error_code> p;
  asio::post(pool, [&] {
    boost::system::error_code ec;
    bucket.try_get_token_for(10s, 1, ec);
    p.set_value(ec);
  });
  BOOST_TEST(p.get_future().get() == ratelimit::error::would_deadlock);
  pool.join();
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(try_get_token_for, clock_fixture)

BOOST_AUTO_TEST_CASE(false_at_once_when_the_wait_cannot_end_in_time) {
  asio::io_context ctx;  // not running: any real wait would hang the test
  test_bucket bucket(ctx, 5, per_second(1), ratelimit::start_empty);
  const auto t0 = std::chrono::steady_clock::now();
  BOOST_TEST(!bucket.try_get_token_for(999ms));
  BOOST_TEST(!bucket.try_get_token_for(4s, 5));
  BOOST_TEST(!bucket.try_get_token_for(0s));
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 5s));
  BOOST_TEST(bucket.waiting() == 0u);
  manual_clock::advance(1s);
  BOOST_TEST(bucket.try_get_token_for(0s));  // the token is there now
}

BOOST_AUTO_TEST_CASE(counts_the_waiters_ahead) {
  running_context rc;
  test_bucket bucket(rc.ctx, 5, per_second(1), ratelimit::start_empty);
  auto ahead = request(bucket, 3);               // due at 3 s
  BOOST_TEST(!bucket.try_get_token_for(3s, 1));  // would be due at 4 s
  std::atomic<int> got{-1};
  std::thread t([&] { got = bucket.try_get_token_for(4s, 1); });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 2; }));
  manual_clock::advance(4s);
  t.join();
  BOOST_TEST(got.load() == 1);
}

BOOST_AUTO_TEST_CASE(gives_up_at_the_deadline_taking_nothing) {
  running_context rc;
  test_bucket bucket(rc.ctx, 5, per_second(1), ratelimit::start_empty);
  std::atomic<int> got{-1};
  std::thread t([&] { got = bucket.try_get_token_for(2s, 2); });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1; }));
  bucket.set_rate(ratelimit::per_minute(1));  // now it cannot make it
  manual_clock::advance(2s);
  BOOST_TEST(eventually([&] { return got.load() != -1; }));
  t.join();
  BOOST_TEST(got.load() == 0);
  BOOST_TEST(bucket.waiting() == 0u);
  // Whatever accrued is still there for the next caller.
  BOOST_TEST(bucket.available() == 0u);
  manual_clock::advance(60s);
  BOOST_TEST(bucket.try_get_token(1));
}

BOOST_AUTO_TEST_CASE(errors) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1));
  BOOST_CHECK_THROW(bucket.try_get_token_for(1s, 3), boost::system::system_error);
  boost::system::error_code ec;
  BOOST_TEST(!bucket.try_get_token_for(1s, 3, ec));
  BOOST_TEST(ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(bucket.try_get_token_for(std::chrono::hours::max(), 2, ec));  // saturates
  BOOST_TEST(!ec);
  bucket.close();
  BOOST_TEST(!bucket.try_get_token_for(1s, 1, ec));
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
}

BOOST_AUTO_TEST_SUITE_END()
