// Command loadtest measures a broker running on loopback and produces the figures of the
// README's performance table: the broker's memory per idle stream, deliveries per second in
// fan-out with none lost and the server's CPU per delivery, insert-to-delivery latency, and
// durable inserts per second. It creates its own user with the admin token, and checks
// every stream's IDs for gaps and duplicates. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"broker/internal/procstat"
)

// config is the command line.
type config struct {
	url, adminToken, mode          string
	pid                            int
	streams, events, publishers    int
	rate                           float64
	hold, timeout                  time.Duration
	connectTimeout, requestTimeout time.Duration
	stall                          time.Duration
	connectConc, srcIPs, readBuf   int
}

// Bounds of one run, so a mistyped flag cannot start a load without end: the streams a
// broker holds by default (--max_streams), a million inserts, and 20 million deliveries,
// whose latencies (8 bytes each) are kept to compute exact percentiles.
const (
	maxStreams    = 100_000
	maxEvents     = 1_000_000
	maxDeliveries = 20_000_000
	maxPublishers = 1024
)

func parseFlags(args []string) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	fs.StringVar(&c.url, "url", "http://127.0.0.1:8080", "broker base URL (loopback only)")
	fs.StringVar(&c.adminToken, "admin_token", "letmein", "broker's --admin_token, to create the run's user")
	fs.StringVar(&c.mode, "mode", "fanout", "idle, fanout or inserts")
	fs.IntVar(&c.pid, "pid", 0, "broker's process ID, for its memory and CPU (required by idle)")
	fs.IntVar(&c.streams, "streams", 1000, "streams to open (idle, fanout)")
	fs.IntVar(&c.events, "events", 200, "events to insert (fanout, inserts)")
	fs.Float64Var(&c.rate, "rate", 0, "inserts per second; 0: as fast as the publishers get answers")
	fs.IntVar(&c.publishers, "publishers", 4, "concurrent inserts, each on its own connection")
	fs.DurationVar(&c.hold, "hold", 20*time.Second, "idle: how long to hold the streams open")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Minute, "bound of the whole run")
	fs.DurationVar(&c.connectTimeout, "connect_timeout", 30*time.Second, "bound of one stream's connection and answer header")
	fs.DurationVar(&c.requestTimeout, "request_timeout", 30*time.Second, "bound of one insert")
	fs.DurationVar(&c.stall, "stall", 15*time.Second, "fanout: stop waiting for deliveries when none arrived for this long")
	fs.IntVar(&c.connectConc, "connect_conc", 128, "stream handshakes at once")
	fs.IntVar(&c.srcIPs, "src_ips", 8, "spread streams over the source addresses 127.0.0.1 to 127.0.0.N")
	fs.IntVar(&c.readBuf, "read_buf", 4096, "initial read buffer of a stream, bytes")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return c, c.check()
}

// check refuses settings that are meaningless or unbounded, and clears those the mode does
// not use.
func (c *config) check() error {
	switch c.mode {
	case "idle":
		c.events, c.publishers = 0, 0
		if c.pid <= 0 {
			return errors.New("--mode idle measures the broker's memory: give its --pid")
		}
	case "fanout":
	case "inserts":
		c.streams = 0
	default:
		return fmt.Errorf("--mode must be idle, fanout or inserts, not %q", c.mode)
	}
	switch {
	case c.streams < 0 || c.streams > maxStreams:
		return fmt.Errorf("--streams must be 0 to %d", maxStreams)
	case c.mode == "idle" && c.streams == 0, c.mode == "fanout" && c.streams == 0:
		return fmt.Errorf("--mode %s needs --streams", c.mode)
	case c.mode != "idle" && (c.events < 1 || c.events > maxEvents):
		return fmt.Errorf("--events must be 1 to %d", maxEvents)
	case int64(c.streams)*int64(c.events) > maxDeliveries:
		return fmt.Errorf("--streams x --events must be at most %d deliveries", maxDeliveries)
	case c.mode != "idle" && (c.publishers < 1 || c.publishers > maxPublishers):
		return fmt.Errorf("--publishers must be 1 to %d", maxPublishers)
	case c.rate < 0:
		return errors.New("--rate must not be negative")
	case c.hold < 0 || c.timeout <= 0 || c.connectTimeout <= 0 || c.requestTimeout <= 0 || c.stall <= 0:
		return errors.New("--hold must not be negative; --timeout, --connect_timeout, --request_timeout and --stall must be positive")
	case c.connectConc < 1 || c.srcIPs < 0 || c.srcIPs > 254 || c.readBuf < 64:
		return errors.New("--connect_conc must be positive, --src_ips 0 to 254, --read_buf at least 64")
	}
	return nil
}

