//
// ratelimit/detail/operation.hpp: one pending asynchronous operation, and how it completes.
//
// Every asynchronous operation of the library (a queued waiter of a bucket, a
// request that fails at once, a Redis request or try) is a `handler_op`: the
// user's handler, the outstanding work on the handler's executor, the result
// to deliver, and a small block of memory reserved for the upcall. It is
// allocated once, with the handler's associated allocator, when the operation
// starts; everything that can throw happens then, inside the initiating call.
//
// Completion, as Asio's own operations do it, never inside the caller:
// - a handler that completes on the I/O executor (it names no executor of
//   its own, or that same one: plain callbacks, coroutines on the I/O
//   object's executor) is posted to the I/O executor and invoked there;
// - a handler with an executor of its own (a strand, another context) is
//   posted to the execution context behind the I/O executor (an io_context's
//   or thread_pool's executor; the inner executor of a strand), then
//   dispatched to its executor, which runs it inline when it already runs
//   there or queues it;
// and the last step moves the handler, the result and the work out, frees
// the operation, and invokes the handler. Asio's wrapper of each posted or
// dispatched step is allocated from the reserved block (through the step's
// associated allocator), so completing an operation allocates nothing for
// the executors above, whether or not they are wrapped in an
// any_io_executor. That is what lets close(), cancel() and destructors
// complete operations without any risk of std::terminate. With other
// executors, Asio's type-erased post may allocate; see complete().
// That includes a strand over an any_io_executor (asio::strand<
// any_io_executor>, e.g. make_strand(any_io_executor)): Asio 1.81's strand
// takes our step's wrapper from std::allocator there (the type-erased inner
// executor cannot be asked for an allocator property), and allocates again
// each time it is scheduled (strand_executor_service::do_execute queries
// `blocking` through the type-erased executor, and that query of a class-type
// property allocates), so a completion through it can throw std::bad_alloc
// (the operation is then destroyed unrun). Strands over the concrete
// executors (make_strand(io_context) or make_strand(thread_pool)) do not.
//
// Lifetime: an operation is owned by whoever holds it (a queue, a ready list,
// Asio's scheduler once posted). If Asio destroys a posted step without
// running it (its context was shut down), the step's destructor destroys the
// operation without invoking the handler, as Asio does with its own; its
// memory (and so the operation's) is freed only once no block of it is taken
// any more (a strand's invoker may still sit in the context's queue in the
// second block: see upcall_memory::release).
//
#ifndef RATELIMIT_DETAIL_OPERATION_HPP
#define RATELIMIT_DETAIL_OPERATION_HPP

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_allocator.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/recycling_allocator.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>

#include <boost/asio/system_executor.hpp>

#include <atomic>
#include <cstddef>
#include <memory>
#include <new>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ratelimit::detail {

/// How a finished operation is to be completed.
enum class finish_mode {
  post,      // the caller may be inside the initiating function: never run the handler inline
  dispatch,  // the caller is a handler running on the I/O executor: inline is allowed
};

// --- Memory reserved for the upcall ------------------------------------------

/// Upcall steps that did not fit the reserved block and were allocated with
/// the handler's allocator instead (a test hook: it must stay 0 for the
/// executors the block is sized for).
inline std::atomic<std::uint64_t> upcall_fallback_allocations{0};

/// Memory inside an operation that Asio's wrappers of its upcall steps are
/// allocated from: `Slots` blocks of `N` bytes. One step exists at a time
/// (Asio frees a step's memory before running it, so the next step reuses
/// it), but a step posted to an idle strand also makes the strand schedule
/// itself on its inner executor, with the same allocator: two blocks.
template <std::size_t N, std::size_t Slots = 1>
class upcall_memory {
 public:
  static constexpr std::size_t size = N;

  upcall_memory() noexcept = default;
  upcall_memory(const upcall_memory&) = delete;
  upcall_memory& operator=(const upcall_memory&) = delete;

