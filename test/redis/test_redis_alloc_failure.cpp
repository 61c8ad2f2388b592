//
// test/redis/test_redis_alloc_failure.cpp: the Redis bucket and connection when
// allocations fail, and when hiredis runs out of memory.
//
// The method of test/test_alloc_failure.cpp (support/alloc_harness.hpp), over
// scenarios against a real redis-server (redis_server.hpp starts one for the
// whole executable): a request and its reply, a try, a denied head waiting on
// its timer, a NOSCRIPT resend (SCRIPT FLUSH first), a reconnect (the server
// killed and restarted), close() and destruction with requests in flight.
// Each scenario runs with every allocation k in 1..N failing in turn (this
// thread's only: Asio's resolver thread is Asio's), then with every call
// into hiredis failing in turn as when hiredis is out of memory (through
// redis_detail::hiredis_failure_hook: hiredis allocates with malloc, out of
// the injector's sight).
//
// Checks, besides the harness's (calls return or throw bad_alloc, accepted
// handlers complete exactly once, no leak, the context runs out of work once
// the objects are gone): every completion is one a fault can explain (a
// failure to build or send a request is the fail_closed policy's
// redis_unavailable, never a lost or doubled answer), and afterwards, with
// injection off, the same connection answers and a bucket on it grants
// (recovery: a failed connection is re-made, a fault hold ends).
//
// The bucket runs on steady_clock with short waits (a token per 5 ms) and a
// 20 ms fault hold, so that each run takes a few milliseconds. Every
// scenario runs in both modes of the bucket ("redis.reserve.*": reservation
// mode, where a denied head is a reservation due later, and a cancelled
// reservation sends a refund). The keyed limiter's scenarios make and drop
// a key's machinery under injection, and check that none is left behind;
// one runs on a connection whose window is one call (keys wait for it).
//
#include "alloc_harness.hpp"
#include "redis_server.hpp"

#include <ratelimit/redis/redis_keyed_limiter.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>
#if __has_include(<ratelimit/redis/detail/hooks.hpp>)
#include <ratelimit/redis/detail/hooks.hpp>
#define RATELIMIT_TEST_HAVE_HIREDIS_HOOK 1
#endif

#include <optional>
#include <string>

namespace asio = boost::asio;
using namespace ratelimit;
using namespace ratelimit::test;
using namespace ratelimit::test::alloc;
using boost::system::error_code;

namespace {

redis_server* server = nullptr;

// --- hiredis failures ------------------------------------------------------------

#ifdef RATELIMIT_TEST_HAVE_HIREDIS_HOOK
std::atomic<std::uint64_t> hiredis_calls{0};
std::atomic<std::uint64_t> hiredis_target{0};
std::atomic<bool> hiredis_fired{false};

bool hiredis_hook(redis_detail::hiredis_call) {
  const std::uint64_t n = ++hiredis_calls;
  std::uint64_t t = hiredis_target.load();
  if (t == 0 || n != t || !hiredis_target.compare_exchange_strong(t, 0)) return false;
  hiredis_fired = true;
  return true;
}

const injector hiredis_injector{"hiredis", [] { return hiredis_calls.load(); },
                                [](std::uint64_t k) {
                                  hiredis_fired = false;
                                  hiredis_target = k == 0 ? 0 : hiredis_calls.load() + k;
                                },
                                [] { hiredis_target = 0; }, [] { return hiredis_fired.load(); }};
#endif

// --- the scenarios -----------------------------------------------------------------

using bucket_t = redis_token_bucket;

/// A Redis scenario: a connection made before the run (connected, the key
/// deleted, the scripts flushed if asked), a script run under injection,
/// then recovery checked with injection off.
struct redis_case {
  const char* name;
  void (*script)(redis_case&, env&);
  bool flush_scripts = false;
  bool reserve = false;
  std::size_t window = redis_config{}.max_calls_in_flight;  // the connection's window

  std::optional<redis_connection> conn;
  std::optional<bucket_t> bucket;
  std::optional<redis_keyed_limiter> keyed;

  std::string key() const { return std::string("alloc:") + name + (reserve ? ":r" : ""); }

