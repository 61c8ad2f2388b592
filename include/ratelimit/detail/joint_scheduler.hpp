//
// ratelimit/detail/joint_scheduler.hpp: a set of buckets and the requests,
// single and joint, queued on them: what is granted when, what fails, what
// is given back. Pure: time is an argument of every call, nothing waits,
// nothing completes; the caller (the joint acquire's Asio layer) locks,
// times and completes. Every decision is joint_planner's (joint_plan.hpp).
//
// The calls and their order of effects are those of the reference model
// (test/model/joint_model.hpp), which documents every decision; in brief:
// every call first grants what is due at `now` (in (T, id) order, each as of
// its T); a request that fails at once consumes an id (`closed` before
// `exceeds_capacity`); cancel, close, set_capacity, set_rate and give_back
// re-plan and grant what becomes due, as of now. Completions are appended to
// a list the caller drains.
//
// Each bucket's counts (metrics_counts.hpp) live here while it is a member:
// every request naming it is counted on it where it is decided (a joint
// request on each of its buckets), and the counts go back with the bucket.
//
#ifndef RATELIMIT_DETAIL_JOINT_SCHEDULER_HPP
#define RATELIMIT_DETAIL_JOINT_SCHEDULER_HPP

#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/detail/joint_plan.hpp>
#include <ratelimit/detail/metrics_counts.hpp>

#include <boost/container/small_vector.hpp>
#include <boost/intrusive/set.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

namespace ratelimit::detail {

enum class joint_outcome { granted, exceeds_capacity, closed, aborted, timed_out };

struct joint_completion {
  std::uint64_t id;
  joint_outcome how;
  void* tag = nullptr;  // what the request was made with (request())
  friend bool operator==(const joint_completion& a, const joint_completion& b) noexcept {
    return a.id == b.id && a.how == b.how;
  }
};

class joint_scheduler {
 public:
  /// With `keep_held` false, a granted request leaves no record (give_back
  /// by id finds nothing): its caller keeps what it holds (a receipt) and
  /// gives back to a bucket (give_back_to). The Asio layer's choice: its
  /// memory then depends only on what is queued.
  explicit joint_scheduler(std::int64_t now, bool keep_held = true)
      : now_(now), keep_held_(keep_held) {}
  // Not copyable nor movable: the due orders link its requests' nodes in place.
  joint_scheduler(const joint_scheduler&) = delete;
  joint_scheduler& operator=(const joint_scheduler&) = delete;

  /// A bucket of `capacity` tokens at `r`, holding `initial` at `now`;
  /// returns its number. Throws std::invalid_argument for invalid values.
  std::size_t add_bucket(std::uint64_t capacity, const rate& r, std::uint64_t initial,
                         std::int64_t now) {
    const reduced_rate rr = reduce(r);
    check_capacity(capacity);
    if (initial > capacity)
      throw std::invalid_argument("ratelimit: initial tokens exceed capacity");
    serve(now);
    return add_bucket(bucket_state(capacity, rr, now_, initial), now_);
  }

  /// A bucket in state `s` (as a bucket that had its own queue leaves it:
  /// refilled to now here), having counted `counts` so far; returns its
  /// number, reusing the number of a removed bucket. Throws std::bad_alloc
  /// with nothing added.
  std::size_t add_bucket(const bucket_state& s, std::int64_t now,
                         const metrics_counts& counts = {}) {
    serve(now);
    std::size_t b;
    if (!free_.empty()) {
      b = free_.back();
      states_[b] = s;
      counts_[b] = counts;
      closed_[b] = false;
      closed_as_[b] = error::bucket_closed;
      parts_[b] = 0;
      tokens_[b] = 0;
      multi_[b] = 0;
      free_.pop_back();
    } else {
      free_.reserve(states_.size() + 1);  // so that remove_bucket() never allocates
      states_.reserve(states_.size() + 1);
      counts_.reserve(counts_.size() + 1);
      closed_.reserve(closed_.size() + 1);
      closed_as_.reserve(closed_as_.size() + 1);
      parts_.reserve(parts_.size() + 1);
      tokens_.reserve(tokens_.size() + 1);
      multi_.reserve(multi_.size() + 1);
      b = states_.size();
      states_.push_back(s);
      counts_.push_back(counts);
      closed_.push_back(false);
      closed_as_.push_back(error::bucket_closed);
      parts_.push_back(0);
      tokens_.push_back(0);
      multi_.push_back(0);
    }
    states_[b].refill(now_);
    invalidate();  // (the planner refers to the states)
    return b;
  }

