// rate_limited_stream in real layering over loopback TCP: TLS over the
// limited layer and the limited layer over TLS, Beast HTTP and WebSocket
// through it. Each test moves 50-130 KB at 200 KB/s with a bucket of 4 KiB,
// so the limits bind, and checks the bytes, their count and that the
// transfer took at least as long as the limits allow.
//
// TLS uses a self-signed P-256 certificate for CN/SAN "localhost", made here
// with the OpenSSL C API; clients verify the server against it (verify_peer
// and host name verification).
#include <ratelimit/stream.hpp>
#include <ratelimit/token_bucket.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/test/unit_test.hpp>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <array>
#include <chrono>
#include <deque>
#include <exception>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace asio = boost::asio;
namespace ssl = asio::ssl;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using asio::ip::tcp;
using ratelimit::per_second;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

constexpr std::uint64_t kCapacity = 4096;  // bytes a bucket holds
constexpr std::uint64_t kRate = 200000;    // bytes per second
constexpr std::size_t kSlice = 4096;

constexpr auto use_awaitable = asio::use_awaitable;
constexpr auto as_tuple = asio::as_tuple(asio::use_awaitable);

/// `n` pseudo-random bytes (a lost, repeated or reordered chunk shows);
/// letters only for `text` (a WebSocket text message must be UTF-8).
std::string pattern(std::size_t n, unsigned seed, bool text = false) {
  std::mt19937 gen(seed);
  std::string s(n, '\0');
  for (char& c : s)
    c = static_cast<char>(text ? 'a' + gen() % 26 : gen());
  return s;
}

/// The least time the limits need to pass `bytes` when they start with at
/// most a full bucket and `unpaid` bytes may pass before they are paid for
/// (1 ms less, for the clock's granularity).
steady::duration min_time(std::uint64_t bytes, std::uint64_t unpaid) {
  if (bytes <= unpaid) return steady::duration::zero();
  return std::chrono::duration_cast<steady::duration>(
             std::chrono::duration<double>(static_cast<double>(bytes - unpaid) / kRate)) -
         1ms;
}

/// Generous: the time at the rate plus 1.5 s (sanitizers, a busy machine).
steady::duration max_time(std::uint64_t bytes) {
  return min_time(bytes, 0) + 1500ms;
}

double ms(steady::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

std::vector<ratelimit::part> limit(ratelimit::token_bucket& bucket) {
  return {ratelimit::part(bucket)};
}

/// Runs coroutines on one io_context until all are done (at most 10 s); the
/// first failure stops the loop and every failure is reported.
class runner {
 public:
  explicit runner(asio::io_context& ctx) : ctx_(ctx) {}

  void spawn(const char* name, asio::awaitable<void> a) {
    result& r = results_.emplace_back(result{name, false, nullptr});
    asio::co_spawn(ctx_, std::move(a), [this, &r](std::exception_ptr e) {
      r.done = true;
      r.error = e;
      if (e) ctx_.stop();
    });
  }

  void run() {
    ctx_.run_for(10s);
    for (const result& r : results_) {
      BOOST_TEST(r.done, r.name << " finished");
      if (!r.error) continue;
      try {
        std::rethrow_exception(r.error);
      } catch (const std::exception& e) {
        BOOST_ERROR(r.name << " failed: " << e.what());
      }
    }
  }

 private:
  struct result {
    const char* name;
    bool done = false;
    std::exception_ptr error;
  };
  asio::io_context& ctx_;
  std::deque<result> results_;
};

tcp::acceptor loopback_acceptor(asio::io_context& ctx) {
  return tcp::acceptor(ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
}

// ---------------------------------------------------------------------------
// A self-signed certificate, made with the OpenSSL C API.

void ensure(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("OpenSSL: ") + what + " failed");
}

template <typename Write>
std::string pem(Write write) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), &BIO_free);
  ensure(bio != nullptr, "BIO_new");
  ensure(write(bio.get()) == 1, "PEM_write_bio");
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  ensure(n > 0 && data != nullptr, "BIO_get_mem_data");
  return std::string(data, static_cast<std::size_t>(n));
}

void add_extension(X509* cert, int nid, const char* value) {
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, cert, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &v3, nid, value);
  ensure(ext != nullptr, "X509V3_EXT_conf_nid");
  const int added = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  ensure(added == 1, "X509_add_ext");
}

struct identity {
  std::string certificate;  // PEM
  std::string key;          // PEM (PKCS#8)
};

