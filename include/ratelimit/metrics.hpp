//
// ratelimit/metrics.hpp: what a limiter counts, as a snapshot of plain numbers.
//
#ifndef RATELIMIT_METRICS_HPP
#define RATELIMIT_METRICS_HPP

#include <ratelimit/error.hpp>

#include <boost/system/error_code.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ratelimit {

/// The wait histogram's buckets: a granted request's wait falls in the first
/// bucket whose upper bound it does not exceed (Prometheus's `le`, "less than
/// or equal"), or in the last bucket (+Inf) when it exceeds them all.
///
/// The bounds are 1, 2.5 and 5 times each power of ten from 1 µs to 10 000 s
/// (2 h 46 min): 31 bounds, 32 buckets. They are fixed, so that histograms
/// of different limiters, processes and versions can be added together.
struct wait_histogram_layout {
  /// Number of finite bounds.
  static constexpr std::size_t bounds = 31;
  /// Number of buckets: one per bound, then +Inf.
  static constexpr std::size_t buckets = bounds + 1;

  // clang-format off
  /// The upper bounds, in nanoseconds.
  static constexpr std::array<std::int64_t, bounds> bound_ns = {
      1'000, 2'500, 5'000,                                      // 1 µs
      10'000, 25'000, 50'000,
      100'000, 250'000, 500'000,
      1'000'000, 2'500'000, 5'000'000,                          // 1 ms
      10'000'000, 25'000'000, 50'000'000,
      100'000'000, 250'000'000, 500'000'000,
      1'000'000'000, 2'500'000'000, 5'000'000'000,              // 1 s
      10'000'000'000, 25'000'000'000, 50'000'000'000,
      100'000'000'000, 250'000'000'000, 500'000'000'000,
      1'000'000'000'000, 2'500'000'000'000, 5'000'000'000'000,  // 1000 s
      10'000'000'000'000};

  /// The upper bounds in seconds, as Prometheus's own clients print them
  /// (Go's `strconv.FormatFloat(b, 'g', -1, 64)`), for the `le` label.
  static constexpr std::array<std::string_view, bounds> bound_text = {
      "1e-06", "2.5e-06", "5e-06",
      "1e-05", "2.5e-05", "5e-05",
      "0.0001", "0.00025", "0.0005",
      "0.001", "0.0025", "0.005",
      "0.01", "0.025", "0.05",
      "0.1", "0.25", "0.5",
      "1", "2.5", "5",
      "10", "25", "50",
      "100", "250", "500",
      "1000", "2500", "5000",
      "10000"};
  // clang-format on

