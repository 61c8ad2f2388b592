// The keyed Redis limiter (redis_keyed_limiter.hpp) against a real
// redis-server, in both modes:
// - each key is a bucket of its own at prefix + key, with its own quota (a
//   fixed one, or a function's), keys never wait for each other, and a key's
//   requests keep the bucket's promises (FIFO, capacity, deadlines, tries);
// - memory follows the requests in flight: a key's state is dropped once its
//   requests are done (also when cancelled, failed or closed), 1 M distinct
//   keys (100 k under the sanitizers) leave the process's memory flat, and
//   the keys expire in Redis once full;
// - faults: one fault hold for every key (a dead server costs one timeout,
//   not one per key), the local fallback keeps its bound per key;
// - lifetime: close, destruction with waiters on many keys, a deferred
//   operation launched after destruction, blocking callers;
// - threads: requests, cancellations and keys going idle concurrently;
// - a key as a joint request's remote part;
// - the connection's window (redis_config::max_calls_in_flight): many hot
//   keys never keep more calls out than it lets out, keys waiting for it are
//   served in the order they found it full, and none is forgotten (threads).
#include "redis_server.hpp"
#include "test_support.hpp"

#include <ratelimit/joint.hpp>
#include <ratelimit/redis/redis_keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/test/unit_test.hpp>

#include <deque>
#include <fstream>
#include <future>
#include <thread>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono_literals;
namespace asio = boost::asio;
using steady = std::chrono::steady_clock;

