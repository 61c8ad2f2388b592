// The joint acquire over real buckets and keys, on the manual clock: granted
// together at T; nothing held while waiting (a request behind it in a fast
// bucket goes first exactly when that cannot move T); one order (no request
// delayed by a later one); all or nothing (cancel, close, destruction,
// capacity, a key refused); receipts; retry-after and the try; the blocking
// form and its deadline; every completion token; buckets back to their own
// queue once nobody waits jointly on them.
#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <atomic>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::joint_receipt;
using ratelimit::per_second;
using ratelimit::start_empty;
using test_part = ratelimit::basic_part<manual_clock, manual_wait_traits>;
using test_keyed =
    ratelimit::basic_keyed_limiter<std::string, std::hash<std::string>, std::equal_to<std::string>,
                                   manual_clock, manual_wait_traits>;

namespace {

struct joint_outcome {
  int calls = 0;
  int order = -1;  // the global completion sequence number (as request()'s)
  boost::system::error_code ec;
  joint_receipt r;
  bool done() const { return calls > 0; }
};

std::shared_ptr<joint_outcome> joint(std::initializer_list<test_part> parts) {
  auto o = std::make_shared<joint_outcome>();
  ratelimit::async_acquire(parts, [o](boost::system::error_code ec, joint_receipt r) {
    ++o->calls;
    o->order = completion_sequence()++;
    o->ec = ec;
    o->r = std::move(r);
  });
  return o;
}

std::shared_ptr<joint_outcome> joint(std::initializer_list<test_part> parts,
                                     asio::cancellation_signal& sig) {
  auto o = std::make_shared<joint_outcome>();
  ratelimit::async_acquire(
      parts,
      asio::bind_cancellation_slot(sig.slot(), [o](boost::system::error_code ec, joint_receipt r) {
        ++o->calls;
        o->ec = ec;
        o->r = std::move(r);
      }));
  return o;
}

/// A wait in whole milliseconds (-1: none), printable.
long long ms_of(std::optional<manual_clock::duration> d) {
  return d ? std::chrono::duration_cast<std::chrono::milliseconds>(*d).count() : -1;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(joint_acquire, clock_fixture)

BOOST_AUTO_TEST_CASE(granted_at_once_when_every_bucket_holds_its_part) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  test_bucket b(ctx, 10, per_second(1));
  auto o = joint({{a, 3}, {b, 4}});
  BOOST_TEST(!o->done());  // never inside the initiating call
  BOOST_TEST(a.available() == 7u);
  BOOST_TEST(b.available() == 6u);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_REQUIRE(o->r.size() == 2u);
  BOOST_TEST(o->r[0].granted() == 3u);
  BOOST_TEST(o->r[1].granted() == 4u);
}

BOOST_AUTO_TEST_CASE(granted_together_at_the_time_every_bucket_can_give) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(1), start_empty);
  test_bucket fast(ctx, 10, per_second(1000));
  auto o = joint({{slow, 2}, {fast, 5}});
  pump(ctx);
  BOOST_TEST(!o->done());
  BOOST_TEST(fast.available() == 10u);  // nothing taken while it waits
  BOOST_TEST(slow.waiting() == 1u);
  BOOST_TEST(fast.waiting() == 1u);
  manual_clock::advance(1999ms);
  pump(ctx);
  BOOST_TEST(!o->done());
  manual_clock::advance(1ms);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_TEST(slow.available() == 0u);
  BOOST_TEST(fast.available() == 5u);  // both taken at T
  BOOST_TEST(slow.waiting() == 0u);
  BOOST_TEST(fast.waiting() == 0u);
}

BOOST_AUTO_TEST_CASE(a_request_behind_goes_first_exactly_when_it_cannot_move_t) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(1), start_empty);
  test_bucket fast(ctx, 10, per_second(1));  // full, slow to refill
  auto j = joint({{slow, 1}, {fast, 5}});    // T = 1 s
  auto first = request(fast, 5);             // leaves 5 (+1 by T): cannot move T
  auto second = request(fast, 2);            // would leave 4 at T: must wait behind j
  BOOST_TEST(settle(ctx, [&] { return first->done(); }));
  BOOST_TEST(first->ok());
  pump(ctx);
  BOOST_TEST(!second->done());
  BOOST_TEST(!j->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(!j->ec);
  BOOST_TEST(j->r[1].granted() == 5u);
  BOOST_TEST(fast.available() == 1u);  // 5 + 1 accrued - 5
  pump(ctx);
  BOOST_TEST(!second->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return second->done(); }));
  BOOST_TEST(second->ok());
}

