//
// test/redis/resp_client.hpp: one raw client connection with bounded waits, for
// tests that need to see the bytes on the wire, or their absence.
//
// send() writes raw bytes; read_reply() returns the next complete reply
// (parsed by hiredis's reader, independently of the code under test) as a
// short text, or the error that came first: timed_out, eof, connection_reset.
// Every wait is bounded (2 s by default). Runs its own io_context in the
// calling thread.
//
#ifndef RATELIMIT_TEST_RESP_CLIENT_HPP
#define RATELIMIT_TEST_RESP_CLIENT_HPP

#include <boost/asio/connect.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

#include <hiredis/hiredis.h>

namespace ratelimit::test {

/// A hiredis reply as text: "+OK", "-ERR x", ":3", "$abc", "nil", "*[:1,$a]".
inline std::string describe(const redisReply* r) {
  switch (r->type) {
    case REDIS_REPLY_STATUS:
      return "+" + std::string(r->str, r->len);
    case REDIS_REPLY_ERROR:
      return "-" + std::string(r->str, r->len);
    case REDIS_REPLY_INTEGER:
      return ":" + std::to_string(r->integer);
    case REDIS_REPLY_STRING:
      return "$" + std::string(r->str, r->len);
    case REDIS_REPLY_NIL:
      return "nil";
    case REDIS_REPLY_ARRAY: {
      std::string out = "*[";
      for (std::size_t i = 0; i < r->elements; ++i)
        out += (i ? "," : "") + describe(r->element[i]);
      return out + "]";
    }
    default:
      return "?";
  }
}

class resp_client {
 public:
  using clock = std::chrono::steady_clock;

  struct result {
    boost::system::error_code ec;  // set when no complete reply came
    std::string reply;             // describe()d
  };

  explicit resp_client(std::uint16_t port,
                       std::chrono::milliseconds limit = std::chrono::seconds(2))
      : socket_(ctx_), reader_(redisReaderCreate(), &redisReaderFree) {
    const boost::asio::ip::tcp::endpoint to(boost::asio::ip::make_address("127.0.0.1"), port);
    boost::system::error_code ec;
    socket_.async_connect(to, [&](boost::system::error_code e) { ec = e; });
    run(limit);
    if (ec == boost::asio::error::operation_aborted) ec = boost::asio::error::timed_out;
    if (ec) throw std::runtime_error("resp_client: cannot connect: " + ec.message());
  }

  /// Writes `raw` (bounded).
  void send(std::string_view raw, std::chrono::milliseconds limit = std::chrono::seconds(2)) {
    boost::system::error_code ec;
    boost::asio::async_write(socket_, boost::asio::buffer(raw.data(), raw.size()),
                             [&](boost::system::error_code e, std::size_t) { ec = e; });
    run(limit);
    if (ec == boost::asio::error::operation_aborted) ec = boost::asio::error::timed_out;
    if (ec) throw std::runtime_error("resp_client: cannot send: " + ec.message());
  }

  /// The next complete reply, or the error that came first (within `limit`).
  result read_reply(std::chrono::milliseconds limit = std::chrono::seconds(2)) {
    const auto end = clock::now() + limit;
    for (;;) {
      void* r = nullptr;
      if (redisReaderGetReply(reader_.get(), &r) != REDIS_OK)
        return {boost::asio::error::invalid_argument, "bad reply"};
      if (r) {
        std::string text = describe(static_cast<redisReply*>(r));
        freeReplyObject(r);
        return {{}, std::move(text)};
      }
      if (auto ec = read_some(end)) return {ec, {}};
    }
  }

  /// Reads until the peer closes or `limit` passes: the bytes, and how it ended.
  std::string read_until_closed(boost::system::error_code& ec,
                                std::chrono::milliseconds limit = std::chrono::seconds(2)) {
    const auto end = clock::now() + limit;
    const std::size_t from = raw_.size();
    while (!(ec = read_some(end))) {
    }
    return raw_.substr(from);
  }

  /// Reads that returned data so far.
  std::size_t reads() const { return reads_; }
  /// Every byte received so far.
  const std::string& received() const { return raw_; }

 private:
  // Reads once (by `end`) and feeds the reader.
  boost::system::error_code read_some(clock::time_point end) {
    boost::system::error_code ec;
    std::size_t n = 0;
    socket_.async_read_some(boost::asio::buffer(buf_),
                            [&](boost::system::error_code e, std::size_t k) {
                              ec = e;
                              n = k;
                            });
    run(std::chrono::duration_cast<std::chrono::milliseconds>(end - clock::now()));
    if (n > 0) {
      ++reads_;
      raw_.append(buf_.data(), n);
      redisReaderFeed(reader_.get(), buf_.data(), n);
    }
    return ec == boost::asio::error::operation_aborted ? boost::asio::error::timed_out : ec;
  }

  // Runs the one operation in flight until it completes or `limit` passes;
  // then cancels it (it completes with operation_aborted, or with what came
  // meanwhile).
  void run(std::chrono::milliseconds limit) {
    ctx_.restart();
    ctx_.run_for(std::max(limit, std::chrono::milliseconds(0)));
    if (ctx_.stopped()) return;
    socket_.cancel();
    ctx_.restart();
    ctx_.run();
  }

  boost::asio::io_context ctx_;
  boost::asio::ip::tcp::socket socket_;
  std::unique_ptr<redisReader, void (*)(redisReader*)> reader_;
  std::array<char, 65536> buf_;
  std::string raw_;
  std::size_t reads_ = 0;
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_RESP_CLIENT_HPP