identity make_identity() {
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(EVP_EC_gen("P-256"), &EVP_PKEY_free);
  ensure(key != nullptr, "EVP_EC_gen");
  std::unique_ptr<X509, decltype(&X509_free)> cert(X509_new(), &X509_free);
  ensure(cert != nullptr, "X509_new");
  X509* x = cert.get();
  ensure(X509_set_version(x, 2) == 1, "X509_set_version");  // v3
  ensure(ASN1_INTEGER_set(X509_get_serialNumber(x), 1) == 1, "ASN1_INTEGER_set");
  ensure(X509_gmtime_adj(X509_getm_notBefore(x), -3600) != nullptr, "X509_gmtime_adj");
  ensure(X509_gmtime_adj(X509_getm_notAfter(x), 24 * 3600) != nullptr, "X509_gmtime_adj");
  X509_NAME* name = X509_get_subject_name(x);
  ensure(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                    reinterpret_cast<const unsigned char*>("localhost"), -1, -1,
                                    0) == 1,
         "X509_NAME_add_entry_by_txt");
  ensure(X509_set_issuer_name(x, name) == 1, "X509_set_issuer_name");
  ensure(X509_set_pubkey(x, key.get()) == 1, "X509_set_pubkey");
  add_extension(x, NID_basic_constraints, "critical,CA:TRUE");
  add_extension(x, NID_subject_alt_name, "DNS:localhost");
  ensure(X509_sign(x, key.get(), EVP_sha256()) > 0, "X509_sign");
  return {pem([&](BIO* b) { return PEM_write_bio_X509(b, x); }), pem([&](BIO* b) {
            return PEM_write_bio_PrivateKey(b, key.get(), nullptr, nullptr, 0, nullptr, nullptr);
          })};
}

const identity& localhost_identity() {
  static const identity id = make_identity();
  return id;
}

ssl::context server_context() {
  ssl::context ctx(ssl::context::tls_server);
  const identity& id = localhost_identity();
  ctx.use_certificate(asio::buffer(id.certificate), ssl::context::pem);
  ctx.use_private_key(asio::buffer(id.key), ssl::context::pem);
  return ctx;
}

/// Trusts the generated certificate only, and checks the peer against it.
ssl::context client_context() {
  ssl::context ctx(ssl::context::tls_client);
  ctx.add_certificate_authority(asio::buffer(localhost_identity().certificate));
  ctx.set_verify_mode(ssl::verify_peer);
  return ctx;
}

// ---------------------------------------------------------------------------
// A TLS echo: the client writes `data`, the server reads it all and writes it
// back, the client reads it; then both shut TLS down.

struct echo_result {
  std::string echoed;
  std::size_t written = 0, read = 0;
  steady::duration write_time{}, read_time{};
  boost::system::error_code server_end;  // the server's read after the data
};

asio::awaitable<void> tls_echo_server(tcp::acceptor& acceptor, ssl::context& tls, std::size_t size,
                                      echo_result& out) {
  ssl::stream<tcp::socket> s(co_await acceptor.async_accept(use_awaitable), tls);
  co_await s.async_handshake(ssl::stream_base::server, use_awaitable);
  std::string got(size, '\0');
  co_await asio::async_read(s, asio::buffer(got), use_awaitable);
  co_await asio::async_write(s, asio::buffer(got), use_awaitable);
  char c;
  auto [ec, n] = co_await s.async_read_some(asio::buffer(&c, 1), as_tuple);  // close_notify
  out.server_end = ec;
  co_await s.async_shutdown(use_awaitable);
}

/// The client's part once connected and shaken hands.
template <typename Stream>
asio::awaitable<void> tls_echo_client(Stream& s, const std::string& data, echo_result& out) {
  const auto t0 = steady::now();
  out.written = co_await asio::async_write(s, asio::buffer(data), use_awaitable);
  const auto t1 = steady::now();
  out.echoed.assign(data.size(), '\0');
  out.read = co_await asio::async_read(s, asio::buffer(out.echoed), use_awaitable);
  out.read_time = steady::now() - t1;
  out.write_time = t1 - t0;
}

