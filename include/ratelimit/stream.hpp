//
// ratelimit/stream.hpp: byte-rate limits for Asio streams.
//
#ifndef RATELIMIT_STREAM_HPP
#define RATELIMIT_STREAM_HPP

#include <ratelimit/detail/wrapped_handler.hpp>
#include <ratelimit/joint.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/cancellation_state.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/defer.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/socket_base.hpp>
#include <boost/beast/core/buffers_prefix.hpp>
#include <boost/beast/websocket/teardown.hpp>
#include <boost/system/error_code.hpp>

#if !defined(BOOST_ASIO_WINDOWS) && !defined(__CYGWIN__)
#include <sys/socket.h>
#include <sys/types.h>

#include <cerrno>
#endif

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace ratelimit {

namespace detail {

/// A next layer that can wait until it is readable (a socket).
template <typename S>
concept waits_for_read = requires(S& s) {
  s.async_wait(boost::asio::socket_base::wait_read, [](boost::system::error_code) {});
};

/// A next layer that says how many bytes can be read without blocking.
template <typename S>
concept says_available = requires(S& s, boost::system::error_code& ec) {
  { s.available(ec) } -> std::convertible_to<std::size_t>;
};

#if !defined(BOOST_ASIO_WINDOWS) && !defined(__CYGWIN__)
/// A socket over a POSIX descriptor (it can be read without blocking and
/// without Asio's reactor: receive_now).
template <typename S>
concept receives_now = waits_for_read<S> && requires(S& s) {
  typename S::protocol_type;  // (a socket: not a posix::stream_descriptor, which recv refuses)
  { s.native_handle() } -> std::convertible_to<int>;
};

/// Reads what is there now without blocking: true when done (bytes, EOF or an
/// error), false when nothing is there.
template <typename S>
bool receive_now(S& s, void* data, std::size_t size, std::size_t& n,
                 boost::system::error_code& ec) {
  for (;;) {
    const ::ssize_t r = ::recv(s.native_handle(), data, size, MSG_DONTWAIT);
    if (r > 0) {
      n = static_cast<std::size_t>(r);
      return true;
    }
    if (r == 0) {
      ec = boost::asio::error::eof;
      return true;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    ec = boost::system::error_code(errno, boost::asio::error::get_system_category());
    return true;
  }
}

/// Whether the socket holds an end of file or an error to read now (`ec`
/// then says which), without taking anything from it.
template <typename S>
bool ends_now(S& s, boost::system::error_code& ec) {
  char c;
  for (;;) {
    const ::ssize_t r = ::recv(s.native_handle(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r > 0) return false;
    if (r == 0) {
      ec = boost::asio::error::eof;
      return true;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    ec = boost::system::error_code(errno, boost::asio::error::get_system_category());
    return true;
  }
}
#else
template <typename S>
concept receives_now = false;
template <typename S>
bool ends_now(S&, boost::system::error_code&) {
  return false;
}
template <typename S>
bool receive_now(S&, void*, std::size_t, std::size_t&, boost::system::error_code&) {
  return false;
}
#endif

template <typename S>
concept closes = requires(S& s, boost::system::error_code& ec) {
  s.close(ec);
};

template <typename S>
concept cancels = requires(S& s, boost::system::error_code& ec) {
  s.cancel(ec);
};
template <typename S>
concept cancels_or_throws = requires(S& s) {
  s.cancel();
};  // (Beast's basic_stream)
template <typename S>
concept closes_or_throws = requires(S& s) {
  s.close();
};

template <typename S>
concept has_lowest_layer = requires(S& s) {
  typename S::lowest_layer_type;
  s.lowest_layer();
};

/// `lowest_layer_type` where the next layer has one (ssl::stream over a
/// rate-limited stream needs it).
template <typename NextLayer, bool = has_lowest_layer<NextLayer>>
struct lowest_layer_base {};
template <typename NextLayer>
struct lowest_layer_base<NextLayer, true> {
  using lowest_layer_type = typename NextLayer::lowest_layer_type;
};

/// One direction of a rate-limited stream (reads or writes): its limits and
/// the one operation that may wait for tokens there at a time.
using per_byte_type = boost::container::small_vector<std::uint64_t, 4>;

/// Makes each part ask for `bytes` bytes' tokens (in place).
template <typename Clock, typename WaitTraits>
void scale(joint_parts<Clock, WaitTraits>& parts, const per_byte_type& per_byte,
           std::uint64_t bytes) {
  for (std::size_t i = 0; i < parts.size(); ++i)
    parts[i] = std::move(parts[i]).with_tokens(per_byte[i] * bytes);
}

/// Gives back, part by part, the tokens of `unused` bytes.
inline void give_back_bytes(joint_receipt& r, const per_byte_type& per_byte, std::uint64_t unused) {
  if (unused == 0 || r.empty()) return;
  for (std::size_t i = 0; i < r.size() && i < per_byte.size(); ++i)
    r[i].give_back(per_byte[i] * unused);
}

template <typename Clock, typename WaitTraits>
struct stream_direction {
  using part_type = basic_part<Clock, WaitTraits>;

  std::mutex limits_mutex;
  std::vector<part_type> limits;  // guarded by limits_mutex
  std::atomic<bool> limited{false};
  std::atomic<std::uint64_t> version{0};  // bumped by every set()
  // The largest request the limits took so far without exceeds_capacity
  // (learned by halving; reset when the limits are set).
  std::atomic<std::uint64_t> cap_hint{std::numeric_limits<std::uint64_t>::max()};

  // The operation waiting for tokens: close() and cancel() emit `signal`,
  // which the acquire is bound to, under `wait_mutex` (the acquire is
  // initiated under it too, so an emission never races the installation).
  // The one operation of this direction at a time: its limits as of its
  // request (each part asking for the request's bytes), their tokens per
  // byte, and its receipt. Here rather than in the operation, which Asio
  // moves at every step.
  joint_parts<Clock, WaitTraits> op_limits;
  per_byte_type op_per_byte;
  std::uint64_t op_version = ~std::uint64_t{0};  // of the limits op_limits copies
  joint_receipt op_receipt;
  // When the limits are one token bucket (the common case), what the
  // operation takes now is taken from it directly and given back to it
  // directly: what a joint request of one part does, without the request and
  // its receipt (a third of an unlimited stream's cost over the socket: W8).
  // `op_solo` is op_limits[0]'s bucket (kept alive by it), `op_solo_held` the
  // tokens taken so and not given back. A grant that was waited for is a
  // joint acquire's, in op_receipt.
  bucket_impl<Clock, WaitTraits>* op_solo = nullptr;
  std::uint64_t op_solo_held = 0;

  // A per-operation cancellation of a read whose deferred start is queued
  // (the start completes it with operation_aborted; see start_read).
  std::atomic<bool> start_cancelled{false};

  // Bytes reads delivered without paying for them (what the limits did not
  // hold when they read, or a payment that failed): the next read pays them
  // first (the one read at a time).
  std::uint64_t debt = 0;

  // Bumped by the stream's cancel() and close(): an operation that sees it
  // changed since it began stops at its next step (a cancel() that came
  // while a grant or readiness was on its way is not lost).
  std::atomic<std::uint64_t> cancels{0};

  std::mutex wait_mutex;
  boost::asio::cancellation_signal signal;
  bool waiting = false;

  /// The limits as of now, and the most bytes they can grant at once as far
  /// as the buckets' capacities tell (keys' are learned: cap_hint).
  /// Brings op_limits and op_per_byte up to the limits as of now (copied
  /// only when they were set since the last operation); sets `cap` to the
  /// most bytes they can grant at once as far as the buckets' capacities
  /// tell (keys' are learned: cap_hint). False when there are none.
  bool copy_limits(std::uint64_t& cap) {
    cap = cap_hint.load(std::memory_order_relaxed);
    if (!limited.load(std::memory_order_acquire)) return false;
    if (op_version != version.load(std::memory_order_acquire)) {
      std::lock_guard lk(limits_mutex);
      op_limits.assign(limits.begin(), limits.end());
      op_per_byte.clear();
      for (const part_type& p : op_limits)
        op_per_byte.push_back(p.tokens());
      op_solo = op_limits.size() == 1 ? part_access::bucket(op_limits[0]) : nullptr;
      op_version = version.load(std::memory_order_relaxed);
    }
    const std::uint64_t hint = cap;
    cap = std::numeric_limits<std::uint64_t>::max();
    for (std::size_t i = 0; i < op_limits.size(); ++i) {
      const std::uint64_t per = op_per_byte[i];
      cap = std::min(cap, std::numeric_limits<std::uint64_t>::max() / per);  // no overflow
      if (std::optional<std::uint64_t> c = op_limits[i].capacity())
        cap = std::min(cap, *c / per);
      else
        cap = std::min(cap, hint);  // (learned: only where the capacity is not known)
    }
    if (cap == 0) cap = 1;  // (a part over 1 byte's tokens: the request fails as it must)
    return !op_limits.empty();
  }

  /// Takes the tokens of `bytes` bytes now, all or nothing, as a joint
  /// try_acquire of op_limits scaled to `bytes` would (false, `ec` clear, when
  /// they are not there or a request is ahead; `ec` set when it fails).
  bool take(std::uint64_t bytes, boost::system::error_code& ec) {
    op_solo_held = 0;
    if (op_solo) {
      const std::uint64_t n = op_per_byte[0] * bytes;
      if (op_solo->try_get(n)) {
        op_solo_held = n;
        if (!op_receipt.empty()) op_receipt = joint_receipt();  // (none held: as a joint grant)
        return true;
      }
      // Not there, or it fails (closed, over the capacity): the joint
      // request says which, as it would have.
    }
    scale(op_limits, op_per_byte, bytes);
    std::optional<typename Clock::duration> retry;
    std::optional<joint_receipt> r =
        try_acquire(std::span<const part_type>(op_limits.data(), op_limits.size()), retry, ec);
    if (!r) return false;
    op_receipt = std::move(*r);
    return true;
  }

  /// Takes the tokens of `want` bytes (at most `cap`) now if the limits
  /// hold them, halving past a capacity (learned into cap_hint and `cap`);
  /// true when taken (`granted` says how many bytes). False, `ec` clear, when
  /// not there; false with `ec` set when the request fails.
  bool take_now(std::uint64_t want, std::uint64_t& cap, std::uint64_t& granted,
                boost::system::error_code& ec) {
    for (;;) {
      want = std::min(want, cap);
      if (take(want, ec)) {
        granted = want;
        return true;
      }
      if (ec != error::exceeds_capacity || want <= 1) return false;
      ec = {};
      cap_hint.store(want / 2, std::memory_order_relaxed);
      cap = want / 2;
    }
  }

  /// Gives back the tokens of `unused` bytes of what the operation holds.
  void give_back(std::uint64_t unused) {
    if (unused == 0) return;
    if (op_solo_held != 0) {
      const std::uint64_t n = std::min(op_solo_held, op_per_byte[0] * unused);
      op_solo_held -= n;
      op_solo->return_tokens(n);
      return;
    }
    give_back_bytes(op_receipt, op_per_byte, unused);
  }

  /// The operation's grant is used: nothing of it is given back again.
  void release() noexcept {
    if (!op_receipt.empty()) op_receipt = joint_receipt();
    op_solo_held = 0;
  }

  void set(std::vector<part_type> parts) {
    for (const part_type& p : parts)
      if (p.remote())
        throw std::invalid_argument("ratelimit: a stream's limit cannot be a remote limiter");
    for (std::size_t i = 0; i < parts.size(); ++i)
      if (parts[i].tokens() == 0)
        throw std::invalid_argument("ratelimit: a stream's limit takes at least 1 token a byte");
    std::lock_guard lk(limits_mutex);
    limits = std::move(parts);
    cap_hint.store(std::numeric_limits<std::uint64_t>::max(), std::memory_order_relaxed);
    version.fetch_add(1, std::memory_order_release);
    limited.store(!limits.empty(), std::memory_order_release);
  }

  void emit(boost::asio::cancellation_type_t type) {
    std::lock_guard lk(wait_mutex);
    if (waiting) signal.emit(type);
  }
};

template <typename Clock, typename WaitTraits>
struct stream_state {
  stream_direction<Clock, WaitTraits> read, write;
  std::atomic<std::size_t> slice;
  std::atomic<bool> closed{false};

  explicit stream_state(std::size_t s) : slice(s) {}
};

/// The user's per-operation cancellation, forwarded to the direction's
/// signal while the operation waits for tokens.
template <typename Clock, typename WaitTraits>
struct forward_cancellation {
  // (A constructor: slot.emplace() constructs with parentheses, which clang
  // 14 does not accept for an aggregate.)
  forward_cancellation(std::shared_ptr<stream_state<Clock, WaitTraits>> s,
                       stream_direction<Clock, WaitTraits>* d,
                       boost::asio::cancellation_type_t a) noexcept
      : state(std::move(s)), dir(d), accepted(a) {}

  std::shared_ptr<stream_state<Clock, WaitTraits>> state;
  stream_direction<Clock, WaitTraits>* dir;
  boost::asio::cancellation_type_t accepted;
  void operator()(boost::asio::cancellation_type_t type) const {
    if ((type & accepted) != boost::asio::cancellation_type::none) dir->emit(type & accepted);
  }
};

/// The first non-empty buffer of a sequence (a read_some or write_some may
/// transfer less than all of them, as the next layer's does), or an empty one.
template <typename Buffer, typename Buffers>
Buffer first_buffer(const Buffers& buffers) {
  auto it = boost::asio::buffer_sequence_begin(buffers);
  auto end = boost::asio::buffer_sequence_end(buffers);
  for (; it != end; ++it) {
    Buffer b(*it);
    if (b.size() != 0) return b;
  }
  return Buffer();
}

/// A handler of the stream's own wrapping the caller's.
template <typename Handler, typename Body>
using stream_handler = wrapped_handler<Handler, Body>;

/// The body of a write that took its tokens in the initiating call and went
/// straight to the next layer (no composed operation): gives back what a
/// short write did not send.
template <typename Clock, typename WaitTraits>
struct stream_write_done {
  std::shared_ptr<stream_state<Clock, WaitTraits>> state;
  std::uint64_t granted;

  template <typename Handler>
  void operator()(Handler& handler, boost::system::error_code e, std::size_t n) {
    auto& d = state->write;
    if (granted > n) d.give_back(granted - n);
    d.release();
    std::move(handler)(e, n);
  }
};

/// Notes a per-operation cancellation of a read whose deferred start is
/// queued (installed in the caller's slot until the start runs).
template <typename Clock, typename WaitTraits>
struct note_start_cancelled {
  std::shared_ptr<stream_state<Clock, WaitTraits>> state;
  explicit note_start_cancelled(std::shared_ptr<stream_state<Clock, WaitTraits>> s) noexcept
      : state(std::move(s)) {}
  void operator()(boost::asio::cancellation_type_t type) const noexcept {
    if (type != boost::asio::cancellation_type::none)
      state->read.start_cancelled.store(true, std::memory_order_release);
  }
};

/// The body of the deferred start of a socket read whose stream has limits
/// (basic_rate_limited_stream::start_read, read_started).
template <typename Stream, typename Buffers>
struct stream_read_start {
  Stream* stream;  // not touched once the stream is closed or destroyed (nor
                   // moved: no operation may be outstanding then)
  std::shared_ptr<typename Stream::state_type> state;
  std::uint64_t cancels;  // the direction's cancel() generation at the start
  Buffers buffers;

  template <typename Handler>
  void operator()(Handler& handler) {
    Stream::read_started(*this, handler);
  }
};

/// Declared only: a test's window into a stream's state (its read debt).
struct stream_test_access;

}  // namespace detail

/// A stream layer that limits the bytes read and written through it: an
/// AsyncReadStream and AsyncWriteStream over `NextLayer` (a socket, an
/// `ssl::stream`, a Beast `tcp_stream`, another layer), so that
/// `asio::async_read`/`async_write`, Beast's HTTP algorithms and WebSocket
/// stream, and `ssl::stream` work over it, or it over them.
///
/// Reads and writes each have limits: any set of limiters (token buckets,
/// keys of keyed limiters) taken together as one joint request
/// (ratelimit/joint.hpp), one token per byte (a part's `tokens()` is its
/// tokens per byte). A per-stream bucket, buckets shared by many streams (a
/// server's aggregate, a user's connections) and keyed buckets combine
/// freely. Limits can be set, changed or removed from any thread while the
/// stream is in use; an operation uses the limits set when it asks for
/// tokens.
///
/// How an operation takes tokens:
/// - A write takes tokens for what it sends before it sends it: its whole
///   buffer sequence at once (up to the limits' capacity) if the limits hold
///   it now (no request is ahead), otherwise at most one *slice* (`slice()`,
///   16 KiB by default) when the limits give it; what a short write did not
///   send is given back.
/// - A read over a next layer that can wait for readability (a socket)
///   first waits until data is there, holding nothing meanwhile (an idle
///   connection holds no tokens and delays nobody), then takes tokens for
///   its first buffer at once if the limits hold them now, otherwise waits
///   for at most a slice of what is there; it gives back what the read did
///   not use (at once: the data is there). An end of file or an error there
///   is delivered at once, even when the limits are short.
/// - A read over any other next layer (`ssl::stream`, Beast's `tcp_stream`)
///   reads at most min(buffer, slice) first and pays for what it read after
///   reading it if the limits hold those tokens then (all of them, in pieces
///   of at most a limit's capacity): the read completes with its bytes at
///   once, and what it could not pay is the stream's debt, which the next
///   read pays (waiting for tokens if need be; stopped or cancelled, it reads
///   nothing and the debt stays) before it reads. Limits that fail (closed)
///   deliver the bytes with their error, owed. A debt dies with the stream.
/// - A request larger than a limit's capacity is sliced to fit (a bucket's
///   capacity is read, a key's learned by halving; never `exceeds_capacity`).
///
/// Bound: over any window of length T in which the limits do not change,
/// the bytes moved through all streams sharing a bucket of capacity B and
/// rate r are at most `B + r·T`, plus one slice for each stream whose reads
/// pay after reading and that reads in the window. With a capacity of one slice, a saturated stream
/// moves at most `0.1·r + 2·slice` bytes in any 100 ms window.
///
/// Cost: an operation whose limits hold it now (or that has no limits) goes
/// straight to the next layer, with the caller's handler (unlimited) or a
/// thin wrapper of it that gives back what a short transfer did not use; a
/// socket read, one turn after its initiation (its memory allocated before it
/// reads anything), takes its tokens and reads what is there, as the
/// socket's own speculative read does. Only an operation that waits (for
/// tokens, for data, to pay a debt) is a composed operation. A read or write is in
/// the next layer, where the next layer's own cancel() reaches it, only once
/// it has its tokens: before that, the stream's cancel() (or per-operation
/// cancellation) is what reaches it.
///
/// Errors pass through from the next layer unchanged (EOF, resets); a failed
/// or short operation gives back the tokens of what it did not move. While
/// an operation waits for tokens, per-operation cancellation (terminal,
/// partial, total), `cancel()` and `close()` complete it with `operation_aborted`,
/// taking nothing (one whose grant is on its way gives it back). A limiter
/// closed or destroyed while an operation waits completes it with the
/// limiter's error (`bucket_closed`, `operation_aborted`).
///
/// Memory: an initiation that throws (`std::bad_alloc`) has moved nothing
/// and holds no token (what it paid of an earlier read's debt stays paid). As in Asio's own
/// composed operations (`async_write` over a socket), a step that follows a wait starts the next
/// layer's operation, or another wait, from a completion: if that throws, the exception leaves the
/// `run()` that ran the completion and the operation is destroyed without completing. It has then
/// moved nothing and holds no token (its grant is given back); a read's debt stays the stream's. No
/// step allocates between taking bytes from the next layer and delivering
/// them, so no bytes are lost this way.
///
/// Thread safety: as the next layer's (one read and one write outstanding at
/// a time; `cancel()`/`close()` from the thread or strand that uses the
/// stream), except that the limits and the slice may be set from any thread.
template <typename NextLayer, typename Clock = std::chrono::steady_clock,
          typename WaitTraits = boost::asio::wait_traits<Clock>>
class basic_rate_limited_stream : public detail::lowest_layer_base<NextLayer> {
  using state_type = detail::stream_state<Clock, WaitTraits>;
  using direction = detail::stream_direction<Clock, WaitTraits>;
  using parts_type = detail::joint_parts<Clock, WaitTraits>;

 public:
  using next_layer_type = NextLayer;
  using executor_type = typename NextLayer::executor_type;
  using part_type = basic_part<Clock, WaitTraits>;

  /// The slice size when none is set: 16 KiB (a TLS record).
  static constexpr std::size_t default_slice = 16384;

  /// Constructs the next layer from `args`; no limits.
  template <typename... Args>
  requires std::constructible_from<NextLayer, Args&&...> &&
      (sizeof...(Args) != 1 ||
       !(std::is_same_v<std::remove_cvref_t<Args>, basic_rate_limited_stream> ||
         ...)) explicit basic_rate_limited_stream(Args&&... args)
      : next_(std::forward<Args>(args)...), state_(std::make_shared<state_type>(default_slice)) {}

  /// Moves the next layer, the limits and the slice; the moved-from stream
  /// has none (a new, unlimited stream over the moved-from next layer). Not
  /// while operations are outstanding (as for an Asio socket).
  /// @throws std::bad_alloc
  basic_rate_limited_stream(basic_rate_limited_stream&& other)
      : next_(std::move(other.next_)),
        state_(std::exchange(other.state_, std::make_shared<state_type>(default_slice))) {}
  basic_rate_limited_stream& operator=(basic_rate_limited_stream&& other) {
    if (this != &other) {
      auto fresh = std::make_shared<state_type>(default_slice);
      abandon();
      next_ = std::move(other.next_);
      state_ = std::exchange(other.state_, std::move(fresh));
    }
    return *this;
  }

  /// An operation waiting for tokens completes with `operation_aborted`
  /// (as a destroyed socket's operations do); one that is granted
  /// meanwhile gives its tokens back and does not touch the stream.
  ~basic_rate_limited_stream() { abandon(); }

  executor_type get_executor() noexcept { return next_.get_executor(); }

  NextLayer& next_layer() noexcept { return next_; }
  const NextLayer& next_layer() const noexcept { return next_; }

  /// The next layer's lowest layer, where it has one.
  template <typename N = NextLayer>
  requires detail::has_lowest_layer<N>
  typename N::lowest_layer_type& lowest_layer() { return next_.lowest_layer(); }
  template <typename N = NextLayer>
  requires detail::has_lowest_layer<N>
  const typename N::lowest_layer_type& lowest_layer() const { return next_.lowest_layer(); }

  /// Sets the read limits (empty: reads are not limited). Any thread.
  /// @throws std::invalid_argument a remote limiter's part, a part of 0
  /// tokens; std::bad_alloc.
  void set_read_limits(std::vector<part_type> limits) { state_->read.set(std::move(limits)); }
  /// Sets the write limits (empty: writes are not limited). Any thread.
  void set_write_limits(std::vector<part_type> limits) { state_->write.set(std::move(limits)); }
  /// Sets the same limits for reads and for writes (each direction takes
  /// its own tokens from them).
  void set_limits(const std::vector<part_type>& limits) {
    set_read_limits(limits);
    set_write_limits(limits);
  }

  /// The largest amount an operation waits for at once when the limits do
  /// not hold its whole buffer. Smaller slices are smoother and fairer;
  /// larger ones cost fewer waits. Any thread.
  /// @throws std::invalid_argument for 0.
  void set_slice(std::size_t bytes) {
    if (bytes == 0) throw std::invalid_argument("ratelimit: a stream's slice is at least 1 byte");
    state_->slice.store(bytes, std::memory_order_relaxed);
  }
  std::size_t slice() const noexcept { return state_->slice.load(std::memory_order_relaxed); }

  /// Completes the operations outstanding with `operation_aborted`: one
  /// waiting for tokens at once, one on its way between steps at its next
  /// step; and cancels the next layer's (or its lowest layer's) operations.
  void cancel() {
    boost::system::error_code ignored;
    cancel(ignored);
  }
  void cancel(boost::system::error_code& ec) {
    ec = {};
    stop_waiting();
    if constexpr (detail::cancels<NextLayer>)
      next_.cancel(ec);
    else if constexpr (detail::cancels_or_throws<NextLayer>)
      next_.cancel();
    else if constexpr (detail::has_lowest_layer<NextLayer>)
      next_.lowest_layer().cancel(ec);
  }

  /// Closes the stream for good (as a Beast WebSocket stream): operations
  /// outstanding complete with `operation_aborted` (as with cancel()), later
  /// ones fail at once with `operation_aborted`; closes the next layer (or its
  /// lowest layer).
  void close() {
    boost::system::error_code ec;
    close(ec);
    if (ec) throw boost::system::system_error(ec, "ratelimit: close");
  }
  void close(boost::system::error_code& ec) {
    ec = {};
    state_->closed.store(true, std::memory_order_release);
    stop_waiting();
    if constexpr (detail::closes<NextLayer>)
      next_.close(ec);
    else if constexpr (detail::closes_or_throws<NextLayer>)
      next_.close();
    else if constexpr (detail::has_lowest_layer<NextLayer>)
      next_.lowest_layer().close(ec);
  }

  /// True after close().
  bool is_closed() const noexcept { return state_->closed.load(std::memory_order_acquire); }

  /// Reads some bytes as the next layer's async_read_some does, within the
  /// read limits (see the class). Completion signature
  /// `void(boost::system::error_code, std::size_t)`. Per-operation
  /// cancellation: terminal, partial and total while waiting for tokens;
  /// the next layer's own while it reads.
  template <typename MutableBufferSequence,
            typename ReadToken = boost::asio::default_completion_token_t<executor_type>>
  auto async_read_some(
      const MutableBufferSequence& buffers,
      ReadToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<ReadToken, void(boost::system::error_code, std::size_t)>(
        initiate<false>{this}, token, buffers);
  }

  /// Writes some bytes as the next layer's async_write_some does, within the
  /// write limits (see the class). As async_read_some otherwise.
  template <typename ConstBufferSequence,
            typename WriteToken = boost::asio::default_completion_token_t<executor_type>>
  auto async_write_some(
      const ConstBufferSequence& buffers,
      WriteToken&& token = boost::asio::default_completion_token_t<executor_type>()) {
    return boost::asio::async_initiate<WriteToken, void(boost::system::error_code, std::size_t)>(
        initiate<true>{this}, token, buffers);
  }

 private:
  // The initiations. The common case (no limits, or limits that hold the
  // request now) goes straight to the next layer with the user's handler, or
  // a thin wrapper of it, as the next layer's own operation would; the rest
  // (waiting for tokens or for data, paying after reading, failing at once)
  // is a composed operation, which starts over from the beginning.
  template <bool Write>
  struct initiate {
    basic_rate_limited_stream* s;
    using executor_type = typename basic_rate_limited_stream::executor_type;
    executor_type get_executor() const noexcept { return s->get_executor(); }
    template <typename Handler, typename Buffers>
    void operator()(Handler&& handler, const Buffers& buffers) const {
      if constexpr (Write)
        s->start_write(std::forward<Handler>(handler), buffers);
      else
        s->start_read(std::forward<Handler>(handler), buffers);
    }
  };

  template <typename Handler, typename Buffers>
  void start_write(Handler&& handler, const Buffers& buffers) {
    using sig = void(boost::system::error_code, std::size_t);
    direction& d = state_->write;
    const std::size_t size = boost::asio::buffer_size(buffers);
    std::uint64_t cap = 0, granted = 0;
    boost::system::error_code ec;
    if (size != 0 && !state_->closed.load(std::memory_order_acquire)) {
      if (!d.copy_limits(cap)) return next_.async_write_some(buffers, std::move(handler));
      if (d.take_now(size, cap, granted, ec)) {
        const std::size_t n = static_cast<std::size_t>(granted);
        const auto first = detail::first_buffer<boost::asio::const_buffer>(buffers);
        // Within the first buffer (the common case): that buffer alone, so
        // that a socket sends it as its own write of one buffer would (send,
        // not sendmsg with an iovec: cheaper per call in the kernel).
        try {
          detail::stream_handler<std::decay_t<Handler>,
                                 detail::stream_write_done<Clock, WaitTraits>>
              done{std::move(handler), {state_, granted}};
          if (first.size() >= n)
            return next_.async_write_some(boost::asio::const_buffer(first.data(), n),
                                          std::move(done));
          return next_.async_write_some(boost::beast::buffers_prefix(n, buffers), std::move(done));
        } catch (...) {  // (the next layer started nothing: the tokens go back)
          d.give_back(granted);
          d.release();
          throw;
        }
      }
    }
    boost::asio::async_compose<std::decay_t<Handler>, sig>(write_op<Buffers>{this, state_, buffers},
                                                           handler, next_);
  }

  template <typename Handler, typename Buffers>
  void start_read(Handler&& handler, const Buffers& buffers) {
    using sig = void(boost::system::error_code, std::size_t);
    direction& d = state_->read;
    const auto first = detail::first_buffer<boost::asio::mutable_buffer>(buffers);
    std::uint64_t cap = 0;
    if (first.size() != 0 && !state_->closed.load(std::memory_order_acquire)) {
      if (!d.copy_limits(cap)) return next_.async_read_some(buffers, std::move(handler));
      if constexpr (detail::receives_now<NextLayer>) {
        // What a socket's own read does first: read what is there now. One
        // turn later (deferred: its memory is allocated before anything is
        // read, so that no completion allocates after the bytes are taken
        // from the socket), with the tokens for the whole buffer taken then
        // and the rest given back at once.
        // A cancellation meanwhile completes it (nothing has moved): noted
        // through the caller's slot until the start runs.
        d.start_cancelled.store(false, std::memory_order_relaxed);
        auto slot = boost::asio::get_associated_cancellation_slot(handler);
        if (slot.is_connected())
          slot.template emplace<detail::note_start_cancelled<Clock, WaitTraits>>(state_);
        auto io_ex = next_.get_executor();
        using start = detail::stream_read_start<basic_rate_limited_stream, Buffers>;
        return boost::asio::defer(
            io_ex, detail::stream_handler<std::decay_t<Handler>, start>{
                       std::move(handler),
                       start{this, state_, d.cancels.load(std::memory_order_acquire), buffers}});
      }
    }
    boost::asio::async_compose<std::decay_t<Handler>, sig>(read_op<Buffers>{this, state_, buffers},
                                                           handler, next_);
  }

  template <typename, typename>
  friend struct detail::stream_read_start;
  friend struct detail::stream_test_access;

  /// The deferred start of a socket read (stream_read_start): reads what is
  /// there now if the limits hold the buffer and completes, else goes on as
  /// a composed operation (waiting for data first when nothing was there).
  template <typename Buffers, typename Handler>
  static void read_started(detail::stream_read_start<basic_rate_limited_stream, Buffers>& op,
                           Handler& handler) {
    using sig = void(boost::system::error_code, std::size_t);
    state_type& st = *op.state;
    direction& d = st.read;
    auto slot = boost::asio::get_associated_cancellation_slot(handler);
    if (slot.is_connected()) slot.clear();
    const bool cancelled = d.start_cancelled.exchange(false, std::memory_order_acq_rel);
    // Cancelled through its slot, closed or destroyed (then op.stream may
    // dangle: not touched), or the stream's cancel() came.
    if (cancelled || st.closed.load(std::memory_order_acquire) ||
        d.cancels.load(std::memory_order_acquire) != op.cancels)
      return std::move(handler)(boost::asio::error::operation_aborted, std::size_t{0});
    basic_rate_limited_stream& s = *op.stream;
    if (!s.next_.is_open())  // (closed under the stream: as a pending read would end)
      return std::move(handler)(boost::asio::error::operation_aborted, std::size_t{0});
    const auto first = detail::first_buffer<boost::asio::mutable_buffer>(op.buffers);
    std::uint64_t cap = 0, granted = 0;
    boost::system::error_code ec;
    if (!d.copy_limits(cap))  // removed meanwhile
      return s.next_.async_read_some(op.buffers, std::move(handler));
    bool wait_first = false;
    if (d.take_now(first.size(), cap, granted, ec)) {
      std::size_t n = 0;
      const bool read =
          detail::receive_now(s.next_, first.data(), static_cast<std::size_t>(granted), n, ec);
      d.give_back(granted - n);
      d.release();
      if (read) return std::move(handler)(ec, n);  // (on the handler's executor already)
      wait_first = true;                           // nothing there: wait for data first
    }
    boost::asio::async_compose<Handler, sig>(read_op<Buffers>{&s, op.state, op.buffers, wait_first},
                                             handler, s.next_);
  }

  void abandon() noexcept {
    if (!state_) return;
    state_->closed.store(true, std::memory_order_release);
    try {
      stop_waiting();
    } catch (...) {  // (a mutex that fails to lock: nothing else to do)
    }
  }

  void stop_waiting() {
    for (direction* d : {&state_->read, &state_->write}) {
      d->cancels.fetch_add(1, std::memory_order_acq_rel);
      d->emit(boost::asio::cancellation_type::terminal);
    }
  }

  using acquire_handler =
      boost::asio::any_completion_handler<void(boost::system::error_code, joint_receipt)>;

  enum class phase { start, fail, readable, acquired, moved, paid };

  // What both operations share: taking tokens for `want` bytes, now if the
  // limits hold them, else by waiting for at most a slice.
  template <typename Derived>
  struct op_base {
    op_base(basic_rate_limited_stream* stream, std::shared_ptr<state_type> st, direction* d)
        : s(stream),
          state(std::move(st)),
          dir(d),
          cancels(d->cancels.load(std::memory_order_acquire)) {}

    /// The stream was closed, destroyed (then `s` may dangle: not to be
    /// touched) or cancelled since this operation began.
    bool stopped() const noexcept {
      return state->closed.load(std::memory_order_acquire) ||
             dir->cancels.load(std::memory_order_acquire) != cancels;
    }

    basic_rate_limited_stream* s;
    std::shared_ptr<state_type> state;
    direction* dir;  // (in *state) its op_* members: this operation's limits and receipt
    phase at = phase::start;
    boost::system::error_code ec{};
    std::size_t done = 0;       // bytes moved (a paying read's)
    std::uint64_t granted = 0;  // bytes the receipt is for
    std::uint64_t cap = 0;      // the most bytes they grant at once (copy_limits)
    std::uint64_t cancels;      // dir->cancels when it began

    bool begun = false;

    /// Accepts every kind of per-operation cancellation (terminal, partial,
    /// total: nothing has moved while an operation waits).
    template <typename Self>
    void begin(Self& self) {
      if (begun) return;
      begun = true;
      self.reset_cancellation_state(boost::asio::enable_total_cancellation());
    }

    /// Completes the operation with `e` (and `done` bytes) without calling
    /// its handler inside this call.
    template <typename Self>
    void fail(Self& self, boost::system::error_code e) {
      ec = e;
      at = phase::fail;
      // Deferred, not posted: a continuation of the handler that is running
      // (when one is), queued on this thread without the scheduler's lock, as
      // a socket's own read that completes at once is.
      auto io_ex = self.get_io_executor();  // (never the stream's: it may be gone)
      boost::asio::defer(io_ex, std::move(self));
    }

    /// Tries to take `want` bytes now (halving past a capacity); true when
    /// granted (then `granted` is set). False with `ec` set: failed.
    bool take_now(direction&, std::uint64_t want) { return dir->take_now(want, cap, granted, ec); }

    /// Waits for `want` bytes (at most a slice); resumes with
    /// (error_code, joint_receipt).
    template <typename Self>
    void wait_for(Self& self, direction& d, std::uint64_t want,
                  boost::asio::cancellation_type_t accepted = boost::asio::cancellation_type::all) {
      want = std::min<std::uint64_t>({want, state->slice.load(std::memory_order_relaxed), cap});
      if (want == 0) want = 1;
      granted = want;
      at = phase::acquired;
      detail::scale(dir->op_limits, dir->op_per_byte, want);
      auto slot = self.get_cancellation_state().slot();
      if (slot.is_connected())
        slot.template emplace<detail::forward_cancellation<Clock, WaitTraits>>(state, &d, accepted);
      std::lock_guard lk(d.wait_mutex);
      if (stopped()) {
        if (slot.is_connected()) slot.clear();
        static_cast<Derived*>(this)->not_waiting();
        return fail(self, boost::asio::error::operation_aborted);
      }
      d.waiting = true;
      // Type-erased: the joint acquire is compiled once for every kind of
      // operation over the stream (Beast's, SSL's, ... each a handler type).
      ratelimit::async_acquire(
          std::span<const part_type>(dir->op_limits.data(), dir->op_limits.size()),
          acquire_handler(boost::asio::bind_cancellation_slot(d.signal.slot(), std::move(self))));
    }

    /// After wait_for: false when the operation is over (completed).
    template <typename Self>
    bool on_acquired(Self& self, direction& d, boost::system::error_code e, joint_receipt r) {
      {
        std::lock_guard lk(d.wait_mutex);
        d.waiting = false;
      }
      auto slot = self.get_cancellation_state().slot();
      if (slot.is_connected()) slot.clear();
      if (stopped()) {  // (the stream may be gone: not touched)
        r.give_back_all();
        self.complete(boost::asio::error::operation_aborted, done);
        return false;
      }
      if (e == error::exceeds_capacity && granted > 1) {  // a capacity lowered meanwhile
        d.cap_hint.store(granted / 2, std::memory_order_relaxed);
        granted = 0;
        at = phase::start;
        static_cast<Derived*>(this)->restart(self);
        return false;
      }
      if (!e && self.cancelled() != boost::asio::cancellation_type::none) {
        r.give_back_all();
        e = boost::asio::error::operation_aborted;
      }
      if (e) {
        self.complete(e, done);
        return false;
      }
      dir->op_receipt = std::move(r);
      dir->op_solo_held = 0;
      return true;
    }
  };

  template <typename Buffers>
  struct write_op : op_base<write_op<Buffers>> {
    Buffers buffers;

    write_op(basic_rate_limited_stream* s, std::shared_ptr<state_type> st, const Buffers& b)
        : op_base<write_op<Buffers>>(s, st, &st->write), buffers(b) {}

    void not_waiting() noexcept {}

    template <typename Self>
    void restart(Self& self) {
      (*this)(self);
    }

    template <typename Self>
    void operator()(Self& self) {
      if (this->at == phase::fail) return self.complete(this->ec, 0);
      this->begin(self);
      this->granted = 0;
      direction& d = this->state->write;
      // The whole sequence (a Beast header is a dozen buffers: one write of
      // them all, as the next layer would make), up to what the limits give.
      const std::size_t size = boost::asio::buffer_size(buffers);
      if (size != 0 && this->state->closed.load(std::memory_order_acquire))
        return this->fail(self, boost::asio::error::operation_aborted);
      if (size == 0 || !d.copy_limits(this->cap)) {
        this->at = phase::moved;
        return this->s->next_.async_write_some(buffers, std::move(self));
      }
      if (this->take_now(d, size)) return send(self);
      if (this->ec) return this->fail(self, this->ec);
      this->wait_for(self, d, size);
    }

    template <typename Self>
    void operator()(Self& self, boost::system::error_code e, joint_receipt r) {
      if (!this->on_acquired(self, this->state->write, e, std::move(r))) return;
      send(self);
    }

    template <typename Self>
    void send(Self& self) {
      this->at = phase::moved;
      const std::size_t n = static_cast<std::size_t>(this->granted);
      try {
        // Within the first buffer: that buffer alone (as in start_write).
        const auto first = detail::first_buffer<boost::asio::const_buffer>(buffers);
        if (first.size() >= n)
          return this->s->next_.async_write_some(boost::asio::const_buffer(first.data(), n),
                                                 std::move(self));
        this->s->next_.async_write_some(boost::beast::buffers_prefix(n, buffers), std::move(self));
      } catch (...) {  // (the next layer started nothing: the tokens go back)
        this->dir->give_back(this->granted);
        this->dir->release();
        throw;
      }
    }

    template <typename Self>
    void operator()(Self& self, boost::system::error_code e, std::size_t n) {
      if (this->granted > n) this->dir->give_back(this->granted - n);
      this->dir->release();
      self.complete(e, n);
    }
  };

  template <typename Buffers>
  struct read_op : op_base<read_op<Buffers>> {
    Buffers buffers;

    read_op(basic_rate_limited_stream* s, std::shared_ptr<state_type> st, const Buffers& b,
            bool wait = false)
        : op_base<read_op<Buffers>>(s, st, &st->read), buffers(b), wait_first(wait) {}

    // wait_for found the operation stopped: a debt it was to pay stays owed
    // (a read waits only to pay a debt; otherwise `owed` is 0).
    void not_waiting() noexcept { this->state->read.debt += std::exchange(owed, 0); }

    template <typename Self>
    void restart(Self& self) {
      (*this)(self);
    }

    enum class now { read, nothing_there, short_of_tokens };

    // A socket whose limits hold the whole buffer now: reads what is there
    // at once (one system call, as the socket's own read makes), giving back
    // what it did not use. Short of tokens: took nothing (`ec` says if the
    // request failed).
    now read_now(direction& d, boost::asio::mutable_buffer first, std::size_t& n,
                 boost::system::error_code& e) {
      if (!this->take_now(d, first.size())) return now::short_of_tokens;
      const bool read = detail::receive_now(this->s->next_, first.data(),
                                            static_cast<std::size_t>(this->granted), n, e);
      this->dir->give_back(this->granted - n);
      this->dir->release();
      this->granted = 0;
      return read ? now::read : now::nothing_there;
    }

    // How many bytes the next layer holds now (0: unknown or none).
    std::size_t available() {
      if constexpr (detail::says_available<NextLayer>) {
        boost::system::error_code e;
        const std::size_t n = this->s->next_.available(e);
        return e ? 0 : n;
      } else {
        return 0;
      }
    }

    template <typename Self>
    void operator()(Self& self) {
      if (this->at == phase::fail) return self.complete(this->ec, this->done);
      this->begin(self);
      this->granted = 0;
      direction& d = this->state->read;
      const boost::asio::mutable_buffer first =
          detail::first_buffer<boost::asio::mutable_buffer>(buffers);
      if (first.size() != 0 && this->state->closed.load(std::memory_order_acquire))
        return this->fail(self, boost::asio::error::operation_aborted);
      if (first.size() == 0 || !d.copy_limits(this->cap)) {
        this->at = phase::moved;
        return this->s->next_.async_read_some(buffers, std::move(self));
      }
      if constexpr (detail::waits_for_read<NextLayer>) {
        if (std::exchange(wait_first, false)) {  // (the initiation read nothing there)
          this->at = phase::readable;
          return this->s->next_.async_wait(boost::asio::socket_base::wait_read, std::move(self));
        }
      }
      if constexpr (detail::receives_now<NextLayer>) {
        std::size_t n = 0;
        boost::system::error_code e;
        switch (read_now(d, first, n, e)) {
          case now::read:
            this->done = n;
            return this->fail(self, e);  // (completes with e and n, outside this call)
          case now::nothing_there:
            this->at = phase::readable;
            return this->s->next_.async_wait(boost::asio::socket_base::wait_read, std::move(self));
          case now::short_of_tokens:
            if (this->ec) return this->fail(self, this->ec);
        }
      }
      if constexpr (detail::waits_for_read<NextLayer>) {
        const std::size_t there = available();
        if (there == 0) {
          this->at = phase::readable;
          return this->s->next_.async_wait(boost::asio::socket_base::wait_read, std::move(self));
        }
        take(self, d, first, there);
      } else {              // read first, pay after
        if (d.debt != 0) {  // an earlier read's unpaid bytes first
          owed = std::exchange(d.debt, 0);
          return pay_debt(self);
        }
        read_first(self, first);
      }
    }

    template <typename Self>
    void read_first(Self& self, boost::asio::mutable_buffer first) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(
          {first.size(), this->state->slice.load(std::memory_order_relaxed), this->cap}));
      this->at = phase::moved;
      limited_read = true;
      this->s->next_.async_read_some(boost::asio::buffer(first.data(), std::max<std::size_t>(n, 1)),
                                     std::move(self));
    }

    // Readable (or failed): takes tokens for what is there.
    template <typename Self>
    void operator()(Self& self, boost::system::error_code e) {
      if (e) return self.complete(e, 0);
      if (self.cancelled() != boost::asio::cancellation_type::none ||
          this->stopped())  // (the stream may be gone)
        return self.complete(boost::asio::error::operation_aborted, 0);
      direction& d = this->state->read;
      const auto first = detail::first_buffer<boost::asio::mutable_buffer>(buffers);
      if (!d.copy_limits(this->cap)) {  // removed meanwhile
        this->at = phase::moved;
        return this->s->next_.async_read_some(buffers, std::move(self));
      }
      if constexpr (detail::receives_now<NextLayer>) {  // as in the first step
        std::size_t n = 0;
        boost::system::error_code re;
        switch (read_now(d, first, n, re)) {
          case now::read:
            return self.complete(re, n);
          case now::nothing_there:  // (woken for nothing)
            return this->s->next_.async_wait(boost::asio::socket_base::wait_read, std::move(self));
          case now::short_of_tokens:
            if (this->ec) return self.complete(this->ec, 0);
        }
      }
      take(self, d, first, available());
    }

    // Readable, with `there` bytes there: the whole buffer if the limits
    // hold it now (what the read leaves is given back at once), else waits
    // for what is there (1 when nothing is: an EOF or an error is about to be
    // read, or data is arriving), at most a slice.
    template <typename Self>
    void take(Self& self, direction& d, boost::asio::mutable_buffer first, std::size_t there) {
      if (this->take_now(d, first.size())) return receive(self, first);
      if (this->ec) return this->fail(self, this->ec);
      if constexpr (detail::receives_now<NextLayer>) {
        // Nothing there but an end of file or an error: delivered now, not
        // after a wait for a token in the limits' order.
        boost::system::error_code end;
        if (there == 0 && detail::ends_now(this->s->next_, end)) return this->fail(self, end);
      }
      this->wait_for(self, d, std::max<std::size_t>(std::min(there, first.size()), 1));
    }

    template <typename Self>
    void receive(Self& self, boost::asio::mutable_buffer first) {
      this->at = phase::moved;
      try {
        this->s->next_.async_read_some(
            boost::asio::buffer(first.data(), static_cast<std::size_t>(this->granted)),
            std::move(self));
      } catch (...) {  // (the next layer started nothing: the tokens go back)
        this->dir->give_back(this->granted);
        this->dir->release();
        throw;
      }
    }

    template <typename Self>
    void operator()(Self& self, boost::system::error_code e, joint_receipt r) {
      if constexpr (detail::waits_for_read<NextLayer>) {
        if (!this->on_acquired(self, this->state->read, e, std::move(r))) return;
        receive(self, detail::first_buffer<boost::asio::mutable_buffer>(buffers));
      } else {  // paid (part of) a debt
        direction& d = this->state->read;
        {
          std::lock_guard lk(d.wait_mutex);
          d.waiting = false;
        }
        auto slot = self.get_cancellation_state().slot();
        if (slot.is_connected()) slot.clear();
        if (e == error::exceeds_capacity && this->granted > 1 && !this->stopped() &&
            self.cancelled() == boost::asio::cancellation_type::none) {  // pay the rest in halves
          d.cap_hint.store(this->granted / 2, std::memory_order_relaxed);
          return pay_debt(self);
        }
        if (!e) owed -= std::min<std::uint64_t>(owed, this->granted);
        // Stopped or cancelled while the grant was on its way (what was paid
        // stays paid): the rest stays owed, and this read reads nothing.
        if (!e && (this->stopped() || self.cancelled() != boost::asio::cancellation_type::none))
          e = boost::asio::error::operation_aborted;
        if (e) return unpaid(self, e);
        pay_debt(self);
      }
    }

    // The payment failed or was cancelled: the bytes are the caller's now
    // (completed with the error and them); the next read pays for them.
    template <typename Self>
    void unpaid(Self& self, boost::system::error_code e) {
      this->state->read.debt += owed;
      owed = 0;
      // Deferred: paying an earlier read's debt first, this may still be the
      // initiating call (fuzz_stream found it completing there).
      this->fail(self, e);
    }

    // Pays as much of `owed` as the limits hold now, in pieces of at most
    // their capacity (all of a piece or none of it); stops when a piece is
    // not there or the limits fail (`ec` set) or are removed.
    void pay_what_is_there(direction& d) {
      while (owed != 0 && d.copy_limits(this->cap)) {
        if (!this->take_now(d, owed)) return;
        owed -= std::min<std::uint64_t>(owed, this->granted);
        d.release();  // (paid: nothing of it is given back)
      }
    }

    // Pays what a read took (the read-first mode) and completes. Its bytes,
    // in the caller's buffer already, are paid only with what the limits hold
    // now: what they do not becomes the stream's debt, paid by the next read
    // before it reads, and the read completes with its bytes at once. Nothing
    // here waits or may lose the bytes: an allocation that fails while paying
    // them (copying new limits, a key's first receipt) leaves them owed too.
    // In the next layer's completion, so completed directly (nothing that
    // could fail between the bytes and their caller). Limits that fail
    // (closed) deliver the bytes with their error, owed.
    template <typename Self>
    void pay_own(Self& self) {
      direction& d = this->state->read;
      try {
        pay_what_is_there(d);
      } catch (const std::bad_alloc&) {  // (nothing taken by the failed step)
        this->ec = {};
      }
      if (owed != 0 && d.limited.load(std::memory_order_acquire)) d.debt += owed;
      owed = 0;
      self.complete(this->ec ? this->ec : ec_read, this->done);
    }

    // Pays an earlier read's debt (`owed`), waiting for tokens if need be,
    // then reads. Whatever throws (copying new limits, a joint take, the
    // wait) leaves what is not paid yet owed. Nothing of this operation's own
    // is delivered yet: any cancellation type.
    template <typename Self>
    void pay_debt(Self& self) {
      direction& d = this->state->read;
      auto st = this->state;  // (this->state is moved with `self`)
      try {
        pay_what_is_there(d);
      } catch (...) {
        st->read.debt += std::exchange(owed, 0);
        throw;
      }
      if (owed != 0 && d.limited.load(std::memory_order_acquire)) {
        if (this->ec) return unpaid(self, this->ec);
        const std::uint64_t left = owed;
        try {
          return this->wait_for(self, d, owed);
        } catch (...) {
          st->read.debt += left;
          throw;
        }
      }
      owed = 0;  // (paid, or forgiven: the limits were removed)
      // Then this operation's own read.
      if (this->stopped() || self.cancelled() != boost::asio::cancellation_type::none)
        return this->fail(self, boost::asio::error::operation_aborted);
      return read_first(self, detail::first_buffer<boost::asio::mutable_buffer>(buffers));
    }

    template <typename Self>
    void operator()(Self& self, boost::system::error_code e, std::size_t n) {
      if constexpr (detail::waits_for_read<NextLayer>) {
        if (this->granted > n) this->dir->give_back(this->granted - n);
        this->dir->release();
        self.complete(e, n);
      } else {
        this->done = n;
        ec_read = e;
        owed = limited_read ? n : 0;  // (a read the limits did not slice owes nothing)
        pay_own(self);
      }
    }

    boost::system::error_code ec_read{};
    std::uint64_t owed = 0;     // bytes read (or owed from before) not paid yet
    bool limited_read = false;  // read_first's read (sliced, to be paid)
    bool wait_first = false;    // the initiation found nothing there: wait for data first
  };

  NextLayer next_;
  std::shared_ptr<state_type> state_;
};

/// A rate-limited stream over steady_clock limiters.
template <typename NextLayer>
using rate_limited_stream = basic_rate_limited_stream<NextLayer>;

/// Beast WebSocket's teardown, through to the next layer.
template <typename NextLayer, typename Clock, typename WaitTraits>
void teardown(boost::beast::role_type role,
              basic_rate_limited_stream<NextLayer, Clock, WaitTraits>& stream,
              boost::system::error_code& ec) {
  using boost::beast::websocket::teardown;
  teardown(role, stream.next_layer(), ec);
}

template <typename NextLayer, typename Clock, typename WaitTraits, typename TeardownHandler>
void async_teardown(boost::beast::role_type role,
                    basic_rate_limited_stream<NextLayer, Clock, WaitTraits>& stream,
                    TeardownHandler&& handler) {
  using boost::beast::websocket::async_teardown;
  async_teardown(role, stream.next_layer(), std::forward<TeardownHandler>(handler));
}

}  // namespace ratelimit

#endif  // RATELIMIT_STREAM_HPP
