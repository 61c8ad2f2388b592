//
// ratelimit/redis/redis_keyed_limiter.hpp: a token bucket per key, shared through Redis.
//
#ifndef RATELIMIT_REDIS_REDIS_KEYED_LIMITER_HPP
#define RATELIMIT_REDIS_REDIS_KEYED_LIMITER_HPP

#include <ratelimit/detail/wrapped_handler.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/rate.hpp>
#include <ratelimit/redis/connection.hpp>
#include <ratelimit/redis/detail/redis_keyed_impl.hpp>
#include <ratelimit/redis/options.hpp>
#include <ratelimit/remote_limiter.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/wait_traits.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace ratelimit {

/// A Redis token bucket per key (per user, per API key, per client address)
/// shared by every process that uses the same prefix: one object for any
/// number of keys. The bucket of key `k` lives at the Redis key
/// `prefix + k` and behaves exactly as a basic_redis_token_bucket there
/// (same script, same modes, same fault policies, same error codes): a
/// key's requests are FIFO among themselves, keys never wait for each
/// other, and a bucket's Redis key expires when it would be full again.
///
/// @par Quotas
/// Every key gets the same capacity and rate, or those a function of the
/// key returns (`quota_function`), asked each time a key becomes active in
/// this process (so it must be cheap, may be called from any thread, at
/// once for several keys, and must not call back into the limiter). A
/// quota no bucket can have makes the request throw std::invalid_argument
/// where it starts (the initiating function; for a deferred operation, its
/// launch), as the bucket's constructor would, queuing nothing; what the
/// function throws propagates likewise. Every process must give a key the
/// same quota at the same generation (`redis_bucket_options::generation`:
/// a key of another configuration at the same generation fails with
/// `redis_error`; a newer generation wins, as for a bucket).
///
/// A key's quota may also be stored in Redis, with the bucket: set_quota(),
/// set_rate() and set_capacity() write it with the next generation, and
/// every process's requests for the key run with it (each key's machinery
/// is told it with its first reply). A stored quota is kept in Redis (its
/// key no longer expires when full) until the key is deleted. A request
/// larger than the quota function's capacity still fails at once with
/// `exceeds_capacity` (a raised stored capacity serves larger requests only
/// in machinery that has been told it); quota() answers the function's.
///
/// @par Memory
/// The process keeps state only for keys with requests in flight: a key's
/// machinery is made when a request for it arrives and dropped as soon as
/// it has nothing queued, out, reserved or to refund, so memory follows the
/// requests in flight, not the keys ever seen. With `local_fallback`, a key
/// that was served by its local fallback bucket during an outage keeps it
/// until that bucket is full again (a fresh one starts full), so that the
/// per-process bound of the fallback holds per key; it is dropped by the
/// first request, or call of active_keys(), after that.
///
/// @par Options
/// Those of basic_redis_token_bucket (`redis_bucket_options`), except
/// leasing (`lease` must be 0: a key keeps nothing between requests). Every
/// key shares one fault hold: after a fault, every key applies the policy
/// for `fault_hold` without asking Redis. In reservation mode, requests for
/// one key queued together go in one script call, and each key keeps up to
/// `max_in_flight` calls out. However many keys are busy, the keys (and
/// buckets) on one connection keep at most its
/// `redis_config::max_calls_in_flight` calls out together; the others wait
/// in their own queues, served in the order they found the window full.
///
/// @par Thread safety
/// Every member function may be called concurrently from any thread,
/// except the special members.
///
/// @par Lifetime
/// The connection must outlive the limiter and the remote parts
/// (as_remote()) the user holds. Once they are destroyed, the connection may
/// be destroyed right after: what the limiter's machinery still sends (from
/// a reply being handled on another thread at that moment; a joint request
/// holding a remote part, failing or destroyed, and a receipt giving back
/// through it meanwhile) co-owns the connection's implementation, as an
/// operation launched from a deferred token does, and fails with
/// `operation_aborted` once the connection is gone, or is destroyed unsent
/// while its context is destroyed (a refund's tokens are then wasted, never
/// over-granted). Such a joint request must end, as any operation on the
/// connection's context, before that context is destroyed (it may run on
/// another context). Destroying the limiter
/// completes every waiter, and every try whose request is out, with
/// `operation_aborted`; a script request in flight then completes into
/// nothing. Requests of a moved-from limiter complete with `bucket_closed`
/// (quota() and as_remote() throw std::logic_error; prefix() is empty).
template <typename Clock, typename WaitTraits = boost::asio::wait_traits<Clock>>
class basic_redis_keyed_limiter {
  using impl_type = redis_detail::redis_keyed_impl<Clock, WaitTraits>;
  using bucket_type = typename impl_type::bucket_type;

