//
// bench/bench_main.cpp: bench_ratelimit, the C++ side of the benchmarks.
//
// Usage: bench_ratelimit --impl IMPL --workload W0|W1|W2|W3|W4|W5|W6|W6b|W7|W7b|W8|W8b
//                        [--quick] [--reps N] [--waiters N]
//
// The (impl, workload) pairs, and what each measures, are listed by --list.
//
#include "bench.hpp"

#include "../examples/cli.hpp"

#include <dirent.h>
#include <unistd.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

namespace bench {

options opt;

void die(const std::string& msg) {
  std::fflush(stdout);
  std::fprintf(stderr, "bench_ratelimit: error: %s %s: %s\n", opt.impl.c_str(),
               opt.workload.c_str(), msg.c_str());
  std::exit(1);
}

void warn(const std::string& msg) {
  std::fprintf(stderr, "bench_ratelimit: %s %s: %s\n", opt.impl.c_str(), opt.workload.c_str(),
               msg.c_str());
}

std::string format(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

void emit(int rep, const std::string& metrics) {
  std::printf("impl=%s workload=%s rep=%d %s\n", opt.impl.c_str(), opt.workload.c_str(), rep,
              metrics.c_str());
  std::fflush(stdout);
}

int pick(int full, int quick) {
  return opt.reps >= 0 ? opt.reps : opt.quick ? quick : full;
}

double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  long i = static_cast<long>(std::ceil(p * static_cast<double>(sorted.size()))) - 1;
  if (i < 0) i = 0;
  return sorted[static_cast<std::size_t>(i)];
}

long vm_hwm_kb() {
  std::ifstream in("/proc/self/status");
  std::string key;
  long value = 0;
  for (std::string line; std::getline(in, line);) {
    std::istringstream ls(line);
    if (ls >> key >> value && key == "VmHWM:") return value;
  }
  die("no VmHWM in /proc/self/status");
}

static task_snapshot snapshot_tasks() {
  task_snapshot s;
  DIR* d = opendir("/proc/self/task");
  if (!d) die("cannot open /proc/self/task");
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string base = std::string("/proc/self/task/") + e->d_name;
    std::ifstream ss(base + "/schedstat");
    long long cpu_ns = 0;
    if (!(ss >> cpu_ns)) continue;  // the thread exited meanwhile
    std::ifstream st(base + "/status");
    long sw = 0;
    for (std::string line; std::getline(st, line);) {
      std::istringstream ls(line);
      std::string key;
      long v = 0;
      if (ls >> key >> v && key.size() > 14 &&
          key.compare(key.size() - 14, 14, "ctxt_switches:") == 0)
        sw += v;
    }
    s.tasks.emplace_back(e->d_name, std::make_pair(cpu_ns, sw));
  }
  closedir(d);
  return s;
}

task_snapshot task_snapshot::take() {
  return snapshot_tasks();
}

task_totals task_delta(const task_snapshot& a, const task_snapshot& b) {
  std::map<std::string, std::pair<long long, long>> before(a.tasks.begin(), a.tasks.end());
  task_totals t;
  long long ns = 0;
  for (const auto& [tid, v] : b.tasks) {
    const auto it = before.find(tid);
    const auto base = it == before.end() ? std::make_pair(0LL, 0L) : it->second;
    ns += v.first - base.first;
    t.ctx_switches += v.second - base.second;
  }
  t.cpu_ms = static_cast<double>(ns) / 1e6;
  return t;
}

std::FILE* open_trace() {
  if (opt.trace_dir.empty()) return nullptr;
  const std::string path = opt.trace_dir + "/" + opt.workload + "-" + opt.impl + ".dat";
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) warn("cannot write " + path);
  return f;
}

}  // namespace bench

