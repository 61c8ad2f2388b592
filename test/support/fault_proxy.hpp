//
// test/support/fault_proxy.hpp: a TCP proxy that injects faults between a client
// and a real server (made for our Redis client in front of redis-server).
//
// The proxy listens on 127.0.0.1, on a port the OS picks, and forwards every
// connection it accepts to one target host:port. It runs on its own
// io_context in its own thread, so a test that polls its own io_context by
// hand is unaffected. Every setter may be called from any thread at any time;
// a fault applies to the bytes the proxy reads from then on (bytes already
// read keep the treatment they had). The destructor closes every socket and
// joins the thread.
//
// Per direction (to_server: the requests, to_client: the replies):
// - set_delay: hold every chunk that long before forwarding it (order kept).
// - set_split: forward byte by byte, one write each, optionally pausing between.
// - drop: swallow the bytes; the connection stays open (a black hole).
// - reset_after: forward n more bytes, then reset both sides (RST).
// For the whole proxy:
// - set_accept_and_close: accept and close at once, optionally after a string.
// - reset_all: reset every connection now.
// - inject_reply / replace_every_reply / set_reply_filter: send other bytes
//   instead of the server's next (or every) complete reply. Replies are found
//   by framing the server's stream as RESP2 (resp_framer).
// Counters: connections accepted (one per connect attempt), connections open,
// bytes forwarded and dropped each way, replies replaced.
//
// An end of stream (FIN) is forwarded in order after the bytes before it,
// even while dropping; a reset or error on one side resets the other.
//
#ifndef RATELIMIT_TEST_FAULT_PROXY_HPP
#define RATELIMIT_TEST_FAULT_PROXY_HPP

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace ratelimit::test {

/// Which way bytes flow through a proxy.
enum class direction {
  to_server,  ///< client to server: the requests
  to_client,  ///< server to client: the replies
};

/// Finds where replies end in a RESP2 byte stream fed in pieces of any size.
///
/// Knows simple strings (+), errors (-), integers (:), bulk strings ($, with
/// $-1 for nil) and arrays (*, nested, with *-1 for nil). Anything else, or a
/// line longer than max_line, makes it failed(): the stream cannot be framed
/// any more.
class resp_framer {
 public:
  static constexpr std::size_t max_line = 1 << 20;
  static constexpr long long max_length = 1LL << 32;

  struct step {
    std::size_t used;  ///< bytes of the input consumed
    bool reply_ended;  ///< the last of them ended a reply
  };

  /// Consumes `data` up to the end of the current reply, or all of it.
  step feed(std::string_view data) {
    std::size_t i = 0;
    while (i < data.size() && !failed_) {
      in_reply_ = true;
      if (bulk_left_ > 0) {
        const auto k = static_cast<std::size_t>(
            std::min<long long>(bulk_left_, static_cast<long long>(data.size() - i)));
        i += k;
        bulk_left_ -= static_cast<long long>(k);
        if (bulk_left_ == 0 && element_done()) return {i, true};
        continue;
      }
      const char c = data[i++];
      if (c != '\n') {
        line_.push_back(c);
        if (line_.size() > max_line) failed_ = true;
        continue;
      }
      if (line_done()) return {i, true};
    }
    return {failed_ ? data.size() : i, false};
  }

  /// True between replies: the next byte starts one.
  bool at_boundary() const { return !in_reply_; }
  bool failed() const { return failed_; }

 private:
  // A header line ended (line_ holds it with its '\r'); true if that ended a reply.
  bool line_done() {
    if (line_.size() < 2 || line_.back() != '\r') return fail();
    const char type = line_.front();
    const std::string_view rest(line_.data() + 1, line_.size() - 2);
    bool ended = false;
    if (type == '+' || type == '-' || type == ':') {
      ended = element_done();
    } else if (type == '$' || type == '*') {
      long long n = 0;
      const auto [end, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), n);
      if (ec != std::errc() || end != rest.data() + rest.size() || n > max_length) return fail();
      if (type == '$' && n >= 0) {
        bulk_left_ = n + 2;  // the body and its CRLF
      } else if (type == '*' && n > 0) {
        open_.push_back(n);
      } else {
        ended = element_done();  // nil, or an empty array
      }
    } else {
      return fail();
    }
    line_.clear();
    return ended;
  }

  // One element is complete; true if that completes the whole reply.
  bool element_done() {
    while (!open_.empty()) {
      if (--open_.back() > 0) return false;
      open_.pop_back();
    }
    in_reply_ = false;
    return true;
  }

  bool fail() {
    failed_ = true;
    return false;
  }

  std::string line_;             // the header line read so far
  long long bulk_left_ = 0;      // bytes of a bulk body (and CRLF) still to come
  std::vector<long long> open_;  // elements still to come in each open array
  bool in_reply_ = false;
  bool failed_ = false;
};

