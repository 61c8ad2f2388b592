//
// ratelimit/redis/detail/script.hpp: the bucket as it lives in Redis.
//
// The state of one bucket is one hash of exactly three fields: `l` (level in
// units), `t` (time of the last refill, in microseconds of the Redis server's
// clock) and `c` (the configuration it was made with). One Lua script reads,
// refills, takes and writes it atomically on the server.
//
// The script never writes to, expires or deletes a key that is not such a
// bucket: a key of another type fails at its first read (WRONGTYPE), and a
// hash with any other set of fields (someone else's data, or ours mixed with
// theirs) is refused with an error before anything is written.
//
// The arithmetic is bucket_state's, over microseconds: one token is `tick`
// units and every microsecond adds `tok` units, `tok/tick` being the rate in
// tokens per microsecond in lowest terms. Lua 5.1 (inside Redis 7.0) has only
// doubles, exact for integers below 2^53, so every intermediate is kept
// there:
//   - now: TIME seconds * 10^6 + microseconds, about 1.8e15 today;
//   - level <= capacity * tick =: full;
//   - elapsed time is clamped to the time-to-full before it is multiplied:
//     elapsed * tok < full - level + tok <= full + tok;
//   - a wait is ceil(missing / tok) with missing <= full;
//   - floor(a / b) by double division is exact for integers 0 <= a < 2^53, b >= 1.
// So capacity * tick + tok <= 2^53 is required, and checked at construction.
//
// Thread safety: everything here is a pure function.
//
#ifndef RATELIMIT_REDIS_DETAIL_SCRIPT_HPP
#define RATELIMIT_REDIS_DETAIL_SCRIPT_HPP

#include <ratelimit/detail/bucket_state.hpp>
#include <ratelimit/error.hpp>
#include <ratelimit/rate.hpp>
#include <ratelimit/redis/connection.hpp>

#include <ratelimit/redis/detail/sha1.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <string_view>

namespace ratelimit::redis_detail {

/// Joins Lua fragments into one script at compile time (each mechanism of
/// the scripts is written once: the time, reading the state, the refill,
/// writing it back).
template <const std::string_view&... Parts>
struct lua_join {
  static constexpr auto storage = [] {
    std::array<char, (Parts.size() + ...)> a{};
    std::size_t at = 0;
    ((std::copy(Parts.begin(), Parts.end(), a.begin() + static_cast<std::ptrdiff_t>(at)),
      at += Parts.size()),
     ...);
    return a;
  }();
  static constexpr std::string_view value{storage.data(), storage.size()};
};

namespace lua {

/// Sets `now` (microseconds) and `fixed`: ARGV[6] when given (a test hook,
/// which also keeps the key from expiring), else the server's TIME.
inline constexpr std::string_view now = R"lua(
local now
local fixed = ARGV[6] ~= nil and ARGV[6] ~= ''
if fixed then
  now = tonumber(ARGV[6])
  if not now then return redis.error_reply('ratelimit: bad time argument') end
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
)lua";

/// Reads the bucket of KEYS[1] into `level` and `last` (a fresh one is full
/// as of now), given `cfg`, `full` and `lowest` (the lowest valid level).
/// Refuses, before anything is written, a key of another type (HLEN fails:
/// WRONGTYPE), a hash that is not a bucket, one of another configuration.
inline constexpr std::string_view read_state = R"lua(
local level, last
local fields = redis.call('HLEN', KEYS[1])
if fields == 0 then
  level = full
  last = now
else
  local v = redis.call('HMGET', KEYS[1], 'l', 't', 'c')
  if fields ~= 3 or not v[1] or not v[2] or not v[3] then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' holds a hash that is not a bucket')
  end
  if v[3] ~= cfg then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' holds a bucket configured as ' ..
                             v[3] .. ', not ' .. cfg)
  end
  level = tonumber(v[1])
  last = tonumber(v[2])
  if not level or not last or level < lowest or level > full or level ~= math.floor(level) then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' does not hold a bucket state')
  end
