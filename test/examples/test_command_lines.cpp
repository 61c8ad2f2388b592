// Bad input at every door: each program we ship (named after `--` on this
// test's command line) is run with every bad value of every option it lists in
// its own --help, so that an option added later is tested too.
//
// Each refusal must be exit status 2 with exactly one line on stderr naming
// the option, the value and what is allowed, and nothing on stdout; each
// bound of a range must be accepted (checked as `--name BOUND --help`, which
// parses the whole command line before answering --help). Every option given
// twice, an unknown option, a stray operand and a missing value are refused
// too. The formats read here are those of examples/cli.hpp:
//
//   --NAME N|X|WORD|ADDR|TEXT   help  [range: LO..HI | one of: a, b | an IP address | text; ...]
//   --NAME                      help                                   (a flag)
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

struct result {
  int status = -1;  // the exit status, or -1 when killed or timed out
  std::string out, err;
};

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

/// Runs `program args...` with stdin from /dev/null, bounded at 20 s.
result run(const std::string& program, const std::vector<std::string>& args) {
  static int serial = 0;
  const std::string base =
      "/tmp/ratelimit_cli_" + std::to_string(::getpid()) + "_" + std::to_string(++serial);
  const std::string out = base + ".out", err = base + ".err";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  std::vector<std::string> all{program};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, program.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  BOOST_REQUIRE_MESSAGE(rc == 0, "cannot start " << program);
  result r;
  int st = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (;;) {
    const pid_t w = ::waitpid(pid, &st, WNOHANG);
    if (w == pid) break;
    if (std::chrono::steady_clock::now() > end) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &st, 0);
      st = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  r.status = st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  std::remove(out.c_str());
  std::remove(err.c_str());
  return r;
}

std::string show(const std::vector<std::string>& args) {
  std::string s;
  for (const auto& a : args)
    s += " '" + a + "'";
  return s;
}

struct option {
  std::string name, metavar, allowed;  // allowed: "range: 0..65535", "one of: a, b", ...
  bool required = false;
};

/// The options --help lists. Fails the test on a line starting with "  --"
/// that it cannot read, so that no option escapes the test unnoticed.
std::vector<option> options_of(const std::string& help) {
  static const std::regex with_value(R"(^  --([a-z0-9-]+) (N|X|WORD|ADDR|TEXT)\s.*\[([^\]]*)\]$)");
  static const std::regex a_flag(R"(^  --([a-z0-9-]+)\s{2,}\S.*$)");
  std::vector<option> opts;
  std::istringstream in(help);
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (line.rfind("  --help", 0) == 0) continue;
    if (std::regex_match(line, m, with_value)) {
      option o{m[1], m[2], m[3]};
      if (auto semi = o.allowed.find(';'); semi != std::string::npos) {
        o.required = o.allowed.find("required", semi) != std::string::npos;
        o.allowed.resize(semi);
      }
      opts.push_back(o);
    } else if (std::regex_match(line, m, a_flag)) {
      opts.push_back({m[1], "", ""});
    } else {
      BOOST_TEST(line.rfind("  --", 0) != 0, "an option line the test cannot read: " << line);
    }
  }
  return opts;
}

/// The options the operands set, in order ("operands: HOST (--host), PORT (--port)").
std::vector<std::string> operands_of(const std::string& help) {
  std::vector<std::string> names;
  std::istringstream in(help);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("operands:", 0) != 0) continue;
    static const std::regex one(R"(\(--([a-z0-9-]+)\))");
    for (std::sregex_iterator it(line.begin(), line.end(), one), end; it != end; ++it)
      names.push_back((*it)[1]);
  }
  return names;
}

using int128 = __int128;

int128 to_int128(const std::string& s) {
  int128 v = 0;
  bool neg = false;
  for (char c : s) {
    if (c == '-')
      neg = true;
    else
      v = v * 10 + (c - '0');
  }
  return neg ? -v : v;
}

