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
#include <ratelimit/remote_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/associated_allocator.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/container/small_vector.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <future>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace ratelimit {

namespace detail {
template <typename Clock, typename WaitTraits>
class joint_request;
template <typename Clock, typename WaitTraits>
struct remote_joint_op;
template <typename Clock, typename WaitTraits>
struct initiate_joint_acquire;
struct part_access;
}  // namespace detail

/// One limit of a joint request: `n` tokens of a token bucket, of one key of
/// a keyed limiter, or of a remote limiter (ratelimit/remote_limiter.hpp). A
/// part refers to a local limiter as a deferred operation does (it co-owns
/// the limiter's state, not the limiter object): a part of a limiter
/// destroyed meanwhile fails with `operation_aborted`. A remote part co-owns
/// its remote limiter.
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
  /// when the request is made). The key converts to the limiter's key type
  /// (a string literal for a `std::string` key). @throws std::bad_alloc,
  /// what copying the key throws.
  template <typename Key, typename Hash, typename KeyEqual, typename Executor>
  basic_part(basic_keyed_limiter<Key, Hash, KeyEqual, Clock, WaitTraits, Executor>& limiter,
             const std::type_identity_t<Key>& key, std::uint64_t n = 1)
      : source_(limiter.impl_ ? limiter.impl_->part_of(key) : nullptr),
        ex_(limiter.executor_),
        n_(n) {}

  /// `n` tokens of a remote limiter (one that answers late). A request with
  /// a remote part is asynchronous only: async_acquire, or the blocking
  /// acquire without a deadline (see async_acquire for how it is served).
  basic_part(std::shared_ptr<basic_remote_limiter<Clock>> remote, std::uint64_t n = 1)
      : remote_(std::move(remote)), n_(n) {
    if (!remote_) throw std::invalid_argument("ratelimit: a remote part needs a limiter");
    ex_ = remote_->get_executor();
  }

  /// The executor of the part's limiter.
  const boost::asio::any_io_executor& get_executor() const noexcept { return ex_; }

  /// True for a part of a remote limiter.
  bool remote() const noexcept { return remote_ != nullptr; }

  /// The tokens this part asks for.
  std::uint64_t tokens() const noexcept { return n_; }

  /// The capacity of the part's limiter where it is known without making a
  /// request (a token bucket's, as of the call; 0 for a moved-from one);
  /// nothing for a key or a remote limiter.
  std::optional<std::uint64_t> capacity() const {
    if (source_ || remote_) return std::nullopt;
    return bucket_ ? bucket_->capacity() : 0;
  }

  /// A copy of this part asking for `n` tokens of the same limiter.
  basic_part with_tokens(std::uint64_t n) const& {
    basic_part p(*this);
    p.n_ = n;
    return p;
  }
  basic_part with_tokens(std::uint64_t n) && {
    n_ = n;
    return std::move(*this);
  }

 private:
  template <typename, typename>
  friend class detail::joint_request;
  template <typename, typename>
  friend struct detail::remote_joint_op;
  template <typename, typename>
  friend struct detail::initiate_joint_acquire;
  friend struct detail::part_access;

  std::shared_ptr<detail::bucket_impl<Clock, WaitTraits>> bucket_;  // a token bucket's
  std::shared_ptr<detail::part_source<Clock, WaitTraits>> source_;  // or a key's
  std::shared_ptr<basic_remote_limiter<Clock>> remote_;             // or a remote limiter's
  boost::asio::any_io_executor ex_;
  std::uint64_t n_;
};

/// A part of a joint request over steady_clock limiters.
using part = basic_part<std::chrono::steady_clock>;

namespace detail {
/// The token bucket of a part (null for a key's or a remote limiter's part).
struct part_access {
  template <typename Clock, typename WaitTraits>
  static bucket_impl<Clock, WaitTraits>* bucket(const basic_part<Clock, WaitTraits>& p) noexcept {
    return p.bucket_.get();
  }
};
}  // namespace detail

