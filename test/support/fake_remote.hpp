//
// test/support/fake_remote.hpp: a remote limiter (ratelimit/remote_limiter.hpp)
// that answers late, for the tests of the joint acquire's remote parts.
//
// It keeps a token bucket of its own on the manual clock, where a
// reservation may take the level into debt (as a bucket kept in Redis that
// reserves ahead): `n` tokens reserved now are due when the level, refilled,
// covers them. Its answers wait in a list until the test releases them
// (answer_all), unless it answers by itself (auto_answer); it can fail the
// next reservation, and honour or ignore cancellation. It counts every call,
// so a test can check that nothing stays taken.
//
#ifndef RATELIMIT_TEST_FAKE_REMOTE_HPP
#define RATELIMIT_TEST_FAKE_REMOTE_HPP

#include "manual_clock.hpp"

#include <ratelimit/remote_limiter.hpp>

#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>

namespace ratelimit::test {

class fake_remote final : public ratelimit::basic_remote_limiter<manual_clock> {
 public:
  /// `capacity` tokens, one every `interval` of the manual clock; full
  /// (or empty, with `start_empty`).
  fake_remote(boost::asio::any_io_executor ex, std::uint64_t capacity,
              manual_clock::duration interval, bool start_empty = false)
      : ex_(std::move(ex)), capacity_(capacity), interval_(interval.count()) {
    const std::int64_t now = manual_clock::now().time_since_epoch().count();
    empty_at_ = start_empty ? now : now - static_cast<std::int64_t>(capacity) * interval_;
  }

  executor_type get_executor() const override { return ex_; }

  void async_reserve(std::uint64_t n, reserve_handler handler) override {
    std::unique_lock lk(mutex_);
    ++reserve_calls_;
    auto p = std::make_shared<pending>(pending{n, std::move(handler), false});
    if (honour_cancel_) {
      auto slot = boost::asio::get_associated_cancellation_slot(p->handler);
      if (slot.is_connected()) {
        p->slot_used = true;
        std::weak_ptr<pending> weak = p;
        slot.assign([this, weak](boost::asio::cancellation_type) {
          std::unique_lock lk(mutex_);
          auto q = weak.lock();
          if (!q) return;
          auto it = std::find(queue_.begin(), queue_.end(), q);
          if (it == queue_.end()) return;
          queue_.erase(it);
          ++cancelled_;
          lk.unlock();
          q->slot_used = false;  // (no clearing the slot from inside its own handler)
          deliver(q, boost::asio::error::operation_aborted, {});
        });
      }
    }
    queue_.push_back(p);
    const bool now = auto_answer_;
    lk.unlock();
    if (!now) return;
    try {
      answer_all();
    } catch (...) {  // as the contract asks: a call that throws keeps no handler
      std::lock_guard relock(mutex_);
      auto it = std::find(queue_.begin(), queue_.end(), p);
      if (it != queue_.end()) queue_.erase(it);
      throw;
    }
  }

  void take(const reservation& r, time_point) noexcept override {
    std::lock_guard lk(mutex_);
    if (outstanding_.erase(r.id) == 1)
      ++taken_;
    else
      ++misuse_;
  }

  void forget(const reservation& r) noexcept override {
    std::lock_guard lk(mutex_);
    if (outstanding_.erase(r.id) == 1) {
      ++forgotten_;
      give(r.n);
    } else {
      ++misuse_;
    }
  }

  void give_back(std::uint64_t n) noexcept override {
    std::lock_guard lk(mutex_);
    given_back_ += n;
    give(n);
  }

  /// Answers every reservation waiting (posted through each handler's executor).
  void answer_all() {
    std::unique_lock lk(mutex_);
    std::deque<std::shared_ptr<pending>> q;
    q.swap(queue_);
    std::deque<std::pair<boost::system::error_code, reservation>> answers;
    for (auto& p : q) {
      boost::system::error_code ec = fail_next_;
      fail_next_ = {};
      reservation r{};
      if (!ec && p->n > capacity_) ec = ratelimit::error::exceeds_capacity;
      if (!ec) r = reserve(p->n);
      answers.emplace_back(ec, r);
    }
    lk.unlock();
    for (std::size_t i = 0; i < q.size(); ++i) {
      try {
        deliver(q[i], answers[i].first, answers[i].second);
      } catch (...) {
        // Posting failed: that handler is gone, and so is its reservation;
        // the ones after it wait again, unreserved, for the next answer_all.
        std::lock_guard relock(mutex_);
        for (std::size_t j = i; j < q.size(); ++j)
          if (!answers[j].first && outstanding_.erase(answers[j].second.id) == 1)
            give(answers[j].second.n);
        for (std::size_t j = q.size(); j-- > i + 1;)
          queue_.push_front(std::move(q[j]));  // (may throw: then those are dropped too)
        throw;
      }
    }
  }

