// The Redis bucket's reservation mode against a real redis-server, for what
// only that mode promises (test_redis_bucket_reserve and
// test_redis_faults_reserve run every other test of the bucket in it):
// - the horizon: a request that would be due further ahead fails at once
//   with exceeds_horizon and takes nothing (the key's level shows it);
// - refunds: a reservation cancelled before it is due (queued, or while its
//   call is out), or left by close() or destruction, is given back, so the
//   next request is due that much earlier;
// - the deadline forms (both modes): a request that cannot be served in
//   time says so at once and takes nothing; one that can is granted;
// - coalescing within the window: max_in_flight calls out, each carrying up
//   to max_batch requests, in order;
// - a try takes only tokens that are there; a request for 0 tokens completes
//   once the requests before it are sent;
// - a key serves one mode only; every option is validated.
#include "redis_server.hpp"
#include "test_support.hpp"

#include <ratelimit/joint.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/test/unit_test.hpp>

#include <mutex>
#include <optional>
#include <random>
#include <thread>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono_literals;
namespace asio = boost::asio;
using steady = std::chrono::steady_clock;

namespace {

struct fixture : redis_fixture {
  redis_bucket_options reserve(redis_bucket_options o = {}) {
    o.mode = redis_bucket_mode::reserve;
    return o;
  }

  /// The level (`l`) stored at `key`, in the script's units.
  long long level(const std::string& key) {
    auto r = exec(ctx, conn, {"HGET", key, "l"});
    BOOST_REQUIRE(!r.ec);
    return std::stoll(r.reply.str);
  }

  bool run_for(std::chrono::milliseconds d) {
    return run_until(
        ctx, [] { return false; }, d);
  }
};

/// A try-shaped outcome: (ec, granted).
struct try_outcome {
  std::optional<std::pair<boost::system::error_code, bool>> result;
  steady::time_point at;
};

template <typename Bucket>
std::shared_ptr<try_outcome> try_for(Bucket& b, std::chrono::milliseconds timeout,
                                     std::uint64_t n = 1) {
  auto o = std::make_shared<try_outcome>();
  b.async_try_get_token_for(timeout, n, [o](boost::system::error_code ec, bool granted) {
    o->result.emplace(ec, granted);
    o->at = steady::now();
  });
  return o;
}

const auto aborted = boost::system::error_code(asio::error::operation_aborted);

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_reserve)

