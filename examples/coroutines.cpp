// A bucket in C++20 coroutines: several coroutines sharing it, a request for
// several tokens at once, a wait with a deadline (awaitable operators), and
// try_get_token() to shed load instead of queueing it; and what the bucket
// counted meanwhile (metrics()).
#include <ratelimit.hpp>

#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>

#include <chrono>
#include <cstdio>
#include <string>

namespace asio = boost::asio;
using namespace asio::experimental::awaitable_operators;
using namespace std::chrono;

namespace {

steady_clock::time_point t0;

/// Prints a line stamped with the time since the start, rounded to 10 ms.
void say(const std::string& what) {
  const auto ms = duration_cast<milliseconds>(steady_clock::now() - t0).count();
  std::printf("%5lld ms  %s\n", static_cast<long long>((ms + 5) / 10 * 10), what.c_str());
  std::fflush(stdout);
}

// 1. Several coroutines share one bucket: FIFO, burst first.
asio::awaitable<void> sender(ratelimit::token_bucket& bucket, int id) {
  for (int i = 1; i <= 2; ++i) {
    co_await bucket.async_get_token(asio::use_awaitable);
    say("sender " + std::to_string(id) + " sends message " + std::to_string(i));
  }
}

// 2. A request for several tokens at once: a batch of 4 costs 4 tokens.
asio::awaitable<void> batch(ratelimit::token_bucket& bucket) {
  co_await bucket.async_get_token(4, asio::use_awaitable);
  say("batch of 4 sent");
}

// 3. A wait with a deadline: whichever finishes first cancels the other, and a
//    cancelled request takes no token.
asio::awaitable<bool> send_within(ratelimit::token_bucket& bucket, milliseconds deadline) {
  asio::steady_timer timer(co_await asio::this_coro::executor, deadline);
  auto result = co_await (bucket.async_get_token(asio::use_awaitable) ||
                          timer.async_wait(asio::use_awaitable));
  co_return result.index() == 0;
}

asio::awaitable<void> demo(asio::io_context& ctx) {
  ratelimit::token_bucket bucket(ctx, 4, ratelimit::per_second(10));  // burst 4, 10/s
  t0 = steady_clock::now();

  say("1. three senders, two messages each (burst 4, then 10/s)");
  {
    auto ex = co_await asio::this_coro::executor;
    auto one = asio::co_spawn(ex, sender(bucket, 1), asio::use_awaitable);
    auto two = asio::co_spawn(ex, sender(bucket, 2), asio::use_awaitable);
    auto three = asio::co_spawn(ex, sender(bucket, 3), asio::use_awaitable);
    co_await (std::move(one) && std::move(two) && std::move(three));
  }

  say("2. a batch needs 4 tokens: it waits until 4 have accrued");
  co_await batch(bucket);

  say("3. waits with a deadline");
  bool sent = co_await send_within(bucket, milliseconds(50));
  say(sent ? "   within 50 ms: sent" : "   within 50 ms: timed out (no token taken)");
  sent = co_await send_within(bucket, milliseconds(500));
  say(sent ? "   within 500 ms: sent" : "   within 500 ms: timed out (no token taken)");

  say("4. load shedding: 10 requests arrive at once, try_get_token() serves what it can");
  asio::steady_timer pause(ctx, milliseconds(400));  // let the bucket fill up again
  co_await pause.async_wait(asio::use_awaitable);
  int served = 0, shed = 0;
  for (int i = 0; i < 10; ++i)
    (bucket.try_get_token() ? served : shed)++;
  say("   served " + std::to_string(served) + ", shed " + std::to_string(shed));

  say("5. what the bucket counted (metrics(): a snapshot for dashboards and alerts)");
  const ratelimit::limiter_metrics m = bucket.metrics();
  say("   " + std::to_string(m.requests) + " requests: " + std::to_string(m.grants) + " granted (" +
      std::to_string(m.wait_counts[0]) + " at once), " + std::to_string(m.refusals) + " refused, " +
      std::to_string(m.cancellations) + " cancelled; " + std::to_string(m.tokens_granted) +
      " tokens");
}

}  // namespace

int main() {
  asio::io_context ctx;
  asio::co_spawn(ctx, demo(ctx), [](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
  });
  ctx.run();
}