/// A TCP proxy on 127.0.0.1 that forwards to one target and injects faults.
class fault_proxy {
 public:
  using clock = std::chrono::steady_clock;
  /// Runs on the proxy's thread with each complete server reply (raw RESP);
  /// returns what the client gets instead, or nullopt to forward the reply.
  /// Must not call the proxy (nor throw: the reply is then forwarded).
  using reply_filter = std::function<std::optional<std::string>(std::string_view reply)>;

  /// Starts listening and forwarding to `target_host`:`target_port` (resolved once, here).
  fault_proxy(const std::string& target_host, std::uint16_t target_port)
      : core_(std::make_shared<core>()), acceptor_(ctx_), retry_(ctx_) {
    namespace ip = boost::asio::ip;
    ip::tcp::resolver resolver(ctx_);
    for (const auto& entry : resolver.resolve(target_host, std::to_string(target_port)))
      target_.push_back(entry.endpoint());
    const ip::tcp::endpoint listen(ip::make_address("127.0.0.1"), 0);
    acceptor_.open(listen.protocol());
    acceptor_.set_option(ip::tcp::acceptor::reuse_address(true));
    acceptor_.bind(listen);
    acceptor_.listen();
    port_ = acceptor_.local_endpoint().port();
    accept();
    thread_ = std::thread([this] { ctx_.run(); });
  }
  explicit fault_proxy(std::uint16_t target_port) : fault_proxy("127.0.0.1", target_port) {}

  ~fault_proxy() {
    boost::asio::post(ctx_, [this] {
      boost::system::error_code ignored;
      acceptor_.close(ignored);
      retry_.cancel();
      for (const auto& s : core_->live())
        s->close(false);
      ctx_.stop();  // what is still queued is destroyed with ctx_
    });
    thread_.join();
  }

  fault_proxy(const fault_proxy&) = delete;
  fault_proxy& operator=(const fault_proxy&) = delete;

  /// Where clients connect (on 127.0.0.1).
  std::uint16_t port() const { return port_; }

  // --- faults ---------------------------------------------------------------

  /// Holds every chunk read from now on for `delay` before forwarding it.
  void set_delay(direction d, std::chrono::microseconds delay) {
    std::lock_guard lock(core_->m);
    core_->dirs[at(d)].delay = delay;
  }

  /// Forwards the bytes read from now on one write per byte, waiting `pause` between.
  void set_split(direction d, bool on, std::chrono::microseconds pause = {}) {
    std::lock_guard lock(core_->m);
    core_->dirs[at(d)].split = on;
    core_->dirs[at(d)].pause = pause;
  }

  /// Swallows the bytes read from now on (until turned off); connections stay open.
  void drop(direction d, bool on) {
    std::lock_guard lock(core_->m);
    core_->dirs[at(d)].drop = on;
  }

  /// After `n` more bytes are forwarded that way (on any connection), resets
  /// both sides of the connection that forwarded the last of them. With n = 0
  /// the next connection about to forward a byte that way is reset instead.
  /// Fires once; a new call replaces the count.
  void reset_after(direction d, std::size_t n) {
    std::lock_guard lock(core_->m);
    core_->dirs[at(d)].reset_budget = n;
  }
  void cancel_reset_after(direction d) {
    std::lock_guard lock(core_->m);
    core_->dirs[at(d)].reset_budget.reset();
  }

  /// While on, accepts new connections, writes `greeting` (if any), then closes
  /// them (FIN; a client that wrote meanwhile still sees the greeting then EOF).
  void set_accept_and_close(bool on, std::string greeting = {}) {
    std::lock_guard lock(core_->m);
    core_->accept_and_close = on;
    core_->greeting = std::move(greeting);
  }

  /// Resets (RST) both sides of every connection open now; returns when done.
  void reset_all() {
    on_proxy_thread([this] {
      for (const auto& s : core_->live())
        s->close(true);
    });
  }

  /// Replaces the next server reply to start (on any connection) with `raw`,
  /// sent when the real reply is complete; the real one is swallowed. Calls
  /// queue up: each replaces one more reply.
  void inject_reply(std::string raw) {
    std::lock_guard lock(core_->m);
    core_->injections.push_back(std::move(raw));
  }

