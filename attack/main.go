// Command attack runs hostile loads against an already running broker on loopback and
// reports, per attack, the broker's peak RSS, the CPU time it used and whether its health
// check kept answering. See README.md.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"broker/internal/procstat"
)

// attack is one named hostile load; run must return within limit (its context's deadline).
type attack struct {
	name  string
	limit time.Duration
	run   func(ctx context.Context, e *env, r *report) error
}

// attacks in the order of a full run: those that may leave the broker busy (zxcvbn) or
// kill it (inserts, when it runs out of memory) come last.
var attacks = []attack{
	{"scopes", 60 * time.Second, attackScopes},
	{"hashslots", 40 * time.Second, attackHashSlots},
	{"backup", 60 * time.Second, attackBackup},
	{"throttle", 60 * time.Second, attackThrottle},
	{"backlog", 60 * time.Second, attackBacklog},
	{"fanout", 60 * time.Second, attackFanout},
	{"zxcvbn", 60 * time.Second, attackZxcvbn},
	{"inserts", 60 * time.Second, attackInserts},
}

// report collects what an attack observed: notes, and problems (expectations the broker
// did not meet beyond RSS and health, which fail the run only with --strict).
type report struct {
	notes, problems []string
}

func (r *report) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}
func (r *report) problem(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

func main() {
	target := flag.String("url", "http://127.0.0.1:8080", "broker base URL (loopback only)")
	pid := flag.Int("pid", 0, "pid of the broker process (required)")
	admin := flag.String("admin_token", "letmein", "broker's --admin_token")
	only := flag.String("only", "", "comma-separated attack names (default all)")
	maxRSS := flag.Float64("max_rss", 512, "fail when the broker's peak RSS during an attack exceeds this many MiB")
	strict := flag.Bool("strict", false, "also fail on attack-specific expectations (listed as problems=)")
	flag.Parse()
	if *pid <= 0 {
		fatalf("--pid is required")
	}
	if _, err := procstat.RSS(*pid); err != nil {
		fatalf("cannot read the broker's memory: %v", err)
	}
	selected, err := selectAttacks(*only)
	if err != nil {
		fatalf("%v", err)
	}
	base, err := loopbackBase(*target)
	if err != nil {
		fatalf("%v", err)
	}
	raiseFileLimit()
	e := &env{base: base, admin: *admin, run: randomHex(4)}
	failed := false
	for _, a := range selected {
		if _, err := procstat.CPU(*pid); err != nil {
			fmt.Printf("%-10s result=FAIL(broker gone) notes=broker process %d is not running\n", a.name, *pid)
			failed = true
			continue
		}
		if runOne(a, e, *pid, *maxRSS, *strict) {
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}

// runOne runs a under the monitor, prints its line and reports whether it failed.
func runOne(a attack, e *env, pid int, maxRSS float64, strict bool) bool {
	var r report
	m := watch(pid, e.base+"/")
	cpu0, _ := procstat.CPU(pid)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), a.limit)
	err := a.run(ctx, e, &r)
	cancel()
	elapsed := time.Since(start)
	st := m.finish()
	cpu1, cpuErr := procstat.CPU(pid)
	settle := waitIdle(pid, 60*time.Second)
	var why []string
	if err != nil {
		why = append(why, "error")
		r.notes = append(r.notes, "error: "+err.Error())
	}
	if mib(st.peakRSS) > maxRSS {
		why = append(why, fmt.Sprintf("rss>%gMiB", maxRSS))
	}
	if st.healthFail > 0 {
		why = append(why, "health")
	}
	if cpuErr != nil {
		why = append(why, "broker gone")
		r.notes = append(r.notes, "broker: "+cpuErr.Error())
	}
	if strict && len(r.problems) > 0 {
		why = append(why, "expectations")
	}
	result := "ok"
	if len(why) > 0 {
		result = "FAIL(" + strings.Join(why, ",") + ")"
	}
	if len(r.problems) > 0 {
		r.notes = append(r.notes, "problems: "+strings.Join(r.problems, "; "))
	}
	fmt.Printf("%-10s peak_rss=%.1fMiB rss_start=%.1fMiB cpu=%.1fs health_max=%dms health_fail=%d/%d time=%.1fs busy_after=%.1fs result=%s notes=%s\n",
		a.name, mib(st.peakRSS), mib(st.startRSS), (cpu1 - cpu0).Seconds(), st.healthMax.Milliseconds(),
		st.healthFail, st.healthN, elapsed.Seconds(), settle.Seconds(), result, strings.Join(r.notes, "; "))
	return len(why) > 0
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// waitIdle waits, at most limit, until the broker uses under 10% of a CPU for half a
// second, so work left over from an attack (e.g. hashes of requests the client gave up on)
// is not counted in the next one; it returns how long it waited.
func waitIdle(pid int, limit time.Duration) time.Duration {
	start := time.Now()
	for time.Since(start) < limit {
		c0, err0 := procstat.CPU(pid)
		time.Sleep(500 * time.Millisecond)
		c1, err1 := procstat.CPU(pid)
		if err0 != nil || err1 != nil || c1-c0 < 50*time.Millisecond {
			break
		}
	}
	return time.Since(start)
}

func selectAttacks(only string) ([]attack, error) {
	if only == "" {
		return attacks, nil
	}
	var out []attack
	for name := range strings.SplitSeq(only, ",") {
		found := false
		for _, a := range attacks {
			if a.name == strings.TrimSpace(name) {
				out, found = append(out, a), true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown attack %q", name)
		}
	}
	return out, nil
}

// loopbackBase checks that raw is an http:// URL of a loopback host and returns it as
// http://ip:port with an IPv4 address when the host has one (so attacks can use other
// 127.x.y.z source addresses, each with its own throttle count in the broker).
func loopbackBase(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "http" || u.Hostname() == "" {
		return "", fmt.Errorf("--url must be http://host:port, got %q", raw)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupIPAddr(ctx, u.Hostname())
	if err != nil || len(ips) == 0 {
		return "", fmt.Errorf("resolve %s: %v", u.Hostname(), err)
	}
	pick := ips[0].IP
	for _, ip := range ips {
		if !ip.IP.IsLoopback() {
			return "", fmt.Errorf("%s is not a loopback address: attack only talks to loopback", ip.IP)
		}
		if ip.IP.To4() != nil {
			pick = ip.IP
		}
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	return "http://" + net.JoinHostPort(pick.String(), port), nil
}

// raiseFileLimit lifts the soft limit of open files to the hard one (fanout opens thousands).
func raiseFileLimit() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			fmt.Fprintln(os.Stderr, "attack: raise RLIMIT_NOFILE:", err)
		}
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "attack: "+format+"\n", args...)
	os.Exit(2)
}
