// keyed_limiter: one bucket per key, bounded memory, eviction that never over-grants.
#include <ratelimit/keyed_limiter.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/use_future.hpp>

#include <future>

#include <atomic>
#include <map>
#include <random>
#include <string>
#include <thread>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

namespace {
using test_keyed = ratelimit::basic_keyed_limiter<int, std::hash<int>, std::equal_to<int>,
                                                  manual_clock, manual_wait_traits>;

template <typename Limiter, typename Key>
std::shared_ptr<outcome> keyed_request(Limiter& l, const Key& key, std::uint64_t n = 1) {
  auto o = std::make_shared<outcome>();
  l.async_get_token(key, n, checked_handler(o));
  return o;
}
}  // namespace

BOOST_FIXTURE_TEST_SUITE(keyed_limiter, clock_fixture)

BOOST_AUTO_TEST_CASE(keys_are_independent_and_created_full) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(1), 100);
  BOOST_TEST(l.size() == 0u);
  BOOST_TEST(l.try_get_token(1));
  BOOST_TEST(l.try_get_token(1));
  BOOST_TEST(!l.try_get_token(1));     // key 1 drained
  BOOST_TEST(l.try_get_token(2, 2));   // key 2 has its own two
  BOOST_TEST(!l.try_get_token(3, 3));  // more than the capacity: no bucket is made for it
  BOOST_TEST(l.size() == 2u);
  manual_clock::advance(1s);
  BOOST_TEST(l.try_get_token(1));
  BOOST_TEST(!l.try_get_token(1));
}

BOOST_AUTO_TEST_CASE(async_requests_wait_per_key_fifo) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 100);
  auto a1 = keyed_request(l, 7), a2 = keyed_request(l, 7), b1 = keyed_request(l, 8);
  BOOST_TEST(!a1->done());  // never inline
  BOOST_TEST(settle(ctx, [&] { return a1->done() && b1->done(); }));
  pump(ctx);
  BOOST_TEST(a1->ok());
  BOOST_TEST(b1->ok());
  BOOST_TEST(!a2->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return a2->done(); }));
  BOOST_TEST(a2->ok());
  auto big = keyed_request(l, 9, 2);
  BOOST_TEST(settle(ctx, [&] { return big->done(); }));
  BOOST_TEST(big->ec == ratelimit::error::exceeds_capacity);
}

BOOST_AUTO_TEST_CASE(refuses_a_new_key_when_full_and_nothing_is_evictable) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(1), 3);
  for (int k = 0; k < 3; ++k)
    BOOST_TEST(l.try_get_token(k));  // each one token short
  BOOST_TEST(!l.try_get_token(3));
  auto r = keyed_request(l, 3);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ec == ratelimit::error::too_many_keys);
  BOOST_TEST(r->calls == 1);
  boost::system::error_code ec;
  l.get_token(3, ec);
  BOOST_TEST(ec == ratelimit::error::too_many_keys);
  BOOST_CHECK_THROW(l.get_token(3), boost::system::system_error);
  BOOST_TEST(l.size() == 3u);

  // One nanosecond before the buckets are full again: still refused.
  manual_clock::advance(1s - 1ns);
  BOOST_TEST(!l.try_get_token(3));
  manual_clock::advance(1ns);  // now all three are full: one is evicted for the new key
  BOOST_TEST(l.try_get_token(3));
  BOOST_TEST(l.size() == 3u);
}

BOOST_AUTO_TEST_CASE(eviction_takes_only_full_buckets) {
  asio::io_context ctx;
  test_keyed l(ctx, 3, per_second(1), 2);
  BOOST_TEST(l.try_get_token(1, 3));  // full again in 3 s
  BOOST_TEST(l.try_get_token(2, 1));  // full again in 1 s
  manual_clock::advance(1s);
  BOOST_TEST(l.try_get_token(3));  // evicts key 2, not key 1
  BOOST_TEST(l.contains(1));
  BOOST_TEST(!l.contains(2));
  BOOST_TEST(l.contains(3));
  // Key 1 kept its state: one token after 1 s, not three.
  BOOST_TEST(l.try_get_token(1));
  BOOST_TEST(!l.try_get_token(1));
}

BOOST_AUTO_TEST_CASE(a_bucket_with_waiters_is_never_evicted) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 1);
  auto a = keyed_request(l, 1), b = keyed_request(l, 1), c = keyed_request(l, 1);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ok());
  manual_clock::advance(1500ms);  // b's token is due (1 s), c's is not (2 s)
  BOOST_TEST(!l.try_get_token(2));
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  BOOST_TEST(b->ok());
  pump(ctx);
  BOOST_TEST(!c->done());
  manual_clock::advance(500ms);  // c's token is due; the bucket is full again at 3 s
  BOOST_TEST(!l.try_get_token(2));
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(c->ok());
  manual_clock::advance(1s - 1ns);
  BOOST_TEST(!l.try_get_token(2));
  manual_clock::advance(1ns);
  BOOST_TEST(l.try_get_token(2));
  BOOST_TEST(!l.contains(1));
}

// The bucket grants a waiter as of the moment its tokens accrued, even when
// its timer runs late; a bucket whose waiters are all due is served first,
// and then, full again, may be evicted.
BOOST_AUTO_TEST_CASE(due_waiters_are_served_before_their_bucket_is_evicted) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 1);
  auto a = keyed_request(l, 1), b = keyed_request(l, 1), c = keyed_request(l, 1);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  manual_clock::advance(10s);      // b's and c's tokens accrued at 1 s and 2 s; no timer has run
  BOOST_TEST(l.try_get_token(2));  // key 1: b and c granted, full since 3 s, evicted
  BOOST_TEST(!l.contains(1));
  BOOST_TEST(settle(ctx, [&] { return b->done() && c->done(); }));
  BOOST_TEST(b->ok());
  BOOST_TEST(c->ok());
  BOOST_TEST(c->order > b->order);
}

