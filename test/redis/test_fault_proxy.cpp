// The fault proxy in front of a real redis-server: plain forwarding, each
// fault seen from a raw client (and from hiredis), the RESP framing behind
// reply injection, and a clean stop.
#include "fake_redis.hpp"
#include "fault_proxy.hpp"
#include "redis_server.hpp"
#include "resp_client.hpp"
#include "test_support.hpp"

#include <boost/test/unit_test.hpp>

#include <hiredis/hiredis.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

using namespace ratelimit::test;
using namespace std::chrono_literals;

namespace {

const auto to_server = direction::to_server;
const auto to_client = direction::to_client;

/// A blocking hiredis connection with a read/write timeout.
class hiredis_client {
 public:
  explicit hiredis_client(std::uint16_t port, std::chrono::milliseconds timeout = 1000ms) {
    const timeval tv{static_cast<time_t>(timeout.count() / 1000),
                     static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
    c_ = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (!c_ || c_->err) throw std::runtime_error("hiredis: cannot connect");
    redisSetTimeout(c_, tv);
  }
  ~hiredis_client() { redisFree(c_); }
  hiredis_client(const hiredis_client&) = delete;
  hiredis_client& operator=(const hiredis_client&) = delete;

  /// The reply, describe()d, or "io error" when none came.
  std::string operator()(const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(
        redisCommandArgv(c_, static_cast<int>(args.size()), argv.data(), lens.data()));
    if (!r) return "io error";
    std::string text = describe(r);
    freeReplyObject(r);
    return text;
  }

 private:
  redisContext* c_ = nullptr;
};

std::string cmd(const std::vector<std::string>& args) {
  return resp::command(args);
}

/// The time one PING takes through `port`.
std::chrono::steady_clock::duration ping_time(resp_client& c) {
  const auto t0 = std::chrono::steady_clock::now();
  c.send(cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "+PONG");
  return std::chrono::steady_clock::now() - t0;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(resp_framer_tests)

// Every kind of RESP2 reply, fed whole and byte by byte: the boundaries found
// are the same.
BOOST_AUTO_TEST_CASE(finds_reply_boundaries) {
  const std::vector<std::string> replies{
      "+OK\r\n",
      "+\r\n",
      "-ERR wrong\r\n",
      ":-12\r\n",
      "$5\r\nhello\r\n",
      "$0\r\n\r\n",
      "$4\r\n\r\n\r\n\r\n",  // a body that looks like lines
      "$-1\r\n",
      "*0\r\n",
      "*-1\r\n",
      "*3\r\n:1\r\n$1\r\na\r\n+s\r\n",
      "*2\r\n*2\r\n:1\r\n*0\r\n*1\r\n$-1\r\n",
  };
  std::string stream;
  std::vector<std::size_t> ends;
  for (const auto& r : replies) {
    stream += r;
    ends.push_back(stream.size());
  }
  for (std::size_t piece : {stream.size(), std::size_t{1}, std::size_t{3}}) {
    resp_framer f;
    std::vector<std::size_t> found;
    std::size_t at = 0;
    while (at < stream.size()) {
      std::string_view rest = std::string_view(stream).substr(at, piece);
      while (!rest.empty()) {
        const auto [used, ended] = f.feed(rest);
        at += used;
        rest.remove_prefix(used);
        if (ended) found.push_back(at);
        BOOST_TEST(f.at_boundary() == ended);
      }
    }
    BOOST_TEST(!f.failed());
    BOOST_TEST(found == ends, "piece " << piece);
  }
}

BOOST_AUTO_TEST_CASE(fails_on_what_is_not_resp) {
  for (std::string bad : {"hello\r\n", "$x\r\n", "*1x\r\n", ":1\n"}) {
    resp_framer f;
    const auto [used, ended] = f.feed(bad);
    BOOST_TEST(used == bad.size());
    BOOST_TEST(!ended);
    BOOST_TEST(f.failed(), bad);
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(fault_proxy_tests)

BOOST_AUTO_TEST_CASE(forwards_and_counts) {
  redis_server server;
  fault_proxy proxy(server.port());
  {
    resp_client c(proxy.port());
    c.send(cmd({"PING"}));
    BOOST_TEST(c.read_reply().reply == "+PONG");
    BOOST_TEST(proxy.accepted() == 1u);
    BOOST_TEST(proxy.open_connections() == 1u);
    BOOST_TEST(proxy.bytes_forwarded(to_server) == cmd({"PING"}).size());
    BOOST_TEST(proxy.bytes_forwarded(to_client) == 7u);  // +PONG\r\n
    // Binary-safe, both ways, with hiredis.
    hiredis_client h(proxy.port());
    const std::string value("a\0b\r\n$3\r\n", 10);
    BOOST_TEST(h({"SET", "k", value}) == "+OK");
    BOOST_TEST(h({"GET", "k"}) == "$" + value);
    BOOST_TEST(proxy.accepted() == 2u);
  }
  // Both clients gone: the proxy closed both sides of both connections.
  BOOST_TEST(eventually([&] { return proxy.open_connections() == 0; }, 2s));
}

BOOST_AUTO_TEST_CASE(delay_holds_every_chunk_in_order) {
  redis_server server;
  fault_proxy proxy(server.port());
  resp_client c(proxy.port());
  ping_time(c);
  proxy.set_delay(to_client, 100ms);
  auto took = ping_time(c);
  BOOST_TEST((took >= 100ms && took < 1500ms), std::chrono::duration<double>(took).count());
  proxy.set_delay(to_server, 60ms);
  took = ping_time(c);
  BOOST_TEST((took >= 160ms && took < 1500ms), std::chrono::duration<double>(took).count());
  // Chunks sent apart keep their order, each held its own delay (not summed).
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 1; i <= 3; ++i) {
    c.send(cmd({"INCR", "n"}));
    std::this_thread::sleep_for(10ms);
  }
  for (int i = 1; i <= 3; ++i)
    BOOST_TEST(c.read_reply().reply == ":" + std::to_string(i));
  took = std::chrono::steady_clock::now() - t0;
  BOOST_TEST((took >= 180ms && took < 1500ms), std::chrono::duration<double>(took).count());
  proxy.set_delay(to_client, 0ms);
  proxy.set_delay(to_server, 0ms);
  BOOST_TEST((ping_time(c) < 1000ms));
}

BOOST_AUTO_TEST_CASE(split_sends_byte_by_byte) {
  redis_server server;
  fault_proxy proxy(server.port());
  const std::string value(40, 'v');
  resp_client c(proxy.port());
  c.send(cmd({"SET", "k", value}));
  BOOST_TEST(c.read_reply().reply == "+OK");
  proxy.set_split(to_client, true, 1ms);
  const auto reads = c.reads();
  const auto bytes = proxy.bytes_forwarded(to_client);
  c.send(cmd({"GET", "k"}));
  BOOST_TEST(c.read_reply().reply == "$" + value);
  // 47 bytes, one write each 1 ms apart: the client needed many reads.
  BOOST_TEST(proxy.bytes_forwarded(to_client) - bytes == 47u);
  BOOST_TEST(c.reads() - reads > 5u, "reads: " << c.reads() - reads);
  // Both ways split, no pause: hiredis still parses every reply.
  proxy.set_split(to_server, true);
  proxy.set_split(to_client, true);
  hiredis_client h(proxy.port());
  BOOST_TEST(h({"RPUSH", "l", "a", "bb", ""}) == ":3");
  BOOST_TEST(h({"LRANGE", "l", "0", "-1"}) == "*[$a,$bb,$]");
  BOOST_TEST(h({"GET", "k"}) == "$" + value);
}

BOOST_AUTO_TEST_CASE(drop_is_a_black_hole) {
  redis_server server;
  fault_proxy proxy(server.port());
  resp_client c(proxy.port());
  c.send(cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "+PONG");
  // Replies swallowed: the read times out, the connection stays open.
  proxy.drop(to_client, true);
  c.send(cmd({"PING"}));
  auto r = c.read_reply(300ms);
  BOOST_TEST(r.ec == boost::asio::error::timed_out);
  BOOST_TEST(proxy.open_connections() == 1u);
  BOOST_TEST(proxy.bytes_dropped(to_client) == 7u);
  // Off again: new replies flow; the dropped one is gone for good.
  proxy.drop(to_client, false);
  c.send(cmd({"ECHO", "after"}));
  BOOST_TEST(c.read_reply().reply == "$after");
  // Requests swallowed: hiredis times out.
  proxy.drop(to_server, true);
  hiredis_client h(proxy.port(), 200ms);
  BOOST_TEST(h({"PING"}) == "io error");
  BOOST_TEST(
      eventually([&] { return proxy.bytes_dropped(to_server) == cmd({"PING"}).size(); }, 2s));
  BOOST_TEST(proxy.open_connections() == 2u);
}

BOOST_AUTO_TEST_CASE(reset_after_cuts_a_reply) {
  redis_server server;
  fault_proxy proxy(server.port());
  resp_client c(proxy.port());
  c.send(cmd({"SET", "k", std::string(100, 'v')}));
  BOOST_TEST(c.read_reply().reply == "+OK");
  const auto got = c.received().size();
  const auto bytes = proxy.bytes_forwarded(to_client);
  proxy.reset_after(to_client, 5);
  c.send(cmd({"GET", "k"}));
  const auto r = c.read_reply();
  BOOST_TEST(r.ec == boost::asio::error::connection_reset, r.ec.message());
  BOOST_TEST(r.reply.empty());
  BOOST_TEST(proxy.bytes_forwarded(to_client) - bytes == 5u);
  BOOST_TEST(c.received().size() - got <= 5u);  // the kernel may drop what the RST overtook
  BOOST_TEST(eventually([&] { return proxy.open_connections() == 0; }, 2s));
  // Fired once: the next connection works. And a request cut midway.
  resp_client d(proxy.port());
  d.send(cmd({"PING"}));
  BOOST_TEST(d.read_reply().reply == "+PONG");
  proxy.reset_after(to_server, 3);
  d.send(cmd({"PING"}));
  BOOST_TEST(d.read_reply().ec == boost::asio::error::connection_reset);
  BOOST_TEST(proxy.accepted() == 2u);
}

BOOST_AUTO_TEST_CASE(accept_and_close) {
  redis_server server;
  fault_proxy proxy(server.port());
  const std::string full = "-ERR max number of clients reached\r\n";
  proxy.set_accept_and_close(true, full);
  for (int i = 0; i < 3; ++i) {
    resp_client c(proxy.port());
    if (i == 1) c.send(cmd({"PING"}));  // a client that wrote first still gets it all
    boost::system::error_code ec;
    BOOST_TEST(c.read_until_closed(ec) == full);
    BOOST_TEST(ec == boost::asio::error::eof, ec.message());
  }
  BOOST_TEST(proxy.accepted() == 3u);
  BOOST_TEST(proxy.bytes_forwarded(to_server) == 0u);  // nothing reached the server
  {
    hiredis_client h(proxy.port());
    BOOST_TEST(h({"PING"}) == "-ERR max number of clients reached");
  }
  // Without a greeting: EOF at once.
  proxy.set_accept_and_close(true);
  {
    resp_client c(proxy.port());
    boost::system::error_code ec;
    BOOST_TEST(c.read_until_closed(ec).empty());
    BOOST_TEST(ec == boost::asio::error::eof, ec.message());
  }
  BOOST_TEST(proxy.accepted() == 5u);
  BOOST_TEST(eventually([&] { return proxy.open_connections() == 0; }, 2s));
  proxy.set_accept_and_close(false);
  resp_client c(proxy.port());
  c.send(cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "+PONG");
}

BOOST_AUTO_TEST_CASE(reset_all_resets_every_connection) {
  redis_server server;
  fault_proxy proxy(server.port());
  resp_client a(proxy.port()), b(proxy.port());
  for (auto* c : {&a, &b}) {
    c->send(cmd({"PING"}));
    BOOST_TEST(c->read_reply().reply == "+PONG");
  }
  proxy.reset_all();
  BOOST_TEST(proxy.open_connections() == 0u);  // done when reset_all() returns
  BOOST_TEST(a.read_reply().ec == boost::asio::error::connection_reset);
  BOOST_TEST(b.read_reply().ec == boost::asio::error::connection_reset);
  resp_client c(proxy.port());
  c.send(cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "+PONG");
}

BOOST_AUTO_TEST_CASE(inject_reply_replaces_exactly_one) {
  redis_server server;
  fault_proxy proxy(server.port());
  const std::string tryagain = "-TRYAGAIN Multiple keys request during rehashing of slot\r\n";
  proxy.inject_reply(tryagain);  // before the connection exists: its first reply
  resp_client c(proxy.port());
  c.send(cmd({"PING"}) + cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "-TRYAGAIN Multiple keys request during rehashing of slot");
  BOOST_TEST(c.read_reply().reply == "+PONG");
  BOOST_TEST(proxy.replies_replaced() == 1u);
  BOOST_TEST(proxy.pending_injections() == 0u);

  // Every kind of reply is swallowed whole: the next one is intact.
  c.send(cmd({"SET", "s", "a\r\n$1\r\nb"}) + cmd({"RPUSH", "l", "1", "2", "3"}));
  BOOST_TEST(c.read_reply().reply == "+OK");
  BOOST_TEST(c.read_reply().reply == ":3");
  const std::vector<std::vector<std::string>> kinds{
      {"GET", "s"},
      {"GET", "missing"},
      {"LRANGE", "l", "0", "-1"},
      {"LRANGE", "none", "0", "-1"},
      {"EVAL", "return {1, {2, 'x', {}}, {}}", "0"},
      {"BLPOP", "none", "0.01"},  // *-1
      {"INCR", "s"},              // an error
  };
  for (const auto& k : kinds) {
    proxy.inject_reply("-CLUSTERDOWN The cluster is down\r\n");
    c.send(cmd(k) + cmd({"ECHO", "next"}));
    BOOST_TEST(c.read_reply().reply == "-CLUSTERDOWN The cluster is down", k[0]);
    BOOST_TEST(c.read_reply().reply == "$next", k[0]);
  }
  // And unreplaced they arrive intact.
  c.send(cmd({"EVAL", "return {1, {2, 'x', {}}, {}}", "0"}) + cmd({"BLPOP", "none", "0.01"}) +
         cmd({"GET", "s"}));
  BOOST_TEST(c.read_reply().reply == "*[:1,*[:2,$x,*[]],*[]]");
  BOOST_TEST(c.read_reply().reply == "nil");
  BOOST_TEST(c.read_reply().reply == "$a\r\n$1\r\nb");
  // Queued injections replace one reply each, in order; a reply can become several.
  proxy.inject_reply(":7\r\n");
  proxy.inject_reply("+one\r\n+two\r\n");
  c.send(cmd({"PING"}) + cmd({"PING"}) + cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == ":7");
  BOOST_TEST(c.read_reply().reply == "+one");
  BOOST_TEST(c.read_reply().reply == "+two");
  BOOST_TEST(c.read_reply().reply == "+PONG");
  BOOST_TEST(proxy.replies_replaced() == 1u + kinds.size() + 2u);
}

BOOST_AUTO_TEST_CASE(replace_every_reply_and_filter) {
  redis_server server;
  fault_proxy proxy(server.port());
  resp_client c(proxy.port());
  proxy.replace_every_reply("-CLUSTERDOWN The cluster is down\r\n");
  c.send(cmd({"PING"}) + cmd({"ECHO", "x"}) + cmd({"INCR", "n"}));
  for (int i = 0; i < 3; ++i)
    BOOST_TEST(c.read_reply().reply == "-CLUSTERDOWN The cluster is down");
  proxy.stop_replacing();
  c.send(cmd({"INCR", "n"}));
  BOOST_TEST(c.read_reply().reply == ":2");  // the first INCR did run

  // The filter sees each whole reply, raw, and picks which to replace.
  auto seen = std::make_shared<std::vector<std::string>>();  // the proxy's thread only
  proxy.set_reply_filter([seen](std::string_view reply) -> std::optional<std::string> {
    seen->emplace_back(reply);
    if (reply == ":4\r\n") return std::string("-TRYAGAIN again\r\n");
    return std::nullopt;
  });
  c.send(cmd({"INCR", "n"}) + cmd({"INCR", "n"}) + cmd({"LRANGE", "none", "0", "-1"}));
  BOOST_TEST(c.read_reply().reply == ":3");
  BOOST_TEST(c.read_reply().reply == "-TRYAGAIN again");
  BOOST_TEST(c.read_reply().reply == "*[]");
  c.send(cmd({"RPUSH", "l", "a", "b"}) + cmd({"LRANGE", "l", "0", "-1"}));
  BOOST_TEST(c.read_reply().reply == ":2");
  BOOST_TEST(c.read_reply().reply == "*[$a,$b]");
  proxy.reset_all();  // the proxy's thread is done with `seen`
  const std::vector<std::string> expected{":3\r\n", ":4\r\n", "*0\r\n", ":2\r\n",
                                          "*2\r\n$1\r\na\r\n$1\r\nb\r\n"};
  BOOST_TEST(*seen == expected, boost::test_tools::per_element());
  BOOST_TEST(proxy.replies_replaced() == 4u);
}

BOOST_AUTO_TEST_CASE(clear_faults_restores_plain_forwarding) {
  redis_server server;
  fault_proxy proxy(server.port());
  proxy.reset_after(to_client, 0);
  proxy.cancel_reset_after(to_client);
  resp_client c(proxy.port());
  c.send(cmd({"PING"}));
  BOOST_TEST(c.read_reply().reply == "+PONG");
  proxy.set_delay(to_client, 10s);
  proxy.set_split(to_server, true, 100ms);
  proxy.drop(to_client, true);
  proxy.reset_after(to_server, 0);
  proxy.inject_reply(":1\r\n");
  proxy.replace_every_reply(":2\r\n");
  proxy.set_reply_filter([](std::string_view) { return std::string(":3\r\n"); });
  proxy.set_accept_and_close(true);
  proxy.clear_faults();
  const auto t0 = std::chrono::steady_clock::now();
  resp_client d(proxy.port());
  for (auto* x : {&c, &d}) {
    x->send(cmd({"PING"}));
    BOOST_TEST(x->read_reply().reply == "+PONG");
  }
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 1s));
  BOOST_TEST(proxy.replies_replaced() == 0u);
  BOOST_TEST(proxy.open_connections() == 2u);
}

// Two proxies in a row: the outer one splits, so the inner one frames
// replies that reach it one byte at a time.
BOOST_AUTO_TEST_CASE(inject_into_replies_arriving_byte_by_byte) {
  redis_server server;
  fault_proxy splitter(server.port());
  splitter.set_split(to_client, true);
  fault_proxy proxy(splitter.port());
  resp_client c(proxy.port());
  c.send(cmd({"RPUSH", "l", "a", "bc"}));
  BOOST_TEST(c.read_reply().reply == ":2");
  for (int i = 0; i < 3; ++i) {
    proxy.inject_reply("-CLUSTERDOWN The cluster is down\r\n");
    c.send(cmd({"LRANGE", "l", "0", "-1"}) + cmd({"LRANGE", "l", "0", "-1"}));
    BOOST_TEST(c.read_reply().reply == "-CLUSTERDOWN The cluster is down");
    BOOST_TEST(c.read_reply().reply == "*[$a,$bc]");
  }
  BOOST_TEST(proxy.replies_replaced() == 3u);
}

// fake_redis behind the proxy: the proxy does not care what the server is.
BOOST_AUTO_TEST_CASE(in_front_of_fake_redis) {
  fake_redis fake;
  fault_proxy proxy(fake.port());
  proxy.inject_reply(resp::integers({1, 2, 3}));
  hiredis_client h(proxy.port());
  BOOST_TEST(h({"PING"}) == "*[:1,:2,:3]");
  BOOST_TEST(h({"PING"}) == "+PONG");
  BOOST_TEST(fake.commands() == 2u);
}

BOOST_AUTO_TEST_CASE(target_down_closes_the_client) {
  const auto nobody = free_port();
  fault_proxy proxy(nobody);
  for (int i = 0; i < 2; ++i) {
    resp_client c(proxy.port());
    boost::system::error_code ec;
    BOOST_TEST(c.read_until_closed(ec).empty());
    BOOST_TEST((ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset),
               ec.message());
  }
  BOOST_TEST(proxy.accepted() == 2u);
  BOOST_TEST(eventually([&] { return proxy.open_connections() == 0; }, 2s));
}

// The destructor does not wait for held bytes: it closes everything and joins.
BOOST_AUTO_TEST_CASE(stops_cleanly_with_work_in_flight) {
  redis_server server;
  auto proxy = std::make_unique<fault_proxy>(server.port());
  resp_client a(proxy->port()), b(proxy->port());
  a.send(cmd({"PING"}));
  BOOST_TEST(a.read_reply().reply == "+PONG");
  proxy->set_delay(to_client, 10s);
  proxy->set_split(to_server, true, 100ms);
  a.send(cmd({"PING"}));
  b.send(cmd({"PING"}));
  BOOST_TEST(eventually([&] { return proxy->bytes_forwarded(to_server) > 16u; }, 2s));
  const auto t0 = std::chrono::steady_clock::now();
  proxy.reset();
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 1s));
  for (auto* c : {&a, &b}) {
    boost::system::error_code ec;
    c->read_until_closed(ec);
    BOOST_TEST((ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset),
               ec.message());
  }
}

BOOST_AUTO_TEST_SUITE_END()
