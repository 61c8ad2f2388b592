// A rate-limited TCP echo server on C++20 coroutines.
//
// Three limits, where a real server needs them:
//   - new connections per second (one bucket in front of accept),
//   - lines per second per client address (ratelimit::keyed_limiter; one
//     address, --trusted, may have its own quota: set_quota),
//   - lines per second for the whole server (one global bucket).
// Each line takes a token of its client and one of the server as one joint
// request (ratelimit::async_acquire over two ratelimit::part): nothing is
// spent on either limit until both can give. A client over a limit waits (its
// lines are echoed, byte for byte, at the limited rate), or with
// --on-limit=reject gets "error: rate limit exceeded, retry in 0.42 s" (when
// a line would pass both) for each line over the limit.
//
//   echo_server --port 5555 --msg-rate 2 --burst 5
//   nc 127.0.0.1 5555
//
// Optionally, bytes too (--byte-rate per client, --global-byte-rate for the
// whole server, each way): each client's socket is then wrapped in a
// ratelimit::rate_limited_stream whose reads and writes take one token a byte
// from the client's bucket and the server's as one joint request.
//
//   echo_server --port 5555 --byte-rate 100000 --global-byte-rate 1000000
//
// Bad clients are handled one by one without harm to the others: a line longer
// than --max-line, a client that stops reading (--write-timeout), abrupt
// resets, half-closed sockets, more clients than --max-clients. SIGINT or
// SIGTERM stops accepting, completes pending waits with an error, gives
// in-flight echoes --shutdown-timeout seconds, and exits 0.
#include <ratelimit.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/stream.hpp>

#include "cli.hpp"

#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

namespace asio = boost::asio;
using asio::ip::tcp;
using namespace asio::experimental::awaitable_operators;
using namespace std::chrono_literals;

namespace {

constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);

struct config {
  std::string bind = "0.0.0.0";
  std::uint16_t port = 5555;
  std::uint64_t conn_rate = 10;    // new connections per second (burst: one second's worth)
  std::uint64_t msg_rate = 2;      // lines per second per client address
  std::uint64_t burst = 5;         // per-client bucket capacity
  std::uint64_t global_rate = 50;  // lines per second for the whole server (burst: one second)
  std::string trusted;             // a client address with its own quota (none when empty)
  std::uint64_t trusted_rate = 20;
  std::uint64_t trusted_burst = 50;
  bool reject = false;  // --on-limit=reject
  std::size_t max_line = 4096;
  std::size_t max_clients = 10000;
  std::size_t max_keys = 100000;
  double write_timeout = 10;
  double shutdown_timeout = 3;
  // Bytes per second each way (reads from a client, writes to it); 0: unlimited.
  std::uint64_t byte_rate = 0;         // per client connection
  std::uint64_t global_byte_rate = 0;  // all clients together
};

using limited_socket = ratelimit::rate_limited_stream<tcp::socket>;

/// The capacity of the byte buckets: one slice of a rate_limited_stream (the
/// most an operation waits for at once), so that a client's burst is one slice.
constexpr std::uint64_t byte_burst = limited_socket::default_slice;

/// The socket under a stream (the stream itself when it is one).
tcp::socket& socket_of(tcp::socket& s) { return s; }
tcp::socket& socket_of(limited_socket& s) { return s.next_layer(); }

/// ", retry in 0.42 s": the wait rounded up to 10 ms (a line sent then
/// passes, if nothing else is asked meanwhile); nothing when there is none.
inline std::string retry_in(const std::optional<std::chrono::nanoseconds>& wait) {
  if (!wait) return "";
  const long long cs = (wait->count() + 9'999'999) / 10'000'000;  // centiseconds, rounded up
  char buf[64];
  std::snprintf(buf, sizeof buf, ", retry in %lld.%02lld s", cs / 100, cs % 100);
  return buf;
}

/// One log line on stdout: "HH:MM:SS.mmm message".
template <typename... Args>
void log(const Args&... args) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  localtime_r(&t, &tm);
  std::ostringstream os;
  os << std::put_time(&tm, "%H:%M:%S") << '.' << std::setfill('0') << std::setw(3) << ms << ' ';
  (os << ... << args);
  os << '\n';
  std::cout << os.str() << std::flush;
}

