package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

const clkTck = 100 // USER_HZ: the unit of utime and stime in /proc/<pid>/stat

// parseVmRSS returns the VmRSS of a /proc/<pid>/status text, in bytes.
func parseVmRSS(status string) (int64, error) {
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

// parseStat returns the state (R, S, Z...) and utime+stime (clock ticks) of a
// /proc/<pid>/stat text. The command name, in parentheses, may hold spaces and
// parentheses: fields are counted after the last ')'.
func parseStat(stat string) (state string, ticks int64, err error) {
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

func readRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseVmRSS(string(b))
}

func readCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	state, ticks, err := parseStat(string(b))
	if err == nil && (state == "Z" || state == "X") {
		err = fmt.Errorf("process %d has exited", pid)
	}
	return time.Duration(ticks) * time.Second / clkTck, err
}

// stats is what the monitor saw during one attack.
type stats struct {
	startRSS, peakRSS   int64
	healthMax           time.Duration
	healthN, healthFail int
}

// monitor samples the broker's RSS every 50 ms and polls its health check every 200 ms
// (a failure is an error, a status other than 200, or no answer within 2 s).
type monitor struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	st     stats
}

func watch(pid int, healthURL string) *monitor {
	ctx, cancel := context.WithCancel(context.Background())
	m := &monitor{cancel: cancel}
	m.st.startRSS, _ = readRSS(pid)
	m.st.peakRSS = m.st.startRSS
	m.wg.Add(2)
	go m.every(ctx, 50*time.Millisecond, func() {
		if rss, err := readRSS(pid); err == nil {
			m.mu.Lock()
			m.st.peakRSS = max(m.st.peakRSS, rss)
			m.mu.Unlock()
		}
	})
	tr := &http.Transport{DisableCompression: true}
	hc := &http.Client{Timeout: 2 * time.Second, Transport: tr}
	go m.every(ctx, 200*time.Millisecond, func() {
		start := time.Now()
		ok := false
		if resp, err := hc.Get(healthURL); err == nil {
			ok = resp.StatusCode == http.StatusOK
			resp.Body.Close()
		}
		m.mu.Lock()
		m.st.healthN++
		m.st.healthMax = max(m.st.healthMax, time.Since(start))
		if !ok {
			m.st.healthFail++
		}
		m.mu.Unlock()
	})
	go func() { <-ctx.Done(); tr.CloseIdleConnections() }()
	return m
}

// every calls f at once and then every d until ctx ends (a slow f skips ticks).
func (m *monitor) every(ctx context.Context, d time.Duration, f func()) {
	defer m.wg.Done()
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		f()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// finish stops the monitor and returns what it saw.
func (m *monitor) finish() stats {
	m.cancel()
	m.wg.Wait()
	return m.st
}
