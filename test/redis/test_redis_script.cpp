// The Lua script run in a real redis-server, side by side with bucket_state:
// fed the same requests at the same times (ns = us * 1000), they must agree
// on every decision and on every wait. Also the construction checks, the
// reply parser, expiry, the script's refusals, and keys that hold someone
// else's data (of every type) left byte for byte as they were.
#include "redis_server.hpp"
#include "test_support.hpp"

#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/redis/detail/reserve_script.hpp>
#include <ratelimit/redis/detail/script.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <random>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono_literals;
namespace rd = ratelimit::redis_detail;

namespace {

struct step {
  std::int64_t now_us;
  std::uint64_t n;
  std::uint64_t extra;
};

/// Runs `steps` through the script on `key` (pipelined) and through bucket_state; compares.
void side_by_side(boost::asio::io_context& ctx, redis_connection& conn, const std::string& key,
                  std::uint64_t capacity, rate r, const std::vector<step>& steps) {
  const auto sr = rd::make_script_rate(capacity, r);
  const std::string sha = rd::script_sha1();
  exec(ctx, conn, {"DEL", key});
  auto load = exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::bucket_script)});
  BOOST_REQUIRE(!load.ec);
  BOOST_REQUIRE_EQUAL(load.reply.str, sha);  // our SHA1 is the server's

  std::vector<std::optional<exec_result>> results(steps.size());
  for (std::size_t i = 0; i < steps.size(); ++i)
    conn.async_exec(rd::script_args(sha, key, sr, steps[i].n, steps[i].extra, steps[i].now_us),
                    [&results, i](boost::system::error_code ec, redis_reply reply) {
                      results[i] = exec_result{ec, std::move(reply)};
                    });
  BOOST_REQUIRE(run_until(
      ctx, [&] { return results.back().has_value(); }, 60s));

  detail::bucket_state state(capacity, detail::reduce(r), steps.front().now_us * 1000, capacity);
  std::size_t granted = 0, denied = 0;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const auto& s = steps[i];
    BOOST_REQUIRE(results[i].has_value());
    BOOST_REQUIRE_MESSAGE(!results[i]->ec, "step " << i << ": " << results[i]->ec.message() << " "
                                                   << results[i]->reply.str);
    rd::script_result res;
    BOOST_REQUIRE(!rd::parse_script_reply(results[i]->reply, res));
    const std::int64_t now_ns = s.now_us * 1000;
    const bool expect = state.try_take(now_ns, s.n);
    BOOST_REQUIRE_MESSAGE(res.granted == expect, "step " << i << " (n=" << s.n << ", t=" << s.now_us
                                                         << "): script says " << res.granted);
    if (expect) {
      ++granted;
      const std::uint64_t more = std::min(s.extra, state.available());
      state.take(more);
      BOOST_REQUIRE_EQUAL(res.taken, s.n + more);
    } else {
      ++denied;
      // bucket_state's wait in ns, from now (its last() may be later: time went back).
      BOOST_REQUIRE(state.last() >= now_ns);
      const std::uint64_t wait_ns =
          state.ticks_until(s.n) + static_cast<std::uint64_t>(state.last() - now_ns);
      BOOST_REQUIRE_EQUAL(res.wait_us, std::min((wait_ns + 999) / 1000, rd::max_wait_us));
    }
  }
  // Both kinds of decision were exercised.
  BOOST_TEST(granted > steps.size() / 10);
  BOOST_TEST(denied > steps.size() / 10);
  // The stored level is the same rational number of tokens.
  auto l = exec(ctx, conn, {"HGET", key, "l"});
  BOOST_REQUIRE((l.reply.type == redis_reply::kind::string));
  BOOST_TEST(std::stoull(l.reply.str) / sr.tick == state.available());
  exec(ctx, conn, {"DEL", key});
}

