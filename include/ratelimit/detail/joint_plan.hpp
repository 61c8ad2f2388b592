//
// ratelimit/detail/joint_plan.hpp: when each queued request of a joint
// acquire is granted, in exact integer arithmetic, with no Asio in it.
//
// A joint request takes n_b tokens from each of several buckets, all at one
// instant T. Every request, single or joint, has its place in one order (an
// id, increasing). The plan places the queued requests in id order; request
// R goes to the earliest whole nanosecond T_R such that
// - T_R >= when R was made, and >= now;
// - FIFO among singles: T_R >= T_Y for every queued single request Y ahead
//   of R (smaller id) on a bucket where R has a part of n >= 1 (a single is
//   a request with exactly one part of n >= 1; parts of 0 tokens are no
//   parts for the order);
// - it cannot move anyone: for each part (b, n) of R, "take n at T_R" added
//   to b's plan (the takes of the requests placed before R, at their own T,
//   in (time, id) order; R's after every take at <= T_R) leaves every take
//   of that plan feasible: just before it, the level (refilled, capped,
//   minus the takes before it) holds its amount.
// So a request behind a joint request J in a fast bucket is granted before
// J's T exactly when that cannot move J's T; and no request is ever delayed
// by one made after it. A request no T <= INT64_MAX can hold is placed
// "never": its takes stay in the plan at INT64_MAX (where one of them cannot
// be met), so nothing after it on those buckets can be placed either.
//
// This is test/model/joint_model.hpp's rule (the reference model, written
// from the promise in exact rationals), computed on bucket_state, whose
// answers in whole tokens and whole nanoseconds are those of the exact level
// (bucket_state.hpp). test/model/test_joint_plan.cpp compares the two on
// random sequences of requests, grants, cancellations and reconfigurations.
//
// Cost, for m planned takes on a bucket: each take keeps the state just
// after it (simulated when it is added, or when the bucket's tokens are
// taken by a try), so the segments that end before a request's lower bound
// are passed over by binary search, and a candidate after every take is
// checked in O(1). Each take also keeps the least, over it and every later
// take, of its level after plus what the plan wasted at the capacity before
// it: a segment that cannot hold the request by that bound is passed over
// together with every segment up to the take that sets the bound, found by
// binary search (room_after() derives it). So a request behind a saturated
// queue, single or joint, is placed in O(log m), the segment a pass lands on then being checked
// exactly (at the end of the plan, in O(1)): 100 000 joint requests queued on two saturated
// buckets: 2.3 us each in joint_scheduler, its bookkeeping included, -O2; trying every segment
// took 1.7 ms each at the end. A joint request that fits a gap costs the simulation of the
// takes after the gap, O(m) (as does adding it there); O(m^2) at worst (a candidate that passes the
// bound but fails, or a bound that rises at every take). joint_scheduler keeps the plan from call
// to call: a new request is placed after the others, a grant pops its takes (the first of their
// buckets), and only a cancellation, close, change of rate or capacity, or give-back re-plans.
//
// Thread safety: none; a value, guarded by its owner.
//
#ifndef RATELIMIT_DETAIL_JOINT_PLAN_HPP
#define RATELIMIT_DETAIL_JOINT_PLAN_HPP

#include <ratelimit/detail/bucket_state.hpp>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <span>
#include <vector>