namespace {

#if defined(RATELIMIT_TEST_SANITIZED)
constexpr bool sanitized = true;
#else
constexpr bool sanitized = false;
#endif

const redis_bucket_mode both_modes[] = {redis_bucket_mode::head_only, redis_bucket_mode::reserve};

const char* name(redis_bucket_mode m) {
  return m == redis_bucket_mode::reserve ? "reserve" : "head_only";
}

redis_bucket_options in(redis_bucket_mode m, redis_bucket_options o = {}) {
  o.mode = m;
  return o;
}

/// A request for `n` of `key`'s tokens with a checked handler.
std::shared_ptr<outcome> request(redis_keyed_limiter& l, std::string_view key,
                                 std::uint64_t n = 1) {
  auto o = std::make_shared<outcome>();
  l.async_get_token(key, n, checked_handler(o));
  return o;
}

long rss_kib() {
  std::ifstream in("/proc/self/statm");
  long pages = 0, resident = 0;
  in >> pages >> resident;
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

struct fixture : redis_fixture {
  bool run_for(std::chrono::milliseconds d) {
    return run_until(
        ctx, [] { return false; }, d);
  }
  long long dbsize() {
    auto r = exec(ctx, conn, {"DBSIZE"});
    BOOST_REQUIRE(!r.ec);
    return r.reply.integer;
  }
  bool exists(const std::string& key) {
    auto r = exec(ctx, conn, {"EXISTS", key});
    BOOST_REQUIRE(!r.ec);
    return r.reply.integer == 1;
  }
};

const auto aborted = boost::system::error_code(asio::error::operation_aborted);

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_keyed)

BOOST_FIXTURE_TEST_CASE(each_key_is_a_bucket_of_its_own_and_keys_never_wait_for_each_other,
                        fixture) {
  for (redis_bucket_mode m : both_modes) {
    BOOST_TEST_CONTEXT(name(m)) {
      const std::string prefix = std::string("k:") + name(m) + ":";
      // 2 tokens, one per 100 ms, per key.
      redis_keyed_limiter l(conn, prefix, 2, per_second(10), in(m));
      BOOST_TEST(l.prefix() == prefix);
      const auto t0 = steady::now();
      auto a1 = request(l, "a"), a2 = request(l, "a"), a3 = request(l, "a");
      auto b1 = request(l, "b"), b2 = request(l, "b");
      BOOST_TEST(!a1->done());  // never inside the initiating call
      BOOST_REQUIRE(run_until(ctx, [&] { return a1->done() && a2->done() && b2->done(); }));
      BOOST_TEST((steady::now() - t0 < 80ms));  // b never waited for a's line
      BOOST_TEST(!a3->done());
      BOOST_TEST(a1->ok());
      BOOST_TEST(a2->ok());
      BOOST_TEST(b1->ok());
      BOOST_TEST(b2->ok());
      BOOST_REQUIRE(run_until(ctx, [&] { return a3->done(); }));
      BOOST_TEST(a3->ok());
      BOOST_TEST((steady::now() - t0 >= 95ms));  // a's third token: 100 ms later
      // Stored at prefix + key.
      BOOST_TEST(exists(prefix + "a"));
      BOOST_TEST(exists(prefix + "b"));
      // More than the capacity fails at once; nothing is kept for a key once done.
      auto big = request(l, "c", 3);
      BOOST_REQUIRE(run_until(ctx, [&] { return big->done(); }));
      BOOST_TEST(big->ec == error::make_error_code(error::exceeds_capacity));
      BOOST_TEST(l.active_keys() == 0u);
      BOOST_TEST(l.waiting() == 0u);
      const auto s = l.stats();
      BOOST_TEST(s.granted == 5u);
      BOOST_TEST(s.redis_tokens == 5u);
    }
  }
}

BOOST_FIXTURE_TEST_CASE(a_quota_function_gives_each_key_its_own_capacity_and_rate, fixture) {
  std::atomic<int> asked{0};
  auto quota = [&](std::string_view key) {
    ++asked;
    if (key == "bad") return redis_quota{0, per_second(1)};
    if (key.starts_with("gold:")) return redis_quota{5, per_second(50)};
    return redis_quota{1, per_second(1)};
  };
  for (redis_bucket_mode m : both_modes) {
    BOOST_TEST_CONTEXT(name(m)) {
      const std::string prefix = std::string("q:") + name(m) + ":";
      redis_keyed_limiter l(conn, prefix, quota, in(m));
      BOOST_TEST(l.quota("gold:x").capacity == 5u);
      BOOST_TEST(l.quota("x").capacity == 1u);
      std::vector<std::shared_ptr<outcome>> gold;
      for (int i = 0; i < 5; ++i)
        gold.push_back(request(l, "gold:x"));
      auto plain1 = request(l, "x"), plain2 = request(l, "x");
      auto over = request(l, "x", 2);  // more than x's capacity, not gold's
      BOOST_REQUIRE(run_until(ctx, [&] { return gold.back()->done() && over->done(); }));
      for (auto& g : gold)
        BOOST_TEST(g->ok());
      BOOST_TEST(plain1->ok());
      BOOST_TEST(over->ec == error::make_error_code(error::exceeds_capacity));
      BOOST_TEST(!plain2->done());  // x refills one per second
      // A quota no bucket can have: the initiating function throws, nothing queued.
      const auto waiting = l.waiting();
      BOOST_CHECK_THROW(request(l, "bad"), std::invalid_argument);
      BOOST_TEST(l.waiting() == waiting);
      BOOST_TEST(l.active_keys() == 1u);  // only x, whose request waits
      l.cancel();
      BOOST_REQUIRE(run_until(ctx, [&] { return plain2->done(); }));
      BOOST_TEST(plain2->ec == aborted);
      BOOST_REQUIRE(run_until(ctx, [&] { return l.active_keys() == 0; }));
    }
  }
  // Asked once per activation of a key (gold:x and x each time, and bad), not per request.
  BOOST_TEST(asked.load() <= 2 * (2 + 2 + 1));
}

BOOST_FIXTURE_TEST_CASE(options_are_validated, fixture) {
  redis_bucket_options lease;
  lease.lease = 1;
  BOOST_CHECK_THROW(redis_keyed_limiter(conn, "v:", 2, per_second(1), lease),
                    std::invalid_argument);
  BOOST_CHECK_THROW(redis_keyed_limiter(conn, "v:", 0, per_second(1)), std::invalid_argument);
  BOOST_CHECK_THROW(redis_keyed_limiter(conn, "v:", 2, rate{0, 1s}), std::invalid_argument);
  BOOST_CHECK_THROW(redis_keyed_limiter(conn, "v:", redis_keyed_limiter::quota_function()),
                    std::invalid_argument);
  redis_bucket_options bad_batch = in(redis_bucket_mode::reserve);
  bad_batch.max_batch = 0;
  BOOST_CHECK_THROW(redis_keyed_limiter(
                        conn, "v:",
                        [](std::string_view) {
                          return redis_quota{1, per_second(1)};
                        },
                        bad_batch),
                    std::invalid_argument);
  redis_keyed_limiter head(conn, "v:", 2, per_second(1));
  BOOST_CHECK_THROW(head.as_remote("x"), std::invalid_argument);
}

BOOST_FIXTURE_TEST_CASE(distinct_keys_leave_memory_flat_and_expire_in_redis, fixture) {
  // Every request a new key: 200 coroutines, one connection, reservation
  // mode. The process keeps state only for keys with a request in flight.
  const int keys = sanitized ? 100'000 : 1'000'000;
  const int workers = 200;
  redis_keyed_limiter l(conn, "m:", 2, per_second(1000), in(redis_bucket_mode::reserve));
  std::atomic<int> next{0}, done{0}, failed{0};
  std::size_t most_active = 0;
  long rss_early = 0;
  for (int w = 0; w < workers; ++w)
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          char buf[32];
          for (int i; (i = next++) < keys;) {
            const auto len = std::snprintf(buf, sizeof buf, "user-%d", i);
            auto [ec] = co_await l.async_get_token(std::string_view(buf, len),
                                                   asio::as_tuple(asio::use_awaitable));
            if (ec) ++failed;
            if (++done == keys / 10) rss_early = rss_kib();
            if (done % 1000 == 0) most_active = std::max(most_active, l.active_keys());
          }
        },
        asio::detached);
  const auto t0 = steady::now();
  BOOST_REQUIRE(run_until(
      ctx, [&] { return done == keys; }, 300s));
  const double secs = std::chrono::duration<double>(steady::now() - t0).count();
  const long rss_end = rss_kib();
  BOOST_TEST_MESSAGE(keys << " keys in " << secs << " s (" << keys / secs
                          << "/s); RSS at 10%: " << rss_early << " KiB, at the end: " << rss_end
                          << " KiB; most keys held at once: " << most_active);
  BOOST_TEST(failed == 0);
  BOOST_TEST(most_active <= std::size_t(workers));
  BOOST_TEST(l.active_keys() == 0u);
  BOOST_TEST(l.stats().granted == std::uint64_t(keys));
  // Flat: a key's state is hundreds of bytes, so keeping the 900 k keys made
  // after the 10% mark would add hundreds of MiB. (RSS means little under
  // the sanitizers' allocators: there the bound on keys held is the check.)
  if (!sanitized) BOOST_TEST(rss_end - rss_early < 16 * 1024);
  // In Redis, each key expires once full again (2 ms after its last token).
  BOOST_REQUIRE(run_until(
      ctx, [&] { return dbsize() == 0; }, 20s));
}

