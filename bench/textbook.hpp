//
// bench/textbook.hpp: the rate limiter from the textbook, the baseline.
//
// A thread per bucket sleeps one token period, adds a token under a mutex and
// notifies a condition variable; acquire() blocks on the condition variable
// until a token is there. Every period costs a wake-up whether anyone waits or
// not, and each sleep overshoots, so the rate falls behind and never catches up.
//
#ifndef RATELIMIT_BENCH_TEXTBOOK_HPP
#define RATELIMIT_BENCH_TEXTBOOK_HPP

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace bench {

class textbook_bucket {
 public:
  /// `per_second` tokens a second, at most `capacity`, starting full.
  textbook_bucket(double per_second, std::uint64_t capacity)
      : period_(static_cast<std::int64_t>(1e9 / per_second)),
        capacity_(capacity),
        tokens_(capacity),
        thread_([this] { refill_loop(); }) {}

  textbook_bucket(const textbook_bucket&) = delete;
  textbook_bucket& operator=(const textbook_bucket&) = delete;

  ~textbook_bucket() {
    {
      std::lock_guard lk(mutex_);
      stop_ = true;
    }
    stop_cv_.notify_one();
    thread_.join();
  }

  void acquire() {
    std::unique_lock lk(mutex_);
    cv_.wait(lk, [this] { return tokens_ > 0; });
    --tokens_;
  }

 private:
  void refill_loop() {
    std::unique_lock lk(mutex_);
    while (!stop_) {
      // "sleep one period" (a timed wait, so that the destructor need not wait it out)
      if (stop_cv_.wait_for(lk, period_, [this] { return stop_; })) break;
      if (tokens_ < capacity_) {
        ++tokens_;
        cv_.notify_one();
      }
    }
  }

  const std::chrono::nanoseconds period_;
  const std::uint64_t capacity_;
  std::mutex mutex_;
  std::condition_variable cv_;       // a token was added
  std::condition_variable stop_cv_;  // the destructor wants the thread back
  std::uint64_t tokens_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once everything above is constructed
};

}  // namespace bench

#endif  // RATELIMIT_BENCH_TEXTBOOK_HPP