/// The receipts of a joint grant: one per part, in the order of the parts
/// (each gives back to its own limiter, as `ratelimit::receipt` does).
class joint_receipt {
 public:
  joint_receipt() noexcept = default;
  explicit joint_receipt(std::vector<receipt> parts)
      : parts_(std::make_move_iterator(parts.begin()), std::make_move_iterator(parts.end())) {}
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
  template <typename, typename>
  friend class detail::joint_request;
  template <typename, typename>
  friend struct detail::remote_joint_op;

  // A few parts' receipts in place: a joint grant allocates none for them.
  boost::container::small_vector<receipt, 4> parts_;
};

namespace detail {

/// A copy of a joint request's parts (a deferred async_acquire's, or one
/// with remote parts, kept until the request is made): a few in place,
/// without an allocation.
template <typename Clock, typename WaitTraits>
using joint_parts = boost::container::small_vector<basic_part<Clock, WaitTraits>, 4>;

/// async_acquire's initiation argument, its parts: the caller's, borrowed
/// while the request is made within the call (a completion handler is
/// initiated at once, from the argument as passed); and copied whenever the
/// argument is copied or moved, so the decay-copy that a deferred token
/// (use_awaitable, deferred, ...) keeps owns its parts.
template <typename Clock, typename WaitTraits>
class joint_parts_arg {
 public:
  using part_type = basic_part<Clock, WaitTraits>;

  explicit joint_parts_arg(std::span<const part_type> borrowed) noexcept : view_(borrowed) {}
  joint_parts_arg(const joint_parts_arg& o) : own_(o.view_.begin(), o.view_.end()), view_(own_) {}
  joint_parts_arg(joint_parts_arg&& o)
      : own_(o.owns() ? std::move(o.own_)
                      : joint_parts<Clock, WaitTraits>(o.view_.begin(), o.view_.end())),
        view_(own_) {
    o.view_ = {};
  }
  /// (Deferred operations that keep one stay assignable.)
  joint_parts_arg& operator=(joint_parts_arg o) {
    own_ = std::move(o.own_);
    view_ = own_;
    o.view_ = {};
    return *this;
  }

  std::span<const part_type> parts() const noexcept { return view_; }

 private:
  bool owns() const noexcept { return !view_.empty() && view_.data() == own_.data(); }

