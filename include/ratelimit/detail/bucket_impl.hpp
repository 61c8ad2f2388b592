//
// ratelimit/detail/bucket_impl.hpp: the machinery behind basic_token_bucket.
//
// The impl queues, times and completes; every token decision is asked of
// bucket_state. Operations are the library's one kind (operation.hpp,
// waiter.hpp), the timer is the one timer_driver, so what is said there about
// completion, allocation and cancellation holds here.
//
// Ownership: the bucket (and a keyed_limiter's node) owns the impl through a
// shared_ptr; a blocking caller co-owns it while it waits. The timer's
// handler and the cancellation handlers hold it weakly and lock it for the
// duration of their work, so a bucket destroyed from inside one of its own
// completion handlers, or while a timer handler is on its way, is safe.
//
// Locking: one spin_mutex guards the state, the queue and the timer. No
// handler runs, nothing is posted and nothing is allocated while it is held
// (except the timer, made once, on the first wait): waiters leaving the queue
// are collected in a ready_list and completed after unlocking.
//
// Metrics: every request is counted where it is decided, under the lock that
// decides it (metrics_counts.hpp): counts_ while solo, the scheduler's while
// in the joint group (it moves there and back with the state).
//
// Exception safety: everything that can throw happens before a request is
// queued or takes tokens (the operation's allocation, the cancellation
// handler, the timer), and a request that throws there leaves no trace.
// After that, completion never throws for the executors the operation's
// reserved memory serves (operation.hpp).
//
#ifndef RATELIMIT_DETAIL_BUCKET_IMPL_HPP
#define RATELIMIT_DETAIL_BUCKET_IMPL_HPP

#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/detail/joint_group.hpp>
#include <ratelimit/detail/metrics_counts.hpp>
#include <ratelimit/detail/operation.hpp>
#include <ratelimit/detail/receipt_target.hpp>
#include <ratelimit/detail/spin_mutex.hpp>
#include <ratelimit/detail/sync_waiter.hpp>
#include <ratelimit/detail/timer_driver.hpp>
#include <ratelimit/detail/waiter.hpp>
#include <ratelimit/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/error.hpp>

#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <ratio>
#include <utility>

namespace ratelimit::detail {

template <typename Clock, typename WaitTraits>
class bucket_impl : public std::enable_shared_from_this<bucket_impl<Clock, WaitTraits>> {
  static_assert(std::ratio_greater_equal_v<typename Clock::period, std::nano>,
                "ratelimit: the clock's tick must be no finer than a nanosecond");

 public:
  using executor_type = boost::asio::any_io_executor;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;

  bucket_impl(const executor_type& ex, std::uint64_t capacity, const rate& r, std::uint64_t initial)
      : state_(check_capacity(capacity), reduce(r), now_ns(), check_initial(initial, capacity)),
        rate_(r),
        executor_(ex) {}

  bucket_impl(const bucket_impl&) = delete;
  bucket_impl& operator=(const bucket_impl&) = delete;

  const executor_type& get_executor() const noexcept { return executor_; }

  // --- time ---------------------------------------------------------------

  static std::int64_t to_ns(time_point t) noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  }
  static std::int64_t now_ns() noexcept { return to_ns(Clock::now()); }
  static time_point from_ns(std::int64_t t) noexcept {
    return timer_driver<Clock, WaitTraits>::to_time_point(t);
  }
  static std::int64_t add_ns(std::int64_t t, std::int64_t d) noexcept {
    if (d <= 0) return t;
    return t > max_time - d ? max_time : t + d;
  }

  /// How a request that ends with `ec` is counted (metrics_counts::ended_as).
  /// (Also for the layers above, which fail requests before a bucket.)
  static std::size_t how_ended(const boost::system::error_code& ec) noexcept {
    if (ec == boost::asio::error::operation_aborted) return ended_cancelled;
    if (ec == boost::asio::error::timed_out) return ended_expired;
    return error_kind_of(ec);
  }

  // --- requests -----------------------------------------------------------

