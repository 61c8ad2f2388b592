//
// ratelimit/joint.hpp: several limits taken as one (the joint acquire).
//
#ifndef RATELIMIT_JOINT_HPP
#define RATELIMIT_JOINT_HPP

#include <ratelimit/detail/bucket_impl.hpp>
#include <ratelimit/detail/joint_group.hpp>
#include <ratelimit/detail/operation.hpp>
#include <ratelimit/detail/part_source.hpp>
#include <ratelimit/detail/receipt_handler.hpp>
#include <ratelimit/detail/timer_driver.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/receipt.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

namespace ratelimit {

namespace detail {
template <typename Clock, typename WaitTraits>
class joint_request;
}

/// One limit of a joint request: `n` tokens of a token bucket, or of one key
/// of a keyed limiter. A part refers to its limiter as a deferred operation
/// does (it co-owns the limiter's state, not the limiter object): a part of
/// a limiter destroyed meanwhile fails with `operation_aborted`.
///
/// @code
/// ratelimit::part per_client(clients, address, 1);
/// ratelimit::part global(service, 1);
/// auto [ec, r] = co_await ratelimit::async_acquire({per_client, global},
///                                                  asio::as_tuple(asio::use_awaitable));
/// @endcode
template <typename Clock, typename WaitTraits = boost::asio::wait_traits<Clock>>
class basic_part {
 public:
  /// `n` tokens of `bucket`.
  template <typename Executor>
  basic_part(basic_token_bucket<Clock, WaitTraits, Executor>& bucket, std::uint64_t n = 1)
      : bucket_(bucket.impl_), ex_(bucket.executor_), n_(n) {}

  /// `n` tokens of `key`'s bucket in `limiter` (made if the key has none,
  /// when the request is made). @throws std::bad_alloc, what copying the key throws.
  template <typename Key, typename Hash, typename KeyEqual, typename Executor>
  basic_part(basic_keyed_limiter<Key, Hash, KeyEqual, Clock, WaitTraits, Executor>& limiter,
             const Key& key, std::uint64_t n = 1)
      : source_(limiter.impl_ ? limiter.impl_->part_of(key) : nullptr),
        ex_(limiter.executor_),
        n_(n) {}

  /// The tokens this part asks for.
  std::uint64_t tokens() const noexcept { return n_; }

 private:
  template <typename, typename>
  friend class detail::joint_request;

  std::shared_ptr<detail::bucket_impl<Clock, WaitTraits>> bucket_;  // a token bucket's
  std::shared_ptr<detail::part_source<Clock, WaitTraits>> source_;  // or a key's
  boost::asio::any_io_executor ex_;
  std::uint64_t n_;
};

/// A part of a joint request over steady_clock limiters.
using part = basic_part<std::chrono::steady_clock>;

/// The receipts of a joint grant: one per part, in the order of the parts
/// (each gives back to its own limiter, as `ratelimit::receipt` does).
class joint_receipt {
 public:
  joint_receipt() noexcept = default;
  explicit joint_receipt(std::vector<receipt> parts) noexcept : parts_(std::move(parts)) {}
  joint_receipt(joint_receipt&&) noexcept = default;
  joint_receipt& operator=(joint_receipt&&) noexcept = default;

  /// How many parts (0 for a failed request's empty receipt).
  std::size_t size() const noexcept { return parts_.size(); }
  bool empty() const noexcept { return parts_.empty(); }

  /// The receipt of part `i`.
  receipt& operator[](std::size_t i) noexcept { return parts_[i]; }
  const receipt& operator[](std::size_t i) const noexcept { return parts_[i]; }

  auto begin() noexcept { return parts_.begin(); }
  auto end() noexcept { return parts_.end(); }
  auto begin() const noexcept { return parts_.begin(); }
  auto end() const noexcept { return parts_.end(); }

  /// Gives back what every part still holds; returns the sum.
  std::uint64_t give_back_all() {
    std::uint64_t n = 0;
    for (receipt& r : parts_)
      n += r.give_back_all();
    return n;
  }

 private:
  std::vector<receipt> parts_;
};

namespace detail {

/// One call's view of a joint request: its parts resolved to buckets (the
/// keyed limiters' locks held, in address order, until done()).
template <typename Clock, typename WaitTraits>
class joint_request {
 public:
  using part_type = basic_part<Clock, WaitTraits>;
  using bucket_type = bucket_impl<Clock, WaitTraits>;
  using group_type = joint_group<Clock, WaitTraits>;