BOOST_AUTO_TEST_CASE(a_cancelled_request_only_delays_eviction) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 1);
  BOOST_TEST(l.try_get_token(1));
  asio::cancellation_signal sig;
  auto c = std::make_shared<outcome>();
  l.async_get_token(1, asio::bind_cancellation_slot(sig.slot(), checked_handler(c)));
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return c->done(); }));
  BOOST_TEST(c->ec == asio::error::operation_aborted);
  manual_clock::advance(1s);  // truly full now, but the bound says 2 s
  BOOST_TEST(!l.try_get_token(2));
  manual_clock::advance(1s);
  BOOST_TEST(l.try_get_token(2));
}

// close() completes the queued requests: their buckets are full sooner, and
// evict() takes them then, not when the closed requests would have been
// served (test/fuzz/keyed_regressions/close_then_evict_keeps_full_bucket).
BOOST_AUTO_TEST_CASE(evict_after_close_takes_buckets_whose_requests_were_closed) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 10);
  BOOST_TEST(l.try_get_token(1));
  auto r = keyed_request(l, 1);  // due at 1 s: with it, full again at 2 s
  l.close();
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ec == ratelimit::error::bucket_closed);
  manual_clock::advance(1s);  // full, nobody waits
  BOOST_TEST(l.evict() == 1u);
  BOOST_TEST(l.size() == 0u);
}

// A clock that goes back: a bucket full only as of a later reading is not
// evicted before the clock reads that again, since a fresh bucket would
// refill from the earlier reading and give the key tokens early
// (test/fuzz/keyed_regressions/clock_back_evicts_full_ahead).
BOOST_AUTO_TEST_CASE(a_bucket_full_only_at_a_later_reading_is_not_evicted) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 1);
  const auto t0 = manual_clock::now();
  BOOST_TEST(l.try_get_token(1));
  manual_clock::set(t0 + 10s);
  BOOST_TEST(l.available(1) == 1u);  // key 1's bucket has seen 10 s
  manual_clock::set(t0 + 5s);
  BOOST_TEST(!l.try_get_token(2, 0));  // key 1 is kept
  BOOST_TEST(l.contains(1));
  BOOST_TEST(l.try_get_token(1));  // its token, as of 10 s
  manual_clock::set(t0 + 6s);
  BOOST_TEST(!l.try_get_token(1));  // the next one is due at 11 s (a fresh bucket: 6 s)
  manual_clock::set(t0 + 11s);
  BOOST_TEST(l.try_get_token(2, 0));  // full again as of 11 s: evicted
  BOOST_TEST(!l.contains(1));
}

BOOST_AUTO_TEST_CASE(blocking_calls_wait_and_are_charged) {
  asio::io_context ctx;
  auto guard = asio::make_work_guard(ctx);
  std::thread runner([&] { ctx.run(); });
  test_keyed l(ctx, 1, per_second(1), 1);
  BOOST_TEST(l.try_get_token(1));
  std::atomic<bool> got{false};
  std::thread blocker([&] {
    boost::system::error_code ec;
    l.get_token(1, ec);  // waits for the token due at 1 s
    got = !ec;
  });
  std::this_thread::sleep_for(20ms);
  BOOST_TEST(!got);
  BOOST_TEST(!l.try_get_token(2));  // key 1 is drained and waited on
  manual_clock::advance(1s);
  blocker.join();
  BOOST_TEST(got);
  BOOST_TEST(!l.try_get_token(2));  // the blocking grant was charged: full at 2 s
  manual_clock::advance(1s);
  BOOST_TEST(l.try_get_token(2));
  BOOST_TEST(!l.contains(1));
  guard.reset();
  runner.join();
}

BOOST_AUTO_TEST_CASE(close_and_cancel) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 10);
  BOOST_TEST(l.try_get_token(1));
  auto a = keyed_request(l, 1), b = keyed_request(l, 1);
  BOOST_TEST(l.cancel() == 2u);
  BOOST_TEST(settle(ctx, [&] { return a->done() && b->done(); }));
  BOOST_TEST(a->ec == asio::error::operation_aborted);
  auto c = keyed_request(l, 1);
  l.close();
  BOOST_TEST(!l.is_open());
  auto d = keyed_request(l, 5);
  BOOST_TEST(settle(ctx, [&] { return c->done() && d->done(); }));
  BOOST_TEST(c->ec == ratelimit::error::bucket_closed);
  BOOST_TEST(d->ec == ratelimit::error::bucket_closed);
  BOOST_TEST(!l.try_get_token(6));
}

BOOST_AUTO_TEST_CASE(destruction_aborts_waiters) {
  asio::io_context ctx;
  auto l = std::make_unique<test_keyed>(ctx, 1, per_second(1), 10);
  BOOST_TEST(l->try_get_token(1));
  auto a = keyed_request(*l, 1);
  l.reset();
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ec == asio::error::operation_aborted);
}

