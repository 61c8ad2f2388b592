//
// ratelimit/redis/detail/sha1.hpp: SHA-1 (FIPS 180-4), as EVALSHA names a script.
//
// Redis names a cached script by the SHA-1 of its text. This is the whole
// algorithm, so that the library uses no private Boost header for it; the
// tests check it against the standard's vectors and against the SHA that a
// real server returns for SCRIPT LOAD.
//
#ifndef RATELIMIT_REDIS_DETAIL_SHA1_HPP
#define RATELIMIT_REDIS_DETAIL_SHA1_HPP

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace ratelimit::redis_detail {

/// The SHA-1 of `text` in lower-case hex (40 characters).
inline std::string sha1_hex(std::string_view text) {
  std::uint32_t h[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
  const auto rotl = [](std::uint32_t x, int n) { return (x << n) | (x >> (32 - n)); };
  const auto block = [&](const unsigned char* p) {
    std::uint32_t w[80];
    for (int i = 0; i < 16; ++i)
      w[i] = std::uint32_t{p[4 * i]} << 24 | std::uint32_t{p[4 * i + 1]} << 16 |
             std::uint32_t{p[4 * i + 2]} << 8 | std::uint32_t{p[4 * i + 3]};
    for (int i = 16; i < 80; ++i)
      w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; ++i) {
      std::uint32_t f, k;
      if (i < 20) {
        f = (b & c) | (~b & d);
        k = 0x5A827999u;
      } else if (i < 40) {
        f = b ^ c ^ d;
        k = 0x6ED9EBA1u;
      } else if (i < 60) {
        f = (b & c) | (b & d) | (c & d);
        k = 0x8F1BBCDCu;
      } else {
        f = b ^ c ^ d;
        k = 0xCA62C1D6u;
      }
      const std::uint32_t t = rotl(a, 5) + f + e + k + w[i];
      e = d;
      d = c;
      c = rotl(b, 30);
      b = a;
      a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
  };

  const auto* data = reinterpret_cast<const unsigned char*>(text.data());
  std::size_t n = text.size();
  const std::uint64_t bits = static_cast<std::uint64_t>(n) * 8;
  for (; n >= 64; n -= 64, data += 64)
    block(data);
  // The last block(s): the rest, a 1 bit, zeros, the length in bits (big-endian).
  std::array<unsigned char, 128> tail{};
  for (std::size_t i = 0; i < n; ++i)
    tail[i] = data[i];
  tail[n] = 0x80;
  const std::size_t len = n + 1 + 8 <= 64 ? 64 : 128;
  for (int i = 0; i < 8; ++i)
    tail[len - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  block(tail.data());
  if (len == 128) block(tail.data() + 64);

  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(40);
  for (std::uint32_t word : h)
    for (int shift = 28; shift >= 0; shift -= 4)
      out += hex[(word >> shift) & 0xf];
  return out;
}

}  // namespace ratelimit::redis_detail

#endif  // RATELIMIT_REDIS_DETAIL_SHA1_HPP
