// The joint acquire's remote parts (ratelimit/remote_limiter.hpp), with a
// fake remote limiter that answers late (test/support/fake_remote.hpp), on
// the manual clock: nothing local is taken or withheld while the remote
// answers or until its reservation is due; granted together after both;
// all or nothing (a remote error, a local failure at once or later,
// cancellation at every stage, with a remote limiter that honours
// cancellation and one that ignores it: every reservation made is
// forgotten, nothing else stays taken); receipts give back to the remote
// limiter; every completion token; the blocking form; the forms a remote
// part cannot serve say so.
#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/remote_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include "fake_remote.hpp"
#include "test_support.hpp"

#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <future>
#include <string>
#include <thread>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::joint_receipt;
using ratelimit::per_second;
using ratelimit::start_empty;
using test_part = ratelimit::basic_part<manual_clock, manual_wait_traits>;
using test_keyed =
    ratelimit::basic_keyed_limiter<std::string, std::hash<std::string>, std::equal_to<std::string>,
                                   manual_clock, manual_wait_traits>;

namespace {

struct joint_outcome {
  int calls = 0;
  boost::system::error_code ec;
  joint_receipt r;
  bool done() const { return calls > 0; }
};

auto recorder(const std::shared_ptr<joint_outcome>& o) {
  return [o](boost::system::error_code ec, joint_receipt r) {
    ++o->calls;
    o->ec = ec;
    o->r = std::move(r);
  };
}

std::shared_ptr<joint_outcome> joint(std::initializer_list<test_part> parts) {
  auto o = std::make_shared<joint_outcome>();
  ratelimit::async_acquire(parts, recorder(o));
  return o;
}

std::shared_ptr<joint_outcome> joint(std::initializer_list<test_part> parts,
                                     asio::cancellation_signal& sig) {
  auto o = std::make_shared<joint_outcome>();
  ratelimit::async_acquire(parts, asio::bind_cancellation_slot(sig.slot(), recorder(o)));
  return o;
}

std::shared_ptr<fake_remote> remote(asio::io_context& ctx, std::uint64_t capacity = 10,
                                    manual_clock::duration interval = std::chrono::seconds(1),
                                    bool empty = false) {
  return std::make_shared<fake_remote>(ctx.get_executor(), capacity, interval, empty);
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(joint_remote, clock_fixture)

BOOST_AUTO_TEST_CASE(nothing_local_is_taken_while_the_remote_answers_late) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx);
  auto o = joint({{a, 3}, {r, 2}});
  BOOST_TEST(!o->done());  // never inside the initiating call
  pump(ctx);
  BOOST_TEST(!o->done());
  BOOST_TEST(r->waiting() == 1u);
  BOOST_TEST(a.available() == 10u);  // nothing taken ...
  BOOST_TEST(a.waiting() == 0u);     // ... nor queued while the remote answers
  auto behind = request(a, 10);      // so a request made meanwhile takes everything
  BOOST_TEST(settle(ctx, [&] { return behind->done(); }));
  BOOST_TEST(behind->ok());
  r->answer_all();
  pump(ctx);
  BOOST_TEST(!o->done());  // its local part now waits its turn: 3 s
  BOOST_TEST(a.waiting() == 1u);
  BOOST_TEST(r->outstanding() == 1u);
  manual_clock::advance(3s);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_TEST(a.available() == 0u);
  BOOST_TEST(r->taken() == 1u);
  BOOST_TEST(r->outstanding() == 0u);
  BOOST_TEST(r->forgotten() == 0u);
  BOOST_REQUIRE(o->r.size() == 2u);
  BOOST_TEST(o->r[0].granted() == 3u);
  BOOST_TEST(o->r[1].granted() == 2u);
}

