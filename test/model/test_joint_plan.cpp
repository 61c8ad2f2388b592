// The joint acquire's scheduling core (detail/joint_scheduler.hpp, on
// detail/joint_plan.hpp: integer arithmetic on bucket_state) against the
// reference model (model/joint_model.hpp: exact rationals, written from the
// promise), on random sequences of every call, compared after every step:
// completions (ids, results, order), each bucket's available(), each queued
// request's planned T, retry_after and try_get for random parts, and what
// give_back returns. Rates include more than one token per ns, rates that do
// not divide a nanosecond, and the extremes; capacities up to 2^64-1; times
// up to the end of representable time (requests placed never).
#include "joint_model.hpp"

#include <ratelimit/detail/joint_scheduler.hpp>

#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#if defined(RATELIMIT_TEST_SANITIZED)
constexpr int rounds_divisor = 4;
#else
constexpr int rounds_divisor = 1;
#endif

namespace {

using ratelimit::detail::joint_completion;
using ratelimit::detail::joint_outcome;
using ratelimit::detail::joint_part;
using ratelimit::detail::joint_scheduler;
using ratelimit::model::joint_model;
using ratelimit::model::model_rate;
using ratelimit::model::part;
using ratelimit::model::result;
using ratelimit::model::rng;

constexpr std::int64_t ms = 1'000'000;
constexpr std::int64_t s = 1'000'000'000;
constexpr std::int64_t i64_max = std::numeric_limits<std::int64_t>::max();
constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();

result as_result(joint_outcome o) {
  switch (o) {
    case joint_outcome::granted:
      return result::granted;
    case joint_outcome::exceeds_capacity:
      return result::exceeds_capacity;
    case joint_outcome::closed:
      return result::closed;
    case joint_outcome::aborted:
      return result::aborted;
    case joint_outcome::timed_out:
      return result::timed_out;
  }
  return result::pending;
}

ratelimit::rate as_rate(model_rate r) {
  return {r.tokens, std::chrono::nanoseconds(r.period)};
}

std::vector<joint_part> as_parts(const std::vector<part>& parts) {
  std::vector<joint_part> out;
  for (const part& p : parts)
    out.push_back({p.bucket, p.n});
  return out;
}

/// One random run of `steps` calls on `buckets` buckets.
struct run {
  rng g;
  std::size_t buckets;
  bool tight;  // small capacities and slow rates: long queues, many backfills
  joint_model m{0};
  joint_scheduler x{0};
  std::int64_t now = 0;
  std::size_t seen = 0;
  std::vector<std::uint64_t> capacities{};
  int compared_plans = 0, granted = 0, backfilled = 0, never = 0, timed_out = 0;

  model_rate rate() {
    const model_rate special[] = {{3, 2},        {7, 11},          {5, 1},       {3, s},
                                  {1, 3600 * s}, {1, i64_max},     {u64_max, 1}, {u64_max, 7},
                                  {u64_max, ms}, {u64_max - 1, 2}, {2, 3},       {1, 1}};
    if (!tight && g.one_in(3)) return special[g.in(0, std::size(special) - 1)];
    const std::int64_t periods[] = {1, 3, 7, 1000, ms, 3 * ms};
    return {g.in(1, 5), periods[g.in(0, std::size(periods) - 1)]};
  }
  std::uint64_t capacity() { return !tight && g.one_in(10) ? u64_max - g.in(0, 1) : g.in(1, 8); }

  std::vector<part> parts() {
    std::vector<part> ps;
    for (std::size_t b = 0; b < buckets; ++b)
      if (g.one_in(2)) {
        const std::uint64_t c = capacities[b];
        std::uint64_t n = g.in(0, std::min<std::uint64_t>(c, 9));
        if (g.one_in(12)) n = c;
        if (g.one_in(25)) n = c + (c != u64_max);  // over the capacity
        ps.push_back({b, n});
      }
    if (ps.empty()) ps.push_back({g.in(0, buckets - 1), g.in(1, 3)});
    if (g.one_in(2)) std::swap(ps.front(), ps.back());
    return ps;
  }