  redis_bucket_options options() const {
    redis_bucket_options o;
    o.on_fault = redis_fault_policy::fail_closed;
    o.fault_hold = std::chrono::milliseconds(20);
    if (reserve) o.mode = redis_bucket_mode::reserve;
    return o;
  }

  /// Makes the keyed limiter (keys at key() + ":" + k).
  bool make_keyed(env& e) {
    return e.call("keyed limiter constructor",
                  [&] { keyed.emplace(*conn, key() + ":", 2, per_second(200), options()); });
  }

  /// Makes the bucket (a library call like the others: may throw bad_alloc).
  bool make_bucket(env& e, std::uint64_t capacity = 2) {
    return e.call("bucket constructor",
                  [&] { bucket.emplace(*conn, key(), capacity, per_second(200), options()); });
  }

  /// One command, injection off; true when it succeeded within `limit`.
  bool command(env& e, std::vector<std::string> args,
               std::chrono::milliseconds limit = std::chrono::seconds(3)) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      std::optional<error_code> r;
      conn->async_exec(args, [&](error_code ec, redis_reply) { r = ec; });
      e.settle([&] { return r.has_value(); }, std::chrono::seconds(2));
      if (r && !*r) return true;
      e.pump(std::chrono::milliseconds(5));
    }
    return false;
  }

  void prepare(env& e) {
    if (!server->running()) {
      alloc_failure::suspend s;
      server->start();
    }
    redis_config config = server->config();
    config.reconnect_max = std::chrono::milliseconds(20);     // quick runs
    config.connect_timeout = std::chrono::milliseconds(100);  // (a lost resolve ends there)
    config.max_calls_in_flight = window;
    conn.emplace(e.executor(), config);
    AF_CHECK(command(e, {"DEL", key(), key() + ":a", key() + ":b"}));
    if (flush_scripts) AF_CHECK(command(e, {"SCRIPT", "FLUSH"}));
  }

  void run(env& e) { script(*this, e); }

  /// With injection off, the same connection answers and a bucket on it grants.
  void recover(env& e) {
    if (!server->running()) {
      alloc_failure::suspend s;
      server->start();
    }
    if (!command(e, {"PING"})) {
      report(__FILE__, __LINE__, "the connection did not recover (PING)");
      return;
    }
    if (!bucket && !make_bucket(e)) {
      report(__FILE__, __LINE__, "no bucket could be made after the run");
      return;
    }
    if (!bucket->is_open()) return;  // the scenario closed it: nothing more to ask
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    bool granted = false;
    while (!granted && std::chrono::steady_clock::now() < end) {
      std::optional<error_code> r;
      bucket->async_get_token(1, [&](error_code ec) { r = ec; });
      e.settle([&] { return r.has_value(); }, std::chrono::seconds(3));
      granted = r && !*r;
      if (!granted) e.pump(std::chrono::milliseconds(5));  // a fault hold, a reconnect
    }
    if (!granted) report(__FILE__, __LINE__, "the bucket did not recover (no grant)");
  }

  void finish(env&) {
    keyed.reset();
    bucket.reset();
    conn.reset();
  }

  /// Every completion is one that a fault explains.
  void verify() const {
    for (std::size_t i = 0; i < outcomes_used; ++i) {
      const outcome& o = outcomes[i];
      if (!o.calls.load() || !o.ec) continue;
      const bool expected = o.ec == error::redis_unavailable || o.ec == error::bucket_closed ||
                            o.ec == asio::error::operation_aborted ||
                            o.ec == error::exceeds_capacity;
      if (!expected) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "unexpected completion: %s", o.ec.message().c_str());
        report(__FILE__, __LINE__, buf);
      }
    }
  }
};

auto get(bucket_t& b, std::uint64_t n) {
  return
      [&b, n](auto&& token) { return b.async_get_token(n, std::forward<decltype(token)>(token)); };
}
auto try_get(bucket_t& b, std::uint64_t n) {
  return [&b, n](auto&& token) {
    return b.async_try_get_token(n, std::forward<decltype(token)>(token));
  };
}

