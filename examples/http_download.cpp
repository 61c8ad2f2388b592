// A Beast HTTP download server whose responses are paced in bytes per second.
//
// Each connection's socket is a ratelimit::rate_limited_stream: its writes
// take a token a byte from the connection's own bucket (--rate) and from one
// bucket shared by every connection (--global-rate) as one joint request, so
// a lone download runs at the per-connection rate and concurrent ones share
// the server's. http::async_write of the response goes through it unchanged.
//
//   http_download                     the demo: a server on a free loopback
//                                     port and two clients, the second one
//                                     second after the first; one line per
//                                     second per client, then a summary
//   http_download --mode serve --port 8080 --file big.iso --rate 1000000
//   http_download --mode get --port 8080
//
// The clients are plain sockets (the server does the limiting). The demo's
// body is generated and checked byte by byte by each client.
#include <ratelimit.hpp>
#include <ratelimit/stream.hpp>

#include "cli.hpp"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using asio::ip::tcp;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr auto nothrow = asio::as_tuple(asio::use_awaitable);

struct config {
  std::string mode = "demo";
  std::string address = "127.0.0.1";
  std::uint16_t port = 0;
  std::string file;                      // serve this file (empty: a generated body)
  std::uint64_t size = 1 << 20;          // bytes of the generated body
  std::uint64_t rate = 384 * 1024;       // bytes per second per connection (0: unlimited)
  std::uint64_t global_rate = 512 * 1024;  // bytes per second, all connections (0: unlimited)
  unsigned clients = 2;                  // demo: concurrent downloads
  double stagger = 1.0;                  // demo: seconds between the clients' starts
};

using limited_socket = ratelimit::rate_limited_stream<tcp::socket>;

/// The byte buckets' capacity: one slice of the stream (a 16 KiB burst).
constexpr std::uint64_t burst = limited_socket::default_slice;

/// Byte `i` of the generated body (not periodic: a lost or repeated chunk shows).
char body_byte(std::uint64_t i) {
  return static_cast<char>('a' + (i * 2654435761u >> 13) % 26);
}

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

std::string kib(double bytes_per_second) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f KiB/s", bytes_per_second / 1024);
  return buf;
}

std::string limit_text(std::uint64_t rate) { return rate == 0 ? "unlimited" : kib(double(rate)); }

std::string text_of(const tcp::endpoint& ep) {
  std::ostringstream os;
  os << ep;
  return os.str();
}

std::string fixed(double x, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}

/// The server: every connection gets one response, its writes limited by the
/// connection's bucket and the server's.
class server {
 public:
  server(asio::io_context& ctx, const config& cfg)
      : ctx_(ctx),
        cfg_(cfg),
        acceptor_(ctx, tcp::endpoint(asio::ip::make_address(cfg.address), cfg.port)) {
    if (cfg.global_rate != 0)
      global_.emplace(ctx, burst, ratelimit::per_second(cfg.global_rate));
    if (cfg.file.empty()) {
      body_.resize(cfg.size);
      for (std::uint64_t i = 0; i < cfg.size; ++i)
        body_[i] = body_byte(i);
    }
  }

  tcp::endpoint endpoint() const { return acceptor_.local_endpoint(); }

  void start() { asio::co_spawn(ctx_, accept_loop(), asio::detached); }

  void stop() {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    if (global_) global_->close();
  }

