// End to end: the real echo_server binary on a loopback port, real sockets.
//
// Each test starts the server with `--bind 127.0.0.1 --port 0` (the kernel
// picks a free port; the server logs it), talks to it, and kills it if the
// test fails. Every wait is bounded. Two "clients" are told apart by their
// source address (127.0.0.1 and 127.0.0.2), as the server limits per address.
#include <boost/asio.hpp>
#include <boost/test/results_collector.hpp>
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace asio = boost::asio;
using asio::ip::tcp;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

double since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

/// The echo server as a child process; SIGKILLed on destruction if still running.
class server_process {
 public:
  explicit server_process(std::vector<std::string> extra) {
    static std::atomic<int> counter{0};
    log_path_ =
        (std::filesystem::temp_directory_path() /
         ("echo_e2e_" + std::to_string(getpid()) + "_" + std::to_string(counter++) + ".log"))
            .string();
    std::vector<std::string> args{ECHO_SERVER, "--bind", "127.0.0.1", "--port", "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    const int rc = posix_spawn(&pid_, ECHO_SERVER, &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    BOOST_REQUIRE_MESSAGE(rc == 0, "cannot start " << ECHO_SERVER);
    // The server logs "listening on 127.0.0.1:PORT" once it accepts.
    const std::regex listening("listening on 127\\.0\\.0\\.1:([0-9]+)");
    const auto end = clock_type::now() + 20s;
    std::smatch m;
    std::string text;  // outlives the loop: `m` refers into it
    for (;;) {
      text = log();
      if (std::regex_search(text, m, listening)) break;
      BOOST_REQUIRE_MESSAGE(clock_type::now() < end && running(),
                            "echo_server did not start; its output:\n"
                                << text);
      std::this_thread::sleep_for(10ms);
    }
    port_ = static_cast<unsigned short>(std::stoi(m[1].str()));
  }

  ~server_process() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (!keep_log_) std::filesystem::remove(log_path_);
  }

  unsigned short port() const { return port_; }
  tcp::endpoint endpoint() const { return {asio::ip::make_address("127.0.0.1"), port_}; }

  std::string log() const {
    std::ifstream in(log_path_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  bool running() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      status_ = status;
      return false;
    }
    return true;
  }

  /// Waits up to `limit` for `text` to appear in the log.
  bool log_contains(const std::string& text, std::chrono::milliseconds limit = 10s) {
    const auto end = clock_type::now() + limit;
    for (;;) {
      if (log().find(text) != std::string::npos) return true;
      if (clock_type::now() > end) return false;
      std::this_thread::sleep_for(10ms);
    }
  }

  /// Sends `sig` and waits up to `limit` for the exit; returns the wait
  /// status, or nothing if it did not exit in time.
  std::optional<int> stop(int sig, std::chrono::milliseconds limit) {
    ::kill(pid_, sig);
    const auto end = clock_type::now() + limit;
    while (running()) {
      if (clock_type::now() > end) return std::nullopt;
      std::this_thread::sleep_for(10ms);
    }
    return status_;
  }

  /// Keeps the log file after the test (for a failing test's post-mortem).
  void keep_log() {
    keep_log_ = true;
    BOOST_TEST_MESSAGE("server log kept in " << log_path_);
  }

 private:
  pid_t pid_ = -1;
  int status_ = 0;
  unsigned short port_ = 0;
  std::string log_path_;
  bool keep_log_ = false;
};

/// A client connection whose every wait is bounded.
class client {
 public:
  explicit client(const tcp::endpoint& server, const std::string& source = "127.0.0.1",
                  int rcvbuf = 0) {
    sock_.open(tcp::v4());
    if (rcvbuf) sock_.set_option(asio::socket_base::receive_buffer_size(rcvbuf));
    sock_.bind(tcp::endpoint(asio::ip::make_address(source), 0));
    sock_.connect(server);
    sock_.set_option(tcp::no_delay(true));
  }

  tcp::socket& socket() { return sock_; }