  /// Drops every reservation waiting, unanswered (a remote limiter shut
  /// down: its handlers are destroyed uncalled).
  void drop_pending() {
    std::deque<std::shared_ptr<pending>> q;
    {
      std::lock_guard lk(mutex_);
      q.swap(queue_);
    }
  }

  /// The next reservation fails with `ec`.
  void fail_next(boost::system::error_code ec) {
    std::lock_guard lk(mutex_);
    fail_next_ = ec;
  }
  void auto_answer(bool on) {
    std::lock_guard lk(mutex_);
    auto_answer_ = on;
  }
  /// Answers on this limiter's executor only (not dispatched on to the
  /// handler's own).
  void answer_on_own_executor(bool on) {
    std::lock_guard lk(mutex_);
    own_executor_ = on;
  }
  void honour_cancellation(bool on) {
    std::lock_guard lk(mutex_);
    honour_cancel_ = on;
  }

  std::size_t waiting() const {
    return locked([&] { return queue_.size(); });
  }
  std::size_t reserve_calls() const {
    return locked([&] { return reserve_calls_; });
  }
  std::size_t taken() const {
    return locked([&] { return taken_; });
  }
  std::size_t forgotten() const {
    return locked([&] { return forgotten_; });
  }
  std::size_t cancelled() const {
    return locked([&] { return cancelled_; });
  }
  std::size_t outstanding() const {
    return locked([&] { return outstanding_.size(); });
  }
  std::size_t misuse() const {
    return locked([&] { return misuse_; });
  }
  std::uint64_t given_back() const {
    return locked([&] { return given_back_; });
  }
  /// Whole tokens the bucket holds now (0 while in debt).
  std::uint64_t available() const {
    return locked([&] {
      const std::int64_t d = manual_clock::now().time_since_epoch().count() - empty_at_;
      if (d <= 0) return std::uint64_t{0};
      return std::min<std::uint64_t>(capacity_, static_cast<std::uint64_t>(d / interval_));
    });
  }

 private:
  struct pending {
    std::uint64_t n;
    reserve_handler handler;
    bool slot_used;  // our cancellation handler is in the handler's slot
  };

  template <typename F>
  auto locked(F f) const -> decltype(f()) {
    std::lock_guard lk(mutex_);
    return f();
  }

  reservation reserve(std::uint64_t n) {
    const std::int64_t now = manual_clock::now().time_since_epoch().count();
    empty_at_ = std::max(empty_at_, now - static_cast<std::int64_t>(capacity_) * interval_);
    empty_at_ += static_cast<std::int64_t>(n) * interval_;
    const std::int64_t due = std::max(now, empty_at_);
    reservation r{++next_id_, n, time_point(manual_clock::duration(due))};
    outstanding_.emplace(r.id, n);
    return r;
  }

  void give(std::uint64_t n) { empty_at_ -= static_cast<std::int64_t>(n) * interval_; }

  /// (Cancellation is emitted on the thread that answers, as Asio's slots need.)
  void deliver(const std::shared_ptr<pending>& p, boost::system::error_code ec, reservation r) {
    if (p->slot_used) boost::asio::get_associated_cancellation_slot(p->handler).clear();
    // Off this call, on our executor, then on the handler's own (unless
    // told not to: the type-erased handler's executor allocates there, out
    // of an allocation-failure test's reach).
    if (!locked([&] { return own_executor_; }))
      return boost::asio::post(ex_, [h = std::move(p->handler), ec, r]() mutable {
        boost::asio::dispatch(boost::asio::append(std::move(h), ec, r));
      });
    boost::asio::post(ex_, [h = std::move(p->handler), ec, r]() mutable { std::move(h)(ec, r); });
  }

  boost::asio::any_io_executor ex_;
  std::uint64_t capacity_;
  std::int64_t interval_;
  mutable std::mutex mutex_;
  std::int64_t empty_at_;
  std::deque<std::shared_ptr<pending>> queue_;
  std::map<std::uint64_t, std::uint64_t> outstanding_;
  boost::system::error_code fail_next_;
  bool auto_answer_ = false;
  bool honour_cancel_ = false;
  bool own_executor_ = false;
  std::uint64_t next_id_ = 0;
  std::size_t reserve_calls_ = 0, taken_ = 0, forgotten_ = 0, cancelled_ = 0, misuse_ = 0;
  std::uint64_t given_back_ = 0;
};

}  // namespace ratelimit::test

#endif  // RATELIMIT_TEST_FAKE_REMOTE_HPP
