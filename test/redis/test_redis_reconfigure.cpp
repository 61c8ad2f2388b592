// Reconfiguration of Redis buckets (issue 14, item 4), against a real
// redis-server:
// - the scripts' promise, with the time hook: the configuration stored with
//   a key carries a generation; a request of an older generation runs with
//   the stored configuration and is told it, one of a newer generation
//   migrates the key to its own (whole tokens carry over, up to the new
//   capacity; a full bucket stays full; a debt stays a debt), the same
//   generation with another configuration is an error; configure_script
//   writes the next generation and keeps the key. A fuzzer compares long
//   random sequences of requests and reconfigurations by clients of
//   several configurations and generations with a reference model written
//   from that promise (bucket_state per configuration);
// - bucket objects: set_rate, set_capacity and reconfigure write it for
//   every process, every other object takes it on with its next reply and
//   reports it, requests larger than a lowered capacity fail, errors;
// - the keyed limiter: set_quota stores a key's quota, kept in Redis;
// - a rolling deploy (generation option) while requests flow.
// (Two processes on different generations: test_redis_processes.)
#include "redis_server.hpp"
#include "test_support.hpp"

#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/redis/redis_keyed_limiter.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/test/unit_test.hpp>

#include <future>
#include <map>
#include <optional>
#include <random>
#include <thread>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono_literals;
namespace asio = boost::asio;
namespace rd = ratelimit::redis_detail;

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

std::string text(const rd::script_rate& sr, bool reserve = false) {
  return (reserve ? "r:" : "") + std::to_string(sr.capacity) + ":" + std::to_string(sr.tok) + ":" +
         std::to_string(sr.tick);
}

struct fixture : redis_fixture {
  std::string hget(const std::string& key, const std::string& field) {
    return exec(ctx, conn, {"HGET", key, field}).reply.str;
  }
  long long pttl(const std::string& key) { return exec(ctx, conn, {"PTTL", key}).reply.integer; }
  bool run_for(std::chrono::milliseconds d) {
    return run_until(
        ctx, [] { return false; }, d);
  }
};

/// The documented promise of a key's configuration and level, as a model:
/// a bucket_state under the configuration that rules, its generation.
struct config_model {
  struct config {
    rd::script_rate sr;
    std::uint64_t gen = 0;
  };
  std::optional<config> stored;
  std::optional<detail::bucket_state> st;

  static detail::bucket_state fresh(const rd::script_rate& sr, std::int64_t now_us,
                                    std::uint64_t tokens) {
    return detail::bucket_state(sr.capacity, detail::reduce(rd::rate_of(sr)), now_us * 1000,
                                tokens);
  }

  /// Whole tokens carry over, up to the new capacity; a full bucket stays full.
  void migrate(const rd::script_rate& to, std::int64_t now_us) {
    st->refill(now_us * 1000);
    const std::uint64_t have = st->available();
    const bool full = have >= st->capacity();
    st = fresh(to, std::max(now_us * 1000, st->last()) / 1000,
               full ? to.capacity : std::min(have, to.capacity));
  }

  struct answer {
    bool error = false;
    bool granted = false;
    std::optional<config> told;
  };

  /// A head-only request for `n` by a client of `own` at generation `gen`.
  answer request(const rd::script_rate& own, std::uint64_t gen, std::uint64_t n,
                 std::int64_t now_us) {
    answer a;
    if (!stored) {
      stored = config{own, gen};
      st = fresh(own, now_us, own.capacity);
    } else if (stored->gen > gen) {
      a.told = stored;
    } else if (stored->gen == gen) {
      if (text(stored->sr) != text(own)) {
        if (gen == 0) {  // clients without generations must agree
          a.error = true;
          return a;
        }
        a.told = stored;  // a later generation written twice: the stored one wins
      }
    } else {
      migrate(own, now_us);
      stored = config{own, gen};
    }
    st->refill(now_us * 1000);
    if (n <= stored->sr.capacity && st->has(n)) {
      st->take(n);
      a.granted = true;
    }
    return a;
  }

  /// configure_script: `what` 'b', 'c' or 'r'.
  config configure(const rd::script_rate& own, std::uint64_t gen, char what, std::int64_t now_us) {
    if (!stored) {
      stored = config{own, gen + 1};
      st = fresh(own, now_us, own.capacity);
      return *stored;
    }
    rd::script_rate to = own;
    if (what == 'c') {
      to.tok = stored->sr.tok;
      to.tick = stored->sr.tick;
    } else if (what == 'r') {
      to.capacity = stored->sr.capacity;
    }
    migrate(to, now_us);
    stored = config{to, std::max(stored->gen, gen) + 1};
    return *stored;
  }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_reconfigure)

