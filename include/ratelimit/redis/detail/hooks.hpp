//
// ratelimit/redis/detail/hooks.hpp: test hooks at our boundaries with hiredis and the server.
//
// hiredis 0.14 allocates with malloc and has no allocator hooks, so a test
// that makes allocations fail cannot reach it through operator new. The
// connection asks this hook before each call into hiredis that allocates; a
// test sets it to make that call fail exactly as hiredis fails when it runs
// out of memory (a null reader; REDIS_ERR with REDIS_ERR_OOM).
//
// A second hook gives every script request its time: a test that runs a
// bucket on a manual clock sets it to that clock, so that the server decides
// at the instants the test chose (the scripts' time argument), and a model
// can say exactly when each request is due.
//
#ifndef RATELIMIT_REDIS_DETAIL_HOOKS_HPP
#define RATELIMIT_REDIS_DETAIL_HOOKS_HPP

#include <atomic>
#include <cstdint>

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

/// When set, script requests carry the time it returns (microseconds, not
/// negative) instead of leaving the scripts to read the server's TIME.
/// Null (the default) in every program but tests.
inline std::atomic<std::int64_t (*)()> server_time_hook{nullptr};

/// The time argument of a script request: the hook's, or -1 (the server's TIME).
inline std::int64_t hooked_server_time() noexcept {
  auto hook = server_time_hook.load(std::memory_order_relaxed);
  return hook ? hook() : -1;
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_HOOKS_HPP
