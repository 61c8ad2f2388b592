//
// src/token_bucket.cpp: the steady_clock bucket, compiled once.
//
// The header declares these instantiations extern, so programs that use
// ratelimit::token_bucket compile only their own completion tokens' code.
//
#include <ratelimit/token_bucket.hpp>

template class ratelimit::detail::bucket_impl<std::chrono::steady_clock,
                                              boost::asio::wait_traits<std::chrono::steady_clock>>;
template class ratelimit::basic_token_bucket<std::chrono::steady_clock>;
