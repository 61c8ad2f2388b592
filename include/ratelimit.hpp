//
// ratelimit.hpp: the whole public API of asio-ratelimit.
//
#ifndef RATELIMIT_HPP
#define RATELIMIT_HPP

#include <ratelimit/error.hpp>
#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/metrics.hpp>
#include <ratelimit/prometheus.hpp>
#include <ratelimit/rate.hpp>
#include <ratelimit/receipt.hpp>
#include <ratelimit/remote_limiter.hpp>
#include <ratelimit/stream.hpp>
#include <ratelimit/token_bucket.hpp>

#endif  // RATELIMIT_HPP