  /// Resolves `parts`; `ec` when the request fails at once before any
  /// bucket is asked (a part of a moved-from limiter; a key refused).
  /// @throws std::invalid_argument: no part, or two parts naming one bucket.
  joint_request(std::span<const part_type> parts, boost::system::error_code& ec) {
    if (parts.empty()) throw std::invalid_argument("ratelimit: a joint request needs a part");
    ex_ = parts.front().ex_;
    // All the memory first: once a key's bucket is pinned, nothing may throw
    // before it is recorded for done().
    domains_.reserve(parts.size());
    used_.reserve(parts.size());
    keep_.reserve(parts.size());
    parts_.reserve(parts.size());
    for (const part_type& p : parts)
      if (p.source_) domains_.push_back(&p.source_->domain());
    std::sort(domains_.begin(), domains_.end());
    domains_.erase(std::unique(domains_.begin(), domains_.end()), domains_.end());
    for (std::mutex* m : domains_)
      m->lock();
    locked_ = true;
    try {
      bool over = false;  // a key's part over its capacity: fails, unless a part is closed
      for (const part_type& p : parts) {
        std::shared_ptr<bucket_type> b = p.bucket_;
        void* cookie = nullptr;
        if (p.source_) {
          b = p.source_->resolve(p.n_, ec, cookie);
          if (b) used_.push_back({p.source_.get(), cookie});
        } else if (!b) {
          ec = error::bucket_closed;  // a moved-from bucket
        }
        if (ec == error::exceeds_capacity) {
          over = true;
          ec = {};
          continue;
        }
        if (ec) return;
        for (const auto& other : keep_)
          if (other == b)
            throw std::invalid_argument("ratelimit: a joint request names a bucket twice");
        keep_.push_back(b);
        parts_.push_back({b.get(), p.n_});
      }
      if (over) {  // closed before over the capacity, as every limiter decides
        for (const auto& b : keep_)
          if ((ec = b->closed_error())) return;
        ec = error::exceeds_capacity;
      }
    } catch (...) {
      done();
      throw;
    }
  }

  ~joint_request() { done(); }
  joint_request(const joint_request&) = delete;
  joint_request& operator=(const joint_request&) = delete;

  std::span<const bucket_part<Clock, WaitTraits>> parts() const noexcept { return parts_; }
  /// The first part's limiter's executor: where the request completes
  /// (also when it fails before any bucket is asked).
  const boost::asio::any_io_executor& executor() const noexcept { return ex_; }

  /// The receipts for a grant of these parts (made before it is asked for).
  static joint_receipt receipts(std::span<const part_type> parts) {
    std::vector<receipt> r;
    r.reserve(parts.size());
    for (const part_type& p : parts) {
      receipt_target t = p.source_   ? p.source_->target()
                         : p.bucket_ ? p.bucket_->receipt_target_of()
                                     : receipt_target{};
      r.push_back(receipt_access::make(std::move(t), p.n_));
    }
    return joint_receipt(std::move(r));
  }

  /// The request is made: the keys' buckets may be evicted again, and the
  /// limiters' locks are released.
  void done() noexcept {
    if (!locked_) return;
    locked_ = false;
    for (auto& [source, cookie] : used_) {
      try {
        source->used(cookie);
      } catch (...) {  // re-indexing met an allocation failure: the key is re-indexed later
      }
    }
    used_.clear();
    for (auto it = domains_.rbegin(); it != domains_.rend(); ++it)
      (*it)->unlock();
  }

