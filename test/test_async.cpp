// Asynchronous requests: exact token counts, FIFO order, completion through
// the handler's executor (never inline), every kind of completion token, and
// a single timer that runs only while someone waits.
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/spawn.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <future>
#include <optional>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

BOOST_FIXTURE_TEST_SUITE(exact_counts, clock_fixture)

BOOST_AUTO_TEST_CASE(starts_full_then_one_per_interval) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1));
  std::vector<std::shared_ptr<outcome>> r;
  for (int i = 0; i < 8; ++i)
    r.push_back(request(bucket));
  BOOST_TEST(settle(ctx, [&] { return r[4]->done(); }));
  pump(ctx);
  for (int i = 0; i < 5; ++i)
    BOOST_TEST(r[i]->ok());
  BOOST_TEST(!r[5]->done());
  BOOST_TEST(bucket.waiting() == 3u);

  manual_clock::advance(999ms);
  pump(ctx);
  BOOST_TEST(!r[5]->done());  // one nanosecond short... of a millisecond
  manual_clock::advance(1ms);
  BOOST_TEST(settle(ctx, [&] { return r[5]->done(); }));
  pump(ctx);
  BOOST_TEST(r[5]->ok());
  BOOST_TEST(!r[6]->done());
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return r[7]->done(); }));
  BOOST_TEST(r[6]->ok());
  BOOST_TEST(r[7]->ok());
  BOOST_TEST(bucket.waiting() == 0u);
  BOOST_TEST(bucket.available() == 0u);
}

BOOST_AUTO_TEST_CASE(grant_is_due_at_the_exact_nanosecond) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, ratelimit::rate{3, 1s}, ratelimit::start_empty);
  auto r = request(bucket);
  manual_clock::advance(333'333'333ns);
  pump(ctx);
  BOOST_TEST(!r->done());
  manual_clock::advance(1ns);  // 1/3 s, rounded up to the nanosecond
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_CASE(multi_token_requests_take_exactly_n) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(10));
  auto a = request(bucket, 7);
  auto b = request(bucket, 3);
  auto c = request(bucket, 4);
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  pump(ctx);
  BOOST_TEST(a->ok());
  BOOST_TEST(b->ok());
  BOOST_TEST(!c->done());
  manual_clock::advance(300ms);
  pump(ctx);
  BOOST_TEST(!c->done());
  manual_clock::advance(100ms);
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(bucket.available() == 0u);
}

BOOST_AUTO_TEST_CASE(initial_level_options) {
  asio::io_context ctx;
  test_bucket empty(ctx, 4, per_second(1), ratelimit::start_empty);
  BOOST_TEST(empty.available() == 0u);
  BOOST_TEST(!empty.try_get_token());
  test_bucket some(ctx, 4, per_second(1), ratelimit::initial_tokens{2});
  BOOST_TEST(some.available() == 2u);
  BOOST_TEST(some.try_get_token(2));
  BOOST_TEST(!some.try_get_token());
  test_bucket full(ctx, 4, per_second(1));
  BOOST_TEST(full.available() == 4u);
}

BOOST_AUTO_TEST_CASE(zero_tokens_completes_in_its_turn) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1), ratelimit::start_empty);
  auto a = request(bucket, 0);  // nobody ahead: at once
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ok());
  auto b = request(bucket, 1);
  auto c = request(bucket, 0);  // behind b
  pump(ctx);
  BOOST_TEST(!c->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(b->ok());
  BOOST_TEST(c->ok());
  BOOST_TEST(b->order < c->order);
}

BOOST_AUTO_TEST_CASE(a_late_timer_costs_the_waiters_no_tokens) {
  // Burst 1 at 10/s, 20 waiters. The event loop notices 2 s late (the manual
  // clock jumps): every waiter is still granted as of the moment its token
  // accrued, as a punctual timer would have done, instead of the bucket
  // capping at 1 token and losing the rest.
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(10), ratelimit::start_empty);
  std::vector<std::shared_ptr<outcome>> r;
  for (int i = 0; i < 21; ++i)
    r.push_back(request(bucket));
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return r[19]->done(); }));
  pump(ctx);
  for (int i = 0; i < 20; ++i)
    BOOST_TEST(r[i]->ok());
  BOOST_TEST(!r[20]->done());  // the 21st token is due at 2.1 s, not earlier
  BOOST_TEST(bucket.available() == 0u);
  manual_clock::advance(100ms);
  BOOST_TEST(settle(ctx, [&] { return r[20]->done(); }));
}