  std::int64_t step_time() {
    switch (g.in(0, 9)) {
      case 0:
        return 0;
      case 1:
        return 1;
      case 2:
        return static_cast<std::int64_t>(g.in(1, 1000));
      case 3:
        return static_cast<std::int64_t>(g.in(1, 10)) * ms;
      case 4:
        return static_cast<std::int64_t>(g.in(1, 3)) * s;
      case 5:
        return g.one_in(8) ? i64_max / 2 : static_cast<std::int64_t>(g.in(1, 100)) * ms;
      default:
        return static_cast<std::int64_t>(g.in(1, 300)) * 1000;
    }
  }

  void advance() {
    const std::int64_t d = step_time();
    now = now > i64_max - d ? i64_max : now + d;
    if (g.one_in(20)) now -= static_cast<std::int64_t>(g.in(0, 5000));  // back: no effect
  }

  void compare(const char* after) {
    BOOST_TEST_CONTEXT("after " << after << " at " << now) {
      const auto& mc = m.completions();
      const auto& xc = x.completions();
      BOOST_TEST_REQUIRE(xc.size() == mc.size());
      for (; seen < mc.size(); ++seen) {
        BOOST_TEST_REQUIRE(xc[seen].id == mc[seen].id);
        BOOST_TEST_REQUIRE((as_result(xc[seen].how) == mc[seen].how));
        granted += mc[seen].how == result::granted;
        timed_out += mc[seen].how == result::timed_out;
      }
      for (std::size_t b = 0; b < buckets; ++b)
        BOOST_TEST_REQUIRE(x.available(b, now) == m.available(b, now));
      BOOST_TEST_REQUIRE(x.waiting() == m.waiting());
      for (std::uint64_t id = 0; id < m.requests(); ++id) {
        const auto want = m.planned_at(id);
        const auto got = x.planned_at(id);
        BOOST_TEST_REQUIRE(got.has_value() == want.has_value());
        if (want) {
          BOOST_TEST_REQUIRE(*got == *want);
          ++compared_plans;
        } else if (m.status(id) == result::pending) {
          ++never;
        }
      }
    }
  }