  /// Writes all of `data` (bounded: 10 s).
  boost::system::error_code send(const std::string& data) {
    boost::system::error_code result = asio::error::timed_out;
    asio::async_write(sock_, asio::buffer(data),
                      [&](boost::system::error_code ec, std::size_t) { result = ec; });
    run(10s);
    return result;
  }

  /// The next line (with its '\n'), or "" on end-of-file, error or timeout.
  std::string read_line(std::chrono::milliseconds limit = 10s) {
    std::string line;
    asio::async_read_until(sock_, asio::dynamic_buffer(in_), '\n',
                           [&](boost::system::error_code ec, std::size_t n) {
                             if (ec) return;
                             line = in_.substr(0, n);
                             in_.erase(0, n);
                           });
    run(limit);
    return line;
  }

  /// Everything until end-of-file (bounded by `limit`); `eof` tells whether it came.
  std::string read_to_eof(bool& eof, std::chrono::milliseconds limit = 10s) {
    boost::system::error_code ec;
    std::string data = read_to_end(ec, limit);
    eof = ec == asio::error::eof;
    return data;
  }

  /// Everything until the connection ends; `ec` says how (eof, reset...,
  /// operation_aborted on timeout).
  std::string read_to_end(boost::system::error_code& ec, std::chrono::milliseconds limit = 10s) {
    ec = asio::error::operation_aborted;
    asio::async_read(sock_, asio::dynamic_buffer(in_),
                     [&](boost::system::error_code e, std::size_t) { ec = e; });
    run(limit);
    return std::exchange(in_, {});
  }

  /// Closes with a TCP reset instead of a FIN.
  void reset() {
    sock_.set_option(asio::socket_base::linger(true, 0));
    sock_.close();
  }

 private:
  /// Runs the pending operation; cancels it after `limit`.
  void run(std::chrono::milliseconds limit) {
    ctx_.restart();
    ctx_.run_for(limit);
    if (!ctx_.stopped()) {
      boost::system::error_code ignored;
      sock_.cancel(ignored);
      ctx_.restart();
      ctx_.run();
    }
  }

  asio::io_context ctx_;
  tcp::socket sock_{ctx_};
  std::string in_;
};

std::string numbered(const std::string& text, int i) {
  return text + ' ' + std::to_string(i) + '\n';
}

/// A fixture-like guard: keeps the server's log when the test case fails.
struct keep_log_on_failure {
  server_process& s;
  ~keep_log_on_failure() {
    namespace ut = boost::unit_test;
    auto id = ut::framework::current_test_case().p_id;
    if (!ut::results_collector.results(id).passed()) {
      s.keep_log();
      BOOST_TEST_MESSAGE("server log:\n" << s.log());
    }
  }
};

// Limits high enough never to get in the way of a test about something else.
const std::vector<std::string> unlimited{"--msg-rate",    "100000",  "--burst",     "100000",
                                         "--global-rate", "1000000", "--conn-rate", "100000"};

std::vector<std::string> with(std::vector<std::string> base, std::vector<std::string> more) {
  base.insert(base.end(), more.begin(), more.end());
  return base;
}

/// What one client of echo_bytes() got back, and when (s after the start).
struct echo_result {
  bool intact = false;
  std::size_t received = 0;
  double seconds = 0;
};

