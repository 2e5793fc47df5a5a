package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// checkDB fails the test when bbolt finds the database file in dir inconsistent.
func checkDB(t *testing.T, dir string) {
	t.Helper()
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	st.db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("database check: %v", err)
		}
		return nil
	})
}

// acked records the inserts answered 200: id -> data.
type acked struct {
	mu  sync.Mutex
	ids map[uint64]string
}

func (a *acked) add(id uint64, data string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ids[id] = data
}

func (a *acked) copy() map[uint64]string {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := make(map[uint64]string, len(a.ids))
	for k, v := range a.ids {
		m[k] = v
	}
	return m
}

// hammer inserts from 16 goroutines into base until stop is closed, recording each
// acknowledged insert. Failed inserts (the server being killed) are ignored.
func hammer(base, jwt string, a *acked, stop chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 10 * time.Second}
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				data := fmt.Sprintf(`{"g":%d,"i":%d}`, g, i)
				req, _ := http.NewRequest("POST", base+"/insert", strings.NewReader(`{"event":"e`+fmt.Sprint(g%3)+`","data":`+data+`}`))
				req.Header.Set("Authorization", "Bearer "+jwt)
				resp, err := client.Do(req)
				if err != nil {
					continue
				}
				var out struct{ ID uint64 }
				if resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&out) == nil {
					a.add(out.ID, data)
				}
				resp.Body.Close()
			}
		}()
	}
	return &wg
}

func postJSON(t *testing.T, url, body string) map[string]any {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	json.NewDecoder(resp.Body).Decode(&m)
	if resp.StatusCode != 200 {
		t.Fatalf("POST %s: %d %v", url, resp.StatusCode, m)
	}
	return m
}

// TestCrashKeepsAcknowledgedInserts kills the broker with SIGKILL while 16 clients insert,
// restarts it on the same folder, and checks that every insert answered 200 is there with
// its data, that the IDs have no gaps, and that bbolt finds the file consistent.
func TestCrashKeepsAcknowledgedInserts(t *testing.T) {
	bin, dir := buildBroker(t), t.TempDir()
	start := func() (*brokerProc, string) {
		p := startBin(t, bin, nil, nil, "--port", "0", "--db", dir, "--ntp_server=")
		return p, "http://" + p.addr
	}
	p, base := start()
	// A second process on the same folder fails at once with a clear message.
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout) // ends it if it starts after all
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--port", "0", "--db", dir, "--ntp_server=").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another broker process") {
		t.Errorf("second process: %v %s", err, out)
	}
	postJSON(t, base+"/create_user", `{"username":"w","password":"pw","admin_token":"letmein","tenant_name":"t"}`)
	jwt := postJSON(t, base+"/login", `{"username":"w","password":"pw"}`)["jwt"].(string)
	a, stop := &acked{ids: map[uint64]string{}}, make(chan struct{})
	wg := hammer(base, jwt, a, stop)
	for deadline := time.Now().Add(30 * time.Second); len(a.copy()) < 500; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("fewer than 500 inserts in 30 s")
		}
	}
	p.kill() // SIGKILL, mid-stream
	close(stop)
	wg.Wait()
	want := a.copy()
	checkDB(t, dir)

	// On a port of the kernel's choice again: the clients stopped with the broker.
	p, base = start()
	defer p.kill()
	jwt = postJSON(t, base+"/login", `{"username":"w","password":"pw"}`)["jwt"].(string)
	s := openStream(t, base+"/sse", http.DefaultClient, bearer(jwt)...)
	s.resp.Body.Close()
	s = openStream(t, base+"/sse?last_event_id=0", http.DefaultClient, bearer(jwt)...)
	req, _ := http.NewRequest("POST", base+"/insert", strings.NewReader(`{"event":"marker","data":null}`))
	req.Header.Set("Authorization", "Bearer "+jwt)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	got := map[uint64]string{}
	for next := uint64(1); ; next++ {
		ev := s.next()
		if ev.id != fmt.Sprint(next) {
			t.Fatalf("after restart: got id %s; want %d (no gaps)", ev.id, next)
		}
		if ev.name == "marker" {
			break
		}
		got[next] = ev.data
	}
	for id, data := range want {
		if got[id] != data {
			t.Errorf("acknowledged insert %d: got %q after the crash; want %q", id, got[id], data)
		}
	}
	t.Logf("%d inserts acknowledged before SIGKILL, %d stored", len(want), len(got))
}

