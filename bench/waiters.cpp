//
// bench/waiters.cpp: W5, many waiters; W7b, many joint waiters.
//
// Rate N/s, burst 1, N acquires (N = 100000; --quick 10000), all waiters
// parked before the clock starts; wall_s runs from the gate opening to the
// last grant (ideal (N-1)/N s: the bucket may hold one token when the gate
// opens; N/N s for the callbacks, parked in a bucket that starts empty). Each repetition is its own
// process (this program re-run with
// --child), plus one child with 0 waiters: bytes_per_waiter = (peak RSS -
// that baseline, from VmHWM) / parked waiters.
//
// How each implementation parks its waiters:
//   asio_ratelimit_callback  N async_get_token(callback) queued on a bucket
//                            that starts empty; the clock starts when the
//                            bucket is created (its first token is due one
//                            interval later, the last N intervals later).
//   asio_ratelimit_awaitable N coroutines parked on a gate timer; when it is
//                            cancelled each does co_await async_get_token();
//                            the clock starts when the first one resumes
//                            (cancelling the gate first queues all N
//                            resumptions: ~6 ms for 100k, in which nobody
//                            can ask yet, and a burst-1 bucket cannot bank).
//   floor_co_timer           the same coroutines; each then awaits its own
//                            steady_timer expiring at its ideal grant time.
//   floor_timer              N steady_timers (callbacks) expiring at
//                            t0 + i/N s, t0 chosen after the parking.
//   asio_ratelimit_blocking, textbook_thread
//                            a pool of 1000 threads x N/1000 acquires (100k OS
//                            threads are impossible here), parked on a latch;
//                            bytes_per_waiter is per parked thread.
//
// W7b: the same with two buckets a and b (both N/s, burst 1, starting
// empty), every waiter wanting one token of each:
//   asio_ratelimit_joint_callback    N ratelimit::async_acquire({a:1, b:1},
//                                    callback), parked and clocked as the
//                                    W5 callbacks.
//   asio_ratelimit_joint_awaitable   N coroutines on the gate, each then
//                                    co_await async_acquire({a:1, b:1}).
//   asio_ratelimit_two_sequential_callback, _awaitable
//                                    the reference: a's token, then b's
//                                    (a callback that asks b; two co_awaits).
// Ideal as W5's: the last grant (N-1)/N s after the gate.
//
// A wall time below the ideal means the limiter over-granted: the run aborts.
//
#include "bench.hpp"
#include "textbook.hpp"

#include <ratelimit/joint.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <latch>
#include <memory>
#include <optional>
#include <span>
#include <thread>

namespace bench {
namespace {

namespace asio = boost::asio;

constexpr long pool_threads = 1000;

/// Grant bookkeeping shared by every waiter of a child: how many were granted,
/// when the last was, and a sample of grant times for the W5 plot.
struct grants {
  long expected = 0;
  long done = 0;
  long failed = 0;
  std::int64_t t0 = 0;
  std::int64_t last = 0;
  std::vector<std::int64_t> sample;  // every expected/1000-th grant, ns after t0
  long every = 1;

  explicit grants(long n) : expected(n), every(std::max(1L, n / 1000)) { sample.reserve(1001); }

