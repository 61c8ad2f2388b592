//
// ratelimit/redis/detail/script.hpp: the bucket as it lives in Redis.
//
// The state of one bucket is one hash of exactly three fields: `l` (level in
// units), `t` (time of the last refill, in microseconds of the Redis server's
// clock) and `c` (its configuration and the configuration's generation:
// lua::functions). One Lua script reads, refills, takes and writes it
// atomically on the server.
//
// Configurations and generations (lua::resolve): the configuration stored
// with a key is authoritative. A request carries its client's configuration
// and generation; a newer stored generation wins (the request runs with it,
// and its reply tells the client, which takes it on), an older one is
// replaced by the client's (the level migrated: whole tokens carry over, up
// to the new capacity, a debt stays, a full bucket stays full), and the same
// generation with another configuration is an error. configure_script
// writes a configuration with the next generation, marked kept: such a key
// is never deleted or expired (no process may have its configuration).
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
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

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

/// Helpers every script defines first: a stored configuration parsed, the
/// refill, and the migration of a level from one configuration to another.
///
/// A stored configuration (the `c` field) is `[r:]capacity:tok:tick`, then
/// `@generation` when the generation is above 0, then `s` when it was
/// written by a reconfiguration (configure_script): such a key is *kept*
/// (never deleted nor expired: it holds a configuration no process may
/// have). `r:` marks a reservation bucket (reserve_script.hpp).
inline constexpr std::string_view functions = R"lua(
local function parse_cfg(c)
  local base, g, mark = string.match(c, '^(.-)@(%d+)(s?)$')
  if not base then base, g, mark = c, '0', '' end
  local body, res = base, false
  if string.sub(base, 1, 2) == 'r:' then body, res = string.sub(base, 3), true end
  local a, b, d = string.match(body, '^(%d+):(%d+):(%d+)$')
  if not a then return nil end
  a, b, d, g = tonumber(a), tonumber(b), tonumber(d), tonumber(g)
  if a < 1 or b < 1 or d < 1 or a * d + b > 9007199254740992 or g >= 9007199254740992 then
    return nil
  end
  return base, g, mark == 's', res, a, b, d
end
local function refilled(level, last, now, full, tok)
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
  return level, last
end
local function migrated(level, ofull, otick, cap, tok, tick)
  local full = cap * tick
  if level >= ofull then return full end
  if level >= 0 then
    local t = math.floor(level / otick)
    if t >= cap then return full end
    return t * tick
  end
  -- a debt of q tokens: exact only within the reservation script's bounds
  -- (make_reserve_rate with a horizon of the debt's time): levels down to
  -- -(2^53 - full - tok), due times within 2^52 us of now
  local q = math.floor(-level / otick)
  if q * otick < -level then q = q + 1 end
  if q * tick > 9007199254740992 - full - tok then return nil end
  local back = math.floor(q * tick / tok)
  if back * tok < q * tick then back = back + 1 end
  local fill = math.floor(full / tok)
  if fill * tok < full then fill = fill + 1 end
  if back + fill > 4503599627370496 then return nil end
  return -q * tick
end
local function fmt(x) return string.format('%.0f', x) end
)lua";

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

/// Sets `gen`, the client's configuration generation: ARGV[7] (absent or
/// empty: 0).
inline constexpr std::string_view generation = R"lua(
local gen = 0
if ARGV[7] ~= nil and ARGV[7] ~= '' then
  gen = tonumber(ARGV[7])
  if not gen or gen < 0 or gen ~= math.floor(gen) or gen >= 9007199254740992 then
    return redis.error_reply('ratelimit: bad script arguments')
  end
end
)lua";

/// Reads the hash of KEYS[1] into `level`, `last` and `stored` (its
/// configuration), all nil when the key is missing. Refuses, before
/// anything is written, a key of another type (HLEN fails: WRONGTYPE) and a
/// hash that is not a bucket.
inline constexpr std::string_view read_state = R"lua(
local level, last, stored
local fields = redis.call('HLEN', KEYS[1])
if fields ~= 0 then
  local v = redis.call('HMGET', KEYS[1], 'l', 't', 'c')
  if fields ~= 3 or not v[1] or not v[2] or not v[3] then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' holds a hash that is not a bucket')
  end
  level = tonumber(v[1])
  last = tonumber(v[2])
  stored = v[3]
  if not level or not last or level ~= math.floor(level) then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' does not hold a bucket state')
  end
end
)lua";

