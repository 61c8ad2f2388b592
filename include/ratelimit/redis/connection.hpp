//
// ratelimit/redis/connection.hpp: an asynchronous Redis connection on Boost.Asio.
//
// hiredis does the protocol (command formatting, reply parsing); Asio does
// the I/O. One connection pipelines the requests of any number of callers:
// requests are written in batches as they arrive and their replies matched in
// order. Every request has a deadline; a connection that breaks is
// re-established with exponential backoff; AUTH and SELECT are sent first on
// every new connection.
//
#ifndef RATELIMIT_REDIS_CONNECTION_HPP
#define RATELIMIT_REDIS_CONNECTION_HPP

#include <ratelimit/detail/operation.hpp>
#include <ratelimit/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace ratelimit::redis_detail {
class conn_handle;
class call_window;
}  // namespace ratelimit::redis_detail

namespace ratelimit {

/// Where and how to connect. Every value has a meaning or is refused by the
/// connection's constructor with std::invalid_argument (see validate()).
struct redis_config {
  /// Host name or address; must not be empty.
  std::string host = "127.0.0.1";
  /// TCP port, 1 to 65535.
  std::uint16_t port = 6379;
  /// AUTH is sent when `password` is not empty: `AUTH password`, or
  /// `AUTH username password` (Redis 6 ACL users) when `username` is not
  /// empty too. A username without a password is refused.
  std::string username;
  std::string password;
  /// SELECT is sent when not 0; must not be negative.
  int database = 0;
  /// Resolve + TCP connect, bounded; must be positive.
  std::chrono::milliseconds connect_timeout{1000};
  /// Every request completes within this time of being started: with its
  /// reply, or with `redis_unavailable`. A request already written that times
  /// out means the server is stuck: the connection is dropped and re-made.
  /// Must be positive.
  std::chrono::milliseconds request_timeout{1000};
  /// Backoff between failed connection attempts: doubles from min to max.
  /// A connection that closes before its server gave one healthy reply
  /// counts as a failed attempt. Both positive, min <= max.
  std::chrono::milliseconds reconnect_min{20};
  std::chrono::milliseconds reconnect_max{1000};
  /// A reply larger than this (bytes buffered without a complete reply) is a
  /// protocol error: the request fails with `redis_bad_reply` and the
  /// connection is re-made. Must be positive.
  std::size_t max_reply_bytes = 16 * 1024 * 1024;
  /// The window of the buckets and keyed limiters built on this connection:
  /// the most script calls they keep out at once, all keys together (a
  /// reservation call, or head-only mode's request for its head; not tries,
  /// refunds or reconfigurations, nor the user's async_exec: a burst of
  /// tries on many keys is not bounded by it). Requests beyond it wait in
  /// their limiter's queue, where no timeout runs and a key's requests
  /// coalesce into its next call, instead of in the connection's queue,
  /// where every request's `request_timeout` runs from the start: so a burst
  /// on many keys cannot time out for queueing alone. A call runs on the
  /// server for about a microsecond per request it carries (at most
  /// `redis_bucket_options::max_batch`), so with the defaults (256 calls of at
  /// most 256 requests) what our calls put on the server ahead of a new one
  /// is about 65 ms at worst, against the default `request_timeout` of 1 s:
  /// keep `max_calls_in_flight · max_batch` microseconds well under it. A
  /// narrow window costs throughput when many keys are busy (10 000 keys
  /// through one connection ran at about 0.6 times the speed with 64).
  /// Limiters waiting for the window are served in the order they found it
  /// full. At least 1.
  std::size_t max_calls_in_flight = 256;
};

/// Throws std::invalid_argument, naming the option and the value, unless `c` is valid.
inline void validate(const redis_config& c) {
  const auto fail = [](const std::string& what) {
    throw std::invalid_argument("ratelimit::redis_config: " + what);
  };
  const auto ms = [](std::chrono::milliseconds d) { return std::to_string(d.count()) + " ms"; };
  if (c.host.empty()) fail("host must not be empty");
  if (c.port == 0) fail("port must be 1 to 65535 (got 0)");
  if (!c.username.empty() && c.password.empty()) fail("username given without a password");
  if (c.database < 0)
    fail("database must not be negative (got " + std::to_string(c.database) + ")");
  if (c.connect_timeout.count() <= 0)
    fail("connect_timeout must be positive (got " + ms(c.connect_timeout) + ")");
  if (c.request_timeout.count() <= 0)
    fail("request_timeout must be positive (got " + ms(c.request_timeout) + ")");
  if (c.reconnect_min.count() <= 0)
    fail("reconnect_min must be positive (got " + ms(c.reconnect_min) + ")");
  if (c.reconnect_max < c.reconnect_min)
    fail("reconnect_max (" + ms(c.reconnect_max) + ") must not be below reconnect_min (" +
         ms(c.reconnect_min) + ")");
  if (c.max_reply_bytes == 0) fail("max_reply_bytes must be positive (got 0)");
  if (c.max_calls_in_flight == 0) fail("max_calls_in_flight must be at least 1 (got 0)");
}

/// A parsed reply (RESP2).
struct redis_reply {
  enum class kind { nil, integer, string, status, error, array };
  kind type = kind::nil;
  long long integer = 0;
  std::string str;  // string, status and error replies
  std::vector<redis_reply> elements;
};

/// Counters, for tests and monitoring.
struct redis_connection_stats {
  std::uint64_t connects = 0;         // connections established
  std::uint64_t failed_connects = 0;  // attempts that failed (refused, timeout, AUTH/SELECT)
  std::uint64_t requests = 0;         // requests written
  std::uint64_t timeouts = 0;         // requests that timed out
  std::uint64_t writes = 0;           // socket writes (a write carries a pipelined batch)
  /// The most requests this connection held at once (queued or written,
  /// not answered yet), every caller's together (AUTH and SELECT not
  /// counted).
  std::uint64_t peak_outstanding = 0;
  /// Script calls of the connection's buckets and keys out now (slots of
  /// the window taken, including one on its way to a waiting limiter): 0
  /// once they are all quiet.
  std::uint64_t calls_in_flight = 0;
  /// How often a bucket or key found the window (`max_calls_in_flight`)
  /// full and waited for a slot: a window that binds often is a sign of
  /// more busy keys than it lets out at once.
  std::uint64_t window_waits = 0;
};

/// One Redis connection shared by many callers.
///
/// @par Thread safety
/// Every member function may be called concurrently from any thread, except
/// the special members. Internally the connection runs on a strand of its
/// executor, which may be run by one thread or many.
///
/// @par Lifetime
/// The constructor starts connecting (on the executor). Destruction, or
/// close(), fails every outstanding request with `operation_aborted`; an
/// operation launched later from a deferred token fails the same way. The
/// connection must be destroyed before its execution context, and outlive
/// the buckets and keyed limiters built on it and the remote parts of them
/// the user holds (what their machinery sends later co-owns the
/// implementation, as a deferred operation does, and fails the same way).
class redis_connection {
 public:
  using executor_type = boost::asio::any_io_executor;
  using signature = void(boost::system::error_code, redis_reply);