/// All the run's accepted requests have completed (bounded wait).
bool all_done(env& e, std::chrono::milliseconds limit = std::chrono::seconds(3)) {
  return e.settle(
      [] {
        for (std::size_t i = 0; i < outcomes_used; ++i)
          if (outcomes[i].started == outcome::start::accepted && !outcomes[i].future &&
              !outcomes[i].done())
            return false;
        return true;
      },
      limit);
}

/// A request and its reply (the first round trip of the bucket), then another.
void request_and_reply(redis_case& c, env& e) {
  if (!c.make_bucket(e)) return;
  e.start(get(*c.bucket, 1));
  AF_CHECK(all_done(e));
  e.start(get(*c.bucket, 1));
  AF_CHECK(all_done(e));
}

/// A try: one round trip, completes with the reply.
void try_request(redis_case& c, env& e) {
  if (!c.make_bucket(e)) return;
  e.start<bool>(try_get(*c.bucket, 1));
  AF_CHECK(all_done(e));
}

/// The head is denied (capacity 1 taken) and waits on its timer for the
/// time the script gave, then asks again.
void denied_head_waits(redis_case& c, env& e) {
  if (!c.make_bucket(e, 1)) return;
  e.start(get(*c.bucket, 1));
  e.start(get(*c.bucket, 1));  // denied: waits ~5 ms on the timer
  AF_CHECK(all_done(e));
}

/// The server has no script (SCRIPT FLUSH in prepare): NOSCRIPT, resent with its text.
void noscript_resend(redis_case& c, env& e) {
  if (!c.make_bucket(e)) return;
  e.start(get(*c.bucket, 1));
  e.start<bool>(try_get(*c.bucket, 1));
  AF_CHECK(all_done(e));
}

/// The server is killed with a request in flight, then restarted: the
/// request fails (redis_unavailable), the connection is re-made, a new
/// request is answered.
void reconnect(redis_case& c, env& e) {
  if (!c.make_bucket(e)) return;
  e.start(get(*c.bucket, 1));
  {
    alloc_failure::suspend s;
    server->stop();
  }
  AF_CHECK(all_done(e));
  {
    alloc_failure::suspend s;
    server->start();
  }
  e.settle([&] { return c.conn->is_connected(); }, std::chrono::seconds(2));
  e.pump(std::chrono::milliseconds(25));  // past the fault hold
  e.start(get(*c.bucket, 1));
  AF_CHECK(all_done(e));
}

/// close() with a request and a try in flight and a waiter queued.
void close_in_flight(redis_case& c, env& e) {
  if (!c.make_bucket(e)) return;
  e.start(get(*c.bucket, 1));
  e.start(get(*c.bucket, 1));
  e.start<bool>(try_get(*c.bucket, 1));
  e.call("close", [&] { c.bucket->close(); });
  AF_CHECK(all_done(e));
}

/// Reservation mode: a waiter reserved ahead is cancelled before its due
/// time, which sends a refund (its reply arrives after the run's requests).
void cancel_refunds(redis_case& c, env& e) {
  if (!c.make_bucket(e, 1)) return;
  e.start(get(*c.bucket, 1));
  e.start(get(*c.bucket, 1));  // reserved 5 ms ahead
  e.settle(
      [&] {
        const auto s = c.bucket->stats();
        return s.reserved >= 2 || s.faults > 0;
      },
      std::chrono::seconds(1));
  e.call("cancel", [&] { c.bucket->cancel(); });
  AF_CHECK(all_done(e));
  e.pump(std::chrono::milliseconds(2));  // the refund's reply
}

/// Destruction with a request and a try in flight and a waiter queued;
/// the replies arrive into nothing.
void destroy_in_flight(redis_case& c, env& e) {
  if (!c.make_bucket(e)) return;
  e.start(get(*c.bucket, 1));
  e.start(get(*c.bucket, 1));
  e.start<bool>(try_get(*c.bucket, 1));
  c.bucket.reset();
  AF_CHECK(all_done(e));
  e.pump(std::chrono::milliseconds(2));  // the replies
}

auto get_key(redis_keyed_limiter& l, const char* key) {
  return [&l, key](auto&& token) {
    return l.async_get_token(key, 1, std::forward<decltype(token)>(token));
  };
}

