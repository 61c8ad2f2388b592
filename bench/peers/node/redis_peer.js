#!/usr/bin/env node
// The Node.js peer of the Redis workload (BENCHMARKS.md, "Redis"; bench/peers/README.md):
// rate-limiter-flexible's RateLimiterRedis over one ioredis connection, on one hot key.
//
//   redis_peer.js --port P [--workload redis|redis_window_edge|all] [--reps N] [--seconds X]
//                 [--coroutines N] [--points N] [--window-s X] [--quick]
//
// stdout holds exactly one line per measured repetition, everything else goes to stderr:
//
//   impl=node_rlflex workload=redis rep=<i> grants_per_s=<v> coroutines=200
//     200 concurrent consumers each loop `await limiter.consume(key, 1)` for --seconds on a
//     limiter that never refuses (1e12 points per hour); grants/s = successful consumes / wall
//     time. A refusal or an error aborts the run (exit status 1).
//
//   impl=node_rlflex_window_edge workload=redis_window_edge rep=<i> granted=<n> window_s=<w>
//       token_bucket_allows=<m>
//     The inexactness of a fixed window: a limiter of P points per 1 s (--points, 10000). The
//     first consume opens a window; the consumers hammer it shortly before its end (they start
//     early and a pacer holds them while they are ahead, so that its last points go just before
//     the edge) and go on past the edge until the next window is exhausted too. Every call's send and answer times are taken with
//     process.hrtime.bigint(); as one connection runs calls in order, calls a..b ran at Redis
//     within [send of a, answer of b]. `granted` is the most grants among such a run of calls
//     whose span is at most `window_s` (--window-s, 0.67), found by sliding over all calls: a
//     lower bound of what Redis granted within some interval of that length. `token_bucket_allows`
//     is what a token bucket of the same rate (P/s) and capacity (P) allows in any such interval:
//     P + rate * window_s. Refusals are expected here; more than P grants in a window, or a third
//     window, fail the run.
//
// Needs a running redis-server on 127.0.0.1:P. Exit status 0 on success, 1 on a failed check or
// a Redis error, 2 on a bad command line.
'use strict';

const Redis = require('ioredis');
const { RateLimiterRedis, RateLimiterRes } = require('rate-limiter-flexible');

const PROG = 'peer_node_redis';
const KEY_PREFIX = 'bench:node_rlflex';

// ------------------------------------------------------------------------------ command line

function quoted(v) {
  let s = "'";
  for (const ch of String(v)) {
    const c = ch.codePointAt(0);
    if (ch === '\n') s += '\\n';
    else if (ch === '\t') s += '\\t';
    else if (c < 0x20 || c === 0x7f) s += '\\x' + c.toString(16).padStart(2, '0');
    else s += ch;
  }
  return s + "'";
}

function refuse(msg) {
  process.stderr.write(`${PROG}: ${msg}\n`);
  process.exit(2);
}

function intOption(name, help, def, lo, hi) {
  const allowed = `range: ${lo}..${hi}`;
  return {
    name, metavar: 'N', help, def, allowed,
    parse(v) {
      if (!/^-?[0-9]+$/.test(v)) throw new Error(`${quoted(v)} is not an integer (${allowed})`);
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < lo || n > hi) throw new Error(`${quoted(v)} is out of range (${allowed})`);
      return n;
    },
  };
}

function realOption(name, help, def, lo, hi) {
  const allowed = `range: ${lo}..${hi}`;
  return {
    name, metavar: 'X', help, def, allowed,
    parse(v) {
      if (!/^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$/.test(v)) {
        throw new Error(`${quoted(v)} is not a finite number (${allowed})`);
      }
      const x = Number(v);
      if (!Number.isFinite(x) || x < lo || x > hi) throw new Error(`${quoted(v)} is out of range (${allowed})`);
      return x;
    },
  };
}

const WORKLOADS = ['redis', 'redis_window_edge', 'all'];
const OPTIONS = [
  intOption('port', 'a running redis-server on 127.0.0.1', null, 1, 65535),
  {
    name: 'workload', metavar: 'WORD', help: 'what to measure', def: 'all',
    allowed: `one of: ${WORKLOADS.join(', ')}`,
    parse(v) {
      if (!WORKLOADS.includes(v)) throw new Error(`${quoted(v)} is not allowed (one of: ${WORKLOADS.join(', ')})`);
      return v;
    },
  },
  intOption('reps', 'measured repetitions of each workload', '5; --quick: 1', 1, 1000),
  realOption('seconds', 'redis: seconds each repetition lasts', '1; --quick: 0.2', 0.01, 3600),
  intOption('coroutines', 'consumers asking at once', '200', 1, 100000),
  intOption('points', 'redis_window_edge: points per 1 s window (the token bucket: rate and capacity)', '10000', 10, 10000000),
  realOption('window-s', 'redis_window_edge: length of the sliding interval, s', '0.67', 0.01, 1),
  { name: 'quick', help: 'a short run (a smoke test)' },
];