// Randomised: against a reference that keeps every key's bucket forever, the
// keyed limiter never grants what the reference would refuse, and grants
// everything the reference grants unless it refused a new key for lack of room.
BOOST_AUTO_TEST_CASE(eviction_never_over_grants) {
  asio::io_context ctx;
  constexpr std::uint64_t cap = 3;
  const ratelimit::rate r{2, 1s};
  test_keyed l(ctx, cap, r, 8);
  std::map<int, std::unique_ptr<test_bucket>> ref;
  std::mt19937 rng(12345);
  int granted = 0, refused_for_room = 0;
  for (int step = 0; step < 20000; ++step) {
    if (rng() % 4 == 0) manual_clock::advance(std::chrono::milliseconds(rng() % 700));
    const int key = static_cast<int>(rng() % 20);
    const std::uint64_t n = 1 + rng() % cap;
    auto& rb = ref[key];
    if (!rb) rb = std::make_unique<test_bucket>(ctx, cap, r);
    const bool had_key = l.contains(key);
    const bool got = l.try_get_token(key, n);
    const bool want = rb->try_get_token(n);
    BOOST_REQUIRE(!(got && !want));  // never over-grants
    if (want && !got) {
      BOOST_REQUIRE(!had_key);  // only a refused new key may differ
      BOOST_REQUIRE(l.size() == l.max_keys());
      ++refused_for_room;
      // Put the reference back: the request was not served.
      rb = std::make_unique<test_bucket>(ctx, cap, r);
      BOOST_REQUIRE(!l.contains(key));
    }
    granted += got;
    BOOST_REQUIRE(l.size() <= l.max_keys());
  }
  BOOST_TEST(granted > 1000);
  BOOST_TEST(refused_for_room > 0);
}

BOOST_AUTO_TEST_CASE(bound_holds_under_100k_distinct_keys) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(100), 1000);
  std::size_t refused = 0, max_size = 0;
  for (int k = 0; k < 100'000; ++k) {
    if (k % 100 == 0) manual_clock::advance(1ms);
    if (!l.try_get_token(k)) ++refused;
    max_size = std::max(max_size, l.size());
  }
  BOOST_TEST(max_size <= 1000u);
  // 1 token at 100/s: a bucket is full 10 ms after its request, and 100 keys
  // arrive per ms: 1000 live buckets at most, so no key is ever refused.
  BOOST_TEST(refused == 0u);
  // Without time passing nothing can be evicted: exactly the excess is refused.
  manual_clock::advance(1s);
  refused = 0;
  for (int k = 0; k < 2000; ++k)
    refused += !l.try_get_token(1000000 + k);
  BOOST_TEST(refused == 1000u);
  BOOST_TEST(l.size() == 1000u);
  manual_clock::advance(1s);
  BOOST_TEST(l.evict() == 1000u);
  BOOST_TEST(l.size() == 0u);
}

BOOST_AUTO_TEST_CASE(string_keys_and_steady_clock_alias) {
  asio::io_context ctx;
  ratelimit::keyed_limiter<std::string> l(ctx, 1, per_second(1), 4);
  BOOST_TEST(l.try_get_token("alice"));
  BOOST_TEST(!l.try_get_token("alice"));
  BOOST_TEST(l.try_get_token("bob"));
  BOOST_CHECK_THROW(ratelimit::keyed_limiter<std::string>(ctx, 1, per_second(1), 0),
                    std::invalid_argument);
  BOOST_CHECK_THROW(ratelimit::keyed_limiter<std::string>(ctx, 0, per_second(1), 1),
                    std::invalid_argument);
}

// On the real clock (not the manual one, which stands still during a call):
// a bucket that has refilled is evicted, by evict() and by a new key at the
// bound. (Every fresh clock reading is later than the one the eviction
// decision is made against; comparing with a fresh one evicted nothing.)
BOOST_AUTO_TEST_CASE(a_full_bucket_is_evicted_on_the_steady_clock) {
  asio::io_context ctx;
  ratelimit::keyed_limiter<std::string> l(ctx, 4, per_second(4), 1);
  BOOST_TEST(l.try_get_token("a", 4));
  boost::system::error_code ec;
  BOOST_TEST(!l.try_get_token("b", 1, ec));  // "a" is not full yet (1 s to go)
  BOOST_TEST(ec == ratelimit::error::too_many_keys);
  std::this_thread::sleep_for(1100ms);  // full again
  BOOST_TEST(l.try_get_token("b", 1, ec));
  BOOST_TEST(!ec);
  BOOST_TEST(!l.contains("a"));
  std::this_thread::sleep_for(400ms);  // "b" full again (250 ms)
  BOOST_TEST(l.evict() == 1u);
  BOOST_TEST(l.size() == 0u);
}

// Threads hammer the limiter (try, async and blocking calls on shared keys)
// while another runs its context: no grant beyond a key's capacity (the rate
// is too slow to refill during the test), the bound holds, and close() ends
// every wait. Meant for TSan.
BOOST_AUTO_TEST_CASE(concurrent_use_from_threads) {
  asio::io_context ctx;
  auto guard = asio::make_work_guard(ctx);
  std::thread runner([&] { ctx.run(); });
  constexpr int keys = 100, cap = 5;
  {
    ratelimit::keyed_limiter<int> l(ctx, cap, ratelimit::per_hour(1), 64);
    std::vector<std::atomic<int>> grants(keys);
    std::atomic<int> async_done{0}, async_ok{0}, oversize{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng(t);
        for (int i = 0; i < 2000; ++i) {
          const int key = static_cast<int>(rng() % keys);
          if (l.try_get_token(key)) ++grants[key];
          if (l.size() > 64u) ++oversize;  // (Boost.Test checks are for the main thread)
        }
        for (int i = 0; i < 50; ++i) {
          const int key = static_cast<int>(rng() % keys);
          l.async_get_token(key, [&, key](boost::system::error_code ec) {
            if (!ec) {
              ++grants[key];
              ++async_ok;
            }
            ++async_done;
          });
        }
      });
    }
    for (auto& th : threads)
      th.join();
    boost::system::error_code ec;
    l.get_token(1000, ec);  // a new key while every bucket is drained or waited on
    BOOST_TEST((!ec || ec == ratelimit::error::too_many_keys));
    l.close();
    const auto end = std::chrono::steady_clock::now() + 20s;
    while (async_done < 200 && std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(1ms);
    BOOST_TEST(async_done == 200);
    BOOST_TEST(oversize == 0);
    for (int k = 0; k < keys; ++k)
      BOOST_TEST(grants[k] <= cap, "key " << k);
    BOOST_TEST(l.size() <= 64u);
  }
  guard.reset();
  runner.join();
}