std::chrono::steady_clock::duration seconds_of(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(s));
}

class server {
 public:
  server(asio::io_context& ctx, const config& cfg)
      : ctx_(ctx),
        cfg_(cfg),
        acceptor_(ctx, tcp::endpoint(asio::ip::make_address(cfg.bind), cfg.port)),
        connections_(ctx, cfg.conn_rate, ratelimit::per_second(cfg.conn_rate)),
        global_(ctx, cfg.global_rate, ratelimit::per_second(cfg.global_rate)),
        clients_(ctx, cfg.burst, ratelimit::per_second(cfg.msg_rate), cfg.max_keys) {
    if (cfg.global_byte_rate != 0) {
      global_read_bytes_.emplace(ctx, byte_burst, ratelimit::per_second(cfg.global_byte_rate));
      global_write_bytes_.emplace(ctx, byte_burst, ratelimit::per_second(cfg.global_byte_rate));
    }
    // A quota is configuration: it holds whether or not the address has a
    // bucket now, and across eviction.
    if (!cfg.trusted.empty())
      clients_.set_quota(client_address(asio::ip::make_address(cfg.trusted)),
                         {cfg.trusted_burst, ratelimit::per_second(cfg.trusted_rate)});
  }

  void start() {
    log("echo_server listening on ", acceptor_.local_endpoint(), " (per client: ", cfg_.msg_rate,
        " lines/s, burst ", cfg_.burst, "; all clients: ", cfg_.global_rate,
        " lines/s; new connections: ", cfg_.conn_rate,
        "/s; over the limit: ", cfg_.reject ? "reject" : "wait", ")");
    if (!cfg_.trusted.empty())
      log("trusted client ", cfg_.trusted, ": ", cfg_.trusted_rate, " lines/s, burst ",
          cfg_.trusted_burst);
    if (byte_limited())
      log("bytes each way: per client ", bytes_per_second(cfg_.byte_rate), ", all clients ",
          bytes_per_second(cfg_.global_byte_rate), " (burst ", byte_burst, " bytes)");
    asio::co_spawn(ctx_, accept_loop(), asio::detached);
    asio::co_spawn(ctx_, wait_for_signal(), asio::detached);
  }

 private:
  struct session_stats {
    std::uint64_t echoed = 0, delayed = 0, rejected = 0;
  };

  /// A session as the shutdown sees it: its socket, and its byte-limited
  /// stream if it has one (closing the stream also ends a wait for bytes).
  struct session_handle {
    tcp::socket* sock;
    limited_socket* limited = nullptr;
  };

  bool byte_limited() const { return cfg_.byte_rate != 0 || cfg_.global_byte_rate != 0; }

  static std::string bytes_per_second(std::uint64_t rate) {
    return rate == 0 ? "unlimited" : std::to_string(rate) + " B/s";
  }

  asio::awaitable<void> accept_loop() {
    bool paused = false;
    for (;;) {
      // A token per connection, taken before accepting: excess connections
      // wait in the kernel's listen backlog.
      if (!connections_.try_get_token()) {
        if (!paused) log("connection rate limit (", cfg_.conn_rate, "/s) reached: pausing accepts");
        paused = true;
        auto [ec] = co_await connections_.async_get_token(nothrow);
        if (ec) break;  // closed: shutting down
      } else {
        paused = false;
      }
      auto [ec, sock] = co_await acceptor_.async_accept(nothrow);
      if (!acceptor_.is_open()) break;
      if (ec) {
        log("accept failed: ", ec.message(), "; retrying in 100 ms");
        asio::steady_timer t(ctx_, 100ms);
        co_await t.async_wait(nothrow);
        continue;
      }
      if (sessions_.size() >= cfg_.max_clients) {
        log("refusing ", peer(sock), ": ", sessions_.size(), " clients already (--max-clients)");
        boost::system::error_code ignored;
        sock.non_blocking(true, ignored);
        sock.write_some(asio::buffer(std::string_view("error: server full\n")), ignored);
        sock.close(ignored);
        continue;
      }
      asio::co_spawn(ctx_, session(std::move(sock), next_id_++), asio::detached);
    }
    log("no longer accepting connections");
  }