std::string to_string(int128 v) {
  if (v == 0) return "0";
  const bool neg = v < 0;
  std::string s;
  for (; v != 0; v /= 10)
    s.insert(s.begin(), char('0' + (neg ? -(v % 10) : v % 10)));
  return neg ? "-" + s : s;
}

/// A value each required option (other than `except`) is given, so that a
/// check of one option is not refused for another one missing.
std::vector<std::string> required_values(const std::vector<option>& opts,
                                         const std::string& except);

/// A value the option accepts.
std::string good_value(const option& o) {
  if (o.metavar == "N" || o.metavar == "X") {
    const auto dots = o.allowed.find("..");
    return o.allowed.substr(7, dots - 7);  // "range: LO..HI" -> LO
  }
  if (o.metavar == "WORD") {
    const auto comma = o.allowed.find(',');
    return o.allowed.substr(8, comma == std::string::npos ? std::string::npos : comma - 8);
  }
  if (o.metavar == "ADDR") return "127.0.0.1";
  return "some text";
}

std::vector<std::string> required_values(const std::vector<option>& opts,
                                         const std::string& except) {
  std::vector<std::string> args;
  for (const auto& o : opts)
    if (o.required && o.name != except) {
      args.push_back("--" + o.name);
      args.push_back(good_value(o));
    }
  return args;
}

std::string base_name(const std::string& path) {
  return path.substr(path.rfind('/') + 1);
}

/// Checks that `args` is refused: status 2, one line on stderr that contains
/// every string in `mentions`, nothing on stdout.
void refused(const std::string& program, const std::vector<std::string>& args,
             const std::vector<std::string>& mentions) {
  BOOST_TEST_CONTEXT(base_name(program) << show(args)) {
    const result r = run(program, args);
    BOOST_TEST(r.status == 2);
    BOOST_TEST(r.out.empty());
    BOOST_TEST(!r.err.empty());
    BOOST_TEST(std::count(r.err.begin(), r.err.end(), '\n') == 1, "stderr: " << r.err);
    BOOST_TEST(r.err.rfind(base_name(program) + ": ", 0) == 0, "stderr: " << r.err);
    for (const auto& m : mentions)
      BOOST_TEST(r.err.find(m) != std::string::npos,
                 "stderr should mention " << m << ": " << r.err);
  }
}

/// Checks that `args` is accepted: `args --help` prints the help, status 0.
void accepted(const std::string& program, std::vector<std::string> args) {
  args.push_back("--help");
  BOOST_TEST_CONTEXT(base_name(program) << show(args)) {
    const result r = run(program, args);
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.err.empty(), "stderr: " << r.err);
    BOOST_TEST(r.out.rfind("usage: ", 0) == 0);
  }
}

/// How a message must show `v`: in single quotes, \n for a newline and
/// \xHH for the other control characters (so the message stays one line).
std::string shown(const std::string& v) {
  std::string s = "'";
  for (unsigned char c : v) {
    char buf[8];
    if (c == '\n')
      s += "\\n";
    else if (c == '\t')
      s += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      s += buf;
    } else
      s += static_cast<char>(c);
  }
  return s + "'";
}