  void* take(std::size_t n, std::size_t align) noexcept {
    if (n > N || align > alignof(std::max_align_t)) return nullptr;
    for (std::size_t i = 0; i < Slots; ++i)
      if (!used_[i]) {
        used_[i] = true;
        return data_[i];
      }
    return nullptr;
  }

  /// True when `p` was one of these blocks (compared, never dereferenced).
  /// Giving back the last block of a released memory calls its release
  /// function, which may free this object.
  ///
  /// Called too for a block that came from the fallback allocator, possibly
  /// after this memory was freed (a third step's wrapper, e.g. the inner
  /// invoker of a strand over a strand): so nothing of this object may be read
  /// before `p` is known to be one of its blocks (comparing against data_[i]
  /// computes addresses, it loads nothing).
  bool give_back(const void* p) noexcept {
    for (std::size_t i = 0; i < Slots; ++i)
      if (p == static_cast<const void*>(data_[i])) {
        used_[i] = false;
        if (release_fn_ && !in_use()) release_fn_(release_arg_);
        return true;
      }
    return false;
  }

  bool in_use() const noexcept {
    for (std::size_t i = 0; i < Slots; ++i)
      if (used_[i]) return true;
    return false;
  }

  /// The owner is done with this memory: calls `fn(arg)` (which frees it)
  /// now when no block is taken, else when the last one is given back.
  ///
  /// A block can outlive the step it was taken for: a step posted to an idle
  /// strand makes the strand post its invoker to the inner executor in a
  /// second block, and when the context is destroyed with both queued, Asio
  /// destroys the strand's queue (our step, and with it the owner) before the
  /// scheduler's (the invoker, which then still lives in our memory).
  void release(void (*fn)(void*), void* arg) noexcept {
    if (!in_use()) return fn(arg);
    release_fn_ = fn;
    release_arg_ = arg;
  }

 private:
  alignas(std::max_align_t) unsigned char data_[Slots][N];
  bool used_[Slots] = {};
  void (*release_fn_)(void*) = nullptr;
  void* release_arg_ = nullptr;
};

/// Asio 1.26 wraps a posted or dispatched function object (for us: one
/// pointer, with this allocator: two more) in an executor_op of 56 bytes for
/// an io_context or a thread_pool and 72 for a strand; an idle strand's
/// invoker, posted with the same allocator, takes 96 (io_context) to 104
/// (thread_pool).
using op_memory = upcall_memory<112, 2>;

/// Serves allocations from an upcall_memory block, falling back to the
/// handler's associated allocator (`Fallback`) for anything that does not fit.
template <typename T, typename Fallback, std::size_t N, std::size_t Slots = 1>
class upcall_allocator {
 public:
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = upcall_allocator<U, Fallback, N, Slots>;
  };

  upcall_allocator(upcall_memory<N, Slots>* mem, const Fallback& fallback) noexcept
      : mem_(mem), fallback_(fallback) {}
  template <typename U>
  upcall_allocator(const upcall_allocator<U, Fallback, N, Slots>& other) noexcept
      : mem_(other.mem_), fallback_(other.fallback_) {}

  T* allocate(std::size_t n) {
    if (void* p = mem_->take(sizeof(T) * n, alignof(T))) return static_cast<T*>(p);
    upcall_fallback_allocations.fetch_add(1, std::memory_order_relaxed);
    rebound a(fallback_);
    return std::allocator_traits<rebound>::allocate(a, n);
  }

  void deallocate(T* p, std::size_t n) noexcept {
    if (mem_->give_back(p)) return;
    rebound a(fallback_);
    std::allocator_traits<rebound>::deallocate(a, p, n);
  }

  template <typename U>
  friend bool operator==(const upcall_allocator& a,
                         const upcall_allocator<U, Fallback, N, Slots>& b) {
    return a.mem_ == b.mem_;
  }
  template <typename U>
  friend bool operator!=(const upcall_allocator& a,
                         const upcall_allocator<U, Fallback, N, Slots>& b) {
    return a.mem_ != b.mem_;
  }

 private:
  template <typename, typename, std::size_t, std::size_t>
  friend class upcall_allocator;
  using rebound = typename std::allocator_traits<Fallback>::template rebind_alloc<T>;

  upcall_memory<N, Slots>* mem_;
  [[no_unique_address]] Fallback fallback_;
};

