//
// ratelimit/redis/detail/redis_keyed_impl.hpp: the machinery behind basic_redis_keyed_limiter.
//
// One bucket machinery (redis_bucket_impl, the Redis bucket's own) per
// *active* key: made when a request for the key arrives and none exists,
// dropped as soon as it has nothing left to do (nothing queued, out, reserved
// or to refund; with local_fallback, its fallback bucket full again), since a
// fresh one then behaves identically. So the process holds state only for
// keys with requests in flight (and, after an outage with local_fallback,
// for keys whose fallback bucket is refilling), however many keys there are.
//
// Locking: `mutex_` guards the map; a machinery's own lock is only ever taken
// after it (forgettable_at, add_stats), never before: a machinery tells us it
// went idle (on_idle) unlocked, and requests are started on it unlocked.
// A request *pins* its key's machinery (pins > 0: never dropped) from the
// lookup until the request is queued in it; the unpin, and every idle report,
// decide whether to drop it. Every way a machinery goes idle (its step, a
// refund's reply) is followed by one of the two, so none is forgotten in the
// map. One that is idle but whose fallback bucket is still refilling
// *lingers* (`lingering_`, by when it is full) and is dropped by the first
// request, idle report or active_keys() after that.
//
// Every key shares one fault hold (the connection is one): a dead server
// costs one timeout, not one per key.
//
#ifndef RATELIMIT_REDIS_DETAIL_REDIS_KEYED_IMPL_HPP
#define RATELIMIT_REDIS_DETAIL_REDIS_KEYED_IMPL_HPP

#include <ratelimit/redis/detail/redis_bucket_impl.hpp>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ratelimit::redis_detail {