  bool try_get(std::uint64_t n) {
    const std::int64_t now = now_ns();
    return route(
        [&] {
          if (closed_ || n > state_.capacity()) return fails_at_once();
          if (queue_.empty() && state_.try_take(now, n)) {
            counts_.granted(n);
            return true;
          }
          counts_.refused();
          return false;
        },
        [&](std::size_t s) { return sched().try_get(one(s, n), now) == joint_outcome::granted; });
  }

  /// How long (ns) a request for `n` tokens made now would wait before it is
  /// granted: 0 when at once; max_time - now when later than the clock can
  /// say. Nothing when it would fail at once (closed, n > capacity). Serves
  /// the queued requests that are due first, as the timer would.
  std::optional<std::int64_t> retry_after(std::uint64_t n) {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    return route(
        [&]() -> std::optional<std::int64_t> {
          if (closed_ || n > state_.capacity()) return std::nullopt;
          serve(now, ready);
          return wait_from(now, n);
        },
        [&](std::size_t s) { return sched().retry_after(one(s, n), now); });
  }

  /// try_get that, on refusal, says how long a request made now would wait
  /// (as retry_after): serves the due requests first, then takes `n` tokens
  /// if nobody is queued and they are there. `wait` is 0 when granted.
  bool try_get(std::uint64_t n, std::optional<std::int64_t>& wait) {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    wait.reset();
    return route(
        [&] {
          if (closed_ || n > state_.capacity()) return fails_at_once();
          serve(now, ready);
          if (queue_.empty() && state_.try_take(now, n)) {
            counts_.granted(n);
            wait = 0;
            return true;
          }
          counts_.refused();
          wait = wait_from(now, n);
          return false;
        },
        [&](std::size_t s) {
          const auto r = sched().try_get(one(s, n), now);
          if (r == joint_outcome::granted) wait = 0;
          if (!r) wait = sched().retry_after(one(s, n), now);
          return r == joint_outcome::granted;
        });
  }

  /// Starts an asynchronous request for `n` tokens: granted at once, failed
  /// at once (both completing through the handler's executor, never inline),
  /// or queued. Throws, with nothing taken or queued, what allocating the
  /// operation, its cancellation handler or the timer throws.
  template <typename Handler>
  void async_get(Handler&& handler, std::uint64_t n) {
    using op_type = handler_op<waiter_base, std::decay_t<Handler>>;
    op_type* op = op_type::create(std::forward<Handler>(handler), executor_, n);
    try {
      link_cancellation(op->handler(), op, *this);
    } catch (...) {
      op->destroy();
      throw;
    }
    submit(op);
  }

  /// Grants, fails or queues `w`, a waiter not yet seen by anyone else (its
  /// cancellation handler already linked). If this throws, `w` was destroyed
  /// and the request left no trace.
  void submit(waiter_base* w) {
    const std::int64_t now = now_ns();
    const std::uint64_t n = w->tokens;
    boost::system::error_code ec;
    bool settled;  // queued, or left to the group (which completes it)
    try {
      settled = route(
          [&] {
            if (closed_) {
              ec = closed_ec_;
              counts_.ended_as(how_ended(ec));
            } else if (n > state_.capacity()) {
              ec = error::exceeds_capacity;
              counts_.ended_as(error::exceeds_capacity);
            } else if (!(queue_.empty() && state_.try_take(now, n))) {
              enqueue(w, now);  // (leaves no trace if it throws)
              return true;
            } else {
              counts_.granted(n);
            }
            w->unlink();  // never queued: nothing to cancel
            posted_ = true;
            return false;
          },
          [&](std::size_t s) { return submit_grouped(w, s, now); });
    } catch (...) {
      unlink_waiter(w);
      w->destroy();
      throw;
    }
    if (settled) return;
    w->set_result(ec);
    try {
      w->complete(finish_mode::post, executor_);
    } catch (...) {
      // Only with executors whose post allocates: the waiter was destroyed;
      // undo the grant, so that a request that throws takes nothing.
      if (!ec) return_tokens(n);
      throw;
    }
  }

