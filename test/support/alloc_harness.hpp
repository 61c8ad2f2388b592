//
// test/support/alloc_harness.hpp: running a scripted scenario with each of its
// allocations failing in turn, and checking what the library promises then.
//
// Method: a scenario is run once with counting only, to learn the number N of
// allocations (operator new, every thread) between its start and its end;
// then, for every k in 1..N, run again with the k-th allocation failing.
// Every run checks:
// - each call into the library either returns or throws std::bad_alloc
//   (anything else is reported; std::terminate kills the executable, which
//   is the failure signal for a throw out of a noexcept path);
// - each handler whose initiating call returned completes exactly once, and
//   the handler of a call that threw is destroyed without being called;
// - nothing leaks: blocks from operator new return to the count they had
//   before the run (and LeakSanitizer, in the ASan tree, sees the rest, such
//   as memory from Asio's recycling allocator and coroutine frames; frames
//   are also counted by a sentinel in each coroutine);
// - no outstanding work is lost: once the scenario has destroyed its objects,
//   running the context returns (bounded: a run that does not return within
//   the limit is reported, and the executable gives up on that run);
// - completion never fell back to allocating (detail::upcall_fallback_allocations);
// - no std::bad_alloc escapes io_context::run() or poll(): the library's
//   handlers (its timer's, its completions) must not throw. Two escapes are
//   Asio's and tolerated: an awaited initiation that throws in a
//   use_awaitable coroutine (Asio 1.81 lets it out of run() and destroys the
//   coroutine), and one a test excuses by the failure's stack (the Redis
//   test: Asio's resolver builds its results before calling the handler).
//
// Scenarios are plain (`body(env&)`, injected from start to drained context)
// or staged (prepare, then the injected run, then recover and finish with
// injection off: the Redis test checks that the same connection recovers).
// What fails is an injector: the k-th allocation (alloc_injector), or in the
// Redis test the k-th call into hiredis.
//
// No Boost.Test here: its logging and bookkeeping allocate through operator
// new, which would shift the counts (and could fail inside the test's own
// code). Checks report with fprintf and count failures; main() returns
// non-zero if there were any.
//
// Handler kinds: the same scenario runs with plain callbacks (their
// operations come from Asio's recycling allocator, invisible to the
// injector), callbacks bound to std::allocator<void> and to a counting
// allocator (their operations come through operator new, so their
// allocation fails too), callbacks bound to a strand, asio::deferred,
// use_future, and use_awaitable coroutines.
//
#ifndef RATELIMIT_TEST_ALLOC_HARNESS_HPP
#define RATELIMIT_TEST_ALLOC_HARNESS_HPP

#include "alloc_failure.hpp"
#include "manual_clock.hpp"

#if __has_include(<ratelimit/detail/operation.hpp>)
#include <ratelimit/detail/operation.hpp>
#define RATELIMIT_TEST_HAVE_UPCALL_COUNTER 1
#endif

#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <boost/system/system_error.hpp>
#include <ratelimit/joint.hpp>
#include <ratelimit/receipt.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <future>
#include <new>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <variant>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define RATELIMIT_TEST_LSAN 1
#endif

