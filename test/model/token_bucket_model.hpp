//
// test/model/token_bucket_model.hpp: the reference model of a token bucket.
//
// The simplest token bucket we could write that is obviously correct, to
// check the real one against (test/fuzz). It shares no code with the library:
//
// - Time is an explicit input to every call (nanoseconds, int64). The latest
//   time seen counts; an earlier one has no effect.
// - The token count is an exact rational number of tokens
//   (boost::multiprecision::cpp_rational: unbounded, nothing overflows or
//   rounds). Every nanosecond adds `rate.tokens / rate.period` tokens, the
//   period in nanoseconds as given (not reduced); the count is capped at the
//   capacity.
// - The waiters are a std::list in arrival order (strict FIFO).
// - Everything that completes is appended to `completions()`, in the order
//   the bucket hands completions to their executor.
//
// Grant time: a queued request is granted *as of the moment its tokens
// accrued* (or it arrived, if later), once every earlier request has been
// granted: tokens accrued after that moment are not lost to the capacity
// because the timer fired late. The grant is made (and completed) by the
// first call at or after that moment that serves the queue: `serve_due(now)`
// (the harness has let the bucket's timer fire), available(), set_rate(),
// set_capacity(), or cancelling the head. The fuzz harness lets the timer fire
// after every clock move, so the completions come in the same steps as the
// bucket's. Like the bucket, the model serves the queue only in those calls;
// request() and try_get() with a non-empty queue do not.
//
// The set_rate rule, as the library documents it (include/ratelimit/rate.hpp):
// accrual is exact between rate changes; a change keeps the level, rounded
// down to a multiple of 2^-64 of the new rate's unit, 1/u of a token with
// u = period / gcd(tokens, period) in ns. The model applies that rule to its
// exact count, with u the denominator of tokens/period in lowest terms:
//   level := floor(level * u * 2^64) / (u * 2^64)
// It is written from the promise, not from the bucket's code (which keeps two
// integers in units of the reduced rate): a bucket that rounds otherwise, as
// one that rounded the level down to a whole unit once did, disagrees with it
// on available() or on the instant of a grant, both compared at every step.
// (A change to the same rate in lowest terms changes nothing: the level is
// then a multiple of 1/(u * 2^64) already.)
//
// What the bucket counts (metrics(), as token_bucket.hpp documents it) is
// kept from the same events: every request made (tries too) and how it ended
// (granted, with its wait from its arrival to the instant of its grant;
// refused; cancelled; failed closed or over the capacity), in `counted()`.
//
// The order of completions within one call, where several complete at once:
// - close(), cancel_all(), destroy(): the queued waiters, front to back.
// - set_capacity(): those now over the capacity (front to back), then the grants.
// - cancel(id) of a queued waiter: the grants it unblocked, then the waiter itself.
//
#ifndef RATELIMIT_TEST_TOKEN_BUCKET_MODEL_HPP
#define RATELIMIT_TEST_TOKEN_BUCKET_MODEL_HPP

#include <boost/multiprecision/cpp_int.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <list>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <vector>

namespace ratelimit::model {

__extension__ typedef unsigned __int128 u128;
using rational = boost::multiprecision::cpp_rational;
using integer = boost::multiprecision::cpp_int;

/// What a request ended with (mirrors the error codes the bucket reports).
enum class result {
  pending,           // still queued, or never started
  granted,           // success: the tokens were taken (or 0 tokens requested)
  exceeds_capacity,  // ratelimit::error::exceeds_capacity
  closed,            // ratelimit::error::bucket_closed
  aborted,           // boost::asio::error::operation_aborted
  too_many_keys,     // ratelimit::error::too_many_keys (keyed_limiter_model only)
  timed_out,         // a deadline that cannot be met (joint_model only): nothing taken
};

struct completion {
  std::uint64_t id;
  result how;
  friend bool operator==(const completion&, const completion&) = default;
};

// For the messages of the tests that compare them (Boost.Test prints with these).
inline std::ostream& operator<<(std::ostream& os, result r) {
  const char* names[] = {"pending", "granted",       "exceeds_capacity", "closed",
                         "aborted", "too_many_keys", "timed_out"};
  return os << names[static_cast<int>(r)];
}
inline std::ostream& operator<<(std::ostream& os, const completion& c) {
  return os << "{" << c.id << ", " << c.how << "}";
}

struct model_rate {
  std::uint64_t tokens;
  std::int64_t period;  // ns
};

class token_bucket_model {
 public:
  /// Throws std::invalid_argument for a capacity of 0, a rate of 0 tokens or
  /// a period <= 0, or initial > capacity (as the bucket does).
  token_bucket_model(std::uint64_t capacity, model_rate r, std::uint64_t initial, std::int64_t now)
      : capacity_(capacity), rate_(r), now_(now) {
    check_rate(r);
    if (capacity == 0) throw std::invalid_argument("capacity 0");
    if (initial > capacity) throw std::invalid_argument("initial > capacity");
    level_ = initial;
  }

