//
// ratelimit/detail/wrapped_handler.hpp: a handler of ours around the caller's.
//
#ifndef RATELIMIT_DETAIL_WRAPPED_HANDLER_HPP
#define RATELIMIT_DETAIL_WRAPPED_HANDLER_HPP

#include <boost/asio/associator.hpp>
#include <boost/asio/handler_continuation_hook.hpp>

#include <memory>
#include <utility>

namespace ratelimit::detail {

/// Wraps the caller's handler: `Body` says what it does, then calls the
/// caller's handler (`body(handler, args...)`). Every association
/// (executor, allocator, cancellation slot, immediate executor) and the
/// continuation hint are the caller's.
template <typename Handler, typename Body>
struct wrapped_handler {
  Handler handler;
  Body body;

  template <typename... Args>
  void operator()(Args&&... args) {
    body(handler, std::forward<Args>(args)...);
  }

  friend bool asio_handler_is_continuation(wrapped_handler* self) {
    using boost::asio::asio_handler_is_continuation;  // the default: false
    return asio_handler_is_continuation(std::addressof(self->handler));
  }
};

}  // namespace ratelimit::detail

namespace boost::asio {
template <template <typename, typename> class Associator, typename Handler, typename Body,
          typename DefaultCandidate>
struct associator<Associator, ratelimit::detail::wrapped_handler<Handler, Body>, DefaultCandidate>
    : Associator<Handler, DefaultCandidate> {
  static typename Associator<Handler, DefaultCandidate>::type get(
      const ratelimit::detail::wrapped_handler<Handler, Body>& h) noexcept {
    return Associator<Handler, DefaultCandidate>::get(h.handler);
  }
  static auto get(const ratelimit::detail::wrapped_handler<Handler, Body>& h,
                  const DefaultCandidate& c) noexcept
      -> decltype(Associator<Handler, DefaultCandidate>::get(h.handler, c)) {
    return Associator<Handler, DefaultCandidate>::get(h.handler, c);
  }
};
}  // namespace boost::asio

#endif  // RATELIMIT_DETAIL_WRAPPED_HANDLER_HPP
