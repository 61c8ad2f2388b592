//
// test/model/test_joint_model.cpp: the joint-acquire reference model's own tests.
//
// The model is what a fuzzer will trust, so it is checked here against numbers
// worked out by hand, one promise at a time, against token_bucket_model for
// single-bucket sequences, and against brute force where the model computes
// something cleverly (earliest_feasible).
//
#include "joint_model.hpp"
#include "token_bucket_model.hpp"

#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <vector>

using ratelimit::model::completion;
using ratelimit::model::integer;
using ratelimit::model::joint_model;
using ratelimit::model::model_rate;
using ratelimit::model::part;
using ratelimit::model::rational;
using ratelimit::model::result;
using ratelimit::model::rng;
using ratelimit::model::token_bucket_model;

// For Boost.Test's messages about optional times: Boost.Test's own hook for
// a type one cannot give an operator<< (adding one to namespace std is
// undefined behaviour).
template <>
struct boost::test_tools::tt_detail::print_log_value<std::optional<std::int64_t>> {
  void operator()(std::ostream& os, const std::optional<std::int64_t>& t) {
    if (t) {
      os << *t;
    } else {
      os << "nullopt";
    }
  }
};

// The sanitizer trees run a quarter of the random rounds (the plain tree all).
#if defined(RATELIMIT_TEST_SANITIZED)
constexpr int rounds_divisor = 4;
#else
constexpr int rounds_divisor = 1;
#endif

