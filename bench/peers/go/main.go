// peer_go: the golang.org/x/time/rate peer of the asio-ratelimit benchmarks.
//
// Workloads (as defined in the project's BENCHMARKS.md; one stdout line per measured repetition,
// `impl=go_xtime_rate workload=W rep=i metric=value ...`, diagnostics on stderr):
//
//	W0   time.Now(), the clock x/time/rate reads per op.                          ns_per_op
//	W1   Allow() from one goroutine on NewLimiter(1e12, 1<<30); every try must succeed.  ns_per_op
//	W2   the same from two goroutines on one limiter (after a 1-vs-2-thread core probe).  ns_per_op
//	W3   Wait(context.Background()) that never has to wait, same huge limiter.     ns_per_op
//	W4   rate 1000/s burst 1, one caller, 2000 sequential Wait()s; lateness of grant i against
//	     t0 + i ms.                              total_s late_p50_us late_p99_us late_max_us
//	W5   rate N/s burst 1, N goroutines (default 100000) parked on a gate, then one Wait() each;
//	     clock starts when the gate opens. Each repetition is a child process (this binary run
//	     with --child); one more child with --waiters 0 gives the baseline peak RSS (VmHWM).
//	                                                            wall_s bytes_per_waiter
//	W6   idle limiter at 1/s (W6b: 1000/s): a window without it, then a window with it; CPU
//	     time (schedstat) and context switches summed over /proc/self/task/*.
//	                                            cpu_ms ctx_switches base_cpu_ms base_ctx_switches
//
// W0-W3 are a throughput loop: worker goroutines, each locked to its own OS thread, start together
// from a gate, run the op in batches of 1000 and check a stop flag between batches; the main
// goroutine stops them after 200 ms. ns_per_op = wall time / total ops. 2 discarded warm-up reps,
// then 7. --quick: 20 ms, no warm-up, 1 rep (W4: 200 grants, 1 rep; W5: 10000 waiters at
// 10000/s; W6: 0.3 s windows). --reps N overrides the number of measured repetitions.
// --waiters N (W5) sets the waiter count and the rate to N/s so the ideal wall time stays 1 s;
// --waiters 0 prints the baseline `peak_rss_kb=` per repetition instead.
//
// Usage: peer_go --workload W0|W1|W2|W3|W4|W5|W6|W6b [--quick] [--reps N] [--waiters N] (--help)
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

const (
	impl  = "go_xtime_rate"
	batch = 1000
)

var (
	workload = new(string)
	quick    = new(bool)
	reps     = func() *int { v := -1; return &v }()
	waiters  = func() *int { v := -1; return &v }()
	child    = new(bool)
	rateFlag = new(float64)

	sink uint64 // results of the measured ops end here so nothing is optimised away
)

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "peer_go: error: "+format+"\n", a...)
	os.Exit(1)
}

func warn(format string, a ...any) { fmt.Fprintf(os.Stderr, "peer_go: "+format+"\n", a...) }

func emit(rep int, metrics string) {
	fmt.Printf("impl=%s workload=%s rep=%d %s\n", impl, *workload, rep, metrics)
}

// pick returns the repetition count: --reps if given, else the full or quick default.
func pick(full, q int) int {
	if *reps >= 0 {
		return *reps
	}
	if *quick {
		return q
	}
	return full
}

func hugeLimiter() *rate.Limiter { return rate.NewLimiter(1e12, 1<<30) }

// ---------------------------------------------------------------- W0-W3: throughput loop

type workerResult struct{ ops, bad uint64 }

// worker runs the op of workload wl in batches until stop is set. W1-W3 count the ops that
// failed (Allow() false, Wait() error).
func worker(wl string, lim *rate.Limiter, stop *atomic.Bool) (r workerResult) {
	ctx := context.Background()
	var acc uint64
	for !stop.Load() {
		switch wl {
		case "W0":
			for i := 0; i < batch; i++ {
				acc += uint64(time.Now().UnixNano())
			}
		case "W1", "W2":
			for i := 0; i < batch; i++ {
				if !lim.Allow() {
					r.bad++
				}
			}
		case "W3":
			for i := 0; i < batch; i++ {
				if lim.Wait(ctx) != nil {
					r.bad++
				}
			}
		}
		r.ops += batch
	}
	atomic.AddUint64(&sink, acc)
	return r
}

