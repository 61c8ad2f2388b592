// Correctness under concurrency: 4 processes x 50 coroutines share one key.
// From the key's creation, the total granted must be at most
// capacity + rate * elapsed (leasing adds nothing to a window that starts
// when the key is created: every lease came from Redis). While every
// coroutine keeps asking (the `duration` window), at least 95% of that bound
// must be granted; after it, the queues drain and demand falls, so the lower
// bound is checked on the window only. In reservation mode grants are
// counted when the worker's coroutine gets them, which is never before their
// due time on the server (the same real time: clocks of one machine), so the
// bound on due times bounds them. Reservation mode also promises fairness
// (each of 4 equally busy processes gets 25% +- 5%) and that a process that
// cancels its reservations leaves their tokens to the others.
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
  unsigned long long refunded = 0;
  long errors = 0;
  long cancelled = 0;
  long in_tail = 0;  // granted in the last two thirds of the window
};

struct run_config {
  std::uint64_t lease = 0;
  std::string mode = "head";  // or "reserve"
  // Per process: "take", or "cancel" (each request cancelled after 20 ms).
  std::vector<std::string> behaviours = {"take", "take", "take", "take"};
  int duration_ms = 2000;
  bool window_lower_bound = true;  // check that 95% of the window's bound was granted
  std::size_t max_batch = 256;     // reservation mode: requests per call
};

struct run_result {
  std::vector<worker_result> workers;
  double window_bound = 0;
};

run_result run_processes(const run_config& rc) {
  const std::uint64_t lease = rc.lease;
  redis_server server;
  const int processes = static_cast<int>(rc.behaviours.size());
  constexpr int coroutines = 50;
  constexpr std::uint64_t capacity = 20, rate = 200;
  const int duration_ms = rc.duration_ms;
  const std::string key =
      "procs:" + std::to_string(lease) + ":" + rc.mode + ":" + std::to_string(rc.max_batch);
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
               std::to_string(start.time_since_epoch().count()), std::to_string(lease), rc.mode,
               rc.behaviours[p], std::to_string(rc.max_batch)},
              false));
  }
  run_result out;
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
    BOOST_REQUIRE_MESSAGE(std::sscanf(line.c_str(),
                                      "granted=%ld in_window=%ld last_us=%lld round_trips=%llu "
                                      "refunded=%llu errors=%ld cancelled=%ld in_tail=%ld",
                                      &r.granted, &r.in_window, &r.last_us, &r.round_trips,
                                      &r.refunded, &r.errors, &r.cancelled, &r.in_tail) == 8,
                          "worker " << p << " printed '" << line << "'");
    BOOST_TEST_MESSAGE("worker " << p << " (" << rc.mode << ", " << rc.behaviours[p]
                                 << "): " << line);
    if (rc.behaviours[p] == "take") BOOST_TEST(r.granted > 0);
    out.workers.push_back(r);
    total += r.granted;
    total_in_window += r.in_window;
    last_us = std::max(last_us, r.last_us);
  }
  const double elapsed =
      static_cast<double>(last_us - duration_cast<microseconds>(start.time_since_epoch()).count()) /
      1e6;
  const double bound = static_cast<double>(capacity) + static_cast<double>(rate) * elapsed;
  BOOST_TEST_MESSAGE(rc.mode << ", lease " << lease << ": granted " << total << " in " << elapsed
                             << " s; bound " << bound);
  BOOST_TEST(elapsed > 1.5);
  BOOST_TEST(total <= bound);
  const double window_bound =
      static_cast<double>(capacity) + static_cast<double>(rate) * duration_ms / 1000.0;
  BOOST_TEST_MESSAGE("in the " << duration_ms << " ms window: " << total_in_window << " of "
                               << window_bound);
  BOOST_TEST(total_in_window <= window_bound);
  if (rc.window_lower_bound) BOOST_TEST(total_in_window >= 0.95 * window_bound);
  out.window_bound = window_bound;
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(redis_processes)

