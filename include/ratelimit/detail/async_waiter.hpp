//
// ratelimit/detail/async_waiter.hpp: a queued completion handler.
//
// The waiter owns the handler and the outstanding work on the handler's
// executor. When the bucket finishes it, the waiter sends a small completion
// object to the handler's associated executor; that object, running there,
// clears the cancellation slot, moves the handler out, frees the waiter and
// then makes the upcall. Because the slot is cleared on the handler's executor
// (where the user emits cancellation), a late cancellation never reaches freed
// memory, and a cancellation that arrives after the waiter left the queue
// finds `queued == false` and does nothing.
//
#ifndef RATELIMIT_DETAIL_ASYNC_WAITER_HPP
#define RATELIMIT_DETAIL_ASYNC_WAITER_HPP

#include <ratelimit/detail/waiter_queue.hpp>

#include <boost/asio/associated_allocator.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/recycling_allocator.hpp>

#include <memory>
#include <utility>

namespace ratelimit::detail {

/// The allocator a handler's waiter is allocated with: the handler's own, or
/// Asio's per-thread recycling allocator when it names none.
template <typename Handler>
using waiter_allocator_t =
    boost::asio::associated_allocator_t<Handler, boost::asio::recycling_allocator<void>>;

/// The executor a handler completes on: its associated executor, defaulting
/// to the bucket's.
template <typename Handler, typename IoExecutor>
using handler_executor_t = boost::asio::associated_executor_t<Handler, IoExecutor>;

/// That executor, tracking outstanding work while the waiter exists.
template <typename Handler, typename IoExecutor>
using tracked_executor_t = std::decay_t<decltype(boost::asio::prefer(
    std::declval<const handler_executor_t<Handler, IoExecutor>&>(),
    boost::asio::execution::outstanding_work.tracked))>;

/// `Impl` provides `cancel_waiter(waiter_base*)` and derives from enable_shared_from_this.
template <typename Handler, typename IoExecutor, typename Impl>
class async_waiter final : public waiter_base {
  using alloc_type = typename std::allocator_traits<
      waiter_allocator_t<Handler>>::template rebind_alloc<async_waiter>;
  using alloc_traits = std::allocator_traits<alloc_type>;

 public:
  /// Allocates a waiter for `n` tokens, moving the handler in. If the handler
  /// has a connected cancellation slot, installs a cancellation functor that
  /// reaches the bucket through `impl` (weakly: the bucket may be gone).
  template <typename H>
  static async_waiter* create(H&& handler, const IoExecutor& io_ex, std::uint64_t n, Impl* impl) {
    alloc_type alloc(boost::asio::get_associated_allocator(
        handler, boost::asio::recycling_allocator<void>()));
    async_waiter* w = alloc_traits::allocate(alloc, 1);
    try {
      alloc_traits::construct(alloc, w, std::forward<H>(handler), io_ex, n);
    } catch (...) {
      alloc_traits::deallocate(alloc, w, 1);
      throw;
    }
    auto slot = boost::asio::get_associated_cancellation_slot(w->handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(impl->weak_from_this(), w);
    return w;
  }

  template <typename H>
  async_waiter(H&& handler, const IoExecutor& io_ex, std::uint64_t n)
      : waiter_base(n, &async_waiter::do_finish),
        io_ex_(io_ex),
        handler_(std::forward<H>(handler)),
        work_(boost::asio::prefer(boost::asio::get_associated_executor(handler_, io_ex),
                                  boost::asio::execution::outstanding_work.tracked)) {}

 private:
  struct cancel_handler {
    std::weak_ptr<Impl> impl;
    waiter_base* waiter;

    cancel_handler(std::weak_ptr<Impl> i, waiter_base* w) : impl(std::move(i)), waiter(w) {}

    void operator()(boost::asio::cancellation_type_t type) const {
      using boost::asio::cancellation_type;
      if ((type & (cancellation_type::terminal | cancellation_type::partial |
                   cancellation_type::total)) == cancellation_type::none)
        return;
      if (auto p = impl.lock()) p->cancel_waiter(waiter);
    }
  };

  /// Runs on the handler's executor; owns the waiter until it is invoked.
  /// Its associated executor is the handler's, so that posting it to the
  /// bucket's executor runs it there and then dispatches it to the handler's
  /// (as Asio's own operations do).
  class completion {
   public:
    using executor_type = tracked_executor_t<Handler, IoExecutor>;

    explicit completion(async_waiter* w) noexcept : w_(w) {}
    executor_type get_executor() const noexcept { return w_->work_; }
    completion(completion&& o) noexcept : w_(std::exchange(o.w_, nullptr)) {}
    completion& operator=(completion&&) = delete;
    ~completion() {
      // Never invoked (its executor was shut down): free the waiter, handler uncalled.
      if (w_) {
        w_->clear_slot();
        w_->destroy(w_->allocator());
      }
    }

    void operator()() {
      async_waiter* w = std::exchange(w_, nullptr);
      w->clear_slot();
      alloc_type alloc = w->allocator();
      auto work = std::move(w->work_);
      Handler handler(std::move(w->handler_));
      const boost::system::error_code ec = w->result;
      w->destroy(alloc);
      std::move(handler)(ec);
    }

   private:
    async_waiter* w_;
  };

  static void do_finish(waiter_base* base, finish_mode mode) {
    auto* w = static_cast<async_waiter*>(base);
    if (mode == finish_mode::post) {
      IoExecutor io_ex = w->io_ex_;
      boost::asio::post(io_ex, completion(w));
    } else {
      auto ex = w->work_;
      boost::asio::dispatch(ex, completion(w));
    }
  }

  alloc_type allocator() const noexcept {
    return alloc_type(
        boost::asio::get_associated_allocator(handler_, boost::asio::recycling_allocator<void>()));
  }

  /// Must come before the handler is moved from: the slot belongs to it.
  void clear_slot() noexcept {
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.clear();
  }

  void destroy(alloc_type alloc) noexcept {
    alloc_traits::destroy(alloc, this);
    alloc_traits::deallocate(alloc, this, 1);
  }

  IoExecutor io_ex_;
  Handler handler_;
  tracked_executor_t<Handler, IoExecutor> work_;
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_ASYNC_WAITER_HPP
