package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// target is the broker under test, on loopback.
type target struct {
	base string // http://ip:port
	addr string // ip:port
	ip   net.IP
}

// loopbackTarget checks that raw is an http:// URL whose host resolves to loopback only
// (the load test never sends its load anywhere else) and returns it with an IPv4 address
// when the host has one, so streams can come from several 127.0.0.x source addresses.
func loopbackTarget(raw string) (target, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "http" || u.Hostname() == "" || (u.Path != "" && u.Path != "/") {
		return target{}, fmt.Errorf("--url must be http://host:port, got %q", raw)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupIPAddr(ctx, u.Hostname())
	if err != nil || len(ips) == 0 {
		return target{}, fmt.Errorf("resolve %s: %v", u.Hostname(), err)
	}
	pick := ips[0].IP
	for _, ip := range ips {
		if !ip.IP.IsLoopback() {
			return target{}, fmt.Errorf("%s is not a loopback address: the load test only runs on loopback", ip.IP)
		}
		if ip.IP.To4() != nil {
			pick = ip.IP
		}
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	addr := net.JoinHostPort(pick.String(), port)
	return target{base: "http://" + addr, addr: addr, ip: pick}, nil
}

// newClient is an HTTP client for conns connections at most to the broker, each request
// bounded by timeout.
func newClient(conns int, timeout time.Duration) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext:         d.DialContext,
		MaxIdleConnsPerHost: conns,
		MaxConnsPerHost:     conns,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}}
}

// postJSON posts body to the broker, with auth as Authorization header when not empty, and
// returns the status and at most 1 MiB of the answer.
func postJSON(ctx context.Context, hc *http.Client, url, auth string, body []byte) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, answer, err
}

// waitForBroker polls the health check GET / until it answers 200, so a command line can
// start the broker and the load test at once; it gives up after limit.
func waitForBroker(ctx context.Context, hc *http.Client, base string, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/", nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no broker answering at %s within %s: %v", base, limit, err)
		case <-tick.C:
		}
	}
}

// account is the user a run streams and inserts as, alone in a tenant of its own, so the
// run's events are the tenant's events 1, 2, 3 ... and no other run's streams see them.
type account struct {
	name, tenant, jwt string
}

// setUp creates the run's user with the admin token and logs it in for a JWT. The password
// is random and long, so it passes --password_checker.
func setUp(ctx context.Context, hc *http.Client, base, adminToken, run string) (account, error) {
	a := account{name: "lt" + run, tenant: "lt" + run}
	password := "lt-" + rand.Text()
	create, _ := json.Marshal(map[string]string{"username": a.name, "password": password,
		"admin_token": adminToken, "tenant_name": a.tenant})
	status, answer, err := postJSON(ctx, hc, base+"/create_user", "", create)
	if err == nil && status != http.StatusOK {
		err = fmt.Errorf("status %d %s", status, trim(answer))
		if status == http.StatusUnauthorized {
			err = fmt.Errorf("%w (is --admin_token the broker's?)", err)
		}
	}
	if err != nil {
		return a, fmt.Errorf("create_user: %w", err)
	}
	login, _ := json.Marshal(map[string]string{"username": a.name, "password": password})
	status, answer, err = postJSON(ctx, hc, base+"/login", "", login)
	var token struct{ JWT string }
	if err == nil && (status != http.StatusOK || json.Unmarshal(answer, &token) != nil || token.JWT == "") {
		err = fmt.Errorf("status %d %s", status, trim(answer))
	}
	if err != nil {
		return a, fmt.Errorf("login: %w", err)
	}
	a.jwt = token.JWT
	return a, nil
}

// published is what the publishers did.
type published struct {
	ok, failed int
	lastID     uint64 // the highest ID broker answered
	gapless    bool   // the answered IDs are exactly 1..ok, each once
	start, end time.Time
	post       spread // round trip of the inserts: each is answered once on disk
}