void check_echo(const echo_result& r, const std::string& data, std::uint64_t unpaid_read) {
  BOOST_TEST(r.written == data.size());
  BOOST_TEST(r.read == data.size());
  BOOST_TEST((r.echoed == data));
  BOOST_TEST(r.server_end == asio::error::eof, r.server_end.message());
  // Each direction's bucket held at most its capacity when the phase began.
  BOOST_TEST((r.write_time >= min_time(data.size(), kCapacity)), "write " << ms(r.write_time));
  BOOST_TEST((r.write_time < max_time(data.size())), "write " << ms(r.write_time));
  BOOST_TEST((r.read_time >= min_time(data.size(), kCapacity + unpaid_read)),
             "read " << ms(r.read_time));
  BOOST_TEST((r.read_time < max_time(data.size())), "read " << ms(r.read_time));
  BOOST_TEST_MESSAGE("write " << ms(r.write_time) << " ms, read " << ms(r.read_time) << " ms");
}

}  // namespace

BOOST_AUTO_TEST_SUITE(stream_layers)

// ssl::stream<rate_limited_stream<tcp::socket>>: the limits count TLS
// records (at least the plaintext), reads wait for readability first.
BOOST_AUTO_TEST_CASE(tls_over_the_limited_layer) {
  const std::string data = pattern(100000, 1);
  asio::io_context ctx;
  ratelimit::token_bucket reads(ctx, kCapacity, per_second(kRate));
  ratelimit::token_bucket writes(ctx, kCapacity, per_second(kRate));
  tcp::acceptor acceptor = loopback_acceptor(ctx);
  ssl::context server_tls = server_context(), client_tls = client_context();
  echo_result r;
  auto client = [&]() -> asio::awaitable<void> {
    ssl::stream<ratelimit::rate_limited_stream<tcp::socket>> s(ctx, client_tls);
    s.next_layer().set_read_limits(limit(reads));
    s.next_layer().set_write_limits(limit(writes));
    s.next_layer().set_slice(kSlice);
    s.set_verify_callback(ssl::host_name_verification("localhost"));
    co_await s.lowest_layer().async_connect(acceptor.local_endpoint(), use_awaitable);
    co_await s.async_handshake(ssl::stream_base::client, use_awaitable);
    co_await tls_echo_client(s, data, r);
    co_await s.async_shutdown(use_awaitable);
  };
  runner run(ctx);
  run.spawn("server", tls_echo_server(acceptor, server_tls, data.size(), r));
  run.spawn("client", client());
  run.run();
  check_echo(r, data, 0);
}

// rate_limited_stream<ssl::stream<tcp::socket>>: the limits count plaintext;
// reads pay after reading (at most one slice ahead of the limit).
BOOST_AUTO_TEST_CASE(limited_layer_over_tls) {
  const std::string data = pattern(100000, 2);
  asio::io_context ctx;
  ratelimit::token_bucket reads(ctx, kCapacity, per_second(kRate));
  ratelimit::token_bucket writes(ctx, kCapacity, per_second(kRate));
  tcp::acceptor acceptor = loopback_acceptor(ctx);
  ssl::context server_tls = server_context(), client_tls = client_context();
  echo_result r;
  auto client = [&]() -> asio::awaitable<void> {
    ratelimit::rate_limited_stream<ssl::stream<tcp::socket>> s(ctx, client_tls);
    s.set_read_limits(limit(reads));
    s.set_write_limits(limit(writes));
    s.set_slice(kSlice);
    s.next_layer().set_verify_callback(ssl::host_name_verification("localhost"));
    co_await s.lowest_layer().async_connect(acceptor.local_endpoint(), use_awaitable);
    co_await s.next_layer().async_handshake(ssl::stream_base::client, use_awaitable);
    co_await tls_echo_client(s, data, r);
    co_await s.next_layer().async_shutdown(use_awaitable);
  };
  runner run(ctx);
  run.spawn("server", tls_echo_server(acceptor, server_tls, data.size(), r));
  run.spawn("client", client());
  run.run();
  check_echo(r, data, kSlice);
}

