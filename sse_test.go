package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

type sseEvent struct {
	name, id, data string
	raw            string // the frame as received; a keep-alive is an sseEvent of its own
}

// stream is an open /sse connection read by a goroutine into events.
type stream struct {
	t      *testing.T
	resp   *http.Response
	events chan sseEvent // closed at end of stream
}

func (b *testBroker) stream(hdr ...string) *stream {
	b.t.Helper()
	return openStream(b.t, b.ts.URL+"/sse", http.DefaultClient, hdr...)
}

func openStream(t *testing.T, url string, client *http.Client, hdr ...string) *stream {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("GET /sse: got %d %s; want 200", resp.StatusCode, body)
	}
	st := &stream{t: t, resp: resp, events: make(chan sseEvent, 10000)}
	t.Cleanup(func() { resp.Body.Close() })
	go func() {
		defer close(st.events)
		r := bufio.NewReader(resp.Body)
		var ev sseEvent
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if line == ":\n" { // a keep-alive: handed on by itself, with only raw set
				st.events <- sseEvent{raw: line}
				continue
			}
			ev.raw += line
			switch {
			case line == "\n":
				st.events <- ev
				ev = sseEvent{}
			case strings.HasPrefix(line, "event:"):
				ev.name = strings.TrimSuffix(line[6:], "\n")
			case strings.HasPrefix(line, "id:"):
				ev.id = strings.TrimSuffix(line[3:], "\n")
			case strings.HasPrefix(line, "data:"):
				ev.data = strings.TrimSuffix(line[5:], "\n")
			}
		}
	}()
	return st
}

// next returns the next event (skipping heartbeats unless comments is set), failing the
// test if none arrives within 10 s.
func (st *stream) next() sseEvent {
	st.t.Helper()
	for {
		select {
		case ev, ok := <-st.events:
			if !ok {
				st.t.Fatal("stream ended; want an event")
			}
			if ev.name != "" {
				return ev
			}
		case <-time.After(10 * time.Second):
			st.t.Fatal("no event within 10 s")
		}
	}
}

// ended waits for the end of the stream.
func (st *stream) ended() {
	st.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case _, ok := <-st.events:
			if !ok {
				return
			}
		case <-deadline:
			st.t.Fatal("stream still open after 10 s")
		}
	}
}

func (b *testBroker) insert(jwt, name string, data any) uint64 {
	b.t.Helper()
	out := b.must(200, "POST", "/insert", obj{"event": name, "data": data}, bearer(jwt)...)
	return uint64(out["id"].(float64))
}

func expect(t *testing.T, ev sseEvent, name, id, data string) {
	t.Helper()
	if ev.name != name || ev.id != id || ev.data != data {
		t.Errorf("got event %q id %q data %q; want %q %q %q", ev.name, ev.id, ev.data, name, id, data)
	}
	if want := "event:" + name + "\nid:" + id + "\ndata:" + data + "\n\n"; ev.raw != want {
		t.Errorf("frame %q; want %q", ev.raw, want)
	}
}

func TestStreamSyncLiveAndIsolation(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	b.createUser("carl", "B")
	ja, jc := b.login("alice"), b.login("carl")
	b.insert(ja, "a", 1)
	b.insert(ja, "b", obj{"x": 2})
	b.insert(ja, "a", 3)

	sa := b.stream(bearer(ja)...)
	for k, v := range map[string]string{"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Access-Control-Allow-Origin": "*"} {
		if got := sa.resp.Header.Get(k); got != v {
			t.Errorf("header %s: got %q; want %q", k, got, v)
		}
	}
	// The latest event of every name, oldest first.
	expect(t, sa.next(), "b", "2", `{"x":2}`)
	expect(t, sa.next(), "a", "3", `3`)

	sc := b.stream(basic("carl", "pw-carl")...)
	if id := b.insert(ja, "c", "live"); id != 4 {
		t.Errorf("id: got %d; want 4", id)
	}
	expect(t, sa.next(), "c", "4", `"live"`)
	// carl's first event is his own tenant's: A's event never reached him.
	b.insert(jc, "own", true)
	expect(t, sc.next(), "own", "1", `true`)
}

