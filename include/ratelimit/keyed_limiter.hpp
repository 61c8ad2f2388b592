//
// ratelimit/keyed_limiter.hpp: one token bucket per key (client address, user id...).
//
// Design
// ------
// Each key gets the bucket machinery of basic_token_bucket (detail::bucket_impl:
// the same FIFO waiter queue, timer, cancellation and token arithmetic), created
// full on the key's first use. Nothing about waiting or tokens is re-implemented
// here; this class only finds, creates, configures and evicts buckets.
//
// Quotas: a key's own capacity and rate live in a map of their own (quotas_),
// consulted only when a bucket is made (a limiter with none pays nothing for
// them); a node caches its bucket's capacity for the checks made under our
// lock. A change of a default or of a key's own settings is applied to the
// buckets concerned under our lock (bucket_impl::set_capacity, set_rate: the
// same re-timing as a single bucket's) and re-indexes them.
//
// Memory is bounded by `max_keys`. A bucket that has refilled to its capacity
// and that nobody waits on is indistinguishable from the fresh bucket a new use
// of its key would create, so only such buckets are evicted: eviction can never
// hand out a token the key would not have had anyway. (That holds across a
// change of capacity because a full bucket stays full when its capacity is
// raised, as a key with no bucket is: apply().) When the limiter holds
// `max_keys` keys and none of them is evictable, a new key is refused with
// `ratelimit::error::too_many_keys` (known keys keep working).
//
// Finding an evictable bucket cheaply: every bucket is indexed (an ordered set)
// by the time it will be full again if nothing more is asked of it
// (bucket_impl::full_at(), which counts the tokens owed to queued requests).
// The index is updated after every request on the key, O(log n). To admit a
// new key at the bound, the limiter walks the index from the earliest time up
// to now and evicts the first bucket that is, when checked exactly under the
// lock, full, without waiters and not in use by a blocking caller (waiters
// whose tokens are due are granted first, as of when their tokens accrued, so
// a bucket whose timer is merely late still counts as full). Buckets met
// on the way that are not evictable are re-indexed at their true time, so each
// walk is short: with 100k keys a new key costs a few set operations.
//
// One conservative case: when a queued request is cancelled, its bucket is full
// earlier than its index entry says, and until that entry's time comes it is
// not offered for eviction (a new key may then be refused while that bucket is
// in fact evictable). Eviction is never premature. (close() re-indexes every
// bucket, so the requests it completes do not delay eviction.)
//
// A clock that goes back (a custom Clock): a bucket that is full only as of a
// later reading than now is not evicted until the clock reads that again,
// since a fresh bucket made now would refill from the earlier reading and give
// the key tokens it would not have had.
//
// Lifetime: the limiter's state (map, index, lock) lives in a keyed_impl the
// limiter owns through a shared_ptr, as a bucket owns its bucket_impl. A thread
// blocked in get_token(key) co-owns it (and its key's bucket), so destroying
// the limiter meanwhile wakes it with operation_aborted and what it touches
// afterwards (its key's pin, the index) is still there.
//
#ifndef RATELIMIT_KEYED_LIMITER_HPP
#define RATELIMIT_KEYED_LIMITER_HPP

#include <ratelimit/detail/bucket_impl.hpp>
#include <ratelimit/detail/metrics_counts.hpp>
#include <ratelimit/detail/operation.hpp>
#include <ratelimit/detail/part_source.hpp>
#include <ratelimit/detail/receipt_handler.hpp>
#include <ratelimit/detail/waiter.hpp>
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
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>
#include <utility>