BOOST_FIXTURE_TEST_CASE(a_keys_state_is_dropped_once_cancelled_failed_or_closed, fixture) {
  for (redis_bucket_mode m : both_modes) {
    BOOST_TEST_CONTEXT(name(m)) {
      const std::string prefix = std::string("c:") + name(m) + ":";
      redis_keyed_limiter l(conn, prefix, 1, per_second(10), in(m));
      std::vector<std::shared_ptr<outcome>> w;
      asio::cancellation_signal sig;
      for (int i = 0; i < 3; ++i)
        w.push_back(request(l, "a"));
      auto last = std::make_shared<outcome>();
      l.async_get_token("a", 1, asio::bind_cancellation_slot(sig.slot(), checked_handler(last)));
      BOOST_REQUIRE(run_until(ctx, [&] { return w[0]->done(); }));
      BOOST_TEST(l.active_keys() == 1u);
      sig.emit(asio::cancellation_type::terminal);
      BOOST_TEST(l.cancel() == 2u);
      BOOST_REQUIRE(run_until(ctx, [&] { return w[2]->done() && last->done(); }));
      BOOST_TEST(last->ec == aborted);
      BOOST_TEST(w[1]->ec == aborted);
      // The cancelled reservations were given back (on a server that had
      // never seen the refund script: NOSCRIPT, then its text), the state dropped.
      BOOST_REQUIRE(run_until(ctx, [&] { return l.active_keys() == 0; }));
      if (m == redis_bucket_mode::reserve) {
        BOOST_TEST(l.stats().refund_calls >= 1u);
        BOOST_TEST(l.stats().refunded == 3u);
      }
      // Closed: queued requests fail, and so do later ones.
      auto q1 = request(l, "b"), q2 = request(l, "b");
      BOOST_REQUIRE(run_until(ctx, [&] { return q1->done(); }));
      l.close();
      BOOST_REQUIRE(run_until(ctx, [&] { return q2->done(); }));
      BOOST_TEST(q2->ec == error::make_error_code(error::bucket_closed));
      auto later = request(l, "c");
      BOOST_REQUIRE(run_until(ctx, [&] { return later->done(); }));
      BOOST_TEST(later->ec == error::make_error_code(error::bucket_closed));
      BOOST_TEST(!l.is_open());
      BOOST_TEST(l.active_keys() == 0u);
    }
  }
}