BOOST_AUTO_TEST_CASE(four_processes_share_one_limit) {
  run_processes({});
}

BOOST_AUTO_TEST_CASE(four_processes_share_one_limit_with_leases) {
  run_processes({.lease = 4});
}

// Reservations: exact (checked in run_processes) and fair: one line for all,
// in order of arrival at Redis.
BOOST_AUTO_TEST_CASE(four_processes_share_one_limit_fairly_with_reservations) {
  const auto r = run_processes({.mode = "reserve"});
  long total = 0;
  for (const auto& w : r.workers)
    total += w.in_window;
  for (const auto& w : r.workers) {
    const double share = static_cast<double>(w.in_window) / static_cast<double>(total);
    BOOST_TEST_MESSAGE("share " << share);
    BOOST_TEST(share >= 0.20);
    BOOST_TEST(share <= 0.30);
    BOOST_TEST(w.errors == 0);
    // One round trip per grant at most (calls carry many requests).
    BOOST_TEST(w.round_trips <= static_cast<unsigned long long>(w.granted) + 60);
  }
}

// Reservations one per call (no coalescing): exact too (checked in run_processes).
BOOST_AUTO_TEST_CASE(four_processes_share_one_limit_with_one_reservation_per_call) {
  const auto r = run_processes({.mode = "reserve", .max_batch = 1});
  for (const auto& w : r.workers)
    BOOST_TEST(w.round_trips >= static_cast<unsigned long long>(w.granted));  // one call each
}

// A process that cancels every reservation within 20 ms (each is due about
// a second later: 150 coroutines are in line ahead) and asks again at once
// gives them back: the other three get the whole rate. (Its 50 reservations
// in line at any time delay the others once, by 50 tokens' time, not in
// rate: so the rate is measured after the first third of a 3 s window.)
// Without refunds its 2500 reservations a second would take every token.
// run_processes checks the total and its bound.
BOOST_AUTO_TEST_CASE(a_process_that_cancels_its_reservations_leaves_them_to_the_others) {
  const auto r = run_processes({.mode = "reserve",
                                .behaviours = {"take", "take", "take", "cancel"},
                                .duration_ms = 3000,
                                .window_lower_bound = false});
  const auto& c = r.workers[3];
  BOOST_TEST(c.cancelled > 1000);
  BOOST_TEST(c.refunded > 1000u);
  long others = 0;
  for (int i = 0; i < 3; ++i)
    others += r.workers[i].in_tail;
  const double tail_bound = 200.0 * 2;  // the rate over the last 2 s (the bucket is in debt)
  BOOST_TEST_MESSAGE("the others got " << others << " in the last 2 s, of " << tail_bound
                                       << "; the canceller " << c.in_tail << ", refunded "
                                       << c.refunded);
  BOOST_TEST(others + c.in_tail >= 0.95 * tail_bound);
  BOOST_TEST(others >= 0.90 * tail_bound);
}

