// Cancellation racing the grant, on a multi-threaded io_context (for TSan and
// ASan; a separate executable so that its settings are its own).
//
// Asio lets a cancellation be emitted on the handler's executor. With an
// io_context run by several threads that executor is no serialisation at
// all: the cancellation can run on one thread while the bucket's timer grants
// the same request on another. The library must then neither touch the
// request after its completion freed it, nor touch the handler's slot while
// the signal is being emitted (the old code did both).
//
// Each client owns one source of tokens (a token_bucket, or one key of a
// shared keyed_limiter) that starts empty and gains one token a millisecond,
// with a capacity never reached, and asks for one token at a time. So it
// knows the instant its next token falls due, and arranges a cancellation
// right around it (at that instant, or a few microseconds either side):
// - callback clients bind a cancellation_signal and start a steady_timer
//   whose handler emits it then, on whichever thread of the pool runs it
//   (or on the client's strand, in the cases with strands);
// - coroutine clients race the request against a steady_timer expiring then,
//   `co_await (request || timer.async_wait(use_awaitable))`, whose operator
//   cancels the loser when the winner completes. These run on strands in
//   every case: Asio's awaitable operators are not safe on a multi-threaded
//   executor without one (chriskohlhoff/asio#1348; tried here, UBSan found
//   the parallel group emitting into the timer's child coroutine while it
//   completed on another thread, inside Asio alone).
// The sources live on the io_context's executor, so their timers grant on any
// thread of the pool: the bucket's timer is due at the same instant as the
// client's, in the same timer queue, and the two fire in the same reactor
// wake-up on different threads.
//
// Checked: no sanitizer report; every callback completes exactly once and
// every coroutine finishes; and per source, the tokens granted never exceed
// rate x elapsed (it started empty), and granted + left in the bucket is all
// that accrued: a cancelled request took no token.
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cstdlib>
#include <deque>
#include <random>
#include <thread>

namespace asio = boost::asio;
using namespace ratelimit::test;
using clk = std::chrono::steady_clock;

