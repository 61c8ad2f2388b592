//
// ratelimit/redis/redis_token_bucket.hpp: a token bucket shared through Redis.
//
#ifndef RATELIMIT_REDIS_REDIS_TOKEN_BUCKET_HPP
#define RATELIMIT_REDIS_REDIS_TOKEN_BUCKET_HPP

#include <ratelimit/detail/wrapped_handler.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/rate.hpp>
#include <ratelimit/redis/connection.hpp>
#include <ratelimit/redis/detail/redis_bucket_impl.hpp>
#include <ratelimit/redis/options.hpp>
#include <ratelimit/remote_limiter.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/wait_traits.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace ratelimit {

/// A token bucket whose state lives in one Redis key, shared by every client
/// (thread, process, host) that uses the same key.
///
/// The configuration (capacity and rate) stored with the key is
/// authoritative, and has a generation (redis_bucket_options::generation):
/// clients made with an older one follow the stored configuration (and
/// report it: capacity(), get_rate(), generation()); one made with a newer
/// generation migrates the key to its own; set_rate(), set_capacity() and
/// reconfigure() write a new one for every client. Clients of the same
/// generation must agree (another configuration fails with `redis_error`).
///
/// Semantics are the local bucket's: at most `capacity` tokens, refilled
/// continuously at the rate, exact integer arithmetic, starting full. The
/// arithmetic runs on the Redis server, atomically, in a Lua script, on the
/// server's clock: clients' clocks never enter the decision, only the local
/// waits. A key expires when the bucket would be full again (unless it holds
/// a configuration written by set_rate(), set_capacity() or reconfigure()).
///
/// How requests reach Redis is the `mode` option (redis_bucket_mode):
/// - `head_only` (the default): waiters of one object queue locally in FIFO
///   order and only the head asks Redis; a denied head waits on a local timer
///   for the time the script says its tokens will be there, then asks again.
///   Across processes there is no line: whichever asks first when tokens are
///   there gets them. One hot key is bounded by round trips (one request at a
///   time per object); leasing (`lease`) trades exactness for speed.
/// - `reserve`: every request goes to Redis at once, requests queued together
///   in one script call (at most `max_batch`), at most `max_in_flight` calls
///   out at once (and all the buckets and keys of the connection together at
///   most its `redis_config::max_calls_in_flight`). The script *reserves* each
///   request's tokens, the level going into debt up to `horizon` ahead, and
///   answers with the instant they are due on the server's clock; the request
///   is granted then (that long after the reply arrives: never early), without
///   asking again. So the key keeps one line for all processes, in order of
///   arrival at Redis (fair), at one round trip per grant, exact, and one hot
///   key is no longer bounded by round trips. A request that would be due
///   further than `horizon` ahead fails at once with `exceeds_horizon`, taking
///   nothing. A key is used in one mode only (the other mode's requests fail
///   with `redis_error`).
///
/// The script never writes to, expires or deletes a key that is not a
/// bucket: such a key (another type, or a hash with other fields) makes every
/// request fail with `redis_error`.
///
/// @tparam Clock, WaitTraits The clock of the local timers (tests use a
/// skewed one to show that client clocks do not matter).
///
/// @par Thread safety
/// As the local bucket: every member function may be called concurrently
/// from any thread, except the special members.
///
/// @par Lifetime
/// The connection must outlive the bucket and its remote part (as_remote())
/// while the user holds it. Once they are destroyed, the connection may be
/// destroyed right after: what the bucket's machinery still sends (from a
/// reply being handled on another thread at that moment; a joint request
/// holding the remote part, failing or destroyed, and a receipt giving back
/// through it meanwhile) co-owns the connection's implementation, as an
/// operation launched from a deferred token does, and fails with
/// `operation_aborted` once the connection is gone, or is destroyed unsent
/// while its context is destroyed (a refund's tokens are then wasted, never
/// over-granted). Such a joint request must end, as any operation on the
/// connection's context, before that context is destroyed (it may run on
/// another context). Destroying the bucket completes
/// every waiter, and every try whose request is out, with
/// `operation_aborted`; a script request in flight then completes into
/// nothing. A moved-from bucket keeps its executor and behaves as a closed
/// one (requests complete with `bucket_closed`).
template <typename Clock, typename WaitTraits = boost::asio::wait_traits<Clock>>
class basic_redis_token_bucket {
  using impl_type = redis_detail::redis_bucket_impl<Clock, WaitTraits>;

