//
// ratelimit/detail/joint_group.hpp: where the requests wait that take tokens
// from several buckets at once (the joint acquire), with every request
// queued on the buckets they name.
//
// A bucket is solo (its own FIFO, timer and state: bucket_impl.hpp) until a
// joint request naming it has to wait. Then it joins the group: its state
// and its queued requests (in their order, each keeping when it was made)
// move into the group's joint_scheduler, and from then on every operation on
// the bucket is the scheduler's, under the group's lock. The scheduler
// decides every grant (joint_plan.hpp: one order, granted together at T,
// nothing held while waiting). A bucket leaves as soon as no queued request
// names it together with another bucket: its state and its single requests
// move back and it is solo again, at the cost of one branch on its fast
// path. So the group holds only buckets that queued joint requests name.
//
// One group per clock type: a process's joint requests share one lock while
// they wait (grants at once take only the buckets' own locks). That keeps
// every joint request, over any buckets, in one order without merging groups.
//
// Timers: a queued request is served by the timer of its owner (its first
// part's bucket; a request that moved in from a bucket's queue, that
// bucket's), and completes through that bucket's executor. Each member's
// timer is armed for the first due request it owns, so a grant needs only
// its owner's context to run. When one fires (bucket_impl::on_timer) the
// group grants everything that is due, then arms again.
//
// Locking: the group's mutex, then buckets' spin locks (a bucket's fields
// that say where it is, `slot_`, change only under both). A bucket operation
// reads `slot_` under its own lock; if it is in the group it lets go and
// takes the group's lock, then checks again. Completions are collected under
// the lock and finished after it is released (a batch); each goes through a
// copy of its owner's executor, so a bucket destroyed meanwhile is no
// concern. A bucket is always closed (by its owner's destructor) before it
// is destroyed, which makes it leave; so the group never refers to a bucket
// that is gone.
//
// A blocked caller's deadline is the scheduler's too: its request fails
// (timed_out, taking nothing) as soon as its T passes the deadline, as a
// solo bucket drops it; its thread withdraws it as of the deadline if it
// wakes first.
//
// One group per clock type and program: a function-local static of a header
// template. A shared library that hides its symbols gets a group of its
// own; a bucket must then be used from one module only.
//
#ifndef RATELIMIT_DETAIL_JOINT_GROUP_HPP
#define RATELIMIT_DETAIL_JOINT_GROUP_HPP

#include <ratelimit/detail/joint_scheduler.hpp>
#include <ratelimit/detail/sync_waiter.hpp>
#include <ratelimit/detail/waiter.hpp>
#include <ratelimit/error.hpp>

#include <boost/asio/error.hpp>
#include <boost/container/small_vector.hpp>

#include <algorithm>
#include <cstdint>
#include <future>
#include <limits>
#include <mutex>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

namespace ratelimit::detail {

template <typename Clock, typename WaitTraits>
class bucket_impl;

/// One part of a joint request: `n` tokens of `bucket`.
template <typename Clock, typename WaitTraits>
struct bucket_part {
  bucket_impl<Clock, WaitTraits>* bucket;
  std::uint64_t n;
};

/// Completions collected under a lock and finished after it is released,
/// in order, each posted through the executor copied into its waiter.
class group_batch {
 public:
  group_batch() = default;
  group_batch(const group_batch&) = delete;
  group_batch& operator=(const group_batch&) = delete;
  ~group_batch() { finish(); }

  void push(waiter_base* w, boost::system::error_code ec) noexcept {
    w->next = nullptr;
    w->set_result(ec);
    (tail_ ? tail_->next : head_) = w;
    tail_ = w;
  }

  void finish() noexcept {
    waiter_base* w = head_;
    head_ = tail_ = nullptr;
    while (w) {
      waiter_base* next = w->next;
      boost::asio::any_io_executor ex = std::move(w->group_ex);  // `w` may be freed below
      try {
        w->complete(finish_mode::post, ex);
      } catch (...) {  // only with executors whose post allocates: the waiter was destroyed
      }
      w = next;
    }
  }

 private:
  waiter_base* head_ = nullptr;
  waiter_base* tail_ = nullptr;
};

template <typename Clock, typename WaitTraits>
class joint_group {
 public:
  using bucket_type = bucket_impl<Clock, WaitTraits>;
  using part_type = bucket_part<Clock, WaitTraits>;
  static constexpr std::size_t solo = std::numeric_limits<std::size_t>::max();

