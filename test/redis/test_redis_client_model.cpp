// The reservation mode's client machinery against a reference model, on a
// real redis-server: random sequences of requests (single, in bursts that
// go out coalesced, with deadlines, tries, requests larger than the
// capacity, for 0 tokens), per-operation cancellations (also of a request
// whose call is out), cancel(), close() and destruction with reservations
// waiting, on a bucket and on three keys of a keyed limiter with quotas of
// their own, the bucket's clock moved by hand.
//
// Every script request carries the manual clock's time
// (redis_detail::server_time_hook), so the server decides at the instants
// the test chose, and the model says what each request ends with, and at
// which instant. The model is written from the documented promise (the
// headers' and the README's), not from the code:
// - a key is a bucket of `capacity` tokens refilling continuously at the
//   rate, starting full; a request reserves its tokens at its arrival, in
//   order of arrival, the level going into debt, and is granted at the
//   earliest whole microsecond at which the level, refilling, covers it
//   (never earlier: a request whose tokens are there is granted at once;
//   the test's clock jumps, landing on that instant, before it or past it);
// - a request for more than the capacity fails at once, one due further than
//   the horizon fails at once with exceeds_horizon, a deadline form not due
//   within its timeout answers false at once, a try answers whether the
//   tokens are there now: each taking nothing;
// - a reservation cancelled (or cancelled by cancel(), closed, destroyed)
//   before it is due completes at once and gives its tokens back to the
//   level, up to the capacity; reservations already made keep their due times.
// After every operation the test waits until the client is quiet (its
// requests answered, its refunds sent), then compares every completion:
// its error, its answer, the instant, and that it came once.
#include "manual_clock.hpp"
#include "redis_server.hpp"
#include "test_support.hpp"

#include <ratelimit/redis/detail/hooks.hpp>
#include <ratelimit/redis/redis_keyed_limiter.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/multiprecision/cpp_int.hpp>
#include <boost/test/unit_test.hpp>

#include <deque>
#include <list>
#include <memory>
#include <optional>
#include <random>
#include <sstream>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono_literals;
namespace asio = boost::asio;
using rational = boost::multiprecision::cpp_rational;
using integer = boost::multiprecision::cpp_int;

namespace {

#if defined(RATELIMIT_TEST_SANITIZED)
constexpr int runs = 6, steps = 200;
#else
constexpr int runs = 12, steps = 300;
#endif

using bucket_t = basic_redis_token_bucket<manual_clock, manual_wait_traits>;
using keyed_t = basic_redis_keyed_limiter<manual_clock, manual_wait_traits>;

/// The manual clock in whole microseconds (the test moves it in those).
std::int64_t manual_us() noexcept {
  return manual_clock::now().time_since_epoch().count() / 1000;
}

/// Scripts run at the manual clock's time while it lives.
struct server_time_on_manual_clock {
  server_time_on_manual_clock() {
    manual_clock::reset();
    redis_detail::server_time_hook = &manual_us;
  }
  ~server_time_on_manual_clock() { redis_detail::server_time_hook = nullptr; }
};

/// One key's promise (see the top of the file). Exact: rational tokens.
struct key_model {
  std::uint64_t capacity;
  rational per_us;          // tokens per microsecond
  std::int64_t horizon_us;  // < 0: none
  std::optional<rational> level;
  std::int64_t last = 0;

  key_model(std::uint64_t c, rate r, std::int64_t horizon)
      : capacity(c),
        per_us(rational(integer(r.tokens)) / rational(integer(r.period.count() / 1000))),
        horizon_us(horizon) {}

  void refill(std::int64_t t) {
    if (!level) {  // a key not seen yet is a full bucket
      level = rational(integer(capacity));
      last = t;
    } else if (t > last) {
      *level = std::min(rational(integer(capacity)), rational(*level + per_us * integer(t - last)));
      last = t;
    }
  }

  enum class answer { reserved, not_within, beyond_horizon };

