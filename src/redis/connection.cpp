//
// src/redis/connection.cpp: the Redis connection (hiredis protocol, Asio I/O).
//
// Everything below runs on one strand. Requests wait in `pending_` until
// written, then in `inflight_` until their reply arrives; replies come back in
// order, so the front of `inflight_` owns the next reply. One timer enforces
// every deadline (a request's deadline is fixed when it starts).
//
#include <ratelimit/redis/connection.hpp>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>

#include <hiredis/hiredis.h>

#include <algorithm>
#include <array>
#include <deque>
#include <mutex>

namespace ratelimit {

namespace asio = boost::asio;
using boost::system::error_code;
using tcp = asio::ip::tcp;
using clock_type = std::chrono::steady_clock;

namespace {

redis_reply convert(const redisReply* r) {
  redis_reply out;
  switch (r->type) {
    case REDIS_REPLY_STRING:
      out.type = redis_reply::kind::string;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_STATUS:
      out.type = redis_reply::kind::status;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_ERROR:
      out.type = redis_reply::kind::error;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      out.type = redis_reply::kind::integer;
      out.integer = r->integer;
      break;
    case REDIS_REPLY_ARRAY:
      out.type = redis_reply::kind::array;
      out.elements.reserve(r->elements);
      for (std::size_t i = 0; i < r->elements; ++i)
        out.elements.push_back(convert(r->element[i]));
      break;
    default:
      out.type = redis_reply::kind::nil;
      break;
  }
  return out;
}

std::string format_command(const std::vector<std::string>& args) {
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  argv.reserve(args.size());
  lens.reserve(args.size());
  for (const auto& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  char* cmd = nullptr;
  const int len =
      redisFormatCommandArgv(&cmd, static_cast<int>(args.size()), argv.data(), lens.data());
  if (len < 0 || !cmd) throw std::bad_alloc();
  std::string out(cmd, static_cast<std::size_t>(len));
  redisFreeCommand(cmd);
  return out;
}

struct reader_deleter {
  void operator()(redisReader* r) const noexcept { redisReaderFree(r); }
};

}  // namespace

class redis_connection::impl : public std::enable_shared_from_this<impl> {
 public:
  using handler_type = asio::any_completion_handler<signature>;

  impl(const executor_type& ex, redis_config cfg)
      : config_(std::move(cfg)),
        executor_(ex),
        strand_(asio::make_strand(ex)),
        socket_(strand_),
        resolver_(strand_),
        deadline_timer_(strand_),
        connect_timer_(strand_),
        backoff_timer_(strand_) {}

  void start() {
    asio::post(strand_, [self = shared_from_this()] {
      if (self->state_ == state::idle) self->start_connect();
    });
  }

  const redis_config& config() const noexcept { return config_; }
  const executor_type& get_executor() const noexcept { return executor_; }

  void exec(std::vector<std::string> args, handler_type handler) {
    std::string cmd = format_command(args);
    asio::post(strand_,
               [self = shared_from_this(), cmd = std::move(cmd), h = std::move(handler)]() mutable {
                 self->do_exec(std::move(cmd), std::move(h));
               });
  }

  void close() {
    asio::post(strand_, [self = shared_from_this()] { self->do_close(); });
  }

  bool is_connected() const {
    std::lock_guard lk(info_mutex_);
    return connected_flag_;
  }
  std::string last_error() const {
    std::lock_guard lk(info_mutex_);
    return last_error_;
  }
  redis_connection_stats stats() const {
    std::lock_guard lk(info_mutex_);
    return stats_;
  }

 private:
  enum class state { idle, connecting, connected, down, closed };
  enum class kind { user, handshake };

  struct request {
    std::string cmd;
    handler_type handler;  // empty for handshake requests
    kind k = kind::user;
    clock_type::time_point deadline;
  };

  // --- requests ------------------------------------------------------------

