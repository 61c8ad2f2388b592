// The token arithmetic, tested without Asio: exhaustively over small
// configurations against a reference written with plain fractions, at the
// edges of the integer range, and through random sequences of rate changes
// against exact rational numbers (boost::multiprecision).
#include <ratelimit/detail/bucket_state.hpp>

#include <boost/multiprecision/cpp_int.hpp>
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <limits>
#include <random>
#include <string>

using ratelimit::detail::bucket_state;
using ratelimit::detail::max_time;
using ratelimit::detail::reduce;
using ratelimit::detail::reduced_rate;
using ratelimit::detail::uint128;
using namespace std::chrono_literals;
using rational = boost::multiprecision::cpp_rational;
using integer = boost::multiprecision::cpp_int;

namespace {

constexpr std::uint64_t u64max = std::numeric_limits<std::uint64_t>::max();
const integer two64 = integer(1) << 64;

/// The reference: the level as the fraction num/den tokens, den = the rate's
/// period in ns (not reduced), refilled by adding tokens*dt/den and capping.
struct reference {
  uint128 num;  // level * den
  uint128 den;
  uint128 cap;  // capacity * den
  uint128 per_ns;
  std::int64_t last;

  reference(std::uint64_t capacity, ratelimit::rate r, std::int64_t now, std::uint64_t initial)
      : num(static_cast<uint128>(initial) * r.period.count()),
        den(r.period.count()),
        cap(static_cast<uint128>(capacity) * r.period.count()),
        per_ns(r.tokens),
        last(now) {}

  void refill(std::int64_t now) {
    if (now <= last) return;
    num += static_cast<uint128>(now - last) * per_ns;
    if (num > cap) num = cap;
    last = now;
  }
  std::uint64_t available() const { return static_cast<std::uint64_t>(num / den); }
  bool take(std::uint64_t n) {
    if (num < n * den) return false;
    num -= n * den;
    return true;
  }
};

integer big(uint128 v) {
  return integer(static_cast<std::uint64_t>(v >> 64)) << 64 | static_cast<std::uint64_t>(v);
}

/// The level a bucket_state holds, exactly, in tokens: (level + residue / 2^64) / ticks.
rational exact_level(const bucket_state& s) {
  return rational(big(s.level()) * two64 + s.residue(), integer(s.rate().ticks) * two64);
}

/// floor(q), for q >= 0.
integer floor_of(const rational& q) {
  return numerator(q) / denominator(q);
}

/// The documented set_rate rule, applied to an exact level: rounded down to a
/// multiple of 2^-64 of the new unit, 1/u of a token, u = period / gcd(tokens,
/// period) in ns: the denominator of tokens/period in lowest terms.
rational round_per_promise(const rational& level, ratelimit::rate r) {
  const integer u = denominator(rational(integer(r.tokens), integer(r.period.count())));
  return rational(floor_of(level * u * two64), u * two64);
}

/// A bucket kept twice in exact rational numbers of tokens: `unrounded` as if
/// rate changes kept every fraction, `promised` rounded at each change as
/// documented. Refill adds elapsed * tokens / period (the period as given) to
/// both and caps them; take removes tokens from both.
struct exact_bucket {
  std::uint64_t capacity;
  ratelimit::rate r;
  std::int64_t last;
  rational unrounded;
  rational promised;
  int changes = 0;

  exact_bucket(std::uint64_t capacity, ratelimit::rate r, std::int64_t now, std::uint64_t initial)
      : capacity(capacity), r(r), last(now), unrounded(initial), promised(initial) {}

  void refill(std::int64_t now) {
    if (now <= last) return;
    const rational gained((integer(now) - last) * r.tokens, integer(r.period.count()));
    last = now;
    unrounded = std::min(rational(unrounded + gained), rational(capacity));
    promised = std::min(rational(promised + gained), rational(capacity));
  }
  void take(std::uint64_t n) {
    unrounded -= n;
    promised -= n;
  }
  void set_rate(ratelimit::rate r2) {
    promised = round_per_promise(promised, r2);
    r = r2;
    ++changes;
  }
  void set_capacity(std::uint64_t c) {
    capacity = c;
    unrounded = std::min(unrounded, rational(c));
    promised = std::min(promised, rational(c));
  }