BOOST_FIXTURE_TEST_CASE(destroying_the_limiter_completes_every_key_and_deferred_operations,
                        fixture) {
  for (redis_bucket_mode m : both_modes) {
    BOOST_TEST_CONTEXT(name(m)) {
      const std::string prefix = std::string("d:") + name(m) + ":";
      std::vector<std::shared_ptr<outcome>> w;
      auto l = std::make_unique<redis_keyed_limiter>(conn, prefix, 1, per_second(1), in(m));
      for (int k = 0; k < 20; ++k)
        for (int i = 0; i < 3; ++i)
          w.push_back(request(*l, "key" + std::to_string(k)));
      auto deferred = [&] {
        std::string key = "late";  // gone before the launch: the operation has its copy
        return l->async_get_token(key, 1, asio::deferred);
      }();
      BOOST_REQUIRE(run_until(ctx, [&] {
        return std::count_if(w.begin(), w.end(), [](auto& o) { return o->done(); }) == 20;
      }));
      l.reset();
      auto late = std::make_shared<outcome>();
      std::move(deferred)(checked_handler(late));
      BOOST_REQUIRE(run_until(ctx, [&] {
        return late->done() && std::all_of(w.begin(), w.end(), [](auto& o) { return o->done(); });
      }));
      int granted = 0;
      for (auto& o : w) {
        BOOST_TEST(o->calls == 1);
        if (o->ok())
          ++granted;
        else
          BOOST_TEST(o->ec == aborted);
      }
      BOOST_TEST(granted == 20);
      BOOST_TEST((late->ec == aborted || late->ec == error::make_error_code(error::bucket_closed)));
    }
  }
}

BOOST_FIXTURE_TEST_CASE(destroying_or_closing_the_limiter_wakes_blocked_callers, fixture) {
  for (bool destroy : {false, true}) {
    BOOST_TEST_CONTEXT((destroy ? "destroy" : "close")) {
      auto l = std::make_unique<redis_keyed_limiter>(conn, destroy ? "w1:" : "w2:", 1,
                                                     per_minute(1), in(redis_bucket_mode::reserve));
      auto guard = asio::make_work_guard(ctx);
      std::thread runner([&] { ctx.run(); });
      l->get_token("a");
      l->get_token("b");
      std::vector<boost::system::error_code> got(4);
      std::vector<std::thread> blocked;
      for (int i = 0; i < 4; ++i)
        blocked.emplace_back([&, i] {
          if (i % 2)
            l->get_token(i < 2 ? "a" : "b", 1, got[i]);  // a minute ahead
          else
            l->try_get_token_for(i < 2 ? "a" : "b", 1h, 1, got[i]);
        });
      const auto end = steady::now() + 10s;
      while (l->waiting() < 4 && steady::now() < end)
        std::this_thread::sleep_for(1ms);
      BOOST_TEST(l->waiting() == 4u);
      if (destroy)
        l.reset();
      else
        l->close();
      for (auto& t : blocked)
        t.join();
      for (auto& ec : got)
        BOOST_TEST(ec == (destroy ? aborted : error::make_error_code(error::bucket_closed)));
      guard.reset();
      ctx.stop();
      runner.join();
      ctx.restart();
    }
  }
}