// --- Executors -----------------------------------------------------------------

namespace executors {
namespace asio = boost::asio;
using io = asio::io_context::executor_type;
using pool = asio::thread_pool::executor_type;

/// `E` tracking outstanding work, as Asio spells it. (Asio encodes the
/// property in a template argument whose bits differ between io_context and
/// thread_pool: 4 for the one, 8 for the other, where 4 means a continuation.
/// Naming the type by hand with 4 for both missed tracked thread_pool
/// executors, and with them would_deadlock from a pool thread.)
template <typename E>
using tracked_t = std::decay_t<decltype(asio::prefer(std::declval<const E&>(),
                                                     asio::execution::outstanding_work.tracked))>;
using io_tracked = tracked_t<io>;
using pool_tracked = tracked_t<pool>;

template <typename E>
auto untracked(const E& e) {
  return asio::prefer(e, asio::execution::outstanding_work.untracked);
}
}  // namespace executors

/// Calls `f(e)` with the concrete executor `e` behind `ex` when `ex` is an
/// any_io_executor holding one whose execute() honours the
/// `execution::allocator` property: io_context's and thread_pool's executors
/// and strands over them or over an any_io_executor (the last honour it, but
/// allocate elsewhere when scheduled: see the header comment). Tracked
/// executors are passed untracked (the caller holds work elsewhere).
/// Otherwise `f(ex)`.
template <typename Executor, typename F>
void with_concrete_executor(const Executor& ex, F&& f) {
  using namespace executors;
  if constexpr (std::is_same_v<Executor, asio::any_io_executor>) {
    if (auto* e = ex.template target<io>()) return f(*e);
    if (auto* e = ex.template target<io_tracked>()) return f(untracked(*e));
    if (auto* e = ex.template target<asio::strand<io>>()) return f(*e);
    if (auto* e = ex.template target<asio::strand<io_tracked>>()) return f(untracked(*e));
    if (auto* e = ex.template target<pool>()) return f(*e);
    if (auto* e = ex.template target<pool_tracked>()) return f(untracked(*e));
    if (auto* e = ex.template target<asio::strand<pool>>()) return f(*e);
    if (auto* e = ex.template target<asio::strand<pool_tracked>>()) return f(untracked(*e));
    if (auto* e = ex.template target<asio::strand<asio::any_io_executor>>()) return f(*e);
  }
  f(ex);
}

/// Calls `f(c)` with the executor of the execution context behind `ex`: an
/// io_context's or thread_pool's executor (untracked) when `ex` is one, or a
/// strand over one (recursively, through any_io_executors); otherwise `f(ex)`.
template <typename F>
void with_context_executor(const boost::asio::any_io_executor& ex, F&& f) {
  using namespace executors;
  if (auto* e = ex.target<io>()) return f(*e);
  if (auto* e = ex.target<io_tracked>()) return f(untracked(*e));
  if (auto* e = ex.target<asio::strand<io>>()) return f(e->get_inner_executor());
  if (auto* e = ex.target<asio::strand<io_tracked>>()) return f(untracked(e->get_inner_executor()));
  if (auto* e = ex.target<pool>()) return f(*e);
  if (auto* e = ex.target<pool_tracked>()) return f(untracked(*e));
  if (auto* e = ex.target<asio::strand<pool>>()) return f(e->get_inner_executor());
  if (auto* e = ex.target<asio::strand<pool_tracked>>())
    return f(untracked(e->get_inner_executor()));
  if (auto* e = ex.target<asio::strand<asio::any_io_executor>>())
    return with_context_executor(e->get_inner_executor(), std::forward<F>(f));
  f(ex);
}

/// The executor a handler completes on: its associated executor, defaulting
/// to the I/O object's.
template <typename Handler>
using handler_executor_t =
    boost::asio::associated_executor_t<Handler, boost::asio::any_io_executor>;

