//
// test/model/test_keyed_model.cpp: the keyed limiter model's own tests.
//
// The model is what fuzz_keyed trusts, so it is checked here against numbers
// worked out by hand, one documented rule at a time, including the outcomes it
// must refuse (model::violation) and both outcomes where two are allowed.
// Times are in ns; every limiter here refills at 1 token per second unless
// said otherwise, so "full at 2 s" is easy to check by hand.
//
#include "keyed_limiter_model.hpp"

#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <vector>

using ratelimit::model::completion;
using ratelimit::model::model_rate;
using ratelimit::model::result;
using ratelimit::model::token_bucket_model;
using ratelimit::model::violation;
using keyed = ratelimit::model::keyed_limiter_model<int>;

namespace {

constexpr std::int64_t ms = 1'000'000;
constexpr std::int64_t s = 1'000'000'000;
constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();
constexpr std::int64_t i64_max = std::numeric_limits<std::int64_t>::max();
constexpr model_rate per_s{1, s};

std::vector<completion> done(std::initializer_list<completion> c) {
  return c;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(keyed_model)

// --- the bucket model's full_at(), which the keyed model relies on ------------

BOOST_AUTO_TEST_CASE(bucket_full_at) {
  token_bucket_model m(4, model_rate{1, ms}, 4, 0);
  BOOST_TEST(m.full_at() == 0);  // full: the latest time seen
  BOOST_TEST(m.try_get(3, 0));
  BOOST_TEST(m.full_at() == 3 * ms);  // 1 token, 3 to go
  m.request(2, 0);                    // queued, due at 1 ms: takes 2, leaves 0
  BOOST_TEST(m.full_at() == 5 * ms);  // then 4 more
  // Arrives at 10 ms behind the first (which is due at 1 ms): its token is
  // there at 2 ms but it is granted as of 10 ms, and the level is capped at 4
  // meanwhile: 4 - 1 = 3 at 10 ms, full at 11 ms.
  m.request(1, 10 * ms);
  BOOST_TEST(m.full_at() == 11 * ms);
  m.serve_due(10 * ms);
  BOOST_TEST(m.full_at() == 11 * ms);  // the same once served
  BOOST_TEST(m.available(11 * ms) == 4u);
  BOOST_TEST(m.full_at() == 11 * ms);
  // Later than can be represented.
  token_bucket_model slow(u64_max, model_rate{1, i64_max}, 0, 0);
  BOOST_TEST(slow.full_at() == i64_max);
}

// --- keys ----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(keys_are_independent_and_created_full) {
  keyed m(2, per_s, 10);
  BOOST_TEST(m.try_get(1, 1, 0) == result::granted);
  BOOST_TEST(m.try_get(1, 1, 0) == result::granted);
  BOOST_TEST(m.try_get(1, 1, 0) == result::pending);  // drained: limited, no error
  BOOST_TEST(m.try_get(2, 2, 0) == result::granted);  // key 2 has its own two
  BOOST_TEST(m.try_get(3, 3, 0) == result::exceeds_capacity);
  BOOST_TEST(!m.contains(3));  // no bucket for a request that fails at once
  BOOST_TEST(m.size() == 2u);
  BOOST_TEST(m.available(1, s) == 1u);
  BOOST_TEST(m.available(2, 5 * s) == 2u);  // capped
  BOOST_TEST(m.available(4, 0) == 2u);      // unknown key: the capacity, and no bucket
  BOOST_TEST(!m.contains(4));
}

BOOST_AUTO_TEST_CASE(requests_are_fifo_per_key_with_limiter_wide_ids) {
  keyed m(1, per_s, 10);
  const auto a = m.request(7, 1, 0);  // granted at once
  const auto b = m.request(7, 1, 0);  // waits for the token due at 1 s
  const auto c = m.request(8, 1, 0);  // another key: granted at once
  BOOST_TEST(a == 0u);
  BOOST_TEST(b == 1u);
  BOOST_TEST(c == 2u);
  BOOST_TEST(m.key_of(b) == 7);
  BOOST_TEST(m.completions() == done({{a, result::granted}, {c, result::granted}}));
  m.serve_due(s - 1);
  BOOST_TEST(m.status(b) == result::pending);
  m.serve_due(s);
  BOOST_TEST(m.completions() ==
             done({{a, result::granted}, {c, result::granted}, {b, result::granted}}));
  const auto d = m.request(9, 2, s);
  BOOST_TEST(m.status(d) == result::exceeds_capacity);
  BOOST_TEST(!m.contains(9));
}

BOOST_AUTO_TEST_CASE(per_operation_cancellation) {
  keyed m(1, per_s, 10);
  m.request(1, 1, 0);                 // granted
  const auto b = m.request(1, 1, 0);  // due at 1 s
  const auto c = m.request(1, 1, 0);  // due at 2 s
  m.cancel(b, s / 2);                 // the head: c moves up, due at 1 s now
  BOOST_TEST(m.status(b) == result::aborted);
  m.serve_due(s);
  BOOST_TEST(m.status(c) == result::granted);
  m.cancel(c, s);  // already granted: nothing
  BOOST_TEST(m.completions().size() == 3u);
  m.cancel(99, s);  // no such request: nothing
  BOOST_TEST(m.completions().size() == 3u);
}

// --- the bound -----------------------------------------------------------------

BOOST_AUTO_TEST_CASE(below_the_bound_a_new_key_is_admitted_and_nothing_evicted) {
  keyed m(1, per_s, 2);
  BOOST_TEST(m.try_get(1, 1, 0) == result::granted);
  BOOST_TEST(m.try_get(2, 1, 0) == result::granted);
  BOOST_TEST(m.size() == 2u);
  keyed n(1, per_s, 2);
  n.try_get(1, 0, 0);  // key 1 full and evictable, but there is room
  BOOST_CHECK_THROW(n.try_get(2, 1, 0, {1}), violation);
}

BOOST_AUTO_TEST_CASE(at_the_bound_with_nothing_evictable_a_new_key_is_refused) {
  keyed m(2, per_s, 3);
  for (int k = 0; k < 3; ++k)
    BOOST_TEST(m.try_get(k, 1, 0) == result::granted);  // each one token short until 1 s
  BOOST_TEST(m.try_get(3, 1, 0) == result::too_many_keys);
  const auto r = m.request(3, 1, 0);
  BOOST_TEST(m.status(r) == result::too_many_keys);
  BOOST_TEST(!m.contains(3));
  BOOST_TEST(m.size() == 3u);
  BOOST_TEST(m.try_get(0, 1, 0) == result::granted);  // known keys keep working
  // Evicting a key that is not full is a violation (key 1: 1 of 2).
  BOOST_CHECK_THROW(keyed(m).try_get(3, 1, 0, {1}), violation);
  // One nanosecond before keys 1 and 2 are full again: still refused.
  BOOST_TEST(m.try_get(3, 1, s - 1) == result::too_many_keys);
  // At 1 s they are: refusing is a violation now, evicting one of them is right.
  BOOST_CHECK_THROW(keyed(m).try_get(3, 1, s), violation);
  BOOST_CHECK_THROW(keyed(m).try_get(3, 1, s, {0}), violation);     // key 0 is full at 2 s
  BOOST_CHECK_THROW(keyed(m).try_get(3, 1, s, {1, 2}), violation);  // one key for one key
  BOOST_TEST(m.try_get(3, 1, s, {2}) == result::granted);
  BOOST_TEST(m.contains(3));
  BOOST_TEST(!m.contains(2));
  BOOST_TEST(m.size() == 3u);
}

BOOST_AUTO_TEST_CASE(only_full_buckets_are_evicted_and_the_others_keep_their_state) {
  keyed m(3, per_s, 2);
  BOOST_TEST(m.try_get(1, 3, 0) == result::granted);  // full again at 3 s
  BOOST_TEST(m.try_get(2, 1, 0) == result::granted);  // full again at 1 s
  BOOST_TEST(!m.evictable(1, s));
  BOOST_TEST(m.evictable(2, s));
  BOOST_CHECK_THROW(keyed(m).try_get(3, 1, s, {1}), violation);
  BOOST_TEST(m.try_get(3, 1, s, {2}) == result::granted);
  BOOST_TEST(m.try_get(1, 1, s) == result::granted);  // key 1: one token after 1 s, not three
  BOOST_TEST(m.try_get(1, 1, s) == result::pending);
}

BOOST_AUTO_TEST_CASE(a_bucket_with_waiters_is_not_evictable) {
  keyed m(1, per_s, 1);
  const auto a = m.request(1, 1, 0);  // granted
  const auto b = m.request(1, 1, 0);  // due at 1 s
  const auto c = m.request(1, 1, 0);  // due at 2 s; then full again at 3 s
  m.serve_due(s + s / 2);
  BOOST_TEST(m.status(b) == result::granted);
  BOOST_TEST(m.status(c) == result::pending);
  BOOST_TEST(!m.evictable(1, s + s / 2));
  BOOST_CHECK_THROW(keyed(m).try_get(2, 1, s + s / 2, {1}), violation);  // c waits
  BOOST_TEST(m.try_get(2, 1, s + s / 2) == result::too_many_keys);
  m.serve_due(2 * s);
  BOOST_TEST(m.status(c) == result::granted);
  BOOST_TEST(m.try_get(2, 1, 3 * s - 1) == result::too_many_keys);  // 0 tokens until 3 s
  BOOST_CHECK_THROW(keyed(m).try_get(2, 1, 3 * s), violation);
  BOOST_TEST(m.try_get(2, 1, 3 * s, {1}) == result::granted);
  BOOST_TEST(m.status(a) == result::granted);
}

BOOST_AUTO_TEST_CASE(due_waiters_are_granted_before_the_decision) {
  keyed m(1, per_s, 1);
  const auto a = m.request(1, 1, 0);
  const auto b = m.request(1, 1, 0);  // due at 1 s
  const auto c = m.request(1, 1, 0);  // due at 2 s; full again at 3 s
  // No timer has run by 10 s: b and c are granted as of 1 s and 2 s, the bucket
  // has been full since 3 s, so key 1 must make room.
  BOOST_CHECK_THROW(keyed(m).try_get(2, 1, 10 * s), violation);
  BOOST_TEST(m.try_get(2, 1, 10 * s, {1}) == result::granted);
  BOOST_TEST(m.completions() ==
             done({{a, result::granted}, {b, result::granted}, {c, result::granted}}));
}

BOOST_AUTO_TEST_CASE(an_evicted_key_comes_back_full) {
  keyed m(3, per_s, 1);
  BOOST_TEST(m.try_get(1, 3, 0) == result::granted);
  BOOST_TEST(m.try_get(2, 1, 3 * s, {1}) == result::granted);  // key 1 full at 3 s: evicted
  BOOST_TEST(!m.contains(1));
  BOOST_TEST(m.available(1, 3 * s) == 3u);  // as an unknown key
  // Key 2 has 2 of 3 until 4 s: key 1 cannot come back before.
  BOOST_TEST(m.try_get(1, 3, 3 * s) == result::too_many_keys);
  BOOST_TEST(m.try_get(1, 3, 4 * s, {2}) == result::granted);  // a fresh bucket: all 3
  BOOST_TEST(m.try_get(1, 1, 4 * s) == result::pending);
  BOOST_TEST(m.available(1, 5 * s) == 1u);
}

BOOST_AUTO_TEST_CASE(failing_at_once_admits_and_evicts_nothing) {
  keyed m(1, per_s, 1);
  BOOST_TEST(m.try_get(1, 1, 0) == result::granted);
  BOOST_TEST(m.evictable(1, s));
  const auto r = m.request(2, 2, s);  // more than the capacity
  BOOST_TEST(m.status(r) == result::exceeds_capacity);
  BOOST_TEST(m.contains(1));
  BOOST_TEST(!m.contains(2));
  BOOST_CHECK_THROW(keyed(m).request(2, 2, s, {1}), violation);
  BOOST_CHECK_THROW(keyed(m).try_get(1, 1, s, {1}), violation);  // a known key evicts nothing
}

// --- the documented conservative case -------------------------------------------

BOOST_AUTO_TEST_CASE(a_cancelled_request_may_hold_its_bucket_back_until_it_would_have_refilled) {
  keyed m(1, per_s, 1);
  BOOST_TEST(m.try_get(1, 1, 0) == result::granted);  // full at 1 s
  const auto r = m.request(1, 1, 0);                  // due at 1 s: full at 2 s with it
  BOOST_TEST(!m.held_until(1).has_value());
  m.cancel(r, 0);
  BOOST_TEST(m.status(r) == result::aborted);
  BOOST_TEST((m.held_until(1) == 2 * s));
  // Truly full from 1 s; the limiter may still keep it until 2 s: both allowed.
  BOOST_TEST(!m.evictable(1, s - 1));
  BOOST_TEST(m.evictable(1, s));
  BOOST_TEST(m.held_back(1, s));
  BOOST_TEST(keyed(m).try_get(2, 1, s) == result::too_many_keys);
  BOOST_TEST(keyed(m).try_get(2, 1, s, {1}) == result::granted);
  BOOST_TEST(m.held_back(1, 2 * s - 1));  // (the observers bring the buckets to their time)
  BOOST_TEST(keyed(m).try_get(2, 1, 2 * s - 1) == result::too_many_keys);
  // From 2 s on it must be evicted.
  BOOST_TEST(!m.held_back(1, 2 * s));
  BOOST_CHECK_THROW(keyed(m).try_get(2, 1, 2 * s), violation);
  BOOST_TEST(m.try_get(2, 1, 2 * s, {1}) == result::granted);
}

BOOST_AUTO_TEST_CASE(a_request_on_the_key_brings_its_index_up_to_date) {
  keyed m(2, per_s, 1);
  BOOST_TEST(m.try_get(1, 2, 0) == result::granted);  // full at 2 s
  const auto r = m.request(1, 1, 0);                  // due at 1 s: full at 3 s with it
  m.cancel(r, 0);
  BOOST_TEST((m.held_until(1) == 3 * s));
  m.request(1, 3, 0);                                 // fails at once: never reaches the bucket
  BOOST_TEST((m.held_until(1) == 3 * s));             // so it changes nothing
  BOOST_TEST(m.try_get(1, 1, 0) == result::pending);  // reaches the bucket: index exact
  BOOST_TEST(!m.held_until(1).has_value());
  BOOST_TEST(!m.held_back(1, 2 * s));
  BOOST_CHECK_THROW(keyed(m).try_get(2, 1, 2 * s), violation);
  BOOST_TEST(m.try_get(2, 1, 2 * s, {1}) == result::granted);
}

BOOST_AUTO_TEST_CASE(a_give_back_re_indexes_but_giving_back_nothing_is_no_event) {
  // Found by fuzz_keyed (keyed_regressions/give_back_of_nothing_keeps_the_key_held_back):
  // a receipt that holds nothing gives back nothing, and the limiter's bucket never hears
  // of it, so the model may not treat it as bringing the key's index up to date.
  keyed m(2, per_s, 1);
  BOOST_TEST(m.try_get(1, 2, 0) == result::granted);  // full at 2 s
  const auto r = m.request(1, 1, 0);                  // due at 1 s: full at 3 s with it
  m.cancel(r, 0);
  BOOST_TEST((m.held_until(1) == 3 * s));
  m.give_back(1, 0, 0);
  BOOST_TEST((m.held_until(1) == 3 * s));    // still held back until 3 s
  BOOST_TEST(keyed(m).held_back(1, 2 * s));  // (copies: the observers move a bucket's time)
  BOOST_TEST(keyed(m).try_get(2, 1, 2 * s) == result::too_many_keys);
  m.give_back(1, 1, 0);  // a real give-back reaches the bucket: exact again
  BOOST_TEST(!m.held_until(1).has_value());
  BOOST_TEST(!m.held_back(1, s));  // full at 1 s now
  BOOST_CHECK_THROW(keyed(m).try_get(2, 1, s), violation);
}

BOOST_AUTO_TEST_CASE(cancel_all_is_a_cancellation_too) {
  keyed m(1, per_s, 2);
  m.try_get(1, 1, 0);                 // full at 1 s
  const auto r = m.request(1, 1, 0);  // due at 1 s: full at 2 s with it
  m.try_get(2, 1, 0);                 // full at 1 s, nobody waits
  BOOST_TEST(m.cancel_all(0) == 1u);
  BOOST_TEST(m.status(r) == result::aborted);
  BOOST_TEST((m.held_until(1) == 2 * s));
  BOOST_TEST(!m.held_until(2).has_value());  // had no waiter
  BOOST_TEST(m.held_back(1, s));
  BOOST_TEST(!m.held_back(2, s));
  // evict() at 1 s: key 2 must go, key 1 may stay or go.
  BOOST_CHECK_THROW(keyed(m).evict(s, {1}), violation);
  BOOST_TEST(keyed(m).evict(s, {1, 2}) == 2u);
  BOOST_TEST(m.evict(s, {2}) == 1u);
  BOOST_TEST(m.contains(1));
  BOOST_CHECK_THROW(keyed(m).evict(2 * s, {}), violation);  // no longer held back
  BOOST_TEST(m.evict(2 * s, {1}) == 1u);
  BOOST_TEST(m.size() == 0u);
}

// --- close, evict, destroy ---------------------------------------------------------

BOOST_AUTO_TEST_CASE(close_fails_everything_and_is_not_a_cancellation) {
  keyed m(1, per_s, 1);
  m.try_get(1, 1, 0);                 // full at 1 s
  const auto r = m.request(1, 1, 0);  // due at 1 s: full at 2 s with it
  m.close(0);
  BOOST_TEST(!m.is_open());
  BOOST_TEST(m.status(r) == result::closed);
  const auto k = m.request(2, 1, 0);  // new key: closed, no bucket, nothing evicted
  BOOST_TEST(m.status(k) == result::closed);
  BOOST_TEST(!m.contains(2));
  BOOST_CHECK_THROW(keyed(m).request(2, 1, s, {1}), violation);
  BOOST_TEST(m.try_get(1, 0, s) == result::closed);
  BOOST_TEST(m.try_get(2, 5, s) == result::closed);  // closed comes first
  // The documentation names only cancellation: key 1 is not held back.
  BOOST_TEST(!m.held_until(1).has_value());
  BOOST_CHECK_THROW(keyed(m).evict(s, {}), violation);
  BOOST_TEST(m.evict(s, {1}) == 1u);
}

BOOST_AUTO_TEST_CASE(evict_takes_every_evictable_bucket_and_only_those) {
  keyed m(2, per_s, 4);
  m.try_get(1, 2, 0);  // full at 2 s
  m.try_get(2, 1, 0);  // full at 1 s
  m.try_get(3, 0, 0);  // full now
  BOOST_TEST(m.evict(0, {3}) == 1u);
  m.try_get(3, 0, 0);
  BOOST_CHECK_THROW(keyed(m).evict(s, {2}), violation);        // keeps key 3
  BOOST_CHECK_THROW(keyed(m).evict(s, {1, 2, 3}), violation);  // key 1 is not full
  BOOST_TEST(m.evict(s, {2, 3}) == 2u);
  BOOST_TEST(m.size() == 1u);
  BOOST_TEST(m.evict(s, {}) == 0u);
}

BOOST_AUTO_TEST_CASE(destroy_aborts_every_queue_front_to_back) {
  keyed m(1, per_s, 3);
  const auto a = m.request(1, 1, 0);  // granted
  const auto b = m.request(1, 1, 0);
  const auto c = m.request(1, 1, 0);
  const auto d = m.request(2, 1, 0);  // granted
  const auto e = m.request(2, 1, 0);
  m.destroy(0);
  BOOST_TEST(!m.is_open());
  BOOST_TEST(m.completions() == done({{a, result::granted},
                                      {d, result::granted},
                                      {b, result::aborted},
                                      {c, result::aborted},
                                      {e, result::aborted}}));
}

// --- a clock that goes back -----------------------------------------------------

BOOST_AUTO_TEST_CASE(a_bucket_full_only_as_of_a_later_reading_is_not_evictable) {
  keyed m(1, per_s, 1);
  BOOST_TEST(m.try_get(1, 1, 0) == result::granted);
  BOOST_TEST(m.available(1, 10 * s) == 1u);  // the bucket has seen 10 s
  // At 5 s (the clock went back) a fresh bucket would refill from 5 s: key 1
  // would have a token at 6 s that its bucket gives only at 11 s.
  BOOST_TEST(!m.evictable(1, 5 * s));
  BOOST_CHECK_THROW(keyed(m).try_get(2, 0, 5 * s, {1}), violation);
  BOOST_TEST(m.try_get(2, 0, 5 * s) == result::too_many_keys);
  BOOST_TEST(m.evictable(1, 10 * s));
  BOOST_TEST(m.try_get(2, 0, 10 * s, {1}) == result::granted);
}

BOOST_AUTO_TEST_CASE(invalid_configurations_are_refused) {
  BOOST_CHECK_THROW(keyed(0, per_s, 1), std::invalid_argument);
  BOOST_CHECK_THROW(keyed(1, model_rate{0, s}, 1), std::invalid_argument);
  BOOST_CHECK_THROW(keyed(1, model_rate{1, 0}, 1), std::invalid_argument);
  BOOST_CHECK_THROW(keyed(1, model_rate{1, -1}, 1), std::invalid_argument);
  BOOST_CHECK_THROW(keyed(1, per_s, 0), std::invalid_argument);
  BOOST_CHECK_NO_THROW(keyed(u64_max, model_rate{u64_max, i64_max}, 1));
}

// --- quotas and run-time changes ---------------------------------------------

BOOST_AUTO_TEST_CASE(a_key_with_its_own_quota_keeps_it_across_eviction) {
  keyed m(1, per_s, 1);
  m.set_own(1, 3, model_rate{3, s}, 0);  // no bucket yet: configuration only
  BOOST_TEST(!m.contains(1));
  BOOST_TEST(m.available(1, 0) == 3u);
  BOOST_TEST(m.try_get(1, 3, 0) == result::granted);
  BOOST_TEST(m.try_get(2, 1, s - 1) == result::too_many_keys);  // 2.99.. of 3
  BOOST_TEST(m.try_get(2, 1, s, {1}) == result::granted);       // full at 1 s: evicted
  BOOST_TEST(m.available(1, s) == 3u);
  BOOST_TEST(m.try_get(1, 4, 2 * s) == result::exceeds_capacity);
  BOOST_TEST(m.try_get(2, 2, 2 * s) == result::exceeds_capacity);  // key 2: the default 1
  BOOST_TEST(m.own_quotas() == 1u);
  BOOST_TEST(m.reset_own(1, 2 * s));
  BOOST_TEST(!m.reset_own(1, 2 * s));
  BOOST_TEST(m.available(1, 2 * s) == 1u);
}

BOOST_AUTO_TEST_CASE(a_default_change_retimes_the_keys_without_their_own) {
  keyed m(2, per_s, 4);
  m.set_own(2, std::nullopt, per_s, 0);  // key 2: its own rate, the default capacity
  BOOST_TEST(m.try_get(1, 2, 0) == result::granted);
  BOOST_TEST(m.try_get(2, 2, 0) == result::granted);
  const auto a = m.request(1, 2, 0);
  const auto b = m.request(2, 2, 0);
  m.set_default_rate(model_rate{4, s}, 0);  // key 1: due at 0.5 s; key 2 still at 2 s
  m.serve_due(s / 2);
  BOOST_TEST(m.completions() == done({{a, result::granted}}));
  m.set_default_capacity(1, s / 2);  // key 2's request for 2 is now over its capacity
  BOOST_TEST(m.completions() == done({{a, result::granted}, {b, result::exceeds_capacity}}));
  BOOST_TEST(m.quota_of(2).capacity == 1u);
  BOOST_TEST(m.quota_of(2).rate.tokens == 1u);
  BOOST_TEST(m.quota_of(1).rate.tokens == 4u);
  BOOST_CHECK_THROW(m.set_default_capacity(0, s), std::invalid_argument);
  BOOST_CHECK_THROW(m.set_own(1, std::nullopt, model_rate{0, s}, s), std::invalid_argument);
  BOOST_TEST(m.capacity() == 1u);
  BOOST_TEST(m.own_quotas() == 1u);
}

BOOST_AUTO_TEST_CASE(a_raised_capacity_keeps_a_full_bucket_full) {
  // A full bucket is the fresh one its key would get: evicted before the
  // raise or not, the key then holds the new capacity.
  keyed m(1, per_s, 2);
  BOOST_TEST(m.try_get(1, 0, 0) == result::granted);  // key 1: full (1 of 1)
  BOOST_TEST(m.try_get(2, 1, 0) == result::granted);  // key 2: 0 of 1
  m.set_default_capacity(2, 0);
  BOOST_TEST(m.available(1, 0) == 2u);
  BOOST_TEST(m.evictable(1, 0));
  BOOST_TEST(m.available(2, 0) == 0u);  // not full: keeps its level
  BOOST_TEST(!m.evictable(2, 0));
  BOOST_CHECK_THROW(keyed(m).try_get(3, 1, 0, {2}), violation);
  BOOST_TEST(m.try_get(3, 2, 0, {1}) == result::granted);  // key 1 evicted at once
  m.set_own(3, 4, std::nullopt, 2 * s);                    // key 3 full again: full at its own 4
  BOOST_TEST(m.available(3, 2 * s) == 4u);
  BOOST_TEST(m.available(2, 2 * s) == 2u);  // refilled to the new capacity
  m.set_default_capacity(1, 2 * s);         // lowered: full at 1, as ever
  BOOST_TEST(m.available(2, 2 * s) == 1u);
}

BOOST_AUTO_TEST_SUITE_END()