  joint_parts<Clock, WaitTraits> own_;
  std::span<const part_type> view_;
};

/// One call's view of a joint request: its parts resolved to buckets (the
/// keyed limiters' locks held, in address order, until done()). The parts
/// it is made from must outlive it: a token bucket's part keeps its bucket
/// alive, and the request refers to it without a reference of its own.
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
    ex_ = &parts.front().ex_;
    // All the memory first: once a key's bucket is pinned, nothing may throw
    // before it is recorded for done(). (A few parts fit in place: the
    // reserves allocate only for more.)
    std::size_t keys = 0;
    for (const part_type& p : parts)
      if (p.source_) {
        domains_.push_back(&p.source_->domain());  // (nothing is locked yet)
        ++keys;
      }
    parts_.reserve(parts.size());
    if (keys != 0) {
      used_.reserve(keys);
      keep_.reserve(keys);
      std::sort(domains_.begin(), domains_.end());
      domains_.erase(std::unique(domains_.begin(), domains_.end()), domains_.end());
      for (std::mutex* m : domains_)
        m->lock();
      locked_ = true;
    }
    try {
      bool over = false;  // a key's part over its capacity: fails, unless a part is closed
      for (const part_type& p : parts) {
        bucket_type* b = p.bucket_.get();  // (the part keeps it alive)
        void* cookie = nullptr;
        if (p.source_) {
          std::shared_ptr<bucket_type> kept = p.source_->resolve(p.n_, ec, cookie);
          b = kept.get();
          if (kept) {
            used_.push_back({p.source_.get(), cookie});
            keep_.push_back(std::move(kept));  // (reserved: no throw)
          }
        } else if (!b) {
          ec = error::bucket_closed;  // a moved-from bucket
        }
        if (ec == error::exceeds_capacity) {
          over = true;
          ec = {};
          continue;
        }
        if (ec) return;
        for (const auto& other : parts_)
          if (other.bucket == b)
            throw std::invalid_argument("ratelimit: a joint request names a bucket twice");
        parts_.push_back({b, p.n_});
      }
      if (over) {  // closed before over the capacity, as every limiter decides
        for (const auto& q : parts_)
          if ((ec = q.bucket->closed_error())) return;
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
  const boost::asio::any_io_executor& executor() const noexcept { return *ex_; }

  /// The receipts for a grant of these parts (made before it is asked for).
  static joint_receipt receipts(std::span<const part_type> parts) {
    joint_receipt r;
    make_receipts(parts, r);
    return r;
  }

  /// Makes them in `r` (empty). @throws std::bad_alloc (`r` may then hold some).
  static void make_receipts(std::span<const part_type> parts, joint_receipt& r) {
    r.parts_.reserve(parts.size());
    for (const part_type& p : parts)
      r.parts_.push_back(receipt_access::make(target_of(p), p.n_));
  }

  /// Where a receipt of part `p` gives back to. @throws std::bad_alloc
  static receipt_target target_of(const part_type& p) {
    if (p.source_) return p.source_->target();
    if (p.bucket_) return p.bucket_->receipt_target_of();
    if (p.remote_)
      return receipt_target{std::weak_ptr<void>(p.remote_), nullptr,
                            [](void* remote, std::uint64_t n) {
                              static_cast<basic_remote_limiter<Clock>*>(remote)->give_back(n);
                            }};
    return {};
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
  // A few parts in place: a request of up to four allocates nothing here.
  boost::container::small_vector<std::mutex*, 4> domains_;
  boost::container::small_vector<std::pair<part_source<Clock, WaitTraits>*, void*>, 4> used_;
  boost::container::small_vector<std::shared_ptr<bucket_type>, 4> keep_;  // keys' buckets
  boost::container::small_vector<bucket_part<Clock, WaitTraits>, 4> parts_;
  const boost::asio::any_io_executor* ex_ = nullptr;  // the first part's (it outlives this)
  bool locked_ = false;
};

template <typename Clock, typename WaitTraits>
bool has_remote(std::span<const basic_part<Clock, WaitTraits>> parts) noexcept {
  return std::any_of(parts.begin(), parts.end(), [](const auto& p) { return p.remote(); });
}

template <typename Clock, typename WaitTraits>
struct initiate_joint_acquire {
  /// `parts`: a joint_parts_arg, as passed (borrowed: the request is made
  /// before this returns) or as a token kept it (owned).
  template <typename Handler, typename Parts>
  void operator()(Handler&& handler, Parts&& parts) const {
    static_assert(
        std::is_invocable_v<std::decay_t<Handler>&&, boost::system::error_code, joint_receipt>,
        "ratelimit: handler must be callable as void(boost::system::error_code, "
        "ratelimit::joint_receipt)");
    static_assert(std::is_same_v<std::decay_t<Parts>, joint_parts_arg<Clock, WaitTraits>>);
    const std::span<const basic_part<Clock, WaitTraits>> ps = parts.parts();
    if (has_remote(ps))  // (an operation of its own, which keeps a copy)
      return start_remote(std::forward<Handler>(handler),
                          joint_parts<Clock, WaitTraits>(ps.begin(), ps.end()));
    start_local(std::forward<Handler>(handler), ps);
  }

  /// A request of local parts only.
  template <typename Handler>
  void start_local(Handler&& handler, std::span<const basic_part<Clock, WaitTraits>> parts) const {
    using request_type = joint_request<Clock, WaitTraits>;
    using wrapped = receipt_handler<std::decay_t<Handler>, joint_receipt>;
    boost::system::error_code ec;
    request_type req(parts, ec);
    if (ec) {
      req.done();
      return post_completion(std::forward<Handler>(handler), req.executor(), ec, joint_receipt());
    }
    using op_type = handler_op<waiter_base, wrapped>;
    // The receipts are made in the operation (made first: a grant completes
    // without allocating), not moved into it.
    op_type* op = op_type::create(
        wrapped(std::decay_t<Handler>(std::forward<Handler>(handler)), joint_receipt()),
        req.executor(), std::uint64_t{0});
    try {
      request_type::make_receipts(parts, op->handler().receipt());
      link_cancellation(op->handler(), op, *req.parts().front().bucket);
    } catch (...) {
      op->destroy();
      throw;
    }
    joint_group<Clock, WaitTraits>::start(req.parts(), op);  // (destroys `op` if it throws)
  }

  template <typename Handler>
  void start_remote(Handler&& handler, joint_parts<Clock, WaitTraits> parts) const;
};

/// The handler of one step of remote_joint_op: resumes the op kept in
/// `cell`, whose executor, allocator and cancellation slot it has.
template <typename Self>
struct remote_step {
  using executor_type = boost::asio::associated_executor_t<Self>;
  using allocator_type = boost::asio::associated_allocator_t<Self>;
  using cancellation_slot_type = boost::asio::associated_cancellation_slot_t<Self>;

  explicit remote_step(std::shared_ptr<std::optional<Self>> c)
      : cell(std::move(c)),
        ex(boost::asio::get_associated_executor(**cell)),
        alloc(boost::asio::get_associated_allocator(**cell)),
        slot(boost::asio::get_associated_cancellation_slot(**cell)) {}
  remote_step(remote_step&&) = default;
  remote_step(const remote_step&) = delete;  // (one op, resumed once)

  // Copies, taken when the step starts: asked after the step's handler was
  // moved from (as operations do when they free their memory), they are
  // still there.
  executor_type get_executor() const noexcept { return ex; }
  allocator_type get_allocator() const noexcept { return alloc; }
  cancellation_slot_type get_cancellation_slot() const noexcept { return slot; }

  template <typename... Args>
  void operator()(Args&&... args) {
    // The cell's memory goes back before the op runs on (and may complete).
    std::shared_ptr<std::optional<Self>> c = std::move(cell);
    Self self = std::move(**c);
    c.reset();
    self(std::forward<Args>(args)...);
  }

  std::shared_ptr<std::optional<Self>> cell;
  executor_type ex;
  allocator_type alloc;
  cancellation_slot_type slot;
};

/// The reservations a request holds: forgotten when it is destroyed
/// holding any (an op destroyed uncompleted, e.g. with its context, leaves
/// nothing taken).
template <typename Clock>
class held_reservations {
 public:
  using remote_type = basic_remote_limiter<Clock>;
  using reservation = typename remote_type::reservation;

  held_reservations() = default;
  held_reservations(held_reservations&& o) noexcept : v_(std::move(o.v_)) { o.v_.clear(); }
  held_reservations& operator=(held_reservations&&) = delete;
  ~held_reservations() { forget_all(); }

  void reserve(std::size_t n) { v_.reserve(n); }
  /// (Within the capacity reserved: no allocation.)
  void add(remote_type* remote, const reservation& r) { v_.emplace_back(remote, r); }
  auto begin() const noexcept { return v_.begin(); }
  auto end() const noexcept { return v_.end(); }

  /// The request was granted at `t`: each reservation is taken.
  void take_all(typename Clock::time_point t) noexcept {
    for (auto& [remote, r] : v_)
      remote->take(r, t);
    v_.clear();
  }

  void forget_all() noexcept {
    for (auto& [remote, r] : v_)
      remote->forget(r);
    v_.clear();
  }

 private:
  std::vector<std::pair<remote_type*, reservation>> v_;  // (the parts keep the limiters)
};

/// A joint request with remote parts, as a composed operation: (1) its local
/// parts are checked for a failure at once (closed, over capacity, a key
/// refused), before any remote limiter is asked; (2) each remote part is
/// reserved, one after another in the order of the parts; (3) it waits
/// until the latest reservation is due; (4) it makes the request of its
/// local parts (an ordinary joint request, made then); (5) granted at T, it
/// takes every reservation at T. Any failure or cancellation from (2) on
/// forgets every reservation made. Cancellation (terminal, partial, total:
/// nothing is taken anywhere) reaches the remote limiter's reservation, the
/// wait and the local request; a remote limiter that ignores it is waited
/// for, and its reservation forgotten.
template <typename Clock, typename WaitTraits>
struct remote_joint_op {
  using part_type = basic_part<Clock, WaitTraits>;
  using remote_type = basic_remote_limiter<Clock>;
  using reservation = typename remote_type::reservation;
  using timer_type = boost::asio::basic_waitable_timer<Clock, WaitTraits>;
  enum class stage { start, failed, reserve, wait, local };

  remote_joint_op(std::vector<part_type> p, boost::asio::any_io_executor e)
      : parts(std::move(p)), ex(std::move(e)) {}

  std::vector<part_type> parts;
  boost::asio::any_io_executor ex;
  held_reservations<Clock> held;      // (after `parts`, which keep the limiters: destroyed first)
  joint_receipt out;                  // the receipts of the grant
  std::unique_ptr<timer_type> timer;  // (on the heap: moving the op must not move a waiting timer)
  std::size_t next = 0;
  stage at = stage::start;
  boost::system::error_code failed;

  template <typename Self>
  void operator()(Self& self) {
    if (at == stage::failed) return finish(self, failed);
    self.reset_cancellation_state(boost::asio::enable_total_cancellation());
    at = stage::reserve;
    if ((failed = check_local())) {
      at = stage::failed;
      return boost::asio::post(ex, std::move(self));  // never inside the initiating call
    }
    held.reserve(parts.size());
    reserve_next(self, true);
  }

  // A remote limiter answered.
  template <typename Self>
  void operator()(Self& self, boost::system::error_code ec, reservation r) {
    if (!ec) held.add(parts[next - 1].remote_.get(), r);  // (reserved: no allocation)
    if (!ec && cancelled(self)) ec = boost::asio::error::operation_aborted;
    if (ec) return finish(self, ec);
    reserve_next(self);
  }

  // The wait until the reservations are due ended.
  template <typename Self>
  void operator()(Self& self, boost::system::error_code ec) {
    if (!ec && cancelled(self)) ec = boost::asio::error::operation_aborted;
    if (ec) return finish(self, ec);
    make_local(self);
  }

  // The local parts were granted (or failed).
  template <typename Self>
  void operator()(Self& self, boost::system::error_code ec, joint_receipt local) {
    if (ec) return finish(self, ec);
    const typename Clock::time_point t = Clock::now();
    held.take_all(t);
    joint_receipt all = std::move(out);  // (reserved in make_local: no allocation here)
    std::size_t i = 0;
    for (const part_type& p : parts)
      all.parts_.push_back(
          p.remote_ ? receipt_access::make(joint_request<Clock, WaitTraits>::target_of(p), p.n_)
                    : std::move(local[i++]));
    self.complete(boost::system::error_code(), std::move(all));
  }

 private:
  template <typename Self>
  static bool cancelled(Self& self) {
    return self.get_cancellation_state().cancelled() != boost::asio::cancellation_type::none;
  }

  /// The error the local parts would fail with at once, or none.
  boost::system::error_code check_local() {
    std::vector<part_type> local = local_parts();
    boost::system::error_code ec;
    if (local.empty()) return ec;
    joint_request<Clock, WaitTraits> req(local, ec);
    if (ec) return ec;
    joint_group<Clock, WaitTraits>::retry_after(req.parts(), ec);
    return ec;
  }

  std::vector<part_type> local_parts() const {
    std::vector<part_type> local;
    for (const part_type& p : parts)
      if (!p.remote_) local.push_back(p);
    return local;
  }

  /// Starts the next step: `launch(handler)` starts an operation that
  /// completes the op through `handler`. The op waits in a cell meanwhile,
  /// so that when `launch` throws (an allocation failed, or a remote
  /// limiter broke its contract) the op is still there to fail: with the
  /// error, when this runs in a completion; by the exception, when it runs
  /// inside the initiating call (nothing reserved yet).
  template <typename Self, typename Launch>
  void step(Self& self, bool initiating, Launch&& launch) {
    using cell_type = std::optional<Self>;
    std::shared_ptr<cell_type> cell;
    try {
      cell = std::allocate_shared<cell_type>(
          boost::asio::get_associated_allocator(self, std::allocator<void>()), std::move(self));
    } catch (const std::bad_alloc&) {
      if (initiating) throw;
      return finish(self, make_error_code(boost::system::errc::not_enough_memory));
    }
    try {
      launch(remote_step<Self>(cell));
    } catch (...) {
      if (initiating || !*cell) throw;
      Self s = std::move(**cell);
      cell->reset();
      s(error_of(std::current_exception()));  // (the op fails: every reservation goes back)
    }
  }

  static boost::system::error_code error_of(std::exception_ptr e) noexcept {
    try {
      std::rethrow_exception(e);
    } catch (const boost::system::system_error& x) {
      return x.code();
    } catch (const std::bad_alloc&) {
      return make_error_code(boost::system::errc::not_enough_memory);
    } catch (...) {
    }
    return make_error_code(boost::system::errc::io_error);  // (a remote limiter's own exception)
  }

  template <typename Self>
  void reserve_next(Self& self, bool initiating = false) {
    while (next < parts.size() && !parts[next].remote_)
      ++next;
    if (next < parts.size()) {
      remote_type* remote = parts[next].remote_.get();
      const std::uint64_t n = parts[next].n_;
      ++next;
      return step(self, initiating, [&](auto h) {
        remote->async_reserve(n, typename remote_type::reserve_handler(std::move(h)));
      });
    }
    typename Clock::time_point due = Clock::now();
    for (const auto& h : held)
      due = std::max(due, h.second.due);
    if (due > Clock::now()) {
      at = stage::wait;
      try {
        timer = std::make_unique<timer_type>(ex, due);
      } catch (const std::bad_alloc&) {
        return finish(self, make_error_code(boost::system::errc::not_enough_memory));
      }
      timer_type* t = timer.get();
      return step(self, false, [&](auto h) { t->async_wait(std::move(h)); });
    }
    make_local(self);
  }

  template <typename Self>
  void make_local(Self& self) {
    at = stage::local;
    std::vector<part_type> local;
    try {
      local = local_parts();
      out.parts_.reserve(parts.size());
    } catch (const std::bad_alloc&) {
      return finish(self, make_error_code(boost::system::errc::not_enough_memory));
    }
    if (local.empty()) return (*this)(self, boost::system::error_code(), joint_receipt());
    step(self, false, [&](auto h) {
      initiate_joint_acquire<Clock, WaitTraits>{}.start_local(std::move(h), local);
    });
  }

  void forget_all() noexcept { held.forget_all(); }

  template <typename Self>
  void finish(Self& self, boost::system::error_code ec) {
    forget_all();
    timer.reset();
    self.complete(ec, joint_receipt());
  }
};

template <typename Clock, typename WaitTraits>
template <typename Handler>
void initiate_joint_acquire<Clock, WaitTraits>::start_remote(
    Handler&& handler, joint_parts<Clock, WaitTraits> parts) const {
  boost::asio::any_io_executor ex = parts.front().ex_;
  boost::asio::async_compose<std::decay_t<Handler>, void(boost::system::error_code, joint_receipt)>(
      remote_joint_op<Clock, WaitTraits>(
          std::vector<basic_part<Clock, WaitTraits>>(parts.begin(), parts.end()), ex),
      handler, ex);
}

/// The blocking acquire of a request with remote parts: the asynchronous
/// one, waited for (would_deadlock, context_stopped as the local form; also
/// context_stopped when the operation is destroyed uncompleted, e.g. with
/// its context).
template <typename Clock, typename WaitTraits>
joint_receipt acquire_remote(std::span<const basic_part<Clock, WaitTraits>> parts,
                             boost::system::error_code& ec) {
  for (const auto& p : parts)
    if ((ec = blocking_wait_error(p.get_executor()))) return {};
  using result_type = std::pair<boost::system::error_code, joint_receipt>;
  auto done = std::make_shared<std::promise<result_type>>();
  std::future<result_type> result = done->get_future();
  initiate_joint_acquire<Clock, WaitTraits>{}(
      [done](boost::system::error_code e, joint_receipt r) {
        done->set_value({e, std::move(r)});
      },
      joint_parts_arg<Clock, WaitTraits>(parts));
  done.reset();  // (the operation's copy alone keeps the promise: destroyed uncalled, it breaks)
  try {
    auto [e, r] = result.get();
    ec = e;
    return std::move(r);
  } catch (const std::future_error&) {
    ec = error::context_stopped;
    return {};
  }
}

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
      detail::joint_parts_arg<Clock, WaitTraits>(parts));
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
  if (detail::has_remote(parts)) {  // (a remote answer's deadline is the remote limiter's)
    ec = boost::asio::error::operation_not_supported;
    return {};
  }
  joint_receipt r = detail::joint_request<Clock, WaitTraits>::receipts(parts);
  detail::joint_request<Clock, WaitTraits> req(parts, ec);
  if (ec) return {};
  const bool granted = detail::joint_group<Clock, WaitTraits>::get_blocking(
      req.parts(), detail::to_timeout_ns(timeout), ec, [&] { req.done(); });
  if (!granted) return {};
  return r;
}

template <typename Clock, typename WaitTraits, typename Rep, typename Period>
joint_receipt acquire_for(std::initializer_list<basic_part<Clock, WaitTraits>> parts,
                          std::chrono::duration<Rep, Period> timeout,
                          boost::system::error_code& ec) {
  return acquire_for(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()),
                     timeout, ec);
}

