// Strict command-line options for the programs we ship (the examples and the
// benchmarks). Not part of the library.
//
// Every option parses into its real range or the program stops with one line
// on stderr naming the option, the value and what is allowed, and exit status
// 2: a negative number for an unsigned option, a value out of range, garbage,
// an unknown option and an option given twice are refused, never wrapped or
// clamped. `--help` prints every option with its range and default, in a form
// the tests read (test/examples/test_command_lines.cpp), so that an option
// added later is tested too:
//
//   --NAME N      help text  [range: LO..HI; default: D]     an integer
//   --NAME X      help text  [range: LO..HI; default: D]     a real number
//   --NAME WORD   help text  [one of: a, b; default: a]
//   --NAME ADDR   help text  [an IP address; default: D]
//   --NAME TEXT   help text  [text; default: D]
//   --NAME        help text                                  a flag
//
// Values are given as `--name value` or `--name=value`. Operands (arguments
// that are not options) fill the options named by operand(), in order. The
// whole command line is checked before `--help` is answered, so
// `prog --port 65535 --help` tells whether 65535 is accepted.
//
//   cli::parser cli("echo_client", "sends lines to echo_server, prints the replies");
//   cli.option("port", port, std::uint16_t(1), std::uint16_t(65535), "server port");
//   if (int rc = cli.parse(argc, argv); rc >= 0) return rc;
#ifndef RATELIMIT_EXAMPLES_CLI_HPP
#define RATELIMIT_EXAMPLES_CLI_HPP

#include <boost/asio/ip/address.hpp>

#include <cctype>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdio>
#include <functional>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace cli {

/// What parse() reports on stderr: one line, after "PROGRAM: ".
class bad_input : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The shortest text that reads back as `x`.
inline std::string format_real(double x) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(x);
}

/// Parses all of `text` as a decimal integer of type T: digits only (a sign
/// only where T is signed), no spaces, no base prefix, within [min, max].
template <std::integral T>
T parse_integer(std::string_view text, T min, T max, const std::string& allowed) {
  T v{};
  const char* first = text.data();
  const char* last = first + text.size();
  const bool plain = !text.empty() && text.front() != '+';
  auto [ptr, ec] = plain ? std::from_chars(first, last, v)
                         : std::from_chars_result{first, std::errc::invalid_argument};
  if (ec == std::errc::result_out_of_range ||
      (ec == std::errc() && ptr == last && (v < min || v > max)))
    throw bad_input("'" + std::string(text) + "' is out of range (" + allowed + ")");
  if (ec != std::errc() || ptr != last) {
    // "-1" for an unsigned option is out of range, not garbage.
    if constexpr (std::is_unsigned_v<T>) {
      long long s{};
      auto [p2, e2] = std::from_chars(first, last, s);
      if ((e2 == std::errc() && p2 == last && s < 0) ||
          (e2 == std::errc::result_out_of_range && text.front() == '-'))
        throw bad_input("'" + std::string(text) + "' is out of range (" + allowed + ")");
    }
    throw bad_input("'" + std::string(text) + "' is not an integer (" + allowed + ")");
  }
  return v;
}

/// Parses all of `text` as a finite decimal number within [min, max].
inline double parse_real(std::string_view text, double min, double max,
                         const std::string& allowed) {
  double v{};
  const char* first = text.data();
  const char* last = first + text.size();
  const bool plain = !text.empty() && text.front() != '+';
  auto [ptr, ec] = plain ? std::from_chars(first, last, v, std::chars_format::general)
                         : std::from_chars_result{first, std::errc::invalid_argument};
  if (ec == std::errc::result_out_of_range && ptr == last)
    throw bad_input("'" + std::string(text) + "' is out of range (" + allowed + ")");
  if (ec != std::errc() || ptr != last || std::isnan(v))
    throw bad_input("'" + std::string(text) + "' is not a number (" + allowed + ")");
  if (!(v >= min && v <= max))
    throw bad_input("'" + std::string(text) + "' is out of range (" + allowed + ")");
  return v;
}

