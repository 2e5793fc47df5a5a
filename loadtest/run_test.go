package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeBroker mimics broker's endpoints that the load test uses, and its event stream
// byte for byte: a hijacked HTTP/1.1 answer without chunks, frames
// "event:NAME\nid:N\ndata:JSON\n\n" and the keep-alive ":\n". It writes every frame in two
// pieces with a keep-alive between them and the next frame, so the load test reads frames
// split across reads.
type fakeBroker struct {
	maxUserStreams int // 0: no cap
	// fault, when set, decides what stream number sub (in the order streams opened) gets
	// of event id: 0 times (lost), 1 or 2 (repeated).
	fault func(sub int, id uint64) int
	// closeAfter, when not 0, ends every stream after the event of that ID (sent or not).
	closeAfter uint64

	done chan struct{} // closed when the test ends: the streams' handlers return

	mu       sync.Mutex
	users    map[string]string // username: tenant
	events   map[string]uint64 // tenant: its last ID
	subs     map[string][]chan []byte
	opened   int
	perUser  map[string]int
	failures []string // what the fake saw go wrong, reported by the test
}

func newFakeBroker() *fakeBroker {
	return &fakeBroker{done: make(chan struct{}), users: map[string]string{}, events: map[string]uint64{},
		subs: map[string][]chan []byte{}, perUser: map[string]int{}}
}

func (b *fakeBroker) fail(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.failures = append(b.failures, fmt.Sprintf(format, args...))
}

// user returns the tenant of the request's bearer token, "tok-<username>".
func (b *fakeBroker) user(r *http.Request) (string, string, bool) {
	name, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer tok-")
	b.mu.Lock()
	defer b.mu.Unlock()
	tenant, known := b.users[name]
	return name, tenant, ok && known
}

func reply(w http.ResponseWriter, status int, v any) {
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func (b *fakeBroker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method + " " + r.URL.Path {
	case "GET /":
		reply(w, http.StatusOK, map[string]string{"status": "ok"})
	case "POST /create_user":
		var req struct {
			Username   string `json:"username"`
			Password   string `json:"password"`
			AdminToken string `json:"admin_token"`
			Tenant     string `json:"tenant_name"`
		}
		if json.NewDecoder(r.Body).Decode(&req) != nil || req.Username == "" || len(req.Password) < 8 {
			reply(w, http.StatusBadRequest, map[string]string{"error": "bad request"})
			return
		}
		if req.AdminToken != "letmein" {
			reply(w, http.StatusUnauthorized, map[string]string{"error": "wrong admin token"})
			return
		}
		b.mu.Lock()
		b.users[req.Username] = req.Tenant
		b.mu.Unlock()
		reply(w, http.StatusOK, map[string]string{"id": "uuid"})
	case "POST /login":
		var req struct{ Username, Password string }
		json.NewDecoder(r.Body).Decode(&req)
		reply(w, http.StatusOK, map[string]string{"jwt": "tok-" + req.Username})
	case "POST /insert":
		_, tenant, ok := b.user(r)
		var req struct {
			Event string
			Data  json.RawMessage
		}
		if !ok || json.NewDecoder(r.Body).Decode(&req) != nil {
			reply(w, http.StatusBadRequest, map[string]string{"error": "bad insert"})
			return
		}
		var data bytes.Buffer
		json.Compact(&data, req.Data)
		b.mu.Lock()
		b.events[tenant]++
		id := b.events[tenant]
		frame := fmt.Appendf(nil, "event:%s\nid:%d\ndata:%s\n\n", req.Event, id, data.Bytes())
		for sub, ch := range b.subs[tenant] {
			times := 1
			if b.fault != nil {
				times = b.fault(sub, id)
			}
			for range times {
				ch <- frame
			}
			if id == b.closeAfter {
				ch <- nil
			}
		}
		b.mu.Unlock()
		reply(w, http.StatusOK, map[string]uint64{"id": id})
	case "GET /sse":
		b.stream(w, r)
	default:
		reply(w, http.StatusNotFound, map[string]string{"error": "not found"})
	}
}

// stream registers the subscriber before it answers, as broker does, so every event
// inserted once the answer's header is out reaches it.
func (b *fakeBroker) stream(w http.ResponseWriter, r *http.Request) {
	name, tenant, ok := b.user(r)
	if !ok {
		reply(w, http.StatusUnauthorized, map[string]string{"error": "unauthorized"})
		return
	}
	ch := make(chan []byte, 4096)
	b.mu.Lock()
	if b.maxUserStreams > 0 && b.perUser[name] >= b.maxUserStreams {
		b.mu.Unlock()
		reply(w, http.StatusTooManyRequests, map[string]string{"error": "too many streams"})
		return
	}
	b.perUser[name]++
	b.opened++
	b.subs[tenant] = append(b.subs[tenant], ch)
	b.mu.Unlock()
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		b.fail("hijack: %v", err)
		return
	}
	defer conn.Close()
	buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n:\n")
	if buf.Flush() != nil {
		return
	}
	for {
		var frame []byte
		select {
		case frame = <-ch:
		case <-b.done:
			return
		}
		if frame == nil {
			return // closeAfter
		}
		half := len(frame) / 2
		for _, piece := range [][]byte{frame[:half], frame[half:], []byte(":\n")} {
			if _, err := conn.Write(piece); err != nil {
				return // the load test closed the stream
			}
		}
	}
}

