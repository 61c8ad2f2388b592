//
// test/support/stream_test_access.hpp: a test's window into a rate-limited
// stream's state (ratelimit::detail::stream_test_access is declared, and
// befriended, by ratelimit/stream.hpp; defined only here).
//
#pragma once

#include <ratelimit/stream.hpp>

#include <cstdint>

namespace ratelimit::detail {

struct stream_test_access {
  /// The bytes the stream's reads delivered and did not pay yet (paid by
  /// the next read first). Exact only while no read is in flight.
  template <typename Stream>
  static std::uint64_t read_debt(const Stream& s) {
    return s.state_->read.debt;
  }
};

}  // namespace ratelimit::detail