 private:
  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, sock] = co_await acceptor_.async_accept(nothrow);
      if (!acceptor_.is_open()) break;
      if (ec) continue;
      asio::co_spawn(ctx_, session(std::move(sock)), asio::detached);
    }
  }

  asio::awaitable<void> session(tcp::socket sock) {
    // The connection's bucket outlives its stream (declared first).
    std::optional<ratelimit::token_bucket> own;
    std::vector<ratelimit::part> limits;
    if (cfg_.rate != 0) {
      own.emplace(ctx_, burst, ratelimit::per_second(cfg_.rate));
      limits.emplace_back(*own);
    }
    if (global_) limits.emplace_back(*global_);
    limited_socket stream(std::move(sock));
    stream.set_write_limits(std::move(limits));  // the request is read unlimited

    boost::system::error_code ec;
    const std::string peer = text_of(stream.next_layer().remote_endpoint(ec));
    const auto t0 = clock_type::now();
    beast::flat_buffer buffer;
    http::request<http::empty_body> req;
    auto [rec, rn] = co_await http::async_read(stream, buffer, req, nothrow);
    if (rec) co_return;
    std::size_t sent = 0;
    if (req.target() != "/" || req.method() != http::verb::get) {
      http::response<http::string_body> res{http::status::not_found, req.version()};
      res.set(http::field::content_type, "text/plain");
      res.body() = "not found\n";
      res.keep_alive(false);
      res.prepare_payload();
      std::tie(ec, sent) = co_await http::async_write(stream, res, nothrow);
    } else if (cfg_.file.empty()) {
      http::response<http::span_body<const char>> res{http::status::ok, req.version()};
      res.set(http::field::content_type, "application/octet-stream");
      res.body() = {body_.data(), body_.size()};
      res.keep_alive(false);
      res.prepare_payload();
      std::tie(ec, sent) = co_await http::async_write(stream, res, nothrow);
    } else {
      http::response<http::file_body> res{http::status::ok, req.version()};
      res.body().open(cfg_.file.c_str(), beast::file_mode::scan, ec);
      if (ec) {
        std::cerr << "http_download: " << cfg_.file << ": " << ec.message() << '\n';
        co_return;
      }
      res.set(http::field::content_type, "application/octet-stream");
      res.keep_alive(false);
      res.prepare_payload();
      std::tie(ec, sent) = co_await http::async_write(stream, res, nothrow);
    }
    if (cfg_.mode == "serve") {
      const double secs = seconds_since(t0);
      std::cout << peer << ' ' << req.method_string() << ' ' << req.target() << ": " << sent
                << " bytes in " << fixed(secs, 2) << " s (" << kib(double(sent) / secs) << ")"
                << (ec ? ", " + ec.message() : std::string()) << std::endl;
    }
    stream.next_layer().shutdown(tcp::socket::shutdown_send, ec);
    stream.close(ec);
  }

  asio::io_context& ctx_;
  config cfg_;
  tcp::acceptor acceptor_;
  std::optional<ratelimit::token_bucket> global_;
  std::string body_;
};

/// One download: its progress, read by the reporter.
struct download {
  unsigned id = 0;
  bool started = false, done = false, ok = false, checked = false, intact = true;
  std::uint64_t bytes = 0, reported = 0, expected = 0;
  clock_type::time_point t0, t1, reported_at;
  std::string error;
};

/// Downloads http://server/ over a plain socket; checks the generated body
/// byte by byte when `check` is set.
asio::awaitable<void> get(tcp::endpoint server, download& d, bool check) {
  d.started = true;
  d.checked = check;
  d.t0 = d.reported_at = clock_type::now();
  auto finish = [&](std::string error) {
    d.t1 = clock_type::now();
    d.done = true;
    d.error = std::move(error);
    d.ok = d.error.empty();
  };
  tcp::socket sock(co_await asio::this_coro::executor);
  if (auto [ec] = co_await sock.async_connect(server, nothrow); ec) co_return finish(ec.message());
  http::request<http::empty_body> req{http::verb::get, "/", 11};
  std::ostringstream host;
  host << server;
  req.set(http::field::host, host.str());
  req.set(http::field::user_agent, "http_download");
  if (auto [ec, n] = co_await http::async_write(sock, req, nothrow); ec)
    co_return finish(ec.message());

  beast::flat_buffer buffer;
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);
  if (auto [ec, n] = co_await http::async_read_header(sock, buffer, parser, nothrow); ec)
    co_return finish(ec.message());
  if (parser.get().result() != http::status::ok)
    co_return finish("HTTP status " + std::to_string(parser.get().result_int()));
  if (parser.content_length()) d.expected = *parser.content_length();
  std::vector<char> chunk(16 * 1024);
  while (!parser.is_done()) {
    parser.get().body().data = chunk.data();
    parser.get().body().size = chunk.size();
    auto [ec, n] = co_await http::async_read_some(sock, buffer, parser, nothrow);
    if (ec && ec != http::error::need_buffer) co_return finish(ec.message());
    const std::size_t got = chunk.size() - parser.get().body().size;
    if (check)
      for (std::size_t i = 0; i < got && d.intact; ++i)
        d.intact = chunk[i] == body_byte(d.bytes + i);
    d.bytes += got;
  }
  finish(d.intact ? "" : "the body differs from what was sent");
}