namespace {

constexpr std::int64_t ms = 1'000'000;
constexpr std::int64_t i64_max = std::numeric_limits<std::int64_t>::max();
using opt = std::optional<std::int64_t>;

std::vector<completion> done(std::initializer_list<completion> c) {
  return c;
}

/// Random parts over `buckets` buckets, distinct, 1 or more, of 1..max_n tokens.
std::vector<part> random_parts(rng& g, std::size_t buckets, std::uint64_t max_n) {
  std::vector<part> parts;
  for (std::size_t b = 0; b < buckets; ++b)
    if (g.one_in(2)) parts.push_back({b, g.in(1, max_n)});
  if (parts.empty()) parts.push_back({g.in(0, buckets - 1), g.in(1, max_n)});
  if (g.one_in(2)) std::swap(parts.front(), parts.back());  // any order of buckets
  return parts;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(joint_model_tests)

// 1. A joint request waits for the slower bucket and is granted on both at T,
//    as of T.
BOOST_AUTO_TEST_CASE(waits_for_the_slower_bucket_granted_together_as_of_T) {
  joint_model m(0);
  const auto a = m.add_bucket(100, model_rate{1, ms}, 0, 0);      // 4 tokens at 4 ms
  const auto b = m.add_bucket(10, model_rate{1, 10 * ms}, 0, 0);  // 3 tokens at 30 ms
  BOOST_TEST(m.retry_after({{a, 4}, {b, 3}}, 0) == opt(30 * ms));
  const auto j = m.request({{a, 4}, {b, 3}}, 0);
  BOOST_TEST(m.planned_at(j) == opt(30 * ms));
  m.serve_due(30 * ms - 1);
  BOOST_TEST(m.status(j) == result::pending);
  BOOST_TEST(m.available(a, 30 * ms - 1) == 29u);  // nothing held while waiting
  BOOST_TEST(m.available(b, 30 * ms - 1) == 2u);
  m.serve_due(40 * ms);  // late: the grant is as of 30 ms
  BOOST_TEST(m.completions() == done({{j, result::granted}}));
  BOOST_TEST(m.granted_at(j) == opt(30 * ms));
  BOOST_TEST(m.available(a, 40 * ms) == 36u);  // 40 - 4
  BOOST_TEST(m.available(b, 40 * ms) == 1u);   // 4 - 3
  // Punctual: both drop at T.
  joint_model n(0);
  n.add_bucket(100, model_rate{1, ms}, 0, 0);
  n.add_bucket(10, model_rate{1, 10 * ms}, 0, 0);
  n.request({{b, 3}, {a, 4}}, 0);
  BOOST_TEST(n.available(a, 30 * ms) == 26u);
  BOOST_TEST(n.available(b, 30 * ms) == 0u);
  BOOST_TEST(n.level(b) == rational(0));
}

// 2a. Backfill into a full bucket: A (capacity 5, 1/ms) is full; the joint
//     request J = (A:3, B:2) waits for B until 20 ms. Taking k from A at t
//     leaves min(5, 5 - k + (20 ms - t)/ms) at 20 ms, which must be >= 3.
BOOST_AUTO_TEST_CASE(backfill_into_a_full_bucket_both_sides_of_the_boundary) {
  const auto make = [] {
    joint_model m(0);
    m.add_bucket(5, model_rate{1, ms}, 5, 0);        // A = 0
    m.add_bucket(10, model_rate{1, 10 * ms}, 0, 0);  // B = 1
    const auto j = m.request({{0, 3}, {1, 2}}, 0);
    BOOST_TEST(m.planned_at(j) == opt(20 * ms));
    return m;
  };
  {  // k = 4 at 18 ms: 1 + 2 = 3 at 20 ms: granted at once, J unmoved.
    joint_model m = make();
    BOOST_TEST(m.retry_after({{0, 4}}, 18 * ms) == opt(0));
    const auto s = m.request({{0, 4}}, 18 * ms);
    BOOST_TEST(m.status(s) == result::granted);
    BOOST_TEST(m.available(0, 18 * ms) == 1u);
    BOOST_TEST(m.planned_at(0) == opt(20 * ms));
    m.serve_due(20 * ms);
    BOOST_TEST(m.status(0) == result::granted);
    BOOST_TEST(m.available(0, 20 * ms) == 0u);  // 3 - 3
  }
  {  // k = 4 one ns later: 2.999999 at 20 ms would move J; after J (2 left) at 22 ms.
    joint_model m = make();
    BOOST_TEST(m.retry_after({{0, 4}}, 18 * ms + 1) == opt(4 * ms - 1));
    const auto s = m.request({{0, 4}}, 18 * ms + 1);
    BOOST_TEST(m.planned_at(s) == opt(22 * ms));
    BOOST_TEST(m.planned_at(0) == opt(20 * ms));
    m.serve_due(30 * ms);
    BOOST_TEST(m.completions() == done({{0, result::granted}, {s, result::granted}}));
    BOOST_TEST(m.granted_at(s) == opt(22 * ms));
  }
  {  // k = 5 at 18 ms: 0 + 2 < 3; after J (2 left) at 23 ms.
    joint_model m = make();
    const auto s = m.request({{0, 5}}, 18 * ms);
    BOOST_TEST(m.planned_at(s) == opt(23 * ms));
  }
  {  // The feasible set of "take 4" is [0, 18 ms] and [22 ms, ...): not monotone.
    joint_model m = make();
    BOOST_TEST(m.feasible_at(0, 4, 0));
    BOOST_TEST(m.feasible_at(0, 4, 18 * ms));
    BOOST_TEST(!m.feasible_at(0, 4, 18 * ms + 1));
    BOOST_TEST(!m.feasible_at(0, 4, 22 * ms - 1));
    BOOST_TEST(m.feasible_at(0, 4, 22 * ms));
    BOOST_TEST(m.earliest_feasible(0, 4, 18 * ms) == opt(18 * ms));
    BOOST_TEST(m.earliest_feasible(0, 4, 18 * ms + 1) == opt(22 * ms));
  }
  {  // K = (A:4, C:1), C ready at 19 ms: A is feasible at 0 and at 19 ms it is
     // not, so K is placed at 22 ms (the iteration over the parts).
    joint_model m = make();
    m.add_bucket(10, model_rate{1, 19 * ms}, 0, 0);  // C = 2
    const auto k = m.request({{0, 4}, {2, 1}}, 0);
    BOOST_TEST(m.planned_at(k) == opt(22 * ms));
    BOOST_TEST(m.planned_at(0) == opt(20 * ms));
  }
}

// 2b. Backfill of queued requests: A (capacity 5, 1/ms) starts empty; J =
//     (A:3, B:2) is placed at 20 ms by B. Single requests on A made after J
//     go before it exactly while A still holds 3 at 20 ms.
BOOST_AUTO_TEST_CASE(backfill_of_queued_requests_never_moves_the_joint_request) {
  joint_model m(0);
  m.add_bucket(5, model_rate{1, ms}, 0, 0);
  m.add_bucket(10, model_rate{1, 10 * ms}, 0, 0);
  const auto j = m.request({{0, 3}, {1, 2}}, 0);
  BOOST_TEST(m.planned_at(j) == opt(20 * ms));
  // S1 = A:2 at 2 ms (0 left, 5 again by 7 ms, >= 3 at 20 ms).
  const auto s1 = m.request({{0, 2}}, 0);
  BOOST_TEST(m.planned_at(s1) == opt(2 * ms));
  // S2..S4 = A:5 each as soon as A is full again: 7, 12, 17 ms (S4 leaves 3 at 20 ms).
  const auto s2 = m.request({{0, 5}}, 0);
  const auto s3 = m.request({{0, 5}}, 0);
  const auto s4 = m.request({{0, 5}}, 0);
  BOOST_TEST(m.planned_at(s2) == opt(7 * ms));
  BOOST_TEST(m.planned_at(s3) == opt(12 * ms));
  BOOST_TEST(m.planned_at(s4) == opt(17 * ms));
  // S5 = A:5: at 17..20 ms it would need 5 by 22 ms, past J; after J (0 left) at 25 ms.
  const auto s5 = m.request({{0, 5}}, 0);
  BOOST_TEST(m.planned_at(s5) == opt(25 * ms));
  // S6 = A:1: at 18 ms it would leave 2 < 3 at 20 ms; at 21 ms 4 < 5 at 25 ms: 26 ms.
  const auto s6 = m.request({{0, 1}}, 0);
  BOOST_TEST(m.planned_at(s6) == opt(26 * ms));
  BOOST_TEST(m.planned_at(j) == opt(20 * ms));  // never moved
  m.serve_due(30 * ms);
  BOOST_TEST(m.completions() == done({{s1, result::granted},
                                      {s2, result::granted},
                                      {s3, result::granted},
                                      {s4, result::granted},
                                      {j, result::granted},
                                      {s5, result::granted},
                                      {s6, result::granted}}));
  BOOST_TEST(m.granted_at(s4) == opt(17 * ms));
  BOOST_TEST(m.granted_at(j) == opt(20 * ms));
  BOOST_TEST(m.granted_at(s5) == opt(25 * ms));
  BOOST_TEST(m.granted_at(s6) == opt(26 * ms));
  BOOST_TEST(m.available(0, 30 * ms) == 4u);
}

// 3. No request is moved by one made after it: without cancels, rate or
//    capacity changes or give-backs, request R's fate (grant time, or its
//    plan at the end) is the same whether the requests and tries made after
//    it happen or not. Also: everything completes (no deadlock), never
//    before it was made.
BOOST_AUTO_TEST_CASE(later_requests_never_move_earlier_ones) {
  struct op {
    int kind;  // 0 request, 1 try_get, 2 time step
    std::vector<part> parts;
    std::int64_t dt;
  };
  struct outcome {
    result how;
    opt at;  // granted_at, or planned_at while pending
  };
  rng g{42};
  int checked = 0, backfilled = 0;
  for (int round = 0; round < 60 / rounds_divisor; ++round) {
    const std::size_t nb = g.in(2, 3);
    std::vector<std::pair<std::uint64_t, model_rate>> config;
    for (std::size_t b = 0; b < nb; ++b)
      config.push_back({g.in(1, 6), model_rate{g.in(1, 3), static_cast<std::int64_t>(g.in(1, 4))}});
    std::vector<op> ops;
    std::uint64_t requests = 0;
    while (requests < 10) {
      const auto k = g.in(0, 5);
      if (k <= 2) {
        ops.push_back({0, random_parts(g, nb, 6), 0});
        ++requests;
      } else if (k == 3) {
        ops.push_back({1, random_parts(g, nb, 6), 0});
      } else {
        ops.push_back({2, {}, static_cast<std::int64_t>(g.in(0, 6))});
      }
    }
    // Runs the ops, leaving out the requests after `last` and every try made after it.
    const auto run = [&](std::uint64_t last) {
      joint_model m(0);
      for (auto& [c, r] : config)
        m.add_bucket(c, r, c / 2, 0);
      std::int64_t now = 0;
      std::uint64_t next = 0;
      std::vector<std::int64_t> made;
      for (const op& o : ops) {
        if (o.kind == 2) {
          now += o.dt;
          m.serve_due(now);
        } else if (next <= last && o.kind == 0) {
          m.request(o.parts, now);
          made.push_back(now);
          ++next;
        } else if (next <= last && o.kind == 1) {
          m.try_get(o.parts, now);
        }
      }
      std::vector<outcome> out;
      for (std::uint64_t id = 0; id < next; ++id) {
        const result how = m.status(id);
        out.push_back({how, how == result::granted ? m.granted_at(id) : m.planned_at(id)});
      }
      m.serve_due(now + 1000);  // everything completes: nothing is placed never
      BOOST_TEST(m.waiting() == 0u);
      for (std::uint64_t id = 0; id < next; ++id) {
        if (m.status(id) != result::granted) continue;
        BOOST_TEST(*m.granted_at(id) >= made[id]);
        if (id + 1 < next && m.status(id + 1) == result::granted &&
            *m.granted_at(id + 1) < *m.granted_at(id))
          ++backfilled;
      }
      return out;
    };
    const std::vector<outcome> all = run(requests - 1);
    for (std::uint64_t r = 0; r + 1 < requests; ++r) {
      const std::vector<outcome> prefix = run(r);
      BOOST_TEST(prefix[r].how == all[r].how);
      BOOST_TEST(prefix[r].at == all[r].at, "round " << round << " request " << r);
      ++checked;
    }
  }
  BOOST_TEST(checked == 60 / rounds_divisor * 9);
  BOOST_TEST(backfilled > 0);  // the generator does exercise backfilling
}

// 4. A single bucket is strict FIFO and the same as token_bucket_model:
//    completions, exact level, available(), retry_after(), try_get(), through
//    requests (n >= 1), tries, cancels, set_rate, set_capacity, close and
//    time steps. Both are served at every step, as the fuzz harness does.
//    At every rate, including more than 1 token per ns (3 per 2 ns, u64 max
//    per ns), where plain feasibility would backfill into what overflows
//    within the nanosecond a grant is rounded up to (the next test), and
//    with capacities up to u64 max.
BOOST_AUTO_TEST_CASE(single_bucket_sequences_match_token_bucket_model) {
  rng g{7};
  constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();
  constexpr std::int64_t s = 1'000'000'000;
  const std::int64_t periods[] = {1, 3, 7, 1000, ms, 3 * ms};
  // Those test_model.cpp uses, and more than 1 token per ns.
  const model_rate special[] = {{3, 2},
                                {7, 11},
                                {5, 1},
                                {3, s},
                                {s, s},
                                {1, 3600 * s},
                                {1, i64_max},
                                {u64_max, 1},
                                {u64_max, 7},
                                {u64_max, ms},
                                {u64_max, i64_max},
                                {u64_max - 1, 2}};
  const auto rate = [&] {
    if (g.one_in(3)) return special[g.in(0, std::size(special) - 1)];
    const std::int64_t p = periods[g.in(0, 5)];
    return model_rate{g.in(1, 5), p};
  };
  const auto capacity = [&]() -> std::uint64_t {
    return g.one_in(10) ? u64_max - g.in(0, 1) : g.in(1, 8);
  };
  int steps = 0, waits = 0, fast = 0;
  for (int round = 0; round < 200 / rounds_divisor; ++round) {
    const std::uint64_t cap = capacity();
    const model_rate r0 = rate();
    const std::uint64_t init = g.one_in(2) ? 0 : g.in(0, cap);
    token_bucket_model t(cap, r0, init, 0);
    joint_model j(0);
    j.add_bucket(cap, r0, init, 0);
    std::int64_t now = 0;
    for (int step = 0; step < 60; ++step, ++steps) {
      now += static_cast<std::int64_t>(g.in(0, 3)) * (g.one_in(2) ? 1 : periods[g.in(0, 5)]);
      t.serve_due(now);
      j.serve_due(now);
      const std::uint64_t c = t.capacity();
      std::uint64_t n = g.in(1, std::min<std::uint64_t>(c, 8));
      if (g.one_in(5)) n = c < u64_max ? c + g.in(0, 1) : c;  // all of it, or too many
      if (integer(t.rate().tokens) > t.rate().period) ++fast;
      switch (g.in(0, 9)) {
        case 0:
        case 1:
        case 2:
          BOOST_TEST(t.request(n, now) == j.request({{0, n}}, now));
          break;
        case 3:
          BOOST_TEST(t.try_get(n, now) == (j.try_get({{0, n}}, now) == result::granted));
          break;
        case 4:
          if (t.requests() > 0) {
            const auto id = g.in(0, t.requests() - 1);
            t.cancel(id, now);
            j.cancel(id, now);
          }
          break;
        case 5: {
          const model_rate r = rate();
          t.set_rate(r, now);
          j.set_rate(0, r, now);
        } break;
        case 6: {
          const std::uint64_t to = capacity();
          t.set_capacity(to, now);
          j.set_capacity(0, to, now);
        } break;
        case 7:
          if (g.one_in(10)) {
            t.close(now);
            j.close(0, now);
          }
          break;
        default: {
          const auto w = t.retry_after(n, now);
          BOOST_TEST(w == j.retry_after({{0, n}}, now));
          if (w && *w > 0) ++waits;
        } break;
      }
      BOOST_TEST(t.completions() == j.completions(), "round " << round << " step " << step);
      BOOST_TEST(t.level() == j.level(0));
      BOOST_TEST(t.waiting() == j.waiting());
      BOOST_TEST(t.available(now) == j.available(0, now));
      if (t.completions() != j.completions()) {
        for (const auto& c : t.completions())
          BOOST_TEST_MESSAGE("t " << c);
        for (const auto& c : j.completions())
          BOOST_TEST_MESSAGE("j " << c);
        return;  // one message is enough
      }
    }
  }
  BOOST_TEST(steps == 200 / rounds_divisor * 60);
  BOOST_TEST(waits > 0);
  BOOST_TEST(fast > 1000 / rounds_divisor);  // rates above 1 token per ns are exercised
}

// FIFO among singles, even where feasibility alone would let a later request
// through: capacity 2, 3 tokens per 2 ns, empty at 0. R1 = 2 tokens, there
// at 4/3 ns, granted at 2 ns (when 3 would have accrued: 1 overflows). R2 = 1
// token taken at 1 ns (1.5 - 1) would still leave 0.5 + 1.5 = 2 at 2 ns, so
// plain backfilling would place R2 at 1 ns, before R1; but R1 is a single
// request, so R2 waits for it: 0 at 2 ns, 1 token at 2 + 2/3 -> 3 ns, as in
// token_bucket_model. A part of 0 tokens does not make a request joint.
BOOST_AUTO_TEST_CASE(single_requests_never_pass_a_single_request) {
  for (const bool zero_part : {false, true}) {
    joint_model m(0);
    m.add_bucket(2, model_rate{3, 2}, 0, 0);
    m.add_bucket(1, model_rate{1, 2}, 0, 0);
    const auto r1 = zero_part ? m.request({{0, 2}, {1, 0}}, 0) : m.request({{0, 2}}, 0);
    BOOST_TEST(m.feasible_at(0, 1, 1));  // feasibility alone would allow 1 ns
    BOOST_TEST(m.retry_after({{0, 1}}, 0) == opt(3));
    BOOST_TEST(m.try_get({{0, 1}}, 1) == result::pending);  // nor a try behind R1
    const auto r2 = m.request({{0, 1}}, 1);
    BOOST_TEST(m.planned_at(r1) == opt(2));
    BOOST_TEST(m.planned_at(r2) == opt(3));
    m.serve_due(2);
    BOOST_TEST(m.completions() == done({{r1, result::granted}}));
    m.serve_due(3);
    BOOST_TEST(m.completions() == done({{r1, result::granted}, {r2, result::granted}}));
    BOOST_TEST(m.level(0) == rational(1, 2));
  }
  token_bucket_model t(2, model_rate{3, 2}, 0, 0);
  t.request(2, 0);
  t.request(1, 1);
  t.serve_due(2);
  BOOST_TEST(t.completions() == done({{0, result::granted}}));
  t.serve_due(3);
  BOOST_TEST(t.completions() == done({{0, result::granted}, {1, result::granted}}));
  BOOST_TEST(t.level() == rational(1, 2));
}

// The exception: behind a JOINT request, a single request still backfills,
// using tokens that would otherwise overflow before the joint request's T.
// The same bucket A (capacity 2, 3 per 2 ns, empty) and B (capacity 1, 1 per
// 2 ns, empty): J = (A:2, B:1) is placed at 2 ns (A has 2 at 4/3 ns, B 1 at
// 2 ns). S = A:1 at 1 ns leaves 0.5, 2 again at 2 ns: J is not moved, so S
// goes first, at 1 ns.
BOOST_AUTO_TEST_CASE(a_single_request_backfills_past_a_joint_one_with_overflow_tokens) {
  joint_model m(0);
  m.add_bucket(2, model_rate{3, 2}, 0, 0);
  m.add_bucket(1, model_rate{1, 2}, 0, 0);
  const auto j = m.request({{0, 2}, {1, 1}}, 0);
  BOOST_TEST(m.planned_at(j) == opt(2));
  BOOST_TEST(m.retry_after({{0, 1}}, 0) == opt(1));
  const auto s = m.request({{0, 1}}, 0);
  BOOST_TEST(m.planned_at(s) == opt(1));
  BOOST_TEST(m.planned_at(j) == opt(2));  // not moved
  // A second A:1 behind S: not before S (1 ns); at 1 ns S leaves 0.5; at 2 ns
  // J takes first (id order) and leaves 0: 1 token at 2 + 2/3 -> 3 ns.
  const auto s2 = m.request({{0, 1}}, 0);
  BOOST_TEST(m.planned_at(s2) == opt(3));
  m.serve_due(3);
  BOOST_TEST(m.completions() ==
             done({{s, result::granted}, {j, result::granted}, {s2, result::granted}}));
  BOOST_TEST(m.granted_at(s) == opt(1));
  BOOST_TEST(m.granted_at(j) == opt(2));
}

// A single request behind a single request behind a joint one: it may pass
// the joint request but not the single. A (capacity 5, 1/ms, empty), B
// (capacity 10, 1 per 10 ms, empty): J = (A:3, B:2) at 20 ms. At 18 ms A is
// full (5). S1 = A:5 would leave 0 + 2 < 3 at 20 ms: after J, 2 left, 5 at
// 23 ms. S2 = A:1 at 18 ms would move no one (4, 5 at 20 ms, J leaves 2, 5
// at 23 ms) but S1 is single and ahead of it: 0 after S1 at 23 ms, 24 ms.
BOOST_AUTO_TEST_CASE(a_single_request_passes_a_joint_one_but_not_a_single_one) {
  const auto make = [] {
    joint_model m(0);
    m.add_bucket(5, model_rate{1, ms}, 0, 0);
    m.add_bucket(10, model_rate{1, 10 * ms}, 0, 0);
    m.request({{0, 3}, {1, 2}}, 0);
    return m;
  };
  joint_model m = make();
  const auto s1 = m.request({{0, 5}}, 18 * ms);
  BOOST_TEST(m.planned_at(0) == opt(20 * ms));
  BOOST_TEST(m.planned_at(s1) == opt(23 * ms));
  BOOST_TEST(m.feasible_at(0, 1, 18 * ms));  // feasibility alone would allow 18 ms
  BOOST_TEST(m.retry_after({{0, 1}}, 18 * ms) == opt(6 * ms));
  const auto s2 = m.request({{0, 1}}, 18 * ms);
  BOOST_TEST(m.status(s2) == result::pending);
  BOOST_TEST(m.planned_at(s2) == opt(24 * ms));
  m.serve_due(30 * ms);
  BOOST_TEST(m.completions() ==
             done({{0, result::granted}, {s1, result::granted}, {s2, result::granted}}));
  BOOST_TEST(m.granted_at(s2) == opt(24 * ms));
  // Without S1, S2 passes J: granted at once.
  joint_model n = make();
  const auto alone = n.request({{0, 1}}, 18 * ms);
  BOOST_TEST(n.status(alone) == result::granted);
  BOOST_TEST(n.planned_at(0) == opt(20 * ms));
  // A joint request behind S1 may not pass it either (C is free).
  joint_model k = make();
  k.add_bucket(10, model_rate{1, ms}, 10, 0);
  k.request({{0, 5}}, 18 * ms);
  const auto jk = k.request({{0, 1}, {2, 1}}, 18 * ms);
  BOOST_TEST(k.planned_at(jk) == opt(24 * ms));
}

// 5. All or nothing: a queued joint request that is cancelled, closed or made
//    too big takes nothing from any bucket: the levels are those of a twin
//    model where it was never made.
BOOST_AUTO_TEST_CASE(all_or_nothing_on_cancel_close_and_set_capacity) {
  const auto make = [](bool with_j) {
    joint_model m(0);
    m.add_bucket(100, model_rate{1, ms}, 5, 0);      // A: 5 + t/ms
    m.add_bucket(10, model_rate{1, 10 * ms}, 0, 0);  // B: t/10ms
    if (with_j) {
      const auto j = m.request({{0, 3}, {1, 5}}, 0);
      BOOST_TEST(m.planned_at(j) == opt(50 * ms));
    }
    return m;
  };
  joint_model twin = make(false);
  BOOST_TEST(twin.available(0, 20 * ms) == 25u);
  BOOST_TEST(twin.available(1, 20 * ms) == 2u);
  const auto same_levels = [&](joint_model& m, std::int64_t now) {
    BOOST_TEST(m.level(0) == twin.level(0));
    BOOST_TEST(m.level(1) == twin.level(1));
    BOOST_TEST(m.available(0, now) == twin.available(0, now));
    BOOST_TEST(m.available(1, now) == twin.available(1, now));
  };
  {
    joint_model m = make(true);
    BOOST_TEST(m.available(0, 20 * ms) == 25u);  // nothing held while waiting
    m.cancel(0, 20 * ms);
    BOOST_TEST(m.completions() == done({{0, result::aborted}}));
    same_levels(m, 20 * ms);
    same_levels(m, 60 * ms);  // and not taken at 50 ms either
  }
  twin = make(false);
  twin.available(0, 20 * ms);
  {
    joint_model m = make(true);
    m.close(1, 20 * ms);
    BOOST_TEST(m.completions() == done({{0, result::closed}}));
    same_levels(m, 20 * ms);
    same_levels(m, 60 * ms);
    const auto late = m.request({{0, 1}, {1, 1}}, 60 * ms);  // B refuses it, A gives nothing
    BOOST_TEST(m.status(late) == result::closed);
    same_levels(m, 60 * ms);
  }
  twin = make(false);
  twin.available(0, 20 * ms);
  {
    joint_model m = make(true);
    m.set_capacity(1, 4, 20 * ms);  // J's 5 from B no longer fits
    twin.set_capacity(1, 4, 20 * ms);
    BOOST_TEST(m.completions() == done({{0, result::exceeds_capacity}}));
    same_levels(m, 20 * ms);
    same_levels(m, 60 * ms);
    const auto over = m.request({{0, 1}, {1, 5}}, 60 * ms);  // at once: A keeps its token
    BOOST_TEST(m.status(over) == result::exceeds_capacity);
    same_levels(m, 60 * ms);
  }
}

// A request that leaves re-places only those made after it (here earlier);
// close(b) ends a request with a part of 0 tokens on b too.
BOOST_AUTO_TEST_CASE(leaving_re_plans_later_requests_only) {
  joint_model m(0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  const auto r1 = m.request({{0, 2}}, 0);          // 2 ms
  const auto j = m.request({{0, 5}, {1, 5}}, 0);   // A: 0 after r1, 5 at 7 ms
  const auto r3 = m.request({{0, 3}}, 0);          // 0 after j: 10 ms
  const auto z = m.request({{0, 10}, {1, 0}}, 0);  // 0 after r3: 20 ms
  BOOST_TEST(m.planned_at(j) == opt(7 * ms));
  BOOST_TEST(m.planned_at(r3) == opt(10 * ms));
  BOOST_TEST(m.planned_at(z) == opt(20 * ms));
  m.cancel(j, 1 * ms);
  BOOST_TEST(m.planned_at(r1) == opt(2 * ms));  // before j: unmoved
  BOOST_TEST(m.planned_at(r3) == opt(5 * ms));  // after j: earlier
  BOOST_TEST(m.planned_at(z) == opt(15 * ms));
  m.close(1, 1 * ms);
  BOOST_TEST(m.completions() == done({{j, result::aborted}, {z, result::closed}}));
  BOOST_TEST(m.planned_at(r3) == opt(5 * ms));
  m.serve_due(5 * ms);
  BOOST_TEST(m.status(r3) == result::granted);
  BOOST_TEST(m.available(0, 5 * ms) == 0u);
}

// 6. Requests naming buckets in opposite orders all complete, each at the
//    instant worked out by hand (A, B: capacity 10, 1/ms, empty at 0).
BOOST_AUTO_TEST_CASE(opposite_orders_all_complete) {
  joint_model m(0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  const auto r1 = m.request({{0, 5}, {1, 5}}, 0);   // 5 ms
  const auto r2 = m.request({{1, 5}, {0, 5}}, 0);   // both empty again: 10 ms
  const auto r3 = m.request({{0, 10}, {1, 1}}, 0);  // A full again at 20 ms
  const auto r4 = m.request({{1, 10}, {0, 1}}, 0);  // B: 9 after r3, full at 21 ms
  BOOST_TEST(m.planned_at(r1) == opt(5 * ms));
  BOOST_TEST(m.planned_at(r2) == opt(10 * ms));
  BOOST_TEST(m.planned_at(r3) == opt(20 * ms));
  BOOST_TEST(m.planned_at(r4) == opt(21 * ms));
  m.serve_due(21 * ms);
  BOOST_TEST(m.completions() == done({{r1, result::granted},
                                      {r2, result::granted},
                                      {r3, result::granted},
                                      {r4, result::granted}}));
  BOOST_TEST(m.available(0, 21 * ms) == 0u);
  BOOST_TEST(m.available(1, 21 * ms) == 0u);
}

// Grants due at one instant complete in id order, in one call.
BOOST_AUTO_TEST_CASE(grants_at_one_instant_in_id_order) {
  joint_model m(0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  const auto r1 = m.request({{1, 3}}, 0);
  const auto r2 = m.request({{0, 3}}, 0);
  const auto r3 = m.request({{0, 1}, {1, 1}}, 0);  // 4 ms
  BOOST_TEST(m.planned_at(r1) == opt(3 * ms));
  BOOST_TEST(m.planned_at(r2) == opt(3 * ms));
  BOOST_TEST(m.planned_at(r3) == opt(4 * ms));
  m.serve_due(10 * ms);
  BOOST_TEST(m.completions() ==
             done({{r1, result::granted}, {r2, result::granted}, {r3, result::granted}}));
}

// 7. give_back: up to k per part, never more than that part was granted, each
//    bucket capped at its capacity; it wakes a waiter as of the give-back.
BOOST_AUTO_TEST_CASE(give_back_caps_and_wakes_a_waiter) {
  joint_model m(0);
  m.add_bucket(10, model_rate{1, ms}, 10, 0);
  m.add_bucket(10, model_rate{1, ms}, 10, 0);
  const auto r = m.request({{0, 8}, {1, 2}}, 0);
  BOOST_TEST(m.status(r) == result::granted);
  // At 1 ms: A 3, B 9. A gets 5 back (8); B gets 2 (all it was granted), capped at 10.
  BOOST_TEST(m.give_back(r, 5, 1 * ms) == std::vector<std::uint64_t>({5, 2}));
  BOOST_TEST(m.available(0, 1 * ms) == 8u);
  BOOST_TEST(m.available(1, 1 * ms) == 10u);
  // A holds 3 more of r's tokens; the bucket takes 2 of them (cap).
  BOOST_TEST(m.give_back(r, 5, 1 * ms) == std::vector<std::uint64_t>({3, 0}));
  BOOST_TEST(m.available(0, 1 * ms) == 10u);
  BOOST_TEST(m.give_back(r, 5, 2 * ms) == std::vector<std::uint64_t>({0, 0}));
  BOOST_TEST(m.give_back(99, 5, 2 * ms).empty());  // no such request

  // A waiter woken: A (10, 1 per 10 ms) full; r takes all; w needs 6 (60 ms).
  joint_model n(0);
  n.add_bucket(10, model_rate{1, 10 * ms}, 10, 0);
  const auto all = n.request({{0, 10}}, 0);
  const auto w = n.request({{0, 6}}, 0);
  BOOST_TEST(n.planned_at(w) == opt(60 * ms));
  BOOST_TEST(n.give_back(w, 5, 10 * ms).empty());  // queued: nothing to give back
  BOOST_TEST(n.planned_at(w) == opt(60 * ms));
  BOOST_TEST(n.give_back(all, 3, 10 * ms) == std::vector<std::uint64_t>({3}));  // 1 + 3 = 4
  BOOST_TEST(n.planned_at(w) == opt(30 * ms));                                  // 2 more by 30 ms
  BOOST_TEST(n.give_back(all, 1, 20 * ms) == std::vector<std::uint64_t>({1}));  // 5 + 1 = 6
  BOOST_TEST(n.completions() == done({{all, result::granted}, {w, result::granted}}));
  BOOST_TEST(n.granted_at(w) == opt(20 * ms));  // as of the give-back
  BOOST_TEST(n.available(0, 20 * ms) == 0u);
  BOOST_TEST(n.available(0, 30 * ms) == 1u);
}

// 8. retry_after for a joint request is T - now of the request made then;
//    0 exactly when try_get would take it; nothing when it fails at once.
BOOST_AUTO_TEST_CASE(retry_after_is_the_T_the_request_gets) {
  rng g{99};
  int waited = 0, at_once = 0, held_by_a_single = 0, bounded = 0;
  const auto nonzero = [](const std::vector<part>& parts) {
    std::vector<std::size_t> b;
    for (const part& p : parts)
      if (p.n > 0) b.push_back(p.bucket);
    return b;
  };
  for (int round = 0; round < 120 / rounds_divisor; ++round) {
    joint_model m(0);
    const std::size_t nb = g.in(2, 3);
    const bool fast = round % 2 == 1;  // more than 1 token per ns: overflow within a ns
    for (std::size_t b = 0; b < nb; ++b)
      m.add_bucket(g.in(1, 6),
                   fast ? model_rate{g.in(2, 7), static_cast<std::int64_t>(g.in(1, 2))}
                        : model_rate{g.in(1, 3), static_cast<std::int64_t>(g.in(1, 5))},
                   g.in(0, 1), 0);
    std::int64_t now = 0;
    std::vector<std::vector<part>> made;  // by id
    for (int step = 0; step < 12; ++step) {
      now += static_cast<std::int64_t>(g.in(0, fast ? 1 : 4));
      auto parts = random_parts(g, nb, 7);
      if (g.one_in(6)) parts[g.in(0, parts.size() - 1)].n = 0;  // not a part for the order
      const auto w = m.retry_after(parts, now);
      // Brute force: T = now + w is the first t >= now, and >= the T of every
      // queued single request (one part of n >= 1) on a bucket where this one
      // has a part of n >= 1, at which every part is feasible.
      const auto all_parts_feasible = [&](std::int64_t t) {
        bool ok = true;
        for (const part& p : parts)
          ok = ok && m.feasible_at(p.bucket, p.n, t);
        return ok;
      };
      std::int64_t bound = m.now();
      for (std::uint64_t id = 0; id < made.size(); ++id) {
        const auto ahead = nonzero(made[id]);
        const auto mine = nonzero(parts);
        if (m.status(id) != result::pending || ahead.size() != 1 ||
            std::find(mine.begin(), mine.end(), ahead[0]) == mine.end())
          continue;
        bound = std::max(bound, m.planned_at(id).value_or(i64_max));
      }
      if (w && *w < 200) {
        BOOST_TEST(m.now() + *w >= bound);
        BOOST_TEST(all_parts_feasible(m.now() + *w));
        for (std::int64_t t = bound; t < m.now() + *w; ++t)
          BOOST_TEST(!all_parts_feasible(t), "round " << round << " step " << step << " t " << t);
        if (bound > m.now()) ++bounded;
        for (std::int64_t t = m.now(); t < bound; ++t)
          if (all_parts_feasible(t)) {
            ++held_by_a_single;  // feasibility alone would have placed it earlier
            break;
          }
      }
      joint_model copy = m;
      const result tried = copy.try_get(parts, now);
      const auto id = m.request(parts, now);
      made.push_back(parts);
      if (!w) {
        BOOST_TEST(m.status(id) == result::exceeds_capacity);
        BOOST_TEST(tried == result::exceeds_capacity);
      } else if (*w == 0) {
        ++at_once;
        BOOST_TEST(m.status(id) == result::granted);
        BOOST_TEST(m.granted_at(id) == opt(now));
        BOOST_TEST(tried == result::granted);
        for (std::size_t b = 0; b < nb; ++b)
          BOOST_TEST(copy.level(b) == m.level(b));  // the try took the same
      } else {
        ++waited;
        BOOST_TEST(m.planned_at(id) == opt(now + *w));
        BOOST_TEST(tried == result::pending);
      }
    }
  }
  BOOST_TEST(waited > 0);
  BOOST_TEST(at_once > 0);
  BOOST_TEST_MESSAGE("bounded " << bounded << " held " << held_by_a_single);
  BOOST_TEST(held_by_a_single > 0);  // the FIFO bound does bind
}

// earliest_feasible (segments, one candidate each) against brute force:
// feasible_at (a direct simulation) at every ns of a window.
BOOST_AUTO_TEST_CASE(earliest_feasible_matches_brute_force) {
  rng g{2024};
  int compared = 0, not_monotone = 0;
  for (int round = 0; round < 300 / rounds_divisor; ++round) {
    joint_model m(0);
    const std::size_t nb = 2;
    for (std::size_t b = 0; b < nb; ++b) {
      const std::uint64_t cap = g.in(1, 6);
      m.add_bucket(cap, model_rate{g.in(1, 2), static_cast<std::int64_t>(g.in(1, 3))}, g.in(0, cap),
                   0);
    }
    std::int64_t now = 0;
    for (int k = 0; k < 6; ++k) {
      now += static_cast<std::int64_t>(g.in(0, 2));
      const auto parts = random_parts(g, nb, 6);
      bool fits = true;
      for (const part& p : parts)
        fits = fits && p.n <= m.capacity(p.bucket);
      if (fits) m.request(parts, now);
    }
    const std::int64_t window = 80;
    for (std::size_t b = 0; b < nb; ++b) {
      for (std::uint64_t n = 0; n <= m.capacity(b); ++n) {
        std::vector<bool> ok;
        for (std::int64_t t = m.now(); t < m.now() + window; ++t)
          ok.push_back(m.feasible_at(b, n, t));
        for (std::size_t i = 1; i + 1 < ok.size(); ++i)
          if (ok[i - 1] && !ok[i]) ++not_monotone;
        for (std::int64_t from = m.now(); from < m.now() + window / 2; ++from) {
          opt expected;
          for (std::int64_t t = from; t < m.now() + window && !expected; ++t)
            if (ok[t - m.now()]) expected = t;
          const opt got = m.earliest_feasible(b, n, from);
          if (expected) {
            BOOST_TEST(got == expected, "round " << round << " bucket " << b << " n " << n);
          } else {
            BOOST_TEST((!got || *got >= m.now() + window));
          }
          ++compared;
        }
      }
    }
  }
  BOOST_TEST(compared > 0);
  BOOST_TEST(not_monotone > 0);  // the non-monotone case does occur
}

BOOST_AUTO_TEST_CASE(at_once_failures_and_invalid_parts) {
  joint_model m(0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  m.add_bucket(5, model_rate{1, ms}, 5, 0);
  BOOST_CHECK_THROW(m.request({{0, 1}, {0, 1}}, 0), std::invalid_argument);  // twice
  BOOST_CHECK_THROW(m.request({}, 0), std::invalid_argument);
  BOOST_CHECK_THROW(m.request({{2, 1}}, 0), std::invalid_argument);  // no such bucket
  BOOST_CHECK_THROW(m.try_get({{1, 1}, {1, 1}}, 0), std::invalid_argument);
  BOOST_CHECK_THROW(m.retry_after({{1, 1}, {1, 1}}, 0), std::invalid_argument);
  BOOST_CHECK_THROW(m.set_capacity(0, 0, 0), std::invalid_argument);
  BOOST_CHECK_THROW(m.set_rate(0, model_rate{0, 1}, 0), std::invalid_argument);
  BOOST_TEST(m.requests() == 0u);  // no id consumed
  const auto over = m.request({{1, 1}, {0, 11}}, 0);
  BOOST_TEST(over == 0u);
  BOOST_TEST(m.status(over) == result::exceeds_capacity);
  BOOST_TEST(m.available(1, 0) == 5u);  // nothing taken from the other bucket
  BOOST_TEST(!m.retry_after({{0, 11}}, 0));
  BOOST_TEST(m.try_get({{1, 1}, {0, 11}}, 0) == result::exceeds_capacity);
  // A part of 0 tokens delays no one and never waits, even behind a waiter.
  const auto w = m.request({{0, 4}}, 0);
  const auto zero = m.request({{0, 0}, {1, 5}}, 0);
  BOOST_TEST(m.status(zero) == result::granted);
  BOOST_TEST(m.planned_at(w) == opt(4 * ms));
  m.close(1, 1 * ms);
  // closed wins over exceeds_capacity.
  BOOST_TEST(m.status(m.request({{0, 11}, {1, 1}}, 1 * ms)) == result::closed);
  BOOST_TEST(!m.retry_after({{0, 1}, {1, 1}}, 1 * ms));
  BOOST_TEST(m.try_get({{1, 0}}, 1 * ms) == result::closed);
  BOOST_TEST(m.status(w) == result::pending);  // not on the closed bucket
}

// try_get takes at once exactly when a request made now would be placed now,
// gets no id, and changes no one's plan.
BOOST_AUTO_TEST_CASE(try_get_takes_only_what_the_plan_can_spare) {
  joint_model m(0);
  m.add_bucket(5, model_rate{1, ms}, 5, 0);
  m.add_bucket(10, model_rate{1, 10 * ms}, 0, 0);
  const auto j = m.request({{0, 3}, {1, 2}}, 0);                // 20 ms
  BOOST_TEST(m.try_get({{0, 5}}, 18 * ms) == result::pending);  // would move J
  BOOST_TEST(m.available(0, 18 * ms) == 5u);
  BOOST_TEST(m.try_get({{0, 4}}, 18 * ms) == result::granted);
  BOOST_TEST(m.available(0, 18 * ms) == 1u);
  BOOST_TEST(m.requests() == 1u);  // no id
  BOOST_TEST(m.planned_at(j) == opt(20 * ms));
  BOOST_TEST(m.try_get({{1, 1}}, 18 * ms) == result::pending);  // B: 1.8 - 1 + 0.2 < 2 at 20 ms
  BOOST_TEST(m.try_get({{0, 1}, {1, 1}}, 18 * ms) == result::pending);  // all or nothing
  BOOST_TEST(m.available(0, 18 * ms) == 1u);
  BOOST_TEST(m.try_get({{1, 1}}, 30 * ms) == result::granted);  // after J: 0 + 1
  BOOST_TEST(m.granted_at(j) == opt(20 * ms));
  BOOST_TEST(m.available(1, 30 * ms) == 0u);
}

// The end of representable time: a request whose tokens cannot come by
// INT64_MAX is placed never and blocks its buckets (as token_bucket_model's
// head does); one whose tokens come exactly at INT64_MAX is granted then.
BOOST_AUTO_TEST_CASE(end_of_time) {
  const model_rate slow{1, i64_max};  // 1 token per INT64_MAX ns
  joint_model m(0);
  m.add_bucket(10, slow, 0, 0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  token_bucket_model t(10, slow, 0, 0);
  const auto never = m.request({{0, 2}, {1, 1}}, 0);
  t.request(2, 0);
  BOOST_TEST(!m.planned_at(never));
  BOOST_TEST(m.status(never) == result::pending);
  const auto one = m.request({{0, 1}}, 0);  // 1 token by INT64_MAX, but behind `never`
  t.request(1, 0);
  BOOST_TEST(!m.planned_at(one));
  BOOST_TEST(m.retry_after({{0, 1}}, 5) == t.retry_after(1, 5));
  BOOST_TEST(m.retry_after({{0, 1}}, 5) == opt(i64_max - 5));
  const auto other = m.request({{1, 1}}, 5);  // B keeps `never`'s token at INT64_MAX
  BOOST_TEST(m.planned_at(other) == opt(1 * ms));
  m.serve_due(i64_max);
  BOOST_TEST(m.status(never) == result::pending);
  BOOST_TEST(m.status(one) == result::pending);
  BOOST_TEST(m.status(other) == result::granted);
  // Cancelling the blocker lets `one` through, exactly at INT64_MAX.
  joint_model n(0);
  n.add_bucket(10, slow, 0, 0);
  const auto blocker = n.request({{0, 2}}, 0);
  const auto single = n.request({{0, 1}}, 0);
  n.cancel(blocker, 1);
  BOOST_TEST(n.planned_at(single) == opt(i64_max));
  BOOST_TEST(n.retry_after({{0, 1}}, 1) == opt(i64_max - 1));
  n.serve_due(i64_max);
  BOOST_TEST(n.granted_at(single) == opt(i64_max));
}

// Re-planning after a change of rate or capacity moves the queued requests.
BOOST_AUTO_TEST_CASE(set_rate_and_set_capacity_re_plan) {
  const auto make = [] {
    joint_model m(0);
    m.add_bucket(10, model_rate{1, ms}, 0, 0);
    m.request({{0, 8}}, 0);  // 8 ms
    m.request({{0, 2}}, 0);  // 10 ms
    return m;
  };
  joint_model a = make();
  a.set_rate(0, model_rate{2, ms}, 2 * ms);  // 2 at 2 ms, then 2/ms
  BOOST_TEST(a.planned_at(0) == opt(5 * ms));
  BOOST_TEST(a.planned_at(1) == opt(6 * ms));
  joint_model b = make();
  b.set_capacity(0, 5, 2 * ms);  // the 8 fails; the 2 are there
  BOOST_TEST(b.completions() == done({{0, result::exceeds_capacity}, {1, result::granted}}));
  BOOST_TEST(b.granted_at(1) == opt(2 * ms));
  BOOST_TEST(b.available(0, 2 * ms) == 0u);
}

BOOST_AUTO_TEST_CASE(clock_going_back_has_no_effect) {
  joint_model m(0);
  m.add_bucket(10, model_rate{1, ms}, 0, 0);
  BOOST_TEST(m.available(0, 5 * ms) == 5u);
  BOOST_TEST(m.available(0, -100 * ms) == 5u);
  BOOST_TEST(m.now() == 5 * ms);
  const auto r = m.request({{0, 7}}, 1 * ms);  // made at 5 ms, the latest time seen
  BOOST_TEST(m.planned_at(r) == opt(7 * ms));
}

BOOST_AUTO_TEST_SUITE_END()