/// That executor, tracking outstanding work while the operation exists.
template <typename Handler>
using tracked_executor_t =
    std::decay_t<decltype(boost::asio::prefer(std::declval<const handler_executor_t<Handler>&>(),
                                              boost::asio::execution::outstanding_work.tracked))>;

/// The allocator an operation is allocated with: the handler's own, or Asio's
/// per-thread recycling allocator when it names none.
template <typename Handler>
using handler_allocator_t =
    boost::asio::associated_allocator_t<Handler, boost::asio::recycling_allocator<void>>;

// --- The operation ---------------------------------------------------------------

/// The type-erased part of an operation whose handler takes `Args...`: what
/// its owner needs to complete or destroy it. Derived classes (a bucket's
/// waiter) may add their own fields; the handler lives in handler_op.
template <typename... Args>
class completion_base {
 public:
  completion_base(const completion_base&) = delete;
  completion_base& operator=(const completion_base&) = delete;

  /// The result the handler will be invoked with.
  std::tuple<Args...> result{};

  /// Completes the operation with `result` through the handler's executor
  /// (see the header comment); the operation may be freed before this
  /// returns. `io_ex` is the I/O object's executor.
  ///
  /// Does not throw for the executors with_concrete_executor knows. With
  /// other executors Asio's type-erased post may throw std::bad_alloc, as
  /// asio::post would: the operation is then destroyed without invoking its
  /// handler (releasing its work) and the exception propagates.
  void complete(finish_mode m, const boost::asio::any_io_executor& io_ex) {
    fn_(this, m == finish_mode::post ? action::post : action::dispatch, &io_ex);
  }

  /// Destroys the operation without invoking its handler (releasing its work).
  void destroy() noexcept { fn_(this, action::destroy, nullptr); }

 protected:
  using completion_base_type = completion_base;
  enum class action { post, dispatch, destroy };
  using fn_type = void (*)(completion_base*, action, const boost::asio::any_io_executor*);

  explicit completion_base(fn_type fn) noexcept : fn_(fn) {}
  ~completion_base() = default;

 private:
  fn_type fn_;
};

/// The Base of an operation that is nothing but a completion.
template <typename... Args>
class plain_completion : public completion_base<Args...> {
 protected:
  using completion_base<Args...>::completion_base;
};

/// An operation: `Base` (a completion_base or a class derived from one) plus
/// the handler, its work and the upcall memory.
/// True when the handler names no executor of its own: it completes on the
/// I/O object's executor, and the operation needs no executor of its own.
template <typename Handler>
inline constexpr bool uses_io_executor =
    std::is_same_v<boost::asio::associated_executor_t<Handler, boost::asio::system_executor>,
                   boost::asio::system_executor>&&
        std::is_same_v<boost::asio::associated_executor_t<Handler, executors::io>, executors::io>;

/// An operation: `Base` (a completion_base or a class derived from one) plus
/// the handler, its work and the upcall memory.
///
/// A handler that completes on the I/O executor (it names no executor of its
/// own, or names that same executor) is posted straight to it and invoked
/// there: one step, and no executor is stored (while it waits, the owner's
/// timer or request keeps that executor's context busy). A handler with
/// another executor (a strand, another context) has outstanding work tracked
/// on it from the start, and completes in two steps: posted to the context
/// behind the I/O executor, then dispatched to its own.
template <typename Base, typename Handler>
class handler_op final : public Base {
  using alloc_type = typename std::allocator_traits<
      handler_allocator_t<Handler>>::template rebind_alloc<handler_op>;
  using alloc_traits = std::allocator_traits<alloc_type>;
  using action = typename Base::action;
  using fallback_type = handler_allocator_t<Handler>;
  struct no_work {};
  using work_type = std::conditional_t<uses_io_executor<Handler>, no_work,
                                       std::optional<tracked_executor_t<Handler>>>;

