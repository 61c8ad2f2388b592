//
// test/soak/soak.cpp: the real bucket under load, its invariants checked as it runs.
//
// One ratelimit::token_bucket (steady_clock) on an io_context run by several
// threads, used at once by:
// - coroutines (thousands) waiting for 0..3 tokens in a loop;
// - callback clients, each on its own strand, whose requests carry a
//   cancellation slot and a random timeout: when the timeout fires first the
//   request is cancelled (terminal cancellation, emitted on the strand);
// - plain threads calling get_token, try_get_token_for (random timeouts) and
//   try_get_token;
// - a thread changing the rate (set_rate) every few tens of milliseconds, and
//   now and then cancelling every queued request (bucket.cancel()).
// It stops by itself after --seconds, closes the bucket, and waits (bounded)
// for everything to finish.
//
// Checked continuously (every 10 ms) and at the end:
// - never more granted than capacity + the integral of the rate over the run
//   (at a rate change, the larger of the two rates counts over the change);
// - progress: while requests wait, grants keep coming (no lost wake-up);
// - every operation completes exactly once (each callback has a call count;
//   each coroutine and thread counts its own), and all of them complete;
// - memory stays flat: the callback clients' waiters are allocated through a
//   counting allocator (live bytes back to 0 at the end, bounded meanwhile),
//   and in builds without sanitizers the resident set size at the end stays
//   within max(16 MiB, 25 %) of its size after the warm-up (a quarter of the run).
//
// Exit status 0 when every invariant held; 1 otherwise, saying which.
//
//   soak [--seconds S] [--io-threads N] [--blocking-threads N] [--coroutines N]
//        [--callbacks N] [--capacity N] [--seed N]
//
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define RATELIMIT_SOAK_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define RATELIMIT_SOAK_SANITIZED 1
#endif
#endif
#ifndef RATELIMIT_SOAK_SANITIZED
#define RATELIMIT_SOAK_SANITIZED 0
#endif

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

struct options {
  double seconds = 30;
  int io_threads = 4;
  int blocking_threads = 3;
  int coroutines = 2000;
  int callbacks = 200;
  std::uint64_t capacity = 500;
  std::uint64_t seed = 1;
};

// --- what went wrong ------------------------------------------------------------

std::atomic<int> failures{0};

void failure(const std::string& what) {
  if (failures++ < 20) std::fprintf(stderr, "soak: FAILED: %s\n", what.c_str());
}

// --- memory -------------------------------------------------------------------

std::atomic<std::int64_t> live_bytes{0};
std::atomic<std::int64_t> peak_live_bytes{0};

/// Counts what the bucket allocates for the callback clients' waiters.
template <typename T>
struct counting_allocator {
  using value_type = T;
  counting_allocator() = default;
  template <typename U>
  counting_allocator(const counting_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    const auto bytes = static_cast<std::int64_t>(n * sizeof(T));
    const std::int64_t now = live_bytes += bytes;
    std::int64_t peak = peak_live_bytes.load();
    while (now > peak && !peak_live_bytes.compare_exchange_weak(peak, now)) {
    }
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    live_bytes -= static_cast<std::int64_t>(n * sizeof(T));
    std::allocator<T>().deallocate(p, n);
  }
  template <typename U>
  bool operator==(const counting_allocator<U>&) const noexcept {
    return true;
  }
};

