#!/usr/bin/env python3
# test/fuzz/stream_seeds.py: writes the hand-made seeds of test/fuzz/stream_corpus/ (one history
# per limit mode of fuzz_stream.cpp, and a few random inputs) and the first input of
# stream_regressions/. Run from the repository root; the format is fuzz_stream.cpp's reader.
import random, struct, os
def u16(v): return struct.pack(">H", v)
def op_write(size, short=None):
    b = bytes([0]) + u16(size)
    if short is None: b += bytes([1])
    else: b += bytes([0]) + u16(short)
    return b
def op_read(size, maxr): return bytes([2]) + u16(size) + u16(maxr)
def op_adv(ms): return bytes([4]) + u16(ms)
def op_cancel(k): return bytes([6, k])
def op_incoming(n): return bytes([9]) + u16(n)
def header(mode, per_ms, small, slice_): return bytes([mode, per_ms]) + u16(small) + u16(slice_)
out = {}
# hand-made histories, one per limit mode
for mode in range(3):
    b = header(mode, 3, 900, 300)
    b += op_incoming(1200) + op_read(1000, 400) + op_adv(50) + op_write(2000) + op_adv(400)
    b += op_adv(400) + op_write(1500, 200) + op_cancel(1) + op_read(2500, 800) + op_cancel(4)
    b += op_adv(300) + bytes([10]) + op_write(100) + op_adv(100) + bytes([12]) + op_read(50, 10)
    b += op_adv(400) + bytes([13]) + op_write(700) + op_adv(400) + bytes([11]) + op_write(10)
    out[f"mode{mode}_history"] = b
# random ones
rng = random.Random(7)
for i in range(6):
    b = bytes([i % 3, rng.randrange(256)]) + bytes(rng.randrange(256) for _ in range(4))
    b += bytes(rng.randrange(256) for _ in range(rng.randrange(100, 400)))
    out[f"random_{i}"] = b
os.makedirs("test/fuzz/stream_corpus", exist_ok=True)
for k, v in out.items():
    open(f"test/fuzz/stream_corpus/{k}", "wb").write(v)
# a regression-style input: a read paying when its stream is destroyed
b = header(1, 1, 50, 20) + op_incoming(400) + op_read(400, 400) + op_adv(5) + bytes([13]) + op_read(100, 100) + op_adv(400)
open("test/fuzz/stream_regressions/destroy_while_a_read_pays", "wb").write(b)
