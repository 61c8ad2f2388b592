//
// ratelimit/redis/detail/redis_bucket_impl.hpp: the machinery behind basic_redis_token_bucket.
//
// Waiters queue locally (the core library's waiter_queue, operations and
// sync_waiter). Only the head of the queue talks to Redis, and only one
// "driver" is active at a time: a script request in flight, or the timer
// (the core's timer_driver) for the time the script said the head's tokens
// will be there. Tokens granted by Redis go into a local pool (`pool_`) from
// which the queue is served; without leasing the pool only ever holds what
// the head asked for.
//
// Leasing accounting: `extras_in_flight_` counts the extra tokens asked for
// by requests in flight (the head's and every try's). A request asks for at
// most `lease - pool_ - extras_in_flight_` extra tokens, and after every step
// the pool is trimmed to `lease - extras_in_flight_`, so tokens held for later
// (in the pool or on their way) never exceed `lease` at any instant: this is
// what the documented bound rests on.
//
// Reservation mode (redis_bucket_mode::reserve): a waiter goes through three
// queues. `queue_` holds those not sent yet; up to `max_batch` of them go in
// one call of the reservation script (reserve_script.hpp), and up to
// `max_in_flight` calls are out at once. A sent waiter waits in `sent_` for
// its call's reply, which gives it its due time: it then waits in
// `reserved_`, ordered by due time, for the timer, and is granted without
// asking again. Each waiter is a `reservation` (its stage, its number in the
// calls, its due times). A waiter cancelled while its call is out is missed
// by the reply, whose reservation for it is refunded; one cancelled while
// reserved is refunded at once (refund_script, best effort: a refund that
// fails wastes tokens, never over-grants). A call that finds Redis
// unavailable puts its waiters back at the front of `queue_` and the fault
// policy applies to them.
//
// Faults: a request that finds Redis unavailable (no connection, a timeout,
// an error reply meaning "not now", or a request that could not even be
// sent) applies the bucket's policy to every queued waiter and, for
// `fault_hold`, to every new request without asking Redis again; the first
// request after that asks Redis again.
//
// Lifetime and locking follow bucket_impl: one mutex; nothing completes while
// it is held; the timer handler, the connection's completions and the
// cancellation handlers hold weak_ptrs.
//
#ifndef RATELIMIT_REDIS_DETAIL_REDIS_BUCKET_IMPL_HPP
#define RATELIMIT_REDIS_DETAIL_REDIS_BUCKET_IMPL_HPP

#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/detail/operation.hpp>
#include <ratelimit/detail/sync_waiter.hpp>
#include <ratelimit/detail/timer_driver.hpp>
#include <ratelimit/detail/waiter.hpp>
#include <ratelimit/detail/wrapped_handler.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/redis/connection.hpp>
#include <ratelimit/redis/detail/call_window.hpp>
#include <ratelimit/redis/detail/hooks.hpp>
#include <ratelimit/redis/detail/reserve_script.hpp>
#include <ratelimit/redis/detail/script.hpp>
#include <ratelimit/redis/options.hpp>
#include <ratelimit/remote_limiter.hpp>

#include <boost/asio/error.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace ratelimit::redis_detail {

using ratelimit::detail::bucket_state;
using ratelimit::detail::finish_mode;
using ratelimit::detail::ready_list;
using ratelimit::detail::waiter_base;
using ratelimit::detail::waiter_queue;

/// A Redis bucket's queued request. The fields are reservation mode's,
/// guarded by the bucket's lock.
class reservation : public waiter_base {
 public:
  enum class stage : std::uint8_t { pending, sent, reserved };
  stage at = stage::pending;
  std::uint64_t seq = 0;     // its number among the requests sent
  std::int64_t due = 0;      // granted then (local clock, ns)
  std::uint64_t due_us = 0;  // the same in the server's clock (us): a remote part's id
  std::int64_t not_after = ratelimit::detail::max_time;
  /// A joint request's remote part: fills in its answer, and it completes
  /// with the reply (see redis_bucket_impl::async_reserve_part).
  void (*report)(reservation*) noexcept = nullptr;  // a deadline form's (local clock, ns)

 protected:
  reservation(fn_type fn, std::uint64_t n) noexcept : waiter_base(fn, n) {}
};

using sync_reservation = ratelimit::detail::basic_sync_waiter<reservation>;

/// The SHA1 of a script, computed once per process (a keyed limiter makes a
/// bucket machinery per active key).
template <const std::string_view& Text>
const std::string& cached_sha1() {
  static const std::string sha = script_sha1(Text);
  return sha;
}

/// A seed for a bucket's retry jitter: one random_device read per process,
/// not per bucket (a keyed limiter makes one per active key).
inline std::uint_fast32_t jitter_seed(const void* p) noexcept {
  static const std::uint_fast32_t base = [] {
    try {
      return static_cast<std::uint_fast32_t>(std::random_device{}());
    } catch (...) {
      return static_cast<std::uint_fast32_t>(
          std::chrono::steady_clock::now().time_since_epoch().count());
    }
  }();
  return base ^ static_cast<std::uint_fast32_t>(reinterpret_cast<std::uintptr_t>(p) >> 4);
}

/// The connection as a machinery's requests reach it: co-owns the
/// connection's implementation, as an operation launched from a deferred
/// token does. A machinery may send after the user destroyed the bucket
/// object and then the connection: from a reply handled on another thread
/// at that moment (a refund, the next call), a joint request holding a
/// remote part destroyed with its context, a receipt giving back. Such a
/// request never reaches a destroyed object: it fails with
/// `operation_aborted` (a refund's tokens wasted, never over-granted).
/// It also reaches the connection's window (call_window.hpp).
class conn_handle {
 public:
  explicit conn_handle(redis_connection& c) noexcept
      : impl_(c.impl_), ex_(c.executor_), window_(c.window_) {}

  /// The connection's executor.
  boost::asio::any_io_executor get_executor() const noexcept { return ex_; }

  /// The window of script calls of the connection's limiters.
  call_window& window() const noexcept { return *window_; }

  /// Sends `args`; `handler(ec, reply)` runs as async_exec's would. Throws
  /// (bad_alloc) with nothing sent and the handler destroyed.
  template <typename Handler>
  void exec(std::vector<std::string> args, Handler&& handler) const {
    redis_connection::initiate_exec(impl_, ex_)(std::forward<Handler>(handler), std::move(args));
  }

  /// A reference that does not keep the implementation alive, for a handler
  /// of one of its requests that sends again (a refund after NOSCRIPT): the
  /// implementation holds that handler until it completes, and a strong
  /// reference would be a cycle, never freed when the requests are never
  /// completed (a context destroyed without running the connection's close).
  class weak_ref {
   public:
    explicit weak_ref(const conn_handle& h) noexcept
        : impl_(h.impl_), ex_(h.ex_), window_(h.window_) {}

    /// The handle; none once the implementation is gone.
    std::optional<conn_handle> lock() const noexcept {
      auto p = impl_.lock();
      if (!p) return std::nullopt;
      return conn_handle(std::move(p), ex_, window_);
    }

   private:
    std::weak_ptr<redis_connection::impl> impl_;
    boost::asio::any_io_executor ex_;
    std::shared_ptr<call_window> window_;  // (holds nothing of ours: no cycle)
  };

 private:
  conn_handle(std::shared_ptr<redis_connection::impl> p, boost::asio::any_io_executor ex,
              std::shared_ptr<call_window> w) noexcept
      : impl_(std::move(p)), ex_(std::move(ex)), window_(std::move(w)) {}

  std::shared_ptr<redis_connection::impl> impl_;
  boost::asio::any_io_executor ex_;
  std::shared_ptr<call_window> window_;
};

/// Told when a bucket machinery of a keyed limiter has nothing left to do
/// (redis_keyed_limiter.hpp), so that it can be dropped. Called unlocked,
/// from the machinery's own step.
template <typename Impl>
class idle_sink {
 public:
  virtual void on_idle(Impl& impl) noexcept = 0;

 protected:
  ~idle_sink() = default;
};

/// The body of a remote part's handler (detail::wrapped_handler): the
/// reservation, filled in before completion, goes with the error code.
template <typename Clock>
struct remote_report {
  typename basic_remote_limiter<Clock>::reservation r;

  template <typename Handler>
  void operator()(Handler& h, boost::system::error_code ec) {
    std::move(h)(ec, ec ? typename basic_remote_limiter<Clock>::reservation{} : r);
  }
};

