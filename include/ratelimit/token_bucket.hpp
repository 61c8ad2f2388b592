//
// ratelimit/token_bucket.hpp: a token bucket for Boost.Asio programs.
//
#ifndef RATELIMIT_TOKEN_BUCKET_HPP
#define RATELIMIT_TOKEN_BUCKET_HPP

#include <ratelimit/detail/bucket_impl.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/rate.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/asio/wait_traits.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

namespace ratelimit {

/// A token bucket whose waiters are queued completion handlers.
///
/// The bucket holds at most `capacity()` tokens and gains them continuously at
/// `get_rate()`. A request for `n` tokens is granted when `n` tokens are in
/// the bucket and every earlier request has been granted (strict FIFO: a large
/// request at the head holds back later small ones, so it is never starved).
///
/// The bucket has no thread of its own. It lives on an executor; a single
/// timer, armed only while someone waits, wakes it when the first waiter's
/// tokens are due. A bucket nobody waits on runs no handlers at all.
///
/// @tparam Clock      The clock tokens accrue by (`std::chrono::steady_clock`
///                    for `token_bucket`; tests use a manual clock).
/// @tparam WaitTraits How the timer turns the clock's durations into real waits.
/// @tparam Executor   The executor the timer and default completions use.
///
/// @par Thread safety
/// Every member function may be called concurrently from any thread, and the
/// executor may be run by one thread or many. The exceptions are the special
/// members: construction, move and destruction must not overlap any other use.
///
/// @par Lifetime
/// The constructor starts nothing. Destroying the bucket completes every
/// waiter with `boost::asio::error::operation_aborted` (through each
/// handler's executor, as usual). It may be destroyed from inside one of its
/// own completion handlers. As with any Asio I/O object, it must be destroyed
/// before its execution context.
template <typename Clock, typename WaitTraits = boost::asio::wait_traits<Clock>,
          typename Executor = boost::asio::any_io_executor>
class basic_token_bucket {
  using impl_type = detail::bucket_impl<Clock, WaitTraits, Executor>;

 public:
  using executor_type = Executor;
  using clock_type = Clock;
  using duration = typename Clock::duration;
  using time_point = typename Clock::time_point;
  using traits_type = WaitTraits;

  /// Rebinds the bucket to another executor type.
  template <typename Executor1>
  struct rebind_executor {
    using other = basic_token_bucket<Clock, WaitTraits, Executor1>;
  };

  /// A bucket of `capacity` tokens refilling at `r`, starting full.
  /// @throws std::invalid_argument if `capacity` is 0 or `r` is not a positive rate.
  basic_token_bucket(const executor_type& ex, std::uint64_t capacity, rate r = rate{})
      : basic_token_bucket(ex, capacity, r, initial_tokens{capacity}) {}

  /// A bucket of `capacity` tokens refilling at `r`, starting with `initial.count` tokens
  /// (`ratelimit::start_empty` for none).
  /// @throws std::invalid_argument if `capacity` is 0, `r` is not a positive
  /// rate, or `initial.count` exceeds `capacity`.
  basic_token_bucket(const executor_type& ex, std::uint64_t capacity, rate r,
                     initial_tokens initial)
      : impl_(std::make_shared<impl_type>(ex, capacity, r, initial.count)) {}

  /// The same, on the executor of an execution context (e.g. an io_context).
  template <typename ExecutionContext>
    requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
  basic_token_bucket(ExecutionContext& ctx, std::uint64_t capacity, rate r = rate{})
      : basic_token_bucket(executor_type(ctx.get_executor()), capacity, r) {}

  template <typename ExecutionContext>
    requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
  basic_token_bucket(ExecutionContext& ctx, std::uint64_t capacity, rate r,
                     initial_tokens initial)
      : basic_token_bucket(executor_type(ctx.get_executor()), capacity, r, initial) {}