  /// Blocks until `n` tokens are granted, for at most `timeout` ns (from
  /// this call's own reading of the clock; max_time: no limit). Returns true
  /// when granted; false with `ec` clear when the deadline passed, or when
  /// the request could not be granted by then (known at once). Never granted
  /// for tokens due after the deadline.
  bool get_blocking(std::uint64_t n, std::int64_t timeout, boost::system::error_code& ec) {
    ec = {};
    const std::int64_t now = now_ns();
    const std::int64_t deadline = timeout == max_time ? max_time : add_ns(now, timeout);
    bool checked = false;
    std::optional<sync_waiter> w;  // built only when the caller must wait
    std::future<boost::system::error_code> result;
    std::shared_ptr<bucket_impl> self;
    for (;;) {
      ready_list ready(executor_,
                       &posted_);  // grants that fall due meanwhile; finished after unlocking
      std::unique_lock lk(mutex_);
      if (slot_ != group_type::solo) {
        lk.unlock();
        if (!checked) {
          ec = blocking_wait_error(executor_);
          if (ec) return count_ended(how_ended(ec));
          checked = true;
        }
        if (!w) w.emplace(n, deadline);
        if (auto r = group().run(*this, [&](std::size_t s) {
              return block_grouped(*w, s, now, deadline, result, ec);
            })) {
          if (*r != blocked::queued) return *r == blocked::granted;
          self = this->shared_from_this();
          break;
        }
        continue;
      }
      if (closed_) {
        ec = closed_ec_;
        return fails_at_once();
      }
      if (n > state_.capacity()) {
        ec = error::exceeds_capacity;
        return fails_at_once();
      }
      // Due requests first (as the timer would grant them): a head whose
      // tokens are there is no reason to wait.
      serve(now, ready);
      if (queue_.empty() && state_.try_take(now, n)) {
        counts_.granted(n);
        return true;
      }
      // Known at once: the request would be granted after the deadline (the
      // queue served as serve() will serve it: see wait_from).
      if (deadline != max_time && add_ns(now, wait_from(now, n)) > deadline) {
        counts_.ended_as(ended_expired);
        return false;
      }
      if (!checked) {
        // Asked outside the lock (it may consult thread-local state of the
        // context), then everything is decided again.
        lk.unlock();
        ec = blocking_wait_error(executor_);
        if (ec) return count_ended(how_ended(ec));
        checked = true;
        continue;
      }
      timer_.make(executor_);
      if (!w) w.emplace(n, deadline);
      result = w->get_future();  // before the waiter is visible to completers
      // Keeps the impl alive while this thread waits, even if the bucket is
      // destroyed meanwhile (which completes `w` with operation_aborted).
      self = this->shared_from_this();
      enqueue(&*w, now);
      break;
    }
    if (deadline != max_time) {
      while (result.wait_for(WaitTraits::to_wait_duration(from_ns(deadline) - Clock::now())) !=
             std::future_status::ready) {
        if (now_ns() < deadline) continue;
        // Tokens due exactly at the deadline still count: serve first
        // (what was due by the deadline only: this reading is later).
        ready_list ready(executor_, &posted_);
        if (withdraw(&*w, ready, true, deadline)) return false;
        break;  // granted (in time) or timed out meanwhile: the result is on its way
      }
    }
    ec = result.get();
    if (ec == boost::asio::error::timed_out) {  // its deadline passed first: not granted
      ec = {};
      return false;
    }
    return !ec;
  }

  // --- giving back ----------------------------------------------------------

  /// Returns `n` tokens of a grant (a receipt's give_back, or a grant whose
  /// completion could not be handed over): first grants what is due at the
  /// old level, as any call does, then adds them (capped at the capacity),
  /// then grants the waiters they make due, as of now. (Below the capacity
  /// accrual is linear, so adding them as of the state's last time would end
  /// in the same level; serving first keeps every grant's instant honest.)
  void return_tokens(std::uint64_t n) {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    route(
        [&] {
          serve(now, ready);
          state_.give_back(n);
          counts_.gave_back(n);
          tail_.reset();
          serve(now, ready);
          return true;
        },
        [&](std::size_t s) {
          sched().give_back_to(s, n, now);
          return true;
        });
  }

