//
// test/model/keyed_limiter_model.hpp: the reference model of a keyed limiter.
//
// Written from the keyed limiter's documented promise (README "Per-key limits",
// the comments of include/ratelimit/keyed_limiter.hpp), not from its code, to
// check the real one against (test/fuzz/fuzz_keyed.cpp):
//
// - Per key, an independent token_bucket_model (token_bucket_model.hpp: exact
//   tokens, strict FIFO, grants as of the moment the tokens accrued), created
//   full at the first use of the key, and dropped when the limiter evicts the
//   key: the next use of the key creates a full one again.
// - Time is an explicit input to every call (nanoseconds, int64), as for the
//   bucket model. Request ids are limiter-wide (0, 1, 2... in request order,
//   whatever the outcome); completions() lists them in the order each key's
//   bucket completes them (the order across keys is not promised).
// - Errors at once, checked in this order: the limiter is closed
//   (`closed`), more tokens than the capacity (`exceeds_capacity`; no bucket
//   is made for it, no key is evicted for it), then the key bound
//   (`too_many_keys`, only for a request that needs a new bucket).
//
// Eviction. Which key the limiter evicts is not promised, so the model does not
// predict it: the caller observes it (through contains()) and tells the model,
// which checks that the outcome is one the documentation allows and throws
// model::violation otherwise. At `now` each key's bucket is, after the waiters
// whose tokens are due have been granted (as the limiter does before deciding):
//
//   evictable   full, nobody waiting, and its time (the latest time it has
//               seen) not after `now`. The last condition only matters with a
//               clock that goes back: a bucket full as of a later reading is
//               not "indistinguishable from the fresh bucket its key would
//               get" now (the fresh one would refill from the earlier
//               reading: the backward clock would mint tokens), so evicting it
//               would break the reason the documentation gives for eviction.
//   held back   evictable, but the documented conservative case may apply:
//               "a bucket whose waiter was cancelled becomes evictable only at
//               the time its request would have been served and refilled".
//
// The conservative case, precisely. The limiter finds evictable buckets
// through an index of the time each bucket will be full again, "updated after
// every request on the key"; a cancelled request leaves its bucket's entry
// later than the truth until then. The model keeps per key:
//   - `stale`: a queued request of this bucket has left the queue without
//     being granted (per-operation cancellation, cancel()) since the last
//     request on the key that reached its bucket (one not failed at once);
//   - `hold`: the time the bucket would have been full again as computed right
//     after that request (full_at() of the bucket model, and never before
//     that request). Between requests on the key this is the latest the index
//     can say: later events (grants, cancellations) only make the bucket full
//     sooner, and an index that is re-computed can only be re-computed to a
//     time that is no later.
// A key is held back at `now` when it is evictable, stale, and hold > now.
// Only per-operation cancellation and cancel() make a key stale: close() and
// destruction also empty queues, but the documentation names only
// cancellation, so the model does not extend the case to them. Failed-at-once
// requests do not clear `stale` (they never reach the key's bucket): the model
// reads "every request" in the way that allows more, never less.
//
// What is allowed, then:
// - A request for a new key (open limiter, n <= capacity) below the bound:
//   admitted, nothing evicted.
// - At the bound: with no evictable key, refused (too_many_keys; try_get
//   false), nothing evicted. With evictable keys: the limiter evicts exactly
//   one of them and admits the key; it may instead refuse only when every
//   evictable key is held back.
// - evict(): evicts evictable keys only, and every evictable key except those
//   held back; returns how many it evicted.
// - Nothing else evicts; there are never more than max_keys buckets.
//
// The order of completions within one call, per key, is the bucket model's
// (token_bucket_model.hpp): close(), cancel_all(), destroy() complete each
// key's queue front to back.
//
// Quotas (README "Per-key limits": run-time configuration). A key's capacity
// and rate are its own where set (set_quota, set_key_capacity, set_key_rate),
// else the limiter's defaults; a key's own settings are configuration, kept
// whether or not it has a bucket, so a key's bucket, new or re-made after
// eviction, starts full at the key's capacity. A change that alters a key's
// capacity or rate is applied to its bucket at once, as the bucket model's
// set_capacity then set_rate (requests over a smaller capacity fail, the
// others are re-timed; per key, in that order), except that a bucket full at
// the change is full at a raised capacity: a full bucket is the fresh bucket
// the key would get, so whether it was evicted first changes nothing; a
// change of the defaults
// applies to every key without its own setting of it. Every "the capacity"
// above is the key's: a request over it fails at once, available() of a key
// with no bucket is it, and a full bucket holds it. A change applied to a
// key's bucket re-indexes the key, as a request does (it is no longer stale);
// the README says a change re-indexes every bucket it visits, and a change of
// the defaults visits every bucket, also those of keys with their own settings.
//
#ifndef RATELIMIT_TEST_KEYED_LIMITER_MODEL_HPP
#define RATELIMIT_TEST_KEYED_LIMITER_MODEL_HPP