namespace ratelimit::detail {

/// One part of a request: `n` tokens from bucket number `bucket`.
struct joint_part {
  std::size_t bucket;
  std::uint64_t n;
};

/// True when exactly one part asks for tokens: the request is single (it
/// keeps FIFO with the singles on its bucket); two or more: joint.
inline bool is_single(std::span<const joint_part> parts) noexcept {
  return std::count_if(parts.begin(), parts.end(), [](const joint_part& p) { return p.n > 0; }) ==
         1;
}

/// The first whole nanosecond >= `s` at which `b` (refilled to `s` and
/// refilling) holds `n`; nothing when that is later than INT64_MAX.
inline std::optional<std::int64_t> ready_from(bucket_state b, std::int64_t s, std::uint64_t n) {
  b.refill(s);
  if (b.has(n)) return s;
  const std::int64_t t = b.ready_at(n);
  if (t != max_time) return t;
  // Saturated: exactly INT64_MAX, or later.
  b.refill(max_time);
  if (b.has(n)) return max_time;
  return std::nullopt;
}

/// The plan of the queued requests over a set of buckets, built in id order.
class joint_planner {
 public:
  /// `states`: every bucket as of `now` (refilled to it); they must outlive
  /// the planner, and a change to one other than refilling it (taking tokens)
  /// must be followed by refresh() of that bucket.
  joint_planner(std::span<const bucket_state> states, std::int64_t now)
      : states_(states), now_(now), buckets_(states.size()) {}

  /// T for a request of `parts` made at `made_at`, with an id after every
  /// request added so far; nothing when never.
  std::optional<std::int64_t> place(std::span<const joint_part> parts, std::int64_t made_at) const {
    std::int64_t t = std::max(made_at, now_);
    for (const joint_part& p : parts)
      if (p.n > 0 && buckets_[p.bucket].last_single)  // a single placed never: at INT64_MAX
        t = std::max(t, *buckets_[p.bucket].last_single);
    for (;;) {
      std::int64_t next = t;
      for (const joint_part& p : parts) {
        const auto e = earliest_feasible(p.bucket, p.n, t);
        if (!e) return std::nullopt;
        next = std::max(next, *e);
      }
      if (next == t) return t;
      t = next;
    }
  }

  /// Time has moved to `now` (the states were refilled to it), and every
  /// request placed at or before it was granted (pop_granted).
  void advance(std::int64_t now) noexcept { now_ = std::max(now_, now); }

  /// Request `id`, placed at `t`, was granted: its takes leave the plan. As
  /// the first in (time, id) order of every due request, its take is the
  /// first of each of its buckets (granted as planned, it moves no other
  /// request's T, and the state after each later take stays what was
  /// simulated). Returns false, changing nothing, if a take is not first.
  bool pop_granted(std::uint64_t id, std::span<const joint_part> parts) {
    for (const joint_part& p : parts)
      if (buckets_[p.bucket].takes.empty() || buckets_[p.bucket].takes.front().id != id)
        return false;
    for (const joint_part& p : parts)
      buckets_[p.bucket].takes.pop_front();
    // (last_single may now be a granted take's time: <= now, so no bound.)
    return true;
  }

  /// Adds the takes of request `id` (greater than every id added so far),
  /// placed at `t` (never: nothing).
  void add(std::uint64_t id, std::span<const joint_part> parts, std::optional<std::int64_t> t) {
    const bool single = is_single(parts);
    const std::int64_t at = t.value_or(max_time);
    for (const joint_part& p : parts) {
      bucket& bk = buckets_[p.bucket];
      // (time, id) order; ids only grow, so after every take at <= `at`.
      auto pos = std::upper_bound(bk.takes.begin(), bk.takes.end(), at,
                                  [](std::int64_t a, const take& x) { return a < x.at; });
      const std::size_t i = static_cast<std::size_t>(pos - bk.takes.begin());
      bk.takes.insert(pos, take{at, id, p.n, single && p.n > 0, states_[p.bucket], true});
      if (single && p.n > 0) bk.last_single = std::max(bk.last_single.value_or(at), at);
      simulate_from(p.bucket, i);
    }
  }

  /// Bucket `b`'s state changed other than by refilling (tokens taken at
  /// now): the states after its planned takes are simulated again.
  void refresh(std::size_t b) { simulate_from(b, 0); }

