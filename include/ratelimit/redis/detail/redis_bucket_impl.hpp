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
#include <ratelimit/error.hpp>
#include <ratelimit/redis/connection.hpp>
#include <ratelimit/redis/detail/script.hpp>
#include <ratelimit/redis/options.hpp>

#include <boost/asio/error.hpp>

#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <vector>

namespace ratelimit::redis_detail {

using ratelimit::detail::bucket_state;
using ratelimit::detail::finish_mode;
using ratelimit::detail::ready_list;
using ratelimit::detail::sync_waiter;
using ratelimit::detail::waiter_base;
using ratelimit::detail::waiter_queue;

template <typename Clock, typename WaitTraits>
class redis_bucket_impl
    : public std::enable_shared_from_this<redis_bucket_impl<Clock, WaitTraits>> {
 public:
  using executor_type = boost::asio::any_io_executor;
  using try_result = detail::completion_base<boost::system::error_code, bool>;

  redis_bucket_impl(redis_connection& conn, std::string key, std::uint64_t capacity, const rate& r,
                    const redis_bucket_options& opts)
      : conn_(&conn),
        key_(std::move(key)),
        sr_(make_script_rate(capacity, r)),
        rate_(r),
        opts_((validate(opts, capacity), opts)),
        sha_(script_sha1()),
        executor_(conn.get_executor()),
        fallback_(capacity, ratelimit::detail::reduce(r), now_ns(), capacity) {
    // Made now, not on the first wait: the connection's socket has already
    // given the context a reactor, and a bucket without a timer could not wait.
    timer_.make(executor_);
  }

  const executor_type& get_executor() const noexcept { return executor_; }
  const std::string& key() const noexcept { return key_; }
  std::uint64_t capacity() const noexcept { return sr_.capacity; }
  rate get_rate() const noexcept { return rate_; }
  const redis_bucket_options& options() const noexcept { return opts_; }

  static std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
        .count();
  }

  // --- requests -------------------------------------------------------------

