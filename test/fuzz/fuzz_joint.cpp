//
// test/fuzz/fuzz_joint.cpp: the joint acquire against the reference model.
//
// The fuzz input decides a history (model/joint_harness.hpp, shared with
// test/test_joint_vs_model.cpp): how many token buckets (1..4, plus one
// keyed limiter's key), their capacities, rates and levels, then every step:
// requests over random sets of limiters in random order, tries,
// retry-afters, cancellations (terminal, partial, total), give-backs of one
// part of a receipt, set_rate, set_capacity, close, and moves of the clock.
// After each step the io_context runs until it is quiet and the limiters are
// compared with model/joint_model.hpp; at the end they are destroyed and
// every request must have completed exactly once.
//
// Timers without real time, as in fuzz_bucket.cpp: the wait traits return
// zero and the file is built with BOOST_ASIO_DISABLE_TIMERFD, so each poll
// checks the timer queue against the manual clock.
//
// Built two ways (test/fuzz/CMakeLists.txt, scripts/fuzz --target joint):
// with clang and -fsanitize=fuzzer, and as a plain program replaying the
// corpus (RATELIMIT_FUZZ_REPLAY): a ctest regression test.
//
#if !defined(BOOST_ASIO_DISABLE_TIMERFD)
#error "build with BOOST_ASIO_DISABLE_TIMERFD (see fuzz_bucket.cpp)"
#endif

#include "../model/joint_harness.hpp"
#include "manual_clock.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

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

/// Reads the fuzz input: each choice takes one or two bytes; past the end,
/// the history stops.
class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool done() const { return p_ == end_; }
  std::uint64_t in(std::uint64_t lo, std::uint64_t hi) {
    const std::uint64_t span = hi - lo + 1;
    std::uint64_t v = u8();
    if (span > 256) v = v << 8 | u8();
    return lo + v % span;
  }
  bool one_in(std::uint64_t n) { return in(0, n - 1) == 0; }

 private:
  std::uint8_t u8() { return p_ == end_ ? 0 : *p_++; }
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

struct quiet_env {
  using wait_traits = zero_wait_traits;

  /// Polls until nothing is left to run; `done` must then hold, or hold
  /// within 10 s of polling more (a blocked caller returns on its own
  /// thread).
  template <typename Done>
  void deliver(boost::asio::io_context& ctx, Done done) {
    for (int i = 0;; ++i) {
      ctx.restart();
      if (ctx.poll_one() == 0) break;
      if (i == 1'000'000) fail("the io_context does not settle");
    }
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!done()) {
      if (std::chrono::steady_clock::now() > end)
        fail("a completion the model made was not delivered");
      std::this_thread::yield();
      ctx.restart();
      ctx.poll();
    }
  }

  template <typename Describe>
  void check(bool ok, Describe describe) {
    if (!ok) fail(describe());
  }

  [[noreturn]] static void fail(const std::string& what) {
    std::fprintf(stderr, "fuzz_joint: %s\n", what.c_str());
    std::abort();
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  manual_clock::reset();
  reader in(data, size);
  quiet_env env;
  const std::size_t buckets = in.in(1, 4);
  ratelimit::model::joint_harness<reader, quiet_env> h(in, env, buckets);
  h.run(120);  // or until the input ends
  return 0;
}

#if defined(RATELIMIT_FUZZ_REPLAY)
#include "fuzz_replay.hpp"

int main(int argc, char** argv) {
  return ratelimit::test::fuzz_replay_main("fuzz_joint_replay", "all match the model", argc, argv,
                                           LLVMFuzzerTestOneInput);
}
#endif