 private:
  struct take {
    std::int64_t at;
    std::uint64_t id;
    std::uint64_t n;
    bool single;
    bucket_state after;  // the state just after this take in the plan
    bool ok;             // this take and every one before it find their amount
    // For passing over segments (earliest_feasible): the units the plan has
    // wasted (accrued at the capacity) from the bucket's state at the last
    // full simulation up to this take, and min over this take and every
    // later one of (its level after + its wasted); see room_after().
    uint128 wasted = 0;
    uint128 least = 0;
  };
  struct bucket {
    std::deque<take> takes;                   // in (time, id) order
    std::optional<std::int64_t> last_single;  // the latest single take (a bound for later singles)
  };

  /// The state just after the first `i` takes of `b` (its state at now for
  /// 0), and whether they all found their amount.
  std::pair<const bucket_state&, bool> before(std::size_t b, std::size_t i) const {
    if (i == 0) return {states_[b], true};
    const take& k = buckets_[b].takes[i - 1];
    return {k.after, k.ok};
  }

  /// Simulates `b`'s plan from its take `i` on (a take that does not find
  /// its amount, which happens only at the end of time, takes what there is).
  void simulate_from(std::size_t b, std::size_t i) {
    std::deque<take>& ks = buckets_[b].takes;
    const std::size_t first = i;
    auto [start, ok] = before(b, i);
    bucket_state s = start;
    uint128 wasted = i == 0 ? 0 : ks[i - 1].wasted;
    for (; i < ks.size(); ++i) {
      wasted = add_capped(wasted, s.waste_until(ks[i].at));
      s.refill(ks[i].at);
      ok = ok && s.has(ks[i].n);
      s.take(std::min<std::uint64_t>(ks[i].n, s.available()));
      ks[i].after = s;
      ks[i].ok = ok;
      ks[i].wasted = wasted;
    }
    // The suffix minima: every take from `first` on changed; before it, a
    // minimum changes only while the one after it did.
    for (std::size_t k = ks.size(); k-- > 0;) {
      // (Below 2^127 + 2^127: no overflow; meaningful while wasted is not capped.)
      const uint128 own = ks[k].after.level() + ks[k].wasted;
      const uint128 least = k + 1 == ks.size() ? own : std::min(own, ks[k + 1].least);
      if (k < first && least == ks[k].least) break;
      ks[k].least = least;
    }
  }

  static constexpr uint128 wasted_cap = uint128{1} << 127;

  /// a + b, saturating at wasted_cap (a plan that wastes that much, over
  /// 2^64 ns at 2^63 units a ns, is not passed over).
  static uint128 add_capped(uint128 a, uint128 b) noexcept {
    return a >= wasted_cap || b >= wasted_cap - a ? wasted_cap : a + b;
  }

  /// Can a take of `units` placed in the segment between take `next - 1`
  /// and take `next` (next >= 1) leave every later take its amount? Only if
  /// this holds (a necessary condition; feasible_with decides):
  ///
  /// A take of d units at c leaves the level d units lower; refilling,
  /// the shortfall shrinks only by what the plan would have wasted at the
  /// capacity, so at a later take j it is max(0, d - wasted between c and
  /// j), and j finds its amount iff that is at most its level after, L_j.
  /// With W_j the plan's units wasted up to j: for every j >= next,
  /// d <= L_j + W_j - W(c) <= L_j + W_j - W_{next-1} (W(c) >= W_{next-1}).
  /// least_next = min over j >= next of L_j + W_j; so d <= least_next -
  /// W_{next-1}. When it fails, the bound L_j + W_j that fails it (the last
  /// take k with least_k = least_next) fails every segment before take k+1
  /// too (the W before them are no smaller): skip_to() finds k.
  bool room_after(std::size_t b, std::size_t next, uint128 units) const {
    const std::deque<take>& ks = buckets_[b].takes;
    const uint128 before = ks[next - 1].wasted;
    return ks[next].least - before >= units;
  }

