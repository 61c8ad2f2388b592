// What a local bucket counts (basic_token_bucket::metrics()), scripted on the
// manual clock: each way a request can end, the wait histogram, the gauges,
// joint requests (counted on every bucket they name, also while the buckets
// are in the joint group), and a snapshot's consistency under threads.
#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/metrics.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>

#include <future>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::limiter_metrics;
using ratelimit::per_second;
using ratelimit::start_empty;
using ratelimit::wait_histogram_layout;
using test_part = ratelimit::basic_part<manual_clock, manual_wait_traits>;
namespace rerr = ratelimit::error;
using test_keyed = ratelimit::basic_keyed_limiter<int, std::hash<int>, std::equal_to<int>,
                                                  manual_clock, manual_wait_traits>;

namespace {

// The histogram's buckets the scenarios land in (wait_histogram_layout):
constexpr std::size_t le_1us = 0;    // grants at once
constexpr std::size_t le_1s = 18;    // waits in (0.5 s, 1 s]
constexpr std::size_t le_2_5s = 19;  // waits in (1 s, 2.5 s]

/// The histogram with `n` grants in each of `buckets` (by index).
std::array<std::uint64_t, wait_histogram_layout::buckets> histogram(
    std::initializer_list<std::pair<std::size_t, std::uint64_t>> buckets) {
  std::array<std::uint64_t, wait_histogram_layout::buckets> h{};
  for (auto [b, n] : buckets)
    h[b] += n;
  return h;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(bucket_metrics, clock_fixture)

BOOST_AUTO_TEST_CASE(a_new_bucket_counts_nothing_and_shows_its_tokens) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 5, per_second(1));
  limiter_metrics expected;
  expected.tokens_available = 5;
  BOOST_TEST((bucket.metrics() == expected));
  test_bucket moved(std::move(bucket));
  BOOST_TEST((bucket.metrics() == limiter_metrics{}));  // NOLINT(bugprone-use-after-move)
  BOOST_TEST(moved.metrics().tokens_available == 5u);
}

BOOST_AUTO_TEST_CASE(tries_are_grants_refusals_or_errors) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 3, per_second(1));
  BOOST_TEST(bucket.try_get_token(2));
  BOOST_TEST(bucket.try_get_token());
  BOOST_TEST(!bucket.try_get_token());  // refused: no token
  std::optional<manual_clock::duration> retry;
  BOOST_TEST(!bucket.try_get_token(1, retry));  // refused, with its wait
  BOOST_TEST(!bucket.try_get_token(4));         // over the capacity: an error, at once
  const limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.requests == 5u);
  BOOST_TEST(m.grants == 2u);
  BOOST_TEST(m.tokens_granted == 3u);
  BOOST_TEST(m.refusals == 2u);
  BOOST_TEST(m.errors[rerr::exceeds_capacity] == 1u);
  BOOST_TEST(m.wait_counts == histogram({{le_1us, 2}}));
  BOOST_TEST(m.wait_sum_us == 0u);
  BOOST_TEST(m.tokens_available == 0u);
  BOOST_TEST(m.queued_requests == 0u);
}

BOOST_AUTO_TEST_CASE(waits_land_in_their_histogram_buckets_and_sum_in_microseconds) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 2, per_second(1), start_empty);
  auto a = request(bucket);
  auto b = request(bucket);
  pump(ctx);
  limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.requests == 2u);
  BOOST_TEST(m.queued_requests == 2u);
  BOOST_TEST(m.grants == 0u);
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return b->done(); }));
  BOOST_TEST((a->ok() && b->ok()));
  m = bucket.metrics();
  BOOST_TEST(m.grants == 2u);
  BOOST_TEST(m.tokens_granted == 2u);
  BOOST_TEST(m.wait_counts == histogram({{le_1s, 1}, {le_2_5s, 1}}));  // 1 s and 2 s
  BOOST_TEST(m.wait_sum_us == 3'000'000u);
  BOOST_TEST(m.queued_requests == 0u);
}

BOOST_AUTO_TEST_CASE(a_late_timer_does_not_lengthen_the_counted_wait) {
  // Grants are made as of the instant their tokens accrued: a timer that
  // fires late (here: the clock jumps 10 s) counts the wait that was due.
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1), start_empty);
  auto a = request(bucket);
  pump(ctx);
  manual_clock::advance(10s);
  BOOST_TEST(settle(ctx, [&] { return a->done(); }));
  const limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.wait_counts == histogram({{le_1s, 1}}));
  BOOST_TEST(m.wait_sum_us == 1'000'000u);
  BOOST_TEST(m.tokens_available == 1u);
}

