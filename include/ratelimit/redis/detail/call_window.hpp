//
// ratelimit/redis/detail/call_window.hpp: the script calls a connection's limiters keep out at
// once.
//
// Every bucket and key on one redis_connection takes a slot of the
// connection's window for each script call it keeps in flight (the
// reservation calls, and head-only mode's requests for its head) and gives it
// back with the reply, so at most `redis_config::max_calls_in_flight` of them
// are in the connection's queue and on the server at once, however many keys
// are busy: requests beyond wait in their limiter's own queue, where they
// coalesce and no timeout runs, instead of in the connection's, where every
// request's `request_timeout` runs from the moment it is handed over.
//
// A limiter that finds the window full registers (weakly) and is handed the
// next slot given back: a slot freed while limiters wait is never counted
// free, it goes to the first of them, whose take_slot() is posted to the
// execution context behind the connection's executor, as an operation
// (detail::handler_op) made when it registered, so that handing a slot over
// allocates nothing (io_context and thread_pool, also through strands). With
// an executor the library does not know, that post may throw: the slot is
// passed on and the limiter told (handover_lost), and it registers again at
// its next step. So limiters get slots in the order
// they asked (no barging), and none is forgotten: taking a slot or registering is one step under
// the window's lock, and every slot given back is either counted free or handed on. A slot is a
// move-only value (window_slot) that gives itself back when destroyed, so a call whose reply never
// comes (its handler destroyed with the connection's context), or whose limiter is gone, cannot
// leak one; a registration whose limiter is gone, or no longer needs the
// slot, passes it on.
//
#ifndef RATELIMIT_REDIS_DETAIL_CALL_WINDOW_HPP
#define RATELIMIT_REDIS_DETAIL_CALL_WINDOW_HPP

#include <ratelimit/detail/operation.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>

namespace ratelimit::redis_detail {

class call_window;

/// One slot of a connection's window, owned: given back when destroyed (or
/// by reset()). Empty when default-constructed or moved from.
class window_slot {
 public:
  window_slot() noexcept = default;
  window_slot(window_slot&& o) noexcept : window_(std::move(o.window_)) {}
  window_slot& operator=(window_slot&& o) noexcept {
    if (this != &o) {
      reset();
      window_ = std::move(o.window_);
    }
    return *this;
  }
  window_slot(const window_slot&) = delete;
  window_slot& operator=(const window_slot&) = delete;
  ~window_slot() { reset(); }

  explicit operator bool() const noexcept { return window_ != nullptr; }

  /// Gives the slot back (to the first limiter waiting, if any).
  inline void reset() noexcept;

 private:
  friend class call_window;
  explicit window_slot(std::shared_ptr<call_window> w) noexcept : window_(std::move(w)) {}
  std::shared_ptr<call_window> window_;
};

/// What waits for a slot: a bucket or key machinery.
class window_user {
 public:
  /// Handed a slot the user registered for (posted to the execution context
  /// behind the connection's executor, not to a strand of it; no lock of
  /// ours held). It uses the slot, or lets it go (destroying it passes it
  /// on). What it throws (a handler it completes inline) leaves run().
  virtual void take_slot(window_slot slot) = 0;

  /// The slot the user registered for could not be handed over (an
  /// executor the library does not know, whose post threw): it was passed
  /// on, and the user must register again at its next step. Called from a
  /// destructor, possibly under another user's lock: must only set a flag.
  virtual void handover_lost() noexcept = 0;

 protected:
  ~window_user() = default;
};

class call_window : public std::enable_shared_from_this<call_window> {
 public:
  /// Handovers run on the execution context behind `ex` (an io_context's or
  /// a thread_pool's, also through strands: detail::with_context_executor),
  /// where posting them allocates nothing.
  call_window(std::size_t limit, const boost::asio::any_io_executor& ex)
      : limit_(limit), ex_(context_of(ex)) {}

  call_window(const call_window&) = delete;
  call_window& operator=(const call_window&) = delete;

