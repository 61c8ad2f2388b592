//
// src/redis/connection.cpp: the Redis connection (hiredis protocol, Asio I/O).
//
// Everything below runs on one strand. Requests wait in `pending_` until
// written, then in `inflight_` until their reply arrives; replies come back in
// order, so the front of `inflight_` owns the next reply. One timer enforces
// every deadline (a request's deadline is fixed when it starts).
//
// Requests are operations (ratelimit/detail/operation.hpp): completing one
// allocates nothing, so failing every request (close, a dropped connection)
// cannot itself fail. Whatever else a handler of the strand allocates (a
// reply, a write buffer, a new wait) may throw std::bad_alloc; every handler
// runs through guarded(), which turns any exception into a failed connection
// (requests written on it fail with redis_unavailable, the connection is
// re-made after a backoff), so that no request is ever left without an answer.
//
// Reconnecting: a connection counts as healthy from its first reply to a
// caller's request (not to AUTH or SELECT) that is not "unavailable" (see
// classify_redis_error). A connection that fails, or closes before it was
// healthy (a server that accepts then drops, a wrong password, an unknown
// database), is a failed attempt: the next one waits reconnect_min, doubling
// up to reconnect_max, and meanwhile requests fail at once. A healthy
// connection that breaks is re-made at once.
//
#include <ratelimit/redis/connection.hpp>
#include <ratelimit/redis/detail/call_window.hpp>
#include <ratelimit/redis/detail/hooks.hpp>
#include <ratelimit/redis/options.hpp>

#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
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
using redis_detail::hiredis_call;
using redis_detail::hiredis_should_fail;

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
      hiredis_should_fail(hiredis_call::format_command)
          ? -1
          : redisFormatCommandArgv(&cmd, static_cast<int>(args.size()), argv.data(), lens.data());
  if (len < 0 || !cmd) throw std::bad_alloc();
  std::unique_ptr<char, void (*)(char*)> owned(cmd, [](char* p) { redisFreeCommand(p); });
  return std::string(cmd, static_cast<std::size_t>(len));
}

struct reader_deleter {
  void operator()(redisReader* r) const noexcept { redisReaderFree(r); }
};
struct reply_deleter {
  void operator()(void* r) const noexcept { freeReplyObject(r); }
};

}  // namespace

/// What redis_connection sees of its implementation.
class redis_connection::impl {
 public:
  using op_base = redis_connection::op_base;
  struct op_deleter {
    void operator()(op_base* op) const noexcept { op->destroy(); }
  };
  using op_ptr = std::unique_ptr<op_base, op_deleter>;

  virtual ~impl() = default;
  virtual void start() = 0;
  virtual const redis_config& config() const noexcept = 0;
  /// Takes `op`; throws (destroying it) when the request cannot be handed
  /// to the strand.
  virtual void exec(std::vector<std::string> args, op_ptr op) = 0;
  virtual void close() noexcept = 0;
  virtual bool is_connected() const = 0;
  virtual std::string last_error() const = 0;
  virtual redis_connection_stats stats() const = 0;
};

