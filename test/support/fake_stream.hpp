//
// test/support/fake_stream.hpp: a next layer under a test's control, for the
// rate-limited stream (test/test_stream.cpp, test/fuzz/fuzz_stream.cpp).
//
#ifndef RATELIMIT_TEST_FAKE_STREAM_HPP
#define RATELIMIT_TEST_FAKE_STREAM_HPP

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/system/error_code.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ratelimit::test {

/// Writes take at most `max_write` bytes, reads hand out `incoming` (at most
/// `max_read` at a time; EOF when it is empty), or both fail with
/// `fail_with`; completions are posted to `ex`. It cannot wait for
/// readability (a rate-limited stream's reads over it pay after reading).
/// Copyable (a moved-from fake keeps its executor, as a moved-from socket does).
struct fake_stream {
  using executor_type = boost::asio::any_io_executor;
  using error_code = boost::system::error_code;
  executor_type ex;
  std::size_t max_write = SIZE_MAX;
  std::size_t max_read = SIZE_MAX;
  std::string written;
  std::string incoming;
  error_code fail_with;
  int writes = 0, reads = 0;
  std::vector<std::size_t> write_sizes;  // each write_some's buffer size

  explicit fake_stream(executor_type e) : ex(std::move(e)) {}
  // Moves copy: declared copies suppress the implicit moves.
  fake_stream(const fake_stream&) = default;
  fake_stream& operator=(const fake_stream&) = default;
  executor_type get_executor() { return ex; }

  template <typename Buffers, typename Token>
  auto async_write_some(const Buffers& b, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, std::size_t)>(
        [this](auto h, const Buffers& b) {
          ++writes;
          write_sizes.push_back(boost::asio::buffer_size(b));
          std::size_t n = 0;
          if (!fail_with) {
            std::string all(boost::asio::buffer_size(b), '\0');
            boost::asio::buffer_copy(boost::asio::buffer(all), b);
            n = std::min(all.size(), max_write);
            written.append(all, 0, n);
          }
          boost::asio::post(ex, [h = std::move(h), e = fail_with, n]() mutable { h(e, n); });
        },
        token, b);
  }

  template <typename Buffers, typename Token>
  auto async_read_some(const Buffers& b, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, std::size_t)>(
        [this](auto h, const Buffers& b) {
          ++reads;
          std::size_t n = 0;
          error_code e = fail_with;
          if (!e && incoming.empty()) e = boost::asio::error::eof;
          if (!e) {
            n = boost::asio::buffer_copy(
                b, boost::asio::buffer(incoming.data(), std::min(incoming.size(), max_read)));
            incoming.erase(0, n);
          }
          boost::asio::post(ex, [h = std::move(h), e, n]() mutable { h(e, n); });
        },
        token, b);
  }
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_FAKE_STREAM_HPP
