package main

import (
	"context"
	"net/http"
	"sync"
	"time"

	"broker/internal/procstat"
)

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
	m.st.startRSS, _ = procstat.RSS(pid)
	m.st.peakRSS = m.st.startRSS
	m.wg.Add(2)
	go m.every(ctx, 50*time.Millisecond, func() {
		if rss, err := procstat.RSS(pid); err == nil {
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
