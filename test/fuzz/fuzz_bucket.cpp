//
// test/fuzz/fuzz_bucket.cpp: the bucket against the reference model.
//
// The fuzz input is decoded into a sequence of operations on a bucket driven
// by a manual clock: advance the clock (or move it back), request n tokens,
// try_get_token, cancel request k through its cancellation slot, cancel all,
// set_rate, set_capacity, close, destroy (and start a new bucket), move the
// clock to the instant the first waiter is due (or 1 ns either side). After each
// step the harness lets the io_context run until it is quiet and compares the
// bucket with test/model/token_bucket_model.hpp: which requests completed, in
// what order, with which error; available(), waiting(), capacity(), the rate,
// is_open(), metrics() (what the model counted). At the end the bucket is destroyed and every
// request must have completed exactly once.
//
// Timers without real time: the bucket's clock is the manual clock, and the
// wait traits return zero, so the reactor never sleeps; this file is built
// with BOOST_ASIO_DISABLE_TIMERFD, so every reactor pass (each poll()) checks
// the timer queue against the manual clock. After a clock move, polling until
// poll() runs nothing therefore delivers every due grant, deterministically.
//
// Built two ways (test/fuzz/CMakeLists.txt, scripts/fuzz): with clang and
// -fsanitize=fuzzer as the libFuzzer target, and with the project's compiler
// and RATELIMIT_FUZZ_REPLAY as a plain program that replays the corpus
// (files or directories given on the command line): a ctest regression test.
//
#if !defined(BOOST_ASIO_DISABLE_TIMERFD)
#error "build with BOOST_ASIO_DISABLE_TIMERFD (see the comment above)"
#endif

#include "../model/token_bucket_model.hpp"
#include "manual_clock.hpp"

#include <ratelimit/metrics.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <limits>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>

namespace {

using ratelimit::test::manual_clock;
namespace model = ratelimit::model;

/// The reactor never sleeps: due or not, a timer is re-checked on every pass.
struct zero_wait_traits {
  static manual_clock::duration to_wait_duration(const manual_clock::duration&) {
    return manual_clock::duration::zero();
  }
  static manual_clock::duration to_wait_duration(const manual_clock::time_point&) {
    return manual_clock::duration::zero();
  }
};

using bucket_type = ratelimit::basic_token_bucket<manual_clock, zero_wait_traits>;
constexpr std::int64_t max_time = std::numeric_limits<std::int64_t>::max();
constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();

[[noreturn]] void fail(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
  std::fprintf(stderr, "fuzz_bucket: %s (%llu vs %llu)\n", what, a, b);
  std::abort();
}

#define CHECK_EQ(a, b, what)                                                                \
  do {                                                                                      \
    const auto va = (a);                                                                    \
    const auto vb = (b);                                                                    \
    if (!(va == vb))                                                                        \
      fail(what, static_cast<unsigned long long>(va), static_cast<unsigned long long>(vb)); \
  } while (0)

/// Reads the fuzz input; past its end every read returns 0.
class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool done() const { return p_ == end_; }
  std::uint8_t u8() { return p_ == end_ ? 0 : *p_++; }
  std::uint64_t bytes(int n) {
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i)
      v = v << 8 | u8();
    return v;
  }

  /// A token count: small ones mostly, and the edges.
  std::uint64_t count(std::uint64_t capacity) {
    const std::uint8_t k = u8();
    switch (k % 8) {
      case 0:
        return capacity;
      case 1:
        return capacity + 1;  // wraps to 0 for the largest capacity
      case 2:
        return u64_max;
      case 3:
        return bytes(8);
      case 4:
        return 0;
      default:
        return k / 8 % 16;
    }
  }

  /// A capacity (0 is invalid and must be refused).
  std::uint64_t capacity() {
    const std::uint8_t k = u8();
    switch (k % 8) {
      case 0:
        return u64_max;
      case 1:
        return u64_max / 2 + 1;
      case 2:
        return bytes(8);
      case 3:
        return 0;
      default:
        return 1 + k / 8 % 20;
    }
  }

  /// A rate, valid or not: tokens may be 0, the period 0 or negative.
  model::model_rate rate() {
    const std::uint8_t k = u8();
    std::uint64_t tokens;
    switch (k % 8) {
      case 0:
        tokens = u64_max;
        break;
      case 1:
        tokens = bytes(8);
        break;
      case 2:
        tokens = 0;
        break;
      default:
        tokens = 1 + k / 8 % 10;
    }
    const std::uint8_t j = u8();
    std::int64_t period;
    switch (j % 8) {
      case 0:
        period = max_time;
        break;
      case 1:
        period = static_cast<std::int64_t>(bytes(8));
        break;  // may be <= 0
      case 2:
        period = 0;
        break;
      case 3:
        period = 1 + j / 8 % 1000;  // ns: fractions of a token everywhere
        break;
      default:
        period = std::int64_t{1 + j / 8 % 32} * 1'000'000;  // 1 ms .. 32 ms
    }
    return {tokens, period};
  }

  /// A clock step in ns: mostly around the token intervals above, sometimes huge.
  std::int64_t step() {
    const std::uint8_t k = u8();
    switch (k % 8) {
      case 0:
        return 0;
      case 1:
        return static_cast<std::int64_t>(bytes(8) >> 1);
      case 2:
        return 1;
      case 3:
        return std::int64_t{1} << (u8() % 63);
      default:
        return static_cast<std::int64_t>(bytes(2)) * 10'000;  // up to 655 ms
    }
  }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