namespace ratelimit::test::alloc {

namespace asio = boost::asio;
using boost::system::error_code;
using namespace std::chrono_literals;

// --- reporting ---------------------------------------------------------------

/// Where the current run is, for messages.
struct run_info {
  const char* scenario = "";
  const char* kind = "";
  const char* injector = "alloc";
  std::uint64_t k = 0;  // 0: counting only
};
inline run_info current;
inline std::atomic<int> failures{0};
/// std::bad_alloc escaping io_context::run/poll in this run.
inline int escapes = 0;
/// Whether such an escape is a failure: not with use_awaitable, where Asio
/// 1.81 itself lets an exception of the awaited initiating function escape
/// from run() (async_result<use_awaitable_t>::do_init has already detached
/// the coroutine's thread into the handler, so the coroutine is destroyed,
/// not resumed, and co_spawn's handler is never called). The library's own
/// handlers are checked for that with the other kinds.
inline bool escapes_allowed = false;
/// Set by a scenario whose operations are composed (the rate-limited
/// stream's): a later step, run from an earlier step's completion, starts
/// the next layer's operation or a wait for tokens, and a bad_alloc there
/// escapes run() and destroys the operation uncalled, as it does in Asio's
/// own composed operations (asio::async_write over a socket). Such an
/// escape is then no failure, and an accepted request destroyed uncalled
/// after one is counted as over (its scenario checks that it lost nothing:
/// no token, no byte).
inline bool later_steps_allocate = false;

inline void escaped(const char* file, int line, const char* where);
inline bool verbose = false;
inline bool trace = false;  // --trace: print the failed allocation's stack with each failure

inline void report(const char* file, int line, const char* what) {
  alloc_failure::suspend s;
  const int n = ++failures;
  if (n <= 60 || verbose)
    std::fprintf(stderr, "%s:%d: FAILED [%s, %s, %s k=%llu]: %s\n", file, line, current.scenario,
                 current.kind, current.injector, static_cast<unsigned long long>(current.k), what);
  if (n == 60 && !verbose) std::fprintf(stderr, "(further failures not shown)\n");
  if (trace && alloc_failure::fired()) {
    std::fprintf(stderr, "  the allocation that failed:\n");
    alloc_failure::print_failure_stack();
  }
}

/// Set by a test whose scenarios drive Asio code that itself lets an
/// allocation failure escape from run() (see test_redis_alloc_failure.cpp):
/// true when the last injected failure is one of those.
inline bool (*escape_excused)() = nullptr;

inline void escaped(const char* file, int line, const char* what) {
  ++escapes;
  if (escapes_allowed || later_steps_allocate || (escape_excused && escape_excused())) return;
  report(file, line, what);
}

#define AF_CHECK(cond)                                                        \
  do {                                                                        \
    if (!(cond)) ::ratelimit::test::alloc::report(__FILE__, __LINE__, #cond); \
  } while (0)

// --- handlers ------------------------------------------------------------------

/// What happened to one request (fixed storage: the test allocates nothing).
struct outcome {
  enum class start { none, accepted, threw };
  start started = start::none;
  std::atomic<int> calls{0};
  std::atomic<int> destroyed_uncalled{0};
  error_code ec;
  bool granted = false;
  bool receipt_wrong = false;  // a receipt not empty on failure, or empty on success
  bool no_handler = false;     // the start threw before its handler was made (deferred)
  // A byte count (a stream's void(error_code, std::size_t)): known when the
  // kind delivers it (not an awaitable's or a future's that failed).
  std::size_t bytes = 0;
  bool bytes_known = false;
  // use_future: one future for each completion signature (std::monostate:
  // none yet); `collected` once collect() took its result.
  std::variant<std::monostate, std::future<void>, std::future<bool>,
               std::future<ratelimit::receipt>, std::future<ratelimit::joint_receipt>,
               std::future<std::size_t>>
      fut;
  bool future = false;  // a use_future request (the future is set once accepted)
  bool collected = false;
  // use_awaitable
  std::atomic<int> frames{0};       // coroutine frames alive (sentinel)
  std::atomic<int> frames_made{0};  // coroutine frames made
  std::atomic<int> inner_threw{0};  // the awaited initiation threw bad_alloc
  std::atomic<int> spawn_done{0};   // co_spawn's completion handler calls
  std::atomic<int> other_error{0};  // a coroutine saw an unexpected exception
  bool coroutine = false;

  void reset() {
    started = start::none;
    calls = 0;
    destroyed_uncalled = 0;
    ec = {};
    granted = false;
    receipt_wrong = false;
    no_handler = false;
    bytes = 0;
    bytes_known = false;
    fut = std::monostate();
    future = false;
    collected = false;
    frames = frames_made = inner_threw = spawn_done = other_error = 0;
    coroutine = false;
  }
  bool done() const { return calls.load() > 0 || inner_threw.load() > 0; }
  bool has_future() const { return !std::holds_alternative<std::monostate>(fut); }
};

/// Whether an accepted request was dropped by a later step's escape (see
/// later_steps_allocate).
inline bool dropped_by_later_step(const outcome& o) {
  return later_steps_allocate && escapes > 0 && o.started == outcome::start::accepted &&
         o.calls.load() == 0 && o.destroyed_uncalled.load() == 1;
}

inline std::array<outcome, 48> outcomes;
inline std::size_t outcomes_used = 0;

inline outcome* next_outcome() {
  if (outcomes_used == outcomes.size()) {
    std::fprintf(stderr, "alloc_harness: too many requests in one scenario\n");
    std::abort();
  }
  outcome* o = &outcomes[outcomes_used++];
  o->reset();
  return o;
}

inline bool receipt_empty(const ratelimit::receipt& r) {
  return r.granted() == 0;
}
inline bool receipt_empty(const ratelimit::joint_receipt& r) {
  return r.empty();
}

// What a completion's argument after its error_code says, one overload per
// completion signature (the recorder, the coroutine and collect() of a
// future share them): a try's bool (granted), a receipt (granted on
// success: of what was granted, empty on failure), a byte count.
inline void note_value(outcome& o, const error_code&, bool granted) {
  o.granted = granted;
}
template <typename Receipt>
requires std::is_same_v<Receipt, ratelimit::receipt> ||
    std::is_same_v<Receipt, ratelimit::joint_receipt>
inline void note_value(outcome& o, const error_code& ec, const Receipt& r) {
  o.granted = !ec;
  const bool empty = receipt_empty(r);
  if (ec && !empty) o.receipt_wrong = true;
  if (!ec && empty) o.receipt_wrong = true;
}
inline void note_value(outcome& o, const error_code&, std::size_t bytes) {
  o.bytes = bytes;
  o.bytes_known = true;
}

/// A move-only handler recording into an outcome; notices being destroyed uncalled.
template <typename... Args>
class recorder {
 public:
  explicit recorder(outcome* o) noexcept : o_(o) {}
  recorder(recorder&& other) noexcept : o_(std::exchange(other.o_, nullptr)) {}
  recorder& operator=(recorder&&) = delete;
  ~recorder() {
    if (o_) ++o_->destroyed_uncalled;
  }
  void operator()(error_code ec, Args... args) {
    outcome* o = std::exchange(o_, nullptr);
    if (!o) return;
    o->ec = ec;
    (note_value(*o, ec, args), ...);  // (one more argument at most)
    ++o->calls;
  }

 private:
  outcome* o_;
};

/// Live blocks of counting_allocator (must come back to 0).
inline std::atomic<long> counted_live{0};

/// An allocator of the test's own: through operator new, counting.
template <typename T>
struct counting_allocator {
  using value_type = T;
  counting_allocator() noexcept = default;
  template <typename U>
  counting_allocator(const counting_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    T* p = std::allocator<T>().allocate(n);
    ++counted_live;
    return p;
  }
  void deallocate(T* p, std::size_t n) noexcept {
    --counted_live;
    std::allocator<T>().deallocate(p, n);
  }
  template <typename U>
  bool operator==(const counting_allocator<U>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const counting_allocator<U>&) const noexcept {
    return false;
  }
};

/// Counts a coroutine frame while it exists.
struct frame_sentinel {
  outcome* o;
  explicit frame_sentinel(outcome* x) : o(x) {
    ++o->frames;
    ++o->frames_made;
  }
  ~frame_sentinel() { --o->frames; }
};

enum class kind {
  callback,
  std_allocator,
  counting_allocator,
  strand,
  deferred,
  future,
  awaitable
};

inline const char* name(kind k) {
  switch (k) {
    case kind::callback:
      return "callback";
    case kind::std_allocator:
      return "std_allocator";
    case kind::counting_allocator:
      return "counting_allocator";
    case kind::strand:
      return "strand";
    case kind::deferred:
      return "deferred";
    case kind::future:
      return "use_future";
    case kind::awaitable:
      return "use_awaitable";
  }
  return "?";
}

constexpr unsigned bit(kind k) {
  return 1u << static_cast<unsigned>(k);
}
constexpr unsigned callbacks = bit(kind::callback) | bit(kind::std_allocator) |
                               bit(kind::counting_allocator) | bit(kind::strand);
constexpr unsigned all_kinds =
    callbacks | bit(kind::deferred) | bit(kind::future) | bit(kind::awaitable);

// --- the environment of one run ------------------------------------------------

/// What a scenario runs on: an io_context (polled by the scenario), or a
/// thread_pool (running by itself), and the handler kind of this run.
class env {
 public:
  env(asio::io_context& io, kind k) : io_(&io), ex_(io.get_executor()), kind_(k) { init(); }
  env(asio::thread_pool& pool, kind k) : pool_(&pool), ex_(pool.get_executor()), kind_(k) {
    init();
  }
  env(asio::io_context& io, asio::any_io_executor ex, kind k) : io_(&io), ex_(ex), kind_(k) {
    init();
  }

  const asio::any_io_executor& executor() const { return ex_; }
  kind handler_kind() const { return kind_; }
  asio::io_context* io() const { return io_; }

  /// Calls `f`; true when it returned, false when it threw std::bad_alloc;
  /// anything else is a failure.
  template <typename F>
  bool call(const char* what, F&& f) {
    try {
      f();
      return true;
    } catch (const std::bad_alloc&) {
      return false;
    } catch (const std::exception& e) {
      alloc_failure::suspend s;
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s threw %s", what, e.what());
      report(__FILE__, __LINE__, buf);
    } catch (...) {
      report(__FILE__, __LINE__, what);
    }
    return false;
  }

  /// Starts a request through `init(token)` (which calls the initiating
  /// function with `token`) with a handler of this run's kind, optionally
  /// bound to `slot`; the handler takes (error_code, Args...).
  template <typename... Args, typename Init>
  outcome* start(Init init, asio::cancellation_slot slot = {}) {
    outcome* o = next_outcome();
    o->future = kind_ == kind::future;
    const bool ok = call("initiating function", [&] { initiate<Args...>(init, o, slot); });
    o->started = ok ? outcome::start::accepted : outcome::start::threw;
    return o;
  }

  /// Lets handlers run for `real` time (the manual clock does not move).
  void pump(std::chrono::microseconds real = 1ms) {
    const auto end = std::chrono::steady_clock::now() + real;
    do {
      poll();
      std::this_thread::sleep_for(50us);
    } while (std::chrono::steady_clock::now() < end);
  }

  /// Runs until `pred()` (bounded); returns pred().
  template <typename Pred>
  bool settle(Pred pred, std::chrono::milliseconds limit = 2s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    for (;;) {
      poll();
      if (pred()) return true;
      if (std::chrono::steady_clock::now() > end) return false;
      std::this_thread::sleep_for(20us);
    }
  }

  /// Runs until every accepted request is over (collect()ing futures; an
  /// awaitable dropped by Asio, see escapes_allowed, counts as over);
  /// bounded, false if not.
  bool settle_all(std::chrono::milliseconds limit = 2s) {
    return settle(
        [] {
          for (std::size_t i = 0; i < outcomes_used; ++i) {
            outcome& o = outcomes[i];
            if (o.started != outcome::start::accepted) continue;
            collect(o);
            if (!o.done() && !(o.coroutine && escapes > 0) && !dropped_by_later_step(o))
              return false;
          }
          return true;
        },
        limit);
  }

  /// A use_future request's result, once ready, into its outcome (ec, the
  /// value's note_value; calls counted): its future is then spent.
  static void collect(outcome& o) {
    if (o.collected || o.started != outcome::start::accepted) return;
    std::visit(
        [&](auto& fut) {
          if constexpr (!std::is_same_v<std::decay_t<decltype(fut)>, std::monostate>) {
            if (!fut.valid() || fut.wait_for(0s) != std::future_status::ready) return;
            o.collected = true;
            try {
              if constexpr (std::is_same_v<std::decay_t<decltype(fut)>, std::future<void>>) {
                fut.get();
              } else {
                note_value(o, error_code(), fut.get());
              }
              o.ec = {};
            } catch (const boost::system::system_error& e) {
              o.ec = e.code();
            } catch (const std::bad_alloc&) {  // asio's handler building the system_error
              o.ec = asio::error::no_memory;
            } catch (const std::future_error&) {
              if (later_steps_allocate && escapes > 0) {  // (see later_steps_allocate)
                ++o.destroyed_uncalled;
                return;
              }
              AF_CHECK(!"use_future: the handler was destroyed uncalled (broken promise)");
            }
            ++o.calls;
          }
        },
        o.fut);
  }

  /// Moves the manual clock and lets due timers fire.
  void advance(std::chrono::nanoseconds d, std::chrono::microseconds real = 1ms) {
    manual_clock::advance(d);
    pump(real);
  }

 private:
  void init() {
    if (kind_ == kind::strand && io_) {
      // The test's own strand, made before the run. Over the io_context's
      // executor itself: a strand over an any_io_executor allocates in
      // Boost 1.81 whenever it is scheduled (strand_executor_service::
      // do_execute queries `blocking` through the type-erased executor,
      // whose query of a class-type property allocates with new), so no
      // completion through it can be allocation-free.
      alloc_failure::suspend s;
      strand_.emplace(asio::make_strand(io_->get_executor()));
    }
  }

  void poll() {
    if (!io_) return;
    for (;;) {
      try {
        io_->restart();
        io_->poll();
        return;
      } catch (const std::bad_alloc&) {
        escaped(__FILE__, __LINE__, "std::bad_alloc escaped io_context::poll (a handler threw)");
      } catch (const std::exception& e) {
        alloc_failure::suspend s;
        char buf[256];
        std::snprintf(buf, sizeof buf, "io_context::poll threw %s", e.what());
        report(__FILE__, __LINE__, buf);
      }
    }
  }

  template <typename... Args, typename Init>
  void initiate(Init& init, outcome* o, asio::cancellation_slot slot) {
    using handler = recorder<Args...>;
    auto with_slot = [&](auto h) {
      // Bound only when there is a slot: an unconnected slot would still
      // change the handler's type, not its behaviour.
      return asio::bind_cancellation_slot(slot, std::move(h));
    };
    switch (kind_) {
      case kind::callback:
        if (slot.is_connected())
          init(with_slot(handler(o)));
        else
          init(handler(o));
        return;
      case kind::std_allocator:
        init(with_slot(asio::bind_allocator(std::allocator<void>(), handler(o))));
        return;
      case kind::counting_allocator:
        init(with_slot(asio::bind_allocator(counting_allocator<void>(), handler(o))));
        return;
      case kind::strand:
        init(with_slot(asio::bind_executor(*strand_, handler(o))));
        return;
      case kind::deferred: {
        // The deferred operation may allocate (it decay-copies the
        // initiation's arguments): if that throws, no handler was made.
        auto op = [&] {
          try {
            return init(asio::deferred);
          } catch (...) {
            o->no_handler = true;
            throw;
          }
        }();
        std::move(op)(with_slot(handler(o)));
        return;
      }
      case kind::future:
        // std::future<void> or of the one argument after the error_code.
        o->fut = init(asio::bind_cancellation_slot(slot, asio::use_future));
        return;
      case kind::awaitable: {
        o->coroutine = true;
        // A deferred operation co-owns the object, so the coroutine, which
        // starts later, never reaches a destroyed one.
        auto op = init(asio::deferred);
        asio::co_spawn(
            ex_,
            [op = std::move(op), o]() mutable -> asio::awaitable<void> {
              frame_sentinel s(o);
              try {
                if constexpr (sizeof...(Args) == 0) {
                  co_await std::move(op)(asio::use_awaitable);
                } else {
                  note_value(*o, error_code(), co_await std::move(op)(asio::use_awaitable));
                }
                o->ec = {};
                ++o->calls;
              } catch (const boost::system::system_error& e) {
                o->ec = e.code();
                ++o->calls;
              } catch (const std::bad_alloc&) {
                ++o->inner_threw;
              } catch (...) {
                ++o->other_error;
              }
            },
            asio::bind_cancellation_slot(slot, [o](std::exception_ptr e) {
              ++o->spawn_done;
              if (e) ++o->other_error;
            }));
        return;
      }
    }
  }

  asio::io_context* io_ = nullptr;
  asio::thread_pool* pool_ = nullptr;
  asio::any_io_executor ex_;
  kind kind_;
  std::optional<asio::strand<asio::io_context::executor_type>> strand_;
};

/// Checks every request of the run (after the context ran out of work).
inline void check_outcomes() {
  // One allocation fails a run: each escape drops at most one operation
  // (a composed one, with the stream operation it was in).
  int dropped = 0;
  for (std::size_t i = 0; i < outcomes_used; ++i)
    if (dropped_by_later_step(outcomes[i])) ++dropped;
  AF_CHECK(dropped <= escapes);
  for (std::size_t i = 0; i < outcomes_used; ++i) {
    outcome& o = outcomes[i];
    AF_CHECK(!o.receipt_wrong);
    if (o.future && !o.has_future()) {
      AF_CHECK(o.started != outcome::start::accepted);
      continue;
    }
    // An accepted use_future request has its result (or its error) by now.
    auto check_future = [&](auto& fut) {
      if (o.started != outcome::start::accepted) return;
      if (o.collected) return;  // (collect() took it)
      AF_CHECK(fut.wait_for(0s) == std::future_status::ready);
      if (fut.wait_for(0s) != std::future_status::ready) return;
      try {
        fut.get();
      } catch (const boost::system::system_error&) {
      } catch (const std::bad_alloc&) {  // asio's handler building the system_error
      } catch (const std::future_error&) {
        if (!(later_steps_allocate && escapes > 0))  // (see later_steps_allocate)
          AF_CHECK(!"use_future: the handler was destroyed uncalled (broken promise)");
      }
    };
    if (o.has_future()) {
      std::visit(
          [&](auto& fut) {
            if constexpr (!std::is_same_v<std::decay_t<decltype(fut)>, std::monostate>)
              check_future(fut);
          },
          o.fut);
      continue;
    }
    if (o.coroutine) {
      AF_CHECK(o.frames.load() == 0);  // the frame did not leak
      AF_CHECK(o.other_error.load() == 0);
      AF_CHECK(o.frames_made.load() <= 1);
      if (o.started == outcome::start::accepted) {
        // Completed (the request's result, or its initiation's bad_alloc
        // delivered into the coroutine); or, as Asio 1.81 does when the
        // awaited initiation throws, destroyed unresumed with the exception
        // escaping run().
        const bool completed = o.spawn_done.load() == 1 && o.calls + o.inner_threw == 1;
        const bool dropped = o.spawn_done.load() == 0 && o.calls == 0 && escapes > 0;
        AF_CHECK(completed || dropped);
      } else {
        AF_CHECK(o.spawn_done.load() == 0);
      }
      continue;
    }
    switch (o.started) {
      case outcome::start::accepted:
        if (dropped_by_later_step(o)) break;
        AF_CHECK(o.calls.load() == 1);
        AF_CHECK(o.destroyed_uncalled.load() == 0);
        break;
      case outcome::start::threw:
        AF_CHECK(o.calls.load() == 0);
        AF_CHECK(o.destroyed_uncalled.load() == (o.no_handler ? 0 : 1));
        break;
      case outcome::start::none:
        break;
    }
  }
}

// --- the runner ------------------------------------------------------------------

/// How long a context may take to run out of work once the objects are gone.
inline std::chrono::milliseconds drain_limit = 3s;

/// Runs `ctx` until it runs out of work, at most drain_limit; false if it did not.
inline bool drain(asio::io_context& ctx) {
  const auto end = std::chrono::steady_clock::now() + drain_limit;
  for (;;) {
    try {
      ctx.restart();
      ctx.run_for(5ms);
    } catch (const std::bad_alloc&) {
      escaped(__FILE__, __LINE__, "std::bad_alloc escaped io_context::run (a handler threw)");
      continue;
    } catch (const std::exception& e) {
      alloc_failure::suspend s;
      char buf[256];
      std::snprintf(buf, sizeof buf, "io_context::run threw %s", e.what());
      report(__FILE__, __LINE__, buf);
      continue;
    }
    if (ctx.stopped()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
  }
}

/// Joins `pool` on a helper thread, waiting at most drain_limit; false if
/// the pool did not run out of work (its threads are then left behind).
inline bool drain(asio::thread_pool& pool) {
  std::atomic<bool> joined{false};
  std::thread t;
  {
    alloc_failure::suspend s;
    t = std::thread([&] {
      pool.join();
      joined = true;
    });
  }
  const auto end = std::chrono::steady_clock::now() + drain_limit;
  while (!joined && std::chrono::steady_clock::now() < end)
    std::this_thread::sleep_for(1ms);
  if (!joined) {
    t.detach();
    return false;
  }
  t.join();
  return true;
}

/// Where the scenario runs.
enum class place { io_context, io_strand, thread_pool };

inline const char* name(place p) {
  switch (p) {
    case place::io_context:
      return "io_context";
    case place::io_strand:
      return "strand(io_context)";
    case place::thread_pool:
      return "thread_pool";
  }
  return "?";
}

/// What a run makes fail: the k-th allocation (alloc_injector) or, in the
/// Redis test, the k-th call into hiredis.
struct injector {
  const char* name;
  std::uint64_t (*count)();    // events so far
  void (*arm)(std::uint64_t);  // the k-th event from now fails (0: none)
  void (*disarm)();
  bool (*fired)();
};

inline const injector alloc_injector{"alloc", [] { return alloc_failure::allocations(); },
                                     [](std::uint64_t k) { alloc_failure::fail_at(k); },
                                     [] { alloc_failure::disarm(); },
                                     [] { return alloc_failure::fired(); }};

struct run_result {
  std::uint64_t allocations = 0;
  bool fired = false;
  bool drained = true;
};

/// One run of a scenario with the k-th event of `inj` failing (0: none).
///
/// A scenario is `body(env&)`, run entirely under injection, context drain
/// included; or a staged one (the Redis test) with `prepare(env&)` (before
/// injection: a connection, a server state), `run(env&)` (injected), then,
/// injection off, `recover(env&)` (the same objects must still work) and
/// `finish(env&)` (destroys them), before the context is drained.
template <typename Body>
run_result run_once(Body& body, kind hk, place where, std::uint64_t k, bool check_leaks,
                    const injector& inj = alloc_injector) {
  run_result r;
  outcomes_used = 0;
  counted_live = 0;
  manual_clock::reset();
#ifdef RATELIMIT_TEST_HAVE_UPCALL_COUNTER
  detail::upcall_fallback_allocations = 0;
#endif
  current.k = k;
  escapes = 0;
  escapes_allowed = hk == kind::awaitable;
  const std::int64_t live_before = alloc_failure::live();
  std::uint64_t counted = 0;
  {
    std::optional<asio::io_context> io;
    std::optional<asio::thread_pool> pool;
    std::optional<env> e;
    {
      alloc_failure::suspend s;  // the test's own context, made before the run
      if (where == place::thread_pool) {
        pool.emplace(2);
        e.emplace(*pool, hk);
      } else {
        io.emplace(1);
        if (where == place::io_strand) {
          // An io_context of its own just for polling; the objects live on a strand.
          e.emplace(*io, asio::any_io_executor(asio::make_strand(io->get_executor())), hk);
        } else {
          e.emplace(*io, hk);
        }
      }
    }
    constexpr bool staged = requires {
      body.run(*e);
    };
    if constexpr (staged) body.prepare(*e);
    const std::uint64_t before = inj.count();
    inj.arm(k);
    if constexpr (staged) {
      body.run(*e);
      inj.disarm();
      counted = inj.count() - before;
      r.fired = inj.fired();
      body.recover(*e);
      body.finish(*e);
      r.drained = drain(*io);
    } else {
      body(*e);  // destroys its objects before returning
      r.drained = io ? drain(*io) : drain(*pool);
      inj.disarm();
      counted = inj.count() - before;
      r.fired = inj.fired();
    }
    if (!r.drained) {
      report(__FILE__, __LINE__,
             "the context did not run out of work after the objects were destroyed "
             "(outstanding work lost: a waiter or operation leaked)");
      if (pool) {
        std::fflush(stderr);
        std::_Exit(3);  // its threads cannot be stopped from here
      }
      io->stop();
    }
    check_outcomes();
    if constexpr (requires { body.verify(); }) body.verify();
    AF_CHECK(counted_live.load() == 0);
#ifdef RATELIMIT_TEST_HAVE_UPCALL_COUNTER
    AF_CHECK(detail::upcall_fallback_allocations.load() == 0);
#endif
    {
      alloc_failure::suspend s;
      for (std::size_t i = 0; i < outcomes_used; ++i)
        outcomes[i].fut = std::monostate();
      e.reset();
      io.reset();
      pool.reset();
    }
  }
  r.allocations = counted;
  if (check_leaks && r.drained) {
    const std::int64_t leaked = alloc_failure::live() - live_before;
    if (leaked != 0) {
      char buf[128];
      std::snprintf(buf, sizeof buf, "%lld block(s) from operator new leaked",
                    static_cast<long long>(leaked));
      report(__FILE__, __LINE__, buf);
    }
  }
  return r;
}

/// Options of a whole executable's run.
struct options {
  const char* only = nullptr;  // run scenarios whose name contains this
  std::uint64_t stride = 1;    // test every stride-th k (1: every k)
  const char* kind = nullptr;  // --kind NAME: only this handler kind
  std::uint64_t k = 0;         // --k K: only this k (to reproduce one run)
};

inline options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--verbose"))
      verbose = true;
    else if (!std::strcmp(argv[i], "--trace"))
      trace = true;
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc)
      o.only = argv[++i];
    else if (!std::strcmp(argv[i], "--kind") && i + 1 < argc)
      o.kind = argv[++i];
    else if (!std::strcmp(argv[i], "--k") && i + 1 < argc)
      o.k = std::strtoull(argv[++i], nullptr, 10);
    else if (!std::strcmp(argv[i], "--stride") && i + 1 < argc)
      o.stride = std::strtoull(argv[++i], nullptr, 10);
  }
  if (const char* s = std::getenv("RATELIMIT_ALLOC_STRIDE"))
    o.stride = std::strtoull(s, nullptr, 10);
  if (o.stride == 0) o.stride = 1;
  return o;
}