 public:
  using executor_type = boost::asio::any_io_executor;
  using try_signature = void(boost::system::error_code, bool);
  using configure_signature = void(boost::system::error_code, std::uint64_t);
  /// The quota of a key (the key without the prefix).
  using quota_function = std::function<redis_quota(std::string_view key)>;

  /// Every key gets a bucket of `capacity` tokens refilling at `r`, stored
  /// at `prefix + key`.
  /// @throws std::invalid_argument as basic_redis_token_bucket's
  /// constructor, and for `lease > 0`.
  basic_redis_keyed_limiter(redis_connection& conn, std::string prefix, std::uint64_t capacity,
                            rate r, redis_bucket_options options = {})
      : executor_(conn.get_executor()),
        impl_(std::make_shared<impl_type>(conn, std::move(prefix), redis_quota{capacity, r},
                                          quota_function(), options)) {}

  /// Key `k` gets a bucket of `quota(k)` (see Quotas).
  /// @throws std::invalid_argument for an empty function, an invalid option, or `lease > 0`.
  basic_redis_keyed_limiter(redis_connection& conn, std::string prefix, quota_function quota,
                            redis_bucket_options options = {})
      : executor_(conn.get_executor()),
        impl_(std::make_shared<impl_type>(conn, std::move(prefix), std::nullopt, std::move(quota),
                                          options)) {}

