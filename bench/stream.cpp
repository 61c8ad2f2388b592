//
// bench/stream.cpp: W8 and W8b, byte-rate streams over loopback TCP.
//
// One io_context run by one thread (the writer, the reader and the limiters
// share it: a shared 2-core machine gives one thread a core far more reliably
// than two), one loopback TCP connection per repetition.
//
// W8  bulk transfer, limits that never bind: the writer sends 64 KiB with
//     asio::async_write, again and again, for 1 s (--quick 0.1 s), then shuts
//     its side down; the reader reads up to 256 KiB with async_read_some
//     until EOF. (Reads of 64 KiB, as large as the writes, are not stable on
//     one thread: a backlog the first turns of the loop leave in the socket
//     is never drained, the connection stays limited by the receive window,
//     and the kernel's cost per byte doubles. The rate-limited reader, which
//     first waits for readability, fell into that state every time, the raw
//     reader never: the row measured the state, not the stream.)
//     `raw_socket`: plain tcp::socket at both ends. `asio_ratelimit_stream_
//     unlimited`: ratelimit::rate_limited_stream<tcp::socket> at both ends,
//     each with read and write limits of its own token bucket of capacity 2^40
//     and 2^40 tokens/s (one token a byte: never binds, every operation takes
//     its tokens). One discarded warm-up repetition of 0.2 s (--quick: none),
//     then 5 (--quick: 1).
//     Metrics: bytes_per_s (bytes received / time from the first write to
//     EOF), mib_per_s, cpu_us_per_mib (the process's CPU time, user +
//     system, per MiB moved: what the machine's other load skews least),
//     seconds.
// W8b a limited writer at 20 MiB/s for 10 s (--quick 0.5 s): 64 KiB
//     async_write_some calls one after the other (each completion timed),
//     through `asio_ratelimit_stream` (write limits: one bucket of capacity
//     16384 and 20 MiB/s, slice 16384) or `beast_simple_rate_policy` (Beast's
//     basic_stream<tcp, any_io_executor, simple_rate_policy> with
//     rate_policy().write_limit(20 MiB)); a plain socket reads up to 256 KiB
//     at a time and times each read. One repetition (--quick: one).
//     Metrics: achieved_ratio (bytes sent / (rate * time from the first write
//     to the last completion)), window_rel (max_100ms_window_bytes / (0.1 *
//     rate)), max_100ms_window_bytes (the most bytes the reader received in
//     any 100 ms window, (t - 100 ms, t]), send_window_rel (the same over the
//     writer's completions), bytes, seconds; for ours also stall_ms, the
//     time the bucket stood full between two of the writer's completions
//     (gaps beyond capacity / rate: the process descheduled, on a busy
//     machine), which a bucket of one slice cannot bank: achieved_ratio is
//     about 1 - stall_ms / T (stall_ms overstates a little: it also counts
//     the completions' own jitter).
//
// Checks (abort): bytes received != bytes sent, an error other than EOF, and
// for asio_ratelimit_stream bytes sent > capacity + rate * elapsed.
//
#include "bench.hpp"

#include <ratelimit/stream.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/basic_stream.hpp>
#include <boost/beast/core/rate_policy.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <functional>
#include <utility>
#include <vector>