  /// The last take k >= next whose least is that of take `next`.
  std::size_t skip_to(std::size_t b, std::size_t next) const {
    const std::deque<take>& ks = buckets_[b].takes;
    const uint128 v = ks[next].least;
    const auto it = std::upper_bound(ks.begin() + static_cast<std::ptrdiff_t>(next), ks.end(), v,
                                     [](uint128 a, const take& x) { return a < x.least; });
    return static_cast<std::size_t>(it - ks.begin()) - 1;
  }

  /// The index of the first take of `b` later than `t`.
  std::size_t first_after(std::size_t b, std::int64_t t) const {
    const std::deque<take>& ks = buckets_[b].takes;
    return static_cast<std::size_t>(
        std::upper_bound(ks.begin(), ks.end(), t,
                         [](std::int64_t a, const take& x) { return a < x.at; }) -
        ks.begin());
  }

  /// Does bucket `b`, through its planned takes and "take n at c" (after
  /// every planned take at <= c), find every amount?
  bool feasible_with(std::size_t b, std::uint64_t n, std::int64_t c) const {
    const std::deque<take>& ks = buckets_[b].takes;
    std::size_t i = first_after(b, c);
    auto [start, ok] = before(b, i);
    if (!ok) return false;
    bucket_state s = start;
    s.refill(c);
    if (!s.has(n)) return false;
    s.take(n);
    for (; i < ks.size(); ++i) {
      s.refill(ks[i].at);
      if (!s.has(ks[i].n)) return false;
      s.take(ks[i].n);
    }
    return true;
  }

  /// The earliest t >= from (from >= now) at which "take n at t" on bucket
  /// `b` leaves its plan feasible; nothing if no t <= INT64_MAX does.
  ///
  /// Within each segment [s, e) between consecutive planned take times the
  /// feasible t form an interval starting at max(s, from, ready) (the take
  /// finds n from `ready` on, and the level before each later take does not
  /// grow with t): that candidate is checked, and if it fails no later t of
  /// the segment can succeed (joint_model.hpp derives it). The segments that
  /// end at or before `from` are passed over (found by binary search).
  std::optional<std::int64_t> earliest_feasible(std::size_t b, std::uint64_t n,
                                                std::int64_t from) const {
    const std::deque<take>& ks = buckets_[b].takes;
    std::size_t next = first_after(b, from);  // the first take after s
    std::int64_t s = next == 0 ? now_ : std::max(now_, ks[next - 1].at);
    // Passing over segments (room_after) needs a plan whose takes all find
    // their amount and whose sums did not saturate.
    const bool pass_over = !ks.empty() && ks.back().ok && ks.back().wasted < wasted_cap;
    const uint128 units = static_cast<uint128>(n) * states_[b].rate().ticks;  // < 2^127
    for (;;) {
      if (pass_over && next > 0 && next < ks.size() && !room_after(b, next, units)) {
        // No segment before the one after take k can hold it.
        const std::size_t k = skip_to(b, next);
        s = std::max(now_, ks[k].at);
        next = static_cast<std::size_t>(
            std::upper_bound(ks.begin() + static_cast<std::ptrdiff_t>(k) + 1, ks.end(), s,
                             [](std::int64_t a, const take& x) { return a < x.at; }) -
            ks.begin());
        continue;
      }
      const bucket_state& level = before(b, next).first;  // just after the takes at <= s
      const bool last = next == ks.size();
      const std::int64_t e = last ? max_time : ks[next].at;
      const auto r = ready_from(level, s, n);
      if (!r) {
        if (last) return std::nullopt;
      } else {
        const std::int64_t c = std::max({s, from, *r});
        if ((last || c < e) && feasible_with(b, n, c)) return c;
      }
      if (last) return std::nullopt;
      s = e;
      while (next < ks.size() && ks[next].at <= s)
        ++next;
    }
  }

  std::span<const bucket_state> states_;
  std::int64_t now_;
  std::vector<bucket> buckets_;
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_JOINT_PLAN_HPP