BOOST_FIXTURE_TEST_CASE(blocking_callers_and_deadline_forms, fixture) {
  for (redis_bucket_mode m : both_modes) {
    BOOST_TEST_CONTEXT(name(m)) {
      const std::string prefix = std::string("b:") + name(m) + ":";
      redis_keyed_limiter l(conn, prefix, 1, per_second(10), in(m));
      auto guard = asio::make_work_guard(ctx);
      std::thread runner([&] { ctx.run(); });
      l.get_token("t");  // the one token
      const auto t0 = steady::now();
      BOOST_TEST(!l.try_get_token_for("t", 20ms));  // due in 100 ms: not in time, takes nothing
      BOOST_TEST((steady::now() - t0 < 90ms));
      BOOST_TEST(l.try_get_token_for("t", 2s));  // due at 100 ms
      l.get_token("u");
      boost::system::error_code ec;
      l.get_token("u", 2, ec);
      BOOST_TEST(ec == error::make_error_code(error::exceeds_capacity));
      std::promise<std::pair<boost::system::error_code, bool>> p;
      l.async_try_get_token("v", 1, [&](boost::system::error_code ec, bool g) {
        p.set_value({ec, g});
      });
      auto r = p.get_future().get();
      BOOST_TEST(!r.first);
      BOOST_TEST(r.second);
      std::promise<std::pair<boost::system::error_code, bool>> p2;
      l.async_try_get_token_for("v", 0ms, 1, [&](boost::system::error_code ec, bool g) {
        p2.set_value({ec, g});
      });
      auto r2 = p2.get_future().get();
      BOOST_TEST(!r2.first);
      BOOST_TEST(!r2.second);  // v's token is gone: not in time
      guard.reset();
      ctx.stop();
      runner.join();
      ctx.restart();
      BOOST_TEST(l.active_keys() == 0u);
    }
  }
}

BOOST_FIXTURE_TEST_CASE(one_fault_hold_for_every_key_and_the_fallback_bound_per_key, fixture) {
  // A connection of its own with a short request timeout, to a server that
  // stalls (SIGSTOP): a request then fails only after the timeout.
  redis_config cfg = server.config();
  cfg.request_timeout = 300ms;
  redis_connection c(ctx, cfg);
  redis_bucket_options o = in(redis_bucket_mode::reserve);
  o.fault_hold = 3s;
  redis_keyed_limiter closed(c, "f:", 5, per_second(1), o);
  o.on_fault = redis_fault_policy::local_fallback;
  redis_keyed_limiter fallback(c, "g:", 2, per_second(1), o);
  auto first = request(closed, "a");
  BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
  BOOST_TEST(first->ok());
  server.pause();
  // The first request meets the stalled server and fails after the
  // timeout; every key after it fails at once (held), without a timeout of
  // its own.
  const auto ta = steady::now();
  auto a = request(closed, "a");
  BOOST_REQUIRE(run_until(ctx, [&] { return a->done(); }));
  BOOST_TEST(a->ec == error::make_error_code(error::redis_unavailable));
  BOOST_TEST((steady::now() - ta >= 290ms));
  const auto t0 = steady::now();
  std::vector<std::shared_ptr<outcome>> others;
  for (int k = 0; k < 50; ++k)
    others.push_back(request(closed, "other" + std::to_string(k)));
  BOOST_REQUIRE(run_until(ctx, [&] { return others.back()->done(); }));
  BOOST_TEST((steady::now() - t0 < 150ms));  // one timeout would be 300 ms
  for (auto& w : others)
    BOOST_TEST(w->ec == error::make_error_code(error::redis_unavailable));
  BOOST_TEST(closed.stats().faults == 1u);
  // The local fallback: each key gets its capacity, then waits its rate,
  // and keeps its fallback bucket while it refills (not a fresh full one).
  std::vector<std::shared_ptr<outcome>> now_ok;
  for (int i = 0; i < 2; ++i)
    now_ok.push_back(request(fallback, "x"));
  BOOST_REQUIRE(run_until(ctx, [&] { return now_ok.back()->done(); }));
  for (auto& w : now_ok)
    BOOST_TEST(w->ok());
  BOOST_TEST(fallback.active_keys() == 1u);  // its fallback bucket is refilling
  auto third = request(fallback, "x");
  run_for(300ms);
  BOOST_TEST(!third->done());       // the bound holds across the key's idle moment
  auto y = request(fallback, "y");  // another key has its own
  BOOST_REQUIRE(run_until(ctx, [&] { return y->done(); }));
  BOOST_TEST(y->ok());
  BOOST_REQUIRE(run_until(
      ctx, [&] { return third->done(); }, 3s));
  BOOST_TEST(third->ok());
  BOOST_TEST(fallback.stats().fallback_grants == 4u);
  // Once their fallback buckets are full again (2 s), the keys are dropped.
  BOOST_TEST(fallback.active_keys() >= 1u);
  BOOST_REQUIRE(run_until(
      ctx, [&] { return fallback.active_keys() == 0; }, 5s));
  server.resume();
}

