//
// bench/throughput.cpp: W0-W3 and W7, the throughput loop.
//
// Worker threads start together from a latch, run the op in batches of 1000
// and check a stop flag between batches; the main thread stops them after
// 200 ms. ns_per_op = wall time / total ops. Two discarded warm-up repetitions,
// then seven (--quick: 20 ms, no warm-up, one).
//
// W0  the clock read per op (steady_clock::now()).
// W1  a try on a huge-rate bucket from one thread; W2 from two threads.
// W3  an acquire that never waits: callback and use_awaitable chains on an
//     io_context run by the worker thread, get_token() from a plain thread.
// W7  the joint acquire of two huge-rate buckets (ratelimit::async_acquire of
//     {part(a, 1), part(b, 1)}, and try_acquire), beside the same two tokens
//     taken by two sequential acquires, a then b (async_get_token twice,
//     try_get_token twice): callback chains, use_awaitable loops, tries.
//
#include "bench.hpp"

#include <ratelimit/joint.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <latch>
#include <mutex>
#include <optional>
#include <span>
#include <thread>

namespace bench {
namespace {

namespace asio = boost::asio;

constexpr int batch = 1000;

/// A bucket on which every request is granted at once: 10^12 tokens/s, 2^30 burst.
ratelimit::token_bucket huge_bucket(asio::io_context& ioc) {
  return ratelimit::token_bucket(ioc, std::uint64_t{1} << 30,
                                 ratelimit::per_second(1'000'000'000'000));
}

/// What a worker hands back: ops done, ops that failed (must be 0).
struct worker_result {
  std::uint64_t ops = 0;
  std::uint64_t bad = 0;
};

/// Everything a worker needs: the start latch (set up first, then arrive()) and the stop flag.
struct worker_ctx {
  std::latch& ready;
  std::latch& gate;
  const std::atomic<bool>& stop;
  void arrive() const {
    ready.count_down();
    gate.wait();
  }
  bool stopped() const { return stop.load(std::memory_order_relaxed); }
};

using worker_fn = std::function<worker_result(const worker_ctx&)>;

std::atomic<std::uint64_t> sink{0};

/// One repetition: `n` workers running `fn` for `dur`; returns ns per op.
double throughput_rep(int n, std::chrono::milliseconds dur, const worker_fn& fn) {
  std::latch ready(n), gate(1);
  std::atomic<bool> stop{false};
  std::vector<worker_result> results(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      results[static_cast<std::size_t>(i)] = fn({ready, gate, stop});
    });
  ready.wait();
  const std::int64_t t0 = now_ns();
  gate.count_down();
  std::this_thread::sleep_for(dur);
  stop.store(true);
  for (auto& t : threads)
    t.join();
  const std::int64_t wall = now_ns() - t0;
  worker_result total;
  for (const auto& r : results) {
    total.ops += r.ops;
    total.bad += r.bad;
  }
  if (total.bad != 0)
    die(format("%llu of %llu ops failed or waited on a bucket that should always grant",
               static_cast<unsigned long long>(total.bad),
               static_cast<unsigned long long>(total.ops)));
  if (total.ops == 0) die("no ops done");
  return static_cast<double>(wall) / static_cast<double>(total.ops);
}

// ---------------------------------------------------------------- the ops

worker_result clock_worker(const worker_ctx& c) {
  worker_result r;
  std::int64_t acc = 0;
  c.arrive();
  while (!c.stopped()) {
    for (int i = 0; i < batch; ++i)
      acc += std::chrono::steady_clock::now().time_since_epoch().count();
    r.ops += batch;
  }
  sink += static_cast<std::uint64_t>(acc);
  return r;
}

/// A loop of `op()` (returns false on failure) in batches.
template <typename Op>
worker_result loop_worker(const worker_ctx& c, Op&& op) {
  worker_result r;
  c.arrive();
  while (!c.stopped()) {
    for (int i = 0; i < batch; ++i)
      if (!op()) ++r.bad;
    r.ops += batch;
  }
  return r;
}

/// The atomic floor: the clock, then one successful compare-exchange of a
/// GCRA-like "next free time" (it always succeeds at once at a huge rate).
struct atomic_floor {
  std::atomic<std::int64_t> tat{0};
  bool operator()() {
    const std::int64_t now = now_ns();
    std::int64_t cur = tat.load(std::memory_order_relaxed);
    while (!tat.compare_exchange_weak(cur, std::max(cur, now) + 1, std::memory_order_acq_rel,
                                      std::memory_order_relaxed)) {
    }
    return true;
  }
};

/// The mutex floor: the same under a std::mutex.
struct mutex_floor {
  std::mutex m;
  std::int64_t tat = 0;
  bool operator()() {
    const std::int64_t now = now_ns();
    std::lock_guard lk(m);
    tat = std::max(tat, now) + 1;
    return true;
  }
};

/// A chain of handlers run by the worker's io_context: each op's completion
/// starts the next op. `Start` starts one op with a handler.
template <typename Start>
struct chain {
  Start start;
  const worker_ctx* ctx;
  worker_result* r;
  int i = 0;
  // (the rest: what a joint acquire also hands over, a joint_receipt, dropped)
  template <typename... Rest>
  void operator()(boost::system::error_code ec = {}, Rest&&...) {
    if (ec) ++r->bad;
    if (++i == batch) {
      i = 0;
      r->ops += batch;
      if (ctx->stopped()) return;
    }
    Start s = start;  // the op may move *this before `start` is done with
    s(std::move(*this));
  }
};

/// Runs a chain of `start` ops on a fresh io_context; checks that no op
/// needed more than its own `per_op` completion handlers (an op that waited
/// would run the bucket's timer handler too).
template <typename Setup>
worker_result chain_worker(const worker_ctx& c, Setup&& setup, std::uint64_t per_op = 1) {
  asio::io_context ioc(1);
  worker_result r;
  auto start = setup(ioc);
  c.arrive();
  start(chain<decltype(start)>{start, &c, &r});
  const std::size_t handlers = ioc.run();
  const std::uint64_t allowed = per_op * (r.ops + batch);
  if (handlers > allowed) r.bad += handlers - allowed;
  return r;
}

asio::awaitable<void> co_loop(ratelimit::token_bucket* bucket, const worker_ctx* c,
                              worker_result* r) {
  auto ex = co_await asio::this_coro::executor;
  for (;;) {
    for (int i = 0; i < batch; ++i) {
      if (bucket)
        co_await bucket->async_get_token(asio::use_awaitable);
      else
        co_await asio::post(ex, asio::use_awaitable);
    }
    r->ops += batch;
    if (c->stopped()) co_return;
  }
}

worker_result coro_worker(const worker_ctx& c, bool with_bucket) {
  asio::io_context ioc(1);
  std::optional<ratelimit::token_bucket> bucket;
  if (with_bucket) bucket.emplace(huge_bucket(ioc));
  worker_result r;
  asio::co_spawn(ioc, co_loop(bucket ? &*bucket : nullptr, &c, &r), [&](std::exception_ptr e) {
    if (e) ++r.bad;
  });
  c.arrive();
  const std::size_t handlers = ioc.run();
  // co_spawn itself runs a few handlers; a waited-for grant would add the timer's.
  if (handlers > r.ops + 16) r.bad += handlers - r.ops - 16;
  return r;
}

/// W7 as a coroutine: the two tokens taken together (one joint acquire) or
/// one after the other (two acquires).
enum class two_mode { joint, get_token, acquire };

asio::awaitable<void> co_loop_two(ratelimit::token_bucket* a, ratelimit::token_bucket* b,
                                  two_mode mode, const worker_ctx* c, worker_result* r) {
  for (;;) {
    for (int i = 0; i < batch; ++i) {
      if (mode == two_mode::acquire) {  // the receipt forms, as the joint acquire's
        ratelimit::receipt ra = co_await a->async_acquire(1, asio::use_awaitable);
        ratelimit::receipt rb = co_await b->async_acquire(1, asio::use_awaitable);
      } else if (mode == two_mode::joint) {
        // (g++ 12 rejects a braced list of parts inside a coroutine: "array
        // used as initializer"; the parts are made per op all the same)
        const std::array<ratelimit::part, 2> parts{ratelimit::part(*a, 1), ratelimit::part(*b, 1)};
        co_await ratelimit::async_acquire(std::span<const ratelimit::part>(parts),
                                          asio::use_awaitable);
      } else {
        co_await a->async_get_token(asio::use_awaitable);
        co_await b->async_get_token(asio::use_awaitable);
      }
    }
    r->ops += batch;
    if (c->stopped()) co_return;
  }
}

worker_result coro_two_worker(const worker_ctx& c, two_mode mode) {
  asio::io_context ioc(1);
  auto a = huge_bucket(ioc);
  auto b = huge_bucket(ioc);
  worker_result r;
  asio::co_spawn(ioc, co_loop_two(&a, &b, mode, &c, &r), [&](std::exception_ptr e) {
    if (e) ++r.bad;
  });
  c.arrive();
  const std::size_t handlers = ioc.run();
  // One completion per acquire (two per op when sequential), plus co_spawn's own few.
  const std::uint64_t allowed = (mode == two_mode::joint ? 1 : 2) * r.ops + 16;
  if (handlers > allowed) r.bad += handlers - allowed;
  return r;
}

worker_fn make_worker() {
  const std::string& impl = opt.impl;
  const std::string& w = opt.workload;
  if (w == "W0") return clock_worker;
  if (impl == "asio_ratelimit_try") {
    auto ioc = std::make_shared<asio::io_context>(1);
    auto bucket = std::make_shared<ratelimit::token_bucket>(huge_bucket(*ioc));
    return [ioc, bucket](const worker_ctx& c) {
      return loop_worker(c, [&] { return bucket->try_get_token(); });
    };
  }
  if (impl == "floor_atomic") {
    auto f = std::make_shared<atomic_floor>();
    return [f](const worker_ctx& c) { return loop_worker(c, [&] { return (*f)(); }); };
  }
  if (impl == "floor_mutex") {
    auto f = std::make_shared<mutex_floor>();
    return [f](const worker_ctx& c) { return loop_worker(c, [&] { return (*f)(); }); };
  }
  if (impl == "asio_ratelimit_callback") {
    return [](const worker_ctx& c) {
      std::optional<ratelimit::token_bucket> bucket;
      return chain_worker(c, [&](asio::io_context& ioc) {
        bucket.emplace(huge_bucket(ioc));
        return [b = &*bucket](auto&& h) { b->async_get_token(std::move(h)); };
      });
    };
  }
  if (impl == "floor_post") {
    return [](const worker_ctx& c) {
      return chain_worker(c, [&](asio::io_context& ioc) {
        return [ex = ioc.get_executor()](auto&& h) { asio::post(ex, std::move(h)); };
      });
    };
  }
  if (impl == "floor_post_clock") {
    // A post plus one steady_clock read: the floor of any exact limiter that
    // completes through Asio (the grant depends on the time).
    return [](const worker_ctx& c) {
      return chain_worker(c, [&](asio::io_context& ioc) {
        return [ex = ioc.get_executor()](auto&& h) {
          const std::int64_t t = now_ns();
          asm volatile("" : : "r"(t));  // keep the read, without a store
          asio::post(ex, std::move(h));
        };
      });
    };
  }
  if (impl == "floor_post_any") {
    // The same post through an any_io_executor, the bucket's executor type:
    // the type-erased path (executor_function, any_executor dispatch).
    return [](const worker_ctx& c) {
      return chain_worker(c, [&](asio::io_context& ioc) {
        return [ex = asio::any_io_executor(ioc.get_executor())](auto&& h) {
          asio::post(ex, std::move(h));
        };
      });
    };
  }
  if (impl == "floor_post_reactor") {
    // The same post on an io_context that owns a (never armed) timer, as
    // every context with a bucket, socket or timer does: once its reactor
    // exists, the scheduler polls it (epoll_wait) between handlers.
    return [](const worker_ctx& c) {
      std::optional<asio::steady_timer> timer;
      return chain_worker(c, [&](asio::io_context& ioc) {
        timer.emplace(ioc);
        return [ex = ioc.get_executor()](auto&& h) { asio::post(ex, std::move(h)); };
      });
    };
  }
  if (impl == "asio_ratelimit_awaitable")
    return [](const worker_ctx& c) { return coro_worker(c, true); };
  if (impl == "floor_co_post") return [](const worker_ctx& c) { return coro_worker(c, false); };
  // W7: two huge-rate buckets a and b, one token of each per op.
  if (impl == "asio_ratelimit_joint_callback") {
    return [](const worker_ctx& c) {
      std::optional<ratelimit::token_bucket> a, b;
      return chain_worker(c, [&](asio::io_context& ioc) {
        a.emplace(huge_bucket(ioc));
        b.emplace(huge_bucket(ioc));
        return [a = &*a, b = &*b](auto&& h) {
          ratelimit::async_acquire({ratelimit::part(*a, 1), ratelimit::part(*b, 1)}, std::move(h));
        };
      });
    };
  }
  if (impl == "asio_ratelimit_two_sequential_callback") {
    return [](const worker_ctx& c) {
      std::optional<ratelimit::token_bucket> a, b;
      return chain_worker(
          c,
          [&](asio::io_context& ioc) {
            a.emplace(huge_bucket(ioc));
            b.emplace(huge_bucket(ioc));
            return [a = &*a, b = &*b](auto&& h) {
              a->async_get_token([b, h = std::move(h)](boost::system::error_code ec) mutable {
                if (ec) return std::move(h)(ec);
                b->async_get_token(std::move(h));
              });
            };
          },
          2);
    };
  }
  if (impl == "asio_ratelimit_two_acquires_callback") {  // the receipt forms
    return [](const worker_ctx& c) {
      std::optional<ratelimit::token_bucket> a, b;
      return chain_worker(
          c,
          [&](asio::io_context& ioc) {
            a.emplace(huge_bucket(ioc));
            b.emplace(huge_bucket(ioc));
            return [a = &*a, b = &*b](auto&& h) {
              a->async_acquire(1, [b, h = std::move(h)](boost::system::error_code ec,
                                                        ratelimit::receipt) mutable {
                if (ec) return std::move(h)(ec);
                b->async_acquire(
                    1, [h = std::move(h)](boost::system::error_code ec,
                                          ratelimit::receipt) mutable { std::move(h)(ec); });
              });
            };
          },
          2);
    };
  }
  if (impl == "asio_ratelimit_joint_awaitable")
    return [](const worker_ctx& c) { return coro_two_worker(c, two_mode::joint); };
  if (impl == "asio_ratelimit_two_sequential_awaitable")
    return [](const worker_ctx& c) { return coro_two_worker(c, two_mode::get_token); };
  if (impl == "asio_ratelimit_two_acquires_awaitable")
    return [](const worker_ctx& c) { return coro_two_worker(c, two_mode::acquire); };
  if (impl == "asio_ratelimit_joint_try" || impl == "asio_ratelimit_two_sequential_try") {
    const bool joint = impl == "asio_ratelimit_joint_try";
    auto ioc = std::make_shared<asio::io_context>(1);
    auto a = std::make_shared<ratelimit::token_bucket>(huge_bucket(*ioc));
    auto b = std::make_shared<ratelimit::token_bucket>(huge_bucket(*ioc));
    return [ioc, a, b, joint](const worker_ctx& c) {
      if (joint)
        return loop_worker(c, [&] {
          return ratelimit::try_acquire({ratelimit::part(*a, 1), ratelimit::part(*b, 1)})
              .has_value();
        });
      return loop_worker(c, [&] { return a->try_get_token() && b->try_get_token(); });
    };
  }
  if (impl == "asio_ratelimit_blocking") {
    return [](const worker_ctx& c) {
      // A thread runs the context so that a get_token() that had to wait would
      // complete (and be caught: its timer handler would run).
      asio::io_context ioc(1);
      auto bucket = huge_bucket(ioc);
      auto guard = asio::make_work_guard(ioc);
      std::size_t handlers = 0;
      std::thread runner([&] { handlers = ioc.run(); });
      worker_result r = loop_worker(c, [&] {
        boost::system::error_code ec;
        bucket.get_token(1, ec);
        return !ec;
      });
      guard.reset();
      runner.join();
      r.bad += handlers;
      return r;
    };
  }
  die("unknown impl");
}

/// Do two threads get two cores? A 1-vs-2-thread compute probe (W2 means
/// nothing when another process holds a core).
void core_probe(const char* when, std::chrono::milliseconds dur) {
  auto spin = [&](int n) {
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> total{0};
    std::vector<std::thread> ts;
    const std::int64_t t0 = now_ns();
    for (int i = 0; i < n; ++i)
      ts.emplace_back([&, seed = std::uint64_t(i + 1)] {
        std::uint64_t x = seed, it = 0;
        while (!stop.load(std::memory_order_relaxed)) {
          for (int j = 0; j < 10000; ++j)
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
          ++it;
        }
        sink += x;
        total += it;
      });
    std::this_thread::sleep_for(dur);
    stop = true;
    for (auto& t : ts)
      t.join();
    return static_cast<double>(total.load()) / static_cast<double>(now_ns() - t0);
  };
  const double one = spin(1), two = spin(2);
  warn(format("W2 core probe %s: 2 threads do %.2fx the work of 1", when, two / one));
  if (two / one < 1.6)
    warn("WARNING: the two threads do not get two cores; W2 measures nothing useful");
}

}  // namespace

void run_throughput() {
  const int n = opt.workload == "W2" ? 2 : 1;
  const auto dur = std::chrono::milliseconds(opt.quick ? 20 : 200);
  const int warm = opt.quick ? 0 : 2;
  if (n == 2) core_probe("before", dur / 2);
  for (int i = 0; i < warm; ++i)
    throughput_rep(n, dur, make_worker());
  for (int rep = 0, reps = pick(7, 1); rep < reps; ++rep)
    emit(rep, format("ns_per_op=%.2f", throughput_rep(n, dur, make_worker())));
  if (n == 2) core_probe("after", dur / 2);
  if (sink == 42) std::fputs("\n", stderr);
}

}  // namespace bench