  /// A new bucket, shared (as every bucket is made): `args` as the
  /// constructor's. It keeps a weak_ptr<void> to itself for its receipts:
  /// libstdc++ 12 converts weak_from_this() to a weak_ptr<void> by locking it
  /// (two atomic operations more per receipt, a third of a joint grant's cost).
  template <typename... Args>
  static std::shared_ptr<bucket_impl> make(Args&&... args) {
    auto b = std::make_shared<bucket_impl>(std::forward<Args>(args)...);
    b->self_ = b;
    return b;
  }

  /// Where a receipt of this bucket gives back to (weakly: a receipt that
  /// outlives the bucket gives back to nothing).
  receipt_target receipt_target_of() noexcept {
    return receipt_target{self_, nullptr, [](void* p, std::uint64_t n) {
                            static_cast<bucket_impl*>(p)->return_tokens(n);
                          }};
  }

  // --- cancellation, close ------------------------------------------------

  /// Per-operation cancellation (from a cancel_link): completes the linked
  /// waiter with operation_aborted if it is still queued; otherwise nothing.
  void cancel_linked(cancel_link_base* link) {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    route(
        [&] {
          waiter_base* w = link->waiter.load(std::memory_order_relaxed);
          if (!w || !w->queued) return true;
          const bool was_head = queue_.front() == w;
          dequeue(w);
          counts_.ended_as(ended_cancelled);
          if (was_head) serve(now, ready);  // the waiters behind, as if it had never been
          ready.push_back(w, boost::asio::error::operation_aborted);
          return true;
        },
        [&](std::size_t) {
          waiter_base* w = link->waiter.load(std::memory_order_relaxed);
          if (w && w->queued) sched().cancel(w->group_id, now);
          return true;
        });
  }

  /// The cancellation handler is going away before its waiter left the queue.
  void unlink(cancel_link_base* link) {
    auto cut = [&](auto...) {
      if (waiter_base* w = link->waiter.load(std::memory_order_relaxed)) w->unlink();
      return true;
    };
    route(cut, cut);
  }

  /// Cuts the link between `w` (one of this bucket's requests that was never
  /// queued, about to be destroyed) and its cancellation handler, under the
  /// lock a cancellation takes (this bucket's, or the group's while it is a
  /// member): a cancellation on another thread reads the link's waiter, and
  /// then the waiter, under that lock, so `w` may be destroyed only after
  /// this returns.
  void unlink_waiter(waiter_base* w) noexcept {
    auto cut = [&](auto...) {
      w->unlink();
      return true;
    };
    route(cut, cut);
  }

  /// Completes every queued waiter (for a bucket in a joint group: every
  /// queued request naming it) with operation_aborted; returns how many.
  std::size_t cancel() {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    return route(
        [&] {
          const std::size_t n = queue_.size();
          drain(ready, boost::asio::error::operation_aborted);
          return n;
        },
        [&](std::size_t s) {
          const std::size_t n = sched().queued_on(s);
          sched().cancel_on(s, now);
          return n;
        });
  }

  /// Closes the bucket: queued and later requests complete with `ec`
  /// (bucket_closed; operation_aborted when the bucket is destroyed).
  void close(boost::system::error_code ec) {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    route(
        [&] {
          closed_ = true;
          closed_ec_ = ec;
          drain(ready, ec);
          return true;
        },
        [&](std::size_t s) {
          {
            std::lock_guard lk(mutex_);
            closed_ = true;
            closed_ec_ = ec;
          }
          group().closing(ec);
          sched().close(s, now, how_ended(ec));
          return true;
        });
  }

  bool is_open() const {
    std::lock_guard lk(mutex_);
    return !closed_;
  }

  /// What requests get because the bucket is closed; clear while it is open.
  boost::system::error_code closed_error() const {
    std::lock_guard lk(mutex_);
    return closed_ ? closed_ec_ : boost::system::error_code();
  }

  // --- observers and configuration ----------------------------------------

  std::uint64_t available() {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    return route(
        [&] {
          serve(now, ready);
          return state_.available();
        },
        [&](std::size_t s) { return sched().available(s, now); });
  }