long rss_kib() {
  std::ifstream in("/proc/self/statm");
  long pages = 0, resident = 0;
  in >> pages >> resident;
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

// --- the bound on grants -------------------------------------------------------

/// Tokens per second over time, as an upper bound: the log of set_rate calls.
class rate_log {
 public:
  rate_log(clock_type::time_point start, double tokens_per_s) {
    segments_.push_back({start, tokens_per_s});
  }

  /// A change is about to be made: from `t` on, the larger of both rates may apply.
  void changing(clock_type::time_point t, double old_rate, double new_rate) {
    std::lock_guard lk(mutex_);
    segments_.push_back({t, std::max(old_rate, new_rate)});
  }

  /// The change is made: from `t` on, the new rate applies.
  void changed(clock_type::time_point t, double new_rate) {
    std::lock_guard lk(mutex_);
    segments_.push_back({t, new_rate});
  }

  /// The most tokens that can have accrued from the start until `now`.
  double accrued(clock_type::time_point now) const {
    std::lock_guard lk(mutex_);
    double total = 0;
    for (std::size_t i = 0; i < segments_.size(); ++i) {
      const auto end = i + 1 < segments_.size() ? std::min(segments_[i + 1].start, now) : now;
      if (end > segments_[i].start)
        total +=
            segments_[i].rate * std::chrono::duration<double>(end - segments_[i].start).count();
    }
    return total;
  }

 private:
  struct segment {
    clock_type::time_point start;
    double rate;
  };
  mutable std::mutex mutex_;
  std::vector<segment> segments_;
};

// --- the load -------------------------------------------------------------------

struct counters {
  std::atomic<std::uint64_t> granted_tokens{0};
  std::atomic<std::uint64_t> started{0};
  std::atomic<std::uint64_t> completed{0};
  std::atomic<std::uint64_t> ok{0};
  std::atomic<std::uint64_t> aborted{0};
  std::atomic<std::uint64_t> closed{0};
  std::atomic<std::uint64_t> timed_out{0};  // blocking calls that returned false

  void account(const boost::system::error_code& ec, std::uint64_t n) {
    ++completed;
    if (!ec) {
      ++ok;
      granted_tokens += n;
    } else if (ec == asio::error::operation_aborted) {
      ++aborted;
    } else if (ec == ratelimit::error::bucket_closed) {
      ++closed;
    } else {
      failure("unexpected error: " + ec.message());
    }
  }
};

class soak {
 public:
  explicit soak(const options& o)
      : opt_(o),
        start_(clock_type::now()),
        rates_(start_, rate_per_s(rates[0])),
        bucket_(ctx_, o.capacity, rates[0]) {}

  int run() {
    const auto deadline = start_ + std::chrono::duration_cast<clock_type::duration>(
                                       std::chrono::duration<double>(opt_.seconds));
    for (int i = 0; i < opt_.coroutines; ++i)
      asio::co_spawn(ctx_, coroutine(i), asio::detached);
    for (int i = 0; i < opt_.callbacks; ++i) {
      clients_.push_back(std::make_unique<client>(*this, i));
      asio::post(clients_.back()->strand, [c = clients_.back().get()] { c->start(); });
    }
    std::vector<std::thread> io;
    for (int i = 0; i < opt_.io_threads; ++i)
      io.emplace_back([this] { ctx_.run(); });
    std::vector<std::thread> blocking;
    for (int i = 0; i < opt_.blocking_threads; ++i)
      blocking.emplace_back([this, i] { blocking_loop(i); });
    std::thread changer([this] { change_rates(); });

    monitor(deadline);

    // Stop: no new work, close the bucket (every queued request completes with
    // bucket_closed, later ones at once), then everything must finish, in bounded time.
    stopping_ = true;
    bucket_.close();
    changer.join();
    for (auto& t : blocking)
      t.join();
    const auto limit = clock_type::now() + 60s;
    while (!all_done() && clock_type::now() < limit)
      std::this_thread::sleep_for(10ms);
    if (!all_done()) {
      failure("operations still pending 60 s after close(): a lost waiter");
      report();
      std::fflush(stderr);
      std::_Exit(1);  // the io threads cannot be joined
    }
    for (auto& t : io)
      t.join();
    final_checks();
    report();
    return failures == 0 ? 0 : 1;
  }

 private:
  static constexpr ratelimit::rate rates[] = {{2000, 1s}, {20000, 1s}, {7, 1ms},
                                              {1, 100us}, {15000, 1s}, {3, 1ms}};

  static double rate_per_s(ratelimit::rate r) {
    return static_cast<double>(r.tokens) / std::chrono::duration<double>(r.period).count();
  }

  bool all_done() const {
    return coroutines_running_ == 0 && clients_running_ == 0 && cb_.started == cb_.completed &&
           co_.started == co_.completed;
  }

  // Coroutines: wait for 0..3 tokens, forever until stopped.
  asio::awaitable<void> coroutine(int id) {
    ++coroutines_running_;
    std::minstd_rand rng(static_cast<unsigned>(opt_.seed * 1'000'003 + id));
    while (!stopping_) {
      const std::uint64_t n = rng() % 4;
      ++co_.started;
      auto [ec] = co_await bucket_.async_get_token(n, asio::as_tuple(asio::use_awaitable));
      co_.account(ec, n);
    }
    --coroutines_running_;
  }

  // Callback clients: one request at a time, each with a cancellation slot
  // and a random timeout, all on the client's strand.
  struct client {
    soak& s;
    asio::strand<asio::io_context::executor_type> strand;
    asio::steady_timer timer;
    asio::cancellation_signal signal;
    std::minstd_rand rng;
    std::uint64_t generation = 0;  // of the request in flight
    std::shared_ptr<std::atomic<int>> calls;

    client(soak& owner, int id)
        : s(owner),
          strand(asio::make_strand(owner.ctx_)),
          timer(strand),
          rng(static_cast<unsigned>(owner.opt_.seed * 7'000'001 + id)) {
      ++s.clients_running_;
    }

    void start() {
      if (s.stopping_) {
        --s.clients_running_;
        return;
      }
      const std::uint64_t n = rng() % 6;
      const std::uint64_t gen = ++generation;
      calls = std::make_shared<std::atomic<int>>(0);
      ++s.cb_.started;
      timer.expires_after(std::chrono::microseconds(rng() % 400'000));
      timer.async_wait([this, gen](boost::system::error_code ec) {
        // The timeout: cancel the request if it is still the one in flight.
        if (!ec && gen == generation) signal.emit(asio::cancellation_type::terminal);
      });
      s.bucket_.async_get_token(
          n, asio::bind_cancellation_slot(
                 signal.slot(), asio::bind_executor(
                                    strand, asio::bind_allocator(
                                                counting_allocator<void>(),
                                                [this, n, c = calls](boost::system::error_code ec) {
                                                  if (++*c != 1)
                                                    failure("a callback was called twice");
                                                  ++generation;  // the timeout no longer applies
                                                  timer.cancel();
                                                  s.cb_.account(ec, n);
                                                  start();
                                                }))));
    }
  };

  // Plain threads: get_token, try_get_token_for, try_get_token.
  void blocking_loop(int id) {
    std::minstd_rand rng(static_cast<unsigned>(opt_.seed * 9'000'011 + id));
    while (!stopping_) {
      const std::uint64_t n = rng() % 3 + 1;
      boost::system::error_code ec;
      switch (rng() % 3) {
        case 0:
          ++th_.started;
          bucket_.get_token(n, ec);
          th_.account(ec, n);
          break;
        case 1: {
          ++th_.started;
          const bool got =
              bucket_.try_get_token_for(std::chrono::microseconds(rng() % 5000), n, ec);
          if (got && ec) failure("try_get_token_for: true with an error");
          if (!got && !ec) {
            ++th_.completed;
            ++th_.timed_out;
          } else {
            th_.account(ec, n);
          }
          break;
        }
        default:
          ++th_.started;
          ++th_.completed;
          if (bucket_.try_get_token(n)) {
            ++th_.ok;
            th_.granted_tokens += n;
          }
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
      }
    }
  }

  // set_rate every 5..50 ms; now and then, bucket.cancel().
  void change_rates() {
    std::minstd_rand rng(static_cast<unsigned>(opt_.seed * 3'000'017));
    std::size_t current = 0;
    while (!stopping_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5 + rng() % 45));
      if (rng() % 40 == 0) {
        bucket_.cancel();
        ++cancel_alls_;
        continue;
      }
      const std::size_t next = rng() % std::size(rates);
      // Logged before and after: a monitor reading in between sees the larger rate.
      rates_.changing(clock_type::now(), rate_per_s(rates[current]), rate_per_s(rates[next]));
      bucket_.set_rate(rates[next]);
      rates_.changed(clock_type::now(), rate_per_s(rates[next]));
      current = next;
      ++rate_changes_;
    }
  }

  std::uint64_t granted() const {
    return co_.granted_tokens + cb_.granted_tokens + th_.granted_tokens;
  }

  void check_bound(const char* when) {
    // Read the grants first: each was made before the time read next, so the
    // tokens accrued until then cover it.
    const std::uint64_t g = granted();
    const double bound = static_cast<double>(opt_.capacity) + rates_.accrued(clock_type::now()) + 1;
    max_ratio_ = std::max(max_ratio_, static_cast<double>(g) / bound);
    if (static_cast<double>(g) > bound)
      failure(std::string("over-grant ") + when + ": " + std::to_string(g) +
              " tokens granted, at most " + std::to_string(bound) + " possible");
  }

  void monitor(clock_type::time_point deadline) {
    const auto warm_at = start_ + (deadline - start_) / 4;
    std::uint64_t last_granted = 0;
    auto last_progress = clock_type::now();
    for (;;) {
      std::this_thread::sleep_for(10ms);
      const auto now = clock_type::now();
      check_bound("during the run");
      max_waiting_ = std::max(max_waiting_, bucket_.waiting());
      const std::uint64_t g = granted();
      if (g != last_granted) {
        last_granted = g;
        last_progress = now;
      } else if (now - last_progress > 5s) {
        failure("no token granted for 5 s while requests wait: a lost wake-up");
        last_progress = now;
      }
      if (warm_rss_ == 0 && now >= warm_at) warm_rss_ = rss_kib();
      if (now >= deadline) break;
    }
    end_rss_ = rss_kib();
    end_live_bytes_ = live_bytes;
    elapsed_ = std::chrono::duration<double>(clock_type::now() - start_).count();
  }

  void final_checks() {
    check_bound("at the end");
    for (const counters* c : {&co_, &cb_, &th_})
      if (c->started != c->completed) failure("started and completed operations differ");
    if (live_bytes != 0)
      failure("waiter memory not freed: " + std::to_string(live_bytes.load()) + " bytes live");
    // One waiter per client at most: a bounded number of live bytes during the run.
    const std::int64_t per_client = opt_.callbacks > 0 ? peak_live_bytes / opt_.callbacks : 0;
    if (per_client > 4096)
      failure("waiter memory grows: " + std::to_string(per_client) + " bytes per client");
    if (!RATELIMIT_SOAK_SANITIZED && warm_rss_ > 0) {
      const long allowed = std::max(16L * 1024, warm_rss_ / 4);
      if (end_rss_ - warm_rss_ > allowed)
        failure("memory grows: RSS " + std::to_string(warm_rss_) + " KiB after warm-up, " +
                std::to_string(end_rss_) + " KiB at the end");
    }
    // Liveness: demand always exceeds supply, so most accrued tokens must go out.
    const double accrued = rates_.accrued(clock_type::now());
    if (static_cast<double>(granted()) < 0.2 * accrued)
      failure("too few grants: " + std::to_string(granted()) + " of " + std::to_string(accrued) +
              " accrued tokens");
  }

  void report() const {
    std::printf(
        "soak: %.1f s, %d io threads, %d coroutines, %d callback clients, %d blocking threads\n"
        "soak: operations: coroutines %" PRIu64 ", callbacks %" PRIu64 ", blocking %" PRIu64
        " (all completed exactly once: %s)\n"
        "soak: results: ok %" PRIu64 ", aborted %" PRIu64 ", closed %" PRIu64 ", timed out %" PRIu64
        "\n"
        "soak: tokens granted %" PRIu64
        " of at most %.0f (highest ratio seen %.4f); "
        "%d rate changes, %d cancel-alls, max queued %zu\n"
        "soak: RSS %ld KiB after warm-up, %ld KiB at the end%s; waiter bytes live: %" PRId64
        " at the end of the load, %" PRId64 " after shutdown, peak %" PRId64
        "\n"
        "soak: %s\n",
        elapsed_, opt_.io_threads, opt_.coroutines, opt_.callbacks, opt_.blocking_threads,
        co_.completed.load(), cb_.completed.load(), th_.completed.load(),
        co_.started == co_.completed && cb_.started == cb_.completed && th_.started == th_.completed
            ? "yes"
            : "NO",
        co_.ok + cb_.ok + th_.ok, co_.aborted + cb_.aborted + th_.aborted,
        co_.closed + cb_.closed + th_.closed, th_.timed_out.load(), granted(),
        static_cast<double>(opt_.capacity) + rates_.accrued(clock_type::now()), max_ratio_,
        rate_changes_.load(), cancel_alls_.load(), max_waiting_, warm_rss_, end_rss_,
        RATELIMIT_SOAK_SANITIZED ? " (sanitizer build: not enforced)" : "", end_live_bytes_,
        live_bytes.load(), peak_live_bytes.load(), failures == 0 ? "PASSED" : "FAILED");
  }

  options opt_;
  clock_type::time_point start_;
  rate_log rates_;
  asio::io_context ctx_;
  ratelimit::token_bucket bucket_;
  std::vector<std::unique_ptr<client>> clients_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> coroutines_running_{0};
  std::atomic<int> clients_running_{0};
  counters co_, cb_, th_;
  std::atomic<int> rate_changes_{0};
  std::atomic<int> cancel_alls_{0};
  std::size_t max_waiting_ = 0;
  double max_ratio_ = 0;
  long warm_rss_ = 0;
  long end_rss_ = 0;
  std::int64_t end_live_bytes_ = 0;
  double elapsed_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    auto num = [&] {
      if (!v) {
        std::fprintf(stderr, "soak: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      ++i;
      return std::strtod(v, nullptr);
    };
    if (a == "--seconds")
      o.seconds = num();
    else if (a == "--io-threads")
      o.io_threads = static_cast<int>(num());
    else if (a == "--blocking-threads")
      o.blocking_threads = static_cast<int>(num());
    else if (a == "--coroutines")
      o.coroutines = static_cast<int>(num());
    else if (a == "--callbacks")
      o.callbacks = static_cast<int>(num());
    else if (a == "--capacity")
      o.capacity = static_cast<std::uint64_t>(num());
    else if (a == "--seed")
      o.seed = static_cast<std::uint64_t>(num());
    else {
      std::fprintf(stderr,
                   "usage: soak [--seconds S] [--io-threads N] [--blocking-threads N] "
                   "[--coroutines N] [--callbacks N] [--capacity N] [--seed N]\n");
      return 2;
    }
  }
  if (o.seconds <= 0 || o.io_threads < 1 || o.capacity < 4) {
    std::fprintf(stderr, "soak: invalid options\n");
    return 2;
  }
  soak s(o);
  return s.run();
}