model::result classify(const boost::system::error_code& ec) {
  if (!ec) return model::result::granted;
  if (ec == ratelimit::error::exceeds_capacity) return model::result::exceeds_capacity;
  if (ec == ratelimit::error::bucket_closed) return model::result::closed;
  if (ec == boost::asio::error::operation_aborted) return model::result::aborted;
  fail("unexpected error code", static_cast<unsigned long long>(ec.value()));
}

struct request_record {
  boost::asio::cancellation_signal signal;
  int calls = 0;
  bool destroyed_uncalled = false;
  std::optional<ratelimit::receipt> receipt;  // an async_acquire's, once granted
  std::uint64_t held = 0;                     // what the receipt should still hold
};

/// A receipt of try_acquire, with what it should still hold.
struct try_record {
  ratelimit::receipt receipt;
  std::uint64_t held;
  std::uint64_t bucket;  // the bucket's number (receipts of old buckets give back to nothing)
};

class harness {
 public:
  explicit harness(reader& in) : in_(in) { manual_clock::reset(); }

  void run() {
    open();
    for (int steps = 0; !in_.done() && steps < 256; ++steps)
      step();
    destroy();
    settle();
    compare_completions();
    for (const request_record& r : requests_) {
      CHECK_EQ(r.calls, 1, "a request did not complete exactly once");
      CHECK_EQ(r.destroyed_uncalled, false, "a handler was destroyed uncalled");
    }
  }

 private:
  class handler {
   public:
    handler(harness* h, std::uint64_t id) : h_(h), id_(id) {}
    handler(handler&& o) noexcept : h_(o.h_), id_(o.id_), live_(std::exchange(o.live_, false)) {}
    handler& operator=(handler&&) = delete;
    ~handler() {
      if (live_) h_->requests_[id_].destroyed_uncalled = true;
    }
    void operator()(boost::system::error_code ec) {
      if (!live_) fail("moved-from handler invoked");
      live_ = false;
      ++h_->requests_[id_].calls;
      h_->delivered_.push_back({id_, classify(ec)});
    }

    /// async_acquire's completion: the receipt holds what was granted, or nothing.
    void operator()(boost::system::error_code ec, ratelimit::receipt r) {
      request_record& rec = h_->requests_[id_];
      CHECK_EQ(r.granted(), ec ? std::uint64_t{0} : rec.held, "receipt granted()");
      CHECK_EQ(r.held(), r.granted(), "a new receipt holds what it granted");
      rec.held = r.held();
      rec.receipt.emplace(std::move(r));
      (*this)(ec);
    }

   private:
    harness* h_;
    std::uint64_t id_;
    bool live_ = true;
  };

  static std::int64_t now() { return manual_clock::now().time_since_epoch().count(); }

  /// A new bucket and model, configured from the input (a refused
  /// configuration must be refused by both, then a valid one is used).
  void open() {
    std::uint64_t capacity = in_.capacity();
    model::model_rate r = in_.rate();
    std::uint64_t initial = in_.count(capacity);
    const bool model_ok = [&] {
      try {
        model::token_bucket_model m(capacity, r, initial, now());
        return true;
      } catch (const std::invalid_argument&) {
        return false;
      }
    }();
    bool bucket_ok = true;
    try {
      bucket_type b(ctx_, capacity, ratelimit::rate{r.tokens, std::chrono::nanoseconds(r.period)},
                    ratelimit::initial_tokens{initial});
    } catch (const std::invalid_argument&) {
      bucket_ok = false;
    }
    CHECK_EQ(bucket_ok, model_ok, "construction accepted by one, refused by the other");
    if (!model_ok) {
      capacity = 1 + capacity % 16;
      r = {1 + r.tokens % 4, std::int64_t{1'000'000}};
      initial = capacity;
    }
    base_ = requests_.size();
    model_.emplace(capacity, r, initial, now());
    bucket_.emplace(ctx_, capacity, ratelimit::rate{r.tokens, std::chrono::nanoseconds(r.period)},
                    ratelimit::initial_tokens{initial});
    seen_ = 0;
  }