  /// Replaces every server reply with `raw` until stop_replacing().
  void replace_every_reply(std::string raw) {
    std::lock_guard lock(core_->m);
    core_->replace_all = std::move(raw);
  }

  /// Shows every reply to `filter` (after pending injections and
  /// replace_every_reply) until stop_replacing(). Replies are held until complete.
  void set_reply_filter(reply_filter filter) {
    std::lock_guard lock(core_->m);
    core_->filter = std::make_shared<const reply_filter>(std::move(filter));
  }

  /// Drops pending injections, replace_every_reply and the filter. (A reply
  /// being replaced already is still replaced.)
  void stop_replacing() {
    std::lock_guard lock(core_->m);
    core_->injections.clear();
    core_->replace_all.reset();
    core_->filter.reset();
  }

  /// Injections not used yet.
  std::size_t pending_injections() const {
    std::lock_guard lock(core_->m);
    return core_->injections.size();
  }

  /// Every fault off: plain forwarding from now on.
  void clear_faults() {
    std::lock_guard lock(core_->m);
    core_->dirs[0] = core_->dirs[1] = {};
    core_->accept_and_close = false;
    core_->greeting.clear();
    core_->injections.clear();
    core_->replace_all.reset();
    core_->filter.reset();
  }

  // --- counters -------------------------------------------------------------

  /// Connections accepted so far (each connect attempt of a client is one).
  std::uint64_t accepted() const { return core_->accepted; }
  /// Connections accepted and not closed yet.
  std::uint64_t open_connections() const { return core_->open; }
  /// Bytes forwarded that way (counted as each write starts, so a client
  /// that has read them sees them counted).
  std::uint64_t bytes_forwarded(direction d) const { return core_->forwarded[at(d)]; }
  /// Bytes swallowed by drop() that way.
  std::uint64_t bytes_dropped(direction d) const { return core_->dropped[at(d)]; }
  /// Server replies replaced (by injections, replace_every_reply or the filter).
  std::uint64_t replies_replaced() const { return core_->replaced; }

 private:
  using tcp = boost::asio::ip::tcp;
  class session;

  static constexpr int at(direction d) { return d == direction::to_server ? 0 : 1; }

  struct dir_faults {
    std::chrono::microseconds delay{0};
    bool split = false;
    std::chrono::microseconds pause{0};
    bool drop = false;
    std::optional<std::size_t> reset_budget;
  };

  // Shared by the setters, the proxy's thread and the sessions (which may
  // outlive the proxy object inside the io_context's queue).
  struct core {
    mutable std::mutex m;  // guards the faults
    dir_faults dirs[2];
    bool accept_and_close = false;
    std::string greeting;
    std::deque<std::string> injections;
    std::optional<std::string> replace_all;
    std::shared_ptr<const reply_filter> filter;

    std::atomic<std::uint64_t> accepted{0}, open{0}, replaced{0};
    std::atomic<std::uint64_t> forwarded[2]{}, dropped[2]{};

    // The proxy's thread only.
    std::map<std::uint64_t, std::weak_ptr<session>> sessions;
    std::uint64_t next_id = 0;

    std::vector<std::shared_ptr<session>> live() const {
      std::vector<std::shared_ptr<session>> out;
      for (const auto& [id, w] : sessions)
        if (auto s = w.lock()) out.push_back(std::move(s));
      return out;
    }
  };

  // Bytes waiting to be written, or the end of the stream.
  struct chunk {
    clock::time_point due;
    std::string bytes;
    std::size_t written = 0;
    bool split = false;
    std::chrono::microseconds pause{0};
    bool eof = false;
  };

  // One direction of one connection.
  struct pipe {
    enum class reply_mode { pass, replace, hold };

    pipe(direction d, tcp::socket& f, tcp::socket& t, boost::asio::io_context& ctx)
        : dir(d), from(f), to(t), timer(ctx) {}

    direction dir;
    tcp::socket& from;
    tcp::socket& to;
    boost::asio::steady_timer timer;
    std::array<char, 16384> buf;
    std::deque<chunk> queue;
    bool busy = false;   // a write or a wait is in flight
    bool ended = false;  // the end of stream was forwarded
    // Replies (to_client only).
    resp_framer framer;
    reply_mode mode = reply_mode::pass;
    std::string replacement;  // what replaces the current reply
    std::string held;         // the current reply, while the filter decides
    std::shared_ptr<const reply_filter> filter;
  };