  void record(bool ok) {
    if (!ok) ++failed;
    last = now_ns();
    if (done % every == 0 || done + 1 == expected) sample.push_back(last - t0);
    ++done;
  }
};

/// The same, for threads: a mutex-free per-thread count and one atomic "last".
struct pool_grants {
  std::atomic<std::int64_t> last{0};
  std::atomic<long> done{0};
};

ratelimit::token_bucket empty_bucket(asio::io_context& ioc, long rate) {
  return ratelimit::token_bucket(ioc, 1, ratelimit::per_second(static_cast<std::uint64_t>(rate)),
                                 ratelimit::start_empty);
}

asio::awaitable<void> parked_coroutine(asio::steady_timer* gate, ratelimit::token_bucket* bucket,
                                       grants* g, long* parked, std::int64_t period_ns) {
  ++*parked;
  boost::system::error_code ec;
  co_await gate->async_wait(asio::redirect_error(asio::use_awaitable, ec));
  // The gate is open from the moment the first waiter passes it: cancelling
  // the gate timer queues all N resumptions before any runs (about 60 ns
  // each), time in which nobody can ask for a token yet.
  if (g->t0 == 0) g->t0 = now_ns();
  if (bucket) {
    co_await bucket->async_get_token(asio::redirect_error(asio::use_awaitable, ec));
  } else {
    // The coroutine + timer floor: its own timer, expiring at its ideal time.
    const std::int64_t i = *parked - g->expected;  // 0, 1, ... in resumption order
    ++*parked;
    asio::steady_timer timer(
        co_await asio::this_coro::executor,
        std::chrono::steady_clock::time_point(std::chrono::nanoseconds(g->t0 + i * period_ns)));
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
  g->record(!ec);
}

/// W7b's coroutine: parked on the gate, then both tokens, jointly or a then b.
asio::awaitable<void> parked_two_coroutine(asio::steady_timer* gate, ratelimit::token_bucket* a,
                                           ratelimit::token_bucket* b, bool joint, grants* g,
                                           long* parked) {
  ++*parked;
  boost::system::error_code ec;
  co_await gate->async_wait(asio::redirect_error(asio::use_awaitable, ec));
  if (g->t0 == 0) g->t0 = now_ns();  // as parked_coroutine
  ec = {};
  if (joint) {
    // (g++ 12 rejects a braced list of parts inside a coroutine)
    const std::array<ratelimit::part, 2> parts{ratelimit::part(*a, 1), ratelimit::part(*b, 1)};
    co_await ratelimit::async_acquire(std::span<const ratelimit::part>(parts),
                                      asio::redirect_error(asio::use_awaitable, ec));
  } else {
    co_await a->async_get_token(asio::redirect_error(asio::use_awaitable, ec));
    if (!ec) co_await b->async_get_token(asio::redirect_error(asio::use_awaitable, ec));
  }
  g->record(!ec);
}

/// W7b: one repetition's waiters on two buckets (see the top of the file).
void park_two(asio::io_context& ioc, grants& g, long n, long rate) {
  const std::string& impl = opt.impl;
  const bool joint = impl.find("_joint_") != std::string::npos;
  if (impl.ends_with("_callback")) {
    g.t0 = now_ns();  // as W5's callbacks: the buckets start empty here
    auto a = empty_bucket(ioc, rate);
    auto b = empty_bucket(ioc, rate);
    for (long i = 0; i < n; ++i) {
      if (joint)
        ratelimit::async_acquire(
            {ratelimit::part(a, 1), ratelimit::part(b, 1)},
            [&g](boost::system::error_code ec, ratelimit::joint_receipt) { g.record(!ec); });
      else
        a.async_get_token([&g, &b](boost::system::error_code ec) {
          if (ec) return g.record(false);
          b.async_get_token([&g](boost::system::error_code ec2) { g.record(!ec2); });
        });
    }
    ioc.run();
    return;
  }
  auto a = empty_bucket(ioc, rate);
  auto b = empty_bucket(ioc, rate);
  asio::steady_timer gate(ioc, std::chrono::steady_clock::time_point::max());
  long count = 0;
  for (long i = 0; i < n; ++i)
    asio::co_spawn(ioc, parked_two_coroutine(&gate, &a, &b, joint, &g, &count), asio::detached);
  while (count < n && ioc.poll() > 0) {
  }
  if (count != n) die(format("only %ld of %ld coroutines parked", count, n));
  gate.cancel();
  ioc.run();
}

/// One repetition in this process; prints `wall_s=... peak_rss_kb=... parked=...`.
void child(long n, long rate) {
  const std::string& impl = opt.impl;
  const std::int64_t period_ns = 1'000'000'000 / rate;
  asio::io_context ioc(1);
  grants g(n);
  long parked = n;
  if (opt.workload == "W7b") {
    park_two(ioc, g, n, rate);
  } else if (impl == "asio_ratelimit_callback") {
    // The handlers are parked in the bucket itself, from its creation on: the
    // clock starts there (grant i is due at creation + (i + 1)/N s whenever
    // the io_context gets to run them).
    g.t0 = now_ns();
    auto bucket = empty_bucket(ioc, rate);
    for (long i = 0; i < n; ++i)
      bucket.async_get_token([&g](boost::system::error_code ec) { g.record(!ec); });
    ioc.run();
  } else if (impl == "asio_ratelimit_awaitable" || impl == "floor_co_timer") {
    std::optional<ratelimit::token_bucket> bucket;
    if (impl == "asio_ratelimit_awaitable") bucket.emplace(empty_bucket(ioc, rate));
    asio::steady_timer gate(ioc, std::chrono::steady_clock::time_point::max());
    long count = 0;
    for (long i = 0; i < n; ++i)
      asio::co_spawn(ioc,
                     parked_coroutine(&gate, bucket ? &*bucket : nullptr, &g, &count, period_ns),
                     asio::detached);
    while (count < n && ioc.poll() > 0) {
    }
    if (count != n) die(format("only %ld of %ld coroutines parked", count, n));
    gate.cancel();  // the first coroutine to pass sets g.t0
    ioc.run();
  } else if (impl == "floor_timer") {
    // The timers must expire at t0 + i/N, with t0 after they are all parked:
    // allow 2 us a timer (the parking takes well under 1).
    std::vector<asio::steady_timer> timers;
    timers.reserve(static_cast<std::size_t>(n));
    g.t0 = now_ns() + 2000 * n + 20'000'000;
    for (long i = 0; i < n; ++i) {
      timers.emplace_back(ioc, std::chrono::steady_clock::time_point(
                                   std::chrono::nanoseconds(g.t0 + i * period_ns)));
      timers.back().async_wait([&g](boost::system::error_code ec) { g.record(!ec); });
    }
    if (now_ns() > g.t0) warn("parking the timers took longer than planned");
    ioc.run();
  } else if (impl == "asio_ratelimit_blocking" || impl == "textbook_thread") {
    const long threads = std::min(n, pool_threads);
    parked = threads;
    if (n % std::max(threads, 1L) != 0) die("--waiters must be a multiple of 1000");
    std::optional<ratelimit::token_bucket> bucket;
    std::optional<textbook_bucket> textbook;
    auto guard = asio::make_work_guard(ioc);
    std::thread runner([&] { ioc.run(); });
    if (impl == "textbook_thread")
      textbook.emplace(static_cast<double>(rate), 1);
    else
      bucket.emplace(empty_bucket(ioc, rate));
    if (threads > 0) {
      std::latch ready(threads), gate(1);
      std::atomic<long> failed{0};
      std::vector<std::int64_t> all(static_cast<std::size_t>(n));
      std::atomic<long> next{0};
      std::vector<std::thread> pool;
      for (long t = 0; t < threads; ++t)
        pool.emplace_back([&] {
          ready.count_down();
          gate.wait();
          for (long k = 0; k < n / threads; ++k) {
            if (textbook) {
              textbook->acquire();
            } else {
              boost::system::error_code ec;
              bucket->get_token(1, ec);
              if (ec) ++failed;
            }
            all[static_cast<std::size_t>(next++)] = now_ns();
          }
        });
      ready.wait();
      g.t0 = now_ns();
      gate.count_down();
      for (auto& t : pool)
        t.join();
      std::sort(all.begin(), all.end());
      for (std::int64_t t : all) {
        g.last = t;
        if (g.done % g.every == 0 || g.done + 1 == n) g.sample.push_back(t - g.t0);
        ++g.done;
      }
      g.failed = failed;
    }
    guard.reset();
    runner.join();
  } else {
    die("unknown impl");
  }
  if (g.done != n || g.failed != 0)
    die(format("%ld of %ld grants, %ld failed", g.done, n, g.failed));
  const double wall = n > 0 ? static_cast<double>(g.last - g.t0) / 1e9 : 0.0;
  if (n > 0) {
    if (std::FILE* f = open_trace()) {
      long k = 0;
      for (std::int64_t t : g.sample) {
        std::fprintf(f, "%.6f %ld\n", static_cast<double>(t) / 1e9, std::min(n, k * g.every + 1));
        ++k;
      }
      std::fclose(f);
    }
  }
  std::printf("wall_s=%.6f peak_rss_kb=%ld parked=%ld\n", wall, vm_hwm_kb(), parked);
}

struct child_result {
  double wall = 0;
  long rss_kb = 0;
  long parked = 0;
};

child_result run_child(long n, long rate) {
  const std::string cmd =
      format("'/proc/%d/exe' --impl %s --workload %s --child --waiters %ld",
             static_cast<int>(getpid()), opt.impl.c_str(), opt.workload.c_str(), n) +
      format(" --rate %ld", rate);
  std::FILE* p = popen(cmd.c_str(), "r");
  if (!p) die("cannot run " + cmd);
  child_result r;
  const int got =
      std::fscanf(p, "wall_s=%lf peak_rss_kb=%ld parked=%ld", &r.wall, &r.rss_kb, &r.parked);
  if (pclose(p) != 0 || got != 3) die(opt.workload + " child failed: " + cmd);
  return r;
}

}  // namespace

void run_waiters() {
  long n = opt.quick ? 10000 : 100000;
  if (opt.waiters >= 0) n = opt.waiters;
  if (opt.child) {
    child(n, opt.rate > 0 ? opt.rate : std::max(n, 1L));
    return;
  }
  const long rate = n > 0 ? n : opt.quick ? 10000 : 100000;
  const child_result base = run_child(0, rate);
  warn(format("baseline peak RSS %ld kB (0 waiters)", base.rss_kb));
  const double ideal = static_cast<double>(n - 1) / static_cast<double>(rate);
  for (int rep = 0, reps = pick(3, 1); rep < reps; ++rep) {
    const child_result r = run_child(n, rate);
    if (n == 0) {
      emit(rep, format("peak_rss_kb=%ld", r.rss_kb));
      continue;
    }
    if (r.wall < ideal - 1e-4)
      die(format("wall %.4f s below the ideal %.4f s: the limiter over-granted", r.wall, ideal));
    emit(rep, format("wall_s=%.4f bytes_per_waiter=%.0f", r.wall,
                     static_cast<double>(r.rss_kb - base.rss_kb) * 1024.0 /
                         static_cast<double>(r.parked)));
  }
}

}  // namespace bench