BOOST_AUTO_TEST_CASE(granted_at_once_when_both_can_give) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx);
  r->auto_answer(true);
  auto o = joint({{r, 4}, {a, 3}});
  BOOST_TEST(!o->done());
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_TEST(a.available() == 7u);
  BOOST_TEST(r->available() == 6u);
  BOOST_REQUIRE(o->r.size() == 2u);  // receipts in the order of the parts
  BOOST_TEST(o->r[0].granted() == 4u);
  BOOST_TEST(o->r[1].granted() == 3u);
  // A receipt gives back to the remote limiter, up to what it was granted.
  BOOST_TEST(o->r[0].give_back(5) == 4u);
  BOOST_TEST(r->given_back() == 4u);
  BOOST_TEST(r->available() == 10u);
  BOOST_TEST(o->r.give_back_all() == 3u);
  BOOST_TEST(a.available() == 10u);
}

BOOST_AUTO_TEST_CASE(waits_until_the_reservation_is_due_holding_nothing_local) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx, 10, 1s, true);  // empty: 2 tokens are due in 2 s
  r->auto_answer(true);
  auto o = joint({{a, 3}, {r, 2}});
  pump(ctx);
  BOOST_TEST(!o->done());
  BOOST_TEST(r->outstanding() == 1u);
  BOOST_TEST(a.available() == 10u);
  BOOST_TEST(a.waiting() == 0u);
  manual_clock::advance(1999ms);
  pump(ctx);
  BOOST_TEST(!o->done());
  BOOST_TEST(a.available() == 10u);
  manual_clock::advance(1ms);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_TEST(a.available() == 7u);
  BOOST_TEST(r->taken() == 1u);
}

BOOST_AUTO_TEST_CASE(a_remote_error_fails_the_request_and_takes_nothing) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx);
  r->fail_next(ratelimit::error::redis_unavailable);
  r->auto_answer(true);
  auto o = joint({{a, 3}, {r, 2}});
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ec == ratelimit::error::redis_unavailable);
  BOOST_TEST(o->r.empty());
  BOOST_TEST(a.available() == 10u);
  BOOST_TEST(r->outstanding() == 0u);
  BOOST_TEST(r->available() == 10u);
}

BOOST_AUTO_TEST_CASE(the_second_remote_failing_forgets_the_first) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r1 = remote(ctx);
  auto r2 = remote(ctx, 5);
  r1->auto_answer(true);
  r2->auto_answer(true);
  auto o = joint({{r1, 2}, {a, 1}, {r2, 6}});  // 6 > r2's capacity
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(r1->forgotten() == 1u);
  BOOST_TEST(r1->outstanding() == 0u);
  BOOST_TEST(r1->available() == 10u);
  BOOST_TEST(a.available() == 10u);
  BOOST_TEST(r1->misuse() == 0u);
}

BOOST_AUTO_TEST_CASE(a_local_failure_at_once_asks_no_remote) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  test_keyed keys(ctx, 5, per_second(1), 100);
  auto r = remote(ctx);
  auto over = joint({{r, 1}, {a, 11}});
  auto over_key = joint({{r, 1}, {keys, std::string("k"), 6}});
  a.close();
  auto closed = joint({{r, 1}, {a, 1}});
  BOOST_TEST(!over->done());
  BOOST_TEST(settle(ctx, [&] { return over->done() && over_key->done() && closed->done(); }));
  BOOST_TEST(over->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(over_key->ec == ratelimit::error::exceeds_capacity);
  BOOST_TEST(closed->ec == ratelimit::error::bucket_closed);
  BOOST_TEST(r->reserve_calls() == 0u);
}

BOOST_AUTO_TEST_CASE(a_local_failure_later_forgets_the_reservation) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1), start_empty);
  auto r = remote(ctx);
  r->auto_answer(true);
  auto o = joint({{a, 3}, {r, 2}});
  pump(ctx);
  BOOST_TEST(a.waiting() == 1u);  // the local part waits its 3 s
  BOOST_TEST(r->outstanding() == 1u);
  a.close();
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ec == ratelimit::error::bucket_closed);
  BOOST_TEST(r->forgotten() == 1u);
  BOOST_TEST(r->available() == 10u);
}

