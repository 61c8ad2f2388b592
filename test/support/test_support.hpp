//
// test/support/test_support.hpp: what every test area shares.
//
// - test_bucket: the bucket on the manual clock.
// - outcome / checked(): a handler that records its completion and catches the
//   two handler bugs a test cannot see otherwise: called twice, and destroyed
//   without ever being called.
// - settle(): runs the io_context until a condition holds (bounded in real time).
//
#ifndef RATELIMIT_TEST_SUPPORT_HPP
#define RATELIMIT_TEST_SUPPORT_HPP

#include "manual_clock.hpp"

#include <ratelimit/token_bucket.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

namespace ratelimit::test {

using test_bucket = basic_token_bucket<manual_clock, manual_wait_traits>;

using namespace std::chrono_literals;

/// What happened to one request. `calls` is counted last, so a thread that
/// sees done() may read the rest while the handler runs on another.
struct outcome {
  std::atomic<int> calls{0};
  bool destroyed_uncalled = false;
  boost::system::error_code ec;
  int order = -1;          // global completion sequence number
  std::thread::id thread;  // where the handler ran
  bool done() const { return calls > 0; }
  bool ok() const { return calls == 1 && !ec; }
};

inline std::atomic<int>& completion_sequence() {
  static std::atomic<int> n{0};
  return n;
}

/// A move-only handler recording into an outcome.
class checked_handler {
 public:
  explicit checked_handler(std::shared_ptr<outcome> o) : o_(std::move(o)) {}
  checked_handler(checked_handler&& other) noexcept
      : o_(std::move(other.o_)), invoked_(other.invoked_) {}
  checked_handler& operator=(checked_handler&&) = delete;
  ~checked_handler() {
    if (o_ && !invoked_) o_->destroyed_uncalled = true;
  }

  void operator()(boost::system::error_code ec) {
    invoked_ = true;
    o_->ec = ec;
    o_->order = completion_sequence()++;
    o_->thread = std::this_thread::get_id();
    ++o_->calls;
  }

 private:
  std::shared_ptr<outcome> o_;
  bool invoked_ = false;
};

/// Starts `bucket.async_get_token(n)` with a checked handler; returns its outcome.
template <typename Bucket>
std::shared_ptr<outcome> request(Bucket& bucket, std::uint64_t n = 1) {
  auto o = std::make_shared<outcome>();
  bucket.async_get_token(n, checked_handler(o));
  return o;
}

/// Starts `start(asio::use_awaitable)` (an initiating call) in a coroutine on
/// `where` (an execution context or an executor); the outcome records how the
/// awaited operation ended, once the coroutine has run that far.
template <typename Where, typename Start>
std::shared_ptr<outcome> co_request(Where& where, Start start) {
  auto o = std::make_shared<outcome>();
  boost::asio::co_spawn(
      where,
      [o, start]() -> boost::asio::awaitable<void> {
        boost::system::error_code ec;
        try {
          co_await start(boost::asio::use_awaitable);
        } catch (const boost::system::system_error& e) {
          ec = e.code();
        }
        checked_handler h(o);
        h(ec);
      },
      boost::asio::detached);
  return o;
}

/// Polls `ctx` until `pred()` holds or `limit` of real time passes; returns pred().
template <typename Pred>
bool settle(boost::asio::io_context& ctx, Pred pred,
            std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    ctx.restart();
    ctx.poll();
    if (pred()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

/// Runs `ctx` for `real` time: long enough for a due timer (re-checked every
/// manual_wait_traits::poll) to fire, so anything that should *not* happen yet
/// would have had its chance.
inline void pump(boost::asio::io_context& ctx,
                 std::chrono::milliseconds real = std::chrono::milliseconds(5)) {
  const auto end = std::chrono::steady_clock::now() + real;
  while (std::chrono::steady_clock::now() < end) {
    ctx.restart();
    ctx.poll();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

/// Waits (in real time, bounded) until `pred` holds, for tests whose other
/// side runs on threads; returns pred().
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(30)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

/// Runs `ctx` (restarted) until it has no work left, as run() does; false if
/// that takes longer than `limit` (then it is stopped: something was left
/// holding work, e.g. a handler that was never completed).
inline bool runs_dry(boost::asio::io_context& ctx,
                     std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  ctx.restart();
  std::atomic<bool> returned{false};
  std::thread runner([&] {
    ctx.run();
    returned = true;
  });
  const bool ok = eventually([&] { return returned.load(); }, limit);
  if (!ok) ctx.stop();
  runner.join();
  return ok;
}

/// An io_context run by `threads` background threads for the duration of a test.
struct running_context {
  boost::asio::io_context ctx;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard{
      ctx.get_executor()};
  std::vector<std::thread> runners;

  explicit running_context(int threads = 1) {
    for (int i = 0; i < threads; ++i)
      runners.emplace_back([this] { ctx.run(); });
  }
  running_context(const running_context&) = delete;
  running_context& operator=(const running_context&) = delete;
  ~running_context() {
    guard.reset();
    ctx.stop();
    for (auto& t : runners)
      t.join();
  }
};

/// Resets the manual clock for each test case.
struct clock_fixture {
  clock_fixture() { manual_clock::reset(); }
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_SUPPORT_HPP