/// Every second until `timer` is cancelled: one line per download under
/// way, with its bytes so far and its rate since the line before.
asio::awaitable<void> report(clock_type::time_point t0, std::vector<download>& ds,
                             asio::steady_timer& timer) {
  for (int tick = 1;; ++tick) {
    timer.expires_at(t0 + std::chrono::seconds(tick));
    if (auto [ec] = co_await timer.async_wait(nothrow); ec) co_return;
    const auto now = clock_type::now();
    for (auto& d : ds) {
      const double secs = std::chrono::duration<double>(now - d.reported_at).count();
      if (!d.started || d.done || secs < 0.05) continue;
      std::printf("%5.1f s  client %u: %9llu bytes  %s\n", seconds_since(t0), d.id,
                  static_cast<unsigned long long>(d.bytes),
                  kib(double(d.bytes - d.reported) / secs).c_str());
      d.reported = d.bytes;
      d.reported_at = now;
    }
    std::fflush(stdout);
  }
}

void summary(const download& d) {
  const double secs = std::chrono::duration<double>(d.t1 - d.t0).count();
  std::printf("client %u: %llu bytes in %s s (%s)%s\n", d.id,
              static_cast<unsigned long long>(d.bytes), fixed(secs, 2).c_str(),
              kib(secs > 0 ? double(d.bytes) / secs : 0).c_str(),
              d.ok ? (d.checked ? ", complete and intact" : ", complete")
                   : (", failed: " + d.error).c_str());
}

int run_demo(const config& cfg) {
  asio::io_context ctx(1);
  server s(ctx, cfg);
  s.start();
  const tcp::endpoint ep = s.endpoint();
  const bool check = cfg.file.empty();
  std::printf("%u clients download %s from http://%s/, %s s apart\n", cfg.clients,
              check ? (std::to_string(cfg.size) + " bytes").c_str() : cfg.file.c_str(),
              text_of(ep).c_str(), fixed(cfg.stagger, 1).c_str());
  std::printf("limits: %s per connection, %s for the server (burst %llu bytes)\n",
              limit_text(cfg.rate).c_str(), limit_text(cfg.global_rate).c_str(),
              static_cast<unsigned long long>(burst));
  std::fflush(stdout);
  std::vector<download> ds(cfg.clients);
  asio::steady_timer ticks(ctx);
  unsigned running = cfg.clients;
  const auto t0 = clock_type::now();
  for (unsigned i = 0; i < cfg.clients; ++i) {
    ds[i].id = i + 1;
    asio::co_spawn(
        ctx,
        [&, i]() -> asio::awaitable<void> {
          asio::steady_timer t(ctx, t0 + std::chrono::duration_cast<clock_type::duration>(
                                             std::chrono::duration<double>(cfg.stagger * i)));
          co_await t.async_wait(nothrow);
          co_await get(ep, ds[i], check);
          if (--running == 0) {  // the last one: stop reporting and serving
            ticks.cancel();
            s.stop();
          }
        },
        asio::detached);
  }
  asio::co_spawn(ctx, report(t0, ds, ticks), asio::detached);
  ctx.run();
  bool ok = true;
  std::uint64_t total = 0;
  clock_type::time_point end = t0;
  for (const auto& d : ds) {
    summary(d);
    ok = ok && d.ok && d.bytes == d.expected;
    total += d.bytes;
    end = std::max(end, d.t1);
  }
  const double secs = std::chrono::duration<double>(end - t0).count();
  std::printf("all: %llu bytes in %s s (%s; limit %s)\n", static_cast<unsigned long long>(total),
              fixed(secs, 2).c_str(), kib(secs > 0 ? double(total) / secs : 0).c_str(),
              limit_text(cfg.global_rate).c_str());
  return ok ? 0 : 1;
}

