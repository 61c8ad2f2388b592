// Builds against the redis component and runs without a server: a
// connection to a port nobody listens on, one request with the fail-open
// policy (granted while Redis is unreachable) and one with fail-closed
// (redis_unavailable), and one through a keyed limiter (fail-open). Exits 0
// on success.
#include <ratelimit/redis/redis_keyed_limiter.hpp>
#include <ratelimit/redis/redis_token_bucket.hpp>

#include <boost/asio/io_context.hpp>

#include <cstdio>

int main() {
  boost::asio::io_context ctx;
  ratelimit::redis_config cfg;
  cfg.port = 1;  // nothing listens there: the connection fails at once
  ratelimit::redis_connection conn(ctx, cfg);
  ratelimit::redis_bucket_options open;
  open.on_fault = ratelimit::redis_fault_policy::fail_open;
  ratelimit::redis_token_bucket a(conn, "consumer", 5, ratelimit::per_second(5), open);
  ratelimit::redis_token_bucket b(conn, "consumer", 5, ratelimit::per_second(5));
  ratelimit::redis_keyed_limiter k(conn, "consumer:", 5, ratelimit::per_second(5), open);
  boost::system::error_code ea, eb, ek;
  int done = 0;
  a.async_get_token([&](boost::system::error_code ec) { ea = ec, ++done; });
  b.async_get_token([&](boost::system::error_code ec) { eb = ec, ++done; });
  k.async_get_token("user", [&](boost::system::error_code ec) { ek = ec, ++done; });
  ctx.run_for(std::chrono::seconds(10));
  std::printf("fail_open: %s; fail_closed: %s; keyed fail_open: %s\n", ea.message().c_str(),
              eb.message().c_str(), ek.message().c_str());
  return done == 3 && !ea && !ek && eb == ratelimit::error::redis_unavailable ? 0 : 1;
}
