//
// test/support/manual_clock.hpp: a clock the tests move by hand.
//
// Modelled on Asio's time_t_timer example: a custom clock plus wait traits
// that tell the timer how long to really sleep. While a timer is not due on
// the manual clock the reactor re-checks it every `poll` of real time; once
// it is due (because a test advanced the clock) it fires on the next check.
// Tests therefore decide *what* happens by moving the manual clock, and only
// *how soon* depends on the machine.
//
#ifndef RATELIMIT_TEST_MANUAL_CLOCK_HPP
#define RATELIMIT_TEST_MANUAL_CLOCK_HPP

#include <atomic>
#include <chrono>
#include <cstdint>

namespace ratelimit::test {

struct manual_clock {
  using rep = std::int64_t;
  using period = std::nano;
  using duration = std::chrono::nanoseconds;
  using time_point = std::chrono::time_point<manual_clock>;
  static constexpr bool is_steady = false;  // tests may move it backwards

  /// Where every test starts: far from 0 so that "before the start" exists.
  static constexpr std::int64_t origin = 1'000'000'000'000;

  static time_point now() noexcept { return time_point(duration(ticks().load())); }
  static void advance(duration d) noexcept { ticks().fetch_add(d.count()); }
  static void set(time_point t) noexcept { ticks().store(t.time_since_epoch().count()); }
  static void reset() noexcept { ticks().store(origin); }

 private:
  static std::atomic<std::int64_t>& ticks() noexcept {
    static std::atomic<std::int64_t> t{origin};
    return t;
  }
};

struct manual_wait_traits {
  /// Real time between re-checks of a timer that is not yet due.
  static constexpr std::chrono::nanoseconds poll{std::chrono::microseconds(200)};

  static manual_clock::duration to_wait_duration(const manual_clock::duration& d) {
    return d > manual_clock::duration::zero() ? poll : manual_clock::duration::zero();
  }
  static manual_clock::duration to_wait_duration(const manual_clock::time_point& t) {
    return to_wait_duration(t - manual_clock::now());
  }
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_MANUAL_CLOCK_HPP