// Threads blocked in get_token(key) while the limiter is destroyed: they
// wake with operation_aborted. The old limiter let them back into its freed
// state (the key's pin count, the index) after waking: heap-use-after-free
// under ASan. Several threads and rounds, since a woken thread races the
// destructor.
BOOST_AUTO_TEST_CASE(destroyed_while_threads_block_in_get_token) {
  // The limiter lies past the start of its heap block: ASan keeps records of
  // its own at the start of a freed block, and a mutex there reads as locked
  // (the old code's threads then hung instead of being reported).
  struct padded {
    std::array<std::byte, 64> pad{};
    test_keyed limiter;
    explicit padded(asio::io_context& ctx) : limiter(ctx, 1, per_second(1), 8) {}
  };
  asio::io_context ctx;  // never run: only the destruction can end the waits
  for (int round = 0; round < 10; ++round) {
    auto holder = std::make_unique<padded>(ctx);
    test_keyed* l = &holder->limiter;
    std::vector<boost::system::error_code> ecs(4);
    std::atomic<int> returned{0};
    std::vector<std::thread> threads;
    for (int k = 0; k < 4; ++k) {
      BOOST_TEST_REQUIRE(l->try_get_token(k));  // drained: get_token must wait
      threads.emplace_back([&, k] {
        l->get_token(k, ecs[k]);
        ++returned;
      });
    }
    // A request for 0 tokens is refused only while another waits on the key.
    for (int k = 0; k < 4; ++k)
      BOOST_TEST_REQUIRE(eventually([&] { return !l->try_get_token(k, 0); }));
    holder.reset();
    // Bounded: a thread lost in freed memory may never return (the old code
    // hung here without ASan). Failing leaves it joinable: the test aborts.
    BOOST_TEST_REQUIRE(eventually([&] { return returned == 4; }, 10s));
    for (auto& t : threads)
      t.join();
    for (auto& ec : ecs)
      BOOST_TEST(ec == asio::error::operation_aborted);
  }
  BOOST_TEST(runs_dry(ctx));
}

// A deferred request whose key was a temporary: the operation must hold its
// own copy. The old limiter kept a reference (std::cref) to it, and reading
// it at launch was an ASan stack-use-after-scope.
BOOST_AUTO_TEST_CASE(a_deferred_request_keeps_its_own_copy_of_the_key) {
  using string_keyed =
      ratelimit::basic_keyed_limiter<std::string, std::hash<std::string>,
                                     std::equal_to<std::string>, manual_clock, manual_wait_traits>;
  asio::io_context ctx;
  string_keyed l(ctx, 1, per_second(1), 8);
  const std::string key(64, 'k');                                 // long enough to live on the heap
  auto op = l.async_get_token(std::string(key), asio::deferred);  // the temporary dies here
  auto op2 = l.async_get_token(std::string(key), 1, asio::deferred);
  BOOST_TEST(l.size() == 0u);  // nothing started yet
  auto r = std::make_shared<outcome>();
  auto r2 = std::make_shared<outcome>();
  std::move(op)(checked_handler(r));
  std::move(op2)(checked_handler(r2));
  BOOST_TEST(l.contains(key));
  BOOST_TEST(l.size() == 1u);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return r2->done(); }));
  BOOST_TEST(r2->ok());
}

// try_get_token(key, n, ec) tells "limited" (false, ec clear) from a request
// that cannot be served at all (false, ec set). (The old limiter had no such
// overload: compile error.)
BOOST_AUTO_TEST_CASE(retry_after_per_key) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(4), 100);  // one token every 250 ms per key
  auto ns = [](const std::optional<std::chrono::nanoseconds>& d) { return d ? d->count() : -1LL; };
  BOOST_TEST(ns(l.retry_after(7, 2)) == 0);  // no bucket yet: it would start full
  BOOST_TEST(!l.contains(7));                // asking made none
  BOOST_TEST(l.try_get_token(7, 2));
  BOOST_TEST(ns(l.retry_after(7, 1)) == std::chrono::nanoseconds(250ms).count());
  BOOST_TEST(ns(l.retry_after(7, 2)) == std::chrono::nanoseconds(500ms).count());
  auto r = std::make_shared<outcome>();
  l.async_get_token(7, 1, checked_handler(r));  // queued: due at 250 ms
  BOOST_TEST(ns(l.retry_after(7, 1)) == std::chrono::nanoseconds(500ms).count());
  BOOST_TEST(ns(l.retry_after(8, 2)) == 0);      // other keys are not slowed
  BOOST_TEST(!l.retry_after(7, 3).has_value());  // more than the capacity
  manual_clock::advance(250ms);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
  l.close();
  BOOST_TEST(!l.retry_after(7, 1).has_value());
}