  /// A request for `n` (1 to capacity) at `t`, waiting at most `within` us.
  std::pair<answer, std::int64_t> reserve(std::int64_t t, std::uint64_t n,
                                          std::optional<std::int64_t> within) {
    refill(t);
    std::int64_t due = t;
    const rational want(integer{n});
    if (*level < want) {
      const rational wait = rational((want - *level) / per_us);
      integer q = boost::multiprecision::numerator(wait) / boost::multiprecision::denominator(wait);
      if (rational(q) < wait) ++q;
      due = t + q.convert_to<std::int64_t>();
    }
    if (within && due - t > *within) return {answer::not_within, due};
    if (horizon_us >= 0 && due - t > horizon_us) return {answer::beyond_horizon, due};
    // Taken at its due time, from a bucket that never holds more than its
    // capacity (what would accrue past it before then is lost), counted here
    // as a debt from now on.
    const rational accrued = per_us * integer(due - t);
    *level = std::min(rational(integer(capacity)), rational(*level + accrued)) - want - accrued;
    return {answer::reserved, due};
  }

  void refund(std::int64_t t, std::uint64_t n) {
    refill(t);
    *level = std::min(rational(integer(capacity)), rational(*level + rational(integer{n})));
  }
};

/// One request: what the model expects, and what came.
struct record {
  std::string what;
  int key = 0;
  std::uint64_t n = 0;
  bool reserved = false;  // holds a reservation in the model until `at`
  // Expected:
  boost::system::error_code ec;
  bool granted = false;
  std::int64_t at = 0;  // us on the manual clock
  // Came:
  int calls = 0;
  boost::system::error_code got_ec;
  bool got_granted = false;
  std::int64_t got_at = 0;
  asio::cancellation_signal signal;

  void expect(boost::system::error_code e, bool g, std::int64_t t) {
    ec = e;
    granted = g;
    at = t;
  }
  void came(boost::system::error_code e, bool g) {
    ++calls;
    got_ec = e;
    got_granted = g;
    got_at = manual_us();
  }
  std::string describe() const {
    std::ostringstream s;
    s << what << " key " << key << " n " << n << ": expected " << ec.message() << "/" << granted
      << " at " << at << "; came " << calls << " time(s), " << got_ec.message() << "/"
      << got_granted << " at " << got_at;
    return s.str();
  }
};

/// The bucket under test, on key `key`.
struct bucket_subject {
  redis_connection& conn;
  std::string key;
  std::uint64_t capacity;
  rate r;
  redis_bucket_options options;
  std::unique_ptr<bucket_t> b;

  void make() { b = std::make_unique<bucket_t>(conn, key, capacity, r, options); }
  int keys() const { return 1; }
  std::string redis_key(int) const { return key; }
  std::pair<std::uint64_t, rate> quota(int) const { return {capacity, r}; }
  template <typename H>
  void get(int, std::uint64_t n, H&& h) {
    b->async_get_token(n, std::forward<H>(h));
  }
  template <typename H>
  void get_for(int, std::uint64_t n, std::chrono::milliseconds d, H&& h) {
    b->async_try_get_token_for(d, n, std::forward<H>(h));
  }
  template <typename H>
  void try_get(int, std::uint64_t n, H&& h) {
    b->async_try_get_token(n, std::forward<H>(h));
  }
  std::size_t cancel() { return b->cancel(); }
  void close() { b->close(); }
  void destroy() { b.reset(); }
};

/// The keyed limiter under test: keys "a", "b", "c" with quotas of their own.
struct keyed_subject {
  redis_connection& conn;
  std::string prefix;
  redis_bucket_options options;
  std::unique_ptr<keyed_t> k;