  void destroy() {
    bucket_.reset();
    model_->destroy(now());
    ++buckets_;
  }

  /// Gives back k tokens of a receipt chosen by the input (an async_acquire's
  /// or a try_acquire's, of this bucket or of one destroyed): it returns
  /// min(k, what it holds), never more in all; the current bucket's level
  /// rises by that (the model's), an old bucket's receipt gives to nothing.
  void give_back(std::uint8_t op) {
    const std::size_t choices = requests_.size() + tries_.size();
    if (choices == 0) return;
    const std::size_t i = in_.bytes(2) % choices;
    const std::uint64_t k = in_.count(model_->capacity() + 1);
    ratelimit::receipt* r;
    std::uint64_t* held;
    bool current;
    if (i < requests_.size()) {
      request_record& rec = requests_[i];
      if (!rec.receipt) return;  // not an acquire, or not granted (yet)
      r = &*rec.receipt;
      held = &rec.held;
      current = i >= base_;
    } else {
      try_record& t = tries_[i - requests_.size()];
      r = &t.receipt;
      held = &t.held;
      current = t.bucket == buckets_;
    }
    const std::uint64_t g = std::min(k, *held);
    if (trace_)
      std::fprintf(stderr, "  give back %llu of %llu (%s bucket, op %d)\n",
                   static_cast<unsigned long long>(k), static_cast<unsigned long long>(*held),
                   current ? "this" : "an old", op);
    if (current) model_->give_back(g, now());
    CHECK_EQ(r->give_back(k), g, "give_back() returned");
    *held -= g;
    CHECK_EQ(r->held(), *held, "held()");
  }