  basic_redis_keyed_limiter(basic_redis_keyed_limiter&& other) noexcept
      : executor_(other.executor_), impl_(std::move(other.impl_)) {}
  basic_redis_keyed_limiter& operator=(basic_redis_keyed_limiter&& other) noexcept {
    if (this != &other) {
      shutdown();
      executor_ = other.executor_;
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  basic_redis_keyed_limiter(const basic_redis_keyed_limiter&) = delete;
  basic_redis_keyed_limiter& operator=(const basic_redis_keyed_limiter&) = delete;

  /// Completes every waiter with `operation_aborted`.
  ~basic_redis_keyed_limiter() { shutdown(); }

  /// The connection's executor: timers run and default completions happen there.
  executor_type get_executor() const noexcept { return executor_; }

  /// Same as `async_get_token(key, 1, token)`.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code)) Token =
                boost::asio::default_completion_token_t<executor_type>>
  requires(!std::is_integral_v<std::remove_cvref_t<Token>>) auto async_get_token(
      std::string_view key,
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_get_token(key, 1, std::forward<Token>(token));
  }

  /// Asynchronously waits until `n` tokens of `key`'s bucket are granted.
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec)`: as
  /// basic_redis_token_bucket::async_get_token, with `exceeds_capacity` for
  /// more than the key's capacity. The handler is never invoked inside this
  /// function. The key is copied (also for a deferred operation).
  ///
  /// @par Per-Operation Cancellation
  /// As basic_redis_token_bucket::async_get_token.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code))
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_get_token(std::string_view key, std::uint64_t n,
                       Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        initiate_get<false>(impl_, executor_), token, std::string(key), n, std::int64_t(0));
  }

  /// One attempt for `n` of `key`'s tokens, never waiting: as
  /// basic_redis_token_bucket::async_try_get_token.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(try_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_try_get_token(
      std::string_view key, std::uint64_t n,
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, try_signature>(initiate_try(impl_, executor_), token,
                                                             std::string(key), n);
  }

  /// Same as `async_try_get_token(key, 1, token)`.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(try_signature) Token =
                boost::asio::default_completion_token_t<executor_type>>
  requires(!std::is_integral_v<std::remove_cvref_t<Token>>) auto async_try_get_token(
      std::string_view key,
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_try_get_token(key, 1, std::forward<Token>(token));
  }

  /// Waits at most `timeout` for `n` of `key`'s tokens, in line: as
  /// basic_redis_token_bucket::async_try_get_token_for (`(success, false)`
  /// when they would not be due in time, nothing taken).
  template <typename Rep, typename Period,
            BOOST_ASIO_COMPLETION_TOKEN_FOR(try_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_try_get_token_for(
      std::string_view key, std::chrono::duration<Rep, Period> timeout, std::uint64_t n,
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, try_signature>(initiate_get<true>(impl_, executor_),
                                                             token, std::string(key), n,
                                                             detail::saturating_ns(timeout));
  }

  /// Blocks until `n` of `key`'s tokens are granted: as
  /// basic_redis_token_bucket::get_token.
  /// @throws boost::system::system_error as basic_redis_token_bucket::get_token.
  void get_token(std::string_view key, std::uint64_t n = 1) {
    boost::system::error_code ec;
    get_token(key, n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::redis_keyed_limiter::get_token");
  }

  /// As get_token(key, n), reporting failure through `ec`.
  void get_token(std::string_view key, std::uint64_t n, boost::system::error_code& ec) {
    ec = {};
    if (auto p = acquire(key, ec)) p->get_blocking(n, ec);
  }

  /// Blocks at most until it is known that `n` of `key`'s tokens would not
  /// be due within `timeout` (false), or until they are granted (true): as
  /// basic_redis_token_bucket::try_get_token_for.
  template <typename Rep, typename Period>
  bool try_get_token_for(std::string_view key, std::chrono::duration<Rep, Period> timeout,
                         std::uint64_t n = 1) {
    boost::system::error_code ec;
    const bool granted = try_get_token_for(key, timeout, n, ec);
    if (ec)
      throw boost::system::system_error(ec, "ratelimit::redis_keyed_limiter::try_get_token_for");
    return granted;
  }

  /// As above, reporting errors through `ec` (false with `ec` clear: not in time).
  template <typename Rep, typename Period>
  bool try_get_token_for(std::string_view key, std::chrono::duration<Rep, Period> timeout,
                         std::uint64_t n, boost::system::error_code& ec) {
    ec = {};
    auto p = acquire(key, ec);
    return p && p->get_blocking_for(n, detail::saturating_ns(timeout), ec);
  }

  /// Stores `key`'s quota in Redis, for every process, as
  /// basic_redis_token_bucket::async_reconfigure does for a bucket (the
  /// next generation, the level migrated, kept in Redis); the key's
  /// machinery in this process, if active, takes it on at the reply.
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec, std::uint64_t generation)`, as
  /// basic_redis_token_bucket::async_reconfigure (`bucket_closed` for a
  /// closed limiter).
  /// @throws std::invalid_argument as async_reconfigure, and what the quota
  /// function throws (its answer is what a key without a stored
  /// configuration gets for the part not set).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(configure_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_set_quota(std::string_view key, std::uint64_t capacity, rate r,
                       Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_configure(key, capacity, r, std::forward<Token>(token));
  }

