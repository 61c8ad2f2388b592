// Object lifetime: nothing starts in the constructor; destroying or closing a
// bucket with waiters completes them; nothing touches freed memory (run under
// ASan), including destruction from inside a completion handler, late
// cancellation signals and an io_context destroyed with completions pending;
// the matrix of destroy/close/cancel against every kind of pending work.
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <future>
#include <thread>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

BOOST_FIXTURE_TEST_SUITE(construction, clock_fixture)

BOOST_AUTO_TEST_CASE(the_constructor_starts_nothing) {
  asio::io_context ctx;
  {
    test_bucket bucket(ctx, 10, per_second(5), ratelimit::start_empty);
    BOOST_TEST(ctx.poll() == 0u);
    BOOST_TEST(ctx.stopped());  // no timer armed, no work counted
  }
  ctx.restart();
  BOOST_TEST(ctx.poll() == 0u);
}

BOOST_AUTO_TEST_CASE(from_an_executor_or_a_context) {
  asio::io_context ctx;
  test_bucket a(ctx, 1);
  test_bucket b(ctx.get_executor(), 1);
  BOOST_TEST((a.get_executor() == asio::any_io_executor(ctx.get_executor())));
  BOOST_TEST((b.get_executor() == a.get_executor()));
  BOOST_TEST((a.get_rate() == ratelimit::per_second(1)));  // the default rate
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(destruction, clock_fixture)

BOOST_AUTO_TEST_CASE(completes_thousands_of_waiters_with_operation_aborted) {
  asio::io_context ctx;
  std::vector<std::shared_ptr<outcome>> r;
  {
    test_bucket bucket(ctx, 3, per_second(1), ratelimit::start_empty);
    for (int i = 0; i < 5000; ++i)
      r.push_back(request(bucket, 1 + i % 3));
    pump(ctx, std::chrono::milliseconds(2));
  }
  BOOST_TEST(settle(ctx, [&] { return r.back()->done(); }));
  for (auto& o : r) {
    BOOST_TEST(o->calls == 1);
    BOOST_TEST(o->ec == asio::error::operation_aborted);
  }
  ctx.restart();
  BOOST_TEST(ctx.poll() == 0u);
}

BOOST_AUTO_TEST_CASE(completes_coroutine_waiters) {
  asio::io_context ctx;
  auto bucket = std::make_unique<test_bucket>(ctx, 1, per_second(1), ratelimit::start_empty);
  int aborted = 0;
  for (int i = 0; i < 100; ++i)
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          try {
            co_await bucket->async_get_token(asio::use_awaitable);
          } catch (const boost::system::system_error& e) {
            aborted += e.code() == asio::error::operation_aborted;
          }
        },
        asio::detached);
  BOOST_TEST(settle(ctx, [&] { return bucket->waiting() == 100; }));
  bucket.reset();
  BOOST_TEST(settle(ctx, [&] { return aborted == 100; }));
}

BOOST_AUTO_TEST_CASE(from_inside_its_own_completion_handler) {
  asio::io_context ctx;
  auto bucket = std::make_unique<test_bucket>(ctx, 1, per_second(1), ratelimit::initial_tokens{1});
  auto first = std::make_shared<outcome>();
  bucket->async_get_token([&, h = checked_handler(first)](boost::system::error_code ec) mutable {
    h(ec);
    bucket.reset();  // destroy the bucket that is completing us
  });
  std::vector<std::shared_ptr<outcome>> rest;
  for (int i = 0; i < 10; ++i)
    rest.push_back(request(*bucket));
  BOOST_TEST(settle(ctx, [&] { return rest.back()->done(); }));
  BOOST_TEST(first->ok());
  for (auto& o : rest)
    BOOST_TEST(o->ec == asio::error::operation_aborted);
}

BOOST_AUTO_TEST_CASE(from_inside_a_timer_driven_completion) {
  // Grants made by the timer handler run inline (dispatch); the handler
  // destroys the bucket while the timer handler is still iterating.
  asio::io_context ctx;
  auto bucket = std::make_unique<test_bucket>(ctx, 5, per_second(1), ratelimit::start_empty);
  std::vector<std::shared_ptr<outcome>> r;
  auto killer = std::make_shared<outcome>();
  r.push_back(request(*bucket));
  bucket->async_get_token([&, h = checked_handler(killer)](boost::system::error_code ec) mutable {
    h(ec);
    bucket.reset();
  });
  for (int i = 0; i < 3; ++i)
    r.push_back(request(*bucket));
  manual_clock::advance(5s);  // all five due in the same timer expiry
  BOOST_TEST(settle(ctx, [&] { return r.back()->done(); }));
  BOOST_TEST(killer->ok());
  BOOST_TEST(r[0]->ok());
  for (int i = 1; i < 4; ++i)
    BOOST_TEST(r[i]->calls == 1);  // granted or aborted, once
}

