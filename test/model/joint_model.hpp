//
// test/model/joint_model.hpp: the reference model of a joint acquire.
//
// A joint acquire is one request that takes n_b tokens from each of several
// token buckets at once. This model is written from that promise (there is no
// implementation to copy), to be obviously correct rather than fast; inputs
// are small (a handful of buckets, a few dozen queued requests). It shares no
// code with the library, and only the types and conventions of
// token_bucket_model.hpp (exact rational levels, integer ns times, `result`,
// `completion`, `model_rate`, the set_rate rounding rule).
//
// Buckets: capacity C >= 1, rate r = tokens/period, a level that refills
// exactly (rational) and is capped at C, as in token_bucket_model.
//
// Requests: one or more parts (bucket, n), on distinct buckets. A request gets
// the next id when made: ONE order across all buckets.
//
// Single and joint: a request is joint when two or more of its parts have
// n >= 1, single when exactly one does. Parts of 0 tokens are not parts for
// the order: they neither wait for anyone nor make a request joint (a request
// of (b:2, c:0) is a single request on b).
//
// The plan (strict FIFO per bucket, with backfilling past joint requests
// only), recomputed from scratch whenever anything changes: the queued
// requests are placed in id order; request R is placed at T_R = the earliest
// whole ns t such that
// - t >= max(when R was made, now());
// - FIFO among singles: t >= T_Y for every queued single request Y of smaller
//   id whose part of n >= 1 is on a bucket where R has a part of n >= 1 (at
//   INT64_MAX, below, when Y is placed never). R may thus be placed before an
//   earlier request on a bucket only when that request is joint;
// - cannot move T: for each part (b, n) of R, adding "take n at t" to b's
//   plan (the takes of the requests placed before R, at their own T) leaves
//   every take of b's plan feasible: just before each take, the level
//   (refilled, capped, minus the planned takes before it) holds its amount.
//   Takes at one instant go in id order, so R's take at t comes after every
//   planned take at <= t.
// A single request R behind only singles on its bucket is therefore placed at
// the first t >= T of the last of them (and >= when it was made) at which the
// level after their takes holds n: token_bucket_model's rule. Behind a joint
// request J (the FIFO rule does not count J) it goes first whenever that
// cannot move T, even using tokens that would otherwise overflow the capacity
// before J's T.
//
// Grants: when time reaches T_R, in any call whose `now` >= T_R, all of R's
// parts are taken as of T_R (every bucket advanced to T_R first, not to `now`)
// and R completes `granted`. Due requests are granted in (T, id) order, the
// plan recomputed after each grant. Until then nothing is taken for R.
//
// Single bucket: for requests of n >= 1 the plan is strict FIFO and the
// model agrees with token_bucket_model at every rate (tested, including rates
// above 1 token per ns, where plain feasibility would let a later request
// take tokens that overflow within the nanosecond a waiter's grant is rounded
// up to: the FIFO rule forbids it, as token_bucket_model does).
//
// Time: every call takes `now`; an earlier one than now() has no effect (the
// latest time seen counts). Every call first grants what is due at `now`
// (token_bucket_model's request(), try_get(), cancel() of a non-head and
// close() do not: a harness that compares the two serves due before each
// operation, as the fuzz harness lets the timer fire after every clock move).
//
// End of representable time: when no t <= INT64_MAX is feasible, R is placed
// "never" (planned_at() is empty, retry_after() says INT64_MAX - now, as
// token_bucket_model's does); its takes stay in the plan at INT64_MAX, where
// one of them cannot be met, so no later request on that bucket can be placed
// either (as a head that never comes blocks token_bucket_model's queue). It
// waits for a re-plan or its end.
//
// Decisions where the promise is silent (each is tested):
// - Parts naming one bucket twice, no parts, or an unknown bucket: the call
//   throws std::invalid_argument and nothing happens (no id is consumed).
// - A request that fails at once consumes an id; `closed` wins over
//   `exceeds_capacity` when both apply (as in token_bucket_model).
// - A part of 0 tokens is feasible anywhere and is no part for the order, so
//   it never waits and delays no one (token_bucket_model queues request(0)
//   behind its waiters: the single-bucket equivalence holds for requests of
//   n >= 1). A request all of whose parts are 0 tokens is granted at once.
// - try_get() gets no id and does not change the plan of the queued requests
//   (taking at T = now with an id after all of theirs keeps every planned take
//   feasible, and a lower level can only place them later, never earlier).
//   It is placed as a request made now would be, so it takes nothing while a
//   single request waits on a bucket where the try has a part of n >= 1
//   (that request's T is later than now).
// - give_back(id, k, now) grants what is due at `now` (old level) first, then
//   gives back g_b = min(k, what part b still holds) to each part's bucket,
//   level capped at its capacity (what the cap swallows is lost but counts as
//   given back), then re-plans: waiters that become due are granted as of
//   `now`. It returns g_b per part, in the request's part order; an id that
//   is not a granted request (queued, failed, unknown) gives nothing back and
//   returns zeros. Grants by try_get() have no id and cannot be given back.
// - close(b): grants what is due at `now` first; then the queued requests with
//   a part on b complete `closed` (id order), then what that unblocked.
// - cancel(id) of a queued request: the grants it unblocked, then `aborted`
//   (token_bucket_model's order).
// - set_capacity(b, c): grants due at the old settings, then the level capped
//   at c, then the queued requests with a part on b over c complete
//   `exceeds_capacity` (id order), then the grants that follow. A keyed
//   limiter's key (`full_stays_full`): a bucket that is full then is full at
//   a raised c (a full bucket is the fresh one the key would get).
// - set_rate(b, r): grants due at the old rate, the new rate with
//   token_bucket_model's rounding, then the grants that follow.
//
#ifndef RATELIMIT_TEST_JOINT_MODEL_HPP
#define RATELIMIT_TEST_JOINT_MODEL_HPP