  void do_exec(std::string cmd, handler_type h) {
    switch (state_) {
      case state::closed:
        complete(std::move(h), asio::error::operation_aborted, {});
        return;
      case state::down:
        complete(std::move(h), error::redis_unavailable, {});
        return;
      default:
        break;
    }
    pending_.push_back(request{std::move(cmd), std::move(h), kind::user,
                               clock_type::now() + config_.request_timeout});
    arm_deadline();
    if (state_ == state::idle) start_connect();
    flush();
  }

  void complete(handler_type h, error_code ec, redis_reply reply) {
    if (!h) return;
    // Off the strand first (onto the connection's executor), then onto the
    // handler's own executor: handlers never run on the connection's strand.
    auto work = asio::prefer(asio::get_associated_executor(h, executor_),
                             asio::execution::outstanding_work.tracked);
    asio::post(executor_,
               [h = std::move(h), work = std::move(work), ec, r = std::move(reply)]() mutable {
                 asio::dispatch(work, [h = std::move(h), ec, r = std::move(r)]() mutable {
                   std::move(h)(ec, std::move(r));
                 });
               });
  }

  void fail_all(std::deque<request>& q, error_code ec) {
    auto taken = std::move(q);
    q.clear();
    for (auto& r : taken)
      complete(std::move(r.handler), ec, {});
  }

  // --- deadlines -----------------------------------------------------------

  void arm_deadline() {
    if (deadline_armed_) return;
    clock_type::time_point next = clock_type::time_point::max();
    if (!inflight_.empty()) next = std::min(next, inflight_.front().deadline);
    for (const auto& r : pending_)
      next = std::min(next, r.deadline);
    if (next == clock_type::time_point::max()) return;
    deadline_armed_ = true;
    deadline_timer_.expires_at(next);
    deadline_timer_.async_wait([self = shared_from_this()](error_code) {
      self->deadline_armed_ = false;
      self->on_deadline();
    });
  }

  void on_deadline() {
    if (state_ == state::closed) return;
    const auto now = clock_type::now();
    if (!inflight_.empty() && inflight_.front().deadline <= now) {
      // Written and unanswered in time: the server or the link is stuck.
      count_timeouts(1);
      set_last_error("request timed out");
      drop_connection(error::redis_unavailable);
      start_connect();
    }
    std::size_t expired = 0;
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->deadline <= now && it->k == kind::user) {
        complete(std::move(it->handler), error::redis_unavailable, {});
        it = pending_.erase(it);
        ++expired;
      } else {
        ++it;
      }
    }
    count_timeouts(expired);
    arm_deadline();
  }

  // --- connecting ----------------------------------------------------------

  void start_connect() {
    state_ = state::connecting;
    const std::uint64_t gen = ++generation_;
    connect_timer_.expires_after(config_.connect_timeout);
    connect_timer_.async_wait([self = shared_from_this(), gen](error_code ec) {
      if (ec || gen != self->generation_ || self->state_ != state::connecting) return;
      self->resolver_.cancel();
      error_code ignored;
      self->socket_.close(ignored);  // the pending connect completes with an error
    });
    resolver_.async_resolve(
        config_.host, std::to_string(config_.port),
        [self = shared_from_this(), gen](error_code ec, tcp::resolver::results_type results) {
          if (gen != self->generation_ || self->state_ != state::connecting) return;
          if (ec)
            return self->connect_failed("resolve " + self->config_.host + ": " + ec.message());
          asio::async_connect(self->socket_, results,
                              [self, gen](error_code ec, const tcp::endpoint&) {
                                if (gen != self->generation_ || self->state_ != state::connecting)
                                  return;
                                if (ec) return self->connect_failed("connect: " + ec.message());
                                self->connected();
                              });
        });
  }

