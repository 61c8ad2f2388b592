//
// ratelimit/redis/detail/hooks.hpp: a test hook at our boundary with hiredis.
//
// hiredis 0.14 allocates with malloc and has no allocator hooks, so a test
// that makes allocations fail cannot reach it through operator new. The
// connection asks this hook before each call into hiredis that allocates; a
// test sets it to make that call fail exactly as hiredis fails when it runs
// out of memory (a null reader; REDIS_ERR with REDIS_ERR_OOM).
//
#ifndef RATELIMIT_REDIS_DETAIL_HOOKS_HPP
#define RATELIMIT_REDIS_DETAIL_HOOKS_HPP

#include <atomic>

namespace ratelimit::redis_detail {

enum class hiredis_call {
  reader_create,     // redisReaderCreate
  reader_feed,       // redisReaderFeed
  reader_get_reply,  // redisReaderGetReply (builds the reply objects)
  format_command,    // redisFormatCommandArgv
};

/// When set and returning true for a call, that call fails as if hiredis
/// were out of memory. Null (the default) in every program but tests.
inline std::atomic<bool (*)(hiredis_call)> hiredis_failure_hook{nullptr};

inline bool hiredis_should_fail(hiredis_call c) noexcept {
  auto hook = hiredis_failure_hook.load(std::memory_order_relaxed);
  return hook && hook(c);
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_HOOKS_HPP