  // --- requests -------------------------------------------------------------

  /// async_get_token(n) at `now`; the request gets the next id (0, 1, 2...).
  std::uint64_t request(std::uint64_t n, std::int64_t now) {
    const std::uint64_t id = next_id_++;
    ++counted_.requests;
    if (closed_) {
      complete(id, result::closed);
    } else if (n > capacity_) {
      complete(id, result::exceeds_capacity);
    } else if (queue_.empty()) {
      see(now);
      if (has(n)) {
        take(n);
        counted_.waits.push_back(0);
        complete(id, result::granted);
      } else {
        queue_.push_back({id, n, now});
      }
    } else {
      queue_.push_back({id, n, now});
    }
    return id;
  }

  bool try_get(std::uint64_t n, std::int64_t now) {
    ++counted_.requests;
    if (closed_) {
      ++counted_.closed;
      return false;
    }
    if (n > capacity_) {
      ++counted_.over_capacity;
      return false;
    }
    if (!queue_.empty()) {  // (not served here: the queue waits for its timer)
      ++counted_.refusals;
      return false;
    }
    see(now);
    if (!has(n)) {
      ++counted_.refusals;
      return false;
    }
    take(n);
    counted_.waits.push_back(0);
    return true;
  }

  /// retry_after(n) at `now`, from its promise: how long a request for `n`
  /// tokens made at `now` would wait, if nothing else happened, found by
  /// making it on a copy of the model and letting time run until it is
  /// granted; nothing when it would fail at once; INT64_MAX (saturated) when
  /// it would be granted later than the clock can say. Grants what is due
  /// first (as the implementation's observers do).
  std::optional<std::int64_t> retry_after(std::uint64_t n, std::int64_t now) {
    if (closed_ || n > capacity_) return std::nullopt;
    serve(now);
    token_bucket_model m = *this;
    const std::uint64_t id = m.request(n, now);
    std::int64_t t = now;
    while (m.status(id) == result::pending) {
      const waiter& w = m.queue_.front();
      t = std::max(m.ready_at(w.n), w.queued_at);
      if (t == end_of_time) break;
      m.serve(t);
    }
    if (t <= now) return 0;
    const integer d = integer(t) - now;  // may exceed INT64_MAX before the epoch
    return d >= integer(end_of_time) ? end_of_time : d.convert_to<std::int64_t>();
  }

  /// try_get_token(n, retry_after) at `now`: grants what is due, takes `n`
  /// if nobody is queued and they are there; `wait` is 0 then, otherwise
  /// retry_after(n) (nothing when the request can never be granted).
  bool try_get_or_wait(std::uint64_t n, std::int64_t now, std::optional<std::int64_t>& wait) {
    wait.reset();
    if (closed_ || n > capacity_) return try_get(n, now);  // (counts the failure)
    serve(now);
    if (try_get(n, now)) {
      wait = 0;
      return true;
    }
    wait = retry_after(n, now);
    return false;
  }

  /// The bucket's timer has had its chance to fire at `now`: grant what is due.
  void serve_due(std::int64_t now) { serve(now); }