function usage() {
  let s = `usage: ${PROG} --port P [OPTION]...\n` +
    'The Node.js peer of the Redis workload: rate-limiter-flexible RateLimiterRedis over one ioredis\n' +
    'connection, one key (scripts/bench runs it).\n\noptions:\n';
  for (const o of OPTIONS) {
    const head = `  --${o.name}${o.metavar ? ' ' + o.metavar : ''}`;
    s += head + ' '.repeat(Math.max(2, 24 - head.length)) + o.help;
    if (o.metavar) s += `  [${o.allowed}; ${o.def === null ? 'required' : 'default: ' + o.def}]`;
    s += '\n';
  }
  return s + '  --help                show this help\n';
}

function parseArgs(argv) {
  const got = {};
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--help' || a === '-h') { help = true; continue; }
    if (!a.startsWith('--')) {
      refuse(`${a.startsWith('-') ? 'unknown option' : 'unexpected argument'} ${quoted(a)} (see --help)`);
    }
    const eq = a.indexOf('=');
    const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
    const o = OPTIONS.find((c) => c.name === name);
    if (!o) refuse(`unknown option ${quoted('--' + name)} (see --help)`);
    let value = eq < 0 ? undefined : a.slice(eq + 1);
    if (!o.metavar && value !== undefined) refuse(`--${name} takes no value (got ${quoted(value)})`);
    if (o.metavar && value === undefined) {
      if (i + 1 >= argv.length) refuse(`--${name} needs a value (${o.allowed})`);
      value = argv[++i];
    }
    if (name in got) refuse(`--${name} given twice`);
    try {
      got[name] = o.metavar ? o.parse(value) : true;
    } catch (e) {
      refuse(`--${name}: ${e.message}`);
    }
  }
  if (help) {
    process.stdout.write(usage());
    process.exit(0);
  }
  if (!('port' in got)) refuse('--port is required (see --help)');
  const quick = !!got.quick;
  return {
    port: got.port,
    workload: got.workload ?? 'all',
    quick,
    reps: got.reps ?? (quick ? 1 : 5),
    seconds: got.seconds ?? (quick ? 0.2 : 1),
    coroutines: got.coroutines ?? 200,
    points: got.points ?? 10000,
    windowS: got['window-s'] ?? 0.67,
  };
}

// ------------------------------------------------------------------------------ helpers

function fail(msg) {
  process.stderr.write(`${PROG}: error: ${msg}\n`);
  process.exit(1);
}

const log = (msg) => process.stderr.write(`${msg}\n`);
const now = () => process.hrtime.bigint(); // ns
const secsSince = (t0) => Number(now() - t0) / 1e9;
const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

/// What consume() rejected with, as an abort message (a refusal is a RateLimiterRes).
function why(e) {
  if (e instanceof RateLimiterRes) {
    return `refused (consumed ${e.consumedPoints}, ms before next ${e.msBeforeNext})`;
  }
  return e && e.stack ? e.stack : String(e);
}

async function connect(port) {
  const client = new Redis({
    host: '127.0.0.1',
    port,
    lazyConnect: true,
    enableOfflineQueue: false, // as rate-limiter-flexible's docs advise: fail, never queue
    retryStrategy: () => null, // no reconnect: a lost connection fails the run
    maxRetriesPerRequest: 0,
    connectTimeout: 5000,
  });
  client.on('error', (e) => log(`ioredis: ${e.message}`));
  try {
    await client.connect();
  } catch (e) {
    fail(`cannot connect to redis-server at 127.0.0.1:${port}: ${e.message}`);
  }
  return client;
}

// ------------------------------------------------------------------------------ redis: grants/s

/// `n` consumers loop `await limiter.consume(key, 1)` for `secs`; returns grants/s.
async function throughput(limiter, key, n, secs) {
  let grants = 0;
  let stop = false;
  const worker = async () => {
    while (!stop) {
      try {
        await limiter.consume(key, 1);
      } catch (e) {
        fail(`consume on a limiter that never refuses: ${why(e)}`);
      }
      ++grants;
    }
  };
  const t0 = now();
  const timer = setTimeout(() => { stop = true; }, secs * 1000);
  await Promise.all(Array.from({ length: n }, worker));
  clearTimeout(timer);
  return grants / secsSince(t0);
}

