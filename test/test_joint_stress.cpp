// The joint acquire under stress (for TSan and ASan; bounded in real time)
// and against starvation (deterministic, on the manual clock).
//
// 1. threads_over_overlapping_buckets_and_keys[_exact_accounting]: a
//    thread_pool runs the completions while caller threads make joint
//    requests over overlapping sets of token buckets and keys of one
//    keyed_limiter (real time, fast rates), in random part orders: async_acquire (some cancelled
//    from a canceller thread at random times, terminal, partial or total), the joint try (with and
//    without retry-after), the blocking acquire_for with short timeouts, retry_after, give-backs of
//    receipts (in the handler or later from another thread), and single-bucket async_get_token /
//    try_get_token on the same buckets and keys; now and then a request with
//    a part over its capacity (fails at once, takes nothing). Checked: no
//    sanitizer report; every async operation completes exactly once (none
//    lost, none twice, no handler destroyed uncalled); nothing deadlocks
//    (everything ends within a generous bound); a granted receipt has every
//    part with exactly its tokens, a failed or cancelled request's receipt is
//    empty, and no error but the expected ones; at the end nobody is left
//    queued, nothing is withheld (the limiters refill to their capacity)
//    and a joint request over all of them is granted. Then, per limiter:
//    - with small capacities, full at the start (the limiters run at their
//      limit): over the test's whole window [start, end] of steady_clock
//      (start read before the limiters exist, end after the last completion
//      and give-back),
//          granted - given back <= capacity + rate * (end - start) + 1
//      (every clock read of the library falls in the window, so no more can
//      have accrued; +1 token for the sub-token remainder of the accrual; a
//      give-back swallowed by the cap still counts as given back, which only
//      makes the left side smaller than what was really taken);
//    - with capacities never reached, empty at the start (_exact_accounting):
//          granted - given back + left in the limiter == accrued
//      within the clock readings that bracket the limiter's start and the
//      reading of its level (+-1 token): so a request that failed, timed out
//      or was cancelled took nothing anywhere, and none was made from nothing.
//
// 2. abusers_do_not_delay_..., on the manual clock: a good client, paced
//    within its own limit, makes joint requests {own, global} every 10 ms;
//    first alone, then with 50 abusive clients (1 token/s each, capacity 1)
//    each keeping 4 joint requests {own, global} queued at all times, and
//    trying more (refused). The global bucket (1000/s, capacity 10) always
//    has tokens to spare for the good client at the abusers' grant times, so
//    granting it at once can never move their T: each of its requests must
//    be granted at the instant it is made, in both phases (the same
//    instants). Also: the abusers get exactly their 1 token/s (each grant at
//    its due instant, counted at every step), and their tries never take a
//    token their queued requests are due.
#include <ratelimit/joint.hpp>
#include <ratelimit/keyed_limiter.hpp>
#include <ratelimit/token_bucket.hpp>

#include "test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_future.hpp>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <deque>
#include <future>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using namespace ratelimit::test;
using ratelimit::joint_receipt;
using ratelimit::per_second;
using clk = std::chrono::steady_clock;

