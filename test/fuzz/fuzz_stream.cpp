//
// test/fuzz/fuzz_stream.cpp: the rate-limited stream against its promise.
//
// The fuzz input configures a basic_rate_limited_stream over the fake next
// layer of test/support/fake_stream.hpp (short writes and reads, errors, EOF;
// it cannot wait for readability, so reads pay after reading), driven by a
// manual clock, with one of three limits (the same for reads and writes):
//   0  one token bucket alone (the direct path: no joint request),
//   1  that bucket and a second of 2 tokens a byte (a joint request),
//   2  that bucket and a key of a keyed limiter (capacity learned by halving).
// The first bucket's capacity never binds (2^50) and it starts empty, so it
// is exact: after each step with no operation in flight it must hold what
// accrued minus what was paid, exactly. A read delivers its bytes at once,
// paid if the limits hold their tokens then, else owed (documented: the next
// read pays a debt first); the stream's debt, read through a test-only
// accessor (support/stream_test_access.hpp), must be at most what the reads
// delivered and at most a slice, and the rest of what they delivered paid.
// At the end a last read pays the debt. The second bucket and the key may be small:
// requests larger than them are sliced (never `exceeds_capacity`), and at the
// end, idle long enough, they are full again (nothing held, nothing lost).
// Operations: a write or a read of 0..2500 bytes (with a cancellation slot;
// the fake's limit per call, its input, its error are input too), clock
// steps, per-operation cancellation of either (terminal, partial, total),
// cancel(), close(), a new slice, the limits set again (a new version to
// copy), and destruction of the stream (its operations abort; a new stream
// over the same limiters goes on). Every operation must complete exactly once,
// never inside its initiating call, its handler never destroyed uncalled; a
// read never completes with more than its buffer, a write never with more
// than it was given, and what a write reports is what reached the fake.
//
// Timers without real time, as in fuzz_bucket.cpp (BOOST_ASIO_DISABLE_TIMERFD
// and wait traits that return zero: polling until quiet delivers every due
// grant). Built as a libFuzzer target by scripts/fuzz (--target stream) and
// as a plain program replaying stream_corpus/ and stream_regressions/ in ctest
// (fuzz_stream_corpus_replay).
//
#if !defined(BOOST_ASIO_DISABLE_TIMERFD)
#error "build with BOOST_ASIO_DISABLE_TIMERFD (see fuzz_bucket.cpp)"
#endif

#include "fake_stream.hpp"
#include "manual_clock.hpp"
#include "stream_test_access.hpp"

#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/stream.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace asio = boost::asio;
using boost::system::error_code;
using ratelimit::test::fake_stream;
using ratelimit::test::manual_clock;

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
using keyed_type = ratelimit::basic_keyed_limiter<int, std::hash<int>, std::equal_to<int>,
                                                  manual_clock, zero_wait_traits>;
using stream_type =
    ratelimit::basic_rate_limited_stream<fake_stream, manual_clock, zero_wait_traits>;
using part_type = ratelimit::basic_part<manual_clock, zero_wait_traits>;

constexpr std::uint64_t huge = std::uint64_t{1} << 50;

[[noreturn]] void fail(const char* what, long long a = 0, long long b = 0) {
  std::fprintf(stderr, "fuzz_stream: %s (%lld vs %lld)\n", what, a, b);
  std::abort();
}

#define CHECK(cond, what, a, b)                                                    \
  do {                                                                             \
    if (!(cond)) fail(what, static_cast<long long>(a), static_cast<long long>(b)); \
  } while (0)

/// Reads the fuzz input; past its end every read returns 0.
class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool done() const { return p_ == end_; }
  std::uint8_t u8() { return p_ == end_ ? 0 : *p_++; }
  std::uint64_t u16() { return std::uint64_t{u8()} << 8 | u8(); }
  /// 0..n
  std::uint64_t upto(std::uint64_t n) { return u16() % (n + 1); }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

/// One operation's outcome, and whether its handler ran or was dropped.
struct record {
  int calls = 0;
  bool dropped = false;
  error_code ec;
  std::size_t n = 0;
  std::size_t size = 0;  // the buffer's
};

