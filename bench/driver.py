#!/usr/bin/env python3
"""bench/driver.py: runs every (implementation, workload) pair of the benchmarks and reports.

Called by scripts/bench (which installs and builds first). Prints the raw result lines as they
come (`impl=... workload=... rep=i metric=value ...`, the format of ../shared/BENCHMARKS.md), then
a table of medians with our ratio to each peer and to the floor, then the targets of issue 4 and
of W7 (the joint acquire) and W8 (streams) with PASS/MISS. Results are checked by the programs themselves: a
program that exits non-zero (a try that failed, an acquire that waited where none should, a
limiter that over-granted) fails the run.
Speed is reported, never asserted: a MISS does not change the exit status.

usage: driver.py --bin DIR [--quick] [--results FILE] [--trace-dir DIR] [--plots DIR]
                 [--only REGEX]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

WORKLOADS = ["W0", "W1", "W2", "W3", "W4", "W5", "W6", "W6b", "W7", "W7b", "W8", "W8b", "redis"]
PEERS = {"go_xtime_rate": "peer_go", "java_guava": "peer_guava"}
# Workloads the peers do not run (ours only: the joint acquire has no peer; W8, W8b: streams,
# set against a raw socket and Beast's rate policy in bench_ratelimit itself).
NO_PEERS = {"W7", "W7b", "W8", "W8b", "redis"}
OURS = ["asio_ratelimit", "asio_ratelimit_try", "asio_ratelimit_callback",
        "asio_ratelimit_awaitable", "asio_ratelimit_blocking",
        "asio_ratelimit_joint_callback", "asio_ratelimit_joint_awaitable",
        "asio_ratelimit_joint_try", "asio_ratelimit_stream_unlimited", "asio_ratelimit_stream"]
# The floor each of our rows is set against, per workload.
FLOOR = {
    ("W1", "asio_ratelimit_try"): "floor_atomic",
    ("W2", "asio_ratelimit_try"): "floor_atomic",
    ("W3", "asio_ratelimit_callback"): "floor_post",
    ("W3", "asio_ratelimit_awaitable"): "floor_co_post",
    ("W4", "asio_ratelimit_callback"): "floor_timer",
    ("W4", "asio_ratelimit_awaitable"): "floor_timer",
    ("W4", "asio_ratelimit_blocking"): "floor_timer",
    ("W5", "asio_ratelimit_callback"): "floor_timer",
    ("W5", "asio_ratelimit_awaitable"): "floor_co_timer",
    ("W5", "asio_ratelimit_blocking"): "textbook_thread",
    # W7, W7b: the joint acquire against the same two tokens taken one after the other.
    # (W7: two acquires with receipts, as the joint acquire's; get_token rows beside them)
    ("W7", "asio_ratelimit_joint_callback"): "asio_ratelimit_two_acquires_callback",
    ("W7", "asio_ratelimit_joint_awaitable"): "asio_ratelimit_two_acquires_awaitable",
    ("W7", "asio_ratelimit_joint_try"): "asio_ratelimit_two_sequential_try",
    ("W7b", "asio_ratelimit_joint_callback"): "asio_ratelimit_two_sequential_callback",
    ("W7b", "asio_ratelimit_joint_awaitable"): "asio_ratelimit_two_sequential_awaitable",
    # W8: the stream whose limits never bind against the raw socket (bytes_per_s: higher is
    # better); W8b: against Beast's simple_rate_policy at the same rate (window_rel).
    ("W8", "asio_ratelimit_stream_unlimited"): "raw_socket",
    ("W8b", "asio_ratelimit_stream"): "beast_simple_rate_policy",
}
# The metric a row is compared on (lower is better for all of them but W8's bytes_per_s).
PRIMARY = {"W4": "late_p99_us", "W5": "wall_s", "W6": "cpu_ms", "W6b": "cpu_ms", "W7b": "wall_s",
           "W8b": "window_rel"}
DESCRIPTION = {
    "W0": "clock read, ns/op",
    "W1": "try, 1 thread, huge rate, ns/op",
    "W2": "try, 2 threads on one limiter, ns/op",
    "W3": "acquire with a token available, ns/op",
    "W4": "1000/s burst 1, 2000 sequential acquires",
    "W5": "N/s burst 1, N waiters parked first",
    "W6": "idle limiter at 1/s, 3 s window",
    "W6b": "idle limiter at 1000/s, 3 s window",
    "W7": "joint acquire of two buckets with tokens there, vs two sequential acquires, ns/op",
    "W7b": "N/s burst 1 on two buckets, N joint waiters parked first",
    "W8": "bulk transfer over loopback TCP, limits that never bind, bytes/s (higher is better)",
    "W8b": "a writer limited to 20 MiB/s over loopback TCP: achieved / configured, "
           "largest 100 ms window / (0.1 rate)",
    "redis": "Redis bucket, grants/s through one connection (higher is better)",
}


def parse_line(line):
    m = {}
    for kv in line.split():
        k, _, v = kv.partition("=")
        m[k] = v
    return m


class Results:
    def __init__(self):
        self.reps = {}  # (workload, impl) -> [ {metric: float} ]
        self.order = {}  # (workload, impl) -> [metric names in order]
        self.no_two_cores = []  # W2 impls whose core probe said the 2 threads shared a core

    def add(self, line):
        m = parse_line(line)
        key = (m.pop("workload"), m.pop("impl"))
        m.pop("rep", None)
        vals = {k: float(v) for k, v in m.items()}
        self.reps.setdefault(key, []).append(vals)
        self.order.setdefault(key, list(m.keys()))

    def median(self, wl, impl, metric):
        rs = self.reps.get((wl, impl))
        if not rs or metric not in rs[0]:
            return None
        return statistics.median(r[metric] for r in rs)

    def impls(self, wl):
        return [i for (w, i) in self.reps if w == wl]


def fmt_num(v):
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}".replace(",", " ")
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


# ------------------------------------------------------------------------------- running

W8_REPS = 15  # alternating repetitions of each W8 row (see jobs())
# The rows measured with the limiters' counting on and compiled out (bench_ratelimit_nometrics:
# the impl with METRICS_OFF appended), in alternating repetitions as W8's.
METRICS_ROWS = {("W1", "asio_ratelimit_try"), ("W2", "asio_ratelimit_try"),
                ("W3", "asio_ratelimit_callback"), ("W3", "asio_ratelimit_awaitable")}
METRICS_REPS = 15
METRICS_OFF = "_metrics_off"


def jobs(bindir, quick, redis_port=0):
    """Every (impl, workload, argv) to run, in order."""
    out = []
    bench = os.path.join(bindir, "bench_ratelimit")
    listing = subprocess.run([bench, "--list"], check=True, capture_output=True, text=True).stdout
    cpp = {}
    for line in listing.splitlines():
        impl, *wls = line.split()
        cpp[impl] = wls
    extra = ["--quick"] if quick else []
    for wl in WORKLOADS:
        for impl, wls in cpp.items():
            if wl in wls:
                argv = [bench, "--impl", impl, "--workload", wl] + extra
                # The textbook design needs ~6 s per W5 repetition at 100k/s: one is enough.
                if wl == "W5" and impl == "textbook_thread" and not quick:
                    argv += ["--reps", "1"]
                out.append((impl, wl, argv))
        for impl, prog in PEERS.items():
            if wl not in NO_PEERS:
                out.append((impl, wl, [os.path.join(bindir, "peers", prog), "--workload", wl] + extra))
    # W8 sets two rows against each other whose figures drift with the machine over seconds
    # (the loopback's delivery, what else runs): their repetitions alternate, one per process
    # (each with its own warm-up), so that a drift falls on both rows, not on whichever ran first.
    w8 = [j for j in out if j[1] == "W8"]
    if w8 and not quick:
        at = out.index(w8[0])
        out = [j for j in out if j[1] != "W8"]
        out[at:at] = [(impl, wl, argv + ["--reps", "1"]) for _ in range(W8_REPS)
                      for (impl, wl, argv) in w8]
    # Metrics on and off: what counting costs is a nanosecond or two, below the drift between
    # runs minutes apart; so each row's repetitions alternate with the same row built without
    # counting, one per process.
    off_bench = os.path.join(bindir, "bench_ratelimit_nometrics")
    if os.path.exists(off_bench):
        reps = 1 if quick else METRICS_REPS
        for key in sorted(METRICS_ROWS):
            # W2's two threads fall into contention regimes (25, 50, 130 ns on a 2-core VM) that
            # last for a whole process: each of its processes keeps all its repetitions, and the
            # median is of them all, pooled.
            rep_argv = [] if quick or key[0] == "W2" else ["--reps", "1"]
            rows = [j for j in out if (j[1], j[0]) == key]
            if not rows:
                continue
            impl, wl, argv = rows[0]
            at = out.index(rows[0])
            out.remove(rows[0])
            pairs = []
            for _ in range(reps):
                pairs.append((impl, wl, argv + rep_argv))
                pairs.append((impl + METRICS_OFF, wl, [off_bench] + argv[1:] + rep_argv))
            out[at:at] = pairs
    # The Redis bucket (its own program: it runs redis-benchmark, interleaved with ours, in
    # every repetition, against the redis-server at --redis-port, which scripts/bench shares
    # with the Node peer; without one, it starts its own on a free port).
    redis = os.path.join(bindir, "bench", "redis", "bench_redis")
    if os.path.exists(redis):
        out.append(("asio_ratelimit", "redis",
                    [redis] + (["--reps", "1", "--seconds", "0.3"] if quick else ["--reps", "3"])
                    + (["--port", str(redis_port)] if redis_port else [])))
    return out


def run_job(impl, wl, argv, timeout):
    t = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return impl, wl, argv, p, time.monotonic() - t


def report_job(res, results, raw, failures):
    impl, wl, argv, p, secs = res
    for line in p.stderr.splitlines():
        print(f"  [{impl} {wl}] {line}", file=sys.stderr)
    if wl == "W2" and "do not get two cores" in p.stderr:
        results.no_two_cores.append(impl)
    for line in p.stdout.splitlines():
        line = line.strip()
        if not line.startswith("impl="):
            continue
        if impl.endswith(METRICS_OFF):  # the same program without counting: its own row
            line = line.replace(f"impl={impl[:-len(METRICS_OFF)]} ", f"impl={impl} ", 1)
        print(line, flush=True)
        raw.append(line)
        results.add(line)
    if p.returncode != 0:
        failures.append(f"{impl} {wl}: exit status {p.returncode}")
        print(f"!!! {impl} {wl} failed (exit status {p.returncode}): {' '.join(argv)}", flush=True)
    print(f"  [{impl} {wl}] {secs:.1f} s", file=sys.stderr)


def run_all(args):
    results, raw, failures = Results(), [], []
    todo = [j for j in jobs(args.bin, args.quick, args.redis_port)
            if re.search(args.only, f"{j[0]} {j[1]}")]
    timeout = 120 if args.quick else 300
    # W6/W6b measure a process that sleeps: they run side by side (each only reads its own
    # threads' CPU time and context switches), first, before anything else is busy.
    idle = [j for j in todo if j[1] in ("W6", "W6b")]
    busy = [j for j in todo if j[1] not in ("W6", "W6b")]
    if idle:
        with ThreadPoolExecutor(max_workers=len(idle)) as pool:
            for res in pool.map(lambda j: run_job(*j, timeout), idle):
                report_job(res, results, raw, failures)
    for j in busy:
        try:
            report_job(run_job(*j, timeout), results, raw, failures)
        except subprocess.TimeoutExpired:
            failures.append(f"{j[0]} {j[1]}: timed out")
            print(f"!!! {j[0]} {j[1]} timed out", flush=True)
    return results, raw, failures


# ------------------------------------------------------------------------------- the table

def table(results):
    lines = ["| workload | implementation | metrics (medians; min-max of the first) "
             "| vs Go | vs Guava | vs floor |", "|---|---|---|---|---|---|"]
    for wl in WORKLOADS:
        impls = results.impls(wl)
        order = {n: i for i, n in enumerate(OURS + list(PEERS))}
        impls.sort(key=lambda i: (order.get(i, 50), i))
        for impl in impls:
            names = results.order[(wl, impl)]
            rs = results.reps[(wl, impl)]
            first = names[0]
            cells = []
            for n in names:
                med = results.median(wl, impl, n)
                cell = f"{n}={fmt_num(med)}"
                if n == first and len(rs) > 1:
                    lo, hi = min(r[n] for r in rs), max(r[n] for r in rs)
                    cell += f" ({fmt_num(lo)}-{fmt_num(hi)})"
                cells.append(cell)
            metric = PRIMARY.get(wl, first)
            vs = ["", "", ""]
            if impl in OURS:
                me = results.median(wl, impl, metric)
                if wl not in NO_PEERS or wl == "redis":
                    vs[0] = ratio(me, results.median(wl, "go_xtime_rate", metric))
                    vs[1] = ratio(me, results.median(wl, "java_guava", metric))
                floor = FLOOR.get((wl, impl))
                if floor:
                    vs[2] = f"{ratio(me, results.median(wl, floor, metric))} {floor}"
            lines.append(f"| {wl} | {impl} | {' '.join(cells)} | {vs[0]} | {vs[1]} | {vs[2]} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- targets

def targets(results, quick):
    """[(target, PASS|MISS|n/a|info, detail)] for every target of issue 4 and of W7, with context lines."""
    med = results.median
    out = []

    def check(name, ok, detail):
        out.append((name, "n/a" if ok is None else ("PASS" if ok else "MISS"), detail))

    def info(name, detail):
        out.append((name, "info", detail))

    def le(a, b, k):
        return None if a is None or b is None else a <= k * b

    def lt(a, b):
        return None if a is None or b is None else a < b

    t, fa = med("W1", "asio_ratelimit_try", "ns_per_op"), med("W1", "floor_atomic", "ns_per_op")
    g = med("W1", "java_guava", "ns_per_op")
    check("W1 try <= 1.2x atomic floor", le(t, fa, 1.2), f"{fmt_num(t)} vs {fmt_num(fa)} ns ({ratio(t, fa)})")
    check("W1 try faster than Guava", lt(t, g), f"{fmt_num(t)} vs {fmt_num(g)} ns ({ratio(t, g)})")
    t, fa = med("W2", "asio_ratelimit_try", "ns_per_op"), med("W2", "floor_atomic", "ns_per_op")
    g, go = med("W2", "java_guava", "ns_per_op"), med("W2", "go_xtime_rate", "ns_per_op")
    check("W2 try <= 1.5x atomic floor", le(t, fa, 1.5), f"{fmt_num(t)} vs {fmt_num(fa)} ns ({ratio(t, fa)})")
    check("W2 try faster than Guava", lt(t, g), f"{fmt_num(t)} vs {fmt_num(g)} ns ({ratio(t, g)})")
    check("W2 try faster than Go", lt(t, go), f"{fmt_num(t)} vs {fmt_num(go)} ns ({ratio(t, go)})")
    if results.no_two_cores:
        # Another process held a core: W2 degenerated into W1 with lock hand-offs.
        for i in range(len(out) - 3, len(out)):
            out[i] = (out[i][0], out[i][1], out[i][2] + " [UNRELIABLE: the W2 core probe found no "
                      "second free core for " + ", ".join(results.no_two_cores) + "]")
    c, p = med("W3", "asio_ratelimit_callback", "ns_per_op"), med("W3", "floor_post", "ns_per_op")
    check("W3 callback <= 1.5x asio::post", le(c, p, 1.5), f"{fmt_num(c)} vs {fmt_num(p)} ns ({ratio(c, p)})")
    pc = med("W3", "floor_post_clock", "ns_per_op")
    info("context: W3 callback vs post + one clock read (the floor of an exact limiter)",
         f"{fmt_num(c)} vs {fmt_num(pc)} ns ({ratio(c, pc)}); the clock read alone is "
         f"{fmt_num(med('W0', 'asio_ratelimit', 'ns_per_op'))} ns")
    a, cp = med("W3", "asio_ratelimit_awaitable", "ns_per_op"), med("W3", "floor_co_post", "ns_per_op")
    check("W3 use_awaitable <= 1.15x co_await post", le(a, cp, 1.15),
          f"{fmt_num(a)} vs {fmt_num(cp)} ns ({ratio(a, cp)})")
    for wl, impl in sorted(METRICS_ROWS):
        on, off = med(wl, impl, "ns_per_op"), med(wl, impl + METRICS_OFF, "ns_per_op")
        check(f"{wl} {impl} with metrics <= 1.05x without", le(on, off, 1.05),
              f"{fmt_num(on)} vs {fmt_num(off)} ns ({ratio(on, off)}; medians of "
              f"{1 if quick else METRICS_REPS} alternating runs"
              f"{', all their repetitions' if wl == 'W2' else ''})")
    b, ga = med("W3", "asio_ratelimit_blocking", "ns_per_op"), med("W3", "java_guava", "ns_per_op")
    check("W3 get_token faster than Guava acquire", lt(b, ga), f"{fmt_num(b)} vs {fmt_num(ga)} ns ({ratio(b, ga)})")
    n4 = 200 if quick else 2000
    ideal4 = (n4 - 1) / 1000
    ft = med("W4", "floor_timer", "late_p99_us")
    for impl in ("asio_ratelimit_callback", "asio_ratelimit_awaitable", "asio_ratelimit_blocking"):
        tot, p99 = med("W4", impl, "total_s"), med("W4", impl, "late_p99_us")
        check(f"W4 {impl} total within 0.1% of {ideal4:.3f} s",
              None if tot is None else abs(tot - ideal4) <= 0.001 * ideal4,
              f"{fmt_num(tot)} s ({'-' if tot is None else f'{(tot / ideal4 - 1) * 100:+.2f}%'})")
        check(f"W4 {impl} p99 lateness <= 2x timer floor", le(p99, ft, 2.0),
              f"{fmt_num(p99)} vs {fmt_num(ft)} us ({ratio(p99, ft)})")
        own, lost = med("W4", impl, "own_p99_us"), med("W4", impl, "caller_lost_ms")
        info(f"context: W4 {impl} own p99 lateness (caller stalls excluded)",
             f"{fmt_num(own)} vs {fmt_num(ft)} us ({ratio(own, ft)}); the caller's "
             f"stalls cost {fmt_num(lost)} ms")
    n5 = 10000 if quick else 100000
    ideal5 = (n5 - 1) / n5
    for impl in ("asio_ratelimit_callback", "asio_ratelimit_awaitable"):
        w = med("W5", impl, "wall_s")
        check(f"W5 {impl} wall in [ideal, ideal + 1%]",
              None if w is None else ideal5 - 1e-4 <= w <= ideal5 * 1.01,
              f"{fmt_num(w)} s vs ideal {ideal5:.5f} ({'-' if w is None else f'{(w / ideal5 - 1) * 100:+.2f}%'})")
    bc = med("W5", "asio_ratelimit_callback", "bytes_per_waiter")
    check("W5 bytes per callback waiter <= 300", None if bc is None else bc <= 300, f"{fmt_num(bc)} B")
    ba, bf = med("W5", "asio_ratelimit_awaitable", "bytes_per_waiter"), med("W5", "floor_co_timer", "bytes_per_waiter")
    check("W5 coroutine waiter <= 1.1x coroutine+timer floor", le(ba, bf, 1.1),
          f"{fmt_num(ba)} vs {fmt_num(bf)} B ({ratio(ba, bf)})")
    for flavour in ("callback", "awaitable"):
        # The "two sequential acquires": the receipt forms (async_acquire), which hand
        # over what the joint acquire hands over; the get_token forms (no receipt) as context.
        j = med("W7", f"asio_ratelimit_joint_{flavour}", "ns_per_op")
        s2 = med("W7", f"asio_ratelimit_two_acquires_{flavour}", "ns_per_op")
        check(f"W7 joint {flavour} <= 1.3x two sequential acquires (receipts)", le(j, s2, 1.3),
              f"{fmt_num(j)} vs {fmt_num(s2)} ns ({ratio(j, s2)})")
        g = med("W7", f"asio_ratelimit_two_sequential_{flavour}", "ns_per_op")
        if j is not None or g is not None:
            info(f"context: W7 joint {flavour} vs two async_get_token (no receipts)",
                 f"{fmt_num(j)} vs {fmt_num(g)} ns ({ratio(j, g)})")
    j, s2 = med("W7", "asio_ratelimit_joint_try", "ns_per_op"), med("W7", "asio_ratelimit_two_sequential_try", "ns_per_op")
    if j is not None or s2 is not None:
        info("context: W7 joint try_acquire vs two try_get_token (no target)",
             f"{fmt_num(j)} vs {fmt_num(s2)} ns ({ratio(j, s2)})")
    for impl in ("asio_ratelimit_joint_callback", "asio_ratelimit_joint_awaitable"):
        w = med("W7b", impl, "wall_s")
        check(f"W7b {impl} wall in [ideal, ideal + 1%]",
              None if w is None else ideal5 - 1e-4 <= w <= ideal5 * 1.01,
              f"{fmt_num(w)} s vs ideal {ideal5:.5f} ({'-' if w is None else f'{(w / ideal5 - 1) * 100:+.2f}%'})")
    for flavour in ("callback", "awaitable"):
        bj = med("W7b", f"asio_ratelimit_joint_{flavour}", "bytes_per_waiter")
        bs = med("W7b", f"asio_ratelimit_two_sequential_{flavour}", "bytes_per_waiter")
        b1 = med("W5", f"asio_ratelimit_{flavour}", "bytes_per_waiter")
        if bj is not None:
            info(f"context: W7b bytes per joint {flavour} waiter (reported, no target)",
                 f"{fmt_num(bj)} B; two sequential acquires {fmt_num(bs)} B; "
                 f"one bucket (W5) {fmt_num(b1)} B")
    # W8, W8b: the stream layer (rate_limited_stream).
    u, raw = med("W8", "asio_ratelimit_stream_unlimited", "bytes_per_s"), med("W8", "raw_socket", "bytes_per_s")
    check("W8 stream, limits that never bind >= 0.95x raw socket", None if u is None or raw is None else u >= 0.95 * raw,
          f"{fmt_num(None if u is None else u / 2**20)} vs {fmt_num(None if raw is None else raw / 2**20)} MiB/s ({ratio(u, raw)})")
    a = med("W8b", "asio_ratelimit_stream", "achieved_ratio")
    stall, secs8 = med("W8b", "asio_ratelimit_stream", "stall_ms"), med("W8b", "asio_ratelimit_stream", "seconds")
    check("W8b stream achieved rate within 1% of configured (20 MiB/s, capacity one slice)",
          None if a is None else abs(a - 1) <= 0.01,
          f"{'-' if a is None else f'{a:.4f}'} ({'-' if a is None else f'{(a - 1) * 100:+.2f}%'}); "
          f"the bucket stood full {fmt_num(stall)} ms while the writer was held up "
          f"({'-' if stall is None or not secs8 else f'{stall / 10 / secs8:.2f}%'} of the run: "
          f"the process's stalls, which a capacity of one slice cannot bank)")
    w, wb = med("W8b", "asio_ratelimit_stream", "window_rel"), med("W8b", "beast_simple_rate_policy", "window_rel")
    ab = med("W8b", "beast_simple_rate_policy", "achieved_ratio")
    if w is not None or wb is not None:
        info("context: W8b largest 100 ms window / (0.1 rate), ours vs Beast simple_rate_policy",
             f"{'-' if w is None else f'{w:.4f}'} vs {fmt_num(wb)} (bound for ours: 1 + capacity / (0.1 rate) = "
             f"{1 + 16384 / (0.1 * 20 * 2**20):.4f}); Beast's achieved / configured "
             f"{'-' if ab is None else f'{ab:.4f}'}")
    r0, r16 = med("redis", "asio_ratelimit", "grants_per_s"), med("redis", "asio_ratelimit_lease16", "grants_per_s")
    rb1, rb50 = med("redis", "redis_benchmark_c1_P200", "grants_per_s"), med("redis", "redis_benchmark_c50_P1", "grants_per_s")
    if r0 is not None:
        info("context: Redis, grants/s through one connection (no target in issue 4)",
             f"{fmt_num(r0)} without leasing, {fmt_num(r16)} with a lease of 16; redis-benchmark "
             f"EVALSHA {fmt_num(rb1)} (1 client, pipeline 200), {fmt_num(rb50)} (50 clients, no pipeline)")
    # Issue 14: reservations against redis-benchmark pipelining the same script (one request per call).
    rr, rr1 = med("redis", "asio_ratelimit_reserve", "grants_per_s"), med("redis", "asio_ratelimit_reserve_batch1", "grants_per_s")
    rbr = med("redis", "redis_benchmark_reserve_c1_P200", "grants_per_s")
    if rbr:
        check("redis: reservations, one per call (200 out), >= 0.7x redis-benchmark EVALSHA P200 of the same script",
              None if rr1 is None else rr1 >= 0.7 * rbr, f"{fmt_num(rr1)} vs {fmt_num(rbr)}"
              f" ({'-' if rr1 is None else f'{rr1 / rbr:.2f}x'})")
        check("redis: reservations coalesced >= 2x redis-benchmark EVALSHA P200 of the same script",
              None if rr is None else rr >= 2 * rbr, f"{fmt_num(rr)} vs {fmt_num(rbr)}"
              f" ({'-' if rr is None else f'{rr / rbr:.2f}x'})")
        rk = med("redis", "asio_ratelimit_keyed_10k", "grants_per_s")
        check("redis: keyed limiter, 10 000 keys, 200 coroutines, one connection, >= 0.7x redis-benchmark "
              "EVALSHA P200 of the same script",
              None if rk is None else rk >= 0.7 * rbr, f"{fmt_num(rk)} vs {fmt_num(rbr)}"
              f" ({'-' if rk is None else f'{rk / rbr:.2f}x'})")
        lat = [(i, med("redis", i, "p50_us"), med("redis", i, "p99_us")) for i in
               ("asio_ratelimit_reserve", "asio_ratelimit_reserve_batch1", "asio_ratelimit_keyed_10k",
                "redis_benchmark_reserve_c1_P200")]
        info("context: redis grant latency with the tokens there, p50/p99 us",
             "; ".join(f"{i} {fmt_num(a)}/{fmt_num(b)}" for i, a, b in lat))
    for wl in ("W6", "W6b"):
        h = med(wl, "asio_ratelimit", "handlers")
        cpu, base = med(wl, "asio_ratelimit", "cpu_ms"), med(wl, "asio_ratelimit", "base_cpu_ms")
        sw, bsw = med(wl, "asio_ratelimit", "ctx_switches"), med(wl, "asio_ratelimit", "base_ctx_switches")
        check(f"{wl} idle: zero handlers", None if h is None else h == 0, f"{fmt_num(h)} handlers")
        check(f"{wl} idle: no CPU above the baseline",
              None if cpu is None else cpu <= base + 1.0 and sw <= bsw + 3,
              f"{fmt_num(cpu)} ms / {fmt_num(sw)} switches vs baseline {fmt_num(base)} ms / {fmt_num(bsw)}")
    return out


# ------------------------------------------------------------------------------- plots

def plots(trace_dir, plot_dir, quick):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("(gnuplot not found: no plots)", file=sys.stderr)
        return
    os.makedirs(plot_dir, exist_ok=True)

    def traces(wl):
        fs = sorted(f for f in os.listdir(trace_dir) if f.startswith(wl + "-") and f.endswith(".dat"))
        return [(f[len(wl) + 1:-4], os.path.join(trace_dir, f)) for f in fs]

    def plot(name, title, xlabel, ylabel, settings, series):
        script = f"""
