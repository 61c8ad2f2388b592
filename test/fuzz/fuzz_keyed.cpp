//
// test/fuzz/fuzz_keyed.cpp: the keyed limiter against its reference model.
//
// The fuzz input configures a basic_keyed_limiter<int> (capacity, rate,
// max_keys 1-4, keys 0..K-1 with K 1-6; invalid configurations must be refused
// by both) driven by a manual clock, then decodes a sequence of operations:
// advance the clock (or move it back, or to the instant a key's first waiter is
// due, its bucket is full again, or its cancelled request would have been
// served and refilled: exactly, or 1 ns either side), async_get_token(key, n)
// with a cancellation slot, try_get_token(key, n), cancel request k through its
// slot, cancel(), close(), evict(), a change of quota (the default rate or
// capacity, a key's own rate, capacity or both, reset_quota), destroy (and start
// a new limiter). Each is
// applied to test/model/keyed_limiter_model.hpp too. Which key an eviction
// removes is not promised: the harness observes it through contains() and the
// model checks that it was allowed (see the model's header comment).
//
// After each step the harness lets the io_context run until it is quiet, reads
// available(key) and contains(key) for every key, size() and is_open(), and
// compares them with the model, and the step's completions: the same requests
// with the same results, and for each key in the model's order (the order
// across keys is not promised: timers of different keys due in the same pass
// complete in the reactor's order). At the end the limiter is destroyed and
// every request must have completed exactly once.
//
// Steps that do not run the io_context: a request or a cancellation may be
// followed at once by the next operation (no handler may have run inside the
// initiating function or the canceller), and a clock advance may be followed by
// one operation before any timer fires, so that the limiter meets buckets whose
// waiters are due but not yet granted. Every clock move is preceded by a full
// comparison, so each bucket has seen every clock reading before the clock
// moves (and the model's buckets the same ones).
//
// Timers without real time: as in fuzz_bucket.cpp (the manual clock, wait
// traits that return zero, BOOST_ASIO_DISABLE_TIMERFD), polling the io_context
// until it runs nothing delivers every due grant, deterministically.
//
// Built two ways, like fuzz_bucket.cpp: with clang and -fsanitize=fuzzer as a
// libFuzzer target, and with RATELIMIT_FUZZ_REPLAY as a plain program that
// replays files or directories (ctest: fuzz_keyed_corpus_replay, which replays
// keyed_corpus/: the hand-written seeds of keyed_seeds.py, one per rule, and a
// fuzzed corpus minimised with -merge=1; and keyed_regressions/: every input
// that found a bug). The libFuzzer build, by hand as scripts/fuzz builds
// fuzz_bucket:
//   clang++-14 -std=c++20 -O2 -g -fno-omit-frame-pointer
//     -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
//     -DBOOST_ASIO_DISABLE_TIMERFD -DRATELIMIT_HEADER_ONLY -DBOOST_ASIO_NO_DEPRECATED
//     -Iinclude -Itest/support test/fuzz/fuzz_keyed.cpp -o build/fuzz/fuzz_keyed -pthread
// RATELIMIT_FUZZ_TRACE=1 prints every step; RATELIMIT_FUZZ_STATS=1 makes the
// replay count how often the nondeterministic cases came up.
//
#if !defined(BOOST_ASIO_DISABLE_TIMERFD)
#error "build with BOOST_ASIO_DISABLE_TIMERFD (see fuzz_bucket.cpp)"
#endif

#include "../model/keyed_limiter_model.hpp"
#include "manual_clock.hpp"

#include <ratelimit/keyed_limiter.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
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

using limiter_type = ratelimit::basic_keyed_limiter<int, std::hash<int>, std::equal_to<int>,
                                                    manual_clock, zero_wait_traits>;
using model_type = model::keyed_limiter_model<int>;
constexpr std::int64_t max_time = std::numeric_limits<std::int64_t>::max();
constexpr std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();

[[noreturn]] void fail(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
  std::fprintf(stderr, "fuzz_keyed: %s (%llu vs %llu)\n", what, a, b);
  std::abort();
}

