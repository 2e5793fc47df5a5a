// Package procstat reads a process's memory and CPU time from /proc, for the tools that
// measure the broker from outside (attack and loadtest): both report the same two figures,
// so both read them the same way. The broker itself does not use it.
package procstat

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// ClockTicks is USER_HZ, the unit of the CPU times in /proc/<pid>/stat and /proc/stat: 100
// on every Linux build Go supports (reading it otherwise takes cgo's sysconf).
const ClockTicks = 100

// VmRSS returns the VmRSS of a /proc/<pid>/status text, in bytes: the process's resident
// memory.
func VmRSS(status string) (int64, error) {
	for line := range strings.SplitSeq(status, "\n") {
		rest, ok := strings.CutPrefix(line, "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("malformed VmRSS line %q", line)
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		return kb << 10, err
	}
	return 0, errors.New("no VmRSS line")
}

// Stat returns the state (R, S, Z ...) and utime+stime, in clock ticks, of a
// /proc/<pid>/stat text. The command name, in parentheses, may hold spaces and
// parentheses, so fields are counted after the last ')'.
func Stat(stat string) (state string, ticks int64, err error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return "", 0, errors.New("malformed stat: no ')'")
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3 (state); utime is field 14, stime 15
	if len(f) < 13 {
		return "", 0, fmt.Errorf("malformed stat: %d fields after the name", len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	return f[0], utime + stime, errors.Join(err1, err2)
}

// RSS returns the resident memory of process pid, in bytes.
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return VmRSS(string(b))
}

// CPU returns the CPU time (user and system) process pid has used so far. A zombie's
// /proc entry still reads, so an exited process is an error rather than a frozen figure.
func CPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	state, ticks, err := Stat(string(b))
	if err == nil && (state == "Z" || state == "X") {
		err = fmt.Errorf("process %d has exited", pid)
	}
	return time.Duration(ticks) * time.Second / ClockTicks, err
}