namespace ratelimit {
namespace detail {

/// The state of a keyed limiter; see the header comment.
template <typename Key, typename Hash, typename KeyEqual, typename Clock, typename WaitTraits>
class keyed_impl
    : public std::enable_shared_from_this<keyed_impl<Key, Hash, KeyEqual, Clock, WaitTraits>> {
  using bucket_type = bucket_impl<Clock, WaitTraits>;

  struct node;
  using index_type = std::set<std::pair<std::int64_t, node*>>;
  struct node {
    std::shared_ptr<bucket_type> bucket;
    const Key* key = nullptr;             // the map's key (stable: node-based map)
    typename index_type::iterator pos{};  // (time full again, this) in index_
    std::size_t pins = 0;                 // blocking callers using the bucket
    std::uint64_t capacity = 0;           // the bucket's (the key's quota), read under our lock
  };
  using map_type = std::unordered_map<Key, node, Hash, KeyEqual>;

  /// A key's own settings; what is empty follows the limiter's default.
  struct own_quota {
    std::optional<std::uint64_t> capacity;
    std::optional<rate> r;
  };
  using quota_map = std::unordered_map<Key, own_quota, Hash, KeyEqual>;

 public:
  keyed_impl(const boost::asio::any_io_executor& ex, std::uint64_t capacity, rate r,
             std::size_t max_keys)
      : executor_(ex), capacity_(check_capacity(capacity)), rate_(r), max_keys_(max_keys) {
    reduce(r);  // validates
    if (max_keys == 0) throw std::invalid_argument("ratelimit: max_keys must be at least 1");
  }

  keyed_impl(const keyed_impl&) = delete;
  keyed_impl& operator=(const keyed_impl&) = delete;

  std::uint64_t capacity() const {
    std::lock_guard lk(mutex_);
    return capacity_;
  }
  rate get_rate() const {
    std::lock_guard lk(mutex_);
    return rate_;
  }
  std::size_t max_keys() const noexcept { return max_keys_; }

  // --- quotas ---------------------------------------------------------------

  /// The capacity and rate `key` gets: its own settings, else the defaults.
  quota get_quota(const Key& key) const {
    std::lock_guard lk(mutex_);
    return quota_of(key);
  }

  std::size_t own_quotas() const {
    std::lock_guard lk(mutex_);
    return quotas_.size();
  }

  /// Changes the default capacity and/or rate: every key without its own
  /// setting of it follows, its bucket re-timed at once.
  void set_default(std::optional<std::uint64_t> capacity, std::optional<rate> r) {
    if (capacity) check_capacity(*capacity);
    if (r) reduce(*r);  // validates
    std::lock_guard lk(mutex_);
    if (capacity) capacity_ = *capacity;
    if (r) rate_ = *r;
    for (auto& [key, nd] : map_) {
      const auto own = quotas_.empty() ? quotas_.end() : quotas_.find(key);
      const bool own_capacity = own != quotas_.end() && own->second.capacity;
      const bool own_rate = own != quotas_.end() && own->second.r;
      apply(nd, own_capacity ? std::nullopt : capacity, own_rate ? std::nullopt : r);
    }
  }

  /// Sets `key`'s own capacity and/or rate (what is empty is left as it is);
  /// kept apart from its bucket, so also when the bucket is evicted.
  void set_own(const Key& key, std::optional<std::uint64_t> capacity, std::optional<rate> r) {
    if (capacity) check_capacity(*capacity);
    if (r) reduce(*r);
    std::lock_guard lk(mutex_);
    own_quota& q = quotas_[key];  // may throw, before anything changed
    if (capacity) q.capacity = capacity;
    if (r) q.r = r;
    if (auto it = map_.find(key); it != map_.end()) apply(it->second, capacity, r);
  }

  /// Drops `key`'s own settings: it follows the defaults again. False if it had none.
  bool reset_own(const Key& key) {
    std::lock_guard lk(mutex_);
    auto own = quotas_.find(key);
    if (own == quotas_.end()) return false;
    quotas_.erase(own);
    if (auto it = map_.find(key); it != map_.end()) apply(it->second, capacity_, rate_);
    return true;
  }

  bool try_get(const Key& key, std::uint64_t n, boost::system::error_code& ec) {
    ec = {};
    std::lock_guard lk(mutex_);
    node* nd = acquire(key, n, bucket_type::now_ns(), ec);  // (read under the lock: see evict_one)
    if (!nd) return false;
    const bool granted = nd->bucket->try_get(n);
    reindex(nd);
    return granted;
  }

  /// try_get that says how long a request made now would wait: serves the
  /// key's due requests first, then takes `n` tokens if nobody is queued and
  /// they are there (`wait` 0), else sets `wait` (as retry_after); with `ec`
  /// set and `wait` empty when the request cannot be served at all.
  bool try_get(const Key& key, std::uint64_t n, std::optional<std::int64_t>& wait,
               boost::system::error_code& ec) {
    ec = {};
    wait.reset();
    std::lock_guard lk(mutex_);
    node* nd = acquire(key, n, bucket_type::now_ns(), ec);
    if (!nd) return false;
    const bool granted = nd->bucket->try_get(n, wait);
    reindex(nd);
    return granted;
  }

  template <typename Handler>
  void async_get(Handler&& handler, const Key& key, std::uint64_t n) {
    using op_type = handler_op<waiter_base, std::decay_t<Handler>>;
    op_type* op = op_type::create(std::forward<Handler>(handler), executor_, n);
    boost::system::error_code ec;
    {
      std::unique_lock lk(mutex_);
      node* nd = nullptr;
      try {
        nd = acquire(key, n, bucket_type::now_ns(), ec, false);
        if (nd) link_cancellation(op->handler(), op, *nd->bucket);
      } catch (...) {
        lk.unlock();
        op->destroy();
        throw;
      }
      if (nd) {
        // Grants are posted, never run here, so holding our lock is safe.
        // A request over the key's capacity fails in submit(), after what
        // the bucket handed over before it.
        nd->bucket->submit(op);  // on failure it destroyed `op`
        reindex(nd);
        return;
      }
    }
    op->set_result(ec);
    op->complete(finish_mode::post, executor_);
  }

  void get_blocking(const Key& key, std::uint64_t n, boost::system::error_code& ec) {
    ec = {};
    node* nd = nullptr;
    std::shared_ptr<bucket_type> bucket;
    {
      std::lock_guard lk(mutex_);
      nd = acquire(key, n, bucket_type::now_ns(), ec);
      if (!nd) return;
      ++nd->pins;  // not evictable while we use it outside the lock
      bucket = nd->bucket;
    }
    // `self` keeps the map (so `nd`) and the lock alive if the limiter is
    // destroyed while this thread waits.
    auto self = this->shared_from_this();
    struct unpin {
      keyed_impl* impl;
      node* nd;
      ~unpin() {
        std::lock_guard lk(impl->mutex_);
        --nd->pins;
        impl->reindex(nd);
      }
    } guard{this, nd};
    bucket->get_blocking(n, max_time, ec);
  }

  /// Where a receipt for `key` gives back to: a record of the key, owned by
  /// the receipt, that refers to this limiter weakly. It gives back to the
  /// bucket the key has when it is used (a bucket evicted meanwhile was full
  /// and unused; the key's new one started full, and a key with none would
  /// be full). @throws std::bad_alloc, what copying the key throws.
  receipt_target receipt_target_of(const Key& key) {
    struct key_ref {
      std::weak_ptr<keyed_impl> limiter;
      Key key;
    };
    auto ref = std::make_shared<key_ref>(key_ref{this->weak_from_this(), key});
    return receipt_target{{}, std::move(ref), [](void* p, std::uint64_t n) {
                            auto* r = static_cast<key_ref*>(p);
                            if (auto limiter = r->limiter.lock()) limiter->return_tokens(r->key, n);
                          }};
  }

  /// A part of a joint request: `key`'s bucket (joint.hpp). @throws
  /// std::bad_alloc, what copying the key throws.
  std::shared_ptr<part_source<Clock, WaitTraits>> part_of(const Key& key) {
    return std::make_shared<key_part>(this->shared_from_this(), key);
  }

  /// Gives `n` tokens back to `key`'s bucket (a receipt's give_back); none
  /// when the key has no bucket (it would be full).
  void return_tokens(const Key& key, std::uint64_t n) {
    std::lock_guard lk(mutex_);
    auto it = map_.find(key);
    if (it == map_.end()) {  // evicted: full, so it has no room; still counted
      own_.gave_back(n);
      return;
    }
    it->second.bucket->return_tokens(n);
    reindex(&it->second);  // fuller: full sooner
  }

  void close(boost::system::error_code ec) {
    std::lock_guard lk(mutex_);
    closed_ = true;
    closed_ec_ = ec;
    for (auto& [key, nd] : map_) {
      nd.bucket->close(ec);
      reindex(&nd);  // its queued requests are gone: full sooner (evict() may take it)
    }
  }

  std::size_t cancel() {
    std::lock_guard lk(mutex_);
    std::size_t n = 0;
    for (auto& [key, nd] : map_)
      n += nd.bucket->cancel();
    return n;
  }

  std::size_t evict() {
    std::lock_guard lk(mutex_);
    const std::int64_t now = bucket_type::now_ns();
    std::size_t n = 0;
    while (evict_one(now))
      ++n;
    return n;
  }

  bool is_open() const {
    std::lock_guard lk(mutex_);
    return !closed_;
  }

  std::uint64_t available(const Key& key) const {
    std::lock_guard lk(mutex_);
    auto it = map_.find(key);
    return it == map_.end() ? quota_of(key).capacity : it->second.bucket->available();
  }

  /// As available(key), it serves the bucket's due requests without
  /// re-indexing it (the index may only be stale on the conservative side).
  std::optional<std::int64_t> retry_after(const Key& key, std::uint64_t n) const {
    std::lock_guard lk(mutex_);
    if (closed_) return std::nullopt;
    auto it = map_.find(key);
    if (it == map_.end()) {
      if (n > quota_of(key).capacity) return std::nullopt;
      return 0;  // a new key's bucket starts full
    }
    if (n > it->second.capacity) return std::nullopt;
    return it->second.bucket->retry_after(n);
  }

  bool contains(const Key& key) const {
    std::lock_guard lk(mutex_);
    return map_.find(key) != map_.end();
  }

  std::size_t size() const {
    std::lock_guard lk(mutex_);
    return map_.size();
  }

  /// The totals over every key: the requests that failed before reaching a
  /// bucket, the evicted buckets' counts, and each live bucket's (with its
  /// gauges). Under our lock: no key comes or goes meanwhile.
  limiter_metrics metrics() const {
    std::lock_guard lk(mutex_);
    limiter_metrics m = own_.snapshot(0, 0);
    m += retired_;
    for (const auto& [key, nd] : map_)
      m += nd.bucket->metrics();
    return m;
  }

 private:
  /// A part of a joint request: this limiter's bucket of one key (joint.hpp).
  class key_part final : public part_source<Clock, WaitTraits> {
   public:
    key_part(std::shared_ptr<keyed_impl> limiter, const Key& key)
        : limiter_(std::move(limiter)), key_(key) {}

    std::mutex& domain() noexcept override { return limiter_->mutex_; }

    std::shared_ptr<bucket_type> resolve(std::uint64_t n, boost::system::error_code& ec,
                                         void*& cookie) override {
      // (Not counted when refused here: this resolves a joint request's key,
      // or answers a question about one, retry_after.)
      node* nd = limiter_->acquire(key_, n, bucket_type::now_ns(), ec, true, false);
      if (!nd) return nullptr;
      ++nd->pins;  // not evicted while another part of the request is resolved
      cookie = nd;
      return nd->bucket;
    }

    void used(void* cookie) override {
      node* nd = static_cast<node*>(cookie);
      --nd->pins;
      limiter_->reindex(nd);
    }

    receipt_target target() override { return limiter_->receipt_target_of(key_); }

    boost::asio::any_io_executor executor() const override { return limiter_->executor_; }

   private:
    std::shared_ptr<keyed_impl> limiter_;
    Key key_;
  };

  /// The node for `key`, created if needed; null with `ec` set when the
  /// request must fail at once. With `check_existing` false, a key that has
  /// a bucket is returned even for more than its capacity: the bucket's own
  /// submit() fails the request then, in its place in the bucket's order of
  /// completions. Caller holds the lock.
  node* acquire(const Key& key, std::uint64_t n, std::int64_t now, boost::system::error_code& ec,
                bool check_existing = true, bool counted = true) {
    node* nd = find_or_make(key, n, now, ec, check_existing);
    // A request that failed before reaching a bucket: counted here (metrics()).
    if (!nd && counted) own_.ended_as(bucket_type::how_ended(ec));
    return nd;
  }

  node* find_or_make(const Key& key, std::uint64_t n, std::int64_t now,
                     boost::system::error_code& ec, bool check_existing) {
    if (closed_) {
      ec = closed_ec_;
      return nullptr;
    }
    if (auto it = map_.find(key); it != map_.end()) {
      if (check_existing && n > it->second.capacity) {
        ec = error::exceeds_capacity;
        return nullptr;
      }
      return &it->second;
    }
    const quota q = quota_of(key);
    if (n > q.capacity) {
      ec = error::exceeds_capacity;
      return nullptr;
    }
    if (map_.size() >= max_keys_ && !evict_one(now)) {
      ec = error::too_many_keys;
      return nullptr;
    }
    auto bucket = bucket_type::make(executor_, q.capacity, q.rate, q.capacity);
    auto it = map_.try_emplace(key).first;
    node& nd = it->second;
    nd.bucket = std::move(bucket);
    nd.key = &it->first;
    nd.capacity = q.capacity;
    try {
      nd.pos = index_.emplace(now, &nd).first;
    } catch (...) {
      map_.erase(it);
      throw;
    }
    return &nd;
  }

  /// Moves `nd` to the time its bucket will be full again.
  void reindex(node* nd) { move_index(nd, nd->bucket->full_at()); }

  /// The capacity and rate of `key`. Caller holds the lock.
  quota quota_of(const Key& key) const {
    quota q{capacity_, rate_};
    if (quotas_.empty()) return q;  // no lookup for limiters without quotas
    if (auto own = quotas_.find(key); own != quotas_.end()) {
      if (own->second.capacity) q.capacity = *own->second.capacity;
      if (own->second.r) q.rate = *own->second.r;
    }
    return q;
  }

  /// Changes `nd`'s bucket as basic_token_bucket::set_capacity and set_rate
  /// do (queued requests re-timed; those over a smaller capacity fail), but
  /// a full bucket stays full when its capacity is raised.
  /// Caller holds the lock; the values are valid. Throws only what re-arming
  /// a bucket's timer may throw with executors other than those of an
  /// io_context or thread_pool (timer_driver::arm): std::bad_alloc.
  void apply(node& nd, std::optional<std::uint64_t> capacity, std::optional<rate> r) {
    if (capacity && *capacity != nd.capacity) {
      // A full bucket is a fresh one (see eviction): it stays full at a raised
      // capacity, as the key would be with no bucket.
      nd.bucket->set_capacity(*capacity, /*full_stays_full=*/true);
      nd.capacity = *capacity;
    }
    if (r) nd.bucket->set_rate(*r);
    reindex(&nd);  // full sooner or later now
  }

  /// Re-keys `nd`'s index entry to `t`. Moves the set's node instead of
  /// erasing and emplacing one: never allocates, so it cannot throw. (An
  /// emplace that threw std::bad_alloc after the erase left `nd->pos`
  /// dangling into the freed node, and a request already queued reported as
  /// failed; the next walk of the index read freed memory.)
  void move_index(node* nd, std::int64_t t) noexcept {
    if (t == nd->pos->first) return;
    auto hint = std::next(nd->pos);
    auto handle = index_.extract(nd->pos);
    handle.value().first = t;
    nd->pos = index_.insert(hint, std::move(handle));
  }

  /// Evicts one bucket that is full, unused and unwaited-for; false if none.
  bool evict_one(std::int64_t now) {
    for (auto it = index_.begin(); it != index_.end() && it->first <= now;) {
      node* nd = it->second;
      ++it;
      bucket_type& b = *nd->bucket;
      // full_at(now) first: it grants the waiters whose tokens are due (as
      // of when they accrued), which may leave the bucket full and
      // unwaited-for. At `now`, the reading the decision is made against: a
      // fresh reading is later than `now` on any real clock, and a full
      // bucket's full_at is the latest time it has seen (with a fresh reading
      // no bucket of a steady_clock limiter was ever evicted).
      const std::int64_t t = b.full_at(now);
      // t <= now, or <= a fresh reading (taken after full_at, so on a steady
      // clock never earlier than t: another thread, such as the bucket's
      // timer handler or a blocking caller, may have read the clock after
      // us): a bucket full only as of a later reading of a clock that went
      // back is not interchangeable with a fresh one, which would refill from
      // the earlier reading. For a full bucket nobody waits on, t is the
      // latest time it has seen.
      if (nd->pins == 0 && b.waiting() == 0 && b.available() == nd->capacity &&
          (t <= now || t <= bucket_type::now_ns())) {
        // Nobody else can reach this bucket now: every path to it takes our
        // lock, and it has no waiter for its timer or a cancellation to serve.
        // What it counted stays in the totals (its gauges are gone with it).
        limiter_metrics last = b.metrics();
        last.queued_requests = 0;
        last.tokens_available = 0;
        retired_ += last;
        index_.erase(nd->pos);
        map_.erase(*nd->key);
        return true;
      }
      // Later than indexed (e.g. a blocking caller took tokens).
      if (t > nd->pos->first) move_index(nd, t);
    }
    return false;
  }

  mutable std::mutex mutex_;
  boost::asio::any_io_executor executor_;
  std::uint64_t capacity_;
  rate rate_;
  std::size_t max_keys_;
  bool closed_ = false;
  boost::system::error_code closed_ec_;
  map_type map_;
  index_type index_;
  quota_map quotas_;         // keys' own settings: configuration, kept across eviction
  metrics_counts own_;       // requests that failed before reaching a bucket
  limiter_metrics retired_;  // what the evicted buckets counted
};

}  // namespace detail

/// A token bucket per key: each key may take `capacity` tokens at once and
/// then `r` on average, independently of the other keys.
///
/// @par Quotas
/// `capacity` and `r` are the defaults; a key may have its own (set_quota,
/// set_rate(key, r), set_capacity(key, n)), kept as configuration apart from
/// the buckets: across eviction, and outside `max_keys`. Both the defaults
/// and a key's own settings may change at run time; a change applies to the
/// buckets concerned at once, as basic_token_bucket's set_capacity then
/// set_rate do, except that a bucket full when its capacity is raised is
/// full at the new capacity (as a key with no bucket would be).
///
/// Every key's bucket behaves exactly as a `basic_token_bucket` of the key's
/// capacity and rate that starts full on the key's first use: FIFO among the
/// requests for that key, completion through the handler's executor (never
/// inside the initiating function), per-operation cancellation. Requests for
/// different keys never wait for each other.
///
/// @tparam Key, Hash, KeyEqual  The key type, hashed as in std::unordered_map.
/// @tparam Clock, WaitTraits, Executor  As for basic_token_bucket.
///
/// @par Memory
/// At most `max_keys()` buckets exist. A bucket is evicted only when it is
/// full and nobody waits on it, since a fresh bucket for that key would then
/// behave identically. If the limiter is at its bound with nothing evictable,
/// requests for a new key fail with `ratelimit::error::too_many_keys`.
///
/// @par Thread safety
/// Every member function may be called concurrently from any thread, and the
/// executor may be run by one thread or many. Construction, move and
/// destruction must not overlap any other use.
///
/// @par Lifetime
/// Destroying the limiter completes every waiter with
/// `boost::asio::error::operation_aborted`, wakes threads blocked in
/// get_token() with it, and makes operations launched later from a deferred
/// token fail with it. A moved-from limiter keeps its executor and behaves as
/// a closed one. It must be destroyed before its execution context.
template <typename Key, typename Hash = std::hash<Key>, typename KeyEqual = std::equal_to<Key>,
          typename Clock = std::chrono::steady_clock,
          typename WaitTraits = boost::asio::wait_traits<Clock>,
          typename Executor = boost::asio::any_io_executor>
class basic_keyed_limiter {
  using impl_type = detail::keyed_impl<Key, Hash, KeyEqual, Clock, WaitTraits>;