set terminal pngcairo size 1100,650 font ',10'
set output '{plot_dir}/{name}.png'
set title '{title}'
set xlabel '{xlabel}'
set ylabel '{ylabel}'
{settings}
set key outside right
set grid
plot {series}
"""
        subprocess.run([gnuplot], input=script, text=True, check=False)

    w4 = traces("W4")
    if w4:
        plot("w4-lateness",
             "W4: lateness of each grant, 1000/s burst 1, one caller (lower is better; clipped at 1 us)",
             "grant", "lateness (us, log scale)", "set logscale y",
             ", ".join(f"'{path}' using 1:($2 < 1 ? 1 : $2) with lines lw 1.5 title '{name.replace('_', ' ')}'"
                       for name, path in w4))
    w5 = traces("W5")
    if w5:
        n = 10000 if quick else 100000
        plot("w5-cumulative",
             f"W5: cumulative grants, {n} waiters at {n}/s burst 1 (above the ideal line = over-granting)",
             "seconds since the gate opened", "grants", "set xrange [0:*]",
             f"(x <= {(n - 1) / n} ? 1 + x * {n} : {n}) with lines dt 2 lw 2 lc rgb 'black' title 'ideal', "
             + ", ".join(f"'{path}' using 1:2 with lines lw 1.5 title '{name.replace('_', ' ')}'"
                         for name, path in w5))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="directory with bench_ratelimit and peers/")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", help="also write the raw lines here")
    ap.add_argument("--trace-dir", help="per-grant traces (W4, W5) go here")
    ap.add_argument("--plots", help="write the PNG plots here")
    ap.add_argument("--only", default=".", help="regex on 'impl workload'")
    ap.add_argument("--redis-port", type=int, default=0,
                    help="a running redis-server for bench_redis (0: it starts its own)")
    args = ap.parse_args()
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
        for f in os.listdir(args.trace_dir):
            if f.endswith(".dat"):
                os.remove(os.path.join(args.trace_dir, f))
        os.environ["BENCH_TRACE_DIR"] = os.path.abspath(args.trace_dir)
    start = time.monotonic()
    results, raw, failures = run_all(args)
    secs = time.monotonic() - start
    if args.results:
        with open(args.results, "w") as f:
            f.write("\n".join(raw) + "\n")
    print()
    print(f"## Medians ({'quick smoke run' if args.quick else 'full run'}, {secs:.0f} s)")
    print()
    print(table(results))
    print()
    print("## Targets (W0-W6: issue 4; W7, W7b: issue 12; W8, W8b: streams; ratios within this run)")
    print()
    for name, verdict, detail in targets(results, args.quick):
        if verdict == "info":
            print(f"  - {name}: {detail}")
        else:
            print(f"- {verdict:4} {name}: {detail}")
    if args.plots and args.trace_dir:
        plots(args.trace_dir, args.plots, args.quick)
    if failures:
        print()
        print("FAILED (a result check failed):")
        for f in failures:
            print(f"  {f}")
        sys.exit(1)


if __name__ == "__main__":
    main()