BOOST_FIXTURE_TEST_CASE(a_key_is_a_joint_requests_remote_part, fixture) {
  redis_keyed_limiter l(conn, "j:", 1, per_second(10), in(redis_bucket_mode::reserve));
  token_bucket local(ctx, 5, per_minute(1));
  std::optional<boost::system::error_code> first, second;
  async_acquire({part(l.as_remote("user"), 1), part(local, 1)},
                [&](boost::system::error_code ec, joint_receipt) { first = ec; });
  BOOST_REQUIRE(run_until(ctx, [&] { return first.has_value(); }));
  BOOST_TEST(!*first);
  const auto t0 = steady::now();
  async_acquire({part(l.as_remote("user"), 1), part(local, 1)},
                [&](boost::system::error_code ec, joint_receipt) { second = ec; });
  BOOST_REQUIRE(run_until(ctx, [&] { return second.has_value(); }));
  BOOST_TEST(!*second);
  BOOST_TEST((steady::now() - t0 >= 80ms));  // the key's next token
  BOOST_TEST(local.available() == 3u);
  BOOST_REQUIRE(run_until(ctx, [&] { return l.active_keys() == 0; }));
  BOOST_TEST(l.stats().granted == 2u);
  // A receipt gives back (while its part lives): the key's token refunded,
  // with no state held for the key.
  redis_keyed_limiter slow(conn, "js:", 1, per_minute(1), in(redis_bucket_mode::reserve));
  const auto user = slow.as_remote("user");
  std::optional<std::pair<boost::system::error_code, joint_receipt>> got;
  async_acquire({part(user, 1)}, [&](boost::system::error_code ec, joint_receipt r) {
    got.emplace(ec, std::move(r));
  });
  BOOST_REQUIRE(run_until(ctx, [&] { return got.has_value(); }));
  BOOST_TEST(!got->first);
  BOOST_REQUIRE(run_until(ctx, [&] { return slow.active_keys() == 0; }));
  BOOST_TEST(got->second.give_back_all() == 1u);
  BOOST_REQUIRE(run_until(ctx, [&] { return slow.stats().refunded == 1; }));
  BOOST_TEST(slow.stats().granted == 1u);
  BOOST_TEST(slow.active_keys() == 0u);
  // The token is back: the key grants again at once.
  auto again = request(slow, "user");
  BOOST_REQUIRE(run_until(
      ctx, [&] { return again->done(); }, 2s));
  BOOST_TEST(again->ok());
  // A key whose quota no bucket can have is refused when made a part.
  redis_keyed_limiter bad(
      conn, "jb:",
      [](std::string_view) {
        return redis_quota{0, per_second(1)};
      },
      in(redis_bucket_mode::reserve));
  BOOST_CHECK_THROW(bad.as_remote("x"), std::invalid_argument);
}

