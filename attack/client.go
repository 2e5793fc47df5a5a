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
	"math/big"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// env is what every attack shares: the broker's base URL (http://ip:port), the admin
// token and a random run ID that makes usernames unique across runs.
type env struct {
	base, admin, run string
}

// client talks to the broker from its own source address (a random 127.x.y.z when the
// broker is on IPv4 loopback), so the throttle counts of one attack never lock out another.
type client struct {
	e      *env
	addr   string // host:port of the broker
	dialer *net.Dialer
	hc     *http.Client
}

func (e *env) client(timeout time.Duration) *client {
	addr := strings.TrimPrefix(e.base, "http://")
	d := &net.Dialer{Timeout: 5 * time.Second}
	if host, _, _ := net.SplitHostPort(addr); net.ParseIP(host).To4() != nil {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, byte(1+randN(253)), byte(randN(256)), byte(1+randN(253)))}
	}
	tr := &http.Transport{DialContext: d.DialContext, MaxIdleConnsPerHost: 1000, DisableCompression: true, IdleConnTimeout: 30 * time.Second}
	return &client{e: e, addr: addr, dialer: d, hc: &http.Client{Timeout: timeout, Transport: tr}}
}

// close closes the client's idle connections.
func (c *client) close() { c.hc.CloseIdleConnections() }

func randN(n int64) int64 {
	v, _ := rand.Int(rand.Reader, big.NewInt(n))
	return v.Int64()
}

// do sends a request with a body of n bytes read from body (nil: none) and returns the
// status and up to 64 MiB of the answer. auth, when set, is the Authorization header.
func (c *client) do(ctx context.Context, method, path, auth string, body io.Reader, n int64) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.e.base+path, body)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.ContentLength = n
		req.Header.Set("Content-Type", "application/json")
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return resp.StatusCode, b, err
}

func (c *client) postJSON(ctx context.Context, path string, v any) (int, []byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, nil, err
	}
	return c.do(ctx, http.MethodPost, path, "", bytes.NewReader(b), int64(len(b)))
}

// account is a user created for an attack.
type account struct{ name, password, jwt string }

// createUser creates a user named after the run and tag, in the run's tenant, with
// scopes (nil: none) and a strong random password, and returns the answer's status.
func (c *client) createUser(ctx context.Context, tag, tenant string, scopes []string) (account, int, []byte, error) {
	a := account{name: fmt.Sprintf("atk%s-%s", c.e.run, tag), password: "P-" + rand.Text()}
	req := map[string]any{"username": a.name, "password": a.password, "admin_token": c.e.admin,
		"tenant_name": "atk" + c.e.run + "-" + tenant}
	if scopes != nil {
		req["scopes"] = scopes
	}
	status, body, err := c.postJSON(ctx, "/create_user", req)
	return a, status, body, err
}

// newAccount creates a user (see createUser) and logs it in.
func (c *client) newAccount(ctx context.Context, tag, tenant string, scopes []string) (account, error) {
	a, status, body, err := c.createUser(ctx, tag, tenant, scopes)
	if err == nil && status != http.StatusOK {
		err = fmt.Errorf("create_user %s: %d %s", a.name, status, trim(body))
	}
	if err == nil {
		a.jwt, err = c.login(ctx, a.name, a.password)
	}
	return a, err
}

func (c *client) login(ctx context.Context, name, password string) (string, error) {
	status, body, err := c.postJSON(ctx, "/login", map[string]string{"username": name, "password": password})
	var ans struct{ JWT string }
	if err == nil && (status != http.StatusOK || json.Unmarshal(body, &ans) != nil || ans.JWT == "") {
		err = fmt.Errorf("login %s: %d %s", name, status, trim(body))
	}
	return ans.JWT, err
}

// insertBody is the JSON body of POST /insert with data as it is.
func insertBody(event string, data []byte) []byte {
	return fmt.Appendf(nil, `{"event":%q,"data":%s}`, event, data)
}

func (c *client) insert(ctx context.Context, jwt, event string, data []byte) (int, error) {
	b := insertBody(event, data)
	status, _, err := c.do(ctx, http.MethodPost, "/insert", "Bearer "+jwt, bytes.NewReader(b), int64(len(b)))
	return status, err
}

// jsonString returns a JSON string of exactly n >= 2 bytes: "aaa...".
func jsonString(n int) []byte {
	b := bytes.Repeat([]byte("a"), n)
	b[0], b[n-1] = '"', '"'
	return b
}

