//
// ratelimit/error.hpp: the library's error codes, in their own category.
//
#ifndef RATELIMIT_ERROR_HPP
#define RATELIMIT_ERROR_HPP

#include <boost/system/error_code.hpp>

#include <string>
#include <type_traits>

namespace ratelimit {
namespace error {

/// Errors reported by the library (category name "ratelimit"). Cancellation
/// is reported as `boost::asio::error::operation_aborted`, as in Asio.
enum errors {
  /// The request asks for more tokens than the bucket can ever hold.
  exceeds_capacity = 1,

  /// The bucket was closed before or while the request waited.
  bucket_closed,

  /// A blocking call was made on a thread that runs the bucket's execution
  /// context and would have to wait: it could wait forever, so it failed.
  would_deadlock,

  /// A keyed limiter holds its maximum number of keys and none can be
  /// evicted without handing out extra tokens: the new key was refused.
  too_many_keys,

  /// Redis could not be reached, or did not answer in time (fail-closed policy).
  redis_unavailable,

  /// Redis answered with an error (e.g. WRONGTYPE for a key holding another type).
  redis_error,

  /// Redis answered with a reply of an unexpected shape or size.
  redis_bad_reply,

  /// A blocking call that would have to wait was made while the bucket's
  /// io_context is stopped (its run() has returned, e.g. for lack of work):
  /// nobody would fire the bucket's timer, so it failed at once.
  context_stopped,

  /// A Redis bucket in reservation mode would have to reserve the tokens
  /// further ahead than its `horizon` (the key's line is that long): the
  /// request took nothing and failed at once.
  exceeds_horizon,
};

namespace detail {

class category final : public boost::system::error_category {
 public:
  // A fixed id makes two copies of the category (one per shared library) compare equal.
  constexpr category() noexcept : error_category(0x9a1c3d5e7b2f4861ULL) {}

  const char* name() const noexcept override { return "ratelimit"; }

  std::string message(int ev) const override { return message(ev, nullptr, 0); }

  const char* message(int ev, char*, std::size_t) const noexcept override {
    switch (static_cast<errors>(ev)) {
      case exceeds_capacity:
        return "request exceeds the bucket's capacity";
      case bucket_closed:
        return "token bucket closed";
      case would_deadlock:
        return "blocking wait on a thread that runs the bucket's execution context";
      case too_many_keys:
        return "keyed limiter is full: no key can be evicted without over-granting";
      case redis_unavailable:
        return "redis unavailable";
      case redis_error:
        return "redis replied with an error";
      case redis_bad_reply:
        return "unexpected reply from redis";
      case context_stopped:
        return "blocking wait on a bucket whose io_context is stopped (nothing runs its timer)";
      case exceeds_horizon:
        return "the tokens would be due further ahead than the bucket's reservation horizon";
    }
    return "unknown ratelimit error";
  }
};

inline constexpr category category_instance{};

}  // namespace detail

/// The "ratelimit" error category.
inline const boost::system::error_category& get_category() noexcept {
  return detail::category_instance;
}

inline boost::system::error_code make_error_code(errors e) noexcept {
  return boost::system::error_code(static_cast<int>(e), get_category());
}

}  // namespace error
}  // namespace ratelimit

template <>
struct boost::system::is_error_code_enum<ratelimit::error::errors> : std::true_type {};

#endif  // RATELIMIT_ERROR_HPP
