//
// ratelimit/detail/sync_waiter.hpp: a queued blocking caller, and the checks
// that keep a blocking call from waiting forever.
//
#ifndef RATELIMIT_DETAIL_SYNC_WAITER_HPP
#define RATELIMIT_DETAIL_SYNC_WAITER_HPP

#include <ratelimit/detail/waiter.hpp>
#include <ratelimit/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/query.hpp>

#include <future>
#include <limits>
#include <utility>

namespace ratelimit::detail {

/// Lives on the blocked caller's stack. Completion moves the promise out of
/// the waiter before fulfilling it, so the caller, who returns as soon as the
/// future is ready, never frees memory the completer still uses. `Base` is
/// waiter_base or an owner's waiter derived from it (the Redis bucket's
/// reservation), constructible from (fn, n) as waiter_base is.
template <typename Base>
class basic_sync_waiter final : public Base {
 public:
  /// A blocked caller's request for `n` tokens, granted no later than
  /// `deadline` (owner's clock, ns; max_time: none). The owner never grants
  /// it later: once it is at the head with its tokens due only after the
  /// deadline, it leaves the queue with asio::error::timed_out.
  explicit basic_sync_waiter(std::uint64_t n,
                             std::int64_t deadline = std::numeric_limits<std::int64_t>::max())
      : Base(&basic_sync_waiter::do_action, n), deadline(deadline) {
    this->timed = deadline != std::numeric_limits<std::int64_t>::max();
  }

  const std::int64_t deadline;

  std::future<boost::system::error_code> get_future() { return promise_.get_future(); }

 private:
  using action = typename Base::action;

  static void do_action(typename Base::completion_base_type* base, action a,
                        const boost::asio::any_io_executor*) noexcept {
    auto* w = static_cast<basic_sync_waiter*>(static_cast<Base*>(base));
    const boost::system::error_code ec =
        a == action::destroy ? boost::asio::error::operation_aborted : w->error();
    std::promise<boost::system::error_code> p = std::move(w->promise_);
    p.set_value(ec);  // `w` may be gone from here on
  }

  std::promise<boost::system::error_code> promise_;
};

using sync_waiter = basic_sync_waiter<waiter_base>;

/// True when the calling thread runs the execution context behind `ex` (an
/// io_context or a thread_pool, directly or through strands): a blocking
/// wait there could wait for a timer only this thread can fire. False for
/// other executors, which cannot be asked.
inline bool context_runs_in_this_thread(const boost::asio::any_io_executor& ex) {
  bool here = false;
  with_context_executor(ex, [&](const auto& c) {
    if constexpr (requires { c.running_in_this_thread(); }) here = c.running_in_this_thread();
  });
  return here;
}

/// True when `ex`'s execution context is an io_context that is stopped (its
/// run() has returned, e.g. for lack of work): nobody would fire a timer.
inline bool context_stopped(const boost::asio::any_io_executor& ex) {
  bool stopped = false;
  with_context_executor(ex, [&](const auto& c) {
    using context_type =
        std::remove_cvref_t<decltype(boost::asio::query(c, boost::asio::execution::context))>;
    if constexpr (std::is_same_v<context_type, boost::asio::io_context>)
      stopped = boost::asio::query(c, boost::asio::execution::context).stopped();
  });
  return stopped;
}

/// The error a blocking call that must wait reports at once, or none: it
/// would deadlock on this thread, or nobody runs the context.
inline boost::system::error_code blocking_wait_error(const boost::asio::any_io_executor& ex) {
  if (context_runs_in_this_thread(ex)) return error::would_deadlock;
  if (context_stopped(ex)) return error::context_stopped;
  return {};
}

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_SYNC_WAITER_HPP
