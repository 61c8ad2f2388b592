// Takes three tokens from a bucket of two refilling at 100/s: two at once, one
// after ~10 ms. Exits 0 on success.
#include <ratelimit.hpp>

#include <boost/asio/io_context.hpp>

#include <cstdio>

int main() {
  boost::asio::io_context ctx;
  ratelimit::token_bucket bucket(ctx, 2, ratelimit::per_second(100));
  int granted = 0;
  for (int i = 0; i < 3; ++i)
    bucket.async_get_token([&](boost::system::error_code ec) { granted += !ec; });
  ctx.run();
  std::printf("granted %d of 3\n", granted);
  return granted == 3 ? 0 : 1;
}