func TestStreamResume(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	jwt := b.login("alice")
	for i := 1; i <= 5; i++ {
		b.insert(jwt, "n", i)
	}
	s := b.stream(append(bearer(jwt), "Last-Event-ID", "2")...)
	for i := 3; i <= 5; i++ {
		expect(t, s.next(), "n", fmt.Sprint(i), fmt.Sprint(i))
	}
	q := openStream(t, b.ts.URL+"/sse?last_event_id=4", http.DefaultClient, bearer(jwt)...)
	expect(t, q.next(), "n", "5", "5")
	b.insert(jwt, "n", 6)
	expect(t, s.next(), "n", "6", "6")
	expect(t, q.next(), "n", "6", "6")
	// A malformed Last-Event-ID is treated as absent: the latest of every name.
	m := b.stream(append(bearer(jwt), "Last-Event-ID", "abc")...)
	expect(t, m.next(), "n", "6", "6")
}

// TestStreamHandoff connects streams while inserts run: each must see every ID after its
// Last-Event-ID exactly once and in order, across the switch from history to live.
func TestStreamHandoff(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	jwt := b.login("alice")
	const total = 400
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < total/8; i++ {
				b.insert(jwt, fmt.Sprintf("e%d", w), i)
			}
		}()
	}
	var streams []*stream
	for i := 0; i < 5; i++ {
		streams = append(streams, b.stream(append(bearer(jwt), "Last-Event-ID", "0")...))
	}
	wg.Wait()
	for _, s := range streams {
		for want := 1; want <= total; want++ {
			if ev := s.next(); ev.id != fmt.Sprint(want) {
				t.Fatalf("got id %s; want %d", ev.id, want)
			}
		}
	}
}

func TestStreamDataRoundTrip(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	jwt := b.login("alice")
	s := b.stream(bearer(jwt)...)
	data := obj{"text": "line1\nline2\r\nline3\rend", "q": `"quoted" \ back`, "u": "héllo 😀 \u2028 日本", "r": "retry: 5\ndata: x\nevent: evil\n\n", "n": []any{1.5, nil, true}}
	b.insert(jwt, "weird.name/with-chars_1", data)
	ev := s.next()
	if ev.name != "weird.name/with-chars_1" || strings.Count(ev.raw, "\n") != 4 || strings.Contains(ev.raw, "\r") {
		t.Errorf("frame %q", ev.raw)
	}
	for _, c := range ev.raw {
		if c > 127 {
			t.Fatalf("frame has non-ASCII %q: %q", c, ev.raw)
		}
	}
	if strings.Contains(ev.data, "retry:") {
		t.Errorf("data carries a retry: field name that broker-client would cut at: %s", ev.data)
	}
	var got obj
	if err := json.Unmarshal([]byte(ev.data), &got); err != nil || !reflect.DeepEqual(got, data) {
		t.Errorf("data: got %v (%v); want %v", got, err, data)
	}
}

func TestInsertRefusesBadInput(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	jwt := b.login("alice")
	for _, name := range []string{"", "a b", "a\nb", "a:b", "é", "data:x", strings.Repeat("a", 129)} {
		b.must(400, "POST", "/insert", obj{"event": name, "data": 1}, bearer(jwt)...)
	}
	for _, body := range []string{`{"event":"x","data":}`, `{"event":"x","data":1,"extra":2}`, `{"data":1}`, `{"event":"x","data":1}x`, "\xff"} {
		if code, out := b.do("POST", "/insert", body, bearer(jwt)...); code != 400 {
			t.Errorf("insert %q: got %d %s; want 400", body, code, out)
		}
	}
	b.must(401, "POST", "/insert", obj{"event": "x", "data": 1})
	b.must(401, "POST", "/insert", obj{"event": "x", "data": 1}, "Authorization", "Bearer nope")
	if id := b.insert(jwt, "x", 1); id != 1 {
		t.Errorf("first good insert: got id %d; want 1 (a refused insert took an id)", id)
	}
}

func TestStreamRefusesWithoutCredentials(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	for _, hdr := range [][]string{nil, {"Authorization", "Bearer x.y.z"}, basic("alice", "wrong")} {
		code, out := b.do("GET", "/sse", nil, hdr...)
		if code != 401 || !strings.Contains(string(out), `"error"`) {
			t.Errorf("GET /sse %v: got %d %s; want 401 JSON", hdr, code, out)
		}
	}
}

func TestStreamEndsOnRevokeMoveAndShutdown(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	b.createUser("bob", "A")
	b.createUser("carl", "A")
	sa := b.stream(bearer(b.login("alice"))...)
	sb := b.stream(bearer(b.login("bob"))...)
	sc := b.stream(bearer(b.login("carl"))...)
	b.must(200, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": "alice"})
	sa.ended()
	b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "bob", "tenant_name": "B"})
	sb.ended()
	b.s.hub.closeStreams()
	sc.ended()
	// Cut without an answer: an EventSource gives up for good on any answer but 200.
	req, _ := http.NewRequest("GET", b.ts.URL+"/sse", nil)
	req.Header.Set("Authorization", "Bearer "+b.login("carl"))
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Errorf("stream after shutdown began: got %d; want the connection cut", resp.StatusCode)
	}
}