BOOST_FIXTURE_TEST_CASE(threads_request_cancel_and_leave_keys_idle_concurrently, fixture) {
  // Two threads run the context while four threads request a few hot keys
  // (some cancelled at once): keys go idle and are made again all the time.
  for (redis_bucket_mode m : both_modes) {
    BOOST_TEST_CONTEXT(name(m)) {
      const std::string prefix = std::string("t:") + name(m) + ":";
      redis_keyed_limiter l(conn, prefix, 1000, per_second(100'000), in(m));
      auto guard = asio::make_work_guard(ctx);
      std::vector<std::thread> runners;
      for (int i = 0; i < 2; ++i)
        runners.emplace_back([&] { ctx.run(); });
      const int per_thread = sanitized ? 300 : 3000;
      std::atomic<int> done{0}, ok{0}, cancelled{0};
      // (A signal outlives its operation: kept until the end.)
      std::vector<std::deque<asio::cancellation_signal>> signals(4);
      std::vector<std::thread> clients;
      for (int t = 0; t < 4; ++t)
        clients.emplace_back([&, t] {
          for (int i = 0; i < per_thread; ++i) {
            const std::string key = "hot" + std::to_string((i + t) % 5);
            asio::cancellation_signal& sig = signals[t].emplace_back();
            l.async_get_token(
                key, 1, asio::bind_cancellation_slot(sig.slot(), [&](boost::system::error_code ec) {
                  ++done;
                  if (!ec) ++ok;
                  if (ec == asio::error::operation_aborted) ++cancelled;
                }));
            if (i % 7 == 0) sig.emit(asio::cancellation_type::terminal);
            if (i % 97 == 0) l.active_keys();
          }
        });
      for (auto& c : clients)
        c.join();
      const auto end = steady::now() + 60s;
      while (done < 4 * per_thread && steady::now() < end)
        std::this_thread::sleep_for(1ms);
      BOOST_TEST(done.load() == 4 * per_thread);
      BOOST_TEST(ok + cancelled == done.load());
      while (l.active_keys() != 0 && steady::now() < end)
        std::this_thread::sleep_for(1ms);
      BOOST_TEST(l.active_keys() == 0u);
      BOOST_TEST_MESSAGE(ok.load() << " granted, " << cancelled.load() << " cancelled");
      guard.reset();
      ctx.stop();  // (the connection's reads keep the context busy)
      for (auto& r : runners)
        r.join();
      ctx.restart();
    }
  }
}

BOOST_FIXTURE_TEST_CASE(keys_waiting_for_the_window_are_served_in_the_order_they_found_it_full,
                        fixture) {
  // A window of one call: ten keys, one request each, go to Redis one after
  // the other, in the order they asked, each the moment the one before
  // replied; the tenth is not forgotten. Also on a strand over an
  // any_io_executor (whose posts allocate: the handovers go to the context
  // behind it).
  for (const bool on_strand : {false, true})
    for (redis_bucket_mode m : both_modes) {
      BOOST_TEST_CONTEXT(name(m) << (on_strand ? ", on a strand" : "")) {
        redis_config cfg = server.config();
        cfg.max_calls_in_flight = 1;
        const asio::any_io_executor ex = on_strand ? asio::any_io_executor(asio::make_strand(
                                                         asio::any_io_executor(ctx.get_executor())))
                                                   : asio::any_io_executor(ctx.get_executor());
        redis_connection one(ex, cfg);
        redis_keyed_limiter l(one, std::string("w1:") + name(m) + (on_strand ? ":s:" : ":"), 5,
                              per_second(10), in(m));
        std::vector<std::shared_ptr<outcome>> out;
        for (int k = 0; k < 10; ++k)
          out.push_back(request(l, "k" + std::to_string(k)));
        BOOST_REQUIRE(run_until(ctx, [&] { return out.back()->done(); }));
        for (int k = 0; k < 10; ++k) {
          BOOST_TEST_CONTEXT("key " << k) {
            BOOST_TEST(out[k]->ok());
            if (k > 0) BOOST_TEST(out[k]->order > out[k - 1]->order);
          }
        }
        BOOST_TEST(
            run_until(ctx, [&] { return one.stats().calls_in_flight == 0; }));  // none leaked
        const auto s = one.stats();
        BOOST_TEST(s.peak_outstanding == 1u);
        BOOST_TEST(s.window_waits == 9u);  // every key but the first found it full, once
        // 10 calls; the first of each mode sent again with the script's text
        // (NOSCRIPT: each test's server is new)
        BOOST_TEST(s.requests == (on_strand ? 10u : 11u));
        BOOST_TEST(l.active_keys() == 0u);
      }
    }
}

BOOST_FIXTURE_TEST_CASE(many_hot_keys_keep_no_more_calls_out_than_the_window, fixture) {
  // 1000 hot keys (200 under the sanitizers), requested by two threads
  // while two threads run the context: the connection never holds more than
  // the window's 8 calls (its own count of requests outstanding), every
  // request completes (no key waiting for the window is forgotten), and
  // every key is dropped once done. The same traffic through a window of
  // 4096 keeps far more than 8 out. Then again with every 11th request
  // cancelled at once (keys waiting for the window whose requests are gone
  // pass their slot on): every request still completes. (The peak is not
  // checked there: the refunds of reservations cancelled while their call
  // was out are not counted in the window.)
  const int keys = sanitized ? 200 : 1000;
  const auto burst = [&](redis_bucket_mode m, std::size_t window, int cancel_every) {
    redis_config cfg = server.config();
    cfg.max_calls_in_flight = window;
    redis_connection c(ctx, cfg);
    const std::string prefix = "wn:" + std::string(name(m)) + ":" + std::to_string(window) + ":" +
                               std::to_string(cancel_every) + ":";
    // 2 tokens per key, 1000/s: a key's third request waits ~1 ms, in line.
    redis_keyed_limiter l(c, prefix, 2, per_second(1000), in(m));
    auto guard = asio::make_work_guard(ctx);
    std::vector<std::thread> runners;
    for (int i = 0; i < 2; ++i)
      runners.emplace_back([&] { ctx.run(); });
    std::atomic<int> done{0}, ok{0}, cancelled{0};
    std::vector<std::deque<asio::cancellation_signal>> signals(2);
    std::vector<std::thread> clients;
    for (int t = 0; t < 2; ++t)
      clients.emplace_back([&, t] {
        for (int i = 0; i < keys * 3 / 2; ++i) {
          const std::string key = "k" + std::to_string((i + t * keys / 2) % keys);
          asio::cancellation_signal& sig = signals[t].emplace_back();
          l.async_get_token(
              key, 1, asio::bind_cancellation_slot(sig.slot(), [&](boost::system::error_code ec) {
                ++done;
                if (!ec) ++ok;
                if (ec == asio::error::operation_aborted) ++cancelled;
              }));
          if (cancel_every && i % cancel_every == 0) sig.emit(asio::cancellation_type::terminal);
        }
      });
    for (auto& cl : clients)
      cl.join();
    const int total = 2 * (keys * 3 / 2);
    const auto end = steady::now() + 60s;
    while (done < total && steady::now() < end)
      std::this_thread::sleep_for(1ms);
    BOOST_TEST(done.load() == total);
    BOOST_TEST(ok + cancelled == done.load());
    while (l.active_keys() != 0 && steady::now() < end)
      std::this_thread::sleep_for(1ms);
    BOOST_TEST(l.active_keys() == 0u);
    while (c.stats().calls_in_flight != 0 && steady::now() < end)
      std::this_thread::sleep_for(1ms);
    const auto s = c.stats();
    BOOST_TEST(s.calls_in_flight == 0u);  // every slot given back
    BOOST_TEST_MESSAGE(name(m) << ", window " << window << ": " << ok.load() << " granted, "
                               << cancelled.load() << " cancelled, peak " << s.peak_outstanding
                               << " requests outstanding, " << s.window_waits
                               << " waits for the window, " << s.requests << " requests");
    guard.reset();
    ctx.stop();  // (the connection's reads keep the context busy)
    for (auto& r : runners)
      r.join();
    ctx.restart();
    return s;
  };
  for (redis_bucket_mode m : both_modes) {
    BOOST_TEST_CONTEXT(name(m)) {
      const auto bound = burst(m, 8, 0);
      BOOST_TEST(bound.peak_outstanding <= 8u);
      BOOST_TEST(bound.window_waits > 0u);
      const auto wide = burst(m, 4096, 0);
      BOOST_TEST(wide.peak_outstanding > 8u);
      BOOST_TEST(wide.window_waits == 0u);
      const auto cancelling = burst(m, 8, 11);
      BOOST_TEST(cancelling.window_waits > 0u);
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()