// The generated certificate is really checked: a client expecting another
// host name fails the handshake through the limited layer; one expecting
// "localhost" passes and sees the certificate's subject.
BOOST_AUTO_TEST_CASE(generated_certificate_is_verified) {
  asio::io_context ctx;
  ratelimit::token_bucket bucket(ctx, kCapacity, per_second(kRate));
  tcp::acceptor acceptor = loopback_acceptor(ctx);
  ssl::context server_tls = server_context(), client_tls = client_context();
  std::vector<boost::system::error_code> client_ec, server_ec;
  std::string subject;
  auto server = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 2; ++i) {
      ssl::stream<tcp::socket> s(co_await acceptor.async_accept(use_awaitable), server_tls);
      auto [ec] = co_await s.async_handshake(ssl::stream_base::server, as_tuple);
      server_ec.push_back(ec);
    }
  };
  auto client = [&]() -> asio::awaitable<void> {
    for (const char* host : {"example.com", "localhost"}) {
      ssl::stream<ratelimit::rate_limited_stream<tcp::socket>> s(ctx, client_tls);
      s.next_layer().set_limits(limit(bucket));
      s.set_verify_callback(ssl::host_name_verification(host));
      co_await s.lowest_layer().async_connect(acceptor.local_endpoint(), use_awaitable);
      auto [ec] = co_await s.async_handshake(ssl::stream_base::client, as_tuple);
      client_ec.push_back(ec);
      if (ec) continue;
      X509* peer = SSL_get0_peer_certificate(s.native_handle());
      char cn[64] = {};
      if (peer &&
          X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, cn, sizeof cn) > 0)
        subject = cn;
      co_await s.async_shutdown(as_tuple);  // the server has gone: any outcome
    }
  };
  runner run(ctx);
  run.spawn("server", server());
  run.spawn("client", client());
  run.run();
  BOOST_REQUIRE(client_ec.size() == 2u);
  BOOST_TEST((client_ec[0].category() == asio::error::get_ssl_category()), client_ec[0].message());
  BOOST_TEST(!client_ec[1], client_ec[1].message());
  BOOST_TEST(subject == "localhost");
  BOOST_REQUIRE(server_ec.size() == 2u);
  BOOST_TEST(!!server_ec[0]);  // the client's alert
  BOOST_TEST(!server_ec[1], server_ec[1].message());
}

// ---------------------------------------------------------------------------
// Beast HTTP: a POST with a 30 KB body, a response with a 100 KB body.

namespace {

template <typename ClientNext, typename ServerStream>
void http_exchange(std::uint64_t unpaid_read) {
  constexpr bool server_limited = !std::is_same_v<ServerStream, tcp::socket>;
  const std::string request_body = pattern(30000, 3), response_body = pattern(100000, 4);
  asio::io_context ctx;
  ratelimit::token_bucket client_reads(ctx, kCapacity, per_second(kRate));
  ratelimit::token_bucket client_writes(ctx, kCapacity, per_second(kRate));
  ratelimit::token_bucket server_writes(ctx, kCapacity, per_second(kRate));
  tcp::acceptor acceptor = loopback_acceptor(ctx);
  std::string got_request, got_response, target;
  unsigned status = 0;
  std::size_t request_bytes = 0, response_bytes = 0;
  steady::duration write_time{}, read_time{};

  auto server = [&]() -> asio::awaitable<void> {
    ServerStream s(co_await acceptor.async_accept(use_awaitable));
    if constexpr (server_limited) {
      s.set_write_limits(limit(server_writes));
      s.set_slice(kSlice);
    }
    beast::flat_buffer buffer;
    http::request<http::string_body> req;
    co_await http::async_read(s, buffer, req, use_awaitable);
    target = std::string(req.target());
    got_request = std::move(req.body());
    http::response<http::string_body> res(http::status::ok, req.version());
    res.set(http::field::content_type, "application/octet-stream");
    res.body() = response_body;
    res.prepare_payload();
    co_await http::async_write(s, res, use_awaitable);
  };
  auto client = [&]() -> asio::awaitable<void> {
    ratelimit::rate_limited_stream<ClientNext> s(ctx);
    s.set_read_limits(limit(client_reads));
    s.set_write_limits(limit(client_writes));
    s.set_slice(kSlice);
    co_await s.next_layer().async_connect(acceptor.local_endpoint(), use_awaitable);
    http::request<http::string_body> req(http::verb::post, "/upload", 11);
    req.set(http::field::host, "localhost");
    req.body() = request_body;
    req.prepare_payload();
    const auto t0 = steady::now();
    request_bytes = co_await http::async_write(s, req, use_awaitable);
    const auto t1 = steady::now();
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    response_bytes = co_await http::async_read(s, buffer, res, use_awaitable);
    read_time = steady::now() - t1;
    write_time = t1 - t0;
    status = res.result_int();
    got_response = std::move(res.body());
  };
  runner run(ctx);
  run.spawn("server", server());
  run.spawn("client", client());
  run.run();

  BOOST_TEST(target == "/upload");
  BOOST_TEST((got_request == request_body));
  BOOST_TEST(status == 200u);
  BOOST_TEST((got_response == response_body));
  BOOST_TEST(request_bytes > request_body.size());  // with the header
  BOOST_TEST(response_bytes > response_body.size());
  BOOST_TEST((write_time >= min_time(request_bytes, kCapacity)), "write " << ms(write_time));
  BOOST_TEST((write_time < max_time(request_bytes)), "write " << ms(write_time));
  BOOST_TEST((read_time >= min_time(response_bytes, kCapacity + unpaid_read)),
             "read " << ms(read_time));
  BOOST_TEST((read_time < max_time(response_bytes)), "read " << ms(read_time));
  BOOST_TEST_MESSAGE("write " << ms(write_time) << " ms, read " << ms(read_time) << " ms");
}

}  // namespace

