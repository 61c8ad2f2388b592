// Redis under faults: the Redis bucket and its connection when Redis is
// slow, stuck, gone, half-broken or refusing, and when their owners go away.
//
// - options: every invalid value of redis_config and redis_bucket_options is
//   refused, naming the option; edge values are accepted; and the harm the
//   refused values did (lease_ttl = 0 drained the shared key, fault_hold = 0
//   busy-looped on a dead server) is shown behaviourally.
// - not_now: error replies meaning "not available now" (LOADING, BUSY,
//   READONLY, ...) go through the fault policy, injected through fault_proxy
//   and produced by real server states (a replica, maxclients, OOM,
//   NOREPLICAS, a script stuck in a loop, DEBUG SLEEP, CLIENT PAUSE);
//   permanent errors still fail with redis_error; classify_redis_error().
// - backoff: a server that accepts then drops, or refuses the password, is
//   retried on the backoff schedule, not in a loop; a healthy reply resets it.
// - under_faults: delay, black hole, reset mid-reply, byte-by-byte replies,
//   accept-and-close between the client and a real redis-server: every
//   policy keeps its promise, every wait is bounded, nothing is granted
//   beyond capacity + rate * elapsed (+ lease slack).
// - lifetime: destroy / close / cancel the bucket and the connection while
//   waiters wait, a thread blocks, a deferred operation is not launched yet,
//   or a request is in flight: every handler completes exactly once and
//   run() returns; a moved-from bucket is a closed one.
//
// Timeouts are short (about 100 ms) so that the whole file runs in a few
// seconds: it runs in the plain, ASan+UBSan and TSan trees. Every test runs
// in both modes of the bucket: CTest runs this program twice, the second
// time (test_redis_faults_reserve) with RATELIMIT_TEST_REDIS_MODE=reserve;
// the tests (or cases) of one mode only say so.
#include "fake_redis.hpp"
#include "fault_proxy.hpp"
#include "redis_server.hpp"
#include "resp_client.hpp"
#include "test_support.hpp"

#include <ratelimit/redis/options.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <atomic>
#include <future>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono_literals;
namespace asio = boost::asio;
using steady = std::chrono::steady_clock;
using boost::system::error_code;

namespace {

/// The mode under test (see the header comment).
bool reserve_mode() {
  const char* m = std::getenv("RATELIMIT_TEST_REDIS_MODE");
  return m && std::string_view(m) == "reserve";
}

/// Every bucket's options here, in the mode under test.
ratelimit::redis_bucket_options mode_options(ratelimit::redis_bucket_options o = {}) {
  if (reserve_mode()) o.mode = ratelimit::redis_bucket_mode::reserve;
  return o;
}

/// A test of head-only mode (leasing): skipped, and reported as such, in the
/// reservation mode run.
struct head_only_test {
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    boost::test_tools::assertion_result r(!reserve_mode());
    r.message() << "a test of head-only mode";
    return r;
  }
};

/// A test of reservation mode: skipped, and reported as such, in the
/// head-only run.
struct reserve_only_test {
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    boost::test_tools::assertion_result r(reserve_mode());
    r.message() << "a test of reservation mode";
    return r;
  }
};

}  // namespace

namespace {

const error_code unavailable = error::make_error_code(error::redis_unavailable);
const error_code refused = error::make_error_code(error::redis_error);
const error_code closed = error::make_error_code(error::bucket_closed);
const error_code aborted = make_error_code(asio::error::operation_aborted);

constexpr redis_fault_policy all_policies[] = {redis_fault_policy::fail_closed,
                                               redis_fault_policy::fail_open,
                                               redis_fault_policy::local_fallback};

const char* name(redis_fault_policy p) {
  switch (p) {
    case redis_fault_policy::fail_closed:
      return "fail_closed";
    case redis_fault_policy::fail_open:
      return "fail_open";
    case redis_fault_policy::local_fallback:
      return "local_fallback";
  }
  return "?";
}

double seconds(steady::duration d) {
  return std::chrono::duration<double>(d).count();
}

/// Room, on top of a documented time, for a loaded machine and the
/// sanitizers: a bound is the documented time plus this, never less. The
/// faults that a bound must tell apart from a hang last longer than that.
constexpr auto slack = 400ms;

/// A documented time plus the slack, in seconds.
double bound(std::chrono::milliseconds documented) {
  return std::chrono::duration<double>(documented + slack).count();
}

/// Short timeouts, so that a fault costs about 100 ms, not seconds.
redis_config fast_config(std::uint16_t port) {
  redis_config c;
  c.host = "127.0.0.1";
  c.port = port;
  c.connect_timeout = 200ms;
  c.request_timeout = 100ms;
  c.reconnect_min = 10ms;
  c.reconnect_max = 100ms;
  return c;
}

/// Runs `ctx` for `d` of real time.
void idle(asio::io_context& ctx, std::chrono::milliseconds d) {
  run_until(
      ctx, [] { return false; }, d);
}

/// What happened to one try.
struct try_outcome {
  int calls = 0;
  bool destroyed_uncalled = false;
  error_code ec;
  bool granted = false;
  bool done() const { return calls > 0; }
};

/// checked_handler's twin for async_try_get_token.
class checked_try_handler {
 public:
  explicit checked_try_handler(std::shared_ptr<try_outcome> o) : o_(std::move(o)) {}
  checked_try_handler(checked_try_handler&& other) noexcept
      : o_(std::move(other.o_)), invoked_(other.invoked_) {}
  checked_try_handler& operator=(checked_try_handler&&) = delete;
  ~checked_try_handler() {
    if (o_ && !invoked_) o_->destroyed_uncalled = true;
  }
  void operator()(error_code ec, bool granted) {
    invoked_ = true;
    ++o_->calls;
    o_->ec = ec;
    o_->granted = granted;
  }

 private:
  std::shared_ptr<try_outcome> o_;
  bool invoked_ = false;
};

template <typename Bucket>
std::shared_ptr<try_outcome> try_request(Bucket& bucket, std::uint64_t n = 1) {
  auto o = std::make_shared<try_outcome>();
  bucket.async_try_get_token(n, checked_try_handler(o));
  return o;
}

/// What happened to one async_exec.
struct exec_outcome {
  int calls = 0;
  bool destroyed_uncalled = false;
  error_code ec;
  redis_reply reply;
};

class checked_exec_handler {
 public:
  explicit checked_exec_handler(std::shared_ptr<exec_outcome> o) : o_(std::move(o)) {}
  checked_exec_handler(checked_exec_handler&& other) noexcept
      : o_(std::move(other.o_)), invoked_(other.invoked_) {}
  checked_exec_handler& operator=(checked_exec_handler&&) = delete;
  ~checked_exec_handler() {
    if (o_ && !invoked_) o_->destroyed_uncalled = true;
  }
  void operator()(error_code ec, redis_reply reply) {
    invoked_ = true;
    ++o_->calls;
    o_->ec = ec;
    o_->reply = std::move(reply);
  }

 private:
  std::shared_ptr<exec_outcome> o_;
  bool invoked_ = false;
};

std::shared_ptr<exec_outcome> exec_request(redis_connection& conn, std::vector<std::string> args) {
  auto o = std::make_shared<exec_outcome>();
  conn.async_exec(std::move(args), checked_exec_handler(o));
  return o;
}

/// Runs `ctx` on a thread until it runs out of work; true when run() returned
/// within `limit` (otherwise the context is stopped: some work was lost).
bool run_returns(asio::io_context& ctx, std::chrono::milliseconds limit = 5000ms) {
  ctx.restart();
  std::promise<void> returned;
  auto f = returned.get_future();
  std::thread t([&] {
    ctx.run();
    returned.set_value();
  });
  const bool ok = f.wait_for(limit) == std::future_status::ready;
  if (!ok) ctx.stop();
  t.join();
  return ok;
}

/// A thread that runs `ctx` until it runs out of work; returned() says when.
class runner {
 public:
  explicit runner(asio::io_context& ctx) : ctx_(ctx), done_(p_.get_future()) {
    t_ = std::thread([this] {
      ctx_.run();
      p_.set_value();
    });
  }
  ~runner() {
    if (!returned(0ms)) ctx_.stop();
    t_.join();
  }
  /// True when run() returned within `limit`.
  bool returned(std::chrono::milliseconds limit = 5000ms) {
    return done_.wait_for(limit) == std::future_status::ready;
  }

 private:
  asio::io_context& ctx_;
  std::promise<void> p_;
  std::future<void> done_;
  std::thread t_;
};

/// Checks that `f` throws std::invalid_argument whose message names `option`.
template <typename F>
void expect_refused(F&& f, const std::string& option) {
  try {
    f();
    BOOST_ERROR("not refused: " << option);
  } catch (const std::invalid_argument& e) {
    BOOST_TEST(std::string(e.what()).find(option) != std::string::npos,
               "the message names " << option << ": " << e.what());
  }
}

}  // namespace

// ---------------------------------------------------------------------------

BOOST_AUTO_TEST_SUITE(options)

BOOST_AUTO_TEST_CASE(redis_config_refuses_every_invalid_value) {
  asio::io_context ctx;
  struct bad {
    const char* option;
    void (*change)(redis_config&);
  };
  const bad cases[] = {
      {"host", [](redis_config& c) { c.host = ""; }},
      {"port", [](redis_config& c) { c.port = 0; }},
      {"username", [](redis_config& c) { c.username = "alice"; }},  // without a password
      {"database", [](redis_config& c) { c.database = -1; }},
      {"connect_timeout", [](redis_config& c) { c.connect_timeout = 0ms; }},
      {"connect_timeout", [](redis_config& c) { c.connect_timeout = -1ms; }},
      {"request_timeout", [](redis_config& c) { c.request_timeout = 0ms; }},
      {"request_timeout", [](redis_config& c) { c.request_timeout = -100ms; }},
      {"reconnect_min", [](redis_config& c) { c.reconnect_min = 0ms; }},
      {"reconnect_min", [](redis_config& c) { c.reconnect_min = -1ms; }},
      {"reconnect_max", [](redis_config& c) { c.reconnect_max = 19ms; }},  // below min (20)
      {"reconnect_max", [](redis_config& c) { c.reconnect_max = 0ms; }},
      {"max_reply_bytes", [](redis_config& c) { c.max_reply_bytes = 0; }},
      {"max_calls_in_flight", [](redis_config& c) { c.max_calls_in_flight = 0; }},
  };
  for (const auto& b : cases) {
    redis_config c;
    b.change(c);
    expect_refused([&] { redis_connection conn(ctx, c); }, b.option);
  }
}

