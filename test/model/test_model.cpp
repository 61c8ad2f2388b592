//
// test/model/test_model.cpp: the reference model's own tests.
//
// The model is what the fuzzer trusts, so it is checked here against numbers
// worked out by hand, one documented rule at a time.
//
#include "token_bucket_model.hpp"

#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <vector>

using ratelimit::model::completion;
using ratelimit::model::integer;
using ratelimit::model::model_rate;
using ratelimit::model::rational;
using ratelimit::model::result;
using ratelimit::model::token_bucket_model;

namespace {

constexpr std::int64_t ms = 1'000'000;
constexpr std::int64_t s = 1'000'000'000;
constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();
constexpr std::int64_t i64_max = std::numeric_limits<std::int64_t>::max();
const integer two64 = integer(1) << 64;

std::vector<completion> done(std::initializer_list<completion> c) {
  return c;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(model)

BOOST_AUTO_TEST_CASE(accrues_exactly_and_caps) {
  token_bucket_model m(10, model_rate{3, s}, 0, 0);  // one token every 333'333'333.3 ns
  BOOST_TEST(m.available(333'333'333) == 0u);
  BOOST_TEST(m.available(333'333'334) == 1u);
  BOOST_TEST(m.available(s) == 3u);
  BOOST_TEST(m.available(100 * s) == 10u);  // capped
  // Nothing is lost across many small steps: 3'000 steps of 1/3 ms make 3 tokens.
  token_bucket_model n(10, model_rate{3, s}, 0, 0);
  std::int64_t t = 0;
  for (int i = 0; i < 3000; ++i)
    n.available(t += s / 3000);
  BOOST_TEST(n.available(t) == 2u);  // t = 999'999'000 ns: 2.999997 tokens
  BOOST_TEST(n.available(s) == 3u);
}

BOOST_AUTO_TEST_CASE(clock_going_back_has_no_effect) {
  token_bucket_model m(10, model_rate{1, ms}, 0, 0);
  BOOST_TEST(m.available(5 * ms) == 5u);
  BOOST_TEST(m.available(-100 * ms) == 5u);  // no tokens taken back
  BOOST_TEST(m.now() == 5 * ms);
  BOOST_TEST(m.available(6 * ms) == 6u);  // and nothing minted twice
}

BOOST_AUTO_TEST_CASE(strict_fifo) {
  token_bucket_model m(10, model_rate{1, ms}, 0, 0);
  const auto big = m.request(5, 0);
  const auto small = m.request(1, 0);
  m.serve_due(1 * ms);  // one token: enough for `small`, but `big` is first
  BOOST_TEST(m.completions().empty());
  m.serve_due(5 * ms);
  BOOST_TEST(m.completions() == done({{big, result::granted}}));
  m.serve_due(6 * ms);
  BOOST_TEST(m.completions() == done({{big, result::granted}, {small, result::granted}}));
  BOOST_TEST(m.available(6 * ms) == 0u);
  BOOST_TEST(static_cast<std::uint64_t>(m.granted_tokens()) == 6u);
}

BOOST_AUTO_TEST_CASE(grants_as_of_the_moment_the_tokens_accrued) {
  token_bucket_model m(2, model_rate{1, ms}, 0, 0);
  const auto a = m.request(2, 0);       // due at 2 ms
  const auto b = m.request(1, 5 * ms);  // arrives at 5 ms, behind a
  m.serve_due(10 * ms);                 // the timer fires late
  BOOST_TEST(m.completions() == done({{a, result::granted}, {b, result::granted}}));
  // a took its 2 tokens as of 2 ms, b its token as of 5 ms (it arrived then,
  // its token was there since 3 ms): the bucket is full again by 10 ms, and
  // nothing accrued after those moments was lost to the capacity.
  BOOST_TEST(m.available(10 * ms) == 2u);
  token_bucket_model n(2, model_rate{1, ms}, 0, 0);
  n.request(2, 0);
  n.serve_due(2 * ms);  // punctual
  BOOST_TEST(n.available(3 * ms) == 1u);
}

BOOST_AUTO_TEST_CASE(immediate_grant_takes_tokens_at_request_time) {
  token_bucket_model m(4, model_rate{1, ms}, 4, 0);
  const auto a = m.request(3, 0);
  BOOST_TEST(m.status(a) == result::granted);
  BOOST_TEST(m.available(0) == 1u);
  BOOST_TEST(m.waiting() == 0u);
}

BOOST_AUTO_TEST_CASE(over_capacity_and_zero) {
  token_bucket_model m(4, model_rate{1, ms}, 0, 0);
  const auto over = m.request(5, 0);
  BOOST_TEST(m.status(over) == result::exceeds_capacity);
  const auto zero_now = m.request(0, 0);  // queue empty: granted at once
  BOOST_TEST(m.status(zero_now) == result::granted);
  const auto two = m.request(2, 0);
  const auto zero = m.request(0, 0);  // in its turn, behind `two`
  BOOST_TEST(m.status(zero) == result::pending);
  m.serve_due(2 * ms);
  BOOST_TEST(m.completions() == done({{over, result::exceeds_capacity},
                                      {zero_now, result::granted},
                                      {two, result::granted},
                                      {zero, result::granted}}));
  const auto max = m.request(u64_max, 2 * ms);
  BOOST_TEST(m.status(max) == result::exceeds_capacity);
}

BOOST_AUTO_TEST_CASE(try_get_rules) {
  token_bucket_model m(4, model_rate{1, ms}, 2, 0);
  BOOST_TEST(!m.try_get(5, 0));  // over the capacity
  BOOST_TEST(!m.try_get(3, 0));  // not there
  BOOST_TEST(m.try_get(0, 0));
  BOOST_TEST(m.try_get(2, 0));
  m.request(1, 0);
  BOOST_TEST(!m.try_get(0, 5 * ms));  // someone is queued (granted only when served)
  m.serve_due(5 * ms);
  BOOST_TEST(m.try_get(3, 5 * ms));  // the waiter's token went as of 1 ms: full (4) by 5 ms
  m.close(5 * ms);
  BOOST_TEST(!m.try_get(0, 9 * ms));
}

BOOST_AUTO_TEST_CASE(cancel_head_serves_the_next_at_once) {
  token_bucket_model m(10, model_rate{1, ms}, 0, 0);
  const auto a = m.request(5, 0);
  const auto b = m.request(2, 0);
  const auto c = m.request(2, 0);
  m.serve_due(3 * ms);
  m.cancel(a, 3 * ms);  // 3 tokens there: b is granted now, c at 4 ms
  BOOST_TEST(m.completions() == done({{b, result::granted}, {a, result::aborted}}));
  m.serve_due(4 * ms);
  BOOST_TEST(m.status(c) == result::granted);
  m.cancel(c, 5 * ms);  // already granted: a no-op
  BOOST_TEST(m.completions().size() == 3u);
  BOOST_TEST(static_cast<std::uint64_t>(m.granted_tokens()) == 4u);
}

BOOST_AUTO_TEST_CASE(cancel_middle_changes_nothing_else) {
  token_bucket_model m(10, model_rate{1, ms}, 0, 0);
  const auto a = m.request(2, 0);
  const auto b = m.request(2, 0);
  const auto c = m.request(2, 0);
  m.cancel(b, 0);
  m.serve_due(2 * ms);
  m.serve_due(3 * ms);
  BOOST_TEST(m.completions() == done({{b, result::aborted}, {a, result::granted}}));
  m.serve_due(4 * ms);  // c at 4 ms, as if b had never been
  BOOST_TEST(m.status(c) == result::granted);
}

BOOST_AUTO_TEST_CASE(cancel_all_close_destroy) {
  token_bucket_model m(10, model_rate{1, ms}, 0, 0);
  const auto a = m.request(2, 0);
  const auto b = m.request(2, 0);
  BOOST_TEST(m.cancel_all(0) == 2u);
  BOOST_TEST(m.is_open());
  const auto c = m.request(3, 0);
  m.close(0);
  BOOST_TEST(!m.is_open());
  const auto d = m.request(1, 10 * ms);
  BOOST_TEST(
      m.completions() ==
      done({{a, result::aborted}, {b, result::aborted}, {c, result::closed}, {d, result::closed}}));
  token_bucket_model n(10, model_rate{1, ms}, 0, 0);
  const auto e = n.request(2, 0);
  n.destroy(0);
  BOOST_TEST(n.completions() == done({{e, result::aborted}}));
}

// The set_rate rule: the level is kept, rounded down to a multiple of 2^-64 of
// the new unit (1/u of a token, u = period / gcd(tokens, period) in ns).
BOOST_AUTO_TEST_CASE(set_rate_keeps_tokens_and_rounds_down_to_2_pow_minus_64_of_the_new_unit) {
  // 1 token / 3 ns; after 1 ns a third of a token.
  token_bucket_model a(10, model_rate{1, 3}, 0, 0);
  a.set_rate(model_rate{1, 2}, 1);  // u = 2: 1/3 is no multiple of 2^-65
  // 2^64 = 1 (mod 3), so floor(2^65 / 3) = (2^65 - 2) / 3: a third of a token
  // less 2/3 of 2^-65, i.e. 1/3 of 2^-64 of a token.
  BOOST_TEST(a.level() == rational(1, 3) - rational(1, 3 * two64));
  BOOST_TEST(a.available(2) == 0u);  // 1/3 + 1/2, less 1/3 of 2^-64
  BOOST_TEST(a.available(3) == 1u);  // 1/3 + 1, less 1/3 of 2^-64

  token_bucket_model b(10, model_rate{1, 3}, 0, 0);
  b.set_rate(model_rate{1, 6}, 1);  // u = 6: 1/3 = 2/6 is kept exactly
  BOOST_TEST(b.level() == rational(1, 3));
  BOOST_TEST(b.available(4) == 0u);  // 2/6 + 3/6
  BOOST_TEST(b.available(5) == 1u);  // 2/6 + 4/6

  token_bucket_model c(10, model_rate{1, 3}, 0, 0);
  c.set_rate(model_rate{2, 6}, 1);  // the same rate in other terms (u = 3): 1/3 kept
  BOOST_TEST(c.level() == rational(1, 3));
  BOOST_TEST(c.available(2) == 0u);
  BOOST_TEST(c.available(3) == 1u);

  token_bucket_model d(10, model_rate{1, ms}, 0, 0);
  d.request(4, 0);
  d.serve_due(2 * ms);
  d.set_rate(model_rate{2, ms}, 2 * ms);  // 2 tokens kept, 2 more by 3 ms
  d.serve_due(3 * ms - 1);
  BOOST_TEST(d.completions().empty());
  d.serve_due(3 * ms);
  BOOST_TEST(d.completions().size() == 1u);
  BOOST_CHECK_THROW(d.set_rate(model_rate{0, ms}, 3 * ms), std::invalid_argument);
  BOOST_CHECK_THROW(d.set_rate(model_rate{1, 0}, 3 * ms), std::invalid_argument);
  BOOST_TEST(d.rate().tokens == 2u);
}

// The example that showed the rule was needed: 1 token per hour, 59 minutes,
// then 10^9 tokens/s (u = 1, a unit is a whole token) and back. Rounding to the
// unit kept nothing of the 59/60 token; to 2^-64 of it, 59/60 less 11/15 of
// 2^-64: 2^64 = 16 (mod 60), so floor(59 * 2^64 / 60) = (59 * 2^64 - 44) / 60.
// Back at 1/h (u = 3.6e12) that is a multiple of 1/(u * 2^64): kept as it is.
BOOST_AUTO_TEST_CASE(set_rate_through_a_fast_rate_and_back) {
  const std::int64_t minute = 60 * s;
  const model_rate hourly{1, 60 * minute};
  token_bucket_model m(5, hourly, 0, 0);
  BOOST_TEST(m.available(59 * minute) == 0u);
  BOOST_TEST(m.level() == rational(59, 60));
  m.set_rate(model_rate{1'000'000'000, s}, 59 * minute);
  const rational kept(59 * integer(two64) - 44, 60 * integer(two64));
  BOOST_TEST(m.level() == kept);
  m.set_rate(hourly, 59 * minute);
  BOOST_TEST(m.level() == kept);
  // At 60 minutes: 1 - 11/15 of 2^-64 of a token. Not a whole token yet: the
  // missing 11/15 of 2^-64 token accrue within the next nanosecond (1/3.6e12).
  BOOST_TEST(m.available(60 * minute) == 0u);
  BOOST_TEST(m.level() == 1 - rational(11, 15 * two64));
  const auto r = m.request(1, 60 * minute);
  BOOST_TEST(m.head_ready_at().value_or(-1) == 60 * minute + 1);
  m.serve_due(60 * minute);
  BOOST_TEST(m.status(r) == result::pending);
  m.serve_due(60 * minute + 1);
  BOOST_TEST(m.status(r) == result::granted);
}

// Several changes through rates with awkward units, each worked out by hand.
// The loss is below 2^-64 of a token per change, and the rounded level is what
// every answer is computed from: here it delays a token by one nanosecond.
BOOST_AUTO_TEST_CASE(set_rate_sequence_through_awkward_units) {
  token_bucket_model m(100, model_rate{1, 3}, 0, 0);  // 1/3 token per ns, u = 3
  BOOST_TEST(m.available(1) == 0u);
  BOOST_TEST(m.level() == rational(1, 3));

  // 7 tokens per 11 ns, u = 11: 11 * 2^64 = 2 (mod 3), so
  // floor(1/3 * 11 * 2^64) = (11 * 2^64 - 2) / 3: 2/33 of 2^-64 lost.
  m.set_rate(model_rate{7, 11}, 1);
  BOOST_TEST(m.level() == rational(1, 3) - rational(2, 33 * two64));
  BOOST_TEST(m.available(12) == 7u);  // + 7 tokens in 11 ns
  BOOST_TEST(m.level() == rational(22, 3) - rational(2, 33 * two64));

  // 1 per hour, u = 3.6e12 = 3 * 1.2e12: 22/3 * u * 2^64 is an integer, and
  // 2/33 * u = 7.2e12 / 33 = 218'181'818'181 + 27/33: rounded down, the level
  // loses a further 6/33 of 2^-64 of a unit (1/3.6e12 of a token).
  const integer u_hour = 3'600'000'000'000;
  m.set_rate(model_rate{1, 3600 * s}, 12);
  BOOST_TEST(m.level() == rational(22, 3) - rational(218'181'818'182, u_hour * two64));

  // 10^9 per second, u = 1: 22 * 2^64 = 1 (mod 3), so 22/3 * 2^64 is an
  // integer plus 1/3, and less 218'181'818'182 / 3.6e12 (0.06) it is that
  // integer plus 0.27: the level is 22/3 less 1/3 of 2^-64, in all three
  // changes 1/3 of 2^-64 below the exact 22/3.
  m.set_rate(model_rate{1'000'000'000, s}, 12);
  BOOST_TEST(m.level() == rational(22, 3) - rational(1, 3 * two64));

  // Back to 1/3 per ns (u = 3): (22/3 - 1/(3 * 2^64)) * 3 * 2^64 = 22 * 2^64 - 1
  // is an integer: nothing lost. The same rate in other terms: nothing either.
  m.set_rate(model_rate{1, 3}, 12);
  BOOST_TEST(m.level() == rational(22, 3) - rational(1, 3 * two64));
  m.set_rate(model_rate{2, 6}, 12);
  BOOST_TEST(m.level() == rational(22, 3) - rational(1, 3 * two64));

  // 8 tokens: 2/3 + 1/(3 * 2^64) missing, 2 + 2^-64 ns at 1/3 per ns: due at
  // 15 ns, not at 14 ns as with the unrounded 22/3.
  const auto r = m.request(8, 12);
  BOOST_TEST(m.head_ready_at().value_or(-1) == 15);
  BOOST_TEST(m.available(13) == 7u);
  BOOST_TEST(m.available(14) == 7u);  // 8 less 1/3 of 2^-64
  BOOST_TEST(m.status(r) == result::pending);
  m.serve_due(15);
  BOOST_TEST(m.status(r) == result::granted);
  BOOST_TEST(m.level() == rational(1, 3) - rational(1, 3 * two64));

  // Reaching the capacity caps the level at exactly the capacity.
  BOOST_TEST(m.available(1000) == 100u);
  BOOST_TEST(m.level() == 100);
}

BOOST_AUTO_TEST_CASE(set_capacity_drops_fails_and_reschedules) {
  token_bucket_model m(10, model_rate{1, ms}, 10, 0);
  const auto a = m.request(10, 0);  // granted at once
  const auto b = m.request(8, 0);
  const auto c = m.request(3, 0);
  m.serve_due(4 * ms);
  m.set_capacity(5, 4 * ms);  // b can never be granted; c has its 3 of the 4 tokens
  BOOST_TEST(m.completions() ==
             done({{a, result::granted}, {b, result::exceeds_capacity}, {c, result::granted}}));
  BOOST_TEST(m.available(100 * ms) == 5u);  // capped at the new capacity
  m.set_capacity(2, 100 * ms);              // the excess is dropped
  BOOST_TEST(m.available(100 * ms) == 2u);
  BOOST_CHECK_THROW(m.set_capacity(0, 100 * ms), std::invalid_argument);
  BOOST_TEST(m.capacity() == 2u);
}

BOOST_AUTO_TEST_CASE(refuses_invalid_configuration) {
  BOOST_CHECK_THROW(token_bucket_model(0, model_rate{1, ms}, 0, 0), std::invalid_argument);
  BOOST_CHECK_THROW(token_bucket_model(1, model_rate{0, ms}, 0, 0), std::invalid_argument);
  BOOST_CHECK_THROW(token_bucket_model(1, model_rate{1, 0}, 0, 0), std::invalid_argument);
  BOOST_CHECK_THROW(token_bucket_model(1, model_rate{1, -1}, 0, 0), std::invalid_argument);
  BOOST_CHECK_THROW(token_bucket_model(1, model_rate{1, ms}, 2, 0), std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(extreme_values_do_not_overflow) {
  // The largest capacity, the fastest rate, the longest jump of time.
  token_bucket_model m(u64_max, model_rate{u64_max, 1}, 0,
                       std::numeric_limits<std::int64_t>::min());
  BOOST_TEST(m.available(i64_max) == u64_max);
  const auto a = m.request(u64_max, i64_max);
  BOOST_TEST(m.status(a) == result::granted);
  BOOST_TEST(m.available(i64_max) == 0u);
  // The slowest rate: one token per 292 years never arrives before the end of time.
  token_bucket_model slow(u64_max, model_rate{1, i64_max}, 0, 1);
  slow.request(1, 1);
  slow.serve_due(i64_max);
  BOOST_TEST(slow.completions().empty());
  BOOST_TEST(slow.available(i64_max) == 0u);
  // Rounding with the largest periods.
  slow.set_rate(model_rate{u64_max, i64_max}, i64_max);
  BOOST_TEST(slow.available(i64_max) == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
