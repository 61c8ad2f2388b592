// Precompiled for every test executable: the heavy, stable headers.
#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/spawn.hpp>
#include <boost/test/unit_test.hpp>

#include <ratelimit.hpp>

// The manual-clock limiters: declared here, compiled once (instantiations.cpp).
#include "instantiations.hpp"