 public:
  using executor_type = boost::asio::any_io_executor;
  using try_signature = void(boost::system::error_code, bool);
  /// A reconfiguration's: the generation it wrote.
  using configure_signature = void(boost::system::error_code, std::uint64_t);

  /// A bucket of `capacity` tokens refilling at `r`, stored at `key`.
  /// @throws std::invalid_argument if `capacity` is 0, `r` is not a positive
  /// rate, capacity and rate cannot be computed exactly in Redis's Lua
  /// (capacity * (microseconds per token, reduced) must stay below 2^53), or
  /// an option is invalid (see validate(const redis_bucket_options&, ...)).
  basic_redis_token_bucket(redis_connection& conn, std::string key, std::uint64_t capacity, rate r,
                           redis_bucket_options options = {})
      : executor_(conn.get_executor()),
        impl_(std::make_shared<impl_type>(redis_detail::conn_handle(conn), std::move(key), capacity,
                                          r, options)),
        remote_(options.mode == redis_bucket_mode::reserve
                    ? std::make_shared<redis_detail::redis_remote<Clock, WaitTraits>>(impl_)
                    : nullptr) {}

  /// Moves the bucket; waiters stay queued. The moved-from bucket keeps its
  /// executor and behaves as a closed one.
  basic_redis_token_bucket(basic_redis_token_bucket&& other) noexcept
      : executor_(other.executor_),
        impl_(std::move(other.impl_)),
        remote_(std::move(other.remote_)) {}
  basic_redis_token_bucket& operator=(basic_redis_token_bucket&& other) noexcept {
    if (this != &other) {
      shutdown();
      executor_ = other.executor_;
      impl_ = std::move(other.impl_);
      remote_ = std::move(other.remote_);
    }
    return *this;
  }
  basic_redis_token_bucket(const basic_redis_token_bucket&) = delete;
  basic_redis_token_bucket& operator=(const basic_redis_token_bucket&) = delete;

  /// Completes every waiter with `operation_aborted`.
  ~basic_redis_token_bucket() { shutdown(); }