BOOST_AUTO_TEST_CASE(no_request_is_delayed_by_one_made_after_it) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(1), start_empty);
  test_bucket fast(ctx, 10, per_second(1), start_empty);
  auto single = request(slow, 2);          // due at 2 s
  auto j = joint({{slow, 1}, {fast, 1}});  // after it: 3 s
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return single->done(); }));
  BOOST_TEST(single->ok());
  pump(ctx);
  BOOST_TEST(!j->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(!j->ec);
}

BOOST_AUTO_TEST_CASE(a_cancelled_request_takes_nothing_anywhere) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(1), start_empty);
  test_bucket fast(ctx, 10, per_second(1));
  asio::cancellation_signal sig;
  auto j = joint({{fast, 4}, {slow, 1}}, sig);
  auto behind = request(fast, 8);  // waits behind j (would move its T)
  pump(ctx);
  BOOST_TEST(!behind->done());
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return j->done() && behind->done(); }));
  BOOST_TEST(j->ec == asio::error::operation_aborted);
  BOOST_TEST(j->r.empty());
  BOOST_TEST(behind->ok());  // as if j had never been
  BOOST_TEST(fast.available() == 2u);
  BOOST_TEST(slow.available() == 0u);
  sig.emit(asio::cancellation_type::terminal);  // late: harmless
  pump(ctx);
}

BOOST_AUTO_TEST_CASE(closing_or_destroying_one_limiter_fails_the_request_and_takes_nothing) {
  asio::io_context ctx;
  test_bucket fast(ctx, 10, per_second(1));
  {
    test_bucket slow(ctx, 10, per_second(1), start_empty);
    auto j = joint({{fast, 4}, {slow, 1}});
    pump(ctx);
    slow.close();
    BOOST_TEST(settle(ctx, [&] { return j->done(); }));
    BOOST_TEST(j->ec == ratelimit::error::bucket_closed);
    BOOST_TEST(fast.available() == 10u);
  }
  auto slow = std::make_unique<test_bucket>(ctx, 10, per_second(1), start_empty);
  auto j = joint({{fast, 4}, {*slow, 1}});
  pump(ctx);
  slow.reset();
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(j->ec == asio::error::operation_aborted);
  BOOST_TEST(fast.available() == 10u);
  BOOST_TEST(fast.waiting() == 0u);
  BOOST_TEST(runs_dry(ctx));  // no timer left armed
}

BOOST_AUTO_TEST_CASE(a_part_over_its_capacity_fails_at_once) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  test_bucket b(ctx, 5, per_second(1));
  auto j = joint({{a, 1}, {b, 6}});
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(j->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(a.available() == 10u);
  b.close();
  auto k = joint({{a, 1}, {b, 6}});
  BOOST_TEST(settle(ctx, [&] { return k->done(); }));
  BOOST_TEST(k->ec == ratelimit::error::bucket_closed);  // closed before capacity
}

BOOST_AUTO_TEST_CASE(naming_a_bucket_twice_or_nothing_is_an_error) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  BOOST_CHECK_THROW(ratelimit::async_acquire({test_part(a, 1), test_part(a, 2)}, asio::detached),
                    std::invalid_argument);
  BOOST_CHECK_THROW(ratelimit::async_acquire(std::span<const test_part>(), asio::detached),
                    std::invalid_argument);
  BOOST_TEST(a.available() == 10u);
}

BOOST_AUTO_TEST_CASE(set_rate_and_capacity_retime_or_fail_a_queued_request) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(1), start_empty);
  test_bucket fast(ctx, 10, per_second(1));
  auto j = joint({{slow, 5}, {fast, 1}});  // T = 5 s
  pump(ctx);
  slow.set_rate(per_second(5));  // T = 1 s
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(!j->ec);
  auto k = joint({{slow, 8}, {fast, 1}});
  pump(ctx);
  slow.set_capacity(6);
  BOOST_TEST(settle(ctx, [&] { return k->done(); }));
  BOOST_TEST(k->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(fast.available() == 9u);
}

BOOST_AUTO_TEST_CASE(a_full_key_stays_full_at_a_raised_capacity_while_a_joint_request_waits) {
  asio::io_context ctx;
  test_keyed clients(ctx, 2, per_second(1), 100);
  test_bucket global(ctx, 1, per_second(1), start_empty);
  auto j = joint({{clients, std::string("alice"), 2}, {global, 1}});  // T = 1 s
  pump(ctx);
  clients.set_capacity(4);  // alice was full (2 of 2): full at 4, as a fresh key
  BOOST_TEST(clients.available("alice") == 4u);
  BOOST_TEST(clients.try_get_token(std::string("alice"), 2));   // cannot move T
  BOOST_TEST(!clients.try_get_token(std::string("alice"), 2));  // would move T
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(!j->ec);
  BOOST_TEST(clients.available("alice") == 1u);  // 2 + 1 accrued - 2
}