  /// The bucket of a wait of `ns` nanoseconds (0 and negative waits: the
  /// first bucket).
  static constexpr std::size_t bucket_of(std::int64_t ns) noexcept {
    std::size_t lo = 0, hi = bounds;  // the first bound >= ns is in [lo, hi]
    while (lo < hi) {
      const std::size_t mid = (lo + hi) / 2;
      if (bound_ns[mid] < ns)
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  }
};

/// The error codes a limiter counts failures by: index `i` (1 to
/// `error_kinds - 1`) is `ratelimit::error` code `i`; index 0 is any error
/// of another category (an allocation failure, an error of the handler's
/// executor).
inline constexpr std::size_t error_kinds = 10;

/// The name of error index `i` (`error_kinds` when out of range: "other"),
/// as it appears in the `code` label of the exposition: the enumerator's name.
constexpr std::string_view error_kind_name(std::size_t i) noexcept {
  constexpr std::array<std::string_view, error_kinds> names = {
      "other",           "exceeds_capacity",  "bucket_closed", "would_deadlock",
      "too_many_keys",   "redis_unavailable", "redis_error",   "redis_bad_reply",
      "context_stopped", "exceeds_horizon"};
  return i < error_kinds ? names[i] : names[0];
}
// The names cover the codes up to exceeds_horizon; test_metrics fails when a
// code is added after it without a name here.
static_assert(error::exceeds_horizon + 1 == error_kinds);

/// The error index of `ec` (0 for an error of another category).
inline std::size_t error_kind_of(const boost::system::error_code& ec) noexcept {
  if (ec.category() != error::get_category()) return 0;
  const int v = ec.value();
  return v > 0 && static_cast<std::size_t>(v) < error_kinds ? static_cast<std::size_t>(v) : 0;
}

/// What a limiter has counted since it was made: a snapshot of plain numbers.
/// Counters only grow, so the difference of two snapshots is what happened
/// between them (the rate an operator graphs); the gauges say how things are
/// at the snapshot. `prometheus::write_text` turns snapshots into the
/// Prometheus text format.
struct limiter_metrics {
  /// Requests made: tries, asynchronous and blocking requests (granted,
  /// refused, failed, cancelled, expired, or still waiting).
  std::uint64_t requests = 0;
  /// Requests granted (by a try, at once, or after waiting).
  std::uint64_t grants = 0;
  /// Tries that found the tokens not there (`try_get_token` returned false).
  std::uint64_t refusals = 0;
  /// Requests cancelled before they were granted: per-operation
  /// cancellation, `cancel()`, or the limiter's destruction.
  std::uint64_t cancellations = 0;
  /// Requests whose deadline came before their tokens (the deadline forms).
  std::uint64_t deadline_expiries = 0;
  /// Requests that failed, by error: `errors[i]` counts error index `i`
  /// (`error_kind_of`, `error_kind_name`). Cancellations and deadline
  /// expiries are not errors here.
  std::array<std::uint64_t, error_kinds> errors{};
  /// Tokens granted (the sum of the granted requests' sizes).
  std::uint64_t tokens_granted = 0;
  /// Tokens given back (receipts, refunds), whether or not the bucket had
  /// room for all of them.
  std::uint64_t tokens_given_back = 0;

  /// Gauge: requests waiting now.
  std::uint64_t queued_requests = 0;
  /// Gauge: whole tokens in the bucket now (0 while requests wait).
  std::uint64_t tokens_available = 0;

  /// The wait of the granted requests, from the request to its grant (0 for
  /// a grant at once): `wait_counts[b]` granted requests waited within bucket
  /// `b` of `wait_histogram_layout` (not cumulative).
  std::array<std::uint64_t, wait_histogram_layout::buckets> wait_counts{};
  /// The sum of those waits, in microseconds (each wait rounded down to a
  /// microsecond: 10 000 grants a second that each waited a second take 58
  /// years to wrap it).
  std::uint64_t wait_sum_us = 0;

  /// The number of granted requests in the histogram (the sum of
  /// `wait_counts`).
  std::uint64_t wait_count() const noexcept {
    std::uint64_t n = 0;
    for (std::uint64_t c : wait_counts)
      n += c;
    return n;
  }

  /// Adds `other`'s numbers to these, the gauges too: the totals of several
  /// limiters, e.g. of every key of a keyed limiter (whose keys' queues and
  /// tokens add up). To keep totals of limiters that are gone, add their
  /// last snapshot with its gauges set to 0.
  limiter_metrics& operator+=(const limiter_metrics& other) noexcept {
    requests += other.requests;
    grants += other.grants;
    refusals += other.refusals;
    cancellations += other.cancellations;
    deadline_expiries += other.deadline_expiries;
    for (std::size_t i = 0; i < error_kinds; ++i)
      errors[i] += other.errors[i];
    tokens_granted += other.tokens_granted;
    tokens_given_back += other.tokens_given_back;
    queued_requests += other.queued_requests;
    tokens_available += other.tokens_available;
    for (std::size_t b = 0; b < wait_histogram_layout::buckets; ++b)
      wait_counts[b] += other.wait_counts[b];
    wait_sum_us += other.wait_sum_us;
    return *this;
  }

  friend bool operator==(const limiter_metrics&, const limiter_metrics&) = default;
};

}  // namespace ratelimit

#endif  // RATELIMIT_METRICS_HPP
