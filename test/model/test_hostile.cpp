//
// test/model/test_hostile.cpp: the real bucket under hostile configuration and input.
//
// Capacities and rates at the edges of the integer range, requests of 0 and
// of 2^64-1 tokens, a clock that stands still, jumps to the end of time, or
// reads before its epoch: a clear error or the right answer, never an
// overflow (the ASan+UBSan tree checks) or a hang (every wait is bounded, and
// a bucket that keeps its io_context busy fails `quiet()`).
//
#include "test_support.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

namespace rl = ratelimit;
using namespace ratelimit::test;

namespace {

constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();
constexpr std::int64_t i64_max = std::numeric_limits<std::int64_t>::max();

void set_clock(std::int64_t ns) {
  manual_clock::set(manual_clock::time_point(manual_clock::duration(ns)));
}

/// True when the io_context runs (almost) nothing once what is due has run: a
/// timer that keeps firing at once would run a handler on every poll_one().
/// (poll_one, not poll: a poll() would never return from such a loop.)
bool quiet(boost::asio::io_context& ctx) {
  const auto settle_until = std::chrono::steady_clock::now() + 5ms;
  while (std::chrono::steady_clock::now() < settle_until) {  // due timers fire (bounded)
    ctx.restart();
    ctx.poll_one();
    std::this_thread::sleep_for(50us);
  }
  int ran = 0;
  for (int i = 0; i < 2000; ++i) {
    ctx.restart();
    ran += static_cast<int>(ctx.poll_one());
  }
  return ran < 5;
}

template <typename F>
bool throws_invalid(F f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return std::string(e.what()).find("ratelimit") != std::string::npos;
  }
  return false;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(hostile, clock_fixture)

BOOST_AUTO_TEST_CASE(invalid_configuration_is_refused_clearly) {
  boost::asio::io_context ctx;
  BOOST_TEST(throws_invalid([&] { test_bucket b(ctx, 0); }));
  BOOST_TEST(throws_invalid([&] { test_bucket b(ctx, 1, rl::rate{0, 1s}); }));
  BOOST_TEST(throws_invalid([&] { test_bucket b(ctx, 1, rl::rate{1, 0ns}); }));
  BOOST_TEST(throws_invalid([&] { test_bucket b(ctx, 1, rl::rate{1, -1ns}); }));
  BOOST_TEST(throws_invalid([&] {
    test_bucket b(ctx, 1, rl::rate{1, std::chrono::nanoseconds::min()});
  }));
  BOOST_TEST(
      throws_invalid([&] { test_bucket b(ctx, 5, rl::per_second(1), rl::initial_tokens{6}); }));
  BOOST_TEST(throws_invalid(
      [&] { test_bucket b(ctx, 1, rl::per_second(1), rl::initial_tokens{u64_max}); }));

  test_bucket b(ctx, 5, rl::per_second(2));
  BOOST_TEST(throws_invalid([&] { b.set_rate(rl::rate{0, 1s}); }));
  BOOST_TEST(throws_invalid([&] { b.set_rate(rl::rate{1, -5ns}); }));
  BOOST_TEST(throws_invalid([&] { b.set_capacity(0); }));
  BOOST_TEST((b.get_rate() == rl::per_second(2)));  // nothing changed
  BOOST_TEST(b.capacity() == 5u);
  BOOST_TEST(b.available() == 5u);
}

BOOST_AUTO_TEST_CASE(largest_capacity_and_fastest_rate) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, u64_max, rl::rate{u64_max, 1ns}, rl::start_empty);
  BOOST_TEST(b.available() == 0u);
  auto all = request(b, u64_max);
  pump(ctx);
  BOOST_TEST(!all->done());
  BOOST_TEST(b.waiting() == 1u);
  manual_clock::advance(1ns);  // 2^64-1 tokens in one nanosecond
  BOOST_TEST(settle(ctx, [&] { return all->done(); }));
  BOOST_TEST(all->ok());
  BOOST_TEST(b.available() == 0u);
  manual_clock::advance(std::chrono::hours(24 * 365 * 100));  // a century: capped, no overflow
  BOOST_TEST(b.available() == u64_max);
  BOOST_TEST(b.try_get_token(u64_max));
  BOOST_TEST(b.available() == 0u);
  b.set_rate(rl::rate{1, std::chrono::nanoseconds::max()});  // slowest, from the fastest
  b.set_capacity(u64_max - 1);
  manual_clock::advance(1s);
  BOOST_TEST(b.available() == 0u);
  BOOST_TEST(quiet(ctx));
}