BOOST_AUTO_TEST_CASE(a_joint_receipt_gives_back_to_each_limiter) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  test_bucket b(ctx, 10, per_second(1));
  auto j = joint({{a, 6}, {b, 8}});
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  auto waiting = request(b, 5);  // due only when tokens come back
  pump(ctx);
  BOOST_TEST(!waiting->done());
  BOOST_TEST(j->r[1].give_back(100) == 8u);
  BOOST_TEST(settle(ctx, [&] { return waiting->done(); }));
  BOOST_TEST(waiting->ok());
  BOOST_TEST(j->r.give_back_all() == 6u);
  BOOST_TEST(a.available() == 10u);
  BOOST_TEST(j->r.give_back_all() == 0u);
}

BOOST_AUTO_TEST_CASE(retry_after_and_the_try_report_the_joint_wait) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(2), start_empty);
  test_bucket fast(ctx, 10, per_second(1));
  BOOST_TEST(ms_of(ratelimit::retry_after({test_part(slow, 1), test_part(fast, 1)})) == 500);
  std::optional<manual_clock::duration> wait;
  BOOST_TEST(!ratelimit::try_acquire({test_part(slow, 1), test_part(fast, 1)}, wait));
  BOOST_TEST(ms_of(wait) == 500);
  auto j = joint({{slow, 3}, {fast, 1}});  // 1.5 s
  pump(ctx);
  BOOST_TEST(ms_of(ratelimit::retry_after({test_part(slow, 1), test_part(fast, 1)})) == 2000);
  BOOST_TEST(ms_of(ratelimit::retry_after({test_part(fast, 9)})) == 0);  // cannot move j
  // Taking all 10 of fast's now still leaves j's 1 by 1.5 s: j cannot move.
  BOOST_TEST(ms_of(ratelimit::retry_after({test_part(fast, 10)})) == 0);
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  auto r = ratelimit::try_acquire({test_part(slow, 1), test_part(fast, 1)}, wait);
  BOOST_REQUIRE(r);
  BOOST_TEST(ms_of(wait) == 0);
  BOOST_TEST((*r)[0].granted() == 1u);
  BOOST_TEST(!ratelimit::retry_after({test_part(slow, 11), test_part(fast, 1)}));
}

