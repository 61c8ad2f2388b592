//
// ratelimit/token_bucket.hpp: a token bucket for Boost.Asio programs.
//
#ifndef RATELIMIT_TOKEN_BUCKET_HPP
#define RATELIMIT_TOKEN_BUCKET_HPP

#include <ratelimit/detail/bucket_impl.hpp>
#include <ratelimit/detail/receipt_handler.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/metrics.hpp>
#include <ratelimit/rate.hpp>
#include <ratelimit/receipt.hpp>

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
#include <optional>
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
/// handler's executor, as usual), wakes blocked threads with it, and makes
/// operations launched later from a deferred token fail with it. It may be
/// destroyed from inside one of its own completion handlers. As with any
/// Asio I/O object, it must be destroyed before its execution context.
template <typename Clock, typename WaitTraits = boost::asio::wait_traits<Clock>,
          typename Executor = boost::asio::any_io_executor>
class basic_token_bucket {
  using impl_type = detail::bucket_impl<Clock, WaitTraits>;

 public:
  using executor_type = Executor;
  using clock_type = Clock;
  using duration = typename Clock::duration;
  using time_point = typename Clock::time_point;
  using traits_type = WaitTraits;

  /// Rebinds the bucket to another executor type (e.g. for
  /// `asio::use_awaitable_t<>::as_default_on(std::move(bucket))`).
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
      : executor_(ex),
        impl_(impl_type::make(boost::asio::any_io_executor(ex), capacity, r, initial.count)) {}

  /// The same, on the executor of an execution context (e.g. an io_context).
  template <typename ExecutionContext>
  requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
  basic_token_bucket(ExecutionContext& ctx, std::uint64_t capacity, rate r = rate{})
      : basic_token_bucket(executor_type(ctx.get_executor()), capacity, r) {}

  template <typename ExecutionContext>
  requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
  basic_token_bucket(ExecutionContext& ctx, std::uint64_t capacity, rate r, initial_tokens initial)
      : basic_token_bucket(executor_type(ctx.get_executor()), capacity, r, initial) {}

  /// Moves the bucket; its waiters stay queued and complete as usual. The
  /// moved-from bucket keeps its executor and behaves as a closed bucket
  /// holding nothing: requests complete with `error::bucket_closed`,
  /// `try_get_token` returns false, `capacity()` and `available()` are 0
  /// (as a moved-from Asio I/O object, it may be destroyed, assigned to, or
  /// used and fail cleanly).
  basic_token_bucket(basic_token_bucket&& other) noexcept
      : executor_(other.executor_), impl_(std::move(other.impl_)) {}

  /// Moves from a bucket with another executor type convertible to this one
  /// (what `as_default_on` does).
  template <typename Executor1>
  requires(!std::is_same_v<Executor1, Executor> &&
           std::is_convertible_v<const Executor1&, Executor>)
      basic_token_bucket(basic_token_bucket<Clock, WaitTraits, Executor1>&& other)
  noexcept : executor_(other.executor_), impl_(std::move(other.impl_)) {}