BOOST_AUTO_TEST_CASE(requests_of_zero_and_of_max_tokens) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, 10, rl::per_second(1), rl::start_empty);
  auto zero = request(b, 0);  // nothing queued: succeeds at once (posted, not inline)
  BOOST_TEST(!zero->done());
  auto max = request(b, u64_max);
  BOOST_TEST(settle(ctx, [&] { return zero->done() && max->done(); }));
  BOOST_TEST(zero->ok());
  BOOST_TEST(max->ec == rl::error::exceeds_capacity);
  BOOST_TEST(!b.try_get_token(u64_max));
  BOOST_TEST(b.try_get_token(0));

  auto five = request(b, 5);
  auto zero_behind = request(b, 0);  // in its turn: after `five`
  pump(ctx);
  BOOST_TEST(!zero_behind->done());
  BOOST_TEST(!b.try_get_token(0));  // someone is queued
  manual_clock::advance(5s);
  BOOST_TEST(settle(ctx, [&] { return zero_behind->done(); }));
  BOOST_TEST(five->ok());
  BOOST_TEST(zero_behind->ok());
  BOOST_TEST(five->order < zero_behind->order);

  // The blocking calls refuse 2^64-1 tokens at once, whatever the timeout.
  boost::system::error_code ec;
  BOOST_TEST(!b.try_get_token_for(std::chrono::hours::max(), u64_max, ec));
  BOOST_TEST(ec == rl::error::exceeds_capacity);
  BOOST_TEST(!b.try_get_token_for(std::chrono::nanoseconds::min(), 10, ec));  // not there: at once
  BOOST_TEST(!ec);
  b.get_token(0, ec);  // nothing queued: granted without blocking
  BOOST_TEST(!ec);
}

BOOST_AUTO_TEST_CASE(capacity_edge_requests) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, u64_max - 1, rl::rate{u64_max, 1s});
  auto over = request(b, u64_max);  // capacity + 1
  auto exact = request(b, u64_max - 1);
  BOOST_TEST(settle(ctx, [&] { return over->done() && exact->done(); }));
  BOOST_TEST(over->ec == rl::error::exceeds_capacity);
  BOOST_TEST(exact->ok());
  auto again = request(b, u64_max - 1);
  manual_clock::advance(1s - 1ns);  // 2^64-1 tokens a second: one short of the full bucket
  pump(ctx);
  BOOST_TEST(!again->done());
  manual_clock::advance(1ns);
  BOOST_TEST(settle(ctx, [&] { return again->done(); }));
  BOOST_TEST(again->ok());
}

BOOST_AUTO_TEST_CASE(clock_standing_still) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, 3, rl::per_second(1), rl::start_empty);
  auto r = request(b, 1);
  BOOST_TEST(quiet(ctx));  // waits, without spinning
  BOOST_TEST(!r->done());
  BOOST_TEST(b.available() == 0u);
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
}

// Regression (found by the fuzzer, test/fuzz/regressions/clock_at_max_time_timer_spin):
// with the clock at the end of representable time and a waiter whose tokens
// would come later still, the bucket re-armed its timer at that same instant
// forever: a busy loop inside io_context::poll().
BOOST_AUTO_TEST_CASE(clock_at_the_end_of_time) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, 10, rl::per_second(1), rl::start_empty);
  set_clock(i64_max);
  auto all = request(b, 10);  // full by then: granted at once
  BOOST_TEST(settle(ctx, [&] { return all->done(); }));
  BOOST_TEST(all->ok());
  BOOST_TEST(b.available() == 0u);
  auto never = request(b, 5);  // its tokens would come after the end of time
  BOOST_TEST(quiet(ctx));
  BOOST_TEST(!never->done());
  b.set_rate(rl::per_second(1000));  // rescheduled: still never, still quiet
  BOOST_TEST(quiet(ctx));
  BOOST_TEST(!never->done());
  b.set_capacity(4);  // now it can never fit
  BOOST_TEST(settle(ctx, [&] { return never->done(); }));
  BOOST_TEST(never->ec == rl::error::exceeds_capacity);
  auto waits = request(b, 1);
  BOOST_TEST(quiet(ctx));
  BOOST_TEST(!waits->done());
  BOOST_TEST(b.cancel() == 1u);
  BOOST_TEST(settle(ctx, [&] { return waits->done(); }));
  BOOST_TEST(waits->ec == boost::asio::error::operation_aborted);
}