BOOST_AUTO_TEST_CASE(while_the_timer_is_armed) {
  asio::io_context ctx;
  auto r = std::make_shared<outcome>();
  {
    test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
    bucket.async_get_token(checked_handler(r));
    pump(ctx, std::chrono::milliseconds(1));
  }
  manual_clock::advance(10s);  // the cancelled timer's handler finds no bucket
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ec == asio::error::operation_aborted);
  ctx.restart();
  ctx.run();  // returns: nothing left
}

BOOST_AUTO_TEST_CASE(cancellation_signal_after_the_bucket_is_gone) {
  asio::cancellation_signal sig;  // outlives everything below
  asio::io_context ctx;
  auto r = std::make_shared<outcome>();
  {
    test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
    bucket.async_get_token(asio::bind_cancellation_slot(sig.slot(), checked_handler(r)));
  }
  sig.emit(asio::cancellation_type::terminal);  // the bucket is gone; the waiter is completing
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->calls == 1);
  BOOST_TEST(r->ec == asio::error::operation_aborted);
  sig.emit(asio::cancellation_type::terminal);  // and after completion
}

BOOST_AUTO_TEST_CASE(io_context_destroyed_with_completions_pending) {
  auto r1 = std::make_shared<outcome>();
  auto r2 = std::make_shared<outcome>();
  asio::cancellation_signal sig;
  {
    asio::io_context ctx;
    test_bucket bucket(ctx, 1, per_second(1));
    bucket.async_get_token(checked_handler(r1));  // granted, posted, never run
    bucket.async_get_token(asio::bind_cancellation_slot(sig.slot(), checked_handler(r2)));
  }  // bucket destroyed (r2 posted), then the context: handlers destroyed uncalled
  BOOST_TEST(r1->calls == 0);
  BOOST_TEST(r1->destroyed_uncalled);
  BOOST_TEST(r2->calls == 0);
  BOOST_TEST(r2->destroyed_uncalled);
  sig.emit(asio::cancellation_type::terminal);  // the slot was cleared: no effect
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(closing, clock_fixture)

BOOST_AUTO_TEST_CASE(completes_pending_and_later_requests) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1), ratelimit::start_empty);
  auto a = request(bucket, 1);
  auto b = request(bucket, 2);
  BOOST_TEST(bucket.is_open());
  bucket.close();
  BOOST_TEST(!bucket.is_open());
  auto c = request(bucket, 1);
  BOOST_TEST(settle(ctx, [&] { return a->done() && b->done() && c->done(); }));
  for (auto& o : {a, b, c}) {
    BOOST_TEST(o->calls == 1);
    BOOST_TEST(o->ec == ratelimit::error::bucket_closed);
  }
  BOOST_TEST(a->order < b->order);
  manual_clock::advance(1h);
  BOOST_TEST(!bucket.try_get_token());
  bucket.close();  // idempotent
  BOOST_TEST(bucket.waiting() == 0u);
  ctx.restart();
  BOOST_TEST(ctx.poll() == 0u);  // the timer is not armed any more
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(moving, clock_fixture)

BOOST_AUTO_TEST_CASE(waiters_follow_the_moved_bucket) {
  asio::io_context ctx;
  test_bucket a(ctx, 1, per_second(1), ratelimit::start_empty);
  auto r = request(a);
  test_bucket b(std::move(a));
  BOOST_TEST(b.waiting() == 1u);
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_CASE(move_assignment_aborts_the_targets_waiters) {
  asio::io_context ctx;
  test_bucket a(ctx, 1, per_second(1), ratelimit::start_empty);
  test_bucket b(ctx, 1, per_second(1), ratelimit::start_empty);
  auto ra = request(a);
  auto rb = request(b);
  b = std::move(a);
  BOOST_TEST(settle(ctx, [&] { return rb->done(); }));
  BOOST_TEST(rb->ec == asio::error::operation_aborted);
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return ra->done(); }));
  BOOST_TEST(ra->ok());
}

BOOST_AUTO_TEST_SUITE_END()

// --- The lifetime matrix ----------------------------------------------------
//
// Destroy, close or cancel a bucket while every kind of pending work exists:
// (a) asynchronous waiters (callbacks, coroutines, a future), (b) threads
// blocked in get_token and try_get_token_for, (c) operations made with
// asio::deferred and not launched yet (launched afterwards), (d) completions
// already posted but not yet run (on the bucket's context, and on another
// handler executor). Every handler runs exactly once with the result it is
// owed; nothing is left holding the context (run() returns); ASan finds no
// access to freed memory. The old code launched deferred operations through
// a raw pointer to the bucket's freed state (heap-use-after-free).