  /// Closes this bucket (as its destructor would), then takes over `other`'s.
  basic_token_bucket& operator=(basic_token_bucket&& other) noexcept {
    if (this != &other) {
      shutdown();
      executor_ = other.executor_;
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  basic_token_bucket(const basic_token_bucket&) = delete;
  basic_token_bucket& operator=(const basic_token_bucket&) = delete;

  /// Completes every waiter with `operation_aborted`; blocking callers wake
  /// with it too (they co-own what they need, so nothing freed is touched).
  /// Operations started later through a deferred token complete with
  /// `operation_aborted` as well.
  ~basic_token_bucket() { shutdown(); }

  /// The executor the bucket's timer runs on; handlers without an associated
  /// executor complete here.
  executor_type get_executor() const noexcept { return executor_; }

  /// Asynchronously waits for one token. Same as `async_get_token(1, token)`.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code)) Token =
                boost::asio::default_completion_token_t<executor_type>>
  requires(!std::is_integral_v<std::remove_cvref_t<Token>>) auto async_get_token(
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_get_token(1, std::forward<Token>(token));
  }

  /// Asynchronously waits until `n` tokens are granted.
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec)`: success once the tokens are taken;
  /// `ratelimit::error::exceeds_capacity` at once if `n > capacity()`;
  /// `ratelimit::error::bucket_closed` if the bucket is or gets closed (or
  /// was moved from); `boost::asio::error::operation_aborted` if the wait is
  /// cancelled or the bucket destroyed. Only a success consumes tokens. A
  /// request for 0 tokens completes with success in its turn.
  ///
  /// The handler is never invoked inside this function: a grant that is
  /// possible at once is posted, and every completion goes through the
  /// handler's associated executor (the bucket's by default), with the
  /// handler's associated allocator. While the request waits it counts as
  /// outstanding work on that executor. Completing allocates nothing: the
  /// memory for it is taken when the request starts (for io_context and
  /// thread_pool executors and strands over them).
  ///
  /// @par Exceptions
  /// Throws `std::bad_alloc` (or, for the first request that waits,
  /// `boost::system::system_error` when the timer cannot be made, e.g. for
  /// lack of file descriptors); the request then took nothing and was not
  /// queued, and the handler is destroyed without being invoked, as with any
  /// Asio initiating function.
  ///
  /// @par Per-Operation Cancellation
  /// `terminal`, `partial` and `total` cancellation are all supported: the
  /// waiter leaves the queue, takes no token, completes with
  /// `operation_aborted`, and the waiters behind it are served when they would
  /// have been without it. A cancellation that arrives after the grant, or
  /// at the same time as the grant on another thread, has no effect: the
  /// request completes with its real result.
  ///
  /// @par Thread safety
  /// May be called from any thread.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code))
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_get_token(std::uint64_t n,
                       Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        initiate_get_token(impl_, executor_), token, n);
  }

  /// Takes `n` tokens if they are there now and nobody is queued ahead;
  /// never waits. Returns false when the tokens are not there, when waiters
  /// are queued (their tokens are owed to them), when `n > capacity()`, or when
  /// the bucket is closed. (A queued joint request, ratelimit/joint.hpp, is
  /// the one exception: taking tokens it will not need by its time T is no
  /// delay to it.) While joint requests wait on the bucket this may throw
  /// std::bad_alloc (planning them), with nothing taken.
  /// @par Thread safety
  /// May be called from any thread.
  bool try_get_token(std::uint64_t n = 1) { return impl_ && impl_->try_get(n); }

  /// As try_get_token(n), but first grants the queued requests that are due
  /// (as the timer would), and tells how long a request made now would have
  /// to wait: `retry_after` is zero when the tokens are taken; on refusal the
  /// wait (as retry_after(n)), or empty when the request can never be granted
  /// (`n > capacity()`, or the bucket is closed). For a server's
  /// `Retry-After` or `RateLimit-Reset`.
  /// @par Thread safety
  /// May be called from any thread.
  bool try_get_token(std::uint64_t n, std::optional<duration>& retry_after) {
    retry_after.reset();
    if (!impl_) return false;
    std::optional<std::int64_t> wait;
    const bool granted = impl_->try_get(n, wait);
    if (wait) retry_after = detail::to_duration<duration>(*wait);
    return granted;
  }

  /// How long a request for `n` tokens made now would wait before it is
  /// granted: zero when at once; otherwise until it would be granted after
  /// the requests queued ahead of it (FIFO), each granted as the timer grants
  /// it. Exact as of the call, rounded up to the clock's tick: a later
  /// `set_rate`/`set_capacity`, a cancellation or close ahead of it changes
  /// it. Empty when such a request would fail at once (`n > capacity()`, or
  /// the bucket is closed). A wait past the end of the bucket's time range
  /// (INT64_MAX ns after the clock's epoch) is the time left until that end;
  /// a wait that does not fit `duration` is `duration::max()`.
  /// Like available(), it grants the queued requests that are due first, as
  /// the timer would.
  /// @par Thread safety
  /// May be called from any thread.
  std::optional<duration> retry_after(std::uint64_t n = 1) const {
    if (!impl_) return std::nullopt;
    const auto wait = impl_->retry_after(n);
    if (!wait) return std::nullopt;
    return detail::to_duration<duration>(*wait);
  }

  /// Blocks the calling thread until `n` tokens are granted, FIFO with the
  /// asynchronous waiters.
  ///
  /// Some thread must run the bucket's execution context: the bucket's timer
  /// fires there. So a call that would have to wait fails at once, instead
  /// of waiting forever, with `ratelimit::error::would_deadlock` on a thread
  /// that runs that context (directly or through a strand), and with
  /// `ratelimit::error::context_stopped` when the context is an io_context
  /// that is stopped (its `run()` has returned, e.g. for want of a work
  /// guard). These checks need the context to be an io_context or a
  /// thread_pool; with other executors they cannot be made. A context that
  /// stops while a thread waits leaves it waiting until the context runs
  /// again, or the request is cancelled (`cancel()`), or the bucket is
  /// closed or destroyed.
  /// @throws boost::system::system_error with `exceeds_capacity`,
  /// `bucket_closed`, `operation_aborted` (cancel() or destruction while
  /// waiting), `would_deadlock` or `context_stopped`.
  void get_token(std::uint64_t n = 1) {
    boost::system::error_code ec;
    get_token(n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::get_token");
  }

  /// As get_token(), reporting failure through `ec` instead of throwing.
  void get_token(boost::system::error_code& ec) { get_token(1, ec); }

  /// As get_token(n), reporting failure through `ec` instead of throwing.
  void get_token(std::uint64_t n, boost::system::error_code& ec) {
    if (!impl_) {
      ec = error::bucket_closed;
      return;
    }
    impl_->get_blocking(n, detail::max_time, ec);
  }

  /// Blocks at most `timeout` (measured on the bucket's clock, from this
  /// call's own reading) for `n` tokens. Returns true when granted, never for
  /// tokens due after the deadline (tokens due exactly at it count). Returns
  /// false at once when the tokens could not be granted within `timeout`
  /// given the rate and the waiters already queued; false as soon as they no
  /// longer can once it is first in line (a `set_rate` made them later); and
  /// false after `timeout` when they were not granted in time. A request
  /// that returns false takes no token.
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
    if (!impl_) {
      ec = error::bucket_closed;
      return false;
    }
    return impl_->get_blocking(n, detail::saturating_ns(timeout), ec);
  }

  // --- with a receipt -------------------------------------------------------

  /// As async_get_token(n), and the handler also receives a receipt for the
  /// tokens taken, through which it can give back what it does not use
  /// (see `ratelimit::receipt`). Everything else (errors, completion,
  /// allocation, cancellation, exceptions) is as for async_get_token(n).
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec, ratelimit::receipt r)`: on success
  /// `r.granted() == n`; on failure `r` is empty.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code, receipt))
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(std::uint64_t n,
                     Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code, receipt)>(
        initiate_get_token(impl_, executor_), token, n, with_receipt{});
  }