template <typename Clock, typename WaitTraits>
class redis_keyed_impl final
    : public idle_sink<redis_bucket_impl<Clock, WaitTraits>>,
      public std::enable_shared_from_this<redis_keyed_impl<Clock, WaitTraits>> {
 public:
  using bucket_type = redis_bucket_impl<Clock, WaitTraits>;
  using executor_type = boost::asio::any_io_executor;
  using quota_function = std::function<redis_quota(std::string_view)>;

  redis_keyed_impl(redis_connection& conn, std::string prefix, std::optional<redis_quota> fixed,
                   quota_function quota, const redis_bucket_options& opts)
      : conn_(conn),
        executor_(conn.get_executor()),
        prefix_(std::move(prefix)),
        fixed_(fixed),
        quota_(std::move(quota)),
        opts_(opts) {
    if (opts_.lease > 0)
      throw std::invalid_argument(
          "ratelimit::redis_keyed_limiter: lease must be 0 (a key keeps no state between "
          "requests; got " +
          std::to_string(opts_.lease) + ")");
    if (fixed_)
      bucket_type::check(fixed_->capacity, fixed_->r, opts_);
    else {
      if (!quota_) throw std::invalid_argument("ratelimit::redis_keyed_limiter: no quota function");
      validate(opts_, std::numeric_limits<std::uint64_t>::max());
    }
  }

  redis_keyed_impl(const redis_keyed_impl&) = delete;
  redis_keyed_impl& operator=(const redis_keyed_impl&) = delete;

  const executor_type& get_executor() const noexcept { return executor_; }
  const std::string& prefix() const noexcept { return prefix_; }
  const conn_handle& connection() const noexcept { return conn_; }
  const redis_bucket_options& options() const noexcept { return opts_; }

  /// The quota of `key`: the fixed one, or the quota function's answer.
  redis_quota quota_of(std::string_view key) const { return fixed_ ? *fixed_ : quota_(key); }

  /// A key's machinery, pinned (see the header comment) while this lives.
  class pin {
   public:
    pin() = default;
    pin(std::shared_ptr<redis_keyed_impl> owner, std::shared_ptr<bucket_type> b) noexcept
        : owner_(std::move(owner)), b_(std::move(b)) {}
    pin(pin&& o) noexcept : owner_(std::move(o.owner_)), b_(std::move(o.b_)) {}
    pin& operator=(pin&& o) noexcept {
      if (this != &o) {
        release();
        owner_ = std::move(o.owner_);
        b_ = std::move(o.b_);
      }
      return *this;
    }
    ~pin() { release(); }
    bucket_type* operator->() const noexcept { return b_.get(); }
    explicit operator bool() const noexcept { return b_ != nullptr; }

   private:
    void release() noexcept {
      if (owner_) std::exchange(owner_, nullptr)->unpin(b_);
      b_.reset();
    }

    // Co-owned: a blocking caller may return after the limiter is destroyed.
    std::shared_ptr<redis_keyed_impl> owner_;
    std::shared_ptr<bucket_type> b_;
  };

  /// The machinery of `key`, made if needed, pinned; empty with `ec` set
  /// when the limiter is closed. Throws what the quota function throws,
  /// std::invalid_argument for a quota that no bucket can have, and
  /// std::bad_alloc.
  pin acquire(std::string_view key, boost::system::error_code& ec) {
    std::string full;
    full.reserve(prefix_.size() + key.size());
    full.append(prefix_).append(key);
    const std::int64_t now = bucket_type::now_ns();
    {
      std::lock_guard lk(mutex_);
      if (closed_) {
        ec = closed_ec_;
        return {};
      }
      sweep(now);
      if (auto it = map_.find(full); it != map_.end()) {
        ++it->second.pins;
        return pin(this->shared_from_this(), it->second.b);
      }
    }
    // A new key: its machinery is made unlocked (the quota function, a timer).
    const redis_quota q = quota_of(key);
    auto b = std::make_shared<bucket_type>(conn_, full, q.capacity, q.r, opts_, fault_);
    b->attach(this->weak_from_this());
    std::lock_guard lk(mutex_);
    if (closed_) {
      ec = closed_ec_;
      return {};
    }
    auto [it, made] = map_.try_emplace(std::move(full));
    if (made) {
      it->second.b = std::move(b);
      ++keys_made_;
    }
    ++it->second.pins;
    return pin(this->shared_from_this(), it->second.b);
  }

  /// Throws std::invalid_argument unless `key`'s quota is one a bucket can have.
  void check_quota(std::string_view key) const {
    const redis_quota q = quota_of(key);
    bucket_type::check(q.capacity, q.r, opts_);
  }

  /// A remote part's tokens were taken by its joint request.
  void took(std::uint64_t n) noexcept {
    std::lock_guard lk(mutex_);
    extra_.granted += n;
  }

  /// Where a remote part's refund reply goes: this limiter's counters.
  struct refund_report {
    std::weak_ptr<redis_keyed_impl> owner;

    void operator()(std::uint64_t back) const noexcept {
      if (auto self = owner.lock()) {
        std::lock_guard lk(self->mutex_);
        self->extra_.refunded += back;
      }
    }
  };

  /// Gives `n` of `key`'s tokens back (a remote part forgotten, or a
  /// receipt's give_back): a refund call, with or without the key's
  /// machinery, also after close(). Best effort.
  void refund(std::string_view key, std::uint64_t n) noexcept {
    try {
      const redis_quota q = quota_of(key);
      std::string full;
      full.reserve(prefix_.size() + key.size());
      full.append(prefix_).append(key);
      bool text = false;
      {
        std::lock_guard lk(mutex_);
        ++extra_.refund_calls;
        text = bucket_type::refunds_with_text(closed_, closed_ec_);
      }
      bucket_type::send_refund_call(
          conn_, full, bucket_type::reserve_rate_of(q.capacity, q.r, opts_), opts_.generation, {n},
          text, refund_report{this->weak_from_this()});
    } catch (...) {  // an impossible quota, out of memory: wasted, never over-granted
    }
  }

  /// Writes a new configuration of `key` in Redis (as
  /// redis_bucket_impl::async_configure: `capacity` and/or `r`, the other
  /// part kept as stored, or as the key's quota if nothing is stored), kept
  /// there; the key's machinery, if it is active, takes it on at the reply.
  /// Throws what quota_of throws and std::invalid_argument for a
  /// configuration no bucket can have, before anything is sent.
  template <typename Handler>
  void async_configure(Handler&& handler, std::string_view key,
                       std::optional<std::uint64_t> capacity, std::optional<rate> r) {
    using op_type =
        detail::handler_op<detail::plain_completion<boost::system::error_code, std::uint64_t>,
                           std::decay_t<Handler>>;
    const redis_quota q = quota_of(key);
    const script_rate own = make_script_rate(capacity.value_or(q.capacity), r.value_or(q.r));
    std::string full;
    full.reserve(prefix_.size() + key.size());
    full.append(prefix_).append(key);
    auto args = configure_args("", full, own,
                               capacity && r ? 'b'
                               : capacity    ? 'c'
                                             : 'r',
                               opts_.mode == redis_bucket_mode::reserve, opts_.generation,
                               hooked_server_time());
    boost::system::error_code ec;
    {
      std::lock_guard lk(mutex_);
      if (closed_) ec = closed_ec_;
    }
    op_type* op = op_type::create(std::forward<Handler>(handler), executor_);
    if (ec) {
      op->result = {ec, 0};
      op->complete(finish_mode::post, executor_);
      return;
    }
    bucket_type::send_configure_call(
        conn_, std::move(args),
        configure_report{this->weak_from_this(), std::move(full),
                         opts_.mode == redis_bucket_mode::reserve,
                         bucket_type::pending_configure::own(op, executor_)});
  }

  /// Where a key's configuration reply goes: the key's machinery, if active.
  struct configure_report {
    std::weak_ptr<redis_keyed_impl> owner;
    std::string key;  // prefix + key
    bool reserve;
    typename bucket_type::pending_configure pending;
    void operator()(boost::system::error_code ec, const stored_config& c) const {
      if (!ec && c.reserve != reserve) ec = error::redis_bad_reply;
      if (!ec)
        if (auto self = owner.lock()) {
          std::shared_ptr<bucket_type> b;
          {
            std::lock_guard lk(self->mutex_);
            if (auto it = self->map_.find(key); it != self->map_.end()) b = it->second.b;
          }
          if (b) b->take_on(c);
        }
      pending.complete(ec, ec ? 0 : c.generation);
    }
  };

  /// The machinery of `key` went idle (redis_bucket_impl::notify_idle).
  void on_idle(bucket_type& b) noexcept override {
    std::shared_ptr<bucket_type> drop;
    std::lock_guard lk(mutex_);
    const std::int64_t now = bucket_type::now_ns();
    sweep(now);
    auto it = map_.find(b.key());
    if (it == map_.end() || it->second.b.get() != &b || it->second.pins != 0) return;
    drop = forget(it, now);
  }

  /// Closes every key's machinery with `ec` (bucket_closed, or
  /// operation_aborted when the limiter is destroyed); later requests fail
  /// with it.
  void close(boost::system::error_code ec) noexcept {
    map_type all;  // taken whole (no allocation), closed unlocked (their steps report to us)
    {
      std::lock_guard lk(mutex_);
      closed_ = true;
      closed_ec_ = ec;  // (destruction after close(): operation_aborted, as the bucket's)
      all.swap(map_);
      lingering_.clear();
    }
    for (auto& [key, e] : all) {
      e.b->close(ec);
      std::lock_guard lk(mutex_);
      e.b->add_stats(retired_);
    }
  }

  bool is_open() const {
    std::lock_guard lk(mutex_);
    return !closed_;
  }

  std::size_t cancel() {
    std::vector<std::shared_ptr<bucket_type>> all;
    {
      std::lock_guard lk(mutex_);
      all.reserve(map_.size());
      for (auto& [key, e] : map_)
        all.push_back(e.b);
    }
    std::size_t n = 0;
    for (auto& b : all)
      n += b->cancel();
    return n;
  }

  std::size_t waiting() const {
    std::lock_guard lk(mutex_);
    std::size_t n = 0;
    for (auto& [key, e] : map_)
      n += e.b->waiting();
    return n;
  }

  /// Keys with a machinery now (requests in flight, or a fallback bucket refilling).
  std::size_t active_keys() {
    std::lock_guard lk(mutex_);
    sweep(bucket_type::now_ns());
    return map_.size();
  }

  /// Machineries made so far (one per key each time it becomes active).
  std::uint64_t keys_made() const {
    std::lock_guard lk(mutex_);
    return keys_made_;
  }

  redis_bucket_stats stats() const {
    std::lock_guard lk(mutex_);
    redis_bucket_stats s = retired_;
    bucket_type::add_into(s, extra_);
    for (auto& [key, e] : map_)
      e.b->add_stats(s);
    return s;
  }

 private:
  using lingering_type = std::multimap<std::int64_t, std::string>;  // by when the fallback is full
  struct entry {
    std::shared_ptr<bucket_type> b;
    std::size_t pins = 0;
    std::optional<typename lingering_type::iterator> lingering;  // its place in lingering_
  };
  using map_type = std::unordered_map<std::string, entry>;

  void unpin(const std::shared_ptr<bucket_type>& b) noexcept {
    std::shared_ptr<bucket_type> drop;
    std::lock_guard lk(mutex_);
    auto it = map_.find(b->key());
    if (it == map_.end() || it->second.b != b) return;  // closed meanwhile
    if (--it->second.pins == 0) drop = forget(it, bucket_type::now_ns());
  }

  /// Drops the machinery of `it` if it is idle (returned, to be destroyed
  /// once unlocked), or remembers when its fallback bucket will be full.
  /// Caller holds the lock; the entry is not pinned.
  std::shared_ptr<bucket_type> forget(typename map_type::iterator it, std::int64_t now) noexcept {
    entry& e = it->second;
    const std::int64_t at = e.b->forgettable_at(now);
    if (at == ratelimit::detail::max_time) return nullptr;  // busy: it tells us again
    if (at > now) {
      if (!e.lingering) {
        try {
          e.lingering = lingering_.emplace(at, it->first);
        } catch (...) {  // out of memory: kept until the key's next request goes idle
        }
      }
      return nullptr;
    }
    if (e.lingering) lingering_.erase(*e.lingering);
    e.b->add_stats(retired_);
    std::shared_ptr<bucket_type> drop = std::move(e.b);
    map_.erase(it);
    return drop;
  }

  /// Drops the lingering machineries whose fallback bucket is full by now.
  /// Caller holds the lock.
  void sweep(std::int64_t now) noexcept {
    while (!lingering_.empty() && lingering_.begin()->first <= now) {
      auto node = lingering_.extract(lingering_.begin());
      auto it = map_.find(node.mapped());
      if (it == map_.end()) continue;
      it->second.lingering.reset();
      if (it->second.pins == 0) forget(it, now);  // (destroyed here: it is idle, holds nothing)
    }
  }

  mutable std::mutex mutex_;
  conn_handle conn_;
  executor_type executor_;
  std::string prefix_;
  std::optional<redis_quota> fixed_;
  quota_function quota_;
  redis_bucket_options opts_;
  std::shared_ptr<std::atomic<std::int64_t>> fault_ =
      std::make_shared<std::atomic<std::int64_t>>(std::numeric_limits<std::int64_t>::min());
  map_type map_;
  lingering_type lingering_;
  bool closed_ = false;
  boost::system::error_code closed_ec_;
  std::uint64_t keys_made_ = 0;
  redis_bucket_stats retired_;  // counters of the machineries dropped
  redis_bucket_stats extra_;    // remote parts' grants and refunds
};

