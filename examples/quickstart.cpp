// The README's first example: three coroutines share a bucket of 2 tokens
// refilled at 4 per second. Two start at once; the rest follow at 250 ms steps.
#include <ratelimit.hpp>

#include <boost/asio.hpp>

#include <chrono>
#include <iostream>

namespace asio = boost::asio;
using namespace std::chrono;

asio::awaitable<void> worker(ratelimit::token_bucket& bucket, int id, steady_clock::time_point t0) {
  for (int i = 0; i < 2; ++i) {
    co_await bucket.async_get_token(asio::use_awaitable);  // waits for a token
    auto ms = duration_cast<milliseconds>(steady_clock::now() - t0).count();
    std::cout << "worker " << id << " got a token at " << (ms + 125) / 250 * 250 << " ms\n";
  }
}

int main() {
  asio::io_context ctx;
  ratelimit::token_bucket bucket(ctx, 2, ratelimit::per_second(4));  // burst 2, 4/s
  const auto t0 = steady_clock::now();
  for (int id = 1; id <= 3; ++id) asio::co_spawn(ctx, worker(bucket, id, t0), asio::detached);
  ctx.run();
}