// TestStreamHeartbeat: a silent stream gets the keep-alive ":\n" (a comment line without
// the blank line), which the next event's frame follows.
func TestStreamHeartbeat(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	jwt := b.login("alice")
	s := b.stream(bearer(jwt)...)
	b.insert(jwt, "live", 1)
	s.next() // the stream is live
	// The client can have the frame before its writer marks the stream idle: wait for that,
	// or the sweep would rightly skip a stream still being written.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		subs := b.s.hub.all()
		subs[0].mu.Lock()
		queued := subs[0].queued
		subs[0].mu.Unlock()
		if !queued {
			break
		} else if time.Now().After(deadline) {
			t.Fatal("the stream is still being written after 10 s")
		}
	}
	hb := b.s.hub.cfg.heartbeat
	b.s.hub.sweep(time.Now().Add(hb - time.Second)) // not silent long enough
	b.s.hub.sweep(time.Now().Add(hb + time.Second)) // queues the keep-alive before the event
	b.insert(jwt, "after", 2)
	select {
	case ev := <-s.events:
		if ev.raw != ":\n" {
			t.Errorf("got %q; want the keep-alive", ev.raw)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no keep-alive")
	}
	expect(t, s.next(), "after", "2", "2")
}

func (b *testBroker) openStreams(user string) int {
	b.s.hub.mu.Lock()
	defer b.s.hub.mu.Unlock()
	return b.s.hub.perUser[user]
}

// TestSlowSubscriberDropped: a client that never reads is disconnected while a reading
// client of the same tenant receives every event.
func TestSlowSubscriberDropped(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("slow", "A")
	b.createUser("fast", "A")
	conn, err := net.Dial("tcp", b.ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.(*net.TCPConn).SetReadBuffer(4096)
	fmt.Fprintf(conn, "GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", b.login("slow"))
	fast := b.stream(bearer(b.login("fast"))...)
	for deadline := time.Now().Add(10 * time.Second); b.openStreams("slow") == 0; {
		if time.Now().After(deadline) {
			t.Fatal("slow stream never opened")
		}
		time.Sleep(time.Millisecond) // polling the hub's state, bounded by the deadline
	}
	jwt := b.login("fast")
	big := strings.Repeat("x", 60<<10)
	n := 0
	for ; b.openStreams("slow") > 0; n++ {
		if n > 200 {
			t.Fatal("slow subscriber still connected after 200 events of 60 KiB")
		}
		b.insert(jwt, "big", big)
		if ev := fast.next(); ev.id != fmt.Sprint(n+1) {
			t.Fatalf("fast subscriber: got id %s; want %d", ev.id, n+1)
		}
	}
	b.insert(jwt, "after", 1)
	if ev := fast.next(); ev.name != "after" {
		t.Errorf("fast subscriber after the drop: got %q", ev.name)
	}
}

func TestStreamLimits(t *testing.T) {
	b := newTestBroker(t, func(c *config) { c.maxUserStreams = 2 })
	b.createUser("alice", "A")
	jwt := b.login("alice")
	b.stream(bearer(jwt)...)
	b.stream(bearer(jwt)...)
	code, _ := b.do("GET", "/sse", nil, bearer(jwt)...)
	if code != 429 {
		t.Errorf("third stream: got %d; want 429", code)
	}
	c := newTestBroker(t, func(c *config) { c.maxStreams = 1 })
	c.createUser("amy", "A")
	c.createUser("ben", "A")
	c.stream(bearer(c.login("amy"))...)
	c.must(429, "GET", "/sse", nil, bearer(c.login("ben"))...)
}

// TestBrokerClientCompat drives the published npm broker-client 0.0.8 with Node against a
// running broker (testdata/broker-client.mjs).
func TestBrokerClientCompat(t *testing.T) {
	node, err := exec.LookPath("node")
	pkg := filepath.Join("testdata", "node_modules", "broker-client", "index.js")
	if _, serr := os.Stat(pkg); err != nil || serr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("node or broker-client missing (%v): run npm ci --prefix testdata", err)
		}
		t.Skip("needs node and broker-client: apt-get install -y nodejs npm && npm ci --prefix testdata")
	}
	b := newTestBroker(t, func(c *config) { c.heartbeat = 100 * time.Millisecond })
	b.createUser("alice", "A")
	jwt := b.login("alice")
	b.insert(jwt, "synced", obj{"n": 1, "s": "héllo"})
	cmd := exec.Command(node, "testdata/broker-client.mjs", b.ts.URL, jwt)
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := bufio.NewScanner(stdout)
	next := func() string {
		t.Helper()
		got := make(chan string, 1)
		go func() {
			if lines.Scan() {
				got <- lines.Text()
			}
			close(got)
		}()
		select {
		case l := <-got:
			return l
		case <-time.After(20 * time.Second):
			t.Fatal("no output from node within 20 s")
		}
		return ""
	}
	if l := next(); l != `synced 1 {"n":1,"s":"héllo"}` {
		t.Fatalf("synced event: got %s", l)
	}
	// Several keep-alives reach the idle client (as they reach this idle stream) before the
	// next event: its onmessage, which parses every message, must never see one.
	watch := b.stream(bearer(jwt)...)
	watch.next()
	for seen, deadline := 0, time.After(10*time.Second); seen < 3; {
		select {
		case ev := <-watch.events:
			if ev.name == "" {
				seen++
			}
		case <-deadline:
			t.Fatal("no keep-alives within 10 s")
		}
	}
	b.insert(jwt, "live", obj{"text": "a\nb \"c\" 日本 😀"})
	if l := next(); l != `live 2 {"text":"a\nb \"c\" 日本 😀"}` {
		t.Fatalf("live event: got %s", l)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("node: %v", err)
	}
}