  static joint_group& instance() {
    // Never destroyed: buckets with static storage may be used after it would be.
    static joint_group* const g = new joint_group;
    return *g;
  }

  /// Runs `f(slot, scheduler)` under the group's lock if `b` is in the group
  /// (its result, then settles: completions, leaving buckets, the timer);
  /// nothing if `b` is solo (the caller does it the solo way). `closed` is
  /// what requests failing for a closed bucket get (see settle()).
  template <typename F>
  auto run(bucket_type& b, F&& f) -> std::optional<std::invoke_result_t<F&, std::size_t>> {
    group_batch done;
    std::lock_guard lk(mutex_);
    const std::size_t s = b.slot_;
    if (s == solo) return std::nullopt;
    closed_ec_ = b.closed_ec_;
    std::optional<std::invoke_result_t<F&, std::size_t>> r;
    try {
      r.emplace(f(s));
    } catch (...) {
      settle(done);  // what was granted before the throw is delivered
      throw;
    }
    settle(done);
    return r;
  }

  joint_scheduler& scheduler() noexcept { return *x_; }

  /// What requests failing in this call for a closed bucket get (under the lock).
  void closing(boost::system::error_code ec) noexcept { closed_ec_ = ec; }

  /// Queues `w` (an operation whose cancellation is linked to `owner`,
  /// `parts[0]`'s bucket) for `parts` in the group (joining their buckets),
  /// or completes it at once: granted, or failed (closed, over a capacity).
  /// With a `deadline`, decided in the same lock: false (nothing queued, `w`
  /// untouched) when the grant would come after it. Throws (std::bad_alloc,
  /// or what making the owner's timer throws) with `w` not queued.
  bool submit(std::span<const part_type> parts, waiter_base* w, std::int64_t now,
              std::int64_t deadline = max_time) {
    bucket_type& owner = *parts.front().bucket;
    group_batch done;
    std::lock_guard lk(mutex_);
    {
      std::lock_guard olk(owner.mutex_);
      owner.timer_.make(owner.get_executor());
    }
    try {
      std::vector<joint_part> ps = join_all(parts, now);
      if (deadline != max_time) {
        const auto wait = x_->retry_after(ps, now);
        if (wait && bucket_type::add_ns(now, *wait) > deadline) {
          x_->count_ended(ps, ended_expired);
          settle(done);
          return false;
        }
      }
      x_->reserve_completions(1);
      w->group_owner = &owner;
      w->group_ex = owner.get_executor();
      w->group_id = x_->request(ps, now, w, std::nullopt, &owner, deadline);
      w->queued = x_->is_queued(w->group_id);
    } catch (...) {
      settle(done);  // the buckets joined for nothing leave
      throw;
    }
    settle(done);
    return true;
  }

  /// Refuses (nothing), grants (`granted`, taken now) or fails at once, as
  /// joint_scheduler::try_get; with `wait`, also how long a request made now
  /// would wait (joint_scheduler::retry_after), when not granted.
  std::optional<joint_outcome> try_get(std::span<const part_type> parts, std::int64_t now,
                                       std::optional<std::int64_t>* wait,
                                       boost::system::error_code& closed, bool is_try) {
    group_batch done;
    std::lock_guard lk(mutex_);
    std::optional<joint_outcome> r;
    try {
      std::vector<joint_part> ps = join_all(parts, now);
      r = x_->try_get(ps, now, is_try);
      if (r == joint_outcome::closed) closed = closed_ec_;
      if (wait)
        *wait = r ? (*r == joint_outcome::granted ? std::optional<std::int64_t>(0) : std::nullopt)
                  : x_->retry_after(ps, now);
    } catch (...) {
      settle(done);
      throw;
    }
    settle(done);
    return r;
  }

  /// retry_after() for parts of which some are in the group (joining the others).
  std::optional<std::int64_t> wait_of(std::span<const part_type> parts, std::int64_t now,
                                      boost::system::error_code& ec) {
    group_batch done;
    std::lock_guard lk(mutex_);
    std::optional<std::int64_t> r;
    try {
      std::vector<joint_part> ps = join_all(parts, now);
      r = x_->retry_after(ps, now);
      if (!r) {  // fails at once: why (closed first, as the scheduler decides)
        bool closed = false;
        for (const joint_part& q : ps)
          closed = closed || x_->is_closed(q.bucket);
        ec = closed ? closed_ec_ : boost::system::error_code(error::exceeds_capacity);
      }
    } catch (...) {
      settle(done);
      throw;
    }
    settle(done);
    return r;
  }