// TestBackupDuringInserts takes a snapshot while inserts run: it must open as a valid
// database holding every insert acknowledged before the snapshot began.
func TestBackupDuringInserts(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("w", "t")
	jwt := b.login("w")
	a, stop := &acked{ids: map[uint64]string{}}, make(chan struct{})
	wg := hammer(b.ts.URL, jwt, a, stop)
	defer func() { close(stop); wg.Wait() }()
	for deadline := time.Now().Add(30 * time.Second); len(a.copy()) < 200; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("fewer than 200 inserts in 30 s")
		}
	}
	before := a.copy()
	resp, err := http.Post(b.ts.URL+"/backup", "", strings.NewReader(`{"admin_token":"letmein"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	dir := t.TempDir()
	f, _ := os.Create(filepath.Join(dir, "broker.db"))
	if _, err := io.Copy(f, resp.Body); err != nil || resp.StatusCode != 200 {
		t.Fatalf("backup: %d %v", resp.StatusCode, err)
	}
	f.Close()
	checkDB(t, dir)
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	stored := storedEvents(t, st, "t")
	for id, data := range before {
		if stored[id] != data {
			t.Errorf("insert %d acknowledged before the backup: got %q; want %q", id, stored[id], data)
		}
	}
	if u, err := st.getUser("w"); err != nil || u.Tenant != "t" {
		t.Errorf("user in backup: %v %v", u, err)
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// storedEvents returns the data of every stored event of tenant by ID.
func storedEvents(t *testing.T, st *store, tenant string) map[uint64]string {
	t.Helper()
	evs := map[uint64]string{}
	err := st.eachEvent(tenant, false, 0, math.MaxUint64, func(id uint64, _, data []byte) bool {
		evs[id] = string(data)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

// TestHostileInput sends malformed and hostile requests to every endpoint: each must be
// refused with a 4xx JSON error, the server must keep serving, and nothing may change.
func TestHostileInput(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("bob", "t", obj{"email": "bob@example.com", "scopes": []string{"a:b"}})
	jwt := b.login("bob")
	b.insert(jwt, "first", 1)
	snapshot := func() string {
		_, users := b.do("POST", "/list_users", obj{"admin_token": "letmein"})
		return fmt.Sprintf("%s %d", users, len(storedEvents(t, b.s.db, "t")))
	}
	before := snapshot()
	deep := strings.Repeat("[", 100000) + strings.Repeat("]", 100000)
	huge := strings.Repeat("x", 900<<10)
	bodies := []string{
		"", "null", "[]", "1", `"x"`, "{", `{"username":}`, "\xff\xfe", `{"username":"\xff"}`,
		`{"username":123,"password":true,"admin_token":"letmein","tenant_name":[]}`,
		`{"admin_token":"letmein","username":"bob","tenant_name":"` + huge + `"}`,
		`{"admin_token":"letmein","username":"bob","data":` + deep + `}`,
		`{"admin_token":"letmein","username":"bob","email":"a@b.com\r\nBcc: x@y.com"}`,
		`{"admin_token":"letmein","username":"bob","scopes":["a:b\n"]}`,
		`{"admin_token":"letmein","username":"bob\u0000","password":"x","tenant_name":"t"}`,
		`{"admin_token":"letmein","username":"bob","two_factor":"yes"}`,
		`{"admin_token":"letmein","username":"bob"}{"admin_token":"letmein"}`,
		`{"event":"a\r\nSet-Cookie: x=1","data":1}`, `{"event":"x\nid:99\n\ndata:{}","data":1}`,
		`{"event":"ok","data":` + deep + `}`, `{"event":"ok","data":"\xff"}`, `{"event":"ok","data":{"a":}}`,
		`{"username":"bob","password":"` + huge + `"}`,
		`{"username":"` + huge + `","totp":"1","password":"x"}`,
	}
	paths := []string{"/create_user", "/login", "/list_users", "/get_user", "/update_user", "/revoke_user",
		"/unrevoke_user", "/create_qr", "/create_totp", "/password_reset", "/insert", "/backup"}
	for _, p := range paths {
		for _, body := range bodies {
			code, out := b.do("POST", p, body, bearer(jwt)...)
			if code < 400 || code >= 500 || !bytes.Contains(out, []byte(`"error"`)) {
				t.Errorf("POST %s %.60q: got %d %.100s; want a 4xx JSON error", p, body, code, out)
			}
		}
	}
	for _, h := range [][]string{
		{"Authorization", "Bearer " + strings.Repeat("a.", 3000)}, {"Authorization", "Basic " + strings.Repeat("=", 100)},
		{"Authorization", "Bearer " + jwt + "x"}, {"Authorization", "Basic Ym9iOnB3LWJvYgo="}, {"Authorization", "Negotiate x"},
	} {
		for _, p := range []string{"/verify", "/sse"} {
			if code, out := b.do("GET", p, nil, h...); code != 401 || !bytes.Contains(out, []byte(`"error"`)) {
				t.Errorf("GET %s with %.40q: got %d %s; want 401 JSON", p, h[1], code, out)
			}
		}
	}
	if code, _ := b.do("GET", "/", nil); code != 200 {
		t.Errorf("health after hostile input: %d", code)
	}
	if after := snapshot(); after != before {
		t.Errorf("hostile input changed the database:\nbefore %s\nafter  %s", before, after)
	}
}

// TestGracefulShutdown: cancelling run's context (SIGINT/SIGTERM in main) ends open streams
// cleanly, lets run return without error, and releases the database.
func TestGracefulShutdown(t *testing.T) {
	db := t.TempDir()
	b := startBroker(t, "--db", db, "--port", "0")
	base := "http://" + b.addr
	postJSON(t, base+"/create_user", `{"username":"w","password":"pw","admin_token":"letmein","tenant_name":"t"}`)
	jwt := postJSON(t, base+"/login", `{"username":"w","password":"pw"}`)["jwt"].(string)
	s := openStream(t, base+"/sse", http.DefaultClient, bearer(jwt)...)
	b.cancel()
	s.ended()
	select {
	case <-b.done:
		if b.err != nil {
			t.Errorf("run after shutdown: %v", b.err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not return within 15 s of the signal")
	}
	checkDB(t, db) // the lock is released and the file is consistent
}

// fakeNTP answers NTP v4 requests on loopback with the local time shifted by offset.
func fakeNTP(t *testing.T, offset time.Duration) string {
	t.Helper()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	stamp := func(b []byte, at time.Time) {
		binary.BigEndian.PutUint32(b, uint32(at.Unix()+2208988800)) // seconds since 1900
		binary.BigEndian.PutUint32(b[4:], uint32(uint64(at.Nanosecond())<<32/1e9))
	}
	go func() {
		req := make([]byte, 48)
		for {
			n, addr, err := conn.ReadFrom(req)
			if err != nil {
				return
			}
			if n < 48 {
				continue
			}
			resp := make([]byte, 48)
			resp[0], resp[1], resp[2], resp[3] = 4<<3|4, 1, 4, 0xec // NTPv4 server, stratum 1
			copy(resp[12:], "GPS")
			now := time.Now().Add(offset)
			stamp(resp[16:], now.Add(-time.Second)) // reference
			copy(resp[24:32], req[40:48])           // origin: the client's transmit time
			stamp(resp[32:], now)                   // receive
			stamp(resp[40:], now)                   // transmit
			conn.WriteTo(resp, addr)
		}
	}()
	return conn.LocalAddr().String()
}

// closedUDPPort returns a loopback address where no UDP socket was a moment ago: a
// request there is refused.
func closedUDPPort(t *testing.T) string {
	t.Helper()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.LocalAddr().String()
}

// TestNTPClock: JWTs are issued and checked on the NTP-corrected clock; without an answer
// from NTP, or with an implausible one (a spoofed +48 h), the broker keeps working on its
// own clock.
func TestNTPClock(t *testing.T) {
	for _, c := range []struct {
		name   string
		server string
		shift  time.Duration
		log    string // waited for before the clock is checked
	}{
		{"four minutes ahead", fakeNTP(t, 4*time.Minute), 4 * time.Minute, ""},
		{"two days ahead", fakeNTP(t, 48*time.Hour), 0, "refused"},
		{"unreachable", closedUDPPort(t), 0, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := startBroker(t, "--ntp_server", c.server, "--port", "0")
			base, logs := "http://"+b.addr, b.log
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), c.log); {
				if time.Now().After(deadline) {
					t.Fatalf("log without %q: %s", c.log, logs)
				}
				time.Sleep(10 * time.Millisecond) // polling the log, bounded by the deadline
			}
			postJSON(t, base+"/create_user", `{"username":"w","password":"pw","admin_token":"letmein","tenant_name":"t"}`)
			for deadline := time.Now().Add(10 * time.Second); ; {
				jwt := postJSON(t, base+"/login", `{"username":"w","password":"pw"}`)["jwt"].(string)
				claims, err := verifyJWT(jwt, []byte("secret"), time.Now().Add(c.shift))
				if err != nil {
					t.Fatal(err)
				}
				if d := time.Unix(claims.Iat, 0).Sub(time.Now().Add(c.shift)); d > -time.Minute && d < time.Minute {
					req, _ := http.NewRequest("GET", base+"/verify", nil)
					req.Header.Set("Authorization", "Bearer "+jwt)
					resp, err := http.DefaultClient.Do(req)
					if err != nil || resp.StatusCode != 200 {
						t.Fatalf("verify on the corrected clock: %v %v", resp, err)
					}
					resp.Body.Close()
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("iat %d is not on a clock shifted by %v", claims.Iat, c.shift)
				}
				time.Sleep(50 * time.Millisecond) // the first NTP measurement runs beside start-up
			}
		})
	}
}