  ~call_window() {
    for (handover_op* op : waiting_)
      op->destroy();  // (holds no slot)
  }

  /// A slot if one is free; otherwise `user` is registered to be handed the
  /// next one and the result is empty. Throws (std::bad_alloc) with nothing
  /// taken and nobody registered.
  window_slot acquire_or_wait(std::weak_ptr<window_user> user) {
    {
      std::lock_guard lk(mutex_);
      if (out_ < limit_) {
        ++out_;
        return window_slot(this->shared_from_this());
      }
    }
    // The handover is made now, so that handing the slot over allocates
    // nothing (detail::handler_op) and cannot fail with the executors the
    // library completes on without allocating.
    handover_op* op = handover_op::create(handover{std::move(user)}, ex_);
    std::lock_guard lk(mutex_);
    if (out_ < limit_) {         // one came back meanwhile
      op->handler().ran = true;  // (not lost: never needed)
      op->destroy();
      ++out_;
      return window_slot(this->shared_from_this());
    }
    try {
      waiting_.push_back(op);
    } catch (...) {
      op->handler().ran = true;  // (the caller learns it from the exception)
      op->destroy();
      throw;
    }
    ++waits_;
    return {};
  }

  std::size_t limit() const noexcept { return limit_; }

  /// How often a limiter found the window full and waited for a slot.
  std::uint64_t waits() const noexcept {
    std::lock_guard lk(mutex_);
    return waits_;
  }

  /// Slots taken now (in calls, or on their way to a limiter).
  std::size_t out() const noexcept {
    std::lock_guard lk(mutex_);
    return out_;
  }

 private:
  friend class window_slot;

  /// A slot's way to a registered limiter: given to its take_slot() when
  /// run; given back (passed on) with the operation when the limiter is
  /// gone, or when the operation is destroyed unrun.
  struct handover {
    explicit handover(std::weak_ptr<window_user> u) noexcept : user(std::move(u)) {}
    handover(handover&& o) noexcept : user(std::move(o.user)), ran(o.ran) { o.ran = true; }
    handover& operator=(handover&&) = delete;
    ~handover() {
      if (!ran)
        if (auto u = user.lock()) u->handover_lost();
    }
    void operator()(window_slot slot) {
      ran = true;
      if (auto u = user.lock()) u->take_slot(std::move(slot));
    }
    std::weak_ptr<window_user> user;
    bool ran = false;  // (or moved from); unrun: destroyed with its context, or never posted
  };
  using handover_op =
      ratelimit::detail::handler_op<ratelimit::detail::plain_completion<window_slot>, handover>;

  /// A slot given back: handed to the first limiter waiting, or counted
  /// free. Never throws: a handover that cannot be posted (an executor whose
  /// post allocates, out of memory) is destroyed, and its slot passed on.
  void give_back() noexcept {
    handover_op* next = nullptr;
    {
      std::lock_guard lk(mutex_);
      if (waiting_.empty()) {
        --out_;
        return;
      }
      next = waiting_.front();
      waiting_.pop_front();
    }
    std::get<0>(next->result) = window_slot(this->shared_from_this());
    try {
      next->complete(ratelimit::detail::finish_mode::post, ex_);
    } catch (...) {  // destroyed unrun: its slot was given back with it
    }
  }

  static boost::asio::any_io_executor context_of(const boost::asio::any_io_executor& ex) {
    boost::asio::any_io_executor out;
    ratelimit::detail::with_context_executor(
        ex, [&](const auto& e) { out = boost::asio::any_io_executor(e); });
    return out;
  }

  mutable std::mutex mutex_;
  const std::size_t limit_;
  std::size_t out_ = 0;
  std::uint64_t waits_ = 0;
  std::deque<handover_op*> waiting_;
  boost::asio::any_io_executor ex_;
};

inline void window_slot::reset() noexcept {
  if (auto w = std::move(window_)) w->give_back();
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_CALL_WINDOW_HPP