class parser {
 public:
  /// `program` names the program in messages; `summary` is the first line of
  /// --help; `operands` names the operands in the usage line (e.g. "HOST PORT").
  parser(std::string program, std::string summary, std::string operands = "")
      : program_(std::move(program)),
        summary_(std::move(summary)),
        operands_usage_(std::move(operands)) {}

  /// An integer option within [min, max].
  template <std::integral T>
  parser& option(const std::string& name, T& target, T min, T max, const std::string& help) {
    const std::string allowed = "range: " + std::to_string(min) + ".." + std::to_string(max);
    add(name, "N", help, allowed, std::to_string(target),
        [&target, min, max, allowed](std::string_view v) {
          target = parse_integer<T>(v, min, max, allowed);
        });
    return *this;
  }

  /// A real option within [min, max] (finite).
  parser& option(const std::string& name, double& target, double min, double max,
                 const std::string& help) {
    const std::string allowed = "range: " + format_real(min) + ".." + format_real(max);
    add(name, "X", help, allowed, format_real(target),
        [&target, min, max, allowed](std::string_view v) {
          target = parse_real(v, min, max, allowed);
        });
    return *this;
  }

  /// A word out of `choices`.
  parser& choice(const std::string& name, std::string& target, std::vector<std::string> choices,
                 const std::string& help) {
    std::string allowed = "one of: ";
    for (std::size_t i = 0; i < choices.size(); ++i)
      allowed += (i ? ", " : "") + choices[i];
    add(name, "WORD", help, allowed, target, [&target, choices, allowed](std::string_view v) {
      for (const auto& c : choices)
        if (v == c) {
          target = c;
          return;
        }
      throw bad_input("'" + std::string(v) + "' is not allowed (" + allowed + ")");
    });
    return *this;
  }

  /// An IPv4 or IPv6 address; empty when not given and `target` was empty.
  parser& address(const std::string& name, std::string& target, const std::string& help) {
    const std::string allowed = "an IP address";
    add(name, "ADDR", help, allowed, target, [&target, allowed](std::string_view v) {
      boost::system::error_code ec;
      boost::asio::ip::make_address(std::string(v), ec);
      if (ec) throw bad_input("'" + std::string(v) + "' is not an IP address");
      target = v;
    });
    return *this;
  }

  /// Free text of one line (no control characters).
  parser& text(const std::string& name, std::string& target, const std::string& help) {
    add(name, "TEXT", help, "text", target, [&target](std::string_view v) {
      for (unsigned char c : v)
        if (c < 0x20 || c == 0x7f)
          throw bad_input("the value has a control character (one line of text)");
      target = v;
    });
    return *this;
  }

  /// An option without a value.
  parser& flag(const std::string& name, bool& target, const std::string& help) {
    add(name, "", help, "", "", [&target](std::string_view) { target = true; });
    return *this;
  }

  /// The next operand (argument that is not an option) sets option `name`.
  parser& operand(const std::string& name) {
    find(name);  // must exist
    operand_names_.push_back(name);
    return *this;
  }

  /// Option `name` must be given (as an option or an operand).
  parser& required(const std::string& name) {
    find(name).required = true;
    return *this;
  }

  /// What --help says of option `name`'s default (when it is not a value).
  parser& default_text(const std::string& name, std::string text) {
    find(name).default_text = std::move(text);
    return *this;
  }

  /// Whether option `name` was given.
  bool given(const std::string& name) const { return find(name).seen; }