/// `clients` clients connect, each sends `bytes` bytes at once (lines of 1 KiB,
/// each client's its own) and reads its echo; all at the same time, on one
/// io_context. Bounded at 20 s.
std::vector<echo_result> echo_bytes(const tcp::endpoint& server, int clients, std::size_t bytes) {
  asio::io_context ctx;
  struct conn {
    tcp::socket sock;
    std::string out, in;
    echo_result r;
  };
  std::vector<std::unique_ptr<conn>> conns;
  for (int i = 0; i < clients; ++i) {
    auto c = std::make_unique<conn>(conn{tcp::socket(ctx), {}, {}, {}});
    for (std::size_t n = 0; c->out.size() < bytes; ++n) {
      std::string line = "client " + std::to_string(i) + " line " + std::to_string(n) + ' ';
      line.resize(std::min<std::size_t>(1023, bytes - c->out.size() - 1), char('a' + n % 26));
      c->out += line + '\n';
    }
    c->sock.connect(server);
    c->sock.set_option(tcp::no_delay(true));
    c->in.resize(c->out.size());
    conns.push_back(std::move(c));
  }
  const auto t0 = clock_type::now();
  for (auto& c : conns) {
    conn& r = *c;
    asio::async_write(r.sock, asio::buffer(r.out), [](auto, auto) {});
    asio::async_read(r.sock, asio::buffer(r.in),
                     [&r, t0](boost::system::error_code, std::size_t n) {
                       r.r.seconds = since(t0);
                       r.r.received = n;
                       r.r.intact = n == r.out.size() && r.in == r.out;
                     });
  }
  ctx.run_for(20s);
  std::vector<echo_result> out;
  for (auto& c : conns)
    out.push_back(c->r);
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(echo_server_e2e)

BOOST_AUTO_TEST_CASE(help_and_bad_options) {
  for (auto [arg, want] : {std::pair{"--help", 0}, std::pair{"--on-limit=bogus", 2},
                           std::pair{"--burst=0", 2}, std::pair{"--no-such-option", 2}}) {
    const std::string cmd = std::string(ECHO_SERVER) + ' ' + arg + " >/dev/null 2>&1";
    const int status = std::system(cmd.c_str());
    BOOST_TEST(WIFEXITED(status));
    BOOST_TEST(WEXITSTATUS(status) == want, arg);
  }
}

BOOST_AUTO_TEST_CASE(echoes_are_byte_exact) {
  server_process s(unlimited);
  keep_log_on_failure k{s};
  client c(s.endpoint());
  std::string sent;
  std::vector<std::string> lines;
  for (int b = 0; b < 256; ++b) {  // every byte value but '\n', in lines of many lengths
    std::string line;
    for (int j = 0; j <= b; ++j) {
      const char ch = static_cast<char>((b + j) & 0xff);
      if (ch != '\n') line += ch;
    }
    lines.push_back(line + '\n');
  }
  lines.push_back("\n");                           // an empty line
  lines.push_back("dos line\r\n");                 // '\r' is data
  lines.push_back(std::string(4096, 'x') + '\n');  // exactly --max-line bytes
  for (auto& l : lines)
    sent += l;
  BOOST_REQUIRE(!c.send(sent));
  std::string got;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    auto l = c.read_line();
    BOOST_REQUIRE_MESSAGE(!l.empty(), "echo " << i << " missing");
    BOOST_REQUIRE_MESSAGE(l == lines[i], "echo " << i << " differs");
    got += l;
  }
  BOOST_TEST(got == sent);
}

BOOST_AUTO_TEST_CASE(message_rate_respects_the_limit) {
  constexpr int rate = 20, burst = 5, lines = 60;
  server_process s({"--msg-rate", std::to_string(rate), "--burst", std::to_string(burst),
                    "--global-rate", "100000"});
  keep_log_on_failure k{s};
  client c(s.endpoint());
  std::string all;
  for (int i = 1; i <= lines; ++i)
    all += numbered("msg", i);
  BOOST_REQUIRE(!c.send(all));
  std::vector<double> at;
  auto first = c.read_line();
  BOOST_TEST(first == numbered("msg", 1));
  const auto t0 = clock_type::now();
  at.push_back(0);
  while (since(t0) < 2.0) {
    auto l = c.read_line(std::chrono::milliseconds(200));
    if (l.empty()) continue;
    BOOST_REQUIRE(l == numbered("msg", static_cast<int>(at.size()) + 1));
    at.push_back(since(t0));
  }
  // Never faster than the limit: echo i needs i+1 tokens, burst of them at
  // once and the rest at `rate` (20 ms of slack for scheduling).
  for (std::size_t i = burst; i < at.size(); ++i)
    BOOST_TEST(at[i] >= double(i + 1 - burst) / rate - 0.02, "echo " << i << " at " << at[i]);
  // And about as fast: in 2 s, the burst and 2 s of the rate, give or take the burst.
  std::size_t in_window = 0;
  for (double t : at)
    in_window += t <= 2.0;
  const int ideal = burst + 2 * rate;
  BOOST_TEST(int(in_window) <= ideal + burst);
  BOOST_TEST(int(in_window) >= ideal - burst);
  BOOST_TEST(s.log_contains("over its limit"));
}