std::vector<step> random_steps(std::mt19937_64& rng, std::uint64_t capacity, rate r,
                               std::size_t count, bool with_extra) {
  const auto sr = rd::make_script_rate(capacity, r);
  // Time for the whole bucket to refill, in us (the script's exact figure).
  const std::uint64_t full_us = (capacity * sr.tick + sr.tok - 1) / sr.tok;
  const std::uint64_t token_us = std::max<std::uint64_t>(1, sr.tick / sr.tok);
  std::vector<step> steps;
  std::int64_t now = 1'764'000'000'000'000;  // a TIME of 2025, in us
  for (std::size_t i = 0; i < count; ++i) {
    switch (rng() % 8) {
      case 0:
        break;  // same instant
      case 1:
        now += 1;
        break;  // one microsecond
      case 2:
        now -= static_cast<std::int64_t>(rng() % (token_us * 3 + 1));
        break;  // back
      case 3:
        now += static_cast<std::int64_t>(
            rng() % (std::min<std::uint64_t>(2 * full_us, 1'000'000'000'000) + 1));
        break;
      default:
        now += static_cast<std::int64_t>(rng() % (token_us * 2 + 1));
        break;
    }
    std::uint64_t n;
    switch (rng() % 4) {
      case 0:
        n = rng() % (capacity + 1);
        break;
      case 1:
        n = capacity - rng() % std::min<std::uint64_t>(capacity, 3);
        break;
      default:
        n = 1 + rng() % std::min<std::uint64_t>(capacity, 3);
        break;
    }
    const std::uint64_t extra = with_extra && rng() % 2 ? rng() % (capacity + 2) : 0;
    steps.push_back({now, n, extra});
  }
  return steps;
}

/// The reservation script's promise, written with bucket_state (not from
/// the script): requests are served in the order they arrive, each at the
/// earliest whole microsecond at which the bucket holds its tokens once every
/// earlier reservation took its own at its due time; one due further than
/// `horizon` from its arrival, or further than it accepts to wait, is refused and takes
/// nothing. (A time earlier than the latest a key saw counts as that one:
/// the caller passes the latest.)
struct fifo_model {
  detail::bucket_state st;
  std::int64_t prev_due_ns = std::numeric_limits<std::int64_t>::min();

  fifo_model(std::uint64_t capacity, rate r, std::int64_t start_us)
      : st(capacity, detail::reduce(r), start_us * 1000, capacity) {}

  rd::reservation_result reserve(std::int64_t now_us, std::uint64_t n, std::uint64_t horizon_us,
                                 std::optional<std::int64_t> within_us) {
    detail::bucket_state next = st;
    const std::int64_t t = std::max(now_us * 1000, prev_due_ns);
    next.refill(t);
    std::int64_t due_ns = t;
    if (!next.has(n)) due_ns = next.last() + static_cast<std::int64_t>(next.ticks_until(n));
    const std::int64_t due_us = (due_ns + 999) / 1000;  // (times are whole microseconds)
    using st_t = rd::reservation_result::status;
    if (within_us && due_us - now_us > *within_us)
      return {st_t::refused_within, static_cast<std::uint64_t>(due_us)};
    if (due_us - now_us > static_cast<std::int64_t>(horizon_us))
      return {st_t::refused_horizon, static_cast<std::uint64_t>(due_us)};
    next.refill(due_us * 1000);
    BOOST_REQUIRE(next.has(n));
    next.take(n);
    st = next;
    prev_due_ns = due_us * 1000;
    return {st_t::reserved, static_cast<std::uint64_t>(due_us)};
  }
};

struct reserve_call {
  std::int64_t now_us;
  std::vector<rd::reserve_request> reqs;
};

/// Runs `calls` through the reservation script on `key` (pipelined) and
/// through fifo_model; compares every request's answer.
void reserve_side_by_side(boost::asio::io_context& ctx, redis_connection& conn,
                          const std::string& key, std::uint64_t capacity, rate r,
                          std::uint64_t horizon_us, const std::vector<reserve_call>& calls,
                          std::size_t& reserved, std::size_t& refused) {
  const auto rr = rd::make_reserve_rate(capacity, r, horizon_us);
  const std::string sha = rd::sha1_hex(rd::reserve_script);
  exec(ctx, conn, {"DEL", key});
  auto load = exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::reserve_script)});
  BOOST_REQUIRE(!load.ec);
  BOOST_REQUIRE_EQUAL(load.reply.str, sha);
  std::vector<std::optional<exec_result>> results(calls.size());
  for (std::size_t i = 0; i < calls.size(); ++i)
    conn.async_exec(rd::reserve_args(sha, key, rr, calls[i].reqs, calls[i].now_us),
                    [&results, i](boost::system::error_code ec, redis_reply reply) {
                      results[i] = exec_result{ec, std::move(reply)};
                    });
  BOOST_REQUIRE(run_until(
      ctx, [&] { return results.back().has_value(); }, 60s));
  fifo_model model(capacity, r, calls.front().now_us);
  std::int64_t seen = calls.front().now_us;  // a time before the latest seen counts as it
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const auto& c = calls[i];
    seen = std::max(seen, c.now_us);
    BOOST_REQUIRE(results[i].has_value());
    BOOST_REQUIRE_MESSAGE(!results[i]->ec, "call " << i << ": " << results[i]->ec.message() << " "
                                                   << results[i]->reply.str);
    std::uint64_t now = 0;
    std::vector<rd::reservation_result> got;
    BOOST_REQUIRE(!rd::parse_reserve_reply(results[i]->reply, c.reqs.size(), now, got));
    BOOST_REQUIRE_EQUAL(now, static_cast<std::uint64_t>(seen));
    for (std::size_t j = 0; j < c.reqs.size(); ++j) {
      const auto& q = c.reqs[j];
      const auto want = model.reserve(seen, q.n, horizon_us,
                                      q.within_us < 0 ? std::nullopt : std::optional(q.within_us));
      BOOST_REQUIRE_MESSAGE(got[j].what == want.what && got[j].due_us == want.due_us,
                            "call " << i << " request " << j << " (n=" << q.n << ", t=" << c.now_us
                                    << "): script says " << int(got[j].what) << " at "
                                    << got[j].due_us << ", the model " << int(want.what) << " at "
                                    << want.due_us);
      if (want.what == rd::reservation_result::status::reserved)
        ++reserved;
      else
        ++refused;
    }
  }
  exec(ctx, conn, {"DEL", key});
}

