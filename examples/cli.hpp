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
//   --NAME TEXT   help text  [text; default: D]              one line, not empty
//   --NAME        help text                                  a flag
//   operands: HOST (--host), PORT (--port)
//
// Values are given as `--name value` or `--name=value`. Operands (arguments
// that are not options) set, in order, the operand options not given as
// options. The whole command line is checked before `--help` is answered, so
// `prog --port 65535 --help` tells whether 65535 is accepted. In messages, a
// value's control characters are shown escaped (\n, \x1b), so that the
// message stays one line.
//
//   cli::parser cli("echo_client", "Sends lines to echo_server.", "HOST PORT");
//   cli.option("port", port, std::uint16_t(1), std::uint16_t(65535), "server port");
//   if (int rc = cli.parse(argc, argv); rc >= 0) return rc;
#ifndef RATELIMIT_EXAMPLES_CLI_HPP
#define RATELIMIT_EXAMPLES_CLI_HPP

#include <boost/asio/ip/address.hpp>

#include <cctype>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

namespace cli {

/// What parse() reports on stderr: one line, after "PROGRAM: ".
class bad_input : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// `v` in single quotes, its control characters escaped (one line).
inline std::string quoted(std::string_view v) {
  static const char* const hex = "0123456789abcdef";
  std::string s = "'";
  for (unsigned char c : v) {
    if (c == '\n') {
      s += "\\n";
    } else if (c == '\t') {
      s += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      s += "\\x";
      s += hex[c >> 4];
      s += hex[c & 15];
    } else {
      s += static_cast<char>(c);
    }
  }
  return s + "'";
}

/// The shortest text that reads back as `x`.
inline std::string format_real(double x) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(x);
}

/// Parses all of `text` as a decimal integer of type T: digits only (a sign
/// only where T is signed, or for a negative number refused as out of range),
/// no spaces, no base prefix, within [min, max].
template <std::integral T>
T parse_integer(std::string_view text, T min, T max, const std::string& allowed) {
  const auto out_of_range = [&] {
    return bad_input(quoted(text) + " is out of range (" + allowed + ")");
  };
  const char* first = text.data();
  const char* last = first + text.size();
  const bool negative = !text.empty() && text.front() == '-';
  // Digits only after an optional '-'; from_chars does the rest.
  const std::string_view digits = negative ? text.substr(1) : text;
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string_view::npos)
    throw bad_input(quoted(text) + " is not an integer (" + allowed + ")");
  if constexpr (std::is_unsigned_v<T>) {
    if (negative) {
      if (digits.find_first_not_of('0') == std::string_view::npos && min == 0) return 0;  // -0
      throw out_of_range();
    }
  }
  T v{};
  auto [ptr, ec] = std::from_chars(first, last, v);
  if (ec == std::errc::result_out_of_range || v < min || v > max) throw out_of_range();
  if (ec != std::errc() || ptr != last)
    throw bad_input(quoted(text) + " is not an integer (" + allowed + ")");
  return v;
}