// Client over rate_limited_stream<tcp::socket>; the server writes its
// response through a limited stream too.
BOOST_AUTO_TEST_CASE(http_over_limited_socket) {
  http_exchange<tcp::socket, ratelimit::rate_limited_stream<tcp::socket>>(0);
}

// Client over rate_limited_stream<beast::tcp_stream> (reads pay after
// reading); a plain server.
BOOST_AUTO_TEST_CASE(http_over_limited_tcp_stream) {
  http_exchange<beast::tcp_stream, tcp::socket>(kSlice);
}

// cancel() and close() over Beast's tcp_stream (which has no cancel(ec) or
// close(ec): its own throwing forms are called): a read pending in the
// socket and a read waiting to pay a debt both complete with operation_aborted.
BOOST_AUTO_TEST_CASE(cancel_and_close_reach_a_beast_tcp_stream) {
  asio::io_context ctx;
  tcp::acceptor acc(ctx, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  beast::tcp_stream client(ctx);
  client.connect(acc.local_endpoint());
  tcp::socket server = acc.accept();
  ratelimit::rate_limited_stream<beast::tcp_stream> s(std::move(client));
  ratelimit::token_bucket bucket(ctx, 100, per_second(1), ratelimit::start_empty);
  std::array<char, 16> buf{};
  boost::system::error_code ec;
  std::size_t n = 99;
  bool done = false;
  auto record = [&](boost::system::error_code e, std::size_t k) {
    ec = e;
    n = k;
    done = true;
  };
  auto run_until_done = [&] {
    for (int i = 0; i < 2000 && !done; ++i) {
      ctx.restart();
      ctx.run_one_for(5ms);
    }
  };

  // Unlimited: the read is the tcp_stream's, pending in the socket.
  s.async_read_some(asio::buffer(buf), record);
  ctx.restart();
  ctx.run_for(20ms);
  BOOST_REQUIRE(!done);
  s.cancel();
  run_until_done();
  BOOST_REQUIRE(done);
  BOOST_TEST(ec == asio::error::operation_aborted);
  BOOST_TEST(n == 0u);

  // Still usable after cancel(); now limited: the read reads and completes,
  // owing its bytes (nothing to pay with); the next waits to pay them first.
  s.set_read_limits(limit(bucket));
  asio::write(server, asio::buffer("hello", 5));
  done = false;
  s.async_read_some(asio::buffer(buf), record);
  run_until_done();
  BOOST_REQUIRE(done);
  BOOST_TEST(!ec);
  BOOST_TEST(n == 5u);
  BOOST_TEST(std::string(buf.data(), 5) == "hello");
  done = false;
  s.async_read_some(asio::buffer(buf), record);
  ctx.restart();
  ctx.run_for(50ms);
  BOOST_REQUIRE(!done);  // paying the debt
  BOOST_TEST(bucket.waiting() == 1u);
  s.close();
  BOOST_TEST(s.is_closed());
  BOOST_TEST(!s.next_layer().socket().is_open());
  run_until_done();
  BOOST_REQUIRE(done);
  BOOST_TEST(ec == asio::error::operation_aborted);
  BOOST_TEST(n == 0u);
  BOOST_TEST(bucket.waiting() == 0u);

  // Later operations fail at once (outside the call).
  done = false;
  s.async_write_some(asio::buffer("x", 1), record);
  BOOST_TEST(!done);
  run_until_done();
  BOOST_REQUIRE(done);
  BOOST_TEST(ec == asio::error::operation_aborted);
}

// ---------------------------------------------------------------------------
// WebSocket echo, both ends over rate_limited_stream<tcp::socket>, closed by
// either end (the teardown overloads run in both roles).

namespace {

void websocket_echo(bool client_closes) {
  // Text (even) and binary (odd) messages.
  const std::vector<std::string> messages = {std::string(), pattern(10, 5), pattern(3000, 6, true),
                                             pattern(50000, 7)};
  std::uint64_t total = 0;
  for (const std::string& m : messages)
    total += m.size();
  asio::io_context ctx;
  ratelimit::token_bucket client_reads(ctx, kCapacity, per_second(kRate));
  ratelimit::token_bucket client_writes(ctx, kCapacity, per_second(kRate));
  ratelimit::token_bucket server_writes(ctx, kCapacity, per_second(kRate));
  tcp::acceptor acceptor = loopback_acceptor(ctx);
  std::vector<std::string> echoed;
  std::vector<bool> binary;
  boost::system::error_code server_end, client_end;
  websocket::close_code server_saw{}, client_saw{};
  bool server_closed = false, client_closed = false;
  std::size_t server_echoed = 0;
  steady::duration took{};

  auto server = [&]() -> asio::awaitable<void> {
    websocket::stream<ratelimit::rate_limited_stream<tcp::socket>> ws(
        co_await acceptor.async_accept(use_awaitable));
    ws.next_layer().set_write_limits(limit(server_writes));
    ws.next_layer().set_slice(kSlice);
    co_await ws.async_accept(use_awaitable);
    for (;;) {
      beast::flat_buffer buffer;
      auto [ec, n] = co_await ws.async_read(buffer, as_tuple);
      if (ec) {
        server_end = ec;
        server_saw = static_cast<websocket::close_code>(ws.reason().code);
        break;
      }
      ws.binary(ws.got_binary());
      co_await ws.async_write(buffer.data(), use_awaitable);
      if (++server_echoed == messages.size() && !client_closes) {
        co_await ws.async_close(websocket::close_code::going_away, use_awaitable);
        server_closed = true;
        break;
      }
    }
  };
  auto client = [&]() -> asio::awaitable<void> {
    websocket::stream<ratelimit::rate_limited_stream<tcp::socket>> ws(ctx);
    ws.next_layer().set_read_limits(limit(client_reads));
    ws.next_layer().set_write_limits(limit(client_writes));
    ws.next_layer().set_slice(kSlice);
    co_await beast::get_lowest_layer(ws).async_connect(acceptor.local_endpoint(), use_awaitable);
    co_await ws.async_handshake("localhost", "/echo", use_awaitable);
    const auto t0 = steady::now();
    for (std::size_t i = 0; i < messages.size(); ++i) {
      ws.binary(i % 2 == 1);
      co_await ws.async_write(asio::buffer(messages[i]), use_awaitable);
      beast::flat_buffer buffer;
      const std::size_t n = co_await ws.async_read(buffer, use_awaitable);
      echoed.push_back(n == buffer.size() ? beast::buffers_to_string(buffer.data()) : "?");
      binary.push_back(ws.got_binary());
    }
    took = steady::now() - t0;
    if (client_closes) {
      co_await ws.async_close(websocket::close_code::normal, use_awaitable);
      client_closed = true;
    } else {
      beast::flat_buffer buffer;
      auto [ec, n] = co_await ws.async_read(buffer, as_tuple);
      client_end = ec;
      client_saw = static_cast<websocket::close_code>(ws.reason().code);
    }
  };
  runner run(ctx);
  run.spawn("server", server());
  run.spawn("client", client());
  run.run();

  BOOST_TEST(server_echoed == messages.size());
  BOOST_REQUIRE(echoed.size() == messages.size());
  for (std::size_t i = 0; i < messages.size(); ++i) {
    BOOST_TEST((echoed[i] == messages[i]), "message " << i);
    BOOST_TEST(binary[i] == (i % 2 == 1), "message " << i);
  }
  if (client_closes) {
    BOOST_TEST(client_closed);
    BOOST_TEST((server_end == websocket::error::closed), server_end.message());
    BOOST_TEST((server_saw == websocket::close_code::normal));
  } else {
    BOOST_TEST(server_closed);
    BOOST_TEST((client_end == websocket::error::closed), client_end.message());
    BOOST_TEST((client_saw == websocket::close_code::going_away));
  }
  // Each direction of the client carried `total` payload bytes and more.
  BOOST_TEST((took >= min_time(total, kCapacity)), ms(took));
  BOOST_TEST((took < max_time(2 * total)), ms(took));
  BOOST_TEST_MESSAGE("echo " << ms(took) << " ms");
}

}  // namespace

BOOST_AUTO_TEST_CASE(websocket_echo_client_closes) {
  websocket_echo(true);
}

BOOST_AUTO_TEST_CASE(websocket_echo_server_closes) {
  websocket_echo(false);
}

BOOST_AUTO_TEST_SUITE_END()
