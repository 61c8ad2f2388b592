// PeerGuava: the Guava RateLimiter peer of the asio-ratelimit benchmarks (Guava from Debian's
// libguava-java, OpenJDK 17).
//
// Workloads (as defined in the project's BENCHMARKS.md; one stdout line per measured repetition,
// `impl=java_guava workload=W rep=i metric=value ...`, diagnostics on stderr):
//
//   W0   System.nanoTime(), the clock Guava's SleepingStopwatch reads per op.      ns_per_op
//   W1   tryAcquire() from one thread on RateLimiter.create(1e12); every try must succeed. ns_per_op
//   W2   the same from two threads on one limiter (after a 1-vs-2-thread core probe).  ns_per_op
//   W3   acquire() that never waits (it returns the seconds it slept: must be 0).  ns_per_op
//   W4   rate 1000/s burst 1, one caller, 2000 sequential acquire()s; lateness of grant i against
//        t0 + i ms.                              total_s late_p50_us late_p99_us late_max_us
//   W5   rate N/s burst 1, N acquires (default 100000) by a pool of 1000 threads x N/1000 each
//        (100k OS threads are impossible here), all threads parked on a gate first; clock starts
//        when the gate opens. Each repetition is a child JVM (this class run with --child); one
//        more child with --waiters 0 gives the baseline peak RSS (VmHWM). bytes_per_waiter is
//        per parked thread.                                        wall_s bytes_per_waiter
//   W6   idle limiter at 1/s (W6b: 1000/s): a window without it, then a window with it; CPU
//        time (schedstat) and context switches summed over /proc/self/task/*.
//                                            cpu_ms ctx_switches base_cpu_ms base_ctx_switches
//
// W0-W3 are a throughput loop: worker threads start together from a latch, run the op in batches
// of 1000 and check a volatile stop flag between batches; the main thread stops them after
// 200 ms. ns_per_op = wall time / total ops. 2 discarded warm-up reps (they let the JIT compile
// the loops), then 7. --quick: 20 ms, no warm-up, 1 rep (W4: 200 grants, 1 rep; W5: 10000
// acquires at 10000/s; W6: 0.3 s windows). --reps N overrides the measured repetitions.
// --waiters N (W5) sets the acquire count and the rate to N/s so the ideal wall time stays 1 s;
// --waiters 0 prints the baseline `peak_rss_kb=` per repetition instead.
//
// Burst 1: RateLimiter.create(r) always allows one second of burst, so W4-W6 build the
// package-private SmoothRateLimiter.SmoothBursty(stopwatch, maxBurstSeconds = 1/r) by reflection,
// exactly as create(r) does with maxBurstSeconds = 1.
//
// Usage: java -cp guava.jar:. PeerGuava --workload W0|W1|W2|W3|W4|W5|W6|W6b [--quick] [--reps N]
//        [--waiters N]
import com.google.common.util.concurrent.RateLimiter;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.lang.management.ManagementFactory;
import java.lang.reflect.Constructor;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicLong;
import java.util.stream.Stream;

public final class PeerGuava {
    static final String IMPL = "java_guava";
    static final int BATCH = 1000;

    static String workload = "";
    static boolean quick, child;
    static int reps = -1, waiters = -1;
    static double childRate;

    static volatile boolean stop;
    static volatile long sink; // results of the measured ops end here so the JIT keeps them

    static void die(String msg) {
        System.out.flush();
        System.err.println("peer_guava: error: " + msg);
        System.exit(1);
    }

    static void warn(String msg) { System.err.println("peer_guava: " + msg); }

    static void emit(int rep, String metrics) {
        System.out.println("impl=" + IMPL + " workload=" + workload + " rep=" + rep + " " + metrics);
    }

    static String fmt(String f, Object... a) { return String.format(Locale.ROOT, f, a); }

    static int pick(int full, int q) { return reps >= 0 ? reps : quick ? q : full; }