// publish inserts events into the account's tenant, each as {"ts":<Unix ns>} taken just
// before its POST, from publishers concurrent connections. With rate > 0 insert number i
// starts at i/rate seconds; otherwise each publisher sends its next insert as soon as the
// last is answered. It stops early when ctx ends.
func publish(ctx context.Context, hc *http.Client, base, jwt string, events, publishers int, rate float64, errs *errorCounts) published {
	type worker struct {
		ok, failed int
		ids        []uint64
		post       []time.Duration
	}
	workers := make([]worker, publishers)
	jobs := make(chan struct{})
	var wg sync.WaitGroup
	for i := range workers {
		w := &workers[i]
		wg.Go(func() {
			for range jobs {
				id, took, err := insertOne(ctx, hc, base, jwt)
				if err != nil {
					w.failed++
					errs.add("insert: " + errKind(err))
					continue
				}
				w.ok++
				w.ids = append(w.ids, id)
				w.post = append(w.post, took)
			}
		})
	}
	p := published{start: time.Now()}
	pace := time.NewTimer(0)
	defer pace.Stop()
	for i := 0; i < events && ctx.Err() == nil; i++ {
		if rate > 0 {
			pace.Reset(time.Until(p.start.Add(time.Duration(float64(i) / rate * float64(time.Second)))))
			select {
			case <-pace.C:
			case <-ctx.Done():
				continue
			}
		}
		select {
		case jobs <- struct{}{}:
		case <-ctx.Done():
		}
	}
	close(jobs)
	wg.Wait()
	p.end = time.Now()

	var ids []uint64
	var post []time.Duration
	for _, w := range workers {
		p.ok += w.ok
		p.failed += w.failed
		ids = append(ids, w.ids...)
		post = append(post, w.post...)
	}
	slices.Sort(ids)
	p.gapless = true
	for i, id := range ids {
		p.gapless = p.gapless && id == uint64(i+1)
	}
	if len(ids) > 0 {
		p.lastID = ids[len(ids)-1]
	}
	p.post = spreadOf(post)
	return p
}

// insertOne inserts one stamped event and returns the ID broker answered and the round trip.
func insertOne(ctx context.Context, hc *http.Client, base, jwt string) (uint64, time.Duration, error) {
	start := time.Now()
	body := fmt.Appendf(nil, `{"event":"bench","data":{"ts":%d}}`, start.UnixNano())
	status, answer, err := postJSON(ctx, hc, base+"/insert", "Bearer "+jwt, body)
	took := time.Since(start)
	if err != nil {
		return 0, took, err
	}
	if status != http.StatusOK {
		return 0, took, &statusError{status}
	}
	var id struct{ ID uint64 }
	if json.Unmarshal(answer, &id) != nil || id.ID == 0 {
		return 0, took, fmt.Errorf("answer without an id: %s", trim(answer))
	}
	return id.ID, took, nil
}

// statusError is an answer other than 200; its message is the status, so errors count by it.
type statusError struct{ status int }

func (e *statusError) Error() string { return fmt.Sprintf("status %d", e.status) }

// errorCounts counts errors by kind, from any goroutine, so thousands of the same failure
// print as one line.
type errorCounts struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *errorCounts) add(kind string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]int{}
	}
	c.m[kind]++
}

func (c *errorCounts) get(kind string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[kind]
}

func (c *errorCounts) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.m {
		n += v
	}
	return n
}

// String lists the counts by kind: "insert: status 503: 2, stream: eof: 1".
func (c *errorCounts) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(c.m)) {
		parts = append(parts, fmt.Sprintf("%s: %d", k, c.m[k]))
	}
	if parts == nil {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// errKind names an error without the addresses and ports that make each one different.
func errKind(err error) string {
	var ne net.Error
	var se *statusError
	switch {
	case errors.As(err, &se):
		return se.Error()
	case errors.Is(err, errLineTooLong):
		return "line too long"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE):
		return "too many open files (raise ulimit -n)"
	case errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EADDRINUSE):
		return "no free local port"
	case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, net.ErrClosed):
		return "closed"
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	}
	// Otherwise the last part of the message, which names no address: "dial tcp
	// 127.0.0.2:0->127.0.0.1:8080: connect: no route to host" counts as "no route to host".
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return trim([]byte(msg))
}

// trim shortens an answer for a message.
func trim(b []byte) string {
	b = bytes.TrimSpace(b)
	if len(b) > 120 {
		return string(b[:120]) + "..."
	}
	return string(b)
}

// runID names a run's user and tenant, so runs against one database never share them.
func runID() string {
	return strings.ToLower(rand.Text()[:8])
}