 public:
  using key_type = Key;
  using executor_type = Executor;
  using clock_type = Clock;
  using duration = typename Clock::duration;

  /// Rebinds the limiter to another executor type (for `as_default_on`).
  template <typename Executor1>
  struct rebind_executor {
    using other = basic_keyed_limiter<Key, Hash, KeyEqual, Clock, WaitTraits, Executor1>;
  };

  /// A limiter giving each key a bucket of `capacity` tokens refilling at `r`,
  /// holding at most `max_keys` keys.
  /// @throws std::invalid_argument if `capacity` or `max_keys` is 0 or `r` is
  /// not a positive rate.
  basic_keyed_limiter(const executor_type& ex, std::uint64_t capacity, rate r, std::size_t max_keys)
      : executor_(ex),
        impl_(
            std::make_shared<impl_type>(boost::asio::any_io_executor(ex), capacity, r, max_keys)) {}

  /// The same, on the executor of an execution context (e.g. an io_context).
  template <typename ExecutionContext>
  requires std::is_convertible_v<ExecutionContext&, boost::asio::execution_context&>
  basic_keyed_limiter(ExecutionContext& ctx, std::uint64_t capacity, rate r, std::size_t max_keys)
      : basic_keyed_limiter(executor_type(ctx.get_executor()), capacity, r, max_keys) {}