/// Bad values of an option, each with what its message must mention.
std::vector<std::pair<std::string, std::vector<std::string>>> bad_values(const option& o) {
  std::vector<std::pair<std::string, std::vector<std::string>>> bad;
  auto add = [&](const std::string& v, std::vector<std::string> also) {
    also.insert(also.begin(), {"--" + o.name, shown(v)});
    bad.push_back({v, also});
  };
  if (o.metavar == "N") {
    const auto dots = o.allowed.find("..");
    const std::string lo = o.allowed.substr(7, dots - 7), hi = o.allowed.substr(dots + 2);
    const std::vector<std::string> values = {to_string(to_int128(lo) - 1),
                                             to_string(to_int128(hi) + 1),
                                             "-1",
                                             "abc",
                                             "1.5",
                                             "0x10",
                                             "+1",
                                             " 1",
                                             "1 ",
                                             "1e3",
                                             "",
                                             "99999999999999999999999999",
                                             "1\n2",
                                             "1\x1b[2J",
                                             "--1"};
    for (const auto& v : values) {
      if (v == "-1" && to_int128(lo) <= -1) continue;
      add(v, {lo + ".." + hi});
    }
  } else if (o.metavar == "X") {
    const auto dots = o.allowed.find("..");
    const std::string lo = o.allowed.substr(7, dots - 7), hi = o.allowed.substr(dots + 2);
    const double l = std::strtod(lo.c_str(), nullptr), h = std::strtod(hi.c_str(), nullptr);
    std::vector<std::string> values = {"abc", "nan",   "inf", "-inf", "1e999", "",
                                       "1,5", "0x1p3", "+1",  " 1",   "1 ",    "1\n2"};
    if (l > 0) values.push_back("1e-400");  // not representable: not silently 0
    std::ostringstream below, above;
    below.precision(17);
    above.precision(17);
    below << (l > 0 ? l / 2 : l - 1);
    above << (h * 2 + 1);
    values.push_back(below.str());
    values.push_back(above.str());
    for (const auto& v : values)
      add(v, {lo + ".." + hi});
  } else if (o.metavar == "WORD") {
    add("bogus", {o.allowed});
    add("", {o.allowed});
    add("x\ny", {o.allowed});
    // A choice in the other case: choices are matched exactly.
    std::string flipped = good_value(o);
    for (auto& c : flipped) {
      const auto u = static_cast<unsigned char>(c);
      c = static_cast<char>(std::isupper(u) ? std::tolower(u) : std::toupper(u));
    }
    if (flipped != good_value(o)) add(flipped, {});
  } else if (o.metavar == "ADDR") {
    for (const std::string v : {"300.1.1.1", "localhost:80", "abc", "", "127.0.0.1\n"})
      add(v, {"IP address"});
  } else if (o.metavar == "TEXT") {
    add("two\nlines", {});
    bad.push_back({"", {"--" + o.name, "empty"}});
  }
  return bad;
}

