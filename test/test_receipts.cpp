// Receipts: the acquire forms grant as the get_token forms do and hand over a
// receipt; give_back returns at most what was granted, capped at the
// capacity, and grants the waiters it makes due; a failed or cancelled
// request gets an empty receipt and takes nothing; a receipt outliving its
// limiter gives back to nothing; a key's receipt gives back to the key's
// bucket as it is when used (also after an eviction); every completion token;
// concurrent give-backs keep the count exact.
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/receipt.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/as_tuple.hpp>
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

#include <atomic>
#include <future>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <type_traits>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;
using ratelimit::receipt;
using test_keyed =
    ratelimit::basic_keyed_limiter<std::string, std::hash<std::string>, std::equal_to<std::string>,
                                   manual_clock, manual_wait_traits>;

static_assert(std::is_nothrow_move_constructible_v<receipt>);
static_assert(std::is_nothrow_move_assignable_v<receipt>);
static_assert(!std::is_copy_constructible_v<receipt>);

namespace {

/// What one async_acquire ended with.
struct acquired {
  int calls = 0;
  boost::system::error_code ec;
  receipt r;
  bool done() const { return calls > 0; }
};

template <typename Limiter, typename... Args>
std::shared_ptr<acquired> acquire_async(Limiter& l, Args&&... args) {
  auto a = std::make_shared<acquired>();
  l.async_acquire(std::forward<Args>(args)..., [a](boost::system::error_code ec, receipt r) {
    ++a->calls;
    a->ec = ec;
    a->r = std::move(r);
  });
  return a;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(receipts, clock_fixture)

BOOST_AUTO_TEST_CASE(a_grant_hands_over_a_receipt_for_what_it_took) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1));
  auto a = acquire_async(bucket, 7);
  BOOST_TEST(!a->done());  // never inside the initiating call
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(!a->ec);
  BOOST_TEST(a->r.granted() == 7u);
  BOOST_TEST(a->r.held() == 7u);
  BOOST_TEST(bucket.available() == 3u);
  BOOST_TEST(a->r.give_back(2) == 2u);
  BOOST_TEST(a->r.held() == 5u);
  BOOST_TEST(bucket.available() == 5u);
  // Never more than it granted, in all calls together.
  BOOST_TEST(a->r.give_back(100) == 5u);
  BOOST_TEST(a->r.held() == 0u);
  BOOST_TEST(a->r.give_back(1) == 0u);
  BOOST_TEST(bucket.available() == 10u);
  BOOST_TEST(a->r.granted() == 7u);
}

BOOST_AUTO_TEST_CASE(giving_back_is_capped_at_the_capacity) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1));
  auto r = bucket.try_acquire(4);
  BOOST_REQUIRE(r);
  manual_clock::advance(3s);              // 9 tokens
  BOOST_TEST(r->give_back(4) == 4u);      // counted as given back ...
  BOOST_TEST(bucket.available() == 10u);  // ... but the cap swallowed 3
  manual_clock::advance(1s);
  BOOST_TEST(bucket.available() == 10u);
}

BOOST_AUTO_TEST_CASE(giving_back_grants_the_waiters_it_makes_due_in_order) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1));
  auto first = bucket.try_acquire(10);
  BOOST_REQUIRE(first);
  auto w1 = request(bucket, 3);
  auto w2 = request(bucket, 4);
  auto w3 = request(bucket, 5);
  pump(ctx);
  BOOST_TEST(!w1->done());
  BOOST_TEST(first->give_back(7) == 7u);  // no time passes: 7 tokens, for w1 and w2
  BOOST_TEST(settle(ctx, [&] { return w2->done(); }));
  pump(ctx);
  BOOST_TEST(w1->ok());
  BOOST_TEST(w2->ok());
  BOOST_TEST(w1->order < w2->order);
  BOOST_TEST(!w3->done());
  BOOST_TEST(bucket.available() == 0u);
  BOOST_TEST(bucket.waiting() == 1u);
  // w3 needs 5; the give-back of the remaining 3 brings the level to 3, and
  // 2 more seconds the rest.
  BOOST_TEST(first->give_back_all() == 3u);
  pump(ctx);
  BOOST_TEST(!w3->done());
  manual_clock::advance(1999ms);
  pump(ctx);
  BOOST_TEST(!w3->done());
  manual_clock::advance(1ms);
  BOOST_TEST(settle(ctx, [&] { return w3->done(); }));
  BOOST_TEST(w3->ok());
}