BOOST_AUTO_TEST_CASE(cancellations_close_and_capacity_changes_count_by_how_they_ended) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 4, per_second(1), start_empty);
  asio::cancellation_signal sig;
  auto cancelled = std::make_shared<outcome>();
  bucket.async_get_token(1, asio::bind_cancellation_slot(sig.slot(), checked_handler(cancelled)));
  auto dropped = request(bucket);
  auto too_big = request(bucket, 4);
  pump(ctx);
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return cancelled->done(); }));
  BOOST_TEST(bucket.cancel() == 2u);  // dropped and too_big
  BOOST_TEST(settle(ctx, [&] { return dropped->done() && too_big->done(); }));
  auto over = request(bucket, 3);
  pump(ctx);
  bucket.set_capacity(2);  // `over` can never be granted now
  BOOST_TEST(settle(ctx, [&] { return over->done(); }));
  BOOST_TEST(over->ec == rerr::exceeds_capacity);
  auto queued = request(bucket);
  pump(ctx);
  bucket.close();
  auto after = request(bucket);
  BOOST_TEST(settle(ctx, [&] { return queued->done() && after->done(); }));
  BOOST_TEST(!bucket.try_get_token());
  const limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.requests == 7u);
  BOOST_TEST(m.cancellations == 3u);
  BOOST_TEST(m.errors[rerr::exceeds_capacity] == 1u);
  BOOST_TEST(m.errors[rerr::bucket_closed] == 3u);  // queued, after, the try
  BOOST_TEST(m.grants == 0u);
  BOOST_TEST(m.tokens_granted == 0u);
}

BOOST_AUTO_TEST_CASE(deadlines_expire_at_once_or_while_waiting) {
  running_context rc;
  test_bucket bucket(rc.ctx, 2, per_second(1), start_empty);
  BOOST_TEST(!bucket.try_get_token_for(500ms));  // due at 1 s: known at once
  BOOST_TEST(bucket.metrics().deadline_expiries == 1u);
  // One that waits, and whose tokens move past its deadline (set_rate).
  std::promise<bool> got;
  std::thread t([&] { got.set_value(bucket.try_get_token_for(2s, 2)); });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1u; }));
  bucket.set_rate(ratelimit::per_minute(1));
  auto f = got.get_future();
  BOOST_TEST((f.wait_for(20s) == std::future_status::ready));
  t.join();
  BOOST_TEST(!f.get());
  // One granted after waiting, on its thread.
  bucket.set_rate(per_second(1));
  std::promise<bool> granted;
  std::thread u([&] { granted.set_value(bucket.try_get_token_for(5s)); });
  BOOST_TEST(eventually([&] { return bucket.waiting() == 1u; }));
  manual_clock::advance(1s);
  auto g = granted.get_future();
  BOOST_TEST((g.wait_for(20s) == std::future_status::ready));
  u.join();
  BOOST_TEST(g.get());
  const limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.requests == 3u);
  BOOST_TEST(m.deadline_expiries == 2u);
  BOOST_TEST(m.grants == 1u);
  BOOST_TEST(m.wait_counts == histogram({{le_1s, 1}}));
}

BOOST_AUTO_TEST_CASE(a_blocking_call_on_the_buckets_own_thread_is_an_error) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1, per_second(1), start_empty);
  boost::system::error_code ec;
  asio::post(ctx, [&] { bucket.get_token(1, ec); });
  ctx.run();
  BOOST_TEST(ec == rerr::would_deadlock);
  const limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.errors[rerr::would_deadlock] == 1u);
  BOOST_TEST(m.requests == 1u);
}

BOOST_AUTO_TEST_CASE(tokens_given_back_are_counted_whether_or_not_there_was_room) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 10, per_second(1));
  ratelimit::receipt r = bucket.acquire(6);
  BOOST_TEST(r.give_back(4) == 4u);
  r.give_back_all();
  limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.tokens_granted == 6u);
  BOOST_TEST(m.tokens_given_back == 6u);
  BOOST_TEST(m.tokens_available == 10u);
  ratelimit::receipt late = bucket.acquire(2);
  manual_clock::advance(10s);  // full again: what is given back now is lost, and counted
  BOOST_TEST(late.give_back_all() == 2u);
  m = bucket.metrics();
  BOOST_TEST(m.tokens_given_back == 8u);
  BOOST_TEST(m.tokens_available == 10u);
}

