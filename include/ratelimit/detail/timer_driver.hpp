//
// ratelimit/detail/timer_driver.hpp: the one timer of a limiter, and when it fires.
//
// A limiter wants to be woken at one instant at a time (when its first
// waiter's tokens are due), or not at all. The driver turns that into waits
// on a single timer:
// - the timer is made on the first wait, not before: a timer gives the
//   context a reactor, which every later handler of the context pays for;
// - at most one wait is outstanding at any time. A wake wanted later than
//   the outstanding wait lets that wait fire and waits again; one wanted
//   earlier cancels it, and the cancelled wait's handler starts the new one.
//   So the wait's memory, reserved here, is reused for every wait, and a
//   wait that the reactor cannot queue (its heap of waits must grow: see
//   start()) is replaced by a posted retry from the same memory: re-arming
//   never fails (which is what lets cancellation, close() and the timer's
//   own handler re-arm without a failure path);
// - a limiter nobody waits on has no outstanding wait: it holds no work and
//   runs no handler (disarm() cancels the wait).
//
// Locking: the driver is guarded by its owner's lock. The wait's handler
// holds the owner weakly (Owner derives from enable_shared_from_this) and
// calls `Owner::on_timer()`, which takes the lock
// and asks on_wait() whether the wanted instant has come.
//
#ifndef RATELIMIT_DETAIL_TIMER_DRIVER_HPP
#define RATELIMIT_DETAIL_TIMER_DRIVER_HPP

#include <ratelimit/detail/operation.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/post.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>

namespace ratelimit::detail {

/// A wait of `ns` nanoseconds (>= 0) as a `Duration`, rounded up to its tick;
/// Duration::max() when it does not fit (never wraps). The one conversion of
/// every "how long" answer the limiters give (retry_after and the tries that
/// report it).
template <typename Duration>
Duration to_duration(std::int64_t ns) noexcept {
  using wide = std::chrono::duration<long double, std::nano>;
  if (wide(ns) >= wide(Duration::max())) return Duration::max();
  return std::chrono::ceil<Duration>(std::chrono::nanoseconds(ns));
}

/// A caller's timeout in nanoseconds, rounded up, 0 when not positive, and
/// saturated at INT64_MAX (max_time; computed in long double first:
/// hours::max() must saturate, not overflow). The one conversion of every
/// timeout the limiters take.
template <typename Rep, typename Period>
std::int64_t saturating_ns(std::chrono::duration<Rep, Period> timeout) noexcept {
  constexpr std::int64_t most = std::numeric_limits<std::int64_t>::max();
  const long double ns = std::chrono::duration<long double, std::nano>(timeout).count();
  if (!(ns > 0)) return 0;
  if (ns >= static_cast<long double>(most)) return most;
  return static_cast<std::int64_t>(std::ceil(ns));
}

template <typename Clock, typename WaitTraits>
class timer_driver {
 public:
  using timer_type =
      boost::asio::basic_waitable_timer<Clock, WaitTraits, boost::asio::any_io_executor>;

  timer_driver() = default;
  timer_driver(const timer_driver&) = delete;
  timer_driver& operator=(const timer_driver&) = delete;

  /// Makes the timer if it is not made yet. Throws what making a timer
  /// throws (std::bad_alloc; system_error when the reactor cannot be made,
  /// e.g. EMFILE), with nothing changed.
  void make(const boost::asio::any_io_executor& ex) {
    if (timer_) return;
    auto memory = std::make_shared<memory_type>();
    timer_.emplace(ex);
    memory_ = std::move(memory);
  }
  bool made() const noexcept { return timer_.has_value(); }

  /// Wants a wake at `at` (ns on Clock), replacing any earlier wish. Needs
  /// make(). Never throws for the executors with_context_executor knows (see
  /// start()); with others it may throw std::bad_alloc, leaving the driver
  /// unarmed.
  template <typename Owner>
  void arm(std::int64_t at, Owner& owner) {
    want_ = true;
    want_at_ = at;
    if (!outstanding_) return start(owner);
    if (cancelled_ || pending_at_ <= at) return;  // the wait's handler re-waits for want_at_
    cancel();
  }

  /// Wants no wake: cancels the outstanding wait, so the limiter holds no work.
  void disarm() noexcept {
    want_ = false;
    if (outstanding_ && !cancelled_) cancel();
  }

  bool armed() const noexcept { return want_; }

  /// The outstanding wait finished (fired or cancelled) at `now`: true when
  /// the wanted instant has come and the owner must serve (it then calls
  /// arm() or disarm()); otherwise waits again for it, if still wanted.
  template <typename Owner>
  bool on_wait(std::int64_t now, Owner& owner) {
    outstanding_ = false;
    cancelled_ = false;
    if (!want_) return false;
    if (now >= want_at_) {
      want_ = false;
      return true;
    }
    start(owner);
    return false;
  }

