// Per-operation cancellation (terminal, partial, total), cancel(), late
// cancellation, and awaitable operators.
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <variant>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

namespace {

std::shared_ptr<outcome> request_with(test_bucket& bucket, asio::cancellation_signal& sig,
                                      std::uint64_t n = 1) {
  auto o = std::make_shared<outcome>();
  bucket.async_get_token(n, asio::bind_cancellation_slot(sig.slot(), checked_handler(o)));
  return o;
}

const asio::cancellation_type kinds[] = {asio::cancellation_type::terminal,
                                         asio::cancellation_type::partial,
                                         asio::cancellation_type::total};

}  // namespace

BOOST_FIXTURE_TEST_SUITE(per_operation, clock_fixture)

BOOST_AUTO_TEST_CASE(each_type_aborts_and_takes_nothing) {
  for (auto type : kinds) {
    manual_clock::reset();
    asio::io_context ctx;
    test_bucket bucket(ctx, 5, per_second(1), ratelimit::initial_tokens{2});
    asio::cancellation_signal sig;
    auto r = request_with(bucket, sig, 3);
    pump(ctx);
    BOOST_TEST(!r->done());
    sig.emit(type);
    BOOST_TEST(!r->done());  // completes through the executor, not inside emit()
    BOOST_TEST(settle(ctx, [&] { return r->done(); }));
    BOOST_TEST(r->calls == 1);
    BOOST_TEST(r->ec == asio::error::operation_aborted);
    BOOST_TEST(bucket.waiting() == 0u);
    BOOST_TEST(bucket.available() == 2u);  // nothing consumed
    BOOST_TEST(bucket.try_get_token(2));
  }
}

BOOST_AUTO_TEST_CASE(cancellation_type_none_is_ignored) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
  asio::cancellation_signal sig;
  auto r = request_with(bucket, sig);
  sig.emit(asio::cancellation_type::none);
  pump(ctx);
  BOOST_TEST(!r->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
}

BOOST_AUTO_TEST_CASE(waiters_behind_are_served_as_if_it_never_was) {
  for (auto type : kinds) {
    manual_clock::reset();
    asio::io_context ctx;
    test_bucket bucket(ctx, 5, per_second(1), ratelimit::start_empty);
    asio::cancellation_signal sig;
    auto head = request_with(bucket, sig, 4);  // due at 4 s
    auto next = request(bucket, 1);            // would be due at 1 s without head
    auto last = request(bucket, 2);            // ... and this at 3 s
    manual_clock::advance(500ms);
    pump(ctx);
    sig.emit(type);
    BOOST_TEST(settle(ctx, [&] { return head->done(); }));
    pump(ctx);
    BOOST_TEST(!next->done());
    manual_clock::advance(500ms);  // t = 1 s
    BOOST_TEST(settle(ctx, [&] { return next->done(); }));
    BOOST_TEST(next->ok());
    manual_clock::advance(1999ms);  // t = 2.999 s
    pump(ctx);
    BOOST_TEST(!last->done());
    manual_clock::advance(1ms);  // t = 3 s
    BOOST_TEST(settle(ctx, [&] { return last->done(); }));
    BOOST_TEST(last->ok());
  }
}

BOOST_AUTO_TEST_CASE(cancelling_the_head_grants_an_overdue_next_at_once) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1), ratelimit::start_empty);
  asio::cancellation_signal sig;
  auto head = request_with(bucket, sig, 5);
  auto next = request(bucket, 2);
  manual_clock::advance(3s);  // 3 tokens: next is overdue behind head
  pump(ctx);
  BOOST_TEST(!next->done());
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return next->done(); }));
  BOOST_TEST(next->ok());
  BOOST_TEST(head->ec == asio::error::operation_aborted);
  BOOST_TEST(bucket.available() == 1u);
}

BOOST_AUTO_TEST_CASE(cancelling_a_middle_waiter) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1), ratelimit::start_empty);
  asio::cancellation_signal sig;
  auto a = request(bucket, 1);
  auto b = request_with(bucket, sig, 3);
  auto c = request(bucket, 1);
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  pump(ctx);
  BOOST_TEST(!c->done());
  manual_clock::advance(1s);  // c at 2 s, not 5 s
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(a->order < c->order);
}