#define CHECK_EQ(a, b, what)                                                                \
  do {                                                                                      \
    const auto va = (a);                                                                    \
    const auto vb = (b);                                                                    \
    if (!(va == vb))                                                                        \
      fail(what, static_cast<unsigned long long>(va), static_cast<unsigned long long>(vb)); \
  } while (0)

/// How often the cases the documentation leaves open came up (RATELIMIT_FUZZ_STATS).
struct statistics {
  unsigned long long inputs = 0, steps = 0, admitted_by_eviction = 0, refused = 0,
                     refused_while_held_back = 0, evicted_while_held_back_possible = 0,
                     kept_by_evict_while_held_back = 0, evict_calls_evicting = 0,
                     reconfigurations = 0;
};
statistics stats;

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
        return 0;
      default:
        return k / 8 % 8;
    }
  }

  /// A capacity: small mostly (eviction needs buckets that refill); 0 is invalid.
  std::uint64_t capacity() {
    const std::uint8_t k = u8();
    switch (k % 8) {
      case 0:
        return u64_max;
      case 1:
        return 0;
      case 2:
        return bytes(8);
      default:
        return 1 + k / 8 % 6;
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
        tokens = 1 + k / 8 % 4;
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
        period = std::int64_t{1 + j / 8 % 8} * 1'000'000;  // 1 ms .. 8 ms
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
        return static_cast<std::int64_t>(bytes(2)) * 1'000;  // up to 65 ms
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
  if (ec == ratelimit::error::too_many_keys) return model::result::too_many_keys;
  if (ec == boost::asio::error::operation_aborted) return model::result::aborted;
  fail("unexpected error code", static_cast<unsigned long long>(ec.value()));
}

/// The limiter's try_get_token, in one place. With the overload that tells why
/// it failed (bool try_get_token(key, n, error_code&): false with the code clear
/// when merely limited), the reason is compared too; without it, only the bool.
struct try_result {
  bool granted;
  std::optional<model::result> why;  // as model::keyed_limiter_model::try_get says
};
template <typename Limiter>
try_result limiter_try_get(Limiter& l, int key, std::uint64_t n) {
  if constexpr (requires(boost::system::error_code & ec) {
                  { l.try_get_token(key, n, ec) } -> std::same_as<bool>;
                }) {
    boost::system::error_code ec;
    const bool granted = l.try_get_token(key, n, ec);
    if (granted && ec) fail("try_get_token granted with an error code set");
    return {granted, granted ? model::result::granted : ec ? classify(ec) : model::result::pending};
  } else {
    return {l.try_get_token(key, n), std::nullopt};
  }
}

struct request_record {
  boost::asio::cancellation_signal signal;
  int key = 0;
  int calls = 0;
  bool destroyed_uncalled = false;
  std::optional<ratelimit::receipt> receipt;  // an async_acquire's, once granted
  std::uint64_t held = 0;                     // what the receipt should still hold
};

/// A receipt of try_acquire, with what it should still hold.
struct try_record {
  ratelimit::receipt receipt;
  std::uint64_t held;
  int key;
  std::uint64_t limiter;  // the limiter's number (receipts of old limiters give to nothing)
};

struct keyed_completion {
  int key;
  model::completion c;
};

class harness {
 public:
  explicit harness(reader& in) : in_(in) { manual_clock::reset(); }

  void run() {
    ++stats.inputs;
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
      request_record& r = h_->requests_[id_];
      ++r.calls;
      h_->delivered_.push_back({r.key, {id_, classify(ec)}});
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

  /// Runs a model call; an outcome the documentation does not allow is a finding.
  template <typename F>
  auto checked(const char* what, F&& f) {
    try {
      return f();
    } catch (const model::violation& v) {
      std::fprintf(stderr, "fuzz_keyed: %s: %s (at %lld)\n", what, v.what(),
                   static_cast<long long>(now()));
      std::abort();
    }
  }

  /// A new limiter and model, configured from the input (a refused
  /// configuration must be refused by both, then a valid one is used).
  void open() {
    std::uint64_t capacity = in_.capacity();
    model::model_rate r = in_.rate();
    std::size_t max_keys = in_.u8() % 5;  // 0 is invalid
    keys_ = 1 + in_.u8() % 6;
    const bool model_ok = [&] {
      try {
        model_type m(capacity, r, max_keys);
        return true;
      } catch (const std::invalid_argument&) {
        return false;
      }
    }();
    bool limiter_ok = true;
    try {
      limiter_type l(ctx_, capacity, ratelimit::rate{r.tokens, std::chrono::nanoseconds(r.period)},
                     max_keys);
    } catch (const std::invalid_argument&) {
      limiter_ok = false;
    }
    CHECK_EQ(limiter_ok, model_ok, "construction accepted by one, refused by the other");
    if (!model_ok) {
      capacity = 1 + capacity % 4;
      r = {1 + r.tokens % 4, std::int64_t{1'000'000}};
      max_keys = 1 + max_keys % 4;
    }
    base_ = requests_.size();
    model_.emplace(capacity, r, max_keys);
    limiter_.emplace(ctx_, capacity, ratelimit::rate{r.tokens, std::chrono::nanoseconds(r.period)},
                     max_keys);
    seen_ = 0;
    if (trace_)
      std::fprintf(stderr, "open: capacity %llu, rate %llu per %lld ns, max_keys %zu, keys %d\n",
                   static_cast<unsigned long long>(capacity),
                   static_cast<unsigned long long>(r.tokens), static_cast<long long>(r.period),
                   max_keys, keys_);
  }

  void destroy() {
    limiter_.reset();
    model_->destroy(now());
    ++limiters_;
  }

  /// Gives back k tokens of a receipt chosen by the input (an async_acquire's
  /// or a try_acquire's, of this limiter or of one destroyed): it returns
  /// min(k, what it holds), never more in all; the key's bucket in this
  /// limiter, if it has one, rises by that (the model's); an old limiter's
  /// receipt gives to nothing.
  void give_back(std::uint8_t op) {
    const std::size_t choices = requests_.size() + tries_.size();
    if (choices == 0) return;
    const std::size_t i = in_.bytes(2) % choices;
    const std::uint64_t k = in_.count(17);
    ratelimit::receipt* r;
    std::uint64_t* held;
    int key;
    bool current;
    if (i < requests_.size()) {
      request_record& rec = requests_[i];
      if (!rec.receipt) return;  // not an acquire, or not granted (yet)
      r = &*rec.receipt;
      held = &rec.held;
      key = rec.key;
      current = i >= base_;
    } else {
      try_record& t = tries_[i - requests_.size()];
      r = &t.receipt;
      held = &t.held;
      key = t.key;
      current = t.limiter == limiters_;
    }
    const std::uint64_t g = std::min(k, *held);
    if (trace_)
      std::fprintf(stderr, "  give back %llu of %llu to key %d (%s limiter, op %d)\n",
                   static_cast<unsigned long long>(k), static_cast<unsigned long long>(*held), key,
                   current ? "this" : "an old", op);
    if (current) model_->give_back(key, g, now());
    CHECK_EQ(r->give_back(k), g, "give_back() returned");
    *held -= g;
    CHECK_EQ(r->held(), *held, "held()");
  }

  /// The keys the model has and the limiter no longer has (the limiter may
  /// only have lost keys in the operation just made: it cannot have gained
  /// any but the one requested, which compare_keys() checks afterwards).
  std::vector<int> vanished(const std::vector<int>& before) const {
    std::vector<int> gone;
    for (int k : before)
      if (!limiter_->contains(k)) gone.push_back(k);
    return gone;
  }

  int key() { return static_cast<int>(in_.u8() % keys_); }

  /// Moves the clock to `t`, after a full comparison at the current reading.
  void move_clock(std::int64_t t) {
    if (!synced_) sync();
    manual_clock::set(manual_clock::time_point(manual_clock::duration(t)));
  }

  void step() {
    const std::uint8_t op = in_.u8();
    ++stats.steps;
    if (trace_)
      std::fprintf(stderr, "step op %d (%d) at %lld: keys %zu, delivered %zu\n", op % 16, op,
                   static_cast<long long>(now()), model_->size(), delivered_.size());
    // The operation after a clock advance that did not run the io_context is
    // always followed by a full comparison.
    const bool after_unsettled = std::exchange(unsettled_, false);
    bool poll = true;
    switch (op % 16) {
      case 0:
      case 1: {  // advance the clock; with the top bit, let one operation run before any timer
        const std::int64_t d = in_.step();
        const std::int64_t t = now();
        move_clock(t > max_time - d ? max_time : t + d);
        if ((op & 0x80) && !after_unsettled) {
          unsettled_ = true;
          synced_ = false;
          return;
        }
        break;
      }
      case 2: {  // move the clock back (the buckets keep the latest time they have seen)
        const std::int64_t d = in_.step();
        const std::int64_t t = now();
        const std::int64_t min_time = std::numeric_limits<std::int64_t>::min();
        move_clock(t < min_time + d ? min_time : t - d);
        break;
      }
      case 3: {  // to when key k's first waiter is due / its bucket is full / held back until
        const int k = key();
        const std::uint8_t how = in_.u8();
        const model::token_bucket_model* b = model_->bucket(k);
        if (!b) break;
        std::optional<std::int64_t> due;
        switch (how % 3) {
          case 0:
            due = b->head_ready_at();
            break;
          case 1:
            due = b->full_at();
            break;
          default:
            due = model_->held_until(k);
        }
        const int delta = how / 3 % 3 - 1;
        if (!due || *due <= now()) break;
        move_clock(delta > 0 && *due == max_time ? *due : *due + delta);
        break;
      }
      case 4:
      case 5:
      case 6:
      case 15: {  // async_get_token(key, n), with a cancellation slot
        const int k = key();
        const std::uint64_t n = in_.count(model_->quota_of(k).capacity);
        poll = (op & 0x80) == 0;
        const std::uint64_t id = requests_.size();
        requests_.emplace_back();
        requests_.back().key = k;
        const std::vector<int> before = model_->keys();
        const bool was_full = at_bound_for(k, n);
        auto h =
            boost::asio::bind_cancellation_slot(requests_.back().signal.slot(), handler(this, id));
        if (op % 16 == 15 && (op & 0x40)) {  // the same request, with a receipt
          requests_.back().held = n;         // (what it will grant, if it does)
          limiter_->async_acquire(k, n, std::move(h));
        } else {
          limiter_->async_get_token(k, n, std::move(h));
        }
        const std::vector<int> gone = vanished(before);
        note_admission(was_full, k, gone);
        const std::uint64_t model_id =
            checked("async_get_token", [&] { return model_->request(k, n, now(), gone); });
        CHECK_EQ(base_ + model_id, id, "request ids out of step");
        break;
      }
      case 7:
      case 8: {  // try_get_token(key, n)
        const int k = key();
        const std::uint64_t n = in_.count(model_->quota_of(k).capacity);
        poll = (op & 0x80) == 0;
        const std::vector<int> before = model_->keys();
        const bool was_full = at_bound_for(k, n);
        if (op & 0x40) {  // the overload that serves first and says the wait
          std::optional<limiter_type::duration> got_wait;
          boost::system::error_code ec;
          const bool granted = limiter_->try_get_token(k, n, got_wait, ec);
          const std::vector<int> gone = vanished(before);
          note_admission(was_full, k, gone);
          std::optional<std::int64_t> want_wait;
          const model::result want = checked("try_get_token(retry_after)", [&] {
            return model_->try_get_serving(k, n, now(), want_wait, gone);
          });
          const model::result got = granted ? model::result::granted
                                    : ec    ? classify(ec)
                                            : model::result::pending;
          CHECK_EQ(static_cast<int>(got), static_cast<int>(want), "try_get_token(retry_after)");
          CHECK_EQ(got_wait.has_value(), want_wait.has_value(), "try_get_token: wait given");
          if (got_wait && want_wait)
            CHECK_EQ(got_wait->count(), *want_wait, "try_get_token: retry_after");
          break;
        }
        if (op % 16 == 8 && (op & 0x20)) {  // try_acquire(key, n, ec)
          boost::system::error_code ec;
          std::optional<ratelimit::receipt> r = limiter_->try_acquire(k, n, ec);
          const std::vector<int> gone = vanished(before);
          note_admission(was_full, k, gone);
          const model::result want =
              checked("try_acquire", [&] { return model_->try_get(k, n, now(), gone); });
          const model::result got = r    ? model::result::granted
                                    : ec ? classify(ec)
                                         : model::result::pending;
          CHECK_EQ(static_cast<int>(got), static_cast<int>(want), "try_acquire");
          if (r) {
            CHECK_EQ(r->granted(), n, "try_acquire's receipt");
            tries_.push_back({std::move(*r), n, k, limiters_});
          }
          break;
        }
        const try_result got = limiter_try_get(*limiter_, k, n);
        const std::vector<int> gone = vanished(before);
        note_admission(was_full, k, gone);
        const model::result want =
            checked("try_get_token", [&] { return model_->try_get(k, n, now(), gone); });
        if (trace_)
          std::fprintf(stderr, "  try_get_token(%d, %llu): %d\n", k,
                       static_cast<unsigned long long>(n), got.granted);
        CHECK_EQ(got.granted, want == model::result::granted, "try_get_token");
        if (got.why)
          CHECK_EQ(static_cast<int>(*got.why), static_cast<int>(want), "try_get_token: why");
        break;
      }
      case 9:
      case 10: {  // per-operation cancellation of request k (queued, done, or of an old limiter)
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
      case 11: {
        if ((op & 0x60) == 0x60) {  // give back k tokens of a receipt
          give_back(op);
          break;
        }
        // cancel()
        const std::size_t expected = model_->cancel_all(now());
        CHECK_EQ(limiter_->cancel(), expected, "cancel() count");
        break;
      }
      case 12:  // close()
        model_->close(now());
        limiter_->close();
        break;
      case 13: {  // evict(); with the top bit, a change of quota
        if (op & 0x80) {
          reconfigure();
          break;
        }
        const std::vector<int> before = model_->keys();
        const std::size_t n = limiter_->evict();
        const std::vector<int> gone = vanished(before);
        for (int k : before)
          if (model_->held_back(k, now())) {
            if (std::find(gone.begin(), gone.end(), k) == gone.end())
              ++stats.kept_by_evict_while_held_back;
          }
        stats.evict_calls_evicting += !gone.empty();
        const std::size_t expected = checked("evict()", [&] { return model_->evict(now(), gone); });
        CHECK_EQ(n, expected, "evict() count");
        break;
      }
      default: {  // 14: destroy, then a new limiter
        destroy();
        settle();
        compare_completions();
        open();
        break;
      }
    }
    synced_ = false;
    compare_keys();
    if (!poll) {
      // Nothing may have run inside the initiating function or the canceller.
      CHECK_EQ(delivered_.size(), compared_, "a handler ran inline");
      if (!after_unsettled) return;
    }
    sync();
  }

  /// set_rate, set_capacity (the defaults, or key k's), set_quota(k), reset_quota(k):
  /// accepted or refused by both, then compared as every step is.
  void reconfigure() {
    const std::uint8_t how = in_.u8();
    const int k = key();
    ++stats.reconfigurations;
    auto to_rate = [](model::model_rate r) {
      return ratelimit::rate{r.tokens, std::chrono::nanoseconds(r.period)};
    };
    if (how % 6 == 5) {
      const bool want = model_->reset_own(k, now());
      CHECK_EQ(limiter_->reset_quota(k), want, "reset_quota");
      return;
    }
    std::optional<std::uint64_t> c;
    std::optional<model::model_rate> r;
    if (how % 6 == 1 || how % 6 == 3 || how % 6 == 4) c = in_.capacity();
    if (how % 6 == 0 || how % 6 == 2 || how % 6 == 4) r = in_.rate();
    if (trace_)
      std::fprintf(stderr, "  reconfigure %d key %d: capacity %llu rate %llu/%lld\n", how % 6, k,
                   static_cast<unsigned long long>(c.value_or(0)),
                   static_cast<unsigned long long>(r ? r->tokens : 0),
                   static_cast<long long>(r ? r->period : 0));
    bool model_ok = true, limiter_ok = true;
    try {
      if (how % 6 < 2)
        c ? model_->set_default_capacity(*c, now()) : model_->set_default_rate(*r, now());
      else
        model_->set_own(k, c, r, now());
    } catch (const std::invalid_argument&) {
      model_ok = false;
    }
    try {
      switch (how % 6) {
        case 0:
          limiter_->set_rate(to_rate(*r));
          break;
        case 1:
          limiter_->set_capacity(*c);
          break;
        case 2:
          limiter_->set_rate(k, to_rate(*r));
          break;
        case 3:
          limiter_->set_capacity(k, *c);
          break;
        default:
          limiter_->set_quota(k, ratelimit::quota{*c, to_rate(*r)});
      }
    } catch (const std::invalid_argument&) {
      limiter_ok = false;
    }
    CHECK_EQ(limiter_ok, model_ok, "a quota change accepted by one, refused by the other");
  }

  /// A request for `key` needs a new bucket at the bound (counted for the statistics).
  bool at_bound_for(int key, std::uint64_t n) const {
    return model_->is_open() && n <= model_->capacity() && !model_->contains(key) &&
           model_->size() == model_->max_keys();
  }

  /// Counts the open cases; before the model hears of them.
  void note_admission(bool was_full, int k, const std::vector<int>& gone) {
    if (!was_full || !stats_) return;
    bool any_held = false;
    for (int key : model_->keys())
      any_held = any_held || model_->held_back(key, now());
    if (!gone.empty()) {
      ++stats.admitted_by_eviction;
      stats.evicted_while_held_back_possible += any_held;
    } else if (!limiter_->contains(k)) {
      ++stats.refused;
      stats.refused_while_held_back += any_held;
    }
  }

  /// contains(key) for every key, size(), is_open(): the limiter's and the model's.
  void compare_keys() {
    if (trace_) {
      std::fprintf(stderr, "  keys:");
      for (int k : model_->keys())
        std::fprintf(stderr, " %d%s", k, model_->held_until(k) ? "(stale)" : "");
      std::fprintf(stderr, "\n");
    }
    for (int k = 0; k < keys_; ++k) {
      CHECK_EQ(limiter_->contains(k), model_->contains(k), "contains()");
      const ratelimit::quota got = limiter_->get_quota(k);
      const auto want = model_->quota_of(k);
      CHECK_EQ(got.capacity, want.capacity, "get_quota().capacity");
      CHECK_EQ(got.rate.tokens, want.rate.tokens, "get_quota().rate.tokens");
      CHECK_EQ(got.rate.period.count(), want.rate.period, "get_quota().rate.period");
    }
    CHECK_EQ(limiter_->capacity(), model_->capacity(), "capacity()");
    CHECK_EQ(limiter_->get_rate().tokens, model_->rate().tokens, "get_rate().tokens");
    CHECK_EQ(limiter_->get_rate().period.count(), model_->rate().period, "get_rate().period");
    CHECK_EQ(limiter_->own_quotas(), model_->own_quotas(), "own_quotas()");
    CHECK_EQ(limiter_->size(), model_->size(), "size()");
    if (limiter_->size() > limiter_->max_keys()) fail("more keys than max_keys", limiter_->size());
    CHECK_EQ(limiter_->is_open(), model_->is_open(), "is_open()");
  }

  /// Runs the io_context until it is quiet, brings every bucket (real and
  /// model) to the current reading through available(), and compares.
  void sync() {
    settle();
    model_->serve_due(now());
    for (int k = 0; k < keys_; ++k)
      CHECK_EQ(limiter_->available(k), model_->available(k, now()), "available()");
    for (int k = 0; k < keys_; ++k)
      for (const std::uint64_t n : {std::uint64_t{1}, model_->quota_of(k).capacity}) {
        const auto got = limiter_->retry_after(k, n);
        const auto want = model_->retry_after(k, n, now());
        CHECK_EQ(got.has_value(), want.has_value(), "retry_after() given");
        if (got && want) CHECK_EQ(got->count(), *want, "retry_after()");
      }
    settle();
    compare_completions();
    compare_keys();
    synced_ = true;
  }

  /// Runs the io_context until it has nothing to run, one handler at a time:
  /// a limiter that keeps it busy (a timer that keeps firing) is a hang.
  void settle() {
    for (int i = 0;; ++i) {
      ctx_.restart();
      if (ctx_.poll_one() == 0) return;
      if (i == 100'000) fail("io_context does not settle: the limiter keeps it busy");
    }
  }

  /// The completions delivered since the last comparison must be the model's:
  /// the same requests with the same results, in the model's order per key.
  void compare_completions() {
    const auto& mc = model_->completions();
    for (; seen_ < mc.size(); ++seen_) {
      const std::uint64_t id = base_ + mc[seen_].id;
      expected_.push_back({requests_[id].key, {id, mc[seen_].how}});
    }
    if (trace_ || delivered_.size() != expected_.size()) {
      for (std::size_t i = compared_; i < delivered_.size(); ++i)
        std::fprintf(stderr, " got %d:%llu:%d", delivered_[i].key,
                     static_cast<unsigned long long>(delivered_[i].c.id),
                     static_cast<int>(delivered_[i].c.how));
      std::fprintf(stderr, "\n");
      for (std::size_t i = compared_; i < expected_.size(); ++i)
        std::fprintf(stderr, " exp %d:%llu:%d", expected_[i].key,
                     static_cast<unsigned long long>(expected_[i].c.id),
                     static_cast<int>(expected_[i].c.how));
      std::fprintf(stderr, "\n");
    }
    CHECK_EQ(delivered_.size(), expected_.size(), "number of completions");
    // Group both by key, keeping each key's order.
    auto by_key = [this](std::vector<keyed_completion>& v) {
      std::stable_sort(
          v.begin() + static_cast<std::ptrdiff_t>(compared_), v.end(),
          [](const keyed_completion& a, const keyed_completion& b) { return a.key < b.key; });
    };
    by_key(delivered_);
    by_key(expected_);
    for (std::size_t& i = compared_; i < expected_.size(); ++i) {
      CHECK_EQ(delivered_[i].c.id, expected_[i].c.id, "completions (request id, in key order)");
      CHECK_EQ(static_cast<int>(delivered_[i].c.how), static_cast<int>(expected_[i].c.how),
               "completion result");
    }
  }

  // RATELIMIT_FUZZ_TRACE=1: print every step (to understand a finding).
  const bool trace_ = std::getenv("RATELIMIT_FUZZ_TRACE") != nullptr;
  const bool stats_ = std::getenv("RATELIMIT_FUZZ_STATS") != nullptr;
  reader& in_;
  boost::asio::io_context ctx_{1};
  std::deque<request_record> requests_;      // stable addresses for the signals
  std::vector<keyed_completion> delivered_;  // as the handlers ran (global ids)
  std::vector<keyed_completion> expected_;   // as the models said (global ids)
  std::optional<limiter_type> limiter_;
  std::optional<model_type> model_;
  int keys_ = 1;  // keys 0..keys_-1
  std::deque<try_record> tries_;
  std::uint64_t limiters_ = 0;  // limiters destroyed so far (the current one's number)
  std::uint64_t base_ = 0;      // global id of the current model's request 0
  std::size_t seen_ = 0;        // model completions copied to expected_
  std::size_t compared_ = 0;    // completions known to match
  bool synced_ = false;         // compared since the last operation
  bool unsettled_ = false;      // the clock advanced and no timer has had its chance
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
  const int rc = ratelimit::test::fuzz_replay_main("fuzz_keyed_replay", "all match the model", argc,
                                                   argv, LLVMFuzzerTestOneInput);
  if (rc != 0) return rc;
  if (std::getenv("RATELIMIT_FUZZ_STATS"))
    std::printf(
        "steps %llu; new keys at the bound: %llu admitted by eviction (%llu with a key held "
        "back), %llu refused (%llu with a key held back); evict() calls that evicted %llu, "
        "held-back keys evict() kept %llu; quota changes %llu\n",
        stats.steps, stats.admitted_by_eviction, stats.evicted_while_held_back_possible,
        stats.refused, stats.refused_while_held_back, stats.evict_calls_evicting,
        stats.kept_by_evict_while_held_back, stats.reconfigurations);
  return 0;
}
#endif