#include "token_bucket_model.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <vector>

namespace ratelimit::model {

/// A small deterministic generator (splitmix64), for the joint tests' random
/// sequences (test_joint_model, test_joint_plan).
struct rng {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in [lo, hi].
  std::uint64_t in(std::uint64_t lo, std::uint64_t hi) {
    const std::uint64_t span = hi - lo + 1;  // 0: the whole range
    return span == 0 ? next() : lo + next() % span;
  }
  bool one_in(std::uint64_t n) { return next() % n == 0; }
};

/// One part of a joint request: `n` tokens from bucket `bucket`.
struct part {
  std::size_t bucket;
  std::uint64_t n;
};

class joint_model {
 public:
  static constexpr std::int64_t end_of_time = std::numeric_limits<std::int64_t>::max();

  explicit joint_model(std::int64_t now) : now_(now) {}

  /// A new bucket at `now`; returns its index (0, 1, 2...). Throws
  /// std::invalid_argument as token_bucket_model's constructor does.
  std::size_t add_bucket(std::uint64_t capacity, model_rate r, std::uint64_t initial,
                         std::int64_t now) {
    check_rate(r);
    if (capacity == 0) throw std::invalid_argument("capacity 0");
    if (initial > capacity) throw std::invalid_argument("initial > capacity");
    serve(now);
    buckets_.push_back({capacity, r, rational(initial), false});
    return buckets_.size() - 1;
  }

  // --- requests -------------------------------------------------------------

  /// A joint request at `now`; returns its id. Granted in this call if it is
  /// placed at T = now. With a `deadline` (a blocking caller's): granted at
  /// a T <= deadline, or `timed_out`, taking nothing, as soon as its T is
  /// later (or never): in this call if it is already, or in the call that
  /// moves it (set_rate, set_capacity, a request ahead that takes back...).
  std::uint64_t request(const std::vector<part>& parts, std::int64_t now,
                        std::int64_t deadline = end_of_time) {
    check_parts(parts);
    serve(now);
    const std::uint64_t id = next_id_++;
    if (const auto fail = fails_at_once(parts)) {
      complete(id, *fail);
    } else {
      queued_[id] = {parts, now_, deadline};
      serve(now_);
    }
    return id;
  }

  /// Takes the parts now exactly when a request made now would be placed at
  /// T = now: returns `granted`; otherwise `pending` (nothing taken), or the
  /// at-once failure. No id, no change to the plan.
  result try_get(const std::vector<part>& parts, std::int64_t now) {
    check_parts(parts);
    serve(now);
    if (const auto fail = fails_at_once(parts)) return *fail;
    const auto t = place(parts, now_, plan_takes(plan()));
    if (!t || *t != now_) return result::pending;
    for (const part& p : parts)
      buckets_[p.bucket].level -= p.n;
    return result::granted;
  }