// largestData finds the largest JSON string data the broker accepts, starting at start bytes
// and halving on 413 or 400; the accepted probe is inserted as event name.
func (c *client) largestData(ctx context.Context, jwt, name string, start int) (int, error) {
	for n := start; n >= 1024; n /= 2 {
		status, err := c.insert(ctx, jwt, name, jsonString(n))
		switch {
		case err != nil:
			return 0, err
		case status == http.StatusOK:
			return n, nil
		case status != http.StatusRequestEntityTooLarge && status != http.StatusBadRequest:
			return 0, fmt.Errorf("insert of %d bytes: status %d", n, status)
		}
	}
	return 0, errors.New("no data size of 1 KiB or more accepted")
}

// dialRaw opens a TCP connection to the broker whose receive buffer is 4 KiB, set before
// connecting so the advertised window stays small.
func (c *client) dialRaw(ctx context.Context) (*net.TCPConn, error) {
	d := *c.dialer
	d.Control = func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		return errors.Join(err, serr)
	}
	conn, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	tcp := conn.(*net.TCPConn)
	tcp.SetReadBuffer(4096)
	return tcp, nil
}

// rawRequest opens a raw connection and writes an HTTP/1.1 request on it.
func (c *client) rawRequest(ctx context.Context, method, path string, header map[string]string, body []byte) (*net.TCPConn, error) {
	conn, err := c.dialRaw(ctx)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", method, path, c.addr)
	for _, k := range slices.Sorted(maps.Keys(header)) {
		fmt.Fprintf(&b, "%s: %s\r\n", k, header[k])
	}
	if body != nil {
		fmt.Fprintf(&b, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	b.Write(body)
	conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(b.Bytes()); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// openStream opens GET /sse on a raw connection (lastID "" for none) and returns it once
// the answer's status line has arrived, with its status.
func (c *client) openStream(ctx context.Context, jwt, lastID string) (*net.TCPConn, int, error) {
	h := map[string]string{"Authorization": "Bearer " + jwt}
	if lastID != "" {
		h["Last-Event-ID"] = lastID
	}
	conn, err := c.rawRequest(ctx, http.MethodGet, "/sse", h, nil)
	if err != nil {
		return nil, 0, err
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 0, 512)
	for !bytes.Contains(buf, []byte("\r\n")) && len(buf) < cap(buf) {
		n, err := conn.Read(buf[len(buf):cap(buf)])
		if buf = buf[:len(buf)+n]; err != nil {
			conn.Close()
			return nil, 0, err
		}
	}
	conn.SetReadDeadline(time.Time{})
	status, err := parseStatusLine(string(buf))
	if err != nil {
		conn.Close()
	}
	return conn, status, err
}

// parseStatusLine returns the status code of an HTTP/1.x answer that starts with s.
func parseStatusLine(s string) (int, error) {
	line, _, _ := strings.Cut(s, "\r\n")
	f := strings.Fields(line)
	if len(f) < 2 || !strings.HasPrefix(f[0], "HTTP/1.") {
		return 0, fmt.Errorf("not an HTTP status line: %q", trim([]byte(line)))
	}
	return strconv.Atoi(f[1])
}

// counter counts outcomes: status codes, or error kinds.
type counter struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *counter) add(status int, err error) {
	key := strconv.Itoa(status)
	if err != nil {
		key = errKind(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]int{}
	}
	c.m[key]++
}

func (c *counter) get(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[key]
}

// String lists the counts by key: "200:3 413:597".
func (c *counter) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(c.m)) {
		parts = append(parts, fmt.Sprintf("%s:%d", k, c.m[k]))
	}
	if parts == nil {
		return "none"
	}
	return strings.Join(parts, " ")
}

// others is the count of everything but the given keys.
func (c *counter) others(keys ...string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for k, v := range c.m {
		if !slices.Contains(keys, k) {
			n += v
		}
	}
	return n
}

// errKind names the kind of a request error for the counts.
func errKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	}
	return "error"
}

// trim shortens an answer for a message.
func trim(b []byte) string {
	if len(b) > 120 {
		return string(b[:120]) + "..."
	}
	return string(b)
}

// parallel runs f(i) for i in [0, n) on workers goroutines until ctx ends; it returns
// how many calls were started.
func parallel(ctx context.Context, n, workers int, f func(i int)) int {
	next := make(chan int)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range next {
				f(i)
			}
		})
	}
	started := 0
loop:
	for started < n {
		select {
		case next <- started:
			started++
		case <-ctx.Done():
			break loop
		}
	}
	close(next)
	wg.Wait()
	return started
}