  void go(int steps) {
    const std::size_t n = buckets;
    for (std::size_t b = 0; b < n; ++b) {
      const std::uint64_t c = capacity();
      const model_rate r = rate();
      const std::uint64_t initial = g.one_in(2) ? c : g.in(0, std::min<std::uint64_t>(c, 8));
      capacities.push_back(c);
      BOOST_TEST_REQUIRE(m.add_bucket(c, r, initial, now) == b);
      BOOST_TEST_REQUIRE(x.add_bucket(c, as_rate(r), initial, now) == b);
    }
    std::vector<std::uint64_t> ids;
    for (int i = 0; i < steps; ++i) {
      switch (g.in(0, 15)) {
        case 0:
        case 1:
        case 2:
          advance();
          m.serve_due(now);
          x.serve_due(now);
          compare("time");
          break;
        case 3:
        case 4:
        case 5:
        case 6: {
          const auto ps = parts();
          // A blocking caller's deadline now and then: soon, or far.
          std::int64_t deadline = i64_max;
          if (g.one_in(4)) {
            const std::int64_t st = step_time();
            const std::int64_t d = g.one_in(2) ? st : st > i64_max / 10 ? i64_max : 10 * st;
            deadline = now > i64_max - d ? i64_max - 1 : now + d;
          }
          const auto id = m.request(ps, now, deadline);
          BOOST_TEST_REQUIRE(
              x.request(as_parts(ps), now, nullptr, std::nullopt, nullptr, deadline) == id);
          ids.push_back(id);
          compare("request");
          break;
        }
        case 7: {
          const auto ps = parts();
          const result want = m.try_get(ps, now);
          const auto got = x.try_get(as_parts(ps), now);
          BOOST_TEST_REQUIRE((got ? as_result(*got) : result::pending) == want);
          compare("try_get");
          break;
        }
        case 8: {
          const auto ps = parts();
          const auto want = m.retry_after(ps, now);
          const auto got = x.retry_after(as_parts(ps), now);
          BOOST_TEST_REQUIRE(got.has_value() == want.has_value());
          if (got) BOOST_TEST_REQUIRE(*got == *want);
          compare("retry_after");
          break;
        }
        case 9:
        case 10:
          if (!ids.empty()) {
            const auto id = ids[g.in(0, ids.size() - 1)];
            m.cancel(id, now);
            x.cancel(id, now);
            compare("cancel");
          }
          break;
        case 11:
          if (!ids.empty()) {
            const auto id = ids[g.in(0, ids.size() - 1)];
            const std::uint64_t k = g.in(0, 6);
            const auto want = m.give_back(id, k, now);
            const auto got = x.give_back(id, k, now);
            BOOST_TEST_REQUIRE(got == want);
            compare("give_back");
          }
          break;
        case 12:
          if (g.one_in(3)) {
            const std::size_t b = g.in(0, n - 1);
            const model_rate r = rate();
            m.set_rate(b, r, now);
            x.set_rate(b, as_rate(r), now);
            compare("set_rate");
          }
          break;
        case 13:
          if (g.one_in(3)) {
            const std::size_t b = g.in(0, n - 1);
            const std::uint64_t c = capacity();
            capacities[b] = c;
            m.set_capacity(b, c, now);
            x.set_capacity(b, c, now);
            compare("set_capacity");
          }
          break;
        case 14:
          if (g.one_in(8)) {
            const std::size_t b = g.in(0, n - 1);
            m.close(b, now);
            x.close(b, now);
            compare("close");
          }
          break;
        default:
          // To the T of a queued request: exactly, or 1 ns before or after.
          for (std::uint64_t id : ids)
            if (const auto t = m.planned_at(id); t && *t > now) {
              const int d = static_cast<int>(g.in(0, 2)) - 1;
              now = d > 0 && *t == i64_max ? *t : *t + d;
              m.serve_due(now);
              x.serve_due(now);
              compare("to a T");
              break;
            }
          break;
      }
    }
  }
};

/// 800 rounds (fewer do not always catch a candidate placed before its lower
/// bound: 240 did not); RATELIMIT_JOINT_PLAN_ROUNDS=n for a longer search.
int rounds() {
  const char* e = std::getenv("RATELIMIT_JOINT_PLAN_ROUNDS");
  return e ? std::atoi(e) : 800;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(joint_plan)

BOOST_AUTO_TEST_CASE(matches_the_reference_model_on_random_sequences) {
  int plans = 0, grants = 0, nevers = 0, late = 0;
  for (int round = 0; round < rounds() / rounds_divisor; ++round) {
    BOOST_TEST_CONTEXT("round " << round) {
      run r{rng{static_cast<std::uint64_t>(round) * 7919 + 1},
            static_cast<std::size_t>(2 + round % 3), round % 2 == 0};
      r.go(120);
      plans += r.compared_plans;
      grants += r.granted;
      nevers += r.never;
      late += r.timed_out;
    }
  }
  BOOST_TEST_MESSAGE("plans compared " << plans << ", grants " << grants << ", never placed "
                                       << nevers);
  BOOST_TEST_MESSAGE("deadlines that could not be met " << late);
  BOOST_TEST(plans > 1000);  // the runs do queue and plan
  BOOST_TEST(grants > 1000);
  BOOST_TEST(late > 100);  // blocking callers' deadlines fail, at once or when T moves
}

// Long queues, where placing a request passes over runs of segments that
// cannot hold it (joint_plan.hpp: room_after, skip_to). The model re-plans
// every queued request at every call, too slow for queues of hundreds, so
// here the planner's place() meets a brute force of the same rule
// (joint_plan.hpp's first paragraph): on each bucket the earliest t >= the
// lower bound whose take leaves a simulation of the whole plan feasible,
// trying the start of every segment and the moment the level reaches n in
// it; over the parts, the least t on which they all agree. Slow small
// buckets, bursts of requests and idle gaps (where the plan wastes tokens at
// the capacity), singles and joint requests of up to four parts.
namespace {

struct brute_plan {
  std::vector<ratelimit::detail::bucket_state> start;  // every bucket at now
  struct take {
    std::int64_t at;
    std::uint64_t n;
  };
  std::vector<std::vector<take>> takes;  // per bucket, in (time, id) order
  std::vector<std::optional<std::int64_t>> last_single;

  /// Does bucket b find every amount with "take n at c" added after the takes at <= c?
  bool feasible(std::size_t b, std::uint64_t n, std::int64_t c) const {
    ratelimit::detail::bucket_state st = start[b];
    bool added = false;
    auto one = [&st](std::int64_t at, std::uint64_t k) {
      st.refill(at);
      if (!st.has(k)) return false;
      st.take(k);
      return true;
    };
    for (const take& k : takes[b]) {
      if (!added && k.at > c) {
        if (!one(c, n)) return false;
        added = true;
      }
      if (!one(k.at, k.n)) return false;
    }
    return added || one(c, n);
  }

  std::optional<std::int64_t> earliest(std::size_t b, std::uint64_t n, std::int64_t from) const {
    std::vector<std::int64_t> starts{from};
    for (const take& k : takes[b])
      if (k.at > from) starts.push_back(k.at);
    std::optional<std::int64_t> best;
    for (std::int64_t s : starts) {
      // The level at s (after the takes at <= s), and when it reaches n.
      ratelimit::detail::bucket_state st = start[b];
      for (const take& k : takes[b])
        if (k.at <= s) {
          st.refill(k.at);
          st.take(k.n);
        }
      const auto r = ratelimit::detail::ready_from(st, s, n);
      for (std::int64_t c : {s, r.value_or(s)})
        if (c >= s && feasible(b, n, c) && (!best || c < *best)) best = c;
    }
    return best;
  }

  std::optional<std::int64_t> place(const std::vector<joint_part>& parts,
                                    std::int64_t made_at) const {
    std::int64_t t = made_at;
    for (const joint_part& p : parts)
      if (p.n > 0 && last_single[p.bucket]) t = std::max(t, *last_single[p.bucket]);
    for (;;) {
      std::int64_t next = t;
      for (const joint_part& p : parts) {
        const auto e = earliest(p.bucket, p.n, t);
        if (!e) return std::nullopt;
        next = std::max(next, *e);
      }
      if (next == t) return t;
      t = next;
    }
  }

  void add(const std::vector<joint_part>& parts, std::int64_t t) {
    const bool single = ratelimit::detail::is_single(parts);
    for (const joint_part& p : parts) {
      auto& ks = takes[p.bucket];
      const auto pos = std::upper_bound(ks.begin(), ks.end(), t,
                                        [](std::int64_t a, const take& x) { return a < x.at; });
      ks.insert(pos, take{t, p.n});
      if (single && p.n > 0) last_single[p.bucket] = std::max(last_single[p.bucket].value_or(t), t);
    }
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(places_as_a_brute_force_on_long_queues) {
  using ratelimit::detail::bucket_state;
  using ratelimit::detail::joint_planner;
  long placed = 0, joint = 0, later_than_made = 0;
  for (int round = 0; round < 24 / rounds_divisor; ++round) {
    BOOST_TEST_CONTEXT("round " << round) {
      rng g{static_cast<std::uint64_t>(round) * 104729 + 3};
      const std::size_t buckets = 2 + static_cast<std::size_t>(round % 3);
      const bool uniform = round % 4 == 3;  // one token a part, as W7b: long runs passed over
      std::vector<bucket_state> states;
      for (std::size_t b = 0; b < buckets; ++b) {
        const std::uint64_t c = g.in(1, 8);
        const std::int64_t periods[] = {7, 100 * 1000, ms, 3 * ms};
        const auto r = ratelimit::detail::reduce(
            {g.in(1, 3), std::chrono::nanoseconds(periods[g.in(0, std::size(periods) - 1)])});
        states.emplace_back(c, r, 0, g.in(0, c));
      }
      joint_planner plan(states, 0);
      brute_plan brute{states, std::vector<std::vector<brute_plan::take>>(buckets),
                       std::vector<std::optional<std::int64_t>>(buckets)};
      std::int64_t made = 0;
      for (std::uint64_t id = 0; id < 300; ++id) {
        // Bursts (made at once), small steps, and now and then an idle gap.
        made += g.one_in(3)    ? 0
                : g.one_in(20) ? static_cast<std::int64_t>(g.in(1, 50)) * ms
                               : static_cast<std::int64_t>(g.in(0, 200000));
        std::vector<joint_part> parts;
        for (std::size_t b = 0; b < buckets; ++b)
          if (g.one_in(2)) parts.push_back({b, uniform ? 1 : g.in(0, states[b].capacity())});
        if (parts.empty()) parts.push_back({g.in(0, buckets - 1), 1});
        const auto want = brute.place(parts, made);
        const auto got = plan.place(parts, made);
        BOOST_TEST_REQUIRE(want.has_value(), "request " << id);  // (times stay far from the end)
        BOOST_TEST_REQUIRE(got.has_value(), "request " << id);
        BOOST_TEST_REQUIRE(*got == *want, "request " << id);
        plan.add(id, parts, got);
        brute.add(parts, *got);
        ++placed;
        joint += !ratelimit::detail::is_single(parts);
        later_than_made += *got > made;
      }
    }
  }
  BOOST_TEST_MESSAGE("placed " << placed << " (" << joint << " joint, " << later_than_made
                               << " after they were made)");
  BOOST_TEST(later_than_made > placed / 2);  // the queues are saturated most of the time
  BOOST_TEST(joint > placed / 3);
}

BOOST_AUTO_TEST_CASE(a_single_backfills_past_a_joint_request_exactly_when_it_cannot_move_it) {
  // Bucket 0: capacity 4, 1/s, full; bucket 1: capacity 1, 1/s, empty.
  // J (0:4, 1:1) waits for bucket 1 until 1 s. A single for 0:1 made at 0
  // takes a token that would have overflowed by then: granted at once. A
  // second one would move J (3 + 1 < 4 at 1 s): it waits until after J, 2 s.
  joint_model m(0);
  joint_scheduler x(0);
  m.add_bucket(4, {1, s}, 4, 0);
  m.add_bucket(1, {1, s}, 0, 0);
  x.add_bucket(4, {1, std::chrono::seconds(1)}, 4, 0);
  x.add_bucket(1, {1, std::chrono::seconds(1)}, 0, 0);
  const std::vector<part> j{{0, 4}, {1, 1}};
  const std::vector<part> single{{0, 1}};
  for (const auto* ps : {&j, &single, &single}) {
    m.request(*ps, 0);
    x.request(as_parts(*ps), 0);
  }
  BOOST_TEST((x.planned_at(0) == std::optional<std::int64_t>(s)));
  BOOST_TEST(
      (x.completions() == std::vector<joint_completion>{{1, joint_outcome::granted}}));  // at once
  BOOST_TEST((x.planned_at(2) == std::optional<std::int64_t>(2 * s)));
  BOOST_TEST((x.planned_at(0) == m.planned_at(0)));
  BOOST_TEST((x.planned_at(2) == m.planned_at(2)));
  x.serve_due(2 * s);
  BOOST_TEST(x.completions().size() == 3u);
  BOOST_TEST(x.available(0, 2 * s) == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