  /// Removes bucket `b`, which no queued request names, and returns its
  /// state as of now (its number may be reused). Never allocates.
  bucket_state remove_bucket(std::size_t b) {
    check_bucket(b);
    if (parts_[b] != 0) throw std::logic_error("ratelimit: a queued request names the bucket");
    free_.push_back(b);
    invalidate();
    return states_[b];
  }

  // --- requests -------------------------------------------------------------

  /// A request of `parts` made now (or, with `made_at`, made then: a
  /// request queued elsewhere before, moving here; no later than now);
  /// returns its id. `tag` comes back in its completion. With a `deadline`
  /// (a blocking caller's): granted at a T <= deadline, or `timed_out` as
  /// soon as its T is later or never (in this call, or in the call that
  /// moves it), taking nothing.
  std::uint64_t request(std::span<const joint_part> parts, std::int64_t now, void* tag = nullptr,
                        std::optional<std::int64_t> made_at = std::nullopt,
                        const void* owner = nullptr, std::int64_t deadline = max_time) {
    check_parts(parts);
    serve(now);
    const std::uint64_t id = next_id_++;
    if (const auto fail = fails_at_once(parts)) {
      count_failed(parts, *fail);
      complete(id, *fail, tag);
    } else {
      auto it =
          queued_.try_emplace(id, id, parts, std::min(made_at.value_or(now_), now_), tag, owner)
              .first;
      if (deadline != max_time) {
        it->second.deadline = deadline;
        deadlines_.insert(it->second);  // (intrusive: no allocation)
      }
      queue_up(it);
      serve(now_);
    }
    return id;
  }

  /// A request of `parts` (none failing at once) made at `made_at`, queued
  /// here from elsewhere (a bucket's own queue) and not served yet: nothing
  /// is granted in this call. Returns its id. Throws std::bad_alloc with
  /// nothing changed.
  std::uint64_t adopt(std::span<const joint_part> parts, std::int64_t made_at, void* tag,
                      const void* owner = nullptr, std::int64_t deadline = max_time) {
    auto it =
        queued_.try_emplace(next_id_, next_id_, parts, std::min(made_at, now_), tag, owner).first;
    if (deadline != max_time) {
      it->second.deadline = deadline;
      deadlines_.insert(it->second);
    }
    queue_up(it);
    return next_id_++;
  }

  /// Takes queued request `id` out as if it had never been made: no
  /// completion (the undoing of adopt()). Never allocates.
  void withdraw(std::uint64_t id) noexcept {
    const auto it = queued_.find(id);
    if (it == queued_.end()) return;
    forget(it);
    invalidate();
  }

  /// Grants now (`granted`) exactly when a request made now would be placed
  /// at now; nothing when refused for want of tokens; or the at-once failure.
  /// Takes no id and changes no queued request's T. Counts the grant or the
  /// failure on each part's bucket, and the refusal too when `is_try` (not
  /// when the caller goes on to queue the request).
  std::optional<joint_outcome> try_get(std::span<const joint_part> parts, std::int64_t now,
                                       bool is_try = true) {
    check_parts(parts);
    serve(now);
    if (const auto fail = fails_at_once(parts)) {
      count_failed(parts, *fail);
      return fail;
    }
    const auto t = planner().place(parts, now_);
    if (!t || *t != now_) {
      if (is_try)
        for (const joint_part& q : parts)
          counts_[q.bucket].refused();
      return std::nullopt;
    }
    // Taken at now, after every planned take at now: no queued request's T
    // moves (joint_model.hpp), so the plan stands.
    for (const joint_part& q : parts) {
      states_[q.bucket].take(q.n);
      plan_->refresh(q.bucket);
      counts_[q.bucket].granted(q.n);
    }
    return joint_outcome::granted;
  }

