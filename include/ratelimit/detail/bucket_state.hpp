//
// ratelimit/detail/bucket_state.hpp: the token arithmetic, with no Asio in it.
//
// Time is an explicit input (nanoseconds on some monotonic scale), so every
// decision is a pure function of the calls made and the times passed. The
// async bucket, the blocking calls and every other backend ask this unit
// whether a request is granted now and, if not, when it will be.
//
// Representation: the level is kept in "units", where one token is `ticks`
// units and every nanosecond adds `tokens` units (`tokens`/`ticks` being the
// rate reduced to lowest terms). Refill, take and "time until n tokens" are
// then exact integer operations: between rate changes no fraction of a token
// is ever lost, nothing drifts, and 128-bit intermediates cannot overflow for
// any capacity below 2^64 and any period below 2^63 ns (292 years).
//
// Rate changes: the level in the new rate's units is rarely a whole number
// (59/60 of a token is no whole number of units at 10^9 tokens/s, where a
// unit is a whole token), and rounding it down to one would lose up to a
// token, which the next change to a slower rate would make plain. So the level
// carries a `residue` in units of 2^-64 of a unit: the exact level is
// level + residue / 2^64 units. A rate change rounds the level down to a
// multiple of 2^-64 of the new rate's unit (1/u of a token, u = period /
// gcd(tokens, period) in ns): it loses less than 2^-64 of a token per change,
// never adds any, and changes to the same reduced rate change nothing.
// (Exactness across any sequence of changes would need unbounded denominators.)
// Accrual adds whole units, so it leaves the residue alone; so does take().
// Reaching the capacity, by refill() or a lower set_capacity(), sets the level
// to exactly the capacity: the residue goes.
//
// Only set_rate reads the residue. Every other answer ignores it and is still
// exactly that of a bucket holding the exact level x = level + r units
// (r = residue / 2^64, 0 <= r < 1): the questions all compare x with an
// integer m of units, or divide by an integer t >= 1 (units per token) or
// k >= 1 (units per ns), and floor(x) = level, so
//   x >= m  <=>  level >= m                   (has(n), refill's test for full)
//   floor(x / t) = floor(floor(x) / t) = floor(level / t)            (available)
//   ceil((m - x) / k) = ceil(ceil(m - x) / k) = ceil((m - level) / k)
//     for m > level, as then ceil(m - x) = m - level        (ticks_until, ready_at)
// Put plainly: at least one unit accrues every nanosecond, so a residue below
// one unit is worth less than a nanosecond and moves no answer given in whole
// tokens or whole nanoseconds (test_bucket_state checks it against exact
// rationals).
//
// Thread safety: none; a bucket_state is a value, guarded by its owner.
//
#ifndef RATELIMIT_DETAIL_BUCKET_STATE_HPP
#define RATELIMIT_DETAIL_BUCKET_STATE_HPP

#include <ratelimit/rate.hpp>

#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>

namespace ratelimit::detail {

__extension__ typedef unsigned __int128 uint128;  // GCC and Clang on 64-bit targets

inline constexpr std::int64_t max_time = std::numeric_limits<std::int64_t>::max();

/// A rate in lowest terms: `tokens` tokens every `ticks` nanoseconds.
struct reduced_rate {
  std::uint64_t tokens;
  std::uint64_t ticks;

  friend constexpr bool operator==(const reduced_rate&, const reduced_rate&) = default;
};

/// Validates `r` and reduces it; throws std::invalid_argument saying what is wrong.
inline reduced_rate reduce(const rate& r) {
  if (r.tokens == 0)
    throw std::invalid_argument("ratelimit: rate must add at least one token per period (got 0)");
  if (r.period.count() <= 0)
    throw std::invalid_argument("ratelimit: rate period must be positive (got " +
                                std::to_string(r.period.count()) + " ns)");
  const auto ticks = static_cast<std::uint64_t>(r.period.count());
  const std::uint64_t g = std::gcd(r.tokens, ticks);
  return reduced_rate{r.tokens / g, ticks / g};
}

/// Validates a capacity; throws std::invalid_argument when it is zero.
inline std::uint64_t check_capacity(std::uint64_t capacity) {
  if (capacity == 0)
    throw std::invalid_argument("ratelimit: capacity must be at least 1 token (got 0)");
  return capacity;
}

class bucket_state {
 public:
  /// A bucket of `capacity` tokens refilling at `r`, holding `initial` tokens
  /// at time `now`. Preconditions (checked by the callers that take user
  /// input): capacity >= 1, initial <= capacity.
  bucket_state(std::uint64_t capacity, reduced_rate r, std::int64_t now,
               std::uint64_t initial) noexcept
      : capacity_(capacity),
        rate_(r),
        last_(now),
        level_(static_cast<uint128>(initial) * r.ticks),
        residue_(0) {}