  // The answers the promised level gives.
  std::uint64_t available() const { return floor_of(promised).convert_to<std::uint64_t>(); }
  bool has(std::uint64_t n) const { return promised >= n; }
  /// The exact wait for n tokens, in whole ns (not saturated).
  integer wait(const integer& n) const {
    if (promised >= n) return 0;
    const rational t = (n - promised) * r.period.count() / r.tokens;
    return (numerator(t) + denominator(t) - 1) / denominator(t);
  }
  integer ticks_until(const integer& n) const { return std::min(wait(n), integer(max_time)); }
  /// The time itself saturates, not the wait: from before the clock's epoch a
  /// wait longer than max_time can end at a representable time.
  integer ready_at(const integer& n) const {
    return std::min(integer(last) + wait(n), integer(max_time));
  }
};

std::string str(uint128 v) {
  if (v == 0) return "0";
  std::string s;
  for (; v; v /= 10)
    s.insert(s.begin(), char('0' + int(v % 10)));
  return s;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(rate_validation)

BOOST_AUTO_TEST_CASE(reduces_to_lowest_terms) {
  BOOST_TEST((reduce(ratelimit::per_second(1000)) == reduced_rate{1, 1'000'000}));
  BOOST_TEST((reduce(ratelimit::per_second(3)) == reduced_rate{3, 1'000'000'000}));
  BOOST_TEST((reduce(ratelimit::per_second(1'000'000'000)) == reduced_rate{1, 1}));
  BOOST_TEST((reduce(ratelimit::per_second(4'000'000'000)) == reduced_rate{4, 1}));
  BOOST_TEST((reduce(ratelimit::per_hour(1)) == reduced_rate{1, 3'600'000'000'000}));
  BOOST_TEST((reduce(ratelimit::rate{6, 4ns}) == reduced_rate{3, 2}));
}

BOOST_AUTO_TEST_CASE(rejects_what_is_not_a_positive_rate) {
  auto says = [](const char* what) {
    return [what](const std::invalid_argument& e) {
      return std::string(e.what()).find(what) != std::string::npos;
    };
  };
  BOOST_CHECK_EXCEPTION(reduce(ratelimit::rate{0, 1s}), std::invalid_argument,
                        says("at least one token"));
  BOOST_CHECK_EXCEPTION(reduce(ratelimit::rate{1, 0s}), std::invalid_argument,
                        says("period must be positive"));
  BOOST_CHECK_EXCEPTION(reduce(ratelimit::rate{1, -5s}), std::invalid_argument,
                        says("period must be positive"));
  BOOST_CHECK_EXCEPTION(ratelimit::detail::check_capacity(0), std::invalid_argument,
                        says("capacity must be at least 1"));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(exhaustive_small)

// Every capacity 1..4, rate tokens 1..5 per period 1..9 ns, initial level
// 0..capacity, and every sequence of refill steps from {0,1,2,3,5} ns of
// length 5 with a request of 1..capacity after each step: the state agrees
// with the reference on every decision and every available() count.
BOOST_AUTO_TEST_CASE(matches_reference_on_every_short_history) {
  const std::int64_t steps[] = {0, 1, 2, 3, 5};
  std::uint64_t histories = 0;
  for (std::uint64_t cap = 1; cap <= 4; ++cap)
    for (std::uint64_t tokens = 1; tokens <= 5; ++tokens)
      for (std::int64_t period = 1; period <= 9; ++period)
        for (std::uint64_t initial = 0; initial <= cap; ++initial) {
          const ratelimit::rate r{tokens, std::chrono::nanoseconds(period)};
          // 5^5 step sequences; requests cycle through 1..cap.
          for (int code = 0; code < 3125; ++code) {
            bucket_state s(cap, reduce(r), 100, initial);
            reference ref(cap, r, 100, initial);
            std::int64_t t = 100;
            int c = code;
            for (int i = 0; i < 5; ++i, c /= 5) {
              t += steps[c % 5];
              const std::uint64_t want = 1 + (i + code) % cap;
              s.refill(t);
              ref.refill(t);
              if (s.available() != ref.available()) {
                BOOST_FAIL("available differs: cap " << cap << " rate " << tokens << "/" << period
                                                     << "ns initial " << initial << " code " << code
                                                     << " step " << i);
              }
              const bool got = s.try_take(t, want);
              if (got != ref.take(want)) BOOST_FAIL("decision differs at code " << code);
            }
            ++histories;
          }
        }
  BOOST_TEST_MESSAGE(histories << " histories checked");
  BOOST_TEST(histories == 5u * 9 * (2 + 3 + 4 + 5) * 3125);
}

// ticks_until(n) is the exact earliest time: n tokens are not there one
// nanosecond before it and are there at it. Checked by stepping 1 ns at a time.
BOOST_AUTO_TEST_CASE(ticks_until_is_the_earliest_nanosecond) {
  for (std::uint64_t cap = 1; cap <= 5; ++cap)
    for (std::uint64_t tokens = 1; tokens <= 4; ++tokens)
      for (std::int64_t period = 1; period <= 11; ++period)
        for (std::uint64_t initial = 0; initial <= cap; ++initial)
          for (std::uint64_t n = 0; n <= cap; ++n) {
            const auto rr = reduce(ratelimit::rate{tokens, std::chrono::nanoseconds(period)});
            bucket_state s(cap, rr, 0, initial);
            const std::uint64_t wait = s.ticks_until(n);
            BOOST_TEST(s.ready_at(n) == static_cast<std::int64_t>(wait));
            bucket_state probe = s;
            if (wait > 0) {
              probe.refill(static_cast<std::int64_t>(wait) - 1);
              BOOST_TEST(!probe.has(n));
            }
            probe.refill(static_cast<std::int64_t>(wait));
            BOOST_TEST(probe.has(n));
          }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(exactness)

// Odd rates, irregular refill steps, a consumer taking what it can: after
// 10^11 ns (100 s) the total handed out is exactly initial + floor(elapsed * rate),
// never one token more or less.
BOOST_AUTO_TEST_CASE(no_drift_over_billions_of_tokens) {
  const ratelimit::rate rates[] = {
      {3, 7ns}, {1'000'000'007, 1s}, {7, 3s}, {1, 1ns}, {999'983, 1'000'003ns}};
  for (const auto& r : rates) {
    std::mt19937_64 rng(42);
    const std::uint64_t cap = std::uint64_t{1} << 40;  // never binds here
    bucket_state s(cap, reduce(r), 0, 0);
    std::int64_t t = 0;
    uint128 taken = 0;
    const std::int64_t end = 100'000'000'000;
    while (t < end) {
      t = std::min(end, t + static_cast<std::int64_t>(rng() % 1'000'003));
      s.refill(t);
      const std::uint64_t a = s.available();
      s.take(a);
      taken += a;
    }
    const uint128 expected = static_cast<uint128>(end) * r.tokens / r.period.count();
    BOOST_TEST(str(taken) == str(expected), "rate " << r.tokens << "/" << r.period.count());
  }
}

BOOST_AUTO_TEST_CASE(fractional_progress_is_never_lost) {
  // 1 token per 3 ns, refilled every nanosecond: a token every third step.
  bucket_state s(10, reduce({1, 3ns}), 0, 0);
  for (int t = 1; t <= 30; ++t) {
    s.refill(t);
    BOOST_TEST(s.available() == static_cast<std::uint64_t>(t / 3));
  }
}

BOOST_AUTO_TEST_CASE(capacity_caps_the_level) {
  bucket_state s(5, reduce(ratelimit::per_second(1)), 0, 0);
  s.refill(std::int64_t{1'000'000'000} * 3600);
  BOOST_TEST(s.available() == 5u);
  s.take(5);
  BOOST_TEST(s.available() == 0u);
  BOOST_TEST(s.ticks_until(1) == 1'000'000'000u);
}

BOOST_AUTO_TEST_CASE(a_clock_going_back_mints_nothing) {
  bucket_state s(100, reduce(ratelimit::per_second(1)), 10'000'000'000, 0);
  s.refill(5'000'000'000);  // back 5 s
  BOOST_TEST(s.available() == 0u);
  BOOST_TEST(s.last() == 10'000'000'000);
  s.refill(11'000'000'000);  // 1 s after the latest time seen
  BOOST_TEST(s.available() == 1u);
  s.refill(10'500'000'000);
  s.refill(11'000'000'000);
  BOOST_TEST(s.available() == 1u);
}

BOOST_AUTO_TEST_CASE(a_clock_standing_still_mints_nothing) {
  bucket_state s(100, reduce(ratelimit::per_second(1'000'000'000)), 7, 0);
  for (int i = 0; i < 1000; ++i)
    s.refill(7);
  BOOST_TEST(s.available() == 0u);
}

BOOST_AUTO_TEST_CASE(queue_totals_beyond_capacity) {
  // Capacity 10, empty, 1 token/s: a queue needing 25 tokens in all is served after 25 s.
  bucket_state s(10, reduce(ratelimit::per_second(1)), 0, 0);
  BOOST_TEST(s.ticks_until(25) == 25'000'000'000u);
  BOOST_TEST(s.ready_at(25) == 25'000'000'000);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(edges)

BOOST_AUTO_TEST_CASE(huge_capacity_slow_rate_saturates) {
  // 2^64-1 tokens at one per hour: "when" is beyond any time point.
  bucket_state s(u64max, reduce(ratelimit::per_hour(1)), 0, 0);
  BOOST_TEST(s.ticks_until(u64max) == static_cast<std::uint64_t>(max_time));
  BOOST_TEST(s.ready_at(u64max) == max_time);
  BOOST_TEST(s.ticks_until(1) == 3'600'000'000'000u);
  // And a queue total past 2^64 tokens.
  BOOST_TEST(s.ticks_until(static_cast<uint128>(u64max) * 4) ==
             static_cast<std::uint64_t>(max_time));
}

BOOST_AUTO_TEST_CASE(wait_longer_than_max_time_before_the_epoch) {
  // From a time before the clock's epoch a wait longer than max_time ns can
  // still end at a representable time: ready_at must not saturate the wait
  // first (it answered last() + max_time, about 0.66e18 ns too early; the
  // fuzz regression negative_time_saturated_wait_grants_late).
  const std::int64_t t0 = -3'711'106'414'590'763'540;
  bucket_state s(u64max,
                 reduce(ratelimit::rate{0xef0401ef045f012cu, std::chrono::nanoseconds(max_time)}),
                 t0, 0);
  BOOST_TEST(s.ticks_until(u64max) == static_cast<std::uint64_t>(max_time));  // saturated
  BOOST_TEST(s.ready_at(u64max) == 6'167'674'313'482'000'376);                // exact
  s.refill(6'167'674'313'482'000'375);
  BOOST_TEST(!s.has(u64max));
  s.refill(6'167'674'313'482'000'376);
  BOOST_TEST(s.has(u64max));
}

BOOST_AUTO_TEST_CASE(fast_rate_for_years) {
  // 10^9 tokens/s for 100 years, capacity 2^64-1: 3.15e18 tokens, exactly.
  bucket_state s(u64max, reduce(ratelimit::per_second(1'000'000'000)), 0, 0);
  const std::int64_t century = std::int64_t{100} * 365 * 24 * 3600 * 1'000'000'000;
  s.refill(century);
  BOOST_TEST(s.available() == static_cast<std::uint64_t>(century));
  // The rate where a token is 1/1000 ns, for the same time: capped at 2^64-1.
  bucket_state t(u64max, reduce(ratelimit::rate{1000, 1ns}), 0, 0);
  t.refill(century);
  BOOST_TEST(t.available() == u64max);
}

BOOST_AUTO_TEST_CASE(extreme_times) {
  bucket_state s(3, reduce(ratelimit::per_second(1)), std::numeric_limits<std::int64_t>::min(), 0);
  s.refill(max_time);  // the whole int64 range at once
  BOOST_TEST(s.available() == 3u);
  s.take(3);
  BOOST_TEST(s.ready_at(1) == max_time);  // saturates instead of wrapping
}

BOOST_AUTO_TEST_CASE(slowest_and_fastest_periods) {
  const ratelimit::rate slow{1, std::chrono::nanoseconds(max_time)};  // one per 292 years
  bucket_state s(u64max, reduce(slow), 0, u64max);
  BOOST_TEST(s.available() == u64max);
  s.take(u64max);
  BOOST_TEST(s.ticks_until(1) == static_cast<std::uint64_t>(max_time));
  bucket_state f(u64max, reduce(ratelimit::rate{u64max, 1ns}), 0, 0);
  f.refill(1);
  BOOST_TEST(f.available() == u64max);
}

BOOST_AUTO_TEST_CASE(requests_of_zero_and_of_everything) {
  bucket_state s(7, reduce(ratelimit::per_second(1)), 0, 0);
  BOOST_TEST(s.has(0));
  BOOST_TEST(s.ticks_until(0) == 0u);
  BOOST_TEST(!s.has(u64max));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(reconfiguration)

BOOST_AUTO_TEST_CASE(set_rate_keeps_whole_tokens_and_the_fraction) {
  bucket_state s(10, reduce(ratelimit::per_second(2)), 0, 0);
  s.refill(1'750'000'000);  // 3.5 tokens
  BOOST_TEST(s.available() == 3u);
  s.set_rate(reduce(ratelimit::per_second(1)));
  BOOST_TEST(s.available() == 3u);
  BOOST_TEST(s.ticks_until(4) == 500'000'000u);  // the half token carried over
  s.set_rate(reduce(ratelimit::per_second(4)));
  BOOST_TEST(s.ticks_until(4) == 125'000'000u);
}

// The defect this test was written for: set_rate rounded the level down to
// the new rate's unit, a whole token at 10^9 tokens/s, so a change to a fast
// rate and back lost up to a token: here 59 minutes of accrual at 1 token/h.
// Now a change loses less than 2^-64 of a token: the first one keeps 59/60 of
// a token but 11/15 of 2^-64 (59/60 is not a multiple of 2^-64), the second
// one nothing (the level is then a multiple of 2^-64/3.6e12 of a token).
BOOST_AUTO_TEST_CASE(set_rate_through_a_fast_rate_and_back_keeps_the_fraction) {
  constexpr std::int64_t minute = 60'000'000'000;
  bucket_state s(5, reduce(ratelimit::per_hour(1)), 0, 0);
  s.refill(59 * minute);  // 59/60 of a token
  s.set_rate(reduce(ratelimit::per_second(1'000'000'000)));
  s.set_rate(reduce(ratelimit::per_hour(1)));
  s.refill(60 * minute);
  // 1 - 11/(15 * 2^64) token: not yet a whole one, but one nanosecond
  // (1/3.6e12 of a token) away, not 59 minutes.
  BOOST_TEST(s.available() == 0u);
  BOOST_TEST(s.ticks_until(1) == 1u);
  s.refill(60 * minute + 1);
  BOOST_TEST(s.available() == 1u);
}

BOOST_AUTO_TEST_CASE(set_capacity_drops_the_excess_only) {
  bucket_state s(10, reduce(ratelimit::per_second(1)), 0, 10);
  s.set_capacity(4);
  BOOST_TEST(s.available() == 4u);
  s.set_capacity(20);
  BOOST_TEST(s.available() == 4u);
  s.refill(16'000'000'000);
  BOOST_TEST(s.available() == 20u);
}

BOOST_AUTO_TEST_CASE(waste_until_is_what_refill_loses_to_the_capacity) {
  const std::int64_t sec = 1'000'000'000;
  bucket_state s(4, reduce(ratelimit::rate{3, std::chrono::seconds(2)}), 0, 1);  // 1.5/s
  const std::uint64_t unit = s.rate().ticks;  // one token in units
  // (uint128 does not print: compared as bool)
  BOOST_TEST(bool(s.waste_until(0) == 0u));
  BOOST_TEST(bool(s.waste_until(2 * sec) == 0u));  // 1 + 3 = 4: full, nothing lost yet
  BOOST_TEST(bool(s.waste_until(4 * sec) == 3u * unit));
  BOOST_TEST(bool(s.waste_until(4 * sec + 1) > 3u * unit));
  s.refill(sec);                                          // 2.5 tokens
  BOOST_TEST(bool(s.waste_until(4 * sec) == 3u * unit));  // the same instant, the same loss
  BOOST_TEST(bool(s.waste_until(sec - 1) == 0u));         // before last(): nothing
  s.refill(4 * sec);
  BOOST_TEST(s.available() == 4u);
  BOOST_TEST(bool(s.waste_until(6 * sec) == 3u * unit));  // full: all of it
}

BOOST_AUTO_TEST_CASE(set_capacity_keeps_a_full_bucket_full_when_asked) {
  bucket_state s(4, reduce(ratelimit::per_second(1)), 0, 4);
  s.set_capacity(6, true);  // full: full at the raised capacity
  BOOST_TEST(s.available() == 6u);
  s.set_capacity(3, true);  // lowered: capped, as ever
  BOOST_TEST(s.available() == 3u);
  s.take(1);
  s.set_capacity(5, true);  // not full: keeps its level
  BOOST_TEST(s.available() == 2u);
  s.refill(3'000'000'000);
  BOOST_TEST(s.available() == 5u);
  bucket_state t(4, reduce(ratelimit::per_second(1)), 0, 4);
  t.set_capacity(6);  // without: keeps its level
  BOOST_TEST(t.available() == 4u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(rate_changes)

// The residue (the level below one unit, in 2^-64 of a unit) through each
// operation: take() keeps it, reaching the capacity drops it, a change to the
// same reduced rate or to a rate with the same unit changes nothing.
BOOST_AUTO_TEST_CASE(the_residue_through_each_operation) {
  constexpr std::int64_t minute = 60'000'000'000;
  bucket_state s(5, reduce(ratelimit::per_hour(1)), 0, 3);
  s.refill(59 * minute);                                     // 3 + 59/60 tokens
  s.set_rate(reduce(ratelimit::per_second(1'000'000'000)));  // a unit is a token
  // 59/60 in 2^-64: floor(59 * 2^64 / 60) = (59 * 2^64 - 44) / 60.
  BOOST_TEST(str(s.level()) == "3");
  BOOST_TEST(s.residue() == 18'139'298'339'147'725'755u);
  s.take(2);
  BOOST_TEST(str(s.level()) == "1");
  BOOST_TEST(s.residue() == 18'139'298'339'147'725'755u);
  // The same rate in other terms, and another rate with the same unit.
  s.set_rate(reduce(ratelimit::rate{2'000'000'000, 2s}));
  s.set_rate(reduce(ratelimit::rate{3, 1ns}));
  BOOST_TEST(str(s.level()) == "1");
  BOOST_TEST(s.residue() == 18'139'298'339'147'725'755u);
  s.refill(59 * minute + 1);  // 1 + 3 tokens and the fraction: below 5
  BOOST_TEST(str(s.level()) == "4");
  BOOST_TEST(s.residue() == 18'139'298'339'147'725'755u);
  s.refill(59 * minute + 2);  // capped at 5, exactly
  BOOST_TEST(str(s.level()) == "5");
  BOOST_TEST(s.residue() == 0u);

  // set_capacity: above the level keeps the residue; at the level, or below
  // it, leaves exactly the capacity.
  bucket_state c(5, reduce(ratelimit::per_hour(1)), 0, 3);
  c.refill(59 * minute);
  c.set_rate(reduce(ratelimit::per_second(1'000'000'000)));
  c.set_capacity(4);
  BOOST_TEST(str(c.level()) == "3");
  BOOST_TEST(c.residue() == 18'139'298'339'147'725'755u);
  c.set_capacity(3);
  BOOST_TEST(str(c.level()) == "3");
  BOOST_TEST(c.residue() == 0u);
  c.set_capacity(2);
  BOOST_TEST(str(c.level()) == "2");
  BOOST_TEST(c.residue() == 0u);
}

// A residue of almost a whole unit (1 - 2.64e12 / 2^64 of one), a unit short
// of a token: every answer is that of the level without it, which is that of
// the exact level, since the residue is worth less than the nanosecond in
// which one unit (at least) accrues.
BOOST_AUTO_TEST_CASE(a_residue_below_one_unit_moves_no_integer_answer) {
  constexpr std::int64_t minute = 60'000'000'000;
  bucket_state s(5, reduce(ratelimit::per_hour(1)), 0, 0);
  s.refill(59 * minute);
  s.set_rate(reduce(ratelimit::per_second(1'000'000'000)));
  s.set_rate(reduce(ratelimit::per_hour(1)));
  s.refill(60 * minute);
  // (59 * 2^64 - 44) / 60 * 3.6e12 = (59 * 2^64 - 44) * 6e10 in 2^-64 units:
  // 3.54e12 * 2^64 - 2.64e12, i.e. 3.54e12 - 1 units and 2^64 - 2.64e12.
  BOOST_TEST(str(s.level()) == "3599999999999");
  BOOST_TEST(s.residue() == 18'446'741'433'709'551'616u);
  BOOST_TEST(exact_level(s) == 1 - rational(11, 15 * two64));
  BOOST_TEST(!s.has(1));
  BOOST_TEST(s.has(0));
  BOOST_TEST(s.available() == 0u);
  BOOST_TEST(s.ticks_until(1) == 1u);
  BOOST_TEST(s.ready_at(1) == 60 * minute + 1);
  BOOST_TEST(s.ticks_until(2) == 3'600'000'000'001u);  // 1 + 11/15 * 2^-64 tokens: ceil
  s.refill(60 * minute + 1);
  BOOST_TEST(s.has(1));
  BOOST_TEST(s.available() == 1u);
  BOOST_TEST(s.residue() == 18'446'741'433'709'551'616u);
}

// set_rate where its intermediates are largest: a level a unit short of
// 2^64 - 1 tokens at the slowest unit (2^63 - 1 units per token), with a
// residue, through the largest units and back to the fastest.
BOOST_AUTO_TEST_CASE(set_rate_at_the_edges_of_the_range) {
  const ratelimit::rate slowest{1, std::chrono::nanoseconds(max_time)};
  bucket_state s(u64max, reduce(slowest), 0, u64max);
  exact_bucket e(u64max, slowest, 0, u64max);
  s.take(1);
  e.take(1);
  s.refill(max_time - 1);  // (2^64 - 1) * (2^63 - 1) - 1 units
  e.refill(max_time - 1);
  BOOST_TEST(str(s.level()) == str(static_cast<uint128>(u64max) * (u64max >> 1) - 1));
  const ratelimit::rate chain[] = {
      {1, std::chrono::nanoseconds(max_time - 1)},  // 2^63 - 2 units per token
      {u64max, std::chrono::nanoseconds(max_time - 2)},
      {1'000'000'007, std::chrono::nanoseconds(max_time)},
      slowest,
      {u64max, 1ns},  // a unit is a token
      {1, std::chrono::nanoseconds(max_time - 1)},
      {3, 7ns},
      slowest,
  };
  for (const auto& r : chain) {
    s.set_rate(reduce(r));
    e.set_rate(r);
    BOOST_TEST(exact_level(s) == e.promised, "rate " << r.tokens << "/" << r.period.count());
    BOOST_TEST(e.unrounded - e.promised < rational(e.changes, two64));
  }
  BOOST_TEST(s.available() == u64max - 1);
  BOOST_TEST(s.residue() != 0u);
}

/// Random configurations and steps, the edges of the range often.
struct picker {
  std::mt19937_64 rng;

  std::uint64_t capacity() {
    switch (rng() % 6) {
      case 0:
        return u64max;
      case 1:
        return 1;
      case 2:
        return 1 + rng() % 20;
      case 3:
        return 1 + rng() % 1'000'000'000;
      case 4:
        return std::uint64_t{1} << 63;
      default:
        return std::max<std::uint64_t>(1, rng());
    }
  }
  ratelimit::rate rate() {
    std::uint64_t tokens;
    switch (rng() % 6) {
      case 0:
        tokens = 1;
        break;
      case 1:
        tokens = 1 + rng() % 10;
        break;
      case 2:
        tokens = u64max;
        break;
      case 3:
        tokens = 1'000'000'000;
        break;
      case 4:
        tokens = 1 + rng() % 1000;
        break;
      default:
        tokens = std::max<std::uint64_t>(1, rng());
    }
    std::int64_t period;
    switch (rng() % 8) {
      case 0:
        period = 1;
        break;
      case 1:
        period = 1 + static_cast<std::int64_t>(rng() % 1000);
        break;
      case 2:
        period = (1 + static_cast<std::int64_t>(rng() % 32)) * 1'000'000;
        break;
      case 3:
        period = 1'000'000'000;
        break;
      case 4:
        period = 3'600'000'000'000;
        break;
      case 5:
        period = max_time - static_cast<std::int64_t>(rng() % 3);
        break;
      default:
        period = 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(max_time));
    }
    return {tokens, std::chrono::nanoseconds(period)};
  }
  std::int64_t step() {
    switch (rng() % 8) {
      case 0:
        return 0;
      case 1:
        return 1;
      case 2:
        return static_cast<std::int64_t>(rng() % 1000);
      case 3:
        return static_cast<std::int64_t>(rng() % 1'000'000'000);
      case 4:
        return static_cast<std::int64_t>(rng() % 4'000'000'000'000);
      case 5:
        return static_cast<std::int64_t>(rng() >> 1);
      default:
        return static_cast<std::int64_t>(rng() >> (1 + rng() % 63));
    }
  }
  /// A request: 0, 1, around what is there, around the capacity, or anything.
  uint128 count(const bucket_state& s) {
    const uint128 a = s.available();
    switch (rng() % 8) {
      case 0:
        return 0;
      case 1:
        return 1;
      case 2:
        return a;
      case 3:
        return a + 1;
      case 4:
        return s.capacity();
      case 5:
        return static_cast<uint128>(s.capacity()) + 1;
      case 6:
        return rng();
      default:
        return static_cast<uint128>(u64max) * (1 + rng() % 8);
    }
  }
};

/// What differs between the bucket and the exact one, or nothing.
std::string disagreement(const bucket_state& s, const exact_bucket& e, picker& p) {
  // The bucket holds exactly the level the documented rule gives...
  const rational x = exact_level(s);
  if (x != e.promised) return "level " + x.str() + " != promised " + e.promised.str();
  // ...which is never above the unrounded level, and below it by less than
  // 2^-64 of a token per rate change.
  if (e.changes == 0 ? x != e.unrounded
                     : !(x <= e.unrounded && e.unrounded - x < rational(e.changes, two64)))
    return "level " + x.str() + " vs unrounded " + e.unrounded.str() + " after " +
           std::to_string(e.changes) + " changes";
  if (s.last() != e.last) return "last()";
  // And every integer answer is the one the exact level gives.
  if (s.available() != e.available()) return "available()";
  for (int i = 0; i < 4; ++i) {
    const uint128 n = p.count(s);
    if (n <= u64max && s.has(static_cast<std::uint64_t>(n)) != e.has(static_cast<std::uint64_t>(n)))
      return "has(" + str(n) + ")";
    if (integer(s.ticks_until(n)) != e.ticks_until(big(n))) return "ticks_until(" + str(n) + ")";
    if (integer(s.ready_at(n)) != e.ready_at(big(n))) return "ready_at(" + str(n) + ")";
  }
  return {};
}

// Random sequences of refills (some to exactly when n tokens are due, or 1 ns
// either side), takes, rate and capacity changes, with periods up to 2^63 - 1
// ns, up to 2^64 - 1 tokens per period and capacities up to 2^64 - 1, checked
// after every step against exact rational numbers.
BOOST_AUTO_TEST_CASE(random_rate_changes_against_exact_rationals) {
  picker p{std::mt19937_64(20261129)};
  std::uint64_t steps = 0, changes = 0, with_residue = 0;
  for (int seq = 0; seq < 10000; ++seq) {
    const std::uint64_t cap = p.capacity();
    const ratelimit::rate r = p.rate();
    const std::uint64_t initial = cap == u64max ? p.rng() : p.rng() % (cap + 1);
    const std::int64_t start = p.rng() % 2 ? 0 : -static_cast<std::int64_t>(p.rng() >> 2);
    bucket_state s(cap, reduce(r), start, initial);
    exact_bucket e(cap, r, start, initial);
    for (int op = 0; op < 40; ++op, ++steps) {
      const auto k = p.rng() % 10;
      if (k < 2) {  // refill
        const std::int64_t d = p.step();
        const std::int64_t t = s.last() > max_time - d ? max_time : s.last() + d;
        s.refill(t);
        e.refill(t);
      } else if (k < 4) {  // to when n tokens are due, exactly or 1 ns either side
        const std::int64_t due = s.ready_at(p.count(s));
        if (due == max_time) continue;
        const std::int64_t t = due - 1 + static_cast<std::int64_t>(p.rng() % 3);
        if (t <= s.last()) continue;
        s.refill(t);
        e.refill(t);
      } else if (k < 6) {  // take what is there, or part of it
        const std::uint64_t a = s.available();
        const std::uint64_t n = p.rng() % 2 ? a : a == u64max ? p.rng() : p.rng() % (a + 1);
        if (!s.has(n)) BOOST_FAIL("has(" << n << ") with " << a << " available");
        s.take(n);
        e.take(n);
      } else if (k < 9) {
        const ratelimit::rate r2 = p.rate();
        s.set_rate(reduce(r2));
        e.set_rate(r2);
        ++changes;
      } else {
        const std::uint64_t c = p.capacity();
        s.set_capacity(c);
        e.set_capacity(c);
      }
      with_residue += s.residue() != 0;
      const std::string what = disagreement(s, e, p);
      if (!what.empty()) BOOST_FAIL("sequence " << seq << " step " << op << ": " << what);
    }
  }
  BOOST_TEST_MESSAGE(steps << " steps, " << changes << " rate changes, " << with_residue
                           << " steps with a residue");
  BOOST_TEST(with_residue > steps / 10);  // the residue was there to get wrong
}

BOOST_AUTO_TEST_SUITE_END()
