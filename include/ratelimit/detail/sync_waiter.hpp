//
// ratelimit/detail/sync_waiter.hpp: a queued blocking caller.
//
#ifndef RATELIMIT_DETAIL_SYNC_WAITER_HPP
#define RATELIMIT_DETAIL_SYNC_WAITER_HPP

#include <ratelimit/detail/waiter_queue.hpp>

#include <boost/asio/detail/scheduler.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/asio/query.hpp>

#include <future>
#include <utility>

namespace ratelimit::detail {

/// Lives on the blocked caller's stack. Completion moves the promise out of
/// the waiter before fulfilling it, so the caller, who returns as soon as the
/// future is ready, never frees memory the completer still uses.
class sync_waiter final : public waiter_base {
 public:
  explicit sync_waiter(std::uint64_t n) : waiter_base(n, &sync_waiter::do_finish) {}

  std::future<boost::system::error_code> get_future() { return promise_.get_future(); }

 private:
  static void do_finish(waiter_base* base, finish_mode) {
    auto* w = static_cast<sync_waiter*>(base);
    const boost::system::error_code ec = w->result;
    std::promise<boost::system::error_code> p = std::move(w->promise_);
    p.set_value(ec);  // `w` may be gone from here on
  }

  std::promise<boost::system::error_code> promise_;
};

/// True when the calling thread is running the execution context behind `ex`
/// (an io_context or a thread_pool); a blocking wait there could wait for a
/// timer that only this thread can fire.
template <typename Executor>
bool context_runs_in_this_thread(const Executor& ex) {
  // Both contexts run on Asio's scheduler, which knows the threads inside its
  // run(); this is what io_context::executor_type::running_in_this_thread asks.
  using scheduler = boost::asio::detail::scheduler;
  boost::asio::execution_context& ctx = boost::asio::query(ex, boost::asio::execution::context);
  return boost::asio::has_service<scheduler>(ctx) &&
         boost::asio::use_service<scheduler>(ctx).can_dispatch();
}

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_SYNC_WAITER_HPP