  /// What the bucket has counted (metrics_counts.hpp), with the gauges as of
  /// now: the queued requests and available(), after serving the due ones.
  limiter_metrics metrics() {
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    return route(
        [&] {
          serve(now, ready);
          return counts_.snapshot(queue_.size(), state_.available());
        },
        [&](std::size_t s) {
          const std::uint64_t tokens = sched().available(s, now);
          return sched().counts(s).snapshot(sched().queued_on(s), tokens);
        });
  }

  /// The requests queued on this bucket (in a joint group: naming it).
  std::size_t waiting() {
    return route([&] { return queue_.size(); },
                 [&](std::size_t s) { return sched().queued_on(s); });
  }

  std::uint64_t capacity() {
    return route([&] { return state_.capacity(); },
                 [&](std::size_t s) { return sched().capacity(s); });
  }

  /// The time (bucket clock, ns) at which the bucket will hold `capacity()`
  /// tokens again if nothing more is requested: after the queued requests
  /// have been served. Now (or earlier) when it is full and nobody waits.
  /// Used by keyed_limiter to find buckets it may evict: with the clock
  /// reading `now` its decision is made against (a fresh reading would be
  /// later, and a full bucket's answer is the latest time it has seen).
  std::int64_t full_at() { return full_at(now_ns()); }
  std::int64_t full_at(std::int64_t now) {
    ready_list ready(executor_, &posted_);
    return route(
        [&] {
          serve(now, ready);
          return state_.ready_at(queued_tokens_ + state_.capacity());
        },
        [&](std::size_t s) {
          // In a joint group the grants' times depend on other buckets: this
          // is when it would be full if they were all granted now (no later
          // than it will be); it leaves the group when nobody waits on it.
          sched().serve_due(now);
          return sched().state(s).ready_at(sched().queued_tokens_on(s) + sched().capacity(s));
        });
  }

  ratelimit::rate get_rate() const {
    std::lock_guard lk(mutex_);
    return rate_;
  }

  void set_rate(const ratelimit::rate& r) {
    const reduced_rate reduced = reduce(r);
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    route(
        [&] {
          serve(now, ready);  // what fell due at the old rate
          state_.set_rate(reduced);
          tail_.reset();
          rate_ = r;
          serve(now, ready);  // reschedule at the new one
          return true;
        },
        [&](std::size_t s) {
          sched().set_rate(s, r, now);
          std::lock_guard lk(mutex_);
          rate_ = r;
          return true;
        });
  }

  void set_capacity(std::uint64_t capacity, bool full_stays_full = false) {
    check_capacity(capacity);
    const std::int64_t now = now_ns();
    ready_list ready(executor_, &posted_);
    route(
        [&] {
          serve(now, ready);  // what fell due with the old capacity
          state_.set_capacity(capacity, full_stays_full);
          tail_.reset();
          for (waiter_base* w = queue_.front(); w;) {
            waiter_base* next = w->next;
            if (w->tokens > capacity) {
              dequeue(w);
              counts_.ended_as(error::exceeds_capacity);
              ready.push_back(w, error::exceeds_capacity);
            }
            w = next;
          }
          serve(now, ready);
          return true;
        },
        [&](std::size_t s) {
          sched().set_capacity(s, capacity, now, full_stays_full);
          return true;
        });
  }

  /// The timer's wait finished (timer_driver's handler).
  ///
  /// The grants are dispatched (run here, when the handler's executor
  /// allows) unless a completion was posted since the timer last ran: that
  /// one may still be in the executor's queue behind this handler, and
  /// dispatching would deliver these grants before it, out of the order in
  /// which they were handed over (a waiter aborted, then the waiters behind
  /// it granted; an immediate grant, then the queued requests made after it).
  /// Posting puts them behind it.
  void on_timer() {
    ready_list ready(executor_, nullptr);  // finished below, in the mode chosen
    finish_mode mode;
    const std::int64_t now = now_ns();
    {
      std::unique_lock lk(mutex_);
      if (!timer_.on_wait(now, *this)) return;
      while (slot_ != group_type::solo) {
        lk.unlock();
        if (group().on_timer(*this, now)) return;
        lk.lock();  // solo again meanwhile: serves its own queue
      }
      mode = std::exchange(posted_, false) ? finish_mode::post : finish_mode::dispatch;
      serve(now, ready);
    }
    ready.finish_all(mode);
  }

