// The metrics snapshot (ratelimit/metrics.hpp) and its Prometheus text
// exposition (ratelimit/prometheus.hpp): the histogram's buckets at every
// bound, the error codes' names, the exposition's lines against the text
// format's rules, escaping, refusals of bad names, and (where CMake found
// promtool) `promtool check metrics` on a sample.
#include <ratelimit/metrics.hpp>
#include <ratelimit/prometheus.hpp>

#include <boost/test/unit_test.hpp>

#include <stdio.h>   // popen, pclose, fdopen
#include <stdlib.h>  // mkstemp

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using ratelimit::error_kind_name;
using ratelimit::error_kind_of;
using ratelimit::error_kinds;
using ratelimit::limiter_metrics;
using ratelimit::wait_histogram_layout;
using ratelimit::prometheus::labelled_metrics;
using ratelimit::prometheus::write_text;
namespace error = ratelimit::error;

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    lines.push_back(line);
  return lines;
}

// A snapshot whose every number differs, so that a number written in the
// wrong series shows.
limiter_metrics numbered(std::uint64_t base) {
  limiter_metrics m;
  m.requests = base + 1;
  m.grants = base + 2;
  m.refusals = base + 3;
  m.cancellations = base + 4;
  m.deadline_expiries = base + 5;
  for (std::size_t i = 0; i < error_kinds; ++i)
    m.errors[i] = base + 10 + i;
  m.tokens_granted = base + 6;
  m.tokens_given_back = base + 7;
  m.queued_requests = base + 8;
  m.tokens_available = base + 9;
  for (std::size_t b = 0; b < wait_histogram_layout::buckets; ++b)
    m.wait_counts[b] = b % 3;
  m.wait_sum_us = 1'500'000 + base;
  return m;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(metrics)

BOOST_AUTO_TEST_CASE(a_wait_falls_in_the_first_bucket_whose_bound_it_does_not_exceed) {
  using L = wait_histogram_layout;
  BOOST_TEST(L::bucket_of(std::numeric_limits<std::int64_t>::min()) == 0u);
  BOOST_TEST(L::bucket_of(-1) == 0u);
  BOOST_TEST(L::bucket_of(0) == 0u);
  for (std::size_t b = 0; b < L::bounds; ++b) {
    BOOST_TEST_CONTEXT("bound " << b << " (" << L::bound_ns[b] << " ns)") {
      BOOST_TEST(L::bucket_of(L::bound_ns[b]) == b);  // le: "less than or equal"
      BOOST_TEST(L::bucket_of(L::bound_ns[b] - 1) == b);
      BOOST_TEST(L::bucket_of(L::bound_ns[b] + 1) == b + 1);
      if (b > 0) BOOST_TEST(L::bound_ns[b - 1] < L::bound_ns[b]);
    }
  }
  BOOST_TEST(L::bucket_of(std::numeric_limits<std::int64_t>::max()) == L::bounds);  // +Inf
  static_assert(L::bucket_of(1'000) == 0 && L::bucket_of(1'001) == 1);
}

BOOST_AUTO_TEST_CASE(the_bounds_are_one_two_and_a_half_and_five_per_decade_from_a_microsecond) {
  using L = wait_histogram_layout;
  BOOST_TEST(L::bound_ns.front() == 1'000);              // 1 µs
  BOOST_TEST(L::bound_ns.back() == 10'000'000'000'000);  // 10 000 s
  const double steps[] = {1, 2.5, 5};
  for (std::size_t b = 0; b < L::bounds; ++b) {
    double expect = steps[b % 3] * 1e3;
    for (std::size_t d = 0; d < b / 3; ++d)
      expect *= 10;
    BOOST_TEST(static_cast<double>(L::bound_ns[b]) == expect);
    // The le text is the same number, in seconds.
    const std::string text(L::bound_text[b]);
    BOOST_TEST_CONTEXT("le=\"" << text << "\"") {
      BOOST_TEST(std::strtod(text.c_str(), nullptr) * 1e9 == expect,
                 boost::test_tools::tolerance(1e-9));
    }
  }
  // As Go's clients print them (%g, shortest): exponents below 1e-4 only.
  BOOST_TEST(L::bound_text[0] == "1e-06");
  BOOST_TEST(L::bound_text[5] == "5e-05");
  BOOST_TEST(L::bound_text[6] == "0.0001");
  BOOST_TEST(L::bound_text[18] == "1");
  BOOST_TEST(L::bound_text[30] == "10000");
}

BOOST_AUTO_TEST_CASE(errors_are_counted_by_their_code) {
  const std::pair<error::errors, const char*> named[] = {
      {error::exceeds_capacity, "exceeds_capacity"},   {error::bucket_closed, "bucket_closed"},
      {error::would_deadlock, "would_deadlock"},       {error::too_many_keys, "too_many_keys"},
      {error::redis_unavailable, "redis_unavailable"}, {error::redis_error, "redis_error"},
      {error::redis_bad_reply, "redis_bad_reply"},     {error::context_stopped, "context_stopped"},
      {error::exceeds_horizon, "exceeds_horizon"}};
  std::set<std::string_view> names;
  for (const auto& [e, name] : named) {
    BOOST_TEST(error_kind_of(error::make_error_code(e)) == static_cast<std::size_t>(e));
    BOOST_TEST(error_kind_name(static_cast<std::size_t>(e)) == name);
    names.insert(error_kind_name(static_cast<std::size_t>(e)));
  }
  BOOST_TEST(names.size() == error_kinds - 1);
  // A code the library does not have yet has no name: a new one must get one.
  BOOST_TEST(error::get_category().message(static_cast<int>(error_kinds)) ==
             "unknown ratelimit error");
  BOOST_TEST(error_kind_of(boost::system::error_code(static_cast<int>(error_kinds),
                                                     error::get_category())) == 0u);
  BOOST_TEST(error_kind_of(boost::system::error_code(0, error::get_category())) == 0u);
  BOOST_TEST(error_kind_of(make_error_code(boost::system::errc::not_enough_memory)) == 0u);
  BOOST_TEST(error_kind_name(0) == "other");
  BOOST_TEST(error_kind_name(error_kinds) == "other");
}

BOOST_AUTO_TEST_CASE(snapshots_add_up) {
  limiter_metrics a = numbered(100), b = numbered(1000), sum = a;
  sum += b;
  BOOST_TEST(sum.requests == a.requests + b.requests);
  BOOST_TEST(sum.grants == a.grants + b.grants);
  BOOST_TEST(sum.refusals == a.refusals + b.refusals);
  BOOST_TEST(sum.cancellations == a.cancellations + b.cancellations);
  BOOST_TEST(sum.deadline_expiries == a.deadline_expiries + b.deadline_expiries);
  for (std::size_t i = 0; i < error_kinds; ++i)
    BOOST_TEST(sum.errors[i] == a.errors[i] + b.errors[i]);
  BOOST_TEST(sum.tokens_granted == a.tokens_granted + b.tokens_granted);
  BOOST_TEST(sum.tokens_given_back == a.tokens_given_back + b.tokens_given_back);
  BOOST_TEST(sum.queued_requests == a.queued_requests + b.queued_requests);
  BOOST_TEST(sum.tokens_available == a.tokens_available + b.tokens_available);
  for (std::size_t k = 0; k < wait_histogram_layout::buckets; ++k)
    BOOST_TEST(sum.wait_counts[k] == a.wait_counts[k] + b.wait_counts[k]);
  BOOST_TEST(sum.wait_sum_us == a.wait_sum_us + b.wait_sum_us);
  BOOST_TEST(sum.wait_count() == a.wait_count() + b.wait_count());
  BOOST_TEST(limiter_metrics{}.wait_count() == 0u);
}

BOOST_AUTO_TEST_CASE(the_exposition_follows_the_text_format) {
  const labelled_metrics limiters[] = {{{{"limiter", "api"}}, numbered(0)},
                                       {{{"limiter", "login"}, {"tier", "free"}}, numbered(500)}};
  std::string out = "# kept\n";
  write_text(out, limiters);
  BOOST_TEST_MESSAGE(out);
  const auto lines = lines_of(out);
  BOOST_REQUIRE(!lines.empty());
  BOOST_TEST(lines.front() == "# kept");  // appended, never replacing
  BOOST_TEST(out.back() == '\n');

  // Each family: HELP then TYPE, then its samples, all together (the format
  // forbids a family's samples in two places).
  std::map<std::string, std::string> types;
  std::vector<std::string> order;
  std::map<std::string, std::string> samples;  // name{labels} -> value
  std::string current;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const std::string& l = lines[i];
    if (l.starts_with("# HELP ")) {
      const std::string name = l.substr(7, l.find(' ', 7) - 7);
      BOOST_TEST(types.count(name) == 0u, name << " twice");
      BOOST_REQUIRE(i + 1 < lines.size());
      BOOST_TEST(lines[i + 1].starts_with("# TYPE " + name + " "));
      types[name] = lines[i + 1].substr(8 + name.size());
      order.push_back(name);
      current = name;
      ++i;
      continue;
    }
    const std::string series = l.substr(0, l.rfind(' '));
    const std::string name = series.substr(0, series.find('{'));
    if (current == "ratelimit_wait_seconds")
      BOOST_TEST(
          (name == current + "_bucket" || name == current + "_sum" || name == current + "_count"),
          name << " outside its family " << current);
    else
      BOOST_TEST(name == current, name << " outside its family " << current);
    BOOST_TEST(samples.count(series) == 0u, series << " twice");
    samples[series] = l.substr(l.rfind(' ') + 1);
  }
  const std::vector<std::string> want_order = {"ratelimit_requests_total",
                                               "ratelimit_grants_total",
                                               "ratelimit_refusals_total",
                                               "ratelimit_cancellations_total",
                                               "ratelimit_deadline_expiries_total",
                                               "ratelimit_errors_total",
                                               "ratelimit_granted_tokens_total",
                                               "ratelimit_given_back_tokens_total",
                                               "ratelimit_queued_requests",
                                               "ratelimit_available_tokens",
                                               "ratelimit_wait_seconds"};
  BOOST_TEST(order == want_order, boost::test_tools::per_element());
  for (const auto& [name, type] : types) {
    BOOST_TEST_CONTEXT(name) {
      if (name.ends_with("_total"))
        BOOST_TEST(type == "counter");
      else if (name == "ratelimit_wait_seconds")
        BOOST_TEST(type == "histogram");
      else
        BOOST_TEST(type == "gauge");
    }
  }

  // Every number in its series, for both limiters.
  auto at = [&](const std::string& series) {
    BOOST_TEST_CONTEXT(series) {
      BOOST_TEST(samples.count(series) == 1u);
    }
    return samples.count(series) ? samples.at(series) : std::string("(missing)");
  };
  const std::string api = "{limiter=\"api\"", login = "{limiter=\"login\",tier=\"free\"";
  BOOST_TEST(at("ratelimit_requests_total" + api + "}") == "1");
  BOOST_TEST(at("ratelimit_grants_total" + api + "}") == "2");
  BOOST_TEST(at("ratelimit_refusals_total" + api + "}") == "3");
  BOOST_TEST(at("ratelimit_cancellations_total" + api + "}") == "4");
  BOOST_TEST(at("ratelimit_deadline_expiries_total" + api + "}") == "5");
  BOOST_TEST(at("ratelimit_granted_tokens_total" + api + "}") == "6");
  BOOST_TEST(at("ratelimit_given_back_tokens_total" + api + "}") == "7");
  BOOST_TEST(at("ratelimit_queued_requests" + api + "}") == "8");
  BOOST_TEST(at("ratelimit_available_tokens" + api + "}") == "9");
  BOOST_TEST(at("ratelimit_requests_total" + login + "}") == "501");
  BOOST_TEST(at("ratelimit_available_tokens" + login + "}") == "509");
  for (std::size_t i = 0; i < error_kinds; ++i) {
    const std::string code = ",error=\"" + std::string(error_kind_name(i)) + "\"}";
    BOOST_TEST(at("ratelimit_errors_total" + api + code) == std::to_string(10 + i));
    BOOST_TEST(at("ratelimit_errors_total" + login + code) == std::to_string(510 + i));
  }
  // The histogram: cumulative buckets ending in +Inf, which equals _count.
  // Bucket b holds b % 3 waits: 0, 1, 2, 0, 1, 2, ... (31 in all).
  auto bucket = [&](const char* le) {
    return at("ratelimit_wait_seconds_bucket" + api + ",le=\"" + le + "\"}");
  };
  BOOST_TEST(bucket("1e-06") == "0");
  BOOST_TEST(bucket("2.5e-06") == "1");
  BOOST_TEST(bucket("5e-06") == "3");
  BOOST_TEST(bucket("1e-05") == "3");
  BOOST_TEST(bucket("2.5e-05") == "4");
  BOOST_TEST(bucket("0.0001") == "6");
  BOOST_TEST(bucket("1") == "18");
  BOOST_TEST(bucket("5000") == "30");
  BOOST_TEST(bucket("10000") == "30");
  BOOST_TEST(bucket("+Inf") == "31");
  BOOST_TEST(at("ratelimit_wait_seconds_count" + api + "}") == "31");
  BOOST_TEST(numbered(0).wait_count() == 31u);
  std::uint64_t previous = 0;  // cumulative: never decreasing
  for (std::size_t b = 0; b < wait_histogram_layout::bounds; ++b) {
    const std::uint64_t n = std::stoull(bucket(wait_histogram_layout::bound_text[b].data()));
    BOOST_TEST(n >= previous);
    previous = n;
  }
  BOOST_TEST(at("ratelimit_wait_seconds_sum" + api + "}") == "1.5");  // seconds
  BOOST_TEST(at("ratelimit_wait_seconds_sum" + login + "}") == "1.5005");
  // Nothing else: 9 plain series, 10 error codes, 31 + 1 buckets, sum, count.
  BOOST_TEST(samples.size() == 2u * (9 + error_kinds + wait_histogram_layout::buckets + 2));
}

BOOST_AUTO_TEST_CASE(labels_and_help_are_escaped_and_names_checked) {
  std::string out;
  const labelled_metrics odd[] = {{{{"path", "a\\b \"c\"\nd"}}, {}}};
  write_text(out, odd, "my_app_limits");
  BOOST_TEST(out.find("my_app_limits_requests_total{path=\"a\\\\b \\\"c\\\"\\nd\"} 0\n") !=
             std::string::npos);
  BOOST_TEST(out.find("# TYPE my_app_limits_requests_total counter\n") != std::string::npos);
  // HELP text escapes a backslash and a newline, not a quote.
  std::string help;
  ratelimit::prometheus::detail::append_family(help, "p_", "x_total", "counter", "a\\b\n\"c\"");
  BOOST_TEST(help == "# HELP p_x_total a\\\\b\\n\"c\"\n# TYPE p_x_total counter\n");
  // UTF-8 label values as they are; an empty value is no label at all.
  out.clear();
  const labelled_metrics utf8[] = {
      {{{"city", "Z\u00fcrich \u20ac \U0001D11E"}, {"empty", ""}}, {}}};
  write_text(out, utf8);
  BOOST_TEST(out.find("\nratelimit_requests_total{city=\"Z\u00fcrich \u20ac \U0001D11E\"} 0\n") !=
             std::string::npos);
  BOOST_TEST(out.find("empty") == std::string::npos);

  // Without labels: bare names; with none at all, only the families.
  out.clear();
  const labelled_metrics bare[] = {{{}, {}}};
  write_text(out, bare);
  BOOST_TEST(out.find("\nratelimit_requests_total 0\n") != std::string::npos);
  BOOST_TEST(out.find("\nratelimit_errors_total{error=\"other\"} 0\n") != std::string::npos);
  BOOST_TEST(out.find("\nratelimit_wait_seconds_bucket{le=\"+Inf\"} 0\n") != std::string::npos);
  out.clear();
  write_text(out, std::span<const labelled_metrics>{});
  const auto family_lines = lines_of(out);
  BOOST_TEST(family_lines.size() == 22u);  // HELP and TYPE of the 11 families
  for (std::size_t i = 0; i < family_lines.size(); ++i)
    BOOST_TEST(family_lines[i].starts_with(i % 2 == 0 ? "# HELP ratelimit_" : "# TYPE ratelimit_"));

  // Refused, with nothing appended.
  auto refused = [](std::vector<labelled_metrics> limiters, std::string_view prefix,
                    const char* why) {
    std::string text = "kept";
    BOOST_TEST_CONTEXT(why) {
      BOOST_CHECK_THROW(write_text(text, limiters, prefix), std::invalid_argument);
      BOOST_TEST(text == "kept");
    }
  };
  const limiter_metrics z;
  refused({{{{"limiter", "a"}}, z}}, "", "an empty prefix");
  refused({{{{"limiter", "a"}}, z}}, "9lives", "a prefix starting with a digit");
  refused({{{{"limiter", "a"}}, z}}, "my-app", "a prefix with a dash");
  refused({{{{"limiter", "a"}}, z}}, "my_app:limits", "a prefix with a colon (recording rules')");
  refused({{{{"limiter", "\xff"}}, z}}, "ratelimit", "a label value that is not UTF-8");
  refused({{{{"limiter", "\xc0\xaf"}}, z}}, "ratelimit", "an overlong UTF-8 form");
  refused({{{{"limiter", "\xed\xa0\x80"}}, z}}, "ratelimit", "a UTF-16 surrogate");
  refused({{{{"limiter", "\xf4\x90\x80\x80"}}, z}}, "ratelimit", "a code point above U+10FFFF");
  refused({{{{"limiter", "ab\xe2\x82"}}, z}}, "ratelimit", "a UTF-8 sequence cut short");
  refused({{{{"", "a"}}, z}}, "ratelimit", "an empty label name");
  refused({{{{"a:b", "a"}}, z}}, "ratelimit", "a label name with a colon");
  refused({{{{"1a", "a"}}, z}}, "ratelimit", "a label name starting with a digit");
  refused({{{{"__name__", "a"}}, z}}, "ratelimit", "a reserved label name");
  refused({{{{"le", "a"}}, z}}, "ratelimit", "the histogram's own label");
  refused({{{{"error", "a"}}, z}}, "ratelimit", "the errors' own label");
  refused({{{{"x", "a"}, {"x", "b"}}, z}}, "ratelimit", "a label name twice");
  refused({{{{"x", "a"}, {"y", "b"}}, z}, {{{"y", "b"}, {"x", "a"}}, z}}, "ratelimit",
          "two limiters with the same labels in another order");
  refused({{{}, z}, {{}, z}}, "ratelimit", "two limiters without labels");
  refused({{{{"x", "a"}, {"y", ""}}, z}, {{{"x", "a"}}, z}}, "ratelimit",
          "two limiters whose labels differ by an empty value only");
  // Different values, or a label more, are different series.
  std::string fine;
  const labelled_metrics distinct[] = {
      {{{"x", "a"}}, z}, {{{"x", "b"}}, z}, {{{"x", "a"}, {"y", "a"}}, z}, {{}, z}};
  BOOST_CHECK_NO_THROW(write_text(fine, distinct));
}

// Where CMake found promtool; else the test says it was skipped, and why.
#ifndef RATELIMIT_PROMTOOL
#define RATELIMIT_PROMTOOL ""
#endif

struct promtool_found {
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    boost::test_tools::assertion_result r(std::string_view(RATELIMIT_PROMTOOL) != "");
    r.message() << "promtool was not found when CMake configured the tests (Debian package "
                   "prometheus, which scripts/test installs)";
    return r;
  }
};