std::vector<std::string> programs() {
  const auto& mts = boost::unit_test::framework::master_test_suite();
  std::vector<std::string> p;
  for (int i = 1; i < mts.argc; ++i)
    p.push_back(mts.argv[i]);
  return p;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(command_lines)

BOOST_AUTO_TEST_CASE(every_program_lists_its_options_in_help) {
  BOOST_TEST_REQUIRE(!programs().empty(), "name the programs after --");
  for (const auto& p : programs()) {
    BOOST_TEST_CONTEXT(p) {
      const result r = run(p, {"--help"});
      BOOST_TEST(r.status == 0);
      BOOST_TEST(r.err.empty());
      BOOST_TEST(r.out.rfind("usage: " + base_name(p), 0) == 0);
      BOOST_TEST(!options_of(r.out).empty());  // the programs tested here all take options
      BOOST_TEST(run(p, {"-h"}).out == r.out);
    }
  }
}

BOOST_AUTO_TEST_CASE(every_bad_value_of_every_option_is_refused) {
  for (const auto& p : programs()) {
    const auto opts = options_of(run(p, {"--help"}).out);
    for (const auto& o : opts) {
      auto base = required_values(opts, o.name);
      for (const auto& [value, mentions] : bad_values(o)) {
        auto args = base;
        args.push_back("--" + o.name);
        args.push_back(value);
        refused(p, args, mentions);
        if (value.find('\n') == std::string::npos && !value.empty() && value.front() != ' ') {
          args.pop_back();
          args.back() = "--" + o.name + "=" + value;  // the same, spelled --name=value
          refused(p, args, mentions);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(both_ends_of_every_range_and_every_choice_are_accepted) {
  for (const auto& p : programs()) {
    const auto opts = options_of(run(p, {"--help"}).out);
    for (const auto& o : opts) {
      auto base = required_values(opts, o.name);
      std::vector<std::string> values;
      if (o.metavar == "N" || o.metavar == "X") {
        const auto dots = o.allowed.find("..");
        values = {o.allowed.substr(7, dots - 7), o.allowed.substr(dots + 2)};
      } else if (o.metavar == "WORD") {
        std::istringstream in(o.allowed.substr(8));
        for (std::string w; std::getline(in, w, ',');)
          values.push_back(w.substr(w.front() == ' ' ? 1 : 0));
      } else if (o.metavar == "ADDR") {
        values = {"127.0.0.1", "::1"};
      } else if (o.metavar == "TEXT") {
        values = {"one line, with spaces"};
      }
      for (const auto& v : values) {
        auto args = base;
        args.push_back("--" + o.name);
        args.push_back(v);
        accepted(p, args);
      }
      if (o.metavar.empty()) accepted(p, {"--" + o.name});
    }
  }
}

BOOST_AUTO_TEST_CASE(options_given_twice_are_refused) {
  for (const auto& p : programs()) {
    const auto opts = options_of(run(p, {"--help"}).out);
    for (const auto& o : opts) {
      auto args = required_values(opts, o.name);
      for (int i = 0; i < 2; ++i) {
        args.push_back("--" + o.name);
        if (!o.metavar.empty()) args.push_back(good_value(o));
      }
      refused(p, args, {"--" + o.name, "twice"});
    }
  }
}

BOOST_AUTO_TEST_CASE(unknown_options_stray_operands_and_missing_values_are_refused) {
  for (const auto& p : programs()) {
    const auto opts = options_of(run(p, {"--help"}).out);
    const auto base = required_values(opts, "");
    auto with = [&](std::vector<std::string> extra) {
      auto args = base;
      args.insert(args.end(), extra.begin(), extra.end());
      return args;
    };
    refused(p, with({"--bogus"}), {"'--bogus'"});
    refused(p, with({"--bogus=1"}), {"'--bogus'"});
    refused(p, with({"-x"}), {"'-x'"});
    if (operands_of(run(p, {"--help"}).out).empty())
      refused(p, with({"stray"}), {"unexpected argument", "'stray'"});
    for (const auto& o : opts) {
      if (o.metavar.empty()) {
        refused(p, with({"--" + o.name + "=1"}), {"--" + o.name, "takes no value"});
      } else {
        // The value missing at the end; and for a required option, not given at all.
        auto args = required_values(opts, o.name);
        args.push_back("--" + o.name);
        refused(p, args, {"--" + o.name, "needs a value"});
        if (o.required) refused(p, required_values(opts, o.name), {"--" + o.name, "required"});
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(operands_are_checked_as_their_options) {
  for (const auto& p : programs()) {
    const std::string help = run(p, {"--help"}).out;
    const auto opts = options_of(help);
    const auto ops = operands_of(help);
    auto option_named = [&](const std::string& name) {
      for (const auto& o : opts)
        if (o.name == name) return o;
      BOOST_FAIL("operand of an unknown option --" << name);
      return option{};
    };
    if (ops.empty()) continue;
    std::vector<std::string> good;
    for (const auto& name : ops)
      good.push_back(good_value(option_named(name)));
    accepted(p, good);
    // One operand too many.
    auto args = good;
    args.push_back("extra");
    refused(p, args, {"unexpected argument", "'extra'"});
    // Each operand with each bad value of its option (those an option parser
    // would not read as an option), the operands before it good.
    for (std::size_t k = 0; k < ops.size(); ++k) {
      for (const auto& [value, mentions] : bad_values(option_named(ops[k]))) {
        if (value.size() > 1 && value[0] == '-' &&
            !std::isdigit(static_cast<unsigned char>(value[1])))
          continue;
        std::vector<std::string> a(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(k));
        a.push_back(value);
        refused(p, a, mentions);
      }
    }
    // An operand fills the first operand option not given as an option.
    args = {"--" + ops[0], good[0]};
    args.insert(args.end(), good.begin() + 1, good.end());
    accepted(p, args);
    args.push_back("extra");
    refused(p, args, {"unexpected argument", "'extra'"});
  }
}

BOOST_AUTO_TEST_SUITE_END()
