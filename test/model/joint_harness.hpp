//
// test/model/joint_harness.hpp: the joint acquire's whole stack against the
// reference model, one random history at a time. Shared by the Boost.Test
// (test/test_joint_vs_model.cpp: a seeded generator, timers on the manual
// clock fired by polling in real time) and the libFuzzer target
// (test/fuzz/fuzz_joint.cpp: the fuzz input decides, the reactor never
// sleeps, polling until quiet delivers every due grant).
//
// The real side: token buckets and one keyed limiter's key (`buckets` + 1
// limiters), ratelimit::async_acquire / try_acquire / retry_after and
// receipts, completing through one io_context. The model: joint_model.hpp
// (exact rationals, written from the promise). Every step is one call on
// both, or a move of the clock; after it the io_context delivers what is
// due and the two are compared: which requests completed and how (as sets:
// the order of one step's completions is test_joint_plan's business), each
// limiter's available(), what a try and a retry_after answered, what a
// give-back returned. At the end the limiters are destroyed and every
// request must have completed exactly once.
//
// Env provides:
//   using wait_traits = ...;                      the manual clock's timer waits
//   template <class P> void deliver(io_context&, P done);   run until done() and quiet
//   void check(bool ok, F describe);              fail with describe() when !ok
// Source provides in(lo, hi) (inclusive) and one_in(n), and done() (stop early).
//
#ifndef RATELIMIT_TEST_JOINT_HARNESS_HPP
#define RATELIMIT_TEST_JOINT_HARNESS_HPP

#include "joint_model.hpp"
#include "manual_clock.hpp"

#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <atomic>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace ratelimit::model {

inline result result_of(const boost::system::error_code& ec) {
  if (!ec) return result::granted;
  if (ec == ratelimit::error::exceeds_capacity) return result::exceeds_capacity;
  if (ec == ratelimit::error::bucket_closed) return result::closed;
  if (ec == boost::asio::error::operation_aborted) return result::aborted;
  return result::too_many_keys;  // (never expected: a mismatch)
}

inline std::string describe(const std::vector<part>& ps) {
  std::string out;
  for (const part& p : ps)
    out += "(" + std::to_string(p.bucket) + "," + std::to_string(p.n) + ")";
  return out;
}

template <typename Source, typename Env>
class joint_harness {
 public:
  using clock = ratelimit::test::manual_clock;
  using wait_traits = typename Env::wait_traits;
  using bucket_type = ratelimit::basic_token_bucket<clock, wait_traits>;
  using keyed_type = ratelimit::basic_keyed_limiter<std::string, std::hash<std::string>,
                                                    std::equal_to<std::string>, clock, wait_traits>;
  using part_type = ratelimit::basic_part<clock, wait_traits>;

  /// `buckets` token buckets (1..4) and a key.
  joint_harness(Source& g, Env& env, std::size_t buckets) : g_(g), env_(env), n_(buckets) {}

  /// What the history did (for the tests' "did it test anything" checks).
  struct stats {
    int granted = 0, joint_granted = 0, waited = 0, compared = 0, given_back = 0;
    int blocked_granted = 0, blocked_late = 0;  // blocking callers: granted, timed out
    int key_filled = 0;  // capacity raises that found the key full (it stays full)
  };

  stats run(int steps) {
    setup();
    for (int i = 0; i < steps && !g_.done(); ++i)
      step();
    for (const auto& c : m_.completions()) {
      if (c.how == result::granted) {
        ++stats_.granted;
        stats_.joint_granted += requests_.at(c.id)->parts.size() > 1;
      }
      if (requests_.at(c.id)->blocking) {
        stats_.blocked_granted += c.how == result::granted;
        stats_.blocked_late += c.how == result::timed_out;
      }
    }
    // Destroying the limiters fails the rest: nothing may be left waiting
    // (a blocked caller wakes, taking nothing).
    buckets_.clear();
    keyed_.reset();
    env_.deliver(ctx_, [&] {
      for (const auto& [id, r] : requests_)
        if (!r->is_done()) return false;
      return true;
    });
    for (const auto& kv : requests_)
      if (kv.second->thread.joinable()) kv.second->thread.join();
    for (const auto& kv : requests_) {
      const request_state& r = *kv.second;
      env_.check(r.times() == 1, [&] {
        return "request " + std::to_string(kv.first) + " completed " + std::to_string(r.times()) +
               " times";
      });
    }
    return stats_;
  }