end
)lua";

/// Refills `level` from `last` to `now`, up to `full` (elapsed time is
/// clamped to the time-to-full before it is multiplied); a time before the
/// last one mints nothing.
inline constexpr std::string_view refill = R"lua(
if now > last then
  local elapsed = now - last
  last = now
  if level < full then
    local missing = full - level
    local to_full = math.floor(missing / tok)
    if to_full * tok < missing then to_full = to_full + 1 end
    if elapsed >= to_full then level = full else level = level + elapsed * tok end
  end
end
)lua";

/// Writes `level` and `last` back: a full bucket is deleted (it is what a
/// missing key reads as), any other expires when it would be full again;
/// with a fixed time it is kept (persisted).
inline constexpr std::string_view write_state = R"lua(
if fixed then
  redis.call('HSET', KEYS[1], 'l', string.format('%.0f', level), 't', string.format('%.0f', last), 'c', cfg)
  redis.call('PERSIST', KEYS[1])
elseif level >= full then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'l', string.format('%.0f', level), 't', string.format('%.0f', last), 'c', cfg)
  local to_full = math.floor((full - level) / tok)
  if to_full * tok < full - level then to_full = to_full + 1 end
  local ms = math.floor(to_full / 1000)
  if ms * 1000 < to_full then ms = ms + 1 end
  redis.call('PEXPIRE', KEYS[1], ms)
end
)lua";

/// The head-only bucket's arguments and configuration.
inline constexpr std::string_view bucket_args = R"lua(
local cap = tonumber(ARGV[1])
local tok = tonumber(ARGV[2])
local tick = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local extra = tonumber(ARGV[5])
if not (cap and tok and tick and n and extra) or cap < 1 or tok < 1 or tick < 1 or n < 0 or n > cap or extra < 0 then
  return redis.error_reply('ratelimit: bad script arguments')
end
local cfg = ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3]
)lua";

inline constexpr std::string_view bucket_full = R"lua(
local full = cap * tick
local lowest = 0
)lua";

/// The head-only bucket's decision.
inline constexpr std::string_view bucket_take = R"lua(
local need = n * tick
local granted, taken, wait = 0, 0, 0
if level >= need then
  level = level - need
  local more = math.floor(level / tick)
  if more > extra then more = extra end
  level = level - more * tick
  granted, taken = 1, n + more
else
  local missing = need - level
  wait = math.floor(missing / tok)
  if wait * tok < missing then wait = wait + 1 end
  wait = wait + (last - now)
  -- past 2^52 us (142 years) the sum may be inexact: saturate, as bucket_state does
  if wait > 4503599627370496 then wait = 4503599627370496 end
end
)lua";

inline constexpr std::string_view bucket_return = R"lua(
return {granted, taken, wait}
)lua";

}  // namespace lua

/// KEYS[1]: the bucket. ARGV: capacity, tok, tick, n (tokens wanted), extra
/// (up to this many more, taken only if there: leasing), now (microseconds;
/// empty: the server's TIME; a test hook, which also keeps the key from expiring).
/// Returns {granted (0/1), tokens taken, wait in microseconds from now,
/// saturating at max_wait_us}.
inline constexpr std::string_view bucket_script =
    lua_join<lua::bucket_args, lua::now, lua::bucket_full, lua::read_state, lua::refill,
             lua::bucket_take, lua::write_state, lua::bucket_return>::value;

/// The script's SHA1, as EVALSHA wants it (lower-case hex).
inline std::string script_sha1(std::string_view text = bucket_script) {
  return sha1_hex(text);
}

/// Largest integer a double (Lua 5.1 number) holds exactly, with all below it.
inline constexpr std::uint64_t max_exact = std::uint64_t{1} << 53;

/// The longest wait the script reports (2^52 us, 142 years): "not in any foreseeable time".
inline constexpr std::uint64_t max_wait_us = std::uint64_t{1} << 52;