// throughputRep runs one repetition with n workers for dur and returns ns per op.
func throughputRep(wl string, n int, dur time.Duration) float64 {
	lim := hugeLimiter()
	var stop atomic.Bool
	gate := make(chan struct{})
	var ready, done sync.WaitGroup
	res := make([]workerResult, n)
	ready.Add(n)
	done.Add(n)
	for w := 0; w < n; w++ {
		go func(w int) {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			ready.Done()
			<-gate
			res[w] = worker(wl, lim, &stop)
			done.Done()
		}(w)
	}
	ready.Wait()
	mallocs0 := mallocs()
	t0 := time.Now()
	close(gate)
	time.Sleep(dur)
	stop.Store(true)
	done.Wait()
	wall := time.Since(t0)
	allocs := mallocs() - mallocs0

	var tot workerResult
	for _, r := range res {
		tot.ops += r.ops
		tot.bad += r.bad
	}
	if tot.bad != 0 {
		die("%s: %d of %d ops failed on a limiter that should always grant", wl, tot.bad, tot.ops)
	}
	// A Wait() that has to wait returns nil after its timer, so it is caught by its allocations:
	// it calls time.NewTimer (a Timer and its channel on the heap). The no-wait path of Wait()
	// and Allow() allocate nothing; the runtime allocates a few objects per repetition (an M for
	// a locked thread, sudogs, the sleep timer), hence the small allowance.
	if allocs > 32 {
		die("%s: %d heap allocations during the run: Wait() created timers, i.e. waited", wl, allocs)
	}
	return float64(wall.Nanoseconds()) / float64(tot.ops)
}

// mallocs is the number of heap allocations so far (exact: ReadMemStats stops the world).
func mallocs() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.Mallocs
}

// coreProbe checks that two threads really run in parallel: a pure compute loop on 1 vs 2
// locked threads, run before and after the W2 repetitions. If another process holds a core, W2
// degenerates into W1.
func coreProbe(when string, dur time.Duration) {
	spin := func(n int) float64 {
		var stop atomic.Bool
		var total atomic.Uint64
		var wg sync.WaitGroup
		wg.Add(n)
		t0 := time.Now()
		for i := 0; i < n; i++ {
			go func(seed uint64) {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				x, it := seed, uint64(0)
				for !stop.Load() {
					for j := 0; j < 10000; j++ {
						x = x*6364136223846793005 + 1442695040888963407
					}
					it++
				}
				atomic.AddUint64(&sink, x)
				total.Add(it)
				wg.Done()
			}(uint64(i + 1))
		}
		time.Sleep(dur)
		stop.Store(true)
		wg.Wait()
		return float64(total.Load()) / time.Since(t0).Seconds()
	}
	one, two := spin(1), spin(2)
	ratio := two / one
	warn("W2 core probe %s: 2 threads do %.2fx the work of 1", when, ratio)
	if ratio < 1.6 {
		warn("WARNING: the two threads do not get two cores; W2 measures nothing useful")
	}
}

func throughput(wl string) {
	n := 1
	if wl == "W2" {
		n = 2
		if runtime.GOMAXPROCS(0) < 2 {
			runtime.GOMAXPROCS(2)
		}
	}
	dur, warm := 200*time.Millisecond, 2
	if *quick {
		dur, warm = 20*time.Millisecond, 0
	}
	if wl == "W2" {
		coreProbe("before", dur/2)
		defer coreProbe("after", dur/2)
	}
	for i := 0; i < warm; i++ {
		throughputRep(wl, n, dur)
	}
	for rep, nr := 0, pick(7, 1); rep < nr; rep++ {
		emit(rep, fmt.Sprintf("ns_per_op=%.2f", throughputRep(wl, n, dur)))
	}
}

// ---------------------------------------------------------------- W4: paced accuracy

// traceFile opens $BENCH_TRACE_DIR/<workload>-go_xtime_rate.dat, the per-grant trace scripts/bench
// plots (W4: "grant lateness_us" of the last repetition; W5: "seconds_since_gate grants", sampled),
// or returns nil when BENCH_TRACE_DIR is unset.
func traceFile() *os.File {
	dir := os.Getenv("BENCH_TRACE_DIR")
	if dir == "" {
		return nil
	}
	f, err := os.Create(filepath.Join(dir, *workload+"-"+impl+".dat"))
	if err != nil {
		warn("trace: %v", err)
		return nil
	}
	return f
}

// percentile by nearest rank on a sorted slice.
func percentile(sorted []float64, p float64) float64 {
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	if i < 0 {
		i = 0
	}
	return sorted[i]
}