  /// How long a request made at `now` would wait (T - now, 0 when it would be
  /// granted at once, saturated at INT64_MAX; INT64_MAX - now when it would
  /// never be placed); nothing when it would fail at once. Makes nothing.
  std::optional<std::int64_t> retry_after(const std::vector<part>& parts, std::int64_t now) {
    check_parts(parts);
    serve(now);
    if (fails_at_once(parts)) return std::nullopt;
    const std::int64_t t = place(parts, now_, plan_takes(plan())).value_or(end_of_time);
    if (t <= now) return 0;
    const integer d = integer(t) - now;
    return d >= integer(end_of_time) ? end_of_time : d.convert_to<std::int64_t>();
  }

  /// The timer has had its chance to fire at `now`: grant what is due.
  void serve_due(std::int64_t now) { serve(now); }

  /// Cancellation of request `id`: a no-op unless it is queued.
  void cancel(std::uint64_t id, std::int64_t now) {
    serve(now);
    if (queued_.erase(id) == 0) return;
    serve(now_);
    complete(id, result::aborted);
  }

  void close(std::size_t b, std::int64_t now) {
    check_bucket(b);
    serve(now);
    buckets_[b].closed = true;
    fail_queued_on(b, result::closed, std::nullopt);
    serve(now_);
  }

  // --- configuration ----------------------------------------------------------

  void set_capacity(std::size_t b, std::uint64_t c, std::int64_t now,
                    bool full_stays_full = false) {
    check_bucket(b);
    if (c == 0) throw std::invalid_argument("capacity 0");
    serve(now);
    bucket& k = buckets_[b];
    const bool fill = full_stays_full && c > k.capacity && k.level >= k.capacity;
    k.capacity = c;
    if (k.level > c || fill) k.level = c;
    fail_queued_on(b, result::exceeds_capacity, c);
    serve(now_);
  }

  void set_rate(std::size_t b, model_rate r, std::int64_t now) {
    check_bucket(b);
    check_rate(r);
    serve(now);
    bucket& k = buckets_[b];
    // token_bucket_model's rule: round down to a multiple of 2^-64 of the new unit.
    const integer u = denominator(rational(integer(r.tokens), integer(r.period)));
    const integer scale = u << 64;
    k.level = rational(floor_of(k.level * scale), scale);
    k.rate = r;
    serve(now_);
  }

  /// Returns up to `k` tokens to each part of granted request `id` (see the
  /// header comment); what was given back per part, in part order. With
  /// `only`, to that part alone (a receipt of one part: the others give
  /// nothing, and return 0).
  std::vector<std::uint64_t> give_back(std::uint64_t id, std::uint64_t k, std::int64_t now,
                                       std::optional<std::size_t> only = std::nullopt) {
    serve(now);
    auto it = held_.find(id);
    if (it == held_.end()) return {};
    std::vector<std::uint64_t> given;
    for (held_part& h : it->second) {
      const bool this_one = !only || *only == given.size();
      const std::uint64_t g = this_one ? std::min(k, h.held) : 0;
      h.held -= g;
      bucket& b = buckets_[h.bucket];
      b.level += g;
      if (b.level > b.capacity) b.level = b.capacity;
      given.push_back(g);
    }
    serve(now_);
    return given;
  }

  // --- observers --------------------------------------------------------------

  std::uint64_t available(std::size_t b, std::int64_t now) {
    check_bucket(b);
    serve(now);
    return floor_of(buckets_[b].level).convert_to<std::uint64_t>();
  }
  /// The level of bucket `b` as of now(), exactly.
  const rational& level(std::size_t b) const { return buckets_.at(b).level; }
  std::uint64_t capacity(std::size_t b) const { return buckets_.at(b).capacity; }
  model_rate rate(std::size_t b) const { return buckets_.at(b).rate; }
  bool is_open(std::size_t b) const { return !buckets_.at(b).closed; }
  std::size_t buckets() const { return buckets_.size(); }
  std::int64_t now() const { return now_; }
  std::uint64_t requests() const { return next_id_; }
  std::size_t waiting() const { return queued_.size(); }