BOOST_AUTO_TEST_CASE(a_local_bucket_destroyed_while_the_remote_answers) {
  asio::io_context ctx;
  auto r = remote(ctx);
  std::shared_ptr<joint_outcome> o;
  {
    test_bucket a(ctx, 10, per_second(1));
    o = joint({{a, 3}, {r, 2}});
    pump(ctx);
  }
  r->answer_all();
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ec == asio::error::operation_aborted);
  BOOST_TEST(r->forgotten() == 1u);
  BOOST_TEST(r->outstanding() == 0u);
}

BOOST_AUTO_TEST_CASE(cancelled_while_a_remote_that_ignores_cancellation_answers) {
  for (auto type : {asio::cancellation_type::terminal, asio::cancellation_type::partial,
                    asio::cancellation_type::total}) {
    manual_clock::reset();
    asio::io_context ctx;
    test_bucket a(ctx, 10, per_second(1));
    auto r = remote(ctx);
    asio::cancellation_signal sig;
    auto o = joint({{a, 3}, {r, 2}}, sig);
    pump(ctx);
    sig.emit(type);
    pump(ctx);
    BOOST_TEST(!o->done());  // its answer is still coming
    r->answer_all();
    BOOST_TEST(settle(ctx, [&] { return o->done(); }));
    BOOST_TEST(o->ec == asio::error::operation_aborted);
    BOOST_TEST(r->forgotten() == 1u);
    BOOST_TEST(r->available() == 10u);
    BOOST_TEST(a.available() == 10u);
    BOOST_TEST(a.waiting() == 0u);
  }
}

BOOST_AUTO_TEST_CASE(cancelled_while_a_remote_that_honours_cancellation_answers) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx);
  r->honour_cancellation(true);
  asio::cancellation_signal sig;
  auto o = joint({{a, 3}, {r, 2}}, sig);
  pump(ctx);
  BOOST_TEST(r->waiting() == 1u);
  sig.emit(asio::cancellation_type::terminal);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ec == asio::error::operation_aborted);
  BOOST_TEST(r->cancelled() == 1u);
  BOOST_TEST(r->waiting() == 0u);
  BOOST_TEST(r->outstanding() == 0u);
  BOOST_TEST(a.available() == 10u);
}

BOOST_AUTO_TEST_CASE(cancelled_while_waiting_for_the_reservation_to_come_due) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx, 10, 1s, true);
  r->auto_answer(true);
  asio::cancellation_signal sig;
  auto o = joint({{a, 3}, {r, 2}}, sig);
  pump(ctx);
  BOOST_TEST(r->outstanding() == 1u);
  sig.emit(asio::cancellation_type::total);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ec == asio::error::operation_aborted);
  BOOST_TEST(r->forgotten() == 1u);
  BOOST_TEST(r->outstanding() == 0u);
  manual_clock::advance(2s);
  BOOST_TEST(r->available() == 2u);  // the reservation went back
  BOOST_TEST(a.available() == 10u);
}

BOOST_AUTO_TEST_CASE(cancelled_while_the_local_parts_wait) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1), start_empty);
  test_bucket b(ctx, 10, per_second(1));
  auto r = remote(ctx);
  r->auto_answer(true);
  asio::cancellation_signal sig;
  auto o = joint({{a, 3}, {b, 4}, {r, 2}}, sig);
  pump(ctx);
  BOOST_TEST(a.waiting() == 1u);
  BOOST_TEST(b.waiting() == 1u);
  manual_clock::advance(2s);
  pump(ctx);
  sig.emit(asio::cancellation_type::partial);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(o->ec == asio::error::operation_aborted);
  BOOST_TEST(a.waiting() == 0u);
  BOOST_TEST(b.waiting() == 0u);
  BOOST_TEST(a.available() == 2u);  // refilled, nothing taken
  BOOST_TEST(b.available() == 10u);
  BOOST_TEST(r->forgotten() == 1u);
  BOOST_TEST(r->taken() == 0u);
}

