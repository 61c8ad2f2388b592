//
// ratelimit/detail/waiter_queue.hpp: the FIFO of type-erased waiters.
//
// A waiter is an intrusive node; the bucket never allocates for the queue
// itself. Each waiter carries one function pointer that the bucket calls once
// the waiter has left the queue: to complete it through whatever its kind
// uses (an executor for asynchronous handlers, a promise for blocking callers).
//
// Ownership: a waiter in the queue is owned by the queue; a waiter in a
// ready_list is owned by the thread finishing that list; finish() hands it to
// its completion mechanism, which frees it before the upcall.
//
#ifndef RATELIMIT_DETAIL_WAITER_QUEUE_HPP
#define RATELIMIT_DETAIL_WAITER_QUEUE_HPP

#include <boost/system/error_code.hpp>

#include <cstddef>
#include <cstdint>

namespace ratelimit::detail {

/// How a dequeued waiter is to be completed.
enum class finish_mode {
  post,      // the caller may be inside the initiating function: never run the handler inline
  dispatch,  // the caller is one of the bucket's own handlers: inline is allowed
};

struct waiter_base {
  using finish_fn = void (*)(waiter_base*, finish_mode);

  waiter_base(std::uint64_t n, finish_fn f) noexcept : tokens(n), finish_(f) {}
  waiter_base(const waiter_base&) = delete;
  waiter_base& operator=(const waiter_base&) = delete;

  /// Completes the waiter with `result`. It must have left the queue. The
  /// waiter may be freed before this returns.
  void finish(finish_mode m) { finish_(this, m); }

  waiter_base* prev = nullptr;
  waiter_base* next = nullptr;
  std::uint64_t tokens;  // requested
  std::int64_t queued_at = 0;  // when it joined the queue (bucket clock, ns)
  boost::system::error_code result;
  bool queued = false;  // in the bucket's queue; guarded by the bucket's mutex

 protected:
  ~waiter_base() = default;

 private:
  finish_fn finish_;
};

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

  /// Removes `w`, which must be in this queue.
  void erase(waiter_base* w) noexcept {
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
/// result. Built under the bucket's mutex, finished after releasing it. Once a
/// waiter is here, only the finishing thread touches it: a cancellation that
/// arrives meanwhile sees `queued == false` and does nothing.
class ready_list {
 public:
  ready_list() = default;
  ready_list(const ready_list&) = delete;
  ready_list& operator=(const ready_list&) = delete;
  ~ready_list() { finish_all(finish_mode::post); }

  bool empty() const noexcept { return head_ == nullptr; }

  /// Appends `w`, which has left the queue, to be completed with `ec`.
  void push_back(waiter_base* w, boost::system::error_code ec) noexcept {
    w->next = nullptr;
    w->result = ec;
    (tail_ ? tail_->next : head_) = w;
    tail_ = w;
  }

  /// Moves every waiter of `q`, in order, here, to be completed with `ec`.
  void take_all(waiter_queue& q, boost::system::error_code ec) noexcept {
    while (waiter_base* w = q.front()) {
      q.erase(w);
      push_back(w, ec);
    }
  }

  /// Completes every waiter in order, leaving the list empty. Waiters may be freed.
  void finish_all(finish_mode m) {
    waiter_base* w = head_;
    head_ = tail_ = nullptr;
    while (w) {
      waiter_base* next = w->next;
      w->finish(m);
      w = next;
    }
  }

 private:
  waiter_base* head_ = nullptr;
  waiter_base* tail_ = nullptr;
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_WAITER_QUEUE_HPP