  /// `ns` (after the clock's epoch) as a time_point of Clock, rounded up to
  /// its tick; saturated at the ends of a clock whose duration cannot hold it
  /// (a narrow one: int32 milliseconds end after 24.8 days), so that a wait
  /// beyond them waits for the end instead of wrapping to the past (a timer
  /// that fires at once, over and over).
  static typename Clock::time_point to_time_point(std::int64_t ns) noexcept {
    using duration = typename Clock::duration;
    if constexpr (std::is_same_v<duration, std::chrono::nanoseconds>)
      return typename Clock::time_point(duration(ns));  // every value fits
    using wide = std::chrono::duration<long double, std::nano>;
    if (wide(std::chrono::nanoseconds(ns)) > wide(duration::max()) - wide(duration(1)))
      return Clock::time_point::max();
    if (wide(std::chrono::nanoseconds(ns)) < wide(duration::min()) + wide(duration(1)))
      return Clock::time_point::min();
    return typename Clock::time_point(std::chrono::ceil<duration>(std::chrono::nanoseconds(ns)));
  }

 private:
  /// Asio 1.26's wait operation around our handler (a weak pointer, a
  /// pointer, and this allocator) on an any_io_executor: 152 bytes.
  using memory_type = upcall_memory<192>;

  template <typename Owner>
  class wait_handler {
   public:
    using allocator_type = upcall_allocator<void, std::allocator<void>, memory_type::size>;

    wait_handler(std::weak_ptr<Owner> owner, std::shared_ptr<memory_type> memory) noexcept
        : owner_(std::move(owner)), block_(memory.get()), memory_(std::move(memory)) {}

    allocator_type get_allocator() const noexcept {
      return allocator_type(block_, std::allocator<void>());
    }

    void operator()(const boost::system::error_code&) {
      if (auto p = owner_.lock()) p->on_timer();
    }
    void operator()() {  // posted instead of a wait that could not be queued
      if (auto p = owner_.lock()) p->on_timer();
    }

   private:
    std::weak_ptr<Owner> owner_;
    // The block, also in a handler moved from: when async_wait throws (the
    // reactor's heap of waits could not grow), Asio frees the operation it
    // had made through the allocator of the handler it was given, which has
    // been moved into the operation by then. With the shared_ptr alone that
    // allocator named no block, and the operation's memory, inside the
    // block, went to std::allocator: free() of a pointer it never gave.
    memory_type* block_;
    // Co-owned: a wait cancelled when its owner is destroyed completes later,
    // in this memory, after the owner (and the driver) are gone.
    std::shared_ptr<memory_type> memory_;
  };

  /// Starts the wait. A wait is not always queued without allocating: the
  /// reactor keeps the waits of every timer of the context (of this clock)
  /// in one heap, a vector that grows when more of them wait at once than
  /// ever before. So a re-arm in the timer's own handler, after another
  /// timer took the place this one's last wait left, may have to grow it.
  /// When that throws, the handler is posted instead, through the reserved
  /// memory (the failed wait gave it back): it runs on_timer() soon, which
  /// finds the instant not come and starts the wait again. Under lasting
  /// memory exhaustion that is a retry loop; never a lost wake, never an
  /// exception out of a handler, and arm() never throws (a request that
  /// queued while the first wait failed still gets its wake).
  template <typename Owner>
  void start(Owner& owner) {
    timer_->expires_at(to_time_point(want_at_));  // no wait is outstanding: cancels nothing
    try {
      timer_->async_wait(wait_handler<Owner>(owner.weak_from_this(), memory_));
    } catch (...) {
      // Throws only with executors with_context_executor does not know.
      with_context_executor(timer_->get_executor(), [&](const auto& ex) {
        boost::asio::post(ex, wait_handler<Owner>(owner.weak_from_this(), memory_));
      });
    }
    outstanding_ = true;
    pending_at_ = want_at_;
  }

  void cancel() noexcept {
    cancelled_ = true;
    timer_->cancel();
  }

  std::optional<timer_type> timer_;
  bool outstanding_ = false;  // an async_wait has not completed yet
  bool cancelled_ = false;    // ... and it was cancelled
  bool want_ = false;         // a wake is wanted at want_at_
  std::int64_t want_at_ = 0;
  std::int64_t pending_at_ = 0;          // the outstanding wait's expiry
  std::shared_ptr<memory_type> memory_;  // for the wait operation; made with the timer
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_TIMER_DRIVER_HPP
