//
// ratelimit/redis/options.hpp: how a Redis bucket behaves, key quotas, Redis errors read.
//
#ifndef RATELIMIT_REDIS_OPTIONS_HPP
#define RATELIMIT_REDIS_OPTIONS_HPP

#include <ratelimit/rate.hpp>

#include <chrono>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>

namespace ratelimit {

/// The capacity and rate of one key of a keyed Redis limiter
/// (basic_redis_keyed_limiter): `capacity` tokens refilling at `r`.
struct redis_quota {
  std::uint64_t capacity = 0;
  rate r{};
};

/// What a Redis bucket does while Redis is unavailable: unreachable, not
/// answering within the connection's `request_timeout`, or answering with an
/// error that means "not now" (see classify_redis_error()).
enum class redis_fault_policy {
  /// Requests complete with `ratelimit::error::redis_unavailable`.
  fail_closed,
  /// Requests are granted (and counted in `redis_bucket_stats::fail_open_grants`).
  fail_open,
  /// Requests are served by a local bucket of the same capacity and rate
  /// (one per bucket object, so the limit becomes per process while Redis is gone).
  local_fallback,
};

/// How a Redis bucket's requests reach Redis.
enum class redis_bucket_mode {
  /// Only the head of this object's queue asks Redis, one request at a time;
  /// refused, it waits (a local timer) until the script says its tokens will
  /// be there, then asks again. Across processes there is no line: whoever
  /// asks first when tokens are there gets them. The mode that can lease.
  head_only,
  /// Every request is sent at once (requests queued together in one script
  /// call, several calls in flight) and reserves its tokens in Redis: the
  /// key keeps one line for every process, in order of arrival at Redis, and
  /// the script answers with the instant the tokens are due, at which the
  /// request is granted without asking again. One round trip per grant,
  /// exact, fair across processes. A request that would be due further than
  /// `horizon` ahead fails at once with `exceeds_horizon`, taking nothing.
  reserve,
};

/// Options of a Redis bucket. Every value has a meaning or is refused by the
/// bucket's constructor with std::invalid_argument (see validate()).
struct redis_bucket_options {
  /// What to do while Redis is unavailable. Any of the three policies.
  redis_fault_policy on_fault = redis_fault_policy::fail_closed;

  /// After a request found Redis unavailable, the policy is applied without
  /// asking Redis for this long, so that a dead server costs one timeout, not
  /// one per request; the first request after it asks Redis again. Must be
  /// positive (a hold of 0 would ask a dead server in a busy loop).
  std::chrono::milliseconds fault_hold{100};

  /// Leasing: when > 0, a request that goes to Redis also takes up to this
  /// many more tokens if they are there, and later requests of this bucket
  /// object are served from them without a round trip. 0 (the default): no
  /// leasing, Redis decides every grant. At most the capacity. The README
  /// says exactly how far leasing lets the bucket exceed its limit.
  std::uint64_t lease = 0;

  /// Leased tokens not used within this time are dropped (never returned to
  /// Redis). Must be positive; only read when `lease > 0`.
  std::chrono::milliseconds lease_ttl{1000};

  /// How requests reach Redis (see redis_bucket_mode). Leasing needs `head_only`.
  redis_bucket_mode mode = redis_bucket_mode::head_only;

  /// Reservation mode: the longest a request may be reserved ahead (the
  /// longest line a key keeps, in time); a request that would be due later
  /// fails at once with `exceeds_horizon`, taking nothing. Not negative; 0
  /// grants only tokens that are there (never waits in line). The default,
  /// `milliseconds::max()`, is as far ahead as the script computes exactly
  /// (capacity·tick + horizon·tok + tok within 2^53: centuries at usual rates,
  /// days at a billion tokens a second), so requests wait in line as long as
  /// they must, as on a local bucket. A shorter horizon bounds the wait and
  /// what a lost key (a server restarted without its data) can forgive: see
  /// the README. An explicit horizon beyond exactness is refused by the
  /// constructor.
  std::chrono::milliseconds horizon = std::chrono::milliseconds::max();

  /// Reservation mode: script calls this object keeps in flight at once on
  /// its connection (at least 1). Requests that arrive while the window is
  /// full wait locally and go in the next call together.
  std::size_t max_in_flight = 4;

  /// Reservation mode: the most requests one script call carries (1 to
  /// 4096): a call runs atomically on the server, blocking it for about a
  /// microsecond per request, so this bounds what one call makes the
  /// connection's other requests wait.
  std::size_t max_batch = 256;

