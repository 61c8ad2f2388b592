// The threads, coroutines and http_download examples, run with short
// settings: their output says what the README says it does, at the times it
// says.
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
      {1100, "5. what the bucket counted (metrics(): a snapshot for dashboards and alerts)"},
      {1100, "   19 requests: 12 granted (8 at once), 6 refused, 1 cancelled; 15 tokens"},
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

// http_download's demo, small: two downloads half a second apart through a
// server limiting each connection to 200000 B/s and all of them to 300000.
BOOST_AUTO_TEST_CASE(http_download_demo_keeps_to_its_byte_rates) {
  constexpr double size = 196608, rate = 200000, global = 300000, burst = 16384;
  int status = 0;
  const std::string out = run(std::string(HTTP_DOWNLOAD_EXE) +
                                  " --size 196608 --rate 200000 --global-rate 300000"
                                  " --clients 2 --stagger 0.5",
                              status);
  BOOST_REQUIRE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const auto lines = lines_of(out);
  BOOST_REQUIRE(lines.size() >= 5);
  BOOST_TEST(
      std::regex_match(lines[0], std::regex("2 clients download 196608 bytes from "
                                            "http://127\\.0\\.0\\.1:[0-9]+/, 0\\.5 s apart")),
      lines[0]);
  BOOST_TEST(lines[1] ==
             "limits: 195.3 KiB/s per connection, 293.0 KiB/s for the server (burst 16384 bytes)");
  const std::regex progress(" *([0-9.]+) s  client ([12]): +([0-9]+) bytes  ([0-9.]+) KiB/s");
  const std::regex done(
      "client ([12]): 196608 bytes in ([0-9.]+) s \\(([0-9.]+) KiB/s\\), "
      "complete and intact");
  const std::regex all(
      "all: 393216 bytes in ([0-9.]+) s \\(([0-9.]+) KiB/s; limit 293\\.0 KiB/s\\)");
  int finished = 0;
  bool summed = false;
  for (std::size_t i = 2; i < lines.size(); ++i) {
    std::smatch m;
    if (std::regex_match(lines[i], m, progress)) {
      BOOST_TEST(!finished, "progress after the summary: " << lines[i]);
      // Never much over the connection's rate (its burst over a half second at most).
      BOOST_TEST(std::stod(m[4]) * 1024 <= 1.1 * (rate + 2 * burst), lines[i]);
    } else if (std::regex_match(lines[i], m, done)) {
      ++finished;
      // A connection's burst, then its rate at most.
      BOOST_TEST(std::stod(m[2]) >= 0.95 * (size - burst) / rate, lines[i]);
    } else if (std::regex_match(lines[i], m, all)) {
      summed = true;
      // The server's burst, then its rate at most; and not far below it
      // (the stagger leaves the first half second to one connection).
      const double secs = std::stod(m[1]), achieved = std::stod(m[2]) * 1024;
      BOOST_TEST(secs >= 0.95 * (2 * size - burst) / global, lines[i]);
      BOOST_TEST(achieved <= global + burst / secs + 1024, lines[i]);
      BOOST_TEST(achieved >= 0.4 * global, lines[i]);
    } else {
      BOOST_ERROR("unexpected line: " << lines[i]);
    }
  }
  BOOST_TEST(finished == 2);
  BOOST_TEST(summed);
}

BOOST_AUTO_TEST_SUITE_END()