 public:
  /// Allocates an operation with the handler's allocator and moves the
  /// handler in; `base_args` go to Base's constructor (after its completion
  /// function). Throws (bad_alloc, or what the handler's move throws) with
  /// nothing allocated.
  template <typename H, typename... BaseArgs>
  static handler_op* create(H&& handler, const boost::asio::any_io_executor& io_ex,
                            BaseArgs&&... base_args) {
    alloc_type alloc(
        boost::asio::get_associated_allocator(handler, boost::asio::recycling_allocator<void>()));
    handler_op* op = alloc_traits::allocate(alloc, 1);
    try {
      ::new (static_cast<void*>(op))
          handler_op(std::forward<H>(handler), io_ex, std::forward<BaseArgs>(base_args)...);
    } catch (...) {
      alloc_traits::deallocate(alloc, op, 1);
      throw;
    }
    return op;
  }

  Handler& handler() noexcept { return handler_; }

  /// Only through free() (public for allocator_traits::destroy).
  ~handler_op() = default;

 private:
  template <typename H, typename... BaseArgs>
  handler_op(H&& handler, const boost::asio::any_io_executor& io_ex, BaseArgs&&... base_args)
      : Base(&handler_op::do_action, std::forward<BaseArgs>(base_args)...),
        handler_(std::forward<H>(handler)) {
    if constexpr (!uses_io_executor<Handler>) {
      auto ex = boost::asio::get_associated_executor(handler_, io_ex);
      // An empty executor: what Asio's any_completion_handler gives when it
      // cannot allocate its executor (it allocates with nothrow new).
      if constexpr (std::is_constructible_v<bool, decltype(ex)>)
        if (!ex) throw std::bad_alloc();
      if constexpr (std::is_same_v<decltype(ex), boost::asio::any_io_executor>)
        if (ex == io_ex) return;
      work_.emplace(boost::asio::prefer(ex, boost::asio::execution::outstanding_work.tracked));
    }
  }

  /// Whether the handler completes on an executor of its own.
  bool own_executor() const noexcept {
    if constexpr (uses_io_executor<Handler>)
      return false;
    else
      return work_.has_value();
  }

  using upcall_alloc = upcall_allocator<void, fallback_type, 112, 2>;

  /// A step of the completion, posted or dispatched; owns the operation until
  /// it runs (or, if Asio destroys it unrun, destroys the operation).
  template <bool Final>
  class step {
   public:
    using allocator_type = upcall_alloc;

    explicit step(handler_op* op) noexcept : op_(op) {}
    step(step&& other) noexcept : op_(std::exchange(other.op_, nullptr)) {}
    step& operator=(step&&) = delete;
    ~step() {
      if (op_) op_->free();
    }

    allocator_type get_allocator() const noexcept { return op_->step_allocator(); }

    void operator()() {
      handler_op* op = std::exchange(op_, nullptr);
      if constexpr (Final)
        op->upcall();
      else
        op->dispatch_to_handler();
    }

   private:
    handler_op* op_;
  };

  upcall_alloc step_allocator() noexcept { return upcall_alloc(&memory_, fallback_allocator()); }

  fallback_type fallback_allocator() const noexcept {
    return boost::asio::get_associated_allocator(handler_,
                                                 boost::asio::recycling_allocator<void>());
  }

  static void do_action(typename Base::completion_base_type* base, action a,
                        const boost::asio::any_io_executor* io_ex) {
    auto* op = static_cast<handler_op*>(base);
    switch (a) {
      case action::post:
        if (op->own_executor()) {
          // Step 1 of 2: to the context behind the I/O executor, never inline.
          with_context_executor(*io_ex,
                                [op](const auto& ex) { boost::asio::post(ex, step<false>(op)); });
        } else {
          // The only step: to the I/O executor, never inline.
          with_concrete_executor(*io_ex,
                                 [op](const auto& ex) { boost::asio::post(ex, step<true>(op)); });
        }
        return;
      case action::dispatch:  // the caller runs on the I/O executor
        if (op->own_executor())
          op->dispatch_to_handler();
        else
          op->upcall();
        return;
      case action::destroy:
        op->free();
        return;
    }
  }