  /// The generation of this object's configuration (capacity and rate).
  /// The configuration stored with a key is authoritative: a request that
  /// finds a newer generation stored runs with the stored configuration,
  /// and this object takes it on (capacity(), get_rate(), generation(),
  /// stats().reconfigurations); one that finds an older generation stored
  /// replaces it with this object's, migrating the level (whole tokens carry
  /// over, up to the new capacity; a full bucket stays full); at the same
  /// generation, another configuration is an error (`redis_error`) at
  /// generation 0 (clients that do not use generations must agree) and is
  /// followed at a later one (the stored configuration wins: a generation
  /// may be written twice once a key is deleted). So a rolling deploy that
  /// changes a key's configuration bumps this number, and old and new
  /// processes share one bucket, on the new configuration, from the first
  /// request of a new one; a key written so expires when full, like any, so
  /// while the deploy lasts an old process that was never told may create it
  /// again with its configuration (a full bucket), until the next request of
  /// a new one. set_rate() and set_capacity() write the next generation
  /// (kept: see there). Every process must run a version that knows
  /// generations before any writes one. 0 to 2^53 - 2.
  std::uint64_t generation = 0;
};

/// Throws std::invalid_argument, naming the option and the value, unless
/// `o` is valid for a bucket of `capacity` tokens.
inline void validate(const redis_bucket_options& o, std::uint64_t capacity) {
  const auto fail = [](const std::string& what) {
    throw std::invalid_argument("ratelimit::redis_bucket_options: " + what);
  };
  switch (o.on_fault) {
    case redis_fault_policy::fail_closed:
    case redis_fault_policy::fail_open:
    case redis_fault_policy::local_fallback:
      break;
    default:
      fail("on_fault is not a redis_fault_policy (" + std::to_string(static_cast<int>(o.on_fault)) +
           ")");
  }
  switch (o.mode) {
    case redis_bucket_mode::head_only:
    case redis_bucket_mode::reserve:
      break;
    default:
      fail("mode is not a redis_bucket_mode (" + std::to_string(static_cast<int>(o.mode)) + ")");
  }
  if (o.fault_hold.count() <= 0)
    fail("fault_hold must be positive (got " + std::to_string(o.fault_hold.count()) + " ms)");
  if (o.lease > capacity)
    fail("lease must not exceed the capacity (got " + std::to_string(o.lease) + " for capacity " +
         std::to_string(capacity) + ")");
  if (o.lease > 0 && o.lease_ttl.count() <= 0)
    fail("lease_ttl must be positive when leasing (got " + std::to_string(o.lease_ttl.count()) +
         " ms)");
  if (o.generation >= (std::uint64_t{1} << 53) - 1)
    fail("generation must be below 2^53 - 1 (got " + std::to_string(o.generation) + ")");
  if (o.mode == redis_bucket_mode::reserve) {
    if (o.lease > 0)
      fail("lease needs mode head_only (got lease " + std::to_string(o.lease) +
           " with mode reserve)");
    if (o.horizon.count() < 0)
      fail("horizon must be 0 or positive (got " + std::to_string(o.horizon.count()) + " ms)");
    if (o.max_in_flight == 0) fail("max_in_flight must be at least 1 (got 0)");
    if (o.max_batch == 0 || o.max_batch > 4096)
      fail("max_batch must be 1 to 4096 (got " + std::to_string(o.max_batch) + ")");
  }
}

/// Counters of one bucket object (tokens, not requests, unless said otherwise).
struct redis_bucket_stats {
  std::uint64_t round_trips = 0;          // script requests sent (requests, retries included)
  std::uint64_t redis_tokens = 0;         // tokens taken from Redis (grants and leases)
  std::uint64_t granted = 0;              // tokens granted to callers (all sources)
  std::uint64_t lease_dropped = 0;        // leased tokens dropped unused (ttl, cancellation)
  std::uint64_t fail_open_grants = 0;     // tokens granted because Redis was unavailable
  std::uint64_t fallback_grants = 0;      // tokens granted by the local fallback bucket
  std::uint64_t faults = 0;               // requests that found Redis unavailable
  std::uint64_t unavailable_replies = 0;  // ... of them, by an error reply meaning "not now"
  // Reservation mode:
  std::uint64_t reserved = 0;          // requests reserved in Redis (tokens in redis_tokens)
  std::uint64_t horizon_refusals = 0;  // requests refused: due beyond the horizon
  std::uint64_t refund_calls = 0;      // refund requests sent (cancellations, close)
  std::uint64_t refunded = 0;          // tokens Redis took back (not due yet when refunded)
  // Reconfiguration:
  std::uint64_t reconfigurations = 0;  // configurations taken on: told by Redis, or set here
};

/// What an error reply from Redis means for a request.
enum class redis_error_class {
  /// The server cannot serve the request now but may soon: it is loading
  /// its data (LOADING), busy in a script (BUSY), a replica (READONLY,
  /// MASTERDOWN), out of memory (OOM), refusing writes after a failed save
  /// (MISCONF), short of replicas (NOREPLICAS), a cluster in trouble
  /// (TRYAGAIN, CLUSTERDOWN), or full ("ERR max number of clients
  /// reached"). A Redis bucket treats it as Redis being unavailable: its
  /// fault policy applies.
  unavailable,
  /// The script is not in the server's cache (NOSCRIPT): a Redis bucket
  /// sends it again, with EVAL.
  script_missing,
  /// Anything else (WRONGTYPE, a key that is not a bucket, another
  /// configuration on the key, NOAUTH, NOPERM, a cluster redirection...):
  /// the request fails with `ratelimit::error::redis_error`.
  refused,
};

/// Classifies an error reply by its code (its first word), also when Redis
/// wraps it in a script error ("ERR Error running script ... -READONLY ...").
inline redis_error_class classify_redis_error(std::string_view message) noexcept {
  std::string_view code = message.substr(0, message.find(' '));
  if (code == "ERR") {
    if (message.starts_with("ERR max number of clients")) return redis_error_class::unavailable;
    // Redis 6 reports an error of a command called by a script as
    // "ERR Error running script (...): ... -CODE message".
    if (message.starts_with("ERR Error running script")) {
      const auto at = message.rfind(": -");
      if (at != std::string_view::npos) {
        const std::string_view inner = message.substr(at + 3);
        if (!inner.starts_with("ERR")) return classify_redis_error(inner);
      }
    }
    return redis_error_class::refused;
  }
  static constexpr std::string_view not_now[] = {"LOADING",    "BUSY",     "READONLY",
                                                 "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                                                 "NOREPLICAS", "MISCONF",  "OOM"};
  for (std::string_view c : not_now)
    if (code == c) return redis_error_class::unavailable;
  if (code == "NOSCRIPT") return redis_error_class::script_missing;
  return redis_error_class::refused;
}

}  // namespace ratelimit

#endif  // RATELIMIT_REDIS_OPTIONS_HPP