BOOST_AUTO_TEST_CASE(a_flood_does_not_slow_another_client) {
  server_process s({"--msg-rate", "5", "--burst", "5", "--global-rate", "100000"});
  keep_log_on_failure k{s};
  client flood(s.endpoint(), "127.0.0.1");
  std::string all;
  for (int i = 1; i <= 300; ++i)
    all += numbered("flood", i);
  BOOST_REQUIRE(!flood.send(all));
  for (int i = 1; i <= 5; ++i)
    BOOST_REQUIRE(!flood.read_line().empty());  // its burst
  std::this_thread::sleep_for(300ms);           // now it is being held back

  client other(s.endpoint(), "127.0.0.2");
  const auto t0 = clock_type::now();
  std::string five;
  for (int i = 1; i <= 5; ++i)
    five += numbered("other", i);
  BOOST_REQUIRE(!other.send(five));
  for (int i = 1; i <= 5; ++i) {
    auto l = other.read_line();
    BOOST_TEST(l == numbered("other", i));
  }
  BOOST_TEST(since(t0) < 1.0);  // its own burst: at once, whatever the flood does
  // Five more: its own rate (5/s) paces them, to about 1 s, not the flood's backlog.
  const auto t1 = clock_type::now();
  five.clear();
  for (int i = 6; i <= 10; ++i)
    five += numbered("other", i);
  BOOST_REQUIRE(!other.send(five));
  for (int i = 6; i <= 10; ++i) {
    auto l = other.read_line();
    BOOST_TEST(l == numbered("other", i));
  }
  BOOST_TEST(since(t1) >= 0.7);
  BOOST_TEST(since(t1) < 3.0);
}

BOOST_AUTO_TEST_CASE(reject_mode_answers_over_limit_lines_with_an_error) {
  server_process s({"--on-limit", "reject", "--msg-rate", "1", "--burst", "2"});
  keep_log_on_failure k{s};
  client c(s.endpoint());
  std::string all;
  for (int i = 1; i <= 5; ++i)
    all += numbered("line", i);
  BOOST_REQUIRE(!c.send(all));
  BOOST_TEST(c.read_line() == numbered("line", 1));
  BOOST_TEST(c.read_line() == numbered("line", 2));
  // Each rejection says when a line would pass: the client's next token, due
  // 1 s after its burst began (rounded up to 10 ms).
  for (int i = 3; i <= 5; ++i) {
    const std::string line = c.read_line();
    const std::string head = "error: rate limit exceeded, retry in ";
    BOOST_TEST_REQUIRE(line.rfind(head, 0) == 0, line);
    BOOST_TEST(line.substr(line.size() - 3) == " s\n");
    const double secs = std::stod(line.substr(head.size()));
    BOOST_TEST(secs >= 0.8);  // the lines arrived together, within well under 200 ms
    BOOST_TEST(secs <= 1.0);
  }
  BOOST_TEST(s.log_contains("rejecting its lines"));
}

// A line the global limit rejects spends none of the client's tokens (the
// two limits are tried as one joint request, which takes nothing when either
// refuses): the client keeps them for when the global limit has room again,
// and the rejection's retry-after is the global wait.
BOOST_AUTO_TEST_CASE(a_client_over_the_global_limit_in_reject_mode_keeps_its_own_tokens) {
  server_process s(
      {"--on-limit", "reject", "--msg-rate", "1", "--burst", "3", "--global-rate", "2"});
  keep_log_on_failure k{s};
  client c(s.endpoint());
  // Lines 1 and 2 pass (global burst 2); 3 and 4 find the client's last
  // token but no global one.
  BOOST_REQUIRE(!c.send(numbered("line", 1) + numbered("line", 2) + numbered("line", 3) +
                        numbered("line", 4)));
  BOOST_TEST(c.read_line() == numbered("line", 1));
  BOOST_TEST(c.read_line() == numbered("line", 2));
  for (int i = 3; i <= 4; ++i) {
    const std::string line = c.read_line();
    const std::string head = "error: rate limit exceeded, retry in ";
    BOOST_TEST_REQUIRE(line.rfind(head, 0) == 0, line);
    // The global token is due 0.5 s after the burst; the client's own token
    // is still there (had it been spent, the client's next would be 1 s away).
    const double secs = std::stod(line.substr(head.size()));
    BOOST_TEST(secs <= 0.5);
  }
  // 0.6 s later the global limit has a token again and the client still has
  // its own (spent, it would have had none until 1 s).
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  BOOST_REQUIRE(!c.send(numbered("line", 5)));
  BOOST_TEST(c.read_line() == numbered("line", 5));
}