 private:
  std::vector<std::mutex*> domains_;
  std::vector<std::pair<part_source<Clock, WaitTraits>*, void*>> used_;
  std::vector<std::shared_ptr<bucket_type>> keep_;
  std::vector<bucket_part<Clock, WaitTraits>> parts_;
  boost::asio::any_io_executor ex_;
  bool locked_ = false;
};

template <typename Clock, typename WaitTraits>
struct initiate_joint_acquire {
  template <typename Handler>
  void operator()(Handler&& handler, std::vector<basic_part<Clock, WaitTraits>> parts) const {
    static_assert(
        std::is_invocable_v<std::decay_t<Handler>&&, boost::system::error_code, joint_receipt>,
        "ratelimit: handler must be callable as void(boost::system::error_code, "
        "ratelimit::joint_receipt)");
    using request_type = joint_request<Clock, WaitTraits>;
    using wrapped = receipt_handler<std::decay_t<Handler>, joint_receipt>;
    boost::system::error_code ec;
    request_type req(parts, ec);
    if (ec) {
      req.done();
      return post_completion(std::forward<Handler>(handler), req.executor(), ec, joint_receipt());
    }
    wrapped h(std::decay_t<Handler>(std::forward<Handler>(handler)), request_type::receipts(parts));
    using op_type = handler_op<waiter_base, wrapped>;
    op_type* op = op_type::create(std::move(h), req.executor(), std::uint64_t{0});
    try {
      link_cancellation(op->handler(), op, *req.parts().front().bucket);
    } catch (...) {
      op->destroy();
      throw;
    }
    joint_group<Clock, WaitTraits>::start(req.parts(), op);  // (destroys `op` if it throws)
  }
};

template <typename Duration>
std::int64_t to_timeout_ns(Duration timeout) noexcept {
  // In long double first: a timeout of hours::max() must saturate, not overflow.
  const long double ns = std::chrono::duration<long double, std::nano>(timeout).count();
  if (ns <= 0) return 0;
  if (ns >= static_cast<long double>(max_time)) return max_time;
  return static_cast<std::int64_t>(ns);
}

}  // namespace detail

/// Takes `parts` (each `n_i` tokens of its limiter) as one request:
/// granted together at T, the earliest time at which every limiter can give
/// its part after serving the requests ahead of it there; nothing is taken or
/// withheld until then, and a request behind it on a limiter that has tokens
/// to spare is granted first exactly when that cannot delay it. Every
/// request, single or joint, has its place in one order when it is made, and
/// none is delayed by a request made after it. Any failure (a part over its
/// limiter's capacity, a limiter closed or destroyed, cancellation, a key
/// refused for the memory bound) takes nothing anywhere.
///
/// Completes with `void(boost::system::error_code, ratelimit::joint_receipt)`
/// through the first part's limiter's executor (handlers with an executor of
/// their own are invoked there, as always). Cancellation (terminal, partial,
/// total) takes the request out of every queue. Errors: `bucket_closed`,
/// `exceeds_capacity`, `too_many_keys`, `operation_aborted`.
/// @throws std::invalid_argument no part, or two parts naming one bucket.
template <typename Clock, typename WaitTraits,
          BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code, joint_receipt)) Token>
auto async_acquire(std::span<const basic_part<Clock, WaitTraits>> parts, Token&& token) {
  return boost::asio::async_initiate<Token, void(boost::system::error_code, joint_receipt)>(
      detail::initiate_joint_acquire<Clock, WaitTraits>{}, token,
      std::vector<basic_part<Clock, WaitTraits>>(parts.begin(), parts.end()));
}

template <typename Clock, typename WaitTraits,
          BOOST_ASIO_COMPLETION_TOKEN_FOR(void(boost::system::error_code, joint_receipt)) Token>
auto async_acquire(std::initializer_list<basic_part<Clock, WaitTraits>> parts, Token&& token) {
  return async_acquire(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()),
                       std::forward<Token>(token));
}

/// Blocks until `parts` are granted together (as async_acquire), for at most
/// `timeout`; returns the receipt. An empty receipt with `ec` clear: not
/// granted in time (known at once when the grant could not come by then:
/// the call then returns without waiting). With `ec`: as async_acquire, or
/// `would_deadlock` (called from a thread running the first part's
/// limiter's context), `context_stopped`.
template <typename Clock, typename WaitTraits, typename Rep, typename Period>
joint_receipt acquire_for(std::span<const basic_part<Clock, WaitTraits>> parts,
                          std::chrono::duration<Rep, Period> timeout,
                          boost::system::error_code& ec) {
  ec = {};
  joint_receipt r = detail::joint_request<Clock, WaitTraits>::receipts(parts);
  detail::joint_request<Clock, WaitTraits> req(parts, ec);
  if (ec) return {};
  const bool granted = detail::joint_group<Clock, WaitTraits>::get_blocking(
      req.parts(), detail::to_timeout_ns(timeout), ec, [&] { req.done(); });
  if (!granted) return {};
  return r;
}