// Reconfiguration while traffic flows (reservation mode): process A, made
// with 200 tokens/s at generation 0, takes tokens alone for 2 s; then
// process B, made with 1000 tokens/s at generation 1 (a rolling deploy),
// joins for 2 s. B's first request migrates the key to its configuration
// and A follows it from its next reply: the granted count follows the old
// rate, then the new (each bound exact by due time: capacity + rate * T;
// after the change, plus the old rate over the receipt's lateness), and
// A reports the generation and rate it now runs with.
BOOST_AUTO_TEST_CASE(two_processes_on_different_generations_follow_the_old_rate_then_the_new) {
  redis_server server;
  constexpr int coroutines = 50;
  constexpr std::uint64_t capacity = 20, old_rate = 200, new_rate = 1000;
  constexpr int half_ms = 2000;
  const std::string key = "procs:generations";
  const auto start = time_point_cast<milliseconds>(system_clock::now()) + milliseconds(1500);
  const auto split = start + milliseconds(half_ms);
  struct proc {
    std::uint64_t rate;
    std::uint64_t generation;
    system_clock::time_point from;
    int duration_ms;
  };
  const proc procs[] = {{old_rate, 0, start, 2 * half_ms}, {new_rate, 1, split, half_ms}};
  std::vector<pid_t> pids;
  std::vector<std::string> outs;
  for (const proc& p : procs) {
    outs.push_back((std::filesystem::temp_directory_path() /
                    ("ratelimit-redis-worker-" + std::to_string(::getpid()) + "-gen" +
                     std::to_string(p.generation)))
                       .string());
    pids.push_back(
        spawn({"/bin/sh", "-c", std::string("exec \"$0\" \"$@\" > ") + outs.back(),
               RATELIMIT_REDIS_WORKER, std::to_string(server.port()), key, std::to_string(capacity),
               std::to_string(p.rate), std::to_string(coroutines), std::to_string(p.duration_ms),
               std::to_string(time_point_cast<milliseconds>(p.from).time_since_epoch().count()),
               "0", "reserve", "take", "256", std::to_string(p.generation),
               std::to_string(split.time_since_epoch().count())},
              false));
  }
  struct seen {
    long granted = 0, before = 0, after = 0;
    unsigned long long generation = 0, reconfigurations = 0;
    double rate = 0;
  };
  std::vector<seen> got;
  for (std::size_t i = 0; i < pids.size(); ++i) {
    int status = 0;
    BOOST_REQUIRE(::waitpid(pids[i], &status, 0) == pids[i]);
    BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 0), "worker " << i << " failed");
    std::ifstream in(outs[i]);
    std::string line;
    std::getline(in, line);
    std::filesystem::remove(outs[i]);
    BOOST_TEST_MESSAGE("worker " << i << ": " << line);
    seen s;
    const auto at = line.find("before=");
    BOOST_REQUIRE(at != std::string::npos);
    BOOST_REQUIRE(std::sscanf(line.c_str() + at,
                              "before=%ld after=%ld generation=%llu reconfigurations=%llu "
                              "rate_per_s=%lf",
                              &s.before, &s.after, &s.generation, &s.reconfigurations,
                              &s.rate) == 5);
    got.push_back(s);
  }
  const long before = got[0].before + got[1].before;
  const long after = got[0].after + got[1].after;
  const double before_bound = capacity + old_rate * half_ms / 1000.0;
  // After the change: the new rate. Until B's first request reaches Redis
  // (at t_change), grants come due at the old rate; A's reservations made
  // before it keep their due times, and the debt they leave is repaid at the
  // new rate, so the grants due after the split number at most old_rate *
  // (t_change - split) + new_rate * (end - t_change) <= new_rate * half
  // (plus the capacity, were the key not saturated). Grants are counted when
  // received, never before they are due: those due just before the split
  // but received after it add the old rate over that lateness (250 ms here,
  // generous under the sanitizers).
  const double after_bound = capacity + new_rate * half_ms / 1000.0 + old_rate * 0.25;
  BOOST_TEST_MESSAGE("before the change " << before << " of " << before_bound << "; after " << after
                                          << " of " << new_rate * half_ms / 1000.0 << " (at most "
                                          << after_bound << ")");
  BOOST_TEST(got[1].before == 0);
  BOOST_TEST(before <= before_bound);
  BOOST_TEST(before >= 0.95 * before_bound);
  BOOST_TEST(after <= after_bound);
  BOOST_TEST(after >= 0.90 * (new_rate * half_ms / 1000.0));
  // A follows B's configuration and says so; B never changed.
  BOOST_TEST(got[0].generation == 1u);
  BOOST_TEST(got[0].reconfigurations == 1u);
  BOOST_TEST(got[0].rate == static_cast<double>(new_rate));
  BOOST_TEST(got[1].generation == 1u);
  BOOST_TEST(got[1].reconfigurations == 0u);
  // Both took part after the change (one line for both, in order of arrival).
  BOOST_TEST(got[0].after > 100);
  BOOST_TEST(got[1].after > 100);
}

BOOST_AUTO_TEST_SUITE_END()