  class session : public std::enable_shared_from_this<session> {
   public:
    session(boost::asio::io_context& ctx, std::shared_ptr<core> c, tcp::socket client,
            std::uint64_t id)
        : core_(std::move(c)),
          id_(id),
          client_(std::move(client)),
          server_(ctx),
          up_(direction::to_server, client_, server_, ctx),
          down_(direction::to_client, server_, client_, ctx) {}

    void start(const std::vector<tcp::endpoint>& target) {
      boost::asio::async_connect(
          server_, target,
          [self = shared_from_this()](boost::system::error_code ec, const tcp::endpoint&) {
            if (self->closed_) return;
            if (ec) return self->close(false);
            boost::system::error_code ignored;
            self->client_.set_option(tcp::no_delay(true), ignored);
            self->server_.set_option(tcp::no_delay(true), ignored);
            self->read(self->up_);
            self->read(self->down_);
          });
    }

    // Writes `greeting`, sends FIN, then discards what the client sends until
    // it closes (at most 1 s), so that it sees the greeting and EOF, not RST.
    void refuse(std::string greeting) {
      greeting_ = std::move(greeting);
      boost::asio::async_write(
          client_, boost::asio::buffer(greeting_),
          [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
            if (self->closed_) return;
            if (ec) return self->close(true);
            boost::system::error_code ignored;
            self->client_.shutdown(tcp::socket::shutdown_send, ignored);
            self->up_.timer.expires_after(std::chrono::seconds(1));
            self->up_.timer.async_wait([self](boost::system::error_code) { self->close(false); });
            self->discard();
          });
    }

    /// Closes both sides: RST if `reset`, else a plain close. Idempotent.
    void close(bool reset) {
      if (closed_) return;
      closed_ = true;
      boost::system::error_code ignored;
      for (tcp::socket* s : {&client_, &server_}) {
        if (!s->is_open()) continue;
        if (reset) s->set_option(tcp::socket::linger(true, 0), ignored);
        s->close(ignored);
      }
      up_.timer.cancel();
      down_.timer.cancel();
      core_->sessions.erase(id_);
      --core_->open;
    }

   private:
    void discard() {
      client_.async_read_some(
          boost::asio::buffer(up_.buf),
          [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
            if (self->closed_) return;
            if (ec) return self->close(false);
            self->discard();
          });
    }

    void read(pipe& p) {
      p.from.async_read_some(
          boost::asio::buffer(p.buf),
          [self = shared_from_this(), &p](boost::system::error_code ec, std::size_t n) {
            self->on_read(p, ec, n);
          });
    }

    void on_read(pipe& p, boost::system::error_code ec, std::size_t n) {
      if (closed_) return;
      dir_faults f;
      {
        std::lock_guard lock(core_->m);
        f = core_->dirs[at(p.dir)];
      }
      if (ec == boost::asio::error::eof) {
        p.queue.push_back(chunk{clock::now() + f.delay, {}, 0, false, {}, true});
        return pump(p);
      }
      if (ec) return close(true);
      const std::string_view data(p.buf.data(), n);
      std::string out =
          p.dir == direction::to_client ? replies(p, data, !f.drop) : std::string(data);
      if (f.drop) {
        core_->dropped[at(p.dir)] += n;
      } else if (!out.empty()) {
        p.queue.push_back(
            chunk{clock::now() + f.delay, std::move(out), 0, f.split, f.pause, false});
        pump(p);
      }
      read(p);
    }

    // Passes `data` through the reply framing: what is to be forwarded.
    std::string replies(pipe& p, std::string_view data, bool may_replace) {
      using mode = pipe::reply_mode;
      std::string out;
      while (!data.empty() && !p.framer.failed()) {
        if (p.framer.at_boundary()) start_reply(p, may_replace);
        const auto [used, ended] = p.framer.feed(data);
        if (p.mode == mode::pass) out.append(data.substr(0, used));
        if (p.mode == mode::hold) p.held.append(data.substr(0, used));
        data.remove_prefix(used);
        if (ended) end_reply(p, out);
      }
      if (p.framer.failed()) {  // not RESP: forward as it is from now on
        if (p.mode == mode::hold) out.append(std::exchange(p.held, {}));
        p.mode = mode::pass;
        out.append(data);
      }
      return out;
    }

    void start_reply(pipe& p, bool may_replace) {
      using mode = pipe::reply_mode;
      p.mode = mode::pass;
      if (!may_replace) return;
      std::lock_guard lock(core_->m);
      if (!core_->injections.empty()) {
        p.replacement = std::move(core_->injections.front());
        core_->injections.pop_front();
        p.mode = mode::replace;
      } else if (core_->replace_all) {
        p.replacement = *core_->replace_all;
        p.mode = mode::replace;
      } else if (core_->filter) {
        p.filter = core_->filter;
        p.mode = mode::hold;
      }
    }