 private:
  static std::uint64_t check_initial(std::uint64_t initial, std::uint64_t capacity) {
    if (initial > capacity)
      throw std::invalid_argument("ratelimit: initial tokens (" + std::to_string(initial) +
                                  ") exceed the capacity (" + std::to_string(capacity) + ")");
    return initial;
  }

  /// Counts a request failing at once on a solo bucket
  /// (closed, or over the capacity; under the lock); returns false.
  bool fails_at_once() noexcept {
    counts_.ended_as(closed_ ? how_ended(closed_ec_) : std::size_t{error::exceeds_capacity});
    return false;
  }

  /// Counts a request that ended as `how` outside the lock
  /// that decides it (e.g. for want of a thread to block); returns false.
  bool count_ended(std::size_t how) {
    route(
        [&] {
          counts_.ended_as(how);
          return true;
        },
        [&](std::size_t s) {
          sched().count_ended_on(s, how);
          return true;
        });
    return false;
  }

  /// Takes `w` out of the queue other than by granting it as the head.
  void dequeue(waiter_base* w) noexcept {
    queue_.erase(w);
    queued_tokens_ -= w->tokens;
    tail_.reset();
  }

  /// Takes the head out of the queue as serve() grants it: the state moved
  /// exactly as tail_'s fold moved for it, so tail_ stays valid.
  void pop_granted(waiter_base* w) noexcept {
    queue_.erase(w);
    queued_tokens_ -= w->tokens;
  }

  /// Queues `w`, which arrived at `now`; the caller holds the lock. Throws
  /// (with `w` not queued) only what making the timer, or its first wait, throws.
  void enqueue(waiter_base* w, std::int64_t now) {
    timer_.make(executor_);
    const bool was_empty = queue_.empty();
    if (was_empty) state_.refill(now);
    w->queued_at = now;
    queue_.push_back(w);
    queued_tokens_ += w->tokens;
    if (was_empty) tail_.emplace(tail{state_, std::numeric_limits<std::int64_t>::min(), false});
    if (tail_) tail_->fold(*w);
    if (was_empty) {
      try {
        arm(state_.ready_at(w->tokens));
      } catch (...) {
        dequeue(w);
        throw;
      }
    }
  }

  /// The wait of a request for `n` tokens made at `now`, after serve(now):
  /// the queued requests are served, in order, on a copy of the state as
  /// serve() would serve them (each when its tokens are there, not before it
  /// came), and then this one. (Not simply the time
  /// `queued_tokens_ + n` tokens accrue: at a grant's whole nanosecond the
  /// level may pass the capacity, and what passes it is lost.)
  ///
  /// The queue's part is kept in tail_ (the fold over the queued requests),
  /// extended by enqueue(), kept by serve()'s grants (which move the state as
  /// the fold did) and dropped by anything else that changes the queue or the
  /// state; so in a steady state this is O(1). It does not depend on `now`:
  /// after serve(now) the head is due after `now` (or the time has saturated).
  std::int64_t wait_from(std::int64_t now, std::uint64_t n) const noexcept {
    std::int64_t t = now;
    bucket_state s = state_;
    if (queue_.empty()) {
      s.refill(now);
      // Granted at once when nobody is queued and the tokens are there (even
      // if the clock reads earlier than the latest time the state has seen).
      if (s.has(n)) return 0;
    } else {
      if (!tail_) {
        tail_.emplace(tail{state_, std::numeric_limits<std::int64_t>::min(), false});
        for (const waiter_base* w = queue_.front(); w; w = w->next)
          tail_->fold(*w);
      }
      s = tail_->s;
      t = std::max(tail_->t, now);
    }
    if (t != max_time) t = std::max(s.ready_at(n), t);
    if (t <= now) return 0;
    // In unsigned arithmetic: before the clock's epoch (now < 0) the wait may
    // exceed max_time, and saturates there.
    const std::uint64_t d = static_cast<std::uint64_t>(t) - static_cast<std::uint64_t>(now);
    return d > static_cast<std::uint64_t>(max_time) ? max_time : static_cast<std::int64_t>(d);
  }

