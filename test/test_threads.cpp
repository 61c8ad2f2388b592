// Thread safety: every member function from many threads at once, with the
// executor run by one or several threads; exact token counts survive it.
// (Run under TSan by scripts/test.)
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/strand.hpp>

#include <barrier>
#include <random>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::per_second;

BOOST_FIXTURE_TEST_SUITE(concurrency, clock_fixture)

BOOST_AUTO_TEST_CASE(concurrent_tries_take_exactly_the_tokens_there) {
  asio::io_context ctx;
  test_bucket bucket(ctx, 1000, per_second(1));
  constexpr int threads = 4;
  std::atomic<int> won{0};
  std::barrier start(threads);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&] {
      start.arrive_and_wait();
      for (int i = 0; i < 1000; ++i)
        won += bucket.try_get_token();
    });
  for (auto& t : ts)
    t.join();
  BOOST_TEST(won.load() == 1000);
  BOOST_TEST(bucket.available() == 0u);
}

BOOST_AUTO_TEST_CASE(async_requests_from_many_threads_on_a_pool) {
  running_context pool(3);
  test_bucket bucket(pool.ctx, 50, per_second(100), ratelimit::start_empty);
  constexpr int threads = 4, per_thread = 100;
  std::atomic<int> ok{0}, calls{0};
  std::barrier start(threads);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&] {
      start.arrive_and_wait();
      for (int i = 0; i < per_thread; ++i)
        bucket.async_get_token([&](boost::system::error_code ec) {
          ++calls;
          ok += !ec;
        });
    });
  for (auto& t : ts)
    t.join();
  BOOST_TEST(eventually([&] { return bucket.waiting() == threads * per_thread; }));
  // 400 tokens due after 4 s of manual time: advance in uneven steps while
  // the pool threads serve, and check that the grants match the elapsed time
  // exactly at every step (never ahead of it, and caught up after it).
  std::mt19937 rng(7);
  std::int64_t elapsed_ms = 0;
  while (elapsed_ms < 4000) {
    const int step = 1 + static_cast<int>(rng() % 97);
    elapsed_ms += step;
    manual_clock::advance(std::chrono::milliseconds(step));
    const int due = static_cast<int>(std::min<std::int64_t>(elapsed_ms / 10, 400));
    BOOST_TEST(eventually([&] { return ok.load() >= due; }));
    BOOST_TEST(ok.load() == due);
  }
  BOOST_TEST(eventually([&] { return calls.load() == threads * per_thread; }));
  BOOST_TEST(ok.load() == threads * per_thread);
  BOOST_TEST(bucket.available() == static_cast<std::uint64_t>(elapsed_ms / 10 - 400));
}

BOOST_AUTO_TEST_CASE(every_member_function_at_once) {
  // Real clock, fast rate: threads hammer try/async/blocking/observers/
  // set_rate/set_capacity/cancel while a pool runs the executor. Checks:
  // every request completes exactly once, and grants never exceed what the
  // bucket could have produced.
  running_context pool(2);
  using bucket_t = ratelimit::token_bucket;
  const auto t0 = std::chrono::steady_clock::now();  // before the bucket fills
  bucket_t bucket(pool.ctx, 20, per_second(20'000));
  std::atomic<std::uint64_t> granted{0}, issued{0}, completed{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> ts;
  ts.emplace_back([&] {  // try
    while (!stop)
      granted += bucket.try_get_token(1);
  });
  ts.emplace_back([&] {  // async, a quarter of them cancelled
    std::mt19937 rng(1);
    // Cancellation is emitted on the strand the handler completes on, as
    // Asio requires; the handler owns its signal.
    auto strand = asio::make_strand(pool.ctx);
    while (!stop) {
      const std::uint64_t n = 1 + rng() % 3;
      ++issued;
      auto sig = std::make_shared<asio::cancellation_signal>();
      bucket.async_get_token(
          n,
          asio::bind_cancellation_slot(
              sig->slot(), asio::bind_executor(strand, [&, n, sig](boost::system::error_code ec) {
                if (!ec) granted += n;
                ++completed;
              })));
      if (rng() % 4 == 0)
        asio::post(strand, [sig] { sig->emit(asio::cancellation_type::terminal); });
      while (issued.load() - completed.load() > 200 && !stop)
        std::this_thread::yield();
    }
  });
  ts.emplace_back([&] {  // blocking
    boost::system::error_code ec;
    while (!stop) {
      if (bucket.try_get_token_for(std::chrono::milliseconds(2), 2, ec)) granted += 2;
    }
  });
  ts.emplace_back([&] {  // observers and reconfiguration
    std::mt19937 rng(3);
    while (!stop) {
      (void)bucket.available();
      (void)bucket.waiting();
      if (rng() % 8 == 0) bucket.set_rate(per_second(10'000 + rng() % 20'000));
      if (rng() % 16 == 0) bucket.set_capacity(10 + rng() % 20);
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(2));
  stop = true;
  for (auto& t : ts)
    t.join();
  bucket.cancel();
  BOOST_TEST(eventually([&] { return completed.load() == issued.load(); }));
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Capacity at most 29, rate at most 30'000/s at any moment.
  const double bound = 29 + 30'000 * elapsed;
  BOOST_TEST(static_cast<double>(granted.load()) <= bound);
  BOOST_TEST(granted.load() > 0u);
  BOOST_TEST_MESSAGE("granted " << granted.load() << " in " << elapsed << " s, issued async "
                                << issued.load());
}

BOOST_AUTO_TEST_SUITE_END()
