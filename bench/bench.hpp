//
// bench/bench.hpp: what every workload of bench_ratelimit shares.
//
// Output follows ../shared/BENCHMARKS.md: one line per measured repetition on
// stdout, `impl=<impl> workload=<W> rep=<i> <metric>=<value> ...`; diagnostics
// on stderr. A result that is wrong (a try that fails on a huge-rate bucket, an
// acquire that waits where none should, a limiter that over-grants) aborts.
//
#ifndef RATELIMIT_BENCH_BENCH_HPP
#define RATELIMIT_BENCH_BENCH_HPP

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace bench {

struct options {
  std::string impl;
  std::string workload;
  bool quick = false;
  int reps = -1;          // measured repetitions; -1: the workload's default
  long waiters = -1;      // W5, W7b: waiter count (and rate per second); -1: default
  bool child = false;     // W5, W7b: one repetition in this process
  long rate = -1;         // W5, W7b child: the rate per second
  std::string self;       // this program, for W5's and W7b's re-exec
  std::string trace_dir;  // $BENCH_TRACE_DIR: per-grant traces for the plots
};

extern options opt;

[[noreturn]] void die(const std::string& msg);
void warn(const std::string& msg);
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/// Prints one result line: `impl=... workload=... rep=i <metrics>`.
void emit(int rep, const std::string& metrics);

/// --reps if given, else `full` or (with --quick) `quick`.
int pick(int full, int quick);

inline std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

/// Nearest-rank percentile of a sorted vector (p in (0, 1]).
double percentile(const std::vector<double>& sorted, double p);

/// Peak resident set size of this process in kB (VmHWM).
long vm_hwm_kb();

/// CPU time and context switches summed over /proc/self/task/*, per thread id.
struct task_totals {
  double cpu_ms = 0;
  long ctx_switches = 0;
};
struct task_snapshot {
  std::vector<std::pair<std::string, std::pair<long long, long>>> tasks;  // tid -> (ns, switches)
  static task_snapshot take();
};
task_totals task_delta(const task_snapshot& a, const task_snapshot& b);

/// Opens $BENCH_TRACE_DIR/<workload>-<impl>.dat for writing, or returns null.
std::FILE* open_trace();

// The workloads (one translation unit each).
void run_throughput();  // W0-W3, W7
void run_paced();       // W4
void run_waiters();     // W5, W7b
void run_idle();        // W6, W6b
void run_stream();      // W8, W8b

}  // namespace bench

#endif  // RATELIMIT_BENCH_BENCH_HPP