BOOST_AUTO_TEST_CASE(catching_up_never_grants_before_the_request_was_made) {
  // Tokens that overflowed while nobody waited are gone: catching up starts
  // from when a waiter arrived, not from the last time the bucket was seen.
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(10));
  BOOST_TEST(bucket.try_get_token());  // t = 0: empty
  manual_clock::advance(5s);           // idle: refills to 1, the rest overflows
  auto a = request(bucket);            // t = 5 s: takes the one token at once
  auto b = request(bucket);            // due at 5.1 s
  auto c = request(bucket);            // due at 5.2 s
  manual_clock::advance(5s);           // noticed at 10 s
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(a->ok());
  BOOST_TEST(b->ok());
  BOOST_TEST(c->ok());
  BOOST_TEST(bucket.available() == 1u);  // refilled after c, capped at 1
  BOOST_TEST(bucket.try_get_token());
  BOOST_TEST(!bucket.try_get_token());
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(fifo, clock_fixture)

BOOST_AUTO_TEST_CASE(completion_order_is_arrival_order) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 3, per_second(100), ratelimit::start_empty);
  std::vector<std::shared_ptr<outcome>> r;
  for (int i = 0; i < 50; ++i)
    r.push_back(request(bucket, 1 + i % 3));
  for (int step = 0; step < 200 && !r.back()->done(); ++step) {
    manual_clock::advance(10ms);
    pump(ctx, 1ms);
  }
  BOOST_TEST(settle(ctx, [&] { return r.back()->done(); }));
  for (std::size_t i = 1; i < r.size(); ++i) {
    BOOST_TEST(r[i]->ok());
    BOOST_TEST(r[i - 1]->order < r[i]->order);
  }
}

BOOST_AUTO_TEST_CASE(large_request_at_the_head_holds_back_small_ones) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1), ratelimit::start_empty);
  auto big = request(bucket, 3);
  auto small = request(bucket, 1);
  manual_clock::advance(2s);  // 2 tokens: enough for small, not for big
  pump(ctx);
  BOOST_TEST(!big->done());
  BOOST_TEST(!small->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return big->done(); }));
  pump(ctx);
  BOOST_TEST(!small->done());  // big took all three
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return small->done(); }));
  BOOST_TEST(big->order < small->order);
}

BOOST_AUTO_TEST_CASE(try_never_takes_tokens_owed_to_waiters) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1), ratelimit::start_empty);
  auto w = request(bucket, 3);
  manual_clock::advance(2s);  // 2 tokens in the bucket, owed to w
  BOOST_TEST(bucket.available() == 2u);
  BOOST_TEST(!bucket.try_get_token(1));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return w->done(); }));
  BOOST_TEST(w->ok());
  BOOST_TEST(bucket.available() == 0u);
  manual_clock::advance(1s);
  BOOST_TEST(bucket.try_get_token(1));  // nobody waits now
}

// Completions arrive in the order the bucket handed them over, also when the
// timer's handler was queued before some of them: here a cancelled wait's
// handler, queued when the abort emptied the queue, finds a later request due
// and grants it. Dispatched from there, that grant ran before the abort and
// the immediate grant posted ahead of it (found by the fuzzer).
BOOST_AUTO_TEST_CASE(completions_arrive_in_the_order_they_were_handed_over) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1), ratelimit::start_empty);
  asio::cancellation_signal signal;
  auto a = std::make_shared<outcome>();
  bucket.async_get_token(1, asio::bind_cancellation_slot(signal.slot(), checked_handler(a)));
  signal.emit(asio::cancellation_type::terminal);  // the queue empties: the wait is cancelled
  manual_clock::advance(2s);
  auto x = request(bucket, 1);  // granted at once
  auto y = request(bucket, 2);  // one token short: queued, due at 3 s
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return a->done() && x->done() && y->done(); }));
  BOOST_TEST(a->ec == asio::error::operation_aborted);
  BOOST_TEST(x->ok());
  BOOST_TEST(y->ok());
  BOOST_TEST(a->order < x->order);
  BOOST_TEST(x->order < y->order);
}