  static constexpr const char* names[] = {"a", "b", "c"};
  static redis_quota quota_of(std::string_view key) {
    if (key == "a") return {3, per_second(10)};
    if (key == "b") return {1, rate{1, 250ms}};
    return {5, rate{3, 1s}};
  }
  void make() { k = std::make_unique<keyed_t>(conn, prefix, &quota_of, options); }
  int keys() const { return 3; }
  std::string redis_key(int i) const { return prefix + names[i]; }
  std::pair<std::uint64_t, rate> quota(int i) const {
    const auto q = quota_of(names[i]);
    return {q.capacity, q.r};
  }
  template <typename H>
  void get(int i, std::uint64_t n, H&& h) {
    k->async_get_token(names[i], n, std::forward<H>(h));
  }
  template <typename H>
  void get_for(int i, std::uint64_t n, std::chrono::milliseconds d, H&& h) {
    k->async_try_get_token_for(names[i], d, n, std::forward<H>(h));
  }
  template <typename H>
  void try_get(int i, std::uint64_t n, H&& h) {
    k->async_try_get_token(names[i], n, std::forward<H>(h));
  }
  std::size_t cancel() { return k->cancel(); }
  void close() { k->close(); }
  void destroy() { k.reset(); }
};

struct totals {
  std::size_t granted = 0, refused = 0, cancelled = 0, closed = 0, requests = 0;
};

/// Runs `steps` random operations on `s`, comparing with the model.
template <typename Subject>
void fuzz(redis_fixture& f, Subject& s, std::int64_t horizon_us, std::mt19937_64& rng,
          totals& total) {
  std::vector<key_model> models;
  for (int i = 0; i < s.keys(); ++i)
    models.emplace_back(s.quota(i).first, s.quota(i).second, horizon_us);
  std::deque<record> records;     // (stable addresses: handlers point into it)
  std::list<record*> open;        // not yet compared to the end
  std::deque<std::string> trace;  // the last operations, shown on a failure
  const auto log = [&](std::string line) {
    trace.push_back(std::to_string(manual_us()) + ": " + std::move(line));
    if (trace.size() > 40) trace.pop_front();
  };
  const auto dump = [&] {
    for (const auto& l : trace)
      BOOST_TEST_MESSAGE("  " << l);
    for (record* r : open)
      BOOST_TEST_MESSAGE("  open: " << r->describe());
  };
  const auto pick = [&](std::uint64_t lo, std::uint64_t hi) {
    return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng);
  };
  const auto add = [&](std::string what, int key, std::uint64_t n) -> record& {
    record& r = records.emplace_back();
    r.what = std::move(what) + " #" + std::to_string(records.size());
    log(r.what + " key " + std::to_string(key) + " n " + std::to_string(n));
    r.key = key;
    r.n = n;
    open.push_back(&r);
    ++total.requests;
    return r;
  };
  // Waits until everything due by now came and the client is quiet, then
  // compares: due by now, exactly as expected; not due, not come.
  const auto check = [&] {
    const std::int64_t now = manual_us();
    const auto due_came = [&] {
      for (record* r : open)
        if (r->at <= now && r->calls == 0) return false;
      return true;
    };
    if (!run_until(f.ctx, due_came)) {
      for (record* r : open)
        if (r->at <= now && r->calls == 0) BOOST_TEST_MESSAGE("never came: " << r->describe());
      dump();
      BOOST_FAIL("a completion due at " << now << " never came");
    }
    // Quiet: a PING through the connection answered with nothing else
    // written meanwhile, twice running (the replies before it were handled,
    // and what they sent, refunds, answered).
    int quiet = 0;
    for (int i = 0; i < 200 && quiet < 2; ++i) {
      const auto before = f.conn.stats().requests;
      BOOST_REQUIRE(!exec(f.ctx, f.conn, {"PING"}).ec);
      f.ctx.restart();
      f.ctx.poll();
      quiet = f.conn.stats().requests == before + 1 ? quiet + 1 : 0;
    }
    BOOST_REQUIRE_MESSAGE(quiet == 2, "the client never went quiet");
    // The key's stored state is the model's, exactly.
    for (int i = 0; i < s.keys(); ++i) {
      if (!models[i].level) {  // nothing taken from it yet: nothing written to it
        auto e = exec(f.ctx, f.conn, {"EXISTS", s.redis_key(i)});
        BOOST_REQUIRE(!e.ec);
        if (e.reply.integer != 0) dump();
        BOOST_REQUIRE_MESSAGE(e.reply.integer == 0,
                              "key " << i << " written, the model never took");
        continue;
      }
      auto v = exec(f.ctx, f.conn, {"HMGET", s.redis_key(i), "l", "t", "c"});
      BOOST_REQUIRE(!v.ec && v.reply.elements.size() == 3);
      const std::string c = v.reply.elements[2].str;  // [r:]cap:tok:tick[@gen]
      const auto tick_at = c.rfind(':') + 1;
      const integer tick(c.substr(tick_at, c.find('@', tick_at) - tick_at));
      const std::int64_t t = std::stoll(v.reply.elements[1].str);
      key_model m = models[i];
      m.refill(t);
      const rational stored(integer(v.reply.elements[0].str), tick);
      if (m.last != t || *m.level != stored) {
        dump();
        BOOST_FAIL("key " << i << " holds " << stored << " at " << t << ", the model " << *m.level
                          << " at " << m.last);
      }
    }
    for (auto it = open.begin(); it != open.end();) {
      record& r = **it;
      if (r.at > now) {
        if (r.calls != 0) dump();
        BOOST_REQUIRE_MESSAGE(r.calls == 0, "early: " << r.describe());
        ++it;
        continue;
      }
      if (!(r.calls == 1 && r.got_ec == r.ec && r.got_granted == r.granted && r.got_at == r.at))
        dump();
      BOOST_REQUIRE_MESSAGE(
          r.calls == 1 && r.got_ec == r.ec && r.got_granted == r.granted && r.got_at == r.at,
          r.describe());
      if (r.ec == asio::error::operation_aborted)
        ++total.cancelled;
      else if (r.ec == error::bucket_closed)
        ++total.closed;
      else if (r.granted)
        ++total.granted;
      else
        ++total.refused;
      it = open.erase(it);
    }
  };
  const auto pending = [&] {
    std::vector<record*> p;
    const std::int64_t now = manual_us();
    for (record* r : open)
      if (r->reserved && r->at > now) p.push_back(r);
    return p;
  };
  // Everything pending completes now with `ec`, giving its tokens back.
  const auto end_pending = [&](boost::system::error_code ec) {
    const std::int64_t now = manual_us();
    for (record* r : pending()) {
      r->expect(ec, false, now);
      r->reserved = false;
      models[r->key].refund(now, r->n);
    }
  };
  const auto on_get = [](record& r) {
    return asio::bind_cancellation_slot(r.signal.slot(),
                                        [&r](boost::system::error_code ec) { r.came(ec, !ec); });
  };
  const auto on_try = [](record& r) {
    return asio::bind_cancellation_slot(
        r.signal.slot(), [&r](boost::system::error_code ec, bool g) { r.came(ec, g); });
  };
  // A request for n on `key` as the model answers it, now.
  const auto get = [&](int key, std::uint64_t n, bool model_it = true) -> record& {
    record& r = add("get", key, n);
    const std::int64_t now = manual_us();
    if (n > models[key].capacity) {
      r.expect(error::exceeds_capacity, false, now);
    } else if (n == 0) {
      r.expect({}, true, now);
    } else if (model_it) {
      const auto [a, due] = models[key].reserve(now, n, std::nullopt);
      if (a == key_model::answer::reserved) {
        r.expect({}, true, due);
        r.reserved = true;
      } else {
        r.expect(error::exceeds_horizon, false, now);
      }
    }
    s.get(key, n, on_get(r));
    return r;
  };