BOOST_AUTO_TEST_CASE(a_key_and_a_bucket_taken_as_one) {
  asio::io_context ctx;
  test_keyed clients(ctx, 2, per_second(1), 100);
  test_bucket global(ctx, 100, per_second(100));
  for (int i = 0; i < 2; ++i) {
    auto r =
        ratelimit::try_acquire({test_part(clients, std::string("alice"), 1), test_part(global, 1)});
    BOOST_TEST(r.has_value());
  }
  std::optional<manual_clock::duration> wait;
  BOOST_TEST(!ratelimit::try_acquire(
      {test_part(clients, std::string("alice"), 1), test_part(global, 1)}, wait));
  BOOST_TEST(ms_of(wait) == 1000);
  BOOST_TEST(global.available() == 98u);  // the refusal took nothing
  auto j = joint({{clients, std::string("alice"), 1}, {global, 1}});
  pump(ctx);
  BOOST_TEST(!j->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(!j->ec);
  BOOST_TEST(j->r[0].give_back_all() == 1u);
  BOOST_TEST(clients.available("alice") == 1u);
}

BOOST_AUTO_TEST_CASE(a_key_refused_for_the_memory_bound_takes_nothing) {
  asio::io_context ctx;
  test_keyed clients(ctx, 2, per_second(1), 1);
  test_bucket global(ctx, 100, per_second(100));
  clients.get_token(std::string("alice"), 1);  // not full: not evictable
  auto j = joint({{global, 5}, {clients, std::string("bob"), 1}});
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(j->ec == ratelimit::error::too_many_keys);
  BOOST_TEST(global.available() == 100u);
}

BOOST_AUTO_TEST_CASE(the_blocking_form_waits_and_its_deadline_fails_at_once_when_unreachable) {
  running_context rc;
  test_bucket slow(rc.ctx, 10, per_second(1), start_empty);
  test_bucket fast(rc.ctx, 10, per_second(1));
  const std::array<test_part, 2> parts{test_part(slow, 2), test_part(fast, 3)};
  boost::system::error_code ec;
  auto r = ratelimit::acquire_for(std::span<const test_part>(parts), 1s, ec);
  BOOST_TEST(r.empty());  // due at 2 s: known at once
  BOOST_TEST(!ec);
  BOOST_TEST(fast.available() == 10u);
  std::promise<joint_receipt> got;
  boost::system::error_code got_ec;
  std::thread t(
      [&] { got.set_value(ratelimit::acquire(std::span<const test_part>(parts), got_ec)); });
  const bool queued = eventually([&] { return slow.waiting() == 1u; }, 5s);
  BOOST_TEST(queued);
  manual_clock::advance(2s);
  auto fut = got.get_future();
  BOOST_TEST((fut.wait_for(20s) == std::future_status::ready));
  t.join();
  BOOST_TEST(!got_ec);
  auto jr = fut.get();
  BOOST_REQUIRE(jr.size() == 2u);
  BOOST_TEST(fast.available() == 7u);
  // A deadline that passes while it waits (the rate dropped): nothing taken.
  std::promise<bool> timed;
  std::thread u([&] {
    boost::system::error_code e;
    auto x = ratelimit::acquire_for(std::span<const test_part>(parts), 3s, e);
    timed.set_value(x.empty() && !e);
  });
  BOOST_TEST(eventually([&] { return slow.waiting() == 1u; }));
  slow.set_rate(ratelimit::per_minute(1));  // the 2 tokens now due at 2 min
  manual_clock::advance(3s);
  auto tf = timed.get_future();
  BOOST_TEST((tf.wait_for(20s) == std::future_status::ready));
  u.join();
  BOOST_TEST(tf.get());
  BOOST_TEST(fast.available() == 10u);
  BOOST_TEST(slow.waiting() == 0u);
}

BOOST_AUTO_TEST_CASE(every_completion_token) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1), start_empty);
  test_bucket b(ctx, 10, per_second(1));
  const std::array<test_part, 2> parts{test_part(a, 1), test_part(b, 1)};
  auto fut = ratelimit::async_acquire(std::span<const test_part>(parts), asio::use_future);
  auto op = ratelimit::async_acquire(std::span<const test_part>(parts), asio::deferred);
  bool deferred_done = false;
  std::move(op)(
      [&](boost::system::error_code ec, joint_receipt r) { deferred_done = !ec && r.size() == 2; });
  bool co_done = false;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        auto [ec, r] = co_await ratelimit::async_acquire(std::span<const test_part>(parts),
                                                         asio::as_tuple(asio::use_awaitable));
        co_done = !ec && r.size() == 2;
      },
      asio::detached);
  manual_clock::advance(3s);
  BOOST_TEST(settle(ctx, [&] { return deferred_done && co_done; }));
  BOOST_TEST((fut.wait_for(0s) == std::future_status::ready));
  BOOST_TEST(fut.get().size() == 2u);
}

BOOST_AUTO_TEST_CASE(buckets_serve_their_own_queue_again_once_nobody_waits_jointly) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(1), start_empty);
  test_bucket fast(ctx, 10, per_second(1));
  auto single = request(slow, 1);
  auto j = joint({{slow, 1}, {fast, 1}});
  auto after = request(slow, 1);
  manual_clock::advance(3s);
  BOOST_TEST(settle(ctx, [&] { return single->done() && j->done() && after->done(); }));
  // One order: the single made first, the joint request, then the single behind it.
  BOOST_TEST(single->order < j->order);
  BOOST_TEST(j->order < after->order);
  BOOST_TEST(single->ok());
  BOOST_TEST(after->ok());
  // Solo again: FIFO as before, timer and all.
  auto x = request(slow, 2);
  BOOST_TEST(!x->done());
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return x->done(); }));
  BOOST_TEST(x->ok());
  BOOST_TEST(runs_dry(ctx));
}

BOOST_AUTO_TEST_CASE(a_blocked_caller_wakes_when_a_limiter_is_destroyed_and_takes_nothing) {
  running_context rc;
  test_bucket fast(rc.ctx, 10, per_second(1));
  auto slow = std::make_unique<test_bucket>(rc.ctx, 10, per_second(1), start_empty);
  const std::array<test_part, 2> parts{test_part(fast, 4), test_part(*slow, 1)};
  std::promise<boost::system::error_code> woke;
  std::thread t([&] {
    boost::system::error_code ec;
    auto r = ratelimit::acquire(std::span<const test_part>(parts), ec);
    woke.set_value(r.empty() ? ec : boost::system::error_code());
  });
  BOOST_TEST(eventually([&] { return fast.waiting() == 1u; }));
  slow.reset();
  auto f = woke.get_future();
  BOOST_TEST((f.wait_for(20s) == std::future_status::ready));
  t.join();
  BOOST_TEST(f.get() == asio::error::operation_aborted);
  BOOST_TEST(fast.available() == 10u);
}