namespace {

// --- 1. the thread stress ---------------------------------------------------

// How long the callers issue requests in each of the two cases (real time):
// bounded in time, so under the sanitizers they simply make fewer requests.
// RATELIMIT_STRESS_MS overrides it (e.g. to hunt longer).
std::chrono::milliseconds stress_time() {
  if (const char* s = std::getenv("RATELIMIT_STRESS_MS"))
    return std::chrono::milliseconds(std::atoi(s));
#ifdef RATELIMIT_TEST_SANITIZED
  return std::chrono::milliseconds(500);
#else
  return std::chrono::milliseconds(1500);
#endif
}

constexpr int pool_threads = 4;
constexpr int caller_threads = 6;
constexpr std::int64_t max_in_flight = 24;  // async operations per caller
constexpr std::size_t max_stashed = 256;    // receipts kept for a later give-back

struct limits {
  std::uint64_t capacity;
  std::uint64_t per_s;
};

// Limiters 0..4: token buckets; 5..7: keys of the keyed limiter.
constexpr int bucket_count = 5;
constexpr int key_count = 3;
constexpr int limiter_count = bucket_count + key_count;

/// How the limiters are set up for one run of the stress.
struct config {
  std::array<limits, bucket_count> buckets;
  limits keys;  // (every key: the keyed limiter's default)
  bool exact;   // start empty, with capacities never reached: exact accounting
  limits of(int id) const { return id < bucket_count ? buckets[id] : keys; }
};

// Small capacities, full at the start: the limiters run at their limit, and
// the bound (capacity + rate * window) is nearly reached.
constexpr config bounded_config{
    {{{5, 2'000}, {10, 5'000}, {20, 8'000}, {50, 20'000}, {8, 3'000}}}, {12, 4'000}, false};

// Capacities never reached, empty at the start: every token that accrued is
// either granted or still in the limiter, so a request that failed, timed
// out or was cancelled yet took a token anywhere shows as one missing.
// (Rates dividing 1e9: a whole number of ns per token.)
constexpr std::uint64_t huge_capacity = 1'000'000'000;
constexpr config exact_config{{{{huge_capacity, 1'000},
                                {huge_capacity, 2'000},
                                {huge_capacity, 4'000},
                                {huge_capacity, 5'000},
                                {huge_capacity, 8'000}}},
                              {huge_capacity, 2'500},
                              true};

struct account {
  std::atomic<std::uint64_t> granted{0};
  std::atomic<std::uint64_t> given_back{0};
};

struct tally {
  std::atomic<std::uint64_t> started{0};    // async operations
  std::atomic<std::uint64_t> completed{0};  // their first invocation
  std::atomic<std::uint64_t> doubled{0};    // a handler invoked a second time
  std::atomic<std::uint64_t> dropped{0};    // a handler destroyed without being invoked
  std::atomic<std::uint64_t> joint_granted{0}, joint_aborted{0}, joint_over{0};
  std::atomic<std::uint64_t> single_granted{0}, single_aborted{0};
  std::atomic<std::uint64_t> tries_granted{0}, tries_refused{0};
  std::atomic<std::uint64_t> blocking_granted{0}, blocking_timed_out{0};
  std::atomic<std::uint64_t> give_backs{0}, cancels{0};
  std::atomic<std::uint64_t> bad{0};  // any outcome the library must never give
  std::array<account, limiter_count> acc;

  std::mutex m;
  std::string first_bad;
  void fail(const std::string& what) {
    if (bad++ == 0) {
      std::lock_guard lk(m);
      first_bad = what;
    }
  }
};

/// Receipts kept by one thread and given back later by another.
struct stash {
  struct entry {
    std::vector<int> ids;
    joint_receipt r;
  };
  std::mutex m;
  std::deque<entry> entries;
};

struct world {
  const config& cfg;
  std::vector<std::unique_ptr<ratelimit::token_bucket>> buckets;
  ratelimit::keyed_limiter<std::string> keyed;
  std::array<std::string, key_count> keys{"k0", "k1", "k2"};
  // When each limiter started accruing: between these two readings.
  std::array<clk::time_point, limiter_count> born_before, born_after;

  world(asio::thread_pool& pool, const config& c)
      : cfg(c), keyed(pool, c.keys.capacity, per_second(c.keys.per_s), 64) {
    for (int id = 0; id < bucket_count; ++id) {
      const limits l = cfg.of(id);
      born_before[id] = clk::now();
      buckets.push_back(c.exact ? std::make_unique<ratelimit::token_bucket>(
                                      pool, l.capacity, per_second(l.per_s), ratelimit::start_empty)
                                : std::make_unique<ratelimit::token_bucket>(pool, l.capacity,
                                                                            per_second(l.per_s)));
      born_after[id] = clk::now();
    }
    for (int k = 0; k < key_count; ++k) {
      const int id = bucket_count + k;
      born_before[id] = clk::now();
      if (c.exact) {  // a key's bucket is made full: drained at once
        BOOST_REQUIRE(keyed.try_get_token(keys[k], c.keys.capacity));
      }
      born_after[id] = clk::now();
    }
  }
  limits of(int id) const { return cfg.of(id); }

  ratelimit::part part(int id, std::uint64_t n) {
    if (id < bucket_count) return ratelimit::part(*buckets[id], n);
    return ratelimit::part(keyed, keys[id - bucket_count], n);
  }
};

/// One joint request: 1 to 4 distinct limiters in a random order.
struct request {
  std::vector<int> ids;
  std::vector<std::uint64_t> ns;
  std::vector<ratelimit::part> parts;
  bool over = false;  // a part over its capacity: must fail with exceeds_capacity
  std::atomic<int> calls{0};

  std::span<const ratelimit::part> span() const { return parts; }
};

std::shared_ptr<request> make_request(world& w, std::mt19937& rng) {
  auto q = std::make_shared<request>();
  std::array<int, limiter_count> all;
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  const int k = 1 + static_cast<int>(rng() % 4);
  for (int i = 0; i < k; ++i) {
    const limits l = w.of(all[i]);
    q->ids.push_back(all[i]);
    q->ns.push_back(1 + rng() % std::min<std::uint64_t>(3, l.capacity));
  }
  if (rng() % 64 == 0) {
    const std::size_t i = rng() % q->ids.size();
    q->ns[i] = w.of(q->ids[i]).capacity + 1;
    q->over = true;
  }
  for (std::size_t i = 0; i < q->ids.size(); ++i)
    q->parts.push_back(w.part(q->ids[i], q->ns[i]));
  return q;
}

std::mt19937& thread_rng() {
  thread_local std::mt19937 rng(
      static_cast<unsigned>(std::hash<std::thread::id>()(std::this_thread::get_id())));
  return rng;
}

/// A granted joint receipt: checked (every part, exactly its tokens),
/// counted, then given back in part now, kept for a later give-back by
/// another thread, or kept (spent).
void on_joint_grant(tally& t, stash& st, const request& q, joint_receipt r, const char* how) {
  if (r.size() != q.ids.size()) {
    t.fail(std::string(how) + ": a receipt with " + std::to_string(r.size()) + " parts for " +
           std::to_string(q.ids.size()));
    return;
  }
  for (std::size_t i = 0; i < r.size(); ++i) {
    if (r[i].granted() != q.ns[i] || r[i].held() != q.ns[i])
      t.fail(std::string(how) + ": part " + std::to_string(i) + " granted " +
             std::to_string(r[i].granted()) + " of " + std::to_string(q.ns[i]));
    t.acc[q.ids[i]].granted += r[i].granted();
  }
  std::mt19937& rng = thread_rng();
  switch (rng() % 3) {
    case 0:
      for (std::size_t i = 0; i < r.size(); ++i) {
        const std::uint64_t n = r[i].give_back(rng() % (r[i].granted() + 1));
        t.acc[q.ids[i]].given_back += n;
      }
      ++t.give_backs;
      break;
    case 1: {
      std::lock_guard lk(st.m);
      if (st.entries.size() < max_stashed) st.entries.push_back({q.ids, std::move(r)});
      break;
    }
    default:
      break;  // kept: spent
  }
}

/// Gives back (part of) one stashed receipt, if any.
void give_back_one(tally& t, stash& st, std::mt19937& rng, bool all = false) {
  std::optional<stash::entry> e;
  {
    std::lock_guard lk(st.m);
    if (st.entries.empty()) return;
    e.emplace(std::move(st.entries.front()));
    st.entries.pop_front();
  }
  for (std::size_t i = 0; i < e->r.size(); ++i) {
    const std::uint64_t k = all ? e->r[i].held() : rng() % (e->r[i].held() + 1);
    t.acc[e->ids[i]].given_back += e->r[i].give_back(k);
  }
  ++t.give_backs;
}

/// Cancellations emitted from their own thread at random times.
struct canceller {
  struct pending {
    std::shared_ptr<asio::cancellation_signal> sig;
    clk::time_point at;
    asio::cancellation_type type;
  };
  std::mutex m;
  std::vector<pending> list;

  void add(std::shared_ptr<asio::cancellation_signal> sig, clk::time_point at,
           asio::cancellation_type type) {
    std::lock_guard lk(m);
    list.push_back({std::move(sig), at, type});
  }

  /// Emits what is due until `stop`, then everything left.
  void run(const std::atomic<bool>& stop, tally& t) {
    std::mt19937 rng(99);
    for (;;) {
      const bool last = stop.load();
      std::vector<pending> due;
      {
        std::lock_guard lk(m);
        const auto now = clk::now();
        auto mid = std::partition(list.begin(), list.end(),
                                  [&](const pending& p) { return !last && p.at > now; });
        due.assign(std::make_move_iterator(mid), std::make_move_iterator(list.end()));
        list.erase(mid, list.end());
      }
      for (pending& p : due) {
        p.sig->emit(p.type);
        ++t.cancels;
      }
      if (last) return;
      std::this_thread::sleep_for(std::chrono::microseconds(50 + rng() % 250));
    }
  }
};

asio::cancellation_type random_cancel_type(std::mt19937& rng) {
  switch (rng() % 3) {
    case 0:
      return asio::cancellation_type::terminal;
    case 1:
      return asio::cancellation_type::partial;
    default:
      return asio::cancellation_type::total;
  }
}

/// The handler of an async joint request: counts its invocations and its
/// destruction uncalled. It owns its signal (so does the canceller).
class joint_handler {
 public:
  joint_handler(tally& t, stash& st, std::shared_ptr<request> q,
                std::shared_ptr<asio::cancellation_signal> sig,
                std::shared_ptr<std::atomic<std::int64_t>> in_flight)
      : t_(&t),
        st_(&st),
        q_(std::move(q)),
        sig_(std::move(sig)),
        in_flight_(std::move(in_flight)) {}
  joint_handler(joint_handler&& o) noexcept
      : t_(o.t_),
        st_(o.st_),
        q_(std::move(o.q_)),
        sig_(std::move(o.sig_)),
        in_flight_(std::move(o.in_flight_)),
        invoked_(o.invoked_) {}
  joint_handler& operator=(joint_handler&&) = delete;
  ~joint_handler() {
    if (q_ && !invoked_) ++t_->dropped;
  }

  void operator()(boost::system::error_code ec, joint_receipt r) {
    invoked_ = true;
    if (q_->calls.fetch_add(1) != 0) {
      ++t_->doubled;
      return;
    }
    if (ec) {
      if (!r.empty()) t_->fail("async: a failed request (" + ec.message() + ") with a receipt");
      if (ec == asio::error::operation_aborted && !q_->over)
        ++t_->joint_aborted;
      else if (ec == ratelimit::error::exceeds_capacity && q_->over)
        ++t_->joint_over;
      else
        t_->fail("async: unexpected " + ec.message() + (q_->over ? " (over)" : ""));
    } else if (q_->over) {
      t_->fail("async: a request over a capacity granted");
    } else {
      ++t_->joint_granted;
      on_joint_grant(*t_, *st_, *q_, std::move(r), "async");
    }
    --*in_flight_;
    ++t_->completed;
  }

 private:
  tally* t_;
  stash* st_;
  std::shared_ptr<request> q_;
  std::shared_ptr<asio::cancellation_signal> sig_;
  std::shared_ptr<std::atomic<std::int64_t>> in_flight_;
  bool invoked_ = false;
};

/// The handler of a single-bucket (or single-key) async_get_token.
class single_handler {
 public:
  single_handler(tally& t, int id, std::uint64_t n, std::shared_ptr<asio::cancellation_signal> sig,
                 std::shared_ptr<std::atomic<std::int64_t>> in_flight)
      : t_(&t),
        id_(id),
        n_(n),
        sig_(std::move(sig)),
        in_flight_(std::move(in_flight)),
        calls_(std::make_shared<std::atomic<int>>(0)) {}
  single_handler(single_handler&& o) noexcept
      : t_(o.t_),
        id_(o.id_),
        n_(o.n_),
        sig_(std::move(o.sig_)),
        in_flight_(std::move(o.in_flight_)),
        calls_(std::move(o.calls_)),
        invoked_(o.invoked_) {}
  single_handler& operator=(single_handler&&) = delete;
  ~single_handler() {
    if (calls_ && !invoked_) ++t_->dropped;
  }

  void operator()(boost::system::error_code ec) {
    invoked_ = true;
    if (calls_->fetch_add(1) != 0) {
      ++t_->doubled;
      return;
    }
    if (!ec) {
      ++t_->single_granted;
      t_->acc[id_].granted += n_;
    } else if (ec == asio::error::operation_aborted) {
      ++t_->single_aborted;
    } else {
      t_->fail("single: unexpected " + ec.message());
    }
    --*in_flight_;
    ++t_->completed;
  }

 private:
  tally* t_;
  int id_;
  std::uint64_t n_;
  std::shared_ptr<asio::cancellation_signal> sig_;
  std::shared_ptr<std::atomic<std::int64_t>> in_flight_;
  std::shared_ptr<std::atomic<int>> calls_;
  bool invoked_ = false;
};

/// One caller thread's loop until `end`.
void caller(int index, world& w, tally& t, stash& st, canceller& cx, clk::time_point end) {
  std::mt19937 rng(1000 + index);
  auto in_flight = std::make_shared<std::atomic<std::int64_t>>(0);
  while (clk::now() < end) {
    const int what = static_cast<int>(rng() % 100);
    const bool may_start = in_flight->load() < max_in_flight;
    if (what < 30 && may_start) {  // async joint, 40% of them cancelled
      auto q = make_request(w, rng);
      std::shared_ptr<asio::cancellation_signal> sig;
      if (rng() % 5 < 2) sig = std::make_shared<asio::cancellation_signal>();
      ++t.started;
      ++*in_flight;
      if (sig) {
        ratelimit::async_acquire(
            q->span(),
            asio::bind_cancellation_slot(sig->slot(), joint_handler(t, st, q, sig, in_flight)));
        // After the initiation: the emission never overlaps it.
        cx.add(sig, clk::now() + std::chrono::microseconds(rng() % 3000), random_cancel_type(rng));
      } else {
        ratelimit::async_acquire(q->span(), joint_handler(t, st, q, nullptr, in_flight));
      }
    } else if (what < 45) {  // the joint try
      auto q = make_request(w, rng);
      boost::system::error_code ec;
      std::optional<clk::duration> wait;
      std::optional<joint_receipt> r = rng() % 2 ? ratelimit::try_acquire(q->span(), wait, ec)
                                                 : ratelimit::try_acquire(q->span());
      if (r) {
        if (q->over) t.fail("try: a request over a capacity granted");
        ++t.tries_granted;
        on_joint_grant(t, st, *q, std::move(*r), "try");
      } else {
        ++t.tries_refused;
        if (ec && !(q->over && ec == ratelimit::error::exceeds_capacity))
          t.fail("try: unexpected " + ec.message());
      }
    } else if (what < 52) {  // blocking, with a short timeout
      auto q = make_request(w, rng);
      boost::system::error_code ec;
      joint_receipt r =
          ratelimit::acquire_for(q->span(), std::chrono::microseconds(rng() % 3000), ec);
      if (ec) {
        if (!r.empty()) t.fail("acquire_for: a failed request with a receipt");
        if (!(q->over && ec == ratelimit::error::exceeds_capacity))
          t.fail("acquire_for: unexpected " + ec.message());
      } else if (r.empty()) {
        ++t.blocking_timed_out;
      } else {
        if (q->over) t.fail("acquire_for: a request over a capacity granted");
        ++t.blocking_granted;
        on_joint_grant(t, st, *q, std::move(r), "acquire_for");
      }
    } else if (what < 67 && may_start) {  // single async, a third of them cancelled
      const int id = static_cast<int>(rng() % limiter_count);
      const std::uint64_t n = 1 + rng() % 3;
      std::shared_ptr<asio::cancellation_signal> sig;
      if (rng() % 3 == 0) sig = std::make_shared<asio::cancellation_signal>();
      ++t.started;
      ++*in_flight;
      single_handler h(t, id, n, sig, in_flight);
      if (id < bucket_count) {
        if (sig)
          w.buckets[id]->async_get_token(n,
                                         asio::bind_cancellation_slot(sig->slot(), std::move(h)));
        else
          w.buckets[id]->async_get_token(n, std::move(h));
      } else {
        const std::string& key = w.keys[id - bucket_count];
        if (sig)
          w.keyed.async_get_token(key, n, asio::bind_cancellation_slot(sig->slot(), std::move(h)));
        else
          w.keyed.async_get_token(key, n, std::move(h));
      }
      if (sig)
        cx.add(sig, clk::now() + std::chrono::microseconds(rng() % 3000), random_cancel_type(rng));
    } else if (what < 80) {  // single try
      const int id = static_cast<int>(rng() % limiter_count);
      const std::uint64_t n = 1 + rng() % 3;
      const bool got = id < bucket_count ? w.buckets[id]->try_get_token(n)
                                         : w.keyed.try_get_token(w.keys[id - bucket_count], n);
      if (got) t.acc[id].granted += n;
    } else if (what < 92) {
      give_back_one(t, st, rng);
    } else if (what < 96) {
      auto q = make_request(w, rng);
      const auto wait = ratelimit::retry_after(q->span());
      if (q->over == wait.has_value()) t.fail("retry_after: wrong for a request");
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
    }
  }
}

// --- 2. starvation, on the manual clock -------------------------------------

using test_part = ratelimit::basic_part<manual_clock, manual_wait_traits>;
using test_keyed =
    ratelimit::basic_keyed_limiter<std::string, std::hash<std::string>, std::equal_to<std::string>,
                                   manual_clock, manual_wait_traits>;

constexpr auto step = std::chrono::milliseconds(10);  // the good client's pace
constexpr int phase_steps = 300;                      // 3 s of manual time
constexpr int abuser_count = 50;
constexpr int abuser_spacing = 2;  // steps between two abusers' starts
constexpr int chains = 4;          // requests each abuser keeps queued

/// The clients as token buckets: the good one 100/s (capacity 5), each abuser 1/s (capacity 1).
struct bucket_clients {
  asio::io_context& ctx;
  test_bucket good{ctx, 5, per_second(100)};
  std::deque<test_bucket> abusers;

  explicit bucket_clients(asio::io_context& c) : ctx(c) {}
  test_part good_part() { return test_part(good, 1); }
  void add_abuser(int) { abusers.emplace_back(ctx, 1, per_second(1)); }
  test_part abuser_part(int i) { return test_part(abusers[i], 1); }
  void stop_abusers() { abusers.clear(); }  // their queued requests are aborted
};

/// The clients as keys of one keyed limiter: abusers at its default (1/s,
/// capacity 1), the good one with a quota of its own (100/s, capacity 5).
struct keyed_clients {
  test_keyed clients;
  std::vector<std::string> names;

  explicit keyed_clients(asio::io_context& ctx) : clients(ctx, 1, per_second(1), 1000) {
    clients.set_quota("good", ratelimit::quota{5, per_second(100)});
  }
  test_part good_part() { return test_part(clients, std::string("good"), 1); }
  void add_abuser(int i) { names.push_back("abuser-" + std::to_string(i)); }
  test_part abuser_part(int i) { return test_part(clients, names[i], 1); }
  void stop_abusers() { clients.cancel(); }  // (the good client has nothing queued then)
};

struct phase_state {
  bool stopping = false;
  int bad = 0;  // an abuser's request ended with an error other than operation_aborted
  std::uint64_t abuser_grants = 0;
  int chains_ended = 0;
};

template <typename Clients>
void abuser_request(Clients& c, test_bucket& global, int i, phase_state& st, bool own_first) {
  auto handler = [&c, &global, i, &st, own_first](boost::system::error_code ec, joint_receipt) {
    if (!ec) ++st.abuser_grants;
    if (ec && ec != asio::error::operation_aborted) ++st.bad;
    if (ec || st.stopping) {
      ++st.chains_ended;
      return;
    }
    abuser_request(c, global, i, st, !own_first);  // at once: always over its limit
  };
  if (own_first)
    ratelimit::async_acquire({c.abuser_part(i), test_part(global, 1)}, std::move(handler));
  else
    ratelimit::async_acquire({test_part(global, 1), c.abuser_part(i)}, std::move(handler));
}

struct phase_result {
  std::vector<std::int64_t> waits_ns;  // per good request, by step (-1: never granted)
  int late = 0;                        // good requests not granted at the step they were made
  int abusers_off = 0;                 // steps where the abusers' grants were not as due
  int abuser_tries_granted = 0;
  int bad = 0;
};

/// One phase of phase_steps steps; with abusers, abuser i starts at step
/// i * abuser_spacing with `chains` requests, each re-made at once when granted.
template <typename Clients>
phase_result run_phase(asio::io_context& ctx, test_bucket& global, Clients& c, bool with_abusers) {
  phase_result res;
  phase_state st;
  struct good_request {
    manual_clock::time_point made;
    std::optional<manual_clock::time_point> granted;
    bool failed = false;
  };
  std::vector<std::shared_ptr<good_request>> good;
  std::vector<manual_clock::time_point> started_at;
  std::mt19937 rng(5);
  const auto expected_abuser_grants = [&](manual_clock::time_point now) {
    std::uint64_t n = 0;
    for (const auto s : started_at)
      n += 1 + static_cast<std::uint64_t>((now - s) / std::chrono::seconds(1));
    return n;
  };
  for (int s = 0; s < phase_steps; ++s) {
    if (s > 0) manual_clock::advance(step);
    const auto now = manual_clock::now();
    // The good request first, before the abusers' requests due now are served.
    auto g = std::make_shared<good_request>();
    g->made = now;
    auto on_good = [g](boost::system::error_code ec, joint_receipt r) {
      if (ec || r.size() != 2) {
        g->failed = true;
        return;
      }
      g->granted = manual_clock::now();  // (the clock moves only between steps)
    };
    if (s % 2)
      ratelimit::async_acquire({c.good_part(), test_part(global, 1)}, on_good);
    else
      ratelimit::async_acquire({test_part(global, 1), c.good_part()}, on_good);
    good.push_back(g);
    if (with_abusers && s % abuser_spacing == 0 && started_at.size() < abuser_count) {
      const int i = static_cast<int>(started_at.size());
      c.add_abuser(i);
      started_at.push_back(now);
      for (int k = 0; k < chains; ++k)
        abuser_request(c, global, i, st, k % 2 == 0);
    }
    // Abusers over their limit try for more: refused, as their queued
    // requests are due every token they get.
    for (int k = 0; k < 5 && !started_at.empty(); ++k) {
      const int i = static_cast<int>(rng() % started_at.size());
      if (ratelimit::try_acquire({c.abuser_part(i), test_part(global, 1)}))
        ++res.abuser_tries_granted;
    }
    // Everything due now is served: the good request (at once, on time) and
    // the abusers' grants due by now, no more.
    // (Bounded in real time; once a few steps went wrong, only briefly: the
    // test has failed and need not take minutes to say so.)
    const std::uint64_t due = expected_abuser_grants(now);
    settle(
        ctx, [&] { return g->granted || g->failed; },
        std::chrono::milliseconds(res.late > 3 ? 20 : 2000));
    if (!g->granted || *g->granted != now) ++res.late;
    settle(
        ctx, [&] { return st.abuser_grants >= due; },
        std::chrono::milliseconds(res.abusers_off > 3 ? 20 : 2000));
    if (st.abuser_grants != due) ++res.abusers_off;
  }
  st.stopping = true;
  c.stop_abusers();
  const int all_chains = static_cast<int>(started_at.size()) * chains;
  // Late good requests complete by the time they are due (a few steps at most).
  for (int s = 0; s < 100; ++s) {
    if (settle(
            ctx,
            [&] {
              return st.chains_ended == all_chains &&
                     std::all_of(good.begin(), good.end(),
                                 [](const auto& g) { return g->granted || g->failed; });
            },
            std::chrono::milliseconds(50)))
      break;
    manual_clock::advance(step);
  }
  for (const auto& g : good)
    res.waits_ns.push_back(g->granted ? (*g->granted - g->made).count() : -1);
  res.bad = st.bad + static_cast<int>(std::count_if(good.begin(), good.end(),
                                                    [](const auto& g) { return g->failed; }));
  BOOST_TEST(st.chains_ended == all_chains);
  if (with_abusers) {
    BOOST_TEST_MESSAGE("abusers: " << st.abuser_grants << " grants in "
                                   << phase_steps * step.count() << " ms of manual time");
  }
  return res;
}

std::string describe(const std::vector<std::int64_t>& waits) {
  std::int64_t max = 0, sum = 0, never = 0;
  for (auto w : waits) {
    if (w < 0) {
      ++never;
      continue;
    }
    max = std::max(max, w);
    sum += w;
  }
  const auto granted = static_cast<std::int64_t>(waits.size()) - never;
  return std::to_string(granted) + " granted of " + std::to_string(waits.size()) + ", mean wait " +
         std::to_string(granted ? sum / granted / 1000 : 0) + " us, max " +
         std::to_string(max / 1000) + " us";
}

template <typename Clients>
void starvation_case() {
  asio::io_context ctx;
  test_bucket global(ctx, 10, per_second(1000));
  Clients c(ctx);
  const phase_result alone = run_phase(ctx, global, c, false);
  const phase_result crowd = run_phase(ctx, global, c, true);
  BOOST_TEST_MESSAGE("good client alone: " << describe(alone.waits_ns));
  BOOST_TEST_MESSAGE("good client with " << abuser_count
                                         << " abusers: " << describe(crowd.waits_ns));
  BOOST_TEST(alone.late == 0);
  BOOST_TEST(alone.bad == 0);
  // The same grants at the same instants (each when made) with the abusers.
  BOOST_TEST(crowd.late == 0);
  BOOST_TEST(crowd.waits_ns == alone.waits_ns, boost::test_tools::per_element());
  BOOST_TEST(crowd.bad == 0);
  // The abusers got exactly their own limit, each grant when due; their
  // tries never took what their queued requests are due.
  BOOST_TEST(crowd.abusers_off == 0);
  BOOST_TEST(crowd.abuser_tries_granted == 0);
  BOOST_TEST(runs_dry(ctx));
}

/// Runs the callers against limiters set up as `cfg` says, then checks.
void stress(const config& cfg) {
  tally t;   // (before the pool: its handlers refer to these)
  stash st;  // (receipts in it outlive the limiters: they then give back to nothing)
  canceller cx;
  asio::thread_pool pool(pool_threads);
  const auto start = clk::now();
  auto w = std::make_unique<world>(pool, cfg);
  const auto end = clk::now() + stress_time();
  std::atomic<bool> callers_stop{false};
  std::atomic<int> callers_done{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < caller_threads; ++i)
    threads.emplace_back([&, i] {
      caller(i, *w, t, st, cx, end);
      ++callers_done;
    });
  std::thread cancel_thread([&] { cx.run(callers_stop, t); });
  // Nothing deadlocks: every caller returns and every operation completes,
  // well within a generous bound.
  const bool callers_returned =
      eventually([&] { return callers_done.load() == caller_threads; }, stress_time() + 60s);
  if (!callers_returned) {
    BOOST_ERROR("caller threads still blocked 60 s after the end: a deadlock?");
    std::abort();  // (joining would hang)
  }
  for (auto& th : threads)
    th.join();
  callers_stop = true;
  cancel_thread.join();
  const bool all_completed =
      eventually([&] { return t.completed.load() == t.started.load(); }, 60s);
  BOOST_TEST_REQUIRE(all_completed, "completed " << t.completed.load() << " of " << t.started.load()
                                                 << " async operations after 60 s");
  {
    std::mt19937 rng(7);
    for (;;) {
      {
        std::lock_guard lk(st.m);
        if (st.entries.empty()) break;
      }
      give_back_one(t, st, rng, true);
    }
  }
  // The levels, between two readings of the clock (the exact accounting).
  const auto levels_before = clk::now();
  std::array<std::uint64_t, limiter_count> level{};
  for (int id = 0; id < limiter_count; ++id)
    level[id] = id < bucket_count ? w->buckets[id]->available()
                                  : w->keyed.available(w->keys[id - bucket_count]);
  const auto stop = clk::now();
  const double elapsed = std::chrono::duration<double>(stop - start).count();

  BOOST_TEST(t.completed.load() == t.started.load());
  BOOST_TEST(t.doubled.load() == 0u);
  BOOST_TEST(t.bad.load() == 0u, "first: " << t.first_bad);
  // Requests flowed in every form.
  BOOST_TEST(t.joint_granted.load() > 0u);
  BOOST_TEST(t.joint_aborted.load() > 0u);
  BOOST_TEST(t.single_granted.load() > 0u);
  BOOST_TEST(t.tries_granted.load() > 0u);
  BOOST_TEST(t.blocking_granted.load() > 0u);
  for (int id = 0; id < limiter_count; ++id) {
    const limits l = w->of(id);
    const std::uint64_t granted = t.acc[id].granted.load();
    const std::uint64_t back = t.acc[id].given_back.load();
    BOOST_TEST(back <= granted, "limiter " << id);
    const std::uint64_t net = granted - back;
    if (!cfg.exact) {
      // Full at the start: never more than the capacity plus what accrued
      // in the whole window (+1: the accrual's sub-token remainder).
      const double bound = static_cast<double>(l.capacity) + static_cast<double>(l.per_s) * elapsed;
      BOOST_TEST(static_cast<double>(net) <= bound + 1, "limiter " << id);
      BOOST_TEST_MESSAGE("limiter " << id << ": " << granted << " granted, " << back
                                    << " given back, bound " << static_cast<std::uint64_t>(bound)
                                    << " (" << net * 100 / static_cast<std::uint64_t>(bound)
                                    << "% of it)");
    } else {
      // Empty at the start, never full: what was taken for good plus what
      // is left is exactly what accrued (no give-back is capped), known
      // within the readings that bracket its start and the levels.
      const auto tokens = [&](clk::duration d) {
        return static_cast<std::uint64_t>(std::chrono::nanoseconds(d).count()) * l.per_s /
               1'000'000'000u;
      };
      const std::uint64_t most = tokens(stop - w->born_before[id]);
      const std::uint64_t least = tokens(levels_before - w->born_after[id]);
      BOOST_TEST(net + level[id] <= most + 1,
                 "limiter " << id << ": none made from nothing: " << net << " taken + " << level[id]
                            << " left, accrued " << least << ".." << most);
      BOOST_TEST(net + level[id] + 1 >= least,
                 "limiter " << id << ": none lost: " << net << " taken + " << level[id]
                            << " left, accrued " << least << ".." << most);
      BOOST_TEST_MESSAGE("limiter " << id << ": " << granted << " granted, " << back
                                    << " given back, " << level[id] << " left, accrued " << least
                                    << ".." << most);
    }
  }
  BOOST_TEST_MESSAGE(
      elapsed << " s: " << t.started.load() << " async (" << t.joint_granted.load()
              << " joint granted, " << t.joint_aborted.load() << " joint cancelled, "
              << t.joint_over.load() << " over a capacity; " << t.single_granted.load()
              << " single granted, " << t.single_aborted.load() << " cancelled), "
              << t.tries_granted.load() << " of " << t.tries_granted.load() + t.tries_refused.load()
              << " joint tries granted, " << t.blocking_granted.load() << " blocking granted, "
              << t.blocking_timed_out.load() << " timed out, " << t.give_backs.load()
              << " give-backs, " << t.cancels.load() << " cancellations emitted");
  // Nobody is left queued, nothing is withheld: every limiter refills to
  // its capacity (in a few ms at the bounded rates) ...
  for (int id = 0; id < bucket_count; ++id)
    BOOST_TEST(w->buckets[id]->waiting() == 0u, "bucket " << id);
  if (!cfg.exact) {
    const auto full = [&] {
      for (int id = 0; id < limiter_count; ++id) {
        const std::uint64_t lv = id < bucket_count ? w->buckets[id]->available()
                                                   : w->keyed.available(w->keys[id - bucket_count]);
        if (lv != w->of(id).capacity) return false;
      }
      return true;
    };
    BOOST_TEST(eventually(full, 10s));
  }
  // ... and a joint request over all of them is granted (at once when full).
  {
    std::vector<ratelimit::part> all;
    for (int id = 0; id < limiter_count; ++id)
      all.push_back(w->part(id, cfg.exact ? 1 : w->of(id).capacity));
    auto f = ratelimit::async_acquire(std::span<const ratelimit::part>(all), asio::use_future);
    BOOST_TEST_REQUIRE((f.wait_for(20s) == std::future_status::ready));
    BOOST_TEST(f.get().size() == all.size());
  }
  w.reset();  // the limiters before the pool, as they must be
  pool.join();
  BOOST_TEST(t.dropped.load() == 0u);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(joint_stress)

BOOST_AUTO_TEST_CASE(threads_over_overlapping_buckets_and_keys) {
  stress(bounded_config);
}

BOOST_AUTO_TEST_CASE(threads_over_overlapping_buckets_and_keys_exact_accounting) {
  stress(exact_config);
}

BOOST_FIXTURE_TEST_CASE(abusers_do_not_delay_a_client_within_its_limit_buckets, clock_fixture) {
  starvation_case<bucket_clients>();
}

BOOST_FIXTURE_TEST_CASE(abusers_do_not_delay_a_client_within_its_limit_keys, clock_fixture) {
  starvation_case<keyed_clients>();
}

BOOST_AUTO_TEST_SUITE_END()