    /** Guava burst-1 limiter: SmoothBursty(SleepingStopwatch.createFromSystemTimer(), 1/rate). */
    static RateLimiter burstOne(double rate) throws Exception {
        Class<?> swClass = Class.forName("com.google.common.util.concurrent.RateLimiter$SleepingStopwatch");
        Method sys = swClass.getDeclaredMethod("createFromSystemTimer");
        sys.setAccessible(true);
        Class<?> bursty = Class.forName("com.google.common.util.concurrent.SmoothRateLimiter$SmoothBursty");
        Constructor<?> ctor = bursty.getDeclaredConstructor(swClass, double.class);
        ctor.setAccessible(true);
        RateLimiter lim = (RateLimiter) ctor.newInstance(sys.invoke(null), 1.0 / rate);
        lim.setRate(rate);
        return lim;
    }

    // ------------------------------------------------------------ W0-W3: throughput loop

    static final class Worker extends Thread {
        final String wl;
        final RateLimiter lim;
        final CountDownLatch ready, gate;
        long ops, bad, acc;

        Worker(String wl, RateLimiter lim, CountDownLatch ready, CountDownLatch gate) {
            this.wl = wl; this.lim = lim; this.ready = ready; this.gate = gate;
        }

        @Override public void run() {
            ready.countDown();
            try { gate.await(); } catch (InterruptedException e) { throw new RuntimeException(e); }
            switch (wl) {
                case "W0": clockLoop(this); break;
                case "W1": case "W2": tryLoop(this, lim); break;
                default: acquireLoop(this, lim); break;
            }
        }
    }

    // One loop per op so each gets its own JIT compilation; results go to locals, then the worker.
    static void clockLoop(Worker w) {
        long ops = 0, acc = 0;
        while (!stop) {
            for (int i = 0; i < BATCH; i++) acc += System.nanoTime();
            ops += BATCH;
        }
        w.ops = ops; w.acc = acc;
    }

    static void tryLoop(Worker w, RateLimiter lim) {
        long ops = 0, bad = 0;
        while (!stop) {
            for (int i = 0; i < BATCH; i++) if (!lim.tryAcquire()) bad++;
            ops += BATCH;
        }
        w.ops = ops; w.bad = bad;
    }

    static void acquireLoop(Worker w, RateLimiter lim) {
        long ops = 0, bad = 0;
        while (!stop) {
            for (int i = 0; i < BATCH; i++) if (lim.acquire() > 0.0) bad++; // seconds it waited
            ops += BATCH;
        }
        w.ops = ops; w.bad = bad;
    }

    static double throughputRep(String wl, int n, long durMs) throws Exception {
        RateLimiter lim = RateLimiter.create(1e12);
        stop = false;
        CountDownLatch ready = new CountDownLatch(n), gate = new CountDownLatch(1);
        Worker[] ws = new Worker[n];
        for (int i = 0; i < n; i++) (ws[i] = new Worker(wl, lim, ready, gate)).start();
        ready.await();
        long t0 = System.nanoTime();
        gate.countDown();
        Thread.sleep(durMs);
        stop = true;
        for (Worker w : ws) w.join();
        long wall = System.nanoTime() - t0;
        long ops = 0, bad = 0, acc = 0;
        for (Worker w : ws) { ops += w.ops; bad += w.bad; acc += w.acc; }
        sink += acc;
        if (bad != 0) die(fmt("%s: %d of %d ops failed or waited on a limiter that should always grant", wl, bad, ops));
        return (double) wall / ops;
    }

    /**
     * 1-vs-2-thread compute probe, run before and after the W2 repetitions: if another process
     * holds a core, W2 degenerates into W1.
     */
    static void coreProbe(String when, long durMs) throws Exception {
        spin(1, durMs); // lets the JIT compile the spin loop first
        double one = spin(1, durMs), two = spin(2, durMs);
        warn(fmt("W2 core probe %s: 2 threads do %.2fx the work of 1", when, two / one));
        if (two / one < 1.6) warn("WARNING: the two threads do not get two cores; W2 measures nothing useful");
    }

