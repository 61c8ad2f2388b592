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
// then exact integer operations: no fraction of a token is ever lost, nothing
// drifts, and 128-bit intermediates cannot overflow for any capacity below
// 2^64 and any period below 2^63 ns (292 years).
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
        level_(static_cast<uint128>(initial) * r.ticks) {}

  std::uint64_t capacity() const noexcept { return capacity_; }
  reduced_rate rate() const noexcept { return rate_; }

  /// The latest time seen by refill(): every "when" answer is relative to it.
  std::int64_t last() const noexcept { return last_; }

  /// Accrues the tokens earned since the last refill, up to the capacity. A
  /// `now` earlier than last() has no effect: a clock that goes back mints nothing.
  void refill(std::int64_t now) noexcept {
    if (now <= last_) return;
    const auto elapsed = static_cast<std::uint64_t>(now) - static_cast<std::uint64_t>(last_);
    last_ = now;
    const uint128 full = cap_units();
    if (level_ >= full) return;
    // elapsed * tokens < 2^128; compare before adding so nothing overflows.
    const uint128 gained = static_cast<uint128>(elapsed) * rate_.tokens;
    level_ = gained >= full - level_ ? full : level_ + gained;
  }

  /// Whole tokens in the bucket as of last().
  std::uint64_t available() const noexcept {
    return static_cast<std::uint64_t>(level_ / rate_.ticks);
  }

  /// True when `n` tokens are in the bucket as of last().
  bool has(std::uint64_t n) const noexcept {
    return level_ >= static_cast<uint128>(n) * rate_.ticks;
  }

  /// Removes `n` tokens. Precondition: has(n).
  void take(std::uint64_t n) noexcept { level_ -= static_cast<uint128>(n) * rate_.ticks; }

  /// Returns `n` tokens taken earlier by a request that could not be
  /// completed, up to the capacity: the level is then what it would have
  /// been had they never been taken (refill is monotone and capped alike).
  void give_back(std::uint64_t n) noexcept {
    const uint128 full = cap_units();
    const uint128 add = static_cast<uint128>(n) * rate_.ticks;
    level_ = add >= full - level_ ? full : level_ + add;
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

  /// Changes the rate from now on. Tokens accrued so far at the old rate are
  /// kept (the caller refills first); a fraction of a token is carried over,
  /// rounded down to the new unit (less than one nanosecond's worth).
  void set_rate(reduced_rate r) noexcept {
    if (r == rate_) return;
    const uint128 whole = level_ / rate_.ticks;
    const uint128 frac = level_ % rate_.ticks;
    level_ = whole * r.ticks + frac * r.ticks / rate_.ticks;
    rate_ = r;
  }

  /// Changes the capacity; a bucket holding more than the new capacity drops the excess.
  void set_capacity(std::uint64_t capacity) noexcept {
    capacity_ = capacity;
    if (level_ > cap_units()) level_ = cap_units();
  }

 private:
  uint128 cap_units() const noexcept { return static_cast<uint128>(capacity_) * rate_.ticks; }

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
  uint128 level_;  // in units; 0 <= level_ <= capacity_ * rate_.ticks
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_BUCKET_STATE_HPP
