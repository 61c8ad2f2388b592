//
// ratelimit/detail/bucket_impl.hpp: the machinery behind basic_token_bucket.
//
// The impl queues, times and completes; every token decision is asked of
// bucket_state. It is owned by the bucket through a shared_ptr; the timer
// handler and the cancellation functors hold only weak_ptrs, and lock them for
// the duration of their work, so a bucket destroyed from inside one of its own
// completion handlers, or while a timer handler is on its way, is safe.
//
// Locking: one spin_mutex guards the state, the queue and the timer. No
// handler runs, and nothing is posted, while it is held: waiters leaving the
// queue are collected in a ready_list and finished after unlocking.
//
#ifndef RATELIMIT_DETAIL_BUCKET_IMPL_HPP
#define RATELIMIT_DETAIL_BUCKET_IMPL_HPP

#include <ratelimit/detail/async_waiter.hpp>
#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/detail/spin_mutex.hpp>
#include <ratelimit/detail/sync_waiter.hpp>
#include <ratelimit/detail/waiter_queue.hpp>
#include <ratelimit/error.hpp>

#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/detail/bind_handler.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <ratio>

namespace ratelimit::detail {

template <typename Clock, typename WaitTraits, typename Executor>
class bucket_impl : public std::enable_shared_from_this<bucket_impl<Clock, WaitTraits, Executor>> {
  static_assert(std::ratio_greater_equal_v<typename Clock::period, std::nano>,
                "ratelimit: the clock's tick must be no finer than a nanosecond");

 public:
  using executor_type = Executor;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using timer_type = boost::asio::basic_waitable_timer<Clock, WaitTraits, Executor>;

  bucket_impl(const Executor& ex, std::uint64_t capacity, const rate& r, std::uint64_t initial)
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
    return time_point(std::chrono::ceil<typename Clock::duration>(std::chrono::nanoseconds(t)));
  }
  static std::int64_t add_ns(std::int64_t t, std::int64_t d) noexcept {
    if (d <= 0) return t;
    return t > max_time - d ? max_time : t + d;
  }

  // --- requests -----------------------------------------------------------

  bool try_get(std::uint64_t n) {
    const std::int64_t now = now_ns();
    std::lock_guard lk(mutex_);
    if (closed_ || !queue_.empty() || n > state_.capacity()) return false;
    return state_.try_take(now, n);
  }

  /// Starts an asynchronous request: grants it at once (completing through
  /// the handler's executor, never inline), fails it at once, or queues it.
  template <typename Handler>
  void async_get(Handler&& handler, std::uint64_t n) {
    const std::int64_t now = now_ns();
    boost::system::error_code ec;
    {
      std::unique_lock lk(mutex_);
      if (closed_) {
        ec = error::bucket_closed;
      } else if (n > state_.capacity()) {
        ec = error::exceeds_capacity;
      } else if (!(queue_.empty() && state_.try_take(now, n))) {
        using waiter = async_waiter<std::decay_t<Handler>, Executor, bucket_impl>;
        enqueue(waiter::create(std::forward<Handler>(handler), executor_, n, this), now);
        return;
      }
    }
    post_result(std::forward<Handler>(handler), ec);
  }