    static double spin(int n, long durMs) throws Exception {
        stop = false;
        AtomicLong total = new AtomicLong();
        Thread[] ts = new Thread[n];
        long t0 = System.nanoTime();
        for (int i = 0; i < n; i++) {
            final long seed = i + 1;
            ts[i] = new Thread(() -> {
                long x = seed, it = 0;
                while (!stop) {
                    for (int j = 0; j < 10000; j++) x = x * 6364136223846793005L + 1442695040888963407L;
                    it++;
                }
                sink += x;
                total.addAndGet(it);
            });
            ts[i].start();
        }
        Thread.sleep(durMs);
        stop = true;
        for (Thread t : ts) t.join();
        return total.get() / ((System.nanoTime() - t0) / 1e9);
    }

    static void throughput(String wl) throws Exception {
        int n = wl.equals("W2") ? 2 : 1;
        long durMs = quick ? 20 : 200;
        int warm = quick ? 0 : 2;
        if (wl.equals("W2")) coreProbe("before", durMs / 2);
        for (int i = 0; i < warm; i++) throughputRep(wl, n, durMs);
        for (int rep = 0, nr = pick(7, 1); rep < nr; rep++)
            emit(rep, fmt("ns_per_op=%.2f", throughputRep(wl, n, durMs)));
        if (wl.equals("W2")) coreProbe("after", durMs / 2);
    }

    // ------------------------------------------------------------ W4: paced accuracy