// --trusted gives one address its own quota (keyed_limiter::set_quota): a
// burst of 6 where every other client gets 2.
BOOST_AUTO_TEST_CASE(a_trusted_client_has_its_own_quota) {
  server_process s({"--on-limit", "reject", "--msg-rate", "1", "--burst", "2", "--trusted",
                    "127.0.0.1", "--trusted-rate", "1", "--trusted-burst", "6"});
  keep_log_on_failure k{s};
  client c(s.endpoint());
  std::string all;
  for (int i = 1; i <= 8; ++i)
    all += numbered("line", i);
  BOOST_REQUIRE(!c.send(all));
  for (int i = 1; i <= 6; ++i)
    BOOST_TEST(c.read_line() == numbered("line", i));
  for (int i = 7; i <= 8; ++i) {
    const std::string line = c.read_line();
    BOOST_TEST(line.rfind("error: rate limit exceeded, retry in ", 0) == 0, line);
  }
  BOOST_TEST(s.log_contains("trusted client 127.0.0.1: 1 lines/s, burst 6"));
  // Another address keeps the default burst of 2.
  client other(s.endpoint(), "127.0.0.2");
  BOOST_REQUIRE(!other.send(numbered("o", 1) + numbered("o", 2) + numbered("o", 3)));
  BOOST_TEST(other.read_line() == numbered("o", 1));
  BOOST_TEST(other.read_line() == numbered("o", 2));
  const std::string third = other.read_line();
  BOOST_TEST(third.rfind("error: rate limit exceeded, retry in ", 0) == 0, third);
}

// --byte-rate: each client's reads and writes go through a rate-limited
// stream over its own bucket (16 KiB burst, then the rate); the echoes are
// the bytes sent, just slower.
BOOST_AUTO_TEST_CASE(byte_rate_paces_each_client) {
  server_process s(with(unlimited, {"--byte-rate", "100000"}));
  keep_log_on_failure k{s};
  BOOST_TEST(s.log_contains("bytes each way: per client 100000 B/s, all clients unlimited"));
  constexpr std::size_t bytes = 60 * 1024;
  const auto r = echo_bytes(s.endpoint(), 1, bytes);
  BOOST_TEST(r[0].received == bytes);
  BOOST_TEST(r[0].intact);
  // The burst, then 100000 B/s: (61440 - 16384) / 100000 = 0.45 s at the least.
  BOOST_TEST(r[0].seconds >= 0.4, r[0].seconds << " s");
  BOOST_TEST(r[0].seconds < 5.0, r[0].seconds << " s");
  BOOST_TEST_MESSAGE("60 KiB at 100000 B/s: " << r[0].seconds << " s");
  // A client's limit is its own: another one after it starts with a full bucket.
  const auto again = echo_bytes(s.endpoint(), 1, 16 * 1024);
  BOOST_TEST(again[0].intact);
  BOOST_TEST(again[0].seconds < 0.3, again[0].seconds << " s");
}

