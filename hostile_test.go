package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Tests of the issue "Hostile load: no request can exhaust CPU or memory or stall the others".

// waitFor polls cond until it holds, failing the test after within.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(time.Millisecond) { // polling, bounded by the deadline
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
	}
}

// post sends a POST from any goroutine (it never fails the test itself) and returns the
// status and the answer's Retry-After.
func post(client *http.Client, url, body string, hdr ...string) (code int, retryAfter string, err error) {
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	_, err = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header.Get("Retry-After"), err
}

// bigData is a JSON string of n ASCII bytes in all (quotes included).
func bigData(n int) string { return `"` + strings.Repeat("x", n-2) + `"` }

// insertMany inserts n events whose data is the JSON data into base from workers
// goroutines, and returns the first insert not answered 200.
func insertMany(base, jwt string, n, workers int, data string) error {
	client := &http.Client{Timeout: 60 * time.Second}
	jobs := make(chan int, n)
	for i := range n {
		jobs <- i
	}
	close(jobs)
	errs := make(chan error, workers)
	for range workers {
		go func() {
			var first error
			for i := range jobs {
				code, _, err := post(client, base+"/insert", `{"event":"e`+strconv.Itoa(i%4)+`","data":`+data+`}`, bearer(jwt)...)
				if err == nil && code != 200 {
					err = fmt.Errorf("insert %d: got %d; want 200", i, code)
				}
				if first == nil {
					first = err
				}
			}
			errs <- first
		}()
	}
	var first error
	for range workers {
		if err := <-errs; first == nil {
			first = err
		}
	}
	return first
}

// preload commits n events whose data is the JSON data to tenant straight through the
// hub, from 8 goroutines: quicker than over HTTP under -race.
func preload(t *testing.T, h *hub, tenant string, n int, data string) {
	t.Helper()
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				if _, err := h.insert(&event{Tenant: tenant, Name: "e" + strconv.Itoa(i%4), Data: []byte(data)}); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// dialSmall connects to addr with a 4 KiB receive buffer, set before the connection is
// made so the window the server sees is small from the start.
func dialSmall(addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return err
	}}
	return d.Dial("tcp", addr)
}

