// The joint acquire's whole stack (ratelimit::async_acquire, try_acquire,
// retry_after and receipts over real token buckets and a keyed limiter's
// key, on the manual clock, completing through an io_context) against the
// reference model (model/joint_model.hpp, written from the promise), on
// random sequences of requests (single and joint, in random part order),
// tries, retry-afters, cancellations, give-backs, set_rate, set_capacity,
// close and time, compared after every step: which requests completed and
// how, each bucket's available(), retry_after and try answers.
//
// Completions are compared as sets per step (the order of completions of
// one step is the model test's business: test_joint_plan), after the
// io_context has delivered what the model says is due (timers on the manual
// clock fire within a poll of real time) and then run a little longer, so a
// grant that comes too early, too late or never is a difference.
#include "model/joint_model.hpp"

#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>

#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#if defined(RATELIMIT_TEST_SANITIZED)
constexpr int rounds_divisor = 5;
#else
constexpr int rounds_divisor = 1;
#endif

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::joint_receipt;
using ratelimit::model::joint_model;
using ratelimit::model::model_rate;
using ratelimit::model::result;
using ratelimit::model::rng;
using test_part = ratelimit::basic_part<manual_clock, manual_wait_traits>;
using test_keyed =
    ratelimit::basic_keyed_limiter<std::string, std::hash<std::string>, std::equal_to<std::string>,
                                   manual_clock, manual_wait_traits>;

namespace {

constexpr std::int64_t ms = 1'000'000;
constexpr std::int64_t sec = 1'000'000'000;

result as_result(const boost::system::error_code& ec) {
  if (!ec) return result::granted;
  if (ec == ratelimit::error::exceeds_capacity) return result::exceeds_capacity;
  if (ec == ratelimit::error::bucket_closed) return result::closed;
  if (ec == asio::error::operation_aborted) return result::aborted;
  return result::too_many_keys;  // (never expected)
}

struct request_state {
  std::vector<ratelimit::model::part> parts;
  asio::cancellation_signal cancel;
  bool done = false;
  result how = result::pending;
  joint_receipt receipt;
};

std::string describe(const std::vector<ratelimit::model::part>& ps) {
  std::string out;
  for (const auto& p : ps)
    out += "(" + std::to_string(p.bucket) + "," + std::to_string(p.n) + ")";
  return out;
}

struct run {
  rng g;
  std::size_t n;  // token buckets; bucket n (the last) is a keyed limiter's key
  asio::io_context ctx;
  std::vector<std::unique_ptr<test_bucket>> buckets;
  std::unique_ptr<test_keyed> keyed;
  joint_model m{manual_clock::origin};
  std::vector<std::uint64_t> capacities;
  std::map<std::uint64_t, std::unique_ptr<request_state>> requests;  // by model id
  std::int64_t now = manual_clock::origin;
  int granted = 0, joint_granted = 0, waited = 0, compared = 0;

  std::size_t count() const { return n + 1; }

  model_rate rate() {
    const std::int64_t periods[] = {ms, 10 * ms, 100 * ms, sec, 7 * ms};
    return {g.in(1, 5), periods[g.in(0, std::size(periods) - 1)]};
  }
  static ratelimit::rate as_rate(model_rate r) {
    return {r.tokens, std::chrono::nanoseconds(r.period)};
  }

  test_part part_of(const ratelimit::model::part& p) {
    if (p.bucket == n) return test_part(*keyed, std::string("key"), p.n);
    return test_part(*buckets[p.bucket], p.n);
  }
  std::vector<test_part> real(const std::vector<ratelimit::model::part>& ps) {
    std::vector<test_part> out;
    for (const auto& p : ps)
      out.push_back(part_of(p));
    return out;
  }

  std::vector<ratelimit::model::part> parts() {
    std::vector<ratelimit::model::part> ps;
    for (std::size_t b = 0; b < count(); ++b)
      if (g.one_in(2)) {
        std::uint64_t k = g.in(1, std::min<std::uint64_t>(capacities[b], 6));
        if (g.one_in(25)) k = capacities[b] + 1;  // over the capacity
        ps.push_back({b, k});
      }
    if (ps.empty()) ps.push_back({g.in(0, count() - 1), g.in(1, 3)});
    for (std::size_t i = ps.size(); i > 1; --i)
      std::swap(ps[i - 1], ps[g.in(0, i - 1)]);
    return ps;
  }

