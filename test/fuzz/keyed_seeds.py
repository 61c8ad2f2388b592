#!/usr/bin/env python3
# test/fuzz/keyed_seeds.py: writes the hand-written seeds of fuzz_keyed, one
# per documented rule, into test/fuzz/keyed_corpus/ (or the directory given),
# in the input encoding of test/fuzz/fuzz_keyed.cpp. Rerun it when that
# encoding changes; the seeds are replayed by ctest (fuzz_keyed_corpus_replay).
#
#   test/fuzz/keyed_seeds.py [DIR]
import os, sys
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "keyed_corpus")

def cfg(cap, max_keys, keys, period_ms=1):
    return [8 * (cap - 1) + 3, 3, 4 + 8 * (period_ms - 1), max_keys, keys - 1]
def n_(n):  # a token count byte
    return {'cap': 0, 'cap+1': 1, 'max': 2, 0: 3}.get(n, 8 * n + 4 if isinstance(n, int) else None)
def adv_us(us, unsettled=False): return [0x80 if unsettled else 0x00, 4, us >> 8, us & 255]
def adv_ns1(): return [0x00, 2]
def back_us(us): return [0x02, 4, us >> 8, us & 255]
def back_ns1(): return [0x02, 2]
def jump(key, which, delta=0):  # which: 0 head due, 1 full again, 2 held back until
    return [0x03, key, 3 * (delta + 1) + which]
def get(key, n, unpolled=False): return [0x84 if unpolled else 0x04, key, n_(n)]
def try_(key, n, unpolled=False): return [0x87 if unpolled else 0x07, key, n_(n)]
def cancel(rid, kind=0, unpolled=False):  # kind: 0 terminal, 1 partial, 2 total, 3 none
    return [0x09 | kind << 5 | (0x80 if unpolled else 0), rid >> 8, rid & 255]
CANCEL_ALL, CLOSE, EVICT = [11], [12], [13]
def cap_(c): return [8 * (c - 1) + 3]  # a capacity byte (1..6)
def rate_(tokens, ms): return [8 * (tokens - 1) + 3, 4 + 8 * (ms - 1)]  # 1..4 tokens per 1..8 ms
def set_rate(tokens, ms): return [0x8d, 0, 0] + rate_(tokens, ms)  # the default rate
def set_cap(c): return [0x8d, 1, 0] + cap_(c)  # the default capacity
def key_rate(key, tokens, ms): return [0x8d, 2, key] + rate_(tokens, ms)
def key_cap(key, c): return [0x8d, 3, key] + cap_(c)
def quota(key, c, tokens, ms): return [0x8d, 4, key] + cap_(c) + rate_(tokens, ms)
def reset(key): return [0x8d, 5, key]
def try_wait(key, n, unpolled=False): return [0xc7 if unpolled else 0x47, key, n_(n)]  # with retry_after
def destroy(*c): return [14] + cfg(*c)