  /// T - now for a request made now (0: at once; INT64_MAX - now: never;
  /// saturated at INT64_MAX); nothing when it would fail at once.
  std::optional<std::int64_t> retry_after(std::span<const joint_part> parts, std::int64_t now) {
    check_parts(parts);
    serve(now);
    if (fails_at_once(parts)) return std::nullopt;
    const std::int64_t t = planner().place(parts, now_).value_or(max_time);
    if (t <= now) return 0;
    const std::uint64_t d = static_cast<std::uint64_t>(t) - static_cast<std::uint64_t>(now);
    return d > static_cast<std::uint64_t>(max_time) ? max_time : static_cast<std::int64_t>(d);
  }

  void serve_due(std::int64_t now) { serve(now); }

  void cancel(std::uint64_t id, std::int64_t now) { cancel_at(id, now, now, ended_cancelled); }

  /// A deadline passed at `until` (<= now): grants what was due by then,
  /// then cancels `id` if it is still queued (true), then grants what is due
  /// at `now`. So a request whose T is after its deadline is never granted.
  /// Counted as `how` (metrics_counts::ended_as) on its buckets: by default
  /// as a deadline's expiry.
  bool cancel_at(std::uint64_t id, std::int64_t until, std::int64_t now,
                 std::size_t how = ended_expired) {
    serve(std::min(until, now));
    const auto it = queued_.find(id);
    if (it == queued_.end()) {
      if (until < now) serve(now);
      return false;
    }
    void* tag = it->second.tag;
    count_ended(it->second.parts, how);
    forget(it);
    invalidate();
    serve(std::max(now, now_));  // (as of the latest time seen: the clock may have gone back)
    complete(id, joint_outcome::aborted, tag);
    return true;
  }

  /// Room for the completions of every queued request, `extra` more and
  /// one: completing then never allocates (call before queuing more).
  void reserve_completions(std::size_t extra) {
    completions_.reserve(completions_.size() + queued_.size() + extra + 1);
  }

  /// Cancels every queued request that names bucket `b` (in id order).
  void cancel_on(std::size_t b, std::int64_t now) {
    check_bucket(b);
    serve(now);
    fail_queued_on(b, joint_outcome::aborted, std::nullopt, ended_cancelled);
    invalidate();
    serve(now_);
  }

  /// Closes bucket `b`: its queued requests, and later requests naming it,
  /// fail `closed`, counted as `closed_as` (an error index, or
  /// ended_cancelled when the bucket is being destroyed).
  void close(std::size_t b, std::int64_t now, std::size_t closed_as = error::bucket_closed) {
    check_bucket(b);
    serve(now);
    closed_[b] = true;
    closed_as_[b] = closed_as;
    fail_queued_on(b, joint_outcome::closed, std::nullopt, closed_as);
    invalidate();
    serve(now_);
  }

  /// (`full_stays_full`: bucket_state::set_capacity's, as of the grants due
  /// at `now`.)
  void set_capacity(std::size_t b, std::uint64_t c, std::int64_t now,
                    bool full_stays_full = false) {
    check_bucket(b);
    check_capacity(c);
    serve(now);
    states_[b].set_capacity(c, full_stays_full);
    fail_queued_on(b, joint_outcome::exceeds_capacity, c, error::exceeds_capacity);
    invalidate();
    serve(now_);
  }

  void set_rate(std::size_t b, const rate& r, std::int64_t now) {
    check_bucket(b);
    const reduced_rate rr = reduce(r);
    serve(now);
    states_[b].set_rate(rr);
    invalidate();
    serve(now_);
  }

