// The threads and coroutines examples, run with short settings: their output
// says what the README says it does, at the times it says.
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

/// Runs `cmd`, returns its standard output; `status` gets its exit status.
std::string run(const std::string& cmd, int& status) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  BOOST_REQUIRE_MESSAGE(p, "cannot run " << cmd);
  char buf[4096];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, p))
    out.append(buf, n);
  status = ::pclose(p);
  BOOST_TEST_MESSAGE(cmd << ":\n" << out);
  return out;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);)
    lines.push_back(l);
  return lines;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(example_output)

BOOST_AUTO_TEST_CASE(threads_burst_then_one_per_interval) {
  constexpr int workers = 7, capacity = 3, interval = 200;
  int status = 0;
  const std::string out = run(std::string(THREADS_EXE) + " 7 3 200", status);
  BOOST_REQUIRE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const auto lines = lines_of(out);
  BOOST_REQUIRE(!lines.empty());
  BOOST_TEST(lines[0] == "bucket: 3 tokens, one more every 200 ms; 7 worker threads");
  const std::regex got(" *([0-9]+) ms  worker ([0-9]+) got its token");
  std::vector<long> times;
  std::set<int> ids;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    std::smatch m;
    BOOST_REQUIRE_MESSAGE(std::regex_match(lines[i], m, got), "unexpected line: " << lines[i]);
    times.push_back(std::stol(m[1]));
    ids.insert(std::stoi(m[2]));
  }
  BOOST_TEST(times.size() == std::size_t(workers));
  BOOST_TEST(ids.size() == std::size_t(workers));
  BOOST_TEST(std::is_sorted(times.begin(), times.end()));
  // The burst: `capacity` workers at once. Then one per interval, never early.
  for (int k = 0; k < capacity; ++k)
    BOOST_TEST(times[k] < interval / 2);
  for (int k = capacity; k < workers; ++k) {
    const long due = (k - capacity + 1) * interval;
    BOOST_TEST(times[k] >= due - 5, "worker #" << k << " at " << times[k] << " ms");
    BOOST_TEST(times[k] < due + interval / 2 + 300, "worker #" << k << " at " << times[k] << " ms");
  }
}

BOOST_AUTO_TEST_CASE(coroutines_shows_each_feature) {
  int status = 0;
  const std::string out = run(COROUTINES_EXE, status);
  BOOST_REQUIRE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  // What each line says, and when it is due (ms; the bucket holds 4, refills 10/s).
  const std::vector<std::pair<long, std::string>> expected{
      {0, "1. three senders, two messages each (burst 4, then 10/s)"},
      {0, "sender 1 sends message 1"},
      {0, "sender 2 sends message 1"},
      {0, "sender 3 sends message 1"},
      {0, "sender 1 sends message 2"},
      {100, "sender 2 sends message 2"},
      {200, "sender 3 sends message 2"},
      {200, "2. a batch needs 4 tokens: it waits until 4 have accrued"},
      {600, "batch of 4 sent"},
      {600, "3. waits with a deadline"},
      {650, "   within 50 ms: timed out (no token taken)"},
      {700, "   within 500 ms: sent"},
      {700, "4. load shedding: 10 requests arrive at once, try_get_token() serves what it can"},
      {1100, "   served 4, shed 6"},
  };
  const auto lines = lines_of(out);
  BOOST_REQUIRE_EQUAL(lines.size(), expected.size());
  const std::regex stamped(" *([0-9]+) ms  (.*)");
  long previous = 0;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    std::smatch m;
    BOOST_REQUIRE_MESSAGE(std::regex_match(lines[i], m, stamped), "unexpected line: " << lines[i]);
    const long t = std::stol(m[1]);
    BOOST_TEST(m[2].str() == expected[i].second);
    // Never early (the clock is the bucket's); late only by scheduling delays.
    BOOST_TEST(t >= expected[i].first - 10, lines[i]);
    BOOST_TEST(t <= expected[i].first + 250 + 20 * long(i), lines[i]);
    BOOST_TEST(t >= previous);
    previous = t;
  }
}

BOOST_AUTO_TEST_SUITE_END()