namespace bench {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;

constexpr std::size_t chunk = 64 * 1024;                  // a write
constexpr std::size_t read_chunk = 256 * 1024;            // a read (see above)
constexpr std::uint64_t limited_rate = 20 * 1024 * 1024;  // W8b: bytes per second
constexpr std::uint64_t limited_capacity = 16384;         // W8b: one slice
constexpr std::int64_t window_ns = 100'000'000;           // W8b: 100 ms

using limited_stream = ratelimit::rate_limited_stream<tcp::socket>;
using beast_stream = beast::basic_stream<tcp, asio::any_io_executor, beast::simple_rate_policy>;

/// CPU time of this process (user + system), in seconds.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

/// A connected loopback pair: (writer's end, reader's end).
std::pair<tcp::socket, tcp::socket> connect_pair(asio::io_context& ioc) {
  tcp::acceptor acceptor(ioc, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  tcp::socket w(ioc), r(ioc);
  w.connect(acceptor.local_endpoint());
  acceptor.accept(r);
  return {std::move(w), std::move(r)};
}

tcp::socket& socket_of(tcp::socket& s) {
  return s;
}
tcp::socket& socket_of(limited_stream& s) {
  return s.next_layer();
}
tcp::socket& socket_of(beast_stream& s) {
  return s.socket();
}

/// The writer's end of the transfer: shuts its sending side down.
template <typename Stream>
void shut(Stream& w) {
  error_code ec;
  socket_of(w).shutdown(tcp::socket::shutdown_send, ec);
  if (ec) die("shutdown failed: " + ec.message());
}

/// The most bytes in any window (t - window_ns, t] of (time, bytes) events
/// sorted by time.
std::uint64_t max_window(const std::vector<std::pair<std::int64_t, std::uint64_t>>& ev) {
  std::uint64_t best = 0, sum = 0;
  std::size_t lo = 0;
  for (std::size_t hi = 0; hi < ev.size(); ++hi) {
    sum += ev[hi].second;
    while (ev[lo].first <= ev[hi].first - window_ns)
      sum -= ev[lo++].second;
    best = std::max(best, sum);
  }
  return best;
}

/// The reader: reads of up to read_chunk until EOF, each timed when `events` is set;
/// then `at_eof` (Beast's rate timer re-arms itself every second until its
/// stream is closed).
template <typename Stream>
struct reader {
  Stream& s;
  std::vector<std::pair<std::int64_t, std::uint64_t>>* events;
  std::function<void()> at_eof;

  reader(Stream& stream, std::vector<std::pair<std::int64_t, std::uint64_t>>* ev,
         std::function<void()> eof = {})
      : s(stream), events(ev), at_eof(std::move(eof)) {}

  std::vector<char> buf = std::vector<char>(read_chunk);
  std::uint64_t received = 0;
  std::int64_t t_eof = 0;
  error_code err;

  void start() {
    s.async_read_some(asio::buffer(buf), [this](error_code ec, std::size_t n) {
      received += n;
      if (events && n != 0) events->emplace_back(now_ns(), n);
      if (ec) {
        t_eof = now_ns();
        if (ec != asio::error::eof) err = ec;
        if (at_eof) at_eof();
        return;
      }
      start();
    });
  }
};

struct bulk_result {
  std::uint64_t bytes;
  double seconds, cpu_seconds;
};

/// W8: bulk transfer for `secs`; returns what moved after checking it.
template <typename Stream>
bulk_result bulk(asio::io_context& ioc, Stream& w, Stream& r, double secs) {
  std::vector<char> wbuf(chunk, 'x');
  std::uint64_t sent = 0;
  error_code werr;
  reader<Stream> rd(r, nullptr);
  const double cpu0 = cpu_seconds();
  const std::int64_t t0 = now_ns();
  const std::int64_t deadline = t0 + static_cast<std::int64_t>(secs * 1e9);
  auto write = [&](auto& self) -> void {
    if (now_ns() >= deadline) {
      shut(w);
      return;
    }
    asio::async_write(w, asio::buffer(wbuf), [&, self_ = &self](error_code ec, std::size_t n) {
      sent += n;
      if (ec) {
        werr = ec;
        return;
      }
      (*self_)(*self_);
    });
  };
  rd.start();
  write(write);
  ioc.restart();
  ioc.run();
  if (werr) die("write failed: " + werr.message());
  if (rd.err) die("read failed: " + rd.err.message());
  if (rd.received != sent)
    die(format("received %llu bytes, sent %llu", static_cast<unsigned long long>(rd.received),
               static_cast<unsigned long long>(sent)));
  return {sent, static_cast<double>(rd.t_eof - t0) / 1e9, cpu_seconds() - cpu0};
}

void run_w8() {
  const bool ours = opt.impl == "asio_ratelimit_stream_unlimited";
  const double secs = opt.quick ? 0.1 : 1.0;
  const int reps = pick(5, 1);
  asio::io_context ioc(1);
  auto one = [&](double s) {
    auto [w, r] = connect_pair(ioc);
    if (!ours) return bulk(ioc, w, r, s);
    limited_stream lw(std::move(w)), lr(std::move(r));
    const std::uint64_t huge = std::uint64_t{1} << 40;
    ratelimit::token_bucket bw(ioc, huge, ratelimit::per_second(huge));
    ratelimit::token_bucket br(ioc, huge, ratelimit::per_second(huge));
    lw.set_limits({ratelimit::part(bw)});
    lr.set_limits({ratelimit::part(br)});
    return bulk(ioc, lw, lr, s);
  };
  if (!opt.quick) one(0.2);  // warm-up, discarded
  for (int rep = 0; rep < reps; ++rep) {
    const bulk_result b = one(secs);
    const double bps = static_cast<double>(b.bytes) / b.seconds;
    const double mib = static_cast<double>(b.bytes) / (1 << 20);
    emit(rep, format("bytes_per_s=%.0f mib_per_s=%.1f cpu_us_per_mib=%.1f seconds=%.3f", bps,
                     bps / (1 << 20), b.cpu_seconds * 1e6 / mib, b.seconds));
  }
}

/// W8b: one limited transfer of `secs` through `w` (already limited) to a plain socket.
template <typename Stream>
void limited(asio::io_context& ioc, Stream& w, tcp::socket& r, double secs, int rep,
             bool check_bound) {
  std::vector<char> wbuf(chunk, 'x');
  std::vector<std::pair<std::int64_t, std::uint64_t>> sends, recvs;
  const std::size_t expect = static_cast<std::size_t>(secs * limited_rate / 4096) + 1024;
  sends.reserve(expect);
  recvs.reserve(expect);
  std::uint64_t sent = 0;
  std::int64_t t_last = 0;
  error_code werr;
  reader<tcp::socket> rd(r, &recvs, [&w] { w.close(); });
  const std::int64_t t0 = now_ns();
  const std::int64_t deadline = t0 + static_cast<std::int64_t>(secs * 1e9);
  auto write = [&](auto& self) -> void {
    w.async_write_some(asio::buffer(wbuf), [&, self_ = &self](error_code ec, std::size_t n) {
      t_last = now_ns();
      sent += n;
      if (n != 0) sends.emplace_back(t_last, n);
      if (ec) {
        werr = ec;
        return;
      }
      if (t_last >= deadline) {
        shut(w);
        return;
      }
      (*self_)(*self_);
    });
  };
  rd.start();
  write(write);
  ioc.restart();
  ioc.run();
  if (werr) die("write failed: " + werr.message());
  if (rd.err) die("read failed: " + rd.err.message());
  if (rd.received != sent)
    die(format("received %llu bytes, sent %llu", static_cast<unsigned long long>(rd.received),
               static_cast<unsigned long long>(sent)));
  const double elapsed = static_cast<double>(t_last - t0) / 1e9;
  const double bound = static_cast<double>(limited_capacity) + limited_rate * elapsed;
  if (check_bound && static_cast<double>(sent) > bound)
    die(format("sent %llu bytes in %.6f s: more than capacity + rate * T = %.0f",
               static_cast<unsigned long long>(sent), elapsed, bound));
  const double tenth = 0.1 * limited_rate;
  const std::uint64_t win = max_window(recvs), swin = max_window(sends);
  std::string m = format(
      "achieved_ratio=%.5f window_rel=%.4f max_100ms_window_bytes=%llu "
      "send_window_rel=%.4f bytes=%llu seconds=%.3f",
      static_cast<double>(sent) / (limited_rate * elapsed), static_cast<double>(win) / tenth,
      static_cast<unsigned long long>(win), static_cast<double>(swin) / tenth,
      static_cast<unsigned long long>(sent), elapsed);
  if (check_bound) {
    // The time the bucket stood full: a gap between two completions longer
    // than capacity / rate (the writer always wants a slice = the capacity,
    // so each grant empties the bucket). What the writer's stalls (this
    // process descheduled) cost the achieved rate: about stall_ms / T.
    const std::int64_t fill_ns = static_cast<std::int64_t>(1e9 * limited_capacity / limited_rate);
    std::int64_t stall = 0;
    for (std::size_t i = 1; i < sends.size(); ++i)
      stall += std::max<std::int64_t>(0, sends[i].first - sends[i - 1].first - fill_ns);
    m += format(" stall_ms=%.1f", static_cast<double>(stall) / 1e6);
  }
  emit(rep, m);
}

void run_w8b() {
  const double secs = opt.quick ? 0.5 : 10.0;
  asio::io_context ioc(1);
  for (int rep = 0, reps = pick(1, 1); rep < reps; ++rep) {
    auto [w, r] = connect_pair(ioc);
    if (opt.impl == "asio_ratelimit_stream") {
      ratelimit::token_bucket bucket(ioc, limited_capacity, ratelimit::per_second(limited_rate));
      limited_stream lw(std::move(w));
      lw.set_slice(16384);
      lw.set_write_limits({ratelimit::part(bucket)});
      limited(ioc, lw, r, secs, rep, true);
    } else {
      beast_stream bw(std::move(w));
      bw.rate_policy().write_limit(limited_rate);
      limited(ioc, bw, r, secs, rep, false);
    }
  }
}

}  // namespace

void run_stream() {
  if (opt.workload == "W8")
    run_w8();
  else
    run_w8b();
}

}  // namespace bench
