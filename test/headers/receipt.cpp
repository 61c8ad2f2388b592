// <ratelimit/receipt.hpp> must compile on its own.
#include <ratelimit/receipt.hpp>
#include <ratelimit/receipt.hpp>  // and twice

#include <boost/test/unit_test.hpp>

BOOST_AUTO_TEST_CASE(header_receipt) {
  ratelimit::receipt r;
  BOOST_TEST(r.granted() == 0u);
  BOOST_TEST(r.give_back(1) == 0u);
}