// A callback's request is made from the caller's parts (borrowed within the
// call); a token that defers keeps a copy of its own: the caller's parts may
// be gone before it is launched, and moving the deferred operation moves it.
BOOST_AUTO_TEST_CASE(a_deferred_request_owns_its_parts) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  test_bucket b(ctx, 10, per_second(1));
  auto parts = std::make_unique<std::vector<test_part>>(
      std::vector<test_part>{test_part(a, 2), test_part(b, 3)});
  auto op = ratelimit::async_acquire(std::span<const test_part>(*parts), asio::deferred);
  parts.reset();  // (ASan: a borrowed view would now read freed memory)
  auto moved = std::move(op);
  {  // assignable, as deferred operations are
    const std::array<test_part, 1> other{test_part(a, 1)};
    auto op2 = ratelimit::async_acquire(std::span<const test_part>(other), asio::deferred);
    op2 = std::move(moved);
    moved = std::move(op2);
  }
  std::vector<std::uint64_t> granted;
  std::move(moved)([&](boost::system::error_code ec, joint_receipt r) {
    BOOST_TEST(!ec);
    for (const auto& one : r)
      granted.push_back(one.granted());
  });
  BOOST_TEST(settle(ctx, [&] { return !granted.empty(); }));
  BOOST_TEST((granted == std::vector<std::uint64_t>{2, 3}));
  BOOST_TEST(a.available() == 8u);
  BOOST_TEST(b.available() == 7u);
}

BOOST_AUTO_TEST_CASE(a_deferred_request_launched_after_its_limiter_is_gone_fails) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto b = std::make_unique<test_bucket>(ctx, 10, per_second(1));
  auto op = ratelimit::async_acquire({test_part(a, 1), test_part(*b, 1)}, asio::deferred);
  b.reset();
  boost::system::error_code got;
  bool called = false;
  std::move(op)([&](boost::system::error_code ec, joint_receipt r) {
    called = true;
    got = ec;
    BOOST_TEST(r.empty());
  });
  BOOST_TEST(!called);
  BOOST_TEST(settle(ctx, [&] { return called; }));
  BOOST_TEST(got == asio::error::operation_aborted);
  BOOST_TEST(a.available() == 10u);
}

BOOST_AUTO_TEST_CASE(a_limiter_destroyed_from_inside_a_joint_completion) {
  asio::io_context ctx;
  auto a = std::make_unique<test_bucket>(ctx, 10, per_second(1), start_empty);
  auto b = std::make_unique<test_bucket>(ctx, 10, per_second(1));
  bool first = false, second = false;
  boost::system::error_code second_ec;
  ratelimit::async_acquire({test_part(*a, 1), test_part(*b, 1)},
                           [&](boost::system::error_code ec, joint_receipt r) {
                             first = !ec;
                             a.reset();          // its own limiter, with a request still queued
                             r.give_back_all();  // to a bucket gone and one alive
                           });
  ratelimit::async_acquire({test_part(*a, 2), test_part(*b, 1)},
                           [&](boost::system::error_code ec, joint_receipt) {
                             second = true;
                             second_ec = ec;
                           });
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return first && second; }));
  BOOST_TEST(second_ec == asio::error::operation_aborted);
  BOOST_TEST(b->available() == 10u);  // given back; the failed one took nothing
  BOOST_TEST(b->waiting() == 0u);
  b.reset();
  BOOST_TEST(runs_dry(ctx));
}

BOOST_AUTO_TEST_CASE(a_handler_with_its_own_executor_is_invoked_there) {
  asio::io_context ctx;
  asio::io_context other;
  test_bucket a(ctx, 10, per_second(1), start_empty);
  test_bucket b(ctx, 10, per_second(1));
  std::thread::id ran;
  bool done = false;
  ratelimit::async_acquire(
      {test_part(a, 1), test_part(b, 1)},
      asio::bind_executor(other, [&](boost::system::error_code, joint_receipt) {
        ran = std::this_thread::get_id();
        done = true;
      }));
  manual_clock::advance(1s);
  pump(ctx, 20ms);
  BOOST_TEST(!done);  // posted to `other`, which nobody ran yet
  other.run();
  BOOST_TEST(done);
  BOOST_TEST((ran == std::this_thread::get_id()));
}

// A review's findings, each reproduced before its fix.