/// The keyed limiter: requests for two keys (each key's machinery made on
/// its first request, and dropped once it is done), then again.
void keyed_requests(redis_case& c, env& e) {
  if (!c.make_keyed(e)) return;
  e.start(get_key(*c.keyed, "a"));
  e.start(get_key(*c.keyed, "b"));
  e.start(get_key(*c.keyed, "a"));
  AF_CHECK(all_done(e));
  // Nothing is kept for a key once its requests are done, whatever failed.
  AF_CHECK(e.settle([&] { return c.keyed->active_keys() == 0; }, std::chrono::seconds(1)));
  e.start(get_key(*c.keyed, "b"));
  AF_CHECK(all_done(e));
}

/// The connection's window of one call: keys b and c find it full and wait
/// (registering for a slot), each handed the slot the one before gives
/// back; then the limiter is destroyed with keys waiting for the window.
void keyed_window(redis_case& c, env& e) {
  if (!c.make_keyed(e)) return;
  e.start(get_key(*c.keyed, "a"));
  e.start(get_key(*c.keyed, "b"));
  e.start(get_key(*c.keyed, "c"));
  AF_CHECK(all_done(e));
  AF_CHECK(e.settle([&] { return c.keyed->active_keys() == 0; }, std::chrono::seconds(1)));
  AF_CHECK(e.settle([&] { return c.conn->stats().calls_in_flight == 0; }, std::chrono::seconds(1)));
  e.start(get_key(*c.keyed, "a"));
  e.start(get_key(*c.keyed, "b"));
  e.start(get_key(*c.keyed, "c"));
  c.keyed.reset();
  AF_CHECK(all_done(e));
  // Every slot of the window given back (the calls' replies, the handovers).
  AF_CHECK(e.settle([&] { return c.conn->stats().calls_in_flight == 0; }, std::chrono::seconds(2)));
}

/// The keyed limiter destroyed with requests queued and in flight on two keys.
void keyed_destroy_in_flight(redis_case& c, env& e) {
  if (!c.make_keyed(e)) return;
  e.start(get_key(*c.keyed, "a"));
  e.start(get_key(*c.keyed, "a"));
  e.start(get_key(*c.keyed, "a"));
  e.start(get_key(*c.keyed, "b"));
  c.keyed.reset();
  AF_CHECK(all_done(e));
  e.pump(std::chrono::milliseconds(2));  // the replies
}

auto set_rate(bucket_t& b, rate r) {
  return
      [&b, r](auto&& token) { return b.async_set_rate(r, std::forward<decltype(token)>(token)); };
}

/// Reconfiguration: a set_rate with a request queued (the object takes the
/// new configuration on at the reply), another object of the old
/// configuration told it with its first reply, then destroyed with a
/// set_capacity in flight (which completes with its reply).
void reconfigure(redis_case& c, env& e) {
  if (!c.make_bucket(e)) return;
  e.start(get(*c.bucket, 1));
  e.start<std::uint64_t>(set_rate(*c.bucket, per_second(400)));
  AF_CHECK(all_done(e));
  std::optional<bucket_t> other;
  if (!e.call("bucket constructor",
              [&] { other.emplace(*c.conn, c.key(), 2, per_second(200), c.options()); }))
    return;
  e.start(get(*other, 1));
  AF_CHECK(all_done(e));
  e.start<std::uint64_t>([&b = *other](auto&& token) {
    return b.async_set_capacity(3, std::forward<decltype(token)>(token));
  });
  other.reset();
  AF_CHECK(all_done(e));
}

/// The keyed limiter: a key's stored quota, set while the key is active.
void keyed_set_quota(redis_case& c, env& e) {
  if (!c.make_keyed(e)) return;
  e.start(get_key(*c.keyed, "a"));
  e.start<std::uint64_t>([&l = *c.keyed](auto&& token) {
    return l.async_set_quota("a", 4, per_second(400), std::forward<decltype(token)>(token));
  });
  e.start(get_key(*c.keyed, "a"));
  AF_CHECK(all_done(e));
  AF_CHECK(e.settle([&] { return c.keyed->active_keys() == 0; }, std::chrono::seconds(1)));
}