  /// Brings the bucket to `now`. Every head waiter whose tokens accrued by
  /// then is granted *as of the moment they did* (or it arrived, if later),
  /// as a punctual timer would have; so a timer that fires late, or an event
  /// loop that was busy, costs the waiters no tokens. Then times the next.
  ///
  /// A blocked caller at the head whose tokens would come only after its
  /// deadline (a set_rate made them later) leaves the queue at once instead
  /// (timed_out: its thread returns false, as for a wait known at once to be
  /// too long), and the waiters behind are served as if it had never been;
  /// as the queue's fold counts it (tail::fold). It is never granted late,
  /// and never holds back the waiters behind until its thread wakes.
  void serve(std::int64_t now, ready_list& ready) {
    while (waiter_base* w = queue_.front()) {
      const std::int64_t at = std::max(state_.ready_at(w->tokens), w->queued_at);
      if (w->timed && at > static_cast<sync_waiter*>(w)->deadline) {
        dequeue(w);
        counts_.ended_as(ended_expired);
        ready.push_back(w, boost::asio::error::timed_out);
        continue;
      }
      if (at > now) break;
      state_.refill(at);
      if (!state_.has(w->tokens)) break;  // only at the saturated end of time
      state_.take(w->tokens);
      counts_.granted(w->tokens, w->queued_at, at);
      pop_granted(w);
      ready.push_back(w, {});
    }
    state_.refill(now);
    if (queue_.empty())
      timer_.disarm();
    else  // when serve() will grant it (not before it came: else the timer spins)
      arm(std::max(state_.ready_at(queue_.front()->tokens), queue_.front()->queued_at));
  }

  void drain(ready_list& ready, boost::system::error_code ec) {
    counts_.ended_as(how_ended(ec), queue_.size());
    ready.take_all(queue_, ec);
    queued_tokens_ = 0;
    tail_.reset();
    timer_.disarm();
  }

  /// Takes `w` out of the queue if it is still there, serving the waiters
  /// behind it as if it had never been; returns false if it had left. With
  /// `serve_first`, grants whatever was due by `until` (at most now) before
  /// deciding.
  bool withdraw(waiter_base* w, ready_list& ready, bool serve_first = false,
                std::int64_t until = max_time) {
    const std::int64_t now = now_ns();
    for (;;) {
      {
        std::lock_guard lk(mutex_);
        if (slot_ == group_type::solo) {
          if (serve_first && !queue_.empty()) serve(std::min(now, until), ready);
          if (!w->queued) return false;
          const bool was_head = queue_.front() == w;
          dequeue(w);
          counts_.ended_as(ended_expired);
          if (was_head) serve(now, ready);
          return true;
        }
      }
      // In a joint group (it moved there with the bucket's queue, or the
      // bucket joined later): the group withdraws it, and completes it.
      if (auto r = group().run(*this, [&](std::size_t) {
            return w->queued &&
                   sched().cancel_at(w->group_id, serve_first ? std::min(now, until) : now, now);
          }))
        return *r;
    }
  }

  // --- joint groups (joint_group.hpp) ----------------------------------------

  friend class joint_group<Clock, WaitTraits>;
  using group_type = joint_group<Clock, WaitTraits>;

  static group_type& group() noexcept { return group_type::instance(); }
  static joint_scheduler& sched() noexcept { return group().scheduler(); }
  static std::array<joint_part, 1> one(std::size_t s, std::uint64_t n) noexcept {
    return {joint_part{s, n}};
  }

  /// Runs `solo()` under this bucket's lock when it is solo, else
  /// `grouped(slot)` under the group's lock (then the group settles); the
  /// result of the one that ran.
  template <typename Solo, typename Grouped>
  auto route(Solo&& solo, Grouped&& grouped) {
    for (;;) {
      {
        std::lock_guard lk(mutex_);
        if (slot_ == group_type::solo) return solo();
      }
      if (auto r = group().run(*this, grouped)) return *r;
    }
  }