  /// As async_set_quota, setting the rate only (the capacity stays the stored one).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(configure_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_set_rate(std::string_view key, rate r,
                      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_configure(key, std::nullopt, r, std::forward<Token>(token));
  }

  /// As async_set_quota, setting the capacity only (the rate stays the stored one).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(configure_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_set_capacity(
      std::string_view key, std::uint64_t capacity,
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_configure(key, capacity, std::nullopt, std::forward<Token>(token));
  }

  /// Blocking forms: return the generation written (the connection's
  /// context must run on another thread, as get_token()).
  /// @throws boost::system::system_error with the errors of the async forms,
  /// `would_deadlock` or `context_stopped`; std::invalid_argument as above.
  std::uint64_t set_quota(std::string_view key, std::uint64_t capacity, rate r) {
    return configure_or_throw(key, capacity, r, "set_quota");
  }
  std::uint64_t set_rate(std::string_view key, rate r) {
    return configure_or_throw(key, std::nullopt, r, "set_rate");
  }
  std::uint64_t set_capacity(std::string_view key, std::uint64_t capacity) {
    return configure_or_throw(key, capacity, std::nullopt, "set_capacity");
  }
  /// As above, reporting failure through `ec`.
  std::uint64_t set_quota(std::string_view key, std::uint64_t capacity, rate r,
                          boost::system::error_code& ec) {
    return configure_blocking(key, capacity, r, ec);
  }
  std::uint64_t set_rate(std::string_view key, rate r, boost::system::error_code& ec) {
    return configure_blocking(key, std::nullopt, r, ec);
  }
  std::uint64_t set_capacity(std::string_view key, std::uint64_t capacity,
                             boost::system::error_code& ec) {
    return configure_blocking(key, capacity, std::nullopt, ec);
  }

  /// `key`'s quota from this object's configuration (the function's, or the
  /// fixed one; a quota stored in Redis by set_quota() is not read here).
  redis_quota quota(std::string_view key) const {
    if (!impl_) throw std::logic_error("ratelimit::redis_keyed_limiter: a moved-from limiter");
    return impl_->quota_of(key);
  }

  /// Closes this limiter object (not the keys): queued and later requests,
  /// and tries whose request is out, complete with `bucket_closed`.
  /// Idempotent; any thread.
  void close() {
    if (impl_) impl_->close(error::bucket_closed);
  }

  bool is_open() const { return impl_ && impl_->is_open(); }

  /// Cancels every queued request of this object (`operation_aborted`); returns how many.
  std::size_t cancel() { return impl_ ? impl_->cancel() : 0; }

  /// Requests queued in this object now, all keys.
  std::size_t waiting() const { return impl_ ? impl_->waiting() : 0; }

  /// Keys this process holds state for now (see Memory).
  std::size_t active_keys() const { return impl_ ? impl_->active_keys() : 0; }

  /// The prefix (empty for a moved-from limiter).
  const std::string& prefix() const noexcept {
    static const std::string none;
    return impl_ ? impl_->prefix() : none;
  }

  redis_bucket_options options() const { return impl_ ? impl_->options() : redis_bucket_options{}; }

  /// Counters of this object, every key together (a redis_bucket_stats as
  /// each key's bucket counts them).
  redis_bucket_stats stats() const { return impl_ ? impl_->stats() : redis_bucket_stats{}; }

  /// `key` as a part of joint requests (ratelimit/joint.hpp), as
  /// basic_redis_token_bucket::as_remote: reservation mode only. Each call
  /// makes a part (small: the key and a reference) that co-owns this
  /// limiter's machinery; after the limiter is destroyed or closed, its
  /// requests fail as the closed limiter's, and its refunds are still sent.
  /// A receipt refers to its part weakly, as to any limiter: it gives back
  /// while the part lives, so keep the part as long as its receipts must
  /// give back.
  /// @throws std::invalid_argument in head-only mode, std::logic_error for a
  /// moved-from limiter, std::bad_alloc; what the quota function throws,
  /// and std::invalid_argument for a quota no bucket can have.
  std::shared_ptr<basic_remote_limiter<Clock>> as_remote(std::string_view key) const {
    if (!impl_)
      throw std::logic_error("ratelimit::redis_keyed_limiter::as_remote: a moved-from limiter");
    if (impl_->options().mode != redis_bucket_mode::reserve)
      throw std::invalid_argument(
          "ratelimit::redis_keyed_limiter::as_remote: a joint part needs mode reserve");
    impl_->check_quota(key);
    return std::make_shared<redis_detail::redis_keyed_remote<Clock, WaitTraits>>(impl_,
                                                                                 std::string(key));
  }

 private:
  typename impl_type::pin acquire(std::string_view key, boost::system::error_code& ec) {
    if (!impl_) {
      ec = error::bucket_closed;
      return {};
    }
    return impl_->acquire(key, ec);
  }

  /// A request (`Try` false; `timeout_ns` unused), or a deadline form; a
  /// deferred operation co-owns the machinery (detail::initiation_ref).
  template <bool Try>
  class initiate_get {
   public:
    using executor_type = boost::asio::any_io_executor;
    initiate_get(const std::shared_ptr<impl_type>& impl, const executor_type& ex) noexcept
        : ref_(impl, ex) {}
    executor_type get_executor() const noexcept { return ref_.get_executor(); }

    template <typename Handler>
    void operator()(Handler&& handler, const std::string& key, std::uint64_t n,
                    std::int64_t timeout_ns) const {
      constexpr bool is_try = Try;
      boost::system::error_code ec = error::bucket_closed;
      typename impl_type::pin p;
      if (impl_type* impl = ref_.get()) p = impl->acquire(key, ec);
      if (!p) {
        if constexpr (is_try)
          detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(), ec, false);
        else
          detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(), ec);
        return;
      }
      if constexpr (is_try)
        p->async_get(
            detail::wrapped_handler<std::decay_t<Handler>, redis_detail::to_try_result>{
                std::forward<Handler>(handler), {}},
            n, bucket_type::deadline_after(timeout_ns));
      else
        p->async_get(std::forward<Handler>(handler), n);
    }

   private:
    detail::initiation_ref<impl_type, executor_type> ref_;
  };

  class initiate_try {
   public:
    using executor_type = boost::asio::any_io_executor;
    initiate_try(const std::shared_ptr<impl_type>& impl, const executor_type& ex) noexcept
        : ref_(impl, ex) {}
    executor_type get_executor() const noexcept { return ref_.get_executor(); }
    template <typename Handler>
    void operator()(Handler&& handler, const std::string& key, std::uint64_t n) const {
      boost::system::error_code ec = error::bucket_closed;
      typename impl_type::pin p;
      if (impl_type* impl = ref_.get()) p = impl->acquire(key, ec);
      if (!p)
        return detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(), ec,
                                       false);
      p->async_try(std::forward<Handler>(handler), n);
    }

   private:
    detail::initiation_ref<impl_type, executor_type> ref_;
  };

  class initiate_configure {
   public:
    using executor_type = boost::asio::any_io_executor;
    initiate_configure(const std::shared_ptr<impl_type>& impl, const executor_type& ex) noexcept
        : ref_(impl, ex) {}
    executor_type get_executor() const noexcept { return ref_.get_executor(); }
    template <typename Handler>
    void operator()(Handler&& handler, const std::string& key,
                    std::optional<std::uint64_t> capacity, std::optional<rate> r) const {
      if (impl_type* impl = ref_.get())
        impl->async_configure(std::forward<Handler>(handler), key, capacity, r);
      else
        detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(),
                                boost::system::error_code(error::bucket_closed), std::uint64_t{0});
    }

   private:
    detail::initiation_ref<impl_type, executor_type> ref_;
  };

  static void check_configuration(std::optional<std::uint64_t> capacity, std::optional<rate> r) {
    if (capacity) detail::check_capacity(*capacity);
    if (r) detail::reduce(*r);
  }

  template <typename Token>
  auto async_configure(std::string_view key, std::optional<std::uint64_t> capacity,
                       std::optional<rate> r, Token&& token) {
    check_configuration(capacity, r);
    return boost::asio::async_initiate<Token, configure_signature>(
        initiate_configure(impl_, executor_), token, std::string(key), capacity, r);
  }

  std::uint64_t configure_blocking(std::string_view key, std::optional<std::uint64_t> capacity,
                                   std::optional<rate> r, boost::system::error_code& ec) {
    check_configuration(capacity, r);
    if (!impl_) {
      ec = error::bucket_closed;
      return 0;
    }
    return bucket_type::blocking_configure(executor_, ec, [&](auto handler) {
      impl_->async_configure(std::move(handler), key, capacity, r);
    });
  }

  std::uint64_t configure_or_throw(std::string_view key, std::optional<std::uint64_t> capacity,
                                   std::optional<rate> r, const char* what) {
    boost::system::error_code ec;
    const std::uint64_t g = configure_blocking(key, capacity, r, ec);
    if (ec)
      throw boost::system::system_error(ec, std::string("ratelimit::redis_keyed_limiter::") + what);
    return g;
  }

  void shutdown() noexcept {
    if (impl_) impl_->close(boost::asio::error::operation_aborted);
  }

  executor_type executor_;
  std::shared_ptr<impl_type> impl_;
};

/// The keyed Redis limiter most programs want: local waits on steady_clock.
using redis_keyed_limiter = basic_redis_keyed_limiter<std::chrono::steady_clock>;

}  // namespace ratelimit

#if !defined(RATELIMIT_HEADER_ONLY)
extern template class ratelimit::redis_detail::redis_keyed_impl<
    std::chrono::steady_clock, boost::asio::wait_traits<std::chrono::steady_clock>>;
#endif

#endif  // RATELIMIT_REDIS_REDIS_KEYED_LIMITER_HPP
