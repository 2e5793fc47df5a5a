package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"broker/internal/procstat"
)

// parseNofile returns the soft "Max open files" of a /proc/<pid>/limits text (0 for
// "unlimited", which Linux does not allow for files anyway).
func parseNofile(limits string) (uint64, error) {
	for line := range strings.SplitSeq(limits, "\n") {
		rest, ok := strings.CutPrefix(line, "Max open files")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 2 {
			return 0, fmt.Errorf("malformed limits line %q", line)
		}
		if f[0] == "unlimited" {
			return 0, nil
		}
		return strconv.ParseUint(f[0], 10, 64)
	}
	return 0, errors.New("no Max open files line")
}

// parseMachineCPU returns the busy and total clock ticks of all CPUs from the first line of
// /proc/stat ("cpu user nice system idle iowait irq softirq steal ..."); idle and iowait
// are not busy.
func parseMachineCPU(stat string) (busy, total int64, err error) {
	line, _, _ := strings.Cut(stat, "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("malformed /proc/stat line %q", line)
	}
	for i, s := range f[1:9] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, 0, err
		}
		total += v
		if i != 3 && i != 4 {
			busy += v
		}
	}
	return busy, total, nil
}

func readNofile(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, err
	}
	return parseNofile(string(b))
}

// selfCPU is the CPU time this process (the load generator) has used so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// loadAverage is the first field of /proc/loadavg: how busy the machine was over the last
// minute before the run, printed because other work on the same cores skews every figure.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "unknown"
	}
	return f[0]
}

// usage is a snapshot of the CPU counters a phase of the run is measured with.
type usage struct {
	at                      time.Time
	server, self            time.Duration
	machineBusy, machineAll int64
}

// sampleUsage reads the counters; pid 0 (no broker process given) leaves server at 0.
func sampleUsage(pid int) usage {
	u := usage{at: time.Now(), self: selfCPU()}
	if pid > 0 {
		u.server, _ = procstat.CPU(pid)
	}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		u.machineBusy, u.machineAll, _ = parseMachineCPU(string(b))
	}
	return u
}

// phase is the CPU used between two snapshots.
type phase struct {
	wall, server, self time.Duration
	machine            float64 // busy share of all CPUs, 0 to 1
}

func between(a, b usage) phase {
	p := phase{wall: b.at.Sub(a.at), server: b.server - a.server, self: b.self - a.self}
	if all := b.machineAll - a.machineAll; all > 0 {
		p.machine = float64(b.machineBusy-a.machineBusy) / float64(all)
	}
	return p
}

// raiseFileLimit lifts this process's soft limit on open files to its hard limit (every
// stream is a socket) and returns the soft limit in force.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	if lim.Cur < lim.Max {
		raised := lim
		raised.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			return lim.Cur, err
		}
		lim = raised
	}
	return lim.Cur, nil
}