BOOST_AUTO_TEST_CASE(a_cancellation_after_the_grant_changes_nothing) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx);
  r->auto_answer(true);
  asio::cancellation_signal sig;
  auto o = joint({{a, 3}, {r, 2}}, sig);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  sig.emit(asio::cancellation_type::terminal);
  pump(ctx);
  BOOST_TEST(o->calls == 1);
  BOOST_TEST(!o->ec);
  BOOST_TEST(r->taken() == 1u);
  BOOST_TEST(r->forgotten() == 0u);
}

BOOST_AUTO_TEST_CASE(remote_parts_only) {
  asio::io_context ctx;
  auto r1 = remote(ctx);
  auto r2 = remote(ctx, 10, 1s, true);
  r1->auto_answer(true);
  r2->auto_answer(true);
  auto o = joint({{r1, 2}, {r2, 1}});
  pump(ctx);
  BOOST_TEST(!o->done());  // r2's token is due in 1 s
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_TEST(r1->taken() == 1u);
  BOOST_TEST(r2->taken() == 1u);
  BOOST_TEST(o->r.size() == 2u);
}

BOOST_AUTO_TEST_CASE(a_key_and_a_remote_part) {
  asio::io_context ctx;
  test_keyed keys(ctx, 5, per_second(1), 100);
  auto r = remote(ctx);
  r->auto_answer(true);
  auto o = joint({{keys, std::string("client"), 2}, {r, 1}});
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_TEST(keys.available("client") == 3u);
  BOOST_TEST(o->r[0].give_back_all() == 2u);
  BOOST_TEST(keys.available("client") == 5u);
}

BOOST_AUTO_TEST_CASE(every_completion_token) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1));
  auto r = remote(ctx);
  r->auto_answer(true);
  const test_part parts[] = {{a, 1}, {r, 1}};
  // use_future, from a thread that does not run the context
  {
    running_context rc;
    test_bucket b(rc.ctx, 10, per_second(1));
    auto rr = std::make_shared<fake_remote>(rc.ctx.get_executor(), 10, 1s);
    rr->auto_answer(true);
    const test_part ps[] = {{b, 2}, {rr, 1}};
    auto f = ratelimit::async_acquire(std::span<const test_part>(ps), asio::use_future);
    BOOST_TEST((f.wait_for(20s) == std::future_status::ready));
    BOOST_TEST(f.get().size() == 2u);
    BOOST_TEST(b.available() == 8u);
  }
  // deferred: nothing happens until it is launched
  auto d = ratelimit::async_acquire(std::span<const test_part>(parts), asio::deferred);
  pump(ctx);
  BOOST_TEST(r->reserve_calls() == 0u);
  auto o = std::make_shared<joint_outcome>();
  std::move(d)(recorder(o));
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  // a coroutine
  bool co_done = false;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        joint_receipt jr = co_await ratelimit::async_acquire(std::span<const test_part>(parts),
                                                             asio::use_awaitable);
        co_done = jr.size() == 2u;
      },
      asio::detached);
  BOOST_TEST(settle(ctx, [&] { return co_done; }));
  // the handler's own executor is where it runs
  auto strand = asio::make_strand(ctx);
  bool on_strand = false;
  ratelimit::async_acquire(
      std::span<const test_part>(parts),
      asio::bind_executor(strand, [&](boost::system::error_code, joint_receipt) {
        on_strand = strand.running_in_this_thread();
      }));
  BOOST_TEST(settle(ctx, [&] { return on_strand; }));
  BOOST_TEST(r->taken() == 3u);
  BOOST_TEST(a.available() == 7u);
}

