// Object lifetime: nothing starts in the constructor; destroying or closing a
// bucket with waiters completes them; nothing touches freed memory (run under
// ASan), including destruction from inside a completion handler, late
// cancellation signals and an io_context destroyed with completions pending;
// the matrix of destroy/close/cancel against every kind of pending work. And
// what Asio users expect of an I/O object: moved-from objects, as_default_on,
// the handler's allocator.
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
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

// Regression: a completion for a handler bound to a strand of another context
// runs in two steps; after the first, the second sits in the strand's queue
// and the strand's invoker in that context's, both in the operation's
// reserved memory. Destroying that context destroys the strand's queue first
// (and with it the operation): the memory must live until the invoker,
// destroyed after it, gives its block back (ASan: heap-use-after-free in
// scheduler::shutdown before the fix).
BOOST_AUTO_TEST_CASE(io_context_destroyed_with_a_completion_queued_on_a_strand) {
  auto r = std::make_shared<outcome>();
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1));
  {
    asio::io_context other;
    auto strand = asio::make_strand(other);
    bucket.async_get_token(asio::bind_executor(strand, checked_handler(r)));
    BOOST_TEST(ctx.run_one() == 1);  // step 1: now queued on the idle strand
    BOOST_TEST(r->calls == 0);
  }
  BOOST_TEST(r->calls == 0);
  BOOST_TEST(r->destroyed_uncalled);
  BOOST_TEST(ctx.poll() == 0u);  // nothing left behind
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

// --- What Asio users expect of an I/O object --------------------------------