  // --- a joint request (parts: distinct buckets the caller keeps alive) ------

  /// Grants `w` at once or fails it at once (posted through the first
  /// part's bucket's executor, never run here), or queues it in the group.
  /// If this throws (what making the timer or the group's bookkeeping
  /// throws, or posting with an executor whose post allocates), `w` was
  /// destroyed and nothing was taken.
  static void start(std::span<const part_type> parts, waiter_base* w) {
    bucket_type& owner = *parts.front().bucket;
    const std::int64_t now = bucket_type::now_ns();
    solo_answer a;
    try {
      lock_all lk(parts);  // (may throw std::bad_alloc before locking anything)
      a = decide_solo(parts, now, true, false, counting::outcome);
      if (!a.decided || !(a.granted || a.ec)) {
        a.decided = false;
      } else {
        owner.posted_ = true;
        w->unlink();  // never queued: nothing to cancel
      }
    } catch (...) {
      owner.unlink_waiter(w);  // (under the lock its cancellation takes)
      w->destroy();
      throw;
    }
    if (!a.decided) {
      try {
        instance().submit(parts, w, now);
      } catch (...) {
        owner.unlink_waiter(w);
        w->destroy();
        throw;
      }
      return;
    }
    w->set_result(a.ec);
    try {
      w->complete(finish_mode::post, owner.get_executor());
    } catch (...) {  // only with executors whose post allocates: `w` was destroyed
      if (a.granted)
        for (const part_type& p : parts)
          p.bucket->return_tokens(p.n);
      throw;
    }
  }

  /// A joint try: granted (taken now), failed at once (`ec` set), or
  /// refused; `wait`, when given, says how long a request made now would
  /// wait (0 when granted; nothing when it fails).
  static bool try_take(std::span<const part_type> parts, std::optional<std::int64_t>* wait,
                       boost::system::error_code& ec, bool is_try = true) {
    const std::int64_t now = bucket_type::now_ns();
    {
      lock_all lk(parts);
      const solo_answer a = decide_solo(parts, now, true, wait != nullptr,
                                        is_try ? counting::try_ : counting::outcome);
      if (a.decided) {
        ec = a.ec;
        if (wait) *wait = a.ec ? std::nullopt : a.wait;
        return a.granted;
      }
    }
    boost::system::error_code closed;
    const auto r = instance().try_get(parts, now, wait, closed, is_try);
    ec = outcome_error(r, closed);
    return r == joint_outcome::granted;
  }

  /// How long a request of `parts` made now would wait; nothing when it
  /// would fail at once (`ec` says why).
  static std::optional<std::int64_t> retry_after(std::span<const part_type> parts,
                                                 boost::system::error_code& ec) {
    const std::int64_t now = bucket_type::now_ns();
    {
      lock_all lk(parts);
      const solo_answer a = decide_solo(parts, now, false, true, counting::none);
      if (a.decided) {
        ec = a.ec;
        return a.ec ? std::nullopt : a.wait;
      }
    }
    return instance().wait_of(parts, now, ec);
  }