  void setup() {
    for (std::size_t b = 0; b < n; ++b) {
      const std::uint64_t c = g.in(1, 10);
      const model_rate r = rate();
      const std::uint64_t initial = g.one_in(2) ? c : g.in(0, c);
      capacities.push_back(c);
      BOOST_TEST_REQUIRE(m.add_bucket(c, r, initial, now) == b);
      buckets.push_back(
          std::make_unique<test_bucket>(ctx, c, as_rate(r), ratelimit::initial_tokens{initial}));
    }
    const std::uint64_t c = g.in(1, 10);
    const model_rate r = rate();
    capacities.push_back(c);
    BOOST_TEST_REQUIRE(m.add_bucket(c, r, c, now) == n);  // a new key starts full
    keyed = std::make_unique<test_keyed>(ctx, c, as_rate(r), 1000);
  }

  /// Waits for the completions the model has made, then a little longer.
  void deliver() {
    auto matches = [&] {
      for (const auto& c : m.completions())
        if (!requests.at(c.id)->done) return false;
      return true;
    };
    BOOST_TEST_REQUIRE(settle(ctx, matches, std::chrono::seconds(10)));
    pump(ctx, std::chrono::milliseconds(1));
  }

  void compare(const char* after) {
    BOOST_TEST_CONTEXT("after " << after << " at +" << (now - manual_clock::origin) << " ns") {
      deliver();
      std::map<std::uint64_t, result> want;
      for (const auto& c : m.completions())
        want[c.id] = c.how;
      for (const auto& [id, r] : requests) {
        const auto it = want.find(id);
        BOOST_TEST_CONTEXT("request " << id << " got " << r->how << " want "
                                      << (it != want.end() ? it->second : result::pending)
                                      << " parts " << describe(r->parts)) {
          BOOST_TEST_REQUIRE(r->done == (it != want.end()));
          if (r->done) BOOST_TEST_REQUIRE((r->how == it->second));
        }
      }
      for (std::size_t b = 0; b < n; ++b)
        BOOST_TEST_REQUIRE(buckets[b]->available() == m.available(b, now));
      BOOST_TEST_REQUIRE(keyed->available("key") == m.available(n, now));
      ++compared;
    }
  }

  void make_request() {
    auto ps = parts();
    const std::uint64_t id = m.requests();
    auto st = std::make_unique<request_state>();
    st->parts = ps;
    request_state* s = st.get();
    requests.emplace(id, std::move(st));
    const auto real_parts = real(ps);
    ratelimit::async_acquire(
        std::span<const test_part>(real_parts),
        asio::bind_cancellation_slot(s->cancel.slot(),
                                     [s](boost::system::error_code ec, joint_receipt r) {
                                       s->done = true;
                                       s->how = as_result(ec);
                                       s->receipt = std::move(r);
                                     }));
    BOOST_TEST_REQUIRE(m.request(ps, now) == id);
    if (m.status(id) == result::pending) ++waited;
  }

