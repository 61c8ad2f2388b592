//
// bench/paced.cpp: W4, paced accuracy.
//
// Rate 1000/s, burst 1, one caller, 2000 sequential acquires on a fresh
// limiter. t0 is taken just before the first; grant i is ideally at
// t0 + i ms; lateness = completion time - ideal. One 100-grant warm-up, then
// five repetitions (--quick: 200 grants, one). Metrics: total_s (ideal 1.999),
// late_p50_us, late_p99_us, late_max_us (nearest rank).
//
// A grant more than 200 us before its ideal time means the limiter handed out
// more than its rate: the run aborts.
//
// Two more metrics separate the limiter's own lateness from the caller's. A
// caller that asks for grant i more than one interval after grant i-1 (its
// thread was preempted: this VM stalls for 1-4 ms a few times a second even
// when idle) finds a burst-1 bucket full and loses the excess for good; a
// fixed timer schedule does not. For a burst-1 limiter grant i is due at
// e_i = max(r_i, e_(i-1) + 1 ms), r_i its request (the completion of i-1):
// own_p99_us is the p99 of completion_i - e_i, caller_lost_ms is
// e_(n-1) - ideal_(n-1). For floor_timer e_i is its schedule.
//
#include "bench.hpp"
#include "textbook.hpp"

#include <ratelimit/token_bucket.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <thread>

namespace bench {
namespace {

namespace asio = boost::asio;

constexpr std::int64_t period_ns = 1'000'000;  // 1000/s

ratelimit::token_bucket paced_bucket(asio::io_context& ioc) {
  return ratelimit::token_bucket(ioc, 1, ratelimit::per_second(1000));
}

/// Completion times of `n` sequential grants, in ns after t0.
std::vector<std::int64_t> paced_rep(int n) {
  std::vector<std::int64_t> t(static_cast<std::size_t>(n));
  const std::string& impl = opt.impl;
  std::int64_t t0 = 0;
  if (impl == "asio_ratelimit_callback") {
    asio::io_context ioc(1);
    auto bucket = paced_bucket(ioc);
    struct handler {
      ratelimit::token_bucket* b;
      std::vector<std::int64_t>* t;
      std::int64_t t0;
      std::size_t i;
      void operator()(boost::system::error_code ec) {
        if (ec) die("async_get_token: " + ec.message());
        (*t)[i] = now_ns() - t0;
        if (++i == t->size()) return;
        ratelimit::token_bucket* bucket = b;
        bucket->async_get_token(std::move(*this));
      }
    };
    t0 = now_ns();
    bucket.async_get_token(handler{&bucket, &t, t0, 0});
    ioc.run();
  } else if (impl == "asio_ratelimit_awaitable") {
    asio::io_context ioc(1);
    auto bucket = paced_bucket(ioc);
    asio::co_spawn(
        ioc,
        [&]() -> asio::awaitable<void> {
          const std::int64_t start = now_ns();
          for (auto& ti : t) {
            co_await bucket.async_get_token(asio::use_awaitable);
            ti = now_ns() - start;
          }
        },
        [](std::exception_ptr e) {
          if (e) std::rethrow_exception(e);
        });
    ioc.run();
  } else if (impl == "asio_ratelimit_blocking") {
    asio::io_context ioc(1);
    auto bucket = paced_bucket(ioc);
    auto guard = asio::make_work_guard(ioc);
    std::thread runner([&] { ioc.run(); });
    t0 = now_ns();
    for (auto& ti : t) {
      bucket.get_token();
      ti = now_ns() - t0;
    }
    guard.reset();
    runner.join();
  } else if (impl == "floor_timer") {
    asio::io_context ioc(1);
    asio::steady_timer timer(ioc);
    struct handler {
      asio::steady_timer* timer;
      std::vector<std::int64_t>* t;
      std::int64_t t0;
      std::size_t i;
      void arm() {
        timer->expires_at(std::chrono::steady_clock::time_point(
            std::chrono::nanoseconds(t0 + static_cast<std::int64_t>(i) * period_ns)));
        asio::steady_timer* tm = timer;
        tm->async_wait(std::move(*this));
      }
      void operator()(boost::system::error_code ec) {
        if (ec) die("timer: " + ec.message());
        (*t)[i] = now_ns() - t0;
        if (++i < t->size()) arm();
      }
    };
    t0 = now_ns();
    handler{&timer, &t, t0, 0}.arm();
    ioc.run();
  } else if (impl == "textbook_thread") {
    // Its thread starts counting periods when the bucket is built: the clock
    // starts then too, or the first token may seem to come early.
    t0 = now_ns();
    textbook_bucket bucket(1000, 1);
    for (auto& ti : t) {
      bucket.acquire();
      ti = now_ns() - t0;
    }
  } else {
    die("unknown impl");
  }
  return t;
}

}  // namespace

void run_paced() {
  const int n = opt.quick ? 200 : 2000;
  paced_rep(100);  // warm-up
  for (int rep = 0, reps = pick(5, 1); rep < reps; ++rep) {
    const std::vector<std::int64_t> t = paced_rep(n);
    std::vector<double> late(t.size());
    for (std::size_t i = 0; i < t.size(); ++i)
      late[i] = static_cast<double>(t[i] - static_cast<std::int64_t>(i) * period_ns) / 1e3;
    if (std::FILE* f = rep + 1 == reps ? open_trace() : nullptr) {
      for (std::size_t i = 0; i < late.size(); ++i)
        std::fprintf(f, "%zu %.1f\n", i, late[i]);
      std::fclose(f);
    }
    // The limiter's own lateness (see the top of the file).
    const bool fixed_schedule = opt.impl == "floor_timer";
    std::vector<double> own(t.size());
    std::int64_t due = 0;
    for (std::size_t i = 0; i < t.size(); ++i) {
      if (fixed_schedule)
        due = static_cast<std::int64_t>(i) * period_ns;
      else if (i > 0)
        due = std::max(t[i - 1], due + period_ns);
      own[i] = static_cast<double>(t[i] - due) / 1e3;
    }
    const double caller_lost_ms =
        static_cast<double>(due - static_cast<std::int64_t>(t.size() - 1) * period_ns) / 1e6;
    std::sort(own.begin(), own.end());
    std::vector<double> sorted = late;
    std::sort(sorted.begin(), sorted.end());
    if (sorted.front() < -200)
      die(format(
          "grant %zu came %.1f us before its time: over-granted",
          static_cast<std::size_t>(std::min_element(late.begin(), late.end()) - late.begin()),
          -sorted.front()));
    emit(rep,
         format("total_s=%.4f late_p50_us=%.1f late_p99_us=%.1f late_max_us=%.1f "
                "own_p99_us=%.1f caller_lost_ms=%.3f",
                static_cast<double>(t.back()) / 1e9, percentile(sorted, 0.50),
                percentile(sorted, 0.99), sorted.back(), percentile(own, 0.99), caller_lost_ms));
  }
}

}  // namespace bench