  const std::vector<completion>& completions() const { return completions_; }

  result status(std::uint64_t id) const {
    for (const completion& c : completions_)
      if (c.id == id) return c.how;
    return result::pending;
  }

  /// When granted request `id` was granted (its T); nothing otherwise.
  std::optional<std::int64_t> granted_at(std::uint64_t id) const {
    const auto it = granted_at_.find(id);
    if (it == granted_at_.end()) return std::nullopt;
    return it->second;
  }

  /// T of queued request `id` in the current plan; nothing when it is not
  /// queued or never placed.
  std::optional<std::int64_t> planned_at(std::uint64_t id) const {
    const auto p = plan();
    const auto it = p.find(id);
    if (it == p.end()) return std::nullopt;
    return it->second;
  }

  /// For the model's own tests: would "take n at t", after the planned takes
  /// of every queued request on b, leave b's plan feasible? (Feasibility
  /// only: placement also waits for the singles ahead, see the header.)
  bool feasible_at(std::size_t b, std::uint64_t n, std::int64_t t) const {
    std::vector<take> takes = plan_takes(plan())[b];
    takes.push_back({t, next_id_, n, false});
    return feasible(buckets_[b], takes);
  }

  /// For the model's own tests: the earliest t >= from (and >= now()) for
  /// which feasible_at(b, n, t) holds, computed as placement does (placement
  /// starts `from` at the FIFO bound).
  std::optional<std::int64_t> earliest_feasible(std::size_t b, std::uint64_t n,
                                                std::int64_t from) const {
    return earliest_feasible(buckets_[b], n, std::max(from, now_), plan_takes(plan())[b]);
  }

 private:
  struct bucket {
    std::uint64_t capacity;
    model_rate rate;
    rational level;  // as of now_
    bool closed;
  };
  struct queued_request {
    std::vector<part> parts;
    std::int64_t made_at;
    std::int64_t deadline = end_of_time;  // end_of_time: none
  };
  struct take {
    std::int64_t at;
    std::uint64_t id;
    std::uint64_t n;
    bool single;  // the take of a single request (one part of n >= 1)
  };
  struct held_part {
    std::size_t bucket;
    std::uint64_t held;  // granted and not given back yet
  };
  using plan_type = std::map<std::uint64_t, std::optional<std::int64_t>>;  // id -> T

  static integer floor_of(const rational& q) { return numerator(q) / denominator(q); }
  static integer ceil_of(const rational& q) {  // q >= 0
    return (numerator(q) + denominator(q) - 1) / denominator(q);
  }

  static void check_rate(model_rate r) {
    if (r.tokens == 0) throw std::invalid_argument("rate of 0 tokens");
    if (r.period <= 0) throw std::invalid_argument("period <= 0");
  }
  void check_bucket(std::size_t b) const {
    if (b >= buckets_.size()) throw std::invalid_argument("no such bucket");
  }
  void check_parts(const std::vector<part>& parts) const {
    if (parts.empty()) throw std::invalid_argument("no parts");
    std::set<std::size_t> seen;
    for (const part& p : parts) {
      check_bucket(p.bucket);
      if (!seen.insert(p.bucket).second) throw std::invalid_argument("a bucket named twice");
    }
  }

  std::optional<result> fails_at_once(const std::vector<part>& parts) const {
    for (const part& p : parts)
      if (buckets_[p.bucket].closed) return result::closed;
    for (const part& p : parts)
      if (p.n > buckets_[p.bucket].capacity) return result::exceeds_capacity;
    return std::nullopt;
  }

  /// `level` at `from`, refilled at b's rate to `to` (no change if `to` is
  /// earlier), capped at b's capacity.
  static rational accrued(const bucket& b, const rational& level, std::int64_t from,
                          std::int64_t to) {
    if (to <= from) return level;
    const rational l =
        level + rational((integer(to) - from) * b.rate.tokens, integer(b.rate.period));
    return l > b.capacity ? rational(b.capacity) : l;
  }