  for (int step = 0; step < steps; ++step) {
    const int key = static_cast<int>(pick(0, s.keys() - 1));
    const std::uint64_t cap = models[key].capacity;
    const std::int64_t now = manual_us();
    const auto op = pick(0, 99);
    if (op < 25) {  // one request, sometimes too large or for nothing
      const auto n = pick(0, 19) == 0 ? cap + 1 : pick(0, 29) == 0 ? 0 : pick(1, cap);
      get(key, n);
    } else if (op < 35) {  // a burst, coalesced; its last one cancelled at once, sometimes
      const auto m = pick(2, 8);
      const bool cancel_last = cap > 1 && pick(0, 2) == 0;
      for (std::uint64_t i = 0; i < m; ++i) {
        const bool last = i + 1 == m;
        const auto n = last && cancel_last ? pick(1, cap - 1) : pick(1, cap);
        record& r = get(key, n, !(last && cancel_last));
        if (last && cancel_last) {
          // Still queued here, or with its call out: either way it takes
          // nothing, and nothing after it in the model depends on it. (Less
          // than the capacity: a reservation of all of it, due within a
          // microsecond at which the bucket would overflow, loses what
          // accrues past the capacity there, which its refund does not give
          // back; the model would have to know whether it was sent.)
          r.expect(asio::error::operation_aborted, false, now);
          r.signal.emit(asio::cancellation_type::terminal);
        }
      }
    } else if (op < 45) {  // a deadline form
      const auto n = pick(0, 19) == 0 ? cap + 1 : pick(1, cap);
      const std::chrono::milliseconds d(pick(0, 3) == 0 ? 0 : pick(1, 1500));
      record& r = add("get_for " + std::to_string(d.count()) + "ms", key, n);
      if (n > cap) {
        r.expect(error::exceeds_capacity, false, now);
      } else {
        const auto [a, due] = models[key].reserve(now, n, d.count() * 1000);
        if (a == key_model::answer::reserved) {
          r.expect({}, true, due);
          r.reserved = true;
        } else if (a == key_model::answer::not_within) {
          r.expect({}, false, now);
        } else {
          r.expect(error::exceeds_horizon, false, now);
        }
      }
      s.get_for(key, n, d, on_try(r));
    } else if (op < 53) {  // a try
      const auto n = pick(0, 19) == 0 ? cap + 1 : pick(1, cap);
      record& r = add("try", key, n);
      if (n > cap) {
        r.expect(error::exceeds_capacity, false, now);
      } else {
        const auto [a, due] = models[key].reserve(now, n, 0);
        r.expect({}, a == key_model::answer::reserved, now);
      }
      s.try_get(key, n, on_try(r));
    } else if (op < 63) {  // cancel one reservation not due yet
      auto p = pending();
      if (!p.empty()) {
        record& r = *p[pick(0, p.size() - 1)];
        r.expect(asio::error::operation_aborted, false, now);
        r.reserved = false;
        models[r.key].refund(now, r.n);
        log("cancel " + r.what);
        r.signal.emit(asio::cancellation_type::terminal);
      }
    } else if (op < 90) {  // time passes: to a due time, just before one, or anywhere
      auto p = pending();
      std::int64_t next = std::numeric_limits<std::int64_t>::max();
      for (record* r : p)
        next = std::min(next, r->at);
      const auto how = pick(0, 3);
      std::int64_t to = now + static_cast<std::int64_t>(pick(0, 400'000));
      if (!p.empty() && how == 0) to = next;
      if (!p.empty() && how == 1 && next - 1 > now) to = next - 1;
      if (how == 2) to = now + 1;
      // The clock jumps: what comes due on the way is granted when it lands.
      for (record* r : p)
        if (r->at <= to) r->at = to;
      log("advance to " + std::to_string(to));
      manual_clock::advance(std::chrono::microseconds(to - now));
    } else if (op < 96) {  // cancel()
      const std::size_t n = pending().size();
      end_pending(asio::error::operation_aborted);
      log("cancel()");
      BOOST_TEST(s.cancel() == n);
    } else if (op < 98) {  // close(): a request after it fails too; then a new object
      end_pending(error::bucket_closed);
      log("close()");
      s.close();
      record& after = add("get after close", key, 1);
      after.expect(error::bucket_closed, false, now);
      s.get(key, 1, on_get(after));
      check();
      s.make();
    } else {  // destruction, then a new object
      end_pending(asio::error::operation_aborted);
      log("destroy");
      s.destroy();
      check();
      s.make();
    }
    check();
  }
  // The end: everything still reserved comes at its due time.
  for (auto p = pending(); !p.empty(); p = pending()) {
    std::int64_t next = std::numeric_limits<std::int64_t>::max();
    for (record* r : p)
      next = std::min(next, r->at);
    manual_clock::advance(std::chrono::microseconds(next - manual_us()));
    check();
  }
  BOOST_TEST(open.empty());
  for (const record& r : records)  // (also none came a second time after it was compared)
    BOOST_TEST(r.calls == 1, r.describe());
}

struct fixture : redis_fixture {
  server_time_on_manual_clock hook;

  redis_bucket_options options(std::mt19937_64& rng, std::int64_t& horizon_us) {
    redis_bucket_options o;
    o.mode = redis_bucket_mode::reserve;
    o.max_in_flight = std::uniform_int_distribution<std::size_t>(1, 4)(rng);
    o.max_batch = std::uniform_int_distribution<std::size_t>(1, 6)(rng);
    const auto h = std::uniform_int_distribution<int>(0, 3)(rng);
    horizon_us = -1;
    if (h == 1) {
      o.horizon = 0ms;
      horizon_us = 0;
    } else if (h == 2) {
      o.horizon = std::chrono::milliseconds(std::uniform_int_distribution<int>(100, 2000)(rng));
      horizon_us = o.horizon.count() * 1000;
    }
    return o;
  }
};

void report(const char* what, const totals& t) {
  BOOST_TEST_MESSAGE(what << ": " << t.requests << " requests: " << t.granted << " granted, "
                          << t.refused << " refused, " << t.cancelled << " cancelled, " << t.closed
                          << " closed");
}

/// `runs` runs of fuzz(), each over the subject `make(run, rng, horizon_us)`
/// gives (seeded `seed + run`); every kind of outcome must have occurred.
template <typename Make>
void campaign(fixture& f, const char* what, std::uint64_t seed, Make make) {
  totals total;
  for (int run = 0; run < runs; ++run) {
    std::mt19937_64 rng(seed + run);
    std::int64_t horizon_us = -1;
    auto s = make(run, rng, horizon_us);
    s.make();
    fuzz(f, s, horizon_us, rng, total);
  }
  report(what, total);
  BOOST_TEST(total.granted > 0u);
  BOOST_TEST(total.refused > 0u);
  BOOST_TEST(total.cancelled > 0u);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_client_model)

BOOST_FIXTURE_TEST_CASE(a_bucket_agrees_with_the_model, fixture) {
  campaign(*this, "bucket", 1000, [&](int run, std::mt19937_64& rng, std::int64_t& horizon_us) {
    const std::pair<std::uint64_t, rate> configs[] = {
        {1, per_second(10)}, {4, rate{3, 1s}}, {10, per_second(50)}, {2, rate{1, 333ms}}};
    const auto [cap, r] = configs[run % 4];
    return bucket_subject{conn, "model" + std::to_string(run), cap,
                          r,    options(rng, horizon_us),      {}};
  });
}

BOOST_FIXTURE_TEST_CASE(a_keyed_limiter_agrees_with_the_model, fixture) {
  campaign(*this, "keyed", 2000, [&](int run, std::mt19937_64& rng, std::int64_t& horizon_us) {
    return keyed_subject{conn, "km" + std::to_string(run) + ":", options(rng, horizon_us), {}};
  });
}

BOOST_AUTO_TEST_SUITE_END()
