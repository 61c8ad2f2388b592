//
// ratelimit/detail/metrics_counts.hpp: what one bucket counts, bumped where
// its requests are decided.
//
// A pure unit (no Asio, no atomics): its owner bumps it under the lock that
// decides the request (a solo bucket's spin lock, or the joint group's lock
// while the bucket is in the group, whose scheduler then keeps it) and reads
// it under the same lock. So a snapshot is consistent: every request is, at
// that instant, either queued or counted once by how it ended, and the
// number of requests is derived from that rather than counted (one store
// less on every grant).
//
#ifndef RATELIMIT_DETAIL_METRICS_COUNTS_HPP
#define RATELIMIT_DETAIL_METRICS_COUNTS_HPP

#include <ratelimit/metrics.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace ratelimit::detail {

/// How a request that was not granted ended, as counted: an error index
/// (`error_kind_of`: 0 to error_kinds - 1), or one of these two.
inline constexpr std::size_t ended_cancelled = error_kinds;
inline constexpr std::size_t ended_expired = error_kinds + 1;

// RATELIMIT_NO_METRICS (defined alike for every translation unit of a
// program, as any configuration macro) compiles the counting out: the
// benchmarks' "metrics off" rows, which show what counting costs. metrics()
// then reports the gauges only.
#ifdef RATELIMIT_NO_METRICS
inline constexpr bool counting_on = false;
#else
inline constexpr bool counting_on = true;
#endif

struct metrics_counts {
  // What a try or a grant at once touches first, together: placed right
  // after the bucket's state, they share the cache lines the request
  // touches anyway (a try from two threads bounces no extra line).
  std::uint64_t at_once = 0;  // grants that did not wait (histogram bucket 0)
  std::uint64_t tokens_granted = 0;
  std::uint64_t refusals = 0;
  std::uint64_t wait_sum_us = 0;
  std::uint64_t tokens_given_back = 0;
  std::array<std::uint64_t, wait_histogram_layout::buckets> wait_counts{};  // after waiting
  // Indexed by error index, then cancelled, then expired.
  std::array<std::uint64_t, error_kinds + 2> ended{};

  /// A grant at once (no wait).
  void granted(std::uint64_t n) noexcept {
    if constexpr (!counting_on) return;
    ++at_once;
    tokens_granted += n;
  }

  /// A grant at `at` of a request made at `made_at` (clock readings in ns:
  /// the wait is their difference, exact also across the clock's epoch).
  void granted(std::uint64_t n, std::int64_t made_at, std::int64_t at) noexcept {
    if constexpr (!counting_on) return;
    const std::uint64_t wait =
        at > made_at ? static_cast<std::uint64_t>(at) - static_cast<std::uint64_t>(made_at) : 0;
    constexpr auto longest = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    ++wait_counts[wait_histogram_layout::bucket_of(
        static_cast<std::int64_t>(std::min(wait, longest)))];
    wait_sum_us += wait / 1000;
    tokens_granted += n;
  }

  void refused() noexcept {
    if constexpr (counting_on) ++refusals;
  }

  /// Ended without a grant: `how` is an error index, ended_cancelled or ended_expired.
  void ended_as(std::size_t how, std::uint64_t count = 1) noexcept {
    if constexpr (counting_on) ended[how < ended.size() ? how : 0] += count;
  }

  void gave_back(std::uint64_t n) noexcept {
    if constexpr (counting_on) tokens_given_back += n;
  }

  /// The snapshot, with the gauges as read under the same lock.
  limiter_metrics snapshot(std::uint64_t queued, std::uint64_t available) const noexcept {
    limiter_metrics m;
    m.wait_counts = wait_counts;
    m.wait_counts[0] += at_once;
    m.wait_sum_us = wait_sum_us;
    m.grants = m.wait_count();
    m.refusals = refusals;
    m.cancellations = ended[ended_cancelled];
    m.deadline_expiries = ended[ended_expired];
    std::uint64_t errors = 0;
    for (std::size_t i = 0; i < error_kinds; ++i) {
      m.errors[i] = ended[i];
      errors += ended[i];
    }
    m.tokens_granted = tokens_granted;
    m.tokens_given_back = tokens_given_back;
    m.queued_requests = queued;
    m.tokens_available = queued == 0 ? available : 0;  // (while requests wait, owed to them)
    m.requests = m.grants + m.refusals + m.cancellations + m.deadline_expiries + errors + queued;
    return m;
  }
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_METRICS_COUNTS_HPP
