//
// ratelimit/redis/detail/reserve_script.hpp: reservations in Redis.
//
// The bucket of script.hpp, where a request that cannot be served now is not
// turned away but *reserved*: its tokens are taken at once, the level going
// below zero (a debt of the requests reserved ahead), and the script returns
// the exact server time at which they are due. Requests are due in the order
// they reach Redis, from any number of processes: request i is due at the
// earliest time at which the bucket holds its tokens once every request
// reserved before it has taken its own (a FIFO token bucket). One call may
// carry many requests (coalesced): each gets its own reservation, in order.
//
// A request whose due time is further than `horizon` from now, or later than
// its deadline, is refused and takes nothing (later requests of the same call
// may still fit: a smaller one, or one with a later deadline).
//
// A reservation may be refunded before it is due (its request was cancelled):
// its tokens go back to the level, capped at the capacity. Reservations made
// after it keep their due times, so a refunded token may serve a request made
// later still before those come due. Refunding never grants more than the
// bound: the ledger is then what it would have been had the request never
// been made, and every other reservation is due no earlier than that ledger
// allows. A refund at or after the due time does nothing (the tokens are the
// request's).
//
// State: the hash of script.hpp (`l`, `t`, `c`), `l` possibly negative, down
// to -horizon·tok, and `c` marked "r:" so that a key is used in one mode only
// (the head-only script refuses a reservation bucket's configuration, and
// this one a head-only bucket's: "configured as ..., not ...").
//
// Exactness in Lua's doubles: besides script.hpp's bound, horizon·tok is
// bounded too: capacity·tick + horizon·tok + tok <= 2^53 (checked by
// make_reserve_rate).
//
// Thread safety: everything here is a pure function.
//
#ifndef RATELIMIT_REDIS_DETAIL_RESERVE_SCRIPT_HPP
#define RATELIMIT_REDIS_DETAIL_RESERVE_SCRIPT_HPP

#include <ratelimit/redis/detail/script.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ratelimit::redis_detail {

namespace lua {

inline constexpr std::string_view reserve_args = R"lua(
local cap = tonumber(ARGV[1])
local tok = tonumber(ARGV[2])
local tick = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
if not (cap and tok and tick and horizon) or cap < 1 or tok < 1 or tick < 1 or horizon < 0 or #ARGV < 7 then
  return redis.error_reply('ratelimit: bad script arguments')
end
local deadline = nil
if ARGV[5] ~= '' then
  deadline = tonumber(ARGV[5])
  if not deadline then return redis.error_reply('ratelimit: bad deadline argument') end
end
local cfg = 'r:' .. ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3]
)lua";

inline constexpr std::string_view reserve_full = R"lua(
local full = cap * tick
local floor = -horizon * tok
local lowest = floor - full
)lua";

/// A time before the last one the key saw is taken as that one: a server
/// clock set back mints nothing and dates nothing earlier than it did.
inline constexpr std::string_view not_before_last = R"lua(
if now < last then now = last end
)lua";

inline constexpr std::string_view reserve_each = R"lua(
local out = {now}
for i = 7, #ARGV do
  local n = tonumber(ARGV[i])
  if not n or n < 1 or n > cap or n ~= math.floor(n) then
    return redis.error_reply('ratelimit: bad script arguments')
  end
  local after = level - n * tick
  local due = now
  if after < 0 then
    local wait = math.floor(-after / tok)
    if wait * tok < -after then wait = wait + 1 end
    due = now + wait
    -- at its due time the bucket holds at most its capacity: what accrues
    -- past it within that microsecond is lost, as in a local bucket
    local over = after + wait * tok - (full - n * tick)
    if over > 0 then after = after - over end
  end
  if due - now > horizon then
    out[#out + 1] = 0
  elseif deadline and due > deadline then
    out[#out + 1] = 2
  else
    level = after
    out[#out + 1] = 1
  end
  out[#out + 1] = due
end
)lua";

inline constexpr std::string_view reserve_return = R"lua(
return out
)lua";

inline constexpr std::string_view refund_args = R"lua(
local cap = tonumber(ARGV[1])
local tok = tonumber(ARGV[2])
local tick = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local due = tonumber(ARGV[5])
if not (cap and tok and tick and n and due) or cap < 1 or tok < 1 or tick < 1 or n < 1 or n > cap then
  return redis.error_reply('ratelimit: bad script arguments')
end
local cfg = 'r:' .. ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3]
)lua";

inline constexpr std::string_view refund_full = R"lua(
local full = cap * tick
local lowest = -math.huge
)lua";

inline constexpr std::string_view refund_due = R"lua(
if now >= due then return 0 end
)lua";

inline constexpr std::string_view refund_give = R"lua(
level = level + n * tick
if level > full then level = full end
)lua";

inline constexpr std::string_view refund_return = R"lua(
return 1
)lua";

}  // namespace lua

/// KEYS[1]: the bucket. ARGV: capacity, tok, tick, horizon (us), deadline
/// (us of the server's clock; empty: none), now (us; empty: the server's TIME,
/// a test hook that also keeps the key from expiring), then n1, n2, ... (the
/// tokens of each request, in order, 1 to capacity each).
/// Returns {now, s1, d1, s2, d2, ...}: `now` the time the script used (the
/// later of the given or server time and the last time the key saw); per
/// request s = 1 reserved, due at d; s = 0 refused, due beyond the horizon;
/// s = 2 refused, due after the deadline (d: when it would have been due).
inline constexpr std::string_view reserve_script =
    lua_join<lua::reserve_args, lua::now, lua::reserve_full, lua::read_state, lua::not_before_last,
             lua::refill, lua::reserve_each, lua::write_state, lua::reserve_return>::value;