 private:
  static constexpr std::int64_t ms = 1'000'000;
  static constexpr std::int64_t sec = 1'000'000'000;

  struct request_state {
    std::vector<part> parts;
    boost::asio::cancellation_signal cancel;
    int calls = 0;
    bool done = false;
    result how = result::pending;
    ratelimit::joint_receipt receipt;
    // A blocking caller with a deadline (acquire_for on a thread of its
    // own): it writes `blocked_how`, then sets `finished`.
    bool blocking = false;
    std::thread thread;
    std::atomic<bool> finished{false};
    result blocked_how = result::pending;

    bool is_done() const { return blocking ? finished.load() : done; }
    result outcome() const { return blocking ? (is_done() ? blocked_how : result::pending) : how; }
    int times() const { return blocking ? int(is_done()) : calls; }
  };

  std::size_t count() const { return n_ + 1; }

  model_rate rate() {
    const std::int64_t periods[] = {ms, 10 * ms, 100 * ms, sec, 7 * ms};
    return {g_.in(1, 5), periods[g_.in(0, std::size(periods) - 1)]};
  }
  static ratelimit::rate as_rate(model_rate r) {
    return {r.tokens, std::chrono::nanoseconds(r.period)};
  }

  std::vector<part_type> real(const std::vector<part>& ps) {
    std::vector<part_type> out;
    for (const part& p : ps)
      out.push_back(p.bucket == n_ ? part_type(*keyed_, std::string("key"), p.n)
                                   : part_type(*buckets_[p.bucket], p.n));
    return out;
  }

  /// 1..count() distinct limiters, in random order; now and then a part over its capacity.
  std::vector<part> parts() {
    std::vector<part> ps;
    for (std::size_t b = 0; b < count(); ++b)
      if (g_.one_in(2)) {
        std::uint64_t k = g_.in(1, std::min<std::uint64_t>(capacities_[b], 6));
        if (g_.one_in(25)) k = capacities_[b] + 1;
        ps.push_back({b, k});
      }
    if (ps.empty()) ps.push_back({g_.in(0, count() - 1), g_.in(1, 3)});
    for (std::size_t i = ps.size(); i > 1; --i)
      std::swap(ps[i - 1], ps[g_.in(0, i - 1)]);
    return ps;
  }

  void setup() {
    for (std::size_t b = 0; b < n_; ++b) {
      const std::uint64_t c = g_.in(1, 10);
      const model_rate r = rate();
      const std::uint64_t initial = g_.one_in(2) ? c : g_.in(0, c);
      capacities_.push_back(c);
      m_.add_bucket(c, r, initial, now_);
      buckets_.push_back(
          std::make_unique<bucket_type>(ctx_, c, as_rate(r), ratelimit::initial_tokens{initial}));
    }
    const std::uint64_t c = g_.in(1, 10);
    const model_rate r = rate();
    capacities_.push_back(c);
    m_.add_bucket(c, r, c, now_);  // a new key starts full
    keyed_ = std::make_unique<keyed_type>(ctx_, c, as_rate(r), 1000);
  }

  std::string at() const { return " at +" + std::to_string(now_ - clock::origin) + " ns"; }

  void compare(const char* after) {
    env_.deliver(ctx_, [&] {
      for (const auto& c : m_.completions())
        if (!requests_.at(c.id)->is_done()) return false;
      return true;
    });
    std::map<std::uint64_t, result> want;
    for (const auto& c : m_.completions())
      want[c.id] = c.how;
    for (const auto& kv : requests_) {
      const request_state& r = *kv.second;
      const auto it = want.find(kv.first);
      const result w = it != want.end() ? it->second : result::pending;
      env_.check(r.outcome() == w && r.times() == (w != result::pending), [&] {
        std::ostringstream os;
        os << "after " << after << at() << ": request " << kv.first << " " << describe(r.parts)
           << (r.blocking ? " (blocking)" : "") << " got " << r.outcome() << " (" << r.times()
           << " calls), want " << w;
        return os.str();
      });
    }
    for (std::size_t b = 0; b < count(); ++b) {
      const std::uint64_t got = b == n_ ? keyed_->available("key") : buckets_[b]->available();
      const std::uint64_t exp = m_.available(b, now_);
      env_.check(got == exp, [&] {
        return std::string("after ") + after + at() + ": available(" + std::to_string(b) + ") " +
               std::to_string(got) + ", want " + std::to_string(exp);
      });
    }
    ++stats_.compared;
  }