/// A key of a keyed Redis limiter as a joint request's remote part
/// (basic_redis_keyed_limiter::as_remote): co-owns the limiter's machinery.
template <typename Clock, typename WaitTraits>
class redis_keyed_remote final : public basic_remote_limiter<Clock> {
  using impl_type = redis_keyed_impl<Clock, WaitTraits>;
  using base = basic_remote_limiter<Clock>;

 public:
  redis_keyed_remote(std::shared_ptr<impl_type> impl, std::string key) noexcept
      : impl_(std::move(impl)), key_(std::move(key)) {}

  typename base::executor_type get_executor() const override { return impl_->get_executor(); }

  void async_reserve(std::uint64_t n, typename base::reserve_handler handler) override {
    boost::system::error_code ec;
    auto p = impl_->acquire(key_, ec);
    if (!p)
      return ratelimit::detail::post_completion(std::move(handler), impl_->get_executor(), ec,
                                                typename base::reservation{});
    p->async_reserve_part(std::move(handler), n);
  }

  void take(const typename base::reservation& r, typename base::time_point) noexcept override {
    impl_->took(r.n);
  }

  void forget(const typename base::reservation& r) noexcept override { impl_->refund(key_, r.n); }

  void give_back(std::uint64_t n) noexcept override {
    impl_->refund(key_, n);  // up to the capacity
  }

 private:
  std::shared_ptr<impl_type> impl_;
  std::string key_;
};

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_REDIS_KEYED_IMPL_HPP