// One call for a server: take the token or learn how long to wait, and why
// not when it can never be served.
BOOST_AUTO_TEST_CASE(try_get_token_reports_the_retry_after) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(4), 2);  // one token every 250 ms per key
  auto ns = [](const std::optional<std::chrono::nanoseconds>& d) { return d ? d->count() : -1LL; };
  std::optional<std::chrono::nanoseconds> wait = 1s;
  boost::system::error_code ec = ratelimit::error::bucket_closed;  // cleared by every call
  BOOST_TEST(l.try_get_token(7, 2, wait, ec));
  BOOST_TEST(ns(wait) == 0);
  BOOST_TEST(!ec);
  BOOST_TEST(!l.try_get_token(7, 1, wait, ec));
  BOOST_TEST(ns(wait) == std::chrono::nanoseconds(250ms).count());
  BOOST_TEST(!ec);
  auto r = keyed_request(l, 7);  // queued: due at 250 ms
  BOOST_TEST(!l.try_get_token(7, 1, wait));
  BOOST_TEST(ns(wait) == std::chrono::nanoseconds(500ms).count());  // behind r
  manual_clock::advance(500ms);  // r is due, its timer has not run: served first
  BOOST_TEST(l.try_get_token(7, 1, wait, ec));
  BOOST_TEST(ns(wait) == 0);
  BOOST_TEST(settle(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ok());
  BOOST_TEST(!l.try_get_token(7, 3, wait, ec));  // over the capacity: never
  BOOST_TEST(!wait.has_value());
  BOOST_TEST(ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(l.try_get_token(8, 2, wait, ec));  // the bound is 2 keys: 7 and 8
  BOOST_TEST(!l.try_get_token(9, 1, wait, ec));
  BOOST_TEST(!wait.has_value());
  BOOST_TEST(ec == ratelimit::error::too_many_keys);
  l.close();
  BOOST_TEST(!l.try_get_token(7, 1, wait, ec));
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  test_keyed m(std::move(l));
  BOOST_TEST(!l.try_get_token(7, 1, wait, ec));  // moved-from: closed
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_TEST(!wait.has_value());
}

// A request failed at once for a key with a bucket completes after what that
// bucket handed over before it, as with a token_bucket: here a stale wait's
// handler (set_rate moved the head's instant) grants x after the failure was
// posted, and must not run x's handler first.
BOOST_AUTO_TEST_CASE(a_failure_at_once_keeps_its_place_in_the_order) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 10);
  BOOST_TEST(l.try_get_token(7));
  auto x = keyed_request(l, 7);  // due at 1 s
  l.set_rate(7, per_second(2));  // due at 0.5 s: the 1 s wait is cancelled
  manual_clock::advance(500ms);
  auto f = keyed_request(l, 7, 2);  // over the key's capacity: fails at once
  BOOST_TEST(settle(ctx, [&] { return x->done() && f->done(); }));
  BOOST_TEST(f->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(x->ok());
  BOOST_TEST(f->order < x->order);
}

BOOST_AUTO_TEST_CASE(try_get_token_with_an_error_code) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(1), 2);
  boost::system::error_code ec = ratelimit::error::bucket_closed;  // cleared by every call
  BOOST_TEST(l.try_get_token(1, 2, ec));
  BOOST_TEST(!ec);
  ec = ratelimit::error::bucket_closed;
  BOOST_TEST(!l.try_get_token(1, 1, ec));  // limited: the tokens are not there
  BOOST_TEST(!ec);
  BOOST_TEST(!l.try_get_token(1, 3, ec));
  BOOST_TEST(ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(l.try_get_token(2, 1, ec));  // the second key fits
  BOOST_TEST(!ec);
  auto queued = keyed_request(l, 2, 2);  // waits for key 2's second token
  BOOST_TEST(settle(ctx, [&] { return !l.try_get_token(2, 0); }));
  BOOST_TEST(!l.try_get_token(2, 1, ec));  // limited: a request is queued ahead
  BOOST_TEST(!ec);
  BOOST_TEST(!l.try_get_token(3, 1, ec));  // a third key: no room, nothing evictable
  BOOST_TEST(ec == ratelimit::error::too_many_keys);
  BOOST_TEST(!l.try_get_token(3, 1));  // the short form just says no
  l.close();
  BOOST_TEST(!l.try_get_token(1, 1, ec));
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_TEST(!l.try_get_token(4, 1, ec));
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
  BOOST_TEST(settle(ctx, [&] { return queued->done(); }));
  BOOST_TEST(queued->ec == ratelimit::error::bucket_closed);
}

BOOST_AUTO_TEST_SUITE_END()

// --- The lifetime matrix, for the keyed limiter -------------------------------
//
// As for token_bucket (test_lifetime.cpp): destroy, close or cancel the
// limiter while there are (a) asynchronous waiters (callbacks, coroutines, a
// future), (b) threads blocked in get_token, (c) deferred operations not yet
// launched (launched afterwards; one with a temporary key), (d) completions
// posted but not yet run. Every handler exactly once, with what it is owed;
// run() returns; ASan clean. The old limiter failed here with
// heap-use-after-free twice over: the woken blocked threads, and deferred
// operations launched through a raw pointer to the freed limiter. (And before
// any of that, through the dangling key of the coroutines' requests: an
// awaitable made in co_request's lambda starts after the lambda's temporary
// key is gone.)

