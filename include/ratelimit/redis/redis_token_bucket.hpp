//
// ratelimit/redis/redis_token_bucket.hpp: a token bucket shared through Redis.
//
#ifndef RATELIMIT_REDIS_REDIS_TOKEN_BUCKET_HPP
#define RATELIMIT_REDIS_REDIS_TOKEN_BUCKET_HPP

#include <ratelimit/error.hpp>
#include <ratelimit/rate.hpp>
#include <ratelimit/redis/connection.hpp>
#include <ratelimit/redis/detail/redis_bucket_impl.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/wait_traits.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace ratelimit {

/// A token bucket whose state lives in one Redis key, shared by every client
/// (thread, process, host) that uses the same key, capacity and rate.
///
/// Semantics are the local bucket's: at most `capacity` tokens, refilled
/// continuously at the rate, exact integer arithmetic, starting full. The
/// arithmetic runs on the Redis server, atomically, in a Lua script, on the
/// server's clock: clients' clocks never enter the decision, only the local
/// waits. A key expires when the bucket would be full again.
///
/// Waiters in one process queue locally in FIFO order and only the head asks
/// Redis; a denied head waits on a local timer for the time the script says
/// its tokens will be there, then asks again. Across processes there is no
/// queue: whichever asks first when tokens are there gets them.
///
/// @tparam Clock, WaitTraits The clock of the local timers (tests use a
/// skewed one to show that client clocks do not matter).
///
/// @par Thread safety
/// As the local bucket: every member function may be called concurrently
/// from any thread, except the special members.
///
/// @par Lifetime
/// The connection must outlive the bucket. Destroying the bucket completes
/// every waiter with `operation_aborted`; a request in flight then completes
/// into nothing.
template <typename Clock, typename WaitTraits = boost::asio::wait_traits<Clock>>
class basic_redis_token_bucket {
  using impl_type = redis_detail::redis_bucket_impl<Clock, WaitTraits>;

 public:
  using executor_type = boost::asio::any_io_executor;
  using try_signature = void(boost::system::error_code, bool);

  /// A bucket of `capacity` tokens refilling at `r`, stored at `key`.
  /// @throws std::invalid_argument if `capacity` is 0, `r` is not a positive
  /// rate, or capacity and rate cannot be computed exactly in Redis's Lua
  /// (capacity * (microseconds per token, reduced) must stay below 2^53).
  basic_redis_token_bucket(redis_connection& conn, std::string key, std::uint64_t capacity, rate r,
                           redis_bucket_options options = {})
      : impl_(std::make_shared<impl_type>(conn, std::move(key), capacity, r, options)) {}