/// Parses all of `text` as a finite decimal number within [min, max].
inline double parse_real(std::string_view text, double min, double max,
                         const std::string& allowed) {
  double v{};
  const char* first = text.data();
  const char* last = first + text.size();
  const bool plain = !text.empty() && (std::isdigit(static_cast<unsigned char>(text.front())) ||
                                       text.front() == '-' || text.front() == '.');
  auto [ptr, ec] = plain ? std::from_chars(first, last, v, std::chars_format::general)
                         : std::from_chars_result{first, std::errc::invalid_argument};
  if (ptr != last || (ec != std::errc() && ec != std::errc::result_out_of_range) || std::isnan(v) ||
      std::isinf(v))
    throw bad_input(quoted(text) + " is not a finite number (" + allowed + ")");
  if (ec == std::errc::result_out_of_range) {
    // Too large, or too close to 0 to be represented (1e-400).
    const double approx = std::strtod(std::string(text).c_str(), nullptr);
    if (approx == 0 || std::abs(approx) < 1)
      throw bad_input(quoted(text) + " is too close to 0 to be represented (" + allowed + ")");
    throw bad_input(quoted(text) + " is out of range (" + allowed + ")");
  }
  if (!(v >= min && v <= max)) throw bad_input(quoted(text) + " is out of range (" + allowed + ")");
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

  /// A word out of `choices` (matched exactly).
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
      throw bad_input(quoted(v) + " is not allowed (" + allowed + ")");
    });
    return *this;
  }

  /// An IPv4 or IPv6 address.
  parser& address(const std::string& name, std::string& target, const std::string& help) {
    add(name, "ADDR", help, "an IP address", target, [&target](std::string_view v) {
      boost::system::error_code ec;
      boost::asio::ip::make_address(std::string(v), ec);
      if (ec) throw bad_input(quoted(v) + " is not an IP address");
      target = v;
    });
    return *this;
  }

  /// One line of text, not empty, without control characters.
  parser& text(const std::string& name, std::string& target, const std::string& help) {
    add(name, "TEXT", help, "text", target, [&target](std::string_view v) {
      if (v.empty()) throw bad_input("the text is empty (one line of text)");
      for (unsigned char c : v)
        if (c < 0x20 || c == 0x7f)
          throw bad_input(quoted(v) + " has a control character (one line of text)");
      target = v;
    });
    return *this;
  }

  /// An option without a value.
  parser& flag(const std::string& name, bool& target, const std::string& help) {
    add(name, "", help, "", "", [&target](std::string_view) { target = true; });
    return *this;
  }

  /// The next operand sets option `name`, named `label` in messages (e.g.
  /// HOST for --host). Operands fill, in order, those not given as options.
  parser& operand(const std::string& name, std::string label) {
    find(name).label = std::move(label);
    operand_names_.push_back(name);
    return *this;
  }

  /// True when option `name` was given (after parse()).
  bool given(const std::string& name) const {
    for (const auto& e : entries_)
      if (e.name == name) return e.seen;
    return false;
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

  /// Parses the command line. Returns -1 when the program should go on; 0
  /// after printing --help; 2 after printing one line about bad input.
  int parse(int argc, char** argv) {
    try {
      bool help = false;
      bool only_operands = false;
      std::vector<std::string_view> operands;
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
        if (only_operands || a.size() < 2 || a.front() != '-' || is_negative_number(a)) {
          operands.push_back(a);
          continue;
        }
        if (a.substr(0, 2) != "--")
          throw bad_input("unknown option " + quoted(a) + " (see --help)");
        std::string_view name = a.substr(2);
        std::optional<std::string_view> value;
        if (auto eq = name.find('='); eq != name.npos) {
          value = name.substr(eq + 1);
          name = name.substr(0, eq);
        }
        entry* e = lookup(name);
        if (!e)
          throw bad_input("unknown option " + quoted("--" + std::string(name)) + " (see --help)");
        if (e->metavar.empty()) {
          if (value)
            throw bad_input("--" + e->name + " takes no value (got " + quoted(*value) + ")");
          set(*e, "");
          continue;
        }
        if (!value) {
          if (i + 1 >= argc)
            throw bad_input("--" + e->name + " needs a value (" + e->allowed + ")");
          value = argv[++i];
        }
        set(*e, *value);
      }
      // Operands fill the operand options not given as options, in order.
      std::size_t slot = 0;
      for (std::string_view a : operands) {
        while (slot < operand_names_.size() && find(operand_names_[slot]).seen)
          ++slot;
        if (slot == operand_names_.size())
          throw bad_input("unexpected argument " + quoted(a) + " (see --help)");
        set(find(operand_names_[slot++]), a);
      }
      if (help) {
        std::cout << usage();
        return 0;
      }
      for (const auto& e : entries_)
        if (e.required && !e.seen)
          throw bad_input((e.label.empty() ? "" : e.label + " (") + "--" + e.name +
                          (e.label.empty() ? "" : ")") + " is required (" + e.allowed + ")");
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
    os << "  --help, -h            show this help\n";
    if (!operand_names_.empty()) {
      os << "operands:";
      for (std::size_t i = 0; i < operand_names_.size(); ++i) {
        const entry& e = find(operand_names_[i]);
        os << (i ? ", " : " ") << e.label << " (--" << e.name << ")";
      }
      os << '\n';
    }
    return os.str();
  }

 private:
  struct entry {
    std::string name, metavar, help, allowed, default_text;
    std::function<void(std::string_view)> apply;
    std::string label;  // the operand's name, if it is one
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
    entry e;
    e.name = name;
    e.metavar = std::move(metavar);
    e.help = help;
    e.allowed = std::move(allowed);
    e.default_text = std::move(default_text);
    e.apply = std::move(apply);
    entries_.push_back(std::move(e));
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
    if (e.seen)
      throw bad_input("--" + e.name + (e.label.empty() ? "" : " (" + e.label + ")") +
                      " given twice");
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