// --global-byte-rate: one bucket for all clients; two clients at once each
// get about half of it, one alone gets all of it.
BOOST_AUTO_TEST_CASE(global_byte_rate_is_shared_by_the_clients) {
  server_process s(with(unlimited, {"--global-byte-rate", "100000"}));
  keep_log_on_failure k{s};
  constexpr std::size_t bytes = 48 * 1024;
  const auto alone = echo_bytes(s.endpoint(), 1, bytes);
  BOOST_TEST(alone[0].intact);
  // (49152 - 16384) / 100000 = 0.33 s at the least.
  BOOST_TEST(alone[0].seconds >= 0.3, alone[0].seconds << " s");
  std::this_thread::sleep_for(200ms);  // the bucket refills (16 KiB at 100000 B/s: 0.16 s)
  const auto two = echo_bytes(s.endpoint(), 2, bytes);
  for (const auto& r : two) {
    BOOST_TEST(r.received == bytes);
    BOOST_TEST(r.intact);
    BOOST_TEST(r.seconds < 6.0, r.seconds << " s");
  }
  const double first = std::min(two[0].seconds, two[1].seconds);
  const double last = std::max(two[0].seconds, two[1].seconds);
  BOOST_TEST_MESSAGE("48 KiB alone: " << alone[0].seconds << " s; two at once: " << two[0].seconds
                                      << " s and " << two[1].seconds << " s");
  // Both together: (2 * 49152 - 16384) / 100000 = 0.82 s at the least; and
  // each about half the rate (the faster one well under what it had alone).
  BOOST_TEST(last >= 0.75, last << " s");
  BOOST_TEST(first >= 0.5, first << " s");
}

BOOST_AUTO_TEST_CASE(an_oversized_line_is_survived) {
  server_process s(with(unlimited, {"--max-line", "1000"}));
  keep_log_on_failure k{s};
  client good(s.endpoint(), "127.0.0.2");
  BOOST_REQUIRE(!good.send("before\n"));
  BOOST_TEST(good.read_line() == std::string("before\n"));

  client bad(s.endpoint());
  bad.send(std::string(5000, 'a'));  // no newline; the server stops reading at 1001 bytes
  BOOST_TEST(bad.read_line() == std::string("error: line too long\n"));
  // Then the server closes; with our unread bytes still in its buffer the
  // kernel makes that a reset rather than an end-of-file.
  boost::system::error_code ec;
  bad.read_to_end(ec);
  BOOST_TEST((ec == asio::error::eof || ec == asio::error::connection_reset), ec.message());
  BOOST_TEST(s.log_contains("longer than 1000 bytes"));

  BOOST_REQUIRE(!good.send("after\n"));
  BOOST_TEST(good.read_line() == std::string("after\n"));
}

BOOST_AUTO_TEST_CASE(resets_are_survived) {
  server_process s({"--msg-rate", "1", "--burst", "1"});
  keep_log_on_failure k{s};
  {
    client idle(s.endpoint());
    BOOST_REQUIRE(!idle.send("partial line"));
    std::this_thread::sleep_for(100ms);
    idle.reset();
  }
  BOOST_TEST(s.log_contains("reset by the client"));
  {
    client waiting(s.endpoint());  // reset while its lines wait for tokens
    BOOST_REQUIRE(!waiting.send("1\n2\n3\n"));
    BOOST_TEST(waiting.read_line() == std::string("1\n"));
    waiting.reset();
  }
  std::this_thread::sleep_for(1500ms);  // the waiting line's token comes; its write fails
  client c(s.endpoint(), "127.0.0.2");
  BOOST_REQUIRE(!c.send("still here\n"));
  BOOST_TEST(c.read_line() == std::string("still here\n"));
}

BOOST_AUTO_TEST_CASE(a_half_closed_client_gets_every_echo) {
  server_process s({"--msg-rate", "10", "--burst", "2"});
  keep_log_on_failure k{s};
  client c(s.endpoint());
  BOOST_REQUIRE(!c.send("one\ntwo\nthree\nno newline"));
  c.socket().shutdown(tcp::socket::shutdown_send);
  bool eof = false;
  const std::string got = c.read_to_eof(eof);
  BOOST_TEST(eof);
  BOOST_TEST(got == "one\ntwo\nthree\nno newline");
  BOOST_TEST(s.log_contains("half-closed by the client: 4 lines echoed"));
}