BOOST_FIXTURE_TEST_CASE(a_request_beyond_the_horizon_fails_at_once_and_takes_nothing, fixture) {
  // 2 tokens, one per 100 ms (tok 1, tick 100000: a token is 100000 units),
  // reservations up to 350 ms ahead.
  auto o = reserve();
  o.horizon = 350ms;
  redis_token_bucket bucket(conn, "hz", 2, per_second(10), o);
  const auto t0 = steady::now();
  std::vector<std::shared_ptr<outcome>> in_line;
  for (int i = 0; i < 5; ++i)  // now, now, 100, 200, 300 ms
    in_line.push_back(request(bucket));
  auto beyond = request(bucket);  // 400 ms: beyond the horizon
  BOOST_REQUIRE(run_until(ctx, [&] { return beyond->done(); }));
  BOOST_TEST(beyond->ec == error::make_error_code(error::exceeds_horizon));
  BOOST_TEST((steady::now() - t0 < 100ms));  // at once, with its reply
  // It took nothing: the level is 3 tokens of debt (less what refilled since), not 4.
  const long long l = level("hz");
  BOOST_TEST_MESSAGE("level " << l);
  BOOST_TEST(l > -350'000);
  BOOST_TEST(l <= -200'000);
  BOOST_REQUIRE(run_until(ctx, [&] { return in_line.back()->done(); }));
  for (auto& w : in_line)
    BOOST_TEST(w->ok());
  BOOST_TEST((steady::now() - t0 >= 295ms));
  const auto s = bucket.stats();
  BOOST_TEST(s.horizon_refusals == 1u);
  BOOST_TEST(s.reserved == 5u);
  BOOST_TEST(s.granted == 5u);
  // A horizon of 0 never waits in line.
  auto z = reserve();
  z.horizon = 0ms;
  redis_token_bucket now_only(conn, "hz0", 1, per_second(10), z);
  auto first = request(now_only), second = request(now_only);
  BOOST_REQUIRE(run_until(ctx, [&] { return second->done(); }));
  BOOST_TEST(first->ok());
  BOOST_TEST(second->ec == error::make_error_code(error::exceeds_horizon));
}

BOOST_FIXTURE_TEST_CASE(a_cancelled_reservation_is_given_back, fixture) {
  // 1 token, one per 100 ms: after the first, three are reserved at 100,
  // 200 and 300 ms, then cancelled: the next request is due at 100 ms again.
  redis_token_bucket bucket(conn, "rf", 1, per_second(10), reserve());
  const auto t0 = steady::now();
  auto first = request(bucket);
  std::vector<std::shared_ptr<outcome>> later;
  for (int i = 0; i < 3; ++i)
    later.push_back(request(bucket));
  BOOST_REQUIRE(run_until(ctx, [&] { return bucket.stats().reserved == 4; }));
  BOOST_TEST(first->ok());
  BOOST_TEST(bucket.cancel() == 3u);
  BOOST_REQUIRE(run_until(ctx, [&] { return later.back()->done(); }));
  for (auto& w : later)
    BOOST_TEST(w->ec == aborted);
  BOOST_REQUIRE(run_until(ctx, [&] { return bucket.stats().refunded == 3; }));
  // One call for the three (sent again with the script's text: the server
  // had not seen the refund script yet).
  BOOST_TEST(bucket.stats().refund_calls <= 2u);
  auto next = request(bucket);
  BOOST_REQUIRE(run_until(ctx, [&] { return next->done(); }));
  BOOST_TEST(next->ok());
  const auto took = steady::now() - t0;
  BOOST_TEST((took >= 95ms));
  BOOST_TEST((took < 200ms));  // not at 400 ms: the three were given back
}

// The horizon is a client's own limit on waiting: a key in debt further
// than a client accepts refuses that client's requests with exceeds_horizon
// (not as a broken state), and its refunds still work.
BOOST_FIXTURE_TEST_CASE(clients_of_one_key_may_differ_in_horizon, fixture) {
  auto patient = reserve(), hasty = reserve();
  patient.horizon = 10s;
  hasty.horizon = 500ms;
  redis_token_bucket a(conn, "hz2", 1, per_second(10), patient);
  redis_token_bucket b(conn, "hz2", 1, per_second(10), hasty);
  std::vector<std::shared_ptr<outcome>> line;
  for (int i = 0; i < 21; ++i)  // now, then 2 s of debt
    line.push_back(request(a));
  BOOST_REQUIRE(run_until(ctx, [&] { return a.stats().reserved == 21; }));
  auto refused = request(b);
  BOOST_REQUIRE(run_until(ctx, [&] { return refused->done(); }));
  BOOST_TEST(refused->ec == error::make_error_code(error::exceeds_horizon));
  auto late = try_for(b, 100ms);
  BOOST_REQUIRE(run_until(ctx, [&] { return late->result.has_value(); }));
  BOOST_TEST(!late->result->first);
  BOOST_TEST(!late->result->second);
  // The patient client gives its line back: the hasty one gets in.
  const auto t0 = steady::now();
  a.cancel();
  BOOST_REQUIRE(run_until(ctx, [&] { return a.stats().refunded == 20; }));
  auto in = request(b);
  BOOST_REQUIRE(run_until(ctx, [&] { return in->done(); }));
  BOOST_TEST(in->ok());
  BOOST_TEST((steady::now() - t0 < 400ms));
}

BOOST_FIXTURE_TEST_CASE(a_reservation_cancelled_while_its_call_is_out_is_given_back, fixture) {
  redis_token_bucket bucket(conn, "rfo", 1, per_second(10), reserve());
  auto first = request(bucket);
  BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
  const auto t0 = steady::now();
  for (auto type : {asio::cancellation_type::terminal, asio::cancellation_type::partial,
                    asio::cancellation_type::total}) {
    asio::cancellation_signal sig;
    auto o = std::make_shared<outcome>();
    bucket.async_get_token(asio::bind_cancellation_slot(sig.slot(), checked_handler(o)));
    sig.emit(type);  // its call is out: the reply finds it gone
    BOOST_REQUIRE(run_until(ctx, [&] { return o->done(); }));
    BOOST_TEST(o->ec == aborted);
  }
  BOOST_REQUIRE(run_until(ctx, [&] { return bucket.stats().refunded == 3; }));
  BOOST_TEST(bucket.stats().reserved == 4u);
  auto next = request(bucket);
  BOOST_REQUIRE(run_until(ctx, [&] { return next->done(); }));
  BOOST_TEST(next->ok());
  BOOST_TEST((steady::now() - t0 < 200ms));  // due 100 ms after the first, not 400
}

BOOST_FIXTURE_TEST_CASE(close_and_destruction_give_reservations_back, fixture) {
  for (bool destroy : {false, true}) {
    BOOST_TEST_CONTEXT((destroy ? "destroyed" : "closed")) {
      const std::string key = destroy ? "rfd" : "rfc";
      std::vector<std::shared_ptr<outcome>> later;
      std::optional<redis_token_bucket> bucket;
      bucket.emplace(conn, key, 1, per_second(10), reserve());
      const auto t0 = steady::now();
      auto first = request(*bucket);
      for (int i = 0; i < 3; ++i)
        later.push_back(request(*bucket));
      BOOST_REQUIRE(run_until(ctx, [&] { return bucket->stats().reserved == 4; }));
      if (destroy) {
        // On a server that never ran the refund script (restarted, flushed):
        // what the destructor sends needs no second try after NOSCRIPT (the
        // user may destroy the connection next): one request, the script's text.
        BOOST_REQUIRE(exec(ctx, conn, {"SCRIPT", "FLUSH"}).reply.str == "OK");
        const auto before = conn.stats().requests;
        bucket.reset();
        BOOST_REQUIRE(run_until(ctx, [&] { return conn.stats().requests == before + 1; }));
        run_for(50ms);  // (a second try would be written by now)
        BOOST_TEST(conn.stats().requests == before + 1);
      } else {
        bucket->close();
        BOOST_REQUIRE(run_until(ctx, [&] { return bucket->stats().refunded == 3; }));
      }
      BOOST_REQUIRE(run_until(ctx, [&] { return later.back()->done(); }));
      for (auto& w : later)
        BOOST_TEST(w->ec == (destroy ? aborted : error::make_error_code(error::bucket_closed)));
      // Another object on the key: due 100 ms after the first, not 400.
      redis_token_bucket other(conn, key, 1, per_second(10), reserve());
      auto next = request(other);
      BOOST_REQUIRE(run_until(ctx, [&] { return next->done(); }));
      BOOST_TEST(next->ok());
      BOOST_TEST((steady::now() - t0 < 200ms));
    }
  }
}

BOOST_FIXTURE_TEST_CASE(the_deadline_forms_take_nothing_when_not_in_time, fixture) {
  for (auto mode : {redis_bucket_mode::reserve, redis_bucket_mode::head_only}) {
    const bool reserving = mode == redis_bucket_mode::reserve;
    BOOST_TEST_CONTEXT((reserving ? "reserve" : "head_only")) {
      redis_bucket_options o;
      o.mode = mode;
      const std::string key = reserving ? "dl:r" : "dl:h";
      redis_token_bucket bucket(conn, key, 1, per_second(10), o);  // 100 ms a token
      const auto t0 = steady::now();
      auto first = request(bucket);
      BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
      // Due at 100 ms: not within 50 ms, said at once, nothing taken.
      const auto trips0 = bucket.stats().round_trips;
      auto late = try_for(bucket, 50ms);
      BOOST_REQUIRE(run_until(ctx, [&] { return late->result.has_value(); }));
      BOOST_TEST(!late->result->first);
      BOOST_TEST(!late->result->second);
      BOOST_TEST((late->at - t0 < 50ms));
      // (reservation mode: the script itself refused it, in its one round trip)
      if (reserving) BOOST_TEST(bucket.stats().round_trips == trips0 + 1);
      // Within 150 ms: granted at 100 ms (it would be 200 had the late one taken).
      auto in_time = try_for(bucket, 150ms);
      BOOST_REQUIRE(run_until(ctx, [&] { return in_time->result.has_value(); }));
      BOOST_TEST(!in_time->result->first);
      BOOST_TEST(in_time->result->second);
      BOOST_TEST((in_time->at - t0 >= 95ms));
      BOOST_TEST((in_time->at - t0 < 180ms));
      // (reserved in one round trip, granted at its due time without asking again)
      if (reserving) BOOST_TEST(bucket.stats().round_trips == trips0 + 2);
      // Blocking, from another thread (a second object on the key, on its own
      // context): the same answers.
      {
        asio::io_context bctx;
        redis_connection bconn(bctx, server.config());
        redis_token_bucket blocking(bconn, key, 1, per_second(10), o);
        auto guard = asio::make_work_guard(bctx);
        std::thread runner([&] { bctx.run(); });
        const auto t1 = steady::now();
        const bool blocked_late = blocking.try_get_token_for(20ms);  // due about 100 ms later
        const auto late_took = steady::now() - t1;
        const bool blocked_in_time = blocking.try_get_token_for(1s);
        blocking.close();
        guard.reset();
        bconn.close();
        runner.join();
        BOOST_TEST(!blocked_late);
        BOOST_TEST((late_took < 80ms));
        BOOST_TEST(blocked_in_time);
      }
      // A deadline of 0 with the tokens there is granted; errors come as errors.
      redis_token_bucket full(conn, key + ":full", 1, per_second(10), o);
      auto now = try_for(full, 0ms);
      auto big = try_for(full, 1s, 2);
      BOOST_REQUIRE(run_until(ctx, [&] { return now->result && big->result; }));
      BOOST_TEST(now->result->second);
      BOOST_TEST(big->result->first == error::make_error_code(error::exceeds_capacity));
      BOOST_TEST(!big->result->second);
    }
  }
}

BOOST_FIXTURE_TEST_CASE(a_deadline_request_cancelled_completes_aborted, fixture) {
  redis_token_bucket bucket(conn, "dlc", 1, per_second(1), reserve());
  auto first = request(bucket);
  BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
  asio::cancellation_signal sig;
  std::optional<std::pair<boost::system::error_code, bool>> r;
  bucket.async_try_get_token_for(
      10s, 1, asio::bind_cancellation_slot(sig.slot(), [&](boost::system::error_code ec, bool g) {
        r.emplace(ec, g);
      }));
  BOOST_REQUIRE(run_until(ctx, [&] { return bucket.stats().reserved == 2; }));
  sig.emit(asio::cancellation_type::terminal);
  BOOST_REQUIRE(run_until(ctx, [&] { return r.has_value(); }));
  BOOST_TEST(r->first == aborted);
  BOOST_TEST(!r->second);
  BOOST_REQUIRE(run_until(ctx, [&] { return bucket.stats().refunded == 1; }));
}

BOOST_FIXTURE_TEST_CASE(requests_are_coalesced_within_the_window, fixture) {
  auto o = reserve();
  o.max_in_flight = 1;
  o.max_batch = 4;
  redis_token_bucket bucket(conn, "co", 100, per_second(1), o);
  auto warm = request(bucket);  // loads the script (NOSCRIPT, EVAL)
  BOOST_REQUIRE(run_until(ctx, [&] { return warm->done(); }));
  const auto before = bucket.stats();
  const auto writes = conn.stats().requests;
  std::vector<std::shared_ptr<outcome>> all;
  for (int i = 0; i < 10; ++i)
    all.push_back(request(bucket));
  BOOST_TEST(bucket.waiting() == 10u);
  BOOST_REQUIRE(run_until(ctx, [&] { return all.back()->done(); }));
  for (std::size_t i = 0; i < all.size(); ++i) {
    BOOST_TEST(all[i]->ok());
    if (i) BOOST_TEST(all[i - 1]->order < all[i]->order);
  }
  // One call out at a time: 1 (sent as it came), then 4, 4, 1.
  BOOST_TEST(bucket.stats().round_trips - before.round_trips == 4u);
  BOOST_TEST(conn.stats().requests - writes == 4u);
}

BOOST_FIXTURE_TEST_CASE(a_try_takes_only_tokens_that_are_there, fixture) {
  redis_token_bucket bucket(conn, "tr", 1, per_second(10), reserve());
  std::optional<std::pair<boost::system::error_code, bool>> a, b;
  bucket.async_try_get_token(1, [&](boost::system::error_code ec, bool g) { a.emplace(ec, g); });
  BOOST_REQUIRE(run_until(ctx, [&] { return a.has_value(); }));
  BOOST_TEST(a->second);
  bucket.async_try_get_token(1, [&](boost::system::error_code ec, bool g) { b.emplace(ec, g); });
  BOOST_REQUIRE(run_until(ctx, [&] { return b.has_value(); }));
  BOOST_TEST(!b->first);
  BOOST_TEST(!b->second);
  // Nothing reserved by the refused try: the level is the first token's debt only.
  BOOST_TEST(level("tr") > -100'000);
  // A request for 0 tokens completes once those before it are sent, before they are due.
  auto waits = request(bucket);
  auto zero = request(bucket, 0);
  BOOST_REQUIRE(run_until(ctx, [&] { return zero->done(); }));
  BOOST_TEST(zero->ok());
  BOOST_TEST(!waits->done());
  BOOST_REQUIRE(run_until(ctx, [&] { return waits->done(); }));
  BOOST_TEST(waits->ok());
}

BOOST_FIXTURE_TEST_CASE(a_key_serves_one_mode_only, fixture) {
  redis_token_bucket head(conn, "mode", 5, per_second(1));
  auto h = request(head);
  BOOST_REQUIRE(run_until(ctx, [&] { return h->done(); }));
  BOOST_TEST(h->ok());
  redis_token_bucket reserving(conn, "mode", 5, per_second(1), reserve());
  auto r = request(reserving);
  BOOST_REQUIRE(run_until(ctx, [&] { return r->done(); }));
  BOOST_TEST(r->ec == error::make_error_code(error::redis_error));
  exec(ctx, conn, {"DEL", "mode"});
  auto r2 = request(reserving);
  BOOST_REQUIRE(run_until(ctx, [&] { return r2->done(); }));
  BOOST_TEST(r2->ok());
  auto h2 = request(head);
  BOOST_REQUIRE(run_until(ctx, [&] { return h2->done(); }));
  BOOST_TEST(h2->ec == error::make_error_code(error::redis_error));
}

// A key lost with reservations outstanding (a server restarted without its
// data, a failover to a replica that missed the writes; FLUSHALL here)
// forgets its debt: the reservations still come due while new ones start
// from a full bucket. The excess is at most what was outstanding:
// capacity + rate * horizon (the README's bound), and this run reaches most of it.
BOOST_FIXTURE_TEST_CASE(a_lost_key_over_grants_at_most_its_outstanding_reservations, fixture) {
  constexpr std::uint64_t capacity = 5, per_s = 50;
  auto o = reserve();
  o.horizon = 200ms;
  redis_token_bucket bucket(conn, "lost", capacity, per_second(per_s), o);
  int granted = 0, running = 0, refused = 0;
  bool stop = false;
  auto worker = [&]() -> asio::awaitable<void> {
    ++running;
    while (!stop) {
      auto [ec] = co_await bucket.async_get_token(asio::as_tuple(asio::use_awaitable));
      if (ec == error::exceeds_horizon) {
        ++refused;
        asio::steady_timer t(ctx, 5ms);
        co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
        continue;
      }
      if (ec) break;
      if (!stop) ++granted;
    }
    --running;
  };
  const auto t0 = steady::now();
  for (int i = 0; i < 20; ++i)
    asio::co_spawn(ctx, worker(), asio::detached);
  run_for(400ms);  // the line is as long as the horizon allows by now
  BOOST_TEST(exec(ctx, conn, {"FLUSHALL"}).reply.str == "OK");
  run_for(600ms);
  stop = true;
  const double elapsed = std::chrono::duration<double>(steady::now() - t0).count();
  bucket.close();
  BOOST_REQUIRE(run_until(ctx, [&] { return running == 0; }));
  const double limit = capacity + per_s * elapsed;
  const double excess_bound = capacity + per_s * 0.2;  // capacity + rate * horizon
  BOOST_TEST_MESSAGE("granted " << granted << " in " << elapsed << " s: limit " << limit
                                << ", with the lost key's excess " << limit + excess_bound
                                << "; horizon refusals " << refused);
  BOOST_TEST(granted <= limit + excess_bound);
  BOOST_TEST(granted > limit);  // the debt was forgotten: the excess is real
  BOOST_TEST(refused > 0);      // the line was at the horizon
}

// Threads race requests, per-operation cancellations (emitted by the thread
// that started the request, while a pool thread completes it), tries,
// blocking calls with and without deadlines, cancel() and finally close(),
// on a connection run by a 2-thread pool: every handler runs exactly once,
// every grant is counted once, and Redis's bound holds. (TSan's tree checks
// the races; the run is shorter under the sanitizers.)
BOOST_AUTO_TEST_CASE(concurrent_requests_cancellations_and_closes) {
#ifdef RATELIMIT_TEST_SANITIZED
  constexpr auto run_time = 300ms;
#else
  constexpr auto run_time = 1000ms;
#endif
  redis_server server;
  asio::thread_pool pool(2);
  auto conn = std::make_unique<redis_connection>(pool.get_executor(), server.config());
  redis_bucket_options o;
  o.mode = redis_bucket_mode::reserve;
  o.max_in_flight = 2;
  o.max_batch = 8;
  o.horizon = 50ms;  // some refusals too
  constexpr std::uint64_t capacity = 20, per_s = 2000;
  auto bucket =
      std::make_unique<redis_token_bucket>(*conn, "stress", capacity, per_second(per_s), o);
  struct counted {
    std::atomic<int> calls{0};
    std::atomic<std::uint64_t> tokens{0};  // granted to this request
  };
  std::mutex m;
  std::vector<std::shared_ptr<counted>> all;
  std::atomic<long> errors{0};
  const auto t0 = steady::now();
  auto client = [&](unsigned seed) {
    std::minstd_rand rng(seed);
    while (steady::now() - t0 < run_time) {
      auto c = std::make_shared<counted>();
      {
        std::lock_guard lk(m);
        all.push_back(c);
      }
      switch (rng() % 6) {
        case 0:
        case 1: {
          asio::cancellation_signal sig;
          const std::uint64_t n = 1 + rng() % 2;
          bucket->async_get_token(
              n, asio::bind_cancellation_slot(sig.slot(), [c, n](boost::system::error_code ec) {
                if (!ec) c->tokens = n;
                ++c->calls;
              }));
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
          sig.emit(asio::cancellation_type::terminal);  // late or not: harmless
          // The signal dies here: the slot's handler goes with it.
          break;
        }
        case 2:
          bucket->async_try_get_token(1, [c](boost::system::error_code, bool g) {
            if (g) c->tokens = 1;
            ++c->calls;
          });
          break;
        case 3: {
          boost::system::error_code ec;
          const bool g = bucket->try_get_token_for(std::chrono::milliseconds(rng() % 5), 1, ec);
          if (g) c->tokens = 1;
          if (ec && ec != error::exceeds_horizon && ec != asio::error::operation_aborted) ++errors;
          ++c->calls;
          break;
        }
        case 4: {
          boost::system::error_code ec;
          bucket->get_token(1, ec);
          if (!ec) c->tokens = 1;
          if (ec && ec != error::exceeds_horizon && ec != asio::error::operation_aborted) ++errors;
          ++c->calls;
          break;
        }
        default:
          if (rng() % 8 == 0) bucket->cancel();
          ++c->calls;
          break;
      }
    }
  };
  std::vector<std::thread> threads;
  for (unsigned i = 0; i < 3; ++i)
    threads.emplace_back(client, 1234 + i);
  for (auto& t : threads)
    t.join();
  const double elapsed = std::chrono::duration<double>(steady::now() - t0).count();
  bucket->close();
  BOOST_REQUIRE(eventually([&] {
    std::lock_guard lk(m);
    for (auto& c : all)
      if (c->calls.load() == 0) return false;
    return true;
  }));
  const auto s = bucket->stats();
  std::uint64_t observed = 0;
  for (auto& c : all) {
    BOOST_TEST(c->calls.load() == 1);
    observed += c->tokens;
  }
  BOOST_TEST(errors.load() == 0);
  BOOST_TEST_MESSAGE(all.size() << " requests; granted " << s.granted << " tokens, reserved "
                                << s.reserved << ", refunded " << s.refunded << ", horizon "
                                << s.horizon_refusals << ", " << elapsed << " s");
  BOOST_TEST(s.granted <= capacity + per_s * elapsed + 2);
  BOOST_TEST(s.granted > 0u);
  BOOST_TEST(s.granted == observed);  // every grant reached its caller, once
  bucket.reset();
  conn.reset();
  pool.join();
}

// The bucket as a joint request's remote part (ratelimit/joint.hpp): all
// or nothing with a local bucket. Granted together once the reservation is
// due; a local part that fails makes the joint request forget the
// reservation (refunded); a receipt gives back (refunded too).
BOOST_FIXTURE_TEST_CASE(a_joint_request_with_a_redis_part_is_all_or_nothing, fixture) {
  redis_token_bucket shared(conn, "joint", 1, per_second(10), reserve());
  token_bucket local(ctx, 5, per_second(10));
  auto first = request(shared);
  BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
  // Due 100 ms from now in Redis; the local part is there.
  const auto t0 = steady::now();
  std::optional<std::pair<boost::system::error_code, joint_receipt>> got;
  async_acquire(
      {part(shared.as_remote(), 1), part(local, 1)},
      [&](boost::system::error_code ec, joint_receipt r) { got.emplace(ec, std::move(r)); });
  BOOST_REQUIRE(run_until(ctx, [&] { return got.has_value(); }));
  BOOST_TEST(!got->first, got->first.message());
  BOOST_TEST((steady::now() - t0 >= 95ms));
  BOOST_TEST(shared.stats().granted == 2u);  // the first request and the part
  BOOST_TEST(local.available() == 4u);
  // The receipt gives back to both: Redis's token refunded.
  BOOST_TEST(got->second.give_back_all() == 2u);
  BOOST_REQUIRE(run_until(ctx, [&] { return shared.stats().refunded == 1; }));
  // A local part that fails once the reservation is made (its bucket closed
  // while the joint request waits for the Redis part): it is forgotten,
  // and given back.
  const auto before = shared.stats();
  token_bucket closing(ctx, 5, per_second(10));
  std::optional<boost::system::error_code> failed;
  auto third = request(shared);  // in line first: the part is due after it
  async_acquire({part(shared.as_remote(), 1), part(closing, 1)},
                [&](boost::system::error_code ec, joint_receipt) { failed = ec; });
  BOOST_REQUIRE(run_until(ctx, [&] { return shared.stats().reserved == before.reserved + 2; }));
  BOOST_TEST(!failed.has_value());
  closing.close();
  BOOST_REQUIRE(run_until(ctx, [&] { return failed.has_value(); }));
  BOOST_TEST(*failed == error::make_error_code(error::bucket_closed));
  BOOST_REQUIRE(run_until(ctx, [&] { return shared.stats().refunded == before.refunded + 1; }));
  BOOST_REQUIRE(run_until(ctx, [&] { return third->done(); }));
  BOOST_TEST(third->ok());
  // A Redis part refused (its wait would pass a horizon of 0): the joint
  // request fails with the part's error, and the local part keeps its tokens.
  auto h0 = reserve();
  h0.horizon = 0ms;
  redis_token_bucket strict(conn, "joint:h0", 1, per_second(10), h0);
  auto take = request(strict);  // its one token
  BOOST_REQUIRE(run_until(ctx, [&] { return take->done(); }));
  token_bucket kept(ctx, 5, per_second(10));
  std::optional<boost::system::error_code> refused;
  async_acquire({part(strict.as_remote(), 1), part(kept, 1)},
                [&](boost::system::error_code ec, joint_receipt) { refused = ec; });
  BOOST_REQUIRE(run_until(ctx, [&] { return refused.has_value(); }));
  BOOST_TEST(*refused == error::make_error_code(error::exceeds_horizon));
  BOOST_TEST(kept.available() == 5u);
  BOOST_TEST(strict.stats().granted == 1u);
  // A head-only bucket cannot reserve: it says so.
  redis_token_bucket head(conn, "joint:h", 1, per_second(10));
  BOOST_CHECK_THROW(head.as_remote(), std::invalid_argument);
  redis_token_bucket moved(std::move(head));
  BOOST_CHECK_THROW(head.as_remote(), std::logic_error);
}

// What a bucket's machinery sends after the user destroyed the bucket and
// then the connection never reaches them (in the ASan tree, a use after
// free if it did): the remote part is held by the library, by a joint
// request waiting for another part; a receipt of an earlier request gives
// back through it meanwhile (receipts refer to their part weakly), then
// the joint request fails and forgets its Redis reservation: both refunds
// fail with operation_aborted. The context is destroyed last.
BOOST_FIXTURE_TEST_CASE(what_is_sent_after_the_connection_is_gone_never_reaches_it, fixture) {
  auto ctx2 = std::make_unique<asio::io_context>();
  auto conn2 = std::make_unique<redis_connection>(*ctx2, server.config());
  auto bucket = std::make_unique<redis_token_bucket>(*conn2, "gone", 5, per_second(10), reserve());
  auto local = std::make_unique<token_bucket>(*ctx2, 1, rate{1, 100s});
  std::optional<std::pair<boost::system::error_code, joint_receipt>> got;
  async_acquire({part(bucket->as_remote(), 1)}, [&](boost::system::error_code ec, joint_receipt r) {
    got.emplace(ec, std::move(r));
  });
  BOOST_REQUIRE(run_until(*ctx2, [&] { return got.has_value(); }));
  BOOST_REQUIRE(!got->first);
  // A joint request whose Redis part is granted, waiting for its local part.
  BOOST_REQUIRE(local->try_get_token());
  std::optional<boost::system::error_code> waiting;
  async_acquire({part(bucket->as_remote(), 1), part(*local, 1)},
                [&](boost::system::error_code ec, joint_receipt) { waiting = ec; });
  // (Due at once: granted to the joint request as the reply is handled.)
  BOOST_REQUIRE(
      run_until(*ctx2, [&] { return bucket->stats().reserved == 2 && bucket->waiting() == 0; }));
  BOOST_REQUIRE(!waiting.has_value());
  bucket.reset();
  conn2.reset();
  BOOST_TEST(got->second.give_back_all() == 1u);  // (its part lives: the waiting request holds it)
  local.reset();  // the waiting request fails: its Redis part is forgotten
  BOOST_REQUIRE(run_until(*ctx2, [&] { return waiting.has_value(); }));
  BOOST_TEST(*waiting == aborted);
  ctx2->restart();
  ctx2->poll();
  ctx2.reset();
}

BOOST_AUTO_TEST_CASE(every_reservation_option_is_validated) {
  asio::io_context ctx;
  redis_config cfg;
  cfg.port = 1;  // never connects: construction only
  redis_connection conn(ctx, cfg);
  auto refused = [&](redis_bucket_options o, const std::string& what, std::uint64_t capacity = 10,
                     rate r = per_second(1)) {
    try {
      redis_token_bucket b(conn, "k", capacity, r, o);
      BOOST_ERROR("accepted: " << what);
    } catch (const std::invalid_argument& e) {
      BOOST_TEST(std::string(e.what()).find(what) != std::string::npos, e.what());
    }
  };
  redis_bucket_options o;
  o.mode = redis_bucket_mode::reserve;
  auto lease = o;
  lease.lease = 1;
  refused(lease, "lease");
  auto batch0 = o, batch_big = o, window0 = o, negative = o, too_far = o, bad_mode = o;
  batch0.max_batch = 0;
  refused(batch0, "max_batch");
  batch_big.max_batch = 4097;
  refused(batch_big, "max_batch");
  window0.max_in_flight = 0;
  refused(window0, "max_in_flight");
  negative.horizon = -1ms;
  refused(negative, "horizon");
  too_far.horizon = std::chrono::hours(24 * 365 * 200);  // beyond exact due times
  refused(too_far, "horizon");
  auto fast = o;
  fast.horizon = std::chrono::hours(24 * 200);  // at 10^9 tokens a second: beyond 2^53
  refused(fast, "horizon", 10, rate{1'000'000, std::chrono::milliseconds(1)});
  bad_mode.mode = static_cast<redis_bucket_mode>(7);
  refused(bad_mode, "mode");
  // A bucket that takes more than 2^52 us (142 years) to fill cannot date
  // its reservations exactly, whatever the horizon.
  refused(o, "2^52", 9'007'199'253);
  // Edges that are accepted: the default horizon (as far as stays exact:
  // 16 years for a bucket that takes 126 to fill); a horizon of 0; the
  // largest batch; a window of 1.
  BOOST_CHECK_NO_THROW(redis_token_bucket(conn, "k", 10, per_second(1), o));
  BOOST_CHECK_NO_THROW(redis_token_bucket(conn, "k", 4'000'000'000, per_second(1), o));
  auto edges = o;
  edges.horizon = 0ms;
  edges.max_batch = 4096;
  edges.max_in_flight = 1;
  BOOST_CHECK_NO_THROW(redis_token_bucket(conn, "k", 10, per_second(1), edges));
  // Head-only mode ignores the reservation options.
  redis_bucket_options head;
  head.max_batch = 0;
  head.max_in_flight = 0;
  head.horizon = -1ms;
  BOOST_CHECK_NO_THROW(redis_token_bucket(conn, "k", 10, per_second(1), head));
  BOOST_CHECK_NO_THROW(validate(head, 10));
  auto reserving = head;
  reserving.mode = redis_bucket_mode::reserve;
  BOOST_CHECK_THROW(validate(reserving, 10), std::invalid_argument);
}

BOOST_AUTO_TEST_SUITE_END()
