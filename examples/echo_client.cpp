// A small client for echo_server: sends N lines at once and prints each reply
// with the time it arrived, so the server's rate limit can be seen.
//
//   echo_client 127.0.0.1 5555 --lines 10
//   +0.000 s  hello 1
//   ...
#include "cli.hpp"

#include <boost/asio.hpp>

#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>

namespace asio = boost::asio;
using asio::ip::tcp;

int main(int argc, char* argv[]) {
  std::string host, source, text = "hello";
  std::uint16_t port = 0;
  int lines = 10;
  double timeout = 30;
  cli::parser cli("echo_client", "Sends lines to echo_server, prints the replies.", "HOST PORT");
  cli.address("host", host, "server address")
      .option("port", port, std::uint16_t(1), std::uint16_t(65535), "server port")
      .option("lines", lines, 1, 1000000, "lines to send (all at once)")
      .text("text", text, "each line is TEXT followed by its number")
      .address("source", source, "local address to connect from (e.g. 127.0.0.2: another client)")
      .option("timeout", timeout, 0.001, 31536000.0, "seconds to wait for all replies")
      .operand("host", "HOST")
      .operand("port", "PORT")
      .required("host")
      .required("port");
  if (int rc = cli.parse(argc, argv); rc >= 0) return rc;

  try {
    asio::io_context ctx;
    tcp::socket sock(ctx);
    const tcp::endpoint server(asio::ip::make_address(host), port);
    sock.open(server.protocol());
    if (!source.empty()) sock.bind(tcp::endpoint(asio::ip::make_address(source), 0));
    sock.connect(server);
    const auto t0 = std::chrono::steady_clock::now();

    std::string out;
    for (int i = 1; i <= lines; ++i)
      out += text + ' ' + std::to_string(i) + '\n';
    std::printf("sent %d lines at once to %s:%u\n", lines, host.c_str(), unsigned(port));
    std::fflush(stdout);

    asio::async_write(sock, asio::buffer(out), [](boost::system::error_code, std::size_t) {});
    std::string in;
    int received = 0;
    bool failed = false;
    std::function<void()> read_line = [&] {
      asio::async_read_until(
          sock, asio::dynamic_buffer(in), '\n', [&](boost::system::error_code ec, std::size_t n) {
            if (ec) {
              std::printf("connection ended: %s\n", ec.message().c_str());
              failed = true;
              return;
            }
            const double t =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            std::printf("+%.3f s  %s", t, in.substr(0, n).c_str());
            std::fflush(stdout);
            in.erase(0, n);
            if (++received < lines) read_line();
          });
    };
    if (lines > 0) read_line();
    ctx.run_for(std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::duration<double>(timeout)));
    if (received < lines && !failed) std::printf("timed out after %.1f s\n", timeout);
    return received == lines ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "echo_client: " << e.what() << '\n';
    return 1;
  }
}