#include "token_bucket_model.hpp"

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ratelimit::model {

/// An outcome the documentation does not allow (thrown by keyed_limiter_model).
class violation : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

template <typename Key>
class keyed_limiter_model {
 public:
  /// Throws std::invalid_argument for a capacity of 0, an invalid rate
  /// (as token_bucket_model), or max_keys 0 (as the limiter does).
  keyed_limiter_model(std::uint64_t capacity, model_rate r, std::size_t max_keys)
      : capacity_(capacity), rate_(r), max_keys_(max_keys) {
    token_bucket_model check(capacity, r, capacity, 0);  // validates capacity and rate
    if (max_keys == 0) throw std::invalid_argument("max_keys 0");
  }

  // --- configuration ----------------------------------------------------------

  /// A key's capacity and rate: its own where set, else the defaults.
  struct quota {
    std::uint64_t capacity;
    model_rate rate;
  };
  quota quota_of(const Key& key) const {
    quota q{capacity_, rate_};
    if (auto it = own_.find(key); it != own_.end()) {
      if (it->second.capacity) q.capacity = *it->second.capacity;
      if (it->second.rate) q.rate = *it->second.rate;
    }
    return q;
  }
  std::size_t own_quotas() const { return own_.size(); }

  /// The defaults (std::invalid_argument for a capacity of 0 or a bad rate).
  void set_default_rate(model_rate r, std::int64_t now) { configure(nullptr, {}, r, now); }
  void set_default_capacity(std::uint64_t c, std::int64_t now) { configure(nullptr, c, {}, now); }
  /// `key`'s own settings (what is empty is left as it is).
  void set_own(const Key& key, std::optional<std::uint64_t> c, std::optional<model_rate> r,
               std::int64_t now) {
    configure(&key, c, r, now);
  }
  /// Drops `key`'s own settings; false if it had none.
  bool reset_own(const Key& key, std::int64_t now) {
    auto it = own_.find(key);
    if (it == own_.end()) return false;
    const quota before = quota_of(key);
    own_.erase(it);
    apply(key, before, now);
    return true;
  }

  // --- requests -------------------------------------------------------------

  /// async_get_token(key, n) at `now`; the request gets the next id.
  /// `evicted`: the keys whose bucket the limiter dropped meanwhile (observed).
  std::uint64_t request(const Key& key, std::uint64_t n, std::int64_t now,
                        const std::vector<Key>& evicted = {}) {
    const std::uint64_t id = next_id_++;
    requests_.push_back({key, 0, 0});
    const result at_once = admit(key, n, now, evicted);
    if (at_once != result::pending) {
      complete(id, at_once);
      return id;
    }
    slot& s = buckets_.at(key);
    requests_.back() = {key, s.generation, s.bucket.requests()};
    s.ids.push_back(id);
    s.bucket.request(n, now);
    requested(s, now);
    collect();
    return id;
  }

  /// try_get_token(key, n) at `now`: `granted`, or why not: `pending` (the
  /// tokens are not there, or a request for the key is queued), `closed`,
  /// `exceeds_capacity`, `too_many_keys`.
  result try_get(const Key& key, std::uint64_t n, std::int64_t now,
                 const std::vector<Key>& evicted = {}) {
    const result at_once = admit(key, n, now, evicted);
    if (at_once != result::pending) return at_once;
    slot& s = buckets_.at(key);
    const bool granted = s.bucket.try_get(n, now);
    requested(s, now);
    return granted ? result::granted : result::pending;
  }

  /// try_get_token(key, n, retry_after, ec) at `now`: as try_get, but the
  /// key's due requests are granted first, and `wait` is what retry_after(key,
  /// n) says when refused for want of tokens (`pending`), 0 when granted,
  /// empty when it fails at once.
  result try_get_serving(const Key& key, std::uint64_t n, std::int64_t now,
                         std::optional<std::int64_t>& wait, const std::vector<Key>& evicted = {}) {
    wait.reset();
    const result at_once = admit(key, n, now, evicted);
    if (at_once != result::pending) return at_once;
    slot& s = buckets_.at(key);
    s.bucket.serve_due(now);
    collect();
    const bool granted = s.bucket.try_get(n, now);
    wait = granted ? std::optional<std::int64_t>(0) : s.bucket.retry_after(n, now);
    collect();
    requested(s, now);
    return granted ? result::granted : result::pending;
  }

  /// A receipt for `key` gives back `n` tokens (the caller bounds `n` by
  /// what the receipt holds): to the key's bucket as it is now, as
  /// token_bucket_model::give_back; to nothing when the key has no bucket
  /// (evicted, so full: a fresh one would be full too). Giving back nothing
  /// (n == 0: the receipt held nothing, or k was 0) is no event at all: the
  /// bucket sees nothing, so neither is the key re-indexed (a stale key stays
  /// held back; README "Receipts": give_back gives min(k, held())).
  void give_back(const Key& key, std::uint64_t n, std::int64_t now) {
    if (n == 0) return;
    auto it = buckets_.find(key);
    if (it == buckets_.end()) return;
    slot& s = it->second;
    s.bucket.give_back(n, now);
    requested(s, now);
    collect();
  }

  /// Per-operation cancellation of request `id`: a no-op unless it is queued.
  void cancel(std::uint64_t id, std::int64_t now) {
    if (id >= requests_.size()) return;
    const request_ref& r = requests_[id];
    auto it = buckets_.find(r.key);
    if (it == buckets_.end() || it->second.generation != r.generation) return;
    slot& s = it->second;
    const std::size_t before = s.bucket.waiting();
    s.bucket.cancel(r.local, now);
    if (s.bucket.waiting() < before) s.stale = true;
    collect();
  }

  /// cancel(): every queued request of every key is aborted; returns how many.
  std::size_t cancel_all(std::int64_t now) {
    std::size_t n = 0;
    for (auto& [key, s] : buckets_) {
      const std::size_t k = s.bucket.cancel_all(now);
      if (k > 0) s.stale = true;
      n += k;
    }
    collect();
    return n;
  }

  void close(std::int64_t now) {
    closed_ = true;
    for (auto& [key, s] : buckets_)
      s.bucket.close(now);
    collect();
  }

  /// evict() at `now`, which evicted the keys `evicted` (observed); returns
  /// how many it must report.
  std::size_t evict(std::int64_t now, const std::vector<Key>& evicted) {
    serve_due(now);
    for (const Key& k : evicted)
      check_evictable(k, now, "evict()");
    for (const auto& [key, s] : buckets_) {
      if (std::find(evicted.begin(), evicted.end(), key) != evicted.end()) continue;
      if (evictable(key, now) && !held_back(key, now))
        fail("evict() kept key ", key,
             ", which is evictable (full, nobody waiting) and not "
             "held back by a cancellation");
    }
    for (const Key& k : evicted)
      buckets_.erase(k);
    return evicted.size();
  }

  /// The limiter's destructor: every queued request is aborted.
  void destroy(std::int64_t now) {
    closed_ = true;
    for (auto& [key, s] : buckets_)
      s.bucket.destroy(now);
    collect();
  }

  /// Every bucket's timer has had its chance to fire at `now`.
  void serve_due(std::int64_t now) {
    for (auto& [key, s] : buckets_)
      s.bucket.serve_due(now);
    collect();
  }

  // --- the eviction rules -----------------------------------------------------

  /// Full, nobody waiting, its time not after `now` (due waiters granted first).
  /// Like available(), this and held_back() bring the bucket to `now`.
  bool evictable(const Key& key, std::int64_t now) {
    auto it = buckets_.find(key);
    if (it == buckets_.end()) return false;
    token_bucket_model& b = it->second.bucket;
    b.serve_due(now);
    collect();
    return b.waiting() == 0 && b.available(now) == b.capacity() && b.now() <= now;
  }

  /// Evictable, yet the limiter may keep it (the documented conservative case).
  bool held_back(const Key& key, std::int64_t now) {
    if (!evictable(key, now)) return false;
    const slot& s = buckets_.at(key);
    return s.stale && s.hold > now;
  }

  /// For `key` (with a bucket): the latest time the limiter's index can give
  /// it while `stale` (nothing when not stale).
  std::optional<std::int64_t> held_until(const Key& key) const {
    auto it = buckets_.find(key);
    if (it == buckets_.end() || !it->second.stale) return std::nullopt;
    return it->second.hold;
  }

  // --- observers --------------------------------------------------------------

  /// Whole tokens `key` could take now (the capacity for a key with no bucket).
  std::uint64_t available(const Key& key, std::int64_t now) {
    auto it = buckets_.find(key);
    if (it == buckets_.end()) return quota_of(key).capacity;
    const std::uint64_t n = it->second.bucket.available(now);
    collect();
    return n;
  }

  /// retry_after(key, n) at `now`: a key with no bucket would get a full one
  /// (zero), else its bucket's answer; nothing when the request would fail at
  /// once (closed, n > capacity).
  std::optional<std::int64_t> retry_after(const Key& key, std::uint64_t n, std::int64_t now) {
    if (closed_ || n > quota_of(key).capacity) return std::nullopt;
    auto it = buckets_.find(key);
    if (it == buckets_.end()) return 0;
    const auto wait = it->second.bucket.retry_after(n, now);
    collect();
    return wait;
  }

  bool contains(const Key& key) const { return buckets_.count(key) != 0; }
  std::size_t size() const { return buckets_.size(); }
  std::vector<Key> keys() const {
    std::vector<Key> k;
    for (const auto& [key, s] : buckets_)
      k.push_back(key);
    return k;
  }
  std::size_t max_keys() const { return max_keys_; }
  std::uint64_t capacity() const { return capacity_; }  // the default
  model_rate rate() const { return rate_; }             // the default
  bool is_open() const { return !closed_; }
  std::uint64_t requests() const { return next_id_; }
  const Key& key_of(std::uint64_t id) const { return requests_.at(id).key; }

  /// The bucket model of `key` (null when it has none), for the harness's
  /// choice of instants (head_ready_at(), full_at()); do not change it.
  const token_bucket_model* bucket(const Key& key) const {
    auto it = buckets_.find(key);
    return it == buckets_.end() ? nullptr : &it->second.bucket;
  }

  /// Every completion so far: in each key's order; ids are limiter-wide.
  const std::vector<completion>& completions() const { return completions_; }

  /// How request `id` ended (pending while queued).
  result status(std::uint64_t id) const {
    for (const completion& c : completions_)
      if (c.id == id) return c.how;
    return result::pending;
  }

 private:
  struct slot {
    token_bucket_model bucket;
    std::uint64_t generation;        // which bucket of the key (a new one after eviction)
    std::vector<std::uint64_t> ids;  // the bucket's request ids -> limiter-wide ids
    std::size_t seen = 0;            // bucket completions already collected
    bool stale = false;              // see the header comment
    std::int64_t hold = 0;           // see the header comment
  };
  struct request_ref {
    Key key;
    std::uint64_t generation;  // 0: never reached a bucket
    std::uint64_t local;       // id within that bucket model
  };

  /// Decides a request's fate before its key's bucket sees it: `pending` when
  /// it goes to the bucket (made if needed), or the error it fails with at once.
  result admit(const Key& key, std::uint64_t n, std::int64_t now, const std::vector<Key>& evicted) {
    const quota q = quota_of(key);
    if (closed_ || n > q.capacity || buckets_.count(key)) {
      if (!evicted.empty()) fail("a request that needs no new bucket evicted key ", evicted[0]);
      if (closed_) return result::closed;
      if (n > q.capacity) return result::exceeds_capacity;
      return result::pending;
    }
    if (buckets_.size() < max_keys_) {
      if (!evicted.empty()) fail("key ", evicted[0], " was evicted below the bound");
    } else {
      serve_due(now);  // due waiters are granted before the decision
      if (evicted.size() > 1) fail("one new key evicted two: ", evicted[0], " and ", evicted[1]);
      if (evicted.empty()) {
        for (const auto& [k, s] : buckets_)
          if (evictable(k, now) && !held_back(k, now))
            fail("new key ", key, " refused while key ", k,
                 " is evictable (full, nobody waiting) and not held back by a cancellation");
        return result::too_many_keys;
      }
      check_evictable(evicted[0], now, "a new key");
      buckets_.erase(evicted[0]);
    }
    slot s{
        token_bucket_model(q.capacity, q.rate, q.capacity, now), ++generations_, {}, 0, false, now};
    buckets_.emplace(key, std::move(s));
    if (buckets_.size() > max_keys_) fail("more keys than max_keys after admitting key ", key);
    return result::pending;
  }

  void check_evictable(const Key& key, std::int64_t now, const char* by) {
    auto it = buckets_.find(key);
    if (it == buckets_.end()) fail(by, " evicted key ", key, ", which had no bucket");
    token_bucket_model& b = it->second.bucket;
    b.serve_due(now);
    collect();
    if (b.waiting() != 0) fail(by, " evicted key ", key, ", which has ", b.waiting(), " waiters");
    const std::uint64_t a = b.available(now);
    if (a != b.capacity()) fail(by, " evicted key ", key, ", not full: ", a, " of ", b.capacity());
    if (b.now() > now)
      fail(by, " evicted key ", key, ", full only as of a later clock reading (", b.now(),
           " > now ", now, ")");
  }

  /// After a request on `s`'s key that reached its bucket: the index is exact.
  void requested(slot& s, std::int64_t now) {
    s.stale = false;
    s.hold = std::max(s.bucket.full_at(), now);
  }

  void complete(std::uint64_t id, result how) { completions_.push_back({id, how}); }

  /// Sets the defaults (key null) or `*key`'s own settings, then applies what
  /// changed to the buckets. Validates first: a refused value changes nothing.
  void configure(const Key* key, std::optional<std::uint64_t> c, std::optional<model_rate> r,
                 std::int64_t now) {
    token_bucket_model check(c.value_or(1), r.value_or(model_rate{1, 1}), 0, 0);
    if (key) {
      const quota before = quota_of(*key);
      own& o = own_[*key];
      if (c) o.capacity = c;
      if (r) o.rate = r;
      apply(*key, before, now);
      return;
    }
    std::map<Key, quota> before;
    for (const auto& [k, s] : buckets_)
      before.emplace(k, quota_of(k));
    if (c) capacity_ = *c;
    if (r) rate_ = *r;
    for (const auto& [k, q] : before)
      apply(k, q, now);
  }

  /// `key`'s quota was `before`: its bucket (if any) gets the new one,
  /// capacity first, then rate; a change re-indexes the key.
  void apply(const Key& key, const quota& before, std::int64_t now) {
    auto it = buckets_.find(key);
    if (it == buckets_.end()) return;
    const quota after = quota_of(key);
    slot& s = it->second;
    if (after.capacity != before.capacity)
      s.bucket.set_capacity(after.capacity, now, /*full_stays_full=*/true);
    if (!(after.rate.tokens == before.rate.tokens && after.rate.period == before.rate.period))
      s.bucket.set_rate(after.rate, now);
    requested(s, now);
    collect();
  }

  /// Appends the buckets' new completions (as limiter-wide ids).
  void collect() {
    for (auto& [key, s] : buckets_) {
      const auto& c = s.bucket.completions();
      for (; s.seen < c.size(); ++s.seen)
        complete(s.ids.at(c[s.seen].id), c[s.seen].how);
    }
  }

  template <typename... Args>
  [[noreturn]] static void fail(const Args&... args) {
    std::ostringstream os;
    (os << ... << args);
    throw violation(os.str());
  }

  struct own {
    std::optional<std::uint64_t> capacity;
    std::optional<model_rate> rate;
  };

  std::uint64_t capacity_;
  model_rate rate_;
  std::size_t max_keys_;
  std::map<Key, own> own_;  // keys' own settings: configuration, kept across eviction
  bool closed_ = false;
  std::map<Key, slot> buckets_;
  std::uint64_t generations_ = 0;
  std::uint64_t next_id_ = 0;
  std::vector<request_ref> requests_;  // by id
  std::vector<completion> completions_;
};

}  // namespace ratelimit::model

#endif  // RATELIMIT_TEST_KEYED_LIMITER_MODEL_HPP
