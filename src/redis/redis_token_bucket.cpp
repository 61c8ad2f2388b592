//
// src/redis/redis_token_bucket.cpp: the steady_clock Redis bucket, compiled once.
//
#include <ratelimit/redis/redis_token_bucket.hpp>

template class ratelimit::redis_detail::redis_bucket_impl<
    std::chrono::steady_clock, boost::asio::wait_traits<std::chrono::steady_clock>>;
template class ratelimit::basic_redis_token_bucket<std::chrono::steady_clock>;