/// Decides the configuration a request runs with, given the client's (`cap`,
/// `tok`, `tick`, `cfg`, `gen`, `mode_r`) and the stored one (`stored`):
///   - none stored: the client's (a missing key is a full bucket);
///   - a newer generation stored, or the same one: the stored configuration,
///     and `told` when it is not the client's (the reply tells the client);
///     at generation 0 another configuration is an error instead (clients
///     that never used generations must agree, as before generations); at a
///     later one the stored configuration wins (a generation may be written
///     twice with different configurations: a key deleted, then written by
///     a client of that generation and reconfigured from another);
///   - an older generation stored: the client's, the level migrated
///     (migrated(): whole tokens carry over, a debt stays, capped at the new
///     capacity; a full bucket stays full);
///   - the other mode: an error.
/// Then sets `full`, and `kept` (a reconfigured key's mark, kept while its
/// configuration rules).
inline constexpr std::string_view resolve = R"lua(
local kept, told = false, false
if stored then
  local sbase, sgen, skept, sres, scap, stok, stick = parse_cfg(stored)
  if not sbase or sres ~= mode_r or (sgen == 0 and gen == 0 and sbase ~= cfg) then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' holds a bucket configured as ' ..
                             stored .. ', not ' .. cfg)
  end
  if level < lowest or level > scap * stick then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' does not hold a bucket state')
  end
  if sgen >= gen then
    told = sgen > gen or sbase ~= cfg
    cap, tok, tick, cfg, gen, kept = scap, stok, stick, sbase, sgen, skept
  else
    level, last = refilled(level, last, now, scap * stick, stok)
    level = migrated(level, scap * stick, stick, cap, tok, tick)
    if not level then
      return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' holds a debt that configuration ' ..
                               cfg .. ' cannot carry exactly')
    end
  end
end
local full = cap * tick
if not stored then
  level = full
  last = now
end
)lua";

/// Refills `level` from `last` to `now`, up to `full` (elapsed time is
/// clamped to the time-to-full before it is multiplied); a time before the
/// last one mints nothing.
inline constexpr std::string_view refill = R"lua(
level, last = refilled(level, last, now, full, tok)
)lua";

/// Writes `level` and `last` back, with the configuration `cfg` of
/// generation `gen` (and `kept`'s mark): a full bucket is deleted (it is
/// what a missing key reads as), any other expires when it would be full
/// again; a kept key, or one written with a fixed time, is kept (persisted).
inline constexpr std::string_view write_state = R"lua(
local stamp = cfg
if gen > 0 then
  stamp = cfg .. '@' .. fmt(gen)
  if kept then stamp = stamp .. 's' end
end
if fixed or kept then
  redis.call('HSET', KEYS[1], 'l', fmt(level), 't', fmt(last), 'c', stamp)
  redis.call('PERSIST', KEYS[1])
elseif level >= full then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'l', fmt(level), 't', fmt(last), 'c', stamp)
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
local mode_r = false
local lowest = 0
)lua";

/// The head-only bucket's decision (a request larger than the stored
/// configuration's capacity is never granted: its client is told that
/// configuration and fails it).
inline constexpr std::string_view bucket_take = R"lua(
local need = n * tick
local granted, taken, wait = 0, 0, 0
if n > cap then
  wait = 4503599627370496
elseif level >= need then
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
if told then return {granted, taken, wait, gen, cfg} end
return {granted, taken, wait}
)lua";

/// configure_script's arguments: the client's configuration (capacity,
/// tok, tick), what to set ('b' both, 'c' the capacity, 'r' the rate: the
/// other part is kept from the stored configuration), the mode ('r'
/// reservation, 'h' head-only), the time hook, the client's generation.
inline constexpr std::string_view configure_args = R"lua(
local cap = tonumber(ARGV[1])
local tok = tonumber(ARGV[2])
local tick = tonumber(ARGV[3])
local what = ARGV[4]
local mode_r = ARGV[5] == 'r'
if #ARGV ~= 7 or not (cap and tok and tick) or cap < 1 or tok < 1 or tick < 1 or
   cap ~= math.floor(cap) or tok ~= math.floor(tok) or tick ~= math.floor(tick) or
   (what ~= 'b' and what ~= 'c' and what ~= 'r') or (ARGV[5] ~= 'r' and ARGV[5] ~= 'h') then
  return redis.error_reply('ratelimit: bad script arguments')
end
local prefix = ''
local lowest = 0
if mode_r then
  prefix = 'r:'
  lowest = -9007199254740992
end
)lua";