    /**
     * Writes $BENCH_TRACE_DIR/<workload>-java_guava.dat, the per-grant trace scripts/bench plots
     * (W4: "grant lateness_us" of the last repetition; W5: "seconds_since_gate grants", sampled);
     * nothing when BENCH_TRACE_DIR is unset.
     */
    static void trace(int lines, java.util.function.IntFunction<String> line) throws IOException {
        String dir = System.getenv("BENCH_TRACE_DIR");
        if (dir == null || dir.isEmpty()) return;
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < lines; i++) {
            String l = line.apply(i);
            if (l != null) sb.append(l).append('\n');
        }
        Files.writeString(Paths.get(dir, workload + "-" + IMPL + ".dat"), sb.toString());
    }

    /** Nearest-rank percentile of a sorted array. */
    static double percentile(double[] sorted, double p) {
        return sorted[Math.max(0, (int) Math.ceil(p * sorted.length) - 1)];
    }

    /** n sequential acquire()s on a fresh 1000/s burst-1 limiter; fills late[] in µs, returns total s. */
    static double pacedRep(int n, double[] late) throws Exception {
        RateLimiter lim = burstOne(1000.0);
        long el = 0;
        long t0 = System.nanoTime();
        for (int i = 0; i < n; i++) {
            lim.acquire();
            el = System.nanoTime() - t0;
            late[i] = (el - i * 1_000_000L) / 1e3;
        }
        return el / 1e9;
    }

    static void paced() throws Exception {
        int n = quick ? 200 : 2000;
        pacedRep(100, new double[100]); // warm-up
        for (int rep = 0, nr = pick(5, 1); rep < nr; rep++) {
            double[] late = new double[n];
            double total = pacedRep(n, late);
            if (rep == nr - 1) trace(late.length, i -> fmt("%d %.1f", i, late[i]));
            Arrays.sort(late);
            emit(rep, fmt("total_s=%.4f late_p50_us=%.1f late_p99_us=%.1f late_max_us=%.1f",
                    total, percentile(late, 0.50), percentile(late, 0.99), late[n - 1]));
        }
    }

    // ------------------------------------------------------------ W5: many waiters

    static long vmHWMkB() throws IOException {
        for (String line : Files.readAllLines(Paths.get("/proc/self/status")))
            if (line.startsWith("VmHWM:")) return Long.parseLong(line.substring(6).trim().split("\\s+")[0]);
        throw new IOException("no VmHWM in /proc/self/status");
    }

    /** One repetition in this JVM: min(1000, n) threads park on a gate, then share n acquires. */
    static void manyWaitersChild(int n, double rate) throws Exception {
        RateLimiter lim = burstOne(rate);
        double wall = 0;
        boolean tracing = System.getenv("BENCH_TRACE_DIR") != null;
        long[] times = tracing && n > 0 ? new long[n] : null; // grant times, ns after t0
        long[] start = new long[1];
        java.util.concurrent.atomic.AtomicInteger next = new java.util.concurrent.atomic.AtomicInteger();
        if (n > 0) {
            int threads = Math.min(1000, n);
            CountDownLatch ready = new CountDownLatch(threads), gate = new CountDownLatch(1);
            Thread[] ts = new Thread[threads];
            for (int i = 0; i < threads; i++) {
                final int mine = n / threads + (i < n % threads ? 1 : 0);
                ts[i] = new Thread(() -> {
                    ready.countDown();
                    try { gate.await(); } catch (InterruptedException e) { throw new RuntimeException(e); }
                    for (int k = 0; k < mine; k++) {
                        lim.acquire();
                        if (times != null) times[next.getAndIncrement()] = System.nanoTime() - start[0];
                    }
                });
                ts[i].start();
            }
            ready.await();
            long t0 = System.nanoTime();
            start[0] = t0;
            gate.countDown();
            for (Thread t : ts) t.join();
            wall = (System.nanoTime() - t0) / 1e9;
            if (times != null) {
                Arrays.sort(times);
                int every = Math.max(1, n / 1000);
                trace(n, i -> i % every == 0 || i == n - 1 ? fmt("%.6f %d", times[i] / 1e9, i + 1) : null);
            }
        }
        System.out.println(fmt("wall_s=%.6f peak_rss_kb=%d threads=%d", wall, vmHWMkB(), Math.min(1000, n)));
    }

    /** Re-runs this program (same java, JVM flags and class path) as a W5 child; returns its line. */
    static String runChild(int n, double rate) throws Exception {
        List<String> cmd = new ArrayList<>();
        cmd.add(ProcessHandle.current().info().command()
                .orElse(Paths.get(System.getProperty("java.home"), "bin", "java").toString()));
        cmd.addAll(ManagementFactory.getRuntimeMXBean().getInputArguments());
        cmd.addAll(List.of("-cp", System.getProperty("java.class.path"), PeerGuava.class.getName(),
                "--workload", "W5", "--child", "--waiters", Integer.toString(n), "--rate", Double.toString(rate)));
        Process p = new ProcessBuilder(cmd).redirectError(ProcessBuilder.Redirect.INHERIT).start();
        String out;
        try (BufferedReader r = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8))) {
            out = r.readLine();
        }
        if (p.waitFor() != 0 || out == null) die("W5 child (" + n + " acquires) failed");
        return out;
    }

    static Map<String, Double> parseKv(String line) {
        Map<String, Double> m = new HashMap<>();
        for (String kv : line.trim().split("\\s+")) {
            String[] p = kv.split("=", 2);
            m.put(p[0], Double.parseDouble(p[1]));
        }
        return m;
    }

    static void manyWaiters() throws Exception {
        int n = waiters >= 0 ? waiters : quick ? 10000 : 100000;
        double rate = n > 0 ? n : quick ? 10000 : 100000;
        if (child) { manyWaitersChild(n, childRate > 0 ? childRate : rate); return; }
        double base = parseKv(runChild(0, rate)).get("peak_rss_kb");
        warn(fmt("W5: baseline peak RSS %.0f kB (0 waiters, rate %.0f/s)", base, rate));
        for (int rep = 0, nr = pick(3, 1); rep < nr; rep++) {
            Map<String, Double> r = parseKv(runChild(n, rate));
            double wall = r.get("wall_s"), rss = r.get("peak_rss_kb"), threads = r.get("threads");
            if (n == 0) { emit(rep, fmt("peak_rss_kb=%.0f", rss)); continue; }
            warn(fmt("W5 rep %d: peak RSS %.0f kB, %.0f threads", rep, rss, threads));
            double ideal = (n - 1) / rate;
            if (wall < ideal) warn(fmt("W5 rep %d: wall %.4f s below the ideal %.4f s: the limiter over-granted", rep, wall, ideal));
            emit(rep, fmt("wall_s=%.4f bytes_per_waiter=%.0f", wall, (rss - base) * 1024 / threads));
        }
    }

    // ------------------------------------------------------------ W6: idle limiter

    /** tid -> {on-CPU ns (schedstat), voluntary + nonvoluntary context switches}. */
    static Map<String, long[]> snapshot() throws IOException {
        Map<String, long[]> m = new HashMap<>();
        List<Path> tasks;
        try (Stream<Path> s = Files.list(Paths.get("/proc/self/task"))) { tasks = s.toList(); }
        for (Path t : tasks) {
            try {
                long cpu = Long.parseLong(Files.readString(t.resolve("schedstat")).trim().split("\\s+")[0]);
                long sw = 0;
                for (String line : Files.readAllLines(t.resolve("status")))
                    if (line.contains("ctxt_switches:")) sw += Long.parseLong(line.split(":")[1].trim());
                m.put(t.getFileName().toString(), new long[] {cpu, sw});
            } catch (IOException e) {
                // thread exited meanwhile
            }
        }
        return m;
    }

    /** Sleeps for ms and returns {CPU ms, context switches} of all threads meanwhile. */
    static double[] window(long ms) throws Exception {
        Map<String, long[]> a = snapshot();
        Thread.sleep(ms);
        Map<String, long[]> b = snapshot();
        long cpu = 0, sw = 0;
        for (Map.Entry<String, long[]> e : b.entrySet()) {
            long[] s = a.getOrDefault(e.getKey(), new long[2]); // zero for threads born meanwhile
            cpu += e.getValue()[0] - s[0];
            sw += e.getValue()[1] - s[1];
        }
        for (String tid : a.keySet())
            if (!b.containsKey(tid)) warn("W6: thread " + tid + " exited during the window; its share is lost");
        return new double[] {cpu / 1e6, sw};
    }

    static void idle(double rate) throws Exception {
        long win = quick ? 300 : 3000;
        for (int rep = 0, nr = pick(3, 1); rep < nr; rep++) {
            double[] base = window(win);
            RateLimiter lim = burstOne(rate);
            double[] with = window(win);
            java.lang.ref.Reference.reachabilityFence(lim);
            emit(rep, fmt("cpu_ms=%.3f ctx_switches=%.0f base_cpu_ms=%.3f base_ctx_switches=%.0f",
                    with[0], with[1], base[0], base[1]));
        }
    }

    // ---- the command line, in the format of examples/cli.hpp (the programs' command-line
    // test reads --help): every value in its range, or one line naming it and status 2.

    static final String[] WORKLOADS = {"W0", "W1", "W2", "W3", "W4", "W5", "W6", "W6b"};

    static void refuse(String msg) {
        System.err.println("peer_guava: " + msg);
        System.exit(2);
    }

    /** v in single quotes, its control characters escaped (one line). */
    static String quoted(String v) {
        StringBuilder b = new StringBuilder("'");
        for (char c : v.toCharArray()) {
            if (c == '\n') b.append("\\n");
            else if (c == '\t') b.append("\\t");
            else if (c < 0x20 || c == 0x7f) b.append(String.format("\\x%02x", (int) c));
            else b.append(c);
        }
        return b.append("'").toString();
    }

    static long integer(String name, String v, long lo, long hi) {
        String allowed = "range: " + lo + ".." + hi;
        if (!v.matches("-?[0-9]+")) refuse("--" + name + ": " + quoted(v) + " is not an integer (" + allowed + ")");
        long n;
        try {
            n = Long.parseLong(v);
        } catch (NumberFormatException e) {
            n = v.startsWith("-") ? Long.MIN_VALUE : Long.MAX_VALUE;
        }
        if (n < lo || n > hi) refuse("--" + name + ": " + quoted(v) + " is out of range (" + allowed + ")");
        return n;
    }

    static void parseArgs(String[] args) {
        String usage = "usage: peer_guava [OPTION]...\n"
                + "The Java peer (Guava's RateLimiter): one benchmark workload (scripts/bench runs them all).\n\n"
                + "options:\n"
                + "  --workload WORD       the workload  [one of: " + String.join(", ", WORKLOADS) + "; required]\n"
                + "  --quick               a short run (a smoke test)\n"
                + "  --reps N              measured repetitions  [range: 1..10000; default: the workload's]\n"
                + "  --waiters N           W5: the number of waiters (and grants per second); 0: the baseline child"
                + "  [range: 0..1000000; default: the workload's]\n"
                + "  --child               W5: one repetition in this process (the parent re-executes itself)\n"
                + "  --rate X              W5 child: grants per second  [range: 1..1000000000; default: the waiters]\n"
                + "  --help                show this help\n";
        java.util.Set<String> seen = new java.util.HashSet<>();
        java.util.Set<String> withValue = java.util.Set.of("workload", "reps", "waiters", "rate");
        java.util.Set<String> flags = java.util.Set.of("quick", "child");
        boolean help = false;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--help") || a.equals("-h")) { help = true; continue; }
            if (!a.startsWith("--")) {
                refuse(a.startsWith("-") ? "unknown option " + quoted(a) + " (see --help)"
                                         : "unexpected argument " + quoted(a) + " (see --help)");
            }
            String name = a.substring(2), value = null;
            int eq = name.indexOf('=');
            if (eq >= 0) { value = name.substring(eq + 1); name = name.substring(0, eq); }
            if (!withValue.contains(name) && !flags.contains(name)) refuse("unknown option " + quoted("--" + name) + " (see --help)");
            if (flags.contains(name) && value != null) refuse("--" + name + " takes no value (got " + quoted(value) + ")");
            if (withValue.contains(name) && value == null) {
                if (i + 1 >= args.length) refuse("--" + name + " needs a value (see --help)");
                value = args[++i];
            }
            if (!seen.add(name)) refuse("--" + name + " given twice");
            switch (name) {
                case "workload":
                    if (!java.util.Arrays.asList(WORKLOADS).contains(value))
                        refuse("--workload: " + quoted(value) + " is not allowed (one of: " + String.join(", ", WORKLOADS) + ")");
                    workload = value;
                    break;
                case "quick": quick = true; break;
                case "child": child = true; break;
                case "reps": reps = (int) integer(name, value, 1, 10000); break;
                case "waiters": waiters = (int) integer(name, value, 0, 1000000); break;
                case "rate": {
                    String allowed = "range: 1..1000000000";
                    if (!value.matches("-?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][-+]?[0-9]+)?"))
                        refuse("--rate: " + quoted(value) + " is not a finite number (" + allowed + ")");
                    double x = Double.parseDouble(value);
                    if (!(x >= 1 && x <= 1e9)) refuse("--rate: " + quoted(value) + " is out of range (" + allowed + ")");
                    childRate = x;
                    break;
                }
                default: break;
            }
        }
        if (help) { System.out.print(usage); System.exit(0); }
        if (workload.isEmpty()) refuse("--workload is required (see --help)");
    }

    public static void main(String[] args) throws Exception {
        parseArgs(args);
        switch (workload) {
            case "W0": case "W1": case "W2": case "W3": throughput(workload); break;
            case "W4": paced(); break;
            case "W5": manyWaiters(); break;
            case "W6": idle(1.0); break;
            case "W6b": idle(1000.0); break;
            default:
                System.err.println("usage: peer_guava --workload W0|W1|W2|W3|W4|W5|W6|W6b [--quick] [--reps N] [--waiters N]");
                System.exit(2);
        }
        System.out.flush();
        if (sink == 42) System.err.println(); // keep sink observable
    }
}