/// Blocks until `parts` are granted together; `ec` as acquire_for.
template <typename Clock, typename WaitTraits>
joint_receipt acquire(std::span<const basic_part<Clock, WaitTraits>> parts,
                      boost::system::error_code& ec) {
  ec = {};
  if (detail::has_remote(parts)) return detail::acquire_remote(parts, ec);
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

template <typename Clock, typename WaitTraits>
joint_receipt acquire(std::initializer_list<basic_part<Clock, WaitTraits>> parts,
                      boost::system::error_code& ec) {
  return acquire(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()), ec);
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
  if (detail::has_remote(parts)) {  // a remote limiter answers late
    ec = boost::asio::error::operation_not_supported;
    return std::nullopt;
  }
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

template <typename Clock, typename WaitTraits>
std::optional<joint_receipt> try_acquire(std::initializer_list<basic_part<Clock, WaitTraits>> parts,
                                         std::optional<typename Clock::duration>& retry_after,
                                         boost::system::error_code& ec) {
  return try_acquire(std::span<const basic_part<Clock, WaitTraits>>(parts.begin(), parts.size()),
                     retry_after, ec);
}

/// How long a request of `parts` made now would wait before it is granted
/// (zero: at once), counting every request ahead of it on each limiter;
/// exact as of the call (a later set_rate, or a request ahead that leaves,
/// changes it). Nothing when it would fail at once.
template <typename Clock, typename WaitTraits>
std::optional<typename Clock::duration> retry_after(
    std::span<const basic_part<Clock, WaitTraits>> parts) {
  if (detail::has_remote(parts)) return std::nullopt;  // a remote limiter answers late
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