namespace {

using test_keyed = ratelimit::basic_keyed_limiter<int, std::hash<int>, std::equal_to<int>,
                                                  manual_clock, manual_wait_traits>;

/// Checks that `moved_from` behaves as a closed limiter still on `ctx`:
/// `start(token)` starts a request on it.
template <typename Start>
void fails_closed_on(asio::io_context& ctx, Start start) {
  auto r = std::make_shared<outcome>();
  bool on_its_executor = false;
  start([&, h = checked_handler(r)](boost::system::error_code ec) mutable {
    on_its_executor = ctx.get_executor().running_in_this_thread();
    h(ec);
  });
  BOOST_TEST(!r->done());  // never inline
  auto deferred = std::make_shared<outcome>();
  start(asio::deferred)(checked_handler(deferred));
  BOOST_TEST(settle(ctx, [&] { return r->done() && deferred->done(); }));
  BOOST_TEST(r->calls == 1);
  BOOST_TEST(r->ec == ratelimit::error::bucket_closed);
  BOOST_TEST(on_its_executor);
  BOOST_TEST(deferred->ec == ratelimit::error::bucket_closed);
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(asio_conventions, clock_fixture)

// The old bucket dereferenced its null state (SIGSEGV) on any use after a move.
BOOST_AUTO_TEST_CASE(a_moved_from_bucket_is_a_closed_bucket_on_its_executor) {
  asio::io_context ctx;
  test_bucket a(ctx, 2, per_second(1));
  test_bucket b(std::move(a));
  BOOST_TEST((a.get_executor() == asio::any_io_executor(ctx.get_executor())));
  BOOST_TEST(!a.is_open());
  BOOST_TEST(!a.try_get_token());
  BOOST_TEST(!a.try_get_token(0));
  BOOST_TEST(a.capacity() == 0u);
  BOOST_TEST(a.available() == 0u);
  BOOST_TEST(a.waiting() == 0u);
  BOOST_TEST(a.cancel() == 0u);
  a.close();
  boost::system::error_code ec;
  a.get_token(ec);
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_TEST(!a.try_get_token_for(1s, 1, ec));
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_CHECK_THROW(a.get_token(), boost::system::system_error);
  BOOST_CHECK_THROW(a.set_rate(ratelimit::rate{0, 1s}), std::invalid_argument);  // still validates
  a.set_rate(per_second(5));
  a.set_capacity(5);
  BOOST_TEST(a.capacity() == 0u);
  fails_closed_on(ctx, [&](auto&& token) { return a.async_get_token(std::move(token)); });
  // The bucket moved to works, and a moved-from one can be assigned to.
  BOOST_TEST(b.try_get_token(2));
  a = std::move(b);
  manual_clock::advance(1s);
  BOOST_TEST(a.try_get_token());
}

// The old keyed_limiter could not be moved at all (compile error).
BOOST_AUTO_TEST_CASE(a_moved_from_keyed_limiter_is_a_closed_one_on_its_executor) {
  asio::io_context ctx;
  test_keyed a(ctx, 2, per_second(1), 4);
  BOOST_TEST(a.try_get_token(1));
  test_keyed b(std::move(a));
  BOOST_TEST((a.get_executor() == asio::any_io_executor(ctx.get_executor())));
  BOOST_TEST(!a.is_open());
  BOOST_TEST(!a.try_get_token(1));
  boost::system::error_code ec;
  BOOST_TEST(!a.try_get_token(1, 1, ec));
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_TEST(a.size() == 0u);
  BOOST_TEST(!a.contains(1));
  BOOST_TEST(a.available(1) == 0u);
  BOOST_TEST(a.cancel() == 0u);
  BOOST_TEST(a.evict() == 0u);
  a.close();
  a.get_token(1, ec);
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_CHECK_THROW(a.get_token(1), boost::system::system_error);
  fails_closed_on(ctx, [&](auto&& token) { return a.async_get_token(1, std::move(token)); });
  BOOST_TEST(b.contains(1));  // the state moved with it
  BOOST_TEST(b.try_get_token(1));
  BOOST_TEST(!b.try_get_token(1));
  a = std::move(b);
  BOOST_TEST(a.contains(1));
}

// The old classes had no converting move (and the keyed limiter no move):
// as_default_on did not compile.
BOOST_AUTO_TEST_CASE(as_default_on_makes_use_awaitable_the_default_token) {
  asio::io_context ctx;
  test_bucket plain(ctx, 2, per_second(1), ratelimit::start_empty);
  auto bucket = asio::use_awaitable_t<>::as_default_on(std::move(plain));
  auto keyed = asio::use_awaitable_t<>::as_default_on(test_keyed(ctx, 2, per_second(1), 4));
  static_assert(
      std::is_same_v<decltype(bucket)::executor_type,
                     asio::use_awaitable_t<>::executor_with_default<asio::any_io_executor>>);
  static_assert(std::is_same_v<decltype(keyed)::executor_type, decltype(bucket)::executor_type>);
  BOOST_TEST((bucket.get_executor() == asio::any_io_executor(ctx.get_executor())));
  BOOST_TEST(keyed.try_get_token(7, 2));
  int got = 0;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        co_await bucket.async_get_token();  // no token: use_awaitable
        ++got;
        co_await bucket.async_get_token(2);
        ++got;
        co_await keyed.async_get_token(7);
        ++got;
        co_await keyed.async_get_token(7, 2);
        ++got;
      },
      asio::detached);
  BOOST_TEST(settle(ctx, [&] { return bucket.waiting() == 1; }));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return got == 1; }));
  manual_clock::advance(2s);  // the bucket's 2, and key 7's first
  BOOST_TEST(settle(ctx, [&] { return got == 3; }));
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return got == 4; }));
  // The bucket it was made from is moved-from: closed, on the same executor.
  BOOST_TEST(!plain.is_open());
  fails_closed_on(ctx, [&](auto&& token) { return plain.async_get_token(std::move(token)); });
}

BOOST_AUTO_TEST_SUITE_END()

// --- Allocation -------------------------------------------------------------
//
// An operation is allocated once, when it starts, with the handler's
// associated allocator; completing it (posting it to the context, then
// dispatching it to the handler's executor) allocates nothing, whether it is
// granted at once, granted by the timer, cancelled or closed, and whichever
// executor the handler runs on.

namespace {

struct allocation_counts {
  std::atomic<int> allocated{0};
  std::atomic<int> deallocated{0};
};

template <typename T>
class counting_allocator {
 public:
  using value_type = T;