  void make_request() {
    auto ps = parts();
    const std::uint64_t id = m_.requests();
    auto st = std::make_unique<request_state>();
    st->parts = ps;
    request_state* s = st.get();
    requests_.emplace(id, std::move(st));
    const auto rp = real(ps);
    ratelimit::async_acquire(
        std::span<const part_type>(rp),
        boost::asio::bind_cancellation_slot(
            s->cancel.slot(), [s](boost::system::error_code ec, ratelimit::joint_receipt r) {
              ++s->calls;
              s->done = true;
              s->how = result_of(ec);
              s->receipt = std::move(r);
            }));
    m_.request(ps, now_);
    if (m_.status(id) == result::pending) ++stats_.waited;
  }

  /// A blocking caller with a deadline: acquire_for on a thread of its own
  /// (a token bucket first, whose waiting() shows when it is queued); the
  /// step ends once it returned or waits in the queue, so its place in the
  /// order is where the model puts it.
  void make_blocking_request() {
    auto ps = parts();
    std::size_t first = ps.size();
    for (std::size_t i = 0; i < ps.size(); ++i)
      if (ps[i].bucket < n_) first = i;
    if (first == ps.size()) return;  // (the key alone: its queue is not observable)
    std::swap(ps[0], ps[first]);
    const std::int64_t waits[] = {0, ms, 100 * ms, sec, 10 * sec};
    const std::int64_t timeout = waits[g_.in(0, std::size(waits) - 1)] * std::int64_t(g_.in(1, 3));
    const std::uint64_t id = m_.requests();
    auto st = std::make_unique<request_state>();
    st->parts = ps;
    st->blocking = true;
    request_state* s = st.get();
    requests_.emplace(id, std::move(st));
    bucket_type& head = *buckets_[ps[0].bucket];
    const std::size_t before = head.waiting();
    s->thread = std::thread([s, rp = real(ps), timeout] {
      boost::system::error_code ec;
      const ratelimit::joint_receipt r = ratelimit::acquire_for(
          std::span<const part_type>(rp), std::chrono::nanoseconds(timeout), ec);
      s->blocked_how = ec ? result_of(ec) : r.empty() ? result::timed_out : result::granted;
      s->finished = true;
    });
    m_.request(ps, now_, now_ + timeout);
    // Until it returned or is queued (nothing else is due now: the last step delivered it all).
    env_.deliver(ctx_, [&] { return s->finished.load() || head.waiting() > before; });
    if (m_.status(id) == result::pending) ++stats_.waited;
  }

