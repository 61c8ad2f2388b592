// The Redis workload (see /work/shared/BENCHMARKS.md): grants per second
// through one connection with many concurrent coroutines on one key, in
// head-only mode (with and without leasing) and in reservation mode
// (coalesced calls, several in flight), the keyed limiter over 10 000 keys,
// and redis-benchmark running EVALSHA of the same scripts on the same server
// in the same run as the reference points.
//
//   bench_redis [--reps N] [--seconds X] [--coroutines N] [--port N] [--window N]
//
// Without --port it starts its own redis-server on a free 127.0.0.1 port (and
// kills it at the end). One line per repetition on stdout:
//   impl=<impl> workload=redis rep=<i> grants_per_s=<v> round_trips_per_s=<v>
//       p50_us=<v> p99_us=<v>
// (the latencies: from a request to its grant, with the tokens there: what
// a grant costs in round trips and queueing; redis-benchmark's are its own
// report's, per request of its pipeline).
// The bucket never runs dry (1e9 tokens/s), so every figure is the cost of
// the machinery: script, round trips, queueing. Each result is checked: a
// request that fails aborts the run.
#include <ratelimit/redis/detail/reserve_script.hpp>
#include <ratelimit/redis/detail/script.hpp>
#include <ratelimit/redis/redis_keyed_limiter.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>

#include <boost/asio.hpp>

#include "../../examples/cli.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace asio = boost::asio;
namespace rd = ratelimit::redis_detail;
using namespace std::chrono;