  void step() {
    const std::uint8_t op = in_.u8();
    if (trace_)
      std::fprintf(stderr, "step op %d (%d) at %lld: waiting %zu, delivered %zu\n", op % 16, op,
                   static_cast<long long>(now()), model_->waiting(), delivered_.size());
    bool poll = true;
    switch (op % 16) {
      case 0:
      case 1:
      case 2: {  // advance the clock
        const std::int64_t d = in_.step();
        const std::int64_t t = now();
        manual_clock::set(
            manual_clock::time_point(manual_clock::duration(t > max_time - d ? max_time : t + d)));
        break;
      }
      case 3: {  // move the clock back (the model keeps the latest time seen)
        const std::int64_t d = in_.step();
        const std::int64_t t = now();
        const std::int64_t min_time = std::numeric_limits<std::int64_t>::min();
        manual_clock::set(
            manual_clock::time_point(manual_clock::duration(t < min_time + d ? min_time : t - d)));
        break;
      }
      case 4:
      case 5:
      case 6: {  // async_get_token(n), with a cancellation slot
        const std::uint64_t n = in_.count(model_->capacity());
        poll = (op & 0x80) == 0;
        const std::uint64_t id = requests_.size();
        requests_.emplace_back();
        const std::uint64_t model_id = model_->request(n, now());
        CHECK_EQ(base_ + model_id, id, "request ids out of step");
        auto h =
            boost::asio::bind_cancellation_slot(requests_.back().signal.slot(), handler(this, id));
        if (op % 16 == 6 && (op & 0x40)) {  // the same request, with a receipt
          requests_.back().held = n;        // (what it will grant, if it does)
          bucket_->async_acquire(n, std::move(h));
        } else {
          bucket_->async_get_token(n, std::move(h));
        }
        break;
      }
      case 7: {  // try_get_token(n), or try_acquire(n)
        const std::uint64_t n = in_.count(model_->capacity());
        poll = (op & 0x80) == 0;
        if (op & 0x40) {
          auto r = bucket_->try_acquire(n);
          CHECK_EQ(r.has_value(), model_->try_get(n, now()), "try_acquire");
          if (r) {
            CHECK_EQ(r->granted(), n, "try_acquire's receipt");
            tries_.push_back({std::move(*r), n, buckets_});
          }
        } else {
          CHECK_EQ(bucket_->try_get_token(n), model_->try_get(n, now()), "try_get_token");
        }
        break;
      }
      case 8:
      case 9: {  // per-operation cancellation of request k (queued, done, or of an old bucket)
        if (requests_.empty()) break;
        const std::uint64_t id = in_.bytes(2) % requests_.size();
        poll = (op & 0x80) == 0;
        using ct = boost::asio::cancellation_type;
        const ct types[] = {ct::terminal, ct::partial, ct::total, ct::none};
        const ct type = types[op >> 5 & 3];
        if (type != ct::none && id >= base_) model_->cancel(id - base_, now());
        requests_[id].signal.emit(type);
        break;
      }
      case 10: {
        if ((op & 0x60) == 0x60) {  // give back k tokens of a receipt
          give_back(op);
          break;
        }
        // cancel()
        const std::size_t expected = model_->cancel_all(now());
        CHECK_EQ(bucket_->cancel(), expected, "cancel() count");
        break;
      }
      case 11: {  // set_rate
        const model::model_rate r = in_.rate();
        bool model_ok = true, bucket_ok = true;
        try {
          model_->set_rate(r, now());
        } catch (const std::invalid_argument&) {
          model_ok = false;
        }
        try {
          bucket_->set_rate(ratelimit::rate{r.tokens, std::chrono::nanoseconds(r.period)});
        } catch (const std::invalid_argument&) {
          bucket_ok = false;
        }
        CHECK_EQ(bucket_ok, model_ok, "set_rate accepted by one, refused by the other");
        break;
      }
      case 12: {  // set_capacity
        const std::uint64_t c = in_.capacity();
        bool model_ok = true, bucket_ok = true;
        try {
          model_->set_capacity(c, now());
        } catch (const std::invalid_argument&) {
          model_ok = false;
        }
        try {
          bucket_->set_capacity(c);
        } catch (const std::invalid_argument&) {
          bucket_ok = false;
        }
        CHECK_EQ(bucket_ok, model_ok, "set_capacity accepted by one, refused by the other");
        break;
      }
      case 13:  // close()
        model_->close(now());
        bucket_->close();
        break;
      case 14: {  // destroy, then a new bucket
        destroy();
        settle();
        compare_completions();
        open();
        break;
      }
      default: {  // move the clock to when the first waiter is due: exactly, 1 ns before or after
        const auto due = model_->head_ready_at();
        const int delta = in_.u8() % 3 - 1;
        if (!due || *due <= now()) break;
        const std::int64_t t = delta > 0 && *due == max_time ? *due : *due + delta;
        manual_clock::set(manual_clock::time_point(manual_clock::duration(t)));
        break;
      }
    }
    if (!poll) {
      // Nothing may have run inside the initiating function or the canceller.
      CHECK_EQ(delivered_.size(), expected_.size(), "a handler ran inline");
      return;
    }
    settle();
    model_->serve_due(now());
    compare_completions();
    CHECK_EQ(bucket_->available(), model_->available(now()), "available()");
    // retry_after: for 0, 1, all and one more than all tokens (reads no
    // input, and serves only what available() just served).
    for (const std::uint64_t n :
         {std::uint64_t{0}, std::uint64_t{1}, model_->capacity(), model_->capacity() + 1}) {
      const auto got = bucket_->retry_after(n);
      const auto want = model_->retry_after(n, now());
      CHECK_EQ(got.has_value(), want.has_value(), "retry_after() given");
      if (got && want) CHECK_EQ(got->count(), *want, "retry_after()");
    }
    CHECK_EQ(bucket_->waiting(), model_->waiting(), "waiting()");
    CHECK_EQ(bucket_->capacity(), model_->capacity(), "capacity()");
    CHECK_EQ(bucket_->get_rate().tokens, model_->rate().tokens, "get_rate().tokens");
    CHECK_EQ(bucket_->get_rate().period.count(), model_->rate().period, "get_rate().period");
    CHECK_EQ(bucket_->is_open(), model_->is_open(), "is_open()");
    check_metrics();
  }