  /// The first whole ns >= s by which `level` (at s, refilling) holds n;
  /// nothing when that is later than INT64_MAX.
  static std::optional<std::int64_t> ready(const bucket& b, const rational& level, std::int64_t s,
                                           std::uint64_t n) {
    if (level >= n) return s;
    const integer ticks = ceil_of((n - level) * b.rate.period / b.rate.tokens);
    if (ticks > integer(end_of_time) - s) return std::nullopt;
    return (s + ticks).convert_to<std::int64_t>();
  }

  static void sort_takes(std::vector<take>& takes) {
    std::sort(takes.begin(), takes.end(), [](const take& x, const take& y) {
      return x.at != y.at ? x.at < y.at : x.id < y.id;
    });
  }

  /// Simulates b from its level at now_ through `takes` in (time, id) order:
  /// does every take find its amount?
  bool feasible(const bucket& b, std::vector<take> takes) const {
    sort_takes(takes);
    rational level = b.level;
    std::int64_t t = now_;
    for (const take& k : takes) {
      level = accrued(b, level, t, k.at);
      t = std::max(t, k.at);
      if (level < k.n) return false;
      level -= k.n;
    }
    return true;
  }

  /// The earliest whole ns t >= from (from >= now_) at which "take n at t",
  /// after `takes` (all of smaller ids), leaves the plan feasible; nothing if
  /// no t <= INT64_MAX does.
  ///
  /// Feasibility is not monotone in t, but it is an interval within each
  /// segment [s, e) between consecutive planned take times (the takes before
  /// t are then fixed; L_s is the level just after those at <= s):
  /// - the take itself finds n iff min(C, L_s + r(t - s)) >= n, i.e. iff
  ///   t >= ready(L_s, s, n);
  /// - the level just before the next planned take (at e) is
  ///   min(C, min(C, L_s + r(t - s)) - n + r(e - t))
  ///   = min(C, min(C - r t, L_s - r s) - n + r e), non-increasing in t; and
  ///   the later takes are all met iff that level is at least some amount
  ///   (the level after a point is monotone in the level at that point).
  /// So in each segment the feasible set is empty or starts at
  /// max(s, from, ready): that candidate is checked by direct simulation,
  /// and if it fails, every later t of the segment fails too.
  std::optional<std::int64_t> earliest_feasible(const bucket& b, std::uint64_t n, std::int64_t from,
                                                std::vector<take> takes) const {
    sort_takes(takes);
    std::vector<std::int64_t> starts{now_};
    for (const take& k : takes)
      if (k.at > starts.back()) starts.push_back(k.at);
    for (std::size_t i = 0; i < starts.size(); ++i) {
      const std::int64_t s = starts[i];
      const bool last = i + 1 == starts.size();
      if (!last && starts[i + 1] <= from) continue;
      // The level just after every planned take at <= s.
      rational level = b.level;
      std::int64_t t = now_;
      for (const take& k : takes) {
        if (k.at > s) break;
        level = accrued(b, level, t, k.at);
        t = std::max(t, k.at);
        level -= k.n;
      }
      level = accrued(b, level, t, s);
      const auto r = ready(b, level, s, n);
      if (!r) {
        if (last) return std::nullopt;
        continue;
      }
      const std::int64_t c = std::max({s, from, *r});
      if (!last && c >= starts[i + 1]) continue;
      std::vector<take> with = takes;
      with.push_back({c, end_id, n, false});
      if (feasible(b, with)) return c;
    }
    return std::nullopt;
  }

  static constexpr std::uint64_t end_id = std::numeric_limits<std::uint64_t>::max();

  /// A request is single when exactly one of its parts has n >= 1 (parts of
  /// 0 tokens are not parts for the order), joint when two or more do.
  static bool is_single(const std::vector<part>& parts) {
    return std::count_if(parts.begin(), parts.end(), [](const part& p) { return p.n > 0; }) == 1;
  }