  void step() {
    switch (g_.in(0, 14)) {
      case 14:
        make_blocking_request();
        compare("blocking request");
        break;
      case 0:
      case 1:
      case 2: {
        const std::int64_t d[] = {1, 1000, ms, 10 * ms, 300 * ms, sec};
        now_ += d[g_.in(0, std::size(d) - 1)] * static_cast<std::int64_t>(g_.in(1, 3));
        clock::set(clock::time_point(clock::duration(now_)));
        m_.serve_due(now_);
        compare("time");
        break;
      }
      case 3:
      case 4:
      case 5:
        make_request();
        compare("request");
        break;
      case 6: {
        const auto ps = parts();
        const auto rp = real(ps);
        std::optional<clock::duration> wait;
        boost::system::error_code ec;
        const auto got = ratelimit::try_acquire(std::span<const part_type>(rp), wait, ec);
        const result want = m_.try_get(ps, now_);
        const result r = got ? result::granted : ec ? result_of(ec) : result::pending;
        env_.check(r == want, [&] {
          std::ostringstream os;
          os << "try " << describe(ps) << at() << ": " << r << ", want " << want;
          return os.str();
        });
        compare("try");
        if (!got && !ec) {
          const auto w = m_.retry_after(ps, now_);
          env_.check(wait && w && wait->count() == *w, [&] {
            return "try " + describe(ps) + at() + ": its retry-after " +
                   std::to_string(wait ? wait->count() : -1) + ", want " +
                   std::to_string(w ? *w : -1);
          });
        }
        break;
      }
      case 7: {
        const auto ps = parts();
        const auto rp = real(ps);
        const auto got = ratelimit::retry_after(std::span<const part_type>(rp));
        const auto want = m_.retry_after(ps, now_);
        env_.check(got.has_value() == want.has_value() && (!got || got->count() == *want), [&] {
          return "retry_after " + describe(ps) + at() + ": " +
                 std::to_string(got ? got->count() : -1) + ", want " +
                 std::to_string(want ? *want : -1);
        });
        compare("retry_after");
        break;
      }
      case 8:
      case 9:
        if (!requests_.empty()) {
          auto it = requests_.begin();
          std::advance(it, g_.in(0, requests_.size() - 1));
          if (it->second->blocking) break;  // (a blocked caller cannot be cancelled)
          const boost::asio::cancellation_type types[] = {boost::asio::cancellation_type::terminal,
                                                          boost::asio::cancellation_type::partial,
                                                          boost::asio::cancellation_type::total};
          it->second->cancel.emit(types[g_.in(0, 2)]);
          m_.cancel(it->first, now_);
          compare("cancel");
        }
        break;
      case 10:
        if (!requests_.empty()) {
          auto it = requests_.begin();
          std::advance(it, g_.in(0, requests_.size() - 1));
          request_state& s = *it->second;
          if (s.done && s.how == result::granted && !s.receipt.empty()) {
            const std::size_t i = g_.in(0, s.receipt.size() - 1);
            const std::uint64_t k = g_.in(0, 4);
            const std::uint64_t got = s.receipt[i].give_back(k);
            const auto want = m_.give_back(it->first, k, now_, i);
            env_.check(want.size() == s.receipt.size() && got == want[i],
                       [&] { return "give_back" + at() + ": " + std::to_string(got); });
            stats_.given_back += got > 0;
            compare("give_back");
          }
        }
        break;
      case 11:
        if (g_.one_in(2)) {
          // A bucket's rate, or the keyed limiter's: its default (for every
          // key), or the key's own.
          // (A default does not touch a key with a rate of its own.)
          const std::size_t b = g_.in(0, n_);
          const model_rate r = rate();
          bool applies = true;
          if (b < n_) {
            buckets_[b]->set_rate(as_rate(r));
          } else if (g_.one_in(2)) {
            keyed_->set_rate(as_rate(r));
            applies = !key_own_rate_;
          } else {
            keyed_->set_rate(std::string("key"), as_rate(r));
            key_own_rate_ = true;
          }
          if (applies) m_.set_rate(b, r, now_);
          compare("set_rate");
        }
        break;
      case 12:
        if (g_.one_in(2)) {
          // A bucket's capacity, or the keyed limiter's: its default, or the
          // key's own (a full key stays full at a raised capacity).
          const std::size_t b = g_.in(0, n_);
          const std::uint64_t c = g_.in(1, 10);
          bool applies = true;
          if (b < n_) {
            buckets_[b]->set_capacity(c);
          } else if (g_.one_in(2)) {
            keyed_->set_capacity(c);
            applies = !key_own_capacity_;
          } else {
            keyed_->set_capacity(std::string("key"), c);
            key_own_capacity_ = true;
          }
          if (applies) {
            stats_.key_filled +=
                b == n_ && c > capacities_[b] && m_.available(b, now_) == capacities_[b];
            capacities_[b] = c;
            m_.set_capacity(b, c, now_, /*full_stays_full=*/b == n_);
          }
          compare("set_capacity");
        }
        break;
      default:
        if (g_.one_in(10)) {
          const std::size_t b = g_.in(0, count() - 1);
          if (b == n_)
            keyed_->close();
          else
            buckets_[b]->close();
          m_.close(b, now_);
          compare("close");
        }
        break;
    }
  }

  Source& g_;
  Env& env_;
  std::size_t n_;
  boost::asio::io_context ctx_;
  // Polling runs out of work now and then; a blocking caller needs a context
  // that is not stopped (its timers do run, by polling).
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_{
      ctx_.get_executor()};
  std::vector<std::unique_ptr<bucket_type>> buckets_;
  std::unique_ptr<keyed_type> keyed_;
  std::int64_t now_ = clock::origin;
  joint_model m_{clock::origin};
  std::vector<std::uint64_t> capacities_;
  bool key_own_rate_ = false, key_own_capacity_ = false;  // set_rate/set_capacity("key", ...)
  std::map<std::uint64_t, std::unique_ptr<request_state>> requests_;  // by model id
  stats stats_;
};

}  // namespace ratelimit::model

#endif  // RATELIMIT_TEST_JOINT_HARNESS_HPP