  /// Gives back up to `k` tokens to each part of granted request `id`;
  /// returns what each part gave (in part order; empty if `id` is no
  /// granted request).
  std::vector<std::uint64_t> give_back(std::uint64_t id, std::uint64_t k, std::int64_t now) {
    serve(now);
    auto it = held_.find(id);
    if (it == held_.end()) return {};
    std::vector<std::uint64_t> given;
    for (held_part& h : it->second) {
      const std::uint64_t g = std::min(k, h.held);
      h.held -= g;
      states_[h.bucket].give_back(g);
      counts_[h.bucket].gave_back(g);
      given.push_back(g);
    }
    invalidate();
    serve(now_);
    return given;
  }

  /// Gives `n` tokens back to bucket `b` (capped at its capacity), then
  /// grants what becomes due, as of now.
  void give_back_to(std::size_t b, std::uint64_t n, std::int64_t now) {
    check_bucket(b);
    serve(now);
    states_[b].give_back(n);
    counts_[b].gave_back(n);
    invalidate();
    serve(now_);
  }

  // --- observers --------------------------------------------------------------

  bool is_closed(std::size_t b) const { return closed_[b]; }
  /// What bucket `b` has counted (metrics_counts.hpp) while it was here.
  const metrics_counts& counts(std::size_t b) const { return counts_[b]; }
  /// Counts on each of `parts`' buckets a request that ended as `how`
  /// without reaching the scheduler (e.g. refused for its deadline at once).
  void count_ended(std::span<const joint_part> parts, std::size_t how) noexcept {
    for (const joint_part& q : parts)
      counts_[q.bucket].ended_as(how);
  }
  void count_ended_on(std::size_t b, std::size_t how) noexcept { counts_[b].ended_as(how); }
  std::uint64_t capacity(std::size_t b) const { return states_[b].capacity(); }
  const bucket_state& state(std::size_t b) const { return states_[b]; }
  /// How many queued requests name `b`, and the tokens they ask of it.
  std::size_t queued_on(std::size_t b) const { return parts_[b]; }
  uint128 queued_tokens_on(std::size_t b) const { return tokens_[b]; }
  bool is_queued(std::uint64_t id) const { return queued_.count(id) != 0; }
  /// How many queued requests name `b` and another bucket too.
  std::size_t multi_on(std::size_t b) const { return multi_[b]; }

  /// Takes every queued request naming `b` (each names only `b`: multi_on(b)
  /// is 0) out, as if never made here, and returns their tags and when they
  /// were made and their tokens, in their order: they go back to the
  /// bucket's own queue.
  /// Throws std::bad_alloc with nothing changed.
  struct released {
    void* tag;
    std::int64_t made_at;
    std::uint64_t n;
  };
  std::vector<released> release_singles(std::size_t b) {
    std::vector<released> out;
    out.reserve(parts_[b]);
    for (const auto& [id, r] : queued_)
      if (r.parts.front().bucket == b) out.push_back({r.tag, r.made_at, r.parts.front().n});
    for (auto it = queued_.begin(); it != queued_.end();)
      it = it->second.parts.front().bucket == b ? forget(it) : std::next(it);
    if (!out.empty()) invalidate();
    return out;
  }

  /// The earliest planned T of the queued requests `owner` serves (nothing:
  /// none, or all placed never). Throws std::bad_alloc (making the plan).
  std::optional<std::int64_t> next_due_of(const void* owner) {
    if (queued_.empty()) return std::nullopt;
    planner();
    const auto it = owner_due_.find(owner);
    if (it == owner_due_.end()) return std::nullopt;
    return *it->second.begin()->planned;
  }

  /// The earliest planned T of a queued request and that request's tag
  /// (nothing: nobody is queued, or every queued request is placed never).
  std::optional<std::pair<std::int64_t, void*>> next_due() {
    if (queued_.empty()) return std::nullopt;
    planner();
    if (due_.empty()) return std::nullopt;
    return std::pair{*due_.begin()->planned, due_.begin()->tag};
  }

