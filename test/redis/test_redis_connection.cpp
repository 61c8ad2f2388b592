// The connection against a real redis-server: commands, pipelining, request
// timeouts, reconnection with backoff, AUTH, SELECT, oversized replies, close.
#include "redis_server.hpp"

#include <ratelimit/redis/connection.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <set>

using namespace ratelimit;
using namespace ratelimit::test;
using namespace std::chrono_literals;

namespace {
const auto unavailable = error::make_error_code(error::redis_unavailable);
}

BOOST_AUTO_TEST_SUITE(redis_connection_tests)

BOOST_AUTO_TEST_CASE(commands_and_replies) {
  redis_server server;
  boost::asio::io_context ctx;
  redis_connection conn(ctx, server.config());
  auto r = exec(ctx, conn, {"PING"});
  BOOST_TEST(!r.ec);
  BOOST_TEST((r.reply.type == redis_reply::kind::status && r.reply.str == "PONG"));
  BOOST_TEST(conn.is_connected());
  // Binary-safe arguments.
  const std::string value("a\0b\r\n$3\r\n", 10);
  BOOST_TEST(!exec(ctx, conn, {"SET", "k", value}).ec);
  r = exec(ctx, conn, {"GET", "k"});
  BOOST_TEST((r.reply.type == redis_reply::kind::string && r.reply.str == value));
  r = exec(ctx, conn, {"GET", "missing"});
  BOOST_TEST((r.reply.type == redis_reply::kind::nil));
  r = exec(ctx, conn, {"RPUSH", "l", "1", "2", "3"});
  BOOST_TEST((r.reply.type == redis_reply::kind::integer && r.reply.integer == 3));
  r = exec(ctx, conn, {"LRANGE", "l", "0", "-1"});
  BOOST_REQUIRE((r.reply.type == redis_reply::kind::array && r.reply.elements.size() == 3));
  BOOST_TEST(r.reply.elements[2].str == "3");
  // An error reply is redis_error, with the server's message.
  r = exec(ctx, conn, {"NOSUCHCOMMAND"});
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(r.reply.str.find("unknown command") != std::string::npos);
  r = exec(ctx, conn, {"INCR", "l"});
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(r.reply.str.find("WRONGTYPE") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(pipelines_many_callers) {
  redis_server server;
  boost::asio::io_context ctx;
  redis_connection conn(ctx, server.config());
  exec(ctx, conn, {"PING"});
  const auto before = conn.stats();
  constexpr int n = 2000;
  std::vector<long long> got;
  std::vector<long long> order;
  for (int i = 0; i < n; ++i)
    conn.async_exec({"INCR", "counter"}, [&](boost::system::error_code ec, redis_reply r) {
      BOOST_REQUIRE(!ec);
      got.push_back(r.integer);
    });
  BOOST_REQUIRE(run_until(ctx, [&] { return got.size() == n; }));
  // Replies matched in order: the i-th request saw the i-th increment.
  for (int i = 0; i < n; ++i)
    BOOST_REQUIRE_EQUAL(got[i], i + 1);
  const auto after = conn.stats();
  BOOST_TEST(after.requests - before.requests == static_cast<std::uint64_t>(n));
  BOOST_TEST(after.writes - before.writes < static_cast<std::uint64_t>(n / 10));  // batched
}

BOOST_AUTO_TEST_CASE(completes_on_its_associated_executor_never_inline) {
  redis_server server;
  boost::asio::io_context ctx, other;
  redis_connection conn(ctx, server.config());
  bool done = false, inside = true;
  conn.async_exec({"PING"},
                  boost::asio::bind_executor(other, [&](boost::system::error_code ec, redis_reply) {
                    BOOST_TEST(!ec);
                    BOOST_TEST(other.get_executor().running_in_this_thread());
                    done = true;
                  }));
  inside = false;
  BOOST_TEST(!inside);
  // ctx does the I/O; `other` runs the handler.
  BOOST_REQUIRE(run_until(ctx, [&] {
    other.restart();
    other.poll();
    return done;
  }));
}

BOOST_AUTO_TEST_CASE(request_timeout) {
  redis_server server;
  boost::asio::io_context ctx;
  auto cfg = server.config();
  cfg.request_timeout = 150ms;
  redis_connection conn(ctx, cfg);
  exec(ctx, conn, {"PING"});
  // BLPOP holds the reply for 2 s: the request times out, the connection is re-made.
  const auto t0 = std::chrono::steady_clock::now();
  auto r = exec(ctx, conn, {"BLPOP", "nothing", "2"});
  const auto took = std::chrono::steady_clock::now() - t0;
  BOOST_TEST(r.ec == unavailable);
  BOOST_TEST((took >= 140ms));
  BOOST_TEST((took < 1500ms));
  BOOST_TEST(conn.stats().timeouts >= 1u);
  // And the connection works again (a new one: the old one still waits in BLPOP).
  r = exec(ctx, conn, {"PING"});
  BOOST_TEST(!r.ec);
  BOOST_TEST(conn.stats().connects >= 2u);
}

BOOST_AUTO_TEST_CASE(reconnects_after_the_server_comes_back) {
  redis_server server;
  boost::asio::io_context ctx;
  redis_connection conn(ctx, server.config());
  BOOST_TEST(!exec(ctx, conn, {"SET", "a", "1"}).ec);
  server.stop();
  // While the server is gone, requests fail (fast, not after a timeout).
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i)
    BOOST_TEST(exec(ctx, conn, {"PING"}).ec == unavailable);
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 2s));
  BOOST_TEST(!conn.is_connected());
  server.start();
  // Within the backoff (at most 100 ms here) plus a connect, it is back.
  BOOST_REQUIRE(run_until(
      ctx, [&] { return conn.is_connected(); }, 5s));
  BOOST_TEST(!exec(ctx, conn, {"PING"}).ec);
  BOOST_TEST(conn.stats().failed_connects >= 1u);
}