// The same when the grant handed over first was made by retry_after (which
// grants the due requests, as the timer would): the stale wait's handler,
// queued when set_rate moved the head's instant, must not run y before x.
BOOST_AUTO_TEST_CASE(grants_made_by_retry_after_keep_their_order) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1), ratelimit::start_empty);
  auto x = request(bucket);        // due at 1 s
  auto y = request(bucket);        // due at 2 s
  bucket.set_rate(per_second(2));  // x at 0.5 s, y at 1 s: the 1 s wait is cancelled
  manual_clock::advance(500ms);
  BOOST_TEST(bucket.retry_after(1).has_value());  // grants x
  manual_clock::advance(500ms);
  BOOST_TEST(settle(ctx, [&] { return x->done() && y->done(); }));
  BOOST_TEST(x->ok());
  BOOST_TEST(y->ok());
  BOOST_TEST(x->order < y->order);
}

BOOST_AUTO_TEST_CASE(later_request_waits_even_when_tokens_cover_it) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1), ratelimit::initial_tokens{2});
  auto big = request(bucket, 4);
  auto small = request(bucket, 1);  // 2 tokens there, but big is ahead
  pump(ctx);
  BOOST_TEST(!small->done());
  BOOST_TEST(bucket.waiting() == 2u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(completion, clock_fixture)

BOOST_AUTO_TEST_CASE(immediate_grant_is_never_inline) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1));
  auto r = request(bucket);
  BOOST_TEST(!r->done());                // not inside async_get_token
  BOOST_TEST(bucket.available() == 4u);  // but the token is already taken
  BOOST_TEST(ctx.poll() == 1u);
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_CASE(immediate_errors_are_never_inline) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1));
  auto big = request(bucket, 6);
  BOOST_TEST(!big->done());
  ctx.poll();
  BOOST_TEST(big->calls == 1);
  BOOST_TEST(big->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(bucket.available() == 5u);  // nothing taken
  bucket.close();
  auto late = request(bucket);
  BOOST_TEST(!late->done());
  ctx.restart();
  ctx.poll();
  BOOST_TEST(late->ec == ratelimit::error::bucket_closed);
}

BOOST_AUTO_TEST_CASE(completes_on_the_handlers_associated_executor) {
  asio::io_context bucket_ctx;
  asio::io_context handler_ctx;
  test_bucket bucket(bucket_ctx, 1, per_second(1));
  auto now = std::make_shared<outcome>();
  auto later = std::make_shared<outcome>();
  bucket.async_get_token(asio::bind_executor(handler_ctx, checked_handler(now)));
  bucket.async_get_token(asio::bind_executor(handler_ctx, checked_handler(later)));
  pump(bucket_ctx);
  BOOST_TEST(!now->done());  // posted to handler_ctx, which has not run
  handler_ctx.poll();
  BOOST_TEST(now->ok());
  manual_clock::advance(1s);
  pump(bucket_ctx);  // the timer fires on bucket_ctx...
  BOOST_TEST(!later->done());
  BOOST_TEST(settle(handler_ctx, [&] { return later->done(); }));  // ...the handler runs here
  BOOST_TEST(later->ok());
}

BOOST_AUTO_TEST_CASE(timer_grants_run_through_a_strand) {
  asio::io_context ctx;
  auto strand = asio::make_strand(ctx);
  test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
  auto r = std::make_shared<outcome>();
  bool in_strand = false;
  bucket.async_get_token(asio::bind_executor(strand, [&, h = checked_handler(r)](auto ec) mutable {
    in_strand = strand.running_in_this_thread();
    h(ec);
  }));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(in_strand);
}