BOOST_AUTO_TEST_CASE(a_give_back_with_a_due_waiter_grants_it_and_keeps_the_rest) {
  // The waiter's tokens accrued before the give-back: it is granted (as of
  // when they accrued), and the tokens given back are what the bucket holds
  // after, up to the capacity.
  asio::io_context ctx;
  test_bucket bucket(ctx, 4, per_second(1));
  receipt r = *bucket.try_acquire(4);
  auto w = request(bucket, 4);
  manual_clock::advance(4s);  // w is due; its timer has not run (nothing polls)
  BOOST_TEST(!w->done());
  BOOST_TEST(r.give_back(4) == 4u);
  BOOST_TEST(settle(ctx, [&] { return w->done(); }));
  BOOST_TEST(w->ok());
  BOOST_TEST(bucket.available() == 4u);
}

BOOST_AUTO_TEST_CASE(a_failed_or_cancelled_request_gets_an_empty_receipt_and_takes_nothing) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1));
  auto too_big = acquire_async(bucket, 6);
  BOOST_TEST(settle(ctx, [&] { return too_big->done(); }));
  BOOST_TEST(too_big->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(too_big->r.granted() == 0u);
  BOOST_TEST(too_big->r.give_back(6) == 0u);

  BOOST_REQUIRE(bucket.try_acquire(5));
  asio::cancellation_signal sig;
  auto a = std::make_shared<acquired>();
  bucket.async_acquire(
      3, asio::bind_cancellation_slot(sig.slot(), [a](boost::system::error_code ec, receipt r) {
        ++a->calls;
        a->ec = ec;
        a->r = std::move(r);
      }));
  pump(ctx);
  BOOST_TEST(bucket.waiting() == 1u);
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ec == asio::error::operation_aborted);
  BOOST_TEST(a->r.held() == 0u);
  manual_clock::advance(3s);
  BOOST_TEST(bucket.available() == 3u);  // the cancelled request took nothing
}

BOOST_AUTO_TEST_CASE(a_receipt_that_outlives_its_bucket_gives_back_to_nothing) {
  asio::io_context ctx;
  std::optional<receipt> r;
  {
    test_bucket bucket(ctx, 5, per_second(1));
    r = bucket.try_acquire(5);
    BOOST_REQUIRE(r);
  }
  BOOST_TEST(r->give_back(5) == 5u);  // counted; no bucket to add to, no crash
  BOOST_TEST(r->held() == 0u);
  pump(ctx);
}

BOOST_AUTO_TEST_CASE(a_moved_from_bucket_fails_with_bucket_closed_and_an_empty_receipt) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1));
  test_bucket other(std::move(bucket));
  auto a = acquire_async(bucket, 1);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ec == ratelimit::error::bucket_closed);
  BOOST_TEST(a->r.granted() == 0u);
  BOOST_TEST(!bucket.try_acquire(1));
  boost::system::error_code ec;
  BOOST_TEST(bucket.acquire(1, ec).granted() == 0u);
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
}

BOOST_AUTO_TEST_CASE(receipts_move_like_unique_ptr) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1));
  receipt a = *bucket.try_acquire(3);
  receipt b = std::move(a);
  BOOST_TEST(a.held() == 0u);
  BOOST_TEST(a.give_back(3) == 0u);
  BOOST_TEST(b.held() == 3u);
  receipt c;
  c = std::move(b);
  BOOST_TEST(b.granted() == 0u);
  BOOST_TEST(c.give_back(3) == 3u);
  BOOST_TEST(bucket.available() == 5u);
}

