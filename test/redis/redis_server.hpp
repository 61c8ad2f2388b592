//
// test/redis/redis_server.hpp: a private redis-server for one test, and a few helpers.
//
// The server listens on 127.0.0.1 only, on a port that was free a moment
// before, with persistence off. stop() kills it (SIGKILL: "Redis dies"),
// start() brings it back on the same port. Every wait is bounded.
//
#ifndef RATELIMIT_TEST_REDIS_SERVER_HPP
#define RATELIMIT_TEST_REDIS_SERVER_HPP

#include <ratelimit/redis/connection.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace ratelimit::test {

/// A TCP port on 127.0.0.1 that nobody listens on right now.
inline std::uint16_t free_port() {
  boost::asio::io_context ctx;
  boost::asio::ip::tcp::acceptor a(
      ctx, boost::asio::ip::tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
  return a.local_endpoint().port();
}

/// Spawns `argv` with stdout/stderr to /dev/null (or inherited); returns the pid.
inline pid_t spawn(const std::vector<std::string>& args, bool quiet = true) {
  std::vector<char*> argv;
  for (const auto& a : args)
    argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (quiet) {
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  }
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot start " + args[0] + ": " + std::strerror(rc));
  return pid;
}

class redis_server {
 public:
  explicit redis_server(std::vector<std::string> extra = {})
      : port_(free_port()), extra_(std::move(extra)) {
    start();
  }
  ~redis_server() { stop(); }
  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;

  std::uint16_t port() const { return port_; }

  redis_config config() const {
    redis_config c;
    c.host = "127.0.0.1";
    c.port = port_;
    c.connect_timeout = std::chrono::milliseconds(500);
    c.request_timeout = std::chrono::milliseconds(1000);
    c.reconnect_min = std::chrono::milliseconds(10);
    c.reconnect_max = std::chrono::milliseconds(100);
    return c;
  }

  /// Starts the server and waits (at most 10 s) until it answers PING.
  void start() {
    if (pid_ > 0) return;
    const char* bin = std::getenv("RATELIMIT_REDIS_SERVER");
    std::vector<std::string> args{bin ? bin : "redis-server",
                                  "--port",
                                  std::to_string(port_),
                                  "--bind",
                                  "127.0.0.1",
                                  "--save",
                                  "",
                                  "--appendonly",
                                  "no",
                                  "--daemonize",
                                  "no",
                                  "--protected-mode",
                                  "yes"};
    args.insert(args.end(), extra_.begin(), extra_.end());
    pid_ = spawn(args);
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!ping()) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("redis-server exited at start (port " + std::to_string(port_) +
                                 " taken?)");
      }
      if (std::chrono::steady_clock::now() > end) {
        stop();
        throw std::runtime_error("redis-server did not answer within 10 s");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  /// Kills the server (SIGKILL) and reaps it.
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  bool running() const { return pid_ > 0; }

  /// Stalls the server (SIGSTOP): connections stay open, nothing is answered.
  void pause() {
    if (pid_ > 0) ::kill(pid_, SIGSTOP);
  }
  /// Lets a stalled server go on (SIGCONT).
  void resume() {
    if (pid_ > 0) ::kill(pid_, SIGCONT);
  }

 private:
  bool ping() const {
    try {
      boost::asio::io_context ctx;
      boost::asio::ip::tcp::socket s(ctx);
      s.connect({boost::asio::ip::make_address("127.0.0.1"), port_});
      boost::asio::write(s, boost::asio::buffer(std::string("PING\r\n")));
      char buf[64];
      const std::size_t n = s.read_some(boost::asio::buffer(buf));
      // "+PONG" or "-NOAUTH ..." both prove the server is up.
      return n > 0 && (buf[0] == '+' || buf[0] == '-');
    } catch (const std::exception&) {
      return false;
    }
  }

  std::uint16_t port_;
  std::vector<std::string> extra_;
  pid_t pid_ = -1;
};

/// The result of one request.
struct exec_result {
  boost::system::error_code ec;
  redis_reply reply;
};

/// A server of the test's own, a context and a connection to the server:
/// the fixture of most Redis tests.
struct redis_fixture {
  redis_server server;
  boost::asio::io_context ctx;
  redis_connection conn{ctx, server.config()};
};

/// Runs `ctx` until `done()` or `limit` passes; returns done().
template <typename Pred>
bool run_until(boost::asio::io_context& ctx, Pred done,
               std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    ctx.restart();
    ctx.run_one_for(std::chrono::milliseconds(2));
  }
  return true;
}

/// One request, run to completion on `ctx` (bounded: 10 s).
inline exec_result exec(boost::asio::io_context& ctx, redis_connection& conn,
                        std::vector<std::string> args) {
  std::optional<exec_result> r;
  conn.async_exec(std::move(args), [&](boost::system::error_code ec, redis_reply reply) {
    r = exec_result{ec, std::move(reply)};
  });
  if (!run_until(ctx, [&] { return r.has_value(); }))
    throw std::runtime_error("redis request did not complete in 10 s");
  return std::move(*r);
}

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_REDIS_SERVER_HPP
