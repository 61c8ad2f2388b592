//
// ratelimit/detail/waiter.hpp: a queued request, the FIFO of them, and how a
// queued request is cancelled.
//
// A waiter is an operation (operation.hpp) that completes with an error_code,
// plus what a queue needs: intrusive links, the tokens it asks for, when it
// arrived. An asynchronous waiter is a handler_op<waiter_base, Handler>; a
// blocking caller's is a sync_waiter on its stack (sync_waiter.hpp). The
// queue never allocates.
//
// Ownership: a waiter in a queue is owned by the queue (its owner: a bucket);
// a waiter in a ready_list by the thread finishing that list; complete()
// hands it to its completion mechanism, which frees it before the upcall.
//
// Cancellation (per-operation): the cancellation handler installed in the
// handler's slot is a cancel_link. It lives in the slot's memory, which the
// user's cancellation_signal owns, and it is linked to its waiter both ways;
// the links are cut, under the owner's lock, by whichever goes first: the
// waiter leaving the queue (granted, failed, cancelled) or the slot dropping
// the handler (the signal destroyed, the slot cleared or reused). So a
// cancellation that arrives late, or concurrently with the completion on
// another thread, finds no waiter and does nothing: it never touches the
// waiter's memory, and the waiter never touches the slot after it is queued.
//
#ifndef RATELIMIT_DETAIL_WAITER_HPP
#define RATELIMIT_DETAIL_WAITER_HPP

#include <ratelimit/detail/operation.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/system/error_code.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>

namespace ratelimit::detail {

class waiter_base;

/// The part of a cancellation handler its waiter sees.
class cancel_link_base {
 public:
  cancel_link_base(const cancel_link_base&) = delete;
  cancel_link_base& operator=(const cancel_link_base&) = delete;

  /// The waiter this handler can cancel; null once the two are unlinked.
  /// Set to null only under the owner's lock; read without it only to skip
  /// taking the lock when it is already null.
  std::atomic<waiter_base*> waiter{nullptr};

 protected:
  explicit cancel_link_base(waiter_base* w) noexcept : waiter(w) {}
  ~cancel_link_base() = default;
};

/// A request waiting for tokens.
class waiter_base : public completion_base<boost::system::error_code> {
 public:
  std::uint64_t tokens;        // requested
  std::int64_t queued_at = 0;  // when it joined the queue (owner's clock, ns)
  waiter_base* prev = nullptr;
  waiter_base* next = nullptr;
  bool queued = false;               // in its owner's queue; guarded by the owner's lock
  bool timed = false;                // a sync_waiter with a deadline (sync_waiter.hpp)
  cancel_link_base* link = nullptr;  // its cancellation handler; guarded by the owner's lock

  // While queued in a joint group (joint_group.hpp), under the group's lock:
  // its number there, the bucket whose timer and executor serve it, and a
  // copy of that executor (it completes through the copy, so the bucket may
  // be gone by then).
  std::uint64_t group_id = 0;
  void* group_owner = nullptr;
  boost::asio::any_io_executor group_ex;

  void set_result(boost::system::error_code ec) noexcept { std::get<0>(result) = ec; }
  boost::system::error_code error() const noexcept { return std::get<0>(result); }

  /// Cuts the link with the cancellation handler (under the owner's lock).
  void unlink() noexcept {
    if (link) {
      link->waiter.store(nullptr, std::memory_order_release);
      link = nullptr;
    }
  }

 protected:
  waiter_base(fn_type fn, std::uint64_t n) noexcept : completion_base(fn), tokens(n) {}
  ~waiter_base() = default;
};

/// The cancellation handler of one queued asynchronous waiter. `Owner`
/// provides `cancel_linked(cancel_link_base*)` and `unlink(cancel_link_base*)`,
/// each taking its lock.
template <typename Owner>
class cancel_link final : public cancel_link_base {
 public:
  cancel_link(std::weak_ptr<Owner> owner, waiter_base* w) noexcept
      : cancel_link_base(w), owner_(std::move(owner)) {}

  ~cancel_link() {
    if (!waiter.load(std::memory_order_acquire)) return;
    if (auto p = owner_.lock()) p->unlink(this);
  }

  void operator()(boost::asio::cancellation_type_t type) {
    using boost::asio::cancellation_type;
    if ((type & (cancellation_type::terminal | cancellation_type::partial |
                 cancellation_type::total)) == cancellation_type::none)
      return;
    if (!waiter.load(std::memory_order_acquire)) return;
    if (auto p = owner_.lock()) p->cancel_linked(this);
  }