// Prometheus's own linter reads the exposition: no parse error, no lint
// problem (names, suffixes, units, HELP).
BOOST_AUTO_TEST_CASE(promtool_accepts_the_exposition,
                     *boost::unit_test::precondition(promtool_found{})) {
  const labelled_metrics limiters[] = {
      {{{"limiter", "api"}}, numbered(0)},
      {{{"limiter", "login \"admin\"\\x\ny"}, {"city", "Z\u00fcrich"}}, numbered(7)},
      {{{"limiter", "api"}, {"tier", ""}, {"city", "Z\u00fcrich"}}, numbered(9)},
      {{}, limiter_metrics{}}};
  std::string text;
  write_text(text, limiters);
  char path[] = "/tmp/ratelimit-promtool-XXXXXX";
  const int fd = ::mkstemp(path);
  BOOST_REQUIRE(fd >= 0);
  FILE* f = ::fdopen(fd, "w");
  BOOST_REQUIRE(f != nullptr);
  BOOST_REQUIRE(std::fwrite(text.data(), 1, text.size(), f) == text.size());
  std::fclose(f);
  const std::string command =
      std::string(RATELIMIT_PROMTOOL) + " check metrics < " + path + " 2>&1";
  FILE* p = ::popen(command.c_str(), "r");
  BOOST_REQUIRE(p != nullptr);
  std::string said;
  char buf[512];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;)
    said.append(buf, n);
  const int status = ::pclose(p);
  std::remove(path);
  BOOST_TEST_MESSAGE("promtool check metrics: exit status " << status << ", said: '" << said
                                                            << "'");
  BOOST_TEST(status == 0);
  BOOST_TEST(said == "");
}

BOOST_AUTO_TEST_SUITE_END()
