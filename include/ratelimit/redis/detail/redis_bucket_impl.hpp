//
// ratelimit/redis/detail/redis_bucket_impl.hpp: the machinery behind basic_redis_token_bucket.
//
// Waiters queue locally (the core library's waiter_queue, async_waiter and
// sync_waiter). Only the head of the queue talks to Redis, and only one
// "driver" is active at a time: a script request in flight, or a timer for
// the time the script said the head's tokens will be there. Tokens granted by
// Redis go into a local pool (`pool_`) from which the queue is served; without
// leasing the pool only ever holds what the head asked for.
//
// Faults: a request that finds Redis unavailable applies the bucket's policy
// to every queued waiter and, for `fault_hold`, to every new request without
// asking Redis again; the first request after that asks Redis again.
//
// Lifetime and locking follow bucket_impl: one mutex; nothing completes while
// it is held; the timer handler, the connection's completions and the
// cancellation functors hold weak_ptrs.
//
#ifndef RATELIMIT_REDIS_DETAIL_REDIS_BUCKET_IMPL_HPP
#define RATELIMIT_REDIS_DETAIL_REDIS_BUCKET_IMPL_HPP

#include <ratelimit/detail/async_waiter.hpp>
#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/detail/sync_waiter.hpp>
#include <ratelimit/detail/waiter_queue.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/redis/connection.hpp>
#include <ratelimit/redis/detail/script.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/detail/bind_handler.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <random>

namespace ratelimit {

/// What a Redis bucket does when Redis cannot be reached or does not answer in time.
enum class redis_fault_policy {
  /// Requests complete with `ratelimit::error::redis_unavailable`.
  fail_closed,
  /// Requests are granted (and counted in `redis_bucket_stats::fail_open_grants`).
  fail_open,
  /// Requests are served by a local bucket of the same capacity and rate
  /// (one per process, so the limit becomes per process while Redis is gone).
  local_fallback,
};

/// Options of a Redis bucket.
struct redis_bucket_options {
  redis_fault_policy on_fault = redis_fault_policy::fail_closed;
  /// After a request found Redis unavailable, apply the policy without asking
  /// Redis for this long (so that a dead server costs one timeout, not one per request).
  std::chrono::milliseconds fault_hold{100};
  /// Leasing: when > 0, a request that goes to Redis also takes up to `lease`
  /// more tokens if they are there, and later requests are served from them
  /// locally. See the README for exactly how far this can exceed the limit.
  std::uint64_t lease = 0;
  /// Leased tokens not used within this time are dropped (never returned).
  std::chrono::milliseconds lease_ttl{1000};
};

/// Counters (tokens, not requests, unless said otherwise).
struct redis_bucket_stats {
  std::uint64_t round_trips = 0;       // script requests sent
  std::uint64_t redis_tokens = 0;      // tokens taken from Redis (grants and leases)
  std::uint64_t granted = 0;           // tokens granted to callers (all sources)
  std::uint64_t lease_dropped = 0;     // leased tokens dropped unused (ttl, cancellation)
  std::uint64_t fail_open_grants = 0;  // tokens granted because Redis was unavailable
  std::uint64_t fallback_grants = 0;   // tokens granted by the local fallback bucket
  std::uint64_t faults = 0;            // requests that found Redis unavailable
};

namespace redis_detail {

using ratelimit::detail::async_waiter;
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
  using timer_type = boost::asio::basic_waitable_timer<Clock, WaitTraits, executor_type>;
  using try_signature = void(boost::system::error_code, bool);

  redis_bucket_impl(redis_connection& conn, std::string key, std::uint64_t capacity, const rate& r,
                    const redis_bucket_options& opts)
      : conn_(&conn),
        key_(std::move(key)),
        sr_(make_script_rate(capacity, r)),
        rate_(r),
        opts_(opts),
        sha_(script_sha1()),
        executor_(conn.get_executor()),
        timer_(executor_),
        fallback_(capacity, ratelimit::detail::reduce(r), now_ns(), capacity) {}

  const executor_type& get_executor() const noexcept { return executor_; }
  const std::string& key() const noexcept { return key_; }
  std::uint64_t capacity() const noexcept { return sr_.capacity; }
  rate get_rate() const noexcept { return rate_; }