BOOST_AUTO_TEST_CASE(redis_config_accepts_edge_values) {
  asio::io_context ctx;
  const std::vector<void (*)(redis_config&)> edges = {
      [](redis_config& c) { c.port = 1; },
      [](redis_config& c) { c.port = 65535; },
      [](redis_config& c) { c.password = "p"; },
      [](redis_config& c) {
        c.username = "u";
        c.password = "p";
      },
      [](redis_config& c) { c.database = 0; },
      [](redis_config& c) { c.database = 15; },
      [](redis_config& c) { c.connect_timeout = 1ms; },
      [](redis_config& c) { c.request_timeout = 1ms; },
      [](redis_config& c) {
        c.reconnect_min = 1ms;
        c.reconnect_max = 1ms;  // min == max: a fixed interval
      },
      [](redis_config& c) { c.max_reply_bytes = 1; },
      [](redis_config& c) { c.max_calls_in_flight = 1; },
      [](redis_config& c) { c.max_calls_in_flight = std::numeric_limits<std::size_t>::max(); },
  };
  for (auto change : edges) {
    redis_config c;
    c.port = free_port();  // nobody there: the connection just tries
    change(c);
    BOOST_CHECK_NO_THROW(redis_connection(ctx, c));
  }
}

BOOST_AUTO_TEST_CASE(redis_bucket_options_refuse_every_invalid_value) {
  asio::io_context ctx;
  redis_config cfg;
  cfg.port = free_port();
  redis_connection conn(ctx, cfg);
  struct bad {
    const char* option;
    void (*change)(redis_bucket_options&);
  };
  const bad cases[] = {
      {"on_fault",
       [](redis_bucket_options& o) { o.on_fault = static_cast<redis_fault_policy>(3); }},
      {"on_fault",
       [](redis_bucket_options& o) { o.on_fault = static_cast<redis_fault_policy>(-1); }},
      {"fault_hold", [](redis_bucket_options& o) { o.fault_hold = 0ms; }},
      {"fault_hold", [](redis_bucket_options& o) { o.fault_hold = -5ms; }},
      {"lease", [](redis_bucket_options& o) { o.lease = 11; }},  // capacity is 10
      {"lease_ttl",
       [](redis_bucket_options& o) {
         o.lease = 1;
         o.lease_ttl = 0ms;
       }},
      {"lease_ttl",
       [](redis_bucket_options& o) {
         o.lease = 10;
         o.lease_ttl = -1ms;
       }},
  };
  for (const auto& b : cases) {
    redis_bucket_options o;
    b.change(o);
    expect_refused([&] { redis_token_bucket bucket(conn, "k", 10, per_second(1), o); }, b.option);
  }
}

BOOST_AUTO_TEST_CASE(redis_bucket_options_accept_edge_values) {
  asio::io_context ctx;
  redis_config cfg;
  cfg.port = free_port();
  redis_connection conn(ctx, cfg);
  const std::vector<void (*)(redis_bucket_options&)> edges = {
      [](redis_bucket_options& o) { o.on_fault = redis_fault_policy::fail_open; },
      [](redis_bucket_options& o) { o.on_fault = redis_fault_policy::local_fallback; },
      [](redis_bucket_options& o) { o.fault_hold = 1ms; },
      [](redis_bucket_options& o) { o.lease = 10; },  // the whole capacity
      [](redis_bucket_options& o) {
        o.lease = 1;
        o.lease_ttl = 1ms;
      },
      // Documented: lease_ttl is only read when leasing.
      [](redis_bucket_options& o) {
        o.lease = 0;
        o.lease_ttl = 0ms;
      },
  };
  for (auto change : edges) {
    redis_bucket_options o;
    change(o);
    BOOST_CHECK_NO_THROW(redis_token_bucket(conn, "k", 10, per_second(1), o));
  }
}

// lease_ttl = 0 used to make the head's own leased tokens expire before it
// took them: it asked again and again, each time taking 1 + lease tokens
// from the shared key, starving every other client. Now refused; were it
// accepted, the harm is measured here.
BOOST_AUTO_TEST_CASE(lease_ttl_zero_no_longer_drains_the_shared_key,
                     *boost::unit_test::precondition(head_only_test())) {
  redis_server server;
  asio::io_context ctx;
  redis_connection conn(ctx, fast_config(server.port())),
      other_conn(ctx, fast_config(server.port()));
  redis_bucket_options o;
  o.lease = 4;
  o.lease_ttl = 0ms;
  std::unique_ptr<redis_token_bucket> greedy;
  try {
    greedy = std::make_unique<redis_token_bucket>(conn, "drain", 5, per_second(50), o);
  } catch (const std::invalid_argument& e) {
    BOOST_TEST(std::string(e.what()).find("lease_ttl") != std::string::npos, e.what());
    return;
  }
  BOOST_ERROR("lease_ttl = 0 was accepted");
  // One waiter in the greedy bucket, another client trying all along.
  redis_token_bucket polite(other_conn, "drain", 5, per_second(50));
  auto w = request(*greedy);
  int other_granted = 0, other_tries = 0;
  const auto end = steady::now() + 400ms;
  while (steady::now() < end) {
    auto t = try_request(polite);
    run_until(
        ctx, [&] { return t->done(); }, 1000ms);
    ++other_tries;
    if (t->granted) ++other_granted;
    idle(ctx, 10ms);
  }
  const auto s = greedy->stats();
  BOOST_TEST_MESSAGE("lease_ttl 0: " << s.round_trips << " round trips, " << s.redis_tokens
                                     << " tokens taken, " << s.lease_dropped << " dropped; other "
                                     << other_granted << "/" << other_tries);
  BOOST_TEST(w->ok());               // the waiter was served
  BOOST_TEST(s.round_trips <= 10u);  // not a loop
  BOOST_TEST(other_granted >= 5);    // the other client got its share
}