class handler {
 public:
  explicit handler(record* r) : r_(r) {}
  handler(handler&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
  handler& operator=(handler&&) = delete;
  ~handler() {
    if (r_) r_->dropped = true;
  }
  void operator()(error_code ec, std::size_t n) {
    if (!r_) fail("a moved-from handler was called");
    record* r = std::exchange(r_, nullptr);
    ++r->calls;
    r->ec = ec;
    r->n = n;
  }

 private:
  record* r_;
};

class harness {
 public:
  explicit harness(reader& in) : in_(in) {
    manual_clock::reset();
    mode_ = in_.u8() % 3;
    const std::uint64_t per_ms = 1 + in_.u8() % 8;  // bytes per ms of the exact bucket
    one_.emplace(ctx_, huge, ratelimit::rate{per_ms, std::chrono::milliseconds(1)},
                 ratelimit::start_empty);
    per_ms_ = per_ms;
    const std::uint64_t small = 1 + in_.upto(4000);  // the other limit's capacity
    two_.emplace(ctx_, small, ratelimit::rate{2 * per_ms, std::chrono::milliseconds(1)});
    keys_.emplace(ctx_, small, ratelimit::rate{per_ms, std::chrono::milliseconds(1)}, 4);
    slice_ = 1 + in_.upto(700);
    max_slice_ = std::max<std::uint64_t>(max_slice_, slice_);
    open();
  }

  void run() {
    for (int steps = 0; !in_.done() && steps < 200; ++steps)
      step();
    finish();
  }

 private:
  std::vector<part_type> limits() {
    switch (mode_) {
      case 0:
        return {part_type(*one_)};
      case 1:
        return {part_type(*one_), part_type(*two_, 2)};
      default:
        return {part_type(*one_), part_type(*keys_, 1)};
    }
  }

  void open() {
    stream_.emplace(ctx_.get_executor());
    stream_->set_limits(limits());
    stream_->set_slice(slice_);
  }

  fake_stream& next() { return stream_->next_layer(); }

  void step() {
    const int op = in_.u8() % 14;
    if (trace_)
      std::fprintf(stderr, "step %d at %llu ms: one %llu, paid %llu, debt %llu\n", op,
                   static_cast<unsigned long long>(elapsed_ms_),
                   static_cast<unsigned long long>(one_->available()),
                   static_cast<unsigned long long>(paid_), static_cast<unsigned long long>(debt_));
    switch (op) {
      case 0:
      case 1:
        write();
        break;
      case 2:
      case 3:
        read();
        break;
      case 4:
      case 5:
        advance(in_.upto(400));
        break;
      case 6: {
        const asio::cancellation_type types[] = {asio::cancellation_type::terminal,
                                                 asio::cancellation_type::partial,
                                                 asio::cancellation_type::total};
        const std::uint8_t k = in_.u8();
        ((k & 1) ? wsig_ : rsig_).emit(types[k / 2 % 3]);
        break;
      }
      case 7:
        if (!reading()) {  // (a paying read pays in the slices it began with)
          slice_ = 1 + in_.upto(700);
          max_slice_ = std::max<std::uint64_t>(max_slice_, slice_);
          max_slice_ = std::max<std::uint64_t>(max_slice_, slice_);
          stream_->set_slice(slice_);
        }
        break;
      case 8: {
        const std::uint8_t k = in_.u8() % 4;
        next().fail_with = k == 0 ? error_code(asio::error::connection_reset) : error_code();
        break;
      }
      case 9:
        next().incoming.append(in_.upto(1500), 'i');
        break;
      case 10:
        stream_->cancel();
        break;
      case 11:
        stream_->close();
        closed_ = true;
        break;
      case 12:
        stream_->set_limits(limits());  // the same limits: a new version to copy
        break;
      default:  // the stream goes; a new one over the same limiters
        destroy_stream();
        open();
        closed_ = false;
        break;
    }
    settle();
    collect();
    if (!writing() && !reading()) check_exact(false);
  }

  bool writing() const { return w_ && w_->calls == 0; }
  bool reading() const { return r_ && r_->calls == 0; }

  void write() {
    if (writing()) return;
    const std::size_t size = in_.upto(2500);
    next().max_write = in_.u8() % 4 == 0 ? 1 + in_.upto(500) : SIZE_MAX;
    w_ = std::make_unique<record>();
    w_->size = size;
    before_write_ = next().written.size();
    record* rec = w_.get();
    stream_->async_write_some(asio::buffer(wbuf_.data(), size),
                              asio::bind_cancellation_slot(wsig_.slot(), handler(rec)));
    CHECK(rec->calls == 0, "a write completed inside its initiating call", 0, 0);
  }