  /// Parses the command line. Returns -1 when the program should go on; 0
  /// after printing --help; 2 after printing one line about bad input.
  int parse(int argc, char** argv) {
    try {
      bool help = false;
      std::size_t next_operand = 0;
      bool only_operands = false;
      for (int i = 1; i < argc; ++i) {
        std::string_view a = argv[i];
        if (!only_operands && a == "--") {
          only_operands = true;
          continue;
        }
        if (!only_operands && (a == "--help" || a == "-h")) {
          help = true;
          continue;
        }
        if (!only_operands && a.size() > 1 && a.front() == '-' && !is_negative_number(a)) {
          if (a.substr(0, 2) != "--")
            throw bad_input("unknown option '" + std::string(a) + "' (see --help)");
          std::string_view name = a.substr(2);
          std::optional<std::string_view> value;
          if (auto eq = name.find('='); eq != name.npos) {
            value = name.substr(eq + 1);
            name = name.substr(0, eq);
          }
          entry* e = lookup(name);
          if (!e) throw bad_input("unknown option '--" + std::string(name) + "' (see --help)");
          if (e->metavar.empty()) {
            if (value)
              throw bad_input("--" + e->name + " takes no value (got '" + std::string(*value) +
                              "')");
            set(*e, "");
            continue;
          }
          if (!value) {
            if (i + 1 >= argc)
              throw bad_input("--" + e->name + " needs a value (" + e->allowed + ")");
            value = argv[++i];
          }
          set(*e, *value);
          continue;
        }
        if (next_operand >= operand_names_.size())
          throw bad_input("unexpected argument '" + std::string(a) + "' (see --help)");
        set(find(operand_names_[next_operand++]), a);
      }
      if (help) {
        std::cout << usage();
        return 0;
      }
      for (const auto& e : entries_)
        if (e.required && !e.seen)
          throw bad_input("--" + e.name + " is required (" + e.allowed + ")");
    } catch (const bad_input& e) {
      std::cerr << program_ << ": " << e.what() << '\n';
      return 2;
    }
    return -1;
  }

  /// The text --help prints.
  std::string usage() const {
    std::ostringstream os;
    os << "usage: " << program_ << " [OPTION]..." << (operands_usage_.empty() ? "" : " ")
       << operands_usage_ << "\n"
       << summary_ << "\n\noptions:\n";
    for (const auto& e : entries_) {
      std::string head = "  --" + e.name + (e.metavar.empty() ? "" : " " + e.metavar);
      os << head << std::string(head.size() + 2 < 24 ? 24 - head.size() : 2, ' ') << e.help;
      if (!e.metavar.empty()) {
        os << "  [" << e.allowed;
        if (e.required)
          os << "; required";
        else if (!e.default_text.empty())
          os << "; default: " << e.default_text;
        os << ']';
      }
      os << '\n';
    }
    os << "  --help                show this help\n";
    return os.str();
  }

 private:
  struct entry {
    std::string name, metavar, help, allowed, default_text;
    std::function<void(std::string_view)> apply;
    bool required = false;
    bool seen = false;
  };

  static bool is_negative_number(std::string_view a) {
    return a.size() > 1 && a[0] == '-' &&
           (std::isdigit(static_cast<unsigned char>(a[1])) || a[1] == '.');
  }

  void add(const std::string& name, std::string metavar, const std::string& help,
           std::string allowed, std::string default_text,
           std::function<void(std::string_view)> apply) {
    if (lookup(name)) throw std::logic_error("cli: option --" + name + " defined twice");
    entries_.push_back({name, std::move(metavar), help, std::move(allowed), std::move(default_text),
                        std::move(apply)});
  }

  entry* lookup(std::string_view name) {
    for (auto& e : entries_)
      if (e.name == name) return &e;
    return nullptr;
  }
  entry& find(const std::string& name) {
    if (entry* e = lookup(name)) return *e;
    throw std::logic_error("cli: no option --" + name);
  }
  const entry& find(const std::string& name) const { return const_cast<parser*>(this)->find(name); }

  void set(entry& e, std::string_view value) {
    if (e.seen) throw bad_input("--" + e.name + " given twice");
    e.seen = true;
    try {
      e.apply(value);
    } catch (const bad_input& err) {
      throw bad_input("--" + e.name + ": " + err.what());
    }
  }

  std::string program_, summary_, operands_usage_;
  std::vector<entry> entries_;
  std::vector<std::string> operand_names_;
};

}  // namespace cli

#endif  // RATELIMIT_EXAMPLES_CLI_HPP