namespace {

std::uint16_t free_port() {
  asio::io_context ctx;
  asio::ip::tcp::acceptor a(ctx, {asio::ip::make_address("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

pid_t spawn(std::vector<std::string> args, const char* out_path) {
  std::vector<char*> argv;
  for (auto& a : args)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot run " + args[0] + ": " + std::strerror(rc));
  return pid;
}

int wait_for(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void fail(const std::string& what) {
  std::fprintf(stderr, "bench_redis: %s\n", what.c_str());
  std::exit(1);
}

constexpr std::uint64_t capacity = 1'000'000'000'000;
constexpr ratelimit::rate huge_rate = ratelimit::per_second(1'000'000'000);

struct result {
  double per_s = 0, trips_per_s = 0, p50_us = 0, p99_us = 0;
};

/// The q-quantile of `v` (sorted in place), in us from ns.
double quantile_us(std::vector<std::uint64_t>& v, double q) {
  if (v.empty()) return 0;
  const auto k = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return static_cast<double>(v[k]) / 1000.0;
}

/// `coroutines` coroutines take one token at a time for `secs`, each by
/// `co_await get(i)` (i: the coroutine's request count so far); `trips()`
/// counts round trips.
template <typename Get, typename Trips>
result measure(asio::io_context& ctx, ratelimit::redis_connection& conn, int coroutines,
               double secs, Get get, Trips trips_now) {
  const std::uint64_t trips_before = trips_now();
  std::uint64_t grants = 0;
  bool stop = false;
  int running = 0;
  std::vector<std::uint64_t> latencies;  // ns, of the grants counted
  latencies.reserve(2'000'000);
  auto worker = [&](int c) -> asio::awaitable<void> {
    ++running;
    for (std::uint64_t i = static_cast<std::uint64_t>(c); !stop;
         i += static_cast<std::uint64_t>(coroutines)) {
      const auto asked = steady_clock::now();
      auto [ec] = co_await get(i);
      if (ec) fail("grant failed: " + ec.message());
      if (!stop) {
        ++grants;
        latencies.push_back(static_cast<std::uint64_t>(
            duration_cast<nanoseconds>(steady_clock::now() - asked).count()));
      }
    }
    --running;
  };
  const auto t0 = steady_clock::now();
  for (int i = 0; i < coroutines; ++i)
    asio::co_spawn(ctx, worker(i), asio::detached);
  asio::steady_timer stop_timer(ctx, duration_cast<steady_clock::duration>(duration<double>(secs)));
  double elapsed = 0;
  std::uint64_t counted = 0, trips = 0;
  stop_timer.async_wait([&](boost::system::error_code) {
    elapsed = duration<double>(steady_clock::now() - t0).count();
    counted = grants;
    trips = trips_now() - trips_before;
    stop = true;
  });
  while (running > 0 || !stop)
    ctx.run_one();
  conn.close();
  ctx.run_for(milliseconds(100));
  latencies.resize(std::min<std::size_t>(latencies.size(), counted));
  return {static_cast<double>(counted) / elapsed, static_cast<double>(trips) / elapsed,
          quantile_us(latencies, 0.5), quantile_us(latencies, 0.99)};
}

/// The connection's window (redis_config::max_calls_in_flight) of every
/// row but the one that sets its own: the library's default unless --window.
std::size_t window = ratelimit::redis_config{}.max_calls_in_flight;

ratelimit::redis_config config_for(std::uint16_t port, std::size_t calls = window) {
  ratelimit::redis_config cfg;
  cfg.port = port;
  cfg.request_timeout = seconds(10);
  cfg.max_calls_in_flight = calls;
  return cfg;
}

/// One bucket: `coroutines` coroutines take one token at a time for `secs`.
result run_ours(std::uint16_t port, const std::string& key, int coroutines, double secs,
                std::uint64_t lease, bool reserve = false, std::size_t max_batch = 256,
                std::size_t max_in_flight = 4) {
  asio::io_context ctx;
  // (a window at least as wide as this bucket's own: the row without coalescing keeps 200 out)
  ratelimit::redis_connection conn(ctx, config_for(port, std::max(window, max_in_flight)));
  ratelimit::redis_bucket_options opts;
  opts.lease = lease;
  if (reserve) opts.mode = ratelimit::redis_bucket_mode::reserve;
  opts.max_batch = max_batch;
  opts.max_in_flight = max_in_flight;
  ratelimit::redis_token_bucket bucket(conn, key, capacity, huge_rate, opts);
  // Warm up: connected, script loaded.
  bool warm = false;
  bucket.async_get_token([&](boost::system::error_code ec) {
    if (ec) fail("warm-up: " + ec.message());
    warm = true;
  });
  while (!warm)
    ctx.run_one();
  return measure(
      ctx, conn, coroutines, secs,
      [&](std::uint64_t) { return bucket.async_get_token(asio::as_tuple(asio::use_awaitable)); },
      [&] { return bucket.stats().round_trips; });
}

/// The keyed limiter in reservation mode: request i of every coroutine
/// goes to one of `keys` keys in turn.
result run_keyed(std::uint16_t port, const std::string& prefix, int coroutines, double secs,
                 std::uint64_t keys) {
  asio::io_context ctx;
  ratelimit::redis_connection conn(ctx, config_for(port));
  ratelimit::redis_bucket_options opts;
  opts.mode = ratelimit::redis_bucket_mode::reserve;
  ratelimit::redis_keyed_limiter limiter(conn, prefix, capacity, huge_rate, opts);
  bool warm = false;
  limiter.async_get_token("warm", [&](boost::system::error_code ec) {
    if (ec) fail("warm-up: " + ec.message());
    warm = true;
  });
  while (!warm)
    ctx.run_one();
  std::vector<std::string> names;
  for (std::uint64_t k = 0; k < keys; ++k)
    names.push_back("user-" + std::to_string(k));
  return measure(
      ctx, conn, coroutines, secs,
      [&](std::uint64_t i) {
        return limiter.async_get_token(names[i % keys], asio::as_tuple(asio::use_awaitable));
      },
      [&] { return limiter.stats().round_trips; });
}

/// redis-benchmark running our script (EVALSHA of `sha` with `args` after the
/// key, never denied) on the same server.
result run_redis_benchmark(std::uint16_t port, const std::string& sha,
                           const std::vector<std::string>& args, int clients, int pipeline,
                           int requests) {
  char path[] = "/tmp/bench_redis_XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) fail("mkstemp");
  close(fd);
  std::vector<std::string> cmd{"redis-benchmark",
                               "-h",
                               "127.0.0.1",
                               "-p",
                               std::to_string(port),
                               "-c",
                               std::to_string(clients),
                               "-P",
                               std::to_string(pipeline),
                               "-n",
                               std::to_string(requests),
                               "--csv",
                               "EVALSHA",
                               sha,
                               "1",
                               "bench:redis-benchmark:" + sha.substr(0, 8)};
  cmd.insert(cmd.end(), args.begin(), args.end());
  const pid_t pid = spawn(cmd, path);
  if (wait_for(pid) != 0) fail("redis-benchmark failed");
  FILE* f = std::fopen(path, "r");
  char line[1024];
  result r;
  while (f && std::fgets(line, sizeof line, f)) {
    // "EVALSHA ...","<rps>","<avg>","<min>","<p50>","<p95>","<p99>","<max>" (ms)
    if (std::strncmp(line, "\"test\"", 6) == 0) continue;
    std::vector<double> cols;
    for (const char* p = std::strstr(line, "\",\""); p; p = std::strstr(p + 3, "\",\""))
      cols.push_back(std::atof(p + 3));
    if (cols.size() >= 6) r = {cols[0], 0, cols[3] * 1000, cols[5] * 1000};
  }
  if (f) std::fclose(f);
  std::remove(path);
  if (r.per_s <= 0) fail("could not read redis-benchmark's output");
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 5, coroutines = 200;
  double secs = 1.0;
  int port = 0;
  cli::parser cli("bench_redis",
                  "The Redis workload: grants per second through one connection, beside "
                  "redis-benchmark.");
  cli.option("reps", reps, 1, 1000, "measured repetitions")
      .option("seconds", secs, 0.01, 3600.0, "seconds each repetition lasts")
      .option("coroutines", coroutines, 1, 100000, "coroutines asking at once")
      .option("port", port, 0, 65535, "a running redis-server's port (0: start one)")
      .option("window", window, std::size_t{1}, std::size_t{1} << 20,
              "the connection's max_calls_in_flight (the library's default unless given)");
  if (int rc = cli.parse(argc, argv); rc >= 0) return rc;
  pid_t server = -1;
  if (port == 0) {
    port = free_port();
    server = spawn({"redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save",
                    "", "--appendonly", "no"},
                   "/dev/null");
    asio::io_context ctx;
    const auto end = steady_clock::now() + seconds(10);
    for (;;) {
      try {
        asio::ip::tcp::socket s(ctx);
        s.connect({asio::ip::make_address("127.0.0.1"), static_cast<std::uint16_t>(port)});
        break;
      } catch (const std::exception&) {
        if (steady_clock::now() > end) fail("redis-server did not start");
        std::this_thread::sleep_for(milliseconds(10));
      }
    }
  }
  const std::string sha = rd::script_sha1();
  const std::string reserve_sha = rd::script_sha1(rd::reserve_script);
  const auto sr = rd::make_script_rate(capacity, huge_rate);
  // The head-only script's arguments (1 token, no lease), and the
  // reservation script's (horizon 1 s, now from the server, generation 0, one
  // request of 1 token).
  const std::vector<std::string> head_args{std::to_string(sr.capacity), std::to_string(sr.tok),
                                           std::to_string(sr.tick), "1", "0"};
  const std::vector<std::string> reserve_args{std::to_string(sr.capacity),
                                              std::to_string(sr.tok),
                                              std::to_string(sr.tick),
                                              "1000000",
                                              "1",
                                              "",
                                              "0",
                                              "1",
                                              ""};
  for (const auto& [text, want] :
       {std::pair{rd::bucket_script, sha}, std::pair{rd::reserve_script, reserve_sha}}) {
    // Load the scripts for redis-benchmark's EVALSHA.
    asio::io_context ctx;
    ratelimit::redis_config cfg;
    cfg.port = static_cast<std::uint16_t>(port);
    ratelimit::redis_connection conn(ctx, cfg);
    bool done = false;
    conn.async_exec({"SCRIPT", "LOAD", std::string(text)},
                    [&, want = want](boost::system::error_code ec, ratelimit::redis_reply r) {
                      if (ec || r.str != want) fail("SCRIPT LOAD: " + ec.message() + " " + r.str);
                      done = true;
                      conn.close();
                    });
    while (!done)
      ctx.run_one();
    ctx.run_for(milliseconds(50));
  }
  const std::uint16_t p = static_cast<std::uint16_t>(port);
  auto print = [&](const std::string& impl, int rep, const result& r) {
    std::printf("impl=%s workload=redis rep=%d grants_per_s=%.0f", impl.c_str(), rep, r.per_s);
    if (r.trips_per_s > 0) std::printf(" round_trips_per_s=%.0f", r.trips_per_s);
    std::printf(" p50_us=%.1f p99_us=%.1f", r.p50_us, r.p99_us);
    if (impl.starts_with("asio")) std::printf(" coroutines=%d", coroutines);
    std::printf("\n");
    std::fflush(stdout);
  };
  for (int rep = 0; rep < reps; ++rep) {
    // Interleaved, so drift on this shared machine hits every implementation alike.
    for (std::uint64_t lease : {std::uint64_t{0}, std::uint64_t{16}}) {
      print("asio_ratelimit" + std::string(lease ? "_lease16" : ""), rep,
            run_ours(p, "bench:ours:" + std::to_string(lease) + ":" + std::to_string(rep),
                     coroutines, secs, lease));
    }
    print("asio_ratelimit_reserve", rep,
          run_ours(p, "bench:ours:reserve:" + std::to_string(rep), coroutines, secs, 0, true));
    // Without coalescing: one request per call, as many calls out as redis-benchmark's pipeline.
    print("asio_ratelimit_reserve_batch1", rep,
          run_ours(p, "bench:ours:reserve1:" + std::to_string(rep), coroutines, secs, 0, true, 1,
                   200));
    // 10 000 keys, one request per key at a time (no coalescing across keys).
    print("asio_ratelimit_keyed_10k", rep,
          run_keyed(p, "bench:keyed:" + std::to_string(rep) + ":", coroutines, secs, 10'000));
    print("redis_benchmark_c1_P200", rep, run_redis_benchmark(p, sha, head_args, 1, 200, 200000));
    print("redis_benchmark_reserve_c1_P200", rep,
          run_redis_benchmark(p, reserve_sha, reserve_args, 1, 200, 200000));
    print("redis_benchmark_c50_P1", rep, run_redis_benchmark(p, sha, head_args, 50, 1, 100000));
  }
  if (server > 0) {
    kill(server, SIGKILL);
    wait_for(server);
  }
}