/// Writes a new configuration: refills the bucket under the stored one (if
/// any), migrates its level (migrated()) and stores the result with the next
/// generation (one above both the stored one and the client's), kept.
inline constexpr std::string_view configure_body = R"lua(
local newgen = gen + 1
if stored then
  local sbase, sgen, skept, sres, scap, stok, stick = parse_cfg(stored)
  if not sbase or sres ~= mode_r then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' holds a bucket configured as ' ..
                             stored .. ', not ' .. prefix .. ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3])
  end
  if level < lowest or level > scap * stick then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' does not hold a bucket state')
  end
  if mode_r and now < last then now = last end
  level, last = refilled(level, last, now, scap * stick, stok)
  if what == 'c' then
    tok, tick = stok, stick
  elseif what == 'r' then
    cap = scap
  end
  if sgen >= gen then newgen = sgen + 1 end
  if cap * tick + tok > 9007199254740992 then
    return redis.error_reply('ratelimit: capacity ' .. fmt(cap) .. ' at ' .. fmt(tok) .. ' per ' ..
                             fmt(tick) .. ' us cannot be computed exactly in Redis')
  end
  level = migrated(level, scap * stick, stick, cap, tok, tick)
  if not level then
    return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' holds a debt that the new ' ..
                             'configuration cannot carry exactly')
  end
else
  if cap * tick + tok > 9007199254740992 then
    return redis.error_reply('ratelimit: capacity ' .. fmt(cap) .. ' at ' .. fmt(tok) .. ' per ' ..
                             fmt(tick) .. ' us cannot be computed exactly in Redis')
  end
  level = cap * tick
  last = now
end
if newgen >= 9007199254740992 then
  return redis.error_reply('ratelimit: key ' .. KEYS[1] .. ' has no generation left')
end
local full = cap * tick
local cfg = prefix .. fmt(cap) .. ':' .. fmt(tok) .. ':' .. fmt(tick)
gen = newgen
local kept = true
)lua";

inline constexpr std::string_view configure_return = R"lua(
return {gen, cfg}
)lua";

}  // namespace lua

/// KEYS[1]: the bucket. ARGV: capacity, tok, tick, n (tokens wanted), extra
/// (up to this many more, taken only if there: leasing), now (microseconds;
/// empty: the server's TIME; a test hook, which also keeps the key from
/// expiring), the client's configuration generation (absent or empty: 0).
/// Returns {granted (0/1), tokens taken, wait in microseconds from now,
/// saturating at max_wait_us}, followed by the stored configuration's
/// generation and text when the key holds a newer one than the client's
/// (which the request ran with: see lua::resolve).
inline constexpr std::string_view bucket_script =
    lua_join<lua::functions, lua::bucket_args, lua::now, lua::generation, lua::read_state,
             lua::resolve, lua::refill, lua::bucket_take, lua::write_state,
             lua::bucket_return>::value;

/// KEYS[1]: the bucket. ARGV: capacity, tok, tick (the client's
/// configuration), what to set ('b' both, 'c' capacity, 'r' rate), the mode
/// ('r' reservation, 'h' head-only), now (the time hook), the client's
/// generation. Stores the new configuration with the next generation, kept
/// (lua::configure_body), and returns {generation, configuration}.
inline constexpr std::string_view configure_script =
    lua_join<lua::functions, lua::configure_args, lua::now, lua::generation, lua::read_state,
             lua::configure_body, lua::write_state, lua::configure_return>::value;

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

/// The longest configuration generation (Lua numbers are doubles).
inline constexpr std::uint64_t max_generation = max_exact - 1;

/// A configuration stored with a key, as a reply tells it.
struct stored_config {
  std::uint64_t generation = 0;
  bool reserve = false;  // a reservation bucket's ("r:")
  script_rate rate{};
};

/// Parses a configuration's text (`[r:]capacity:tok:tick`, without the
/// generation); false unless it is one the script can compute exactly.
inline bool parse_config(std::string_view text, stored_config& out) noexcept {
  out.reserve = text.starts_with("r:");
  if (out.reserve) text.remove_prefix(2);
  std::uint64_t v[3] = {};
  for (int i = 0; i < 3; ++i) {
    if (text.empty() || text.front() < '0' || text.front() > '9') return false;
    std::uint64_t x = 0;
    while (!text.empty() && text.front() >= '0' && text.front() <= '9') {
      x = x * 10 + static_cast<std::uint64_t>(text.front() - '0');
      if (x > max_exact) return false;
      text.remove_prefix(1);
    }
    v[i] = x;
    if (i < 2) {
      if (text.empty() || text.front() != ':') return false;
      text.remove_prefix(1);
    }
  }
  if (!text.empty() || v[0] == 0 || v[1] == 0 || v[2] == 0) return false;
  using ratelimit::detail::uint128;
  if (static_cast<uint128>(v[0]) * v[2] + v[1] > max_exact) return false;
  out.rate = script_rate{v[0], v[1], v[2]};
  return true;
}