  /// metrics() against what the model counted (every request made and how it
  /// ended, each grant's wait), with the gauges as the model has them now.
  void check_metrics() {
    const ratelimit::limiter_metrics m = bucket_->metrics();
    const model::token_bucket_model::counts& c = model_->counted();
    namespace rerr = ratelimit::error;
    CHECK_EQ(m.requests, c.requests, "metrics: requests");
    CHECK_EQ(m.grants, c.waits.size(), "metrics: grants");
    CHECK_EQ(m.refusals, c.refusals, "metrics: refusals");
    CHECK_EQ(m.cancellations, c.cancellations, "metrics: cancellations");
    CHECK_EQ(m.deadline_expiries, 0u, "metrics: deadline expiries");
    CHECK_EQ(m.errors[rerr::bucket_closed], c.closed, "metrics: bucket_closed errors");
    CHECK_EQ(m.errors[rerr::exceeds_capacity], c.over_capacity, "metrics: exceeds_capacity errors");
    std::uint64_t errors = 0;
    for (std::uint64_t e : m.errors)
      errors += e;
    CHECK_EQ(errors, c.closed + c.over_capacity, "metrics: errors of other kinds");
    // Modulo 2^64, as the counters wrap (capacities near 2^64 add up past it).
    CHECK_EQ(m.tokens_granted, static_cast<std::uint64_t>(model_->granted_tokens()),
             "metrics: tokens granted");
    CHECK_EQ(m.tokens_given_back, static_cast<std::uint64_t>(model_->given_back_tokens()),
             "metrics: tokens given back");
    std::array<std::uint64_t, ratelimit::wait_histogram_layout::buckets> hist{};
    std::uint64_t sum_us = 0;
    for (const std::uint64_t w : c.waits) {  // (a wait past INT64_MAX ns: the last bucket)
      ++hist[ratelimit::wait_histogram_layout::bucket_of(
          static_cast<std::int64_t>(std::min<std::uint64_t>(w, max_time)))];
      sum_us += w / 1000;
    }
    for (std::size_t b = 0; b < hist.size(); ++b)
      CHECK_EQ(m.wait_counts[b], hist[b], "metrics: a wait histogram bucket");
    CHECK_EQ(m.wait_sum_us, sum_us, "metrics: the sum of the waits");
    CHECK_EQ(m.queued_requests, model_->waiting(), "metrics: queued requests");
    CHECK_EQ(m.tokens_available, model_->waiting() == 0 ? model_->available(now()) : 0,
             "metrics: available tokens (none while requests wait)");
  }

  /// Runs the io_context until it has nothing to run (every due timer has
  /// fired, every completion has run), one handler at a time: a bucket that
  /// keeps it busy (a timer that keeps firing) is a hang, reported as such.
  void settle() {
    for (int i = 0;; ++i) {
      ctx_.restart();
      if (ctx_.poll_one() == 0) return;
      if (i == 100'000) fail("io_context does not settle: the bucket keeps it busy");
    }
  }

  /// The completions delivered so far must be exactly the model's, in order.
  void compare_completions() {
    const auto& mc = model_->completions();
    for (; seen_ < mc.size(); ++seen_)
      expected_.push_back({base_ + mc[seen_].id, mc[seen_].how});
    if (trace_ || delivered_.size() != expected_.size()) {
      for (const auto& c : delivered_)
        std::fprintf(stderr, " got %llu:%d", (unsigned long long)c.id, int(c.how));
      std::fprintf(stderr, "\n");
      for (const auto& c : expected_)
        std::fprintf(stderr, " exp %llu:%d", (unsigned long long)c.id, int(c.how));
      std::fprintf(stderr, "\n");
    }
    CHECK_EQ(delivered_.size(), expected_.size(), "number of completions");
    for (std::size_t& i = compared_; i < expected_.size(); ++i) {
      CHECK_EQ(delivered_[i].id, expected_[i].id, "completion order (request id)");
      CHECK_EQ(static_cast<int>(delivered_[i].how), static_cast<int>(expected_[i].how),
               "completion result");
    }
  }

  // RATELIMIT_FUZZ_TRACE=1: print every step (to understand a finding).
  const bool trace_ = std::getenv("RATELIMIT_FUZZ_TRACE") != nullptr;
  reader& in_;
  boost::asio::io_context ctx_{1};
  std::deque<request_record> requests_;       // stable addresses for the signals
  std::vector<model::completion> delivered_;  // as the handlers ran (global ids)
  std::vector<model::completion> expected_;   // as the models said (global ids)
  std::optional<bucket_type> bucket_;
  std::optional<model::token_bucket_model> model_;
  std::deque<try_record> tries_;
  std::uint64_t buckets_ = 0;  // buckets destroyed so far (the current one's number)
  std::uint64_t base_ = 0;     // global id of the current model's request 0
  std::size_t seen_ = 0;       // model completions copied to expected_
  std::size_t compared_ = 0;   // completions known to match
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader in(data, size);
  harness h(in);
  h.run();
  return 0;
}

#if defined(RATELIMIT_FUZZ_REPLAY)
#include "fuzz_replay.hpp"

int main(int argc, char** argv) {
  return ratelimit::test::fuzz_replay_main("fuzz_bucket_replay", "all match the model", argc, argv,
                                           LLVMFuzzerTestOneInput);
}
#endif
