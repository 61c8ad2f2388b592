// The fake Redis server: its reply helpers, request parsing (pipelined,
// binary-safe, inline), answers in order, closing, resetting, never
// answering, and a clean stop.
#include "fake_redis.hpp"
#include "resp_client.hpp"
#include "test_support.hpp"

#include <boost/test/unit_test.hpp>

#include <atomic>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using namespace ratelimit::test;
using namespace std::chrono_literals;

namespace {

std::string cmd(const std::vector<std::string>& args) {
  return resp::command(args);
}

/// Answers every command by name: INCR counts, CLOSE/RESET/STUCK are the special values.
std::string scripted(const fake_redis::command& c, std::atomic<long long>& counter) {
  if (c[0] == "INCR") return resp::integer(++counter);
  if (c[0] == "CLOSE") return fake_redis::close_connection();
  if (c[0] == "RESET") return fake_redis::reset_connection();
  if (c[0] == "STUCK") return fake_redis::never_answer();
  if (c[0] == "NOTHING") return "";
  if (c[0] == "TWICE") return resp::status("one") + resp::status("two");
  return fake_redis::default_answer(c);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(fake_redis_tests)

BOOST_AUTO_TEST_CASE(reply_helpers) {
  BOOST_TEST(resp::status("OK") == "+OK\r\n");
  BOOST_TEST(resp::error("ERR x") == "-ERR x\r\n");
  BOOST_TEST(resp::integer(-3) == ":-3\r\n");
  BOOST_TEST(resp::bulk(std::string("a\0\r\n", 4)) == std::string("$4\r\na\0\r\n\r\n", 10));
  BOOST_TEST(resp::bulk("") == "$0\r\n\r\n");
  BOOST_TEST(resp::nil() == "$-1\r\n");
  BOOST_TEST(resp::nil_array() == "*-1\r\n");
  BOOST_TEST(resp::integers({1, 2}) == "*2\r\n:1\r\n:2\r\n");
  BOOST_TEST(resp::integers({}) == "*0\r\n");
  BOOST_TEST(resp::array({resp::integer(1), resp::array({resp::bulk("x")})}) ==
             "*2\r\n:1\r\n*1\r\n$1\r\nx\r\n");
  BOOST_TEST(resp::command({"GET", "k"}) == "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
}

BOOST_AUTO_TEST_CASE(default_answers) {
  fake_redis fake;
  resp_client c(fake.port());
  c.send(cmd({"PING"}) + cmd({"ping", "hi"}) + cmd({"ECHO", "x"}) + cmd({"AUTH", "pw"}) +
         cmd({"SELECT", "2"}) + cmd({"GET", "k"}));
  BOOST_TEST(c.read_reply().reply == "+PONG");
  BOOST_TEST(c.read_reply().reply == "$hi");
  BOOST_TEST(c.read_reply().reply == "$x");
  BOOST_TEST(c.read_reply().reply == "+OK");
  BOOST_TEST(c.read_reply().reply == "+OK");
  BOOST_TEST(c.read_reply().reply == "-ERR unknown command 'GET'");
  // Inline commands, as redis_server's readiness check sends them; blank lines ignored.
  c.send("PING\r\n\r\n  ECHO   word \n");
  BOOST_TEST(c.read_reply().reply == "+PONG");
  BOOST_TEST(c.read_reply().reply == "$word");
  BOOST_TEST(fake.commands() == 8u);
  BOOST_TEST(fake.accepted() == 1u);
  BOOST_TEST(fake.open_connections() == 1u);
}

BOOST_AUTO_TEST_CASE(pipelined_commands_answered_in_order) {
  std::atomic<long long> counter{0};
  fake_redis fake([&](const fake_redis::command& c) { return scripted(c, counter); });
  resp_client c(fake.port());
  std::string batch;
  for (int i = 0; i < 100; ++i)
    batch += cmd({"INCR", "n"});
  // Binary-safe arguments, and a command split across two writes.
  const std::string value("a\0b\r\n*1\r\n", 10);
  batch += cmd({"ECHO", value});
  const std::string last = cmd({"ECHO", "last"});
  c.send(batch + last.substr(0, 9));
  for (int i = 1; i <= 100; ++i)
    BOOST_REQUIRE_EQUAL(c.read_reply().reply, ":" + std::to_string(i));
  BOOST_TEST(c.read_reply().reply == "$" + value);
  BOOST_TEST(c.read_reply(100ms).ec == boost::asio::error::timed_out);
  c.send(last.substr(9));
  BOOST_TEST(c.read_reply().reply == "$last");
  BOOST_TEST(fake.commands() == 102u);
  const auto log = fake.received();
  BOOST_REQUIRE_EQUAL(log.size(), 102u);
  BOOST_TEST((log[0] == fake_redis::command{"INCR", "n"}));
  BOOST_TEST((log[100] == fake_redis::command{"ECHO", value}));
  // A reply of no bytes, and one command answered with two replies.
  c.send(cmd({"NOTHING"}) + cmd({"TWICE"}) + cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "+one");
  BOOST_TEST(c.read_reply().reply == "+two");
  BOOST_TEST(c.read_reply().reply == "+PONG");
}

BOOST_AUTO_TEST_CASE(close_and_reset) {
  std::atomic<long long> counter{0};
  fake_redis fake([&](const fake_redis::command& c) { return scripted(c, counter); });
  {
    // The replies before CLOSE are sent, then EOF; the PING after is never answered.
    resp_client c(fake.port());
    c.send(cmd({"INCR", "n"}) + cmd({"CLOSE"}) + cmd({"PING"}));
    BOOST_TEST(c.read_reply().reply == ":1");
    BOOST_TEST(c.read_reply().ec == boost::asio::error::eof);
  }
  {
    resp_client c(fake.port());
    c.send(cmd({"INCR", "n"}) + cmd({"RESET"}));
    const auto r = c.read_reply();
    // The RST may overtake the reply in the client's kernel.
    BOOST_TEST((r.reply == ":2" || r.ec == boost::asio::error::connection_reset));
    if (r.reply == ":2") BOOST_TEST(c.read_reply().ec == boost::asio::error::connection_reset);
  }
  BOOST_TEST(fake.accepted() == 2u);
  BOOST_TEST(eventually([&] { return fake.open_connections() == 0; }, 2s));
  // Malformed requests: an error, then the connection is closed.
  resp_client c(fake.port());
  c.send("*1\r\n$x\r\n");
  BOOST_TEST(c.read_reply().reply == "-ERR Protocol error");
  BOOST_TEST(c.read_reply().ec == boost::asio::error::eof);
}

BOOST_AUTO_TEST_CASE(never_answer_keeps_the_connection_open) {
  std::atomic<long long> counter{0};
  fake_redis fake([&](const fake_redis::command& c) { return scripted(c, counter); });
  resp_client c(fake.port());
  c.send(cmd({"PING"}) + cmd({"STUCK"}) + cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "+PONG");
  BOOST_TEST(c.read_reply(300ms).ec == boost::asio::error::timed_out);
  c.send(cmd({"PING"}));
  BOOST_TEST(c.read_reply(200ms).ec == boost::asio::error::timed_out);
  BOOST_TEST(fake.open_connections() == 1u);
  BOOST_TEST(eventually([&] { return fake.commands() == 4; }, 2s));  // still counted
  // Another connection is answered.
  resp_client d(fake.port());
  d.send(cmd({"PING"}));
  BOOST_TEST(d.read_reply().reply == "+PONG");
}

BOOST_AUTO_TEST_CASE(handler_replaced_while_running) {
  fake_redis fake;
  resp_client c(fake.port());
  c.send(cmd({"GET", "k"}));
  BOOST_TEST(c.read_reply().reply == "-ERR unknown command 'GET'");
  fake.set_handler([](const fake_redis::command& c) {
    return c[0] == "GET" ? resp::bulk("v") : fake_redis::default_answer(c);
  });
  c.send(cmd({"GET", "k"}));
  BOOST_TEST(c.read_reply().reply == "$v");
  fake.set_handler([](const fake_redis::command&) { return resp::error("LOADING loading"); });
  c.send(cmd({"GET", "k"}));
  BOOST_TEST(c.read_reply().reply == "-LOADING loading");
  // A handler that throws: an error reply, and the fake goes on.
  fake.set_handler([](const fake_redis::command& c) -> std::string {
    if (c[0] == "BOOM") throw std::runtime_error("boom");
    return fake_redis::default_answer(c);
  });
  c.send(cmd({"BOOM"}) + cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "-ERR fake_redis handler threw: boom");
  BOOST_TEST(c.read_reply().reply == "+PONG");
}

BOOST_AUTO_TEST_CASE(stops_cleanly_with_clients_connected) {
  auto fake = std::make_unique<fake_redis>([](const fake_redis::command& c) {
    return c[0] == "STUCK" ? fake_redis::never_answer() : fake_redis::default_answer(c);
  });
  resp_client a(fake->port()), b(fake->port());
  a.send(cmd({"STUCK"}));
  b.send(cmd({"PING"}));
  BOOST_TEST(b.read_reply().reply == "+PONG");
  fake.reset();
  for (auto* c : {&a, &b}) {
    boost::system::error_code ec;
    c->read_until_closed(ec);
    BOOST_TEST((ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset),
               ec.message());
  }
}

BOOST_AUTO_TEST_SUITE_END()