  std::uint64_t capacity() const noexcept { return capacity_; }
  reduced_rate rate() const noexcept { return rate_; }

  /// The latest time seen by refill(): every "when" answer is relative to it.
  std::int64_t last() const noexcept { return last_; }

  /// The level in units (1/rate().ticks of a token), rounded down, and the
  /// rest of it in 2^-64 of a unit: exactly level() + residue() / 2^64 units.
  uint128 level() const noexcept { return level_; }
  std::uint64_t residue() const noexcept { return residue_; }

  /// Accrues the tokens earned since the last refill, up to the capacity. A
  /// `now` earlier than last() has no effect: a clock that goes back mints nothing.
  void refill(std::int64_t now) noexcept {
    if (now <= last_) return;
    const std::int64_t from = std::exchange(last_, now);
    const uint128 full = cap_units();
    if (level_ >= full) return;
    // Compared before adding so nothing overflows. With the residue the exact
    // level is above level_ by less than one unit: it reaches the capacity
    // (an integer) exactly when level_ + gained does, and is then capped at
    // exactly the capacity.
    const uint128 gained = gained_between(from, now);
    const bool capped = gained >= full - level_;
    level_ = capped ? full : level_ + gained;
    residue_ = capped ? 0 : residue_;
  }

  /// The units refill(t) would lose to the capacity (what accrues beyond
  /// it): 0 when `t` is not later than last() or the bucket is not full by t.
  uint128 waste_until(std::int64_t t) const noexcept {
    if (t <= last_) return 0;
    const uint128 gained = gained_between(last_, t);
    const uint128 room = cap_units() - level_;
    return gained > room ? gained - room : 0;
  }

  /// Whole tokens in the bucket as of last().
  std::uint64_t available() const noexcept {
    return static_cast<std::uint64_t>(level_ / rate_.ticks);
  }

  /// True when `n` tokens are in the bucket as of last().
  bool has(std::uint64_t n) const noexcept {
    return level_ >= static_cast<uint128>(n) * rate_.ticks;
  }

  /// Removes `n` tokens (the residue stays). Precondition: has(n).
  void take(std::uint64_t n) noexcept { level_ -= static_cast<uint128>(n) * rate_.ticks; }

  /// Returns `n` tokens taken earlier by a request that could not be
  /// completed, up to the capacity: the level is then what it would have
  /// been had they never been taken (refill is monotone and capped alike).
  void give_back(std::uint64_t n) noexcept {
    const uint128 full = cap_units();
    const uint128 add = static_cast<uint128>(n) * rate_.ticks;
    if (add >= full - level_) {
      level_ = full;
      residue_ = 0;  // at the capacity exactly (as refill)
    } else {
      level_ += add;
    }
  }

  /// refill(now), then take `n` tokens if they are there.
  bool try_take(std::int64_t now, std::uint64_t n) noexcept {
    refill(now);
    if (!has(n)) return false;
    take(n);
    return true;
  }

  /// Nanoseconds after last() at which `n` tokens will have accrued, if
  /// nothing else is taken (0 when they are there already). `n` may exceed the
  /// capacity: that answers "when will a queue needing n tokens in all have
  /// been served", since a queue consumes tokens before the bucket can fill.
  /// Saturates at max_time.
  std::uint64_t ticks_until(uint128 n) const noexcept {
    const uint128 ticks = exact_ticks_until(n);
    return ticks >= static_cast<uint128>(max_time) ? static_cast<std::uint64_t>(max_time)
                                                   : static_cast<std::uint64_t>(ticks);
  }

  /// The time at which `n` tokens will be there (see ticks_until), saturating at max_time.
  std::int64_t ready_at(uint128 n) const noexcept {
    // The unsaturated wait: before the clock's epoch (last_ < 0) a wait longer
    // than max_time can still end at a representable time, and saturating it
    // first would answer too early.
    const uint128 t = exact_ticks_until(n);
    // In unsigned arithmetic: for a time before the clock's epoch (last_ < 0)
    // max_time - last_ overflows int64 but fits in uint64.
    const std::uint64_t headroom =
        static_cast<std::uint64_t>(max_time) - static_cast<std::uint64_t>(last_);
    if (t >= headroom) return max_time;
    // last_ + t <= max_time; t may exceed max_time, so add in uint64 (mod 2^64).
    return static_cast<std::int64_t>(static_cast<std::uint64_t>(last_) +
                                     static_cast<std::uint64_t>(t));
  }