  /// Blocks until `parts` are granted together, for at most `timeout` ns
  /// (max_time: no limit): true when granted; false with `ec` clear when the
  /// deadline passed or could not be met (known at once), else false with
  /// `ec` (closed, exceeds_capacity, operation_aborted, would_deadlock,
  /// context_stopped). `before_wait` runs just before the thread blocks
  /// (the caller lets go of the locks it holds around the request).
  template <typename BeforeWait>
  static bool get_blocking(std::span<const part_type> parts, std::int64_t timeout,
                           boost::system::error_code& ec, BeforeWait&& before_wait) {
    ec = {};
    const std::int64_t now = bucket_type::now_ns();
    const std::int64_t deadline =
        timeout == max_time ? max_time : bucket_type::add_ns(now, timeout);
    std::optional<std::int64_t> wait;
    if (try_take(parts, &wait, ec, false)) return true;
    if (ec) return false;
    if (!wait || (deadline != max_time && bucket_type::add_ns(now, *wait) > deadline)) {
      instance().count_each(parts, ended_expired);
      return false;
    }
    ec = blocking_wait_error(parts.front().bucket->get_executor());
    if (ec) {
      instance().count_each(parts, bucket_type::how_ended(ec));
      return false;
    }
    sync_waiter w(0, deadline);
    std::future<boost::system::error_code> result = w.get_future();
    if (!instance().submit(parts, &w, now, deadline)) return false;  // (requests came ahead)
    before_wait();
    if (deadline != max_time) {
      while (result.wait_for(WaitTraits::to_wait_duration(
                 bucket_type::from_ns(deadline) - Clock::now())) != std::future_status::ready) {
        const std::int64_t t = bucket_type::now_ns();
        if (t < deadline) continue;
        // Through its owner: a request of one part may be back in that
        // bucket's own queue (leave()). Withdrawn: nothing was taken.
        bucket_type& owner = *parts.front().bucket;
        ready_list ready(owner.get_executor(), &owner.posted_);
        if (owner.withdraw(&w, ready, true, deadline)) return false;
        break;  // granted in time meanwhile: the result is on its way
      }
    }
    ec = result.get();
    if (ec == boost::asio::error::timed_out) {  // dropped by its own bucket: due too late
      ec = {};
      return false;
    }
    return !ec;
  }

  static boost::system::error_code outcome_error(std::optional<joint_outcome> r,
                                                 boost::system::error_code closed) noexcept {
    if (r == joint_outcome::closed) return closed;
    if (r == joint_outcome::exceeds_capacity) return error::exceeds_capacity;
    if (r == joint_outcome::aborted) return boost::asio::error::operation_aborted;
    if (r == joint_outcome::timed_out) return boost::asio::error::timed_out;
    return {};
  }

  /// Runs after the timer of `b` fired (a group member): grants what is due.
  /// False if `b` is solo by now.
  bool on_timer(bucket_type& b, std::int64_t now) {
    return run(b,
               [&](std::size_t) {
                 x_->serve_due(now);  // (settle() arms b again if it serves more)
                 return true;
               })
        .has_value();
  }

 private:
  joint_group() = default;

  /// A blocking caller's deadline (max_time: none, or not a blocking caller).
  static std::int64_t deadline_of(const waiter_base* w) noexcept {
    return w->timed ? static_cast<const sync_waiter*>(w)->deadline : max_time;
  }

  /// The parts' buckets' locks, taken in address order (so two threads
  /// locking overlapping sets cannot deadlock).
  class lock_all {
   public:
    explicit lock_all(std::span<const part_type> parts) {
      locked_.reserve(parts.size());
      for (const part_type& p : parts)
        locked_.push_back(p.bucket);
      std::sort(locked_.begin(), locked_.end());
      for (bucket_type* b : locked_)
        b->mutex_.lock();
    }
    ~lock_all() {
      for (auto it = locked_.rbegin(); it != locked_.rend(); ++it)
        (*it)->mutex_.unlock();
    }
    lock_all(const lock_all&) = delete;
    lock_all& operator=(const lock_all&) = delete;

   private:
    boost::container::small_vector<bucket_type*, 4> locked_;  // (a few: no allocation)
  };

  /// Counts a request of `parts` that ended as `how` (metrics_counts) on
  /// each bucket, where it is (solo, or in the group), e.g. one known at
  /// once to be granted only after its deadline.
  void count_each(std::span<const part_type> parts, std::size_t how) {
    std::lock_guard lk(mutex_);
    for (const part_type& p : parts) {
      std::lock_guard blk(p.bucket->mutex_);  // (`slot_` changes only under both)
      if (p.bucket->slot_ == solo)
        p.bucket->counts_.ended_as(how);
      else
        x_->count_ended_on(p.bucket->slot_, how);
    }
  }

  /// What decide_solo counts: nothing (a question), how the request ended
  /// when it did (granted, failed), or that and a refusal (a try).
  enum class counting { none, outcome, try_ };

  struct solo_answer {
    bool decided = false;  // false: a bucket is in the group or has a queue (the group decides)
    bool granted = false;
    boost::system::error_code ec;
    std::optional<std::int64_t> wait;  // when refused and asked for
  };