/// A waiter's (ec) as a try's (ec, granted), for the deadline forms
/// (detail::wrapped_handler): timed_out is "not in time".
struct to_try_result {
  template <typename Handler>
  void operator()(Handler& handler, boost::system::error_code ec) {
    if (ec == boost::asio::error::timed_out)
      std::move(handler)(boost::system::error_code(), false);
    else
      std::move(handler)(ec, !ec);
  }
};

template <typename Clock, typename WaitTraits>
class redis_bucket_impl : public std::enable_shared_from_this<redis_bucket_impl<Clock, WaitTraits>>,
                          public window_user {
 public:
  using executor_type = boost::asio::any_io_executor;
  using try_result = detail::completion_base<boost::system::error_code, bool>;

  /// `fault`: a fault hold shared with other machineries (a keyed
  /// limiter's keys); null: one of its own.
  redis_bucket_impl(conn_handle conn, std::string key, std::uint64_t capacity, const rate& r,
                    const redis_bucket_options& opts,
                    std::shared_ptr<std::atomic<std::int64_t>> fault = nullptr)
      : conn_(std::move(conn)),
        key_(std::move(key)),
        sr_(make_script_rate(capacity, r)),
        rate_(r),
        opts_((validate(opts, capacity), opts)),
        reserve_(opts_.mode == redis_bucket_mode::reserve),
        rr_(reserve_ ? make_reserve_rate_ms(capacity, r, opts_.horizon.count())
                     : reserve_rate{sr_, 0}),
        sha_(reserve_ ? cached_sha1<reserve_script>() : cached_sha1<bucket_script>()),
        executor_(conn_.get_executor()),
        gen_(opts_.generation),
        lease_(opts_.lease),
        fallback_(capacity, ratelimit::detail::reduce(r), now_ns(), capacity),
        fault_(fault ? std::move(fault)
                     : std::make_shared<std::atomic<std::int64_t>>(
                           std::numeric_limits<std::int64_t>::min())) {
    // Made now, not on the first wait: the connection's socket has already
    // given the context a reactor, and a bucket without a timer could not wait.
    timer_.make(executor_);
  }

  const executor_type& get_executor() const noexcept { return executor_; }
  const std::string& key() const noexcept { return key_; }
  const conn_handle& connection() const noexcept { return conn_; }
  /// The configuration this object runs with: its own, or one a reply told
  /// it (or its own set_rate/set_capacity wrote).
  std::uint64_t capacity() const noexcept {
    std::lock_guard lk(mutex_);
    return sr_.capacity;
  }
  rate get_rate() const noexcept {
    std::lock_guard lk(mutex_);
    return rate_;
  }
  std::uint64_t generation() const noexcept {
    std::lock_guard lk(mutex_);
    return gen_;
  }
  const redis_bucket_options& options() const noexcept { return opts_; }

  /// Makes this machinery one key of a keyed limiter: `sink` is told
  /// whenever it becomes idle. Before any request.
  void attach(std::weak_ptr<idle_sink<redis_bucket_impl>> sink) noexcept {
    sink_ = std::move(sink);
    has_sink_ = true;
  }

  /// When this machinery could be dropped and made afresh for its key
  /// without changing anything: `max_time` while it has a request queued,
  /// out or waiting for its due time, a refund not sent, or tokens held;
  /// otherwise now, or (local fallback) when its fallback bucket is full
  /// again (a fresh one starts full).
  std::int64_t forgettable_at(std::int64_t now) {
    std::lock_guard lk(mutex_);
    return forgettable_at_locked(now);
  }

  /// Adds this machinery's counters into `into` (a keyed limiter's totals).
  void add_stats(redis_bucket_stats& into) const {
    std::lock_guard lk(mutex_);
    add_into(into, stats_);
  }

  static void add_into(redis_bucket_stats& into, const redis_bucket_stats& s) noexcept {
    into.round_trips += s.round_trips;
    into.redis_tokens += s.redis_tokens;
    into.granted += s.granted;
    into.lease_dropped += s.lease_dropped;
    into.fail_open_grants += s.fail_open_grants;
    into.fallback_grants += s.fallback_grants;
    into.faults += s.faults;
    into.unavailable_replies += s.unavailable_replies;
    into.reserved += s.reserved;
    into.horizon_refusals += s.horizon_refusals;
    into.refund_calls += s.refund_calls;
    into.refunded += s.refunded;
    into.reconfigurations += s.reconfigurations;
  }

  /// Throws std::invalid_argument, as the constructor does, unless a bucket
  /// of `capacity` tokens at `r` with `opts` can be made.
  static void check(std::uint64_t capacity, const rate& r, const redis_bucket_options& opts) {
    validate(opts, capacity);
    const script_rate sr = make_script_rate(capacity, r);
    if (opts.mode == redis_bucket_mode::reserve)
      (void)make_reserve_rate_ms(capacity, r, opts.horizon.count());
    (void)sr;
  }

  /// The deadline `timeout_ns` (>= 0) from now, saturated.
  static std::int64_t deadline_after(std::int64_t timeout_ns) noexcept {
    return add_ns(now_ns(), std::chrono::nanoseconds(std::max<std::int64_t>(0, timeout_ns)));
  }

  static std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
        .count();
  }

  // --- requests -------------------------------------------------------------

  /// Queues a request for `n` tokens. With a deadline `not_after` (local
  /// clock, ns; max_time: none), it completes with timed_out, taking
  /// nothing, when its tokens would be due after it (as the bucket's
  /// async_try_get_token_for says).
  template <typename Handler>
  void async_get(Handler&& handler, std::uint64_t n,
                 std::int64_t not_after = ratelimit::detail::max_time) {
    using op_type = detail::handler_op<reservation, std::decay_t<Handler>>;
    op_type* op = op_type::create(std::forward<Handler>(handler), executor_, n);
    op->not_after = not_after;
    start(op, n);
  }

  /// A joint request's remote part (reservation mode): reserves `n` and
  /// completes with the reservation at its reply, not at its due time
  /// (`void(error_code, basic_remote_limiter<Clock>::reservation)`: its id
  /// is the due time on the server's clock, for a refund).
  template <typename Handler>
  void async_reserve_part(Handler&& handler, std::uint64_t n) {
    using remote_reservation = typename basic_remote_limiter<Clock>::reservation;
    using wrapped = detail::wrapped_handler<std::decay_t<Handler>, remote_report<Clock>>;
    using op_type = detail::handler_op<reservation, wrapped>;
    op_type* op = op_type::create(wrapped{std::forward<Handler>(handler), {}}, executor_, n);
    op->report = [](reservation* w) noexcept {
      static_cast<op_type*>(w)->handler().body.r = remote_reservation{
          w->due_us, w->tokens,
          typename Clock::time_point(std::chrono::duration_cast<typename Clock::duration>(
              std::chrono::nanoseconds(w->due)))};
    };
    start(op, n);
  }

  /// A remote part's tokens were taken by its joint request.
  void took(std::uint64_t n) noexcept {
    std::lock_guard lk(mutex_);
    stats_.granted += n;
  }

  /// Gives `n` tokens back now (a remote part forgotten, or given back by a
  /// receipt). Best effort.
  void refund_now(std::uint64_t n) noexcept {
    try {
      send_refunds({n});
    } catch (...) {  // out of memory: wasted, never over-granted
    }
  }

  // --- reconfiguration ------------------------------------------------------

  using configure_result = detail::completion_base<boost::system::error_code, std::uint64_t>;

  /// A configuration operation, owned by its reply's handler (a copy of
  /// this): completed once, with the reply; destroyed unrun with the last
  /// copy if the reply never comes (its context is destroyed).
  class pending_configure {
   public:
    /// Owns `op` from here on (destroyed, unrun, if this throws).
    static pending_configure own(configure_result* op, executor_type ex) {
      try {
        return pending_configure(std::make_shared<state>(op, std::move(ex)));
      } catch (...) {
        op->destroy();
        throw;
      }
    }
    void complete(boost::system::error_code ec, std::uint64_t generation) const {
      if (configure_result* op = std::exchange(state_->op, nullptr)) {
        op->result = {ec, generation};
        op->complete(finish_mode::dispatch, state_->ex);
      }
    }

   private:
    struct state {
      state(configure_result* o, executor_type e) noexcept : op(o), ex(std::move(e)) {}
      state(const state&) = delete;
      state& operator=(const state&) = delete;
      ~state() {
        if (op) op->destroy();
      }
      configure_result* op;
      executor_type ex;
    };
    explicit pending_configure(std::shared_ptr<state> s) noexcept : state_(std::move(s)) {}
    std::shared_ptr<state> state_;
  };

  /// Writes a new configuration of this key (configure_script): `capacity`
  /// and/or `r` (the other part kept as stored), with the next generation;
  /// completes with `(ec, generation)` at the reply, having taken it on.
  /// Throws std::invalid_argument, before anything is sent, for a
  /// configuration that no bucket can have.
  template <typename Handler>
  void async_configure(Handler&& handler, std::optional<std::uint64_t> capacity,
                       std::optional<rate> r) {
    using op_type =
        detail::handler_op<detail::plain_completion<boost::system::error_code, std::uint64_t>,
                           std::decay_t<Handler>>;
    std::vector<std::string> args;
    boost::system::error_code ec;
    {
      std::lock_guard lk(mutex_);
      if (closed_)
        ec = closed_ec_;
      else
        args = configure_call_args(capacity, r);  // throws for a bad configuration
    }
    op_type* op = op_type::create(std::forward<Handler>(handler), executor_);
    if (ec) {
      op->result = {ec, 0};
      op->complete(finish_mode::post, executor_);
      return;
    }
    send_configure_call(
        conn_, std::move(args),
        configure_report{this->weak_from_this(), reserve_, pending_configure::own(op, executor_)});
  }

  /// async_configure, blocking (the connection's context runs elsewhere:
  /// detail::blocking_wait_error); returns the generation written.
  std::uint64_t configure_blocking(std::optional<std::uint64_t> capacity, std::optional<rate> r,
                                   boost::system::error_code& ec) {
    return blocking_configure(
        executor_, ec, [&](auto handler) { async_configure(std::move(handler), capacity, r); });
  }

  /// Runs `start(handler)` (an async_configure) and waits for its handler.
  template <typename Start>
  static std::uint64_t blocking_configure(const executor_type& ex, boost::system::error_code& ec,
                                          Start start) {
    ec = detail::blocking_wait_error(ex);
    if (ec) return 0;
    std::promise<std::pair<boost::system::error_code, std::uint64_t>> done;
    auto result = done.get_future();
    start([done = std::move(done)](boost::system::error_code e, std::uint64_t g) mutable {
      done.set_value({e, g});
    });
    try {
      const auto [e, g] = result.get();
      ec = e;
      return g;
    } catch (const std::future_error&) {  // destroyed unrun: its context is gone
      ec = boost::asio::error::operation_aborted;
      return 0;
    }
  }

  /// configure_script's arguments for this key (the caller holds the lock).
  std::vector<std::string> configure_call_args(std::optional<std::uint64_t> capacity,
                                               std::optional<rate> r) const {
    const script_rate own = make_script_rate(capacity.value_or(sr_.capacity), r.value_or(rate_));
    const char what = capacity && r ? 'b' : capacity ? 'c' : 'r';
    return configure_args("", key_, own, what, reserve_, gen_, hooked_server_time());
  }

  /// Where a configuration's reply goes: the machinery that asked (if it
  /// still exists) takes it on, then the operation completes.
  struct configure_report {
    std::weak_ptr<redis_bucket_impl> owner;
    bool reserve;
    pending_configure pending;
    void operator()(boost::system::error_code ec, const stored_config& c) const {
      if (!ec && c.reserve != reserve) ec = error::redis_bad_reply;
      if (!ec)
        if (auto self = owner.lock()) self->take_on(c);
      pending.complete(ec, ec ? 0 : c.generation);
    }
  };

  /// Sends configure_script's `args` (EVAL with the script's text: a
  /// reconfiguration is rare, and needs no second try after NOSCRIPT), then
  /// calls `done(ec, config)`. Throws what sending throws (bad_alloc).
  template <typename Done>
  static void send_configure_call(const conn_handle& conn, std::vector<std::string> args,
                                  Done done) {
    conn.exec(std::move(args), [done = done](boost::system::error_code ec, redis_reply reply) {
      stored_config sc;
      if (!ec) ec = parse_configure_reply(reply, sc);
      bool resend = false;
      done(classify(ec, reply, resend), sc);
    });
  }

  /// Takes on `c` (a configuration this key was given), unless this object
  /// already runs with a newer one.
  void take_on(const stored_config& c) {
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    adopt(c, now_ns(), ready);
    step(std::move(lk), ready, finish_mode::dispatch);
  }

 private:
  /// Queues `op` (a request for `n` tokens), or completes it at once.
  template <typename Op>
  void start(Op* op, std::uint64_t n) {
    try {
      detail::link_cancellation(op->handler(), op, *this);
    } catch (...) {
      op->destroy();
      throw;
    }
    boost::system::error_code ec;
    {
      ready_list ready(executor_, nullptr);
      std::unique_lock lk(mutex_);
      if (closed_) {
        ec = closed_ec_;
      } else if (n > sr_.capacity) {
        ec = error::exceeds_capacity;
      } else {
        queue_.push_back(op);
        step(std::move(lk), ready, finish_mode::post);
        return;
      }
      op->unlink();
    }
    op->set_result(ec);
    op->complete(finish_mode::post, executor_);
  }

 public:
  /// One attempt, no queueing: granted now or not.
  template <typename Handler>
  void async_try(Handler&& handler, std::uint64_t n) {
    using op_type = detail::handler_op<detail::plain_completion<boost::system::error_code, bool>,
                                       std::decay_t<Handler>>;
    op_type* op = op_type::create(std::forward<Handler>(handler), executor_);
    boost::system::error_code ec;
    bool granted = false;
    {
      std::unique_lock lk(mutex_);
      const std::int64_t now = now_ns();
      if (closed_) {
        ec = closed_ec_;
      } else if (n > sr_.capacity) {
        ec = error::exceeds_capacity;
      } else if (!queue_.empty()) {
        granted = false;  // the tokens are owed to the queue
      } else if (take_pool(now, n)) {
        granted = true;
        stats_.granted += n;
      } else if (now < fault_until()) {
        granted = apply_fault_try(now, n, ec);
      } else if (send_try(lk, op, n)) {
        return;  // completes with the reply, or at close()
      } else {
        granted = apply_fault_try(now, n, ec);  // could not even be sent
      }
    }
    op->result = {ec, granted};
    op->complete(finish_mode::post, executor_);
  }

  /// A deadline form's blocking answer: true when granted, false with `ec`
  /// clear when not in time (timed_out).
  bool get_blocking_for(std::uint64_t n, std::int64_t timeout_ns, boost::system::error_code& ec) {
    get_blocking(n, ec, deadline_after(timeout_ns));
    if (ec == boost::asio::error::timed_out) {
      ec = {};
      return false;
    }
    return !ec;
  }

  /// Blocks until granted (with a deadline `not_after`: timed_out as
  /// async_get); fails at once when it could wait forever.
  void get_blocking(std::uint64_t n, boost::system::error_code& ec,
                    std::int64_t not_after = ratelimit::detail::max_time) {
    ec = {};
    // Every grant needs the connection's context (a reply, or a timer).
    ec = detail::blocking_wait_error(executor_);
    if (ec) return;
    // Co-owns the impl until this thread returns: once `w` is queued,
    // another thread may destroy the bucket (completing `w`) while this one
    // is still in step() below, which reads members after unlocking.
    const auto self = this->shared_from_this();
    sync_reservation w(n);
    w.not_after = not_after;
    auto result = w.get_future();
    {
      ready_list ready(executor_, nullptr);
      std::unique_lock lk(mutex_);
      if (closed_) {
        ec = closed_ec_;
        return;
      }
      if (n > sr_.capacity) {
        ec = error::exceeds_capacity;
        return;
      }
      queue_.push_back(&w);
      step(std::move(lk), ready, finish_mode::post);
    }
    ec = result.get();
  }

  // --- cancellation, close --------------------------------------------------

  void cancel_linked(detail::cancel_link_base* link) {
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    waiter_base* w = link->waiter.load(std::memory_order_relaxed);
    if (!w || !w->queued) return;
    if (reserve_) {
      leave(static_cast<reservation*>(w));
      ready.push_back(w, boost::asio::error::operation_aborted);
      return step(std::move(lk), ready, finish_mode::post);
    }
    const bool was_head = queue_.front() == w;
    queue_.erase(w);
    if (in_flight_for_ == w) in_flight_for_ = nullptr;
    ready.push_back(w, boost::asio::error::operation_aborted);
    // A head waiting on the timer for its own tokens: start over for the next one.
    if (was_head) timer_.disarm();
    step(std::move(lk), ready, finish_mode::post);
  }

  void unlink(detail::cancel_link_base* link) {
    std::lock_guard lk(mutex_);
    if (waiter_base* w = link->waiter.load(std::memory_order_relaxed)) w->unlink();
  }

  std::size_t cancel() {
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    const std::size_t n = waiting_locked();
    take_all(ready, boost::asio::error::operation_aborted);
    in_flight_for_ = nullptr;
    timer_.disarm();
    step(std::move(lk), ready, finish_mode::post);
    return n;
  }

  /// Closes: queued waiters, and tries whose request is out, complete with
  /// `ec` (bucket_closed; operation_aborted when the bucket is destroyed).
  void close(boost::system::error_code ec) {
    std::vector<try_result*> tries;
    {
      ready_list ready(executor_, nullptr);
      std::unique_lock lk(mutex_);
      closed_ = true;
      closed_ec_ = ec;
      take_all(ready, ec);
      tries = take_tries();
      in_flight_for_ = nullptr;
      timer_.disarm();
      step(std::move(lk), ready, finish_mode::post);
    }
    complete_tries(std::move(tries), ec);
  }

  bool is_open() const {
    std::lock_guard lk(mutex_);
    return !closed_;
  }

  std::size_t waiting() const {
    std::lock_guard lk(mutex_);
    return waiting_locked();
  }

  redis_bucket_stats stats() const {
    std::lock_guard lk(mutex_);
    return stats_;
  }

  /// The timer's wait finished (timer_driver's handler).
  void on_timer() {
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    if (!timer_.on_wait(now_ns(), *this)) return;
    step(std::move(lk), ready, finish_mode::dispatch);
  }

  /// A slot of the connection's window, handed to this machinery after it
  /// found the window full (call_window.hpp): the next step's call uses it,
  /// or gives it back. (Run on the context, maybe outside the executor's
  /// strand: completions are posted.)
  void take_slot(window_slot slot) override {
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    slot_wanted_ = false;
    handover_lost_.store(false, std::memory_order_relaxed);
    spare_ = std::move(slot);
    step(std::move(lk), ready, finish_mode::post);
  }

  /// The slot this machinery waits for could not be handed over: its next
  /// step registers again.
  void handover_lost() noexcept override { handover_lost_.store(true, std::memory_order_release); }

 private:
  // --- the driver -----------------------------------------------------------

  /// Serves what can be served, starts the next driver action if none is
  /// active, then (unlocked) finishes the waiters that left the queue and
  /// sends the request it decided on. Never throws: a request that cannot
  /// be built or sent is a fault.
  void step(std::unique_lock<std::mutex> lk, ready_list& ready, finish_mode mode) {
    if (reserve_) return step_reserve(std::move(lk), ready, mode);
    std::optional<std::vector<std::string>> send;
    std::uint64_t need = 0, extra = 0;
    sent_with as;
    window_slot slot;
    bool idle = false;
    for (;;) {
      const std::int64_t now = now_ns();
      while (!closed_ && !busy() && !queue_.empty()) {
        waiter_base* head = queue_.front();
        if (take_pool(now, head->tokens)) {
          grant(head, ready);
          continue;
        }
        if (now < fault_until()) {
          if (!apply_fault(now, ready)) break;  // fallback: the timer is armed
          continue;
        }
        try {
          slot = take_window_slot();
        } catch (...) {
          enter_fault(now);  // out of memory to wait for the window: as if Redis were unreachable
          continue;
        }
        if (!slot) break;  // the window is full: take_slot() comes with the next slot
        need = head->tokens - pool_;
        extra = lease_room();
        as = sent_as();
        try {
          send = script_args(sha_, key_, as.rr.rate, need, extra, hooked_server_time(), as.gen);
        } catch (...) {
          enter_fault(now);  // out of memory for the request: as if Redis were unreachable
          continue;
        }
        in_flight_for_ = head;
        request_out_ = true;
        extras_in_flight_ += extra;
        ++stats_.round_trips;
        break;
      }
      trim_pool();
      if (!send) slot.reset();
      spare_.reset();  // (handed over, not needed now: passed on)
      idle = !send && tell_idle(now);
      lk.unlock();
      if (!send) break;
      if (send_get(std::move(*send), need, extra, as, std::move(slot), false)) break;
      // Not sent: a fault; decide again.
      send.reset();
      lk.lock();
      request_out_ = false;
      in_flight_for_ = nullptr;
      extras_in_flight_ -= extra;
      enter_fault(now_ns());
    }
    ready.finish_all(mode);
    if (idle) notify_idle();
  }

  bool busy() const noexcept { return request_out_ || timer_.armed(); }

  std::int64_t fault_until() const noexcept { return fault_->load(std::memory_order_relaxed); }

  /// Extra tokens a request may ask for now (see the header comment).
  std::uint64_t lease_room() const noexcept {
    const std::uint64_t held = pool_ + extras_in_flight_;
    return lease_ > held ? lease_ - held : 0;
  }

  /// Nobody holds more than `lease` tokens for later, counting those on their
  /// way (none without leasing): what a cancelled head's request brought
  /// beyond that is dropped.
  void trim_pool() noexcept {
    const std::uint64_t keep = lease_ > extras_in_flight_ ? lease_ - extras_in_flight_ : 0;
    if (pool_ > keep) {
      stats_.lease_dropped += pool_ - keep;
      pool_ = keep;
    }
  }

  void grant(waiter_base* w, ready_list& ready) {
    queue_.erase(w);
    if (in_flight_for_ == w) in_flight_for_ = nullptr;
    stats_.granted += w->tokens;
    ready.push_back(w, {});
  }

  /// Takes `n` tokens from the local pool (dropping an expired lease first).
  bool take_pool(std::int64_t now, std::uint64_t n) {
    if (pool_ > 0 && now >= pool_expiry_) {
      stats_.lease_dropped += pool_;
      pool_ = 0;
    }
    if (pool_ < n) return false;
    pool_ -= n;
    return true;
  }

  void add_pool(std::int64_t now, std::uint64_t n) {
    if (n == 0) return;
    pool_expiry_ = add_ns(now, opts_.lease_ttl);
    pool_ += n;
  }

  static std::int64_t add_ns(std::int64_t t, std::chrono::nanoseconds d) noexcept {
    const std::int64_t dn = d.count();
    return t > ratelimit::detail::max_time - dn ? ratelimit::detail::max_time : t + dn;
  }

  /// Applies the fault policy to the head; false when the head must wait
  /// (local fallback without tokens: the timer is armed, or, given `wake`,
  /// the instant is left there for the caller to arm).
  bool apply_fault(std::int64_t now, ready_list& ready, std::int64_t* wake = nullptr) {
    waiter_base* head = queue_.front();
    switch (opts_.on_fault) {
      case redis_fault_policy::fail_closed:
        queue_.erase(head);
        ready.push_back(head, error::redis_unavailable);
        return true;
      case redis_fault_policy::fail_open:
        stats_.fail_open_grants += head->tokens;
        grant(head, ready);
        return true;
      case redis_fault_policy::local_fallback:
        if (fallback_.try_take(now, head->tokens)) {
          stats_.fallback_grants += head->tokens;
          grant(head, ready);
          return true;
        }
        if (fallback_.ready_at(head->tokens) > as_res(head)->not_after) {
          queue_.erase(head);
          ready.push_back(head, boost::asio::error::timed_out);
          return true;
        }
        // Wait for the local tokens, but no longer than the hold: then ask Redis again.
        if (wake)
          *wake = std::min(fallback_.ready_at(head->tokens), fault_until());
        else
          timer_.arm(std::min(fallback_.ready_at(head->tokens), fault_until()), *this);
        return false;
    }
    return false;
  }

  bool apply_fault_try(std::int64_t now, std::uint64_t n, boost::system::error_code& ec) {
    switch (opts_.on_fault) {
      case redis_fault_policy::fail_closed:
        ec = error::redis_unavailable;
        return false;
      case redis_fault_policy::fail_open:
        stats_.fail_open_grants += n;
        stats_.granted += n;
        return true;
      case redis_fault_policy::local_fallback:
        if (!fallback_.try_take(now, n)) return false;
        stats_.fallback_grants += n;
        stats_.granted += n;
        return true;
    }
    return false;
  }

  /// Runs with `c` from now on, unless this object already runs with a
  /// newer generation (a reply of a call sent before it took that one on):
  /// the capacity, rate and generation reported; the horizon cut to what
  /// stays exact with it; the lease capped at the capacity; the local
  /// fallback bucket migrated as the key (whole tokens carry over, up to
  /// the new capacity; full stays full); and every waiter not sent yet that
  /// asks for more than the capacity fails with exceeds_capacity. Locked.
  void adopt(const stored_config& c, std::int64_t now, ready_list& ready) noexcept {
    if (c.generation < gen_ || c.reserve != reserve_) return;
    const bool same =
        c.rate.capacity == sr_.capacity && c.rate.tok == sr_.tok && c.rate.tick == sr_.tick;
    if (c.generation == gen_ && same) return;
    gen_ = c.generation;
    ++stats_.reconfigurations;
    if (same) return;
    sr_ = c.rate;
    rate_ = rate_of(c.rate);
    lease_ = std::min(opts_.lease, sr_.capacity);
    if (reserve_) {
      std::uint64_t h = 0;
      try {
        h = max_exact_horizon_us(sr_.capacity, rate_);
      } catch (...) {  // (parse_config accepted only exact configurations)
      }
      const auto ms = static_cast<std::uint64_t>(opts_.horizon.count());  // (validated >= 0)
      if (ms <= h / 1000) h = ms * 1000;  // an explicit horizon, if shorter
      rr_ = reserve_rate{sr_, h};
    }
    fallback_.refill(now);
    const bool full = fallback_.available() >= fallback_.capacity();
    fallback_ = bucket_state(sr_.capacity, ratelimit::detail::reduce(rate_), now,
                             full ? sr_.capacity : std::min(fallback_.available(), sr_.capacity));
    // Head-only: a head waiting for its tokens under the old configuration asks again.
    if (!reserve_) timer_.disarm();
    for (waiter_base* w = queue_.front(); w;) {
      waiter_base* next = w->next;
      if (w->tokens > sr_.capacity) {
        if (in_flight_for_ == w) in_flight_for_ = nullptr;
        queue_.erase(w);
        ready.push_back(w, error::exceeds_capacity);
      }
      w = next;
    }
  }

  /// Redis was unavailable: hold the fault for a while.
  void enter_fault(std::int64_t now) {
    ++stats_.faults;
    fault_->store(add_ns(now, opts_.fault_hold), std::memory_order_relaxed);
  }

  /// What a reply means, once parsed into `ec`: sets `resend` for NOSCRIPT,
  /// and turns an error reply meaning "not now" into redis_unavailable.
  static boost::system::error_code classify(boost::system::error_code ec, const redis_reply& reply,
                                            bool& resend) {
    resend = false;
    if (ec == error::redis_error && reply.type == redis_reply::kind::error) {
      switch (classify_redis_error(reply.str)) {
        case redis_error_class::script_missing:
          resend = true;
          break;
        case redis_error_class::unavailable:
          return error::redis_unavailable;
        case redis_error_class::refused:
          break;
      }
    }
    return ec;
  }

  static bool is_unavailable(const boost::system::error_code& ec) {
    return ec == error::redis_unavailable || ec == boost::asio::error::operation_aborted;
  }

  /// The configuration a request is sent with: a resend after NOSCRIPT
  /// goes with the same (the object may have taken on a smaller capacity
  /// meanwhile, which the request's tokens may exceed).
  struct sent_with {
    reserve_rate rr{};
    std::uint64_t gen = 0;
  };

  /// (The caller holds the lock.)
  sent_with sent_as() const noexcept { return {reserve_ ? rr_ : reserve_rate{sr_, 0}, gen_}; }

  /// Sends the head's request; false (nothing sent) when it cannot. `slot`
  /// goes with it, given back with the reply (or when it is dropped).
  bool send_get(std::vector<std::string> args, std::uint64_t need, std::uint64_t extra,
                sent_with as, window_slot slot, bool eval) noexcept {
    try {
      conn_.exec(
          std::move(args), [weak = this->weak_from_this(), need, extra, as, slot = std::move(slot),
                            eval](boost::system::error_code ec, redis_reply reply) mutable {
            if (auto self = weak.lock())
              self->on_get_reply(ec, std::move(reply), need, extra, as, std::move(slot), eval);
          });
      return true;
    } catch (...) {
      return false;
    }
  }

  void on_get_reply(boost::system::error_code ec, redis_reply reply, std::uint64_t need,
                    std::uint64_t extra, sent_with as, window_slot slot, bool eval) {
    script_result res;
    bool resend = false;
    if (!ec) ec = parse_script_reply(reply, res);
    ec = classify(ec, reply, resend);
    if (resend && !eval) {
      // The server lost the script (restart, SCRIPT FLUSH): send its text.
      bool sent = false;
      try {
        {
          std::lock_guard lk(mutex_);
          ++stats_.round_trips;
        }
        sent =
            send_get(script_args("", key_, as.rr.rate, need, extra, hooked_server_time(), as.gen),
                     need, extra, as, std::move(slot), true);
      } catch (...) {
      }
      if (sent) return;
      ec = error::redis_unavailable;
    }
    slot.reset();  // (before the next step takes one)
    const std::int64_t now = now_ns();
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    request_out_ = false;
    extras_in_flight_ -= extra;
    waiter_base* head = std::exchange(in_flight_for_, nullptr);
    if (!ec && res.told) {
      adopt(*res.told, now, ready);
      if (head && !head->queued) head = nullptr;  // larger than the capacity it now knows
    }
    // A denial under a configuration this object no longer runs with (it
    // took on another while the request was out): its wait means nothing
    // now, the head asks again.
    const bool stale = (res.told ? res.told->generation : as.gen) != gen_;
    if (is_unavailable(ec)) {
      if (reply.type == redis_reply::kind::error) ++stats_.unavailable_replies;
      if (!closed_) enter_fault(now);
    } else if (ec) {
      // The server refused (wrong type, foreign state, script error) or
      // answered nonsense: the request that asked learns why.
      if (head) {
        queue_.erase(head);
        ready.push_back(head, ec);
      }
    } else if (res.granted) {
      // Into the pool, from which step() serves the head. If the head is gone
      // (cancelled, or served from the pool meanwhile), its tokens are
      // leftovers like any lease: trimmed before anyone else is served.
      stats_.redis_tokens += res.taken;
      add_pool(now, res.taken);
      if (!head) trim_pool();
    } else if (stale) {
      // (asks again: step() below)
    } else if (head && !closed_ &&
               add_ns(now, std::chrono::microseconds(std::min<std::uint64_t>(
                               res.wait_us, ratelimit::detail::max_time / 1000))) >
                   as_res(head)->not_after) {
      // Not there before its deadline: it takes nothing.
      queue_.erase(head);
      ready.push_back(head, boost::asio::error::timed_out);
    } else if (head && !closed_) {
      // Not there yet: wait, locally, for when the script says they will be,
      // plus a little jitter (at most 1/8 of the wait, at most 2 ms), so that
      // heads of several processes told the same instant do not race in the
      // same order every time.
      const std::uint64_t spread = std::min<std::uint64_t>(res.wait_us / 8, 2000);
      const std::uint64_t jitter = spread ? rng_() % (spread + 1) : 0;
      timer_.arm(add_ns(now, std::chrono::microseconds(res.wait_us + jitter)), *this);
    }
    step(std::move(lk), ready, finish_mode::dispatch);
  }

  /// Sends a try's request (the caller holds `lk`, and still does on
  /// return); true when sent: `op` is then in `tries_` and completes with the
  /// reply, or at close(). False when it could not be sent (a fault).
  bool send_try(std::unique_lock<std::mutex>& lk, try_result* op, std::uint64_t n) {
    const std::uint64_t need = n - pool_;
    const std::uint64_t extra = lease_room();
    const sent_with as = sent_as();
    std::vector<std::string> args;
    try {
      args = try_args(sha_, need, extra, as);
      tries_.push_back(op);
    } catch (...) {
      enter_fault(now_ns());
      return false;
    }
    extras_in_flight_ += extra;
    ++stats_.round_trips;
    lk.unlock();
    const bool sent = send_try_request(std::move(args), op, n, need, extra, as, false);
    lk.lock();
    if (!sent) {
      extras_in_flight_ -= extra;
      std::erase(tries_, op);
      enter_fault(now_ns());
    }
    return sent;
  }

  /// The reply's handler holds `op` only as a key: the op lives in `tries_`
  /// until the reply or close() completes it, so a handler destroyed unrun,
  /// or a request that cannot be sent, loses nothing.
  bool send_try_request(std::vector<std::string> args, try_result* op, std::uint64_t n,
                        std::uint64_t need, std::uint64_t extra, sent_with as, bool eval) noexcept {
    try {
      conn_.exec(std::move(args), [weak = this->weak_from_this(), op, n, need, extra, as, eval](
                                      boost::system::error_code ec, redis_reply reply) {
        if (auto self = weak.lock())
          self->on_try_reply(ec, std::move(reply), op, n, need, extra, as, eval);
      });
      return true;
    } catch (...) {
      return false;
    }
  }

  /// A try's arguments: the head-only script's, or one reservation that
  /// accepts no wait.
  std::vector<std::string> try_args(const std::string& sha, std::uint64_t need, std::uint64_t extra,
                                    const sent_with& as) const {
    if (!reserve_)
      return script_args(sha, key_, as.rr.rate, need, extra, hooked_server_time(), as.gen);
    const reserve_request one{need, 0};
    return reserve_args(sha, key_, as.rr, {&one, 1}, hooked_server_time(), as.gen);
  }

  boost::system::error_code parse_try_reply(const redis_reply& reply, std::uint64_t need,
                                            script_result& res) const {
    if (!reserve_) return parse_script_reply(reply, res);
    std::uint64_t now = 0;
    if (auto ec = check_reserve_reply(reply, 1, now, &res.told)) return ec;
    const reservation_result one = reservation_at(reply, 0);
    const bool reserved = one.what == reservation_result::status::reserved;
    if (reserved && one.due_us != now) return error::redis_bad_reply;  // (it accepted no wait)
    res.granted = reserved;
    res.taken = reserved ? need : 0;
    res.wait_us = 0;
    return {};
  }

  void on_try_reply(boost::system::error_code ec, redis_reply reply, try_result* op,
                    std::uint64_t n, std::uint64_t need, std::uint64_t extra, sent_with as,
                    bool eval) {
    script_result res;
    bool resend = false;
    if (!ec) ec = parse_try_reply(reply, need, res);
    ec = classify(ec, reply, resend);
    if (resend && !eval) {
      bool sent = false;
      try {
        {
          std::lock_guard lk(mutex_);
          ++stats_.round_trips;
        }
        sent = send_try_request(try_args("", need, extra, as), op, n, need, extra, as, true);
      } catch (...) {
      }
      if (sent) return;
      ec = error::redis_unavailable;
    }
    const std::int64_t now = now_ns();
    bool granted = false;
    bool mine = false;
    {
      ready_list ready(executor_, nullptr);
      std::unique_lock lk(mutex_);
      extras_in_flight_ -= extra;
      if (!ec && res.told) adopt(*res.told, now, ready);
      if (!ec && res.granted) {
        stats_.redis_tokens += res.taken;
        if (reserve_) ++stats_.reserved;
        add_pool(now, res.taken);
      }
      // Not in the list: close() completed it (nothing completes as granted
      // after close(); what the script took stays in the pool, trimmed).
      mine = std::erase(tries_, op) != 0;
      if (mine) {
        if (is_unavailable(ec)) {
          if (reply.type == redis_reply::kind::error) ++stats_.unavailable_replies;
          enter_fault(now);
          ec = {};
          granted = apply_fault_try(now, n, ec);
        } else if (!ec && res.granted) {
          granted = take_pool(now, n);
          if (granted) stats_.granted += n;
        } else if (!ec && n > sr_.capacity) {
          ec = error::exceeds_capacity;  // the configuration it was told
        }
      }
      trim_pool();  // what is left is lease, before the queue is served from it
      step(std::move(lk), ready, finish_mode::dispatch);
    }
    if (!mine) return;
    // We run on the connection's executor: the handler may run inline here.
    op->result = {ec, granted};
    op->complete(finish_mode::dispatch, executor_);
  }

  // --- reservation mode -----------------------------------------------------

  static reservation* as_res(waiter_base* w) noexcept { return static_cast<reservation*>(w); }

  std::size_t waiting_locked() const noexcept {
    return queue_.size() + sent_.size() + reserved_.size();
  }

  std::int64_t forgettable_at_locked(std::int64_t now) noexcept {
    if (!queue_.empty() || !sent_.empty() || !reserved_.empty() || calls_out_ != 0 ||
        request_out_ || !tries_.empty() || !refunds_.empty() || refunds_out_ != 0 || pool_ != 0 ||
        extras_in_flight_ != 0)
      return detail::max_time;
    if (opts_.on_fault != redis_fault_policy::local_fallback) return now;
    fallback_.refill(now);
    return fallback_.available() >= fallback_.capacity() ? now
                                                         : fallback_.ready_at(fallback_.capacity());
  }

  /// Whether to tell the sink, once unlocked, that this machinery may be idle.
  bool tell_idle(std::int64_t now) noexcept {
    return has_sink_ && forgettable_at_locked(now) != detail::max_time;
  }

  void notify_idle() noexcept {
    if (auto sink = sink_.lock()) sink->on_idle(*this);
  }

  /// Moves every waiter into `ready` with `ec`, in the order they would have
  /// been served, refunding the reservations not due yet.
  void take_all(ready_list& ready, boost::system::error_code ec) noexcept {
    while (waiter_base* w = reserved_.front()) {
      leave(as_res(w));
      ready.push_back(w, ec);
    }
    ready.take_all(sent_, ec);
    ready.take_all(queue_, ec);
  }

  /// Takes `w` out of whichever queue holds it; its reservation, if it has
  /// one (never granted), is refunded (sent by the next step).
  void leave(reservation* w) noexcept {
    switch (w->at) {
      case reservation::stage::pending:
        queue_.erase(w);
        return;
      case reservation::stage::sent:
        sent_.erase(w);  // the reply will find it gone and refund it
        return;
      case reservation::stage::reserved:
        reserved_.erase(w);
        refund_later(w->tokens);  // (not granted: still waiting for its due time)
        return;
    }
  }

  void refund_later(std::uint64_t n) noexcept {
    try {
      refunds_.push_back(n);
    } catch (...) {  // out of memory: the tokens are wasted, never over-granted
    }
  }

  /// One reservation call: its requests, numbered first, first + 1, ...
  struct reserve_call {
    std::uint64_t first = 0;
    std::int64_t made_at = 0;  // local clock, ns: the `within`s are as of then
    std::vector<reserve_request> reqs;
    sent_with as;      // (a resend goes with the same)
    window_slot slot;  // given back with the reply (or when the call is dropped)
  };

  /// The reservation mode's step(): grants what is due, applies a fault
  /// hold to the waiters not sent, sends them in calls while the window has
  /// room, arms the timer for the earliest due time, and sends refunds.
  void step_reserve(std::unique_lock<std::mutex> lk, ready_list& ready, finish_mode mode) {
    bool idle = false;
    for (;;) {
      const std::int64_t now = now_ns();
      std::optional<reserve_call> call;
      std::vector<std::string> args;
      std::optional<std::int64_t> wake;
      while (reservation* w = as_res(reserved_.front())) {
        if (w->due > now) break;
        reserved_.erase(w);
        stats_.granted += w->tokens;
        ready.push_back(w, {});
      }
      while (!closed_ && !queue_.empty()) {
        waiter_base* head = queue_.front();
        if (head->tokens == 0) {  // its turn: every request before it is sent
          grant(head, ready);
          continue;
        }
        if (now < fault_until()) {
          std::int64_t at = 0;
          if (apply_fault(now, ready, &at)) continue;
          wake = at;
          break;
        }
        if (calls_out_ >= opts_.max_in_flight) break;
        window_slot slot;
        try {
          slot = take_window_slot();
          if (!slot) break;  // the window is full: take_slot() comes with the next slot
          call.emplace();
          args = make_call(now, *call);
        } catch (...) {
          call.reset();  // out of memory for the request: as if Redis were unreachable
          enter_fault(now);
          continue;
        }
        call->slot = std::move(slot);
        ++calls_out_;
        ++stats_.round_trips;
        break;
      }
      if (!reserved_.empty())
        wake = std::min(wake.value_or(detail::max_time), as_res(reserved_.front())->due);
      if (wake)
        timer_.arm(*wake, *this);
      else
        timer_.disarm();
      std::vector<std::uint64_t> refunds = std::exchange(refunds_, {});
      spare_.reset();  // (handed over, not needed now: passed on)
      if (!call) {
        idle = tell_idle(now);
        lk.unlock();
        send_refunds(std::move(refunds));
        break;
      }
      const std::uint64_t first = call->first;
      const std::size_t count = call->reqs.size();
      // Calls leave in the order they were made (their numbers): whoever
      // made one sends it before releasing the bucket's lock to the next
      // maker (async_exec never completes inline, nor calls back into us).
      std::unique_lock send_lk(send_mutex_);
      lk.unlock();
      const bool sent = send_reserve(std::move(args), std::move(*call), false);
      send_lk.unlock();
      send_refunds(std::move(refunds));
      lk.lock();
      if (sent) continue;  // more calls, while the window has room
      --calls_out_;
      unsend(first, count, ready);
      enter_fault(now_ns());
    }
    ready.finish_all(mode);
    if (idle) notify_idle();
  }

  /// Builds a call of the waiters at the front of `queue_` (up to a
  /// zero-token one, at most max_batch), then moves them to `sent_`. Throws
  /// (bad_alloc) with nothing moved.
  std::vector<std::string> make_call(std::int64_t now, reserve_call& call) {
    call.first = next_seq_;
    call.made_at = now;
    call.reqs.reserve(std::min(queue_.size(), opts_.max_batch));
    for (waiter_base* w = queue_.front(); w && w->tokens > 0 && call.reqs.size() < opts_.max_batch;
         w = w->next) {
      const std::int64_t not_after = as_res(w)->not_after;
      call.reqs.push_back({w->tokens, not_after == detail::max_time
                                          ? -1
                                          : std::max<std::int64_t>(0, (not_after - now) / 1000)});
    }
    call.as = sent_as();
    auto args = reserve_args(sha_, key_, call.as.rr, call.reqs, hooked_server_time(), call.as.gen);
    for (std::size_t i = 0; i < call.reqs.size(); ++i) {
      reservation* w = as_res(queue_.front());
      queue_.erase_keep_link(w);
      w->at = reservation::stage::sent;
      w->seq = next_seq_++;
      sent_.push_back(w);
    }
    return args;
  }

  /// The first waiter of the call numbered from `first` still in `sent_`
  /// (replies may come out of order: a call's waiters are contiguous there).
  waiter_base* first_of_call(std::uint64_t first) const noexcept {
    waiter_base* w = sent_.front();
    while (w && as_res(w)->seq < first)
      w = w->next;
    return w;
  }

  /// The waiters of a call that did not reach Redis go back to `queue_`, in
  /// the order they were first sent (before the waiters never sent, after
  /// those of earlier calls that came back), for the fault policy or the
  /// next call.
  /// One that asks for more than the capacity this object now knows (told
  /// while its call was out) fails with exceeds_capacity instead.
  void unsend(std::uint64_t first, std::size_t count, ready_list& ready) noexcept {
    waiter_base* w = first_of_call(first);
    // Where they go: before the first waiter never sent (seq 0) or sent after them.
    waiter_base* before = queue_.front();
    while (before && as_res(before)->seq != 0 && as_res(before)->seq < first)
      before = before->next;
    while (w && as_res(w)->seq < first + count) {
      waiter_base* next = w->next;
      if (w->tokens > sr_.capacity) {
        sent_.erase(w);
        ready.push_back(w, error::exceeds_capacity);
        w = next;
        continue;
      }
      sent_.erase_keep_link(w);
      as_res(w)->at = reservation::stage::pending;
      queue_.insert_after(before ? before->prev : queue_.back(), w);
      w = next;
    }
  }

  bool send_reserve(std::vector<std::string> args, reserve_call call, bool eval) noexcept {
    try {
      conn_.exec(std::move(args), [weak = this->weak_from_this(), call = std::move(call), eval](
                                      boost::system::error_code ec, redis_reply reply) mutable {
        if (auto self = weak.lock())
          self->on_reserve_reply(ec, std::move(reply), std::move(call), eval);
      });
      return true;
    } catch (...) {
      return false;
    }
  }

  void on_reserve_reply(boost::system::error_code ec, redis_reply reply, reserve_call call,
                        bool eval) {
    const std::uint64_t first = call.first;
    const std::size_t count = call.reqs.size();
    std::uint64_t server_now = 0;
    bool resend = false;
    std::optional<stored_config> told;
    if (!ec) ec = check_reserve_reply(reply, count, server_now, &told);
    ec = classify(ec, reply, resend);
    if (resend && !eval) {
      // The server lost the script (restart, SCRIPT FLUSH): send its text.
      try {
        // What is left of each wait, as of now (a round trip later).
        const std::int64_t now = now_ns();
        const std::int64_t spent_us = std::max<std::int64_t>(0, (now - call.made_at) / 1000);
        for (reserve_request& q : call.reqs)
          if (q.within_us >= 0) q.within_us = std::max<std::int64_t>(0, q.within_us - spent_us);
        call.made_at = now;
        {
          std::lock_guard lk(mutex_);
          ++stats_.round_trips;
        }
        auto args =
            reserve_args("", key_, call.as.rr, call.reqs, hooked_server_time(), call.as.gen);
        std::lock_guard send_lk(send_mutex_);
        // (`call` goes with it; not sent, it is gone with its slot: only `first`, `count` remain)
        if (send_reserve(std::move(args), std::move(call), true)) return;
      } catch (...) {
      }
      ec = error::redis_unavailable;
    }
    call.slot.reset();  // (before the next step takes one)
    const std::int64_t now = now_ns();
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    --calls_out_;
    if (!ec && told) adopt(*told, now, ready);
    if (is_unavailable(ec)) {
      // It may have been served (a timeout): its tokens are then wasted, never over-granted.
      if (reply.type == redis_reply::kind::error) ++stats_.unavailable_replies;
      unsend(first, count, ready);
      if (!closed_) enter_fault(now);
    } else if (ec) {
      // Refused (wrong type, foreign state, another configuration) or nonsense: the call's
      // waiters learn why.
      waiter_base* w = first_of_call(call.first);
      while (w && as_res(w)->seq < call.first + call.reqs.size()) {
        waiter_base* next = w->next;
        sent_.erase(w);
        ready.push_back(w, ec);
        w = next;
      }
    } else {
      waiter_base* w = first_of_call(call.first);
      for (std::size_t i = 0; i < call.reqs.size(); ++i) {
        reservation* mine = w && as_res(w)->seq == call.first + i ? as_res(w) : nullptr;
        if (mine) w = w->next;
        const std::uint64_t n = call.reqs[i].n;
        const reservation_result r = reservation_at(reply, i);
        if (r.what == reservation_result::status::reserved) {
          ++stats_.reserved;
          stats_.redis_tokens += n;
          // Due that long after the script ran; we count from the reply's arrival (later):
          // a grant is never early.
          const std::uint64_t ahead = r.due_us > server_now ? r.due_us - server_now : 0;
          const std::int64_t due =
              add_ns(now, std::chrono::microseconds(static_cast<std::int64_t>(
                              std::min<std::uint64_t>(ahead, detail::max_time / 1000))));
          if (!mine) {  // cancelled (or closed) while its call was out: never granted
            refund_later(n);
            continue;
          }
          mine->due = due;
          mine->due_us = r.due_us;
          if (mine->report) {  // a remote part: the joint request takes it, or forgets it
            mine->report(mine);
            sent_.erase(mine);
            ready.push_back(mine, {});
            continue;
          }
          sent_.erase_keep_link(mine);
          mine->at = reservation::stage::reserved;
          insert_reserved(mine);
        } else if (mine) {
          const std::uint64_t replied_capacity =
              told ? told->rate.capacity : call.as.rr.rate.capacity;
          if (r.what == reservation_result::status::refused_horizon && n > replied_capacity &&
              n <= sr_.capacity) {
            // Refused for a capacity this object no longer has (a reply of a call sent
            // before it took on a larger one): sent again.
            unsend(mine->seq, 1, ready);
            continue;
          }
          sent_.erase(mine);
          if (n > sr_.capacity) {
            ready.push_back(mine, error::exceeds_capacity);  // the configuration it was told
          } else if (r.what == reservation_result::status::refused_horizon) {
            ++stats_.horizon_refusals;
            ready.push_back(mine, error::exceeds_horizon);
          } else {
            ready.push_back(mine, boost::asio::error::timed_out);
          }
        }
      }
    }
    step(std::move(lk), ready, finish_mode::dispatch);
  }

  /// Into `reserved_`, after every waiter due no later (usually the last).
  void insert_reserved(reservation* w) noexcept {
    waiter_base* pos = reserved_.back();
    while (pos && as_res(pos)->due > w->due)
      pos = pos->prev;
    reserved_.insert_after(pos, w);
  }

  /// Sends refunds (best effort: one that cannot be sent, or fails, leaves
  /// its tokens wasted, never over-granted). Unlocked.
  void send_refunds(std::vector<std::uint64_t> items) noexcept {
    if (items.empty()) return;
    constexpr std::size_t per_call = 4096;
    for (std::size_t at = 0; at < items.size(); at += per_call) {
      try {
        const auto end =
            items.begin() + static_cast<std::ptrdiff_t>(std::min(items.size(), at + per_call));
        send_refund({items.begin() + static_cast<std::ptrdiff_t>(at), end});
      } catch (...) {
      }
    }
  }

  /// Sends one refund call; counted out (`refunds_out_`) until its reply,
  /// so that a keyed limiter keeps this machinery (and its counters) until then.
  /// The refunds of a bucket being destroyed go with the script's text, in
  /// one round trip: the user may destroy the connection next, before a
  /// second try after NOSCRIPT (a server that never ran the script) could
  /// be sent, and the tokens would be wasted.
  void send_refund(std::vector<std::uint64_t> items) {
    reserve_rate rr;
    std::uint64_t gen = 0;
    bool text = false;
    {
      std::lock_guard lk(mutex_);
      ++stats_.refund_calls;
      ++refunds_out_;
      rr = rr_;
      gen = gen_;
      text = refunds_with_text(closed_, closed_ec_);
    }
    try {
      send_refund_call(conn_, key_, rr, gen, std::move(items), text,
                       refund_report{this->weak_from_this()});
    } catch (...) {
      refund_done(0);
      throw;
    }
  }

  /// Where a refund's reply goes: to this machinery, if it still exists.
  struct refund_report {
    std::weak_ptr<redis_bucket_impl> owner;
    void operator()(std::uint64_t back) const noexcept {
      if (auto self = owner.lock()) self->refund_done(back);
    }
  };

  /// A refund call's reply: `back` tokens were given back.
  void refund_done(std::uint64_t back) noexcept {
    std::unique_lock lk(mutex_);
    stats_.refunded += back;
    --refunds_out_;
    const bool idle = tell_idle(now_ns());
    lk.unlock();
    if (idle) notify_idle();
  }

 public:
  /// Whether the refunds of an object closed with `ec` go with the script's
  /// text, in one round trip: those of one being destroyed (see send_refund;
  /// a keyed limiter's own refunds follow the same rule).
  static bool refunds_with_text(bool closed, const boost::system::error_code& ec) noexcept {
    return closed && ec == boost::asio::error::operation_aborted;
  }

  /// Sends a refund of `items` (token counts) to `key` with the refund
  /// script, then calls `done(tokens given back)` (0 when it failed, also
  /// with operation_aborted once the connection is gone: conn_handle). After
  /// NOSCRIPT (a fresh or restarted server) it is sent again with the
  /// script's text, likewise. Throws what sending throws (bad_alloc),
  /// without calling `done`.
  template <typename Done>
  static void send_refund_call(const conn_handle& conn, const std::string& key,
                               const reserve_rate& rr, std::uint64_t gen,
                               std::vector<std::uint64_t> items, bool eval, Done done) {
    auto args = refund_args(eval ? std::string() : cached_sha1<refund_script>(), key, rr, items,
                            hooked_server_time(), gen);
    // (Init-captures: a plain capture of `key` would be a const string,
    // copied, allocating, each time the handler moves.)
    conn.exec(std::move(args), [conn = conn_handle::weak_ref(conn), key = std::string(key),
                                rr = reserve_rate(rr), gen, items = std::move(items), eval,
                                done](boost::system::error_code ec, redis_reply reply) mutable {
      bool resend = false;
      ec = classify(ec, reply, resend);
      if (resend && !eval)
        if (const auto c = conn.lock()) {
          try {
            send_refund_call(*c, key, rr, gen, std::move(items), true, done);
            return;
          } catch (...) {
          }
        }
      done(!ec && reply.type == redis_reply::kind::integer && reply.integer >= 0
               ? static_cast<std::uint64_t>(reply.integer)
               : 0);
    });
  }

  /// The reservation script's rate of a bucket of `capacity` at `r` with `opts`.
  static reserve_rate reserve_rate_of(std::uint64_t capacity, const rate& r,
                                      const redis_bucket_options& opts) {
    return make_reserve_rate_ms(capacity, r, opts.horizon.count());
  }

 private:
  /// Completes the tries whose request is out (close()); caller holds the lock.
  std::vector<try_result*> take_tries() noexcept { return std::exchange(tries_, {}); }

  /// A slot of the connection's window for the next call (locked): the one
  /// handed to this machinery, or a free one; none when the window is full,
  /// and then this machinery is handed the next slot given back
  /// (take_slot()), once however often it asks meanwhile. Throws
  /// (std::bad_alloc) with nothing taken, and then nothing will be handed.
  window_slot take_window_slot() {
    if (spare_) return std::move(spare_);
    if (slot_wanted_) {
      if (!handover_lost_.exchange(false, std::memory_order_acquire)) return {};
      slot_wanted_ = false;  // (registers again)
    }
    window_slot s = conn_.window().acquire_or_wait(this->weak_from_this());
    if (!s) slot_wanted_ = true;
    return s;
  }

  void complete_tries(std::vector<try_result*> tries, boost::system::error_code ec) noexcept {
    for (try_result* op : tries) {
      op->result = {ec, false};
      try {
        op->complete(finish_mode::post, executor_);
      } catch (...) {  // only with executors whose post allocates; the op is gone
      }
    }
  }

  mutable std::mutex mutex_;
  std::mutex send_mutex_;  // reservation calls leave in order (taken after mutex_, never before)
  conn_handle conn_;
  std::string key_;
  // The configuration (guarded by mutex_: a reply may tell a newer one).
  script_rate sr_;
  rate rate_;
  redis_bucket_options opts_;
  bool reserve_;  // reservation mode
  reserve_rate rr_;
  const std::string& sha_;  // the mode's script's (cached_sha1)
  executor_type executor_;
  detail::timer_driver<Clock, WaitTraits> timer_;
  waiter_queue queue_;     // waiters not sent (reservation mode), or all of them
  waiter_queue sent_;      // reservation mode: waiters whose call is out, in order
  waiter_queue reserved_;  // reservation mode: waiters with a due time, by due time
  std::size_t calls_out_ = 0;
  window_slot spare_;         // a slot handed over (take_slot), used by the step it runs
  bool slot_wanted_ = false;  // waiting for the window: a slot will be handed over
  std::atomic<bool> handover_lost_{false};  // ... or it could not be: register again
  std::size_t refunds_out_ = 0;             // refund calls whose reply has not come
  std::uint64_t next_seq_ = 1;
  std::vector<std::uint64_t> refunds_;  // tokens to give back, sent once unlocked
  std::vector<try_result*> tries_;      // tries whose request is out
  waiter_base* in_flight_for_ = nullptr;
  bool request_out_ = false;
  bool closed_ = false;
  boost::system::error_code closed_ec_;
  std::uint64_t pool_ = 0;
  std::int64_t pool_expiry_ = 0;
  std::uint64_t extras_in_flight_ = 0;  // extra (lease) tokens asked by requests in flight
  std::uint64_t gen_;                   // the configuration's generation
  std::uint64_t lease_;                 // opts_.lease, at most the capacity
  bucket_state fallback_;
  // When a fault hold ends (see enter_fault): shared by the keys of a keyed limiter.
  std::shared_ptr<std::atomic<std::int64_t>> fault_;
  std::weak_ptr<idle_sink<redis_bucket_impl>> sink_;  // a keyed limiter's, told when idle
  bool has_sink_ = false;
  redis_bucket_stats stats_;
  std::minstd_rand rng_{jitter_seed(this)};
};

/// A reservation bucket as a joint request's remote part
/// (basic_redis_token_bucket::as_remote()): co-owns the bucket's machinery,
/// so a part outlives its bucket object (its requests then fail as the
/// closed bucket's).
template <typename Clock, typename WaitTraits>
class redis_remote final : public basic_remote_limiter<Clock> {
  using impl_type = redis_bucket_impl<Clock, WaitTraits>;
  using base = basic_remote_limiter<Clock>;

 public:
  explicit redis_remote(std::shared_ptr<impl_type> impl) noexcept : impl_(std::move(impl)) {}

  typename base::executor_type get_executor() const override { return impl_->get_executor(); }

  void async_reserve(std::uint64_t n, typename base::reserve_handler handler) override {
    impl_->async_reserve_part(std::move(handler), n);
  }

  void take(const typename base::reservation& r, typename base::time_point) noexcept override {
    impl_->took(r.n);
  }

  void forget(const typename base::reservation& r) noexcept override { impl_->refund_now(r.n); }

  void give_back(std::uint64_t n) noexcept override {
    impl_->refund_now(n);  // up to the capacity
  }

 private:
  std::shared_ptr<impl_type> impl_;
};

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_REDIS_BUCKET_IMPL_HPP