namespace {

enum class ending { destroy, close, cancel };

const char* name(ending e) {
  return e == ending::destroy ? "destroy" : e == ending::close ? "close" : "cancel";
}

boost::system::error_code owed(ending e) {
  if (e == ending::close) return ratelimit::error::bucket_closed;
  return asio::error::operation_aborted;
}

boost::system::error_code future_error(std::future<void>& f) {
  try {
    f.get();
  } catch (const boost::system::system_error& e) {
    return e.code();
  }
  return {};
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(keyed_lifetime_matrix, clock_fixture)

BOOST_AUTO_TEST_CASE(keyed_limiter_with_every_kind_of_pending_work) {
  for (const ending how : {ending::destroy, ending::close, ending::cancel}) {
    BOOST_TEST_CONTEXT(name(how)) {
      manual_clock::reset();
      asio::io_context ctx;          // polled by hand: completions wait until then
      asio::io_context handler_ctx;  // where one completion waits, dispatched
      // Keys 0-3 are in use below, and none of them is evictable: a fifth is refused.
      auto limiter = std::make_unique<test_keyed>(ctx, 2, per_second(1), 4);
      test_keyed* l = limiter.get();

      // (d) granted at once on key 0, then dispatched to a handler executor
      // not running yet.
      auto granted = std::make_shared<outcome>();
      l->async_get_token(0, 2, asio::bind_executor(handler_ctx, checked_handler(granted)));

      // (a) waiters of every kind on key 1, and a deferred operation launched at once.
      BOOST_TEST_REQUIRE(l->try_get_token(1, 2));
      std::vector<std::shared_ptr<outcome>> waiters;
      for (int i = 0; i < 3; ++i)
        waiters.push_back(keyed_request(*l, 1));
      int coroutines_waiting = 0;  // (a coroutine runs to its wait in one go)
      for (int i = 0; i < 3; ++i)
        waiters.push_back(co_request(ctx, [l, &coroutines_waiting](auto token) {
          ++coroutines_waiting;
          return l->async_get_token(1, token);
        }));
      waiters.push_back(std::make_shared<outcome>());
      l->async_get_token(1, asio::deferred)(checked_handler(waiters.back()));
      std::future<void> future = l->async_get_token(1, asio::use_future);
      BOOST_TEST_REQUIRE(settle(ctx, [&] { return coroutines_waiting == 3; }));

      // (b) threads blocked on keys 2 and 3.
      boost::system::error_code ec2, ec3;
      BOOST_TEST_REQUIRE(l->try_get_token(2, 2));
      BOOST_TEST_REQUIRE(l->try_get_token(3, 2));
      std::atomic<int> returned{0};
      std::thread t2([&] {
        l->get_token(2, ec2);
        ++returned;
      });
      std::thread t3([&] {
        l->get_token(3, 2, ec3);
        ++returned;
      });
      BOOST_TEST_REQUIRE(eventually([&] { return !l->try_get_token(2, 0); }));
      BOOST_TEST_REQUIRE(eventually([&] { return !l->try_get_token(3, 0); }));

      // (c) deferred operations, not launched; one for a temporary key.
      auto later1 = l->async_get_token(1, asio::deferred);
      auto later2 = l->async_get_token(int{2}, 2, asio::deferred);

      // (d) completions posted to the limiter's context, not run: a waiter
      // cancelled by its own signal, and requests that fail at once.
      asio::cancellation_signal sig;
      auto cancelled = std::make_shared<outcome>();
      l->async_get_token(1, asio::bind_cancellation_slot(sig.slot(), checked_handler(cancelled)));
      sig.emit(asio::cancellation_type::terminal);
      auto too_big = keyed_request(*l, 1, 3);
      auto no_room = keyed_request(*l, 4);

      switch (how) {
        case ending::destroy:
          limiter.reset();
          break;
        case ending::close:
          l->close();
          break;
        case ending::cancel:
          BOOST_TEST(l->cancel() == 10u);  // 8 on key 1, a thread on each of 2 and 3
          break;
      }
      BOOST_TEST_REQUIRE(eventually([&] { return returned == 2; }, 10s));  // (see above)
      t2.join();
      t3.join();
      // One deferred operation is launched while the rest is still pending...
      auto late1 = std::make_shared<outcome>();
      std::move(later1)(checked_handler(late1));
      if (how == ending::cancel) manual_clock::advance(1s);  // still open: granted
      BOOST_TEST(runs_dry(ctx));
      // ... one when nothing else is left that could keep the limiter's state alive.
      auto late2 = std::make_shared<outcome>();
      std::move(later2)(checked_handler(late2));
      if (how == ending::cancel) manual_clock::advance(2s);
      BOOST_TEST(runs_dry(ctx));
      BOOST_TEST(runs_dry(handler_ctx));
      BOOST_TEST(granted->ok());
      for (auto& w : waiters) {
        BOOST_TEST(w->calls == 1);
        BOOST_TEST(w->ec == owed(how));
      }
      BOOST_TEST((future.wait_for(0s) == std::future_status::ready));
      BOOST_TEST(future_error(future) == owed(how));
      BOOST_TEST(ec2 == owed(how));
      BOOST_TEST(ec3 == owed(how));
      BOOST_TEST(cancelled->calls == 1);
      BOOST_TEST(cancelled->ec == asio::error::operation_aborted);
      BOOST_TEST(too_big->ec == ratelimit::error::exceeds_capacity);
      BOOST_TEST(no_room->ec == ratelimit::error::too_many_keys);
      for (auto& late : {late1, late2}) {
        BOOST_TEST(late->calls == 1);
        if (how == ending::cancel)
          BOOST_TEST(!late->ec);
        else
          BOOST_TEST(late->ec == owed(how));
      }
      limiter.reset();
      BOOST_TEST(runs_dry(ctx));
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// Per-key quotas and run-time configuration: a key's own capacity and rate
// (kept apart from its bucket, so across eviction), and set_rate /
// set_capacity for every key and per key, re-timing queued requests as the
// single bucket does.
BOOST_FIXTURE_TEST_SUITE(keyed_quotas, clock_fixture)

BOOST_AUTO_TEST_CASE(a_key_gets_its_own_capacity_and_rate) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 100);
  l.set_quota(7, {5, per_second(10)});
  BOOST_TEST(l.size() == 0u);  // configuration only: no bucket is made
  BOOST_TEST(l.own_quotas() == 1u);
  BOOST_TEST((l.get_quota(7) == ratelimit::quota{5, per_second(10)}));
  BOOST_TEST((l.get_quota(1) == ratelimit::quota{1, per_second(1)}));
  BOOST_TEST(l.available(7) == 5u);  // a new key starts full, at its own capacity
  BOOST_TEST(l.try_get_token(7, 5));
  BOOST_TEST(l.retry_after(7, 1)->count() == std::chrono::nanoseconds(100ms).count());
  BOOST_TEST(l.try_get_token(1));
  BOOST_TEST(l.retry_after(1, 1)->count() == std::chrono::nanoseconds(1s).count());

  boost::system::error_code ec;
  BOOST_TEST(!l.try_get_token(1, 2, ec));  // over the default capacity
  BOOST_TEST(ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(!l.retry_after(1, 2));
  BOOST_TEST(l.retry_after(7, 5).has_value());
  BOOST_TEST(!l.retry_after(7, 6));
  auto big = keyed_request(l, 8, 2);  // a new key over the default: no bucket
  BOOST_TEST(settle(ctx, [&] { return big->done(); }));
  BOOST_TEST(big->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(!l.contains(8));
}

BOOST_AUTO_TEST_CASE(a_quota_is_kept_when_the_bucket_is_evicted) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 1);
  BOOST_TEST(l.try_get_token(7));
  l.set_quota(7, {3, per_second(3)});  // applied to the live bucket: 0 of 3 now
  BOOST_TEST(l.available(7) == 0u);
  manual_clock::advance(1s);  // full again: 3 of 3
  BOOST_TEST(l.available(7) == 3u);
  BOOST_TEST(l.try_get_token(2));  // at the bound: key 7 is evicted for key 2
  BOOST_TEST(!l.contains(7));
  manual_clock::advance(1s);
  BOOST_TEST(l.try_get_token(7, 3));  // its quota held: a fresh bucket of 3
  BOOST_TEST(!l.contains(2));
  BOOST_TEST((l.get_quota(7) == ratelimit::quota{3, per_second(3)}));
}

BOOST_AUTO_TEST_CASE(set_rate_retimes_queued_requests_of_every_key_without_its_own) {
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 100);
  l.set_rate(9, per_second(1));  // key 9's own rate (1/s too)
  BOOST_TEST(l.try_get_token(1));
  BOOST_TEST(l.try_get_token(9));
  auto a = keyed_request(l, 1), b = keyed_request(l, 9);
  manual_clock::advance(50ms);
  l.set_rate(per_second(10));  // the default: key 1 follows, key 9 keeps its own
  BOOST_TEST((l.get_rate() == per_second(10)));
  pump(ctx);
  BOOST_TEST(!a->done());
  manual_clock::advance(50ms);  // 100 ms at 1/s then 10/s: 0.05 + 0.5 = 0.55 token
  pump(ctx);
  BOOST_TEST(!a->done());
  manual_clock::advance(45ms);  // 0.05 + 0.95 = 1 token: due exactly now
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ok());
  BOOST_TEST(!b->done());
  BOOST_TEST((l.get_quota(9).rate == per_second(1)));
  manual_clock::advance(855ms);  // 1 s for key 9
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  BOOST_TEST(b->ok());
}

BOOST_AUTO_TEST_CASE(set_capacity_fails_queued_requests_over_it_and_keeps_own_capacities) {
  asio::io_context ctx;
  test_keyed l(ctx, 4, per_second(1), 100);
  l.set_capacity(2, 4);  // key 2: its own capacity of 4
  BOOST_TEST(l.try_get_token(1, 4));
  BOOST_TEST(l.try_get_token(2, 4));
  auto a3 = keyed_request(l, 1, 3), a1 = keyed_request(l, 1, 1), b3 = keyed_request(l, 2, 3);
  l.set_capacity(2);  // the default, for key 1
  BOOST_TEST(l.capacity() == 2u);
  BOOST_TEST(settle(ctx, [&] { return a3->done(); }));
  BOOST_TEST(a3->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(!a1->done());  // re-timed behind nothing: due at 1 s
  BOOST_TEST(!b3->done());
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return a1->done(); }));
  BOOST_TEST(a1->ok());
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return b3->done(); }));
  BOOST_TEST(b3->ok());
  BOOST_TEST(l.get_quota(2).capacity == 4u);
  BOOST_TEST(l.get_quota(1).capacity == 2u);
  manual_clock::advance(10s);
  BOOST_TEST(l.available(1) == 2u);  // the excess was dropped, the cap holds
  BOOST_TEST(!l.try_get_token(1, 3));
}