  template <typename Handler>
  void async_get(Handler&& handler, std::uint64_t n) {
    using op_type = detail::handler_op<waiter_base, std::decay_t<Handler>>;
    op_type* op = op_type::create(std::forward<Handler>(handler), executor_, n);
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
      } else if (now < fault_until_) {
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

  /// Blocks until granted; fails at once when it could wait forever.
  void get_blocking(std::uint64_t n, boost::system::error_code& ec) {
    ec = {};
    // Every grant needs the connection's context (a reply, or a timer).
    ec = detail::blocking_wait_error(executor_);
    if (ec) return;
    // Co-owns the impl until this thread returns: once `w` is queued,
    // another thread may destroy the bucket (completing `w`) while this one
    // is still in step() below, which reads members after unlocking.
    const auto self = this->shared_from_this();
    sync_waiter w(n);
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
    const std::size_t n = queue_.size();
    ready.take_all(queue_, boost::asio::error::operation_aborted);
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
      ready.take_all(queue_, ec);
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
    return queue_.size();
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

 private:
  // --- the driver -----------------------------------------------------------

  /// Serves what can be served, starts the next driver action if none is
  /// active, then (unlocked) finishes the waiters that left the queue and
  /// sends the request it decided on. Never throws: a request that cannot
  /// be built or sent is a fault.
  void step(std::unique_lock<std::mutex> lk, ready_list& ready, finish_mode mode) {
    std::optional<std::vector<std::string>> send;
    std::uint64_t need = 0, extra = 0;
    for (;;) {
      const std::int64_t now = now_ns();
      while (!closed_ && !busy() && !queue_.empty()) {
        waiter_base* head = queue_.front();
        if (take_pool(now, head->tokens)) {
          grant(head, ready);
          continue;
        }
        if (now < fault_until_) {
          if (!apply_fault(now, ready)) break;  // fallback: the timer is armed
          continue;
        }
        need = head->tokens - pool_;
        extra = lease_room();
        try {
          send = script_args(sha_, key_, sr_, need, extra);
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
      lk.unlock();
      if (!send) break;
      if (send_get(std::move(*send), need, extra, false)) break;
      // Not sent: a fault; decide again.
      send.reset();
      lk.lock();
      request_out_ = false;
      in_flight_for_ = nullptr;
      extras_in_flight_ -= extra;
      enter_fault(now_ns());
    }
    ready.finish_all(mode);
  }

  bool busy() const noexcept { return request_out_ || timer_.armed(); }

  /// Extra tokens a request may ask for now (see the header comment).
  std::uint64_t lease_room() const noexcept {
    const std::uint64_t held = pool_ + extras_in_flight_;
    return opts_.lease > held ? opts_.lease - held : 0;
  }

  /// Nobody holds more than `lease` tokens for later, counting those on their
  /// way (none without leasing): what a cancelled head's request brought
  /// beyond that is dropped.
  void trim_pool() noexcept {
    const std::uint64_t keep =
        opts_.lease > extras_in_flight_ ? opts_.lease - extras_in_flight_ : 0;
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
  /// (local fallback without tokens: the timer is armed).
  bool apply_fault(std::int64_t now, ready_list& ready) {
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
        // Wait for the local tokens, but no longer than the hold: then ask Redis again.
        timer_.arm(std::min(fallback_.ready_at(head->tokens), fault_until_), *this);
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

  /// Redis was unavailable: hold the fault for a while.
  void enter_fault(std::int64_t now) {
    ++stats_.faults;
    fault_until_ = add_ns(now, opts_.fault_hold);
  }

  /// What a reply means: `ec` clear with `res` filled, or an error; sets
  /// `resend` for NOSCRIPT and counts replies meaning "not now".
  boost::system::error_code classify(boost::system::error_code ec, const redis_reply& reply,
                                     script_result& res, bool& resend) {
    resend = false;
    if (!ec) ec = parse_script_reply(reply, res);
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

  /// Sends the head's request; false (nothing sent) when it cannot.
  bool send_get(std::vector<std::string> args, std::uint64_t need, std::uint64_t extra,
                bool eval) noexcept {
    try {
      conn_->async_exec(std::move(args), [weak = this->weak_from_this(), need, extra, eval](
                                             boost::system::error_code ec, redis_reply reply) {
        if (auto self = weak.lock()) self->on_get_reply(ec, std::move(reply), need, extra, eval);
      });
      return true;
    } catch (...) {
      return false;
    }
  }

  void on_get_reply(boost::system::error_code ec, redis_reply reply, std::uint64_t need,
                    std::uint64_t extra, bool eval) {
    script_result res;
    bool resend = false;
    ec = classify(ec, reply, res, resend);
    if (resend && !eval) {
      // The server lost the script (restart, SCRIPT FLUSH): send its text.
      bool sent = false;
      try {
        {
          std::lock_guard lk(mutex_);
          ++stats_.round_trips;
        }
        sent = send_get(script_args("", key_, sr_, need, extra), need, extra, true);
      } catch (...) {
      }
      if (sent) return;
      ec = error::redis_unavailable;
    }
    const std::int64_t now = now_ns();
    ready_list ready(executor_, nullptr);
    std::unique_lock lk(mutex_);
    request_out_ = false;
    extras_in_flight_ -= extra;
    waiter_base* head = std::exchange(in_flight_for_, nullptr);
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
    std::vector<std::string> args;
    try {
      args = script_args(sha_, key_, sr_, need, extra);
      tries_.push_back(op);
    } catch (...) {
      enter_fault(now_ns());
      return false;
    }
    extras_in_flight_ += extra;
    ++stats_.round_trips;
    lk.unlock();
    const bool sent = send_try_request(std::move(args), op, n, need, extra, false);
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
                        std::uint64_t need, std::uint64_t extra, bool eval) noexcept {
    try {
      conn_->async_exec(std::move(args), [weak = this->weak_from_this(), op, n, need, extra, eval](
                                             boost::system::error_code ec, redis_reply reply) {
        if (auto self = weak.lock())
          self->on_try_reply(ec, std::move(reply), op, n, need, extra, eval);
      });
      return true;
    } catch (...) {
      return false;
    }
  }

  void on_try_reply(boost::system::error_code ec, redis_reply reply, try_result* op,
                    std::uint64_t n, std::uint64_t need, std::uint64_t extra, bool eval) {
    script_result res;
    bool resend = false;
    ec = classify(ec, reply, res, resend);
    if (resend && !eval) {
      {
        std::lock_guard lk(mutex_);
        ++stats_.round_trips;
      }
      bool sent = false;
      try {
        sent = send_try_request(script_args("", key_, sr_, need, extra), op, n, need, extra, true);
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
      if (!ec && res.granted) {
        stats_.redis_tokens += res.taken;
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

  /// Completes the tries whose request is out (close()); caller holds the lock.
  std::vector<try_result*> take_tries() noexcept { return std::exchange(tries_, {}); }

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
  redis_connection* conn_;
  std::string key_;
  script_rate sr_;
  rate rate_;
  redis_bucket_options opts_;
  std::string sha_;
  executor_type executor_;
  detail::timer_driver<Clock, WaitTraits> timer_;
  waiter_queue queue_;
  std::vector<try_result*> tries_;  // tries whose request is out
  waiter_base* in_flight_for_ = nullptr;
  bool request_out_ = false;
  bool closed_ = false;
  boost::system::error_code closed_ec_;
  std::uint64_t pool_ = 0;
  std::int64_t pool_expiry_ = 0;
  std::uint64_t extras_in_flight_ = 0;  // extra (lease) tokens asked by requests in flight
  std::int64_t fault_until_ = std::numeric_limits<std::int64_t>::min();
  bucket_state fallback_;
  redis_bucket_stats stats_;
  std::minstd_rand rng_{static_cast<std::uint_fast32_t>(std::random_device{}() ^
                                                        reinterpret_cast<std::uintptr_t>(this))};
};

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_REDIS_BUCKET_IMPL_HPP