  /// The address a client is limited by: an IPv4 client of a server bound to
  /// `::` arrives as ::ffff:a.b.c.d, and is the same client as a.b.c.d.
  static asio::ip::address client_address(const asio::ip::address& a) {
    if (a.is_v6() && a.to_v6().is_v4_mapped())
      return asio::ip::make_address_v4(asio::ip::v4_mapped, a.to_v6());
    return a;
  }

  static std::string peer(const tcp::socket& s) {
    boost::system::error_code ec;
    auto ep = s.remote_endpoint(ec);
    if (ec) return "?";
    std::ostringstream os;
    os << ep;
    return os.str();
  }

  /// A client's session: over its bare socket, or, with byte limits, over a
  /// rate_limited_stream whose reads and writes each take a token a byte from
  /// the client's bucket and the server's, as one joint request (nothing is
  /// taken from either until both can give).
  asio::awaitable<void> session(tcp::socket sock, std::uint64_t id) {
    if (!byte_limited()) {
      co_await serve(sock, id);
      co_return;
    }
    // The client's buckets, one per direction, outlive its stream (declared first).
    std::optional<ratelimit::token_bucket> own_read, own_write;
    std::vector<ratelimit::part> reads, writes;
    if (cfg_.byte_rate != 0) {
      own_read.emplace(ctx_, byte_burst, ratelimit::per_second(cfg_.byte_rate));
      own_write.emplace(ctx_, byte_burst, ratelimit::per_second(cfg_.byte_rate));
      reads.emplace_back(*own_read);
      writes.emplace_back(*own_write);
    }
    if (global_read_bytes_) {
      reads.emplace_back(*global_read_bytes_);
      writes.emplace_back(*global_write_bytes_);
    }
    limited_socket stream(std::move(sock));
    stream.set_read_limits(std::move(reads));
    stream.set_write_limits(std::move(writes));
    co_await serve(stream, id);
  }

  template <typename Stream>
  asio::awaitable<void> serve(Stream& stream, std::uint64_t id) {
    tcp::socket& sock = socket_of(stream);
    boost::system::error_code ec;
    const auto remote = sock.remote_endpoint(ec);
    if (ec) co_return;  // reset before we got to it
    const asio::ip::address addr = client_address(remote.address());
    std::ostringstream tag_os;
    tag_os << '#' << id << ' ' << remote;
    const std::string tag = tag_os.str();
    sock.set_option(tcp::no_delay(true), ec);

    session_handle handle{&sock};
    if constexpr (std::is_same_v<Stream, limited_socket>) handle.limited = &stream;
    sessions_.emplace(id, handle);
    struct unregister {
      server* s;
      std::uint64_t id;
      ~unregister() { s->on_session_end(id); }
    } guard{this, id};
    log(tag, " connected (", sessions_.size(), " clients)");

    session_stats stats;
    std::string buf;
    std::string why = "closed";
    bool over_limit = false;  // logs the start of each streak, not every line
    for (;;) {
      auto [rec, n] = co_await asio::async_read_until(
          stream, asio::dynamic_buffer(buf, cfg_.max_line + 1), '\n', nothrow);
      bool last = false;
      if (rec == asio::error::eof) {
        if (buf.empty()) {
          why = stopping_ ? "closed at shutdown" : "closed by the client";
          break;
        }
        n = buf.size();  // a last line without '\n': echoed as it is
        last = true;
      } else if (rec == asio::error::not_found) {
        log(tag, " sent a line longer than ", cfg_.max_line, " bytes: disconnecting it");
        co_await write(stream, "error: line too long\n", tag);
        why = "disconnected (line too long)";
        break;
      } else if (rec) {
        why = rec == asio::error::connection_reset    ? "reset by the client"
              : rec == asio::error::operation_aborted ? "closed at shutdown"
                                                      : "read failed: " + rec.message();
        break;
      }
      const std::string line = buf.substr(0, n);
      buf.erase(0, n);

      // The client's limit and the global one, taken as one request: granted
      // when both have a token, and nothing spent on either until then (a
      // line the global limit refuses costs the client nothing).
      const std::array<ratelimit::part, 2> parts{ratelimit::part(clients_, addr, 1),
                                                 ratelimit::part(global_, 1)};
      const std::span<const ratelimit::part> both(parts);
      boost::system::error_code lec;
      std::optional<std::chrono::nanoseconds> wait;  // when a line would pass both
      const bool now = ratelimit::try_acquire(both, wait, lec).has_value();
      if (!now && !lec) {
        // Which limit holds the line (for the log): the client's, if it is out of tokens.
        const auto own = clients_.retry_after(addr);
        const bool own_limit = own && own->count() > 0;
        if (cfg_.reject) {
          if (!over_limit) log(tag, " over its limit: rejecting its lines");
          over_limit = true;
          ++stats.rejected;
          if (!co_await write(stream, "error: rate limit exceeded" + retry_in(wait) + "\n", tag))
            break;
          if (last) break;
          continue;
        }
        if (!over_limit) {
          if (own_limit) {
            const ratelimit::quota q = clients_.get_quota(addr);  // its own, or the default
            log(tag, " over its limit (", q.rate.tokens, " lines/s, burst ", q.capacity,
                "): delaying its lines");
          } else {
            log(tag, " waits for the global limit (", cfg_.global_rate, " lines/s)");
          }
        }
        auto [ec, r] = co_await ratelimit::async_acquire(both, nothrow);
        lec = ec;
        over_limit = true;
        ++stats.delayed;
      } else {
        over_limit = false;
      }
      if (lec == ratelimit::error::too_many_keys) {
        log(tag, " refused: ", lec.message());
        co_await write(stream, "error: server busy\n", tag);
        why = "disconnected (too many client addresses)";
        break;
      }
      if (lec) {  // bucket_closed or operation_aborted: shutting down
        co_await write(stream, "error: server shutting down\n", tag);
        why = "closed at shutdown";
        break;
      }
      if (!co_await write(stream, line, tag)) {
        why = "disconnected (write failed)";
        break;
      }
      ++stats.echoed;
      if (last) {
        why = "half-closed by the client";
        break;
      }
    }
    if (why == "half-closed by the client" || why == "closed by the client")
      sock.shutdown(tcp::socket::shutdown_send, ec);
    sock.close(ec);
    log(tag, ' ', why, ": ", stats.echoed, " lines echoed (", stats.delayed, " delayed, ",
        stats.rejected, " rejected)");
  }