/// A bucket's configuration in the script's terms.
struct script_rate {
  std::uint64_t capacity;
  std::uint64_t tok;   // units per microsecond
  std::uint64_t tick;  // units per token
};

/// Reduces `r` over microseconds and checks that the script's arithmetic stays exact.
/// @throws std::invalid_argument saying what is wrong.
inline script_rate make_script_rate(std::uint64_t capacity, const rate& r) {
  ratelimit::detail::check_capacity(capacity);
  ratelimit::detail::reduce(r);  // validates
  using ratelimit::detail::uint128;
  // tokens per microsecond = tokens * 1000 / period_ns
  const uint128 num = static_cast<uint128>(r.tokens) * 1000;
  const uint128 den = static_cast<uint128>(r.period.count());
  uint128 a = num, b = den;
  while (b != 0) {
    const uint128 t = a % b;
    a = b;
    b = t;
  }
  const uint128 tok = num / a, tick = den / a;
  const uint128 need = static_cast<uint128>(capacity) * tick + tok;
  if (need > max_exact)
    throw std::invalid_argument(
        "ratelimit::redis_token_bucket: capacity " + std::to_string(capacity) + " at " +
        std::to_string(r.tokens) + " tokens per " + std::to_string(r.period.count()) +
        " ns cannot be computed exactly in Redis (Lua numbers are doubles): capacity * " +
        std::to_string(static_cast<std::uint64_t>(tick > max_exact ? max_exact : tick)) +
        " (microseconds per token, reduced) + " +
        std::to_string(static_cast<std::uint64_t>(tok > max_exact ? max_exact : tok)) +
        " must not exceed 2^53; use a smaller capacity or a rate whose period divides evenly");
  return script_rate{capacity, static_cast<std::uint64_t>(tok), static_cast<std::uint64_t>(tick)};
}

/// EVALSHA arguments for one request (`now_us` < 0: the server's TIME).
/// With `sha` empty: EVAL with the script's text (after NOSCRIPT).
inline std::vector<std::string> script_args(const std::string& sha, const std::string& key,
                                            const script_rate& sr, std::uint64_t n,
                                            std::uint64_t extra, std::int64_t now_us = -1) {
  std::vector<std::string> a{sha.empty() ? "EVAL" : "EVALSHA",
                             sha.empty() ? std::string(bucket_script) : sha,
                             "1",
                             key,
                             std::to_string(sr.capacity),
                             std::to_string(sr.tok),
                             std::to_string(sr.tick),
                             std::to_string(n),
                             std::to_string(extra)};
  if (now_us >= 0) a.push_back(std::to_string(now_us));
  return a;
}

/// What the script decided.
struct script_result {
  bool granted = false;
  std::uint64_t taken = 0;    // tokens taken (n plus any extra) when granted
  std::uint64_t wait_us = 0;  // when denied: microseconds until the tokens are there
};

/// Checks the reply's shape: an array of three non-negative integers, the
/// first 0 or 1. Anything else is `redis_bad_reply`; an error reply is `redis_error`.
inline boost::system::error_code parse_script_reply(const redis_reply& r, script_result& out) {
  if (r.type == redis_reply::kind::error) return error::redis_error;
  if (r.type != redis_reply::kind::array || r.elements.size() != 3) return error::redis_bad_reply;
  for (const auto& e : r.elements)
    if (e.type != redis_reply::kind::integer || e.integer < 0) return error::redis_bad_reply;
  if (r.elements[0].integer > 1) return error::redis_bad_reply;
  out.granted = r.elements[0].integer == 1;
  out.taken = static_cast<std::uint64_t>(r.elements[1].integer);
  out.wait_us = static_cast<std::uint64_t>(r.elements[2].integer);
  if (!out.granted && out.wait_us == 0) return error::redis_bad_reply;
  return {};
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_SCRIPT_HPP