  /// Blocks until `n` tokens are granted or `deadline` (bucket clock) passes.
  /// Returns true when granted; false with `ec` clear when the deadline
  /// passed, or when the request could not be granted by then (known at once).
  bool get_blocking(std::uint64_t n, std::int64_t deadline, boost::system::error_code& ec) {
    ec = {};
    const std::int64_t now = now_ns();
    bool may_block_here = true;
    std::optional<sync_waiter> w;  // built only when the caller must wait
    std::future<boost::system::error_code> result;
    std::shared_ptr<bucket_impl> self;
    for (;;) {
      ready_list ready;  // grants that fall due meanwhile; finished after unlocking
      std::unique_lock lk(mutex_);
      if (closed_) {
        ec = error::bucket_closed;
        return false;
      }
      if (n > state_.capacity()) {
        ec = error::exceeds_capacity;
        return false;
      }
      if (queue_.empty() && state_.try_take(now, n)) return true;
      serve(now, ready);
      if (state_.ready_at(queued_tokens_ + n) > deadline) return false;
      if (may_block_here) {
        // Checked outside the lock (it may consult thread-local state of the
        // context), then everything is decided again.
        lk.unlock();
        if (context_runs_in_this_thread(executor_)) {
          ec = error::would_deadlock;
          return false;
        }
        may_block_here = false;
        continue;
      }
      w.emplace(n);
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
        // Tokens due exactly at the deadline still count: serve first.
        ready_list ready;
        if (withdraw(&*w, ready, true)) return false;
        break;  // granted meanwhile: the result is on its way
      }
    }
    ec = result.get();
    return !ec;
  }

  // --- cancellation, close ------------------------------------------------

  /// Removes a waiter still in the queue and completes it with
  /// operation_aborted; does nothing for one that has already left it.
  void cancel_waiter(waiter_base* w) {
    ready_list ready;
    if (!withdraw(w, ready)) return;
    ready.push_back(w, boost::asio::error::operation_aborted);
    // `ready` finishes everything (posting) as it goes out of scope.
  }

  /// Completes every queued waiter with operation_aborted; returns how many.
  std::size_t cancel() {
    ready_list ready;
    std::lock_guard lk(mutex_);
    const std::size_t n = queue_.size();
    drain(ready, boost::asio::error::operation_aborted);
    return n;
  }

  /// Closes the bucket: queued and later requests complete with `ec`.
  void close(boost::system::error_code ec) {
    ready_list ready;
    std::lock_guard lk(mutex_);
    closed_ = true;
    drain(ready, ec);
  }

  bool is_open() const {
    std::lock_guard lk(mutex_);
    return !closed_;
  }

  // --- observers and configuration ----------------------------------------

  std::uint64_t available() {
    const std::int64_t now = now_ns();
    ready_list ready;
    std::lock_guard lk(mutex_);
    serve(now, ready);
    return state_.available();
  }

  std::size_t waiting() const {
    std::lock_guard lk(mutex_);
    return queue_.size();
  }

  std::uint64_t capacity() const {
    std::lock_guard lk(mutex_);
    return state_.capacity();
  }

  /// The time (bucket clock, ns) at which the bucket will hold `capacity()`
  /// tokens again if nothing more is requested: after the queued requests
  /// have been served. Now (or earlier) when it is full and nobody waits.
  /// Used by keyed_limiter to find buckets it may evict.
  std::int64_t full_at() {
    const std::int64_t now = now_ns();
    ready_list ready;
    std::lock_guard lk(mutex_);
    serve(now, ready);
    return state_.ready_at(queued_tokens_ + state_.capacity());
  }

  ratelimit::rate get_rate() const {
    std::lock_guard lk(mutex_);
    return rate_;
  }

  void set_rate(const ratelimit::rate& r) {
    const reduced_rate reduced = reduce(r);
    const std::int64_t now = now_ns();
    ready_list ready;
    std::lock_guard lk(mutex_);
    serve(now, ready);  // what fell due at the old rate
    state_.set_rate(reduced);
    rate_ = r;
    serve(now, ready);  // reschedule at the new one
  }

  void set_capacity(std::uint64_t capacity) {
    check_capacity(capacity);
    const std::int64_t now = now_ns();
    ready_list ready;
    std::lock_guard lk(mutex_);
    serve(now, ready);  // what fell due with the old capacity
    state_.set_capacity(capacity);
    for (waiter_base* w = queue_.front(); w;) {
      waiter_base* next = w->next;
      if (w->tokens > capacity) {
        dequeue(w);
        ready.push_back(w, error::exceeds_capacity);
      }
      w = next;
    }
    serve(now, ready);
  }

 private:
  static std::uint64_t check_initial(std::uint64_t initial, std::uint64_t capacity) {
    if (initial > capacity)
      throw std::invalid_argument("ratelimit: initial tokens (" + std::to_string(initial) +
                                  ") exceed the capacity (" + std::to_string(capacity) + ")");
    return initial;
  }

  /// Completes a request that never waited: posted to the bucket's executor,
  /// from where Asio dispatches it to the handler's associated executor.
  template <typename Handler>
  void post_result(Handler&& handler, boost::system::error_code ec) {
    auto bound = boost::asio::detail::bind_handler(std::forward<Handler>(handler), ec);
    if constexpr (std::is_same_v<Executor, boost::asio::any_io_executor>) {
      // The common case, posted without the type-erased call (half the cost).
      if (auto* io = executor_.template target<boost::asio::io_context::executor_type>())
        return boost::asio::post(*io, std::move(bound));
    }
    boost::asio::post(executor_, std::move(bound));
  }

  void dequeue(waiter_base* w) noexcept {
    queue_.erase(w);
    queued_tokens_ -= w->tokens;
  }

  /// Queues `w`, which arrived at `now`; the caller holds the lock.
  void enqueue(waiter_base* w, std::int64_t now) {
    // The timer is made on the first wait, not in the constructor: a timer
    // gives the context a reactor, which every later handler would pay for.
    // Made before queueing, so that a failure leaves nothing queued.
    if (!timer_) timer_.emplace(executor_);
    const bool was_empty = queue_.empty();
    if (was_empty) state_.refill(now);
    w->queued_at = now;
    queue_.push_back(w);
    queued_tokens_ += w->tokens;
    if (was_empty) arm(state_.ready_at(w->tokens));
  }

  /// Brings the bucket to `now`. Every head waiter whose tokens accrued by
  /// then is granted *as of the moment they did* (or it arrived, if later),
  /// as a punctual timer would have; so a timer that fires late, or an event
  /// loop that was busy, costs the waiters no tokens. Then times the next.
  void serve(std::int64_t now, ready_list& ready) {
    while (waiter_base* w = queue_.front()) {
      const std::int64_t at = std::max(state_.ready_at(w->tokens), w->queued_at);
      if (at > now) break;
      state_.refill(at);
      if (!state_.has(w->tokens)) break;  // only at the saturated end of time
      state_.take(w->tokens);
      dequeue(w);
      ready.push_back(w, {});
    }
    state_.refill(now);
    if (queue_.empty())
      disarm();
    else
      arm(state_.ready_at(queue_.front()->tokens));
  }

  void drain(ready_list& ready, boost::system::error_code ec) {
    ready.take_all(queue_, ec);
    queued_tokens_ = 0;
    disarm();
  }

  /// Takes `w` out of the queue if it is still there, serving the waiters
  /// behind it as if it had never been; returns false if it had left. With
  /// `serve_first`, grants whatever is due now before deciding.
  bool withdraw(waiter_base* w, ready_list& ready, bool serve_first = false) {
    const std::int64_t now = now_ns();
    std::lock_guard lk(mutex_);
    if (serve_first && !queue_.empty()) serve(now, ready);
    if (!w->queued) return false;
    const bool was_head = queue_.front() == w;
    dequeue(w);
    if (was_head) serve(now, ready);
    return true;
  }

  void arm(std::int64_t at) {
    // At the end of representable time, with the first waiter's tokens not
    // there (ready_at saturated), no timer can help: it would fire at once,
    // again and again. The waiter waits for a reschedule (set_rate,
    // set_capacity, cancel) or the end. (With the tokens there, the timer
    // must fire: the clock may read earlier than the latest time seen.)
    if (at == max_time && state_.last() == max_time && !state_.has(queue_.front()->tokens))
      return disarm();
    if (armed_ && armed_at_ == at) return;
    armed_ = true;
    armed_at_ = at;
    const std::uint64_t gen = ++timer_gen_;
    timer_->expires_at(from_ns(at));
    timer_->async_wait(
        [weak = this->weak_from_this(), gen](const boost::system::error_code&) {
          if (auto self = weak.lock()) self->on_timer(gen);
        });
  }

  void disarm() {
    if (!armed_) return;
    armed_ = false;
    ++timer_gen_;
    if (timer_) timer_->cancel();
  }

  void on_timer(std::uint64_t gen) {
    ready_list ready;
    {
      const std::int64_t now = now_ns();
      std::lock_guard lk(mutex_);
      if (gen != timer_gen_) return;  // superseded by a later arm() or disarm()
      armed_ = false;
      serve(now, ready);
    }
    ready.finish_all(finish_mode::dispatch);
  }

  mutable spin_mutex mutex_;
  bucket_state state_;
  ratelimit::rate rate_;
  waiter_queue queue_;
  uint128 queued_tokens_ = 0;  // sum of the queued requests
  Executor executor_;
  std::optional<timer_type> timer_;  // made on the first wait
  std::uint64_t timer_gen_ = 0;
  std::int64_t armed_at_ = 0;
  bool armed_ = false;
  bool closed_ = false;
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_BUCKET_IMPL_HPP