BOOST_AUTO_TEST_CASE(every_completion_token) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 100, per_second(1));
  // use_future
  std::future<receipt> f = bucket.async_acquire(2, asio::use_future);
  // deferred, launched later
  auto op = bucket.async_acquire(3, asio::deferred);
  std::optional<receipt> from_deferred;
  std::move(op)([&](boost::system::error_code ec, receipt r) {
    BOOST_TEST(!ec);
    from_deferred = std::move(r);
  });
  // coroutine
  std::optional<receipt> from_coroutine;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        from_coroutine = co_await bucket.async_acquire(4, asio::use_awaitable);
        auto [ec, r] = co_await bucket.async_acquire(5, asio::as_tuple(asio::use_awaitable));
        BOOST_TEST(!ec);
        BOOST_TEST(r.granted() == 5u);
        r.give_back(5);
      },
      asio::detached);
  // a strand of its own
  auto strand = asio::make_strand(ctx);
  std::optional<receipt> from_strand;
  bool on_strand = false;
  bucket.async_acquire(6, asio::bind_executor(strand, [&](boost::system::error_code ec, receipt r) {
                         BOOST_TEST(!ec);
                         on_strand = strand.running_in_this_thread();
                         from_strand = std::move(r);
                       }));
  BOOST_TEST(settle(ctx, [&] {
    return f.wait_for(0s) == std::future_status::ready && from_deferred && from_coroutine &&
           from_strand;
  }));
  pump(ctx);
  BOOST_TEST(f.get().granted() == 2u);
  BOOST_TEST(from_deferred->granted() == 3u);
  BOOST_TEST(from_coroutine->granted() == 4u);
  BOOST_TEST(from_strand->granted() == 6u);
  BOOST_TEST(on_strand);
  BOOST_TEST(bucket.available() == 100u - 2 - 3 - 4 - 6);
}

BOOST_AUTO_TEST_CASE(blocking_acquire_and_try_acquire) {
  running_context rc;
  test_bucket bucket(rc.ctx, 3, per_second(1));
  receipt r = bucket.acquire(3);
  BOOST_TEST(r.granted() == 3u);
  BOOST_TEST(!bucket.try_acquire(1));
  std::atomic<bool> got{false};
  std::atomic<std::uint64_t> granted{0};  // (Boost.Test is for the main thread only)
  std::thread t([&] {
    receipt r2 = bucket.acquire(2);  // waits for the give-back below
    granted = r2.granted();
    got = true;
  });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1u; }));
  BOOST_TEST(!got);
  r.give_back(2);
  BOOST_TEST(eventually([&] { return got.load(); }));
  t.join();
  BOOST_TEST(granted == 2u);
  boost::system::error_code ec;
  BOOST_TEST(bucket.acquire(4, ec).granted() == 0u);
  BOOST_TEST(ec == ratelimit::error::exceeds_capacity);
  BOOST_CHECK_THROW(bucket.acquire(4), boost::system::system_error);
}

