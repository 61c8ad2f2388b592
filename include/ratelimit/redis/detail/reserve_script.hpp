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
// A request whose due time is further than `horizon` from now, or than the
// longest wait it accepts (`within`: a deadline form), is refused and takes
// nothing (later requests of the same call may still fit: a smaller one, or
// one that accepts a longer wait).
//
// A reservation that was never granted (its request was cancelled, or a joint
// request forgot it) is refunded: its tokens go back to the level, capped at
// the capacity, whenever the refund comes, as a receipt gives tokens back to
// a local bucket. Reservations made after it keep their due times, so a
// refunded token may serve a request made later still before those come due.
// Refunding never grants more than the bound: the tokens were not granted,
// so the ledger gains back at most what it lent, and every other reservation
// is due no earlier than the ledger without the refunded one allows. (The
// client refunds only what it knows was not granted: a reservation still
// waiting for its due time, or one whose waiter is gone.)
//
// State: the hash of script.hpp (`l`, `t`, `c`), `l` possibly negative, down
// to -horizon·tok for the longest horizon of the key's clients (they may
// differ: a horizon is a client's own limit on waiting, not part of the
// key's configuration), and `c` marked "r:" so that a key is used in one mode only
// (the head-only script refuses a reservation bucket's configuration, and
// this one a head-only bucket's: "configured as ..., not ...").
//
// Exactness in Lua's doubles: besides script.hpp's bound, horizon·tok is
// bounded too: capacity·tick + horizon·tok + tok <= 2^53, and due times
// (now + at most horizon + the time to fill the bucket) stay below 2^53
// (checked by make_reserve_rate).
//
// Refunds carry many reservations per call too (a cancel() of many waiters).
//
// Thread safety: everything here is a pure function.
//
#ifndef RATELIMIT_REDIS_DETAIL_RESERVE_SCRIPT_HPP
#define RATELIMIT_REDIS_DETAIL_RESERVE_SCRIPT_HPP

#include <ratelimit/redis/detail/script.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ratelimit::redis_detail {

namespace lua {

/// Both scripts' arguments: capacity, tok, tick, horizon, k (ARGV[5]), the
/// time hook (ARGV[6]), the generation (ARGV[7]), then the k requests from
/// ARGV[8] (each script checks how many arguments a request has).
inline constexpr std::string_view reservation_args = R"lua(
local cap = tonumber(ARGV[1])
local tok = tonumber(ARGV[2])
local tick = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
local count = tonumber(ARGV[5])
if not (cap and tok and tick and horizon and count) or cap < 1 or tok < 1 or tick < 1 or
   horizon < 0 or count < 1 then
  return redis.error_reply('ratelimit: bad script arguments')
end
local cfg = 'r:' .. ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3]
local mode_r = true
local argcap = cap
-- Clients of one key may use different horizons (each exact down to its own:
-- make_reserve_rate), so the debt may reach the longest of them: a stored
-- level is checked against exactness only.
local lowest = -9007199254740992
)lua";

/// A reservation request is two arguments (n, within).
inline constexpr std::string_view reserve_arity = R"lua(
if #ARGV ~= 7 + 2 * count then return redis.error_reply('ratelimit: bad script arguments') end
)lua";

/// A refund is one argument (n).
inline constexpr std::string_view refund_arity = R"lua(
if #ARGV ~= 7 + count then return redis.error_reply('ratelimit: bad script arguments') end
)lua";

/// A client told a configuration it did not have checked its horizon
/// against its own: the horizon is cut to what stays exact with the stored
/// one (as make_reserve_rate's bound; the client cuts its own when told).
inline constexpr std::string_view horizon_cut = R"lua(
if told then
  local fill = math.floor(full / tok)
  if fill * tok < full then fill = fill + 1 end
  local h = math.floor((9007199254740992 - full - tok) / tok)
  if h > 4503599627370496 - fill then h = 4503599627370496 - fill end
  if h < 0 then h = 0 end
  if horizon > h then horizon = h end
end
)lua";

