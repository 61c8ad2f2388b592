// The blocking calls: get_token (throwing and error_code forms),
// try_get_token_for, FIFO with asynchronous waiters, and the refusal to block
// a thread that runs the bucket's own event loop.
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>

#include <functional>
#include <future>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

namespace {

using test_keyed = ratelimit::basic_keyed_limiter<int, std::hash<int>, std::equal_to<int>,
                                                  manual_clock, manual_wait_traits>;

/// Runs `call` (a blocking call returning its error) on a thread of its own
/// and returns what it returned. A call still blocked after `limit` is a
/// failure: it is reported, and `release` (which must end the wait, e.g. by
/// closing the bucket) is run so that the test ends anyway.
boost::system::error_code bounded(std::function<boost::system::error_code()> call,
                                  std::function<void()> release,
                                  std::chrono::seconds limit = std::chrono::seconds(10)) {
  auto result = std::async(std::launch::async, std::move(call));
  if (result.wait_for(limit) != std::future_status::ready) {
    BOOST_ERROR("a blocking call did not return within " << limit.count() << " s");
    release();
  }
  return result.get();
}

}  // namespace

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

// "Known at once" is exact: the waiter ahead is granted at a whole
// nanosecond when its bucket of capacity 1 is a little over full (2e-9 of a
// token is lost to the capacity), so the next token is due at 666 666 668 ns,
// not at the 666 666 667 ns where two tokens' worth of accrual would put it.
// A deadline at 666 666 667 ns cannot be met and fails at once instead of
// waiting for it.
BOOST_AUTO_TEST_CASE(false_at_once_counts_what_the_capacity_takes_at_a_grant) {
  running_context rc;
  test_bucket bucket(rc.ctx, 1, ratelimit::rate{3, 1s}, ratelimit::start_empty);
  auto ahead = request(bucket);  // due at 333 333 334 ns
  auto call =
      std::async(std::launch::async, [&] { return bucket.try_get_token_for(666'666'667ns, 1); });
  const bool returned = call.wait_for(10s) == std::future_status::ready;
  BOOST_TEST(returned);                      // at once, the manual clock standing still
  if (!returned) manual_clock::advance(1s);  // let it go
  BOOST_TEST(!call.get());
  BOOST_TEST(bucket.retry_after(1)->count() == 666'666'668);
  manual_clock::advance(333'333'334ns);
  BOOST_TEST(eventually([&] { return ahead->done(); }));
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

// --- A context nobody runs ------------------------------------------------------
//
// A blocking call that must wait needs someone to run the bucket's context.
// When its io_context is stopped (run() has returned, typically for want of
// a work guard), nobody will: the call fails at once with context_stopped.
// The old code waited forever (the tests bound the wait: they would fail
// after 10 s, then release the caller by closing the bucket).

BOOST_FIXTURE_TEST_SUITE(on_a_stopped_context, clock_fixture)

BOOST_AUTO_TEST_CASE(fails_at_once_with_context_stopped) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
  ctx.run();  // no work: returns at once, and the context is stopped
  BOOST_REQUIRE(ctx.stopped());
  const auto release = [&] { bucket.close(); };
  BOOST_TEST(bounded(
                 [&] {
                   boost::system::error_code ec;
                   bucket.get_token(ec);
                   return ec;
                 },
                 release) == ratelimit::error::context_stopped);
  BOOST_TEST(bounded(
                 [&] {
                   boost::system::error_code ec;
                   BOOST_TEST(!bucket.try_get_token_for(1h, 1, ec));
                   return ec;
                 },
                 release) == ratelimit::error::context_stopped);
  BOOST_TEST(bounded(
                 [&]() -> boost::system::error_code {
                   try {
                     bucket.get_token();
                   } catch (const boost::system::system_error& e) {
                     return e.code();
                   }
                   return {};
                 },
                 release) == ratelimit::error::context_stopped);
  BOOST_TEST(bucket.waiting() == 0u);  // nothing was queued
  // Where no wait is needed, a stopped context does not matter.
  manual_clock::advance(1s);
  bucket.get_token();
  // Nor is the verdict sticky: run the context again and the call waits.
  ctx.restart();
  running_context again;
  test_bucket live(again.ctx, 1, per_second(1), ratelimit::start_empty);
  std::thread advance([&] {
    eventually([&] { return live.waiting() == 1; });
    manual_clock::advance(1s);
  });
  BOOST_TEST(!bounded(
      [&] {
        boost::system::error_code ec;
        live.get_token(ec);
        return ec;
      },
      [&] { live.close(); }));
  advance.join();
}

BOOST_AUTO_TEST_CASE(keyed_limiter_fails_at_once_with_context_stopped) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 4);
  BOOST_TEST(l.try_get_token(1));
  ctx.run();
  BOOST_REQUIRE(ctx.stopped());
  BOOST_TEST(bounded(
                 [&] {
                   boost::system::error_code ec;
                   l.get_token(1, ec);
                   return ec;
                 },
                 [&] { l.close(); }) == ratelimit::error::context_stopped);
  BOOST_TEST(l.try_get_token(1, 0));  // nothing was queued
  l.get_token(2);                     // a new key's bucket is full: no wait needed
}