  void clear_completions() noexcept { completions_.clear(); }

  std::uint64_t available(std::size_t b, std::int64_t now) {
    check_bucket(b);
    serve(now);
    return states_[b].available();
  }

  /// T of queued request `id` (nothing: not queued, or never).
  std::optional<std::int64_t> planned_at(std::uint64_t id) {
    planner();
    const auto it = queued_.find(id);
    if (it == queued_.end()) return std::nullopt;
    return it->second.planned;
  }

  std::size_t waiting() const { return queued_.size(); }
  std::int64_t now() const { return now_; }
  const std::vector<joint_completion>& completions() const { return completions_; }

 private:
  // One node per queued request, holding its parts (a few in place) and its
  // places in the due orders (intrusive): a request costs one allocation,
  // larger than glibc's fastbins (whose deferred coalescing stalls a program
  // for tens of ms when 100 000 small nodes have been freed).
  using due_hook = boost::intrusive::set_member_hook<>;
  struct queued {
    queued(std::uint64_t i, std::span<const joint_part> ps, std::int64_t made, void* t,
           const void* o)
        : id(i), parts(ps.begin(), ps.end()), made_at(made), tag(t), owner(o) {}
    queued(const queued&) = delete;
    queued& operator=(const queued&) = delete;

    std::uint64_t id;
    boost::container::small_vector<joint_part, 4> parts;
    std::int64_t made_at;
    void* tag;
    const void* owner;                    // whose timer serves it (next_due_of)
    std::optional<std::int64_t> planned;  // T in the current plan (nothing: never)
    std::int64_t deadline = max_time;     // a blocking caller's (max_time: none)
    due_hook in_due;                      // due_, when placed
    due_hook in_owner_due;                // owner_due_[owner], when placed
    due_hook in_deadlines;                // deadlines_, with a deadline
  };
  struct by_id {
    bool operator()(const queued& a, const queued& b) const noexcept { return a.id < b.id; }
  };
  using deadline_set = boost::intrusive::set<
      queued, boost::intrusive::member_hook<queued, due_hook, &queued::in_deadlines>,
      boost::intrusive::compare<by_id>, boost::intrusive::constant_time_size<false>>;
  struct by_due {
    bool operator()(const queued& a, const queued& b) const noexcept {
      return std::pair(*a.planned, a.id) < std::pair(*b.planned, b.id);
    }
  };
  template <due_hook queued::*Hook>
  using due_set =
      boost::intrusive::set<queued, boost::intrusive::member_hook<queued, due_hook, Hook>,
                            boost::intrusive::compare<by_due>,
                            boost::intrusive::constant_time_size<false>>;
  struct held_part {
    std::size_t bucket;
    std::uint64_t held;
  };

  void check_bucket(std::size_t b) const {
    if (b >= states_.size()) throw std::invalid_argument("ratelimit: no such bucket");
  }
  void check_parts(std::span<const joint_part> parts) const {
    if (parts.empty()) throw std::invalid_argument("ratelimit: a request needs a part");
    std::set<std::size_t> seen;
    for (const joint_part& p : parts) {
      check_bucket(p.bucket);
      if (!seen.insert(p.bucket).second)
        throw std::invalid_argument("ratelimit: a request names a bucket twice");
    }
  }

  std::optional<joint_outcome> fails_at_once(std::span<const joint_part> parts) const {
    for (const joint_part& p : parts)
      if (closed_[p.bucket]) return joint_outcome::closed;
    for (const joint_part& p : parts)
      if (p.n > states_[p.bucket].capacity()) return joint_outcome::exceeds_capacity;
    return std::nullopt;
  }