BOOST_AUTO_TEST_CASE(reset_quota_returns_a_key_to_the_defaults) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(1), 100);
  l.set_quota(5, {10, per_second(100)});
  BOOST_TEST(l.available(5) == 10u);
  BOOST_TEST(l.try_get_token(5, 1));
  BOOST_TEST(l.reset_quota(5));
  BOOST_TEST(!l.reset_quota(5));
  BOOST_TEST(l.own_quotas() == 0u);
  BOOST_TEST(l.available(5) == 2u);  // the live bucket: the excess dropped
  BOOST_TEST((l.get_quota(5) == ratelimit::quota{2, per_second(1)}));
  l.set_capacity(3);
  BOOST_TEST(l.get_quota(5).capacity == 3u);  // it follows the defaults again
}

BOOST_AUTO_TEST_CASE(a_raised_capacity_keeps_a_full_bucket_full) {
  // A full bucket is the fresh bucket its key would get: the key holds the
  // new capacity whether or not its bucket was evicted before the raise.
  asio::io_context ctx;
  test_keyed l(ctx, 1, per_second(1), 2);
  BOOST_TEST(l.try_get_token(1, 0));  // key 1: a full bucket (1 of 1)
  BOOST_TEST(l.try_get_token(2));     // key 2: 0 of 1
  l.set_capacity(2);
  BOOST_TEST(l.available(1) == 2u);   // as a fresh bucket of key 1
  BOOST_TEST(l.available(2) == 0u);   // not full: keeps its level
  BOOST_TEST(l.try_get_token(3, 2));  // key 1 is evicted for key 3 at once
  BOOST_TEST(!l.contains(1));
  BOOST_TEST(l.contains(2));
  manual_clock::advance(2s);
  l.set_capacity(3, 4);  // key 3 full again: full at its own capacity
  BOOST_TEST(l.available(3) == 4u);
  BOOST_TEST(l.available(2) == 2u);  // refilled to the new capacity
  l.set_capacity(1);                 // lowered: full at 1, as ever
  BOOST_TEST(l.available(2) == 1u);
}