/// Blocks until `parts` are granted together; `ec` as acquire_for.
template <typename Clock, typename WaitTraits>
joint_receipt acquire(std::span<const basic_part<Clock, WaitTraits>> parts,
                      boost::system::error_code& ec) {
  ec = {};
  joint_receipt r = detail::joint_request<Clock, WaitTraits>::receipts(parts);
  detail::joint_request<Clock, WaitTraits> req(parts, ec);
  if (ec) return {};
  if (!detail::joint_group<Clock, WaitTraits>::get_blocking(req.parts(), detail::max_time, ec,
                                                            [&] { req.done(); }))
    return {};
  return r;
}

/// As above; throws boost::system::system_error instead of returning `ec`.
template <typename Clock, typename WaitTraits>
joint_receipt acquire(std::span<const basic_part<Clock, WaitTraits>> parts) {
  boost::system::error_code ec;
  joint_receipt r = acquire(parts, ec);
  if (ec) throw boost::system::system_error(ec, "ratelimit::acquire");
  return r;
}

template <typename Clock, typename WaitTraits>
joint_receipt acquire(std::initializer_list<basic_part<Clock, WaitTraits>> parts) {
  return acquire(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()));
}

/// Grants `parts` together now exactly when a request made now would be
/// granted now (every limiter holds its part, and taking it delays nobody
/// ahead); otherwise takes nothing. `retry_after` is set to how long a
/// request made now would wait (exact as of the call; zero when granted),
/// and left empty when the request fails at once (`ec` says why: as
/// async_acquire). A key's part makes the key's bucket, as a request would.
template <typename Clock, typename WaitTraits>
std::optional<joint_receipt> try_acquire(std::span<const basic_part<Clock, WaitTraits>> parts,
                                         std::optional<typename Clock::duration>& retry_after,
                                         boost::system::error_code& ec) {
  ec = {};
  retry_after.reset();
  joint_receipt r = detail::joint_request<Clock, WaitTraits>::receipts(parts);
  detail::joint_request<Clock, WaitTraits> req(parts, ec);
  if (ec) return std::nullopt;
  std::optional<std::int64_t> wait;
  const bool granted = detail::joint_group<Clock, WaitTraits>::try_take(req.parts(), &wait, ec);
  if (wait) retry_after = detail::to_duration<typename Clock::duration>(*wait);
  if (!granted) return std::nullopt;
  return std::optional<joint_receipt>(std::move(r));
}

template <typename Clock, typename WaitTraits>
std::optional<joint_receipt> try_acquire(std::span<const basic_part<Clock, WaitTraits>> parts,
                                         std::optional<typename Clock::duration>& retry_after) {
  boost::system::error_code ec;
  return try_acquire(parts, retry_after, ec);
}

template <typename Clock, typename WaitTraits>
std::optional<joint_receipt> try_acquire(std::span<const basic_part<Clock, WaitTraits>> parts) {
  std::optional<typename Clock::duration> ignored;
  boost::system::error_code ec;
  return try_acquire(parts, ignored, ec);
}

template <typename Clock, typename WaitTraits>
std::optional<joint_receipt> try_acquire(
    std::initializer_list<basic_part<Clock, WaitTraits>> parts) {
  return try_acquire(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()));
}

template <typename Clock, typename WaitTraits>
std::optional<joint_receipt> try_acquire(std::initializer_list<basic_part<Clock, WaitTraits>> parts,
                                         std::optional<typename Clock::duration>& retry_after) {
  return try_acquire(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()),
                     retry_after);
}

/// How long a request of `parts` made now would wait before it is granted
/// (zero: at once), counting every request ahead of it on each limiter;
/// exact as of the call (a later set_rate, or a request ahead that leaves,
/// changes it). Nothing when it would fail at once.
template <typename Clock, typename WaitTraits>
std::optional<typename Clock::duration> retry_after(
    std::span<const basic_part<Clock, WaitTraits>> parts) {
  boost::system::error_code ec;
  detail::joint_request<Clock, WaitTraits> req(parts, ec);
  if (ec) return std::nullopt;
  const auto wait = detail::joint_group<Clock, WaitTraits>::retry_after(req.parts(), ec);
  if (!wait) return std::nullopt;
  return detail::to_duration<typename Clock::duration>(*wait);
}

template <typename Clock, typename WaitTraits>
std::optional<typename Clock::duration> retry_after(
    std::initializer_list<basic_part<Clock, WaitTraits>> parts) {
  return retry_after(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()));
}

}  // namespace ratelimit

#endif  // RATELIMIT_JOINT_HPP