BOOST_AUTO_TEST_CASE(a_blocked_caller_whose_grant_moved_past_its_deadline_takes_nothing) {
  asio::io_context ctx;  // nobody runs it: only the blocked thread's own deadline acts
  test_bucket a(ctx, 10, per_second(1), start_empty);
  test_bucket b(ctx, 10, per_second(1));
  std::size_t got = 99;
  boost::system::error_code ec;
  std::thread t([&] {
    const std::array<test_part, 2> ps{test_part(a, 1), test_part(b, 1)};
    got = ratelimit::acquire_for(std::span<const test_part>(ps), 1500ms, ec).size();
  });
  BOOST_TEST(eventually([&] { return a.waiting() == 1u; }));  // T = 1 s: within the deadline
  a.set_rate(ratelimit::rate{1, 1800ms});                     // T = 1.8 s: past it
  manual_clock::advance(2s);  // the thread wakes after T: withdrawn as of its deadline
  t.join();
  BOOST_TEST(got == 0u);
  BOOST_TEST(!ec);
  BOOST_TEST(a.available() == 1u);  // nothing taken
  BOOST_TEST(b.available() == 10u);
}

// The group knows a blocked caller's deadline: when T moves past it, the
// caller fails at once (taking nothing), as a solo bucket drops it; it does
// not wait for its deadline, and a timer firing at T cannot grant it late.
BOOST_AUTO_TEST_CASE(a_blocked_caller_fails_as_soon_as_its_grant_moves_past_its_deadline) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1), start_empty);
  test_bucket b(ctx, 10, per_second(1));
  std::atomic<bool> done{false};
  std::size_t got = 99;
  boost::system::error_code ec;
  std::thread t([&] {
    const std::array<test_part, 2> ps{test_part(a, 1), test_part(b, 1)};
    got = ratelimit::acquire_for(std::span<const test_part>(ps), 1500ms, ec).size();
    done = true;
  });
  BOOST_TEST(eventually([&] { return a.waiting() == 1u; }));  // T = 1 s: within the deadline
  BOOST_TEST(!done);
  a.set_rate(ratelimit::rate{1, 1800ms});  // T = 1.8 s: past it, and the clock has not moved
  BOOST_TEST(eventually([&] { return done.load(); }));
  BOOST_TEST(a.waiting() == 0u);
  manual_clock::advance(2s);  // (releases the thread if it did wait: then the test failed above)
  t.join();
  BOOST_TEST(got == 0u);
  BOOST_TEST(!ec);
  BOOST_TEST(settle(ctx, [&] { return a.available() == 1u; }));  // nothing was taken
  BOOST_TEST(b.available() == 10u);
  BOOST_TEST(runs_dry(ctx));
}

// The same for a single blocking request on a bucket that is in the joint
// group (a joint request waits on it): the group knows its deadline.
BOOST_AUTO_TEST_CASE(a_blocked_single_caller_on_a_grouped_bucket_fails_when_t_passes_its_deadline) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1), start_empty);
  test_bucket b(ctx, 10, per_second(1));
  auto j = joint({{a, 1}, {b, 1}});  // T = 1 s: `a` joins the group
  pump(ctx);
  std::atomic<bool> done{false};
  bool got = true;
  boost::system::error_code ec;
  std::thread t([&] {
    got = a.try_get_token_for(2500ms, 1, ec);  // behind it: T = 2 s, within the deadline
    done = true;
  });
  BOOST_TEST(eventually([&] { return a.waiting() == 2u; }));
  BOOST_TEST(!done);
  a.set_rate(ratelimit::rate{1, 1800ms});  // its T = 3.6 s: past it, and the clock has not moved
  BOOST_TEST(eventually([&] { return done.load(); }));
  manual_clock::advance(3s);  // (releases the thread if it did wait: then the test failed above)
  t.join();
  BOOST_TEST(!got);
  BOOST_TEST(!ec);
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));  // the joint request: granted at 1.8 s
  BOOST_TEST(!j->ec);
  BOOST_TEST(a.available() == 0u);  // (1 accrued by 3 s - 1 taken: the single took nothing)
}