  /// @throws std::invalid_argument for an invalid configuration (see validate()).
  redis_connection(const executor_type& ex, redis_config config);

  template <typename ExecutionContext>
  requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
  redis_connection(ExecutionContext& ctx, redis_config config)
      : redis_connection(executor_type(ctx.get_executor()), std::move(config)) {}

  redis_connection(const redis_connection&) = delete;
  redis_connection& operator=(const redis_connection&) = delete;
  ~redis_connection();

  executor_type get_executor() const noexcept;
  const redis_config& config() const noexcept;

  /// Sends one command (`args[0]` is the command name) and completes with its reply.
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec, ratelimit::redis_reply reply)`:
  /// success with the reply; `ratelimit::error::redis_error` with the
  /// message in `reply.str` when Redis answered with an error;
  /// `ratelimit::error::redis_unavailable` when the server cannot be reached
  /// (immediately while reconnecting after a failed attempt) or did not answer
  /// within `request_timeout`; `ratelimit::error::redis_bad_reply` when the
  /// reply was malformed or larger than `max_reply_bytes`;
  /// `boost::asio::error::operation_aborted` after close().
  /// The handler is never invoked inside this function; it runs on its
  /// associated executor (the connection's executor by default), with its
  /// associated allocator. Throws (std::bad_alloc) with nothing sent.
  ///
  /// @par Per-Operation Cancellation
  /// Not supported: every request is bounded by `request_timeout` instead.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(signature)
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_exec(std::vector<std::string> args,
                  Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, signature>(initiate_exec(impl_, executor_), token,
                                                         std::move(args));
  }

  /// True while a connection to the server is established (and AUTH/SELECT sent).
  bool is_connected() const;

  /// The last error the server gave to AUTH or SELECT, or the last connection
  /// failure, for diagnostics ("" when none).
  std::string last_error() const;

  redis_connection_stats stats() const;

  /// Fails every outstanding request with `operation_aborted`, closes the
  /// socket and stops reconnecting; later requests fail the same way. Idempotent.
  void close();

  class impl;

 private:
  friend class redis_detail::conn_handle;  // (sends as a deferred operation does)

  using op_base = detail::completion_base<boost::system::error_code, redis_reply>;

  /// Hands `op` (owned from here on: destroyed if this throws) to the
  /// connection, with the command `args`.
  static void start(const std::shared_ptr<impl>& self, std::vector<std::string> args, op_base* op);

  /// Co-owns the connection, so that an operation launched later (a
  /// deferred token) after the connection is gone fails cleanly.
  class initiate_exec {
   public:
    using executor_type = redis_connection::executor_type;

    initiate_exec(std::shared_ptr<impl> self, const executor_type& ex) noexcept
        : self_(std::move(self)), ex_(ex) {}

    executor_type get_executor() const noexcept { return ex_; }

    template <typename Handler>
    void operator()(Handler&& handler, std::vector<std::string> args) const {
      using op_type =
          detail::handler_op<detail::plain_completion<boost::system::error_code, redis_reply>,
                             std::decay_t<Handler>>;
      start(self_, std::move(args), op_type::create(std::forward<Handler>(handler), ex_));
    }

   private:
    std::shared_ptr<impl> self_;
    executor_type ex_;
  };

  executor_type executor_;
  std::shared_ptr<impl> impl_;
  std::shared_ptr<redis_detail::call_window> window_;  // (max_calls_in_flight)
};

}  // namespace ratelimit

#endif  // RATELIMIT_REDIS_CONNECTION_HPP