/// KEYS[1]: the bucket. ARGV: capacity, tok, tick, n, due (us), now (us;
/// empty: the server's TIME). Gives `n` tokens of a reservation due at `due`
/// back if it is not due yet, up to the capacity (a missing key is a full
/// bucket). Returns 1 when it was not due yet, 0 when it was (nothing done).
inline constexpr std::string_view refund_script =
    lua_join<lua::refund_args, lua::now, lua::refund_full, lua::read_state, lua::not_before_last,
             lua::refund_due, lua::refill, lua::refund_give, lua::write_state,
             lua::refund_return>::value;

/// A reservation bucket's configuration in the script's terms.
struct reserve_rate {
  script_rate rate;
  std::uint64_t horizon_us;
};

/// Checks that the reservation script's arithmetic stays exact for
/// `capacity` at `r` with reservations up to `horizon_us` ahead.
/// @throws std::invalid_argument saying what is wrong.
inline reserve_rate make_reserve_rate(std::uint64_t capacity, const rate& r,
                                      std::uint64_t horizon_us) {
  const script_rate sr = make_script_rate(capacity, r);
  using ratelimit::detail::uint128;
  const uint128 need = static_cast<uint128>(sr.capacity) * sr.tick +
                       static_cast<uint128>(horizon_us) * sr.tok + sr.tok;
  if (need > max_exact)
    throw std::invalid_argument(
        "ratelimit::redis_token_bucket: a reservation horizon of " + std::to_string(horizon_us) +
        " us at this rate and capacity cannot be computed exactly in Redis (Lua numbers are "
        "doubles): capacity * tick + horizon * tok + tok must not exceed 2^53; use a shorter "
        "horizon");
  return reserve_rate{sr, horizon_us};
}

/// EVALSHA (or, `sha` empty, EVAL) arguments reserving `ns` (each request's
/// tokens, in order) on `key`. `deadline_us`, `now_us`: none when negative.
inline std::vector<std::string> reserve_args(const std::string& sha, const std::string& key,
                                             const reserve_rate& rr,
                                             std::span<const std::uint64_t> ns,
                                             std::int64_t deadline_us = -1,
                                             std::int64_t now_us = -1) {
  std::vector<std::string> a{sha.empty() ? "EVAL" : "EVALSHA",
                             sha.empty() ? std::string(reserve_script) : sha,
                             "1",
                             key,
                             std::to_string(rr.rate.capacity),
                             std::to_string(rr.rate.tok),
                             std::to_string(rr.rate.tick),
                             std::to_string(rr.horizon_us),
                             deadline_us < 0 ? std::string() : std::to_string(deadline_us),
                             now_us < 0 ? std::string() : std::to_string(now_us)};
  a.reserve(a.size() + ns.size());
  for (std::uint64_t n : ns)
    a.push_back(std::to_string(n));
  return a;
}

/// EVALSHA (or EVAL) arguments refunding `n` tokens of a reservation due at `due_us`.
inline std::vector<std::string> refund_args(const std::string& sha, const std::string& key,
                                            const reserve_rate& rr, std::uint64_t n,
                                            std::uint64_t due_us, std::int64_t now_us = -1) {
  std::vector<std::string> a{sha.empty() ? "EVAL" : "EVALSHA",
                             sha.empty() ? std::string(refund_script) : sha,
                             "1",
                             key,
                             std::to_string(rr.rate.capacity),
                             std::to_string(rr.rate.tok),
                             std::to_string(rr.rate.tick),
                             std::to_string(n),
                             std::to_string(due_us)};
  if (now_us >= 0) a.push_back(std::to_string(now_us));
  return a;
}

/// One request's answer.
struct reservation_result {
  enum class status { refused_horizon = 0, reserved = 1, refused_deadline = 2 };
  status what = status::refused_horizon;
  std::uint64_t due_us = 0;  // server time (when it would have been due, if refused)
};

/// Checks the reply's shape for `count` requests: an array of 1 + 2·count
/// non-negative integers, each status 0, 1 or 2. Anything else is
/// `redis_bad_reply`; an error reply is `redis_error`.
inline boost::system::error_code parse_reserve_reply(const redis_reply& r, std::size_t count,
                                                     std::uint64_t& now_us,
                                                     std::vector<reservation_result>& out) {
  if (r.type == redis_reply::kind::error) return error::redis_error;
  if (r.type != redis_reply::kind::array || r.elements.size() != 1 + 2 * count)
    return error::redis_bad_reply;
  for (const auto& e : r.elements)
    if (e.type != redis_reply::kind::integer || e.integer < 0) return error::redis_bad_reply;
  now_us = static_cast<std::uint64_t>(r.elements[0].integer);
  out.clear();
  out.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    const long long s = r.elements[1 + 2 * i].integer;
    if (s > 2) return error::redis_bad_reply;
    out.push_back({static_cast<reservation_result::status>(s),
                   static_cast<std::uint64_t>(r.elements[2 + 2 * i].integer)});
  }
  return {};
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_RESERVE_SCRIPT_HPP