BOOST_AUTO_TEST_CASE(a_waiter_keeps_the_context_running) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
  auto r = request(bucket);
  std::atomic<bool> returned{false};
  std::thread runner([&] {
    ctx.run();
    returned = true;
  });
  std::this_thread::sleep_for(50ms);
  BOOST_TEST(!returned.load());  // outstanding work: run() keeps going
  manual_clock::advance(1s);
  runner.join();  // the grant was the last work
  BOOST_TEST(returned.load());
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(completion_tokens, clock_fixture)

BOOST_AUTO_TEST_CASE(move_only_callback) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1));
  auto p = std::make_unique<int>(42);
  int seen = 0;
  bucket.async_get_token([&, p = std::move(p)](boost::system::error_code ec) {
    if (!ec) seen = *p;
  });
  ctx.poll();
  BOOST_TEST(seen == 42);
}

BOOST_AUTO_TEST_CASE(use_future) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1));
  std::future<void> ok = bucket.async_get_token(asio::use_future);
  std::future<void> waits = bucket.async_get_token(asio::use_future);
  std::future<void> fails = bucket.async_get_token(5, asio::use_future);
  ctx.poll();
  BOOST_CHECK_NO_THROW(ok.get());
  BOOST_TEST((fails.wait_for(0s) == std::future_status::ready));
  try {
    fails.get();
    BOOST_FAIL("expected exceeds_capacity");
  } catch (const boost::system::system_error& e) {
    BOOST_TEST(e.code() == ratelimit::error::exceeds_capacity);
  }
  BOOST_TEST((waits.wait_for(0s) == std::future_status::timeout));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return waits.wait_for(0s) == std::future_status::ready; }));
  BOOST_CHECK_NO_THROW(waits.get());
}

BOOST_AUTO_TEST_CASE(deferred_starts_nothing_until_launched) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1));
  auto op = bucket.async_get_token(asio::deferred);
  BOOST_TEST(bucket.available() == 1u);  // not started
  auto r = std::make_shared<outcome>();
  std::move(op)(checked_handler(r));
  BOOST_TEST(bucket.available() == 0u);
  ctx.poll();
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_CASE(use_awaitable) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1));
  std::vector<int> got;
  std::optional<boost::system::error_code> error;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 3; ++i) {
          co_await bucket.async_get_token(asio::use_awaitable);
          got.push_back(i);
        }
        try {
          co_await bucket.async_get_token(3, asio::use_awaitable);
        } catch (const boost::system::system_error& e) {
          error = e.code();
        }
      },
      asio::detached);
  BOOST_TEST(settle(ctx, [&] { return got.size() == 2; }));
  pump(ctx);
  BOOST_TEST(got.size() == 2u);
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return error.has_value(); }));
  BOOST_TEST(got.size() == 3u);
  BOOST_TEST(*error == ratelimit::error::exceeds_capacity);
}

BOOST_AUTO_TEST_CASE(yield_context) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1));
  int granted = 0;
  boost::system::error_code last;
  asio::spawn(
      ctx,
      [&](asio::yield_context yield) {
        bucket.async_get_token(yield);
        ++granted;
        bucket.async_get_token(yield[last]);
        if (!last) ++granted;
        bucket.async_get_token(2, yield[last]);
      },
      asio::detached);
  BOOST_TEST(settle(ctx, [&] { return granted == 1; }));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return last == ratelimit::error::exceeds_capacity; }));
  BOOST_TEST(granted == 2);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(one_timer_only_while_waiting, clock_fixture)

BOOST_AUTO_TEST_CASE(an_unused_bucket_runs_nothing) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 3, per_second(1000));
  BOOST_TEST(ctx.poll() == 0u);
  BOOST_TEST(bucket.try_get_token(3));
  BOOST_TEST(!bucket.try_get_token());
  manual_clock::advance(1h);
  BOOST_TEST(bucket.available() == 3u);
  BOOST_TEST(ctx.poll() == 0u);
  BOOST_TEST(ctx.stopped());  // no outstanding work at all
}