BOOST_AUTO_TEST_CASE(cancelling_the_last_waiter_stops_the_timer) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
  asio::cancellation_signal sig;
  auto r = request_with(bucket, sig);
  sig.emit(asio::cancellation_type::terminal);
  // With no waiter left nothing must keep run() going: it returns by itself.
  std::thread runner([&] { ctx.run(); });
  runner.join();
  BOOST_TEST(r->ec == asio::error::operation_aborted);
}

BOOST_AUTO_TEST_CASE(late_cancellation_is_a_no_op) {
  // The grant is on its way to a handler executor that has not run yet;
  // a cancellation now must not change the result.
  asio::io_context ctx;
  asio::io_context handler_ctx;
  test_bucket bucket(ctx, 1, per_second(1), ratelimit::start_empty);
  asio::cancellation_signal sig;
  auto r = std::make_shared<outcome>();
  bucket.async_get_token(asio::bind_cancellation_slot(
      sig.slot(), asio::bind_executor(handler_ctx, checked_handler(r))));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return bucket.waiting() == 0; }));
  pump(ctx);
  sig.emit(asio::cancellation_type::terminal);
  pump(ctx);
  BOOST_TEST(settle(handler_ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
  BOOST_TEST(r->calls == 1);
  BOOST_TEST(bucket.available() == 0u);
  sig.emit(asio::cancellation_type::terminal);  // after completion: slot cleared
  pump(ctx);
  BOOST_TEST(r->calls == 1);
}

BOOST_AUTO_TEST_CASE(slot_is_cleared_and_reusable) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1));
  asio::cancellation_signal sig;
  auto a = request_with(bucket, sig);  // granted at once
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  sig.emit(asio::cancellation_type::terminal);
  auto b = request_with(bucket, sig);  // the same slot again
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  auto c = request_with(bucket, sig);  // must wait
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(a->ok());
  BOOST_TEST(b->ok());
  BOOST_TEST(c->ec == asio::error::operation_aborted);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(cancel_all, clock_fixture)

BOOST_AUTO_TEST_CASE(cancel_aborts_every_waiter_and_keeps_the_bucket_open) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 3, per_second(1), ratelimit::start_empty);
  std::vector<std::shared_ptr<outcome>> r;
  for (int i = 0; i < 10; ++i) r.push_back(request(bucket, 1 + i % 3));
  BOOST_TEST(bucket.cancel() == 10u);
  BOOST_TEST(bucket.waiting() == 0u);
  BOOST_TEST(settle(ctx, [&] { return r.back()->done(); }));
  for (auto& o : r) BOOST_TEST(o->ec == asio::error::operation_aborted);
  BOOST_TEST(bucket.is_open());
  manual_clock::advance(1s);
  auto again = request(bucket);
  BOOST_TEST(settle(ctx, [&] { return again->done(); }));
  BOOST_TEST(again->ok());
  BOOST_TEST(bucket.cancel() == 0u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(awaitable_operators, clock_fixture)

BOOST_AUTO_TEST_CASE(deadline_wins_then_bucket_wins) {
  using namespace asio::experimental::awaitable_operators;
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1), ratelimit::start_empty);
  int timed_out = 0, granted = 0;
  bool finished = false;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        // A real timer as the deadline; the bucket cannot grant before it.
        asio::steady_timer deadline(ctx, 30ms);
        auto r1 = co_await (bucket.async_get_token(2, asio::use_awaitable) ||
                            deadline.async_wait(asio::use_awaitable));
        timed_out += r1.index() == 1;
        // The aborted request left the queue and took nothing.
        BOOST_TEST(bucket.waiting() == 0u);
        manual_clock::advance(2s);
        asio::steady_timer long_deadline(ctx, 60s);
        auto r2 = co_await (bucket.async_get_token(2, asio::use_awaitable) ||
                            long_deadline.async_wait(asio::use_awaitable));
        granted += r2.index() == 0;
        finished = true;
      },
      asio::detached);
  BOOST_TEST(settle(ctx, [&] { return finished; }));
  BOOST_TEST(timed_out == 1);
  BOOST_TEST(granted == 1);
  BOOST_TEST(bucket.available() == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