// discardConn is a connection whose writes always succeed at once.
type discardConn struct{ net.Conn }

func (discardConn) Write(b []byte) (int, error)      { return len(b), nil }
func (discardConn) SetWriteDeadline(time.Time) error { return nil }
func (discardConn) Close() error                     { return nil }

func BenchmarkEncodeEvent(b *testing.B) {
	raw := []byte(`{"seq": 1234, "ts": 1764345600000000000, "text": "héllo wörld", "tags": ["a", "b"]}`)
	b.ReportAllocs()
	for b.Loop() {
		data, _ := compactASCII(raw)
		appendFrame(nil, 123456, []byte("bench"), data)
	}
}

// BenchmarkPublish publishes events to 10,000 subscribers of one tenant whose writes cost
// nothing: the hub's own cost per delivery.
func BenchmarkPublish(b *testing.B) {
	st, err := openStore(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer st.close()
	cfg := testConfig(b)
	cfg.maxStreams, cfg.maxUserStreams = 20000, 20000
	h, _ := newHub(st, slog.New(slog.NewTextHandler(io.Discard, nil)), cfg)
	defer h.close()
	const subs = 10000
	for range subs {
		s, _, _ := h.subscribe(&user{Username: "u", Tenant: "t"}, time.Now().Add(time.Hour))
		s.conn, s.queued = discardConn{}, false
	}
	ev := &event{Tenant: "t", Name: "bench", Data: []byte(`{"seq":1,"ts":1764345600000000000}`), ID: 1}
	b.ReportAllocs()
	for b.Loop() {
		h.publish([]*event{ev})
	}
	h.closeStreams()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*subs), "ns/delivery")
}

// TestKeepAliveInBrokerClientParser feeds broker-client's own parser the keep-alive between
// two frames, in one read with them and in reads of its own: it must dispatch exactly the
// two events, and the ":\n\n" comment most servers send must not pass (it would reach
// onmessage as an empty message).
func TestKeepAliveInBrokerClientParser(t *testing.T) {
	node, err := exec.LookPath("node")
	if _, serr := os.Stat(filepath.Join("testdata", "node_modules", "broker-client", "utils.js")); err != nil || serr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("node or broker-client missing (%v): run npm ci --prefix testdata", err)
		}
		t.Skip("needs node and broker-client: apt-get install -y nodejs npm && npm ci --prefix testdata")
	}
	parse := func(keepAlive string) []string {
		arg, _ := json.Marshal(keepAlive)
		out, err := exec.Command(node, "testdata/keepalive.mjs", string(arg)).Output()
		if err != nil {
			t.Fatalf("node: %v", err)
		}
		return strings.Fields(string(out))
	}
	want := `[["news","1","{\"n\":1}"],["news","2","{\"n\":2}"]]`
	for i, got := range parse(string(keepAlive)) {
		if got != want {
			t.Errorf("reads split %d ways: got %s; want %s", i, got, want)
		}
	}
	if got := parse(":\n\n"); got[0] == want {
		t.Errorf("a \":\\n\\n\" comment in one read passed as nothing: %s; the test cannot tell keep-alives apart", got[0])
	}
}