  /// Moves the limiter; its waiters stay queued. The moved-from limiter keeps
  /// its executor and behaves as a closed one holding no key.
  basic_keyed_limiter(basic_keyed_limiter&& other) noexcept
      : executor_(other.executor_), impl_(std::move(other.impl_)) {}

  /// Moves from a limiter with another executor type convertible to this one.
  template <typename Executor1>
  requires(!std::is_same_v<Executor1, Executor> &&
           std::is_convertible_v<const Executor1&, Executor>)
      basic_keyed_limiter(
          basic_keyed_limiter<Key, Hash, KeyEqual, Clock, WaitTraits, Executor1>&& other)
  noexcept : executor_(other.executor_), impl_(std::move(other.impl_)) {}

  /// Shuts this limiter down (as its destructor would), then takes over `other`'s.
  basic_keyed_limiter& operator=(basic_keyed_limiter&& other) noexcept {
    if (this != &other) {
      shutdown();
      executor_ = other.executor_;
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  basic_keyed_limiter(const basic_keyed_limiter&) = delete;
  basic_keyed_limiter& operator=(const basic_keyed_limiter&) = delete;

  /// Completes every waiter with `operation_aborted`.
  ~basic_keyed_limiter() { shutdown(); }

  executor_type get_executor() const noexcept { return executor_; }

  /// Asynchronously waits for one token of `key`'s bucket.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code)) Token =
                boost::asio::default_completion_token_t<executor_type>>
  requires(!std::is_integral_v<std::remove_cvref_t<Token>>) auto async_get_token(
      const Key& key, Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return async_get_token(key, 1, std::forward<Token>(token));
  }

  /// Asynchronously waits until `n` tokens of `key`'s bucket are granted.
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec)`: as basic_token_bucket::async_get_token
  /// (`exceeds_capacity`, `bucket_closed`, `operation_aborted`), plus
  /// `ratelimit::error::too_many_keys` at once when `key` is new and the
  /// limiter is full with nothing evictable. The handler is never invoked
  /// inside this function.
  ///
  /// The key is copied (decay-copied, as Asio does with every initiation
  /// argument) when the operation is deferred (e.g. `asio::deferred`), so a
  /// temporary key is safe with every completion token.
  ///
  /// @par Per-Operation Cancellation
  /// As basic_token_bucket: `terminal`, `partial` and `total`; the request
  /// leaves its key's queue and takes no token.
  ///
  /// @par Thread safety
  /// May be called from any thread.
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code))
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_get_token(const Key& key, std::uint64_t n,
                       Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code)>(
        initiate_get_token(impl_, executor_), token, key, n);
  }

  /// Takes `n` of `key`'s tokens if they are there now and no request for
  /// `key` is queued; never waits. False also when n exceeds the key's capacity
  /// (`get_quota(key).capacity`), when the limiter is closed, and when `key` is new and cannot be
  /// admitted; the overload with an error_code tells these apart.
  /// @par Thread safety May be called from any thread.
  bool try_get_token(const Key& key, std::uint64_t n = 1) {
    boost::system::error_code ec;
    return try_get_token(key, n, ec);
  }

  /// As try_get_token(key, n), telling "limited" (false, `ec` clear: the
  /// tokens are not there, or requests for `key` are queued) from a request
  /// that cannot be served at all (false with `ec`: `too_many_keys`,
  /// `exceeds_capacity`, `bucket_closed`).
  bool try_get_token(const Key& key, std::uint64_t n, boost::system::error_code& ec) {
    if (!impl_) {
      ec = error::bucket_closed;
      return false;
    }
    return impl_->try_get(key, n, ec);
  }

  /// As try_get_token(key, n, ec), but first grants the requests for `key`
  /// that are due (as the timer would), and tells how long a request made
  /// now would have to wait: `retry_after` is zero when the tokens are
  /// taken, the wait (as retry_after(key, n)) when limited (`ec` clear), and
  /// empty when the request cannot be served at all (`ec`: `too_many_keys`,
  /// `exceeds_capacity`, `bucket_closed`). One call for a server's
  /// `Retry-After`: no second lookup, no race between the try and the wait.
  /// @par Thread safety
  /// May be called from any thread.
  bool try_get_token(const Key& key, std::uint64_t n, std::optional<duration>& retry_after,
                     boost::system::error_code& ec) {
    retry_after.reset();
    if (!impl_) {
      ec = error::bucket_closed;
      return false;
    }
    std::optional<std::int64_t> wait;
    const bool granted = impl_->try_get(key, n, wait, ec);
    if (wait) retry_after = detail::to_duration<duration>(*wait);
    return granted;
  }

  /// As try_get_token(key, n, retry_after, ec), for callers that need no reason.
  bool try_get_token(const Key& key, std::uint64_t n, std::optional<duration>& retry_after) {
    boost::system::error_code ec;
    return try_get_token(key, n, retry_after, ec);
  }

  /// Blocks until `n` of `key`'s tokens are granted, FIFO with the
  /// asynchronous requests for `key`. A call that would have to wait fails
  /// at once with `would_deadlock` or `context_stopped` (see
  /// basic_token_bucket::get_token).
  /// @throws boost::system::system_error with `exceeds_capacity`,
  /// `bucket_closed`, `too_many_keys`, `operation_aborted`, `would_deadlock`
  /// or `context_stopped`.
  void get_token(const Key& key, std::uint64_t n = 1) {
    boost::system::error_code ec;
    get_token(key, n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::keyed_limiter::get_token");
  }

  /// As get_token(key), reporting failure through `ec` instead of throwing.
  void get_token(const Key& key, boost::system::error_code& ec) { get_token(key, 1, ec); }

  /// As get_token(key, n), reporting failure through `ec` instead of throwing.
  void get_token(const Key& key, std::uint64_t n, boost::system::error_code& ec) {
    if (!impl_) {
      ec = error::bucket_closed;
      return;
    }
    impl_->get_blocking(key, n, ec);
  }

  // --- with a receipt -------------------------------------------------------

  /// As async_get_token(key, n), and the handler also receives a receipt for
  /// the tokens taken, which gives back to `key`'s bucket (see
  /// `ratelimit::receipt`). Everything else is as for async_get_token(key, n).
  ///
  /// @par Completion Signature
  /// `void(boost::system::error_code ec, ratelimit::receipt r)`: on success
  /// `r.granted() == n`; on failure `r` is empty.
  ///
  /// @par Exceptions
  /// As async_get_token(key, n); the receipt's record of the key is made
  /// here too (std::bad_alloc, or what copying the key throws).
  template <BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code, receipt))
                Token = boost::asio::default_completion_token_t<executor_type>>
  auto async_acquire(const Key& key, std::uint64_t n,
                     Token&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code, receipt)>(
        initiate_get_token(impl_, executor_), token, key, n, with_receipt{});
  }

  /// As get_token(key, n), returning the grant's receipt.
  /// @throws boost::system::system_error as get_token(key, n); std::bad_alloc.
  receipt acquire(const Key& key, std::uint64_t n = 1) {
    boost::system::error_code ec;
    receipt r = acquire(key, n, ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit::keyed_limiter::acquire");
    return r;
  }

  /// As get_token(key, n, ec), returning the grant's receipt (empty on failure).
  /// @throws std::bad_alloc (making the receipt, before anything is taken).
  receipt acquire(const Key& key, std::uint64_t n, boost::system::error_code& ec) {
    if (!impl_) {
      ec = error::bucket_closed;
      return receipt();
    }
    detail::receipt_target target = impl_->receipt_target_of(key);
    impl_->get_blocking(key, n, ec);
    if (ec) return receipt();
    return detail::receipt_access::make(std::move(target), n);
  }

  /// As try_get_token(key, n, ec): the grant's receipt when the tokens were
  /// taken, empty when not (`ec` says why when the request cannot be served).
  /// A refusal allocates nothing.
  /// @throws std::bad_alloc, or what copying the key throws (making the
  /// receipt of a grant: its tokens are given back first).
  std::optional<receipt> try_acquire(const Key& key, std::uint64_t n,
                                     boost::system::error_code& ec) {
    ec = {};
    if (!impl_) {
      ec = error::bucket_closed;
      return std::nullopt;
    }
    if (!impl_->try_get(key, n, ec)) return std::nullopt;
    try {
      return detail::receipt_access::make(impl_->receipt_target_of(key), n);
    } catch (...) {
      impl_->return_tokens(key, n);
      throw;
    }
  }

  /// As try_acquire(key, n, ec), for callers that need no reason.
  std::optional<receipt> try_acquire(const Key& key, std::uint64_t n = 1) {
    boost::system::error_code ec;
    return try_acquire(key, n, ec);
  }

  /// Closes every bucket: queued and later requests complete with
  /// `ratelimit::error::bucket_closed`; try_get_token returns false. Idempotent.
  void close() {
    if (impl_) impl_->close(error::bucket_closed);
  }

  /// Cancels every queued request of every key (`operation_aborted`, no
  /// token taken); returns how many there were. The limiter stays open.
  std::size_t cancel() { return impl_ ? impl_->cancel() : 0; }

  /// Evicts every bucket that can be evicted now (full, nobody waiting);
  /// returns how many. New keys do this on demand, one at a time; call it to
  /// give memory back after a burst of keys.
  std::size_t evict() { return impl_ ? impl_->evict() : 0; }

  /// False once close() has been called (and for a moved-from limiter).
  bool is_open() const { return impl_ && impl_->is_open(); }

  /// Whole tokens in `key`'s bucket now (its capacity, `get_quota(key).capacity`, for a key with no
  /// bucket).
  std::uint64_t available(const Key& key) const { return impl_ ? impl_->available(key) : 0; }

  /// How long a request for `n` tokens of `key` made now would wait before it
  /// is granted, as token_bucket::retry_after: zero for a key with no bucket
  /// (its bucket would start full; a new key the memory bound refuses, with
  /// `max_keys()` keys and none evictable, still gets zero: try_get_token(key,
  /// n, ec) tells that case); empty when the request would fail at once
  /// (`n` over the key's capacity, or closed).
  /// @par Thread safety
  /// May be called from any thread.
  std::optional<duration> retry_after(const Key& key, std::uint64_t n = 1) const {
    if (!impl_) return std::nullopt;
    const auto wait = impl_->retry_after(key, n);
    if (!wait) return std::nullopt;
    return detail::to_duration<duration>(*wait);
  }

  /// True when `key` has a bucket now.
  bool contains(const Key& key) const { return impl_ && impl_->contains(key); }

  /// Keys with a bucket now (at most max_keys()).
  std::size_t size() const { return impl_ ? impl_->size() : 0; }

  /// What the limiter has counted over all its keys (`limiter_metrics`, as
  /// basic_token_bucket::metrics() counts each bucket): every key's bucket,
  /// also those evicted since, and the requests that failed before reaching
  /// a bucket (`too_many_keys`, over a new key's capacity, closed; a joint
  /// request refused at a key is not counted, there or on its other parts).
  /// Tokens a receipt gives back to a key evicted meanwhile count too. The
  /// gauges are the sums over the keys with a bucket now. No counters are
  /// kept per key beyond its bucket's, so memory stays bounded by
  /// max_keys(). One snapshot, taken under the limiter's lock: it visits
  /// every key's bucket (about 50 ns each), so call it per scrape, not per
  /// request. A moved-from limiter reports zeros.
  /// @par Thread safety
  /// May be called from any thread.
  limiter_metrics metrics() const { return impl_ ? impl_->metrics() : limiter_metrics{}; }

  std::size_t max_keys() const noexcept { return impl_ ? impl_->max_keys() : 0; }

  /// The default capacity: that of every key without its own (see set_quota).
  std::uint64_t capacity() const { return impl_ ? impl_->capacity() : 0; }

  /// The default rate: that of every key without its own (see set_quota).
  rate get_rate() const { return impl_ ? impl_->get_rate() : rate{}; }

  // --- run-time configuration ------------------------------------------------

  /// Changes the default rate: every key without a rate of its own refills at
  /// `r` from now on, as basic_token_bucket::set_rate (the level accrued so far
  /// is kept; queued requests are re-timed at once). Takes O(size()).
  /// @throws std::invalid_argument if `r` is not a positive rate (nothing changes).
  /// @par Thread safety
  /// May be called from any thread, concurrently with requests.
  void set_rate(rate r) {
    detail::reduce(r);
    if (impl_) impl_->set_default(std::nullopt, r);
  }

  /// Changes the default capacity: every key without a capacity of its own
  /// gets `capacity`, as basic_token_bucket::set_capacity (a bucket holding
  /// more drops the excess; queued requests for more than `capacity` tokens
  /// fail with `exceeds_capacity`, the others are re-timed), except that a
  /// full bucket stays full at a raised capacity: a key gets the same tokens
  /// whether or not its full bucket was evicted first. Takes O(size()).
  /// @throws std::invalid_argument if `capacity` is 0 (nothing changes).
  void set_capacity(std::uint64_t capacity) {
    detail::check_capacity(capacity);
    if (impl_) impl_->set_default(capacity, std::nullopt);
  }

  /// Gives `key` its own capacity and rate (a quota: a paying customer, an
  /// internal service), applied at once to its bucket if it has one, as
  /// set_capacity and set_rate do. A key's own quota is configuration, kept
  /// apart from the buckets: it holds across eviction and does not count
  /// towards max_keys() (the quotas are as many as you set; reset_quota
  /// drops one). Later default changes do not touch it.
  /// @throws std::invalid_argument for a capacity of 0 or a rate that is not
  /// positive; std::bad_alloc (nothing changes).
  void set_quota(const Key& key, quota q) {
    detail::check_capacity(q.capacity);
    detail::reduce(q.rate);
    if (impl_) impl_->set_own(key, q.capacity, q.rate);
  }

  /// Gives `key` its own rate; its capacity stays (its own, or the default).
  void set_rate(const Key& key, rate r) {
    detail::reduce(r);
    if (impl_) impl_->set_own(key, std::nullopt, r);
  }

  /// Gives `key` its own capacity; its rate stays (its own, or the default).
  void set_capacity(const Key& key, std::uint64_t capacity) {
    detail::check_capacity(capacity);
    if (impl_) impl_->set_own(key, capacity, std::nullopt);
  }

  /// Drops `key`'s own capacity and rate: it follows the defaults again (its
  /// bucket, if any, changed at once). Returns false if it had none.
  bool reset_quota(const Key& key) { return impl_ && impl_->reset_own(key); }

  /// The capacity and rate `key` gets now: its own where set, else the defaults.
  quota get_quota(const Key& key) const { return impl_ ? impl_->get_quota(key) : quota{0, rate{}}; }

  /// How many keys have a capacity or rate of their own.
  std::size_t own_quotas() const { return impl_ ? impl_->own_quotas() : 0; }

 private:
  template <typename, typename, typename, typename, typename, typename>
  friend class basic_keyed_limiter;
  template <typename, typename>
  friend class basic_part;

  struct with_receipt {};  // selects the async_acquire form of the initiation

  /// As basic_token_bucket's: a deferred operation co-owns the limiter's state.
  class initiate_get_token {
   public:
    using executor_type = Executor;

    initiate_get_token(const std::shared_ptr<impl_type>& impl, const Executor& ex) noexcept
        : ref_(impl, ex) {}

    executor_type get_executor() const noexcept { return ref_.get_executor(); }

    template <typename Handler>
    void operator()(Handler&& handler, const Key& key, std::uint64_t n) const {
      static_assert(std::is_invocable_v<std::decay_t<Handler>&&, boost::system::error_code>,
                    "ratelimit: handler must be callable as void(boost::system::error_code)");
      if (impl_type* impl = ref_.get())
        impl->async_get(std::forward<Handler>(handler), key, n);
      else
        detail::post_completion(std::forward<Handler>(handler),
                                boost::asio::any_io_executor(ref_.get_executor()),
                                boost::system::error_code(error::bucket_closed));
    }

    /// async_acquire: the same request, its handler wrapped to receive the receipt.
    template <typename Handler>
    void operator()(Handler&& handler, const Key& key, std::uint64_t n, with_receipt) const {
      if (impl_type* impl = ref_.get())
        impl->async_get(detail::with_receipt_of(std::forward<Handler>(handler),
                                                impl->receipt_target_of(key), n),
                        key, n);
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

/// The limiter most programs want: steady_clock time, any I/O executor.
template <typename Key, typename Hash = std::hash<Key>, typename KeyEqual = std::equal_to<Key>>
using keyed_limiter = basic_keyed_limiter<Key, Hash, KeyEqual, std::chrono::steady_clock>;

}  // namespace ratelimit

#endif  // RATELIMIT_KEYED_LIMITER_HPP