namespace {

// One token a millisecond: a client's k-th token is due k ms after its source
// started. The capacity is never reached, so no token is lost to overflow and
// the accounting below is exact.
constexpr std::uint64_t token_ns = 1'000'000;
const ratelimit::rate stress_rate = ratelimit::per_second(1'000'000'000 / token_ns);
constexpr std::uint64_t huge_capacity = 1'000'000'000;

// How long each case issues requests (real time): the cases are bounded in
// time, so under the sanitizers they simply make fewer rounds.
// RATELIMIT_STRESS_MS overrides it (e.g. to hunt longer against old code).
std::chrono::milliseconds stress_time() {
  if (const char* s = std::getenv("RATELIMIT_STRESS_MS"))
    return std::chrono::milliseconds(std::atoi(s));
#ifdef RATELIMIT_TEST_SANITIZED
  return std::chrono::milliseconds(300);
#else
  return std::chrono::milliseconds(400);
#endif
}

constexpr int io_threads = 3;
constexpr int coroutine_clients = 4;
constexpr int callback_clients = 4;

struct tally {
  std::atomic<std::uint64_t> started{0};    // callback requests
  std::atomic<std::uint64_t> completed{0};  // callback completions
  std::atomic<std::uint64_t> doubled{0};    // a handler invoked a second time
  std::atomic<std::uint64_t> dropped{0};    // a handler destroyed without being invoked
  std::atomic<std::uint64_t> granted{0};
  std::atomic<std::uint64_t> aborted{0};
  std::atomic<std::uint64_t> other{0};  // any other result: a failure
  std::atomic<int> clients_done{0};
  std::atomic<int> emitters{0};   // signal-emitting timers not yet run
  std::atomic<bool> stop{false};  // no new request after this
};

/// Where a client gets its tokens: its own bucket...
struct bucket_source {
  ratelimit::token_bucket bucket;
  explicit bucket_source(asio::io_context& ctx)
      : bucket(ctx, huge_capacity, stress_rate, ratelimit::start_empty) {}
  template <typename Token>
  auto get(Token&& token) {
    return bucket.async_get_token(std::forward<Token>(token));
  }
  std::uint64_t available() const { return bucket.available(); }
};

struct bucket_sources {
  using source = bucket_source;
  asio::io_context& ctx;
  std::deque<bucket_source> all;
  explicit bucket_sources(asio::io_context& c) : ctx(c) {}
  bucket_source& make(int) { return all.emplace_back(ctx); }
};

/// ... or its own key of a shared keyed_limiter (created full, then drained).
struct key_source {
  ratelimit::keyed_limiter<int>& limiter;
  int key;
  key_source(ratelimit::keyed_limiter<int>& l, int k) : limiter(l), key(k) {
    BOOST_REQUIRE(limiter.try_get_token(key, huge_capacity));
  }
  template <typename Token>
  auto get(Token&& token) {
    return limiter.async_get_token(key, std::forward<Token>(token));
  }
  std::uint64_t available() const { return limiter.available(key); }
};

struct key_sources {
  using source = key_source;
  ratelimit::keyed_limiter<int> limiter;
  std::deque<key_source> all;
  explicit key_sources(asio::io_context& ctx) : limiter(ctx, huge_capacity, stress_rate, 64) {}
  key_source& make(int i) { return all.emplace_back(limiter, i); }
};

/// A client's view of its source's time line. Touched only by the client's
/// own chain of operations (one at a time), then by the test after it ended.
struct timeline {
  clk::time_point before, after;  // bracket the moment the source started accruing
  clk::time_point end;            // no new request after this
  std::uint64_t granted = 0;
  std::mt19937 rng;

  /// When the next token falls due (as the bucket's timer sees it, within
  /// the bracket), moved by a few microseconds a third of the time each way.
  clk::time_point cancel_at() {
    const auto due = before + std::chrono::nanoseconds((granted + 1) * token_ns);
    switch (rng() % 3) {
      case 0:
        return due;
      case 1:
        return due - std::chrono::microseconds(rng() % 40);
      default:
        return due + std::chrono::microseconds(rng() % 40);
    }
  }
};

template <typename Source>
asio::awaitable<void> take(Source& src, timeline& tl, tally& t) {
  try {
    co_await src.get(asio::use_awaitable);
    ++tl.granted;
    ++t.granted;
  } catch (const boost::system::system_error& e) {
    // (Also when the race was lost before the request was even made.)
    ++(e.code() == asio::error::operation_aborted ? t.aborted : t.other);
  }
}

template <typename Source>
asio::awaitable<void> coroutine_client(Source& src, timeline& tl, tally& t) {
  using namespace asio::experimental::awaitable_operators;
  asio::steady_timer deadline(co_await asio::this_coro::executor);
  while (clk::now() < tl.end && !t.stop.load()) {
    deadline.expires_at(tl.cancel_at());
    co_await (take(src, tl, t) || deadline.async_wait(asio::use_awaitable));
  }
  ++t.clients_done;
}

/// A chain of requests, each started by the previous one's handler, each
/// with its own signal emitted by a timer at the instant its token is due.
template <typename Source>
class callback_client : public std::enable_shared_from_this<callback_client<Source>> {
 public:
  callback_client(Source& src, timeline& tl, tally& t, asio::any_io_executor ex)
      : src_(src), tl_(tl), t_(t), ex_(std::move(ex)) {}

  void next() {
    if (clk::now() >= tl_.end || t_.stop.load()) {
      ++t_.clients_done;
      return;
    }
    auto sig = std::make_shared<asio::cancellation_signal>();
    auto timer = std::make_shared<asio::steady_timer>(ex_, tl_.cancel_at());
    ++t_.started;
    ++t_.emitters;
    src_.get(asio::bind_cancellation_slot(
        sig->slot(), asio::bind_executor(ex_, handler(this->shared_from_this(), sig))));
    // Started after the request, so the emission never overlaps its
    // initiation (which installs the slot's handler).
    timer->async_wait(asio::bind_executor(ex_, [sig, timer, &t = t_](boost::system::error_code ec) {
      if (!ec) sig->emit(asio::cancellation_type::terminal);
      --t.emitters;
    }));
  }

 private:
  class handler {
   public:
    handler(std::shared_ptr<callback_client> c, std::shared_ptr<asio::cancellation_signal> sig)
        : c_(std::move(c)), sig_(std::move(sig)), calls_(std::make_shared<std::atomic<int>>(0)) {}
    handler(handler&& o) noexcept
        : c_(std::move(o.c_)), sig_(std::move(o.sig_)), calls_(std::move(o.calls_)) {}
    handler& operator=(handler&&) = delete;
    ~handler() {
      if (c_ && calls_->load() == 0) ++c_->t_.dropped;
    }
    void operator()(boost::system::error_code ec) {
      if (calls_->fetch_add(1) != 0) {
        ++c_->t_.doubled;
        return;
      }
      c_->done(ec);
    }

   private:
    std::shared_ptr<callback_client> c_;
    // The signal outlives the operation, as Asio requires: the handler owns
    // it, and so does the timer that emits it.
    std::shared_ptr<asio::cancellation_signal> sig_;
    std::shared_ptr<std::atomic<int>> calls_;
  };

  void done(boost::system::error_code ec) {
    if (!ec) {
      ++tl_.granted;
      ++t_.granted;
    } else {
      ++(ec == asio::error::operation_aborted ? t_.aborted : t_.other);
    }
    ++t_.completed;
    next();
  }

  Source& src_;
  timeline& tl_;
  tally& t_;
  asio::any_io_executor ex_;
};

/// Runs every client against its own source, then checks the tally and each
/// source's account. Callback clients run on strands or on the pool itself.
template <typename Sources>
void stress(bool callback_strands) {
  using source = typename Sources::source;
  constexpr int clients = coroutine_clients + callback_clients;
  tally t;  // (declared before the context: its handlers refer to these)
  std::deque<timeline> tls(clients);
  running_context rc(io_threads);
  Sources sources(rc.ctx);  // destroyed before the context, as it must be
  std::vector<source*> src;
  for (int i = 0; i < clients; ++i) {
    tls[i].rng.seed(i + 1);
    tls[i].before = clk::now();
    src.push_back(&sources.make(i));
    tls[i].after = clk::now();
  }
  // At least stress_time(), and on until the race has gone both ways often
  // enough to mean anything (a loaded machine lands fewer cancellations in
  // the window, and CI must not fail by chance), for at most 20 s more.
  const auto start = clk::now();
  const auto end = start + stress_time() + std::chrono::seconds(20);
  for (auto& tl : tls)
    tl.end = end;
  for (int i = 0; i < coroutine_clients; ++i)
    asio::co_spawn(asio::make_strand(rc.ctx), coroutine_client(*src[i], tls[i], t), asio::detached);
  for (int i = coroutine_clients; i < clients; ++i) {
    asio::any_io_executor ex = rc.ctx.get_executor();
    if (callback_strands) ex = asio::make_strand(rc.ctx);
    asio::post(
        ex, [c = std::make_shared<callback_client<source>>(*src[i], tls[i], t, ex)] { c->next(); });
  }
  const auto enough = [&] { return t.granted.load() > 20u && t.aborted.load() > 20u; };
  while (clk::now() < end && (clk::now() < start + stress_time() || !enough()))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  t.stop = true;
  BOOST_TEST_REQUIRE(
      eventually([&] { return t.clients_done.load() == clients && t.emitters.load() == 0; },
                 stress_time() + std::chrono::seconds(60)));
  BOOST_TEST(t.completed.load() == t.started.load());
  BOOST_TEST(t.doubled.load() == 0u);
  BOOST_TEST(t.dropped.load() == 0u);
  BOOST_TEST(t.other.load() == 0u);
  // The race must have gone both ways many times to mean anything.
  BOOST_TEST(t.granted.load() > 20u);
  BOOST_TEST(t.aborted.load() > 20u);
  BOOST_TEST_MESSAGE((callback_strands ? "callbacks on strands: " : "callbacks on the pool: ")
                     << t.granted.load() << " granted, " << t.aborted.load() << " cancelled, "
                     << t.started.load() << " of them callback requests");
  const auto tokens = [](clk::duration d) {
    return static_cast<std::uint64_t>(std::chrono::nanoseconds(d).count()) / token_ns;
  };
  for (int i = 0; i < clients; ++i) {
    const auto before = clk::now();
    const std::uint64_t left = src[i]->available();
    const auto after = clk::now();
    // Never more than had accrued by the latest moment the count was read...
    BOOST_TEST(tls[i].granted + left <= tokens(after - tls[i].before) + 1, "client " << i);
    // ... and nothing missing by the earliest: no cancelled request took one.
    BOOST_TEST(tls[i].granted + left + 1 >= tokens(before - tls[i].after), "client " << i);
  }
}

}  // namespace

// (Coroutine clients on strands in all four.)
BOOST_AUTO_TEST_SUITE(cancellation_racing_the_grant)

BOOST_AUTO_TEST_CASE(callbacks_on_the_pool_token_bucket) {
  stress<bucket_sources>(false);
}

BOOST_AUTO_TEST_CASE(callbacks_on_strands_token_bucket) {
  stress<bucket_sources>(true);
}

BOOST_AUTO_TEST_CASE(callbacks_on_the_pool_keyed_limiter) {
  stress<key_sources>(false);
}

BOOST_AUTO_TEST_CASE(callbacks_on_strands_keyed_limiter) {
  stress<key_sources>(true);
}

BOOST_AUTO_TEST_SUITE_END()