// rawSSE opens GET /sse on addr over a connection with a small receive buffer, sends the
// request (with Last-Event-ID unless lastID is empty) and returns the connection unread.
func rawSSE(addr, jwt, lastID string) (net.Conn, error) {
	c, err := dialSmall(addr)
	if err != nil {
		return nil, err
	}
	req := "GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + jwt + "\r\n"
	if lastID != "" {
		req += "Last-Event-ID: " + lastID + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// cpuTime is the CPU time (user and system) the process has used so far.
func cpuTime(t *testing.T) time.Duration {
	t.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestPasswordCheckCost: with --password_checker, a 1024-byte random password costs little
// CPU (zxcvbn's cost grows steeply with length: it scores a bounded prefix); a reset checks
// the code before the password; a cancelled request stops before scoring.
func TestPasswordCheckCost(t *testing.T) {
	b := newTestBroker(t, func(c *config) { c.passwordChecker = true })
	pw := make([]byte, maxPassword)
	for i := range pw {
		pw[i] = byte('!' + rand.IntN('~'-'!'+1)) // printable ASCII, no space
	}
	checked := make(chan error, 1)
	before := cpuTime(t)
	go func() { checked <- b.s.checkPassword(context.Background(), string(pw), "u", "") }()
	select {
	case err := <-checked:
		if used := cpuTime(t) - before; used > 3*time.Second {
			t.Errorf("checkPassword of a random %d-byte password: got %v of CPU; want under 3 s", len(pw), used)
		}
		if err != nil {
			t.Errorf("checkPassword of a random %d-byte password: got %v; want nil (strong)", len(pw), err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("checkPassword of a random %d-byte password: still running after 20 s; want under 3 s of CPU", len(pw))
	}

	strong := "correct horse battery staple 93"
	b.must(200, "POST", "/create_user", obj{"username": "rita", "password": strong, "admin_token": "letmein", "tenant_name": "t"})
	code := b.must(200, "POST", "/create_totp", obj{"admin_token": "letmein", "username": "rita"})["totp"].(string)
	n, _ := strconv.Atoi(code)
	wrong := fmt.Sprintf("%06d", (n+1)%1_000_000)
	b.must(401, "POST", "/password_reset", obj{"username": "rita", "totp": wrong, "password": "password1"})
	b.must(400, "POST", "/password_reset", obj{"username": "rita", "totp": code, "password": "password1"})
	b.must(200, "POST", "/password_reset", obj{"username": "rita", "totp": code, "password": strong + "!"})

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.s.checkPassword(ctx, string(pw), "u", ""); !errors.Is(err, context.Canceled) {
		t.Errorf("checkPassword with a cancelled context: got %v; want %v", err, context.Canceled)
	}
}

// TestOversizedUsernamesKeepNoKeys: logins and HTTP Basic with 100 KiB usernames are
// refused before anything is counted, so they leave no throttle entry behind.
func TestOversizedUsernamesKeepNoKeys(t *testing.T) {
	b := newTestBroker(t)
	long := strings.Repeat("u", 100<<10)
	for i := range 200 {
		if code, out := b.do("POST", "/login", obj{"username": long + strconv.Itoa(i), "password": "guess"}); code != 400 {
			t.Fatalf("login %d with a 100 KiB username: got %d %.100s; want 400", i, code, out)
		}
	}
	for i := range 50 {
		if code, out := b.do("GET", "/verify", nil, basic(long+strconv.Itoa(i), "guess")...); code != 401 {
			t.Fatalf("Basic %d with a 100 KiB username: got %d %.100s; want 401", i, code, out)
		}
	}
	b.s.throttle.mu.Lock()
	n := len(b.s.throttle.strikes)
	b.s.throttle.mu.Unlock()
	if n != 0 {
		t.Errorf("throttle keys after refused oversized usernames: got %d; want 0", n)
	}
}

// TestBacklogPagedByBytes: streams that ask for a 7 MB history and never read hold about a
// page each, not the history; they end when their clients go; a reading stream gets the
// whole history in order.
func TestBacklogPagedByBytes(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("hist", "H")
	jwt := b.login("hist")
	const events, streams = 120, 100
	preload(t, b.s.hub, "H", events, bigData(60<<10))
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	base := heap()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range streams {
		c, err := rawSSE(b.ts.Listener.Addr().String(), jwt, "0")
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	waitFor(t, 10*time.Second, "stalled streams registered", func() bool { return b.openStreams("hist") == streams })
	// Each handler reads pages of the backlog until its socket's buffers are full, then
	// blocks writing one. Measure once they are stuck: the user's page turns held and
	// allocation stopped (while the kernel still takes pages, the heap holds their garbage).
	var m runtime.MemStats
	waitFor(t, 10*time.Second, "stalled streams stopped allocating", func() bool {
		runtime.ReadMemStats(&m)
		before := m.TotalAlloc
		time.Sleep(50 * time.Millisecond) // the sampling interval
		runtime.ReadMemStats(&m)
		return m.TotalAlloc-before < 64<<10
	})
	// At most userPages pages of about maxPage bytes (the last event may pass it) are held
	// for the one user; the other streams wait for a turn, holding a few KiB each. Their
	// histories would take 700 MB.
	bound := int64(userPages*(maxPage+maxEventData) + streams*(64<<10) + 8<<20)
	if grown := int64(heap()) - int64(base); grown > bound {
		t.Errorf("heap growth with %d stalled streams of a %d-event history: got %.1f MiB; want under %.1f MiB", streams, events, float64(grown)/(1<<20), float64(bound)/(1<<20))
	} else {
		t.Logf("heap growth with %d stalled streams: %.1f MiB", streams, float64(grown)/(1<<20))
	}
	for _, c := range conns {
		c.Close()
	}
	waitFor(t, 10*time.Second, "stalled streams ended after their clients closed", func() bool { return b.openStreams("hist") == 0 })

	s := b.stream(append(bearer(jwt), "Last-Event-ID", "0")...)
	for want := 1; want <= events; want++ {
		ev := s.next()
		if ev.id != strconv.Itoa(want) || len(ev.data) != 60<<10 {
			t.Fatalf("backlog event: got id %s with %d bytes of data; want id %d with %d", ev.id, len(ev.data), want, 60<<10)
		}
	}
}

// TestInsertBudget: large request bodies take turns (a small one never waits; a large one
// waits for a turn, gives up with its request's context, and is answered 503 after 5 s);
// event data over maxEventData once escaped, and bodies over 1 MiB, are refused with 413
// and store nothing.
func TestInsertBudget(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("ins", "I")
	jwt := b.login("ins")
	large := func(ctx context.Context) *http.Request {
		r := httptest.NewRequestWithContext(ctx, "POST", "/insert", strings.NewReader("{}"))
		r.ContentLength = -1 // unknown length: a large body's turn
		return r
	}
	read := func(r *http.Request) error {
		release, err := b.s.readJSON(httptest.NewRecorder(), r, "ins", &map[string]any{})
		release()
		return err
	}
	turns := cap(b.s.largeBodies)
	for range turns {
		b.s.largeBodies <- struct{}{}
	}
	defer func() {
		for len(b.s.largeBodies) > 0 {
			<-b.s.largeBodies
		}
	}()
	if err := read(httptest.NewRequest("POST", "/insert", strings.NewReader("{}"))); err != nil {
		t.Errorf("small body with every turn taken: got %v; want nil at once", err)
	}
	// The turn lasts until the request is answered, with the copies of its body.
	release, _ := b.s.readJSON(httptest.NewRecorder(), httptest.NewRequest("POST", "/insert", strings.NewReader("{}")), "ins", &map[string]any{})
	if n := len(b.s.smallBodies); n != 1 {
		t.Errorf("small turns taken before the request is answered: got %d; want 1", n)
	}
	if release(); len(b.s.smallBodies) != 0 {
		t.Errorf("small turns taken after the request is answered: got %d; want 0", len(b.s.smallBodies))
	}
	if id := b.insert(jwt, "small", 1); id != 1 {
		t.Errorf("small insert with every turn taken: got id %d; want 1", id)
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	if err := read(large(cancelled)); !errors.Is(err, context.Canceled) {
		t.Errorf("large body with a cancelled context and every turn taken: got %v; want %v", err, context.Canceled)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("large body with a cancelled context: returned after %v; want at once", d)
	}
	start = time.Now()
	code, retry, err := post(http.DefaultClient, b.ts.URL+"/insert", `{"event":"big","data":`+bigData(smallBody+10)+`}`, bearer(jwt)...)
	if d := time.Since(start); err != nil || code != 503 || retry == "" || d < 4*time.Second {
		t.Errorf("large insert with every turn taken: got %d (Retry-After %q, %v) after %v; want 503 with Retry-After after 5 s", code, retry, err, d)
	}
	waiting := make(chan error, 1)
	go func() { waiting <- read(large(context.Background())) }()
	select {
	case err := <-waiting:
		t.Fatalf("large body with every turn taken: returned %v at once; want it to wait", err)
	case <-time.After(50 * time.Millisecond): // checking that nothing happens
	}
	<-b.s.largeBodies // a turn is given back
	select {
	case err := <-waiting:
		if err != nil {
			t.Fatalf("large body once a turn is free: got %v; want nil", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("large body still waiting 3 s after a turn was given back")
	}
	for len(b.s.largeBodies) > 0 {
		<-b.s.largeBodies
	}

	for name, data := range map[string]string{
		"maxEventData+1 ASCII bytes":       bigData(maxEventData + 1),
		"70,000 ASCII bytes":               bigData(70_000),
		"12,000 é (6 bytes each, escaped)": `"` + strings.Repeat("é", 12_000) + `"`,
		"a body over 1 MiB":                bigData(maxBody + 1),
	} {
		if code, out := b.do("POST", "/insert", `{"event":"big","data":`+data+`}`, bearer(jwt)...); code != 413 {
			t.Errorf("insert of %s: got %d %.100s; want 413", name, code, out)
		}
	}
	if n := len(storedEvents(t, b.s.db, "I")); n != 1 {
		t.Errorf("events stored after refused inserts: got %d; want 1 (the small one)", n)
	}
	if code, out := b.do("POST", "/insert", `{"event":"edge","data":`+bigData(maxEventData)+`}`, bearer(jwt)...); code != 200 {
		t.Errorf("insert of exactly maxEventData bytes: got %d %.100s; want 200", code, out)
	}
	if id := b.insert(jwt, "small", obj{"ok": true}); id != 3 {
		t.Errorf("small insert: got id %d; want 3", id)
	}
}

// TestFanoutSharesFrames: an event published to many streams is one frame they all
// reference, and a stream that falls maxPending bytes behind is dropped.
func TestFanoutSharesFrames(t *testing.T) {
	st, err := openStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	cfg := testConfig(t)
	cfg.maxStreams, cfg.maxUserStreams = 2000, 2000
	h, err := newHub(st, slog.New(slog.NewTextHandler(io.Discard, nil)), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	subs := make([]*subscriber, 1000)
	for i := range subs {
		if subs[i], _, err = h.subscribe(&user{Username: "u", Tenant: "t"}, time.Now().Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	defer func() { // still syncing, so no handler or writer would finish them
		for _, s := range subs {
			s.finish()
		}
	}()
	data := []byte(bigData(60 << 10))
	h.publish([]*event{{Tenant: "t", Name: "big", Data: data, ID: 1}})
	var shared *byte
	for i, s := range subs {
		s.mu.Lock()
		n, size := len(s.pending), s.size
		var p *byte
		if n == 1 {
			p = &s.pending[0][0]
		}
		s.mu.Unlock()
		if n != 1 || size < len(data) {
			t.Fatalf("subscriber %d: got %d frames of %d bytes pending; want 1 of over %d", i, n, size, len(data))
		}
		if i == 0 {
			shared = p
		} else if p != shared {
			t.Fatalf("subscriber %d: got a frame of its own; want the frame shared with subscriber 0", i)
		}
	}
	// Frames of about 60 KiB: the fourth still fits in maxPending (256 KiB), the fifth does not.
	for id := uint64(2); id <= 5; id++ {
		h.publish([]*event{{Tenant: "t", Name: "big", Data: data, ID: id}})
		for i, s := range subs {
			s.mu.Lock()
			ending, n, size, dropped := s.ending, len(s.pending), s.size, s.pending == nil
			s.mu.Unlock()
			if id < 5 && (ending || n != int(id)) {
				t.Fatalf("after event %d, subscriber %d: got ending %v with %d frames; want not ending with %d", id, i, ending, n, id)
			} else if id == 5 && (!ending || n != 0 || size != 0 || !dropped) {
				t.Fatalf("after event 5 (over maxPending), subscriber %d: got ending %v with %d frames, %d bytes; want dropped with nothing pending", i, ending, n, size)
			}
		}
	}
}

// TestStalledBackupDoesNotBlockInserts: a backup download that stops reading does not
// hold up inserts that grow the database file.
func TestStalledBackupDoesNotBlockInserts(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("w", "t")
	jwt := b.login("w")
	// A database (7 MB) larger than what the sockets can buffer (4 MiB at most), so the
	// download really stalls.
	preload(t, b.s.hub, "t", 120, bigData(60<<10))
	conn, err := dialSmall(b.ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close() // also on failure: what a stalled download holds is let go
	body := `{"admin_token":"letmein"}`
	fmt.Fprintf(conn, "POST /backup HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	status, err := bufio.NewReaderSize(conn, 64).ReadString('\n')
	if err != nil || !strings.HasPrefix(status, "HTTP/1.1 200") {
		t.Fatalf("backup: got status line %q (%v); want HTTP/1.1 200", status, err)
	}
	// The download now stalls; 300 more events of 60 KiB grow the file.
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- insertMany(b.ts.URL, jwt, 300, 8, bigData(60<<10)) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("inserts during a stalled backup: %v", err)
		}
		t.Logf("300 inserts during a stalled backup took %v", time.Since(start))
	case <-time.After(30 * time.Second):
		t.Fatal("300 inserts during a stalled backup: not all answered within 30 s")
	}
	if n := len(storedEvents(t, b.s.db, "t")); n != 420 {
		t.Errorf("stored events: got %d; want 420", n)
	}
}

// TestHashSlotsFairShare: with every hash slot busy, one account from one address has at
// most 2 logins waiting for a slot (the others are refused at once), and another user from
// another address still gets a place in the queue.
func TestHashSlotsFairShare(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "t")
	b.createUser("bob", "t")
	slots := cap(b.s.hashSlots)
	for range slots {
		b.s.hashSlots <- struct{}{}
	}
	held := true
	drain := func() {
		if held {
			held = false
			for range slots {
				<-b.s.hashSlots
			}
		}
	}
	defer drain()
	type answer struct {
		code       int
		retryAfter string
		err        error
	}
	login := func(client *http.Client, name string, to chan<- answer) {
		code, retry, err := post(client, b.ts.URL+"/login", `{"username":"`+name+`","password":"pw-`+name+`"}`)
		to <- answer{code, retry, err}
	}
	alice := make(chan answer, 10)
	start := make(chan struct{})
	var ready sync.WaitGroup
	for range 10 {
		ready.Add(1)
		go func() {
			ready.Done()
			<-start
			login(http.DefaultClient, "alice", alice)
		}()
	}
	ready.Wait()
	close(start)
	refused, timeout := 0, time.After(5*time.Second)
	for refused < 8 {
		select {
		case a := <-alice:
			if a.err != nil || a.code != 429 || a.retryAfter == "" {
				t.Fatalf("alice's login while the slots are held: got %d (Retry-After %q, %v); want 429 with Retry-After, or waiting", a.code, a.retryAfter, a.err)
			}
			refused++
		case <-timeout:
			t.Fatalf("alice's logins answered 429 within 5 s: got %d; want 8 (at most 2 wait for a slot)", refused)
		}
	}
	b.s.throttle.mu.Lock()
	waiting := b.s.throttle.strikes[accountKey("login", "alice")].inflight
	b.s.throttle.mu.Unlock()
	if waiting != 2 {
		t.Errorf("alice's logins waiting for a slot: got %d; want 2", waiting)
	}

	other := &http.Client{Transport: &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}).DialContext}}
	defer other.CloseIdleConnections()
	bob := make(chan answer, 1)
	go login(other, "bob", bob)
	waitFor(t, 5*time.Second, "bob's login from 127.0.0.2 admitted to wait for a slot", func() bool {
		select {
		case a := <-bob:
			t.Fatalf("bob's login while the slots are held: got %d (%v); want it waiting", a.code, a.err)
		default:
		}
		b.s.throttle.mu.Lock()
		defer b.s.throttle.mu.Unlock()
		return b.s.throttle.strikes[accountKey("login", "bob")].inflight == 1
	})

	drain()
	for i, c := range []chan answer{bob, alice, alice} {
		select {
		case a := <-c:
			if a.err != nil || a.code != 200 {
				t.Errorf("waiting login %d once slots are free: got %d (%v); want 200", i, a.code, a.err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("waiting login %d: no answer within 10 s of the slots being freed", i)
		}
	}
}

// TestScopeBounds: scopes are bounded in number and size (quickly refused beyond), and a
// user with every field at its maximum gets a JWT that the verifier accepts.
func TestScopeBounds(t *testing.T) {
	b := newTestBroker(t)
	create := func(name string, scopes []string) (int, []byte) {
		return b.do("POST", "/create_user", obj{"username": name, "password": "pw-" + name, "admin_token": "letmein", "tenant_name": "t", "scopes": scopes})
	}
	scopes := func(n, size int) []string {
		s := make([]string, n)
		for i := range s {
			p := fmt.Sprintf("r%05d:", i)
			s[i] = p + strings.Repeat("o", size-len(p))
		}
		return s
	}
	if code, out := create("many", scopes(maxScopes+1, 10)); code != 400 {
		t.Errorf("%d scopes: got %d %s; want 400", maxScopes+1, code, out)
	}
	if code, out := create("long", scopes(1, maxScopeBytes+1)); code != 400 {
		t.Errorf("a scope of %d bytes: got %d %s; want 400", maxScopeBytes+1, code, out)
	}
	start := time.Now()
	if code, out := create("huge", scopes(20_000, 10)); code != 400 {
		t.Errorf("20,000 scopes: got %d %s; want 400", code, out)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("20,000 scopes refused after %v; want under 2 s", d)
	}

	name, tenant := strings.Repeat("𝔘", 64), strings.Repeat("𝔗", 64)
	b.createUser(name, tenant, obj{"scopes": scopes(maxScopes, maxScopeBytes)})
	jwt := b.login(name)
	if len(jwt) > maxJWT {
		t.Errorf("JWT of the largest user: got %d bytes; want at most %d", len(jwt), maxJWT)
	}
	var v struct {
		Username string
		Scopes   []string
	}
	_, out := b.do("GET", "/verify", nil, bearer(jwt)...)
	if err := json.Unmarshal(out, &v); err != nil || v.Username != name || len(v.Scopes) != maxScopes {
		t.Errorf("verify of the largest user: got %.200s (%v); want its username and %d scopes", out, err, maxScopes)
	}
	b.must(200, "GET", "/verify", nil, basic(name, "pw-"+name)...)
}

// TestPanicsAnswered: a panicking handler is answered 500 and the server goes on; a
// connection without a socket is not taken for a closed one; a corrupt database fails the
// start with an error rather than a panic.
func TestPanicsAnswered(t *testing.T) {
	b := newTestBroker(t)
	ts := httptest.NewServer(b.s.common(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/boom" {
			panic("boom")
		}
		w.Write([]byte("ok"))
	})))
	defer ts.Close()
	for _, c := range []struct{ path, body string }{{"/boom", `{"error":"internal error"}`}, {"/ok", "ok"}, {"/boom", `{"error":"internal error"}`}} {
		resp, err := ts.Client().Get(ts.URL + c.path)
		if err != nil {
			t.Fatalf("GET %s: %v; want an answer", c.path, err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := map[bool]int{true: 500, false: 200}[c.path == "/boom"]; resp.StatusCode != want || string(got) != c.body {
			t.Errorf("GET %s: got %d %s; want %d %s", c.path, resp.StatusCode, got, want, c.body)
		}
	}
	if want := `level=ERROR msg="request failed" method=GET path=/boom addr=127.0.0.1 status=500 err="panic: boom`; !strings.Contains(b.logs.String(), want) {
		t.Errorf("no log line with %q:\n%s", want, b.logs)
	}

	c := newTestBroker(t)
	c.createUser("a", "t")
	c.createUser("b", "t", obj{"scopes": []string{"x:y"}, "data": obj{"k": strings.Repeat("v", 5000)}})
	jwt := c.login("a")
	for i := range 30 {
		c.insert(jwt, "e"+strconv.Itoa(i%3), strings.Repeat("x", 3000))
	}
	c.stop()
	path := filepath.Join(c.s.cfg.db, "broker.db")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) <= 4*4096 {
		t.Fatalf("database of %d bytes; want more than 4 pages", len(raw))
	}
	for i := 4 * 4096; i < len(raw); i++ {
		raw[i] = 0xAA
	}
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	func() {
		defer func() {
			if v := recover(); v != nil {
				t.Errorf("newServer on a corrupt database panicked: %v; want an error", v)
			}
		}()
		s, err := newServer(c.s.cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Now)
		if err == nil {
			t.Log("newServer opened the corrupt database (it read none of the damaged pages)")
			s.close()
			return
		}
		t.Logf("newServer on a corrupt database: %v", err)
	}()
}

// TestStreamsRace opens and closes streams (some never read) while events of 60 KiB are
// inserted, a user is revoked and unrevoked and the sweep sends keep-alives, under -race;
// then a revoked user's stalled stream must end at once, and every stream at shutdown
// within the write timeout.
func TestStreamsRace(t *testing.T) {
	b := newTestBroker(t, func(c *config) { c.heartbeat = 100 * time.Millisecond }) // sweeps every 50 ms
	users := []string{"reader", "staller", "victim", "writer"}
	for _, u := range users {
		b.createUser(u, "T")
	}
	// A history larger than a socket's send buffer (4 MiB at most), so streams that do not
	// read really stall in their backlog.
	preload(t, b.s.hub, "T", 100, bigData(60<<10))
	jwts := map[string]string{"reader": b.login("reader"), "staller": b.login("staller"), "writer": b.login("writer")}
	var victim atomic.Value // its current JWT: each unrevoke needs a new one
	victim.Store(b.login("victim"))
	addr := b.ts.Listener.Addr().String()
	errs := make(chan error, 100)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	var wg sync.WaitGroup
	var opened, inserted, revoked atomic.Int64
	var leftMu sync.Mutex
	var leftOpen []net.Conn // stalled streams still open at the stop, closed after closeStreams
	defer func() {
		leftMu.Lock()
		defer leftMu.Unlock()
		for _, c := range leftOpen {
			c.Close()
		}
	}()
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stopped(); i++ {
				who := []string{"reader", "reader", "staller", "victim"}[g%4]
				jwt := jwts[who]
				if who == "victim" {
					jwt = victim.Load().(string)
				}
				reads := who == "reader" || who == "victim" && i%2 == 0
				conn, err := rawSSE(addr, jwt, []string{"", "0", "3"}[i%3])
				if err != nil {
					report(err)
					return
				}
				opened.Add(1)
				if !reads {
					select {
					case <-stop:
						leftMu.Lock()
						leftOpen = append(leftOpen, conn)
						leftMu.Unlock()
						return
					case <-time.After(time.Duration(20+rand.IntN(200)) * time.Millisecond): // holds the stalled stream a while
						conn.Close()
						continue
					}
				}
				conn.SetReadDeadline(time.Now().Add(time.Duration(50+rand.IntN(200)) * time.Millisecond))
				r := bufio.NewReader(conn)
				status, err := r.ReadString('\n')
				if who == "reader" && err == nil && !strings.HasPrefix(status, "HTTP/1.1 200") {
					report(fmt.Errorf("reader's stream: got status %q; want 200", status))
				}
				io.CopyN(io.Discard, r, 256<<10) // until 256 KiB, the deadline or the end
				conn.Close()
			}
		}()
	}
	client := &http.Client{Timeout: 20 * time.Second}
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stopped(); i++ {
				code, _, err := post(client, b.ts.URL+"/insert", `{"event":"e`+strconv.Itoa(i%3)+`","data":`+bigData(60<<10)+`}`, bearer(jwts["writer"])...)
				if err != nil || code != 200 {
					report(fmt.Errorf("insert: got %d (%v); want 200", code, err))
				} else {
					inserted.Add(1)
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stopped() {
			for _, path := range []string{"/revoke_user", "/unrevoke_user"} {
				if code, _, err := post(client, b.ts.URL+path, `{"admin_token":"letmein","username":"victim"}`); err != nil || code != 200 {
					report(fmt.Errorf("%s: got %d (%v); want 200", path, code, err))
				}
			}
			revoked.Add(1)
			req, _ := http.NewRequest("POST", b.ts.URL+"/login", strings.NewReader(`{"username":"victim","password":"pw-victim"}`))
			resp, err := client.Do(req)
			if err != nil {
				report(err)
				continue
			}
			var out struct{ JWT string }
			if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 200 {
				report(fmt.Errorf("victim's login: got %d (%v); want 200", resp.StatusCode, err))
			} else {
				victim.Store(out.JWT)
			}
			resp.Body.Close()
		}
	}()

	<-time.After(2 * time.Second) // the length of the run
	close(stop)
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(25 * time.Second):
		t.Fatal("the load's goroutines did not stop within 25 s")
	}
	revoke := func(path string) { b.must(200, "POST", path, obj{"admin_token": "letmein", "username": "victim"}) }
	revoke("/revoke_user")
	waitFor(t, 10*time.Second, "the revoked victim's streams ended", func() bool { return b.openStreams("victim") == 0 })
	// A stalled stream (blocked writing its backlog) of a revoked user ends at once, not
	// when its write times out.
	revoke("/unrevoke_user")
	conn, err := rawSSE(addr, b.login("victim"), "0")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if status, err := bufio.NewReaderSize(conn, 64).ReadString('\n'); err != nil || !strings.HasPrefix(status, "HTTP/1.1 200") {
		t.Fatalf("victim's stalled stream: got status line %q (%v); want HTTP/1.1 200", status, err)
	}
	revoke("/revoke_user")
	waitFor(t, time.Second, "the stalled stream of the revoked victim ended", func() bool { return b.openStreams("victim") == 0 })

	closed := make(chan struct{})
	go func() { b.s.hub.closeStreams(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(15 * time.Second):
		t.Fatal("closeStreams did not return within 15 s")
	}
	for _, u := range users {
		if n := b.openStreams(u); n != 0 {
			t.Errorf("open streams of %s after closeStreams: got %d; want 0", u, n)
		}
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d streams opened, %d events of 60 KiB inserted, %d revocations", opened.Load(), inserted.Load(), revoked.Load())
	if opened.Load() < 8 || inserted.Load() < 2 || revoked.Load() < 1 {
		t.Errorf("load: got %d streams, %d inserts, %d revocations; want at least 8, 2 and 1", opened.Load(), inserted.Load(), revoked.Load())
	}
}

// TestAnonymousBodiesTakeOtherTurns: bodies of anonymous and admin requests take turns of
// their own, so anonymous clients that stall large bodies cannot hold the inserts' turns.
func TestAnonymousBodiesTakeOtherTurns(t *testing.T) {
	b := newTestBroker(t)
	large := func() *http.Request {
		r := httptest.NewRequest("POST", "/login", strings.NewReader(`{}`))
		r.ContentLength = -1 // unknown: a large body's turn
		return r
	}
	for range cap(b.s.publicBodies) {
		b.s.publicBodies <- struct{}{}
	}
	if release, err := b.s.readJSON(httptest.NewRecorder(), large(), "someone", &map[string]any{}); err != nil {
		t.Errorf("signed-in large body with every public turn taken: got %v; want nil", err)
	} else {
		release()
	}
	for range cap(b.s.publicBodies) {
		<-b.s.publicBodies
	}
	for range cap(b.s.largeBodies) {
		b.s.largeBodies <- struct{}{}
	}
	defer func() {
		for range cap(b.s.largeBodies) {
			<-b.s.largeBodies
		}
	}()
	if release, err := b.s.readJSON(httptest.NewRecorder(), large(), "", &map[string]any{}); err != nil {
		t.Errorf("anonymous large body with every insert turn taken: got %v; want nil", err)
	} else {
		release()
	}
}

// TestBacklogTurnsShared: one user's stalled streams hold at most userPages of the
// backlog's turns, so another user's stream still gets its backlog at once.
func TestBacklogTurnsShared(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("hog", "H")
	b.createUser("fair", "H")
	preload(t, b.s.hub, "H", 60, bigData(60<<10))
	hog := b.login("hog")
	for range backlogTurns + 8 {
		c, err := rawSSE(b.ts.Listener.Addr().String(), hog, "0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	waitFor(t, 10*time.Second, "the hog's streams registered", func() bool { return b.openStreams("hog") == backlogTurns+8 })
	s := b.stream(append(bearer(b.login("fair")), "Last-Event-ID", "0")...)
	deadline := time.After(writeTimeout - time.Second) // before any of the hog's turns times out
	for want := 1; want <= 60; want++ {
		select {
		case ev := <-s.events:
			if ev.name == "" {
				want--
			} else if ev.id != strconv.Itoa(want) {
				t.Fatalf("backlog event: got id %s; want %d", ev.id, want)
			}
		case <-deadline:
			t.Fatalf("another user's backlog stuck at event %d behind the hog's stalled streams", want)
		}
	}
}

// TestUserBodyShare: one user holds at most a quarter of the inserts' body turns of a size
// (more is 429 at once, taking nothing), so another user's insert still gets a turn while
// the first one's uploads stall.
func TestUserBodyShare(t *testing.T) {
	b := newTestBroker(t)
	for _, c := range []struct {
		pool   chan struct{}
		length int64
	}{{b.s.smallBodies, 2}, {b.s.largeBodies, -1}} {
		req := func() *http.Request {
			r := httptest.NewRequest("POST", "/insert", strings.NewReader("{}"))
			r.ContentLength = c.length
			return r
		}
		var held []func()
		for range cap(c.pool) / 4 {
			release, err := b.s.readJSON(httptest.NewRecorder(), req(), "hog", &map[string]any{})
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, release)
		}
		taken := len(c.pool)
		if _, err := b.s.readJSON(httptest.NewRecorder(), req(), "hog", &map[string]any{}); !errors.Is(err, errTooMany) || len(c.pool) != taken {
			t.Errorf("turn %d of one user: got %v with %d turns taken; want errTooMany with %d", taken+1, err, len(c.pool), taken)
		}
		release, err := b.s.readJSON(httptest.NewRecorder(), req(), "fair", &map[string]any{})
		if err != nil {
			t.Errorf("another user's body while the first holds its share: %v", err)
		}
		release()
		for _, r := range held {
			r()
		}
		if len(c.pool) != 0 {
			t.Errorf("turns left taken: %d", len(c.pool))
		}
	}
	// Over HTTP the refusal is 429 with Retry-After.
	b.createUser("hog", "H")
	jwt := b.login("hog")
	mine := b.s.userTurns("hog", b.s.smallBodies, cap(b.s.smallBodies)/4)
	for range cap(mine) {
		mine <- struct{}{}
	}
	code, out := b.do("POST", "/insert", obj{"event": "e", "data": 1}, bearer(jwt)...)
	if code != 429 || !strings.Contains(string(out), "too many") {
		t.Errorf("insert over the user's share: got %d %s; want 429", code, out)
	}
	for range cap(mine) {
		<-mine
	}
	b.insert(jwt, "e", 2)
}