namespace {

// impl -> workloads it runs. The driver (scripts/bench) asks for this list.
const std::map<std::string, std::string> pairs = {
    {"asio_ratelimit", "W0 W6 W6b"},           // W0: the clock it reads
    {"asio_ratelimit_try", "W1 W2"},           // try_get_token()
    {"asio_ratelimit_callback", "W3 W4 W5"},   // async_get_token(callback)
    {"asio_ratelimit_awaitable", "W3 W4 W5"},  // co_await async_get_token(use_awaitable)
    {"asio_ratelimit_blocking", "W3 W4 W5"},   // get_token() from plain threads
    {"floor_atomic", "W1 W2"},                 // now() + one successful CAS
    {"floor_mutex", "W1 W2"},                  // now() + the same under a std::mutex
    {"floor_post", "W3"},                      // one asio::post of a handler
    {"floor_post_clock", "W3"},                // the same plus one steady_clock read
    {"floor_post_any", "W3"},                  // a plain post through an any_io_executor
    {"floor_post_reactor", "W3"},              // the same, on a context with a timer
    {"floor_co_post", "W3"},                   // co_await asio::post(ex, use_awaitable)
    {"floor_timer", "W4 W5"},                  // one steady_timer per grant
    {"floor_co_timer", "W5"},                  // a coroutine awaiting its own timer
    {"textbook_thread", "W4 W5 W6 W6b"},       // a thread per bucket + condvar
    // W7, W7b: one token of each of two buckets, jointly or one after the other.
    {"asio_ratelimit_joint_callback", "W7 W7b"},            // async_acquire({a,b}, callback)
    {"asio_ratelimit_joint_awaitable", "W7 W7b"},           // co_await async_acquire({a,b})
    {"asio_ratelimit_joint_try", "W7"},                     // try_acquire({a,b})
    {"asio_ratelimit_two_sequential_callback", "W7 W7b"},   // a, then b: async_get_token
    {"asio_ratelimit_two_sequential_awaitable", "W7 W7b"},  // co_await a, then b
    {"asio_ratelimit_two_sequential_try", "W7"},            // try_get_token on a, then b
    {"asio_ratelimit_two_acquires_callback", "W7"},         // a, then b: async_acquire (receipts)
    {"asio_ratelimit_two_acquires_awaitable", "W7"},        // co_await a, then b: async_acquire
    // W8, W8b: byte-rate streams over loopback TCP.
    {"raw_socket", "W8"},                       // tcp::socket at both ends
    {"asio_ratelimit_stream_unlimited", "W8"},  // rate_limited_stream, limits that never bind
    {"asio_ratelimit_stream", "W8b"},           // rate_limited_stream, 20 MiB/s writer
    {"beast_simple_rate_policy", "W8b"},        // beast::basic_stream + simple_rate_policy
};

}  // namespace

int main(int argc, char** argv) {
  using bench::opt;
  opt.self = argv[0];
  if (const char* d = std::getenv("BENCH_TRACE_DIR")) opt.trace_dir = d;
  std::vector<std::string> impls;
  for (const auto& p : pairs)
    impls.push_back(p.first);
  bool list = false;
  cli::parser cli("bench_ratelimit",
                  "One benchmark workload of ../shared/BENCHMARKS.md for one implementation "
                  "(scripts/bench runs them all).");
  cli.choice("impl", opt.impl, impls, "the implementation (see --list for its workloads)")
      .choice("workload", opt.workload,
              {"W0", "W1", "W2", "W3", "W4", "W5", "W6", "W6b", "W7", "W7b", "W8", "W8b"},
              "the workload")
      .flag("quick", opt.quick, "a short run (a smoke test)")
      .option("reps", opt.reps, 1, 10000, "measured repetitions")
      .default_text("reps", "the workload's")
      .option("waiters", opt.waiters, 0L, 1000000L,
              "W5, W7b: the number of waiters (and grants per second); 0: the baseline child; "
              "a multiple of 1000 above 1000 for the blocking rows")
      .default_text("waiters", "the workload's")
      .option("rate", opt.rate, 1L, 1000000000L, "W5, W7b child: grants per second")
      .default_text("rate", "the waiters")
      .flag("child", opt.child,
            "W5, W7b: one repetition in this process (the parent re-executes itself)")
      .flag("list", list, "print the valid impl/workload pairs");
  if (int rc = cli.parse(argc, argv); rc >= 0) return rc;
  if (list) {
    for (const auto& [impl, wls] : pairs)
      std::printf("%s %s\n", impl.c_str(), wls.c_str());
    return 0;
  }
  if (opt.impl.empty() || opt.workload.empty()) {
    std::fprintf(stderr, "bench_ratelimit: --impl and --workload are required (see --help)\n");
    return 2;
  }
  if (opt.workload != "W5" && opt.workload != "W7b" &&
      (opt.waiters >= 0 || opt.rate >= 0 || opt.child)) {
    std::fprintf(stderr,
                 "bench_ratelimit: --waiters, --rate and --child are for W5 and W7b only\n");
    return 2;
  }
  // W5's blocking rows park their waiters on a pool of 1000 threads, each
  // taking the same share.
  if ((opt.impl == "asio_ratelimit_blocking" || opt.impl == "textbook_thread") &&
      opt.waiters > 1000 && opt.waiters % 1000 != 0) {
    std::fprintf(stderr,
                 "bench_ratelimit: --waiters: '%ld' is not a multiple of 1000 (%s parks its "
                 "waiters on 1000 threads)\n",
                 opt.waiters, opt.impl.c_str());
    return 2;
  }
  const auto it = pairs.find(opt.impl);
  if (it == pairs.end() ||
      (" " + it->second + " ").find(" " + opt.workload + " ") == std::string::npos) {
    std::fprintf(stderr, "bench_ratelimit: no workload %s for impl %s (see --list)\n",
                 opt.workload.c_str(), opt.impl.c_str());
    return 2;
  }
  const std::string& w = opt.workload;
  if (w == "W0" || w == "W1" || w == "W2" || w == "W3" || w == "W7")
    bench::run_throughput();
  else if (w == "W4")
    bench::run_paced();
  else if (w == "W5" || w == "W7b")
    bench::run_waiters();
  else if (w == "W8" || w == "W8b")
    bench::run_stream();
  else
    bench::run_idle();
  return 0;
}