// pacedRep: n sequential Wait()s on a fresh 1000/s burst-1 limiter; returns total seconds and the
// lateness of each grant in microseconds (completion - (t0 + i ms)).
func pacedRep(n int) (float64, []float64) {
	lim := rate.NewLimiter(1000, 1)
	ctx := context.Background()
	late := make([]float64, n)
	var el time.Duration
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if err := lim.Wait(ctx); err != nil {
			die("W4: Wait: %v", err)
		}
		el = time.Since(t0)
		late[i] = float64(el-time.Duration(i)*time.Millisecond) / 1e3
	}
	return el.Seconds(), late
}

func paced() {
	n := 2000
	if *quick {
		n = 200
	}
	pacedRep(100) // warm-up
	for rep, nr := 0, pick(5, 1); rep < nr; rep++ {
		total, late := pacedRep(n)
		if f := traceFile(); f != nil && rep == nr-1 {
			for i, l := range late {
				fmt.Fprintf(f, "%d %.1f\n", i, l)
			}
			f.Close()
		}
		sort.Float64s(late)
		emit(rep, fmt.Sprintf("total_s=%.4f late_p50_us=%.1f late_p99_us=%.1f late_max_us=%.1f",
			total, percentile(late, 0.50), percentile(late, 0.99), late[len(late)-1]))
	}
}

// ---------------------------------------------------------------- W5: many waiters

func vmHWMkB() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		die("open /proc/self/status: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fs := strings.Fields(sc.Text()); len(fs) >= 2 && fs[0] == "VmHWM:" {
			v, _ := strconv.ParseInt(fs[1], 10, 64)
			return v
		}
	}
	die("no VmHWM in /proc/self/status")
	return 0
}

// manyWaitersChild is one repetition in its own process: n goroutines park on a gate, then each
// calls Wait() once. Prints `wall_s=... peak_rss_kb=...` for the parent.
func manyWaitersChild(n int, r float64) {
	lim := rate.NewLimiter(rate.Limit(r), 1)
	wall := 0.0
	if n > 0 {
		ctx := context.Background()
		gate := make(chan struct{})
		var ready, done sync.WaitGroup
		var fails atomic.Int64
		var t0 time.Time
		var times []int64 // grant times (ns after t0) for the trace, only when tracing
		var next atomic.Int64
		if os.Getenv("BENCH_TRACE_DIR") != "" {
			times = make([]int64, n)
		}
		ready.Add(n)
		done.Add(n)
		for i := 0; i < n; i++ {
			go func() {
				ready.Done()
				<-gate
				if err := lim.Wait(ctx); err != nil {
					fails.Add(1)
				}
				if times != nil {
					times[next.Add(1)-1] = int64(time.Since(t0))
				}
				done.Done()
			}()
		}
		ready.Wait()
		t0 = time.Now()
		close(gate)
		done.Wait()
		wall = time.Since(t0).Seconds()
		if fails.Load() != 0 {
			die("W5: %d Wait() calls failed", fails.Load())
		}
		if f := traceFile(); f != nil {
			sort.Slice(times, func(a, b int) bool { return times[a] < times[b] })
			every := n / 1000
			if every < 1 {
				every = 1
			}
			for i, t := range times {
				if i%every == 0 || i == n-1 {
					fmt.Fprintf(f, "%.6f %d\n", float64(t)/1e9, i+1)
				}
			}
			f.Close()
		}
	}
	runtime.KeepAlive(lim)
	fmt.Printf("wall_s=%.6f peak_rss_kb=%d\n", wall, vmHWMkB())
}

func manyWaiters() {
	n := 100000
	if *quick {
		n = 10000
	}
	if *waiters >= 0 {
		n = *waiters
	}
	r := float64(n)
	if n == 0 { // baseline only: keep the default rate
		r = 100000
		if *quick {
			r = 10000
		}
	}
	if *child {
		manyWaitersChild(n, r)
		return
	}
	exe, err := os.Executable()
	if err != nil {
		die("os.Executable: %v", err)
	}
	run := func(w int) (wall float64, rssKB int64) {
		cmd := exec.Command(exe, "--workload", "W5", "--child", "--waiters", strconv.Itoa(w),
			"--rate", strconv.FormatFloat(r, 'g', -1, 64))
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			die("W5 child (%d waiters): %v", w, err)
		}
		if _, err := fmt.Sscanf(strings.TrimSpace(string(out)), "wall_s=%g peak_rss_kb=%d", &wall, &rssKB); err != nil {
			die("W5 child output %q: %v", out, err)
		}
		return
	}
	_, base := run(0)
	warn("W5: baseline peak RSS %d kB (0 waiters, rate %g/s)", base, r)
	for rep, nr := 0, pick(3, 1); rep < nr; rep++ {
		wall, rss := run(n)
		if n == 0 {
			emit(rep, fmt.Sprintf("peak_rss_kb=%d", rss))
			continue
		}
		warn("W5 rep %d: peak RSS %d kB", rep, rss)
		if ideal := float64(n-1) / r; wall < ideal {
			warn("W5 rep %d: wall %.4f s below the ideal %.4f s: the limiter over-granted", rep, wall, ideal)
		}
		emit(rep, fmt.Sprintf("wall_s=%.4f bytes_per_waiter=%.0f", wall, float64(rss-base)*1024/float64(n)))
	}
}