  /// The plan of every queued request: kept from call to call; made again,
  /// in id order, after anything but a new request, a grant or a try.
  /// Throws std::bad_alloc with no plan (the next call makes it again).
  joint_planner& planner() {
    if (!plan_) {
      unlink_due();
      try {
        plan_.emplace(states_, now_);
        for (auto& [id, r] : queued_) {
          const auto t = plan_->place(r.parts, r.made_at);
          plan_->add(id, r.parts, t);
          note_planned(r, t);
        }
      } catch (...) {
        invalidate();
        throw;
      }
    }
    return *plan_;
  }

  /// Counts queued request `it` on its buckets and places it (after every
  /// queued request, as a re-plan would); a plan that cannot grow is made
  /// again later. Never throws.
  void queue_up(std::map<std::uint64_t, queued>::iterator it) noexcept {
    const bool multi = it->second.parts.size() > 1;
    for (const joint_part& q : it->second.parts) {
      ++parts_[q.bucket];
      tokens_[q.bucket] += q.n;
      multi_[q.bucket] += multi;
    }
    if (!plan_) return;
    try {
      const auto t = plan_->place(it->second.parts, now_);
      plan_->add(it->first, it->second.parts, t);
      note_planned(it->second, t);
    } catch (...) {  // std::bad_alloc
      invalidate();
    }
  }

  /// Request `q` is placed at `t` (nothing: never). Throws std::bad_alloc
  /// (an owner's first entry) with `q` in no due order.
  void note_planned(queued& q, std::optional<std::int64_t> t) {
    q.planned = t;
    if (!t) return;
    due_set<& queued::in_owner_due>& mine = owner_due_[q.owner];
    mine.insert(q);
    due_.insert(q);
  }

  /// Takes `q` out of the due orders (if it is in them).
  void unlink_due(queued& q) noexcept {
    if (q.in_due.is_linked()) due_.erase(due_.iterator_to(q));
    if (q.in_owner_due.is_linked()) {
      const auto o = owner_due_.find(q.owner);
      o->second.erase(o->second.iterator_to(q));
      if (o->second.empty()) owner_due_.erase(o);
    }
  }

  /// Empties the due orders (the plan that made them is gone).
  void unlink_due() noexcept {
    due_.clear();
    for (auto& [owner, set] : owner_due_)
      set.clear();
    owner_due_.clear();
  }

  void invalidate() noexcept {
    plan_.reset();
    unlink_due();
  }

  void see(std::int64_t now) {
    if (now <= now_) return;
    for (bucket_state& s : states_)
      s.refill(now);
    now_ = now;
    if (plan_) plan_->advance(now);
  }

  /// Grants every request due by `now`, in (T, id) order, each as of its T.
  /// When the plan cannot be made (std::bad_alloc) it grants what it could
  /// and leaves the rest, and the time, for the next call: a request is
  /// never granted at another time than its T for want of memory.
  void serve(std::int64_t now) {
    try {
      serve_or_throw(now);
    } catch (const std::bad_alloc&) {
      invalidate();
    }
  }

  /// Every queued request whose T is past its deadline (or never) fails
  /// `timed_out`, in id order, re-planning after each (which moves no other
  /// request later).
  void drop_late() {
    // Only the requests with a deadline are visited (blocking callers: as
    // many as threads), not every queued request.
    while (!deadlines_.empty()) {
      planner();
      const auto late = std::find_if(deadlines_.begin(), deadlines_.end(), [](const queued& q) {
        return !q.planned || *q.planned > q.deadline;
      });
      if (late == deadlines_.end()) return;
      const std::uint64_t id = late->id;
      void* tag = late->tag;
      count_ended(late->parts, ended_expired);
      forget(queued_.find(id));
      invalidate();
      complete(id, joint_outcome::timed_out, tag);
    }
  }

