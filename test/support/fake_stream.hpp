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
#include <memory>
#include <string>
#include <vector>

namespace ratelimit::test {

/// Writes take at most `max_write` bytes, reads hand out `incoming` (at most
/// `max_read` at a time; EOF when it is empty), or both fail with
/// `fail_with`; completions are posted to `ex`. It cannot wait for
/// readability (a rate-limited stream's reads over it pay after reading).
/// Copyable (a moved-from fake keeps its executor, as a moved-from socket does).
///
/// `effect_in_completion` (off by default): an operation first posts its
/// completion and moves its bytes (copies into `written`, takes from
/// `incoming`) only inside it, as a real socket allocates its operation
/// before it touches any data, so that a std::bad_alloc in the initiation
/// moves nothing (test/test_alloc_failure.cpp). An operation still posted
/// when the fake is destroyed or assigned to then completes with
/// `operation_aborted`, moving nothing, as a destroyed socket's do.
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
  bool effect_in_completion = false;

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
          if (effect_in_completion) {
            written.reserve(written.size() + boost::asio::buffer_size(b));
            boost::asio::post(ex,
                              [h = std::move(h), b, self = this, alive = life_.get()]() mutable {
                                if (alive.expired())
                                  return h(error_code(boost::asio::error::operation_aborted), 0);
                                const error_code e = self->fail_with;
                                const std::size_t n = e ? 0 : self->write(b);
                                h(e, n);
                              });
            return;
          }
          const std::size_t n = fail_with ? 0 : write(b);
          boost::asio::post(ex, [h = std::move(h), e = fail_with, n]() mutable { h(e, n); });
        },
        token, b);
  }

  template <typename Buffers, typename Token>
  auto async_read_some(const Buffers& b, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, std::size_t)>(
        [this](auto h, const Buffers& b) {
          ++reads;
          if (effect_in_completion) {
            boost::asio::post(ex,
                              [h = std::move(h), b, self = this, alive = life_.get()]() mutable {
                                if (alive.expired())
                                  return h(error_code(boost::asio::error::operation_aborted), 0);
                                std::size_t n = 0;
                                const error_code e = self->read(b, n);
                                h(e, n);
                              });
            return;
          }
          std::size_t n = 0;
          const error_code e = read(b, n);
          boost::asio::post(ex, [h = std::move(h), e, n]() mutable { h(e, n); });
        },
        token, b);
  }

 private:
  template <typename Buffers>
  std::size_t write(const Buffers& b) {
    const std::size_t n = std::min(boost::asio::buffer_size(b), max_write);
    const std::size_t old = written.size();
    written.resize(old + n);  // (reserved first in effect_in_completion: allocates nothing)
    boost::asio::buffer_copy(boost::asio::buffer(&written[old], n), b);
    return n;
  }

  template <typename Buffers>
  error_code read(const Buffers& b, std::size_t& n) {
    n = 0;
    error_code e = fail_with;
    if (!e && incoming.empty()) e = boost::asio::error::eof;
    if (!e) {
      n = boost::asio::buffer_copy(
          b, boost::asio::buffer(incoming.data(), std::min(incoming.size(), max_read)));
      incoming.erase(0, n);
    }
    return e;
  }

  /// This fake's life, as its effect_in_completion operations see it (made
  /// by the first of them; not copied: a copy's operations are its own).
  struct life_token {
    std::shared_ptr<int> p;
    life_token() = default;
    life_token(const life_token&) noexcept {}
    life_token& operator=(const life_token&) noexcept {
      p.reset();  // (the operations of what was here end as if destroyed)
      return *this;
    }
    std::weak_ptr<int> get() {
      if (!p) p = std::make_shared<int>(0);
      return p;
    }
  };
  life_token life_;
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_FAKE_STREAM_HPP
