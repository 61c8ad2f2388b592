//
// ratelimit/prometheus.hpp: limiter metrics in the Prometheus text format.
//
#ifndef RATELIMIT_PROMETHEUS_HPP
#define RATELIMIT_PROMETHEUS_HPP

#include <ratelimit/metrics.hpp>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ratelimit::prometheus {

/// A label of a limiter's series: `name="value"`.
struct label {
  std::string name;
  std::string value;
};

/// One limiter's snapshot and the labels that tell its series apart from the
/// other limiters' (e.g. `{{"limiter", "api"}}`).
struct labelled_metrics {
  std::vector<label> labels;
  limiter_metrics metrics;
};

namespace detail {

inline bool is_name_start(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
inline bool is_name_char(char c) noexcept {
  return is_name_start(c) || (c >= '0' && c <= '9');
}

// Metric names may hold colons, but they are for recording rules (promtool
// lints them): a prefix is a plain name.
inline void check_prefix(std::string_view prefix) {
  bool ok = !prefix.empty() && is_name_start(prefix[0]);
  for (char c : prefix)
    ok = ok && is_name_char(c);
  if (!ok)
    throw std::invalid_argument("prometheus: metric name prefix '" + std::string(prefix) +
                                "' is not a name ([a-zA-Z_][a-zA-Z0-9_]*)");
}

// Whether `text` is well-formed UTF-8 (no overlong forms, no surrogates,
// nothing above U+10FFFF): Prometheus refuses a whole scrape for one label
// value that is not.
inline bool is_utf8(std::string_view text) noexcept {
  std::size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    std::size_t n;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 1, cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2, cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (text.size() - i <= n) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(text[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += n + 1;
  }
  return true;
}

inline void check_labels(const std::vector<label>& labels) {
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const std::string& n = labels[i].name;
    bool ok = !n.empty() && is_name_start(n[0]);
    for (char c : n)
      ok = ok && is_name_char(c);
    if (!ok)
      throw std::invalid_argument("prometheus: label name '" + n +
                                  "' is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)");
    if (n.starts_with("__"))
      throw std::invalid_argument("prometheus: label name '" + n +
                                  "' starts with '__', which Prometheus reserves");
    if (n == "le" || n == "error")
      throw std::invalid_argument("prometheus: label name '" + n +
                                  "' is one the exposition uses itself (le, error)");
    if (!is_utf8(labels[i].value))
      throw std::invalid_argument("prometheus: the value of label '" + n +
                                  "' is not UTF-8, which Prometheus requires");
    for (std::size_t j = 0; j < i; ++j)
      if (labels[j].name == n)
        throw std::invalid_argument("prometheus: label name '" + n + "' given twice");
  }
}

// The labels as a set, for telling two limiters' series apart (an empty
// value is no label, to Prometheus as here).
inline std::vector<std::pair<std::string_view, std::string_view>> label_set(
    const std::vector<label>& labels) {
  std::vector<std::pair<std::string_view, std::string_view>> set;
  set.reserve(labels.size());
  for (const label& l : labels)
    if (!l.value.empty()) set.emplace_back(l.name, l.value);
  std::sort(set.begin(), set.end());
  return set;
}

inline void append_escaped(std::string& out, std::string_view text, bool quotes) {
  for (char c : text) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else if (quotes && c == '"')
      out += "\\\"";
    else
      out += c;
  }
}

inline void append_number(std::string& out, std::uint64_t v) {
  char buf[24];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

inline void append_number(std::string& out, double v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

// name{labels[,extra_name="extra_value"]} value\n
template <typename Value>
void append_sample(std::string& out, std::string_view prefix, std::string_view name,
                   const std::vector<label>& labels, std::string_view extra_name,
                   std::string_view extra_value, Value value) {
  out += prefix;
  out += name;
  bool any = !extra_name.empty();
  for (const label& l : labels)
    any = any || !l.value.empty();
  if (any) {
    out += '{';
    bool first = true;
    for (const label& l : labels) {
      if (l.value.empty()) continue;  // no label, to Prometheus
      if (!first) out += ',';
      first = false;
      out += l.name;
      out += "=\"";
      append_escaped(out, l.value, true);
      out += '"';
    }
    if (!extra_name.empty()) {
      if (!first) out += ',';
      out += extra_name;
      out += "=\"";
      out += extra_value;  // ours: nothing to escape
      out += '"';
    }
    out += '}';
  }
  out += ' ';
  append_number(out, value);
  out += '\n';
}

inline void append_family(std::string& out, std::string_view prefix, std::string_view name,
                          std::string_view type, std::string_view help) {
  out += "# HELP ";
  out += prefix;
  out += name;
  out += ' ';
  append_escaped(out, help, false);
  out += "\n# TYPE ";
  out += prefix;
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

}  // namespace detail

/// Appends the limiters' metrics to `out` in the Prometheus text exposition
/// format (version 0.0.4, what `/metrics` serves with content type
/// `text/plain; version=0.0.4`): one family per metric, each with its HELP
/// and TYPE lines and one series per limiter, named `<prefix>_<metric>`:
///
/// | metric | type | from `limiter_metrics` |
/// |---|---|---|
/// | `requests_total` | counter | `requests` |
/// | `grants_total` | counter | `grants` |
/// | `refusals_total` | counter | `refusals` |
/// | `cancellations_total` | counter | `cancellations` |
/// | `deadline_expiries_total` | counter | `deadline_expiries` |
/// | `errors_total{error}` | counter | `errors`, a series per `error_kind_name` |
/// | `granted_tokens_total` | counter | `tokens_granted` |
/// | `given_back_tokens_total` | counter | `tokens_given_back` |
/// | `queued_requests` | gauge | `queued_requests` |
/// | `available_tokens` | gauge | `tokens_available` |
/// | `wait_seconds` | histogram | `wait_counts` (as cumulative buckets), `wait_sum_us` |
///
/// Every series is written, zeros too, so that rates and ratios exist from
/// the first scrape. Label values are written escaped (`\\`, `\"`, `\n`); a
/// label with an empty value is left out, as Prometheus would.
///
/// Pass every limiter of one exposition in one call: a second call with the
/// same prefix into the same document repeats the families, which the text
/// format forbids.
///
/// @throws std::invalid_argument, with nothing appended, if `prefix` is not a
/// name (`[a-zA-Z_][a-zA-Z0-9_]*`), a label name is not a name, starts with
/// `__`, is `le` or `error` (the exposition's own), or is given twice for one
/// limiter, a label value is not UTF-8, or two limiters have the same labels
/// (their series would be one).
inline void write_text(std::string& out, std::span<const labelled_metrics> limiters,
                       std::string_view prefix = "ratelimit") {
  detail::check_prefix(prefix);
  std::vector<std::vector<std::pair<std::string_view, std::string_view>>> sets;
  sets.reserve(limiters.size());
  for (const labelled_metrics& l : limiters) {
    detail::check_labels(l.labels);
    sets.push_back(detail::label_set(l.labels));
  }
  std::vector<std::size_t> order(sets.size());
  for (std::size_t i = 0; i < order.size(); ++i)
    order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return sets[a] < sets[b]; });
  for (std::size_t i = 1; i < order.size(); ++i)
    if (sets[order[i]] == sets[order[i - 1]])
      throw std::invalid_argument("prometheus: two limiters have the same labels");

  std::string text;  // appended to out at the end: all or nothing
  const std::string p = std::string(prefix) + "_";
  struct counter {
    std::string_view name;
    std::string_view type;
    std::string_view help;
    std::uint64_t limiter_metrics::*field;
  };
  static constexpr counter plain[] = {
      {"requests_total", "counter", "Requests made: tries, asynchronous and blocking requests.",
       &limiter_metrics::requests},
      {"grants_total", "counter", "Requests granted.", &limiter_metrics::grants},
      {"refusals_total", "counter", "Tries that found the tokens not there.",
       &limiter_metrics::refusals},
      {"cancellations_total", "counter", "Requests cancelled before they were granted.",
       &limiter_metrics::cancellations},
      {"deadline_expiries_total", "counter", "Requests whose deadline came before their tokens.",
       &limiter_metrics::deadline_expiries},
  };
  static constexpr counter tokens[] = {
      {"granted_tokens_total", "counter", "Tokens granted.", &limiter_metrics::tokens_granted},
      {"given_back_tokens_total", "counter", "Tokens given back (receipts, refunds).",
       &limiter_metrics::tokens_given_back},
      {"queued_requests", "gauge", "Requests waiting for their tokens now.",
       &limiter_metrics::queued_requests},
      {"available_tokens", "gauge", "Whole tokens in the bucket now.",
       &limiter_metrics::tokens_available},
  };
  auto write_plain = [&](const counter& c) {
    detail::append_family(text, p, c.name, c.type, c.help);
    for (const labelled_metrics& l : limiters)
      detail::append_sample(text, p, c.name, l.labels, {}, {}, l.metrics.*c.field);
  };
  for (const counter& c : plain)
    write_plain(c);
  detail::append_family(text, p, "errors_total", "counter", "Requests that failed, by error code.");
  for (const labelled_metrics& l : limiters)
    for (std::size_t i = 0; i < error_kinds; ++i)
      detail::append_sample(text, p, "errors_total", l.labels, "error", error_kind_name(i),
                            l.metrics.errors[i]);
  for (const counter& c : tokens)
    write_plain(c);
  detail::append_family(text, p, "wait_seconds", "histogram",
                        "How long granted requests waited for their tokens.");
  for (const labelled_metrics& l : limiters) {
    std::uint64_t cumulative = 0;
    for (std::size_t b = 0; b < wait_histogram_layout::bounds; ++b) {
      cumulative += l.metrics.wait_counts[b];
      detail::append_sample(text, p, "wait_seconds_bucket", l.labels, "le",
                            wait_histogram_layout::bound_text[b], cumulative);
    }
    cumulative += l.metrics.wait_counts[wait_histogram_layout::bounds];
    detail::append_sample(text, p, "wait_seconds_bucket", l.labels, "le", "+Inf", cumulative);
    detail::append_sample(text, p, "wait_seconds_sum", l.labels, {}, {},
                          static_cast<double>(l.metrics.wait_sum_us) / 1e6);
    detail::append_sample(text, p, "wait_seconds_count", l.labels, {}, {}, cumulative);
  }
  out += text;
}

/// The content type of `write_text`'s output, for an HTTP response.
inline constexpr std::string_view content_type = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace ratelimit::prometheus

#endif  // RATELIMIT_PROMETHEUS_HPP