BOOST_AUTO_TEST_CASE(many_waiters_one_wakeup_per_due_head) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 100, per_second(1), ratelimit::start_empty);
  std::vector<std::shared_ptr<outcome>> r;
  for (int i = 0; i < 100; ++i)
    r.push_back(request(bucket));
  // Everybody is due after 100 s: one jump, and every waiter is served by
  // a single timer expiry (one handler) plus its own completion.
  manual_clock::advance(100s);
  std::size_t handlers = 0;
  const auto end = std::chrono::steady_clock::now() + 20s;
  while (!r.back()->done() && std::chrono::steady_clock::now() < end) {
    ctx.restart();
    handlers += ctx.poll();
  }
  BOOST_TEST(r.back()->ok());
  // The timer handler dispatches the completions, which run inline on this
  // executor: one handler in all.
  BOOST_TEST(handlers == 1u);
  ctx.restart();
  BOOST_TEST(ctx.poll() == 0u);
  BOOST_TEST(ctx.stopped());  // the timer is not re-armed
}

BOOST_AUTO_TEST_SUITE_END()

// retry_after(n) and try_get_token(n, retry_after): how long a request made
// now would wait, exact to the nanosecond, counting the requests ahead; and
// a request made then is granted exactly then.
namespace {
/// A wait in ns, -1 when there is none (Boost.Test prints numbers).
long long ns(const std::optional<std::chrono::nanoseconds>& d) {
  return d ? d->count() : -1;
}
template <typename Rep, typename Period>
long long ns(std::chrono::duration<Rep, Period> d) {
  return std::chrono::nanoseconds(d).count();
}
}  // namespace

BOOST_FIXTURE_TEST_SUITE(retry_after, clock_fixture)

BOOST_AUTO_TEST_CASE(zero_when_the_tokens_are_there_else_until_they_accrue) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 3, per_second(2));  // full: 3 tokens, one more every 500 ms
  BOOST_TEST(ns(bucket.retry_after(3)) == 0);
  BOOST_TEST(bucket.try_get_token(2));
  BOOST_TEST(ns(bucket.retry_after(1)) == ns(0ns));
  BOOST_TEST(ns(bucket.retry_after(2)) == ns(500ms));
  BOOST_TEST(ns(bucket.retry_after(3)) == ns(1000ms));
  manual_clock::advance(123ms);
  BOOST_TEST(ns(bucket.retry_after(3)) == ns(877ms));
  BOOST_TEST(bucket.available() == 1u);  // asking took nothing
}

BOOST_AUTO_TEST_CASE(counts_the_requests_queued_ahead) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 4, per_second(4), ratelimit::start_empty);  // one every 250 ms
  auto a = request(bucket, 3);                                        // due at 750 ms
  auto b = request(bucket, 1);                                        // due at 1000 ms
  pump(ctx);
  BOOST_TEST(ns(bucket.retry_after(1)) == ns(1250ms));
  BOOST_TEST(ns(bucket.retry_after(4)) == ns(2000ms));
  BOOST_TEST(ns(bucket.retry_after(0)) == ns(1000ms));  // 0 tokens: after those ahead (FIFO)
  // A request made now is granted exactly then: not a nanosecond earlier.
  const auto wait = *bucket.retry_after(2);
  auto c = request(bucket, 2);
  manual_clock::advance(wait - 1ns);
  pump(ctx);
  BOOST_TEST(a->ok());
  BOOST_TEST(b->ok());
  BOOST_TEST(!c->done());
  manual_clock::advance(1ns);
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(c->ok());
}

BOOST_AUTO_TEST_CASE(changes_with_a_cancellation_ahead_and_with_the_rate) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 4, per_second(4), ratelimit::start_empty);
  asio::cancellation_signal sig;
  auto r = std::make_shared<outcome>();
  bucket.async_get_token(3, asio::bind_cancellation_slot(sig.slot(), checked_handler(r)));
  BOOST_TEST(ns(bucket.retry_after(1)) == ns(1000ms));
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(ns(bucket.retry_after(1)) == ns(250ms));
  bucket.set_rate(per_second(1));
  BOOST_TEST(ns(bucket.retry_after(1)) == ns(1000ms));
}