using server_fixture = redis_fixture;

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_script)

BOOST_FIXTURE_TEST_CASE(agrees_with_bucket_state, server_fixture) {
  struct config {
    std::uint64_t capacity;
    rate r;
  };
  const config configs[] = {
      {10, per_second(3)},  // tok 3, tick 10^6
      {1, rate{1, 1ns}},    // 1000 tokens per us
      {7, rate{5, 3ns}},    // period not a whole us
      {13, rate{7, 1300ns}},
      {100, rate{3, 7us}},
      {2'000'000, per_hour(7)},        // tick 3.6e9
      {9'007'199'253, per_second(1)},  // capacity * tick + tok just below 2^53
      {5, rate{1'000'000, 1ns}},       // 10^9 tokens per us
  };
  std::mt19937_64 rng(20261128);
  int i = 0;
  for (const auto& c : configs) {
    BOOST_TEST_CONTEXT("capacity " << c.capacity << ", " << c.r.tokens << " per "
                                   << c.r.period.count() << " ns") {
      side_by_side(ctx, conn, "sbs:" + std::to_string(i), c.capacity, c.r,
                   random_steps(rng, c.capacity, c.r, 1500, false));
      side_by_side(ctx, conn, "sbs-lease:" + std::to_string(i), c.capacity, c.r,
                   random_steps(rng, c.capacity, c.r, 500, true));
    }
    ++i;
  }
}

BOOST_FIXTURE_TEST_CASE(reservations_agree_with_a_fifo_bucket, server_fixture) {
  struct config {
    std::uint64_t capacity;
    rate r;
  };
  const config configs[] = {
      {10, per_second(3)},       {1, rate{1, 1ns}},   {7, rate{5, 3ns}},
      {13, rate{7, 1300ns}},     {100, rate{3, 7us}}, {2'000'000, per_hour(7)},
      {5, rate{1'000'000, 1ns}},
  };
  std::mt19937_64 rng(20261130);
  std::size_t reserved = 0, refused = 0;
  int i = 0;
  for (const auto& c : configs) {
    const auto sr = rd::make_script_rate(c.capacity, c.r);
    const std::uint64_t full_us = (c.capacity * sr.tick + sr.tok - 1) / sr.tok;
    const std::uint64_t token_us = std::max<std::uint64_t>(1, sr.tick / sr.tok);
    // Up to a few bucketfuls ahead, within what stays exact in Redis.
    const std::uint64_t room = (rd::max_exact - c.capacity * sr.tick - sr.tok) / sr.tok;
    const std::uint64_t horizon = std::min<std::uint64_t>(room, 1 + rng() % (3 * full_us + 1));
    std::vector<reserve_call> calls;
    std::int64_t now = 1'764'000'000'000'000;
    for (int k = 0; k < 600; ++k) {
      switch (rng() % 6) {
        case 0:
          break;
        case 1:
          now -= static_cast<std::int64_t>(rng() % (token_us * 3 + 1));  // back
          break;
        case 2:
          now += static_cast<std::int64_t>(
              rng() % (std::min<std::uint64_t>(2 * full_us, 1'000'000'000'000) + 1));
          break;
        default:
          now += static_cast<std::int64_t>(rng() % (token_us * 2 + 1));
          break;
      }
      reserve_call call{now, {}};
      const std::size_t count = 1 + rng() % 4;  // coalesced requests
      for (std::size_t j = 0; j < count; ++j) {
        rd::reserve_request q{rng() % 3 == 0
                                  ? c.capacity - rng() % std::min<std::uint64_t>(c.capacity, 2)
                                  : 1 + rng() % std::min<std::uint64_t>(c.capacity, 3)};
        // Some accept a shorter wait, a few a longer one than the horizon.
        if (rng() % 4 == 0) q.within_us = static_cast<std::int64_t>(rng() % (2 * horizon + 2));
        call.reqs.push_back(q);
      }
      calls.push_back(std::move(call));
    }
    BOOST_TEST_CONTEXT("capacity " << c.capacity << ", " << c.r.tokens << " per "
                                   << c.r.period.count() << " ns, horizon " << horizon << " us") {
      reserve_side_by_side(ctx, conn, "res:" + std::to_string(i), c.capacity, c.r, horizon, calls,
                           reserved, refused);
    }
    ++i;
  }
  // Both kinds of answer were exercised.
  BOOST_TEST(reserved > 1000u);
  BOOST_TEST(refused > 200u);
}

BOOST_FIXTURE_TEST_CASE(a_refund_gives_the_tokens_back_up_to_the_capacity, server_fixture) {
  // 10 tokens, 1 a millisecond; all times fixed (the test hook).
  const auto rr = rd::make_reserve_rate(10, per_second(1000), 1'000'000);
  const std::string rs = rd::sha1_hex(rd::reserve_script), fs = rd::sha1_hex(rd::refund_script);
  exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::reserve_script)});
  exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::refund_script)});
  const std::string key = "refund";
  exec(ctx, conn, {"DEL", key});
  const std::int64_t t0 = 1'764'000'000'000'000;
  auto reserve = [&](std::int64_t now, std::vector<std::uint64_t> ns) {
    std::vector<rd::reserve_request> reqs;
    for (std::uint64_t n : ns)
      reqs.push_back({n});
    auto res = exec(ctx, conn, rd::reserve_args(rs, key, rr, reqs, now));
    BOOST_REQUIRE_MESSAGE(!res.ec, res.reply.str);
    std::uint64_t at = 0;
    std::vector<rd::reservation_result> out;
    BOOST_REQUIRE(!rd::parse_reserve_reply(res.reply, ns.size(), at, out));
    return out;
  };
  auto refund = [&](std::uint64_t n, std::int64_t now) {
    auto res = exec(ctx, conn, rd::refund_args(fs, key, rr, {&n, 1}, now));
    BOOST_REQUIRE_MESSAGE(!res.ec, res.reply.str);
    BOOST_REQUIRE((res.reply.type == redis_reply::kind::integer));
    return res.reply.integer;
  };
  using st = rd::reservation_result::status;
  // 10 now, then 5 due 5 ms later, then 5 due 10 ms later.
  auto a = reserve(t0, {10, 5, 5});
  BOOST_TEST((a[0].what == st::reserved && a[0].due_us == std::uint64_t(t0)));
  BOOST_TEST((a[1].what == st::reserved && a[1].due_us == std::uint64_t(t0 + 5000)));
  BOOST_TEST((a[2].what == st::reserved && a[2].due_us == std::uint64_t(t0 + 10000)));
  // The first 5 given back before their due time: a request made now is due
  // when the second 5 would have been (a refunded token serves it; the
  // reservation made after the refunded one keeps its time).
  BOOST_TEST(refund(5, t0 + 1000) == 5);
  auto b = reserve(t0 + 1000, {5});
  BOOST_TEST((b[0].what == st::reserved && b[0].due_us == std::uint64_t(t0 + 10000)));
  // A refund after the due time gives back too (a reservation never granted:
  // a joint request forgot it once it was due): the level is then 5, and a
  // request is due at once.
  BOOST_TEST(refund(5, t0 + 10000) == 5);
  auto c = reserve(t0 + 10000, {1});
  BOOST_TEST((c[0].what == st::reserved && c[0].due_us == std::uint64_t(t0 + 10000)));
  // A clock set back counts as the key's last time: 4 + 5 = 9, due at once still.
  BOOST_TEST(refund(5, t0 + 9000) == 5);
  auto c2 = reserve(t0 + 9000, {9});
  BOOST_TEST((c2[0].what == st::reserved && c2[0].due_us == std::uint64_t(t0 + 10000)));
  // A refund never fills the bucket past its capacity: 20 ms on the bucket
  // is full again; 10 taken, given back twice over, leaves it full (10).
  auto d = reserve(t0 + 40000, {10});
  BOOST_TEST((d[0].what == st::reserved && d[0].due_us == std::uint64_t(t0 + 40000)));
  auto e = reserve(t0 + 40000, {3});
  BOOST_TEST((e[0].what == st::reserved && e[0].due_us == std::uint64_t(t0 + 43000)));
  BOOST_TEST(refund(3, t0 + 40000) == 3);
  BOOST_TEST(refund(10, t0 + 40000) == 10);  // (more than was taken since full)
  auto f = reserve(t0 + 40000, {10, 1});
  BOOST_TEST((f[0].what == st::reserved && f[0].due_us == std::uint64_t(t0 + 40000)));
  BOOST_TEST((f[1].what == st::reserved && f[1].due_us == std::uint64_t(t0 + 41000)));
  // One call gives back many reservations: at t0 + 41000 (f paid for), 2 and 3 more.
  auto g = reserve(t0 + 41000, {2, 3});
  BOOST_TEST((g[0].what == st::reserved && g[0].due_us == std::uint64_t(t0 + 43000)));
  BOOST_TEST((g[1].what == st::reserved && g[1].due_us == std::uint64_t(t0 + 46000)));
  const std::uint64_t items[] = {2, 3};
  auto back = exec(ctx, conn, rd::refund_args(fs, key, rr, items, t0 + 41000));
  BOOST_TEST(back.reply.integer == 5);
  // As if only f had been taken since full: empty at t0 + 41000.
  auto h = reserve(t0 + 41000, {5});
  BOOST_TEST((h[0].what == st::reserved && h[0].due_us == std::uint64_t(t0 + 46000)));
  exec(ctx, conn, {"DEL", key});
}