  void serve_or_throw(std::int64_t now) {
    drop_late();
    while (!queued_.empty()) {
      planner();
      if (due_.empty() || *due_.begin()->planned > now) break;
      queued& q = *due_.begin();
      const std::int64_t t = *q.planned;
      const std::uint64_t id = q.id;
      unlink_due(q);
      see(t);
      const std::span<const joint_part> parts = q.parts;
      // Its takes are the first of their buckets, but at the end of time,
      // where a request placed never keeps its takes ahead: re-plan then.
      if (!plan_->pop_granted(id, parts)) invalidate();
      for (const joint_part& q : parts)
        if (!states_[q.bucket].has(q.n))
          throw std::logic_error("ratelimit: a planned take found no tokens");
      if (keep_held_) {  // (the model's tests: give_back by id)
        std::vector<held_part> held;
        for (const joint_part& q : parts)
          held.push_back({q.bucket, q.n});
        held_[id] = std::move(held);
      }
      const std::int64_t made_at = q.made_at;
      for (const joint_part& p : parts) {
        states_[p.bucket].take(p.n);
        counts_[p.bucket].granted(p.n, made_at, t);
      }
      void* tag = q.tag;
      forget(queued_.find(id));
      complete(id, joint_outcome::granted, tag);
    }
    see(now);
  }

  /// Counts a request of `parts` failing at once as `how` (fails_at_once).
  void count_failed(std::span<const joint_part> parts, joint_outcome how) noexcept {
    std::size_t as = error::exceeds_capacity;
    if (how == joint_outcome::closed)
      for (const joint_part& q : parts)
        if (closed_[q.bucket]) {
          as = closed_as_[q.bucket];
          break;
        }
    count_ended(parts, as);
  }

  void fail_queued_on(std::size_t b, joint_outcome how, std::optional<std::uint64_t> over,
                      std::size_t counted_as) {
    for (auto it = queued_.begin(); it != queued_.end();) {
      bool hit = false;
      for (const joint_part& q : it->second.parts)
        hit = hit || (q.bucket == b && (!over || q.n > *over));
      if (hit) {
        count_ended(it->second.parts, counted_as);
        complete(it->first, how, it->second.tag);
        it = forget(it);
      } else {
        ++it;
      }
    }
  }

  void complete(std::uint64_t id, joint_outcome how, void* tag) {
    completions_.push_back({id, how, tag});
  }

  /// Drops queued request `it` (granted or failed); returns the next.
  std::map<std::uint64_t, queued>::iterator forget(std::map<std::uint64_t, queued>::iterator it) {
    unlink_due(it->second);
    if (it->second.in_deadlines.is_linked()) deadlines_.erase(deadlines_.iterator_to(it->second));
    const bool multi = it->second.parts.size() > 1;
    for (const joint_part& q : it->second.parts) {
      --parts_[q.bucket];
      tokens_[q.bucket] -= q.n;
      multi_[q.bucket] -= multi;
    }
    return queued_.erase(it);
  }

  std::int64_t now_;
  bool keep_held_;
  std::vector<bucket_state> states_;
  std::vector<metrics_counts> counts_;  // per bucket: what it counted while here
  std::vector<bool> closed_;
  std::vector<std::size_t> closed_as_;  // per closed bucket: how its failures count
  std::vector<std::size_t> parts_;      // per bucket: queued requests naming it
  std::vector<uint128> tokens_;         // per bucket: the tokens they ask of it
  std::vector<std::size_t> multi_;      // per bucket: queued requests naming it and another
  std::vector<std::size_t> free_;       // numbers of removed buckets
  std::map<std::uint64_t, queued> queued_;
  std::optional<joint_planner> plan_;  // when valid
  // The requests placed by plan_ in (T, id) order: all, and per owner.
  due_set<&queued::in_due> due_;
  std::map<const void*, due_set<&queued::in_owner_due>> owner_due_;
  std::map<std::uint64_t, std::vector<held_part>> held_;
  std::uint64_t next_id_ = 0;
  std::vector<joint_completion> completions_;
  deadline_set deadlines_;  // the queued requests with a deadline, by id (after queued_)
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_JOINT_SCHEDULER_HPP
