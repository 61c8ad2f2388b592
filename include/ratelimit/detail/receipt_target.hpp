//
// ratelimit/detail/receipt_target.hpp: where a receipt gives its tokens back.
//
// A receipt (ratelimit/receipt.hpp) does not name the limiter kind it came
// from: it holds this, a reference to "something tokens can be given back
// to" and the function that does it. A token bucket's receipt refers to its
// bucket weakly (a receipt that outlives the bucket gives back to nothing);
// a keyed limiter's owns a small record of the key and refers to the limiter
// weakly through it, so that it gives back to whatever bucket the key has
// when it is used (see keyed_limiter.hpp).
//
#ifndef RATELIMIT_DETAIL_RECEIPT_TARGET_HPP
#define RATELIMIT_DETAIL_RECEIPT_TARGET_HPP

#include <cstdint>
#include <memory>

namespace ratelimit::detail {

struct receipt_target {
  std::weak_ptr<void> weak;      // the target, when the receipt does not keep it alive
  std::shared_ptr<void> strong;  // or a record the receipt owns
  void (*give)(void* target, std::uint64_t n) = nullptr;

  /// Gives `n` tokens back to the target, if it still exists.
  void give_back(std::uint64_t n) const {
    if (!give || n == 0) return;
    if (strong) return give(strong.get(), n);
    if (const std::shared_ptr<void> p = weak.lock()) give(p.get(), n);
  }
};

}  // namespace ratelimit::detail

#endif  // RATELIMIT_DETAIL_RECEIPT_TARGET_HPP