namespace {

enum class ending { destroy, close, cancel };

const ending endings[] = {ending::destroy, ending::close, ending::cancel};

const char* name(ending e) {
  return e == ending::destroy ? "destroy" : e == ending::close ? "close" : "cancel";
}

/// What a request queued when `e` happens completes with.
boost::system::error_code owed(ending e) {
  if (e == ending::close) return ratelimit::error::bucket_closed;
  return asio::error::operation_aborted;
}

/// The error a std::future<void> holds (none for a value).
boost::system::error_code future_error(std::future<void>& f) {
  try {
    f.get();
  } catch (const boost::system::system_error& e) {
    return e.code();
  }
  return {};
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(lifetime_matrix, clock_fixture)

BOOST_AUTO_TEST_CASE(token_bucket_with_every_kind_of_pending_work) {
  for (const ending how : endings) {
    BOOST_TEST_CONTEXT(name(how)) {
      manual_clock::reset();
      asio::io_context ctx;          // polled by hand: completions wait until then
      asio::io_context handler_ctx;  // where one completion waits, dispatched
      auto bucket =
          std::make_unique<test_bucket>(ctx, 2, per_second(1), ratelimit::initial_tokens{1});
      test_bucket* b = bucket.get();

      // (d) granted at once, then dispatched to a handler executor not running yet.
      auto granted = std::make_shared<outcome>();
      b->async_get_token(asio::bind_executor(handler_ctx, checked_handler(granted)));

      // (a) waiters of every kind, and a deferred operation launched at once.
      std::vector<std::shared_ptr<outcome>> waiters;
      for (int i = 0; i < 3; ++i)
        waiters.push_back(request(*b));
      for (int i = 0; i < 3; ++i)
        waiters.push_back(co_request(ctx, [b](auto token) { return b->async_get_token(token); }));
      waiters.push_back(std::make_shared<outcome>());
      b->async_get_token(asio::deferred)(checked_handler(waiters.back()));
      std::future<void> future = b->async_get_token(asio::use_future);
      BOOST_TEST_REQUIRE(settle(ctx, [&] { return b->waiting() == 8; }));

      // (b) blocked threads.
      boost::system::error_code get_ec, for_ec;
      bool for_got = true;
      std::thread getter([&] { b->get_token(1, get_ec); });
      BOOST_TEST_REQUIRE(eventually([&] { return b->waiting() == 9; }));
      std::thread timed([&] { for_got = b->try_get_token_for(1h, 1, for_ec); });
      BOOST_TEST_REQUIRE(eventually([&] { return b->waiting() == 10; }));

      // (c) deferred operations, not launched.
      auto later1 = b->async_get_token(asio::deferred);
      auto later2 = b->async_get_token(2, asio::deferred);

      // (d) completions posted to the bucket's context, not run: a waiter
      // cancelled by its own signal, and a request that fails at once.
      asio::cancellation_signal sig;
      auto cancelled = std::make_shared<outcome>();
      b->async_get_token(asio::bind_cancellation_slot(sig.slot(), checked_handler(cancelled)));
      sig.emit(asio::cancellation_type::terminal);
      auto refused = request(*b, 3);
      BOOST_TEST(b->waiting() == 10u);

      switch (how) {
        case ending::destroy:
          bucket.reset();
          break;
        case ending::close:
          b->close();
          break;
        case ending::cancel:
          BOOST_TEST(b->cancel() == 10u);
          break;
      }
      getter.join();
      timed.join();
      // One deferred operation is launched while the rest is still pending...
      auto late1 = std::make_shared<outcome>();
      std::move(later1)(checked_handler(late1));
      if (how == ending::cancel) manual_clock::advance(1s);  // still open: granted
      BOOST_TEST(runs_dry(ctx));
      // ... one when nothing else is left that could keep the bucket's state
      // alive (the old code's state was then freed: heap-use-after-free).
      auto late2 = std::make_shared<outcome>();
      std::move(later2)(checked_handler(late2));
      if (how == ending::cancel) manual_clock::advance(2s);
      BOOST_TEST(runs_dry(ctx));
      BOOST_TEST(runs_dry(handler_ctx));
      BOOST_TEST(granted->ok());
      BOOST_TEST(!granted->destroyed_uncalled);
      for (auto& w : waiters) {
        BOOST_TEST(w->calls == 1);
        BOOST_TEST(w->ec == owed(how));
      }
      BOOST_TEST((future.wait_for(0s) == std::future_status::ready));
      BOOST_TEST(future_error(future) == owed(how));
      BOOST_TEST(get_ec == owed(how));
      BOOST_TEST(for_ec == owed(how));
      BOOST_TEST(!for_got);
      BOOST_TEST(cancelled->calls == 1);
      BOOST_TEST(cancelled->ec == asio::error::operation_aborted);
      BOOST_TEST(refused->calls == 1);
      BOOST_TEST(refused->ec == ratelimit::error::exceeds_capacity);
      for (auto& late : {late1, late2}) {
        BOOST_TEST(late->calls == 1);
        if (how == ending::cancel)
          BOOST_TEST(!late->ec);
        else
          BOOST_TEST(late->ec == owed(how));
      }
      bucket.reset();
      BOOST_TEST(runs_dry(ctx));
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()