  /// Moves the bucket; waiters stay queued. The moved-from bucket may only be
  /// destroyed or assigned to.
  basic_token_bucket(basic_token_bucket&&) noexcept = default;
  basic_token_bucket& operator=(basic_token_bucket&& other) noexcept {
    if (this != &other) {
      shutdown();
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  basic_token_bucket(const basic_token_bucket&) = delete;
  basic_token_bucket& operator=(const basic_token_bucket&) = delete;

  /// Completes every waiter with `operation_aborted`.
  ~basic_token_bucket() { shutdown(); }

  /// The executor the bucket's timer runs on; handlers without an associated
  /// executor complete here.
  executor_type get_executor() const noexcept { return impl_->get_executor(); }

  /// Asynchronously waits for one token. Same as `async_get_token(1, token)`.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code))
                Token = boost::asio::default_completion_token_t<executor_type>>
    requires(!std::is_integral_v<std::remove_cvref_t<Token>>)
  auto async_get_token(Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_get_token(1, std::forward<Token>(token));
  }

  /// Asynchronously waits until `n` tokens are granted.
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec)`: success once the tokens are taken;
  /// `ratelimit::error::exceeds_capacity` at once if `n > capacity()`;
  /// `ratelimit::error::bucket_closed` if the bucket is or gets closed;
  /// `boost::asio::error::operation_aborted` if the wait is cancelled or the
  /// bucket destroyed. Only a success consumes tokens. A request for 0 tokens
  /// completes with success in its turn.
  ///
  /// The handler is never invoked inside this function: a grant that is
  /// possible at once is posted to the handler's associated executor (the
  /// bucket's executor by default). While the request waits it counts as
  /// outstanding work on that executor.
  ///
  /// @par Per-Operation Cancellation
  /// `terminal`, `partial` and `total` cancellation are all supported: the
  /// waiter leaves the queue, takes no token, completes with
  /// `operation_aborted`, and the waiters behind it are served when they would
  /// have been without it. A cancellation that arrives after the grant (the
  /// handler is already on its way) has no effect. As usual in Asio, emit
  /// cancellation on the handler's executor (e.g. from the same coroutine's
  /// strand), not concurrently with the handler's completion.
  ///
  /// @par Thread safety
  /// May be called from any thread.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code))
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_get_token(std::uint64_t n,
                       Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        initiate_get_token(impl_.get()), token, n);
  }

  /// Takes `n` tokens if they are there now and nobody is queued ahead;
  /// never waits. Returns false when the tokens are not there, when waiters
  /// are queued (their tokens are owed to them), when `n > capacity()`, or when
  /// the bucket is closed.
  /// @par Thread safety
  /// May be called from any thread.
  bool try_get_token(std::uint64_t n = 1) { return impl_->try_get(n); }

  /// Blocks the calling thread until `n` tokens are granted, FIFO with the
  /// asynchronous waiters.
  ///
  /// Must not be called on a thread that runs the bucket's execution context
  /// (the thread could be the one needed to fire the bucket's timer): there it
  /// succeeds when the tokens are there and otherwise fails at once with
  /// `ratelimit::error::would_deadlock`. Some thread must run the context.
  /// @throws boost::system::system_error with `exceeds_capacity`,
  /// `bucket_closed`, `operation_aborted` (cancel() or destruction while
  /// waiting) or `would_deadlock`.
  void get_token(std::uint64_t n = 1) {
    boost::system::error_code ec;
    get_token(n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::get_token");
  }

  /// As get_token(), reporting failure through `ec` instead of throwing.
  void get_token(boost::system::error_code& ec) { get_token(1, ec); }

  /// As get_token(n), reporting failure through `ec` instead of throwing.
  void get_token(std::uint64_t n, boost::system::error_code& ec) {
    impl_->get_blocking(n, detail::max_time, ec);
  }

  /// Blocks at most `timeout` (measured on the bucket's clock) for `n` tokens.
  /// Returns true when granted. Returns false, at once, when the tokens could
  /// not be granted within `timeout` given the rate and the waiters already
  /// queued; and false after `timeout` when they were not granted in time (for
  /// instance after a `set_rate`). A timed-out request takes no token.
  /// @throws boost::system::system_error as get_token().
  template <typename Rep, typename Period>
  bool try_get_token_for(std::chrono::duration<Rep, Period> timeout, std::uint64_t n = 1) {
    boost::system::error_code ec;
    const bool granted = try_get_token_for(timeout, n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::try_get_token_for");
    return granted;
  }

  /// As above, reporting errors through `ec` (false with `ec` clear: not in time).
  template <typename Rep, typename Period>
  bool try_get_token_for(std::chrono::duration<Rep, Period> timeout, std::uint64_t n,
                         boost::system::error_code& ec) {
    // In long double first: a timeout of hours::max() must saturate, not overflow.
    const long double ns = std::chrono::duration<long double, std::nano>(timeout).count();
    const std::int64_t limit = ns <= 0 ? 0
                               : ns >= static_cast<long double>(detail::max_time)
                                   ? detail::max_time
                                   : static_cast<std::int64_t>(std::ceil(ns));
    return impl_->get_blocking(n, impl_type::add_ns(impl_type::now_ns(), limit), ec);
  }

  /// Closes the bucket: every queued request and every later one completes
  /// with `ratelimit::error::bucket_closed`; `try_get_token` returns false.
  /// Idempotent. @par Thread safety May be called from any thread.
  void close() { impl_->close(error::bucket_closed); }

  /// False once close() has been called.
  bool is_open() const { return impl_->is_open(); }

  /// Cancels every queued request (`operation_aborted`, no token taken);
  /// returns how many there were. The bucket stays open.
  std::size_t cancel() { return impl_->cancel(); }

  /// Whole tokens in the bucket now. While requests wait these are owed to
  /// them (and fewer than the first one needs).
  std::uint64_t available() const { return impl_->available(); }

  /// Requests queued now (asynchronous and blocking).
  std::size_t waiting() const { return impl_->waiting(); }

  std::uint64_t capacity() const { return impl_->capacity(); }

  rate get_rate() const { return impl_->get_rate(); }

  /// Changes the rate from now on; tokens accrued so far are kept, and queued
  /// requests are rescheduled at once for the new rate.
  /// @throws std::invalid_argument for a rate that is not positive (nothing changes).
  void set_rate(rate r) { impl_->set_rate(r); }

  /// Changes the capacity. A bucket holding more tokens than the new capacity
  /// drops the excess; queued requests for more than it complete with
  /// `exceeds_capacity`; the others are rescheduled.
  /// @throws std::invalid_argument for 0 (nothing changes).
  void set_capacity(std::uint64_t capacity) { impl_->set_capacity(capacity); }

 private:
  class initiate_get_token {
   public:
    using executor_type = Executor;

    explicit initiate_get_token(impl_type* impl) noexcept : impl_(impl) {}

    executor_type get_executor() const noexcept { return impl_->get_executor(); }

    template <typename Handler>
    void operator()(Handler&& handler, std::uint64_t n) const {
      static_assert(std::is_invocable_v<std::decay_t<Handler>&&, boost::system::error_code>,
                    "ratelimit: handler must be callable as void(boost::system::error_code)");
      impl_->async_get(std::forward<Handler>(handler), n);
    }

   private:
    impl_type* impl_;
  };

  void shutdown() {
    if (impl_) impl_->close(boost::asio::error::operation_aborted);
  }

  std::shared_ptr<impl_type> impl_;
};

/// The bucket most programs want: steady_clock time, any I/O executor.
using token_bucket = basic_token_bucket<std::chrono::steady_clock>;

}  // namespace ratelimit

#if !defined(RATELIMIT_HEADER_ONLY)
// Compiled once in the ratelimit library (src/token_bucket.cpp).
extern template class ratelimit::detail::bucket_impl<
    std::chrono::steady_clock, boost::asio::wait_traits<std::chrono::steady_clock>,
    boost::asio::any_io_executor>;
extern template class ratelimit::basic_token_bucket<std::chrono::steady_clock>;
#endif

#endif  // RATELIMIT_TOKEN_BUCKET_HPP