  void read() {
    if (reading()) return;
    const std::size_t size = in_.upto(2500);
    next().max_read = 1 + in_.upto(800);
    start_read(size);
  }

  void start_read(std::size_t size) {
    r_ = std::make_unique<record>();
    r_->size = size;
    record* rec = r_.get();
    stream_->async_read_some(asio::buffer(rbuf_.data(), size),
                             asio::bind_cancellation_slot(rsig_.slot(), handler(rec)));
    CHECK(rec->calls == 0, "a read completed inside its initiating call", 0, 0);
  }

  void advance(std::uint64_t ms) {
    manual_clock::advance(std::chrono::milliseconds(ms));
    elapsed_ms_ += ms;
  }

  /// Runs the io_context until it has nothing to run (a busy loop is a hang).
  void settle() {
    for (int i = 0;; ++i) {
      ctx_.restart();
      if (ctx_.poll_one() == 0) return;
      if (i == 1'000'000) fail("the io_context does not settle", i, 0);
    }
  }

  /// Accounts the operations that completed.
  void collect() {
    if (trace_) {
      if (w_ && w_->calls)
        std::fprintf(stderr, "  write of %zu: %s, %zu\n", w_->size, w_->ec.message().c_str(),
                     w_->n);
      if (r_ && r_->calls)
        std::fprintf(stderr, "  read of %zu: %s, %zu\n", r_->size, r_->ec.message().c_str(), r_->n);
    }
    if (w_ && w_->calls != 0) {
      CHECK(w_->calls == 1, "a write completed more than once", w_->calls, 1);
      CHECK(!w_->dropped, "a write's handler was dropped", 0, 0);
      CHECK(w_->n <= w_->size, "a write moved more than its buffer", w_->n, w_->size);
      // What it reports is what reached the next layer (a failed write moves nothing).
      CHECK(next().written.size() == before_write_ + w_->n,
            "a write reported other than what it wrote", next().written.size() - before_write_,
            w_->n);
      if (w_->ec && !expected(w_->ec))
        fail("a write failed with an unexpected error", w_->ec.value(), 0);
      paid_ += w_->n;
      moved_ += w_->n;
      w_.reset();
    }
    if (r_ && r_->calls != 0) {
      CHECK(r_->calls == 1, "a read completed more than once", r_->calls, 1);
      CHECK(!r_->dropped, "a read's handler was dropped", 0, 0);
      CHECK(r_->n <= r_->size, "a read delivered more than its buffer", r_->n, r_->size);
      if (r_->ec && !expected(r_->ec) && r_->ec != asio::error::eof)
        fail("a read failed with an unexpected error", r_->ec.value(), 0);
      last_read_ec_ = r_->ec;
      // Paid if the limits held its tokens when it read, else owed (and
      // always owed when delivered with an error): the next read pays a debt
      // first. The model does not tell which: some or all of it is debt.
      debt_ += r_->n;
      moved_ += r_->n;
      r_.reset();
    }
  }

  /// The errors an operation may complete with: the next layer's, an
  /// abort, and exceeds_capacity only where one byte needs more tokens than
  /// a limit holds (the second bucket of capacity 1 at 2 tokens a byte).
  bool expected(const error_code& ec) const {
    return ec == asio::error::operation_aborted || ec == asio::error::connection_reset ||
           (ec == ratelimit::error::exceeds_capacity && mode_ == 1 && two_->capacity() < 2);
  }

  /// With no read in flight, the stream's debt is exact: what the reads
  /// delivered and did not pay yet. The rest of the model's `debt_` is paid.
  /// A debt is at most one read's bytes (a read pays the debt before it
  /// reads), so at most the largest slice used.
  void settle_debt() {
    collect();
    const std::uint64_t owed = ratelimit::detail::stream_test_access::read_debt(*stream_);
    CHECK(owed <= debt_, "the stream owes more than its reads delivered", owed, debt_);
    CHECK(owed <= max_slice_, "a debt of more than a slice", owed, max_slice_);
    paid_ += debt_ - owed;
    debt_ = owed;
  }