    void end_reply(pipe& p, std::string& out) {
      using mode = pipe::reply_mode;
      if (p.mode == mode::replace) {
        out.append(std::exchange(p.replacement, {}));
        ++core_->replaced;
      } else if (p.mode == mode::hold) {
        std::optional<std::string> instead;
        try {
          instead = (*p.filter)(p.held);
        } catch (const std::exception&) {  // a broken filter forwards the reply
        }
        if (instead) ++core_->replaced;
        out.append(instead ? *instead : p.held);
        p.held.clear();
        p.filter.reset();
      }
      p.mode = mode::pass;
    }

    // Writes the queue's front when due; one write or wait in flight per pipe.
    void pump(pipe& p) {
      if (closed_ || p.busy || p.queue.empty()) return;
      chunk& c = p.queue.front();
      if (c.eof) {
        p.queue.pop_front();
        boost::system::error_code ignored;
        p.to.shutdown(tcp::socket::shutdown_send, ignored);
        p.ended = true;
        if (up_.ended && down_.ended) close(false);
        return;
      }
      if (clock::now() < c.due) return wait(p, c.due);
      std::size_t k = c.split ? 1 : c.bytes.size() - c.written;
      bool reset_now = false, reset_then = false;
      {
        std::lock_guard lock(core_->m);
        auto& budget = core_->dirs[at(p.dir)].reset_budget;
        if (budget && *budget == 0) {
          reset_now = true;
          budget.reset();
        } else if (budget) {
          k = std::min(k, *budget);
          *budget -= k;
          if (*budget == 0) {
            reset_then = true;
            budget.reset();
          }
        }
      }
      if (reset_now) return close(true);
      core_->forwarded[at(p.dir)] += k;  // before the client can see them
      p.busy = true;
      boost::asio::async_write(
          p.to, boost::asio::buffer(c.bytes.data() + c.written, k),
          [self = shared_from_this(), &p, reset_then](boost::system::error_code ec, std::size_t n) {
            p.busy = false;
            if (self->closed_) return;
            if (ec) return self->close(true);
            chunk& c = p.queue.front();
            c.written += n;
            const bool pause = c.split && c.pause.count() > 0;
            const auto until = clock::now() + c.pause;
            if (c.written == c.bytes.size()) p.queue.pop_front();
            if (reset_then) return self->close(true);
            if (pause && !p.queue.empty()) return self->wait(p, until);
            self->pump(p);
          });
    }

    void wait(pipe& p, clock::time_point until) {
      p.busy = true;
      p.timer.expires_at(until);
      p.timer.async_wait([self = shared_from_this(), &p](boost::system::error_code) {
        p.busy = false;
        self->pump(p);
      });
    }

    std::shared_ptr<core> core_;
    std::uint64_t id_;
    tcp::socket client_;
    tcp::socket server_;
    pipe up_;    // client -> server
    pipe down_;  // server -> client
    std::string greeting_;
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
      on_accept(std::move(s));
      accept();
    });
  }

  void on_accept(tcp::socket s) {
    bool refuse = false;
    std::string greeting;
    {
      std::lock_guard lock(core_->m);
      refuse = core_->accept_and_close;
      greeting = core_->greeting;
    }
    const auto id = core_->next_id++;
    auto sn = std::make_shared<session>(ctx_, core_, std::move(s), id);
    core_->sessions.emplace(id, sn);
    ++core_->open;
    ++core_->accepted;
    if (refuse) {
      sn->refuse(std::move(greeting));
    } else {
      sn->start(target_);
    }
  }

  // Runs `f` on the proxy's thread and waits for it (at most 5 s).
  template <typename F>
  void on_proxy_thread(F f) {
    if (ctx_.get_executor().running_in_this_thread()) return f();
    auto done = std::make_shared<std::promise<void>>();
    auto finished = done->get_future();
    boost::asio::post(ctx_, [f = std::move(f), done] {
      f();
      done->set_value();
    });
    if (finished.wait_for(std::chrono::seconds(5)) != std::future_status::ready)
      throw std::runtime_error("fault_proxy: the proxy's thread did not answer within 5 s");
  }

  boost::asio::io_context ctx_{1};
  std::shared_ptr<core> core_;
  std::vector<tcp::endpoint> target_;
  tcp::acceptor acceptor_;
  boost::asio::steady_timer retry_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_FAULT_PROXY_HPP
