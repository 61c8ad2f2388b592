// The Boost.Test main() shared by every test executable.
#define BOOST_TEST_MODULE ratelimit
#include <boost/test/unit_test.hpp>