BOOST_AUTO_TEST_CASE(the_blocking_form_and_the_forms_a_remote_part_cannot_serve) {
  running_context rc;
  test_bucket a(rc.ctx, 10, per_second(1));
  auto r = std::make_shared<fake_remote>(rc.ctx.get_executor(), 10, 1s);
  r->auto_answer(true);
  const test_part parts[] = {{a, 2}, {r, 3}};
  boost::system::error_code ec;
  joint_receipt jr = ratelimit::acquire(std::span<const test_part>(parts), ec);
  BOOST_TEST(!ec);
  BOOST_TEST(jr.size() == 2u);
  BOOST_TEST(a.available() == 8u);
  BOOST_TEST(r->taken() == 1u);
  // From a thread that runs the context: it would deadlock.
  std::promise<boost::system::error_code> on_ctx;
  asio::post(rc.ctx, [&] {
    boost::system::error_code e;
    ratelimit::acquire(std::span<const test_part>(parts), e);
    on_ctx.set_value(e);
  });
  BOOST_TEST(on_ctx.get_future().get() == ratelimit::error::would_deadlock);
  // A deadline, a try and a retry-after need an answer now: not supported.
  ratelimit::acquire_for(std::span<const test_part>(parts), 1s, ec);
  BOOST_TEST(ec == asio::error::operation_not_supported);
  std::optional<manual_clock::duration> after;
  BOOST_TEST(!ratelimit::try_acquire(std::span<const test_part>(parts), after, ec));
  BOOST_TEST(ec == asio::error::operation_not_supported);
  BOOST_TEST(!after);
  BOOST_TEST(!ratelimit::retry_after(std::span<const test_part>(parts)));
  BOOST_TEST(a.available() == 8u);
  BOOST_TEST(r->outstanding() == 0u);
  BOOST_CHECK_THROW(test_part(std::shared_ptr<fake_remote>(), 1), std::invalid_argument);
}

namespace {
/// A stateful allocator (it counts): a handler bound to it must be asked for
/// it, and get it, at every step, also after its operation moved it away.
template <typename T>
struct counting_alloc {
  using value_type = T;
  std::atomic<int>* count;
  explicit counting_alloc(std::atomic<int>* c) noexcept : count(c) {}
  template <typename U>
  counting_alloc(const counting_alloc<U>& o) noexcept : count(o.count) {}
  T* allocate(std::size_t n) {
    ++*count;
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    --*count;
    std::allocator<T>().deallocate(p, n);
  }
  template <typename U>
  bool operator==(const counting_alloc<U>& o) const noexcept {
    return count == o.count;
  }
};
}  // namespace

BOOST_AUTO_TEST_CASE(a_handler_with_its_own_allocator_through_every_stage) {
  asio::io_context ctx;
  test_bucket a(ctx, 10, per_second(1), start_empty);  // the local part waits
  auto r = remote(ctx, 10, 1s, true);                  // the reservation is due later
  r->auto_answer(true);
  std::atomic<int> live{0};
  auto o = std::make_shared<joint_outcome>();
  const test_part parts[] = {{r, 1}, {a, 2}};
  ratelimit::async_acquire(std::span<const test_part>(parts),
                           asio::bind_allocator(counting_alloc<void>(&live), recorder(o)));
  pump(ctx);
  BOOST_TEST(live.load() > 0);  // the operation's memory is the handler's
  manual_clock::advance(1s);    // due: the local request is made, and waits 1 s more
  pump(ctx);
  BOOST_TEST(a.waiting() == 1u);
  manual_clock::advance(1s);
  BOOST_TEST(settle(ctx, [&] { return o->done(); }));
  BOOST_TEST(!o->ec);
  BOOST_TEST(live.load() == 0);  // all of it given back (before the upcall, as Asio asks)
  BOOST_TEST(r->taken() == 1u);
}

BOOST_AUTO_TEST_CASE(a_request_destroyed_with_its_context_forgets_its_reservation) {
  std::shared_ptr<fake_remote> r;
  auto o = std::make_shared<joint_outcome>();
  {
    asio::io_context ctx;
    r = remote(ctx, 10, 1s, true);  // due in 2 s
    r->auto_answer(true);
    test_bucket a(ctx, 10, per_second(1));
    const test_part parts[] = {{a, 3}, {r, 2}};
    ratelimit::async_acquire(std::span<const test_part>(parts), recorder(o));
    pump(ctx);
    BOOST_TEST(r->outstanding() == 1u);  // reserved; it waits for the due time
  }  // the bucket, then the context (and with it the waiting operation) go
  BOOST_TEST(!o->done());
  BOOST_TEST(r->outstanding() == 0u);
  BOOST_TEST(r->forgotten() == 1u);
}

