// The explicit instantiation definitions that support/instantiations.hpp declares.
#include "instantiations.hpp"

RATELIMIT_TEST_INSTANTIATE()
