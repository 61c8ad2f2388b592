//
// ratelimit/remote_limiter.hpp: the interface a limiter that answers late
// (one behind a network round trip, such as a bucket kept in Redis)
// implements to take part in a joint acquire (ratelimit/joint.hpp).
//
#ifndef RATELIMIT_REMOTE_LIMITER_HPP
#define RATELIMIT_REMOTE_LIMITER_HPP

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstdint>

namespace ratelimit {

/// A limiter whose answers come late, as a part of a joint request
/// (`ratelimit::basic_part(std::shared_ptr<basic_remote_limiter>, n)`).
///
/// A part is three questions: "when could you give `n`?", "take them at
/// T", "forget it". A remote limiter answers the first asynchronously with
/// a *reservation*: `n` tokens set aside for this request, due at the
/// earliest time it can give them (counting whatever waits ahead of it
/// there). The joint acquire then waits until the latest reservation of
/// its remote parts is due, makes the request of its local parts (taking
/// its place in their order at that moment, so a remote part never holds a
/// local token while it waits), and when they are granted at T >= every
/// due time, calls take(r, T) for each reservation; if anything fails
/// (a remote or local error, cancellation, a limiter closed) it calls
/// forget(r) for every reservation made, so that nothing stays taken
/// anywhere.
///
/// Contract for implementations:
/// - async_reserve completes its handler exactly once, never inside the
///   call, through the handler's associated executor (the handler is an
///   `any_completion_handler`: `boost::asio::dispatch` or `post` it with its
///   own executor). An error means nothing was reserved; the joint request
///   fails with that error. It may honour the handler's cancellation slot
///   (completing with `operation_aborted`, reserving nothing); if it does
///   not, a cancelled request waits for its answer and then forgets it.
/// - async_reserve reports its failures through the handler. If it throws
///   anyway (e.g. std::bad_alloc before it could keep the handler), it must
///   not have kept or invoked the handler: the joint request then fails with
///   the exception's error (`not_enough_memory` for std::bad_alloc), or,
///   inside the initiating call, the exception propagates.
/// - take, forget and give_back do not throw, may be called from any
///   thread, and are called at most once per reservation (take or forget,
///   never both). A limiter behind a network does them in the background,
///   best effort (forget must never leave more taken than was reserved).
/// - A reservation's `id` is the limiter's own; the joint acquire only hands
///   it back. A joint request destroyed uncompleted (its execution context
///   shut down while it waits) forgets the reservations it holds.
template <typename Clock>
class basic_remote_limiter {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using executor_type = boost::asio::any_io_executor;

  /// `n` tokens set aside, due at `due`.
  struct reservation {
    std::uint64_t id = 0;
    std::uint64_t n = 0;
    time_point due{};
  };

  using reserve_signature = void(boost::system::error_code, reservation);
  using reserve_handler = boost::asio::any_completion_handler<reserve_signature>;

  virtual ~basic_remote_limiter() = default;

  /// The executor a joint request whose first part is this one completes
  /// through (and its failures at once).
  virtual executor_type get_executor() const = 0;

  /// When could you give `n`? Sets them aside for the earliest time it can
  /// and completes with the reservation (or an error: nothing set aside).
  virtual void async_reserve(std::uint64_t n, reserve_handler handler) = 0;

  /// Take them at `t` (>= r.due): the joint request was granted at `t`.
  virtual void take(const reservation& r, time_point t) noexcept = 0;

  /// Forget it: the joint request failed or was cancelled; r is given back.
  virtual void forget(const reservation& r) noexcept = 0;

  /// A receipt of a grant gives back `n` of the tokens taken (never more
  /// than it was granted).
  virtual void give_back(std::uint64_t n) noexcept = 0;
};

/// A remote limiter on steady_clock.
using remote_limiter = basic_remote_limiter<std::chrono::steady_clock>;

}  // namespace ratelimit

#endif  // RATELIMIT_REMOTE_LIMITER_HPP