BOOST_AUTO_TEST_CASE(a_blocked_caller_whose_operation_is_dropped_returns) {
  running_context rc;
  test_bucket a(rc.ctx, 10, per_second(1));
  auto r = std::make_shared<fake_remote>(rc.ctx.get_executor(), 10, 1s);
  const test_part parts[] = {{a, 2}, {r, 1}};
  std::promise<boost::system::error_code> result;
  std::thread caller([&] {
    boost::system::error_code ec;
    ratelimit::acquire(std::span<const test_part>(parts), ec);
    result.set_value(ec);
  });
  BOOST_TEST(eventually([&] { return r->waiting() == 1u; }));
  r->drop_pending();  // the remote limiter goes away without answering
  auto f = result.get_future();
  BOOST_TEST((f.wait_for(20s) == std::future_status::ready));
  caller.join();
  BOOST_TEST(f.get() == ratelimit::error::context_stopped);
  BOOST_TEST(a.available() == 10u);
}

// Threads: requests over two shared local buckets and a remote limiter
// that answers on a pool, some cancelled from their own strand, some failed
// by the remote limiter. Every request completes once; every reservation is
// taken or forgotten exactly once; the local buckets lose exactly what the
// granted requests took.
BOOST_AUTO_TEST_CASE(threads_with_cancellation_and_remote_failures) {
#ifdef RATELIMIT_TEST_SANITIZED
  const int rounds = 300;
#else
  const int rounds = 2000;
#endif
  asio::thread_pool pool(3);
  test_bucket a(pool.get_executor(), 1'000'000, per_second(1));
  test_bucket b(pool.get_executor(), 1'000'000, per_second(1));
  auto r = std::make_shared<fake_remote>(pool.get_executor(), 1'000'000, 1s);
  r->auto_answer(true);
  std::atomic<int> done{0}, granted{0}, failed{0}, twice{0};
  std::atomic<std::uint64_t> taken_a{0}, taken_b{0};
  for (int i = 0; i < rounds; ++i) {
    auto strand = asio::make_strand(pool);
    asio::post(strand, [&, i, strand] {
      if (i % 7 == 3) r->fail_next(ratelimit::error::redis_unavailable);
      auto sig = std::make_shared<asio::cancellation_signal>();
      auto calls = std::make_shared<std::atomic<int>>(0);
      const std::uint64_t na = 1 + i % 3, nb = 1 + i % 2;
      const test_part ps[] = {{a, na}, {r, 1}, {b, nb}};
      ratelimit::async_acquire(
          std::span<const test_part>(ps),
          asio::bind_cancellation_slot(
              sig->slot(),
              asio::bind_executor(
                  strand, [&, sig, calls, na, nb](boost::system::error_code ec, joint_receipt jr) {
                    if (calls->fetch_add(1) != 0) ++twice;
                    if (!ec) {
                      ++granted;
                      taken_a += na;
                      taken_b += nb;
                      if (jr.size() != 3u) ++twice;
                    } else {
                      ++failed;
                    }
                    ++done;
                  })));
      if (i % 5 == 1) asio::post(strand, [sig] { sig->emit(asio::cancellation_type::terminal); });
    });
  }
  BOOST_TEST(eventually([&] { return done.load() == rounds; }));
  pool.join();
  BOOST_TEST(twice.load() == 0);
  BOOST_TEST(granted.load() + failed.load() == rounds);
  BOOST_TEST(failed.load() > 0);
  BOOST_TEST(granted.load() > 0);
  BOOST_TEST(r->outstanding() == 0u);
  BOOST_TEST(r->misuse() == 0u);
  BOOST_TEST(r->taken() == static_cast<std::size_t>(granted.load()));
  BOOST_TEST(a.available() == 1'000'000u - taken_a.load());
  BOOST_TEST(b.available() == 1'000'000u - taken_b.load());
}

BOOST_AUTO_TEST_SUITE_END()