// ---------------------------------------------------------------- W6: idle limiter

type taskStat struct{ cpuNs, ctxSw int64 }

// snapshot reads on-CPU time (schedstat) and context switches of every thread of this process.
func snapshot() map[string]taskStat {
	dirs, err := os.ReadDir("/proc/self/task")
	if err != nil {
		die("read /proc/self/task: %v", err)
	}
	m := make(map[string]taskStat, len(dirs))
	for _, d := range dirs {
		base := filepath.Join("/proc/self/task", d.Name())
		ss, err1 := os.ReadFile(base + "/schedstat")
		st, err2 := os.ReadFile(base + "/status")
		if err1 != nil || err2 != nil {
			continue // thread exited meanwhile
		}
		var s taskStat
		if fs := strings.Fields(string(ss)); len(fs) > 0 {
			s.cpuNs, _ = strconv.ParseInt(fs[0], 10, 64)
		}
		for _, line := range strings.Split(string(st), "\n") {
			if fs := strings.Fields(line); len(fs) == 2 && strings.HasSuffix(fs[0], "ctxt_switches:") {
				v, _ := strconv.ParseInt(fs[1], 10, 64)
				s.ctxSw += v
			}
		}
		m[d.Name()] = s
	}
	return m
}

// window sleeps for d and returns CPU ms and context switches of all threads meanwhile.
func window(d time.Duration) (float64, int64) {
	a := snapshot()
	time.Sleep(d)
	b := snapshot()
	var cpu, sw int64
	for tid, e := range b {
		s := a[tid] // zero for threads born during the window
		cpu += e.cpuNs - s.cpuNs
		sw += e.ctxSw - s.ctxSw
	}
	for tid := range a {
		if _, ok := b[tid]; !ok {
			warn("W6: thread %s exited during the window; its share is lost", tid)
		}
	}
	return float64(cpu) / 1e6, sw
}

func idle(r float64) {
	win := 3 * time.Second
	if *quick {
		win = 300 * time.Millisecond
	}
	for rep, nr := 0, pick(3, 1); rep < nr; rep++ {
		baseCPU, baseSw := window(win)
		lim := rate.NewLimiter(rate.Limit(r), 1)
		cpu, sw := window(win)
		runtime.KeepAlive(lim)
		emit(rep, fmt.Sprintf("cpu_ms=%.3f ctx_switches=%d base_cpu_ms=%.3f base_ctx_switches=%d",
			cpu, sw, baseCPU, baseSw))
	}
}

// option is one command-line option, in the format of examples/cli.hpp (the
// programs' command-line test reads its --help).
type option struct {
	name, metavar, help, allowed, def string
	required, seen                    bool
	set                               func(v string) error
}

// quoted is v in single quotes, its control characters escaped (one line).
func quoted(v string) string {
	var b strings.Builder
	b.WriteByte('\'')
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c == '\n':
			b.WriteString("\\n")
		case c == '\t':
			b.WriteString("\\t")
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, "\\x%02x", c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('\'')
	return b.String()
}

