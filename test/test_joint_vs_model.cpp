// The joint acquire's whole stack (ratelimit::async_acquire, try_acquire,
// retry_after and receipts over real token buckets and a keyed limiter's
// key, on the manual clock, completing through an io_context) against the
// reference model (model/joint_model.hpp, written from the promise), on
// seeded random histories of requests (single and joint, parts in random
// order), tries, retry-afters, cancellations (terminal, partial, total),
// give-backs, set_rate, set_capacity, close and time, compared after every
// step (model/joint_harness.hpp, shared with the fuzz target
// test/fuzz/fuzz_joint.cpp).
//
// Here timers fire in real time: the manual clock's wait traits re-check a
// timer that is not due every 200 us, so after each step the io_context is
// polled until it has delivered what the model says is due, then for 1 ms
// more (a grant that comes too early, too late or never is a difference).
#include "model/joint_harness.hpp"

#include "test_support.hpp"

#include <cstdlib>
#include <string>

#if defined(RATELIMIT_TEST_SANITIZED)
constexpr int rounds_divisor = 5;
#else
constexpr int rounds_divisor = 1;
#endif

namespace {

using namespace ratelimit::test;
using ratelimit::model::rng;

struct real_time_env {
  using wait_traits = manual_wait_traits;

  template <typename Done>
  void deliver(boost::asio::io_context& ctx, Done done) {
    BOOST_TEST_REQUIRE(settle(ctx, done, std::chrono::seconds(10)));
    pump(ctx, std::chrono::milliseconds(1));
  }

  template <typename Describe>
  void check(bool ok, Describe describe) {
    if (!ok) BOOST_FAIL(describe());
  }
};

struct seeded : rng {
  bool done() const { return false; }
};

int rounds() {
  const char* e = std::getenv("RATELIMIT_JOINT_ROUNDS");
  return e ? std::atoi(e) : 60;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(joint_vs_model, clock_fixture)

BOOST_AUTO_TEST_CASE(the_joint_acquire_matches_the_reference_model) {
  int granted = 0, joint_granted = 0, waited = 0, compared = 0, given_back = 0;
  int blocked_granted = 0, blocked_late = 0, key_filled = 0;
  for (int round = 0; round < rounds() / rounds_divisor; ++round) {
    BOOST_TEST_CONTEXT("round " << round) {
      manual_clock::reset();
      seeded g{{static_cast<std::uint64_t>(round) * 104729 + 7}};
      real_time_env env;
      ratelimit::model::joint_harness<seeded, real_time_env> h(g, env, 2 + round % 3);
      const auto s = h.run(100);
      granted += s.granted;
      joint_granted += s.joint_granted;
      waited += s.waited;
      compared += s.compared;
      given_back += s.given_back;
      blocked_granted += s.blocked_granted;
      blocked_late += s.blocked_late;
      key_filled += s.key_filled;
    }
  }
  BOOST_TEST_MESSAGE("blocking callers with a deadline: " << blocked_granted << " granted, "
                                                          << blocked_late << " timed out");
  BOOST_TEST(blocked_granted > 5 / rounds_divisor);
  BOOST_TEST(blocked_late > 5 / rounds_divisor);
  BOOST_TEST_MESSAGE("capacity raises that found the key full: " << key_filled);
  BOOST_TEST(key_filled > 5 / rounds_divisor);
  BOOST_TEST_MESSAGE("compared " << compared << " steps; " << granted << " grants, "
                                 << joint_granted << " joint; " << waited << " waited; "
                                 << given_back << " give-backs");
  BOOST_TEST(joint_granted > 100 / rounds_divisor);
  BOOST_TEST(waited > 100 / rounds_divisor);
  BOOST_TEST(given_back > 10 / rounds_divisor);
}

BOOST_AUTO_TEST_SUITE_END()