  void connected() {
    connect_timer_.cancel();
    error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    reader_.reset(redisReaderCreate());
    if (!reader_) throw std::bad_alloc();
    state_ = state::connected;
    attempt_ = 0;
    // Handshake first: AUTH, then SELECT, ahead of everything queued.
    const auto deadline = clock_type::now() + config_.request_timeout;
    if (config_.database != 0)
      pending_.push_front(request{format_command({"SELECT", std::to_string(config_.database)}),
                                  {},
                                  kind::handshake,
                                  deadline});
    if (!config_.password.empty()) {
      std::vector<std::string> auth{"AUTH"};
      if (!config_.username.empty()) auth.push_back(config_.username);
      auth.push_back(config_.password);
      pending_.push_front(request{format_command(auth), {}, kind::handshake, deadline});
    }
    {
      std::lock_guard lk(info_mutex_);
      ++stats_.connects;
      connected_flag_ = true;
    }
    start_read(generation_);
    flush();
    arm_deadline();
  }

  void connect_failed(std::string why) {
    set_last_error(std::move(why));
    {
      std::lock_guard lk(info_mutex_);
      ++stats_.failed_connects;
      connected_flag_ = false;
    }
    error_code ignored;
    socket_.close(ignored);
    connect_timer_.cancel();
    ++generation_;
    // Nobody waits for a server that just refused: fail fast until the next attempt.
    state_ = state::down;
    fail_all(inflight_, error::redis_unavailable);
    fail_all(pending_, error::redis_unavailable);
    const auto base =
        config_.reconnect_min.count() > 0 ? config_.reconnect_min : std::chrono::milliseconds(1);
    auto delay = base * (1LL << std::min(attempt_, 20));
    if (delay > config_.reconnect_max) delay = config_.reconnect_max;
    ++attempt_;
    backoff_timer_.expires_after(delay);
    backoff_timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (ec || self->state_ != state::down) return;
      self->start_connect();
    });
  }

  /// Closes the socket and fails what was written; unwritten requests stay.
  void drop_connection(error_code ec) {
    ++generation_;
    error_code ignored;
    socket_.close(ignored);
    writing_ = false;
    write_buf_.clear();
    {
      std::lock_guard lk(info_mutex_);
      connected_flag_ = false;
    }
    fail_all(inflight_, ec);
    // Handshake requests of the old connection are meaningless on the next one.
    std::erase_if(pending_, [](const request& r) { return r.k == kind::handshake; });
  }

  // --- I/O -----------------------------------------------------------------

  void flush() {
    if (state_ != state::connected || writing_ || pending_.empty()) return;
    write_buf_.clear();
    std::size_t n = 0;
    while (!pending_.empty()) {
      write_buf_ += pending_.front().cmd;
      pending_.front().cmd.clear();
      inflight_.push_back(std::move(pending_.front()));
      pending_.pop_front();
      ++n;
    }
    {
      std::lock_guard lk(info_mutex_);
      stats_.requests += n;
      ++stats_.writes;
    }
    writing_ = true;
    const std::uint64_t gen = generation_;
    asio::async_write(socket_, asio::buffer(write_buf_),
                      [self = shared_from_this(), gen](error_code ec, std::size_t) {
                        if (gen != self->generation_) return;
                        self->writing_ = false;
                        if (ec) return self->connection_lost("write: " + ec.message());
                        self->flush();
                      });
  }

  void start_read(std::uint64_t gen) {
    socket_.async_read_some(asio::buffer(read_buf_),
                            [self = shared_from_this(), gen](error_code ec, std::size_t n) {
                              if (gen != self->generation_) return;
                              if (ec) return self->connection_lost("read: " + ec.message());
                              self->on_data(n, gen);
                            });
  }

  void on_data(std::size_t n, std::uint64_t gen) {
    if (redisReaderFeed(reader_.get(), read_buf_.data(), n) != REDIS_OK)
      return protocol_error("feed failed");
    for (;;) {
      void* raw = nullptr;
      if (redisReaderGetReply(reader_.get(), &raw) != REDIS_OK)
        return protocol_error(reader_->errstr);
      if (!raw) break;
      redis_reply reply = convert(static_cast<redisReply*>(raw));
      freeReplyObject(raw);
      if (inflight_.empty()) return protocol_error("reply without a request");
      request r = std::move(inflight_.front());
      inflight_.pop_front();
      if (r.k == kind::handshake) {
        if (reply.type == redis_reply::kind::error) {
          // Wrong password, unknown database: no use going on with this server.
          drop_connection(error::redis_unavailable);
          return connect_failed("handshake: " + reply.str);
        }
        continue;
      }
      const bool is_error = reply.type == redis_reply::kind::error;
      complete(std::move(r.handler), is_error ? error_code(error::redis_error) : error_code(),
               std::move(reply));
    }
    if (reader_->len - reader_->pos > config_.max_reply_bytes)
      return protocol_error("reply larger than max_reply_bytes");
    start_read(gen);
  }

  void protocol_error(const std::string& why) {
    set_last_error("protocol error: " + why);
    // The request whose reply was bad learns so; the others were merely unlucky.
    if (!inflight_.empty()) {
      request r = std::move(inflight_.front());
      inflight_.pop_front();
      complete(std::move(r.handler), error::redis_bad_reply, {});
    }
    drop_connection(error::redis_unavailable);
    start_connect();
  }

  void connection_lost(std::string why) {
    set_last_error(std::move(why));
    drop_connection(error::redis_unavailable);
    start_connect();
  }

  void do_close() {
    if (state_ == state::closed) return;
    state_ = state::closed;
    ++generation_;
    error_code ignored;
    resolver_.cancel();
    socket_.close(ignored);
    connect_timer_.cancel();
    backoff_timer_.cancel();
    deadline_timer_.cancel();
    {
      std::lock_guard lk(info_mutex_);
      connected_flag_ = false;
    }
    fail_all(inflight_, asio::error::operation_aborted);
    fail_all(pending_, asio::error::operation_aborted);
  }

  void set_last_error(std::string e) {
    std::lock_guard lk(info_mutex_);
    last_error_ = std::move(e);
  }
  void count_timeouts(std::size_t n) {
    if (n == 0) return;
    std::lock_guard lk(info_mutex_);
    stats_.timeouts += n;
  }

  redis_config config_;
  executor_type executor_;
  asio::strand<executor_type> strand_;
  tcp::socket socket_;
  tcp::resolver resolver_;
  asio::steady_timer deadline_timer_;
  asio::steady_timer connect_timer_;
  asio::steady_timer backoff_timer_;
  std::unique_ptr<redisReader, reader_deleter> reader_;
  std::deque<request> pending_;
  std::deque<request> inflight_;
  std::string write_buf_;
  std::array<char, 16 * 1024> read_buf_{};
  state state_ = state::idle;
  std::uint64_t generation_ = 0;
  int attempt_ = 0;
  bool writing_ = false;
  bool deadline_armed_ = false;

  mutable std::mutex info_mutex_;
  bool connected_flag_ = false;
  std::string last_error_;
  redis_connection_stats stats_;
};

redis_connection::redis_connection(const executor_type& ex, redis_config config)
    : impl_(std::make_shared<impl>(ex, std::move(config))) {
  impl_->start();
}

redis_connection::~redis_connection() {
  impl_->close();
}

redis_connection::executor_type redis_connection::get_executor() const noexcept {
  return impl_->get_executor();
}

const redis_config& redis_connection::config() const noexcept {
  return impl_->config();
}

void redis_connection::exec(std::vector<std::string> args,
                            asio::any_completion_handler<signature> handler) {
  impl_->exec(std::move(args), std::move(handler));
}

bool redis_connection::is_connected() const {
  return impl_->is_connected();
}
std::string redis_connection::last_error() const {
  return impl_->last_error();
}
redis_connection_stats redis_connection::stats() const {
  return impl_->stats();
}
void redis_connection::close() {
  impl_->close();
}

}  // namespace ratelimit