  /// T for a request of `parts` made at `from`, after the planned `takes`
  /// (per bucket, all of smaller ids): the earliest t, no earlier than the T
  /// of any single request ahead of it on the bucket of one of its parts of
  /// n >= 1 (FIFO among singles; only joint requests are passed), feasible
  /// on every part.
  std::optional<std::int64_t> place(const std::vector<part>& parts, std::int64_t from,
                                    const std::vector<std::vector<take>>& takes) const {
    std::int64_t t = std::max(from, now_);
    for (const part& p : parts)
      if (p.n > 0)
        for (const take& k : takes[p.bucket])
          if (k.single) t = std::max(t, k.at);  // a single placed never: at INT64_MAX
    for (;;) {
      std::int64_t next = t;
      for (const part& p : parts) {
        const auto e = earliest_feasible(buckets_[p.bucket], p.n, t, takes[p.bucket]);
        if (!e) return std::nullopt;
        next = std::max(next, *e);
      }
      if (next == t) return t;
      t = next;
    }
  }

  /// The plan of every queued request, from scratch, in id order.
  plan_type plan() const {
    std::vector<std::vector<take>> takes(buckets_.size());
    plan_type p;
    for (const auto& [id, r] : queued_) {
      const auto t = place(r.parts, r.made_at, takes);
      p[id] = t;
      const bool single = is_single(r.parts);
      for (const part& q : r.parts)
        takes[q.bucket].push_back({t.value_or(end_of_time), id, q.n, single && q.n > 0});
    }
    return p;
  }

  std::vector<std::vector<take>> plan_takes(const plan_type& p) const {
    std::vector<std::vector<take>> takes(buckets_.size());
    for (const auto& [id, t] : p) {
      const auto& parts = queued_.at(id).parts;
      const bool single = is_single(parts);
      for (const part& q : parts)
        takes[q.bucket].push_back({t.value_or(end_of_time), id, q.n, single && q.n > 0});
    }
    return takes;
  }

  /// Moves every bucket to `now` (if later than now_), refilling.
  void see(std::int64_t now) {
    if (now <= now_) return;
    for (bucket& b : buckets_)
      b.level = accrued(b, b.level, now_, now);
    now_ = now;
  }

  /// Grants every request due by `now`, in (T, id) order, each as of its T,
  /// re-planning after each; then moves to `now`.
  void serve(std::int64_t now) {
    drop_late();
    for (;;) {
      const plan_type p = plan();
      std::optional<std::pair<std::int64_t, std::uint64_t>> first;
      for (const auto& [id, t] : p)
        if (t && *t <= now && (!first || std::pair(*t, id) < *first)) first = std::pair(*t, id);
      if (!first) break;
      const auto [t, id] = *first;
      see(t);
      std::vector<held_part> held;
      for (const part& q : queued_.at(id).parts) {
        bucket& b = buckets_[q.bucket];
        if (b.level < q.n) throw std::logic_error("joint_model: a planned take found no tokens");
        b.level -= q.n;
        held.push_back({q.bucket, q.n});
      }
      queued_.erase(id);
      held_[id] = held;
      granted_at_[id] = t;
      complete(id, result::granted);
    }
    see(now);
  }

  /// Every queued request whose T is past its deadline (or never) fails
  /// `timed_out`, in id order, re-planning after each (which moves no other
  /// request later).
  void drop_late() {
    for (;;) {
      const plan_type p = plan();
      std::optional<std::uint64_t> late;
      for (const auto& [id, r] : queued_)
        if (r.deadline != end_of_time && (!p.at(id) || *p.at(id) > r.deadline)) {
          late = id;
          break;
        }
      if (!late) return;
      queued_.erase(*late);
      complete(*late, result::timed_out);
    }
  }

  /// The queued requests with a part on b (of more than `over` tokens, if
  /// given) complete `how`, in id order.
  void fail_queued_on(std::size_t b, result how, std::optional<std::uint64_t> over) {
    for (auto it = queued_.begin(); it != queued_.end();) {
      bool hit = false;
      for (const part& q : it->second.parts)
        hit = hit || (q.bucket == b && (!over || q.n > *over));
      if (hit) {
        complete(it->first, how);
        it = queued_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void complete(std::uint64_t id, result how) { completions_.push_back({id, how}); }

  std::int64_t now_;
  std::vector<bucket> buckets_;
  std::map<std::uint64_t, queued_request> queued_;  // by id
  std::map<std::uint64_t, std::vector<held_part>> held_;
  std::map<std::uint64_t, std::int64_t> granted_at_;
  std::uint64_t next_id_ = 0;
  std::vector<completion> completions_;
};

}  // namespace ratelimit::model

#endif  // RATELIMIT_TEST_JOINT_MODEL_HPP
