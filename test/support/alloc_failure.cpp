//
// test/support/alloc_failure.cpp: the replaced global allocation functions and
// their control (see alloc_failure.hpp). Link it into one executable only:
// it changes operator new for the whole process.
//
#include "alloc_failure.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include <execinfo.h>

namespace ratelimit::test::alloc_failure {
namespace {

std::atomic<std::uint64_t> g_count{0};
std::atomic<std::int64_t> g_live{0};
std::atomic<std::uint64_t> g_target{0};  // the absolute number that fails; 0: none
std::atomic<bool> g_fired{false};
thread_local int t_suspended = 0;
std::atomic<bool> g_one_thread{false};  // only_this_thread(true) is in force
thread_local bool t_the_thread = false;
std::atomic<bool> g_fail_nothrow{true};

constexpr int max_frames = 48;
void* g_stack[max_frames];
int g_stack_depth = 0;

/// Counts one allocation; true when it is the one to fail.
bool should_fail(bool nothrow) noexcept {
  if (t_suspended) return false;
  if (nothrow && !g_fail_nothrow.load(std::memory_order_relaxed)) return false;
  if (g_one_thread.load(std::memory_order_relaxed) && !t_the_thread) return false;
  const std::uint64_t n = g_count.fetch_add(1, std::memory_order_relaxed) + 1;
  std::uint64_t target = g_target.load(std::memory_order_relaxed);
  if (target == 0 || n != target) return false;
  if (!g_target.compare_exchange_strong(target, 0)) return false;
  g_stack_depth = ::backtrace(g_stack, max_frames);  // malloc, never operator new
  g_fired.store(true);
  return true;
}

void* allocate(std::size_t n, std::size_t align, bool nothrow) noexcept {
  if (should_fail(nothrow)) return nullptr;
  if (n == 0) n = 1;
  void* p = nullptr;
  if (align <= alignof(std::max_align_t)) {
    p = std::malloc(n);
  } else if (::posix_memalign(&p, align, n) != 0) {
    p = nullptr;
  }
  if (p) g_live.fetch_add(1, std::memory_order_relaxed);
  return p;
}

void release(void* p) noexcept {
  if (!p) return;
  g_live.fetch_sub(1, std::memory_order_relaxed);
  std::free(p);
}

void* allocate_or_throw(std::size_t n, std::size_t align) {
  if (void* p = allocate(n, align, false)) return p;
  throw std::bad_alloc();
}

}  // namespace

std::uint64_t allocations() noexcept {
  return g_count.load();
}
std::int64_t live() noexcept {
  return g_live.load();
}

void fail_at(std::uint64_t k) noexcept {
  g_fired.store(false);
  g_target.store(k == 0 ? 0 : g_count.load() + k);
}

void disarm() noexcept {
  g_target.store(0);
}
bool fired() noexcept {
  return g_fired.load();
}

void print_failure_stack() noexcept {
  if (g_stack_depth > 0) ::backtrace_symbols_fd(g_stack, g_stack_depth, 2);
}

void fail_nothrow(bool on) noexcept {
  g_fail_nothrow.store(on);
}

void only_this_thread(bool on) noexcept {
  t_the_thread = on;
  g_one_thread.store(on);
}

bool failure_stack_contains(const char* symbol) noexcept {
  if (g_stack_depth <= 0) return false;
  char** names = ::backtrace_symbols(g_stack, g_stack_depth);  // malloc
  if (!names) return false;
  bool found = false;
  for (int i = 0; i < g_stack_depth && !found; ++i)
    found = std::strstr(names[i], symbol) != nullptr;
  std::free(names);
  return found;
}

suspend::suspend() noexcept {
  ++t_suspended;
}
suspend::~suspend() {
  --t_suspended;
}

}  // namespace ratelimit::test::alloc_failure

namespace af = ratelimit::test::alloc_failure;
using align_t = std::align_val_t;

void* operator new(std::size_t n) {
  return af::allocate_or_throw(n, 0);
}
void* operator new[](std::size_t n) {
  return af::allocate_or_throw(n, 0);
}
void* operator new(std::size_t n, align_t a) {
  return af::allocate_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, align_t a) {
  return af::allocate_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  return af::allocate(n, 0, true);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return af::allocate(n, 0, true);
}
void* operator new(std::size_t n, align_t a, const std::nothrow_t&) noexcept {
  return af::allocate(n, static_cast<std::size_t>(a), true);
}
void* operator new[](std::size_t n, align_t a, const std::nothrow_t&) noexcept {
  return af::allocate(n, static_cast<std::size_t>(a), true);
}

void operator delete(void* p) noexcept {
  af::release(p);
}
void operator delete[](void* p) noexcept {
  af::release(p);
}
void operator delete(void* p, std::size_t) noexcept {
  af::release(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  af::release(p);
}
void operator delete(void* p, align_t) noexcept {
  af::release(p);
}
void operator delete[](void* p, align_t) noexcept {
  af::release(p);
}
void operator delete(void* p, std::size_t, align_t) noexcept {
  af::release(p);
}
void operator delete[](void* p, std::size_t, align_t) noexcept {
  af::release(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  af::release(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  af::release(p);
}
void operator delete(void* p, align_t, const std::nothrow_t&) noexcept {
  af::release(p);
}
void operator delete[](void* p, align_t, const std::nothrow_t&) noexcept {
  af::release(p);
}