// startFake serves b on loopback for the test.
func startFake(t *testing.T, b *fakeBroker) string {
	srv := httptest.NewServer(b)
	t.Cleanup(func() {
		close(b.done)
		srv.CloseClientConnections()
		srv.Close()
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, f := range b.failures {
			t.Error("fake broker: " + f)
		}
	})
	return srv.URL
}

// testConfig is a small, quick run of mode against url, with more flags after.
func testConfig(t *testing.T, url, mode string, more ...string) *config {
	t.Helper()
	args := []string{"--url", url, "--mode", mode, "--streams", "50", "--events", "100",
		"--timeout", "60s", "--connect_timeout", "10s", "--request_timeout", "10s", "--stall", "20s"}
	cfg, err := parseFlags(append(args, more...))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// runFor runs cfg within its timeout, with the progress in the test's log.
func runFor(t *testing.T, cfg *config) *result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
	defer cancel()
	var progress bytes.Buffer
	res, err := run(ctx, cfg, &progress)
	t.Log("progress:\n" + progress.String())
	if err != nil {
		t.Fatal(err)
	}
	var report bytes.Buffer
	res.print(&report)
	t.Log("report:\n" + report.String())
	return res
}

func TestRunFanout(t *testing.T) {
	cfg := testConfig(t, startFake(t, newFakeBroker()), "fanout")
	cfg.pid = os.Getpid() // the fake broker runs in this process
	res := runFor(t, cfg)
	if len(res.problems) > 0 {
		t.Fatalf("problems: %v", res.problems)
	}
	if res.opened != 50 || res.inserts.ok != 100 || res.inserts.lastID != 100 || !res.inserts.gapless {
		t.Errorf("opened %d, inserts %+v", res.opened, res.inserts)
	}
	if res.expected != 5000 || res.received != 5000 || res.lost != 0 || res.repeated != 0 || res.malformed != 0 {
		t.Errorf("expected %d received %d lost %d repeated %d malformed %d",
			res.expected, res.received, res.lost, res.repeated, res.malformed)
	}
	if res.latency.n != 5000 || res.latency.p50 <= 0 || res.latency.p99 < res.latency.p50 || res.latency.max < res.latency.p99 {
		t.Errorf("latency %+v", res.latency)
	}
	if res.cpu.wall <= 0 || res.lastDelivery.Before(res.inserts.start) {
		t.Errorf("phase %+v, last delivery %v before the first insert %v", res.cpu, res.lastDelivery, res.inserts.start)
	}
}

func TestRunPaced(t *testing.T) {
	cfg := testConfig(t, startFake(t, newFakeBroker()), "fanout")
	cfg.streams, cfg.events, cfg.rate = 10, 20, 200 // 20 inserts, 5 ms apart
	res := runFor(t, cfg)
	if len(res.problems) > 0 || res.received != 200 {
		t.Fatalf("received %d; problems: %v", res.received, res.problems)
	}
	if took := res.inserts.end.Sub(res.inserts.start); took < 19*5*time.Millisecond {
		t.Errorf("20 inserts at 200/s took %s, under 95 ms", took)
	}
}