// filesNeeded is how many open files the run needs: one per stream and publisher, and some
// for the rest of the process.
func (c *config) filesNeeded() uint64 {
	return uint64(c.streams + c.publishers + 64)
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	} else if err != nil {
		fatalf("%v", err)
	}
	limit, err := raiseFileLimit()
	if err != nil {
		fmt.Fprintf(os.Stderr, "loadtest: raising the open-file limit: %v\n", err)
	}
	if need := cfg.filesNeeded(); limit < need {
		fatalf("%d streams need %d open files but this process may open %d: raise the hard limit "+
			"(as root: ulimit -n %d in the shell that runs loadtest, or prlimit --pid $$ --nofile=%d:%d)",
			cfg.streams, need, limit, need, need, need)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, cfg, os.Stderr)
	if err != nil {
		fatalf("%v", err)
	}
	res.print(os.Stdout)
	if len(res.problems) > 0 {
		os.Exit(1)
	}
}

// result is what a run measured.
type result struct {
	cfg     *config
	run     string // the run's ID, in its user's name
	loadAvg string // the machine's load average before the run

	opened, failed, dropped int
	setup                   time.Duration

	rssBefore, rssOpen int64 // broker's RSS before the run, and with the streams open

	inserts published

	expected, received, lost, repeated, malformed int64
	lastDelivery                                  time.Time
	latency                                       spread

	cpu phase // the measured phase: the hold, or from the first insert to the last delivery

	errs     *errorCounts
	problems []string // what broke a promise: lost events, failed streams ...
}