BOOST_FIXTURE_TEST_CASE(a_key_serves_one_mode_only, server_fixture) {
  const auto rr = rd::make_reserve_rate(10, per_second(3), 1000);
  const std::string key = "mode";
  exec(ctx, conn, {"DEL", key});
  const std::int64_t t0 = 1'764'000'000'000'000;
  const std::vector<rd::reserve_request> one{{1}};
  auto r = exec(ctx, conn, rd::reserve_args("", key, rr, one, t0));
  BOOST_REQUIRE(!r.ec);
  auto h = exec(ctx, conn, rd::script_args("", key, rr.rate, 1, 0, t0));
  BOOST_TEST(h.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(h.reply.str.find("configured as r:10:3:1000000") != std::string::npos);
  exec(ctx, conn, {"DEL", key});
  auto h2 = exec(ctx, conn, rd::script_args("", key, rr.rate, 1, 0, t0));
  BOOST_REQUIRE(!h2.ec);
  auto r2 = exec(ctx, conn, rd::reserve_args("", key, rr, one, t0));
  BOOST_TEST(r2.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(r2.reply.str.find("not r:10:3:1000000") != std::string::npos);
  exec(ctx, conn, {"DEL", key});
}

// EVALSHA names the script by the SHA-1 our own code computes (no private
// Boost header): FIPS 180 vectors here; agrees_with_bucket_state checks it
// against the server's SCRIPT LOAD.
BOOST_AUTO_TEST_CASE(sha1_vectors) {
  BOOST_TEST(rd::sha1_hex("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  BOOST_TEST(rd::sha1_hex("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d");
  BOOST_TEST(rd::sha1_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
             "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  BOOST_TEST(rd::sha1_hex(std::string(1'000'000, 'a')) ==
             "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
  // Padding at the block edges: 55 bytes fit one block with the length, 56 need two.
  BOOST_TEST(rd::sha1_hex(std::string(55, 'x')) == "cef734ba81a024479e09eb5a75b6ddae62e6abf1");
  BOOST_TEST(rd::sha1_hex(std::string(56, 'x')) == "901305367c259952f4e7af8323f480d59f81335b");
  BOOST_TEST(rd::sha1_hex(std::string(64, 'x')) == "bb2fa3ee7afb9f54c6dfb5d021f14b1ffe40c163");
}

BOOST_AUTO_TEST_CASE(rejects_inexact_configurations) {
  // capacity * tick + tok must not exceed 2^53.
  BOOST_CHECK_NO_THROW(rd::make_script_rate(9'007'199'253, per_second(1)));
  BOOST_CHECK_THROW(rd::make_script_rate(9'007'199'255, per_second(1)), std::invalid_argument);
  BOOST_CHECK_THROW(rd::make_script_rate(3'000'000, per_hour(7)), std::invalid_argument);
  BOOST_CHECK_THROW(rd::make_script_rate(0, per_second(1)), std::invalid_argument);
  BOOST_CHECK_THROW(rd::make_script_rate(1, rate{0, 1s}), std::invalid_argument);
  BOOST_CHECK_THROW(rd::make_script_rate(1, rate{~std::uint64_t{0}, 1ns}), std::invalid_argument);
  try {
    rd::make_script_rate(1'000'000'000'000, per_second(1));
    BOOST_FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    BOOST_TEST(std::string(e.what()).find("2^53") != std::string::npos);
  }
  // Reduction: 3 per second is 3 units per us, 10^6 units per token.
  const auto sr = rd::make_script_rate(10, per_second(3));
  BOOST_TEST(sr.tok == 3u);
  BOOST_TEST(sr.tick == 1'000'000u);
  const auto sr2 = rd::make_script_rate(10, rate{4, 2000ns});
  BOOST_TEST(sr2.tok == 2u);
  BOOST_TEST(sr2.tick == 1u);
}

BOOST_AUTO_TEST_CASE(reply_parser) {
  auto integer = [](long long v) {
    redis_reply r;
    r.type = redis_reply::kind::integer;
    r.integer = v;
    return r;
  };
  auto array = [](std::vector<redis_reply> e) {
    redis_reply r;
    r.type = redis_reply::kind::array;
    r.elements = std::move(e);
    return r;
  };
  rd::script_result res;
  BOOST_TEST(!rd::parse_script_reply(array({integer(1), integer(3), integer(0)}), res));
  BOOST_TEST(res.granted);
  BOOST_TEST(res.taken == 3u);
  BOOST_TEST(!rd::parse_script_reply(array({integer(0), integer(0), integer(250)}), res));
  BOOST_TEST(!res.granted);
  BOOST_TEST(res.wait_us == 250u);
  const auto bad = error::make_error_code(error::redis_bad_reply);
  BOOST_TEST(rd::parse_script_reply(array({integer(1), integer(3)}), res) == bad);
  BOOST_TEST(rd::parse_script_reply(array({integer(1), integer(3), integer(0), integer(0)}), res) ==
             bad);
  BOOST_TEST(rd::parse_script_reply(array({integer(2), integer(3), integer(0)}), res) == bad);
  BOOST_TEST(rd::parse_script_reply(array({integer(0), integer(0), integer(-1)}), res) == bad);
  BOOST_TEST(rd::parse_script_reply(array({integer(0), integer(0), integer(0)}), res) == bad);
  BOOST_TEST(rd::parse_script_reply(integer(1), res) == bad);
  redis_reply s;
  s.type = redis_reply::kind::string;
  s.str = std::string(1 << 20, 'x');  // a large reply of the wrong shape
  BOOST_TEST(rd::parse_script_reply(s, res) == bad);
  BOOST_TEST(rd::parse_script_reply(array({s, integer(0), integer(0)}), res) == bad);
  redis_reply e;
  e.type = redis_reply::kind::error;
  e.str = "ERR something";
  BOOST_TEST(rd::parse_script_reply(e, res) == error::make_error_code(error::redis_error));
}

BOOST_FIXTURE_TEST_CASE(a_reservation_key_expires_when_its_debt_is_paid_and_it_is_full,
                        server_fixture) {
  // On the server's clock: 10 tokens, 10 ms each, reservations up to 1 s ahead.
  const auto rr = rd::make_reserve_rate(10, per_second(100), 1'000'000);
  const std::vector<rd::reserve_request> ten{{10}}, five{{5}};
  exec(ctx, conn, {"DEL", "rexp"});
  // 10 now and 5 more in debt: full again 150 ms later; the key expires then.
  BOOST_REQUIRE(!exec(ctx, conn, rd::reserve_args("", "rexp", rr, ten)).ec);
  auto r = exec(ctx, conn, rd::reserve_args("", "rexp", rr, five));
  BOOST_REQUIRE(!r.ec);
  std::uint64_t now = 0;
  std::vector<rd::reservation_result> out;
  BOOST_REQUIRE(!rd::parse_reserve_reply(r.reply, 1, now, out));
  BOOST_TEST((out[0].what == rd::reservation_result::status::reserved));
  BOOST_TEST(out[0].due_us > now + 40'000);  // 50 ms of debt, less what passed
  BOOST_TEST(out[0].due_us <= now + 50'000);
  auto ttl = exec(ctx, conn, {"PTTL", "rexp"});
  BOOST_TEST(ttl.reply.integer > 100);
  BOOST_TEST(ttl.reply.integer <= 150);
  // After expiry the bucket is full: 10 due at once.
  BOOST_REQUIRE(run_until(
      ctx,
      [&] {
        return exec(ctx, conn, {"EXISTS", "rexp"}).reply.integer == 0;
      },
      3s));
  auto f = exec(ctx, conn, rd::reserve_args("", "rexp", rr, ten));
  BOOST_REQUIRE(!rd::parse_reserve_reply(f.reply, 1, now, out));
  BOOST_TEST((out[0].what == rd::reservation_result::status::reserved && out[0].due_us == now));
  // A refund that leaves it full deletes it at once: an idle bucket costs nothing.
  const std::uint64_t all = 10;
  BOOST_TEST(exec(ctx, conn, rd::refund_args("", "rexp", rr, {&all, 1})).reply.integer == 10);
  BOOST_TEST(exec(ctx, conn, {"EXISTS", "rexp"}).reply.integer == 0);
}

BOOST_FIXTURE_TEST_CASE(key_expires_when_full_again, server_fixture) {
  const auto sr = rd::make_script_rate(10, per_second(100));  // 10 ms per token
  const std::string sha = rd::script_sha1();
  exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::bucket_script)});
  // Taking 3 tokens: full again 30 ms later; the key expires then.
  auto r = exec(ctx, conn, rd::script_args(sha, "exp", sr, 3, 0));
  BOOST_REQUIRE(!r.ec);
  auto ttl = exec(ctx, conn, {"PTTL", "exp"});
  BOOST_TEST(ttl.reply.integer > 20);
  BOOST_TEST(ttl.reply.integer <= 30);
  // A request that leaves it full deletes it at once: an idle bucket costs nothing.
  exec(ctx, conn, {"DEL", "exp"});
  exec(ctx, conn, rd::script_args(sha, "exp", sr, 0, 0));
  BOOST_TEST(exec(ctx, conn, {"EXISTS", "exp"}).reply.integer == 0);
  // And after expiry the bucket is full (10 tokens at once).
  exec(ctx, conn, rd::script_args(sha, "exp", sr, 10, 0));
  BOOST_TEST(exec(ctx, conn, {"EXISTS", "exp"}).reply.integer == 1);
  BOOST_REQUIRE(run_until(
      ctx,
      [&] {
        return exec(ctx, conn, {"EXISTS", "exp"}).reply.integer == 0;
      },
      2s));
  rd::script_result res;
  BOOST_REQUIRE(
      !rd::parse_script_reply(exec(ctx, conn, rd::script_args(sha, "exp", sr, 10, 0)).reply, res));
  BOOST_TEST(res.granted);
}

BOOST_FIXTURE_TEST_CASE(script_refuses_bad_state, server_fixture) {
  const auto sr = rd::make_script_rate(10, per_second(100));
  const std::string sha = rd::script_sha1();
  exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::bucket_script)});
  // A key of another type.
  exec(ctx, conn, {"LPUSH", "list", "x"});
  auto r = exec(ctx, conn, rd::script_args(sha, "list", sr, 1, 0));
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(r.reply.str.find("WRONGTYPE") != std::string::npos);
  // A hash that is not a bucket.
  exec(ctx, conn, {"HSET", "hash", "l", "banana", "t", "1", "c", "10:1:10000"});
  r = exec(ctx, conn, rd::script_args(sha, "hash", sr, 1, 0));
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(r.reply.str.find("does not hold a bucket state") != std::string::npos);
  // A bucket made with another configuration.
  exec(ctx, conn, rd::script_args(sha, "other", rd::make_script_rate(10, per_second(7)), 1, 0));
  r = exec(ctx, conn, rd::script_args(sha, "other", sr, 1, 0));
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(r.reply.str.find("configured as") != std::string::npos);
  // Arguments the script cannot use.
  r = exec(ctx, conn, {"EVALSHA", sha, "1", "k", "10", "1", "1", "11", "0"});  // n > capacity
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  r = exec(ctx, conn, {"EVALSHA", sha, "1", "k", "ten", "1", "1", "1", "0"});
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  // The connection is fine after all that.
  BOOST_TEST(!exec(ctx, conn, {"PING"}).ec);
}

// A key that is not a bucket (another type, or a hash whose fields are not
// exactly l, t, c) is someone else's data: whatever is asked through the
// bucket, the script fails and leaves the key as it was, contents and
// expiry. (The old script read a hash without our fields as a missing key:
// it wrote its fields into it and set an expiry, and a request that left
// the bucket full deleted the key.)
BOOST_FIXTURE_TEST_CASE(foreign_keys_are_left_unchanged, server_fixture) {
  const auto sr = rd::make_script_rate(10, per_second(100));  // configuration "10:1:10000"
  const std::string full = std::to_string(10 * sr.tick);
  struct foreign {
    std::string key;
    std::vector<std::vector<std::string>> make;
  };
  const std::vector<foreign> keys = {
      {"f:string", {{"SET", "f:string", "hello"}}},
      {"f:list", {{"RPUSH", "f:list", "a", "b", "c"}}},
      {"f:set", {{"SADD", "f:set", "a", "b"}}},
      {"f:zset", {{"ZADD", "f:zset", "1", "a", "2", "b"}}},
      {"f:stream", {{"XADD", "f:stream", "1-1", "field", "value"}}},
      {"f:hash-foreign", {{"HSET", "f:hash-foreign", "foo", "bar"}}},
      // Our three fields, valid and of this configuration, plus someone's.
      {"f:hash-ours-and-foreign",
       {{"HSET", "f:hash-ours-and-foreign", "l", full, "t", "1", "c", "10:1:10000", "foo", "bar"}}},
      // Some of ours only.
      {"f:hash-l-t", {{"HSET", "f:hash-l-t", "l", full, "t", "1"}}},
      {"f:hash-c", {{"HSET", "f:hash-c", "c", "10:1:10000"}}},
      // Three fields, but not ours.
      {"f:hash-l-t-x", {{"HSET", "f:hash-l-t-x", "l", full, "t", "1", "x", "10:1:10000"}}},
  };
  const std::string sha = rd::script_sha1();
  BOOST_REQUIRE(exec(ctx, conn, {"SCRIPT", "LOAD", std::string(rd::bucket_script)}).reply.str ==
                sha);
  for (const bool with_ttl : {false, true}) {
    for (const auto& f : keys) {
      const std::string key = f.key + (with_ttl ? ":ttl" : "");
      BOOST_TEST_CONTEXT("key " << key) {
        for (auto cmd : f.make) {
          cmd[1] = key;
          BOOST_REQUIRE(!exec(ctx, conn, cmd).ec);
        }
        if (with_ttl) BOOST_REQUIRE(exec(ctx, conn, {"PEXPIRE", key, "600000"}).reply.integer == 1);
        const auto dump = exec(ctx, conn, {"DUMP", key}).reply;
        BOOST_REQUIRE((dump.type == redis_reply::kind::string));
        const long long ttl = exec(ctx, conn, {"PTTL", key}).reply.integer;

        // The script directly, first: 0 tokens (a missing key is a full
        // bucket, which stays full: the DEL branch; a bucket object grants 0
        // tokens without asking), and with the test hook's fixed time (HSET,
        // PERSIST).
        for (const auto& args : {rd::script_args(sha, key, sr, 0, 0),
                                 rd::script_args(sha, key, sr, 1, 0, 1'000'000)}) {
          const auto direct = exec(ctx, conn, args);
          BOOST_TEST(direct.ec == error::make_error_code(error::redis_error),
                     args[7] << " tokens: " << direct.reply.str);
          BOOST_TEST(exec(ctx, conn, {"EXISTS", key}).reply.integer == 1,
                     "deleted by a request for " << args[7] << " tokens");
        }

        // Then through a bucket: a token and the whole capacity (the write
        // branch: HSET, PEXPIRE), the next waiter after an error, a try.
        redis_token_bucket bucket(conn, key, 10, per_second(100));
        for (std::uint64_t n : {1, 10}) {
          auto o = request(bucket, n);
          BOOST_REQUIRE(run_until(ctx, [&] { return o->done(); }));
          BOOST_TEST(o->ec == error::make_error_code(error::redis_error), n << " tokens");
        }
        std::optional<std::pair<boost::system::error_code, bool>> t;
        bucket.async_try_get_token(1,
                                   [&](boost::system::error_code ec, bool g) { t.emplace(ec, g); });
        BOOST_REQUIRE(run_until(ctx, [&] { return t.has_value(); }));
        BOOST_TEST((t->first == error::make_error_code(error::redis_error) && !t->second));

        const auto after = exec(ctx, conn, {"DUMP", key}).reply;
        BOOST_TEST((after.type == redis_reply::kind::string), "the key is gone");
        BOOST_TEST((after.str == dump.str), "the contents changed");
        const long long ttl_after = exec(ctx, conn, {"PTTL", key}).reply.integer;
        if (with_ttl) {
          BOOST_TEST(ttl_after <= ttl);
          BOOST_TEST(ttl_after > ttl - 5000, "the expiry changed: " << ttl << " -> " << ttl_after);
        } else {
          BOOST_TEST(ttl_after == -1, "an expiry was set: " << ttl_after);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()