BOOST_AUTO_TEST_CASE(a_whole_nanosecond_that_passes_the_capacity_is_counted) {
  // 2 tokens per 3 ns, capacity 3, empty. A request for all 3 is granted at
  // 5 ns (4.5 rounded up), when the level would be 10/3: capped at 3, the
  // 1/3 token over is lost. The next token then takes 1.5 ns, rounded up: at
  // 7 ns, not at 6 ns as the plain sum of the tokens (4 tokens, 6 ns) says.
  asio::io_context ctx;
  test_bucket bucket(ctx, 3, ratelimit::rate{2, 3ns}, ratelimit::start_empty);
  auto a = request(bucket, 3);
  pump(ctx);
  BOOST_TEST(ns(bucket.retry_after(1)) == ns(7ns));
  auto b = request(bucket, 1);
  manual_clock::advance(6ns);
  pump(ctx);
  BOOST_TEST(a->ok());
  BOOST_TEST(!b->done());
  manual_clock::advance(1ns);
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  BOOST_TEST(b->ok());
}

BOOST_AUTO_TEST_CASE(a_request_queued_at_a_later_reading_is_granted_no_earlier) {
  // A head due but not served yet (the timer is late), a request queued
  // behind it at a later reading, then the clock reads earlier (another
  // thread's reading, or a clock that goes back): the queued request is
  // granted when it came, not before, and so is one made now after it.
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, ratelimit::rate{1, 1ns}, ratelimit::start_empty);
  const auto t0 = manual_clock::now();
  auto a = request(bucket, 10);   // due at t0 + 10 ns
  manual_clock::set(t0 + 100ns);  // the context does not run: the timer is late
  auto b = request(bucket, 5);    // queued at t0 + 100 ns
  manual_clock::set(t0 + 50ns);
  BOOST_TEST(ns(bucket.retry_after(5)) == 50);  // not 0: b comes first, at t0 + 100 ns
  std::optional<std::chrono::nanoseconds> wait;
  BOOST_TEST(!bucket.try_get_token(5, wait));
  BOOST_TEST(ns(wait) == 50);
  // The timer waits for b's arrival instead of firing over and over.
  ctx.restart();
  BOOST_TEST(ctx.run_for(std::chrono::milliseconds(50)) < 10u);
  BOOST_TEST(a->ok());
  BOOST_TEST(!b->done());
  manual_clock::set(t0 + 100ns);
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  BOOST_TEST(b->ok());
}

BOOST_AUTO_TEST_CASE(try_get_token_with_a_wait_serves_the_due_requests_first) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
  auto r = request(bucket, 1);  // due at 1 s
  manual_clock::advance(2s);    // the timer has not run: r is due, and one more token is there
  BOOST_TEST(!bucket.try_get_token(1));  // the plain try refuses while anyone is queued
  std::optional<std::chrono::nanoseconds> wait;
  BOOST_TEST(bucket.try_get_token(1, wait));  // r is served first (as of 1 s), then this one
  BOOST_TEST(ns(wait) == 0);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_CASE(empty_when_the_request_would_fail_at_once) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 3, per_second(1));
  BOOST_TEST(!bucket.retry_after(4).has_value());
  std::optional<std::chrono::nanoseconds> wait = 5s;
  BOOST_TEST(!bucket.try_get_token(4, wait));
  BOOST_TEST(!wait.has_value());
  bucket.close();
  BOOST_TEST(!bucket.retry_after(1).has_value());
  BOOST_TEST(!bucket.try_get_token(1, wait));
  BOOST_TEST(!wait.has_value());
}

BOOST_AUTO_TEST_CASE(try_get_token_tells_the_wait_when_it_refuses) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(10));  // one every 100 ms
  std::optional<std::chrono::nanoseconds> wait;
  BOOST_TEST(bucket.try_get_token(2, wait));
  BOOST_TEST(ns(wait) == ns(0ns));
  BOOST_TEST(!bucket.try_get_token(1, wait));
  BOOST_TEST(ns(wait) == ns(100ms));
  manual_clock::advance(40ms);
  BOOST_TEST(!bucket.try_get_token(1, wait));
  BOOST_TEST(ns(wait) == ns(60ms));
  manual_clock::advance(60ms);
  BOOST_TEST(bucket.try_get_token(1, wait));
  BOOST_TEST(ns(wait) == ns(0ns));
  // A due request queued ahead is served first, as the timer would.
  auto r = request(bucket, 1);
  manual_clock::advance(100ms);
  BOOST_TEST(!bucket.try_get_token(1, wait));  // r took the token
  BOOST_TEST(ns(wait) == ns(100ms));
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_SUITE_END()

