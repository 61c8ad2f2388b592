// Correctness under concurrency: 4 processes x 50 coroutines share one key.
// From the key's creation, the total granted must be at most
// capacity + rate * elapsed (leasing adds nothing to a window that starts
// when the key is created: every lease came from Redis). While every
// coroutine keeps asking (the `duration` window), at least 95% of that bound
// must be granted; after it, the queues drain and demand falls, so the lower
// bound is checked on the window only.
#include "redis_server.hpp"

#include <boost/test/unit_test.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono;

namespace {

struct worker_result {
  long granted = 0;
  long in_window = 0;
  long long last_us = 0;
  unsigned long long round_trips = 0;
};

void run_processes(std::uint64_t lease) {
  redis_server server;
  constexpr int processes = 4, coroutines = 50;
  constexpr std::uint64_t capacity = 20, rate = 200;
  constexpr int duration_ms = 2000;
  const std::string key = "procs:" + std::to_string(lease);
  // Every process starts at the same instant, once all are surely up.
  const auto start = time_point_cast<milliseconds>(system_clock::now()) + milliseconds(1500);
  std::vector<pid_t> pids;
  std::vector<std::string> outs;
  for (int p = 0; p < processes; ++p) {
    outs.push_back(
        (std::filesystem::temp_directory_path() /
         ("ratelimit-redis-worker-" + std::to_string(::getpid()) + "-" + std::to_string(p)))
            .string());
    // Through the shell only to redirect stdout to a file.
    pids.push_back(
        spawn({"/bin/sh", "-c", std::string("exec \"$0\" \"$@\" > ") + outs.back(),
               RATELIMIT_REDIS_WORKER, std::to_string(server.port()), key, std::to_string(capacity),
               std::to_string(rate), std::to_string(coroutines), std::to_string(duration_ms),
               std::to_string(start.time_since_epoch().count()), std::to_string(lease)},
              false));
  }
  long total = 0, total_in_window = 0;
  long long last_us = 0;
  for (int p = 0; p < processes; ++p) {
    int status = 0;
    BOOST_REQUIRE(::waitpid(pids[p], &status, 0) == pids[p]);
    BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 0), "worker " << p << " failed");
    std::ifstream in(outs[p]);
    std::string line;
    std::getline(in, line);
    std::filesystem::remove(outs[p]);
    worker_result r;
    BOOST_REQUIRE_MESSAGE(
        std::sscanf(line.c_str(), "granted=%ld in_window=%ld last_us=%lld round_trips=%llu",
                    &r.granted, &r.in_window, &r.last_us, &r.round_trips) == 4,
        "worker " << p << " printed '" << line << "'");
    BOOST_TEST_MESSAGE("worker " << p << ": " << line);
    BOOST_TEST(r.granted > 0);
    total += r.granted;
    total_in_window += r.in_window;
    last_us = std::max(last_us, r.last_us);
  }
  const double elapsed =
      static_cast<double>(last_us - duration_cast<microseconds>(start.time_since_epoch()).count()) /
      1e6;
  const double bound = static_cast<double>(capacity) + static_cast<double>(rate) * elapsed;
  BOOST_TEST_MESSAGE("lease " << lease << ": granted " << total << " in " << elapsed << " s; bound "
                              << bound);
  BOOST_TEST(elapsed > 1.5);
  BOOST_TEST(total <= bound);
  const double window_bound =
      static_cast<double>(capacity) + static_cast<double>(rate) * duration_ms / 1000.0;
  BOOST_TEST_MESSAGE("in the " << duration_ms << " ms window: " << total_in_window << " of "
                               << window_bound);
  BOOST_TEST(total_in_window <= window_bound);
  BOOST_TEST(total_in_window >= 0.95 * window_bound);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_processes)

BOOST_AUTO_TEST_CASE(four_processes_share_one_limit) {
  run_processes(0);
}

BOOST_AUTO_TEST_CASE(four_processes_share_one_limit_with_leases) {
  run_processes(4);
}

BOOST_AUTO_TEST_SUITE_END()