// progressf writes a timestamped line of progress.
func progressf(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "%s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

// run performs one run of cfg.mode against the broker; progress goes to w. It returns an
// error only when the run could not start; what went wrong during it is in the result's
// problems.
func run(ctx context.Context, cfg *config, w io.Writer) (*result, error) {
	t, err := loopbackTarget(cfg.url)
	if err != nil {
		return nil, err
	}
	res := &result{cfg: cfg, run: runID(), loadAvg: loadAverage(), errs: &errorCounts{}}
	hc := newClient(max(cfg.publishers, 1), cfg.requestTimeout)
	defer hc.CloseIdleConnections()
	if err := waitForBroker(ctx, hc, t.base, 15*time.Second); err != nil {
		return nil, err
	}
	if cfg.pid > 0 {
		if _, err := procstat.CPU(cfg.pid); err != nil {
			return nil, fmt.Errorf("--pid %d: %v", cfg.pid, err)
		}
		if files, err := readNofile(cfg.pid); err == nil && files > 0 && files < cfg.filesNeeded() {
			return nil, fmt.Errorf("the broker (pid %d) may open %d files but %d streams need about %d: "+
				"start it from a shell where ulimit -n is higher (ulimit -n %d), or raise it with prlimit --pid %d --nofile=%d:%d",
				cfg.pid, files, cfg.streams, cfg.filesNeeded(), cfg.filesNeeded(), cfg.pid, cfg.filesNeeded(), cfg.filesNeeded())
		}
	}
	// The broker's memory before the run's user is created: its two password hashes take 19
	// MiB each, which the Go runtime returns to the system only some time later, so a
	// baseline taken after them would be too high.
	if cfg.pid > 0 {
		res.rssBefore, _ = procstat.RSS(cfg.pid)
	}
	acc, err := setUp(ctx, hc, t.base, cfg.adminToken, res.run)
	if err != nil {
		return nil, err
	}
	progressf(w, "run %s: user and tenant %s on %s", res.run, acc.name, t.base)
	hc.CloseIdleConnections() // so the set-up's connection is not counted with the streams

	s := newStreams(t, acc.jwt, cfg, res.errs)
	if cfg.streams > 0 {
		progressf(w, "opening %d streams from %d source addresses", cfg.streams, len(s.srcIPs))
		start := time.Now()
		res.opened, res.failed = s.open(ctx, cfg.streams, cfg.connectConc, func(open, failed int) {
			progressf(w, "%d streams open, %d failed", open, failed)
		})
		res.setup = time.Since(start)
		progressf(w, "%d streams open, %d failed, in %.2f s", res.opened, res.failed, res.setup.Seconds())
	}

	switch cfg.mode {
	case "idle":
		res.hold(ctx, s, w)
	case "fanout":
		res.fanout(ctx, hc, t, acc, s, w)
	case "inserts":
		before := sampleUsage(cfg.pid)
		res.inserts = publish(ctx, hc, t.base, acc.jwt, cfg.events, cfg.publishers, cfg.rate, res.errs)
		res.cpu = between(before, sampleUsage(cfg.pid))
	}
	res.dropped = int(s.dropped.Load())
	if err := s.close(30 * time.Second); err != nil {
		return nil, err
	}
	res.collect(s)
	return res, nil
}

// hold keeps the streams open for cfg.hold and takes the broker's RSS at its end.
func (res *result) hold(ctx context.Context, s *streams, w io.Writer) {
	before := sampleUsage(res.cfg.pid)
	progressf(w, "holding %d streams for %s", res.opened, res.cfg.hold)
	end := time.NewTimer(res.cfg.hold)
	defer end.Stop()
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for waiting := true; waiting; {
		select {
		case <-end.C:
			waiting = false
		case <-ctx.Done():
			waiting = false
		case <-tick.C:
			rss, _ := procstat.RSS(res.cfg.pid)
			progressf(w, "holding: %d dropped, broker RSS %.1f MiB", s.dropped.Load(), mib(rss))
		}
	}
	res.rssOpen, _ = procstat.RSS(res.cfg.pid)
	res.cpu = between(before, sampleUsage(res.cfg.pid))
}

// fanout inserts cfg.events events and waits until every open stream has received every
// one, until none arrived for cfg.stall, until every stream has ended, or until ctx ends.
func (res *result) fanout(ctx context.Context, hc *http.Client, t target, acc account, s *streams, w io.Writer) {
	cfg := res.cfg
	before := sampleUsage(cfg.pid)
	if cfg.rate > 0 {
		progressf(w, "inserting %d events at %g/s from %d publishers", cfg.events, cfg.rate, cfg.publishers)
	} else {
		progressf(w, "inserting %d events at full speed from %d publishers", cfg.events, cfg.publishers)
	}
	res.inserts = publish(ctx, hc, t.base, acc.jwt, cfg.events, cfg.publishers, cfg.rate, res.errs)
	res.expected = int64(res.inserts.lastID) * int64(res.opened)
	progressf(w, "%d inserts answered; waiting for %d deliveries", res.inserts.ok, res.expected)

	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	last, lastChange, lastPrint := int64(-1), time.Now(), time.Now()
	for {
		got := s.accepted.Load()
		if got >= res.expected {
			break
		}
		// A stream counts its events before it counts itself dropped: once every stream
		// has ended, no delivery can come.
		if s.dropped.Load() >= int64(res.opened) {
			progressf(w, "every stream ended: stopped waiting at %d of %d deliveries", got, res.expected)
			break
		}
		if got != last {
			last, lastChange = got, time.Now()
		} else if time.Since(lastChange) >= cfg.stall {
			progressf(w, "no delivery for %s: stopped waiting at %d of %d", cfg.stall, got, res.expected)
			break
		}
		if time.Since(lastPrint) >= 2*time.Second {
			lastPrint = time.Now()
			progressf(w, "%d of %d deliveries", got, res.expected)
		}
		select {
		case <-ctx.Done():
			progressf(w, "run stopped (%v) at %d of %d deliveries", context.Cause(ctx), got, res.expected)
			res.cpu = between(before, sampleUsage(cfg.pid))
			return
		case <-tick.C:
		}
	}
	res.cpu = between(before, sampleUsage(cfg.pid))
}

// collect adds up the streams' tallies (after they have ended) and lists the problems.
func (res *result) collect(s *streams) {
	var latencies []time.Duration
	for _, st := range s.list {
		if !st.opened {
			continue // expected nothing
		}
		tl := &st.tally
		res.received += tl.received
		res.repeated += tl.repeated
		res.malformed += tl.malformed
		res.lost += tl.missing(res.inserts.lastID)
		if tl.last.After(res.lastDelivery) {
			res.lastDelivery = tl.last
		}
		latencies = append(latencies, tl.latencies...)
	}
	res.latency = spreadOf(latencies)

	cfg, p := res.cfg, &res.problems
	if res.failed > 0 {
		*p = append(*p, fmt.Sprintf("%d streams failed to open", res.failed))
		if res.errs.get("stream: status 429") > 0 {
			*p = append(*p, fmt.Sprintf("broker refused streams with 429: start it with --max_user_streams %d or more (every stream is the run's one user)", cfg.streams))
		}
	}
	if res.dropped > 0 {
		*p = append(*p, fmt.Sprintf("%d streams ended before the run did", res.dropped))
	}
	if res.inserts.failed > 0 || res.inserts.ok < cfg.events {
		*p = append(*p, fmt.Sprintf("%d of %d inserts answered 200", res.inserts.ok, cfg.events))
	}
	if res.inserts.ok > 0 && !res.inserts.gapless {
		*p = append(*p, fmt.Sprintf("the inserts' IDs are not 1 to %d", res.inserts.ok))
	}
	if res.lost > 0 || res.repeated > 0 || res.malformed > 0 {
		*p = append(*p, fmt.Sprintf("%d events lost, %d repeated, %d malformed", res.lost, res.repeated, res.malformed))
	}
}

// print writes the report.
func (res *result) print(w io.Writer) {
	cfg := res.cfg
	fmt.Fprintf(w, "loadtest %s against %s", cfg.mode, cfg.url)
	if cfg.pid > 0 {
		fmt.Fprintf(w, " (broker pid %d)", cfg.pid)
	}
	fmt.Fprintf(w, ", run %s\n", res.run)
	fmt.Fprintf(w, "machine      %d CPUs, load average %s before the run; during it all CPUs %.0f%% busy\n",
		runtime.NumCPU(), res.loadAvg, res.cpu.machine*100)
	if cfg.streams > 0 {
		fmt.Fprintf(w, "streams      %d of %d open in %.2f s, %d failed, %d dropped\n",
			res.opened, cfg.streams, res.setup.Seconds(), res.failed, res.dropped)
	}
	switch cfg.mode {
	case "idle":
		fmt.Fprintf(w, "held         %.1f s\n", res.cpu.wall.Seconds())
		fmt.Fprintf(w, "broker RSS   %.1f MiB before the run, %.1f MiB with %d streams open\n",
			mib(res.rssBefore), mib(res.rssOpen), res.opened)
		if res.opened > 0 {
			fmt.Fprintf(w, "per stream   at most %.2f KiB (the whole process / streams); at most %.2f KiB (its growth during the run, with the run's two password hashes / streams)\n",
				kib(res.rssOpen)/float64(res.opened), kib(res.rssOpen-res.rssBefore)/float64(res.opened))
		}
	case "fanout", "inserts":
		ins := &res.inserts
		pace := "full speed"
		if cfg.rate > 0 {
			pace = fmt.Sprintf("%g/s", cfg.rate)
		}
		fmt.Fprintf(w, "inserts      %d answered 200, %d failed, at %s from %d publishers: %.0f inserts/s\n",
			ins.ok, ins.failed, pace, cfg.publishers, perSecond(int64(ins.ok), ins.end.Sub(ins.start)))
		fmt.Fprintf(w, "insert time  p50 %s p99 %s max %s (each answered once on disk)\n",
			ms(ins.post.p50), ms(ins.post.p99), ms(ins.post.max))
	}
	if cfg.mode == "fanout" {
		took := res.lastDelivery.Sub(res.inserts.start)
		fmt.Fprintf(w, "deliveries   %d of %d: %d lost, %d repeated, %d malformed; %.0f deliveries/s\n",
			res.received, res.expected, res.lost, res.repeated, res.malformed, perSecond(res.received, took))
		fmt.Fprintf(w, "latency      insert to delivery p50 %s p99 %s max %s\n",
			ms(res.latency.p50), ms(res.latency.p99), ms(res.latency.max))
	}
	if cfg.pid > 0 && cfg.mode != "idle" {
		per, n, unit := "", res.received, "delivery"
		if cfg.mode == "inserts" {
			n, unit = int64(res.inserts.ok), "insert"
		}
		if n > 0 {
			per = fmt.Sprintf(", %.2f µs per %s", float64(res.cpu.server.Nanoseconds())/1e3/float64(n), unit)
		}
		fmt.Fprintf(w, "broker CPU   %.2f s in %.2f s%s\n", res.cpu.server.Seconds(), res.cpu.wall.Seconds(), per)
	}
	fmt.Fprintf(w, "loadtest CPU %.2f s in %.2f s\n", res.cpu.self.Seconds(), res.cpu.wall.Seconds())
	if res.errs.total() > 0 {
		fmt.Fprintf(w, "errors       %s\n", res.errs)
	}
	if len(res.problems) == 0 {
		fmt.Fprintf(w, "result       ok\n")
	} else {
		fmt.Fprintf(w, "result       FAIL: %s\n", strings.Join(res.problems, "; "))
	}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
func kib(b int64) float64 { return float64(b) / (1 << 10) }

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1e3) }

func perSecond(n int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadtest: "+format+"\n", args...)
	os.Exit(2)
}
