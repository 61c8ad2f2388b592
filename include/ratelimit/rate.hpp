//
// ratelimit/rate.hpp: how fast a bucket refills.
//
#ifndef RATELIMIT_RATE_HPP
#define RATELIMIT_RATE_HPP

#include <chrono>
#include <cstdint>

namespace ratelimit {

/// `tokens` tokens every `period`, accrued continuously: `rate{3, 1s}` adds one
/// token every 333'333'333.33... ns. Accrual is exact between rate changes: no
/// fraction of a token is ever lost. A rate change (`set_rate`) keeps the level
/// accrued so far, rounded down to a multiple of 2^-64 of the new rate's unit,
/// 1/u of a token with u = period / gcd(tokens, period) in ns: each change
/// loses less than 2^-64 of a token and never grants more than was accrued.
///
/// The default rate is one token per second. A rate is validated when it is
/// handed to a bucket: `tokens` must be at least 1 and `period` positive,
/// otherwise the bucket throws `std::invalid_argument`.
struct rate {
  std::uint64_t tokens = 1;
  std::chrono::nanoseconds period = std::chrono::seconds(1);

  friend constexpr bool operator==(const rate&, const rate&) = default;
};

/// `n` tokens per second.
constexpr rate per_second(std::uint64_t n) noexcept {
  return rate{n, std::chrono::seconds(1)};
}

/// `n` tokens per minute.
constexpr rate per_minute(std::uint64_t n) noexcept {
  return rate{n, std::chrono::minutes(1)};
}

/// `n` tokens per hour.
constexpr rate per_hour(std::uint64_t n) noexcept {
  return rate{n, std::chrono::hours(1)};
}

/// The limit of one key of a keyed limiter: a bucket of `capacity` tokens
/// refilling at `rate` (`keyed_limiter::set_quota`, `get_quota`).
struct quota {
  std::uint64_t capacity = 1;
  ratelimit::rate rate;

  friend constexpr bool operator==(const quota&, const quota&) = default;
};

/// How full a new bucket starts. The default is full (`capacity` tokens);
/// `start_empty` starts it with none, `initial_tokens{k}` with `k` (at most the
/// capacity).
struct initial_tokens {
  std::uint64_t count;
};

/// A bucket that starts with no tokens: the first token arrives one token
/// interval after construction.
inline constexpr initial_tokens start_empty{0};

}  // namespace ratelimit

#endif  // RATELIMIT_RATE_HPP