// Regression (found by the fuzzer, test/fuzz/regressions/end_of_time_due_waiter_not_served):
// the first fix above also disarmed the timer for a waiter whose tokens *are*
// there as of the end of time, queued while the clock read earlier; it was
// then never granted when the clock came back to the end of time.
BOOST_AUTO_TEST_CASE(waiter_due_at_the_end_of_time_is_served) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, 10, rl::per_second(1), rl::start_empty);
  set_clock(i64_max);
  auto all = request(b, 10);  // the bucket is full by then: granted, now empty
  auto big = request(b, 5);   // never: no more time for tokens to accrue
  auto zero = request(b, 0);  // behind `big`
  BOOST_TEST(settle(ctx, [&] { return all->done(); }));
  set_clock(i64_max - 1000);  // the clock reads earlier than the latest time seen
  b.set_capacity(4);          // `big` can never fit; `zero` is due as of the end of time
  BOOST_TEST(settle(ctx, [&] { return big->done(); }));
  BOOST_TEST(big->ec == rl::error::exceeds_capacity);
  pump(ctx);
  BOOST_TEST(!zero->done());
  set_clock(i64_max);
  BOOST_TEST(settle(ctx, [&] { return zero->done(); }));
  BOOST_TEST(zero->ok());
  BOOST_TEST(quiet(ctx));
}

BOOST_AUTO_TEST_CASE(slowest_rate_never_arrives_and_never_spins) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, u64_max, rl::rate{1, std::chrono::nanoseconds::max()}, rl::start_empty);
  auto r = request(b, 1);
  set_clock(i64_max - 1);  // (2^63 - 1e12) ns of accrual: less than one token
  BOOST_TEST(quiet(ctx));
  BOOST_TEST(!r->done());
  set_clock(i64_max);
  BOOST_TEST(quiet(ctx));
  BOOST_TEST(!r->done());
  BOOST_TEST(b.available() == 0u);
  b.close();
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ec == rl::error::bucket_closed);
}

// Regression (found by the fuzzer, test/fuzz/regressions/negative_time_ready_at_overflow):
// a bucket whose clock reads before its epoch computed max_time - last in
// int64 and overflowed (undefined behaviour; caught by the ASan+UBSan tree).
BOOST_AUTO_TEST_CASE(clock_before_its_epoch) {
  set_clock(-4'000'000'000'000'000'000);
  boost::asio::io_context ctx;
  test_bucket b(ctx, 4, rl::rate{1, 1ms}, rl::start_empty);
  auto r = request(b, 3);
  manual_clock::advance(3ms - 1ns);
  pump(ctx);
  BOOST_TEST(!r->done());
  manual_clock::advance(1ns);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
  set_clock(std::numeric_limits<std::int64_t>::min());  // back to the very first instant
  BOOST_TEST(b.available() == 0u);
  auto s = request(b, 1);
  BOOST_TEST(quiet(ctx));
  set_clock(-4'000'000'000'000'000'000 + 4'000'000);  // 1 ms after the last grant
  BOOST_TEST(settle(ctx, [&] { return s->done(); }));
  BOOST_TEST(s->ok());
}

BOOST_AUTO_TEST_CASE(clock_jumping_back_and_far_ahead) {
  boost::asio::io_context ctx;
  test_bucket b(ctx, 10, rl::per_second(10), rl::start_empty);
  auto a = request(b, 4);
  manual_clock::advance(200ms);
  BOOST_TEST(b.available() == 2u);
  set_clock(manual_clock::origin - 3'600'000'000'000);  // an hour back: no tokens minted or lost
  pump(ctx);
  BOOST_TEST(!a->done());
  BOOST_TEST(b.available() == 2u);
  set_clock(manual_clock::origin + 399'999'999);
  pump(ctx);
  BOOST_TEST(!a->done());
  set_clock(manual_clock::origin + 400'000'000);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  manual_clock::advance(std::chrono::hours(24 * 365 * 200));  // two centuries ahead
  BOOST_TEST(b.available() == 10u);
  auto full = request(b, 10);
  BOOST_TEST(settle(ctx, [&] { return full->done(); }));
  BOOST_TEST(full->ok());
}

BOOST_AUTO_TEST_SUITE_END()