seeds = {
  'keys_independent_created_full': cfg(2, 4, 3) + try_(0, 1) + try_(0, 1) + try_(0, 1)
      + try_(1, 2) + get(2, 1) + try_(2, 'cap+1') + get(1, 'cap+1'),
  'fifo_per_key': cfg(1, 4, 2) + get(0, 1) + get(0, 1) + get(0, 1) + get(1, 1) + get(1, 1)
      + adv_us(1000) + adv_us(1000),
  'bound_refuses_then_evicts_at_full': cfg(2, 2, 4) + try_(0, 1) + try_(1, 1) + try_(2, 1)
      + get(3, 1) + jump(0, 1, -1) + try_(2, 1) + adv_ns1() + try_(2, 1),
  'evicts_only_full_buckets': cfg(3, 2, 3) + try_(0, 3) + try_(1, 1) + adv_us(1000)
      + try_(2, 1) + try_(0, 1) + try_(0, 1),
  'waiters_block_eviction': cfg(1, 1, 2) + get(0, 1) + get(0, 1) + get(0, 1) + jump(0, 0)
      + try_(1, 1) + jump(0, 1, -1) + try_(1, 1) + adv_ns1() + get(1, 1),
  'due_waiters_served_before_eviction': cfg(1, 1, 2) + get(0, 1) + get(0, 1) + get(0, 1)
      + adv_us(10000, True) + try_(1, 1) + get(0, 1) + get(0, 1) + adv_us(10000, True) + get(1, 1),
  'cancelled_waiter_held_back': cfg(1, 1, 2) + try_(0, 1) + get(0, 1) + cancel(0)
      + jump(0, 1) + try_(1, 1) + jump(0, 2, -1) + try_(1, 1) + jump(0, 2) + try_(1, 1),
  'cancel_kinds_and_late_cancels': cfg(1, 2, 2) + get(0, 1) + get(0, 1) + get(0, 1) + get(0, 1)
      + get(1, 1) + cancel(2, 1) + cancel(1, 2) + cancel(3, 3) + cancel(0) + cancel(4)
      + adv_us(1000) + cancel(3) + adv_us(1000),
  'cancel_all_holds_back': cfg(1, 2, 3) + try_(0, 1) + get(0, 1) + try_(1, 1) + CANCEL_ALL
      + adv_us(1000) + EVICT + try_(2, 1) + adv_us(1000) + EVICT + try_(2, 1),
  'request_clears_stale_index': cfg(2, 1, 2) + try_(0, 2) + get(0, 1) + cancel(0) + try_(0, 1)
      + jump(0, 1) + try_(1, 1),
  'close_then_evict': cfg(1, 1, 2) + try_(0, 1) + get(0, 1) + CLOSE + get(1, 1) + try_(1, 1)
      + get(0, 1) + adv_us(1000) + EVICT + get(1, 1) + CLOSE,
  'evict_all_evictable': cfg(2, 4, 4) + try_(0, 2) + try_(1, 1) + try_(2, 0) + EVICT
      + try_(2, 0) + adv_us(1000) + EVICT + adv_us(1000) + EVICT + EVICT,
  'destroy_and_new': cfg(1, 2, 2) + get(0, 1) + get(0, 1) + get(1, 1) + destroy(2, 1, 3)
      + try_(0, 2) + get(1, 1) + cancel(1) + get(0, 1) + adv_us(1000),
  'clock_back_full_ahead': cfg(1, 1, 2) + try_(0, 1) + adv_us(10000) + back_us(5000)
      + try_(1, 0) + adv_us(5000) + try_(1, 0) + back_ns1() + try_(0, 0),
  'unpolled_never_inline': cfg(1, 3, 3) + get(0, 1, True) + get(0, 1, True) + get(1, 'cap+1', True)
      + try_(2, 1, True) + get(2, 1, True) + cancel(1, 0, True) + cancel(4, 1, True)
      + get(0, 0, True) + adv_us(1000),
  'zero_over_and_max_at_the_bound': cfg(1, 1, 3) + try_(0, 1) + get(1, 0) + try_(1, 0)
      + get(1, 'cap+1') + get(1, 'max') + try_(2, 'max') + adv_us(1000) + get(1, 0) + get(2, 0),
  'huge_capacity_and_rate': [0, 0, 0, 2, 3] + get(0, 'cap') + get(0, 'max') + get(1, 1)
      + adv_us(1) + try_(2, 'cap') + EVICT + adv_us(65535) + EVICT,
  'invalid_configurations': [1, 3, 4, 0, 1] + try_(0, 1) + destroy(1, 0, 2) + try_(1, 1)
      + [14, 3, 2, 4, 1, 1] + try_(0, 1),
  'quota_own_capacity_and_rate': cfg(1, 2, 3) + quota(1, 4, 2, 1) + try_(1, 'cap')
      + try_(0, 'cap+1') + get(1, 1) + get(1, 'cap') + adv_us(500) + get(2, 'cap+1') + adv_us(2000),
  'quota_kept_across_eviction': cfg(1, 1, 3) + quota(0, 3, 3, 1) + try_(0, 'cap') + adv_us(1000)
      + try_(1, 1) + adv_us(1000) + try_(0, 'cap') + reset(0) + try_(0, 1) + reset(0),
  'default_changes_retime_waiters': cfg(2, 3, 3) + key_rate(1, 1, 8) + get(0, 'cap') + get(0, 1)
      + get(1, 'cap') + get(1, 1) + set_rate(4, 1) + adv_us(300) + set_cap(1) + adv_us(1000)
      + reset(1) + adv_us(1000) + get(2, 'cap'),
  'capacity_down_fails_waiters_up_blocks_eviction': cfg(3, 1, 2) + get(0, 3) + get(0, 2)
      + get(0, 1) + key_cap(0, 1) + adv_us(2000) + key_cap(0, 4) + try_(1, 1) + adv_us(5000)
      + try_(1, 1),
  'try_with_retry_after': cfg(2, 2, 3) + try_wait(0, 'cap') + get(0, 1) + get(0, 1) + try_wait(0, 1)
      + adv_us(500) + try_wait(0, 1) + adv_us(1000, True) + try_wait(0, 1) + adv_us(3000, True)
      + try_wait(0, 1) + try_wait(1, 'cap+1') + try_wait(1, 1) + try_wait(2, 1) + CLOSE + try_wait(0, 1),
  'invalid_quotas': cfg(2, 2, 2) + [0x8d, 4, 0, 1] + rate_(1, 1) + [0x8d, 0, 0, 2, 4]
      + [0x8d, 3, 1, 1] + [0x8d, 2, 1, 3, 2] + try_(0, 'cap') + key_cap(1, 2) + try_(1, 'cap'),
}
os.makedirs(out, exist_ok=True)
for name, b in seeds.items():
    assert all(0 <= x < 256 for x in b), name
    open(os.path.join(out, name), 'wb').write(bytes(b))
print(len(seeds), 'seeds')