  /// Changes the rate from now on. The level accrued so far is kept, rounded
  /// down to a multiple of 2^-64 of the new unit (the caller refills first):
  /// less than 2^-64 of a token is lost, and none is added.
  void set_rate(reduced_rate r) noexcept {
    if (r == rate_) return;
    // In 2^-64 of the new unit the level is exactly
    //   (level_ * 2^64 + residue_) * t2 / t1,
    // with t1, t2 the old and new ticks (units per token), both below 2^63.
    // That product reaches 2^254, so it is split twice to keep every
    // intermediate below 2^128:
    //   level_ = a * t1 + b: a <= capacity_ < 2^64 whole tokens, b < t1 < 2^63;
    //   x = b * 2^64 + residue_ < t1 * 2^64 < 2^127, the fraction of a token;
    //   x = c * t1 + d: c = x / t1 < 2^64, d < t1 < 2^63.
    // Then the level is a * t2 * 2^64 + c * t2 + d * t2 / t1, rounded down
    //   a * t2 * 2^64 + f,  f = c * t2 + floor(d * t2 / t1) = floor(x * t2 / t1)
    // (c * t2 < 2^127, d * t2 < 2^126), and f < t2 * 2^64 < 2^127 since
    // x < t1 * 2^64: f / 2^64 is the fraction of a token in new units (below
    // t2), f mod 2^64 the new residue, and a * t2 + f / 2^64 <= 2^64 * t2 <
    // 2^127. Rounded down, the new level is at most the old one in tokens, so
    // it stays within the capacity (and is the capacity only with no residue).
    const std::uint64_t t1 = rate_.ticks;
    const std::uint64_t t2 = r.ticks;
    const uint128 a = level_ / t1;
    const auto b = static_cast<std::uint64_t>(level_ % t1);
    const uint128 x = static_cast<uint128>(b) << 64 | residue_;
    const uint128 c = x / t1;
    const auto d = static_cast<std::uint64_t>(x % t1);
    const uint128 f = c * t2 + static_cast<uint128>(d) * t2 / t1;
    level_ = a * t2 + (f >> 64);
    residue_ = static_cast<std::uint64_t>(f);
    rate_ = r;
  }

  /// Changes the capacity; a bucket holding more than the new capacity drops
  /// the excess. With `full_stays_full`, a bucket at its capacity (as of
  /// last()) is at the new capacity after a raise: a keyed limiter's rule,
  /// where a full bucket is the fresh bucket a new use of its key would get.
  void set_capacity(std::uint64_t capacity, bool full_stays_full = false) noexcept {
    const bool fill = full_stays_full && capacity > capacity_ && level_ >= cap_units();
    capacity_ = capacity;
    if (fill) level_ = cap_units();  // (the residue is 0 at the capacity)
    // At the capacity exactly, a residue would be above it.
    if (level_ >= cap_units()) {
      level_ = cap_units();
      residue_ = 0;
    }
  }

 private:
  uint128 cap_units() const noexcept { return static_cast<uint128>(capacity_) * rate_.ticks; }

  /// The units that accrue from `from` to `to` (from < to), uncapped:
  /// below 2^64 ns times a rate numerator below 2^64, so below 2^128.
  uint128 gained_between(std::int64_t from, std::int64_t to) const noexcept {
    const auto elapsed = static_cast<std::uint64_t>(to) - static_cast<std::uint64_t>(from);
    return static_cast<uint128>(elapsed) * rate_.tokens;
  }

  /// The exact wait for `n` tokens in ns (may exceed max_time; all ones if
  /// n units do not fit in 128 bits, which no capacity below 2^64 reaches).
  uint128 exact_ticks_until(uint128 n) const noexcept {
    const uint128 max_n = std::numeric_limits<uint128>::max() / rate_.ticks;
    if (n > max_n) return std::numeric_limits<uint128>::max();
    const uint128 need = n * rate_.ticks;
    if (need <= level_) return 0;
    const uint128 missing = need - level_;
    return missing / rate_.tokens + (missing % rate_.tokens != 0);  // ceil
  }

  std::uint64_t capacity_;
  reduced_rate rate_;
  std::int64_t last_;
  uint128 level_;          // in units; 0 <= level_ <= capacity_ * rate_.ticks
  std::uint64_t residue_;  // in 2^-64 of a unit; 0 when level_ is the capacity
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_BUCKET_STATE_HPP