func intOption(name, help, def string, target *int, lo, hi int) *option {
	allowed := fmt.Sprintf("range: %d..%d", lo, hi)
	return &option{name: name, metavar: "N", help: help, allowed: allowed, def: def, set: func(v string) error {
		if v == "" || strings.ContainsAny(v[:1], "+ ") {
			return fmt.Errorf("%s is not an integer (%s)", quoted(v), allowed)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil && errors.Is(err, strconv.ErrRange) {
			return fmt.Errorf("%s is out of range (%s)", quoted(v), allowed)
		}
		if err != nil {
			return fmt.Errorf("%s is not an integer (%s)", quoted(v), allowed)
		}
		if n < int64(lo) || n > int64(hi) {
			return fmt.Errorf("%s is out of range (%s)", quoted(v), allowed)
		}
		*target = int(n)
		return nil
	}}
}

func parseArgs(args []string) {
	workloads := []string{"W0", "W1", "W2", "W3", "W4", "W5", "W6", "W6b"}
	opts := []*option{
		{name: "workload", metavar: "WORD", help: "the workload", allowed: "one of: " + strings.Join(workloads, ", "),
			def: "", required: true, set: func(v string) error {
				for _, w := range workloads {
					if v == w {
						*workload = v
						return nil
					}
				}
				return fmt.Errorf("%s is not allowed (one of: %s)", quoted(v), strings.Join(workloads, ", "))
			}},
		{name: "quick", help: "a short run (a smoke test)", set: func(string) error { *quick = true; return nil }},
		intOption("reps", "measured repetitions", "the workload's", reps, 1, 10000),
		intOption("waiters", "W5: the number of waiters (and grants per second); 0: the baseline child",
			"the workload's", waiters, 0, 1000000),
		{name: "child", help: "W5: one repetition in this process (the parent re-executes itself)",
			set: func(string) error { *child = true; return nil }},
		{name: "rate", metavar: "X", help: "W5 child: grants per second", allowed: "range: 1..1000000000",
			def: "the waiters", set: func(v string) error {
				x, err := strconv.ParseFloat(v, 64)
				if v == "" || strings.ContainsAny(v[:1], "+ ") || strings.ContainsAny(v, "xXpP_") ||
					(err != nil && !errors.Is(err, strconv.ErrRange)) || math.IsNaN(x) {
					return fmt.Errorf("%s is not a finite number (range: 1..1000000000)", quoted(v))
				}
				if err != nil || x < 1 || x > 1e9 {
					return fmt.Errorf("%s is out of range (range: 1..1000000000)", quoted(v))
				}
				*rateFlag = x
				return nil
			}},
	}
	usage := func() string {
		var b strings.Builder
		b.WriteString("usage: peer_go [OPTION]...\nThe Go peer (golang.org/x/time/rate): one benchmark workload (scripts/bench runs them all).\n\noptions:\n")
		for _, o := range opts {
			head := "  --" + o.name
			if o.metavar != "" {
				head += " " + o.metavar
			}
			pad := 24 - len(head)
			if pad < 2 {
				pad = 2
			}
			b.WriteString(head + strings.Repeat(" ", pad) + o.help)
			if o.metavar != "" {
				b.WriteString("  [" + o.allowed)
				if o.required {
					b.WriteString("; required")
				} else if o.def != "" {
					b.WriteString("; default: " + o.def)
				}
				b.WriteString("]")
			}
			b.WriteString("\n")
		}
		b.WriteString("  --help                show this help\n")
		return b.String()
	}
	refuse := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "peer_go: "+format+"\n", a...)
		os.Exit(2)
	}
	help := false
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--help" || a == "-h" {
			help = true
			continue
		}
		if !strings.HasPrefix(a, "--") {
			if strings.HasPrefix(a, "-") {
				refuse("unknown option %s (see --help)", quoted(a))
			}
			refuse("unexpected argument %s (see --help)", quoted(a))
		}
		name, value, hasValue := strings.Cut(a[2:], "=")
		var o *option
		for _, c := range opts {
			if c.name == name {
				o = c
			}
		}
		if o == nil {
			refuse("unknown option %s (see --help)", quoted("--"+name))
		}
		if o.metavar == "" && hasValue {
			refuse("--%s takes no value (got %s)", name, quoted(value))
		}
		if o.metavar != "" && !hasValue {
			if i+1 >= len(args) {
				refuse("--%s needs a value (%s)", name, o.allowed)
			}
			i++
			value = args[i]
		}
		if o.seen {
			refuse("--%s given twice", name)
		}
		o.seen = true
		if err := o.set(value); err != nil {
			refuse("--%s: %v", name, err)
		}
	}
	if help {
		fmt.Print(usage())
		os.Exit(0)
	}
	if *workload == "" {
		refuse("--workload is required (see --help)")
	}
}

func main() {
	parseArgs(os.Args[1:])
	switch *workload {
	case "W0", "W1", "W2", "W3":
		throughput(*workload)
	case "W4":
		paced()
	case "W5":
		manyWaiters()
	case "W6":
		idle(1)
	case "W6b":
		idle(1000)
	default:
		fmt.Fprintln(os.Stderr, "usage: peer_go --workload W0|W1|W2|W3|W4|W5|W6|W6b [--quick] [--reps N] [--waiters N]")
		os.Exit(2)
	}
	if sink == 42 { // keep sink observable
		fmt.Fprintln(os.Stderr, "")
	}
}