func TestRunDetectsLossAndRepeats(t *testing.T) {
	b := newFakeBroker()
	// Stream 0 loses event 5, stream 1 gets event 6 twice, stream 2 loses the last event.
	b.fault = func(sub int, id uint64) int {
		switch {
		case sub == 0 && id == 5, sub == 2 && id == 10:
			return 0
		case sub == 1 && id == 6:
			return 2
		}
		return 1
	}
	// The streams end after the last event, so the run stops waiting for the two deliveries
	// that never come once every stream has ended, not after --stall.
	b.closeAfter = 10
	cfg := testConfig(t, startFake(t, b), "fanout")
	cfg.streams, cfg.events = 5, 10
	res := runFor(t, cfg)
	if res.expected != 50 || res.received != 48 || res.lost != 2 || res.repeated != 1 {
		t.Errorf("expected %d received %d lost %d repeated %d; want 50, 48, 2, 1",
			res.expected, res.received, res.lost, res.repeated)
	}
	if res.dropped != 5 || !strings.Contains(strings.Join(res.problems, "; "), "2 events lost, 1 repeated") {
		t.Errorf("problems %v", res.problems)
	}
}

func TestRunStreamCap(t *testing.T) {
	b := newFakeBroker()
	b.maxUserStreams = 6
	cfg := testConfig(t, startFake(t, b), "fanout")
	cfg.streams, cfg.events = 10, 5
	res := runFor(t, cfg)
	if res.opened != 6 || res.failed != 4 || res.received != 30 || res.lost != 0 {
		t.Errorf("opened %d failed %d received %d lost %d; want 6, 4, 30, 0", res.opened, res.failed, res.received, res.lost)
	}
	if !strings.Contains(strings.Join(res.problems, "; "), "--max_user_streams 10") {
		t.Errorf("problems %v, want the hint to raise --max_user_streams", res.problems)
	}
}

func TestRunIdle(t *testing.T) {
	b := newFakeBroker()
	cfg := testConfig(t, startFake(t, b), "idle", "--pid", fmt.Sprint(os.Getpid()), "--hold", "0s")
	res := runFor(t, cfg)
	if len(res.problems) > 0 || res.opened != 50 || res.rssOpen <= 0 || res.rssBefore <= 0 {
		t.Fatalf("opened %d, RSS %d then %d; problems %v", res.opened, res.rssBefore, res.rssOpen, res.problems)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.opened != 50 {
		t.Errorf("the fake saw %d streams", b.opened)
	}
}

func TestRunInserts(t *testing.T) {
	cfg := testConfig(t, startFake(t, newFakeBroker()), "inserts")
	cfg.events, cfg.publishers = 300, 8
	res := runFor(t, cfg)
	if len(res.problems) > 0 || res.inserts.ok != 300 || res.inserts.lastID != 300 || res.inserts.post.n != 300 {
		t.Fatalf("inserts %+v; problems %v", res.inserts, res.problems)
	}
}

func TestRunWrongAdminToken(t *testing.T) {
	cfg := testConfig(t, startFake(t, newFakeBroker()), "inserts")
	cfg.adminToken = "wrong"
	_, err := run(context.Background(), cfg, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "admin_token") {
		t.Fatalf("run with a wrong admin token: %v", err)
	}
}

func TestConfigBounds(t *testing.T) {
	for _, args := range [][]string{
		{"--mode", "idle"}, // no --pid
		{"--mode", "fanout", "--streams", "0"},
		{"--mode", "fanout", "--streams", "100001"},
		{"--mode", "fanout", "--events", "0"},
		{"--mode", "fanout", "--streams", "100000", "--events", "201"},
		{"--mode", "inserts", "--publishers", "0"},
		{"--mode", "fanout", "--rate", "-1"},
		{"--mode", "fanout", "--timeout", "0s"},
		{"--mode", "other"},
		{"--mode", "fanout", "stray"},
	} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("%q accepted", args)
		}
	}
	cfg, err := parseFlags([]string{"--mode", "idle", "--pid", "1", "--streams", "19000"})
	if err != nil || cfg.events != 0 || cfg.publishers != 0 || cfg.filesNeeded() != 19064 {
		t.Errorf("idle: %+v, %v", cfg, err)
	}
}

func TestLoopbackTarget(t *testing.T) {
	for raw, want := range map[string]string{
		"http://127.0.0.1:8080":  "http://127.0.0.1:8080",
		"http://localhost:18080": "http://127.0.0.1:18080",
		"http://[::1]:8080/":     "http://[::1]:8080",
	} {
		got, err := loopbackTarget(raw)
		if err != nil || got.base != want {
			t.Errorf("loopbackTarget(%s) = %q, %v; want %s", raw, got.base, err, want)
		}
	}
	for _, raw := range []string{"http://192.0.2.1:8080", "https://127.0.0.1:8443", "http://127.0.0.1:8080/sse", "127.0.0.1:8080"} {
		if _, err := loopbackTarget(raw); err == nil {
			t.Errorf("loopbackTarget(%s) accepted", raw)
		}
	}
}