  explicit counting_allocator(allocation_counts* c) noexcept : c_(c) {}
  template <typename U>
  counting_allocator(const counting_allocator<U>& other) noexcept : c_(other.c_) {}

  T* allocate(std::size_t n) {
    ++c_->allocated;
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    ++c_->deallocated;
    std::allocator<T>().deallocate(p, n);
  }

  template <typename U>
  friend bool operator==(const counting_allocator& a, const counting_allocator<U>& b) noexcept {
    return a.c_ == b.c_;
  }
  template <typename U>
  friend bool operator!=(const counting_allocator& a, const counting_allocator<U>& b) noexcept {
    return a.c_ != b.c_;
  }

 private:
  template <typename>
  friend class counting_allocator;
  allocation_counts* c_;
};

}  // namespace

BOOST_FIXTURE_TEST_SUITE(allocation, clock_fixture)

namespace {

/// Starts four requests, each with its own counting allocator and `ex` as its
/// handler's executor, on a bucket of `bucket_ex` (run by other threads):
/// one granted at once, one by the timer, one cancelled, one closed. Each is
/// allocated once, when it starts, and nothing at all is allocated after.
void allocates_once_and_never_at_completion(const asio::any_io_executor& bucket_ex,
                                            const asio::any_io_executor& ex) {
  manual_clock::reset();
  test_bucket bucket(bucket_ex, 2, per_second(1), ratelimit::initial_tokens{1});
  allocation_counts counts;
  std::vector<std::shared_ptr<outcome>> r(4);
  asio::cancellation_signal sig;  // emitted here, before the request can complete
  auto start = [&](std::shared_ptr<outcome>& o) {
    o = std::make_shared<outcome>();
    bucket.async_get_token(asio::bind_cancellation_slot(
        sig.slot(), asio::bind_allocator(counting_allocator<int>(&counts),
                                         asio::bind_executor(ex, checked_handler(o)))));
  };
  start(r[0]);  // granted at once
  BOOST_TEST(counts.allocated == 1);
  BOOST_TEST(eventually([&] { return r[0]->done(); }));
  start(r[1]);  // granted by the timer
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1; }));
  manual_clock::advance(1s);
  BOOST_TEST(eventually([&] { return r[1]->done(); }));
  start(r[2]);  // cancelled
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(eventually([&] { return r[2]->done(); }));
  start(r[3]);                        // closed
  BOOST_TEST(counts.allocated == 4);  // one each, when it started...
  bucket.close();
  BOOST_TEST(eventually([&] { return r[3]->done(); }));
  BOOST_TEST(counts.allocated == 4);  // ... and none since
  BOOST_TEST(eventually([&] { return counts.deallocated == 4; }));
  BOOST_TEST(r[0]->ok());
  BOOST_TEST(r[1]->ok());
  BOOST_TEST(r[2]->ec == asio::error::operation_aborted);
  BOOST_TEST(r[3]->ec == ratelimit::error::bucket_closed);
}

template <typename Executor>
void for_every_handler_executor(const Executor& ex) {
  const auto fallbacks = ratelimit::detail::upcall_fallback_allocations.load();
  const asio::any_io_executor handler_executors[] = {
      ex,  // the bucket's own
      asio::prefer(ex, asio::execution::outstanding_work.tracked),
      asio::make_strand(ex),
      asio::make_strand(asio::any_io_executor(ex)),
  };
  for (const auto& handler_ex : handler_executors)
    allocates_once_and_never_at_completion(asio::any_io_executor(ex), handler_ex);
  // Every completion step fitted the memory reserved in its operation.
  BOOST_TEST(ratelimit::detail::upcall_fallback_allocations.load() == fallbacks);
}

}  // namespace

BOOST_AUTO_TEST_CASE(on_an_io_context) {
  running_context rc(2);
  for_every_handler_executor(rc.ctx.get_executor());
}

BOOST_AUTO_TEST_CASE(on_a_thread_pool) {
  asio::thread_pool pool(2);
  for_every_handler_executor(pool.get_executor());
  pool.join();
}

BOOST_AUTO_TEST_SUITE_END()
