//
// src/redis/redis_keyed_limiter.cpp: the steady_clock keyed Redis limiter, compiled once.
//
#include <ratelimit/redis/redis_keyed_limiter.hpp>

template class ratelimit::redis_detail::redis_keyed_impl<
    std::chrono::steady_clock, boost::asio::wait_traits<std::chrono::steady_clock>>;