BOOST_AUTO_TEST_CASE(a_client_that_never_reads_is_dropped) {
  server_process s(with(unlimited, {"--write-timeout", "1"}));
  keep_log_on_failure k{s};
  client stuck(s.endpoint(), "127.0.0.1", 4096);
  // Fill both directions until the server's writes stall (bounded: 64 MB or 10 s).
  stuck.socket().non_blocking(true);
  const std::string chunk = std::string(1023, 'z') + '\n';
  std::size_t sent = 0;
  const auto t0 = clock_type::now();
  int stalled_ms = 0;
  while (sent < (64u << 20) && since(t0) < 10 && stalled_ms < 500) {
    boost::system::error_code ec;
    const std::size_t n = stuck.socket().write_some(asio::buffer(chunk), ec);
    if (ec == asio::error::would_block) {
      std::this_thread::sleep_for(10ms);
      stalled_ms += 10;
      continue;
    }
    BOOST_REQUIRE(!ec);
    sent += n;
    stalled_ms = 0;
  }
  BOOST_TEST_MESSAGE("sent " << sent << " bytes before the server stopped reading");
  // Meanwhile another client is served.
  client other(s.endpoint(), "127.0.0.2");
  BOOST_REQUIRE(!other.send("hello\n"));
  BOOST_TEST(other.read_line() == std::string("hello\n"));
  BOOST_TEST(s.log_contains("has not read its echoes", 15s));
  BOOST_REQUIRE(!other.send("again\n"));
  BOOST_TEST(other.read_line() == std::string("again\n"));
}

BOOST_AUTO_TEST_CASE(thousands_of_simultaneous_connections) {
  constexpr int n = 2000;
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  BOOST_REQUIRE_MESSAGE(rl.rlim_cur >= n + 100, "open-file limit too low: " << rl.rlim_cur);
  server_process s(unlimited);
  keep_log_on_failure k{s};
  asio::io_context ctx;
  struct conn {
    tcp::socket sock;
    std::string out, in;
    bool ok = false;
  };
  std::vector<std::unique_ptr<conn>> conns;
  int done = 0;
  for (int i = 0; i < n; ++i) {
    auto c = std::make_unique<conn>(conn{tcp::socket(ctx), numbered("client", i), {}});
    conn& r = *c;
    r.sock.async_connect(s.endpoint(), [&r, &done](boost::system::error_code ec) {
      if (ec) {
        ++done;
        return;
      }
      asio::async_write(r.sock, asio::buffer(r.out), [](auto, auto) {});
      asio::async_read_until(r.sock, asio::dynamic_buffer(r.in), '\n',
                             [&r, &done](boost::system::error_code ec, std::size_t) {
                               r.ok = !ec && r.in == r.out;
                               ++done;
                             });
    });
    conns.push_back(std::move(c));
  }
  const auto end = clock_type::now() + 60s;
  while (done < n && clock_type::now() < end)
    ctx.run_for(100ms);
  int ok = 0;
  for (auto& c : conns)
    ok += c->ok;
  BOOST_TEST(ok == n);
  BOOST_TEST(s.log_contains("(" + std::to_string(n) + " clients)", 10s));
  conns.clear();
  client after(s.endpoint(), "127.0.0.2");
  BOOST_REQUIRE(!after.send("after\n"));
  BOOST_TEST(after.read_line() == std::string("after\n"));
}

BOOST_AUTO_TEST_CASE(new_connections_are_rate_limited) {
  server_process s({"--conn-rate", "4", "--msg-rate", "100", "--burst", "100"});
  keep_log_on_failure k{s};
  const auto t0 = clock_type::now();
  std::vector<std::unique_ptr<client>> cs;
  // 4 at once (one second's worth), then 4 per second: the 8th connection is
  // served after about 1 s.
  for (int i = 0; i < 8; ++i) {
    cs.push_back(std::make_unique<client>(s.endpoint()));
    BOOST_REQUIRE(!cs.back()->send("hi\n"));
  }
  for (auto& c : cs)
    BOOST_TEST(c->read_line() == std::string("hi\n"));
  BOOST_TEST(since(t0) >= 0.9);
  BOOST_TEST(since(t0) < 5.0);
  BOOST_TEST(s.log_contains("pausing accepts"));
}