 private:
  std::weak_ptr<Owner> owner_;
};

/// Installs a cancel_link for `w` in its handler's cancellation slot, if the
/// handler has a connected one. Call before `w` is visible to anyone else and
/// without holding `owner`'s lock (installing may destroy an earlier handler,
/// which may take it). Throws what the slot's allocation throws, with nothing
/// installed.
template <typename Owner, typename Handler>
void link_cancellation(Handler& handler, waiter_base* w, Owner& owner) {
  auto slot = boost::asio::get_associated_cancellation_slot(handler);
  if (slot.is_connected())
    w->link = &slot.template emplace<cancel_link<Owner>>(owner.weak_from_this(), w);
}

/// An intrusive doubly-linked FIFO; O(1) push, pop and erase. Not thread-safe.
class waiter_queue {
 public:
  waiter_queue() = default;
  waiter_queue(const waiter_queue&) = delete;
  waiter_queue& operator=(const waiter_queue&) = delete;

  bool empty() const noexcept { return head_ == nullptr; }
  std::size_t size() const noexcept { return size_; }
  waiter_base* front() const noexcept { return head_; }

  void push_back(waiter_base* w) noexcept {
    w->prev = tail_;
    w->next = nullptr;
    (tail_ ? tail_->next : head_) = w;
    tail_ = w;
    w->queued = true;
    ++size_;
  }

  void push_front(waiter_base* w) noexcept { insert_after(nullptr, w); }

  /// Inserts `w` after `pos` (a waiter of this queue), or first when `pos` is null.
  void insert_after(waiter_base* pos, waiter_base* w) noexcept {
    waiter_base* after = pos ? pos->next : head_;
    w->prev = pos;
    w->next = after;
    (pos ? pos->next : head_) = w;
    (after ? after->prev : tail_) = w;
    w->queued = true;
    ++size_;
  }

  waiter_base* back() const noexcept { return tail_; }

  /// Removes `w`, which must be in this queue, and unlinks its cancellation
  /// handler: from here on a cancellation does not reach it.
  void erase(waiter_base* w) noexcept {
    erase_keep_link(w);
    w->unlink();
  }

  /// Removes `w`, which must be in this queue, keeping its cancellation
  /// handler linked: it moves to another queue of the same owner (a joint
  /// group: joint_group.hpp).
  void erase_keep_link(waiter_base* w) noexcept {
    (w->prev ? w->prev->next : head_) = w->next;
    (w->next ? w->next->prev : tail_) = w->prev;
    w->prev = w->next = nullptr;
    w->queued = false;
    --size_;
  }

 private:
  waiter_base* head_ = nullptr;
  waiter_base* tail_ = nullptr;
  std::size_t size_ = 0;
};

/// Waiters that have left the queue and await completion, each with its
/// result. Built under the owner's lock, finished after releasing it (no
/// handler runs and nothing is posted under the lock).
class ready_list {
 public:
  /// With `posted`, every waiter appended sets `*posted` (under the owner's
  /// lock, as appending is): the owner learns that a completion is on its
  /// way through the executor's queue (see bucket_impl::on_timer). Always
  /// given, null only where that cannot matter, so that no new caller forgets it.
  ready_list(const boost::asio::any_io_executor& io_ex, bool* posted) noexcept
      : io_ex_(io_ex), posted_(posted) {}
  ready_list(const ready_list&) = delete;
  ready_list& operator=(const ready_list&) = delete;

  /// Completes what is left through the I/O executor (posting, as from the
  /// initiating function); never throws.
  ~ready_list() {
    try {
      finish_all(finish_mode::post);
    } catch (...) {  // only with executors whose post allocates: see finish_all()
    }
  }

  bool empty() const noexcept { return head_ == nullptr; }

  /// Appends `w`, which has left the queue, to be completed with `ec`.
  void push_back(waiter_base* w, boost::system::error_code ec) noexcept {
    w->next = nullptr;
    w->set_result(ec);
    (tail_ ? tail_->next : head_) = w;
    tail_ = w;
    if (posted_) *posted_ = true;
  }

  /// Moves every waiter of `q`, in order, here, to be completed with `ec`.
  void take_all(waiter_queue& q, boost::system::error_code ec) noexcept {
    while (waiter_base* w = q.front()) {
      q.erase(w);
      push_back(w, ec);
    }
  }

  /// Completes every waiter in order, leaving the list empty. Waiters may be
  /// freed. Completing never throws with the executors the upcall memory is
  /// made for; with others, a waiter that cannot be posted is destroyed (see
  /// completion_base::complete), the others are still completed, and the
  /// first exception is rethrown at the end.
  void finish_all(finish_mode m) {
    std::exception_ptr failure;
    waiter_base* w = head_;
    head_ = tail_ = nullptr;
    while (w) {
      waiter_base* next = w->next;
      try {
        w->complete(m, io_ex_);
      } catch (...) {
        if (!failure) failure = std::current_exception();
      }
      w = next;
    }
    if (failure) std::rethrow_exception(failure);
  }

 private:
  const boost::asio::any_io_executor& io_ex_;
  bool* posted_;
  waiter_base* head_ = nullptr;
  waiter_base* tail_ = nullptr;
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_WAITER_HPP