// A clock whose duration is narrower than the library's int64 nanoseconds
// (int32 milliseconds end 24.8 days after the epoch): a wait beyond its end
// saturates there instead of wrapping into the past, where the timer fired at
// once, found the instant not come, and waited again, over and over.
namespace {
struct narrow_clock {
  using rep = std::int32_t;
  using period = std::milli;
  using duration = std::chrono::duration<rep, period>;
  using time_point = std::chrono::time_point<narrow_clock>;
  static constexpr bool is_steady = true;
  static inline std::atomic<rep> ms{0};
  static time_point now() noexcept { return time_point(duration(ms.load())); }
};
}  // namespace

BOOST_AUTO_TEST_SUITE(narrow_clocks)

BOOST_AUTO_TEST_CASE(a_wait_past_the_clock_s_end_does_not_spin) {
  using driver = ratelimit::detail::timer_driver<narrow_clock, asio::wait_traits<narrow_clock>>;
  constexpr std::int64_t day = 86'400'000'000'000;
  BOOST_TEST((driver::to_time_point(31 * day) == narrow_clock::time_point::max()));
  BOOST_TEST((driver::to_time_point(-31 * day) == narrow_clock::time_point::min()));
  BOOST_TEST(driver::to_time_point(1'500'000).time_since_epoch().count() == 2);  // rounded up
  narrow_clock::ms = 86'400'000;  // one day after the epoch
  asio::io_context ctx;
  ratelimit::basic_token_bucket<narrow_clock> bucket(ctx, 1, ratelimit::rate{1, 720h},
                                                     ratelimit::start_empty);
  auto r = request(bucket);  // due 30 days on: past the clock's end
  BOOST_TEST((bucket.retry_after(1) == narrow_clock::duration::max()));
  std::size_t handlers = 0;
  const auto end = std::chrono::steady_clock::now() + 200ms;
  while (std::chrono::steady_clock::now() < end) {
    ctx.restart();
    handlers += ctx.poll();
  }
  BOOST_TEST(handlers < 10u);
  BOOST_TEST(!r->done());
  bucket.cancel();
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ec == asio::error::operation_aborted);
}

BOOST_AUTO_TEST_SUITE_END()

// A handler type-erased in any_completion_handler: its allocator is tied to
// the handler (it frees through the handler's own storage), so the operation
// must free its memory while the handler is whole: before the handler is
// invoked, and before it is destroyed when the operation is dropped unrun.
// (The operation once took its allocator from the handler after moving it
// out: a null dereference in the rate-limited stream's joint acquire.)
BOOST_FIXTURE_TEST_SUITE(type_erased_handlers, clock_fixture)

BOOST_AUTO_TEST_CASE(any_completion_handler_completes_and_is_dropped_safely) {
  using erased = boost::asio::any_completion_handler<void(boost::system::error_code)>;
  int granted = 0, aborted = 0;
  {
    boost::asio::io_context ctx;
    test_bucket bucket(ctx, 1, per_second(1));
    auto count = [&](boost::system::error_code ec) { ++(ec ? aborted : granted); };
    bucket.async_get_token(erased(count));  // a token there
    bucket.async_get_token(erased(count));  // waits
    BOOST_REQUIRE(settle(ctx, [&] { return granted == 1; }));
    manual_clock::advance(std::chrono::seconds(1));
    BOOST_REQUIRE(settle(ctx, [&] { return granted == 2; }));
    bucket.async_acquire(
        1,
        boost::asio::any_completion_handler<void(boost::system::error_code, ratelimit::receipt)>(
            [&](boost::system::error_code ec, ratelimit::receipt) { ++(ec ? aborted : granted); }));
    bucket.async_get_token(erased(count));  // queued when the context goes
  }  // the context destroyed with the last two unrun: dropped, memory freed, no leak
  BOOST_TEST(granted == 2);
}

BOOST_AUTO_TEST_SUITE_END()