  /// The connection's executor: timers run and default completions happen there.
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
  /// `exceeds_capacity` at once if `n > capacity()`; `bucket_closed` if the
  /// bucket is or gets closed; `operation_aborted` if the wait is cancelled or
  /// the bucket destroyed; with the `fail_closed` policy, `redis_unavailable`
  /// when Redis is unavailable: it cannot be reached, does not answer within
  /// the connection's `request_timeout`, or answers with an error meaning
  /// "not now" (LOADING, BUSY, READONLY... see classify_redis_error());
  /// `redis_error` when Redis refuses (e.g. the key holds another type, a
  /// hash that is not a bucket, or a bucket of another configuration) and
  /// `redis_bad_reply` for a reply of the wrong shape; in reservation mode,
  /// `exceeds_horizon` when its tokens would be due further than `horizon`
  /// ahead (it took nothing). A request for 0 tokens completes with success
  /// in its turn (in reservation mode: once the requests before it are
  /// sent), without asking Redis.
  ///
  /// The handler is never invoked inside this function; it runs on its
  /// associated executor (the connection's by default).
  ///
  /// @par Per-Operation Cancellation
  /// `terminal`, `partial` and `total`: the waiter leaves the local queue and
  /// completes with `operation_aborted`. Head-only mode: if its request was
  /// in flight and Redis granted it, those tokens are kept for the next
  /// waiter only up to the lease size (none without leasing). Reservation
  /// mode: a reservation not due yet is given back to Redis (one more round
  /// trip, at once, or when its call's reply arrives); a token given back may
  /// then serve a request that reached Redis later, before the reservations
  /// made in between come due. Giving back is best effort: if it fails
  /// (Redis unavailable, out of memory) the tokens are wasted. Either way a
  /// cancellation may waste tokens, never over-grant.
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
    return boost::asio::async_initiate<Token, try_signature>(initiate_try(impl_, executor_), token,
                                                             n);
  }

  /// Same as `async_try_get_token(1, token)`.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(try_signature) Token =
                boost::asio::default_completion_token_t<executor_type>>
  requires(!std::is_integral_v<std::remove_cvref_t<Token>>) auto async_try_get_token(
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_try_get_token(1, std::forward<Token>(token));
  }

  /// Asynchronously waits at most `timeout` (from the initiation, on the
  /// bucket's clock) for `n` tokens, in line with the other waiters.
  ///
  /// The deadline is about when the tokens are due: the request is granted
  /// if, when it reaches Redis, its tokens are due within what is left of
  /// `timeout` (nothing left: only if they are there now), and is refused,
  /// taking nothing, otherwise. Reservation mode: the time left goes into the
  /// script with the request, so a refusal comes with the reply, at once, and
  /// needs no second round trip. Head-only mode: the head's reply says when
  /// its tokens would be there; a request behind the head learns it when it
  /// gets there. The grant itself arrives with the reply, or at the due time
  /// (up to a round trip after a due time at the deadline).
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec, bool granted)`: `(success, true)`
  /// once the tokens are taken; `(success, false)` when they would not be
  /// due in time; errors as async_get_token (a horizon shorter than the
  /// timeout still gives `exceeds_horizon`). Never invoked inside this
  /// function.
  ///
  /// @par Per-Operation Cancellation
  /// As async_get_token (`(operation_aborted, false)`).
  template <typename Rep, typename Period,
            BOOST_ASIO_COMPLETION_TOKEN_FOR(try_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_try_get_token_for(
      std::chrono::duration<Rep, Period> timeout, std::uint64_t n,
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, try_signature>(
        initiate_get_for(impl_, executor_), token, n, detail::saturating_ns(timeout));
  }

  /// Blocks until `n` tokens are granted (true), or until it is known that
  /// they would not be due within `timeout` (false, nothing taken), FIFO
  /// with the other waiters: the deadline rule of async_try_get_token_for.
  /// That answer comes with a reply (reservation mode: the request's own,
  /// sent at once or when the window has room), so the call may return
  /// false a little after `timeout`; in head-only mode a request behind the
  /// head learns it only when it reaches the head.
  /// @throws boost::system::system_error as get_token().
  template <typename Rep, typename Period>
  bool try_get_token_for(std::chrono::duration<Rep, Period> timeout, std::uint64_t n = 1) {
    boost::system::error_code ec;
    const bool granted = try_get_token_for(timeout, n, ec);
    if (ec)
      throw boost::system::system_error(ec, "ratelimit::redis_token_bucket::try_get_token_for");
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
    return impl_->get_blocking_for(n, detail::saturating_ns(timeout), ec);
  }

  /// Blocks the calling thread until `n` tokens are granted, FIFO with the
  /// asynchronous waiters of this bucket object.
  ///
  /// Every grant needs the connection's executor (a round trip, or a timer),
  /// so a call on a thread that runs that executor's context fails at once
  /// with `would_deadlock`, and a call while that context is a stopped
  /// io_context with `context_stopped`.
  /// @throws boost::system::system_error with the errors of async_get_token,
  /// `would_deadlock` or `context_stopped`.
  void get_token(std::uint64_t n = 1) {
    boost::system::error_code ec;
    get_token(n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::redis_token_bucket::get_token");
  }

  /// As get_token(n), reporting failure through `ec`.
  void get_token(std::uint64_t n, boost::system::error_code& ec) {
    if (!impl_) {
      ec = error::bucket_closed;
      return;
    }
    impl_->get_blocking(n, ec);
  }

  /// Closes this bucket object (not the key): queued and later requests, and
  /// tries whose request is out, complete with `bucket_closed`. Idempotent;
  /// any thread.
  void close() {
    if (impl_) impl_->close(error::bucket_closed);
  }

  bool is_open() const { return impl_ && impl_->is_open(); }

  /// Cancels every queued request of this object (`operation_aborted`); returns how many.
  std::size_t cancel() { return impl_ ? impl_->cancel() : 0; }

  /// Requests queued in this object now.
  std::size_t waiting() const { return impl_ ? impl_->waiting() : 0; }

  /// The configuration this object runs with: the one it was made with,
  /// until a reply tells it the key holds a newer generation (then that
  /// one: see redis_bucket_options::generation), or its own set_rate(),
  /// set_capacity() or reconfigure() writes one.
  std::uint64_t capacity() const noexcept { return impl_ ? impl_->capacity() : 0; }
  rate get_rate() const noexcept { return impl_ ? impl_->get_rate() : rate{}; }
  std::uint64_t generation() const noexcept { return impl_ ? impl_->generation() : 0; }

  /// Writes a new configuration for the key, in Redis, for every process:
  /// `capacity` tokens refilling at `r`, with the next generation (one above
  /// both the stored one and this object's), kept in Redis (the key no longer
  /// expires when full: it holds a configuration other processes may not
  /// have; after the key is deleted, objects that took the configuration on
  /// keep running with it, and write it again at their generation, until
  /// they are made again). The bucket's state is migrated by the
  /// rule of redis_bucket_options::generation: its level is refilled at the
  /// old rate up to now, then its whole tokens carry over (a debt of
  /// reservations stays a debt) up to the new capacity, and a full bucket
  /// stays full; fractions of a token are dropped (never over-granting).
  /// Reservations already made keep their due times. This object takes the
  /// new configuration on at the reply; every other client of the key does
  /// with its next reply (it is told it: no extra round trip), and runs its
  /// requests with it from then on.
  ///
  /// A request for more tokens than an object's capacity fails at once, as
  /// before: an object that has not heard of a raised capacity yet fails
  /// such a request that a told one would serve; a lowered capacity fails
  /// the requests that ask more than it, when the object is told it (with
  /// `exceeds_capacity`, taking nothing).
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec, std::uint64_t generation)`: the
  /// generation written; `bucket_closed` for a closed or moved-from bucket;
  /// `redis_unavailable` when Redis is unavailable (no fault policy applies:
  /// nothing changed, or, after a timeout, the change may have been made);
  /// `redis_error` when Redis refuses (a key that is not a bucket, or one of
  /// the other mode). It completes with its reply, also if the bucket is
  /// closed or destroyed meanwhile. Never invoked inside this function.
  ///
  /// @par Per-Operation Cancellation
  /// Not supported (one round trip, bounded by the connection's `request_timeout`).
  /// @throws std::invalid_argument if `capacity` is 0, `r` is not a positive
  /// rate, or they cannot be computed exactly in Redis (as the constructor;
  /// for set_rate and set_capacity, with the other part this object has:
  /// the script checks them again with the stored one, and refuses with
  /// `redis_error`).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(configure_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_reconfigure(std::uint64_t capacity, rate r,
                         Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_configure(capacity, r, std::forward<Token>(token));
  }

  /// As async_reconfigure, setting the rate only: the capacity stays the
  /// one stored with the key (this object's if none is).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(configure_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_set_rate(rate r,
                      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_configure(std::nullopt, r, std::forward<Token>(token));
  }

  /// As async_reconfigure, setting the capacity only: the rate stays the
  /// one stored with the key (this object's if none is).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(configure_signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_set_capacity(
      std::uint64_t capacity,
      Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_configure(capacity, std::nullopt, std::forward<Token>(token));
  }

  /// Blocking forms of async_reconfigure, async_set_rate and
  /// async_set_capacity: return the generation written. They need the
  /// connection's context running on another thread (as get_token()).
  /// @throws boost::system::system_error with the errors of the async
  /// forms, `would_deadlock` or `context_stopped`; std::invalid_argument as
  /// async_reconfigure.
  std::uint64_t reconfigure(std::uint64_t capacity, rate r) {
    return configure_or_throw(capacity, r, "reconfigure");
  }
  std::uint64_t set_rate(rate r) { return configure_or_throw(std::nullopt, r, "set_rate"); }
  std::uint64_t set_capacity(std::uint64_t capacity) {
    return configure_or_throw(capacity, std::nullopt, "set_capacity");
  }
  /// As above, reporting failure through `ec`.
  std::uint64_t reconfigure(std::uint64_t capacity, rate r, boost::system::error_code& ec) {
    return configure_blocking(capacity, r, ec);
  }
  std::uint64_t set_rate(rate r, boost::system::error_code& ec) {
    return configure_blocking(std::nullopt, r, ec);
  }
  std::uint64_t set_capacity(std::uint64_t capacity, boost::system::error_code& ec) {
    return configure_blocking(capacity, std::nullopt, ec);
  }
  /// The key (empty for a moved-from bucket).
  const std::string& key() const noexcept {
    static const std::string none;
    return impl_ ? impl_->key() : none;
  }
  redis_bucket_options options() const { return impl_ ? impl_->options() : redis_bucket_options{}; }

  /// Counters of this object.
  redis_bucket_stats stats() const { return impl_ ? impl_->stats() : redis_bucket_stats{}; }

  /// This bucket as a part of joint requests (ratelimit/joint.hpp), all or
  /// nothing with local buckets and keys, e.g.
  /// `ratelimit::async_acquire({ratelimit::part(b.as_remote(), 1), ratelimit::part(local, 1)}, t)`.
  /// The part reserves its tokens in Redis (one round trip, coalesced with
  /// this object's other requests); the joint request takes them when every
  /// part is granted, or forgets them (refunded if not due yet: best effort,
  /// as a cancellation's), and a receipt gives back (refunded, up to the
  /// capacity). Every call returns the same limiter, which co-owns this
  /// bucket's machinery: after the bucket object is destroyed or closed, its
  /// requests fail as the closed bucket's (and a receipt still gives back).
  /// Reservation mode only.
  /// @throws std::invalid_argument in head-only mode (a head-only bucket
  /// cannot reserve), std::logic_error for a moved-from bucket.
  std::shared_ptr<basic_remote_limiter<Clock>> as_remote() const {
    if (!impl_)
      throw std::logic_error("ratelimit::redis_token_bucket::as_remote: a moved-from bucket");
    if (!remote_)
      throw std::invalid_argument(
          "ratelimit::redis_token_bucket::as_remote: a joint part needs mode reserve");
    return remote_;
  }

 private:
  /// A deferred operation co-owns the impl (detail::initiation_ref), so one
  /// launched after the bucket is gone completes with operation_aborted.
  class initiate_get_token {
   public:
    using executor_type = boost::asio::any_io_executor;
    initiate_get_token(const std::shared_ptr<impl_type>& impl, const executor_type& ex) noexcept
        : ref_(impl, ex) {}
    executor_type get_executor() const noexcept { return ref_.get_executor(); }
    template <typename Handler>
    void operator()(Handler&& handler, std::uint64_t n) const {
      if (impl_type* impl = ref_.get())
        impl->async_get(std::forward<Handler>(handler), n);
      else
        detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(),
                                boost::system::error_code(error::bucket_closed));
    }

   private:
    detail::initiation_ref<impl_type, executor_type> ref_;
  };

  class initiate_get_for {
   public:
    using executor_type = boost::asio::any_io_executor;
    initiate_get_for(const std::shared_ptr<impl_type>& impl, const executor_type& ex) noexcept
        : ref_(impl, ex) {}
    executor_type get_executor() const noexcept { return ref_.get_executor(); }
    template <typename Handler>
    void operator()(Handler&& handler, std::uint64_t n, std::int64_t timeout_ns) const {
      if (impl_type* impl = ref_.get())
        impl->async_get(
            detail::wrapped_handler<std::decay_t<Handler>, redis_detail::to_try_result>{
                std::forward<Handler>(handler), {}},
            n, impl_type::deadline_after(timeout_ns));
      else
        detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(),
                                boost::system::error_code(error::bucket_closed), false);
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
    void operator()(Handler&& handler, std::uint64_t n) const {
      if (impl_type* impl = ref_.get())
        impl->async_try(std::forward<Handler>(handler), n);
      else
        detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(),
                                boost::system::error_code(error::bucket_closed), false);
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
    void operator()(Handler&& handler, std::optional<std::uint64_t> capacity,
                    std::optional<rate> r) const {
      if (impl_type* impl = ref_.get())
        impl->async_configure(std::forward<Handler>(handler), capacity, r);
      else
        detail::post_completion(std::forward<Handler>(handler), ref_.get_executor(),
                                boost::system::error_code(error::bucket_closed), std::uint64_t{0});
    }

   private:
    detail::initiation_ref<impl_type, executor_type> ref_;
  };

  template <typename Token>
  auto async_configure(std::optional<std::uint64_t> capacity, std::optional<rate> r,
                       Token&& token) {
    check_configuration(capacity, r);
    return boost::asio::async_initiate<Token, configure_signature>(
        initiate_configure(impl_, executor_), token, capacity, r);
  }

  /// Validates what can be validated without the stored configuration
  /// (the rest is checked against this object's, then by the script).
  static void check_configuration(std::optional<std::uint64_t> capacity, std::optional<rate> r) {
    if (capacity) detail::check_capacity(*capacity);
    if (r) detail::reduce(*r);
  }

  std::uint64_t configure_blocking(std::optional<std::uint64_t> capacity, std::optional<rate> r,
                                   boost::system::error_code& ec) {
    check_configuration(capacity, r);
    if (!impl_) {
      ec = error::bucket_closed;
      return 0;
    }
    return impl_->configure_blocking(capacity, r, ec);
  }

  std::uint64_t configure_or_throw(std::optional<std::uint64_t> capacity, std::optional<rate> r,
                                   const char* what) {
    boost::system::error_code ec;
    const std::uint64_t g = configure_blocking(capacity, r, ec);
    if (ec)
      throw boost::system::system_error(ec, std::string("ratelimit::redis_token_bucket::") + what);
    return g;
  }

  void shutdown() noexcept {
    if (impl_) impl_->close(boost::asio::error::operation_aborted);
  }

  executor_type executor_;
  std::shared_ptr<impl_type> impl_;
  std::shared_ptr<basic_remote_limiter<Clock>> remote_;  // reservation mode: as_remote()
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