// The README: "`parts` is a `std::span<const ratelimit::part>` or a braced
// list", for every form in its table.
BOOST_AUTO_TEST_CASE(every_form_takes_a_braced_list) {
  asio::io_context ctx;
  test_bucket a(ctx, 100, per_second(1));
  test_bucket b(ctx, 100, per_second(1));
  boost::system::error_code ec;
  std::optional<manual_clock::duration> wait;
  BOOST_TEST(ratelimit::acquire({test_part(a, 1), test_part(b, 1)}).size() == 2u);
  BOOST_TEST(ratelimit::acquire({test_part(a, 1), test_part(b, 1)}, ec).size() == 2u);
  BOOST_TEST(ratelimit::acquire_for({test_part(a, 1), test_part(b, 1)}, 1s, ec).size() == 2u);
  BOOST_TEST(ratelimit::try_acquire({test_part(a, 1), test_part(b, 1)}).has_value());
  BOOST_TEST(ratelimit::try_acquire({test_part(a, 1), test_part(b, 1)}, wait).has_value());
  BOOST_TEST(ratelimit::try_acquire({test_part(a, 1), test_part(b, 1)}, wait, ec).has_value());
  BOOST_TEST(ms_of(ratelimit::retry_after({test_part(a, 1), test_part(b, 1)})) == 0);
  auto j = joint({{a, 1}, {b, 1}});
  BOOST_TEST(settle(ctx, [&] { return j->done(); }));
  BOOST_TEST(!ec);
  BOOST_TEST(a.available() == 93u);
  BOOST_TEST(b.available() == 93u);
}

BOOST_AUTO_TEST_CASE(each_request_needs_only_its_own_owners_context_to_run) {
  asio::io_context ctx1, ctx2;
  test_bucket c(ctx1, 10, per_second(1), start_empty);
  test_bucket d(ctx1, 10, per_second(1));
  test_bucket a(ctx2, 10, ratelimit::rate{1, 2s}, start_empty);
  test_bucket b(ctx2, 10, per_second(1));
  bool x = false, y = false;
  ratelimit::async_acquire({test_part(c, 1), test_part(d, 1)},
                           [&](boost::system::error_code, joint_receipt) { x = true; });  // 1 s
  ratelimit::async_acquire({test_part(a, 1), test_part(b, 1)},
                           [&](boost::system::error_code, joint_receipt) { y = true; });  // 2 s
  manual_clock::advance(3s);
  BOOST_TEST(settle(ctx2, [&] { return y; }));  // ctx1 not running
  BOOST_TEST(!x);
  BOOST_TEST(settle(ctx1, [&] { return x; }));
}

BOOST_AUTO_TEST_CASE(a_query_leaves_single_requests_in_their_buckets_own_queues) {
  asio::io_context ctx1, ctx2;
  test_bucket c(ctx1, 10, per_second(1), start_empty);
  test_bucket a(ctx2, 10, ratelimit::rate{1, 2s}, start_empty);
  bool sa = false;
  auto sc = request(c, 1);                                           // 1 s, ctx1
  a.async_get_token([&](boost::system::error_code) { sa = true; });  // 2 s, ctx2
  BOOST_TEST(ms_of(ratelimit::retry_after({test_part(c, 1), test_part(a, 1)})) == 4000);
  manual_clock::advance(3s);
  BOOST_TEST(settle(ctx2, [&] { return sa; }));  // needs only ctx2
  BOOST_TEST(settle(ctx1, [&] { return sc->done(); }));
}

BOOST_AUTO_TEST_CASE(a_failure_at_once_completes_through_the_first_parts_executor) {
  asio::io_context ctx1, ctx2;
  test_keyed keys(ctx1, 1, per_second(1), 100);
  test_bucket bucket(ctx2, 10, per_second(1));
  int where = 0;
  boost::system::error_code got;
  ratelimit::async_acquire({test_part(keys, std::string("k"), 5), test_part(bucket, 1)},
                           [&](boost::system::error_code ec, joint_receipt) {
                             got = ec;
                             where = ctx1.get_executor().running_in_this_thread()   ? 1
                                     : ctx2.get_executor().running_in_this_thread() ? 2
                                                                                    : 3;
                           });
  ctx2.poll();
  BOOST_TEST(where == 0);
  ctx1.poll();
  BOOST_TEST(where == 1);
  BOOST_TEST(got == ratelimit::error::exceeds_capacity);
}

// README.md, "Several limits as one": its snippet as printed (in a
// coroutine, on steady_clock limiters), compiled and run. The client's key
// is given as a string literal once (it converts to the limiter's key type).
namespace readme_joint {
asio::awaitable<int> handle(ratelimit::keyed_limiter<std::string>& per_client,
                            ratelimit::token_bucket& service, std::string client_id) {
  int outcome = 0;
  // --- as in README.md ---
  const std::array parts{ratelimit::part(per_client, client_id, 1), ratelimit::part(service, 1)};
  std::optional<std::chrono::nanoseconds> retry_after;
  boost::system::error_code ec;
  if (auto granted =
          ratelimit::try_acquire(std::span<const ratelimit::part>(parts), retry_after, ec)) {
    outcome = 1;  // serve; granted->give_back_all() if the work was not done after all
  } else if (!ec) {
    outcome = 2;  // 429 Too Many Requests, Retry-After: ceil(*retry_after)
  }
  auto [ec2, receipts] = co_await ratelimit::async_acquire(std::span<const ratelimit::part>(parts),
                                                           asio::as_tuple(asio::use_awaitable));
  // --- end ---
  if (!ec2 && receipts.size() == 2) outcome += 10;
  const std::array literal{ratelimit::part(per_client, "a literal key", 1)};
  if (ratelimit::try_acquire(std::span<const ratelimit::part>(literal))) outcome += 100;
  co_return outcome;
}
}  // namespace readme_joint