// The scripts against config_model: clients of three configurations at
// generations 0 to 3 make head-only requests and reconfigurations (both
// parts, the capacity only, the rate only) on one key at random times, and
// the key is sometimes deleted (so a generation may be written again with
// another configuration); every answer (granted or not, the configuration
// told, an error) and the whole tokens left after each step must agree.
BOOST_FIXTURE_TEST_CASE(scripts_agree_with_the_model_of_generations, fixture) {
  const rd::script_rate configs[] = {
      rd::make_script_rate(10, per_second(3)),
      rd::make_script_rate(4, rate{7, 1300ns}),
      rd::make_script_rate(25, per_second(100)),
  };
  std::mt19937_64 rng(20261201);
  const int runs = sanitized ? 10 : 40;
  const int steps = 300;
  const std::string sha = rd::script_sha1();
  const std::string csha = rd::script_sha1(rd::configure_script);
  exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::bucket_script)});
  exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::configure_script)});
  std::size_t granted = 0, told = 0, errors = 0, configured = 0;
  for (int run = 0; run < runs; ++run) {
    const std::string key = "fuzz:gen:" + std::to_string(run);
    exec(ctx, conn, {"DEL", key});
    config_model model;
    std::int64_t now = 1'764'000'000'000'000;
    for (int step = 0; step < steps; ++step) {
      now += static_cast<std::int64_t>(rng() % 400'000);
      const rd::script_rate& own = configs[rng() % 3];
      const std::uint64_t gen = rng() % 4;
      BOOST_TEST_CONTEXT("run " << run << " step " << step << " (client " << text(own) << "@" << gen
                                << ")") {
        if (rng() % 40 == 0) {
          exec(ctx, conn, {"DEL", key});
          model = config_model{};
          continue;
        }
        if (rng() % 6 == 0) {
          const char what = "bcr"[rng() % 3];
          const auto want = model.configure(own, gen, what, now);
          auto r = exec(ctx, conn, rd::configure_args(csha, key, own, what, false, gen, now));
          rd::stored_config got;
          BOOST_REQUIRE_MESSAGE(!rd::parse_configure_reply(r.reply, got), r.reply.str);
          BOOST_TEST(got.generation == want.gen);
          BOOST_TEST(text(got.rate) == text(want.sr));
          BOOST_TEST(hget(key, "c") == text(want.sr) + "@" + std::to_string(want.gen) + "s");
          ++configured;
        } else {
          const std::uint64_t n = 1 + rng() % own.capacity;
          const auto want = model.request(own, gen, n, now);
          auto r = exec(ctx, conn, rd::script_args(sha, key, own, n, 0, now, gen));
          if (want.error) {
            BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
            BOOST_TEST(r.reply.str.find("configured as") != std::string::npos, r.reply.str);
            ++errors;
            continue;
          }
          rd::script_result got;
          BOOST_REQUIRE_MESSAGE(!rd::parse_script_reply(r.reply, got), r.reply.str);
          BOOST_TEST(got.granted == want.granted);
          if (got.granted) BOOST_TEST(got.taken == n);
          BOOST_TEST(got.told.has_value() == want.told.has_value());
          if (got.told && want.told) {
            BOOST_TEST(got.told->generation == want.told->gen);
            BOOST_TEST(text(got.told->rate) == text(want.told->sr));
            ++told;
          }
          granted += got.granted;
        }
        // The whole tokens left, under the configuration that rules.
        const auto tick = model.stored->sr.tick;
        const double level = std::stod(hget(key, "l"));
        model.st->refill(now * 1000);
        BOOST_TEST(static_cast<std::uint64_t>(level) / tick == model.st->available());
      }
    }
    exec(ctx, conn, {"DEL", key});
  }
  BOOST_TEST_MESSAGE(granted << " grants, " << told << " told, " << errors << " errors, "
                             << configured << " reconfigurations");
  BOOST_TEST(granted > 100u);
  BOOST_TEST(told > 100u);
  BOOST_TEST(errors > 0u);  // (a fixed sequence: 2 in 10 runs, 7 in 40)
  BOOST_TEST(configured > 100u);
}