  /// As get_token(n), returning the grant's receipt.
  /// @throws boost::system::system_error as get_token().
  receipt acquire(std::uint64_t n = 1) {
    boost::system::error_code ec;
    receipt r = acquire(n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::acquire");
    return r;
  }

  /// As get_token(n, ec), returning the grant's receipt (empty on failure).
  receipt acquire(std::uint64_t n, boost::system::error_code& ec) {
    if (!impl_) {
      ec = error::bucket_closed;
      return receipt();
    }
    if (!impl_->get_blocking(n, detail::max_time, ec)) return receipt();
    return detail::receipt_access::make(impl_->receipt_target_of(), n);
  }

  /// As try_get_token(n): the grant's receipt when the tokens were taken,
  /// empty when not.
  std::optional<receipt> try_acquire(std::uint64_t n = 1) {
    if (!impl_ || !impl_->try_get(n)) return std::nullopt;
    return detail::receipt_access::make(impl_->receipt_target_of(), n);
  }

  /// Closes the bucket: every queued request and every later one completes
  /// with `ratelimit::error::bucket_closed`; `try_get_token` returns false.
  /// Idempotent. @par Thread safety May be called from any thread.
  void close() {
    if (impl_) impl_->close(error::bucket_closed);
  }

  /// False once close() has been called (and for a moved-from bucket).
  bool is_open() const { return impl_ && impl_->is_open(); }

  /// Cancels every queued request (`operation_aborted`, no token taken);
  /// returns how many there were. The bucket stays open.
  std::size_t cancel() { return impl_ ? impl_->cancel() : 0; }

  /// Whole tokens in the bucket now. While requests wait these are owed to
  /// them (and fewer than the first one needs).
  std::uint64_t available() const { return impl_ ? impl_->available() : 0; }

  /// Requests queued now (asynchronous and blocking).
  std::size_t waiting() const { return impl_ ? impl_->waiting() : 0; }

  /// What the bucket has counted since it was made (`limiter_metrics`): its
  /// requests by how they ended, the tokens granted and given back, the wait
  /// of every grant; and as gauges, waiting() and available() now (0 while
  /// requests wait: those tokens are owed to them). One
  /// consistent snapshot, taken under the bucket's lock: every request made
  /// is either waiting or counted once by how it ended. Counting is on
  /// (it costs a store or two under a lock the request takes anyway) unless
  /// every translation unit is built with `RATELIMIT_NO_METRICS`, which
  /// compiles it out (the benchmarks' "metrics off" rows).
  ///
  /// - A try (`try_get_token`) is a grant or a refusal, or an error when
  ///   it fails at once (closed, over the capacity).
  /// - A joint request counts on every bucket it names, as its requester
  ///   saw it end (granted, with its wait; or failed, refused, cancelled).
  /// - A request cancelled or failed counts no tokens; tokens a receipt
  ///   gives back count in `tokens_given_back`.
  /// - A blocking request whose deadline comes before its tokens (known at
  ///   once, or when its thread wakes) is a deadline expiry; one that cannot
  ///   block (`would_deadlock`) is an error.
  /// - Destroying the bucket cancels its waiters (counted, though nobody can
  ///   read them); close() fails them with `bucket_closed` (errors).
  /// - With an executor whose post allocates and throws, a grant at once
  ///   whose completion cannot be posted is counted as granted and its
  ///   tokens as given back (the call throws and takes nothing).
  /// - A rate_limited_stream's takes are tries on its buckets, as counted
  ///   here: one refused take may count as two refusals, and a take past the
  ///   capacity as an error per halving (streams will get counts of their own).
  ///
  /// A moved-from bucket reports zeros.
  /// @par Thread safety
  /// May be called from any thread.
  limiter_metrics metrics() const { return impl_ ? impl_->metrics() : limiter_metrics{}; }

  std::uint64_t capacity() const { return impl_ ? impl_->capacity() : 0; }

  rate get_rate() const { return impl_ ? impl_->get_rate() : rate{}; }

  /// Changes the rate from now on; tokens accrued so far are kept (less than
  /// 2^-64 of a token may be lost: see `rate`), and queued requests are
  /// rescheduled at once for the new rate.
  /// @throws std::invalid_argument for a rate that is not positive (nothing changes).
  void set_rate(rate r) {
    if (impl_)
      impl_->set_rate(r);
    else
      detail::reduce(r);  // validates
  }

  /// Changes the capacity. A bucket holding more tokens than the new capacity
  /// drops the excess; queued requests for more than it complete with
  /// `exceeds_capacity`; the others are rescheduled.
  /// @throws std::invalid_argument for 0 (nothing changes).
  void set_capacity(std::uint64_t capacity) {
    if (impl_)
      impl_->set_capacity(capacity);
    else
      detail::check_capacity(capacity);
  }

 private:
  template <typename, typename, typename>
  friend class basic_token_bucket;
  template <typename, typename>
  friend class basic_part;

  struct with_receipt {};  // selects the async_acquire form of the initiation

  /// Reaches the impl through an initiation_ref: a deferred operation
  /// co-owns it, so one launched after the bucket is gone completes with
  /// operation_aborted.
  class initiate_get_token {
   public:
    using executor_type = Executor;

    initiate_get_token(const std::shared_ptr<impl_type>& impl, const Executor& ex) noexcept
        : ref_(impl, ex) {}

    executor_type get_executor() const noexcept { return ref_.get_executor(); }

    template <typename Handler>
    void operator()(Handler&& handler, std::uint64_t n) const {
      static_assert(std::is_invocable_v<std::decay_t<Handler>&&, boost::system::error_code>,
                    "ratelimit: handler must be callable as void(boost::system::error_code)");
      if (impl_type* impl = ref_.get())
        impl->async_get(std::forward<Handler>(handler), n);
      else
        detail::post_completion(std::forward<Handler>(handler),
                                boost::asio::any_io_executor(ref_.get_executor()),
                                boost::system::error_code(error::bucket_closed));
    }

    /// async_acquire: the same request, its handler wrapped to receive the receipt.
    template <typename Handler>
    void operator()(Handler&& handler, std::uint64_t n, with_receipt) const {
      if (impl_type* impl = ref_.get())
        impl->async_get(
            detail::with_receipt_of(std::forward<Handler>(handler), impl->receipt_target_of(), n),
            n);
      else
        detail::post_completion(std::forward<Handler>(handler),
                                boost::asio::any_io_executor(ref_.get_executor()),
                                boost::system::error_code(error::bucket_closed), receipt());
    }

   private:
    detail::initiation_ref<impl_type, Executor> ref_;
  };

  void shutdown() noexcept {
    if (impl_) impl_->close(boost::asio::error::operation_aborted);
  }

  executor_type executor_;
  std::shared_ptr<impl_type> impl_;
};

/// The bucket most programs want: steady_clock time, any I/O executor.
using token_bucket = basic_token_bucket<std::chrono::steady_clock>;

}  // namespace ratelimit

#if !defined(RATELIMIT_HEADER_ONLY)
// Compiled once in the ratelimit library (src/token_bucket.cpp).
extern template class ratelimit::detail::bucket_impl<
    std::chrono::steady_clock, boost::asio::wait_traits<std::chrono::steady_clock>>;
extern template class ratelimit::basic_token_bucket<std::chrono::steady_clock>;
#endif

#endif  // RATELIMIT_TOKEN_BUCKET_HPP
