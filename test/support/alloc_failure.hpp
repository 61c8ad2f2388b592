//
// test/support/alloc_failure.hpp: allocation-failure injection for one test executable.
//
// An executable that links alloc_failure.cpp replaces the global operator new
// and operator new[] (plain, aligned and nothrow variants) and the matching
// deletes, process-wide: its own code, the library's, the standard library's
// and every shared library's allocations through operator new come here.
// They forward to malloc/posix_memalign/free, so ASan and TSan (which
// intercept the malloc family) still see every block: LeakSanitizer still
// reports leaks, only new/delete mismatch checking is lost.
//
// The control counts allocations (all threads) and can make the k-th
// allocation from now fail: the throwing variants throw std::bad_alloc, the
// nothrow ones return null. One failure per fail_at(): the allocations after
// it succeed again, as when memory comes back.
//
// What it cannot see: allocations that do not go through operator new.
// - Asio's per-thread recycling allocator (the default allocator of handlers
//   that name none, and of awaitable frames) takes its memory from
//   std::aligned_alloc: tests run handlers bound to an allocator
//   (asio::bind_allocator) as well, whose operations then come through here.
// - hiredis allocates with malloc: its failures are injected through
//   ratelimit::redis_detail::hiredis_failure_hook instead.
// - The C++ runtime's exception objects (__cxa_allocate_exception: malloc).
//
#ifndef RATELIMIT_TEST_ALLOC_FAILURE_HPP
#define RATELIMIT_TEST_ALLOC_FAILURE_HPP

#include <cstddef>
#include <cstdint>

namespace ratelimit::test::alloc_failure {

/// Allocations through operator new so far, on every thread (failed ones included).
std::uint64_t allocations() noexcept;

/// Blocks allocated through operator new and not yet freed.
std::int64_t live() noexcept;

/// Makes the `k`-th allocation from now (k >= 1; counting every thread)
/// fail; replaces any earlier arming. fail_at(0) disarms.
void fail_at(std::uint64_t k) noexcept;

/// No allocation fails (the count goes on).
void disarm() noexcept;

/// True once the failure armed by the last fail_at() has happened.
bool fired() noexcept;

/// Writes the stack of the last injected failure to stderr (for diagnosis).
void print_failure_stack() noexcept;

/// True when a frame of the last injected failure's stack names `symbol`
/// (a substring of the mangled name; needs the executable linked with
/// -rdynamic so that its functions have names at run time).
bool failure_stack_contains(const char* symbol) noexcept;

/// With `on`, only the calling thread's allocations are counted and may
/// fail (for a test whose other threads are not the library's: Asio's
/// resolver thread); off again, every thread's.
void only_this_thread(bool on) noexcept;

/// With `on` (the default), the nothrow forms of operator new count and
/// may fail like the others; off, they are neither counted nor failed. (Off
/// only for the stream's --stream-bugs scenarios, short of the bugs they
/// show; see test_alloc_failure.cpp, spare_nothrow and --fail-nothrow.)
void fail_nothrow(bool on) noexcept;

/// Arms fail_at(k) for its lifetime.
class scoped_failure {
 public:
  explicit scoped_failure(std::uint64_t k) noexcept { fail_at(k); }
  ~scoped_failure() { disarm(); }
  scoped_failure(const scoped_failure&) = delete;
  scoped_failure& operator=(const scoped_failure&) = delete;
};

/// While one exists on a thread, that thread's allocations are neither
/// counted nor failed (for a test's own bookkeeping inside an armed window).
class suspend {
 public:
  suspend() noexcept;
  ~suspend();
  suspend(const suspend&) = delete;
  suspend& operator=(const suspend&) = delete;
};

}  // namespace ratelimit::test::alloc_failure

#endif  // RATELIMIT_TEST_ALLOC_FAILURE_HPP