int run_server(const config& cfg) {
  asio::io_context ctx(1);
  server s(ctx, cfg);
  s.start();
  std::cout << "serving " << (cfg.file.empty() ? std::to_string(cfg.size) + " generated bytes"
                                               : cfg.file)
            << " on http://" << s.endpoint() << "/ (" << limit_text(cfg.rate)
            << " per connection, " << limit_text(cfg.global_rate) << " for the server)"
            << std::endl;
  asio::signal_set signals(ctx, SIGINT, SIGTERM);
  signals.async_wait([&](boost::system::error_code, int) {
    s.stop();
    ctx.stop();
  });
  ctx.run();
  return 0;
}

int run_client(const config& cfg) {
  asio::io_context ctx(1);
  std::vector<download> ds(1);
  ds[0].id = 1;
  const tcp::endpoint ep(asio::ip::make_address(cfg.address), cfg.port);
  asio::steady_timer ticks(ctx);
  const auto t0 = clock_type::now();
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        co_await get(ep, ds[0], false);
        ticks.cancel();
      },
      asio::detached);
  asio::co_spawn(ctx, report(t0, ds, ticks), asio::detached);
  ctx.run();
  summary(ds[0]);
  return ds[0].ok && ds[0].bytes == ds[0].expected ? 0 : 1;
}

}  // namespace

int main(int argc, char* argv[]) {
  config cfg;
  constexpr std::uint64_t any = std::numeric_limits<std::uint64_t>::max();
  cli::parser cli("http_download",
                  "An HTTP download server paced in bytes per second per connection and in all, "
                  "and its client.");
  cli.choice("mode", cfg.mode, {"demo", "serve", "get"},
             "demo: a server and --clients downloads in one process; serve: the server; "
             "get: one download")
      .address("address", cfg.address, "serve: address to listen on; get: the server's address")
      .option("port", cfg.port, std::uint16_t(0), std::uint16_t(65535),
              "serve: TCP port (0: any free port); get: the server's port")
      .text("file", cfg.file, "serve this file instead of a generated body")
      .default_text("file", "generated")
      .option("size", cfg.size, std::uint64_t(1), std::uint64_t(1) << 32,
              "bytes of the generated body")
      .option("rate", cfg.rate, std::uint64_t(0), any,
              "bytes per second per connection (0: unlimited)")
      .option("global-rate", cfg.global_rate, std::uint64_t(0), any,
              "bytes per second, all connections together (0: unlimited)")
      .option("clients", cfg.clients, 1u, 64u, "demo: concurrent downloads")
      .option("stagger", cfg.stagger, 0.0, 60.0, "demo: seconds between the downloads' starts");
  if (int rc = cli.parse(argc, argv); rc >= 0) return rc;
  if (cfg.mode == "get" && cfg.port == 0) {
    std::cerr << "http_download: --mode get needs the server's --port\n";
    return 2;
  }
  try {
    if (cfg.mode == "serve") return run_server(cfg);
    if (cfg.mode == "get") return run_client(cfg);
    return run_demo(cfg);
  } catch (const std::exception& e) {
    std::cerr << "http_download: " << e.what() << '\n';
    return 1;
  }
}