BOOST_AUTO_TEST_CASE(connecting_to_nothing_fails_every_request) {
  boost::asio::io_context ctx;
  redis_config cfg;
  cfg.port = free_port();  // nobody listens
  cfg.reconnect_min = 10ms;
  cfg.reconnect_max = 50ms;
  redis_connection conn(ctx, cfg);
  int failed = 0;
  for (int i = 0; i < 50; ++i)
    conn.async_exec({"PING"}, [&](boost::system::error_code ec, redis_reply) {
      BOOST_TEST(ec == unavailable);
      ++failed;
    });
  BOOST_REQUIRE(run_until(
      ctx, [&] { return failed == 50; }, 5s));
  BOOST_TEST(conn.last_error().find("connect") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(auth_and_select) {
  redis_server server({"--requirepass", "s3cret"});
  boost::asio::io_context ctx;
  auto cfg = server.config();
  cfg.password = "s3cret";
  cfg.database = 3;
  redis_connection conn(ctx, cfg);
  BOOST_TEST(!exec(ctx, conn, {"SET", "where", "db3"}).ec);
  auto cfg0 = cfg;
  cfg0.database = 0;
  redis_connection conn0(ctx, cfg0);
  BOOST_TEST((exec(ctx, conn0, {"GET", "where"}).reply.type == redis_reply::kind::nil));
  BOOST_TEST(exec(ctx, conn, {"GET", "where"}).reply.str == "db3");
  // ACL form: AUTH default <password>.
  auto cfg_user = cfg;
  cfg_user.username = "default";
  redis_connection conn_user(ctx, cfg_user);
  BOOST_TEST(exec(ctx, conn_user, {"GET", "where"}).reply.str == "db3");
  // A wrong password: requests fail as unavailable, and the reason is kept.
  auto bad = cfg;
  bad.password = "wrong";
  redis_connection conn_bad(ctx, bad);
  BOOST_TEST(exec(ctx, conn_bad, {"PING"}).ec == unavailable);
  BOOST_TEST(!conn_bad.is_connected());
  BOOST_TEST(conn_bad.last_error().find("WRONGPASS") != std::string::npos);
  // No password at all: NOAUTH, as the server says.
  auto none = cfg;
  none.password.clear();
  none.database = 0;
  redis_connection conn_none(ctx, none);
  auto r = exec(ctx, conn_none, {"GET", "where"});
  BOOST_TEST(r.ec == error::make_error_code(error::redis_error));
  BOOST_TEST(r.reply.str.find("NOAUTH") != std::string::npos);
  // A database that does not exist.
  auto nodb = cfg;
  nodb.database = 1000;
  redis_connection conn_nodb(ctx, nodb);
  BOOST_TEST(exec(ctx, conn_nodb, {"PING"}).ec == unavailable);
  BOOST_TEST(conn_nodb.last_error().find("DB index") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(oversized_reply) {
  redis_server server;
  boost::asio::io_context ctx;
  auto cfg = server.config();
  cfg.max_reply_bytes = 64 * 1024;
  redis_connection conn(ctx, cfg);
  BOOST_TEST(!exec(ctx, conn, {"SET", "big", std::string(1 << 20, 'x')}).ec);
  BOOST_TEST(!exec(ctx, conn, {"SET", "small", "y"}).ec);
  auto r = exec(ctx, conn, {"GET", "big"});
  BOOST_TEST(r.ec == error::make_error_code(error::redis_bad_reply));
  // The connection was re-made and works.
  r = exec(ctx, conn, {"GET", "small"});
  BOOST_TEST(!r.ec);
  BOOST_TEST(r.reply.str == "y");
}

BOOST_AUTO_TEST_CASE(close_fails_outstanding_requests) {
  redis_server server;
  boost::asio::io_context ctx;
  redis_connection conn(ctx, server.config());
  exec(ctx, conn, {"PING"});
  std::optional<boost::system::error_code> blocked;
  conn.async_exec({"BLPOP", "nothing", "5"},
                  [&](boost::system::error_code ec, redis_reply) { blocked = ec; });
  run_until(
      ctx, [] { return false; }, 50ms);
  conn.close();
  BOOST_REQUIRE(run_until(
      ctx, [&] { return blocked.has_value(); }, 2s));
  BOOST_TEST(*blocked == boost::asio::error::operation_aborted);
  BOOST_TEST(exec(ctx, conn, {"PING"}).ec == boost::asio::error::operation_aborted);
}

BOOST_AUTO_TEST_CASE(many_threads_share_one_connection) {
  redis_server server;
  boost::asio::io_context ctx;
  redis_connection conn(ctx, server.config());
  std::atomic<int> done{0};
  std::vector<std::thread> runners;
  auto guard = boost::asio::make_work_guard(ctx);
  for (int i = 0; i < 2; ++i)
    runners.emplace_back([&] { ctx.run(); });
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&] {
      for (int i = 0; i < 250; ++i)
        conn.async_exec({"INCR", "c"}, [&](boost::system::error_code ec, redis_reply) {
          if (!ec) ++done;
        });
    });
  for (auto& c : callers)
    c.join();
  const auto end = std::chrono::steady_clock::now() + 10s;
  while (done < 1000 && std::chrono::steady_clock::now() < end)
    std::this_thread::sleep_for(1ms);
  BOOST_TEST(done.load() == 1000);
  conn.close();
  guard.reset();
  ctx.stop();
  for (auto& r : runners)
    r.join();
}

BOOST_AUTO_TEST_SUITE_END()