// fault_hold = 0 used to make a dead server cost nothing to ask: the head
// asked again at once, forever (a busy loop), and its waiters never
// completed. Now 0 is refused; the smallest hold that is accepted, and the
// default, bound the round trips.
BOOST_AUTO_TEST_CASE(fault_hold_zero_no_longer_busy_loops_on_a_dead_server) {
  for (auto hold : {0ms, 1ms, 100ms}) {
    for (auto policy : {redis_fault_policy::fail_closed, redis_fault_policy::local_fallback}) {
      BOOST_TEST_CONTEXT("fault_hold " << hold.count() << " ms, " << name(policy)) {
        asio::io_context ctx;
        redis_config cfg = fast_config(free_port());  // nobody listens: refused at once
        redis_connection conn(ctx, cfg);
        redis_bucket_options o;
        o.on_fault = policy;
        o.fault_hold = hold;
        std::unique_ptr<redis_token_bucket> bucket;
        try {
          bucket = std::make_unique<redis_token_bucket>(conn, "dead", 2, per_second(20),
                                                        mode_options(o));
        } catch (const std::invalid_argument& e) {
          BOOST_TEST(hold == 0ms);
          BOOST_TEST(std::string(e.what()).find("fault_hold") != std::string::npos, e.what());
          continue;
        }
        BOOST_TEST(hold != 0ms, "fault_hold = 0 was accepted");
        // Four waiters, for 200 ms of a dead server.
        std::vector<std::shared_ptr<outcome>> waiters;
        for (int i = 0; i < 4; ++i)
          waiters.push_back(request(*bucket));
        const auto t0 = steady::now();
        idle(ctx, 200ms);
        const double window = seconds(steady::now() - t0);
        const auto s = bucket->stats();
        int done = 0;
        for (auto& w : waiters)
          done += w->done();
        BOOST_TEST_MESSAGE(name(policy) << ", hold " << hold.count() << " ms: " << s.round_trips
                                        << " round trips, " << s.faults << " faults, " << done
                                        << "/4 waiters done in " << window << " s");
        // At most one round trip per hold (plus one), whatever the hold; in
        // reservation mode one per call in flight (the 4 waiters go at once).
        const double calls = reserve_mode() ? 4 : 1;
        BOOST_TEST(s.round_trips <= calls * (window * 1000 / std::max<long>(hold.count(), 1) + 2));
        // Fail-closed fails them all; the local bucket (2 tokens, 20/s) serves them all.
        BOOST_TEST(done == 4);
        for (auto& w : waiters)
          BOOST_TEST((policy == redis_fault_policy::fail_closed ? w->ec == unavailable : w->ok()));
      }
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------

namespace {

namespace rd = ratelimit::redis_detail;

/// What one bucket did while Redis was in some state.
struct policy_run {
  std::vector<std::shared_ptr<outcome>> waiters;
  std::shared_ptr<try_outcome> tried;
  redis_bucket_stats stats;
  steady::duration took{};  // until every request had completed
  bool completed = false;
};

/// A bucket of 3 tokens at 1 per second with `policy` (held 1 s, so that
/// one fault decides everything here) asks for its 3 tokens with 3 waiters,
/// then makes one try. Runs `ctx` until all complete, at most `limit`.
policy_run ask_three_then_try(asio::io_context& ctx, redis_connection& conn, const std::string& key,
                              redis_fault_policy policy, std::chrono::milliseconds limit = 2000ms) {
  redis_bucket_options o;
  o.on_fault = policy;
  o.fault_hold = 1000ms;
  redis_token_bucket bucket(conn, key, 3, per_second(1), mode_options(o));
  policy_run r;
  const auto t0 = steady::now();
  for (int i = 0; i < 3; ++i)
    r.waiters.push_back(request(bucket));
  r.completed = run_until(
      ctx,
      [&] {
        return std::all_of(r.waiters.begin(), r.waiters.end(),
                           [](const auto& w) { return w->done(); });
      },
      limit);
  if (r.completed) {
    r.tried = try_request(bucket);
    r.completed = run_until(
        ctx, [&] { return r.tried->done(); }, limit);
  }
  r.took = steady::now() - t0;
  r.stats = bucket.stats();
  return r;
}

/// Checks that `r` is what `policy` promises while Redis is unavailable.
void expect_policy_applied(const policy_run& r, redis_fault_policy policy) {
  BOOST_REQUIRE_MESSAGE(r.completed, "the requests did not complete");
  for (const auto& w : r.waiters)
    BOOST_TEST(w->calls == 1);
  BOOST_TEST(r.tried->calls == 1);
  BOOST_TEST(r.stats.faults >= 1u);
  switch (policy) {
    case redis_fault_policy::fail_closed:
      for (const auto& w : r.waiters)
        BOOST_TEST(w->ec == unavailable, "waiter: " << w->ec.message());
      BOOST_TEST(r.tried->ec == unavailable, "try: " << r.tried->ec.message());
      BOOST_TEST(!r.tried->granted);
      BOOST_TEST(r.stats.granted == 0u);
      break;
    case redis_fault_policy::fail_open:
      for (const auto& w : r.waiters)
        BOOST_TEST(w->ok(), "waiter: " << w->ec.message());
      BOOST_TEST(!r.tried->ec, "try: " << r.tried->ec.message());
      BOOST_TEST(r.tried->granted);
      BOOST_TEST(r.stats.fail_open_grants == 4u);
      BOOST_TEST(r.stats.granted == 4u);
      break;
    case redis_fault_policy::local_fallback: {
      // The local bucket (3 tokens, 1 per second) serves the 3 waiters; the
      // try gets a token only if one second went by.
      for (const auto& w : r.waiters)
        BOOST_TEST(w->ok(), "waiter: " << w->ec.message());
      BOOST_TEST(!r.tried->ec, "try: " << r.tried->ec.message());
      BOOST_TEST(r.stats.fallback_grants == 3u + r.tried->granted);
      BOOST_TEST(r.stats.fallback_grants <= 3 + seconds(r.took));
      BOOST_TEST(r.stats.granted == r.stats.fallback_grants);
      break;
    }
  }
}

/// The same, for a fault announced by an error reply ("not now").
void expect_policy_applied_on_reply(const policy_run& r, redis_fault_policy policy) {
  expect_policy_applied(r, policy);
  BOOST_TEST(r.stats.unavailable_replies >= 1u);
}

/// Redis works again (within `limit`): a fresh bucket's try is granted.
bool recovers(asio::io_context& ctx, redis_connection& conn, const std::string& key,
              std::chrono::milliseconds limit = 3000ms) {
  const auto end = steady::now() + limit;
  while (steady::now() < end) {
    redis_token_bucket bucket(conn, key, 1000, per_second(1), mode_options());
    auto t = try_request(bucket);
    const bool answered = run_until(
        ctx, [&] { return t->done(); }, 2000ms);
    if (answered && !t->ec && t->granted) return true;
    idle(ctx, 20ms);
  }
  return false;
}

/// The reply of the bucket's script on `key`, sent with its text (EVAL: no
/// script cache needed).
redis_reply script_reply(asio::io_context& ctx, redis_connection& conn, const std::string& key) {
  auto args = rd::script_args(rd::script_sha1(), key, rd::make_script_rate(3, per_second(1)), 1, 0);
  args[0] = "EVAL";
  args[1] = std::string(rd::bucket_script);
  return exec(ctx, conn, std::move(args)).reply;
}

/// A real server and a connection to it through a fault proxy.
struct proxied {
  explicit proxied(std::vector<std::string> server_args = {},
                   std::chrono::milliseconds request_timeout = 100ms)
      : server(std::move(server_args)), proxy(server.port()), conn(ctx, [&] {
          auto c = fast_config(proxy.port());
          c.request_timeout = request_timeout;
          return c;
        }()) {}
  redis_server server;
  fault_proxy proxy;
  asio::io_context ctx;
  redis_connection conn;
};

// Replies that mean "not now", as each Redis version words them.
const char* const not_now_replies[] = {
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "READONLY You can't write against a read only replica.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "ERR max number of clients reached",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOREPLICAS Not enough good replicas to write.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to "
    "disk. Commands that may modify the data set are disabled.",
    // Redis 7: a command called by the script failed; the code comes first.
    "READONLY You can't write against a read only replica. script: "
    "1b936e3fe509bcbc9cd0664897bbe8fd0cac101b, on @user_script:52.",
    // Redis 6 wraps it in a script error.
    "ERR Error running script (call to f_1b936e3fe509bcbc9cd0664897bbe8fd0cac101b): "
    "@user_script:52: -READONLY You can't write against a read only replica.",
    "ERR Error running script (call to f_1b936e3fe509bcbc9cd0664897bbe8fd0cac101b): "
    "@user_script:52: -OOM command not allowed when used memory > 'maxmemory'.",
};

// Replies that mean "no": the request fails, whatever the policy.
const char* const permanent_replies[] = {
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR Error running script (call to f_1b936e3fe509bcbc9cd0664897bbe8fd0cac101b): "
    "@user_script:12: user_script:12: Script attempted to access nonexistent global variable 'x'",
    "ERR Error running script (call to f_1b936e3fe509bcbc9cd0664897bbe8fd0cac101b): "
    "@user_script:52: -WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR unknown command 'EVALSHA'",
    "NOAUTH Authentication required.",
    "NOPERM this user has no permissions to run the 'evalsha' command",
    "MOVED 3999 127.0.0.1:6381",
    "BUSYKEY Target key name already exists.",
    "ratelimit: key k holds a hash that is not a bucket",
    "NOSCRIPT No matching script. Please use EVAL.",  // twice in a row: not a loop
};

}  // namespace

BOOST_AUTO_TEST_SUITE(not_now)

BOOST_AUTO_TEST_CASE(classify_redis_error_reads_the_code) {
  for (const char* m : not_now_replies)
    BOOST_TEST((classify_redis_error(m) == redis_error_class::unavailable), m);
  BOOST_TEST((classify_redis_error("NOSCRIPT No matching script. Please use EVAL.") ==
              redis_error_class::script_missing));
  const char* const refused_ones[] = {
      "WRONGTYPE Operation against a key holding the wrong kind of value",
      "ERR unknown command",
      "ERR Error running script (call to f_x): @user_script:1: -ERR bad",
      "ERR Error running script (call to f_x): @user_script:1: user_script:1: attempt to compare",
      "ERR Error running script (call to f_x): @user_script:1: -WRONGTYPE Operation",
      "ERR max",  // not "max number of clients"
      "NOAUTH Authentication required.",
      "NOPERM this user has no permissions",
      "MOVED 3999 127.0.0.1:6381",
      "ASK 3999 127.0.0.1:6381",
      "BUSYKEY Target key name already exists.",  // BUSY is a word, not a prefix
      "LOADINGX",
      "READONLYX whatever",
      "readonly You can't write",  // codes are upper case
      " READONLY You can't write",
      "EXECABORT Transaction discarded because of previous errors.",
      "ratelimit: key k holds a hash that is not a bucket",
      "",
  };
  for (const char* m : refused_ones)
    BOOST_TEST((classify_redis_error(m) == redis_error_class::refused), "\"" << m << "\"");
  // The bare codes, as a server may send them without a message.
  for (const char* m : {"LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                        "OOM", "NOREPLICAS", "MISCONF"})
    BOOST_TEST((classify_redis_error(m) == redis_error_class::unavailable), m);
}

// Each reply is injected in place of the server's, for each policy: the
// policy applies after one round trip, where the old code failed every
// waiter with redis_error.
BOOST_AUTO_TEST_CASE(every_not_now_reply_goes_through_the_policy) {
  proxied p({}, 1000ms);
  BOOST_REQUIRE(!exec(p.ctx, p.conn, {"PING"}).ec);
  int i = 0;
  for (const char* reply : not_now_replies) {
    for (auto policy : all_policies) {
      BOOST_TEST_CONTEXT("reply \"" << reply << "\", " << name(policy)) {
        p.proxy.replace_every_reply(resp::error(reply));
        const auto r = ask_three_then_try(p.ctx, p.conn, "nn:" + std::to_string(i++), policy);
        p.proxy.stop_replacing();
        expect_policy_applied_on_reply(r, policy);
        // Then the hold: nobody asks again. (Reservation mode: the 3 waiters
        // went at once, in 3 calls, each answered so.)
        BOOST_TEST(r.stats.round_trips == (reserve_mode() ? 3u : 1u));
      }
    }
  }
  BOOST_TEST(recovers(p.ctx, p.conn, "nn:after"));
}

BOOST_AUTO_TEST_CASE(permanent_errors_still_fail_with_redis_error) {
  proxied p({}, 1000ms);
  BOOST_REQUIRE(!exec(p.ctx, p.conn, {"PING"}).ec);
  int i = 0;
  for (const char* reply : permanent_replies) {
    for (auto policy : all_policies) {
      BOOST_TEST_CONTEXT("reply \"" << reply << "\", " << name(policy)) {
        p.proxy.replace_every_reply(resp::error(reply));
        const auto r = ask_three_then_try(p.ctx, p.conn, "perm:" + std::to_string(i++), policy);
        p.proxy.stop_replacing();
        BOOST_REQUIRE(r.completed);
        for (const auto& w : r.waiters)
          BOOST_TEST((w->calls == 1 && w->ec == refused), w->ec.message());
        BOOST_TEST((r.tried->calls == 1 && r.tried->ec == refused && !r.tried->granted));
        BOOST_TEST(r.stats.granted == 0u);
        BOOST_TEST(r.stats.faults == 0u);
        BOOST_TEST(r.stats.unavailable_replies == 0u);
      }
    }
  }
}

// A replica refuses the script's writes: Redis 7 answers
// "READONLY You can't write against a read only replica. script: ..."
BOOST_AUTO_TEST_CASE(a_replica_refuses_writes) {
  // Diskless both ways: the sync starts at once and leaves no file behind.
  redis_server master({"--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"});
  redis_server replica({"--replicaof", "127.0.0.1", std::to_string(master.port()),
                        "--repl-diskless-load", "on-empty-db"});
  asio::io_context ctx;
  auto cfg = fast_config(replica.port());
  cfg.request_timeout = 1000ms;
  redis_connection conn(ctx, cfg);
  // Once in sync (a replica loading the master's data answers LOADING meanwhile).
  BOOST_REQUIRE(run_until(
      ctx,
      [&] {
        const auto info = exec(ctx, conn, {"INFO", "replication"}).reply.str;
        if (info.find("master_link_status:up") != std::string::npos) return true;
        idle(ctx, 10ms);
        return false;
      },
      5000ms));
  const auto probe = script_reply(ctx, conn, "probe");
  BOOST_TEST_MESSAGE("the script on a replica: " << probe.str);
  BOOST_TEST(probe.str.starts_with("READONLY"));
  BOOST_TEST((classify_redis_error(probe.str) == redis_error_class::unavailable));
  int i = 0;
  for (auto policy : all_policies)
    BOOST_TEST_CONTEXT(name(policy)) {
      expect_policy_applied_on_reply(
          ask_three_then_try(ctx, conn, "replica:" + std::to_string(i++), policy), policy);
    }
}

// maxclients reached: the server accepts, says "ERR max number of clients
// reached" and closes.
BOOST_AUTO_TEST_CASE(maxclients_reached) {
  redis_server server({"--maxclients", "1"});
  auto hog = std::make_unique<resp_client>(server.port());
  hog->send(resp::command({"PING"}));
  BOOST_REQUIRE(hog->read_reply().reply == "+PONG");
  asio::io_context ctx;
  auto cfg = fast_config(server.port());
  cfg.request_timeout = 1000ms;
  redis_connection conn(ctx, cfg);
  int i = 0;
  for (auto policy : all_policies)
    BOOST_TEST_CONTEXT(name(policy)) {
      expect_policy_applied(ask_three_then_try(ctx, conn, "full:" + std::to_string(i++), policy),
                            policy);
    }
  BOOST_TEST(conn.stats().failed_connects >= 1u);
  hog.reset();  // a client slot frees up
  BOOST_TEST(recovers(ctx, conn, "full:after"));
}

// Out of memory (maxmemory with noeviction) and too few replicas: the
// script's write is refused with OOM / NOREPLICAS.
BOOST_AUTO_TEST_CASE(out_of_memory_and_too_few_replicas) {
  redis_server server;
  resp_client admin(server.port());
  asio::io_context ctx;
  auto cfg = fast_config(server.port());
  cfg.request_timeout = 1000ms;
  redis_connection conn(ctx, cfg);
  struct state {
    const char* code;
    std::vector<std::string> on, off;
  };
  const state states[] = {
      {"OOM", {"CONFIG", "SET", "maxmemory", "1"}, {"CONFIG", "SET", "maxmemory", "0"}},
      {"NOREPLICAS",
       {"CONFIG", "SET", "min-replicas-to-write", "1"},
       {"CONFIG", "SET", "min-replicas-to-write", "0"}},
  };
  int i = 0;
  for (const auto& s : states) {
    BOOST_TEST_CONTEXT(s.code) {
      admin.send(resp::command(s.on));
      BOOST_REQUIRE(admin.read_reply().reply == "+OK");
      const auto probe = script_reply(ctx, conn, "probe");
      BOOST_TEST_MESSAGE("the script under " << s.code << ": " << probe.str);
      BOOST_TEST(probe.str.starts_with(s.code));
      for (auto policy : all_policies)
        BOOST_TEST_CONTEXT(name(policy)) {
          expect_policy_applied_on_reply(
              ask_three_then_try(ctx, conn, "mem:" + std::to_string(i++), policy), policy);
        }
      admin.send(resp::command(s.off));
      BOOST_REQUIRE(admin.read_reply().reply == "+OK");
      BOOST_TEST(recovers(ctx, conn, std::string("mem:after:") + s.code));
    }
  }
}

// A script stuck in a loop past the busy threshold: everyone else gets BUSY
// until SCRIPT KILL.
BOOST_AUTO_TEST_CASE(a_busy_script) {
  redis_server server({"--lua-time-limit", "50"});
  asio::io_context ctx;
  auto cfg = fast_config(server.port());
  cfg.request_timeout = 1000ms;
  redis_connection conn(ctx, cfg);
  BOOST_REQUIRE(!exec(ctx, conn, {"PING"}).ec);
  resp_client looper(server.port()), admin(server.port());
  looper.send(resp::command({"EVAL", "while true do end", "0"}));
  // Past the threshold (however late the server gets to the loop), BUSY from now on.
  redis_reply probe;
  BOOST_REQUIRE(run_until(
      ctx,
      [&] {
        probe = script_reply(ctx, conn, "probe");
        return probe.str.starts_with("BUSY");
      },
      5000ms));
  BOOST_TEST_MESSAGE("the script while another is busy: " << probe.str);
  int i = 0;
  for (auto policy : all_policies)
    BOOST_TEST_CONTEXT(name(policy)) {
      expect_policy_applied_on_reply(
          ask_three_then_try(ctx, conn, "busy:" + std::to_string(i++), policy), policy);
    }
  admin.send(resp::command({"SCRIPT", "KILL"}));
  BOOST_TEST(admin.read_reply().reply == "+OK");
  BOOST_TEST(recovers(ctx, conn, "busy:after"));
}

// DEBUG SLEEP: the server answers nothing for a while. Requests time out
// after request_timeout (100 ms) and the policy applies.
BOOST_AUTO_TEST_CASE(a_sleeping_server_times_out) {
  redis_server server({"--enable-debug-command", "yes"});
  asio::io_context ctx;
  redis_connection conn(ctx, fast_config(server.port()));
  BOOST_REQUIRE(!exec(ctx, conn, {"PING"}).ec);
  resp_client admin(server.port());
  admin.send(resp::command({"DEBUG", "SLEEP", "1.0"}));  // longer than any bound below
  // It sleeps now: another client gets no answer.
  resp_client probe(server.port());
  probe.send(resp::command({"PING"}));
  BOOST_REQUIRE(probe.read_reply(50ms).ec == boost::asio::error::timed_out);
  int i = 0;
  for (auto policy : all_policies)
    BOOST_TEST_CONTEXT(name(policy)) {
      const auto r = ask_three_then_try(ctx, conn, "sleep:" + std::to_string(i++), policy);
      expect_policy_applied(r, policy);
      // One request_timeout at most (the first), then the hold or the
      // connection's backoff answer at once.
      BOOST_TEST(seconds(r.took) < bound(100ms), seconds(r.took) << " s");
    }
  BOOST_TEST(conn.stats().timeouts >= 1u);
  BOOST_TEST(recovers(ctx, conn, "sleep:after"));
}

// CLIENT PAUSE (WRITE, then ALL): the script is held by the server; requests
// time out and the policy applies; after the pause everything works.
BOOST_AUTO_TEST_CASE(a_paused_server_times_out) {
  redis_server server;
  asio::io_context ctx;
  redis_connection conn(ctx, fast_config(server.port()));
  BOOST_REQUIRE(!exec(ctx, conn, {"PING"}).ec);
  resp_client admin(server.port());
  int i = 0;
  for (const char* mode : {"WRITE", "ALL"}) {
    BOOST_TEST_CONTEXT("CLIENT PAUSE " << mode) {
      const auto before = conn.stats().timeouts;
      admin.send(resp::command({"CLIENT", "PAUSE", "700", mode}));  // past the bound
      BOOST_REQUIRE(admin.read_reply().reply == "+OK");
      for (auto policy : all_policies)
        BOOST_TEST_CONTEXT(name(policy)) {
          const auto r = ask_three_then_try(ctx, conn, "pause:" + std::to_string(i++), policy);
          expect_policy_applied(r, policy);
          BOOST_TEST(seconds(r.took) < bound(100ms), seconds(r.took) << " s");
        }
      BOOST_TEST(conn.stats().timeouts > before);
      BOOST_TEST(recovers(ctx, conn, std::string("pause:after:") + mode));
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------

namespace {

/// Connection attempts a backoff from `min` doubling to `max` allows in
/// `window` (the first attempt at once), with room for late timers.
std::uint64_t attempts_allowed(std::chrono::milliseconds window, std::chrono::milliseconds min,
                               std::chrono::milliseconds max) {
  std::uint64_t n = 1;
  auto t = 0ms, d = min;
  while (t + d <= window) {
    t += d;
    ++n;
    d = std::min(d * 2, max);
  }
  return n * 3 / 2 + 3;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(backoff)

// A server that accepts and at once closes (maxclients, a proxy whose
// backend is dead) used to be reconnected at once, in a loop: the backoff
// was reset by the TCP connect. Now only a healthy reply resets it.
BOOST_AUTO_TEST_CASE(accept_then_close_is_retried_on_the_backoff_schedule) {
  redis_server server;
  fault_proxy proxy(server.port());
  const std::string full = "-ERR max number of clients reached\r\n";
  proxy.set_accept_and_close(true, full);
  asio::io_context ctx;
  auto cfg = fast_config(proxy.port());
  cfg.reconnect_min = 10ms;
  cfg.reconnect_max = 160ms;
  redis_connection conn(ctx, cfg);
  const auto window = 700ms;
  const auto allowed = attempts_allowed(window, cfg.reconnect_min, cfg.reconnect_max);

  // Idle: nobody asks anything, the connection keeps trying on its schedule.
  idle(ctx, window);
  const auto idle_attempts = proxy.accepted();

  // Requests made all along: they fail at once while an attempt has failed,
  // and do not make more attempts.
  const auto before = proxy.accepted();
  int requests = 0;
  const auto end = steady::now() + window;
  while (steady::now() < end) {
    auto o = exec_request(conn, {"PING"});
    BOOST_REQUIRE(run_until(
        ctx, [&] { return o->calls > 0; }, 1000ms));
    BOOST_TEST(o->ec != error_code(), "no server behind the proxy answers");
    ++requests;
    idle(ctx, 1ms);
  }
  const auto busy_attempts = proxy.accepted() - before;
  BOOST_TEST_MESSAGE("accept-and-close: " << idle_attempts << " attempts idle, " << busy_attempts
                                          << " with " << requests << " requests, in "
                                          << window.count() << " ms each; allowed " << allowed);
  BOOST_TEST(idle_attempts >= 3u);  // it does keep trying
  BOOST_TEST(idle_attempts <= allowed);
  BOOST_TEST(busy_attempts >= 3u);
  BOOST_TEST(busy_attempts <= allowed);
  BOOST_TEST(conn.stats().failed_connects >= idle_attempts + busy_attempts - 1);

  // The fault ends: within one reconnect_max the connection is back.
  proxy.set_accept_and_close(false);
  const auto t0 = steady::now();
  BOOST_REQUIRE(run_until(
      ctx,
      [&] {
        auto o = exec_request(conn, {"PING"});
        run_until(
            ctx, [&] { return o->calls > 0; }, 1000ms);
        if (!o->ec) return true;
        idle(ctx, 2ms);
        return false;
      },
      2000ms));
  BOOST_TEST(seconds(steady::now() - t0) < bound(cfg.reconnect_max));

  // That healthy reply reset the backoff: after the next drop the connection
  // is re-made at once and, the server dropping it again, retried after
  // 10, 20, 40, 80 ms (not after reconnect_max).
  proxy.set_accept_and_close(true, full);
  const auto dropped = proxy.accepted();
  proxy.reset_all();
  idle(ctx, 300ms);
  const auto retries = proxy.accepted() - dropped;
  BOOST_TEST_MESSAGE("after a healthy reply: " << retries << " attempts in 300 ms");
  // 0, 10, 30, 70, 150 (and 310) ms; without the reset, 0 and 160 ms.
  BOOST_TEST(retries >= 4u);
  BOOST_TEST(retries <= 9u);
}

// A wrong password: every attempt connects, AUTH is refused, the connection
// closes. The intervals between attempts must grow to reconnect_max.
BOOST_AUTO_TEST_CASE(a_wrong_password_is_retried_on_the_backoff_schedule) {
  redis_server server({"--requirepass", "right"});
  asio::io_context ctx;
  auto cfg = fast_config(server.port());
  cfg.password = "wrong";
  cfg.reconnect_min = 10ms;
  cfg.reconnect_max = 160ms;
  redis_connection conn(ctx, cfg);

  /// When each failed attempt was seen, for `window`.
  const auto failures = [&](std::chrono::milliseconds window) {
    std::vector<steady::time_point> at;
    std::uint64_t seen = conn.stats().failed_connects;
    const auto end = steady::now() + window;
    while (steady::now() < end) {
      ctx.restart();
      ctx.run_one_for(1ms);
      for (const auto n = conn.stats().failed_connects; seen < n; ++seen)
        at.push_back(steady::now());
    }
    return at;
  };
  const auto window = 1200ms;
  const auto at = failures(window);
  std::vector<double> gaps_ms;
  for (std::size_t i = 1; i < at.size(); ++i)
    gaps_ms.push_back(seconds(at[i] - at[i - 1]) * 1000);
  std::ostringstream gaps;
  for (double g : gaps_ms)
    gaps << " " << static_cast<int>(g);
  BOOST_TEST_MESSAGE("wrong password: " << at.size()
                                        << " failed attempts, gaps (ms):" << gaps.str());
  BOOST_TEST(conn.last_error().find("WRONGPASS") != std::string::npos, conn.last_error());
  BOOST_TEST(at.size() >= 4u);
  BOOST_TEST(at.size() <= attempts_allowed(window, cfg.reconnect_min, cfg.reconnect_max));
  BOOST_REQUIRE(gaps_ms.size() >= 3u);
  BOOST_TEST(gaps_ms.front() < 60);  // starts at reconnect_min...
  BOOST_TEST(gaps_ms.back() > 120);  // ... and grows to reconnect_max
  // Timers are late, never early: from the fifth on, every gap is near reconnect_max.
  for (std::size_t i = 4; i < gaps_ms.size(); ++i)
    BOOST_TEST(gaps_ms[i] > 0.5 * 160, "gap " << i);

  // The fault ends (the server now takes that password): the connection
  // recovers within one reconnect_max.
  resp_client admin(server.port());
  admin.send(resp::command({"AUTH", "right"}));
  BOOST_REQUIRE(admin.read_reply().reply == "+OK");
  admin.send(resp::command({"CONFIG", "SET", "requirepass", "wrong"}));
  BOOST_REQUIRE(admin.read_reply().reply == "+OK");
  BOOST_REQUIRE(run_until(
      ctx, [&] { return conn.is_connected(); }, 1000ms));
  BOOST_TEST(!exec(ctx, conn, {"PING"}).ec);

  // A healthy reply reset the backoff: the password changes again and the
  // server drops us; the connection is re-made at once, then retried after
  // 10, 20, 40, 80 ms.
  admin.send(resp::command({"CONFIG", "SET", "requirepass", "right"}));
  BOOST_REQUIRE(admin.read_reply().reply == "+OK");
  admin.send(resp::command({"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"}));
  BOOST_REQUIRE(admin.read_reply().reply == ":1");
  const auto again = failures(300ms);
  BOOST_TEST_MESSAGE("after a healthy reply: " << again.size() << " failed attempts in 300 ms");
  // 0, 10, 30, 70, 150 (and 310) ms; without the reset, 0 and 160 ms.
  BOOST_TEST(again.size() >= 4u);
  BOOST_TEST(again.size() <= 9u);
}

// AUTH accepted, then SELECT refused (no such database): a failed attempt
// too; the accepted AUTH must not reset the backoff on every attempt.
BOOST_AUTO_TEST_CASE(an_unknown_database_is_retried_on_the_backoff_schedule) {
  redis_server server({"--requirepass", "right"});
  asio::io_context ctx;
  auto cfg = fast_config(server.port());
  cfg.password = "right";
  cfg.database = 1000;
  cfg.reconnect_min = 10ms;
  cfg.reconnect_max = 160ms;
  redis_connection conn(ctx, cfg);
  const auto window = 800ms;
  idle(ctx, window);
  const auto s = conn.stats();
  BOOST_TEST_MESSAGE("unknown database: " << s.failed_connects << " failed attempts in "
                                          << window.count() << " ms");
  BOOST_TEST(conn.last_error().find("DB index") != std::string::npos, conn.last_error());
  BOOST_TEST(s.failed_connects >= 3u);
  BOOST_TEST(s.failed_connects <= attempts_allowed(window, cfg.reconnect_min, cfg.reconnect_max));
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------

namespace {

struct cycle_result {
  double elapsed = 0;  // s, from before the bucket was made until after the last grant
  redis_bucket_stats stats;
  int errors = 0;
  steady::duration longest{};  // the longest single async_get_token
};

/// Six coroutines take tokens from one bucket (5 tokens, 50 per second)
/// while the proxy goes through every fault in turn, with a clean interval
/// after each.
cycle_result run_through_faults(redis_fault_policy policy, std::uint64_t lease,
                                std::size_t max_batch) {
  proxied p;
  redis_bucket_options o;
  o.on_fault = policy;
  o.fault_hold = 50ms;
  o.lease = lease;
  o.lease_ttl = 200ms;
  if (max_batch > 0) o.max_batch = max_batch;
  cycle_result out;
  const auto t0 = steady::now();
  redis_token_bucket bucket(p.conn, "cycle", 5, per_second(50), mode_options(o));
  int running = 0;
  bool stop = false;
  auto worker = [&]() -> asio::awaitable<void> {
    ++running;
    asio::steady_timer pause(p.ctx);
    while (!stop) {
      const auto started = steady::now();
      auto [ec] = co_await bucket.async_get_token(asio::as_tuple(asio::use_awaitable));
      out.longest = std::max(out.longest, steady::now() - started);
      if (ec == closed) break;
      if (ec) {
        ++out.errors;
        pause.expires_after(5ms);
        co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
      }
    }
    --running;
  };
  for (int i = 0; i < 6; ++i)
    asio::co_spawn(p.ctx, worker(), asio::detached);
  using d = direction;
  const std::vector<std::function<void()>> faults = {
      [&] { p.proxy.set_delay(d::to_client, 30ms); },  // slower, within the timeout
      [&] { p.proxy.set_split(d::to_client, true); },
      [&] { p.proxy.reset_after(d::to_client, 7); },  // in the middle of a reply
      [&] { p.proxy.drop(d::to_server, true); },      // a black hole: timeouts
      [&] { p.proxy.set_delay(d::to_client, 150ms); },
      [&] {
        p.proxy.set_accept_and_close(true);
        p.proxy.reset_all();
      },
  };
  idle(p.ctx, 50ms);
  for (const auto& fault : faults) {
    fault();
    idle(p.ctx, 80ms);
    p.proxy.clear_faults();
    idle(p.ctx, 30ms);
  }
  stop = true;
  bucket.close();
  BOOST_REQUIRE(run_until(
      p.ctx, [&] { return running == 0; }, 2000ms));
  out.elapsed = seconds(steady::now() - t0);
  out.stats = bucket.stats();
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(under_faults)

// Replies 30 ms late, requests 10 ms late, with a 300 ms timeout (room for
// a loaded machine): everything works, and the limit holds exactly.
BOOST_AUTO_TEST_CASE(a_delay_shorter_than_the_timeout_just_works) {
  proxied p({}, 300ms);
  p.proxy.set_delay(direction::to_client, 30ms);
  p.proxy.set_delay(direction::to_server, 10ms);
  redis_token_bucket bucket(p.conn, "slow", 4, per_second(20), mode_options());  // 50 ms a token
  const auto t0 = steady::now();
  std::vector<std::shared_ptr<outcome>> all;
  for (int i = 0; i < 6; ++i)
    all.push_back(request(bucket));
  BOOST_REQUIRE(run_until(
      p.ctx, [&] { return all.back()->done(); }, 3000ms));
  for (const auto& o : all)
    BOOST_TEST(o->ok(), o->ec.message());
  BOOST_TEST(seconds(steady::now() - t0) >= 0.095);  // two tokens more at 50 ms each
  const auto s = bucket.stats();
  BOOST_TEST(s.faults == 0u);
  BOOST_TEST(s.granted == 6u);
  BOOST_TEST(s.redis_tokens == 6u);
  BOOST_TEST(p.conn.stats().timeouts == 0u, p.conn.last_error());
}

// Replies later than request_timeout: each request ends at the timeout, and
// the policy applies.
BOOST_AUTO_TEST_CASE(a_delay_longer_than_the_timeout_applies_the_policy) {
  proxied p;
  BOOST_REQUIRE(recovers(p.ctx, p.conn, "warm"));
  p.proxy.set_delay(direction::to_client, 700ms);  // past the bound
  int i = 0;
  for (auto policy : all_policies)
    BOOST_TEST_CONTEXT(name(policy)) {
      const auto r = ask_three_then_try(p.ctx, p.conn, "late:" + std::to_string(i++), policy);
      expect_policy_applied(r, policy);
      BOOST_TEST(seconds(r.took) < bound(100ms), seconds(r.took) << " s");
    }
  BOOST_TEST(p.conn.stats().timeouts >= 1u);
  p.proxy.set_delay(direction::to_client, 0us);
  BOOST_TEST(recovers(p.ctx, p.conn, "late:after"));
}

// A black hole (bytes swallowed, the connection left open), either way:
// every request ends within the timeout, the connection is re-made.
BOOST_AUTO_TEST_CASE(a_black_hole_ends_every_request_within_the_timeout) {
  proxied p;
  BOOST_REQUIRE(recovers(p.ctx, p.conn, "warm"));
  int i = 0;
  for (auto way : {direction::to_server, direction::to_client}) {
    BOOST_TEST_CONTEXT((way == direction::to_server ? "requests" : "replies") << " dropped") {
      const auto accepted = p.proxy.accepted();
      p.proxy.drop(way, true);
      const auto t0 = steady::now();
      const auto ping = exec(p.ctx, p.conn, {"PING"});
      BOOST_TEST(ping.ec == unavailable);
      BOOST_TEST(seconds(steady::now() - t0) < bound(100ms));
      for (auto policy : all_policies)
        BOOST_TEST_CONTEXT(name(policy)) {
          const auto r = ask_three_then_try(p.ctx, p.conn, "hole:" + std::to_string(i++), policy);
          expect_policy_applied(r, policy);
          BOOST_TEST(seconds(r.took) < bound(100ms), seconds(r.took) << " s");
        }
      BOOST_TEST(p.proxy.accepted() > accepted);  // given up on, and re-made
      p.proxy.drop(way, false);
      BOOST_TEST(recovers(p.ctx, p.conn, "hole:after:" + std::to_string(i)));
    }
  }
}

// The connection is reset in the middle of a script reply: the request is
// unavailable (the policy applies), the token Redis took for it is wasted,
// never granted twice, and Redis decides exactly again after the hold.
BOOST_AUTO_TEST_CASE(a_reset_in_the_middle_of_a_reply) {
  proxied p({}, 1000ms);
  redis_connection direct(p.ctx, fast_config(p.server.port()));
  BOOST_REQUIRE(recovers(p.ctx, p.conn, "warm"));
  const auto sr = rd::make_script_rate(5, per_minute(1));
  for (auto policy : all_policies)
    BOOST_TEST_CONTEXT(name(policy)) {
      const std::string key = std::string("cut:") + name(policy);
      redis_bucket_options o;
      o.on_fault = policy;
      o.fault_hold = 50ms;
      redis_token_bucket bucket(p.conn, key, 5, per_minute(1), mode_options(o));
      p.proxy.reset_after(direction::to_client, 5);  // "*3\r\n:" and no more
      auto w = request(bucket);
      BOOST_REQUIRE(run_until(
          p.ctx, [&] { return w->done(); }, 1000ms));
      BOOST_TEST(w->calls == 1);
      BOOST_TEST((policy == redis_fault_policy::fail_closed ? w->ec == unavailable : w->ok()),
                 w->ec.message());
      const auto s = bucket.stats();
      BOOST_TEST(s.faults == 1u);
      BOOST_TEST(s.redis_tokens == 0u);
      BOOST_TEST(s.granted == (policy == redis_fault_policy::fail_closed ? 0u : 1u));
      // Redis ran the script: the token is gone from the key.
      const auto l = exec(p.ctx, direct, {"HGET", key, "l"});
      BOOST_REQUIRE((l.reply.type == redis_reply::kind::string));
      BOOST_TEST(std::stoull(l.reply.str) / sr.tick == 4u);
      // After the hold, exactly the 4 tokens left.
      idle(p.ctx, 60ms);
      int granted = 0;
      for (int k = 0; k < 6; ++k) {
        auto t = try_request(bucket);
        BOOST_REQUIRE(run_until(
            p.ctx, [&] { return t->done(); }, 2000ms));
        BOOST_TEST(!t->ec, t->ec.message());
        granted += t->granted;
      }
      BOOST_TEST(granted == 4);
    }
}

// Every byte of every request and reply in its own write: everything works,
// with exact results (a fresh server: NOSCRIPT, then EVAL with the script).
BOOST_AUTO_TEST_CASE(replies_split_byte_by_byte) {
  proxied p({}, 2000ms);
  p.proxy.set_split(direction::to_client, true);
  p.proxy.set_split(direction::to_server, true);
  const std::string value(3000, 'v');
  BOOST_TEST(!exec(p.ctx, p.conn, {"SET", "v", value}).ec);
  BOOST_TEST(exec(p.ctx, p.conn, {"GET", "v"}).reply.str == value);
  // Exactly the capacity (no refill to speak of at one a minute); the first
  // try meets NOSCRIPT and sends the script's text.
  redis_token_bucket bucket(p.conn, "split", 5, per_minute(1), mode_options());
  int granted = 0;
  for (int i = 0; i < 7; ++i) {
    auto t = try_request(bucket);
    BOOST_REQUIRE(run_until(
        p.ctx, [&] { return t->done(); }, 3000ms));
    BOOST_TEST(!t->ec, t->ec.message());
    granted += t->granted;
  }
  BOOST_TEST(granted == 5);
  const auto s = bucket.stats();
  BOOST_TEST(s.faults == 0u);
  BOOST_TEST(s.granted == 5u);
  BOOST_TEST(s.redis_tokens == 5u);
  // A waiter denied first (a wait in the reply), then granted 50 ms later;
  // in reservation mode, reserved 50 ms ahead (a due time in the reply).
  redis_token_bucket fast(p.conn, "split:wait", 1, per_second(20), mode_options());
  const auto t0 = steady::now();
  auto first = request(fast), second = request(fast);
  BOOST_REQUIRE(run_until(
      p.ctx, [&] { return second->done(); }, 3000ms));
  BOOST_TEST(first->ok());
  BOOST_TEST(second->ok());
  BOOST_TEST((steady::now() - t0 >= 45ms));
  if (reserve_mode())
    BOOST_TEST(fast.stats().reserved == 2u);  // one call each, no asking again
  else
    BOOST_TEST(fast.stats().round_trips >= 3u);  // granted, denied, granted
}

// Accepted and closed at once (a proxy whose backend is gone): every policy.
BOOST_AUTO_TEST_CASE(accept_and_close_applies_the_policy) {
  proxied p;
  p.proxy.set_accept_and_close(true);  // before the connection's first attempt
  int i = 0;
  for (auto policy : all_policies)
    BOOST_TEST_CONTEXT(name(policy)) {
      const auto r = ask_three_then_try(p.ctx, p.conn, "closing:" + std::to_string(i++), policy);
      expect_policy_applied(r, policy);
      BOOST_TEST(seconds(r.took) < bound(100ms), seconds(r.took) << " s");
    }
  p.proxy.set_accept_and_close(false);
  BOOST_TEST(recovers(p.ctx, p.conn, "closing:after"));
}

// Through every fault in turn, with six coroutines: nothing beyond the limit
// is granted by Redis, whatever the policy grants besides (and counts);
// every single wait is bounded.
BOOST_AUTO_TEST_CASE(no_grant_beyond_the_limit_through_every_fault) {
  struct run {
    redis_fault_policy policy;
    std::uint64_t lease;
    std::size_t max_batch;  // 0: the default (coalesced)
  };
  using enum redis_fault_policy;
  // Every policy with and without a lease (head-only mode), coalesced and
  // one request per call (reservation mode).
  for (const run& c : {run{fail_closed, 0, 0}, run{fail_closed, 2, 0}, run{fail_open, 0, 0},
                       run{fail_open, 2, 0}, run{local_fallback, 0, 0}, run{local_fallback, 2, 0},
                       run{fail_closed, 0, 1}, run{fail_open, 0, 1}, run{local_fallback, 0, 1}}) {
    if (c.lease > 0 && reserve_mode()) continue;       // leasing is head-only mode's
    if (c.max_batch > 0 && !reserve_mode()) continue;  // batches are reservation mode's
    BOOST_TEST_CONTEXT(name(c.policy) << ", lease " << c.lease << ", max_batch " << c.max_batch) {
      const auto r = run_through_faults(c.policy, c.lease, c.max_batch);
      const auto& s = r.stats;
      // capacity + rate * elapsed (+ lease: one bucket object)
      const double bound = 5 + 50 * r.elapsed + static_cast<double>(c.lease);
      const std::uint64_t by_policy = s.fail_open_grants + s.fallback_grants;
      BOOST_TEST_MESSAGE(name(c.policy)
                         << ", lease " << c.lease << ", max_batch " << c.max_batch << ": "
                         << s.granted << " granted (" << by_policy << " by the policy) in "
                         << r.elapsed << " s, bound " << bound << "; " << s.faults << " faults, "
                         << r.errors << " errors, longest wait " << seconds(r.longest) << " s");
      BOOST_TEST(s.faults >= 1u);
      BOOST_TEST(s.granted - by_policy <= bound);
      BOOST_TEST(s.granted - by_policy >= 10u);  // Redis did grant, between the faults
      BOOST_TEST(seconds(r.longest) < 1.0);
      switch (c.policy) {
        case redis_fault_policy::fail_closed:
          BOOST_TEST(by_policy == 0u);
          BOOST_TEST(r.errors > 0);
          break;
        case redis_fault_policy::fail_open:
          BOOST_TEST(s.fallback_grants == 0u);
          BOOST_TEST(r.errors == 0);
          break;
        case redis_fault_policy::local_fallback:
          BOOST_TEST(s.fail_open_grants == 0u);
          BOOST_TEST(s.fallback_grants <= 5 + 50 * r.elapsed);  // the local bucket's own limit
          BOOST_TEST(r.errors == 0);
          break;
      }
    }
  }
}

namespace {

/// Takes one token at a time from `bucket` until `stop` (or the bucket is
/// closed), pausing `pause_after_error` after an error; `running` counts it
/// while it runs. (A function, not a lambda: its frame holds its arguments.)
asio::awaitable<void> take_until_stopped(asio::io_context& ctx, redis_token_bucket& bucket,
                                         const bool& stop, int& running,
                                         std::chrono::milliseconds pause_after_error) {
  ++running;
  asio::steady_timer pause(ctx);
  while (!stop) {
    auto [ec] = co_await bucket.async_get_token(asio::as_tuple(asio::use_awaitable));
    if (ec == closed) break;
    if (ec) {
      pause.expires_after(pause_after_error);
      co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
    }
  }
  --running;
}

/// `n` coroutines of take_until_stopped().
void spawn_takers(asio::io_context& ctx, redis_token_bucket& bucket, int n, const bool& stop,
                  int& running, std::chrono::milliseconds pause_after_error) {
  for (int i = 0; i < n; ++i)
    asio::co_spawn(ctx, take_until_stopped(ctx, bucket, stop, running, pause_after_error),
                   asio::detached);
}

struct fault_window_result {
  double d = 0;                   // s: how long the fault lasted (between the two snapshots)
  std::uint64_t before = 0;       // granted in it on reservations Redis made before it
  std::uint64_t by_fallback = 0;  // granted in it by the local fallback
  int running_after_close = 0;
};

/// 40 coroutines keep a bucket of 5 tokens at 100 per second saturated (a
/// line as long as `horizon` lets it be), then the proxy becomes a black
/// hole for 400 ms: the grants made in that time are counted, split into
/// those of reservations Redis made before (granted at their due time,
/// without asking again) and those of the local fallback.
fault_window_result grants_in_a_fault(std::chrono::milliseconds horizon) {
  proxied p;
  redis_bucket_options o;
  o.mode = redis_bucket_mode::reserve;
  o.on_fault = redis_fault_policy::local_fallback;
  o.fault_hold = 50ms;
  o.horizon = horizon;
  redis_token_bucket bucket(p.conn, "horizon:" + std::to_string(horizon.count()), 5,
                            per_second(100), o);
  int running = 0;
  bool stop = false;
  // (an error is exceeds_horizon: the line is as long as the horizon lets it be)
  spawn_takers(p.ctx, bucket, 40, stop, running, 10ms);
  idle(p.ctx, 300ms);
  const auto from_redis = [](const redis_bucket_stats& s) { return s.granted - s.fallback_grants; };
  const redis_bucket_stats s0 = bucket.stats();
  const auto t0 = steady::now();
  p.proxy.drop(direction::to_server, true);
  idle(p.ctx, 400ms);
  const redis_bucket_stats s1 = bucket.stats();
  fault_window_result r;
  r.d = seconds(steady::now() - t0);
  r.before = from_redis(s1) - from_redis(s0);
  r.by_fallback = s1.fallback_grants - s0.fallback_grants;
  p.proxy.clear_faults();
  stop = true;
  bucket.close();
  run_until(
      p.ctx, [&] { return running == 0; }, 2000ms);
  r.running_after_close = running;
  BOOST_TEST_MESSAGE("horizon " << (horizon == std::chrono::milliseconds::max()
                                        ? std::string("the default")
                                        : std::to_string(horizon.count()) + " ms")
                                << ": in a fault of " << r.d << " s, " << r.before
                                << " granted on reservations made before it, " << r.by_fallback
                                << " by the local fallback");
  return r;
}

}  // namespace

// Cancelling reservations while Redis cannot be reached (a black hole) or
// answers late: the cancelled requests complete at once (operation_aborted),
// their refund is best effort (lost in the black hole: the tokens wasted;
// late: applied when it arrives), nothing hangs, and afterwards nothing has
// been granted beyond capacity + rate × elapsed.
BOOST_AUTO_TEST_CASE(cancelling_reservations_in_a_fault_wastes_tokens_never_over_grants,
                     *boost::unit_test::precondition(reserve_only_test())) {
  for (const bool black_hole : {true, false}) {
    BOOST_TEST_CONTEXT((black_hole ? "black hole" : "replies 60 ms late")) {
      proxied p;
      redis_bucket_options o;
      o.mode = redis_bucket_mode::reserve;
      o.on_fault = redis_fault_policy::fail_closed;
      o.fault_hold = 50ms;
      redis_token_bucket bucket(p.conn, black_hole ? "cancel-fault:hole" : "cancel-fault:late", 5,
                                per_second(50), o);
      const auto t0 = steady::now();
      std::vector<std::shared_ptr<outcome>> first;
      for (int i = 0; i < 20; ++i) {
        first.push_back(std::make_shared<outcome>());
        bucket.async_get_token(checked_handler(first.back()));
      }
      // 5 granted at once, 15 reserved up to 300 ms ahead.
      BOOST_REQUIRE(run_until(
          p.ctx, [&] { return bucket.stats().reserved == 20u; }, 2000ms));
      if (black_hole)
        p.proxy.drop(direction::to_server, true);
      else
        p.proxy.set_delay(direction::to_client, 60ms);
      const std::size_t cancelled = bucket.cancel();
      BOOST_REQUIRE(run_until(
          p.ctx,
          [&] {
            return std::all_of(first.begin(), first.end(), [](auto& x) { return x->done(); });
          },
          1000ms));
      int aborted_n = 0, granted_n = 0;
      for (const auto& x : first) {
        BOOST_TEST(x->calls == 1);
        BOOST_TEST(!x->destroyed_uncalled);
        aborted_n += x->ec == aborted;
        granted_n += x->ok();
      }
      BOOST_TEST(aborted_n == int(cancelled));
      BOOST_TEST(aborted_n + granted_n == 20);
      BOOST_TEST(aborted_n >= 10);  // (the last of them due 300 ms ahead)
      idle(p.ctx, 300ms);           // the refund: lost (a timeout) or late
      p.proxy.clear_faults();
      const auto s = bucket.stats();
      BOOST_TEST(s.refund_calls >= 1u);
      if (black_hole)
        BOOST_TEST(s.refunded == 0u);  // wasted, never sent again
      else
        BOOST_TEST(s.refunded > 0u);
      // Then 10 coroutines take what they can for 400 ms.
      int running = 0;
      bool stop = false;
      spawn_takers(p.ctx, bucket, 10, stop, running,
                   5ms);  // (an error: a fault hold's last moments)
      idle(p.ctx, 400ms);
      stop = true;
      bucket.close();
      BOOST_TEST(run_until(
          p.ctx, [&] { return running == 0; }, 2000ms));
      const double elapsed = seconds(steady::now() - t0);
      const auto granted = bucket.stats().granted;
      BOOST_TEST_MESSAGE((black_hole ? "black hole" : "late")
                         << ": " << cancelled << " cancelled, " << s.refunded << " refunded, "
                         << granted << " granted in " << elapsed << " s");
      BOOST_TEST(granted > std::uint64_t(granted_n));  // the key serves again
      BOOST_TEST(granted <= 5 + 50 * elapsed + 1);
    }
  }
}

// The local fallback's bound in reservation mode (README, "fault policies"):
// in a fault of d seconds a process grants at most capacity + rate × d by
// its fallback bucket, plus the reservations Redis made before the fault
// that come due in it: at most capacity + rate × min(d, horizon). With a
// horizon of 50 ms that second term is 5 + 100 × 0.05 = 10 tokens, however
// long the fault; with the default horizon (a line of 40 requests, 400 ms
// ahead) it grows with d, and the same fault lets through about 40.
BOOST_AUTO_TEST_CASE(reservations_made_before_a_fault_add_at_most_the_horizons_worth,
                     *boost::unit_test::precondition(reserve_only_test())) {
  // Due times are met late by a timer's latency, never early: room for 30 ms of it.
  const double late = 100 * 0.030;
  const auto short_h = grants_in_a_fault(50ms);
  BOOST_TEST(short_h.before >= 1u);  // granted at their due time, not lost
  BOOST_TEST(short_h.before <= 5 + 100 * 0.050 + late);
  BOOST_TEST(short_h.by_fallback >= 1u);
  BOOST_TEST(short_h.by_fallback <= 5 + 100 * short_h.d + late);
  BOOST_TEST(short_h.running_after_close == 0);
  const auto long_h = grants_in_a_fault(std::chrono::milliseconds::max());
  BOOST_TEST(long_h.before <= 5 + 100 * long_h.d + late);  // min(d, horizon) = d
  BOOST_TEST(long_h.before > 5 + 100 * 0.050 + late);      // what the short horizon cut
  BOOST_TEST(long_h.by_fallback <= 5 + 100 * long_h.d + late);
  BOOST_TEST(long_h.running_after_close == 0);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------

namespace {

enum class action { destroy, close, cancel };

const char* name(action a) {
  switch (a) {
    case action::destroy:
      return "destroy";
    case action::close:
      return "close";
    case action::cancel:
      return "cancel";
  }
  return "?";
}

/// What a queued request gets when its bucket is destroyed, closed or cancelled.
error_code expected_for(action a) {
  return a == action::close ? closed : aborted;
}

void act_on(std::unique_ptr<redis_token_bucket>& bucket, action a) {
  switch (a) {
    case action::destroy:
      bucket.reset();
      break;
    case action::close:
      bucket->close();
      break;
    case action::cancel:
      bucket->cancel();
      break;
  }
}

/// Exactly one completion, and no handler destroyed without being called.
void expect_once(const outcome& o) {
  BOOST_TEST(o.calls == 1);
  BOOST_TEST(!o.destroyed_uncalled);
}
void expect_once(const try_outcome& o) {
  BOOST_TEST(o.calls == 1);
  BOOST_TEST(!o.destroyed_uncalled);
}
void expect_once(const exec_outcome& o) {
  BOOST_TEST(o.calls == 1);
  BOOST_TEST(!o.destroyed_uncalled);
}

redis_config patient_config(std::uint16_t port) {
  auto c = fast_config(port);
  c.request_timeout = 2000ms;  // what is in flight stays in flight
  return c;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(lifetime)

// (a) async waiters queued and (c) an operation made with asio::deferred,
// launched only after the bucket was destroyed, closed or cancelled.
BOOST_AUTO_TEST_CASE(bucket_with_waiters_and_a_deferred_operation) {
  redis_server server;
  for (auto a : {action::destroy, action::close, action::cancel})
    BOOST_TEST_CONTEXT(name(a)) {
      asio::io_context ctx;
      std::vector<std::shared_ptr<outcome>> waiters;
      auto late = std::make_shared<outcome>();
      {
        redis_connection conn(ctx, patient_config(server.port()));
        auto bucket = std::make_unique<redis_token_bucket>(conn, std::string("lw:") + name(a), 1,
                                                           per_minute(1), mode_options());
        auto first = request(*bucket);
        BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
        BOOST_TEST(first->ok());
        for (int i = 0; i < 3; ++i)
          waiters.push_back(request(*bucket));
        auto op = bucket->async_get_token(1, asio::deferred);
        idle(ctx, 30ms);  // the head waits for its token on the timer (a minute)
        BOOST_TEST(bucket->waiting() == 3u);
        if (a == action::cancel)
          BOOST_TEST(bucket->cancel() == 3u);
        else
          act_on(bucket, a);
        std::move(op)(checked_handler(late));
        BOOST_REQUIRE(run_until(
            ctx,
            [&] {
              return std::all_of(waiters.begin(), waiters.end(),
                                 [](const auto& w) { return w->done(); });
            },
            1000ms));
        for (const auto& w : waiters)
          BOOST_TEST(w->ec == expected_for(a), w->ec.message());
        if (a != action::cancel) {
          // Launched after: the same answer, from an object that is gone or closed.
          BOOST_REQUIRE(run_until(
              ctx, [&] { return late->done(); }, 1000ms));
          BOOST_TEST(late->ec == expected_for(a), late->ec.message());
        } else {
          // After cancel() the bucket is open: a new waiter, which waits.
          idle(ctx, 20ms);
          BOOST_TEST(!late->done());
          BOOST_TEST(bucket->waiting() == 1u);
        }
        bucket.reset();
        BOOST_REQUIRE(run_until(
            ctx, [&] { return late->done(); }, 1000ms));
        if (a == action::cancel) BOOST_TEST(late->ec == aborted);
      }
      BOOST_TEST(run_returns(ctx));  // nothing left behind
      for (const auto& w : waiters)
        expect_once(*w);
      expect_once(*late);
    }
}

// (b) a thread blocked in get_token while the bucket is destroyed, closed
// or cancelled from another thread.
BOOST_AUTO_TEST_CASE(bucket_with_a_blocked_thread) {
  redis_server server;
  for (auto a : {action::destroy, action::close, action::cancel})
    BOOST_TEST_CONTEXT(name(a)) {
      asio::io_context ctx;
      auto conn = std::make_unique<redis_connection>(ctx, patient_config(server.port()));
      auto bucket = std::make_unique<redis_token_bucket>(*conn, std::string("lb:") + name(a), 1,
                                                         per_minute(1), mode_options());
      runner run(ctx);
      bucket->get_token();  // the only token
      std::promise<error_code> result;
      auto blocked = result.get_future();
      std::thread caller([&result, b = bucket.get()] {
        error_code ec;
        b->get_token(1, ec);
        result.set_value(ec);
      });
      BOOST_TEST(eventually([&] { return bucket->waiting() == 1; }, 5000ms));
      act_on(bucket, a);
      const bool woke = blocked.wait_for(2000ms) == std::future_status::ready;
      BOOST_TEST(woke);
      bucket.reset();  // wakes it in any case, so that the test can end
      caller.join();
      BOOST_TEST(blocked.get() == expected_for(a));
      conn.reset();
      BOOST_TEST(run.returned());
    }
}

// A thread entering get_token while another destroys the bucket, many
// times: the blocking caller must not touch the bucket's state once the
// bucket is gone (it co-owns what it uses).
BOOST_AUTO_TEST_CASE(bucket_destroyed_as_a_thread_starts_blocking) {
  redis_server server;
  asio::io_context ctx;
  auto conn = std::make_unique<redis_connection>(ctx, patient_config(server.port()));
  runner run(ctx);
  for (int i = 0; i < 100; ++i) {
    auto bucket = std::make_unique<redis_token_bucket>(*conn, "race:" + std::to_string(i), 1,
                                                       per_minute(1), mode_options());
    std::atomic<bool> returned{false};
    error_code ec;
    std::thread caller([&, b = bucket.get()] {
      b->get_token(1, ec);
      returned = true;
    });
    while (bucket->waiting() == 0 && !returned)
      std::this_thread::yield();
    bucket.reset();
    caller.join();
    BOOST_TEST((!ec || ec == aborted), ec.message());
  }
  conn.reset();
  BOOST_TEST(run.returned());
}

// (d) a script request in flight (its reply held back by the proxy) for a
// waiter and for a try, and (c) a deferred try launched after the act.
BOOST_AUTO_TEST_CASE(bucket_with_requests_in_flight) {
  redis_server server;
  fault_proxy proxy(server.port());
  for (auto a : {action::destroy, action::close, action::cancel})
    BOOST_TEST_CONTEXT(name(a)) {
      asio::io_context ctx;
      std::shared_ptr<outcome> w;
      std::shared_ptr<try_outcome> t, late = std::make_shared<try_outcome>();
      {
        redis_connection conn(ctx, patient_config(proxy.port()));
        BOOST_REQUIRE(recovers(ctx, conn, "warm"));
        auto bucket = std::make_unique<redis_token_bucket>(conn, std::string("lf:") + name(a), 10,
                                                           per_second(1), mode_options());
        proxy.set_delay(direction::to_client, 600ms);  // past the bound
        t = try_request(*bucket);                      // the queue is empty: the try asks Redis
        w = request(*bucket);                          // the head asks Redis too
        auto op = bucket->async_try_get_token(1, asio::deferred);
        idle(ctx, 50ms);
        BOOST_TEST(!t->done());
        BOOST_TEST(!w->done());
        act_on(bucket, a);
        std::move(op)(checked_try_handler(late));
        if (a != action::cancel) {
          // At once, not when the replies come.
          BOOST_REQUIRE(run_until(
              ctx, [&] { return w->done() && t->done() && late->done(); }, slack));
          BOOST_TEST(w->ec == expected_for(a), w->ec.message());
          BOOST_TEST(t->ec == expected_for(a), t->ec.message());
          BOOST_TEST(late->ec == expected_for(a), late->ec.message());
          BOOST_TEST(!t->granted);
          BOOST_TEST(!late->granted);
        } else {
          // cancel() is for waiters: the tries get their answers from Redis.
          BOOST_REQUIRE(run_until(
              ctx, [&] { return w->done(); }, slack));
          BOOST_TEST(w->ec == aborted);
          BOOST_REQUIRE(run_until(
              ctx, [&] { return t->done() && late->done(); }, 2000ms));
          BOOST_TEST((!t->ec && t->granted));
          BOOST_TEST((!late->ec && late->granted));
        }
        // The held replies arrive, into nothing (the tries of cancel() had theirs).
        if (a != action::cancel) idle(ctx, 650ms);
        proxy.clear_faults();
        bucket.reset();
      }
      BOOST_TEST(run_returns(ctx));
      expect_once(*w);
      expect_once(*t);
      expect_once(*late);
    }
}

// The connection destroyed or closed with (a) requests just issued, (d)
// requests in flight, (b) a thread blocked on a future and (c) a deferred
// request launched afterwards: each completes once, with operation_aborted,
// at once.
BOOST_AUTO_TEST_CASE(connection_with_requests_outstanding) {
  redis_server server;
  fault_proxy proxy(server.port());
  for (auto a : {action::destroy, action::close})
    BOOST_TEST_CONTEXT(name(a)) {
      asio::io_context ctx;
      auto conn = std::make_unique<redis_connection>(ctx, patient_config(proxy.port()));
      std::vector<std::shared_ptr<exec_outcome>> all;
      auto late = std::make_shared<exec_outcome>();
      std::promise<error_code> blocked_result;
      auto blocked = blocked_result.get_future();
      {
        runner run(ctx);
        auto ping = conn->async_exec({"PING"}, asio::use_future);
        BOOST_REQUIRE(ping.wait_for(2000ms) == std::future_status::ready);
        BOOST_REQUIRE(ping.get().str == "PONG");
        proxy.set_delay(direction::to_client, 1000ms);
        for (int i = 0; i < 3; ++i)
          all.push_back(exec_request(*conn, {"INCR", "n"}));
        std::thread caller([&blocked_result, c = conn.get()] {
          // use_future by hand: with use_future the error would cross threads
          // as an exception, whose reference count (in libstdc++) TSan cannot see.
          auto p = std::make_shared<std::promise<error_code>>();
          auto f = p->get_future();
          c->async_exec({"PING"}, [p](error_code ec, redis_reply) { p->set_value(ec); });
          blocked_result.set_value(f.get());
        });
        std::this_thread::sleep_for(80ms);  // written; the replies are held
        auto op = conn->async_exec({"PING"}, asio::deferred);
        for (int i = 0; i < 2; ++i)
          all.push_back(exec_request(*conn, {"PING"}));  // maybe not even written yet
        const auto t0 = steady::now();
        if (a == action::destroy)
          conn.reset();
        else
          conn->close();
        std::move(op)(checked_exec_handler(late));
        BOOST_TEST((blocked.wait_for(2000ms) == std::future_status::ready));
        BOOST_TEST(seconds(steady::now() - t0) < bound(0ms));  // not when the replies come
        caller.join();
        BOOST_TEST(blocked.get() == aborted);
        if (conn) {
          all.push_back(exec_request(*conn, {"PING"}));  // after close()
          conn.reset();
        }
        BOOST_TEST(run.returned());
      }
      // What was posted after the runner ran out of work (the context had
      // stopped for lack of it) runs now.
      BOOST_TEST(run_returns(ctx));
      proxy.clear_faults();
      for (const auto& o : all) {
        expect_once(*o);
        BOOST_TEST(o->ec == aborted, o->ec.message());
      }
      expect_once(*late);
      BOOST_TEST(late->ec == aborted, late->ec.message());
    }
}

// (b) for the connection: a thread blocked in get_token whose request is in
// flight when the connection is closed: the request is unavailable, the
// policy answers the thread.
BOOST_AUTO_TEST_CASE(connection_closed_under_a_blocked_get_token) {
  redis_server server;
  fault_proxy proxy(server.port());
  for (auto policy : {redis_fault_policy::fail_closed, redis_fault_policy::fail_open})
    BOOST_TEST_CONTEXT(name(policy)) {
      asio::io_context ctx;
      auto conn = std::make_unique<redis_connection>(ctx, patient_config(proxy.port()));
      BOOST_REQUIRE(recovers(ctx, *conn, "warm"));
      redis_bucket_options o;
      o.on_fault = policy;
      auto bucket = std::make_unique<redis_token_bucket>(*conn, std::string("lc:") + name(policy),
                                                         5, per_second(1), mode_options(o));
      runner run(ctx);
      proxy.set_delay(direction::to_client, 1000ms);
      std::promise<error_code> result;
      auto blocked = result.get_future();
      std::thread caller([&result, b = bucket.get()] {
        error_code ec;
        b->get_token(1, ec);
        result.set_value(ec);
      });
      BOOST_TEST(eventually([&] { return bucket->waiting() == 1; }, 5000ms));
      std::this_thread::sleep_for(50ms);  // the request is out
      conn->close();
      BOOST_TEST((blocked.wait_for(500ms) == std::future_status::ready));  // not after the delay
      bucket.reset();
      caller.join();
      const auto ec = blocked.get();
      BOOST_TEST((policy == redis_fault_policy::fail_closed ? ec == unavailable : !ec),
                 ec.message());
      conn.reset();
      BOOST_TEST(run.returned());
      proxy.clear_faults();
    }
}

// A moved-from bucket is a closed one that keeps its executor; the moved-to
// bucket has the waiters; move assignment aborts the target's own waiters.
BOOST_AUTO_TEST_CASE(moved_from_bucket_is_closed) {
  redis_server server;
  asio::io_context ctx;
  redis_connection conn(ctx, patient_config(server.port()));
  redis_token_bucket a(conn, "mv", 1, per_minute(1), mode_options());
  const auto ex = a.get_executor();
  auto first = request(a);
  BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
  auto queued = request(a);  // waits a minute
  idle(ctx, 20ms);

  redis_token_bucket b(std::move(a));
  BOOST_TEST((a.get_executor() == ex));
  BOOST_TEST(!a.is_open());
  BOOST_TEST(a.waiting() == 0u);
  BOOST_TEST(a.cancel() == 0u);
  BOOST_TEST(a.capacity() == 0u);
  BOOST_TEST(a.key().empty());
  BOOST_TEST(a.stats().round_trips == 0u);
  auto on_moved = request(a);
  auto try_moved = try_request(a);
  auto deferred_moved = std::make_shared<outcome>();
  a.async_get_token(1, asio::deferred)(checked_handler(deferred_moved));
  error_code blocking;
  a.get_token(1, blocking);  // fails at once: nothing to block on
  BOOST_TEST(blocking == closed);
  BOOST_CHECK_THROW(a.get_token(), boost::system::system_error);
  a.close();  // harmless
  BOOST_REQUIRE(run_until(
      ctx, [&] { return on_moved->done() && try_moved->done() && deferred_moved->done(); }));
  BOOST_TEST(on_moved->ec == closed);
  BOOST_TEST((try_moved->ec == closed && !try_moved->granted));
  BOOST_TEST(deferred_moved->ec == closed);

  BOOST_TEST(b.waiting() == 1u);  // the waiter moved along
  BOOST_TEST(b.key() == "mv");
  BOOST_TEST(!queued->done());

  // Move assignment: the target's own waiter is aborted, b's moves in.
  redis_token_bucket c(conn, "mv2", 1, per_minute(1), mode_options());
  auto c_first = request(c);
  BOOST_REQUIRE(run_until(ctx, [&] { return c_first->done(); }));
  auto c_queued = request(c);
  idle(ctx, 20ms);
  c = std::move(b);
  BOOST_REQUIRE(run_until(
      ctx, [&] { return c_queued->done(); }, 1000ms));
  BOOST_TEST(c_queued->ec == aborted);
  BOOST_TEST(!b.is_open());
  BOOST_TEST((b.get_executor() == ex));
  BOOST_TEST(c.waiting() == 1u);
  BOOST_TEST(c.cancel() == 1u);
  BOOST_REQUIRE(run_until(
      ctx, [&] { return queued->done(); }, 1000ms));
  BOOST_TEST(queued->ec == aborted);
  for (const auto& o : {first, queued, on_moved, deferred_moved, c_first, c_queued})
    expect_once(*o);
  expect_once(*try_moved);
}

BOOST_AUTO_TEST_SUITE_END()