BOOST_AUTO_TEST_CASE(a_joint_request_counts_on_every_bucket_it_names) {
  asio::io_context ctx;
  test_bucket slow(ctx, 10, per_second(1), start_empty);
  test_bucket fast(ctx, 10, per_second(1000));
  // A try, refused (slow is empty): both count the refusal.
  BOOST_TEST(!ratelimit::try_acquire({test_part(slow, 1), test_part(fast, 2)}));
  bool granted = false;
  ratelimit::async_acquire(
      {test_part(slow, 2), test_part(fast, 5)},
      [&](boost::system::error_code ec, ratelimit::joint_receipt) { granted = !ec; });
  auto single = request(fast, 1);  // behind the joint request's part, in the group
  pump(ctx);
  // In the joint group: read from there.
  limiter_metrics s = slow.metrics();
  limiter_metrics f = fast.metrics();
  BOOST_TEST(s.queued_requests == 1u);
  BOOST_TEST(f.queued_requests == 1u + (single->done() ? 0u : 1u));
  BOOST_TEST(s.refusals == 1u);  // the try
  BOOST_TEST(f.refusals == 1u);
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return granted && single->done(); }));
  s = slow.metrics();
  f = fast.metrics();
  BOOST_TEST(s.requests == 2u);
  BOOST_TEST(s.grants == 1u);
  BOOST_TEST(s.tokens_granted == 2u);
  BOOST_TEST(s.wait_counts == histogram({{le_2_5s, 1}}));
  BOOST_TEST(f.requests == 3u);
  BOOST_TEST(f.grants == 2u);
  BOOST_TEST(f.tokens_granted == 6u);
  BOOST_TEST(f.wait_counts[le_2_5s] == 1u);  // the joint grant, at 2 s
  // Solo again (the group let them go): the counts came back with them.
  auto later = request(fast, 1);
  BOOST_TEST(settle(ctx, [&] { return later->done(); }));
  BOOST_TEST(fast.metrics().grants == 3u);
  BOOST_TEST(fast.metrics().requests == 4u);
}

BOOST_AUTO_TEST_CASE(joint_failures_and_cancellations_count_on_every_bucket) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1), start_empty);
  test_bucket b(ctx, 5, per_second(1));
  boost::system::error_code ec;
  std::optional<manual_clock::duration> retry;
  ratelimit::try_acquire({test_part(a, 1), test_part(b, 6)}, retry, ec);  // b's part is too big
  BOOST_TEST(ec == rerr::exceeds_capacity);
  asio::cancellation_signal sig;
  bool aborted = false;
  ratelimit::async_acquire({test_part(a, 1), test_part(b, 1)},
                           asio::bind_cancellation_slot(sig.slot(), [&](boost::system::error_code e,
                                                                        ratelimit::joint_receipt) {
                             aborted = e == asio::error::operation_aborted;
                           }));
  pump(ctx);
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return aborted; }));
  bool closed = false;
  ratelimit::async_acquire({test_part(a, 1), test_part(b, 1)},
                           [&](boost::system::error_code e, ratelimit::joint_receipt) {
                             closed = e == rerr::bucket_closed;
                           });
  pump(ctx);
  a.close();
  BOOST_TEST(settle(ctx, [&] { return closed; }));
  for (test_bucket* x : {&a, &b}) {
    const limiter_metrics m = x->metrics();
    BOOST_TEST(m.requests == 3u);
    BOOST_TEST(m.errors[rerr::exceeds_capacity] == 1u);
    BOOST_TEST(m.cancellations == 1u);
    BOOST_TEST(m.errors[rerr::bucket_closed] == 1u);
  }
  BOOST_TEST(b.metrics().tokens_available == 5u);  // nothing taken
}

