//
// test/support/instantiations.hpp: the limiters on the manual clock, compiled once.
//
// Most test executables use the same few limiter types on the manual clock.
// These explicit instantiation declarations (seen through the shared
// precompiled header) tell each test's translation unit that the members are
// compiled elsewhere: in support/instantiations.cpp, built once per tree and
// linked into every test that uses the precompiled header. This is the
// pattern src/token_bucket.cpp and <ratelimit/token_bucket.hpp> follow for
// steady_clock; it only shortens the build (each test still runs the same code).
//
#ifndef RATELIMIT_TEST_INSTANTIATIONS_HPP
#define RATELIMIT_TEST_INSTANTIATIONS_HPP

#include "manual_clock.hpp"

#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include <functional>
#include <string>

#define RATELIMIT_TEST_INSTANTIATE(prefix)                                                      \
  prefix template class ratelimit::detail::timer_driver<ratelimit::test::manual_clock,          \
                                                        ratelimit::test::manual_wait_traits>;   \
  prefix template class ratelimit::detail::bucket_impl<ratelimit::test::manual_clock,           \
                                                       ratelimit::test::manual_wait_traits>;    \
  prefix template class ratelimit::basic_token_bucket<ratelimit::test::manual_clock,            \
                                                      ratelimit::test::manual_wait_traits>;     \
  prefix template class ratelimit::detail::joint_group<ratelimit::test::manual_clock,           \
                                                       ratelimit::test::manual_wait_traits>;    \
  prefix template class ratelimit::detail::joint_request<ratelimit::test::manual_clock,         \
                                                         ratelimit::test::manual_wait_traits>;  \
  prefix template class ratelimit::basic_part<ratelimit::test::manual_clock,                    \
                                              ratelimit::test::manual_wait_traits>;             \
  prefix template class ratelimit::detail::keyed_impl<int, std::hash<int>, std::equal_to<int>,  \
                                                      ratelimit::test::manual_clock,            \
                                                      ratelimit::test::manual_wait_traits>;     \
  prefix template class ratelimit::basic_keyed_limiter<int, std::hash<int>, std::equal_to<int>, \
                                                       ratelimit::test::manual_clock,           \
                                                       ratelimit::test::manual_wait_traits>;    \
  prefix template class ratelimit::detail::keyed_impl<                                          \
      std::string, std::hash<std::string>, std::equal_to<std::string>,                          \
      ratelimit::test::manual_clock, ratelimit::test::manual_wait_traits>;                      \
  prefix template class ratelimit::basic_keyed_limiter<                                         \
      std::string, std::hash<std::string>, std::equal_to<std::string>,                          \
      ratelimit::test::manual_clock, ratelimit::test::manual_wait_traits>;

RATELIMIT_TEST_INSTANTIATE(extern)

#endif  // RATELIMIT_TEST_INSTANTIATIONS_HPP
