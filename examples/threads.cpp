// The classic problem, solved: worker threads share a bucket of N tokens
// refilled at one per second. Plain std::threads call the blocking get_token();
// one more thread runs the event loop that fires the bucket's timer. The first
// N workers go at once (the burst), then one more each second.
//
//   threads [WORKERS [CAPACITY [INTERVAL_MS]]]   (or --workers N --capacity N --interval-ms N)
#include <ratelimit.hpp>

#include "cli.hpp"

#include <boost/asio.hpp>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono;

int main(int argc, char* argv[]) {
  int workers = 6, capacity = 3, interval_ms = 1000;
  cli::parser cli("threads", "Worker threads share a bucket through the blocking get_token().",
                  "[WORKERS [CAPACITY [INTERVAL_MS]]]");
  cli.option("workers", workers, 1, 1000, "worker threads, each taking one token")
      .option("capacity", capacity, 1, 1000000, "tokens the bucket holds (the burst)")
      .option("interval-ms", interval_ms, 1, 86400000, "milliseconds between two new tokens")
      .operand("workers", "WORKERS")
      .operand("capacity", "CAPACITY")
      .operand("interval-ms", "INTERVAL_MS");
  if (int rc = cli.parse(argc, argv); rc >= 0) return rc;

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
      bucket.get_token();       // blocks this thread until its token is granted
      std::lock_guard lk(out);  // (the time read under the lock: lines come out in time order)
      const auto ms = duration_cast<milliseconds>(steady_clock::now() - t0).count();
      std::printf("%6lld ms  worker %d got its token\n", static_cast<long long>(ms), id);
      std::fflush(stdout);
    });
  }
  for (auto& t : threads)
    t.join();

  work.reset();
  loop.join();
}