BOOST_AUTO_TEST_CASE(a_keyed_limiter_totals_its_keys_also_those_evicted) {
  asio::io_context ctx;
  test_keyed keyed(ctx, 2, per_second(1), 2);  // at most 2 keys with a bucket
  BOOST_TEST(keyed.try_get_token(1, 2));
  BOOST_TEST(!keyed.try_get_token(1));  // refused
  BOOST_TEST(keyed.try_get_token(2));
  BOOST_TEST(!keyed.try_get_token(3));     // too_many_keys: neither key is full
  BOOST_TEST(!keyed.try_get_token(4, 3));  // over a new key's capacity
  auto waits = std::make_shared<outcome>();
  keyed.async_get_token(2, 2, checked_handler(waits));  // key 2: waits for its tokens
  pump(ctx);
  limiter_metrics m = keyed.metrics();
  BOOST_TEST(m.requests == 6u);
  BOOST_TEST(m.grants == 2u);
  BOOST_TEST(m.refusals == 1u);
  BOOST_TEST(m.errors[rerr::too_many_keys] == 1u);
  BOOST_TEST(m.errors[rerr::exceeds_capacity] == 1u);
  BOOST_TEST(m.queued_requests == 1u);
  BOOST_TEST(m.tokens_available == 0u);
  // A question about a key that would be refused is no request.
  BOOST_TEST(!ratelimit::retry_after({test_part(keyed, 3, 1)}));
  BOOST_TEST(keyed.metrics().errors[rerr::too_many_keys] == 1u);
  BOOST_TEST(keyed.metrics().requests == 6u);
  manual_clock::advance(2s);
  BOOST_TEST(settle(ctx, [&] { return waits->done(); }));
  manual_clock::advance(2s);  // both full again: evictable
  BOOST_TEST(keyed.evict() == 2u);
  BOOST_TEST(keyed.size() == 0u);
  m = keyed.metrics();
  BOOST_TEST(m.requests == 6u);  // the evicted keys' counts stay
  BOOST_TEST(m.grants == 3u);
  BOOST_TEST(m.tokens_granted == 5u);
  BOOST_TEST(m.wait_counts == histogram({{le_1us, 2}, {le_1s, 1}}));  // key 2 waited 1 s
  BOOST_TEST(m.queued_requests == 0u);
  BOOST_TEST(m.tokens_available == 0u);  // no key has a bucket
  BOOST_TEST(keyed.try_get_token(3));    // a new key: its bucket adds to the totals
  m = keyed.metrics();
  BOOST_TEST(m.requests == 7u);
  BOOST_TEST(m.tokens_available == 1u);
  keyed.close();
  BOOST_TEST(!keyed.try_get_token(5));
  BOOST_TEST(keyed.metrics().errors[rerr::bucket_closed] == 1u);
}

BOOST_AUTO_TEST_CASE(snapshots_stay_consistent_while_threads_request) {
  // Run under TSan too: the counts are bumped and read under the lock that
  // decides each request, so every snapshot adds up and counters only grow.
  running_context rc(2);
  test_bucket bucket(rc.ctx, 50, per_second(1'000'000));
  std::atomic<bool> stop{false};
  std::atomic<int> completed{0};
  std::atomic<std::uint64_t> started{0};  // calls begun (before each call)
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        ++started;
        bucket.try_get_token();
        ++started;
        bucket.async_get_token(2, [&](boost::system::error_code) { ++completed; });
        if (i % 64 == 0) manual_clock::advance(1ms);
      }
    });
  // (Boost.Test's assertions are for the main thread: the reader only notes.)
  std::atomic<int> overcounted{0}, went_back{0}, snapshots{0};
  std::thread reader([&] {
    limiter_metrics last;
    while (!stop) {
      const limiter_metrics m = bucket.metrics();
      // Counted when made: never more than the calls begun by now.
      if (m.requests > started.load()) ++overcounted;
      if (m.requests < last.requests || m.grants < last.grants ||
          m.tokens_granted < last.tokens_granted)
        ++went_back;
      last = m;
      ++snapshots;
    }
  });
  for (auto& t : threads)
    t.join();
  for (int i = 0; i < 1000 && bucket.waiting() > 0; ++i)
    manual_clock::advance(10ms);
  BOOST_TEST(eventually([&] { return completed == 4000; }));
  stop = true;
  reader.join();
  BOOST_TEST(overcounted == 0);
  BOOST_TEST(went_back == 0);
  BOOST_TEST(snapshots > 0);
  const limiter_metrics m = bucket.metrics();
  BOOST_TEST(m.requests == 8000u);
  BOOST_TEST(m.grants + m.refusals == 8000u);
  BOOST_TEST(m.tokens_granted == m.grants + 4000u);  // the tries' grants of 1, then 4000 of 2
}

BOOST_AUTO_TEST_SUITE_END()
