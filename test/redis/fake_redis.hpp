//
// test/redis/fake_redis.hpp: a minimal fake Redis server whose answers the test chooses.
//
// It listens on 127.0.0.1, on a port the OS picks, runs on its own io_context
// in its own thread, reads RESP2 requests (arrays of bulk strings as hiredis
// sends them, pipelined; inline commands too) and answers each command with
// what the test's handler returns: raw RESP bytes (build them with the resp::
// helpers), "" for no bytes for this command, or one of the special values
// close_connection(), reset_connection(), never_answer(). The handler runs on
// the fake's thread, one command at a time, in the order they arrive; what it
// shares with the test needs atomics or a lock (Boost.Test assertions belong in
// the test's thread); an exception it throws becomes an error reply. The
// destructor closes every socket and joins the thread.
//
#ifndef RATELIMIT_TEST_FAKE_REDIS_HPP
#define RATELIMIT_TEST_FAKE_REDIS_HPP

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace ratelimit::test {

/// Raw RESP2 replies, for fake_redis handlers and fault_proxy injections.
namespace resp {
inline std::string status(std::string_view s) {
  return "+" + std::string(s) + "\r\n";
}
inline std::string error(std::string_view s) {
  return "-" + std::string(s) + "\r\n";
}
inline std::string integer(long long n) {
  return ":" + std::to_string(n) + "\r\n";
}
inline std::string bulk(std::string_view s) {
  return "$" + std::to_string(s.size()) + "\r\n" + std::string(s) + "\r\n";
}
inline std::string nil() {
  return "$-1\r\n";
}
inline std::string nil_array() {
  return "*-1\r\n";
}
/// An array of replies, each already RESP (nest arrays by nesting calls).
inline std::string array(const std::vector<std::string>& elements) {
  std::string out = "*" + std::to_string(elements.size()) + "\r\n";
  for (const auto& e : elements)
    out += e;
  return out;
}
inline std::string integers(std::initializer_list<long long> values) {
  std::vector<std::string> elements;
  for (long long v : values)
    elements.push_back(integer(v));
  return array(elements);
}
/// A command as a client sends it: an array of bulk strings.
inline std::string command(const std::vector<std::string>& args) {
  std::vector<std::string> elements;
  for (const auto& a : args)
    elements.push_back(bulk(a));
  return array(elements);
}
}  // namespace resp

class fake_redis {
 public:
  using command = std::vector<std::string>;
  using handler = std::function<std::string(const command& cmd)>;

  /// Handler results with a special meaning (no RESP reply starts with '\0').
  /// Closes the connection (FIN) after the replies before this one.
  static std::string close_connection() { return std::string("\0close", 6); }
  /// Resets the connection (RST) after the replies before this one.
  static std::string reset_connection() { return std::string("\0reset", 6); }
  /// Answers nothing more on this connection, which stays open and reads on
  /// (a stuck server; later commands are still counted and logged, not
  /// handled). The replies before this one are still sent.
  static std::string never_answer() { return std::string("\0never", 6); }

  /// PING -> PONG, ECHO x -> x, AUTH and SELECT -> OK, anything else an error.
  static std::string default_answer(const command& cmd) {
    std::string name = cmd.empty() ? "" : cmd[0];
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    if (name == "PING") return cmd.size() > 1 ? resp::bulk(cmd[1]) : resp::status("PONG");
    if (name == "ECHO" && cmd.size() == 2) return resp::bulk(cmd[1]);
    if (name == "AUTH" || name == "SELECT") return resp::status("OK");
    return resp::error("ERR unknown command '" + (cmd.empty() ? "" : cmd[0]) + "'");
  }

  explicit fake_redis(handler h = default_answer)
      : core_(std::make_shared<core>()), acceptor_(ctx_), retry_(ctx_) {
    core_->answer = std::make_shared<const handler>(std::move(h));
    namespace ip = boost::asio::ip;
    const ip::tcp::endpoint listen(ip::make_address("127.0.0.1"), 0);
    acceptor_.open(listen.protocol());
    acceptor_.set_option(ip::tcp::acceptor::reuse_address(true));
    acceptor_.bind(listen);
    acceptor_.listen();
    port_ = acceptor_.local_endpoint().port();
    accept();
    thread_ = std::thread([this] { ctx_.run(); });
  }

  ~fake_redis() {
    boost::asio::post(ctx_, [this] {
      boost::system::error_code ignored;
      acceptor_.close(ignored);
      retry_.cancel();
      for (const auto& [id, w] : std::map(core_->sessions))
        if (auto s = w.lock()) s->close(false);
      ctx_.stop();  // what is still queued is destroyed with ctx_
    });
    thread_.join();
  }

  fake_redis(const fake_redis&) = delete;
  fake_redis& operator=(const fake_redis&) = delete;

  std::uint16_t port() const { return port_; }

  /// Replaces the handler, for the commands parsed from now on.
  void set_handler(handler h) {
    auto p = std::make_shared<const handler>(std::move(h));
    std::lock_guard lock(core_->m);
    core_->answer = std::move(p);
  }

  /// Connections accepted so far.
  std::uint64_t accepted() const { return core_->accepted; }
  /// Connections accepted and not closed yet.
  std::uint64_t open_connections() const { return core_->open; }
  /// Commands received so far (on every connection).
  std::uint64_t commands() const { return core_->commands; }
  /// Every command received so far, in order.
  std::vector<command> received() const {
    std::lock_guard lock(core_->m);
    return core_->log;
  }

 private:
  using tcp = boost::asio::ip::tcp;
  class session;

  struct core {
    mutable std::mutex m;  // guards answer and log
    std::shared_ptr<const handler> answer;
    std::vector<command> log;
    std::atomic<std::uint64_t> accepted{0}, open{0}, commands{0};
    // The fake's thread only.
    std::map<std::uint64_t, std::weak_ptr<session>> sessions;
    std::uint64_t next_id = 0;
  };

  enum class parsed { command, need_more, bad };

  static constexpr std::size_t max_inline = 64 * 1024;
  static constexpr long long max_bulk = 64LL * 1024 * 1024;
  static constexpr long long max_args = 1024 * 1024;

  // The line starting at `pos`, without its "\r\n"; advances `pos` past it.
  static parsed line(const std::string& in, std::size_t& pos, std::string_view& out) {
    const auto end = in.find("\r\n", pos);
    if (end == std::string::npos)
      return in.size() - pos > max_inline ? parsed::bad : parsed::need_more;
    out = std::string_view(in).substr(pos, end - pos);
    pos = end + 2;
    return parsed::command;
  }

  // `<type><number>`, e.g. "*3" or "$5".
  static bool number(std::string_view l, char type, long long& n) {
    if (l.empty() || l[0] != type) return false;
    const auto [end, ec] = std::from_chars(l.data() + 1, l.data() + l.size(), n);
    return ec == std::errc() && end == l.data() + l.size();
  }

  /// Parses one command at `pos`; advances `pos` past it when complete. An
  /// empty array or blank inline line gives an empty command.
  static parsed parse(const std::string& in, std::size_t& pos, command& cmd) {
    cmd.clear();
    std::size_t p = pos;
    if (p >= in.size()) return parsed::need_more;
    if (in[p] != '*') {  // inline: words separated by blanks, up to "\n"
      const auto nl = in.find('\n', p);
      if (nl == std::string::npos)
        return in.size() - p > max_inline ? parsed::bad : parsed::need_more;
      std::string_view l = std::string_view(in).substr(p, nl - p);
      if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
      std::size_t i = 0;
      while (i < l.size()) {
        if (l[i] == ' ' || l[i] == '\t') {
          ++i;
          continue;
        }
        const auto j = std::min(l.find_first_of(" \t", i), l.size());
        cmd.emplace_back(l.substr(i, j - i));
        i = j;
      }
      pos = nl + 1;
      return parsed::command;
    }
    std::string_view l;
    long long n = 0;
    if (auto r = line(in, p, l); r != parsed::command) return r;
    if (!number(l, '*', n) || n > max_args) return parsed::bad;
    for (long long k = 0; k < n; ++k) {
      if (auto r = line(in, p, l); r != parsed::command) return r;
      long long len = 0;
      if (!number(l, '$', len) || len < 0 || len > max_bulk) return parsed::bad;
      const auto size = static_cast<std::size_t>(len);
      if (in.size() - p < size + 2) return parsed::need_more;
      if (in.compare(p + size, 2, "\r\n") != 0) return parsed::bad;
      cmd.emplace_back(in, p, size);
      p += size + 2;
    }
    pos = p;
    return parsed::command;
  }

  class session : public std::enable_shared_from_this<session> {
   public:
    session(std::shared_ptr<core> c, tcp::socket s, std::uint64_t id)
        : core_(std::move(c)), id_(id), socket_(std::move(s)), timer_(socket_.get_executor()) {}

    void start() {
      boost::system::error_code ignored;
      socket_.set_option(tcp::no_delay(true), ignored);
      read();
    }

    /// Closes the socket: RST if `reset`, else a plain close. Idempotent.
    void close(bool reset) {
      if (closed_) return;
      closed_ = true;
      boost::system::error_code ignored;
      if (reset) socket_.set_option(tcp::socket::linger(true, 0), ignored);
      socket_.close(ignored);
      timer_.cancel();
      core_->sessions.erase(id_);
      --core_->open;
    }

   private:
    enum class then { read, close, reset };

    void read() {
      socket_.async_read_some(
          boost::asio::buffer(buf_),
          [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
            if (self->closed_) return;
            if (ec) return self->close(ec != boost::asio::error::eof);
            self->in_.append(self->buf_.data(), n);
            self->answer();
          });
    }

    // Answers every complete command in in_, then writes the answers.
    void answer() {
      out_.clear();
      then next = then::read;
      std::size_t pos = 0;
      command cmd;
      while (next == then::read) {
        const parsed r = parse(in_, pos, cmd);
        if (r == parsed::need_more) break;
        if (r == parsed::bad) {
          out_ += resp::error("ERR Protocol error");
          next = then::close;
          break;
        }
        if (cmd.empty()) continue;
        std::shared_ptr<const handler> h;
        {
          std::lock_guard lock(core_->m);
          core_->log.push_back(cmd);
          h = core_->answer;
        }
        ++core_->commands;
        if (mute_) continue;
        std::string a;
        try {
          a = (*h)(cmd);
        } catch (const std::exception& e) {  // the test sees an error reply, not a crash
          a = resp::error(std::string("ERR fake_redis handler threw: ") + e.what());
        }
        if (a == close_connection()) {
          next = then::close;
        } else if (a == reset_connection()) {
          next = then::reset;
        } else if (a == never_answer()) {
          mute_ = true;
        } else {
          out_ += a;
        }
      }
      in_.erase(0, pos);
      boost::asio::async_write(
          socket_, boost::asio::buffer(out_),
          [self = shared_from_this(), next](boost::system::error_code ec, std::size_t) {
            if (self->closed_) return;
            if (ec || next == then::reset) return self->close(true);
            if (next == then::close) return self->finish();
            self->read();
          });
    }

    // Sends FIN, then discards what the client sends until it closes (at most
    // 1 s), so that it sees the replies and EOF, not RST.
    void finish() {
      boost::system::error_code ignored;
      socket_.shutdown(tcp::socket::shutdown_send, ignored);
      timer_.expires_after(std::chrono::seconds(1));
      timer_.async_wait(
          [self = shared_from_this()](boost::system::error_code) { self->close(false); });
      discard();
    }

    void discard() {
      socket_.async_read_some(
          boost::asio::buffer(buf_),
          [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
            if (self->closed_) return;
            if (ec) return self->close(false);
            self->discard();
          });
    }

    std::shared_ptr<core> core_;
    std::uint64_t id_;
    tcp::socket socket_;
    boost::asio::steady_timer timer_;
    std::array<char, 16384> buf_;
    std::string in_;   // read, not parsed yet
    std::string out_;  // being written
    bool mute_ = false;
    bool closed_ = false;
  };

  void accept() {
    acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket s) {
      if (!acceptor_.is_open()) return;
      if (ec) {  // e.g. out of descriptors: try again a little later
        retry_.expires_after(std::chrono::milliseconds(10));
        retry_.async_wait([this](boost::system::error_code e) {
          if (!e) accept();
        });
        return;
      }
      const auto id = core_->next_id++;
      auto sn = std::make_shared<session>(core_, std::move(s), id);
      core_->sessions.emplace(id, sn);
      ++core_->open;
      ++core_->accepted;
      sn->start();
      accept();
    });
  }

  boost::asio::io_context ctx_{1};
  std::shared_ptr<core> core_;
  tcp::acceptor acceptor_;
  boost::asio::steady_timer retry_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_FAKE_REDIS_HPP