BOOST_AUTO_TEST_CASE(more_clients_or_addresses_than_allowed_are_refused) {
  server_process s({"--max-clients", "2", "--max-keys", "1", "--msg-rate", "1", "--burst", "1"});
  keep_log_on_failure k{s};
  client a(s.endpoint());
  BOOST_REQUIRE(!a.send("a\n"));
  BOOST_TEST(a.read_line() == std::string("a\n"));  // 127.0.0.1's bucket: empty, not evictable
  {
    client b(s.endpoint(), "127.0.0.2");  // a second address: no room for its bucket
    BOOST_REQUIRE(!b.send("b\n"));
    BOOST_TEST(b.read_line() == std::string("error: server busy\n"));
    bool eof = false;
    b.read_to_eof(eof);
    BOOST_TEST(eof);
  }
  BOOST_TEST(s.log_contains("too many client addresses"));
  std::this_thread::sleep_for(100ms);  // b's session is gone: one client left
  client c(s.endpoint());
  BOOST_REQUIRE(!c.send("c\n"));
  BOOST_TEST(c.read_line() == std::string("c\n"));  // 1 s later: a's address' next token
  client d(s.endpoint());                           // a third connection
  BOOST_TEST(d.read_line() == std::string("error: server full\n"));
  BOOST_TEST(s.log_contains("--max-clients"));
  BOOST_REQUIRE(!a.send("a again\n"));
  BOOST_TEST(a.read_line() == std::string("a again\n"));
}

// The README's bad-client table holds in reject mode too: an address the
// limiter has no room for is told "server busy" and disconnected, not told
// "rate limit exceeded" and kept (as the server did when try_get_token could
// not tell the two apart).
BOOST_AUTO_TEST_CASE(reject_mode_refuses_addresses_beyond_max_keys) {
  server_process s({"--on-limit", "reject", "--max-keys", "1", "--msg-rate", "1", "--burst", "1"});
  keep_log_on_failure k{s};
  client a(s.endpoint());
  BOOST_REQUIRE(!a.send("a\n"));
  BOOST_TEST(a.read_line() == std::string("a\n"));  // 127.0.0.1's bucket: empty, not evictable
  client b(s.endpoint(), "127.0.0.2");
  BOOST_REQUIRE(!b.send("b\n"));
  BOOST_TEST(b.read_line() == std::string("error: server busy\n"));
  bool eof = false;
  b.read_to_eof(eof);
  BOOST_TEST(eof);
  BOOST_TEST(s.log_contains("too many client addresses"));
  BOOST_REQUIRE(!a.send("a again\n"));  // and 127.0.0.1, over its limit, is rejected, not dropped
  BOOST_TEST(a.read_line().rfind("error: rate limit exceeded, retry in ", 0) == 0);
}

BOOST_AUTO_TEST_CASE(sigterm_fails_pending_waits_and_exits_zero) {
  server_process s({"--msg-rate", "1", "--burst", "1"});
  keep_log_on_failure k{s};
  client c(s.endpoint());
  BOOST_REQUIRE(!c.send("a\nb\nc\n"));
  BOOST_TEST(c.read_line() == std::string("a\n"));  // b now waits for a token
  client idle(s.endpoint(), "127.0.0.2");
  BOOST_REQUIRE(!idle.send("x\n"));
  BOOST_TEST(idle.read_line() == std::string("x\n"));
  const auto t0 = clock_type::now();
  auto status = s.stop(SIGTERM, 10s);
  BOOST_REQUIRE_MESSAGE(status, "echo_server did not exit within 10 s of SIGTERM");
  BOOST_TEST(since(t0) < 5.0);  // --shutdown-timeout is 3 s; nothing should need it here
  BOOST_TEST(WIFEXITED(*status));
  BOOST_TEST(WEXITSTATUS(*status) == 0);
  BOOST_TEST(c.read_line() == std::string("error: server shutting down\n"));
  bool eof = false;
  c.read_to_eof(eof);
  BOOST_TEST(eof);
  idle.read_to_eof(eof);
  BOOST_TEST(eof);
  const std::string log = s.log();
  BOOST_TEST(log.find("signal 15 (SIGTERM): shutting down") != std::string::npos);
  BOOST_TEST(log.find("shutdown complete") != std::string::npos);
}

BOOST_AUTO_TEST_SUITE_END()