  /// The exact bucket holds what accrued minus what was paid (a debt is
  /// not paid yet), up to the debts of streams destroyed with a read in
  /// flight (`unsure_`: they may have been paid in part).
  void check_exact(bool final) {
    if (stream_ && !reading()) settle_debt();
    const std::int64_t accrued = static_cast<std::int64_t>(elapsed_ms_ * per_ms_);
    const std::int64_t want = accrued - static_cast<std::int64_t>(paid_);
    const std::int64_t got = static_cast<std::int64_t>(one_->available());
    const std::int64_t slack =
        static_cast<std::int64_t>((final ? 0 : unsure_in_flight()) + unsure_);
    CHECK(got <= want, "the exact bucket lost more than was paid", got, want);
    CHECK(got >= want - slack, "the exact bucket lost more than moved (a token leaked)", got,
          want - slack);
  }

  /// A debt not settled (a read in flight) may be paid in part.
  std::uint64_t unsure_in_flight() const { return reading() ? debt_ : 0; }

  void destroy_stream() {
    const bool exact = !reading();
    if (exact) settle_debt();
    stream_.reset();
    settle();
    collect();
    if (w_ || r_) fail("an operation outlived its stream's destruction", 0, 0);
    // A destroyed stream's debt is nobody's now: never paid when it was
    // exact; else it may have been paid in part.
    if (exact) {
      debt_ = 0;
    } else {
      unsure_ += debt_;
      debt_ = 0;
    }
  }

  /// Moves the clock on (a second at a time: a limit of capacity 1 refills
  /// one byte's worth at a time) until nothing is in flight; false if
  /// something still is after 20 000 s.
  bool drain() {
    for (int i = 0; i < 20000 && (writing() || reading()); ++i) {
      advance(1000);
      settle();
      collect();
    }
    return !writing() && !reading();
  }

  void finish() {
    // Everything in flight completes: errors cleared, the clock far on.
    next().fail_with = {};
    drain();
    CHECK(!writing() && !reading(), "an operation never completed", writing(), reading());
    // A last read pays any debt, then meets the end of the input.
    // (With a limit that holds less than a byte's tokens, nothing is ever paid.)
    const bool payable = !(mode_ == 1 && two_->capacity() < 2);
    settle_debt();
    if (!closed_ && debt_ != 0 && payable) {
      next().incoming.clear();
      start_read(100);  // (not empty: a read of nothing pays nothing)
      const bool eof = drain() && last_read_ec_ == asio::error::eof;
      collect();
      CHECK(eof, "the last read did not meet the end of the input", 0, 0);
      settle_debt();
      CHECK(debt_ == 0, "the last read did not pay the debt", debt_, 0);
    }
    // (Closed or unpayable: nothing pays a debt, exactly; check_exact knows.)
    check_exact(true);
    // The small limits, idle long enough, are full again: nothing held.
    advance(1'000'000);
    settle();
    const std::uint64_t cap = two_->capacity();
    CHECK(two_->available() == cap, "the second bucket is not full at the end", two_->available(),
          cap);
    CHECK(keys_->available(1) == keys_->get_quota(1).capacity, "the key is not full at the end",
          keys_->available(1), keys_->get_quota(1).capacity);
    stream_.reset();
    settle();
  }

  // RATELIMIT_FUZZ_TRACE=1: print every step (to understand a finding).
  const bool trace_ = std::getenv("RATELIMIT_FUZZ_TRACE") != nullptr;
  reader& in_;
  asio::io_context ctx_{1};
  int mode_ = 0;
  std::uint64_t per_ms_ = 1;
  std::size_t slice_ = 1;
  std::uint64_t max_slice_ = 0;  // the largest slice set so far
  std::optional<bucket_type> one_, two_;
  std::optional<keyed_type> keys_;
  std::optional<stream_type> stream_;
  bool closed_ = false;
  std::string wbuf_ = std::string(2500, 'w');
  std::vector<char> rbuf_ = std::vector<char>(2500);
  asio::cancellation_signal wsig_, rsig_;
  std::unique_ptr<record> w_, r_;
  std::size_t before_write_ = 0;
  error_code last_read_ec_;
  std::uint64_t elapsed_ms_ = 0, paid_ = 0, debt_ = 0, unsure_ = 0, moved_ = 0;
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
  return ratelimit::test::fuzz_replay_main("fuzz_stream_replay", "all kept the promise", argc, argv,
                                           LLVMFuzzerTestOneInput);
}
#endif