  void go(int steps) {
    setup();
    for (int i = 0; i < steps; ++i) {
      switch (g.in(0, 13)) {
        case 0:
        case 1:
        case 2: {
          const std::int64_t d[] = {1, 1000, ms, 10 * ms, 300 * ms, sec};
          now += d[g.in(0, std::size(d) - 1)] * static_cast<std::int64_t>(g.in(1, 3));
          manual_clock::set(manual_clock::time_point(manual_clock::duration(now)));
          m.serve_due(now);
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
          std::optional<manual_clock::duration> wait;
          boost::system::error_code ec;
          const auto got = ratelimit::try_acquire(std::span<const test_part>(rp), wait, ec);
          const result want = m.try_get(ps, now);
          BOOST_TEST_REQUIRE(((got  ? result::granted
                               : ec ? as_result(ec)
                                    : result::pending) == want));
          compare("try");
          const auto w = m.retry_after(ps, now);
          if (!got && !ec) BOOST_TEST_REQUIRE((wait && w && wait->count() == *w));
          break;
        }
        case 7: {
          const auto ps = parts();
          const auto rp = real(ps);
          const auto got = ratelimit::retry_after(std::span<const test_part>(rp));
          const auto want = m.retry_after(ps, now);
          BOOST_TEST_REQUIRE(got.has_value() == want.has_value());
          if (got) BOOST_TEST_REQUIRE(got->count() == *want);
          compare("retry_after");
          break;
        }
        case 8:
        case 9:
          if (!requests.empty()) {
            auto it = requests.begin();
            std::advance(it, g.in(0, requests.size() - 1));
            it->second->cancel.emit(asio::cancellation_type::terminal);
            m.cancel(it->first, now);
            compare("cancel");
          }
          break;
        case 10:
          if (!requests.empty()) {
            auto it = requests.begin();
            std::advance(it, g.in(0, requests.size() - 1));
            request_state& s = *it->second;
            if (s.done && s.how == result::granted && !s.receipt.empty()) {
              const std::size_t i = g.in(0, s.receipt.size() - 1);
              const std::uint64_t k = g.in(0, 4);
              const std::uint64_t got = s.receipt[i].give_back(k);
              const auto want = m.give_back(it->first, k, now, i);
              BOOST_TEST_REQUIRE(want.size() == s.receipt.size());
              BOOST_TEST_REQUIRE(got == want[i]);
              compare("give_back");
            }
          }
          break;
        case 11:
          if (g.one_in(2)) {
            const std::size_t b = g.in(0, n - 1);
            const model_rate r = rate();
            buckets[b]->set_rate(as_rate(r));
            m.set_rate(b, r, now);
            compare("set_rate");
          }
          break;
        case 12:
          if (g.one_in(2)) {
            const std::size_t b = g.in(0, n - 1);
            const std::uint64_t c = g.in(1, 10);
            capacities[b] = c;
            buckets[b]->set_capacity(c);
            m.set_capacity(b, c, now);
            compare("set_capacity");
          }
          break;
        default:
          if (g.one_in(10)) {
            const std::size_t b = g.in(0, count() - 1);
            if (b == n)
              keyed->close();
            else
              buckets[b]->close();
            m.close(b, now);
            compare("close");
          }
          break;
      }
    }
    for (const auto& c : m.completions())
      if (c.how == result::granted) {
        ++granted;
        joint_granted += requests.at(c.id)->parts.size() > 1;
      }
    // Destroying the limiters fails the rest: nothing may be left waiting.
    buckets.clear();
    keyed.reset();
    BOOST_TEST(settle(ctx, [&] {
      for (const auto& [id, r] : requests)
        if (!r->done) return false;
      return true;
    }));
    BOOST_TEST(runs_dry(ctx));
  }
};

int rounds() {
  const char* e = std::getenv("RATELIMIT_JOINT_ROUNDS");
  return e ? std::atoi(e) : 60;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(joint_vs_model, clock_fixture)

BOOST_AUTO_TEST_CASE(the_joint_acquire_matches_the_reference_model) {
  int granted = 0, joint_granted = 0, waited = 0, compared = 0;
  for (int round = 0; round < rounds() / rounds_divisor; ++round) {
    BOOST_TEST_CONTEXT("round " << round) {
      manual_clock::reset();
      run r{rng{static_cast<std::uint64_t>(round) * 104729 + 7}, 2 + round % 3};
      r.go(100);
      granted += r.granted;
      joint_granted += r.joint_granted;
      waited += r.waited;
      compared += r.compared;
    }
  }
  BOOST_TEST_MESSAGE("compared " << compared << " steps; " << granted << " grants, "
                                 << joint_granted << " joint; " << waited << " waited");
  BOOST_TEST(joint_granted > 100 / rounds_divisor);
  BOOST_TEST(waited > 100 / rounds_divisor);
}

BOOST_AUTO_TEST_SUITE_END()