  static std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
        .count();
  }

  // --- requests -------------------------------------------------------------

  template <typename Handler>
  void async_get(Handler&& handler, std::uint64_t n) {
    boost::system::error_code ec;
    {
      ready_list ready;
      std::unique_lock lk(mutex_);
      if (closed_) {
        ec = error::bucket_closed;
      } else if (n > sr_.capacity) {
        ec = error::exceeds_capacity;
      } else {
        using waiter = async_waiter<std::decay_t<Handler>, executor_type, redis_bucket_impl>;
        queue_.push_back(waiter::create(std::forward<Handler>(handler), executor_, n, this));
        step(std::move(lk), ready, finish_mode::post);
        return;
      }
    }
    auto ex = boost::asio::get_associated_executor(handler, executor_);
    boost::asio::post(std::move(ex),
                      boost::asio::detail::bind_handler(std::forward<Handler>(handler), ec));
  }

  /// One attempt, no queueing: granted now or not.
  void async_try(boost::asio::any_completion_handler<try_signature> handler, std::uint64_t n) {
    boost::system::error_code ec;
    bool granted = false;
    {
      std::unique_lock lk(mutex_);
      const std::int64_t now = now_ns();
      if (closed_) {
        ec = error::bucket_closed;
      } else if (n > sr_.capacity) {
        ec = error::exceeds_capacity;
      } else if (!queue_.empty()) {
        granted = false;  // the tokens are owed to the queue
      } else if (take_pool(now, n)) {
        granted = true;
        stats_.granted += n;
      } else if (now < fault_until_) {
        granted = apply_fault_try(now, n, ec);
      } else {
        const std::uint64_t need = n - pool_;
        auto args = script_args(sha_, key_, sr_, need, opts_.lease);
        ++stats_.round_trips;
        lk.unlock();
        send_try(std::move(args), std::move(handler), n, false);
        return;
      }
    }
    // Never inline: through the bucket's executor, then the handler's own.
    auto work = boost::asio::prefer(boost::asio::get_associated_executor(handler, executor_),
                                    boost::asio::execution::outstanding_work.tracked);
    boost::asio::post(
        executor_, [h = std::move(handler), work = std::move(work), ec, granted]() mutable {
          boost::asio::dispatch(
              work, [h = std::move(h), ec, granted]() mutable { std::move(h)(ec, granted); });
        });
  }

