// A helper process for test_redis_processes: one redis_token_bucket on a
// shared key, in mode `head` or `reserve` (with calls of at most `max_batch`
// requests), `coroutines` coroutines taking one
// token at a time from `start` (system_clock, ms since the epoch) for
// `duration` ms. With behaviour `cancel`, each request is cancelled if not
// granted within 20 ms (then the coroutine asks again). Optional: the
// configuration's generation (redis_bucket_options::generation), and an
// instant `split` (system_clock, ms since the epoch). Prints
//   granted=<n> in_window=<granted by start + duration> last_us=<system_clock us of the
//   last grant> round_trips=<k> refunded=<tokens given back> errors=<e>
//   cancelled=<c> in_tail=<granted from start + duration/3 to start + duration>
//   before=<granted in the window before split> after=<granted in the window from split>
//   generation=<the bucket's at the end> reconfigurations=<configurations taken on>
//   rate_per_s=<the bucket's rate at the end>
#include <ratelimit/redis/redis_token_bucket.hpp>

#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <tuple>

namespace asio = boost::asio;
using namespace std::chrono;

int main(int argc, char** argv) {
  if (argc != 12 && argc != 14) {
    std::fprintf(stderr,
                 "usage: redis_worker port key capacity rate_per_s coroutines duration_ms "
                 "start_ms lease head|reserve take|cancel max_batch [generation split_ms]\n");
    return 2;
  }
  ratelimit::redis_config cfg;
  cfg.port = static_cast<std::uint16_t>(std::stoi(argv[1]));
  cfg.request_timeout = seconds(5);
  const std::string key = argv[2];
  const std::uint64_t capacity = std::stoull(argv[3]);
  const std::uint64_t rate = std::stoull(argv[4]);
  const int coroutines = std::stoi(argv[5]);
  const auto duration = milliseconds(std::stoll(argv[6]));
  const auto start = system_clock::time_point(milliseconds(std::stoll(argv[7])));
  ratelimit::redis_bucket_options opts;
  opts.lease = std::stoull(argv[8]);
  const bool reserve = std::string(argv[9]) == "reserve";
  if (reserve) opts.mode = ratelimit::redis_bucket_mode::reserve;
  const bool cancel = std::string(argv[10]) == "cancel";
  opts.max_batch = std::stoull(argv[11]);
  if (argc == 14) opts.generation = std::stoull(argv[12]);
  const auto split =
      argc == 14 ? system_clock::time_point(milliseconds(std::stoll(argv[13]))) : start + duration;

  asio::io_context ctx;
  ratelimit::redis_connection conn(ctx, cfg);
  ratelimit::redis_token_bucket bucket(conn, key, capacity, ratelimit::per_second(rate), opts);
  long granted = 0, in_window = 0, in_tail = 0, errors = 0, cancelled = 0, before = 0, after = 0;
  system_clock::time_point last{};
  int running = 0;
  auto worker = [&]() -> asio::awaitable<void> {
    ++running;
    while (system_clock::now() < start + duration) {
      boost::system::error_code ec;
      if (cancel) {
        // Whichever ends first cancels the other.
        using namespace asio::experimental::awaitable_operators;
        asio::steady_timer t(ctx, milliseconds(20));
        auto r = co_await (bucket.async_get_token(asio::as_tuple(asio::use_awaitable)) ||
                           t.async_wait(asio::as_tuple(asio::use_awaitable)));
        if (r.index() == 1) {
          ++cancelled;
          continue;
        }
        ec = std::get<0>(std::get<0>(r));
      } else {
        std::tie(ec) = co_await bucket.async_get_token(asio::as_tuple(asio::use_awaitable));
      }
      if (ec) {
        ++errors;
        break;
      }
      ++granted;
      last = system_clock::now();
      if (last <= start + duration) {
        ++in_window;
        ++(last < split ? before : after);
      }
      if (last >= start + duration / 3 && last <= start + duration) ++in_tail;
    }
    if (--running == 0) {
      bucket.close();
      conn.close();
    }
  };
  // Connected, and the script loaded, before the start: what is measured is the limit.
  bool ready = false;
  conn.async_exec({"PING"}, [&](boost::system::error_code, ratelimit::redis_reply) {});
  conn.async_exec({"SCRIPT", "LOAD",
                   std::string(reserve ? ratelimit::redis_detail::reserve_script
                                       : ratelimit::redis_detail::bucket_script)},
                  [&](boost::system::error_code ec, ratelimit::redis_reply) {
                    if (ec) std::fprintf(stderr, "SCRIPT LOAD: %s\n", ec.message().c_str());
                    ready = true;
                  });
  while (!ready)
    ctx.run_one();
  // Every process starts at the same instant. (Not with an asio::system_timer
  // awaited in the coroutines: under TSan at -O2 (GCC 12) that build crashed
  // in the first completion; see the report.)
  std::this_thread::sleep_until(start);
  for (int i = 0; i < coroutines; ++i)
    asio::co_spawn(ctx, worker(), asio::detached);
  ctx.run_for(duration + seconds(60));  // bounded
  const auto st = bucket.stats();
  std::printf(
      "granted=%ld in_window=%ld last_us=%lld round_trips=%llu refunded=%llu errors=%ld "
      "cancelled=%ld in_tail=%ld before=%ld after=%ld generation=%llu reconfigurations=%llu "
      "rate_per_s=%.3f\n",
      granted, in_window,
      static_cast<long long>(duration_cast<microseconds>(last.time_since_epoch()).count()),
      static_cast<unsigned long long>(st.round_trips), static_cast<unsigned long long>(st.refunded),
      errors, cancelled, in_tail, before, after,
      static_cast<unsigned long long>(bucket.generation()),
      static_cast<unsigned long long>(st.reconfigurations),
      static_cast<double>(bucket.get_rate().tokens) * 1e9 /
          static_cast<double>(bucket.get_rate().period.count()));
  return running == 0 && errors == 0 ? 0 : 1;
}
