#!/usr/bin/env node
// The Node.js peer of the Redis workload (../../../../shared/BENCHMARKS.md, "Redis"; README.md here):
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
//     first consume opens a window; the consumers start hammering shortly before its end (early
//     enough, from the measured throughput, to exhaust it) and go on past the edge until the
//     next window is exhausted too. Every grant's time is taken with process.hrtime.bigint()
//     when its promise resolves; `granted` is the largest number of grants within any interval
//     of length `window_s` (--window-s, 0.67), found by sliding the interval over all grant
//     times; `token_bucket_allows` is what a token bucket of the same rate (P/s) and capacity
//     (P) allows in such an interval: P + rate * window_s. Refusals are expected here.
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

/// Largest number of times within any closed interval of length `w` ns, and where it starts.
function maxInInterval(times, w) {
  let best = 0;
  let at = 0;
  for (let i = 0, j = 0; j < times.length; ++j) {
    while (times[j] - times[i] > w) ++i;
    if (j - i + 1 > best) {
      best = j - i + 1;
      at = i;
    }
  }
  return { best, at };
}

async function windowEdgeRep(client, opt, rep, rate) {
  const P = opt.points;
  const D = 1; // seconds per window
  const limiter = new RateLimiterRedis({ storeClient: client, keyPrefix: KEY_PREFIX, points: P, duration: D });
  const key = `edge:${process.pid}:${rep}`;
  await limiter.delete(key);

  // Open the first window; its end, in our clock, is the reply's time + the key's PTTL (read by
  // the script just before the reply left: the edge is known to within one round trip).
  const times = [];
  const first = await limiter.consume(key, 1).catch((e) => fail(`first consume: ${why(e)}`));
  times.push(now());
  const edge = times[0] + BigInt(Math.round(first.msBeforeNext * 1e6));
  // Start early enough to exhaust the rest of the first window before its end, at the
  // measured throughput with a margin; never more than 0.9 of the window.
  const need = (P - 1) / rate;
  const lead = Math.min(0.9 * D, 1.5 * need + 0.05);
  if (need > 0.9 * D) {
    log(`warning: at ${rate.toFixed(0)} grants/s, ${P} points take ${need.toFixed(2)} s: ` +
      'no window can be exhausted; --points is too large for this machine');
  }
  const startAt = edge - BigInt(Math.round(lead * 1e9));
  await sleep(Number(startAt - now()) / 1e6);

  // Hammer until the second window is exhausted (its P-th grant), or, at the latest, well
  // before the third window would open.
  const deadline = edge + BigInt(Math.round(Math.min(0.9 * D, lead + 0.3) * 1e9));
  let stop = false;
  let refusals = 0;
  let exhausted = 0; // grants that took a window's last point (the first window's, the second's)
  const worker = async () => {
    while (!stop) {
      let res;
      try {
        res = await limiter.consume(key, 1);
      } catch (e) {
        if (!(e instanceof RateLimiterRes)) fail(`consume: ${why(e)}`);
        ++refusals;
        if (now() > deadline) stop = true;
        continue;
      }
      times.push(now());
      if (res.consumedPoints === P && ++exhausted === 2) stop = true;
      if (now() > deadline) stop = true;
    }
  };
  const hammer = now();
  await Promise.all(Array.from({ length: opt.coroutines }, worker));
  await limiter.delete(key);

  const w = BigInt(Math.round(opt.windowS * 1e9));
  const { best, at } = maxInInterval(times, w);
  const tb = Math.floor(P + (P / D) * opt.windowS + 1e-9);
  const rel = (t) => (Number(t - edge) / 1e9).toFixed(3);
  const before = times.filter((t) => t < edge).length;
  log(`rep ${rep}: first window exhausted: ${exhausted >= 1}, second: ${exhausted >= 2}; ` +
    `${times.length} grants (${before} before the edge, ${times.length - before} after, ` +
    `the edge +- one round trip), ${refusals} refusals, hammering from ${rel(hammer)} s to ` +
    `${rel(now())} s around the edge; densest ${opt.windowS} s: [${rel(times[at])}, ` +
    `${(Number(times[at] - edge) / 1e9 + opt.windowS).toFixed(3)}] s`);
  if (times.length > 2 * P) fail(`${times.length} grants in two windows of ${P} points`);
  process.stdout.write(`impl=node_rlflex_window_edge workload=redis_window_edge rep=${rep} ` +
    `granted=${best} window_s=${opt.windowS} token_bucket_allows=${tb}\n`);
}

async function windowEdgeWorkload(client, opt, rate) {
  for (let rep = 0; rep < opt.reps; ++rep) await windowEdgeRep(client, opt, rep, rate);
}

// ------------------------------------------------------------------------------ main

async function main() {
  const opt = parseArgs(process.argv.slice(2));
  const client = await connect(opt.port);
  log(`node ${process.version}, ioredis ${require('ioredis/package.json').version}, ` +
    `rate-limiter-flexible ${require('rate-limiter-flexible/package.json').version}, ` +
    `redis-server at 127.0.0.1:${opt.port}`);
  let rate;
  if (opt.workload !== 'redis_window_edge') {
    const rates = await redisWorkload(client, opt);
    rate = rates.sort((a, b) => a - b)[rates.length >> 1];
  }
  if (opt.workload !== 'redis') {
    if (rate === undefined) {
      // The throughput that sets how early the hammering starts.
      const limiter = new RateLimiterRedis({ storeClient: client, keyPrefix: KEY_PREFIX, points: 1e12, duration: 3600 });
      const key = `calibrate:${process.pid}`;
      await limiter.consume(key, 1).catch((e) => fail(`first consume: ${why(e)}`));
      rate = await throughput(limiter, key, opt.coroutines, 0.3);
      await limiter.delete(key);
      log(`calibration: ${rate.toFixed(0)} grants/s`);
    }
    await windowEdgeWorkload(client, opt, rate);
  }
  await client.quit();
}

main().catch((e) => fail(why(e)));