  /// submit() for a bucket in a joint group (under its lock): `w` is
  /// queued there, or completes (in the group's settle) at once.
  bool submit_grouped(waiter_base* w, std::size_t s, std::int64_t now) {
    {
      std::lock_guard lk(mutex_);
      timer_.make(executor_);
    }
    sched().reserve_completions(1);
    w->group_owner = this;
    w->group_ex = executor_;
    // A blocked caller's deadline is the group's too (as when the group
    // adopts it from our queue): it fails as soon as its T passes it.
    const std::int64_t deadline = w->timed ? static_cast<sync_waiter*>(w)->deadline : max_time;
    w->group_id = sched().request(one(s, w->tokens), now, w, std::nullopt, this, deadline);
    w->queued = sched().is_queued(w->group_id);
    return true;
  }

  enum class blocked { granted, failed, queued };

  /// get_blocking() for a bucket in a joint group (under its lock).
  blocked block_grouped(sync_waiter& w, std::size_t s, std::int64_t now, std::int64_t deadline,
                        std::future<boost::system::error_code>& result,
                        boost::system::error_code& ec) {
    const auto r = sched().try_get(one(s, w.tokens), now, false);
    if (r == joint_outcome::granted) return blocked::granted;
    if (r == joint_outcome::closed) {
      std::lock_guard lk(mutex_);
      ec = closed_ec_;
      return blocked::failed;
    }
    if (r == joint_outcome::exceeds_capacity) {
      ec = error::exceeds_capacity;
      return blocked::failed;
    }
    if (deadline != max_time) {
      const auto wait = sched().retry_after(one(s, w.tokens), now);
      if (!wait || add_ns(now, *wait) > deadline) {
        sched().count_ended_on(s, ended_expired);
        return blocked::failed;
      }
    }
    result = w.get_future();
    submit_grouped(&w, s, now);
    return blocked::queued;
  }

  void arm(std::int64_t at) {
    // At the end of representable time, with the first waiter's tokens not
    // there (ready_at saturated), no timer can help: it would fire at once,
    // again and again. The waiter waits for a reschedule (set_rate,
    // set_capacity, cancel) or the end. (With the tokens there, the timer
    // must fire: the clock may read earlier than the latest time seen.)
    if (at == max_time && state_.last() == max_time && !state_.has(queue_.front()->tokens))
      return timer_.disarm();
    timer_.arm(at, *this);
  }

  /// The state after every queued request has been granted as serve() will
  /// grant it, and when the last of them is (see wait_from).
  struct tail {
    bucket_state s;
    std::int64_t t;
    bool stopped;  // at the saturated end of time: no later request changes it

    /// One more queued request, granted when its tokens are there, not
    /// before it came nor before the one ahead (as serve() grants it).
    void fold(const waiter_base& w) noexcept {
      if (stopped) return;
      const std::int64_t at = std::max({s.ready_at(w.tokens), w.queued_at, t});
      // A blocked caller due only after its deadline is never granted: it
      // leaves the queue as if it had never been (serve()).
      if (w.timed && at > static_cast<const sync_waiter&>(w).deadline) return;
      t = at;
      if (t == max_time) {
        stopped = true;
        return;
      }
      s.refill(t);
      if (!s.has(w.tokens)) {  // only at the saturated end of time
        stopped = true;
        return;
      }
      s.take(w.tokens);
    }
  };

  // What a try or a grant at once touches comes first, together (the lock,
  // where the bucket is, the state, the queue's head, the hot counters):
  // two threads trying the same bucket bounce as few cache lines as can be.
  mutable spin_mutex mutex_;
  bool closed_ = false;
  bool posted_ = false;                  // a completion was posted since on_timer() last ran
  std::size_t slot_ = group_type::solo;  // in the joint group: its number there
  bucket_state state_;
  waiter_queue queue_;
  metrics_counts counts_;             // while solo (in the group: the scheduler's)
  mutable std::optional<tail> tail_;  // when valid (see wait_from)
  ratelimit::rate rate_;
  uint128 queued_tokens_ = 0;  // sum of the queued requests
  executor_type executor_;
  timer_driver<Clock, WaitTraits> timer_;
  boost::system::error_code closed_ec_;  // what requests get once closed
  std::weak_ptr<void> self_;             // set by make(), for receipts
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_BUCKET_IMPL_HPP