// Reservation mode: a debt carries over (reservations made keep their due
// times; later ones are due at the new rate after the debt), a refund
// follows the stored configuration, a client told a configuration under
// which its horizon would be inexact runs with a shorter one.
BOOST_FIXTURE_TEST_CASE(a_reservation_debt_carries_over, fixture) {
  const std::string key = "gen:debt";
  exec(ctx, conn, {"DEL", key});
  const std::int64_t t0 = 1'764'000'000'000'000;
  const auto old_rr = rd::make_reserve_rate(10, per_second(10), 10'000'000);  // 100 ms a token
  const std::vector<rd::reserve_request> fifteen{{10}, {5}};
  auto r = exec(ctx, conn, rd::reserve_args("", key, old_rr, fifteen, t0, 0));
  std::uint64_t now = 0;
  std::vector<rd::reservation_result> got;
  BOOST_REQUIRE(!rd::parse_reserve_reply(r.reply, 2, now, got));
  BOOST_TEST((got[1].what == rd::reservation_result::status::reserved));
  BOOST_TEST(got[1].due_us == std::uint64_t(t0 + 500'000));  // 5 tokens of debt
  // At t0 + 200 ms the debt is 3 tokens; the rate goes to 100/s (10 ms a token).
  const auto new_sr = rd::make_script_rate(10, per_second(100));
  auto c = exec(ctx, conn, rd::configure_args("", key, new_sr, 'r', true, 0, t0 + 200'000));
  rd::stored_config conf;
  BOOST_REQUIRE_MESSAGE(!rd::parse_configure_reply(c.reply, conf), c.reply.str);
  BOOST_TEST(conf.generation == 1u);
  BOOST_TEST(conf.reserve);
  BOOST_TEST(text(conf.rate, true) == "r:10:1:10000");
  BOOST_TEST(std::stoll(hget(key, "l")) == -3 * 10'000);
  // An old client (generation 0): told, and due after the debt at the new rate.
  const std::vector<rd::reserve_request> one{{1}};
  r = exec(ctx, conn, rd::reserve_args("", key, old_rr, one, t0 + 200'000, 0));
  std::optional<rd::stored_config> was_told;
  BOOST_REQUIRE(!rd::check_reserve_reply(r.reply, 1, now, &was_told));
  BOOST_REQUIRE(was_told.has_value());
  BOOST_TEST(was_told->generation == 1u);
  BOOST_TEST(rd::reservation_at(r.reply, 0).due_us == std::uint64_t(t0 + 240'000));
  // A refund from the old client is given back under the stored configuration.
  const std::uint64_t back[] = {4};
  auto b = exec(ctx, conn, rd::refund_args("", key, old_rr, back, t0 + 240'000, 0));
  BOOST_TEST(b.reply.integer == 4);
  BOOST_TEST(std::stoll(hget(key, "l")) == 4 * 10'000);
  // A capacity too large for the old client's horizon: it is cut.
  const auto huge_sr = rd::make_script_rate(9'007'199'253, per_second(1));
  BOOST_REQUIRE(
      !exec(ctx, conn, rd::configure_args("", key, huge_sr, 'b', true, 0, t0 + 300'000)).ec);
  r = exec(ctx, conn, rd::reserve_args("", key, old_rr, one, t0 + 300'000, 0));
  BOOST_REQUIRE(!rd::check_reserve_reply(r.reply, 1, now, &was_told));
  BOOST_TEST(was_told->rate.capacity == 9'007'199'253u);
  exec(ctx, conn, {"DEL", key});
}

// Keys written by a reconfiguration are kept (no expiry, not deleted when
// full); keys of a generation option expire as before; keys written before
// generations existed read as generation 0; a key of the other mode is refused.
BOOST_FIXTURE_TEST_CASE(stored_configurations_are_kept_and_old_keys_read_as_generation_0, fixture) {
  const auto sr = rd::make_script_rate(10, per_second(100));
  // A reconfigured key, full: kept, without expiry.
  auto c = exec(ctx, conn, rd::configure_args("", "kept", sr, 'b', false, 0));
  BOOST_REQUIRE(!c.ec);
  BOOST_TEST(hget("kept", "c") == "10:1:10000@1s");
  BOOST_TEST(pttl("kept") == -1);
  auto r = exec(ctx, conn, rd::script_args("", "kept", sr, 1, 0, -1, 1));
  BOOST_REQUIRE(!r.ec);
  BOOST_TEST(pttl("kept") == -1);
  BOOST_TEST(run_for(50ms) == false);  // full again
  r = exec(ctx, conn, rd::script_args("", "kept", sr, 0, 0, -1, 1));
  BOOST_TEST(exec(ctx, conn, {"EXISTS", "kept"}).reply.integer == 1);
  // A newer generation from a deploy takes over, and expires as usual.
  r = exec(ctx, conn, rd::script_args("", "kept", sr, 1, 0, -1, 5));
  BOOST_REQUIRE(!r.ec);
  BOOST_TEST(hget("kept", "c") == "10:1:10000@5");
  BOOST_TEST(pttl("kept") > 0);
  // A key written without a generation (as before generations existed).
  exec(ctx, conn,
       {"HSET", "old", "l", std::to_string(3 * sr.tick), "t", "1764000000000000", "c",
        "10:1:10000"});
  r = exec(ctx, conn, rd::script_args("", "old", sr, 1, 0, 1'764'000'000'000'000, 0));
  rd::script_result res;
  BOOST_REQUIRE(!rd::parse_script_reply(r.reply, res));
  BOOST_TEST(res.granted);
  BOOST_TEST(!res.told);
  // The other mode: refused, the key untouched.
  const auto before = exec(ctx, conn, {"DUMP", "old"}).reply.str;
  auto m = exec(ctx, conn, rd::configure_args("", "old", sr, 'b', true, 0));
  BOOST_TEST(m.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(m.reply.str.find("configured as 10:1:10000, not r:10:1:10000") != std::string::npos,
             m.reply.str);
  BOOST_TEST(exec(ctx, conn, {"DUMP", "old"}).reply.str == before);
  // Not a bucket: refused, untouched.
  exec(ctx, conn, {"SET", "str", "hello"});
  BOOST_TEST(exec(ctx, conn, rd::configure_args("", "str", sr, 'b', false, 0)).ec ==
             error::make_error_code(error::redis_error));
  BOOST_TEST(exec(ctx, conn, {"GET", "str"}).reply.str == "hello");
  // Inexact: refused by the script when the kept part makes it so.
  exec(ctx, conn,
       rd::configure_args("", "exact", rd::make_script_rate(9'000'000'000, per_second(1)), 'b',
                          false, 0));
  auto inexact =
      exec(ctx, conn,
           rd::configure_args("", "exact", rd::make_script_rate(1, per_hour(1)), 'r', false, 0));
  BOOST_TEST(inexact.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(inexact.reply.str.find("cannot be computed exactly") != std::string::npos,
             inexact.reply.str);
}

// A generation written twice (the key deleted, then written again from a
// client of an older generation): an object that had the generation with
// another configuration follows the stored one instead of failing; at
// generation 0, objects of different configurations still fail (they never
// used generations: they must agree).
BOOST_FIXTURE_TEST_CASE(a_generation_written_twice_is_followed, fixture) {
  redis_token_bucket a(conn, "twice", 10, per_second(10));
  std::optional<boost::system::error_code> r;
  a.async_set_rate(per_second(20), [&](boost::system::error_code ec, std::uint64_t) { r = ec; });
  BOOST_REQUIRE(run_until(ctx, [&] { return r.has_value(); }));
  BOOST_TEST(a.generation() == 1u);
  exec(ctx, conn, {"DEL", "twice"});
  redis_token_bucket c(conn, "twice", 7, per_second(10));
  r.reset();
  c.async_set_capacity(5, [&](boost::system::error_code ec, std::uint64_t) { r = ec; });
  BOOST_REQUIRE(run_until(ctx, [&] { return r.has_value(); }));
  BOOST_TEST(c.generation() == 1u);  // 5 at 10/s, generation 1; a has 10 at 20/s, generation 1
  auto o = std::make_shared<outcome>();
  a.async_get_token(1, checked_handler(o));
  BOOST_REQUIRE(run_until(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ok());
  BOOST_TEST(a.capacity() == 5u);
  BOOST_TEST(a.get_rate().tokens * 1'000'000'000 / a.get_rate().period.count() == 10);
  redis_token_bucket x(conn, "zero", 10, per_second(10));
  redis_token_bucket y(conn, "zero", 11, per_second(10));
  auto ox = std::make_shared<outcome>(), oy = std::make_shared<outcome>();
  x.async_get_token(1, checked_handler(ox));
  BOOST_REQUIRE(run_until(ctx, [&] { return ox->done(); }));
  y.async_get_token(1, checked_handler(oy));
  BOOST_REQUIRE(run_until(ctx, [&] { return oy->done(); }));
  BOOST_TEST(ox->ok());
  BOOST_TEST(oy->ec == error::make_error_code(error::redis_error));
}

// Head-only: a head asleep for its tokens under a slow rate wakes when its
// own object raises the rate (it asks again under the new one), instead of
// sleeping out the old wait.
BOOST_FIXTURE_TEST_CASE(a_raised_rate_wakes_a_sleeping_head, fixture) {
  redis_token_bucket b(conn, "wake", 1, per_hour(1));
  auto first = std::make_shared<outcome>(), second = std::make_shared<outcome>();
  b.async_get_token(1, checked_handler(first));
  BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
  b.async_get_token(1, checked_handler(second));  // due in an hour
  run_for(50ms);
  BOOST_TEST(!second->done());
  std::optional<boost::system::error_code> r;
  b.async_set_rate(per_second(1000), [&](boost::system::error_code ec, std::uint64_t) { r = ec; });
  BOOST_REQUIRE(run_until(
      ctx, [&] { return second->done(); }, 5s));
  BOOST_TEST(second->ok());
  BOOST_TEST((r.has_value() && !*r));
}

// set_rate on one object changes the key for every object: the others take
// it on with their next reply and report it (capacity(), get_rate(),
// generation(), stats().reconfigurations), in both modes, and the granted
// count follows the new rate.
BOOST_FIXTURE_TEST_CASE(set_rate_reaches_every_object, fixture) {
  for (const auto mode : both_modes) {
    BOOST_TEST_CONTEXT(name(mode)) {
      const std::string key = std::string("set_rate:") + name(mode);
      redis_token_bucket a(conn, key, 5, per_second(10), in(mode));
      redis_token_bucket b(conn, key, 5, per_second(10), in(mode));
      std::optional<std::pair<boost::system::error_code, std::uint64_t>> done;
      a.async_set_rate(per_second(1000),
                       [&](boost::system::error_code ec, std::uint64_t g) { done.emplace(ec, g); });
      BOOST_TEST(!done);  // never inside the initiating call
      BOOST_REQUIRE(run_until(ctx, [&] { return done.has_value(); }));
      BOOST_TEST(!done->first);
      BOOST_TEST(done->second == 1u);
      BOOST_TEST(a.generation() == 1u);
      BOOST_TEST(a.get_rate().tokens * 1'000'000'000 / a.get_rate().period.count() == 1000);
      BOOST_TEST(a.stats().reconfigurations == 1u);
      BOOST_TEST(b.generation() == 0u);
      // b runs its requests with the stored configuration from its first reply:
      // 5 + 1000/s * 0.2 s, not 5 + 10/s * 0.2 s.
      int granted = 0;
      const auto end = std::chrono::steady_clock::now() + 200ms;
      std::function<void(boost::system::error_code)> again = [&](boost::system::error_code ec) {
        BOOST_REQUIRE(!ec);
        if (std::chrono::steady_clock::now() >= end) return;
        ++granted;
        b.async_get_token(again);
      };
      b.async_get_token(again);
      run_for(300ms);
      BOOST_TEST_MESSAGE(name(mode) << ": " << granted << " granted in 200 ms");
      BOOST_TEST(granted > 60);
      BOOST_TEST(granted <= 5 + 200 + 1);
      BOOST_TEST(b.generation() == 1u);
      BOOST_TEST(b.stats().reconfigurations == 1u);
      BOOST_TEST(b.capacity() == 5u);
      BOOST_TEST(b.get_rate().tokens * 1'000'000'000 / b.get_rate().period.count() == 1000);
      BOOST_TEST(pttl(key) == -1);  // kept
      exec(ctx, conn, {"DEL", key});
    }
  }
}

// A lowered capacity: requests queued for more than it fail with
// exceeds_capacity once the object is told, later ones at once; a raised one
// serves larger requests once known. set_capacity keeps the stored rate.
BOOST_FIXTURE_TEST_CASE(set_capacity_fails_requests_larger_than_the_new_capacity, fixture) {
  for (const auto mode : both_modes) {
    BOOST_TEST_CONTEXT(name(mode)) {
      const std::string key = std::string("set_capacity:") + name(mode);
      redis_token_bucket a(conn, key, 10, per_second(20), in(mode));
      redis_token_bucket b(conn, key, 10, per_second(20), in(mode));
      auto first = std::make_shared<outcome>();
      b.async_get_token(10, checked_handler(first));
      BOOST_REQUIRE(run_until(ctx, [&] { return first->done(); }));
      BOOST_TEST(first->ok());
      std::optional<boost::system::error_code> lowered;
      a.async_set_capacity(4, [&](boost::system::error_code ec, std::uint64_t) { lowered = ec; });
      BOOST_REQUIRE(run_until(ctx, [&] { return lowered.has_value(); }));
      BOOST_TEST(!*lowered);
      BOOST_TEST(a.capacity() == 4u);
      BOOST_TEST(a.get_rate().tokens * 1'000'000'000 / a.get_rate().period.count() == 20);
      // b still thinks 10: a request for 8 is queued; the reply tells it 4.
      auto eight = std::make_shared<outcome>();
      b.async_get_token(8, checked_handler(eight));
      BOOST_REQUIRE(run_until(ctx, [&] { return eight->done(); }));
      BOOST_TEST(eight->ec == error::make_error_code(error::exceeds_capacity));
      BOOST_TEST(b.capacity() == 4u);
      auto nine = std::make_shared<outcome>();
      b.async_get_token(9, checked_handler(nine));
      BOOST_REQUIRE(run_until(ctx, [&] { return nine->done(); }));
      BOOST_TEST(nine->ec == error::make_error_code(error::exceeds_capacity));
      // Raised again: a asks 12 once it knows.
      std::optional<boost::system::error_code> raised;
      a.async_set_capacity(12, [&](boost::system::error_code ec, std::uint64_t) { raised = ec; });
      BOOST_REQUIRE(run_until(ctx, [&] { return raised.has_value(); }));
      BOOST_TEST(!*raised);
      BOOST_TEST(a.capacity() == 12u);
      auto twelve = std::make_shared<outcome>();
      a.async_get_token(12, checked_handler(twelve));
      BOOST_REQUIRE(run_until(
          ctx, [&] { return twelve->done(); }, 5s));
      BOOST_TEST(twelve->ok());
      exec(ctx, conn, {"DEL", key});
    }
  }
}

// The errors: a closed or moved-from bucket, Redis down, an invalid
// configuration (thrown before anything is sent), a key of the other mode,
// a blocking call on the connection's own thread; the blocking forms.
BOOST_FIXTURE_TEST_CASE(reconfiguration_errors_and_blocking_forms, fixture) {
  redis_token_bucket b(conn, "errors", 10, per_second(10));
  BOOST_CHECK_THROW(b.async_set_capacity(0, [](auto, auto) {}), std::invalid_argument);
  BOOST_CHECK_THROW(b.async_set_rate(rate{0, 1s}, [](auto, auto) {}), std::invalid_argument);
  BOOST_CHECK_THROW(b.async_reconfigure(9'000'000'000, per_hour(1), [](auto, auto) {}),
                    std::invalid_argument);
  boost::system::error_code ec;
  std::optional<boost::system::error_code> on_own_thread;
  asio::post(ctx, [&] {
    boost::system::error_code e;
    b.set_rate(per_second(5), e);
    on_own_thread = e;
  });
  BOOST_REQUIRE(run_until(ctx, [&] { return on_own_thread.has_value(); }));
  BOOST_TEST(*on_own_thread == error::make_error_code(error::would_deadlock));
  {
    // The blocking forms, with the context on another thread.
    auto work = asio::make_work_guard(ctx);
    std::thread t([&] { ctx.run(); });
    BOOST_TEST(b.set_rate(per_second(5)) == 1u);
    BOOST_TEST(b.set_capacity(3) == 2u);
    BOOST_TEST(b.reconfigure(7, per_second(70), ec) == 3u);
    BOOST_TEST(!ec);
    BOOST_TEST(b.capacity() == 7u);
    redis_token_bucket r(conn, "errors", 7, per_second(70), in(redis_bucket_mode::reserve));
    BOOST_CHECK_THROW(r.set_rate(per_second(1)), boost::system::system_error);
    r.set_rate(per_second(1), ec);
    BOOST_TEST(ec == error::make_error_code(error::redis_error));
    ctx.stop();  // (the connection keeps the context busy)
    t.join();
    ctx.restart();
  }
  b.close();
  std::optional<boost::system::error_code> closed;
  b.async_set_rate(per_second(1), [&](boost::system::error_code e, std::uint64_t) { closed = e; });
  BOOST_REQUIRE(run_until(ctx, [&] { return closed.has_value(); }));
  BOOST_TEST(*closed == error::make_error_code(error::bucket_closed));
  redis_token_bucket moved(conn, "moved", 10, per_second(10));
  redis_token_bucket to(std::move(moved));
  std::optional<boost::system::error_code> from_moved;
  moved.async_set_rate(per_second(1),
                       [&](boost::system::error_code e, std::uint64_t) { from_moved = e; });
  BOOST_REQUIRE(run_until(ctx, [&] { return from_moved.has_value(); }));
  BOOST_TEST(*from_moved == error::make_error_code(error::bucket_closed));
  // Redis down: redis_unavailable (no fault policy: nothing to grant).
  {
    redis_config cfg = server.config();
    cfg.request_timeout = 200ms;
    redis_connection c2(ctx, cfg);
    redis_token_bucket d(c2, "down", 10, per_second(10),
                         redis_bucket_options{.on_fault = redis_fault_policy::fail_open});
    server.stop();
    std::optional<boost::system::error_code> down;
    d.async_set_rate(per_second(1), [&](boost::system::error_code e, std::uint64_t) { down = e; });
    BOOST_REQUIRE(run_until(
        ctx, [&] { return down.has_value(); }, 5s));
    BOOST_TEST(*down == error::make_error_code(error::redis_unavailable));
  }
}

// A configuration operation outlives its bucket: destroyed before the reply,
// it still completes with the reply (the change is made either way).
BOOST_FIXTURE_TEST_CASE(a_reconfiguration_completes_after_its_bucket_is_gone, fixture) {
  auto o = std::make_shared<std::optional<std::pair<boost::system::error_code, std::uint64_t>>>();
  {
    redis_token_bucket b(conn, "gone", 10, per_second(10));
    b.async_set_rate(per_second(3),
                     [o](boost::system::error_code ec, std::uint64_t g) { o->emplace(ec, g); });
  }
  BOOST_REQUIRE(run_until(ctx, [&] { return o->has_value(); }));
  BOOST_TEST(!(*o)->first);
  BOOST_TEST((*o)->second == 1u);
  BOOST_TEST(hget("gone", "c") == "10:3:1000000@1s");
  // Deferred: launched after the bucket is gone.
  std::optional<decltype(std::declval<redis_token_bucket&>().async_set_rate(per_second(1),
                                                                            asio::deferred))>
      op;
  {
    redis_token_bucket b(conn, "gone", 10, per_second(10));
    op.emplace(b.async_set_rate(per_second(1), asio::deferred));
  }
  std::optional<boost::system::error_code> late;
  std::move (*op)([&](boost::system::error_code ec, std::uint64_t) { late = ec; });
  BOOST_REQUIRE(run_until(ctx, [&] { return late.has_value(); }));
  BOOST_TEST(*late == asio::error::operation_aborted);
}

// A rolling deploy: objects made with generation 1 and another configuration
// take the key over from generation 0 while requests flow; the old objects
// follow, nothing fails.
BOOST_FIXTURE_TEST_CASE(a_rolling_deploy_moves_the_key_to_the_new_generation, fixture) {
  for (const auto mode : both_modes) {
    BOOST_TEST_CONTEXT(name(mode)) {
      const std::string key = std::string("deploy:") + name(mode);
      redis_token_bucket old_one(conn, key, 10, per_second(50), in(mode));
      redis_bucket_options next = in(mode);
      next.generation = 1;
      redis_token_bucket new_one(conn, key, 20, per_second(500), next);
      int errors = 0, old_granted = 0;
      bool stop = false;
      std::function<void(boost::system::error_code)> loop = [&](boost::system::error_code ec) {
        if (ec) ++errors;
        if (stop || ec) return;
        ++old_granted;
        old_one.async_get_token(loop);
      };
      old_one.async_get_token(loop);
      run_for(100ms);
      auto o = std::make_shared<outcome>();
      new_one.async_get_token(1, checked_handler(o));
      BOOST_REQUIRE(run_until(ctx, [&] { return o->done(); }));
      BOOST_TEST(o->ok());
      BOOST_TEST(hget(key, "c").find("@1") != std::string::npos);  // (expires once full)
      const int before_change = old_granted;
      run_for(200ms);
      // At 500/s (the new configuration): about 100 in 200 ms; at 50/s it would be 10.
      const int after_change = old_granted - before_change;
      BOOST_TEST_MESSAGE(name(mode) << ": the old object got " << after_change
                                    << " in 200 ms after the change");
      BOOST_TEST(after_change > 40);
      BOOST_TEST(after_change <= 20 + 100 + 2);
      stop = true;
      run_for(50ms);
      BOOST_TEST(errors == 0);
      BOOST_TEST(old_one.generation() == 1u);
      BOOST_TEST(old_one.capacity() == 20u);
      BOOST_TEST(old_one.stats().reconfigurations == 1u);
      BOOST_TEST(new_one.stats().reconfigurations == 0u);
      old_one.close();
      run_for(20ms);
      exec(ctx, conn, {"DEL", key});
    }
  }
}

// The keyed limiter: set_quota stores one key's quota in Redis, kept there,
// for every process; the key's requests run with it (an active key's
// machinery at once, a new one from its first reply); other keys keep the
// function's quota and expire as before.
BOOST_FIXTURE_TEST_CASE(set_quota_stores_a_keys_quota, fixture) {
  for (const auto mode : both_modes) {
    BOOST_TEST_CONTEXT(name(mode)) {
      const std::string prefix = std::string("quota:") + name(mode) + ":";
      redis_keyed_limiter l(conn, prefix, 2, per_second(1), in(mode));
      std::optional<std::pair<boost::system::error_code, std::uint64_t>> done;
      l.async_set_quota(
          "vip", 50, per_second(1000),
          [&](boost::system::error_code ec, std::uint64_t g) { done.emplace(ec, g); });
      BOOST_REQUIRE(run_until(ctx, [&] { return done.has_value(); }));
      BOOST_TEST(!done->first);
      BOOST_TEST(done->second == 1u);
      BOOST_TEST(pttl(prefix + "vip") == -1);
      // 40 one-token requests for vip in 100 ms (a plain key would get 2).
      int vip = 0, plain = 0;
      for (int i = 0; i < 40; ++i) {
        l.async_get_token("vip", [&](boost::system::error_code ec) { vip += !ec; });
        l.async_try_get_token("plain",
                              [&](boost::system::error_code ec, bool g) { plain += !ec && g; });
      }
      run_for(100ms);
      BOOST_TEST(vip == 40);
      BOOST_TEST(plain == 2);
      BOOST_TEST(pttl(prefix + "plain") > 0);
      BOOST_TEST(l.quota("vip").capacity == 2u);  // the function's, not the stored one
      BOOST_TEST(l.stats().reconfigurations >= 1u);
      // set_rate on a key keeps its stored capacity.
      std::optional<boost::system::error_code> r;
      l.async_set_rate("vip", per_second(10), [&](boost::system::error_code ec, std::uint64_t g) {
        r = ec;
        BOOST_TEST(g == 2u);
      });
      BOOST_REQUIRE(run_until(ctx, [&] { return r.has_value(); }));
      BOOST_TEST(hget(prefix + "vip", "c")
                     .starts_with(std::string(mode == redis_bucket_mode::reserve ? "r:" : "") +
                                  "50:1:100000@2"));
      l.close();
      std::optional<boost::system::error_code> closed;
      l.async_set_capacity("vip", 3,
                           [&](boost::system::error_code ec, std::uint64_t) { closed = ec; });
      BOOST_REQUIRE(run_until(ctx, [&] { return closed.has_value(); }));
      BOOST_TEST(*closed == error::make_error_code(error::bucket_closed));
      exec(ctx, conn, {"DEL", prefix + "vip", prefix + "plain"});
    }
  }
}

// Threads: blocking and asynchronous requests on two objects of one key
// while another thread changes the key's capacity and rate back and forth
// (the context run by two threads), and another flushes the server's
// scripts every 2 ms (so requests are resent after NOSCRIPT, with the
// configuration they were first sent with, while their object takes on
// another): every request completes once, granted or failed with
// exceeds_capacity (asked more than a capacity it was told), and both
// objects end on the last configuration. (Resending with the object's new,
// smaller capacity failed a request with redis_error, as bad arguments.)
BOOST_FIXTURE_TEST_CASE(reconfigurations_race_with_requests, fixture) {
  const int changes = sanitized ? 30 : 150;
  for (const auto mode : both_modes) {
    BOOST_TEST_CONTEXT(name(mode)) {
      const std::string key = std::string("race:") + name(mode);
      redis_token_bucket a(conn, key, 6, per_second(5000), in(mode));
      redis_token_bucket b(conn, key, 6, per_second(5000), in(mode));
      auto work = asio::make_work_guard(ctx);
      std::thread runners[] = {std::thread([&] { ctx.run(); }), std::thread([&] { ctx.run(); })};
      std::atomic<bool> stop{false};
      std::atomic<int> granted{0}, too_large{0}, unexpected{0}, async_started{0}, async_done{0};
      const auto record = [&](boost::system::error_code ec) {
        if (!ec)
          ++granted;
        else if (ec == error::exceeds_capacity)
          ++too_large;
        else if (++unexpected == 1)
          BOOST_TEST_MESSAGE("unexpected: " << ec.message());
      };
      std::thread changer([&] {
        std::mt19937 rng(7);
        for (int i = 0; i < changes; ++i) {
          boost::system::error_code ec;
          if (i % 2)
            a.set_capacity(2 + rng() % 5, ec);
          else
            a.set_rate(per_second(2000 + rng() % 6000), ec);
          if (ec && ++unexpected == 1) BOOST_TEST_MESSAGE("unexpected: " << ec.message());
          std::this_thread::sleep_for(1ms);  // (requests flow in between)
        }
        stop = true;
      });
      std::thread flusher([&] {
        asio::io_context fctx;
        redis_connection fconn(fctx, server.config());
        while (!stop) {
          exec(fctx, fconn, {"SCRIPT", "FLUSH"});
          std::this_thread::sleep_for(2ms);
        }
      });
      std::thread blocking([&] {
        std::mt19937 rng(8);
        while (!stop) {
          boost::system::error_code ec;
          b.get_token(1 + rng() % 6, ec);
          record(ec);
        }
      });
      std::thread async([&] {
        std::mt19937 rng(9);
        while (!stop) {
          ++async_started;
          (rng() % 2 ? a : b).async_get_token(1 + rng() % 6, [&](boost::system::error_code ec) {
            record(ec);
            ++async_done;
          });
          if (async_started - async_done > 50) std::this_thread::sleep_for(1ms);
        }
      });
      changer.join();
      flusher.join();
      blocking.join();
      async.join();
      const auto end = std::chrono::steady_clock::now() + 20s;
      while (async_done < async_started && std::chrono::steady_clock::now() < end)
        std::this_thread::sleep_for(1ms);
      // The last configuration reaches b with its next reply.
      boost::system::error_code ec;
      const std::uint64_t last = a.set_rate(per_second(1000), ec);
      BOOST_TEST(!ec);
      b.get_token(1, ec);
      BOOST_TEST(!ec);
      ctx.stop();
      for (auto& t : runners)
        t.join();
      ctx.restart();
      BOOST_TEST_MESSAGE(name(mode)
                         << ": " << granted << " granted, " << too_large
                         << " larger than the capacity, " << async_started << " asynchronous");
      BOOST_TEST(async_done == async_started);
      BOOST_TEST(unexpected == 0);
      BOOST_TEST(granted > changes);
      BOOST_TEST(a.generation() == last);
      BOOST_TEST(b.generation() == last);
      BOOST_TEST(b.capacity() == a.capacity());
      (void)work;
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()