BOOST_AUTO_TEST_CASE(the_bound_holds_for_any_sequence_of_grants_and_give_backs) {
  // Over any window [t0, t1]: granted - given back <= capacity + rate * (t1 - t0).
  // Checked on random sequences against every window of the recorded history.
  std::mt19937_64 rng(7);
  for (int round = 0; round < 20; ++round) {
    manual_clock::reset();
    asio::io_context ctx;
    const std::uint64_t cap = 1 + rng() % 20;
    test_bucket bucket(ctx, cap, per_second(1 + rng() % 5));
    const std::int64_t rate_per_s = bucket.get_rate().tokens;
    struct event {
      std::int64_t t;
      std::int64_t delta;  // + granted, - given back
    };
    std::vector<event> history;
    std::vector<receipt> held;
    for (int i = 0; i < 200; ++i) {
      const int what = static_cast<int>(rng() % 3);
      const auto now = manual_clock::now().time_since_epoch().count();
      if (what == 0) {
        manual_clock::advance(std::chrono::milliseconds(rng() % 700));
      } else if (what == 1) {
        if (auto r = bucket.try_acquire(rng() % (cap + 1))) {
          history.push_back({now, static_cast<std::int64_t>(r->granted())});
          held.push_back(std::move(*r));
        }
      } else if (!held.empty()) {
        receipt& r = held[rng() % held.size()];
        const auto n = r.give_back(rng() % (cap + 1));
        history.push_back({now, -static_cast<std::int64_t>(n)});
      }
    }
    for (std::size_t i = 0; i < history.size(); ++i) {
      std::int64_t net = 0;
      for (std::size_t j = i; j < history.size(); ++j) {
        net += history[j].delta;
        const std::int64_t window = history[j].t - history[i].t;
        const long double bound =
            static_cast<long double>(cap) + static_cast<long double>(rate_per_s) * window / 1e9L;
        BOOST_TEST(static_cast<long double>(net) <= bound);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(concurrent_give_backs_keep_the_count_exact) {
  // Many threads take and give back on a bucket that gains no token during
  // the test (one a day): what they hold at once never exceeds the capacity,
  // and once all is given back the bucket is exactly full again.
  asio::thread_pool pool(2);
  ratelimit::token_bucket bucket(pool, 64, ratelimit::rate{1, std::chrono::hours(24)});
  std::atomic<std::int64_t> in_hand{0};
  std::atomic<bool> over{false};
  std::vector<std::thread> threads;
#if defined(RATELIMIT_TEST_SANITIZED)
  const int rounds = 2'000;
#else
  const int rounds = 20'000;
#endif
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < rounds; ++i) {
        const std::uint64_t n = 1 + rng() % 16;
        std::optional<receipt> r = bucket.try_acquire(n);
        if (!r) continue;
        if (in_hand.fetch_add(static_cast<std::int64_t>(n)) + static_cast<std::int64_t>(n) > 64)
          over = true;
        const std::uint64_t part = rng() % (n + 1);
        in_hand -= static_cast<std::int64_t>(part);
        r->give_back(part);
        in_hand -= static_cast<std::int64_t>(r->held());
        r->give_back_all();
      }
    });
  for (auto& t : threads)
    t.join();
  BOOST_TEST(!over);
  BOOST_TEST(bucket.available() == 64u);
}

BOOST_AUTO_TEST_CASE(waiters_woken_by_concurrent_give_backs_all_complete) {
  // Async waiters queued behind a bucket that never refills in the test are
  // granted only by give-backs from other threads; all complete.
  asio::thread_pool pool(2);
  ratelimit::token_bucket bucket(pool, 8, ratelimit::rate{1, std::chrono::hours(24)});
  constexpr int waiters = 200;
  std::atomic<int> done{0};
  std::vector<receipt> first;
  for (int i = 0; i < 8; ++i)
    first.push_back(*bucket.try_acquire(1));
  std::atomic<int> failed{0};
  for (int i = 0; i < waiters; ++i)
    bucket.async_acquire(1, [&](boost::system::error_code ec, receipt r) {
      failed += ec ? 1 : 0;  // (checked on the main thread: Boost.Test is not thread-safe)
      r.give_back_all();     // passes the token on to the next waiter
      ++done;
    });
  std::vector<std::thread> givers;
  for (int t = 0; t < 2; ++t)
    givers.emplace_back([&, t] {
      for (int i = t; i < 8; i += 2)
        first[i].give_back_all();
    });
  for (auto& t : givers)
    t.join();
  BOOST_TEST(eventually([&] { return done.load() == waiters; }));
  BOOST_TEST(failed == 0);
  BOOST_TEST(eventually([&] { return bucket.available() == 8u; }));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(keyed_receipts, clock_fixture)

BOOST_AUTO_TEST_CASE(a_keys_receipt_gives_back_to_that_key) {
  asio::io_context ctx;
  test_keyed keyed(ctx, 10, per_second(1), 100);
  auto a = acquire_async(keyed, std::string("a"), 6);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  BOOST_TEST(!a->ec);
  BOOST_TEST(a->r.granted() == 6u);
  std::optional<receipt> b = keyed.try_acquire("b", 10);
  BOOST_REQUIRE(b);
  BOOST_TEST(keyed.available("a") == 4u);
  BOOST_TEST(a->r.give_back(5) == 5u);
  BOOST_TEST(keyed.available("a") == 9u);
  BOOST_TEST(keyed.available("b") == 0u);
  BOOST_TEST(b->give_back(3) == 3u);
  BOOST_TEST(keyed.available("b") == 3u);
  BOOST_TEST(keyed.available("a") == 9u);
}

BOOST_AUTO_TEST_CASE(a_give_back_wakes_the_keys_waiters) {
  asio::io_context ctx;
  test_keyed keyed(ctx, 4, per_second(1), 100);
  receipt r = *keyed.try_acquire("k", 4);
  auto w = acquire_async(keyed, std::string("k"), 3);
  pump(ctx);
  BOOST_TEST(!w->done());
  r.give_back(3);
  BOOST_TEST(settle(ctx, [&] { return w->done(); }));
  BOOST_TEST(!w->ec);
  BOOST_TEST(w->r.granted() == 3u);
}

BOOST_AUTO_TEST_CASE(after_an_eviction_the_receipt_gives_back_to_the_keys_bucket_as_it_is_now) {
  asio::io_context ctx;
  test_keyed keyed(ctx, 4, per_second(1), 100);
  receipt old = *keyed.try_acquire("k", 4);
  manual_clock::advance(4s);  // full again, unused: evictable
  BOOST_TEST(keyed.evict() == 1u);
  BOOST_TEST(!keyed.contains("k"));
  // With no bucket the key is full: nothing to add.
  BOOST_TEST(old.give_back(1) == 1u);
  BOOST_TEST(!keyed.contains("k"));
  BOOST_TEST(keyed.available("k") == 4u);
  // The key's new bucket is drained; the old receipt gives back to it, as it
  // would have to the bucket that was evicted (in the same state).
  receipt fresh = *keyed.try_acquire("k", 4);
  BOOST_TEST(keyed.available("k") == 0u);
  BOOST_TEST(old.give_back(3) == 3u);
  BOOST_TEST(keyed.available("k") == 3u);
  BOOST_TEST(fresh.held() == 4u);
}

BOOST_AUTO_TEST_CASE(a_bucket_that_a_give_back_fills_is_evictable_at_once) {
  // Full again by the give-back, unused: at the bound, a new key takes its
  // place now (not only when it would have refilled).
  asio::io_context ctx;
  test_keyed keyed(ctx, 4, per_second(1), 1);
  receipt r = *keyed.try_acquire("a", 4);
  boost::system::error_code ec;
  BOOST_TEST(!keyed.try_acquire("b", 1, ec));
  BOOST_TEST(ec == ratelimit::error::too_many_keys);
  BOOST_TEST(r.give_back_all() == 4u);
  BOOST_TEST(keyed.try_acquire("b", 1, ec).has_value());
  BOOST_TEST(!ec);
  BOOST_TEST(!keyed.contains("a"));
}

BOOST_AUTO_TEST_CASE(keyed_failures_give_empty_receipts) {
  asio::io_context ctx;
  test_keyed keyed(ctx, 4, per_second(1), 1);
  boost::system::error_code ec;
  BOOST_TEST(!keyed.try_acquire("a", 5, ec));
  BOOST_TEST(ec == ratelimit::error::exceeds_capacity);
  BOOST_REQUIRE(keyed.try_acquire("a", 1, ec));
  BOOST_TEST(!keyed.try_acquire("b", 1, ec));  // one key at most, and "a" is in use
  BOOST_TEST(ec == ratelimit::error::too_many_keys);
  auto f = acquire_async(keyed, std::string("b"), 1);
  BOOST_TEST(settle(ctx, [&] { return f->done(); }));
  BOOST_TEST(f->ec == ratelimit::error::too_many_keys);
  BOOST_TEST(f->r.granted() == 0u);
  keyed.close();
  BOOST_TEST(keyed.acquire("a", 1, ec).granted() == 0u);
  BOOST_TEST(ec == ratelimit::error::bucket_closed);
}

BOOST_AUTO_TEST_CASE(keyed_blocking_acquire) {
  running_context rc;
  test_keyed keyed(rc.ctx, 2, per_second(1), 10);
  receipt r = keyed.acquire("x", 2);
  std::atomic<bool> got{false};
  std::atomic<std::uint64_t> granted{0};
  std::thread t([&] {
    receipt r2 = keyed.acquire("x", 1);
    granted = r2.granted();
    got = true;
  });
  // Queued: a request made now would come after it (2 s instead of 1 s).
  BOOST_TEST(eventually(
      [&] { return keyed.retry_after("x", 1) == std::optional<test_keyed::duration>(2s); }));
  BOOST_TEST(!got);  // no token: the manual clock stands still
  r.give_back(1);
  BOOST_TEST(eventually([&] { return got.load(); }));
  t.join();
  BOOST_TEST(granted == 1u);
}

BOOST_AUTO_TEST_CASE(a_keys_receipt_that_outlives_the_limiter_gives_back_to_nothing) {
  asio::io_context ctx;
  std::optional<receipt> r;
  {
    test_keyed keyed(ctx, 4, per_second(1), 10);
    r = keyed.try_acquire("k", 4);
    BOOST_REQUIRE(r);
  }
  BOOST_TEST(r->give_back(4) == 4u);
  pump(ctx);
}

BOOST_AUTO_TEST_SUITE_END()