  /// Writes all of `data`, giving up after --write-timeout (a client that
  /// does not read), plus, with byte limits, the time they need for `data`
  /// (at the client's rate, or its share of the global one if lower).
  /// Returns false on failure.
  template <typename Stream>
  asio::awaitable<bool> write(Stream& stream, std::string_view data, const std::string& tag) {
    if (!socket_of(stream).is_open()) co_return false;
    double timeout = cfg_.write_timeout;
    if (byte_limited()) {
      double rate = double(cfg_.byte_rate);
      if (cfg_.global_byte_rate != 0) {
        const double share = double(cfg_.global_byte_rate) /
                             double(std::max<std::size_t>(sessions_.size(), 1));
        rate = rate == 0 ? share : std::min(rate, share);
      }
      timeout += double(data.size()) / rate;
    }
    asio::steady_timer timer(ctx_, seconds_of(timeout));
    auto r = co_await (asio::async_write(stream, asio::buffer(data), nothrow) ||
                       timer.async_wait(nothrow));
    if (r.index() == 1) {
      log(tag, " has not read its echoes for ", cfg_.write_timeout, " s: disconnecting it");
      co_return false;
    }
    auto [ec, n] = std::get<0>(r);
    if (ec && ec != asio::error::operation_aborted) log(tag, " write failed: ", ec.message());
    co_return !ec;
  }

  void on_session_end(std::uint64_t id) {
    sessions_.erase(id);
    if (stopping_ && sessions_.empty()) drained_.cancel();
  }

  asio::awaitable<void> wait_for_signal() {
    asio::signal_set signals(ctx_, SIGINT, SIGTERM);
    auto [ec, sig] = co_await signals.async_wait(nothrow);
    if (ec) co_return;
    log("signal ", sig, " (", sig == SIGINT ? "SIGINT" : "SIGTERM", "): shutting down, ",
        sessions_.size(), " clients connected");
    stopping_ = true;
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    // Every pending wait completes with bucket_closed; its client is told.
    connections_.close();
    clients_.close();
    global_.close();
    // Idle readers see end-of-file; echoes being written go on.
    for (auto& [id, s] : sessions_)
      s.sock->shutdown(tcp::socket::shutdown_receive, ignored);
    if (!sessions_.empty()) {
      drained_.expires_after(seconds_of(cfg_.shutdown_timeout));
      co_await drained_.async_wait(nothrow);
    }
    if (!sessions_.empty()) {
      log(sessions_.size(), " clients still busy after ", cfg_.shutdown_timeout,
          " s: closing them");
      for (auto& [id, s] : sessions_) {
        if (s.limited)
          s.limited->close(ignored);  // also ends a wait for bytes
        else
          s.sock->close(ignored);
      }
    }
    log("shutdown complete");
  }