BOOST_AUTO_TEST_SUITE_END()

// --- would_deadlock, whatever the executor --------------------------------------
//
// The bucket's executor may be any of: an io_context's or a thread_pool's
// executor (plain or tracking work), a strand over one, a strand over an
// any_io_executor holding one; always held in an any_io_executor. From a
// handler running there, a blocking call that must wait fails at once.

BOOST_FIXTURE_TEST_SUITE(would_deadlock_for_every_executor, clock_fixture)

namespace {

/// From a handler posted to `ex`: get_token, try_get_token_for and a keyed
/// get_token, each of which would have to wait.
std::vector<boost::system::error_code> blocking_calls_from_inside(const asio::any_io_executor& ex) {
  test_bucket bucket(ex, 1, per_second(1), ratelimit::start_empty);
  test_keyed keyed(ex, 1, per_second(1), 4);
  BOOST_TEST(keyed.try_get_token(1));
  std::promise<std::vector<boost::system::error_code>> p;
  asio::post(ex, [&] {
    std::vector<boost::system::error_code> ecs(3);
    bucket.get_token(ecs[0]);
    bucket.try_get_token_for(1h, 1, ecs[1]);
    keyed.get_token(1, ecs[2]);
    p.set_value(ecs);
  });
  auto f = p.get_future();
  if (f.wait_for(10s) != std::future_status::ready) {
    BOOST_ERROR("a blocking call waited on its own context's thread");
    bucket.close();  // releases it
    keyed.close();
  }
  return f.get();
}

template <typename Executor>
void check_executors(const Executor& ex) {
  auto tracked = asio::prefer(ex, asio::execution::outstanding_work.tracked);
  const std::pair<const char*, asio::any_io_executor> kinds[] = {
      {"plain", ex},
      {"tracked", tracked},
      {"strand", asio::make_strand(ex)},
      {"strand, tracked", asio::make_strand(tracked)},
      {"strand over any_io_executor", asio::make_strand(asio::any_io_executor(ex))},
  };
  for (const auto& [what, kind] : kinds) {
    BOOST_TEST_CONTEXT(what) {
      for (const auto& ec : blocking_calls_from_inside(kind))
        BOOST_TEST(ec == ratelimit::error::would_deadlock);
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(io_context) {
  running_context rc(2);
  check_executors(rc.ctx.get_executor());
}

BOOST_AUTO_TEST_CASE(thread_pool) {
  asio::thread_pool pool(2);
  check_executors(pool.get_executor());
  pool.join();
}

BOOST_AUTO_TEST_SUITE_END()

// --- a clock that moves between two readings ----------------------------------
//
// The manual clock stands still during a call, so it cannot show a decision
// that mixes two readings. This one is a legal steady clock that moves 1 ns
// at every reading (and jumps when told): deterministic, and as unkind as a
// real clock read twice.

namespace {

struct ticking_clock {
  using rep = std::int64_t;
  using period = std::nano;
  using duration = std::chrono::nanoseconds;
  using time_point = std::chrono::time_point<ticking_clock>;
  static constexpr bool is_steady = true;
  static inline std::atomic<std::int64_t> t{1'000'000'000'000};
  static time_point now() noexcept { return time_point(duration(t.fetch_add(1) + 1)); }
  static void jump(duration d) noexcept { t.fetch_add(d.count()); }
};

struct ticking_wait_traits {
  static ticking_clock::duration to_wait_duration(const ticking_clock::duration& d) {
    return d > ticking_clock::duration::zero() ? std::chrono::microseconds(200)
                                               : ticking_clock::duration::zero();
  }
  static ticking_clock::duration to_wait_duration(const ticking_clock::time_point& t) {
    return to_wait_duration(t - ticking_clock::now());
  }
};

using ticking_bucket = ratelimit::basic_token_bucket<ticking_clock, ticking_wait_traits>;

}  // namespace

BOOST_AUTO_TEST_SUITE(moving_clock)

// A queued request is due (its timer has not run: the context is not run),
// so the tokens for one more are there: a wait of at most 0 is enough. (The
// deadline was made from one reading and the decision from a later one: 0
// ns of slack refused it.)
BOOST_AUTO_TEST_CASE(try_for_zero_takes_tokens_that_are_there_behind_a_due_request) {
  asio::io_context ctx;  // never run
  ticking_bucket b(ctx, 2, ratelimit::rate{1, 1000ns}, ratelimit::start_empty);
  bool granted = false;
  b.async_get_token([&](boost::system::error_code ec) { granted = !ec; });
  ticking_clock::jump(10'000ns);  // the head is due, and the bucket holds 2 again
  boost::system::error_code ec;
  BOOST_TEST(b.try_get_token_for(0ns, 1, ec));
  BOOST_TEST(!ec);
  ctx.poll();
  BOOST_TEST(granted);  // the head first, as the timer would have
}

// A blocked caller whose tokens a set_rate moves past its deadline is not
// granted them when its thread (or the bucket's timer) gets round to it after
// the deadline: it returns false, and the tokens stay in the bucket.
BOOST_AUTO_TEST_CASE(try_for_never_grants_tokens_due_after_its_deadline) {
  for (int serve_from_another_call = 0; serve_from_another_call < 2; ++serve_from_another_call) {
    BOOST_TEST_CONTEXT((serve_from_another_call ? "served by available()" : "served by itself")) {
      asio::io_context ctx;  // never run: no timer grants
      // (In milliseconds of this clock: the waiting thread reads it some ten
      // times per real millisecond, so it cannot reach them by polling.)
      ticking_bucket b(ctx, 1, ratelimit::rate{1, 1ms}, ratelimit::start_empty);
      std::atomic<int> result{-1};
      std::thread a([&] { result = b.try_get_token_for(1500us) ? 1 : 0; });  // due in time: queued
      BOOST_TEST(eventually([&] { return b.waiting() == 1u || result != -1; }));
      b.set_rate(ratelimit::rate{1, 3ms});         // now due about 3 ms in: after the deadline
      ticking_clock::jump(5ms);                    // the thread wakes late
      if (serve_from_another_call) b.available();  // serves at a reading past the deadline
      a.join();
      BOOST_TEST(result == 0);
      BOOST_TEST(b.waiting() == 0u);
      BOOST_TEST(b.available() == 1u);  // the token it was not granted
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(deadlines, clock_fixture)

// A blocked caller that will time out (a set_rate moved its tokens after its
// deadline) is not counted ahead of a new request: retry_after says what the
// new request gets, as if that caller had never been.
BOOST_AUTO_TEST_CASE(retry_after_does_not_count_a_blocked_caller_that_will_time_out) {
  running_context rc;
  test_bucket b(rc.ctx, 1, ratelimit::rate{1, 1s}, ratelimit::start_empty);
  std::atomic<int> result{-1};
  std::thread a([&] { result = b.try_get_token_for(1500ms) ? 1 : 0; });  // due at 1 s: queued
  BOOST_TEST(eventually([&] { return b.waiting() == 1u || result != -1; }));
  BOOST_TEST((b.retry_after(1) == std::optional<test_bucket::duration>(2s)));  // after it
  b.set_rate(ratelimit::rate{1, 3s});  // it is due at 3 s now: after its deadline (1.5 s)
  BOOST_TEST((b.retry_after(1) == std::optional<test_bucket::duration>(3s)));  // as if alone
  manual_clock::advance(1600ms);
  a.join();
  BOOST_TEST(result == 0);
  BOOST_TEST((b.retry_after(1) == std::optional<test_bucket::duration>(1400ms)));
}

// A blocked caller at the head whose tokens a set_rate moves past its
// deadline leaves the queue at once: it returns false without waiting for its
// deadline, and holds back nobody behind it (tries, blocking calls with a
// zero timeout, asynchronous requests), as retry_after says.
BOOST_AUTO_TEST_CASE(a_caller_that_can_no_longer_be_served_in_time_leaves_at_once) {
  asio::io_context ctx;  // never run: no timer grants (blocking calls may wait: not stopped)
  test_bucket b(ctx, 2, ratelimit::rate{1, 1s}, ratelimit::start_empty);
  std::atomic<int> head{-1};
  std::thread h([&] { head = b.try_get_token_for(2500ms, 2) ? 1 : 0; });  // due at 2 s: queued
  BOOST_TEST(eventually([&] { return b.waiting() == 1u || head != -1; }));
  manual_clock::advance(1s);
  b.set_rate(ratelimit::rate{1, 2s});  // its second token now comes at 3 s: too late
  BOOST_TEST(eventually([&] { return head != -1; }, 5s));  // at once, not at 2.5 s
  if (head == -1) manual_clock::advance(2s);  // (failed: let the thread time out, then join)
  h.join();
  BOOST_TEST(head == 0);
  BOOST_TEST(b.waiting() == 0u);
  BOOST_TEST((b.retry_after(1) == std::optional<test_bucket::duration>(0s)));
  std::optional<test_bucket::duration> wait;
  BOOST_TEST(b.try_get_token(1, wait));  // the token it did not take
  BOOST_TEST((wait == std::optional<test_bucket::duration>(0s)));
  manual_clock::advance(2s);  // one more
  boost::system::error_code ec;
  BOOST_TEST(b.try_get_token_for(0ns, 1, ec));
  BOOST_TEST(!ec);
}

BOOST_AUTO_TEST_SUITE_END()
