//
// ratelimit/detail/receipt_handler.hpp: an `acquire` operation is a
// `get_token` operation whose handler also receives a receipt.
//
// The wrapper holds the user's handler and the receipt made when the request
// started (so completing allocates nothing and cannot fail); invoked with the
// request's error_code, it invokes the handler with it and the receipt (an
// empty one on failure). Asio's associator forwards every association (the
// executor, the allocator, the cancellation slot, the immediate executor) to
// the user's handler, so the waiter, its cancellation and its completion are
// those of any request: nothing of that is repeated here.
//
#ifndef RATELIMIT_DETAIL_RECEIPT_HANDLER_HPP
#define RATELIMIT_DETAIL_RECEIPT_HANDLER_HPP

#include <ratelimit/receipt.hpp>

#include <boost/asio/associator.hpp>
#include <boost/system/error_code.hpp>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace ratelimit::detail {

template <typename Handler, typename Receipt = receipt>
class receipt_handler {
 public:
  receipt_handler(Handler&& handler,
                  Receipt r) noexcept(std::is_nothrow_move_constructible_v<Handler>)
      : handler_(std::move(handler)), receipt_(std::move(r)) {}

  void operator()(boost::system::error_code ec) {
    if (ec)
      std::move(handler_)(ec, Receipt());
    else
      std::move(handler_)(ec, std::move(receipt_));
  }

  /// The receipt handed over on success (filled in place by an initiation
  /// that makes it after the operation: one move fewer of it).
  Receipt& receipt() noexcept { return receipt_; }

  Handler handler_;

 private:
  Receipt receipt_;
};

/// `handler` wrapped to receive a receipt of `n` tokens from `target`: what
/// the acquire forms' initiations hand to the limiter's own get_token path.
template <typename Handler>
receipt_handler<std::decay_t<Handler>> with_receipt_of(Handler&& handler, receipt_target target,
                                                       std::uint64_t n) {
  static_assert(std::is_invocable_v<std::decay_t<Handler>&&, boost::system::error_code, receipt>,
                "ratelimit: handler must be callable as void(boost::system::error_code, "
                "ratelimit::receipt)");
  return receipt_handler<std::decay_t<Handler>>(
      std::decay_t<Handler>(std::forward<Handler>(handler)),
      receipt_access::make(std::move(target), n));
}

}  // namespace ratelimit::detail

template <template <typename, typename> class Associator, typename Handler, typename Receipt,
          typename DefaultCandidate>
struct boost::asio::associator<Associator, ratelimit::detail::receipt_handler<Handler, Receipt>,
                               DefaultCandidate> : Associator<Handler, DefaultCandidate> {
  static typename Associator<Handler, DefaultCandidate>::type get(
      const ratelimit::detail::receipt_handler<Handler, Receipt>& h) noexcept {
    return Associator<Handler, DefaultCandidate>::get(h.handler_);
  }

  static auto get(const ratelimit::detail::receipt_handler<Handler, Receipt>& h,
                  const DefaultCandidate& c) noexcept
      -> decltype(Associator<Handler, DefaultCandidate>::get(h.handler_, c)) {
    return Associator<Handler, DefaultCandidate>::get(h.handler_, c);
  }
};

#endif  // RATELIMIT_DETAIL_RECEIPT_HANDLER_HPP