  /// Per-operation cancellation of request `id`: a no-op unless it is queued.
  void cancel(std::uint64_t id, std::int64_t now) {
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->id != id) continue;
      const bool head = it == queue_.begin();
      queue_.erase(it);
      if (head) serve(now);
      complete(id, result::aborted);
      return;
    }
  }

  /// bucket.cancel(): every queued request is aborted; returns how many.
  std::size_t cancel_all(std::int64_t) { return drain(result::aborted); }

  void close(std::int64_t) {
    closed_ = true;
    drain(result::closed);
  }

  /// The bucket's destructor: queued requests are aborted and it is closed for good.
  void destroy(std::int64_t) {
    closed_ = true;
    drain(result::aborted);
  }

  /// A receipt gives back `n` tokens (the caller has already bounded `n` by
  /// what that receipt still holds: the promise "at most what it granted" is
  /// checked by the harness against its own count). What is due at `now` is
  /// granted first, at the old level; then the level rises by `n`, capped at
  /// the capacity (the excess is lost), and the waiters that makes due are
  /// granted, as of now. Given back to a closed bucket, tokens still count
  /// (available() shows them); nobody waits there.
  void give_back(std::uint64_t n, std::int64_t now) {
    serve(now);
    level_ += n;
    if (level_ > capacity_) level_ = capacity_;
    given_back_ += n;
    serve(now);
  }

  // --- configuration ----------------------------------------------------------

  void set_rate(model_rate r, std::int64_t now) {
    check_rate(r);
    serve(now);  // what fell due at the old rate
    // Round down to a multiple of 2^-64 of the new unit, 1/u of a token.
    const integer u = denominator(rational(integer(r.tokens), integer(r.period)));
    const integer scale = u << 64;
    level_ = rational(floor_of(level_ * scale), scale);
    rate_ = r;
    serve(now);
  }

  /// With `full_stays_full` (a keyed limiter's key: a full bucket is the
  /// fresh bucket the key would get), a full bucket is full at a raised c.
  void set_capacity(std::uint64_t c, std::int64_t now, bool full_stays_full = false) {
    if (c == 0) throw std::invalid_argument("capacity 0");
    serve(now);  // what fell due with the old capacity
    const bool fill = full_stays_full && c > capacity_ && level_ >= capacity_;
    capacity_ = c;
    if (level_ > c || fill) level_ = c;
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (it->n > c) {
        complete(it->id, result::exceeds_capacity);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    serve(now);
  }

  // --- observers --------------------------------------------------------------

  std::uint64_t available(std::int64_t now) {
    serve(now);
    return floor_of(level_).convert_to<std::uint64_t>();
  }
  std::size_t waiting() const { return queue_.size(); }
  std::uint64_t capacity() const { return capacity_; }
  model_rate rate() const { return rate_; }
  bool is_open() const { return !closed_; }
  std::int64_t now() const { return now_; }
  std::uint64_t requests() const { return next_id_; }

  /// Every completion so far, in order.
  const std::vector<completion>& completions() const { return completions_; }

  /// How request `id` ended (pending while queued).
  result status(std::uint64_t id) const {
    for (const completion& c : completions_)
      if (c.id == id) return c.how;
    return result::pending;
  }

  /// When the first queued request's tokens will be there if nothing changes
  /// (the latest time seen, if they are there already; INT64_MAX if never
  /// representable); nothing when the queue is empty. Lets a test move the
  /// clock to exactly that instant, or one nanosecond before or after it.
  std::optional<std::int64_t> head_ready_at() const {
    if (queue_.empty()) return std::nullopt;
    return ready_at(queue_.front().n);
  }

  /// The token count as of now(), exactly.
  const rational& level() const { return level_; }

  /// When the bucket will hold its capacity again if nothing more is asked of
  /// it: after every queued request has been granted, each as of the moment
  /// its tokens accrued (or it arrived, if later), tokens capped at the
  /// capacity meanwhile. The latest time seen when it is full already;
  /// INT64_MAX if later than can be represented. (keyed_limiter_model bounds
  /// the keyed limiter's eviction index with it.)
  std::int64_t full_at() const {
    rational level = level_;
    std::int64_t t = now_;
    for (const waiter& w : queue_) {
      const std::int64_t at = std::max(ready_at(level, t, w.n), w.queued_at);
      level = accrued(level, t, at);
      t = std::max(t, at);
      if (level < w.n) return end_of_time;  // due after the end of representable time
      level -= w.n;
    }
    return ready_at(level, t, capacity_);
  }

  /// Total tokens granted so far.
  u128 granted_tokens() const { return granted_; }

  /// Total tokens given back so far (before the cap).
  u128 given_back_tokens() const { return given_back_; }

  /// What the bucket is to count: every request made and how it ended.
  struct counts {
    std::uint64_t requests = 0;  // made: tries, asynchronous requests
    std::uint64_t refusals = 0;  // tries that found the tokens not there (or a queue)
    std::uint64_t cancellations = 0;
    std::uint64_t closed = 0;          // failed: bucket_closed
    std::uint64_t over_capacity = 0;   // failed: exceeds_capacity
    std::vector<std::uint64_t> waits;  // per grant, from the request to the grant (ns)
  };
  const counts& counted() const { return counted_; }

 private:
  struct waiter {
    std::uint64_t id;
    std::uint64_t n;
    std::int64_t queued_at;  // the clock when it arrived
  };

  static constexpr std::int64_t end_of_time = std::numeric_limits<std::int64_t>::max();

  /// When `n` tokens will be there, from the level at the latest time seen,
  /// if nothing is taken (that time itself when they are there already);
  /// INT64_MAX when later than that can be represented.
  std::int64_t ready_at(std::uint64_t n) const { return ready_at(level_, now_, n); }

  /// The same from `level` at time `from`.
  std::int64_t ready_at(const rational& level, std::int64_t from, std::uint64_t n) const {
    if (level >= n) return from;
    // The first whole nanosecond by which (n - level) tokens accrue.
    const integer ticks = ceil_of((n - level) * rate_.period / rate_.tokens);
    if (ticks >= integer(end_of_time) - from) return end_of_time;
    return (from + ticks).convert_to<std::int64_t>();
  }

  /// `level` at time `from`, accrued to `to` (no change if `to` is earlier), capped.
  rational accrued(const rational& level, std::int64_t from, std::int64_t to) const {
    if (to <= from) return level;
    rational l = level + rational((integer(to) - from) * rate_.tokens, integer(rate_.period));
    return l > capacity_ ? rational(capacity_) : l;
  }

  /// floor(q) and ceil(q) for q >= 0.
  static integer floor_of(const rational& q) { return numerator(q) / denominator(q); }
  static integer ceil_of(const rational& q) {
    return (numerator(q) + denominator(q) - 1) / denominator(q);
  }

  static void check_rate(model_rate r) {
    if (r.tokens == 0) throw std::invalid_argument("rate of 0 tokens");
    if (r.period <= 0) throw std::invalid_argument("period <= 0");
  }

  /// Moves the model to `now` (if later than any time seen), accruing tokens.
  void see(std::int64_t now) {
    if (now <= now_) return;
    const integer elapsed = integer(now) - now_;
    now_ = now;
    level_ += rational(elapsed * rate_.tokens, integer(rate_.period));
    if (level_ > capacity_) level_ = capacity_;
  }

  bool has(std::uint64_t n) const { return level_ >= n; }

  void take(std::uint64_t n) {
    level_ -= n;
    granted_ += n;
  }

  /// Grants, front to back, every request whose tokens accrued by `now`, each
  /// as of the moment they did (or it arrived, if later); then moves to `now`.
  void serve(std::int64_t now) {
    while (!queue_.empty()) {
      const waiter& w = queue_.front();
      const std::int64_t at = std::max(ready_at(w.n), w.queued_at);
      if (at > now) break;
      see(at);
      if (!has(w.n)) break;  // due after the end of representable time: never
      take(w.n);
      // (In exact arithmetic: from before the clock's epoch to the end of time
      // the wait exceeds INT64_MAX ns.)
      counted_.waits.push_back((integer(at) - w.queued_at).convert_to<std::uint64_t>());
      complete(w.id, result::granted);
      queue_.pop_front();
    }
    see(now);
  }

  std::size_t drain(result how) {
    const std::size_t n = queue_.size();
    for (const waiter& w : queue_)
      complete(w.id, how);
    queue_.clear();
    return n;
  }

  void complete(std::uint64_t id, result how) {
    completions_.push_back({id, how});
    if (how == result::aborted) ++counted_.cancellations;
    if (how == result::closed) ++counted_.closed;
    if (how == result::exceeds_capacity) ++counted_.over_capacity;
  }

  std::uint64_t capacity_;
  model_rate rate_;
  std::int64_t now_;
  rational level_;  // tokens
  u128 given_back_ = 0;
  counts counted_;
  bool closed_ = false;
  std::list<waiter> queue_;
  std::uint64_t next_id_ = 0;
  std::vector<completion> completions_;
  u128 granted_ = 0;
};

}  // namespace ratelimit::model

#endif  // RATELIMIT_TEST_TOKEN_BUCKET_MODEL_HPP
