//
// ratelimit/receipt.hpp: the record of a grant, through which unused tokens
// are given back.
//
#ifndef RATELIMIT_RECEIPT_HPP
#define RATELIMIT_RECEIPT_HPP

#include <ratelimit/detail/receipt_target.hpp>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace ratelimit {

namespace detail {
struct receipt_access;
}

/// What a grant took, and the one way to give part of it back.
///
/// The `acquire` forms of the limiters (`async_acquire`, `acquire`,
/// `try_acquire`) grant exactly as the `get_token` forms do and hand over a
/// receipt for the tokens taken. A program that takes a worst case up front
/// (a 64 KiB read, a batch of 100 calls) gives back what it did not use:
///
/// @code
/// auto [ec, r] = co_await bucket.async_acquire(65536, asio::as_tuple(asio::use_awaitable));
/// std::size_t n = co_await sock.async_read_some(buf, asio::use_awaitable);
/// r.give_back(65536 - n);
/// @endcode
///
/// Giving back returns tokens to the limiter the grant came from (for a
/// keyed limiter: to the key's bucket), capped at its capacity, and grants
/// the waiters that the tokens make due (in their order, as of the moment of
/// the give-back). A receipt gives back at most what it granted, in all its
/// calls together; nothing else adds tokens to a limiter (but a keyed
/// limiter's capacity raise, which fills a full key). So, over any window of
/// length T in which the capacity and rate do not change, the tokens granted
/// minus the tokens given back never exceed `capacity + rate * T` (the bound
/// of a bucket without receipts).
///
/// A receipt is a move-only value, like a unique_ptr: not for concurrent use
/// of one receipt from several threads (distinct receipts of one limiter may
/// be used from any threads). Dropping it gives nothing back: the tokens stay
/// spent. A receipt that outlives its limiter gives back to nothing; a key's
/// receipt gives back to the key's bucket as it is when the receipt is used:
/// if the bucket was evicted meanwhile (only a full, unused bucket is), to
/// the key's new bucket, or to nothing while the key has none (it would be
/// full).
class receipt {
 public:
  /// An empty receipt: granted nothing, gives back nothing.
  receipt() noexcept = default;

  receipt(receipt&& other) noexcept
      : target_(std::move(other.target_)),
        granted_(std::exchange(other.granted_, 0)),
        held_(std::exchange(other.held_, 0)) {}

  receipt& operator=(receipt&& other) noexcept {
    if (this != &other) {
      target_ = std::move(other.target_);
      granted_ = std::exchange(other.granted_, 0);
      held_ = std::exchange(other.held_, 0);
    }
    return *this;
  }

  receipt(const receipt&) = delete;
  receipt& operator=(const receipt&) = delete;

  /// The tokens the grant took.
  std::uint64_t granted() const noexcept { return granted_; }

  /// The tokens not yet given back: granted() minus what give_back() returned.
  std::uint64_t held() const noexcept { return held_; }

  /// Gives `std::min(k, held())` tokens back and returns that number (held()
  /// drops by it). The limiter's level rises by it, capped at its capacity
  /// (what the cap swallows is lost, as tokens that accrue into a full
  /// bucket are), and the waiters it makes due are granted.
  /// @throws what a keyed limiter's hash or key comparison throws (for a
  /// key's receipt), or std::bad_alloc from re-arming the timer with
  /// executors other than an io_context's or a thread_pool's (and strands on
  /// them). held() has dropped by the amount even then, given back or not:
  /// a receipt never gives back more than it granted.
  std::uint64_t give_back(std::uint64_t k) {
    const std::uint64_t n = std::min(k, held_);
    if (n == 0) return 0;
    held_ -= n;  // first: whatever happens below, nothing is given twice
    target_.give_back(n);
    return n;
  }

  /// Gives back everything still held; returns how much that was.
  std::uint64_t give_back_all() { return give_back(held_); }

 private:
  friend struct detail::receipt_access;
  receipt(detail::receipt_target target, std::uint64_t n) noexcept
      : target_(std::move(target)), granted_(n), held_(n) {}

  detail::receipt_target target_;
  std::uint64_t granted_ = 0;
  std::uint64_t held_ = 0;
};

namespace detail {
struct receipt_access {
  static receipt make(receipt_target target, std::uint64_t n) noexcept {
    return receipt(std::move(target), n);
  }
};
}  // namespace detail

}  // namespace ratelimit

#endif  // RATELIMIT_RECEIPT_HPP