namespace {

/// A strand over `ex`, or over the concrete executor `ex` holds (see below).
template <typename Strand>
Strand strand_for(const redis_connection::executor_type& ex) {
  using inner = typename Strand::inner_executor_type;
  if constexpr (std::is_same_v<inner, redis_connection::executor_type>)
    return asio::make_strand(ex);
  else
    return asio::make_strand(*ex.target<inner>());
}

/// The connection, on a strand of type `Strand`. Over the concrete executor
/// when the connection's executor holds an io_context's or a thread_pool's
/// (make_impl): a strand over an any_io_executor allocates each time it is
/// scheduled (Asio 1.81's strand_executor_service queries `blocking` through
/// the type-erased executor, and that query of a class-type property
/// allocates with new), so every completion of a socket or timer operation
/// could throw std::bad_alloc out of run(), losing our read or write
/// handler: the connection then never wrote or read again (writing_ stayed
/// set) and recovered only by being destroyed.
template <typename Strand>
class connection_impl final : public redis_connection::impl,
                              public std::enable_shared_from_this<connection_impl<Strand>> {
 public:
  using executor_type = redis_connection::executor_type;

  connection_impl(const executor_type& ex, redis_config cfg)
      : config_(std::move(cfg)),
        executor_(ex),
        strand_(strand_for<Strand>(ex)),
        socket_(strand_),
        resolver_(strand_),
        deadline_timer_(strand_),
        connect_timer_(strand_),
        backoff_timer_(strand_) {}

  void start() override {
    asio::post(strand_, [self = this->shared_from_this()] {
      self->guarded([&] {
        if (self->state_ == state::idle) self->start_connect();
      });
    });
  }

  const redis_config& config() const noexcept override { return config_; }
  const executor_type& get_executor() const noexcept { return executor_; }

  /// Takes `op`; throws (destroying it) when the request cannot be handed
  /// to the strand.
  void exec(std::vector<std::string> args, op_ptr op) override {
    std::string cmd = format_command(args);
    asio::post(strand_, [self = this->shared_from_this(), cmd = std::move(cmd),
                         op = std::move(op)]() mutable {
      self->guarded([&] { self->do_exec(std::move(cmd), std::move(op)); });
    });
  }

  /// Never throws: the close is posted with memory reserved for it, so a
  /// destructor can call it.
  void close() noexcept override {
    if (close_posted_.exchange(true)) return;
    try {
      asio::post(strand_, close_step{this->shared_from_this(), close_memory_.get()});
    } catch (...) {
      // Only if the strand itself cannot be scheduled (over an
      // any_io_executor, Asio posts its invoker without our allocator): the
      // next handler of ours closes.
      close_wanted_.store(true);
    }
  }

  bool is_connected() const override {
    std::lock_guard lk(info_mutex_);
    return connected_flag_;
  }
  std::string last_error() const override {
    std::lock_guard lk(info_mutex_);
    return last_error_;
  }
  redis_connection_stats stats() const override {
    std::lock_guard lk(info_mutex_);
    return stats_;
  }

 private:
  enum class state { idle, connecting, connected, down, closed };
  enum class kind { user, handshake };

  struct request {
    std::string cmd;
    op_ptr op;  // empty for handshake requests
    kind k = kind::user;
    clock_type::time_point deadline;
  };

  /// Memory for the posted close(): its function and, on a strand over a
  /// concrete executor, the strand's invoker, which Asio posts to the inner
  /// executor with the function's allocator when the strand is idle. (A
  /// strand over an any_io_executor, used only for executors we do not know,
  /// takes neither from here: Asio allocates both with new.)
  using close_memory = detail::upcall_memory<128, 2>;

  /// The posted close(), allocated from memory reserved for it (anything
  /// more from std::allocator, counted in detail::upcall_fallback_allocations,
  /// which tests expect to stay 0).
  struct close_step {
    using allocator_type = detail::upcall_allocator<void, std::allocator<void>, 128, 2>;
    std::shared_ptr<connection_impl> self;
    close_memory* memory;
    allocator_type get_allocator() const noexcept {
      return allocator_type(memory, std::allocator<void>());
    }
    void operator()() const noexcept { self->do_close(); }
  };

  /// Runs a handler's body; an exception (std::bad_alloc while building a
  /// reply, a buffer, a wait) fails the connection instead of escaping.
  template <typename F>
  void guarded(F&& f) noexcept {
    if (close_wanted_.load() && state_ != state::closed) return do_close();
    try {
      f();
    } catch (...) {
      if (state_ != state::closed) connect_failed("out of memory");
    }
  }

  // --- requests ------------------------------------------------------------

  void do_exec(std::string cmd, op_ptr op) {
    switch (state_) {
      case state::closed:
        return complete(std::move(op), asio::error::operation_aborted, {});
      case state::down:
        if (!backoff_armed_) start_connect();  // the backoff wait itself failed: try now
        if (state_ == state::down) return complete(std::move(op), error::redis_unavailable, {});
        break;
      default:
        break;
    }
    request r{std::move(cmd), std::move(op), kind::user,
              clock_type::now() + config_.request_timeout};
    try {
      pending_.push_back(std::move(r));  // strong guarantee: `r` is intact on failure
    } catch (...) {
      return complete(std::move(r.op), error::redis_unavailable, {});
    }
    if (const std::size_t n = callers_outstanding(); n > peak_) {
      peak_ = n;
      std::lock_guard lk(info_mutex_);
      stats_.peak_outstanding = n;
    }
    arm_deadline();
    if (state_ == state::idle) start_connect();
    flush();
  }

  /// Requests of callers queued or written (AUTH and SELECT, at most one of
  /// each, are at the front of one of the queues).
  std::size_t callers_outstanding() const noexcept {
    std::size_t n = pending_.size() + inflight_.size();
    for (const std::deque<request>* q : {&inflight_, &pending_})
      for (std::size_t i = 0; i < q->size() && i < 2; ++i)
        if ((*q)[i].k == kind::handshake) --n;
    return n;
  }

  /// Completes `op` through its handler's executor; allocates nothing.
  void complete(op_ptr op, error_code ec, redis_reply reply) noexcept {
    if (!op) return;
    op->result = {ec, std::move(reply)};
    try {
      op.release()->complete(detail::finish_mode::post, executor_);
    } catch (...) {  // only with executors whose post allocates; the op is gone
    }
  }

  /// Fails every request of `q`, in place: moving the deque out first
  /// allocated (libstdc++ gives a moved-from deque a new map, and so does a
  /// default-constructed one), a std::terminate here when that threw. Nothing
  /// can re-enter `q` meanwhile: complete() only posts.
  void fail_all(std::deque<request>& q, error_code ec) noexcept {
    while (!q.empty()) {
      op_ptr op = std::move(q.front().op);
      q.pop_front();
      complete(std::move(op), ec, {});
    }
  }

  // --- deadlines -----------------------------------------------------------

  void arm_deadline() {
    if (deadline_armed_) return;
    clock_type::time_point next = clock_type::time_point::max();
    for (const auto& r : inflight_)
      next = std::min(next, r.deadline);
    for (const auto& r : pending_)
      next = std::min(next, r.deadline);
    if (next == clock_type::time_point::max()) return;
    deadline_timer_.expires_at(next);
    deadline_timer_.async_wait([self = this->shared_from_this()](error_code) {
      self->deadline_armed_ = false;
      self->guarded([&] { self->on_deadline(); });
    });
    deadline_armed_ = true;
  }

  void on_deadline() {
    if (state_ == state::closed) return;
    const auto now = clock_type::now();
    const bool stuck = std::any_of(inflight_.begin(), inflight_.end(),
                                   [&](const request& r) { return r.deadline <= now; });
    if (stuck) {
      // Written and unanswered in time: the server or the link is stuck.
      count_timeouts(1);
      connection_lost("request timed out");
    }
    std::size_t expired = 0;
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->deadline <= now && it->k == kind::user) {
        complete(std::move(it->op), error::redis_unavailable, {});
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
    healthy_ = false;
    const std::uint64_t gen = ++generation_;
    connect_timer_.expires_after(config_.connect_timeout);
    connect_timer_.async_wait([self = this->shared_from_this(), gen](error_code ec) {
      if (ec || gen != self->generation_ || self->state_ != state::connecting) return;
      self->resolver_.cancel();
      error_code ignored;
      self->socket_.close(ignored);
      // Failed here, not when the pending resolve or connect completes with
      // the error: that completion may never come (Asio builds the resolver's
      // results before calling us; if that throws std::bad_alloc, our handler
      // is destroyed unrun), and the connection would stay "connecting"
      // forever. A late completion finds a new generation and is ignored.
      self->connect_failed("connect: timed out");
    });
    resolver_.async_resolve(
        config_.host, std::to_string(config_.port),
        [self = this->shared_from_this(), gen](error_code ec, tcp::resolver::results_type results) {
          self->guarded([&] {
            if (gen != self->generation_ || self->state_ != state::connecting) return;
            if (ec)
              return self->connect_failed("resolve " + self->config_.host + ": " + ec.message());
            asio::async_connect(
                self->socket_, results, [self, gen](error_code ec, const tcp::endpoint&) {
                  self->guarded([&] {
                    if (gen != self->generation_ || self->state_ != state::connecting) return;
                    if (ec) return self->connect_failed("connect: " + ec.message());
                    self->connected();
                  });
                });
          });
        });
  }

  void connected() {
    connect_timer_.cancel();
    error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    reader_.reset(hiredis_should_fail(hiredis_call::reader_create) ? nullptr : redisReaderCreate());
    if (!reader_) return connect_failed("out of memory (reply reader)");
    state_ = state::connected;
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

  /// A failed attempt (or a connection that failed before it was healthy):
  /// requests fail at once until the next attempt, after the backoff.
  void connect_failed(std::string why) noexcept {
    set_last_error(std::move(why));
    {
      std::lock_guard lk(info_mutex_);
      ++stats_.failed_connects;
    }
    drop_connection(error::redis_unavailable);
    connect_timer_.cancel();
    state_ = state::down;
    fail_all(pending_, error::redis_unavailable);
    const auto delay = std::min<std::chrono::milliseconds>(
        config_.reconnect_max, config_.reconnect_min * (std::int64_t{1} << std::min(attempt_, 30)));
    ++attempt_;
    backoff_armed_ = false;
    try {
      backoff_timer_.expires_after(delay);
      backoff_timer_.async_wait([self = this->shared_from_this()](error_code ec) {
        self->backoff_armed_ = false;
        self->guarded([&] {
          if (ec || self->state_ != state::down) return;
          self->start_connect();
        });
      });
      backoff_armed_ = true;
    } catch (...) {  // no wait: the next request tries at once (do_exec)
    }
  }

  /// Closes the socket and fails what was written; unwritten requests stay.
  void drop_connection(error_code ec) noexcept {
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

  /// The connection broke (or a request on it timed out). Re-made at once
  /// if it had been healthy; otherwise it was a failed attempt.
  void connection_lost(std::string why) noexcept {
    if (!healthy_) return connect_failed(std::move(why));
    set_last_error(std::move(why));
    drop_connection(error::redis_unavailable);
    attempt_ = 0;
    try {
      start_connect();
    } catch (...) {
      connect_failed("out of memory");
    }
  }

  // --- I/O -----------------------------------------------------------------

  void flush() {
    if (state_ != state::connected || writing_ || pending_.empty()) return;
    write_buf_.clear();
    std::size_t n = 0;
    while (!pending_.empty()) {
      write_buf_ += pending_.front().cmd;
      inflight_.push_back(std::move(pending_.front()));  // on failure nothing has moved
      inflight_.back().cmd.clear();
      pending_.pop_front();
      ++n;
    }
    {
      std::lock_guard lk(info_mutex_);
      stats_.requests += n;
      ++stats_.writes;
    }
    const std::uint64_t gen = generation_;
    asio::async_write(socket_, asio::buffer(write_buf_),
                      [self = this->shared_from_this(), gen](error_code ec, std::size_t) {
                        self->guarded([&] {
                          if (gen != self->generation_) return;
                          self->writing_ = false;
                          if (ec) return self->connection_lost("write: " + ec.message());
                          self->flush();
                        });
                      });
    writing_ = true;
  }

  void start_read(std::uint64_t gen) {
    socket_.async_read_some(asio::buffer(read_buf_),
                            [self = this->shared_from_this(), gen](error_code ec, std::size_t n) {
                              self->guarded([&] {
                                if (gen != self->generation_) return;
                                if (ec) return self->connection_lost("read: " + ec.message());
                                self->on_data(n, gen);
                              });
                            });
  }

  void on_data(std::size_t n, std::uint64_t gen) {
    if (hiredis_should_fail(hiredis_call::reader_feed) ||
        redisReaderFeed(reader_.get(), read_buf_.data(), n) != REDIS_OK)
      return connection_lost("out of memory (reply reader)");
    for (;;) {
      void* raw = nullptr;
      if (hiredis_should_fail(hiredis_call::reader_get_reply)) {
        return connection_lost("out of memory (reply)");
      } else if (redisReaderGetReply(reader_.get(), &raw) != REDIS_OK) {
        if (reader_->err == REDIS_ERR_OOM) return connection_lost("out of memory (reply)");
        return protocol_error(reader_->errstr);
      }
      if (!raw) break;
      std::unique_ptr<void, reply_deleter> owned(raw);
      redis_reply reply = convert(static_cast<redisReply*>(raw));
      owned.reset();
      if (inflight_.empty()) return protocol_error("reply without a request");
      const bool is_error = reply.type == redis_reply::kind::error;
      request r = std::move(inflight_.front());
      inflight_.pop_front();
      if (r.k == kind::handshake) {
        // Wrong password, unknown database: a failed attempt (backoff grows).
        // A handshake reply never makes the connection healthy: a refused
        // AUTH ("WRONGPASS" is not "unavailable"), or an accepted AUTH before
        // a refused SELECT, would reset the backoff on every attempt and
        // retry every reconnect_min for ever.
        if (is_error) return connect_failed("handshake: " + reply.str);
        continue;
      }
      if (!is_error || classify_redis_error(reply.str) != redis_error_class::unavailable) {
        healthy_ = true;
        attempt_ = 0;
      }
      complete(std::move(r.op), is_error ? error_code(error::redis_error) : error_code(),
               std::move(reply));
    }
    if (reader_->len - reader_->pos > config_.max_reply_bytes)
      return protocol_error("reply larger than max_reply_bytes");
    start_read(gen);
  }

  void protocol_error(const std::string& why) noexcept {
    // The request whose reply was bad learns so; the others were merely unlucky.
    if (!inflight_.empty()) {
      request r = std::move(inflight_.front());
      inflight_.pop_front();
      complete(std::move(r.op), error::redis_bad_reply, {});
    }
    try {
      connection_lost("protocol error: " + why);
    } catch (...) {
      connection_lost("protocol error");
    }
  }

  void do_close() noexcept {
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

  void set_last_error(std::string e) noexcept {
    std::lock_guard lk(info_mutex_);
    last_error_.swap(e);
  }
  void count_timeouts(std::size_t n) {
    if (n == 0) return;
    std::lock_guard lk(info_mutex_);
    stats_.timeouts += n;
  }

  redis_config config_;
  executor_type executor_;
  // The I/O objects' executor type is the strand itself, not an
  // any_io_executor holding it: Asio takes a tracked copy of an I/O object's
  // executor in every operation it starts (handler_work, a noexcept
  // constructor), and a strand is too large for any_io_executor's small
  // buffer, so that copy allocated, and a std::bad_alloc there was a
  // std::terminate (in async_write, from flush()).
  using strand_type = Strand;
  using timer_type =
      asio::basic_waitable_timer<clock_type, asio::wait_traits<clock_type>, strand_type>;
  strand_type strand_;
  asio::basic_stream_socket<tcp, strand_type> socket_;
  asio::ip::basic_resolver<tcp, strand_type> resolver_;
  timer_type deadline_timer_;
  timer_type connect_timer_;
  timer_type backoff_timer_;
  std::unique_ptr<redisReader, reader_deleter> reader_;
  std::deque<request> pending_;
  std::deque<request> inflight_;
  std::string write_buf_;
  std::array<char, 16 * 1024> read_buf_{};
  state state_ = state::idle;
  std::uint64_t generation_ = 0;
  int attempt_ = 0;       // failed attempts in a row (backoff exponent)
  bool healthy_ = false;  // this connection gave a reply that is not "unavailable"
  bool writing_ = false;
  bool deadline_armed_ = false;
  bool backoff_armed_ = false;

  std::atomic<bool> close_posted_{false};
  std::atomic<bool> close_wanted_{false};
  /// Apart from the connection, so that it outlives it while a block of it is
  /// taken: when the context is destroyed with the close step queued on the
  /// strand and the strand's invoker on the inner executor, the step (and with
  /// it the last reference to the connection) goes first.
  struct release_close_memory {
    void operator()(close_memory* m) const noexcept {
      m->release([](void* p) { delete static_cast<close_memory*>(p); }, m);
    }
  };
  std::unique_ptr<close_memory, release_close_memory> close_memory_{new close_memory};

  std::size_t peak_ = 0;  // stats_.peak_outstanding, read on the strand

  mutable std::mutex info_mutex_;
  bool connected_flag_ = false;
  std::string last_error_;
  redis_connection_stats stats_;
};

std::shared_ptr<redis_connection::impl> make_impl(const redis_connection::executor_type& ex,
                                                  redis_config config) {
  using io = asio::io_context::executor_type;
  using pool = asio::thread_pool::executor_type;
  if (ex.target<io>())
    return std::make_shared<connection_impl<asio::strand<io>>>(ex, std::move(config));
  if (ex.target<pool>())
    return std::make_shared<connection_impl<asio::strand<pool>>>(ex, std::move(config));
  return std::make_shared<connection_impl<asio::strand<redis_connection::executor_type>>>(
      ex, std::move(config));
}

}  // namespace

redis_connection::redis_connection(const executor_type& ex, redis_config config)
    : executor_(ex),
      impl_((validate(config), make_impl(ex, std::move(config)))),
      window_(std::make_shared<redis_detail::call_window>(impl_->config().max_calls_in_flight,
                                                          executor_)) {
  impl_->start();
}

redis_connection::~redis_connection() {
  impl_->close();
}

redis_connection::executor_type redis_connection::get_executor() const noexcept {
  return executor_;
}

const redis_config& redis_connection::config() const noexcept {
  return impl_->config();
}

void redis_connection::start(const std::shared_ptr<impl>& self, std::vector<std::string> args,
                             op_base* op) {
  impl::op_ptr owned(op);
  self->exec(std::move(args), std::move(owned));
}

bool redis_connection::is_connected() const {
  return impl_->is_connected();
}
std::string redis_connection::last_error() const {
  return impl_->last_error();
}
redis_connection_stats redis_connection::stats() const {
  redis_connection_stats s = impl_->stats();
  s.window_waits = window_->waits();
  s.calls_in_flight = window_->out();
  return s;
}
void redis_connection::close() {
  impl_->close();
}

}  // namespace ratelimit