async function redisWorkload(client, opt) {
  // A limit never reached: 1e12 points per hour (the Lua script path: SET NX EX, INCRBY, PTTL).
  const limiter = new RateLimiterRedis({
    storeClient: client, keyPrefix: KEY_PREFIX, points: 1e12, duration: 3600,
  });
  const key = `hot:${process.pid}`;
  await limiter.delete(key);
  await limiter.consume(key, 1).catch((e) => fail(`first consume: ${why(e)}`));
  // Warm-up (the JIT, the connection's buffers): not reported.
  const warm = await throughput(limiter, key, opt.coroutines, Math.min(0.3, opt.seconds));
  log(`warm-up: ${warm.toFixed(0)} grants/s`);
  const rates = [];
  for (let rep = 0; rep < opt.reps; ++rep) {
    const g = await throughput(limiter, key, opt.coroutines, opt.seconds);
    rates.push(g);
    process.stdout.write(`impl=node_rlflex workload=redis rep=${rep} grants_per_s=${g.toFixed(0)} ` +
      `coroutines=${opt.coroutines}\n`);
  }
  await limiter.delete(key);
  return rates;
}

// ------------------------------------------------------------------------------ window edge

/// The densest stretch of calls: calls are sent, run by Redis and answered in one order (one
/// connection: FIFO), so calls a..b certainly ran within [send[a], max recv[a..b]]. Returns the
/// most grants among calls a..b with that span <= w (a lower bound of the grants Redis made in
/// some interval of length w), and where that stretch starts and ends.
function densest(send, recv, granted, w) {
  const n = send.length;
  const pre = new Int32Array(n + 1); // grants among calls 0..k-1
  for (let k = 0; k < n; ++k) pre[k + 1] = pre[k] + (granted[k] ? 1 : 0);
  let best = 0;
  let from = 0;
  let to = 0;
  let recvMax = -Infinity; // max recv[0..b] >= max recv[a..b]: conservative
  for (let a = 0, b = 0; b < n; ++b) {
    recvMax = Math.max(recvMax, recv[b]);
    while (a < b && recvMax - send[a] > w) ++a;
    if (recvMax - send[a] > w) continue; // a single call longer than w
    if (pre[b + 1] - pre[a] > best) {
      best = pre[b + 1] - pre[a];
      from = send[a];
      to = recvMax;
    }
  }
  return { best, from, to };
}

