// The README's Redis example: "4 calls per second to the payment API, burst
// 2", shared by every process that runs this program against the same Redis.
// Each process runs three coroutines for 2 seconds and prints its grants.
// With --fair, the bucket keeps one line for every process in Redis
// (reservation mode): the processes share the calls evenly. With --rate N,
// the process first sets the key's rate to N calls per second for every
// process (set_rate: a new generation of the key's configuration, kept in
// Redis; the others follow it with their next reply).
//
//   redis_shared_limit A 6379 & redis_shared_limit B 6379; wait
//   (or --name A --port 6379 --host 127.0.0.1 [--fair] [--rate 8])
#include <ratelimit/redis/redis_token_bucket.hpp>

#include "../cli.hpp"

#include <boost/asio.hpp>

#include <chrono>
#include <iostream>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono;

int main(int argc, char** argv) {
  std::string name = "A";
  bool fair = false;
  std::uint64_t new_rate = 0;
  ratelimit::redis_config cfg;  // 127.0.0.1
  cfg.port = 6379;
  cli::parser cli(
      "redis_shared_limit",
      "Three coroutines call a pretend API at 4 calls/s (burst 2) shared through Redis.",
      "[NAME [PORT]]");
  cli.text("name", name, "what this process prints before its lines")
      .text("host", cfg.host, "the Redis server's host name or address")
      .option("port", cfg.port, std::uint16_t(1), std::uint16_t(65535), "the Redis server's port")
      .flag("fair", fair, "one line for every process, in Redis (reservation mode)")
      .option("rate", new_rate, std::uint64_t(0), std::uint64_t(1000000),
              "first set the key's rate to this many calls/s, for every process (0: leave it)")
      .operand("name", "NAME")
      .operand("port", "PORT");
  if (int rc = cli.parse(argc, argv); rc >= 0) return rc;

  try {
    asio::io_context ctx;
    ratelimit::redis_connection redis(ctx, cfg);
    ratelimit::redis_bucket_options opts;
    if (fair) opts.mode = ratelimit::redis_bucket_mode::reserve;
    // (A key serves one mode: the fair line has a key of its own.)
    ratelimit::redis_token_bucket bucket(redis,
                                         fair ? "example:payment-api:fair" : "example:payment-api",
                                         2, ratelimit::per_second(4), opts);

    const auto t0 = steady_clock::now();
    int granted = 0, running = 0;
    auto caller = [&](int id) -> asio::awaitable<void> {
      ++running;
      while (steady_clock::now() - t0 < seconds(2)) {
        auto [ec] = co_await bucket.async_get_token(asio::as_tuple(asio::use_awaitable));
        if (ec) {
          std::cout << name << id << ": " << ec.message() << "\n";  // e.g. "redis unavailable"
          break;
        }
        ++granted;
        std::cout << name << id << " calls the API at "
                  << duration_cast<milliseconds>(steady_clock::now() - t0).count() << " ms\n";
      }
      if (--running == 0) redis.close();  // lets ctx.run() return
    };
    auto start = [&]() -> asio::awaitable<void> {
      if (new_rate > 0) {
        // Every process using the key runs with this rate from its next reply.
        auto [ec, generation] = co_await bucket.async_set_rate(ratelimit::per_second(new_rate),
                                                               asio::as_tuple(asio::use_awaitable));
        if (ec) {
          std::cout << name << ": set_rate: " << ec.message() << "\n";
          redis.close();
          co_return;
        }
        std::cout << name << ": the key's rate is now " << new_rate << " calls/s (generation "
                  << generation << ")\n";
      }
      for (int id = 1; id <= 3; ++id)
        asio::co_spawn(ctx, caller(id), asio::detached);
    };
    asio::co_spawn(ctx, start(), asio::detached);
    ctx.run();
    std::cout << name << ": " << granted << " calls\n";
  } catch (const std::exception& e) {  // e.g. a host name that does not resolve
    std::cerr << "redis_shared_limit: " << e.what() << '\n';
    return 1;
  }
}