/// Runs `body` counting, then with each allocation k in 1..N failing (every
/// stride-th k; under stride > 1 the last k is always run); prints one line.
template <typename Body>
void exhaust(const char* scenario, Body&& body, kind hk, place where, const options& opt,
             const injector& inj = alloc_injector) {
  if (opt.only && !std::strstr(scenario, opt.only)) return;
  if (opt.kind && std::strcmp(opt.kind, name(hk)) != 0) return;
  current.scenario = scenario;
  current.kind = name(hk);
  current.injector = inj.name;
  const auto t0 = std::chrono::steady_clock::now();
  run_once(body, hk, where, 0, false, inj);  // warm-up: one-time allocations of the process
  const run_result counting = run_once(body, hk, where, 0, true, inj);
  const std::uint64_t n = counting.allocations;
  std::uint64_t runs = 0, fired = 0;
  for (std::uint64_t k = 1; k <= n; ++k) {
    if ((k - 1) % opt.stride != 0 && k != n) continue;
    if (opt.k && k != opt.k) continue;
    const run_result r = run_once(body, hk, where, k, true, inj);
    ++runs;
    if (r.fired) ++fired;
  }
#ifdef RATELIMIT_TEST_LSAN
  if (__lsan_do_recoverable_leak_check() != 0)
    report(__FILE__, __LINE__, "LeakSanitizer found leaks");
#endif
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%-36s %-7s %-19s %-18s N=%3llu runs=%3llu fired=%3llu %7.1f ms\n", scenario,
              inj.name, name(hk), name(where), static_cast<unsigned long long>(n),
              static_cast<unsigned long long>(runs), static_cast<unsigned long long>(fired), ms);
  std::fflush(stdout);
}

/// Ends main(): a summary line ctest and people can read.
inline int summary(int scenarios_run) {
  std::printf("%d scenario runs; %d failure(s)\n", scenarios_run, failures.load());
  return failures.load() == 0 ? 0 : 1;
}

}  // namespace ratelimit::test::alloc

#endif  // RATELIMIT_TEST_ALLOC_HARNESS_HPP