/// A time before the last one the key saw is taken as that one: a server
/// clock set back mints nothing and dates nothing earlier than it did.
inline constexpr std::string_view not_before_last = R"lua(
if now < last then now = last end
)lua";

inline constexpr std::string_view reserve_each = R"lua(
local out = {now}
for i = 8, #ARGV, 2 do
  local n = tonumber(ARGV[i])
  local within = nil
  if ARGV[i + 1] ~= '' then within = tonumber(ARGV[i + 1]) end
  if not n or n < 1 or n > argcap or n ~= math.floor(n) or
     (ARGV[i + 1] ~= '' and (not within or within < 0)) then
    return redis.error_reply('ratelimit: bad script arguments')
  end
  if n > cap then
    -- more than the stored configuration's capacity: its client, told it, fails the request
    out[#out + 1] = 0
    out[#out + 1] = now
  else
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
  if within and due - now > within then
    out[#out + 1] = 2
  elseif due - now > horizon then
    out[#out + 1] = 0
  else
    level = after
    out[#out + 1] = 1
  end
  out[#out + 1] = due
  end
end
)lua";

inline constexpr std::string_view reserve_return = R"lua(
if told then
  out[#out + 1] = gen
  out[#out + 1] = cfg
end
return out
)lua";

/// The tokens given back (ARGV[8] on; reserved under any configuration of
/// the key, so not bounded by this one's capacity).
inline constexpr std::string_view refund_sum = R"lua(
local give = 0
for i = 8, #ARGV do
  local n = tonumber(ARGV[i])
  if not n or n < 1 or n >= 9007199254740992 or n ~= math.floor(n) then
    return redis.error_reply('ratelimit: bad script arguments')
  end
  give = give + n
  if give > 4503599627370496 then give = 4503599627370496 end  -- (more than any bucket holds)
end
)lua";

inline constexpr std::string_view refund_give = R"lua(
local room = math.floor((full - level) / tick)
if room * tick < full - level then room = room + 1 end
if give >= room then level = full else level = level + give * tick end
)lua";

inline constexpr std::string_view refund_return = R"lua(
return give
)lua";

}  // namespace lua

/// KEYS[1]: the bucket. ARGV: capacity, tok, tick, horizon (us), k (the
/// number of requests), now (us; empty: the server's TIME, a test hook that
/// also keeps the key from expiring), then k pairs (n, within): a request's
/// tokens (1 to capacity) and the longest it may wait (us; empty: up to the
/// horizon).
/// Returns {now, s1, d1, s2, d2, ...}: `now` the time the script used (the
/// later of the given or server time and the last time the key saw); per
/// request s = 1 reserved, due at d; s = 2 refused, due later than its
/// `within`; s = 0 refused, due beyond the horizon (d: when it would have
/// been due). A refused request takes nothing.
inline constexpr std::string_view reserve_script =
    lua_join<lua::functions, lua::reservation_args, lua::reserve_arity, lua::now, lua::generation,
             lua::read_state, lua::resolve, lua::not_before_last, lua::horizon_cut, lua::refill,
             lua::reserve_each, lua::write_state, lua::reserve_return>::value;

/// KEYS[1]: the bucket. ARGV: capacity, tok, tick, horizon (us), k, now (us;
/// empty: the server's TIME), then k token counts: reservations never
/// granted (cancelled, forgotten by a joint request) or tokens a receipt
/// gives back. Gives them back to the level now, up to the capacity (a
/// missing key is a full bucket). Returns the tokens given back.
inline constexpr std::string_view refund_script =
    lua_join<lua::functions, lua::reservation_args, lua::refund_arity, lua::now, lua::generation,
             lua::read_state, lua::resolve, lua::not_before_last, lua::refund_sum, lua::refill,
             lua::refund_give, lua::write_state, lua::refund_return>::value;

/// A reservation bucket's configuration in the script's terms.
struct reserve_rate {
  script_rate rate;
  std::uint64_t horizon_us;
};

/// Time in us until a bucket of `sr` is full from empty.
inline std::uint64_t full_us(const script_rate& sr) {
  return static_cast<std::uint64_t>(
      (static_cast<ratelimit::detail::uint128>(sr.capacity) * sr.tick + sr.tok - 1) / sr.tok);
}

/// Due times are server times (about 1.8e15 us today, below 2^52 until
/// 2112) plus at most horizon + full_us: kept below 2^53 by
/// horizon + full_us <= 2^52.
inline constexpr std::uint64_t max_ahead_us = std::uint64_t{1} << 52;

/// Checks that the reservation script's arithmetic stays exact for
/// `capacity` at `r` with reservations up to `horizon_us` ahead: levels
/// (capacity·tick + horizon·tok + tok <= 2^53) and due times (see max_ahead_us).
/// @throws std::invalid_argument saying what is wrong.
inline reserve_rate make_reserve_rate(std::uint64_t capacity, const rate& r,
                                      std::uint64_t horizon_us) {
  const script_rate sr = make_script_rate(capacity, r);
  using ratelimit::detail::uint128;
  const uint128 need = static_cast<uint128>(sr.capacity) * sr.tick +
                       static_cast<uint128>(horizon_us) * sr.tok + sr.tok;
  if (need > max_exact || static_cast<uint128>(horizon_us) + full_us(sr) > max_ahead_us)
    throw std::invalid_argument(
        "ratelimit::redis_token_bucket: a reservation horizon of " + std::to_string(horizon_us) +
        " us at this rate and capacity cannot be computed exactly in Redis (Lua numbers are "
        "doubles): capacity * tick + horizon * tok + tok must not exceed 2^53, nor horizon plus "
        "the time to fill the bucket 2^52 us; use a shorter horizon");
  return reserve_rate{sr, horizon_us};
}

/// The longest horizon (us) make_reserve_rate accepts for `capacity` at `r`
/// (0 if none is).
inline std::uint64_t max_exact_horizon_us(std::uint64_t capacity, const rate& r) {
  const script_rate sr = make_script_rate(capacity, r);
  const std::uint64_t used = sr.capacity * sr.tick + sr.tok;  // <= max_exact (checked)
  const std::uint64_t by_level = (max_exact - used) / sr.tok;
  const std::uint64_t fill = full_us(sr);
  return std::min(by_level, fill >= max_ahead_us ? 0 : max_ahead_us - fill);
}

/// A horizon option in ms (milliseconds::max(): as far as stays exact), checked.
inline reserve_rate make_reserve_rate_ms(std::uint64_t capacity, const rate& r,
                                         std::int64_t horizon_ms) {
  if (horizon_ms == std::numeric_limits<std::int64_t>::max())
    return make_reserve_rate(capacity, r, max_exact_horizon_us(capacity, r));
  const auto ms = static_cast<std::uint64_t>(horizon_ms);
  return make_reserve_rate(capacity, r, ms > max_ahead_us / 1000 ? max_ahead_us + 1 : ms * 1000);
}

/// One request of a reservation call: `n` tokens, waiting at most `within_us`
/// (negative: up to the horizon).
struct reserve_request {
  std::uint64_t n;
  std::int64_t within_us = -1;
};

namespace reserve_detail {

inline std::vector<std::string> head(std::string_view script, const std::string& sha,
                                     const std::string& key, const reserve_rate& rr,
                                     std::size_t count, std::int64_t now_us,
                                     std::uint64_t generation) {
  std::vector<std::string> a;
  a.reserve(11 + 2 * count);
  a.push_back(sha.empty() ? "EVAL" : "EVALSHA");
  a.push_back(sha.empty() ? std::string(script) : sha);
  a.push_back("1");
  a.push_back(key);
  a.push_back(std::to_string(rr.rate.capacity));
  a.push_back(std::to_string(rr.rate.tok));
  a.push_back(std::to_string(rr.rate.tick));
  a.push_back(std::to_string(rr.horizon_us));
  a.push_back(std::to_string(count));
  a.push_back(now_us < 0 ? std::string() : std::to_string(now_us));
  a.push_back(std::to_string(generation));
  return a;
}

}  // namespace reserve_detail

/// EVALSHA (or, `sha` empty, EVAL) arguments reserving `reqs`, in order, on
/// `key` (at least one). `now_us`: none when negative (the server's clock).
inline std::vector<std::string> reserve_args(const std::string& sha, const std::string& key,
                                             const reserve_rate& rr,
                                             std::span<const reserve_request> reqs,
                                             std::int64_t now_us = -1,
                                             std::uint64_t generation = 0) {
  auto a = reserve_detail::head(reserve_script, sha, key, rr, reqs.size(), now_us, generation);
  for (const reserve_request& r : reqs) {
    a.push_back(std::to_string(r.n));
    a.push_back(r.within_us < 0 ? std::string() : std::to_string(r.within_us));
  }
  return a;
}

/// EVALSHA (or EVAL) arguments giving back `ns` (token counts, at least one).
inline std::vector<std::string> refund_args(const std::string& sha, const std::string& key,
                                            const reserve_rate& rr,
                                            std::span<const std::uint64_t> ns,
                                            std::int64_t now_us = -1,
                                            std::uint64_t generation = 0) {
  auto a = reserve_detail::head(refund_script, sha, key, rr, ns.size(), now_us, generation);
  for (std::uint64_t n : ns)
    a.push_back(std::to_string(n));
  return a;
}

/// One request's answer.
struct reservation_result {
  enum class status { refused_horizon = 0, reserved = 1, refused_within = 2 };
  status what = status::refused_horizon;
  std::uint64_t due_us = 0;  // server time (when it would have been due, if refused)
};

/// Checks the reply's shape for `count` requests: an array of 1 + 2·count
/// non-negative integers, each status 0, 1 or 2, possibly followed by a
/// configuration tail (the key's newer configuration, which the call ran
/// with: into `told`), and sets `now_us`. Anything else is
/// `redis_bad_reply`; an error reply is `redis_error`. Allocates nothing (a
/// reply handler's step that cannot fail).
inline boost::system::error_code check_reserve_reply(
    const redis_reply& r, std::size_t count, std::uint64_t& now_us,
    std::optional<stored_config>* told = nullptr) noexcept {
  if (r.type == redis_reply::kind::error) return error::redis_error;
  const std::size_t size = 1 + 2 * count;
  if (r.type != redis_reply::kind::array ||
      (r.elements.size() != size && r.elements.size() != size + 2))
    return error::redis_bad_reply;
  for (std::size_t i = 0; i < size; ++i)
    if (r.elements[i].type != redis_reply::kind::integer || r.elements[i].integer < 0)
      return error::redis_bad_reply;
  for (std::size_t i = 0; i < count; ++i)
    if (r.elements[1 + 2 * i].integer > 2) return error::redis_bad_reply;
  if (told) told->reset();
  if (r.elements.size() != size) {
    stored_config c;
    if (!parse_config_tail(r, size, c) || !c.reserve) return error::redis_bad_reply;
    if (told) *told = c;
  }
  now_us = static_cast<std::uint64_t>(r.elements[0].integer);
  return {};
}

/// Request `i`'s answer in a reply check_reserve_reply accepted.
inline reservation_result reservation_at(const redis_reply& r, std::size_t i) noexcept {
  return {static_cast<reservation_result::status>(r.elements[1 + 2 * i].integer),
          static_cast<std::uint64_t>(r.elements[2 + 2 * i].integer)};
}

/// check_reserve_reply, and every answer into `out`.
inline boost::system::error_code parse_reserve_reply(const redis_reply& r, std::size_t count,
                                                     std::uint64_t& now_us,
                                                     std::vector<reservation_result>& out) {
  if (auto ec = check_reserve_reply(r, count, now_us)) return ec;
  out.clear();
  for (std::size_t i = 0; i < count; ++i)
    out.push_back(reservation_at(r, i));
  return {};
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_RESERVE_SCRIPT_HPP