  asio::io_context& ctx_;
  config cfg_;
  tcp::acceptor acceptor_;
  ratelimit::token_bucket connections_;
  ratelimit::token_bucket global_;
  ratelimit::keyed_limiter<asio::ip::address> clients_;
  // The server's byte buckets (--global-byte-rate), one per direction.
  std::optional<ratelimit::token_bucket> global_read_bytes_, global_write_bytes_;
  std::map<std::uint64_t, session_handle> sessions_;
  std::uint64_t next_id_ = 1;
  bool stopping_ = false;
  asio::steady_timer drained_{ctx_};
};

/// Raises the open-file limit to the hard limit: a server wants thousands of sockets.
void raise_fd_limit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace

int main(int argc, char* argv[]) {
  config cfg;
  std::string on_limit = "wait";
  constexpr std::uint64_t any = std::numeric_limits<std::uint64_t>::max();
  cli::parser cli("echo_server", "A rate-limited TCP echo server (one line = one message).");
  cli.address("bind", cfg.bind,
              "address to listen on (0.0.0.0: every IPv4 interface; :: for IPv6 too)")
      .option("port", cfg.port, std::uint16_t(0), std::uint16_t(65535),
              "TCP port (0: any free port)")
      .option("conn-rate", cfg.conn_rate, std::uint64_t(1), any, "new connections per second")
      .option("msg-rate", cfg.msg_rate, std::uint64_t(1), any,
              "lines per second per client address")
      .option("burst", cfg.burst, std::uint64_t(1), any, "lines a client may send at once")
      .option("global-rate", cfg.global_rate, std::uint64_t(1), any,
              "lines per second, all clients together")
      .address("trusted", cfg.trusted,
               "a client address with its own limits (--trusted-rate, --trusted-burst)")
      .default_text("trusted", "none")
      .option("trusted-rate", cfg.trusted_rate, std::uint64_t(1), any,
              "lines per second for the trusted client")
      .option("trusted-burst", cfg.trusted_burst, std::uint64_t(1), any,
              "lines the trusted client may send at once")
      .choice("on-limit", on_limit, {"wait", "reject"},
              "wait: delay the client's lines; reject: answer each with an error line")
      .option("max-line", cfg.max_line, std::size_t(1), std::size_t(1) << 30,
              "longest line accepted, in bytes")
      .option("max-clients", cfg.max_clients, std::size_t(1), std::size_t(1000000),
              "simultaneous connections")
      .option("max-keys", cfg.max_keys, std::size_t(1), std::size_t(100000000),
              "client addresses tracked at once")
      .option("write-timeout", cfg.write_timeout, 0.001, 31536000.0,
              "seconds a client may leave its echoes unread")
      .option("shutdown-timeout", cfg.shutdown_timeout, 0.0, 31536000.0,
              "seconds given to in-flight echoes at shutdown")
      .option("byte-rate", cfg.byte_rate, std::uint64_t(0), any,
              "bytes per second per client, each way (0: unlimited)")
      .option("global-byte-rate", cfg.global_byte_rate, std::uint64_t(0), any,
              "bytes per second, all clients together, each way (0: unlimited)");
  if (int rc = cli.parse(argc, argv); rc >= 0) return rc;
  cfg.reject = on_limit == "reject";
  const bool trusted_limits = cli.given("trusted-rate") || cli.given("trusted-burst");

  raise_fd_limit();
  try {
    asio::io_context ctx(1);
    server s(ctx, cfg);
    s.start();
    if (trusted_limits && cfg.trusted.empty())
      log("--trusted-rate and --trusted-burst have no effect without --trusted");
    ctx.run();
  } catch (const std::exception& e) {
    std::cerr << "echo_server: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