BOOST_AUTO_TEST_CASE(the_readme_example_runs) {
  asio::io_context ctx;
  ratelimit::keyed_limiter<std::string> per_client(ctx, 10, ratelimit::per_second(5), 100'000);
  ratelimit::token_bucket service(ctx, 200, ratelimit::per_second(1000));
  std::future<int> got =
      asio::co_spawn(ctx, readme_joint::handle(per_client, service, "alice"), asio::use_future);
  ctx.run();
  BOOST_TEST(got.get() == 111);  // granted by the try, then by the wait; the literal's key too
  BOOST_TEST(per_client.available("alice") <= 8u);  // (refilling meanwhile: at most 8 + accrual)
}

// A request whose limiters live on two contexts completes through its first
// part's limiter's executor: granted at once, and granted later from the
// group (the first part's timer wakes it).
BOOST_AUTO_TEST_CASE(a_grant_completes_through_the_first_parts_executor) {
  asio::io_context ctx1, ctx2;
  test_bucket first(ctx1, 10, per_second(1), start_empty);
  test_bucket second(ctx2, 10, per_second(1));
  auto where = [&] {
    return ctx1.get_executor().running_in_this_thread()   ? 1
           : ctx2.get_executor().running_in_this_thread() ? 2
                                                          : 3;
  };
  int now_where = 0, later_where = 0;
  ratelimit::async_acquire({test_part(second, 1), test_part(first, 0)},  // second's first here
                           [&](boost::system::error_code ec, joint_receipt) {
                             BOOST_TEST(!ec);
                             now_where = where();
                           });
  ratelimit::async_acquire({test_part(first, 1), test_part(second, 1)},
                           [&](boost::system::error_code ec, joint_receipt r) {
                             BOOST_TEST(!ec);
                             BOOST_TEST(r.size() == 2u);
                             later_where = where();
                           });
  ctx1.poll();
  BOOST_TEST(now_where == 0);  // (granted at once, completing on ctx2)
  ctx2.poll();
  BOOST_TEST(now_where == 2);
  BOOST_TEST(later_where == 0);  // first is empty: queued
  manual_clock::advance(1s);
  // (manual timers are checked at short real intervals: poll both for a while)
  const auto end = std::chrono::steady_clock::now() + 20s;
  while (later_where == 0 && std::chrono::steady_clock::now() < end) {
    ctx2.restart();
    ctx2.poll();
    ctx1.restart();
    ctx1.poll();
    std::this_thread::sleep_for(50us);
  }
  BOOST_TEST(later_where == 1);
  BOOST_TEST(first.available() == 0u);
  BOOST_TEST(second.available() == 9u);  // 10 - 1, full again a second later, - 1
}

namespace {
bool g_fail_posts = false;
template <class T>
struct flaky_allocator {
  using value_type = T;
  flaky_allocator() = default;
  template <class U>
  flaky_allocator(const flaky_allocator<U>&) {}
  T* allocate(std::size_t n) {
    if (g_fail_posts) throw std::bad_alloc();
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) { std::allocator<T>().deallocate(p, n); }
  bool operator==(const flaky_allocator&) const { return true; }
  bool operator!=(const flaky_allocator&) const { return false; }
};
}  // namespace

BOOST_AUTO_TEST_CASE(a_grant_at_once_that_cannot_be_posted_throws_and_takes_nothing) {
  asio::io_context ctx;
  asio::any_io_executor ex =
      asio::require(ctx.get_executor(), asio::execution::allocator(flaky_allocator<void>()));
  test_bucket a(ex, 10, per_second(1));
  test_bucket b(ex, 10, per_second(1));
  g_fail_posts = true;
  BOOST_CHECK_THROW(ratelimit::async_acquire(
                        {test_part(a, 1), test_part(b, 1)},
                        asio::bind_allocator(std::allocator<void>(),
                                             [](boost::system::error_code, joint_receipt) {})),
                    std::bad_alloc);
  g_fail_posts = false;
  BOOST_TEST(a.available() == 10u);  // given back (and, under ASan, destroyed once)
  BOOST_TEST(b.available() == 10u);
}

BOOST_AUTO_TEST_SUITE_END()