  /// Step 2 of 2: to the handler's executor; inline when it already runs here.
  void dispatch_to_handler() {
    if constexpr (!uses_io_executor<Handler>) {
      with_concrete_executor(
          *work_, [this](const auto& ex) { boost::asio::dispatch(ex, step<true>(this)); });
    }
  }

  /// The last step: frees the operation, then invokes the handler (keeping
  /// the work until the handler has returned, as Asio does).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
// GCC 12 sees the moved optional<work> as maybe uninitialized (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
  void upcall() {
    [[maybe_unused]] auto work = std::move(work_);
    // The allocator first: one tied to the handler (any_completion_handler's)
    // must come from it while it is whole.
    upcall_alloc_.emplace(fallback_allocator());
    Handler handler(std::move(handler_));
    auto args = std::move(this->result);
    free();
    std::apply(std::move(handler), std::move(args));
  }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

  /// Destroys and frees the operation; the memory (and so the operation)
  /// lives on while a block of it is still taken (see upcall_memory::release).
  void free() noexcept {
    memory_.release(&handler_op::free_now, this);
  }

  /// As Asio's operations do: the memory is freed with an allocator taken
  /// from the handler while the handler lives (moved out of the operation
  /// first when it is still there), so that an allocator tied to the handler
  /// (any_completion_handler's) is used while it is valid.
  static void free_now(void* p) noexcept {
    auto* op = static_cast<handler_op*>(p);
    if (op->upcall_alloc_) {  // upcall(): the handler is out, about to be invoked
      alloc_type alloc(*op->upcall_alloc_);
      alloc_traits::destroy(alloc, op);
      alloc_traits::deallocate(alloc, op, 1);
      return;
    }
    Handler handler(std::move(op->handler_));  // destroyed after the memory is freed
    alloc_type alloc(
        boost::asio::get_associated_allocator(handler, boost::asio::recycling_allocator<void>()));
    alloc_traits::destroy(alloc, op);
    alloc_traits::deallocate(alloc, op, 1);
  }

  Handler handler_;
  std::optional<fallback_type> upcall_alloc_;  // set by upcall()
  [[no_unique_address]] work_type work_;
  op_memory memory_;
};

/// What an initiation object holds of its I/O object's state: a plain
/// pointer while the initiation runs where it was made (a callback token
/// runs it at once), and shared ownership as soon as it is copied or moved
/// (a deferred token keeps it to launch later), so that an operation
/// launched after the I/O object is gone finds its state still there.
template <typename Impl, typename Executor>
class initiation_ref {
 public:
  initiation_ref(const std::shared_ptr<Impl>& impl, const Executor& ex) noexcept
      : raw_(impl.get()), ex_(&ex) {}
  initiation_ref(const initiation_ref& o)
      : raw_(o.raw_),
        keep_(o.keep_ ? o.keep_ : (o.raw_ ? o.raw_->shared_from_this() : nullptr)),
        copy_(o.get_executor()),
        ex_(&*copy_) {}
  initiation_ref(initiation_ref&& o) : initiation_ref(static_cast<const initiation_ref&>(o)) {}
  initiation_ref& operator=(const initiation_ref&) = delete;

  Impl* get() const noexcept { return raw_; }
  const Executor& get_executor() const noexcept { return *ex_; }

 private:
  Impl* raw_;
  std::shared_ptr<Impl> keep_;
  std::optional<Executor> copy_;
  const Executor* ex_;
};

/// Completes `handler` with `args` through its executor (by way of `io_ex`'s
/// context, never inline): for a request that fails or succeeds at once.
/// Throws, with the handler destroyed, what allocating the operation throws.
template <typename Handler, typename... Args>
void post_completion(Handler&& handler, const boost::asio::any_io_executor& io_ex, Args... args) {
  using op_type = handler_op<plain_completion<Args...>, std::decay_t<Handler>>;
  op_type* op = op_type::create(std::forward<Handler>(handler), io_ex);
  op->result = std::tuple<Args...>(std::move(args)...);
  op->complete(finish_mode::post, io_ex);
}

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_OPERATION_HPP