  /// Blocks until granted; fails with would_deadlock on a thread running the executor.
  void get_blocking(std::uint64_t n, boost::system::error_code& ec) {
    ec = {};
    if (ratelimit::detail::context_runs_in_this_thread(executor_)) {
      ec = error::would_deadlock;
      return;
    }
    sync_waiter w(n);
    auto result = w.get_future();
    {
      ready_list ready;
      std::unique_lock lk(mutex_);
      if (closed_) {
        ec = error::bucket_closed;
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

  void cancel_waiter(waiter_base* w) {
    ready_list ready;
    std::unique_lock lk(mutex_);
    if (!w->queued) return;
    const bool was_head = queue_.front() == w;
    queue_.erase(w);
    if (in_flight_for_ == w) in_flight_for_ = nullptr;
    ready.push_back(w, boost::asio::error::operation_aborted);
    // A head waiting on the timer for its own tokens: start over for the next one.
    if (was_head && timer_armed_) disarm();
    step(std::move(lk), ready, finish_mode::post);
  }

  std::size_t cancel() {
    ready_list ready;
    std::unique_lock lk(mutex_);
    const std::size_t n = queue_.size();
    ready.take_all(queue_, boost::asio::error::operation_aborted);
    in_flight_for_ = nullptr;
    disarm();
    step(std::move(lk), ready, finish_mode::post);
    return n;
  }

  void close(boost::system::error_code ec) {
    ready_list ready;
    std::unique_lock lk(mutex_);
    closed_ = true;
    ready.take_all(queue_, ec);
    in_flight_for_ = nullptr;
    disarm();
    step(std::move(lk), ready, finish_mode::post);
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

 private:
  // --- the driver -----------------------------------------------------------

  /// Serves what can be served, starts the next driver action if none is
  /// active, then (unlocked) finishes the waiters that left the queue and
  /// sends the request it decided on.
  void step(std::unique_lock<std::mutex> lk, ready_list& ready, finish_mode mode) {
    std::optional<std::vector<std::string>> send;
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
      in_flight_for_ = head;
      request_out_ = true;
      ++stats_.round_trips;
      send = script_args(sha_, key_, sr_, head->tokens - pool_, opts_.lease);
      break;
    }
    // Nobody holds more than `lease` tokens for later (none without leasing):
    // what a cancelled head's request brought beyond that is dropped.
    if (pool_ > opts_.lease) {
      stats_.lease_dropped += pool_ - opts_.lease;
      pool_ = opts_.lease;
    }
    lk.unlock();
    if (send) send_get(std::move(*send), false);
    ready.finish_all(mode);
  }

  bool busy() const noexcept { return request_out_ || timer_armed_; }

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
        arm_ns(std::min(fallback_.ready_at(head->tokens), fault_until_));
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

  /// Redis was unreachable: hold the fault for a while.
  void enter_fault(std::int64_t now) {
    ++stats_.faults;
    fault_until_ = add_ns(now, opts_.fault_hold);
  }

  static bool is_noscript(const boost::system::error_code& ec, const redis_reply& r) {
    return ec == error::redis_error && r.str.rfind("NOSCRIPT", 0) == 0;
  }

  static bool is_unavailable(const boost::system::error_code& ec) {
    return ec == error::redis_unavailable || ec == boost::asio::error::operation_aborted;
  }

  /// Loads the script (a server restarted or flushed its cache), then repeats
  /// the request right behind it on the same connection.
  void reload_script() {
    conn_->async_exec(
        {"SCRIPT", "LOAD", std::string(bucket_script)},
        boost::asio::bind_executor(executor_, [](boost::system::error_code, redis_reply) {}));
  }

  void send_get(std::vector<std::string> args, bool retried) {
    auto again = args;
    conn_->async_exec(
        std::move(args),
        boost::asio::bind_executor(
            executor_, [weak = this->weak_from_this(), again = std::move(again), retried](
                           boost::system::error_code ec, redis_reply reply) mutable {
              if (auto self = weak.lock())
                self->on_get_reply(ec, std::move(reply), std::move(again), retried);
            }));
  }

  void on_get_reply(boost::system::error_code ec, redis_reply reply, std::vector<std::string> again,
                    bool retried) {
    if (is_noscript(ec, reply) && !retried) {
      reload_script();
      send_get(std::move(again), true);
      return;
    }
    const std::int64_t now = now_ns();
    ready_list ready;
    std::unique_lock lk(mutex_);
    request_out_ = false;
    waiter_base* head = std::exchange(in_flight_for_, nullptr);
    script_result res;
    if (!ec) ec = parse_script_reply(reply, res);
    if (is_unavailable(ec)) {
      if (!closed_) enter_fault(now);
    } else if (ec) {
      // The server refused (wrong type, foreign state, script error) or
      // answered nonsense: the request that asked learns why.
      if (head) {
        queue_.erase(head);
        ready.push_back(head, ec);
      }
    } else if (res.granted) {
      // Into the pool, from which step() serves the head (if it was not
      // cancelled meanwhile) and trims what nobody may keep.
      stats_.redis_tokens += res.taken;
      add_pool(now, res.taken);
    } else if (head && !closed_) {
      // Not there yet: wait, locally, for when the script says they will be,
      // plus a little jitter (at most 1/8 of the wait, at most 2 ms), so that
      // heads of several processes told the same instant do not race in the
      // same order every time.
      const std::uint64_t spread = std::min<std::uint64_t>(res.wait_us / 8, 2000);
      const std::uint64_t jitter = spread ? rng_() % (spread + 1) : 0;
      arm_ns(add_ns(now, std::chrono::microseconds(res.wait_us + jitter)));
    }
    step(std::move(lk), ready, finish_mode::dispatch);
  }

  void send_try(std::vector<std::string> args,
                boost::asio::any_completion_handler<try_signature> handler, std::uint64_t n,
                bool retried) {
    auto again = args;
    auto work = boost::asio::prefer(boost::asio::get_associated_executor(handler, executor_),
                                    boost::asio::execution::outstanding_work.tracked);
    conn_->async_exec(std::move(args),
                      boost::asio::bind_executor(
                          executor_, [weak = this->weak_from_this(), again = std::move(again),
                                      retried, n, h = std::move(handler), work = std::move(work)](
                                         boost::system::error_code ec, redis_reply reply) mutable {
                            auto self = weak.lock();
                            if (!self) {
                              boost::asio::dispatch(work, [h = std::move(h)]() mutable {
                                std::move(h)(boost::asio::error::operation_aborted, false);
                              });
                              return;
                            }
                            if (is_noscript(ec, reply) && !retried) {
                              self->reload_script();
                              self->send_try(std::move(again), std::move(h), n, true);
                              return;
                            }
                            bool granted = false;
                            self->on_try_reply(ec, reply, n, granted);
                            boost::asio::dispatch(work, [h = std::move(h), ec, granted]() mutable {
                              std::move(h)(ec, granted);
                            });
                          }));
  }

  void on_try_reply(boost::system::error_code& ec, const redis_reply& reply, std::uint64_t n,
                    bool& granted) {
    const std::int64_t now = now_ns();
    ready_list ready;
    std::unique_lock lk(mutex_);
    script_result res;
    if (!ec) ec = parse_script_reply(reply, res);
    if (closed_) {
      // Closed while the request was out: nothing completes as granted after
      // close(); what the script took is dropped with the pool.
      if (!ec && res.granted) stats_.redis_tokens += res.taken;
      ec = error::bucket_closed;
    } else if (is_unavailable(ec)) {
      enter_fault(now);
      ec = {};
      granted = apply_fault_try(now, n, ec);
    } else if (!ec && res.granted) {
      stats_.redis_tokens += res.taken;
      add_pool(now, res.taken);
      granted = take_pool(now, n);
      if (granted) stats_.granted += n;
    }
    step(std::move(lk), ready, finish_mode::dispatch);
  }

  // --- the timer ------------------------------------------------------------

  void arm_ns(std::int64_t at) {
    timer_armed_ = true;
    const std::uint64_t gen = ++timer_gen_;
    timer_.expires_at(typename Clock::time_point(
        std::chrono::ceil<typename Clock::duration>(std::chrono::nanoseconds(at))));
    timer_.async_wait([weak = this->weak_from_this(), gen](const boost::system::error_code&) {
      if (auto self = weak.lock()) self->on_timer(gen);
    });
  }

  void disarm() {
    if (!timer_armed_) return;
    timer_armed_ = false;
    ++timer_gen_;
    timer_.cancel();
  }

  void on_timer(std::uint64_t gen) {
    ready_list ready;
    std::unique_lock lk(mutex_);
    if (gen != timer_gen_) return;
    timer_armed_ = false;
    step(std::move(lk), ready, finish_mode::dispatch);
  }

  mutable std::mutex mutex_;
  redis_connection* conn_;
  std::string key_;
  script_rate sr_;
  rate rate_;
  redis_bucket_options opts_;
  std::string sha_;
  executor_type executor_;
  timer_type timer_;
  waiter_queue queue_;
  waiter_base* in_flight_for_ = nullptr;
  bool request_out_ = false;
  bool timer_armed_ = false;
  std::uint64_t timer_gen_ = 0;
  bool closed_ = false;
  std::uint64_t pool_ = 0;
  std::int64_t pool_expiry_ = 0;
  std::int64_t fault_until_ = std::numeric_limits<std::int64_t>::min();
  bucket_state fallback_;
  redis_bucket_stats stats_;
  std::minstd_rand rng_{static_cast<std::uint_fast32_t>(std::random_device{}() ^
                                                        reinterpret_cast<std::uintptr_t>(this))};
};

}  // namespace redis_detail
}  // namespace ratelimit

#endif  // RATELIMIT_REDIS_DETAIL_REDIS_BUCKET_IMPL_HPP