  /// The request decided on solo buckets with nobody queued (under
  /// lock_all): failed at once (closed first, then a part over its
  /// capacity), granted now when every bucket holds its part (with `take`:
  /// taken), else refused, with the wait when asked for: the latest of the
  /// buckets' (each, with nobody queued, keeps its part once it has it).
  static solo_answer decide_solo(std::span<const part_type> parts, std::int64_t now, bool take,
                                 bool want_wait, counting count) {
    solo_answer a;
    for (const part_type& p : parts)
      if (p.bucket->slot_ != solo) return a;
    a.decided = true;
    auto count_ended = [&](std::size_t how) {
      if (count != counting::none)
        for (const part_type& p : parts)
          p.bucket->counts_.ended_as(how);
    };
    for (const part_type& p : parts)
      if (p.bucket->closed_) {
        a.ec = p.bucket->closed_ec_;
        count_ended(bucket_type::how_ended(a.ec));
        return a;
      }
    for (const part_type& p : parts)
      if (p.n > p.bucket->state_.capacity()) {
        a.ec = error::exceeds_capacity;
        count_ended(error::exceeds_capacity);
        return a;
      }
    for (const part_type& p : parts)
      if (!p.bucket->queue_.empty()) {
        a.decided = false;
        return a;
      }
    bool all = true;
    for (const part_type& p : parts) {
      bucket_state s = p.bucket->state_;
      s.refill(now);
      all = all && s.has(p.n);
    }
    if (all) {
      if (take)
        for (const part_type& p : parts) {
          p.bucket->state_.try_take(now, p.n);
          if (count != counting::none) p.bucket->counts_.granted(p.n);
        }
      a.granted = true;
      a.wait = 0;
      return a;
    }
    if (count == counting::try_)
      for (const part_type& p : parts)
        p.bucket->counts_.refused();
    if (want_wait) {
      std::int64_t w = 0;
      for (const part_type& p : parts)
        w = std::max(w, p.bucket->wait_from(now, p.n));
      a.wait = w;
    }
    return a;
  }

  /// The slots of `parts`' buckets, joining those that are solo. Under the lock.
  std::vector<joint_part> join_all(std::span<const part_type> parts, std::int64_t now) {
    std::vector<joint_part> ps;
    ps.reserve(parts.size());
    members_.reserve(members_.size() + parts.size());
    closed_ec_ = error::bucket_closed;
    bool found_closed = false;
    for (const part_type& p : parts) {
      ps.push_back({join(*p.bucket, now), p.n});
      if (!found_closed && x_->is_closed(ps.back().bucket)) {
        found_closed = true;
        closed_ec_ = p.bucket->closed_ec_;
      }
    }
    return ps;
  }

  /// `b`'s slot; a solo bucket joins: its state and its queue (in order, as
  /// made) move here. Under the lock.
  std::size_t join(bucket_type& b, std::int64_t now) {
    std::lock_guard lk(b.mutex_);
    if (b.slot_ != solo) return b.slot_;
    if (count_ == 0) {
      // Nobody here: the group's time starts again from this reading (a
      // clock that is not steady may read earlier than the group last saw).
      x_.emplace(now, false);
      members_.clear();
    }
    x_->reserve_completions(b.queue_.size() + 1);
    const std::size_t s = x_->add_bucket(b.state_, now, b.counts_);
    // Its queue moves in, in order, each request made when it came; if one
    // cannot (std::bad_alloc), those moved go back and the bucket stays solo.
    std::vector<std::uint64_t> moved;
    try {
      moved.reserve(b.queue_.size());
      for (waiter_base* w = b.queue_.front(); w; w = w->next) {
        const joint_part one{s, w->tokens};
        moved.push_back(
            x_->adopt(std::span<const joint_part>(&one, 1), w->queued_at, w, &b, deadline_of(w)));
      }
    } catch (...) {
      for (std::uint64_t id : moved)
        x_->withdraw(id);
      x_->remove_bucket(s);
      throw;
    }
    std::size_t i = 0;
    while (waiter_base* w = b.queue_.front()) {
      b.queue_.erase_keep_link(w);
      w->group_owner = &b;
      w->group_ex = b.get_executor();
      w->group_id = moved[i++];
      w->queued = true;
    }
    if (members_.size() <= s) members_.resize(s + 1, nullptr);  // (reserved: no throw)
    members_[s] = &b;
    ++count_;
    b.slot_ = s;
    b.queued_tokens_ = 0;
    b.tail_.reset();
    b.timer_.disarm();
    if (b.closed_) x_->close(s, now, bucket_type::how_ended(b.closed_ec_));  // (its queue is empty)
    x_->serve_due(now);  // what moved in and is due
    return s;
  }