/// The rate a script rate stands for: tok tokens every tick microseconds.
inline rate rate_of(const script_rate& sr) noexcept {
  return rate{sr.tok, std::chrono::nanoseconds(static_cast<std::int64_t>(sr.tick) * 1000)};
}

/// Reads a reply's configuration tail (generation, text) at `at`; false
/// when it is not one.
inline bool parse_config_tail(const redis_reply& r, std::size_t at, stored_config& out) noexcept {
  if (r.elements.size() != at + 2) return false;
  const auto& g = r.elements[at];
  const auto& c = r.elements[at + 1];
  if (g.type != redis_reply::kind::integer || g.integer < 0 ||
      static_cast<std::uint64_t>(g.integer) > max_generation || c.type != redis_reply::kind::string)
    return false;
  out.generation = static_cast<std::uint64_t>(g.integer);
  return parse_config(c.str, out);
}

/// EVALSHA arguments for one request (`now_us` < 0: the server's TIME).
/// With `sha` empty: EVAL with the script's text (after NOSCRIPT).
inline std::vector<std::string> script_args(const std::string& sha, const std::string& key,
                                            const script_rate& sr, std::uint64_t n,
                                            std::uint64_t extra, std::int64_t now_us = -1,
                                            std::uint64_t generation = 0) {
  std::vector<std::string> a{sha.empty() ? "EVAL" : "EVALSHA",
                             sha.empty() ? std::string(bucket_script) : sha,
                             "1",
                             key,
                             std::to_string(sr.capacity),
                             std::to_string(sr.tok),
                             std::to_string(sr.tick),
                             std::to_string(n),
                             std::to_string(extra)};
  a.push_back(now_us >= 0 ? std::to_string(now_us) : std::string());
  a.push_back(std::to_string(generation));
  return a;
}

/// configure_script's arguments: `own` is the client's configuration (what
/// a missing key gets, and the parts it sets), `what` 'b', 'c' or 'r'.
inline std::vector<std::string> configure_args(const std::string& sha, const std::string& key,
                                               const script_rate& own, char what, bool reserve,
                                               std::uint64_t generation, std::int64_t now_us = -1) {
  return {sha.empty() ? "EVAL" : "EVALSHA",
          sha.empty() ? std::string(configure_script) : sha,
          "1",
          key,
          std::to_string(own.capacity),
          std::to_string(own.tok),
          std::to_string(own.tick),
          std::string(1, what),
          reserve ? "r" : "h",
          now_us >= 0 ? std::to_string(now_us) : std::string(),
          std::to_string(generation)};
}

/// configure_script's reply: {generation, configuration}.
inline boost::system::error_code parse_configure_reply(const redis_reply& r, stored_config& out) {
  if (r.type == redis_reply::kind::error) return error::redis_error;
  if (r.type != redis_reply::kind::array || !parse_config_tail(r, 0, out) || out.generation == 0)
    return error::redis_bad_reply;
  return {};
}

/// What the script decided.
struct script_result {
  bool granted = false;
  std::uint64_t taken = 0;            // tokens taken (n plus any extra) when granted
  std::uint64_t wait_us = 0;          // when denied: microseconds until the tokens are there
  std::optional<stored_config> told;  // the key's newer configuration, which it ran with
};

/// Checks the reply's shape: an array of three non-negative integers, the
/// first 0 or 1, then possibly a configuration tail (parse_config_tail).
/// Anything else is `redis_bad_reply`; an error reply is `redis_error`.
inline boost::system::error_code parse_script_reply(const redis_reply& r, script_result& out) {
  if (r.type == redis_reply::kind::error) return error::redis_error;
  if (r.type != redis_reply::kind::array || (r.elements.size() != 3 && r.elements.size() != 5))
    return error::redis_bad_reply;
  for (std::size_t i = 0; i < 3; ++i)
    if (r.elements[i].type != redis_reply::kind::integer || r.elements[i].integer < 0)
      return error::redis_bad_reply;
  out.told.reset();
  if (r.elements.size() == 5) {
    stored_config c;
    if (!parse_config_tail(r, 3, c) || c.reserve) return error::redis_bad_reply;
    out.told = c;
  }
  if (r.elements[0].integer > 1) return error::redis_bad_reply;
  out.granted = r.elements[0].integer == 1;
  out.taken = static_cast<std::uint64_t>(r.elements[1].integer);
  out.wait_us = static_cast<std::uint64_t>(r.elements[2].integer);
  if (!out.granted && out.wait_us == 0) return error::redis_bad_reply;
  return {};
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_SCRIPT_HPP