async function windowEdgeRep(client, opt, rep, calibrate) {
  const P = opt.points;
  const D = 1; // seconds per window
  const limiter = new RateLimiterRedis({ storeClient: client, keyPrefix: KEY_PREFIX, points: P, duration: D });
  const key = `edge:${process.pid}:${rep}`;
  await limiter.delete(key);

  // Every call in the order it is made (= the order Redis runs it and answers it): when it was
  // sent and when its promise settled (s, relative to base; refusals settle a few promise steps
  // later than grants, so settle order is not quite answer order), and whether it was granted.
  // Grants per window: a grant's window ends at its answer time + the PTTL in the answer.
  const base = now();
  const t = () => Number(now() - base) / 1e9;
  const send = [];
  const recv = [];
  const granted = [];
  const perWindow = [0, 0, 0]; // the first window, the next, any later one (a failure)
  let edge;
  const record = (i, res, ok) => {
    recv[i] = t();
    granted[i] = ok;
    if (ok && edge !== undefined) {
      const ends = recv[i] + res.msBeforeNext / 1e3; // the true end, or a round trip later
      ++perWindow[ends < edge + 0.5 * D ? 0 : ends < edge + 1.5 * D ? 1 : 2];
    }
  };

  // Open the first window; its end, in our clock, is the answer's time + the key's PTTL (read by
  // the script just before the answer left: the edge is known to within one round trip).
  send.push(t());
  const first = await limiter.consume(key, 1).catch((e) => fail(`first consume: ${why(e)}`));
  record(0, first, true);
  edge = recv[0] + first.msBeforeNext / 1e3;
  perWindow[0] = 1;
  // This client's throughput now (the machine's load drifts): 0.25 s on another key.
  const rate = await calibrate(0.25);
  // The first window's last points should all go just before its end: a window used up early
  // leaves a gap of refusals before the edge, one not used up leaves points unused. The
  // consumers start early (twice the time the calibrated throughput needs, so that a client
  // half as fast still makes it), and a pacer holds them whenever they are ahead: when the points
  // left, at the throughput since they last resumed, would run out more than 25% + 20 ms before
  // the edge, they wait until they would not. After the edge nobody waits.
  const need = (P - 1) / rate;
  const lead = Math.min(0.9 * D, 2 * need + 0.05);
  if (need > 0.9 * D) {
    log(`warning: at ${rate.toFixed(0)} grants/s, ${P} points take ${need.toFixed(2)} s: ` +
      'no window can be exhausted; --points is too large for this machine');
  }
  if (rate * opt.windowS < 2 * P - 1) {
    log(`note: at ${rate.toFixed(0)} grants/s this client fits about ${(rate * opt.windowS).toFixed(0)} ` +
      `grants in ${opt.windowS} s, fewer than the ${2 * P - 1} the fixed window allows there: ` +
      'granted is bounded by the client, not by the limiter');
  }
  await sleep((edge - lead - t()) * 1e3);

  let holdUntil = 0; // the consumers wait until then (s, our clock)
  let held = 0; // s held in all
  let runFrom = t(); // since when they run, and how many first-window grants they had then
  let runGrants = perWindow[0];
  let holding = false;
  let live = rate; // grants/s while running
  const pacer = setInterval(() => {
    const at = t();
    if (at >= edge) return clearInterval(pacer);
    if (at < holdUntil) return;
    if (holding) { // resumed: count from now (answers that landed in the hold are not a rate)
      holding = false;
      runFrom = at;
      runGrants = perWindow[0];
      return;
    }
    if (at - runFrom >= 0.02) live = (perWindow[0] - runGrants) / (at - runFrom);
    const left = P - perWindow[0];
    const slack = edge - at - (1.25 * left) / live - 0.02;
    if (left > 0 && slack > 0.005) {
      holdUntil = at + slack;
      held += slack;
      holding = true;
    }
  }, 2);

  // Hammer until the second window is exhausted (its P-th grant), or, at the latest, well
  // before a third window would open.
  const deadline = edge + Math.min(0.8 * D, lead + 0.3);
  let stop = false;
  let exhausted = 0; // grants that took a window's last point (the first window's, the second's)
  const worker = async () => {
    while (!stop) {
      const wait = holdUntil - t();
      if (wait > 0) await sleep(wait * 1e3);
      const i = send.length;
      send.push(t());
      let res;
      try {
        res = await limiter.consume(key, 1);
      } catch (e) {
        if (!(e instanceof RateLimiterRes)) fail(`consume: ${why(e)}`);
        record(i, e, false);
        if (recv[i] > deadline) stop = true;
        continue;
      }
      record(i, res, true);
      if (res.consumedPoints === P && ++exhausted === 2) stop = true;
      if (recv[i] > deadline) stop = true;
    }
  };
  const hammer = t();
  await Promise.all(Array.from({ length: opt.coroutines }, worker));
  clearInterval(pacer);
  const end = t();
  await limiter.delete(key);

  const { best, from, to } = densest(send, recv, granted, opt.windowS);
  const tb = Math.floor(P + (P / D) * opt.windowS + 1e-9);
  const rel = (x) => (x - edge).toFixed(3);
  const grants = granted.filter(Boolean).length;
  log(`rep ${rep}: at ${rate.toFixed(0)} grants/s, started ${lead.toFixed(3)} s before the edge, ` +
    `held ${held.toFixed(3)} s; ` +
    `calls from ${rel(hammer)} s to ${rel(end)} s around it: ${send.length} calls, ${grants} grants ` +
    `(per window: ${perWindow.join(', ')}); the densest stretch: ${best} grants sent and answered ` +
    `within [${rel(from)}, ${rel(to)}] s`);
  if (perWindow[2] > 0 || perWindow.some((g) => g > P)) {
    fail(`grants per window ${perWindow.join(', ')}: expected two windows of at most ${P}`);
  }
  process.stdout.write(`impl=node_rlflex_window_edge workload=redis_window_edge rep=${rep} ` +
    `granted=${best} window_s=${opt.windowS} token_bucket_allows=${tb}\n`);
}

async function windowEdgeWorkload(client, opt) {
  // The throughput that sets how early the hammering starts, on a limiter that never refuses.
  const limiter = new RateLimiterRedis({ storeClient: client, keyPrefix: KEY_PREFIX, points: 1e12, duration: 3600 });
  const key = `calibrate:${process.pid}`;
  await limiter.consume(key, 1).catch((e) => fail(`first consume: ${why(e)}`));
  const calibrate = (secs) => throughput(limiter, key, opt.coroutines, secs);
  await calibrate(0.2); // warm-up
  for (let rep = 0; rep < opt.reps; ++rep) await windowEdgeRep(client, opt, rep, calibrate);
  await limiter.delete(key);
}

// ------------------------------------------------------------------------------ main

async function main() {
  const opt = parseArgs(process.argv.slice(2));
  const client = await connect(opt.port);
  log(`node ${process.version}, ioredis ${require('ioredis/package.json').version}, ` +
    `rate-limiter-flexible ${require('rate-limiter-flexible/package.json').version}, ` +
    `redis-server at 127.0.0.1:${opt.port}`);
  if (opt.workload !== 'redis_window_edge') await redisWorkload(client, opt);
  if (opt.workload !== 'redis') await windowEdgeWorkload(client, opt);
  await client.quit();
}

main().catch((e) => fail(why(e)));