  /// After every call on the scheduler: its completions go to `done`, the
  /// buckets no joint request names leave (with the single requests queued
  /// on them), and every member's timer is armed for the first due request
  /// it serves.
  void settle(group_batch& done) noexcept {
    for (const joint_completion& c : x_->completions()) {
      auto* w = static_cast<waiter_base*>(c.tag);
      w->queued = false;
      w->unlink();
      boost::system::error_code ec;
      switch (c.how) {
        case joint_outcome::granted:
          break;
        case joint_outcome::exceeds_capacity:
          ec = error::exceeds_capacity;
          break;
        case joint_outcome::closed:
          ec = closed_ec_;
          break;
        case joint_outcome::aborted:
          ec = boost::asio::error::operation_aborted;
          break;
        case joint_outcome::timed_out:  // a blocking caller's T moved past its deadline
          ec = boost::asio::error::timed_out;
          break;
      }
      done.push(w, ec);
    }
    x_->clear_completions();
    for (std::size_t s = 0; s < members_.size(); ++s)
      if (members_[s] && x_->multi_on(s) == 0) leave(s);
    if (count_ == 0) {
      // Empty: the group holds no memory while nobody waits jointly (an
      // empty scheduler and vector allocate nothing).
      x_.emplace(x_->now(), false);
      members_ = std::vector<bucket_type*>();
    }
    arm();
  }

  /// Bucket `s`, which no queued request names with another bucket, goes
  /// back to its own queue: its state, and its single requests in their
  /// order (each named only it: FIFO among them is all the plan said).
  void leave(std::size_t s) noexcept {
    bucket_type& b = *members_[s];
    std::vector<joint_scheduler::released> singles;
    try {
      singles = x_->release_singles(s);
    } catch (...) {  // std::bad_alloc: it stays, and leaves after a later call
      return;
    }
    std::lock_guard lk(b.mutex_);
    b.counts_ = x_->counts(s);
    b.state_ = x_->remove_bucket(s);  // (no request names it now)
    b.slot_ = solo;
    // The group posted its completions: the bucket's timer must not dispatch
    // a grant ahead of one still in the executor's queue (bucket_impl::on_timer).
    b.posted_ = true;
    b.timer_.disarm();
    for (const auto& r : singles) {
      auto* w = static_cast<waiter_base*>(r.tag);
      w->queued_at = r.made_at;
      w->tokens = r.n;        // (a joint request of one part was made with none)
      b.queue_.push_back(w);  // (still `queued`, its cancellation linked to b)
      b.queued_tokens_ += w->tokens;
    }
    b.tail_.reset();
    if (!b.queue_.empty()) {
      try {
        b.arm(std::max(b.state_.ready_at(b.queue_.front()->tokens), b.queue_.front()->queued_at));
      } catch (...) {  // only executors whose post allocates: served by its next call
      }
    }
    members_[s] = nullptr;
    --count_;
  }

  /// Arms each member's timer for the first due request it serves (its
  /// owner's: completions go through its executor), so that every request's
  /// grant needs only its own owner's context to run.
  void arm() noexcept {
    for (bucket_type* b : members_) {
      if (!b) continue;
      std::optional<std::int64_t> at;
      try {
        at = x_->next_due_of(b);
      } catch (...) {  // std::bad_alloc making the plan: every timer retries now
        at = b->timer_.made() ? std::optional<std::int64_t>(x_->now()) : std::nullopt;
      }
      std::lock_guard lk(b->mutex_);
      if (!at) {
        b->timer_.disarm();
        continue;
      }
      try {
        b->timer_.make(b->get_executor());
        b->timer_.arm(*at, *b);
      } catch (...) {  // only executors whose post allocates: a later call re-arms
      }
    }
  }

  std::mutex mutex_;
  // (Re-made in place when the group empties: a scheduler is not movable,
  // its queued requests' nodes being linked into its orders.)
  std::optional<joint_scheduler> x_{std::in_place, std::numeric_limits<std::int64_t>::min(), false};
  std::vector<bucket_type*> members_;  // by slot; null: free
  std::size_t count_ = 0;              // members
  boost::system::error_code closed_ec_ = error::bucket_closed;
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_JOINT_GROUP_HPP