struct scenario {
  const char* name;
  void (*script)(redis_case&, env&);
  bool flush_scripts;
  unsigned kinds;
  std::size_t window = redis_config{}.max_calls_in_flight;
};

const scenario scenarios[] = {
    {"redis.request_and_reply", request_and_reply, false,
     bit(kind::callback) | bit(kind::std_allocator) | bit(kind::deferred) | bit(kind::future) |
         bit(kind::awaitable)},
    {"redis.try", try_request, false, bit(kind::callback) | bit(kind::std_allocator)},
    {"redis.denied_head_waits", denied_head_waits, false,
     bit(kind::callback) | bit(kind::std_allocator)},
    {"redis.noscript_resend", noscript_resend, true,
     bit(kind::callback) | bit(kind::std_allocator)},
    {"redis.reconnect", reconnect, false, bit(kind::callback)},
    {"redis.close_in_flight", close_in_flight, false,
     bit(kind::callback) | bit(kind::std_allocator) | bit(kind::counting_allocator)},
    {"redis.destroy_in_flight", destroy_in_flight, false,
     bit(kind::callback) | bit(kind::std_allocator) | bit(kind::counting_allocator)},
    {"redis.cancel_refunds", cancel_refunds, false, bit(kind::callback) | bit(kind::std_allocator)},
    {"redis.keyed_requests", keyed_requests, false,
     bit(kind::callback) | bit(kind::std_allocator) | bit(kind::deferred)},
    {"redis.keyed_destroy_in_flight", keyed_destroy_in_flight, false,
     bit(kind::callback) | bit(kind::counting_allocator)},
    {"redis.keyed_window", keyed_window, false, bit(kind::callback) | bit(kind::counting_allocator),
     1},
    {"redis.reconfigure", reconfigure, false,
     bit(kind::callback) | bit(kind::counting_allocator) | bit(kind::deferred) | bit(kind::future)},
    {"redis.keyed_set_quota", keyed_set_quota, false,
     bit(kind::callback) | bit(kind::std_allocator)},
};

}  // namespace

int main(int argc, char** argv) {
  const options opt = parse(argc, argv);
  drain_limit = std::chrono::seconds(5);
  std::optional<redis_server> srv;
  try {
    srv.emplace();
  } catch (const std::exception& e) {
    std::printf("cannot start redis-server: %s\n", e.what());
    return 1;
  }
  server = &*srv;
  // Only this thread's allocations: Asio's resolver thread is Asio's (an
  // allocation failing there ends the process inside Asio).
  alloc_failure::only_this_thread(true);
  // Asio completes a resolve by building its results (make_shared) before
  // calling the handler: when that throws, std::bad_alloc escapes run() and
  // our handler is destroyed unrun. That escape is Asio's; what we check is
  // that the connection recovers from it (its connect timeout fails the
  // attempt, and it reconnects).
  escape_excused = [] { return alloc_failure::failure_stack_contains("basic_resolver_results"); };
#ifdef RATELIMIT_TEST_HAVE_HIREDIS_HOOK
  redis_detail::hiredis_failure_hook = &hiredis_hook;
#endif
  const kind every_kind[] = {kind::callback, kind::std_allocator, kind::counting_allocator,
                             kind::strand,   kind::deferred,      kind::future,
                             kind::awaitable};
  int runs = 0;
  for (bool reserve : {false, true}) {
    for (const scenario& s : scenarios) {
      // (cancel_refunds is about refunds: reservation mode only)
      if (!reserve && s.script == cancel_refunds) continue;
      const std::string name =
          reserve ? "redis.reserve." + std::string(s.name).substr(6) : std::string(s.name);
      redis_case c{s.name, s.script, s.flush_scripts, reserve, s.window, {}, {}, {}};
      for (kind k : every_kind) {
        if (!(s.kinds & bit(k))) continue;
        exhaust(name.c_str(), c, k, place::io_context, opt);
        ++runs;
      }
#ifdef RATELIMIT_TEST_HAVE_HIREDIS_HOOK
      exhaust(name.c_str(), c, kind::callback, place::io_context, opt, hiredis_injector);
      ++runs;
#endif
    }
  }
  return summary(runs);
}
