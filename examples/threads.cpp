// The classic problem, solved: worker threads share a bucket of N tokens
// refilled at one per second. Plain std::threads call the blocking get_token();
// one more thread runs the event loop that fires the bucket's timer. The first
// N workers go at once (the burst), then one more each second.
//
//   threads [workers=6] [capacity=3] [interval_ms=1000]
#include <ratelimit.hpp>

#include <boost/asio.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono;

int main(int argc, char* argv[]) {
  const int workers = argc > 1 ? std::atoi(argv[1]) : 6;
  const int capacity = argc > 2 ? std::atoi(argv[2]) : 3;
  const int interval_ms = argc > 3 ? std::atoi(argv[3]) : 1000;
  if (workers < 1 || capacity < 1 || interval_ms < 1) {
    std::fprintf(stderr, "usage: threads [workers>=1] [capacity>=1] [interval_ms>=1]\n");
    return 2;
  }

  asio::io_context ctx;
  auto work = asio::make_work_guard(ctx);  // keep run() going while nobody waits
  std::thread loop([&] { ctx.run(); });    // the bucket's timer fires here

  // `capacity` tokens at once, then one token every `interval_ms`.
  ratelimit::token_bucket bucket(ctx, capacity, ratelimit::rate{1, milliseconds(interval_ms)});
  std::printf("bucket: %d tokens, one more every %d ms; %d worker threads\n", capacity, interval_ms,
              workers);

  const auto t0 = steady_clock::now();
  std::mutex out;
  std::vector<std::thread> threads;
  for (int id = 1; id <= workers; ++id) {
    threads.emplace_back([&, id] {
      bucket.get_token();  // blocks this thread until its token is granted
      const auto ms = duration_cast<milliseconds>(steady_clock::now() - t0).count();
      std::lock_guard lk(out);
      std::printf("%6lld ms  worker %d got its token\n", static_cast<long long>(ms), id);
      std::fflush(stdout);
    });
  }
  for (auto& t : threads)
    t.join();

  work.reset();
  loop.join();
}