BOOST_AUTO_TEST_CASE(bad_values_are_refused_and_change_nothing) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(1), 100);
  BOOST_CHECK_THROW(l.set_rate(ratelimit::rate{0, 1s}), std::invalid_argument);
  BOOST_CHECK_THROW(l.set_rate(ratelimit::rate{1, 0s}), std::invalid_argument);
  BOOST_CHECK_THROW(l.set_capacity(0), std::invalid_argument);
  BOOST_CHECK_THROW(l.set_quota(1, {0, per_second(1)}), std::invalid_argument);
  BOOST_CHECK_THROW(l.set_quota(1, {1, ratelimit::rate{1, -1s}}), std::invalid_argument);
  BOOST_CHECK_THROW(l.set_rate(1, ratelimit::rate{0, 1s}), std::invalid_argument);
  BOOST_CHECK_THROW(l.set_capacity(1, 0), std::invalid_argument);
  BOOST_TEST(l.own_quotas() == 0u);
  BOOST_TEST((l.get_quota(1) == ratelimit::quota{2, per_second(1)}));
  BOOST_TEST(l.capacity() == 2u);
  BOOST_TEST((l.get_rate() == per_second(1)));
}

BOOST_AUTO_TEST_CASE(a_moved_from_limiter_takes_configuration_as_a_no_op) {
  asio::io_context ctx;
  test_keyed l(ctx, 2, per_second(1), 100);
  test_keyed m(std::move(l));
  l.set_rate(per_second(5));
  l.set_quota(1, {3, per_second(3)});
  BOOST_TEST(!l.reset_quota(1));
  BOOST_TEST(l.own_quotas() == 0u);
  BOOST_CHECK_THROW(l.set_capacity(0), std::invalid_argument);  // still validated
  BOOST_TEST(m.capacity() == 2u);
}

// Many threads change the defaults and the quotas while others take tokens
// and wait (run under TSan in the sanitizer tree): every request completes,
// and nothing is granted beyond what the largest quota allows.
BOOST_AUTO_TEST_CASE(configuration_changes_race_with_requests) {
  running_context rc(2);
  ratelimit::keyed_limiter<int> l(rc.ctx, 4, per_second(100000), 16);
  std::atomic<int> done{0}, granted{0};
  std::vector<std::thread> threads;
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 300; ++i) {
        const int key = static_cast<int>(rng() % 8);
        if (rng() % 2) {
          granted += l.try_get_token(key);
          ++done;
        } else {
          l.async_get_token(key, [&](boost::system::error_code ec) {
            granted += !ec;
            ++done;
          });
        }
      }
    });
  threads.emplace_back([&] {
    std::mt19937 rng(9);
    for (int i = 0; i < 300; ++i) {
      const int key = static_cast<int>(rng() % 8);
      switch (rng() % 5) {
        case 0:
          l.set_rate(per_second(50000 + rng() % 100000));
          break;
        case 1:
          l.set_capacity(1 + rng() % 4);
          break;
        case 2:
          l.set_quota(key, {1 + rng() % 4, per_second(50000 + rng() % 100000)});
          break;
        case 3:
          l.reset_quota(key);
          break;
        default:
          l.set_capacity(key, 1 + rng() % 4);
      }
    }
  });
  for (auto& t : threads)
    t.join();
  BOOST_TEST(eventually([&] { return done == 600; }));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  BOOST_TEST(granted > 0);
  // Per key at most the largest capacity plus the fastest rate over the run.
  BOOST_TEST(granted <= 8 * (4 + 150000 * seconds + 1));
}

BOOST_AUTO_TEST_SUITE_END()
