//
// ratelimit/detail/part_source.hpp: a limiter that a joint request's part
// names indirectly (a key of a keyed limiter): what the joint acquire needs
// of it. A token bucket needs none of this: its part names its bucket.
//
#ifndef RATELIMIT_DETAIL_PART_SOURCE_HPP
#define RATELIMIT_DETAIL_PART_SOURCE_HPP

#include <ratelimit/detail/receipt_target.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/system/error_code.hpp>

#include <cstdint>
#include <memory>
#include <mutex>

namespace ratelimit::detail {

template <typename Clock, typename WaitTraits>
class bucket_impl;

template <typename Clock, typename WaitTraits>
class part_source {
 public:
  virtual ~part_source() = default;

  /// The lock held from resolve() to used(): one per limiter (parts of one
  /// limiter share it), taken before any bucket's or the joint group's.
  virtual std::mutex& domain() noexcept = 0;

  /// The bucket to take `n` tokens from, kept from going away (a key's is
  /// made if it has none, and not evicted until used()); null with `ec` when
  /// the request must fail at once (closed, exceeds_capacity,
  /// too_many_keys). Caller holds domain(). `cookie` goes to used().
  virtual std::shared_ptr<bucket_impl<Clock, WaitTraits>> resolve(std::uint64_t n,
                                                                  boost::system::error_code& ec,
                                                                  void*& cookie) = 0;

  /// The request is queued, granted or failed (caller holds domain()).
  virtual void used(void* cookie) = 0;

  /// Where a receipt of this part gives back to. @throws std::bad_alloc
  virtual receipt_target target() = 0;

  /// The executor failures complete through when nothing else is known.
  virtual boost::asio::any_io_executor executor() const = 0;
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_PART_SOURCE_HPP