  basic_redis_token_bucket(basic_redis_token_bucket&&) noexcept = default;
  basic_redis_token_bucket& operator=(basic_redis_token_bucket&& other) noexcept {
    if (this != &other) {
      shutdown();
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  basic_redis_token_bucket(const basic_redis_token_bucket&) = delete;
  basic_redis_token_bucket& operator=(const basic_redis_token_bucket&) = delete;

  /// Completes every waiter with `operation_aborted`.
  ~basic_redis_token_bucket() { shutdown(); }

  /// The connection's executor: timers run and default completions happen there.
  executor_type get_executor() const noexcept { return impl_->get_executor(); }

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
  /// `exceeds_capacity` at once if `n > capacity()`; `bucket_closed` if the
  /// bucket is or gets closed; `operation_aborted` if the wait is cancelled or
  /// the bucket destroyed; with the `fail_closed` policy, `redis_unavailable`
  /// when Redis cannot be reached or does not answer within the connection's
  /// `request_timeout`; `redis_error` when Redis refuses (e.g. the key holds
  /// another type, or a bucket of another configuration) and
  /// `redis_bad_reply` for a reply of the wrong shape. A request for 0 tokens
  /// completes with success in its turn (after one round trip).
  ///
  /// The handler is never invoked inside this function; it runs on its
  /// associated executor (the connection's by default).
  ///
  /// @par Per-Operation Cancellation
  /// `terminal`, `partial` and `total`: the waiter leaves the local queue and
  /// completes with `operation_aborted`. If its request was in flight and
  /// Redis granted it, those tokens are kept for the next waiter only up to
  /// the lease size (none without leasing): a cancellation may waste tokens,
  /// never over-grant.
  ///
  /// @par Thread safety
  /// May be called from any thread.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code))
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_get_token(std::uint64_t n,
                       Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        [impl = impl_.get()](auto handler, std::uint64_t k) {
          impl->async_get(std::move(handler), k);
        },
        token, n);
  }

  /// One attempt, never waiting for tokens: `(ec, true)` when `n` tokens were
  /// taken, `(ec, false)` when they were not there or waiters of this process
  /// are queued (their tokens are owed to them).
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec, bool granted)`; errors as
  /// async_get_token. With `fail_open` an unavailable Redis gives
  /// `(success, true)`; with `local_fallback`, the local bucket's answer.
  /// Never invoked inside this function.
  ///
  /// @par Per-Operation Cancellation
  /// Not supported (the attempt is bounded by the connection's `request_timeout`).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(try_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_try_get_token(
      std::uint64_t n, Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, try_signature>(
        [impl = impl_.get()](auto handler, std::uint64_t k) {
          impl->async_try(boost::asio::any_completion_handler<try_signature>(std::move(handler)),
                          k);
        },
        token, n);
  }

  /// Same as `async_try_get_token(1, token)`.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(try_signature) Token =
                boost::asio::default_completion_token_t<executor_type>>
  requires(!std::is_integral_v<std::remove_cvref_t<Token>>) auto async_try_get_token(
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_try_get_token(1, std::forward<Token>(token));
  }

  /// Blocks the calling thread until `n` tokens are granted, FIFO with the
  /// asynchronous waiters of this bucket object.
  ///
  /// Every grant needs the connection's executor (a round trip, or a timer),
  /// so a call on a thread that runs that executor's context fails at once
  /// with `would_deadlock`.
  /// @throws boost::system::system_error with the errors of async_get_token,
  /// or `would_deadlock`.
  void get_token(std::uint64_t n = 1) {
    boost::system::error_code ec;
    get_token(n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::redis_token_bucket::get_token");
  }

  /// As get_token(n), reporting failure through `ec`.
  void get_token(std::uint64_t n, boost::system::error_code& ec) { impl_->get_blocking(n, ec); }

  /// Closes this bucket object (not the key): queued and later requests, and
  /// tries whose request is out, complete with `bucket_closed`. Idempotent;
  /// any thread.
  void close() { impl_->close(error::bucket_closed); }

  bool is_open() const { return impl_->is_open(); }

  /// Cancels every queued request of this object (`operation_aborted`); returns how many.
  std::size_t cancel() { return impl_->cancel(); }

  /// Requests queued in this object now.
  std::size_t waiting() const { return impl_->waiting(); }

  std::uint64_t capacity() const noexcept { return impl_->capacity(); }
  rate get_rate() const noexcept { return impl_->get_rate(); }
  const std::string& key() const noexcept { return impl_->key(); }

  /// Counters of this object.
  redis_bucket_stats stats() const { return impl_->stats(); }

 private:
  void shutdown() {
    if (impl_) impl_->close(boost::asio::error::operation_aborted);
  }

  std::shared_ptr<impl_type> impl_;
};

/// The Redis bucket most programs want: local waits on steady_clock.
using redis_token_bucket = basic_redis_token_bucket<std::chrono::steady_clock>;

}  // namespace ratelimit

#if !defined(RATELIMIT_HEADER_ONLY)
extern template class ratelimit::redis_detail::redis_bucket_impl<
    std::chrono::steady_clock, boost::asio::wait_traits<std::chrono::steady_clock>>;
extern template class ratelimit::basic_redis_token_bucket<std::chrono::steady_clock>;
#endif

#endif  // RATELIMIT_REDIS_REDIS_TOKEN_BUCKET_HPP
