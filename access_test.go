package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// answer is what the tests of this file read of an HTTP answer.
type answer struct {
	code  int
	retry string // Retry-After
	body  string
	err   error
}

// send sends a request with client and reads the whole answer; body is JSON-encoded unless
// it is a string. It reports nothing itself, so any goroutine may call it.
func send(client *http.Client, method, url string, body any, hdr ...string) answer {
	var rd io.Reader
	switch v := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(v)
	default:
		j, err := json.Marshal(v)
		if err != nil {
			return answer{err: err}
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return answer{err: err}
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return answer{err: err}
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	return answer{code: resp.StatusCode, retry: resp.Header.Get("Retry-After"), body: string(out), err: err}
}

// loopbackClient returns a client whose connections come from the loopback address ip, so
// a test can be more than one client address (Linux routes all of 127.0.0.0/8 to lo).
func loopbackClient(t *testing.T, ip string) *http.Client {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
	tr := &http.Transport{DialContext: d.DialContext}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

// burst posts n bodies to path at once: every request is built first, then all are
// released together by closing a start channel.
func (b *testBroker) burst(client *http.Client, path string, n int, body func(i int) obj) []answer {
	b.t.Helper()
	start := make(chan struct{})
	answers := make([]answer, n)
	var wg sync.WaitGroup
	for i := range n {
		j, err := json.Marshal(body(i))
		if err != nil {
			b.t.Fatal(err)
		}
		wg.Go(func() {
			<-start
			answers[i] = send(client, "POST", b.ts.URL+path, string(j))
		})
	}
	close(start)
	wg.Wait()
	return answers
}

// checkBurst fails unless at most most answers were evaluated (answered with one of the
// codes evaluated) and every other answer is 429 with Retry-After.
func checkBurst(t *testing.T, answers []answer, most int, evaluated ...int) {
	t.Helper()
	count, codes := 0, map[int]int{}
	for _, a := range answers {
		if a.err != nil {
			t.Fatalf("request failed: %v", a.err)
		}
		codes[a.code]++
		switch {
		case a.code == http.StatusTooManyRequests:
			if a.retry == "" {
				t.Errorf("429 without Retry-After: %s", a.body)
			}
		case slices.Contains(evaluated, a.code):
			count++
		default:
			t.Errorf("got %d %s; want one of %v or 429", a.code, a.body, evaluated)
		}
	}
	if count > most {
		t.Errorf("got %d guesses evaluated (answers %v); want at most %d", count, codes, most)
	}
}

// TestThrottleBurst: guesses sent all at once are counted like guesses sent one after
// another, for passwords, two-factor codes, reset codes and a client address.
func TestThrottleBurst(t *testing.T) {
	t.Run("passwords", func(t *testing.T) {
		b := newTestBroker(t)
		b.createUser("vic", "t")
		const n = 150
		answers := b.burst(loopbackClient(t, "127.0.0.1"), "/login", n, func(i int) obj {
			if i == n-1 {
				return obj{"username": "vic", "password": "pw-vic"}
			}
			return obj{"username": "vic", "password": fmt.Sprint("guess", i)}
		})
		checkBurst(t, answers, 5, 401, 200)
	})
	t.Run("two-factor codes", func(t *testing.T) {
		b := newTestBroker(t)
		secret := b.enrol("tim")
		valid := map[string]bool{}
		for _, shift := range []time.Duration{-time.Minute, -30 * time.Second, 0, 30 * time.Second, time.Minute} {
			valid[b.code(secret, shift)] = true
		}
		wrong := "000000"
		for i := 1; valid[wrong]; i++ {
			wrong = fmt.Sprintf("%06d", i)
		}
		answers := b.burst(loopbackClient(t, "127.0.0.1"), "/login", 115, func(int) obj {
			return obj{"username": "tim", "password": "pw-tim", "totp": wrong}
		})
		checkBurst(t, answers, 5, 401)
	})
	t.Run("reset codes", func(t *testing.T) {
		b := newTestBroker(t)
		b.createUser("rosa", "t")
		code := mustAtoi(t, b.must(200, "POST", "/create_totp", obj{"admin_token": "letmein", "username": "rosa"})["totp"].(string))
		answers := b.burst(loopbackClient(t, "127.0.0.1"), "/password_reset", 100, func(i int) obj {
			return obj{"username": "rosa", "totp": fmt.Sprintf("%06d", (code+1+i)%1_000_000), "password": "new-pw"}
		})
		checkBurst(t, answers, 5, 401)
		b.must(200, "POST", "/login", obj{"username": "rosa", "password": "pw-rosa"}) // unchanged
	})
	t.Run("one address", func(t *testing.T) {
		b := newTestBroker(t)
		answers := b.burst(loopbackClient(t, "127.0.0.1"), "/login", 400, func(i int) obj {
			return obj{"username": fmt.Sprint("spray", i), "password": "guess"}
		})
		checkBurst(t, answers, 20, 401)
	})
}

// inArgon returns how many goroutines are computing a password hash or waiting for a
// hashing slot.
func inArgon() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return bytes.Count(buf[:n], []byte(".(*server).argon("))
		}
		buf = make([]byte, 2*len(buf))
	}
}

// waitArgon polls until n goroutines are in argon: with every hashing slot taken by the
// test, they wait there until it gives the slots back.
func waitArgon(t *testing.T, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); inArgon() < n; {
		if time.Now().After(deadline) {
			t.Fatalf("got %d goroutines hashing after 10 s; want %d", inArgon(), n)
		}
		time.Sleep(time.Millisecond) // polling goroutine stacks, bounded by the deadline
	}
}

// TestRevocationRacesStream: a stream whose HTTP Basic login was checked against the user as
// it was before a revocation, a tenant move or a password change must not outlive the
// change. Holding every hashing slot stops the stream's login after it has read the user
// and before it registers the stream, while the change commits.
func TestRevocationRacesStream(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("bob", "A")
	jwt := b.login("bob")
	slots, held := cap(b.s.hashSlots), 0 // held: slots the test holds
	take := func() {
		for range slots {
			b.s.hashSlots <- struct{}{}
		}
		held = slots
	}
	give := func(n int) {
		for range n {
			<-b.s.hashSlots
		}
		held -= n
	}
	t.Cleanup(func() { give(held) }) // before the broker stops, after a failure
	client := loopbackClient(t, "127.0.0.1")
	admin := func(path string, body obj) answer {
		body["admin_token"] = "letmein"
		return send(client, "POST", b.ts.URL+path, body)
	}
	// openSSE starts GET /sse as user in a goroutine; its answer arrives on the channel.
	openSSE := func(user string) <-chan *http.Response {
		got := make(chan *http.Response, 1)
		req, _ := http.NewRequest("GET", b.ts.URL+"/sse", nil)
		h := basic(user, "pw-"+user)
		req.Header.Set(h[0], h[1])
		go func() {
			resp, err := client.Do(req)
			if err != nil {
				t.Errorf("GET /sse: %v", err)
			}
			got <- resp
		}()
		return got
	}
	changes := []struct {
		name, path string
		body       obj
	}{
		{"revoke", "/revoke_user", obj{}},
		{"move", "/update_user", obj{"tenant_name": "B"}},
		{"password", "/update_user", obj{"password": "a new password"}},
	}
	for _, c := range changes {
		for trial := range 3 {
			user := fmt.Sprint(c.name, trial)
			b.createUser(user, "A")
			body := obj{"username": user}
			for k, v := range c.body {
				body[k] = v
			}
			take()
			var got <-chan *http.Response
			if c.name != "password" {
				got = openSSE(user)
				waitArgon(t, 1) // the login has read the user and waits for a slot
				if a := admin(c.path, body); a.code != 200 {
					t.Fatalf("%s %s: got %d %s; want 200", c.name, user, a.code, a.body)
				}
				give(slots)
			} else {
				// The change needs a slot too: it queues for one first, so it gets the
				// first slot given back and commits while the login still waits.
				changed := make(chan answer, 1)
				go func() { changed <- admin(c.path, body) }()
				waitArgon(t, 1)
				got = openSSE(user)
				waitArgon(t, 2)
				give(1)
				select {
				case a := <-changed:
					if a.code != 200 {
						t.Fatalf("%s %s: got %d %s; want 200", c.name, user, a.code, a.body)
					}
				case <-time.After(20 * time.Second):
					t.Fatalf("%s %s: no answer within 20 s", c.name, user)
				}
				give(slots - 1)
			}
			var resp *http.Response
			select {
			case resp = <-got:
			case <-time.After(20 * time.Second):
				t.Fatalf("%s %s: GET /sse: no answer within 20 s", c.name, user)
			}
			if resp == nil {
				t.FailNow()
			}
			if resp.StatusCode == http.StatusUnauthorized {
				resp.Body.Close()
				continue
			} else if resp.StatusCode != http.StatusOK {
				resp.Body.Close()
				t.Fatalf("%s %s: GET /sse: got %d; want 401 or a stream that ends", c.name, user, resp.StatusCode)
			}
			read := make(chan []byte, 1)
			go func() {
				out, _ := io.ReadAll(resp.Body)
				read <- out
			}()
			id := b.insert(jwt, "after", c.name)
			select {
			case out := <-read:
				if strings.Contains(string(out), fmt.Sprintf("\nid:%d\n", id)) {
					t.Errorf("%s %s: the stream delivered event %d, inserted after the change: %q", c.name, user, id, out)
				}
			case <-time.After(10 * time.Second):
				resp.Body.Close()
				t.Errorf("%s %s: the stream is still open 10 s after the change", c.name, user)
			}
			resp.Body.Close()
		}
	}
}

// TestStreamEndsWhenCredentialsExpire: a stream lives no longer than the JWT it was opened
// with.
func TestStreamEndsWhenCredentialsExpire(t *testing.T) {
	b := newTestBroker(t, func(c *config) { c.jwtExpiry = 2; c.heartbeat = 100 * time.Millisecond })
	b.createUser("eve", "t")
	jwt := b.login("eve")
	st := b.stream(bearer(jwt)...)
	b.insert(jwt, "live", 1)
	if ev := st.next(); ev.name != "live" {
		t.Errorf("got event %q; want live", ev.name)
	}
	st.ended()
	b.must(401, "GET", "/verify", nil, bearer(jwt)...)
}

// TestTwoFactorOnEndsTokens: turning two-factor on ends the tokens issued without a code,
// and their streams.
func TestTwoFactorOnEndsTokens(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("tom", "t")
	jwt := b.login("tom")
	st := b.stream(bearer(jwt)...)
	b.must(200, "GET", "/verify", nil, bearer(jwt)...)
	b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "tom", "two_factor": true})
	b.must(401, "GET", "/verify", nil, bearer(jwt)...)
	st.ended()
}

// TestManyRevocationsKeepFreshTokens: many revocations or password changes in quick
// succession end the tokens issued before them, never the ones issued after (each moves
// NotBefore a second ahead, soon ahead of the clock).
func TestManyRevocationsKeepFreshTokens(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("ron", "t")
	old := b.login("ron")
	for range 150 {
		b.must(200, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": "ron"})
		b.must(200, "POST", "/unrevoke_user", obj{"admin_token": "letmein", "username": "ron"})
	}
	b.must(401, "GET", "/verify", nil, bearer(old)...)
	prev := b.login("ron")
	b.must(200, "GET", "/verify", nil, bearer(prev)...)

	pw := ""
	for i := range 100 {
		pw = fmt.Sprint("password ", i)
		b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "ron", "password": pw})
	}
	b.must(401, "GET", "/verify", nil, bearer(prev)...)
	fresh := b.must(200, "POST", "/login", obj{"username": "ron", "password": pw})["jwt"].(string)
	b.must(200, "GET", "/verify", nil, bearer(fresh)...)
	b.must(200, "GET", "/verify", nil, basic("ron", pw)...)
}

// TestLockoutPolicy: a locked login refuses even the right password; a new reset code
// (/create_totp) and /unrevoke_user unlock it, and the lock does not block a reset.
func TestLockoutPolicy(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("lou", "t")
	client := loopbackClient(t, "127.0.0.1")
	login := func(pw string) answer {
		return send(client, "POST", b.ts.URL+"/login", obj{"username": "lou", "password": pw})
	}
	lock := func() {
		t.Helper()
		for i := range 5 {
			if a := login("guess"); a.code != 401 {
				t.Fatalf("wrong password %d: got %d %s; want 401", i+1, a.code, a.body)
			}
		}
		// The lock lasts 1 s: the server's clock goes back an hour, so it outlasts the test.
		b.offset.Add(-int64(time.Hour))
		if a := login("pw-lou"); a.code != 429 || a.retry == "" {
			t.Fatalf("locked login with the right password: got %d %s, Retry-After %q; want 429 with Retry-After", a.code, a.body, a.retry)
		}
	}
	lock()
	code := b.must(200, "POST", "/create_totp", obj{"admin_token": "letmein", "username": "lou"})["totp"].(string)
	if a := login("pw-lou"); a.code != 200 {
		t.Errorf("login after create_totp: got %d %s; want 200 (a new reset code unlocks)", a.code, a.body)
	}
	lock() // after the code was issued: the reset still goes through
	b.must(200, "POST", "/password_reset", obj{"username": "lou", "totp": code, "password": "new-lou"})
	if a := login("new-lou"); a.code != 200 {
		t.Errorf("login after the reset: got %d %s; want 200", a.code, a.body)
	}
	b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "lou", "password": "pw-lou"})
	lock()
	b.must(200, "POST", "/unrevoke_user", obj{"admin_token": "letmein", "username": "lou"}) // not revoked: only unlocks
	if a := login("pw-lou"); a.code != 200 {
		t.Errorf("login after unrevoke_user: got %d %s; want 200", a.code, a.body)
	}
}

// TestAdminTokenThrottled: wrong admin tokens lock the client address out of the admin
// endpoints, one by one or all at once; other addresses keep them.
func TestAdminTokenThrottled(t *testing.T) {
	b := newTestBroker(t)
	here, there := loopbackClient(t, "127.0.0.1"), loopbackClient(t, "127.0.0.2")
	for i := range 25 {
		if i == 20 {
			// The lock lasts 1 s: the server's clock goes back an hour, so it outlasts the test.
			b.offset.Add(-int64(time.Hour))
		}
		a := send(here, "POST", b.ts.URL+"/list_users", obj{"admin_token": fmt.Sprint("wrong", i)})
		if i < 20 && a.code != 401 {
			t.Errorf("wrong token %d: got %d %s; want 401", i+1, a.code, a.body)
		} else if i >= 20 && (a.code != 429 || a.retry == "") {
			t.Errorf("wrong token %d: got %d %s, Retry-After %q; want 429 with Retry-After", i+1, a.code, a.body, a.retry)
		}
	}
	if a := send(here, "POST", b.ts.URL+"/list_users", obj{"admin_token": "letmein"}); a.code != 429 {
		t.Errorf("right token from the locked address: got %d %s; want 429", a.code, a.body)
	}
	if a := send(there, "POST", b.ts.URL+"/list_users", obj{"admin_token": "letmein"}); a.code != 200 {
		t.Errorf("right token from 127.0.0.2: got %d %s; want 200", a.code, a.body)
	}

	c := newTestBroker(t)
	answers := c.burst(here, "/list_users", 150, func(i int) obj { return obj{"admin_token": fmt.Sprint("wrong", i)} })
	checkBurst(t, answers, 20, 401)
	if a := send(there, "POST", c.ts.URL+"/list_users", obj{"admin_token": "letmein"}); a.code != 200 {
		t.Errorf("right token from 127.0.0.2 after the burst: got %d %s; want 200", a.code, a.body)
	}
}

// TestSecretsAndHost: empty or, with --secure, short secrets are refused; with the public
// default secrets broker listens on loopback only, with its own on --host.
func TestSecretsAndHost(t *testing.T) {
	long, token := "0123456789abcdef0123456789abcdef", "admin-0123456789"
	for _, args := range [][]string{
		{"--jwt_secret="},
		{"--admin_token="},
		{"--jwt_secret=", "--admin_token=" + token},
		{"--secure", "--auto_cert=false", "--jwt_secret=" + long[:31], "--admin_token=" + token},
		{"--secure", "--auto_cert=false", "--jwt_secret=" + long, "--admin_token=" + token[:15]},
		{"--secure", "--domain=example.com", "--jwt_secret=" + long[:31], "--admin_token=" + token},
	} {
		if _, err := parseConfig(args, noEnv, io.Discard); err == nil {
			t.Errorf("parseConfig %q: accepted; want an error", args)
		}
	}
	for _, args := range [][]string{
		{"--secure", "--auto_cert=false", "--jwt_secret=" + long, "--admin_token=" + token},
		{"--host", "127.0.0.1"},
	} {
		if _, err := parseConfig(args, noEnv, io.Discard); err != nil {
			t.Errorf("parseConfig %q: %v; want no error", args, err)
		}
	}
	if c, err := parseConfig([]string{"--host", "127.0.0.2"}, noEnv, io.Discard); err != nil || c.host != "127.0.0.2" {
		t.Errorf("--host 127.0.0.2: got %q, %v; want 127.0.0.2", c.host, err)
	}

	client := &http.Client{Timeout: 10 * time.Second}
	for _, c := range []struct {
		name string
		args []string
		addr string // where broker must listen
	}{
		{"default secrets", nil, "127.0.0.1"},
		{"own secrets, --host 127.0.0.1", []string{"--jwt_secret", long, "--admin_token", token, "--host", "127.0.0.1"}, "127.0.0.1"},
		{"own secrets, --host 127.0.0.2", []string{"--jwt_secret", long, "--admin_token", token, "--host", "127.0.0.2"}, "127.0.0.2"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := startBroker(t, append([]string{"--port", "0"}, c.args...)...)
			defer func() {
				if err := b.stop(t); err != nil {
					t.Errorf("run: %v", err)
				}
			}()
			port := portOf(b.addr) // the kernel's choice; the host is checked
			if want := "addr=" + net.JoinHostPort(c.addr, port) + " "; !strings.Contains(b.line, want) {
				t.Errorf("got log line %q; want it to contain %q", b.line, want)
			}
			if a := send(client, "GET", "http://"+net.JoinHostPort(c.addr, port)+"/", nil); a.code != 200 {
				t.Errorf("GET / on %s: got %d %v; want 200", c.addr, a.code, a.err)
			}
		})
	}
}

// TestSecureHeaders: with --secure, answers carry HSTS, the plain-HTTP redirect keeps an
// IPv6 literal host well-formed, and backups are not cached.
func TestSecureHeaders(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath := writeCert(t, dir, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	b := startSecure(t, certPath, keyPath)
	httpsPort, httpPort := portOf(b.https), portOf(b.http)
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(certPath)
	pool.AppendCertsFromPEM(pem)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	base := "https://localhost:" + httpsPort

	check := func(method, path string, body any, status int) *http.Response {
		t.Helper()
		var rd io.Reader
		if body != nil {
			j, _ := json.Marshal(body)
			rd = bytes.NewReader(j)
		}
		req, _ := http.NewRequest(method, base+path, rd)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != status {
			t.Errorf("%s %s: got %d; want %d", method, path, resp.StatusCode, status)
		}
		if hsts := resp.Header.Get("Strict-Transport-Security"); !strings.HasPrefix(hsts, "max-age=") {
			t.Errorf("%s %s: Strict-Transport-Security %q; want max-age=...", method, path, hsts)
		}
		return resp
	}
	check("GET", "/", nil, 200)
	check("POST", "/list_users", obj{"admin_token": "wrong"}, 401)
	check("GET", "/nope", nil, 404)
	resp := check("POST", "/backup", obj{"admin_token": "admin-0123456789"}, 200)
	if cc := resp.Header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("backup: Cache-Control %q; want no-store", cc)
	}

	// Sent through a bare transport, which follows no redirect and parses no Location.
	plain := &http.Transport{}
	t.Cleanup(plain.CloseIdleConnections)
	for host, want := range map[string]string{
		"[::1]":        "https://[::1]:" + httpsPort + "/list_users?x=1",
		"[::1]:80":     "https://[::1]:" + httpsPort + "/list_users?x=1",
		"localhost":    "https://localhost:" + httpsPort + "/list_users?x=1",
		"127.0.0.1:80": "https://127.0.0.1:" + httpsPort + "/list_users?x=1",
	} {
		req, _ := http.NewRequest("GET", "http://127.0.0.1:"+httpPort+"/list_users?x=1", nil)
		req.Host = host
		resp, err := plain.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if loc := resp.Header.Get("Location"); resp.StatusCode != 301 || loc != want {
			t.Errorf("plain HTTP with Host %s: got %d to %q; want 301 to %s", host, resp.StatusCode, loc, want)
		}
	}
}

// TestJWTFromLibrary: a token that a JWT library signs with broker's key is accepted
// whatever its key order, and hostile tokens signed with the same key are not.
func TestJWTFromLibrary(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("bob", "t", obj{"scopes": []string{"news:get"}})
	key := []byte("secret")
	now := time.Now()
	good := func() jwt.MapClaims {
		return jwt.MapClaims{"sub": "bob", "iss": "Broker", "exp": now.Add(time.Hour).Unix(), "iat": now.Unix(),
			"tenant": "t", "scopes": []string{"news:get"}}
	}
	sign := func(m jwt.SigningMethod, c jwt.MapClaims) string {
		t.Helper()
		tok, err := jwt.NewWithClaims(m, c).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	tok := sign(jwt.SigningMethodHS256, good())
	payload, _ := b64.DecodeString(strings.Split(tok, ".")[1])
	if !bytes.HasPrefix(payload, []byte(`{"exp":`)) {
		t.Fatalf("library payload %s; want its keys sorted, unlike broker's", payload)
	}
	out := b.must(200, "GET", "/verify", nil, bearer(tok)...)
	if out["username"] != "bob" {
		t.Errorf("verify with the library's token: got username %v; want bob", out["username"])
	}
	// And the library accepts broker's tokens.
	parsed, err := jwt.Parse(b.login("bob"), func(*jwt.Token) (any, error) { return key, nil },
		jwt.WithValidMethods([]string{"HS256"}), jwt.WithIssuer("Broker"), jwt.WithExpirationRequired())
	if err != nil || parsed.Claims.(jwt.MapClaims)["sub"] != "bob" {
		t.Errorf("the library on broker's token: got %v, %v; want sub bob", parsed, err)
	}

	// Hostile tokens, all signed with the right key: hand-made JSON signed by the library's
	// HS256, or the library's own tokens with another alg or other claims.
	enc := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	handMade := func(m jwt.SigningMethod, header, claims string) string {
		t.Helper()
		input := enc(header) + "." + enc(claims)
		sig, err := m.Sign(input, key)
		if err != nil {
			t.Fatal(err)
		}
		return input + "." + base64.RawURLEncoding.EncodeToString(sig)
	}
	head := `{"alg":"HS256","typ":"JWT"}`
	times := fmt.Sprintf(`"iat":%d,"exp":%d`, now.Unix(), now.Add(time.Hour).Unix())
	without := func(k string) jwt.MapClaims {
		c := good()
		delete(c, k)
		return c
	}
	other := good()
	other["iss"] = "Other"
	for name, tok := range map[string]string{
		"duplicate sub":         handMade(jwt.SigningMethodHS256, head, `{"iss":"Broker","sub":"mallory","sub":"bob","tenant":"t",`+times+`}`),
		"SUB":                   handMade(jwt.SigningMethodHS256, head, `{"iss":"Broker","SUB":"bob","tenant":"t",`+times+`}`),
		"Sub and sub":           handMade(jwt.SigningMethodHS256, head, `{"iss":"Broker","sub":"mallory","Sub":"bob","tenant":"t",`+times+`}`),
		"alg HS512, HS256 MAC":  handMade(jwt.SigningMethodHS256, `{"alg":"HS512","typ":"JWT"}`, `{"iss":"Broker","sub":"bob","tenant":"t",`+times+`}`),
		"alg HS512":             sign(jwt.SigningMethodHS512, good()),
		"alg HS384":             sign(jwt.SigningMethodHS384, good()),
		"iss Other":             sign(jwt.SigningMethodHS256, other),
		"no sub":                sign(jwt.SigningMethodHS256, without("sub")),
		"no exp":                sign(jwt.SigningMethodHS256, without("exp")),
		"no iss":                sign(jwt.SigningMethodHS256, without("iss")),
		"duplicate alg":         handMade(jwt.SigningMethodHS256, `{"alg":"none","alg":"HS256"}`, `{"iss":"Broker","sub":"bob","tenant":"t",`+times+`}`),
		"unknown claim":         handMade(jwt.SigningMethodHS256, head, `{"iss":"Broker","sub":"bob","tenant":"t","admin":true,`+times+`}`),
		"trailing claims bytes": handMade(jwt.SigningMethodHS256, head, `{"iss":"Broker","sub":"bob","tenant":"t",`+times+`}x`),
	} {
		if code, out := b.do("GET", "/verify", nil, bearer(tok)...); code != 401 {
			t.Errorf("%s: got %d %s; want 401", name, code, out)
		}
	}
}

// TestInputEdges: inputs at the edges of the rules are refused with 400 and change
// nothing, and error messages speak of JSON, not of Go.
func TestInputEdges(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("bob", "t")
	b.createUser("tfa", "t", obj{"two_factor": true})
	users := func() string {
		t.Helper()
		code, out := b.do("POST", "/list_users", obj{"admin_token": "letmein"})
		if code != 200 || !json.Valid(out) {
			t.Fatalf("list_users: got %d %q; want 200 and JSON", code, out)
		}
		return string(out)
	}
	before := users()
	create := func(username string, more string) string {
		return `{"username":` + strconv.Quote(username) + `,"password":"pw","admin_token":"letmein","tenant_name":"t"` + more + `}`
	}
	for _, c := range []struct {
		name, path string
		body       any
	}{
		{"login without password", "/login", obj{"username": "bob"}},
		{"login without password, with a code", "/login", obj{"username": "bob", "totp": "123456"}},
		{"issuer of 200 KiB", "/create_qr", obj{"admin_token": "letmein", "username": "tfa", "issuer": strings.Repeat("i", 200<<10)}},
		{"data not UTF-8", "/create_user", create("u1", `,"data":"a`+"\xff"+`b"`)},
		{"data key not UTF-8", "/create_user", create("u2", `,"data":{"`+"\xfe"+`":1}`)},
		{"update with data not UTF-8", "/update_user", `{"admin_token":"letmein","username":"bob","data":["` + "\xff" + `"]}`},
		{"email with an IP literal", "/create_user", create("u3", `,"email":"a@[127.0.0.1]"`)},
		{"username with a bidi override", "/create_user", create("evil\u202egnp", "")},
		{"username with a zero width space", "/create_user", create("zero\u200bwidth", "")},
		{"tenant with a bidi override", "/create_user", `{"username":"u4","password":"pw","admin_token":"letmein","tenant_name":"t\u202e"}`},
		{"repeated key", "/create_user", `{"username":"a","username":"b","password":"pw","admin_token":"letmein","tenant_name":"t"}`},
		{"case-variant key", "/create_user", `{"Username":"c","password":"pw","admin_token":"letmein","tenant_name":"t"}`},
		{"case-variant admin_token", "/update_user", `{"username":"bob","ADMIN_TOKEN":"letmein","tenant_name":"moved"}`},
		{"repeated tenant", "/update_user", `{"admin_token":"letmein","username":"bob","tenant_name":"t","tenant_name":"moved"}`},
	} {
		code, out := b.do("POST", c.path, c.body)
		if code != 400 {
			t.Errorf("%s: got %d %s; want 400", c.name, code, out)
		}
		if after := users(); after != before {
			t.Errorf("%s changed the users:\nbefore %s\nafter  %s", c.name, before, after)
			before = after
		}
	}

	// Wrong JSON types are named by their JSON field, never by Go type names.
	for _, c := range []struct{ path, body string }{
		{"/login", `{"username":123,"password":"pw"}`},
		{"/login", `{"username":"bob","password":"pw","totp":123456}`},
		{"/create_user", `{"username":"u5","password":"pw","admin_token":"letmein","tenant_name":"t","two_factor":"yes"}`},
		{"/create_user", `{"username":"u6","password":"pw","admin_token":"letmein","tenant_name":"t","scopes":[1]}`},
		{"/list_users", `{"admin_token":"letmein","tenant_name":{}}`},
		{"/list_users", `[]`},
	} {
		code, out := b.do("POST", c.path, c.body)
		var e struct{ Error string }
		if code != 400 || json.Unmarshal(out, &e) != nil || e.Error == "" {
			t.Errorf("%s %s: got %d %s; want 400 with an error", c.path, c.body, code, out)
		}
		for _, goName := range []string{"Go ", "main.", "string into", "number into", "of type", "struct", "[]string"} {
			if strings.Contains(e.Error, goName) {
				t.Errorf("%s %s: error %q mentions Go (%q)", c.path, c.body, e.Error, goName)
			}
		}
		if after := users(); after != before {
			t.Errorf("%s %s changed the users:\nbefore %s\nafter  %s", c.path, c.body, before, after)
			before = after
		}
	}

	// An empty database file is refused, not made a new database with a new biscuit key.
	dir := t.TempDir()
	path := filepath.Join(dir, "broker.db")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if st, err := openStore(dir); err == nil {
		st.close()
		t.Error("openStore on an empty broker.db: got no error; want one")
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != 0 {
		t.Errorf("broker.db after the refused open: %v, %v; want it empty", fi, err)
	}
}

// TestResetNotBlockedByAddressLock: failed logins that lock a client address (all the
// clients behind a proxy share one) do not block a password reset with a valid code from it.
func TestResetNotBlockedByAddressLock(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("ann", "t")
	for i := range 20 {
		b.do("POST", "/login", obj{"username": fmt.Sprint("spray", i), "password": "guess"})
	}
	b.must(429, "POST", "/login", obj{"username": "ann", "password": "pw-ann"})
	code := b.must(200, "POST", "/create_totp", obj{"admin_token": "letmein", "username": "ann"})["totp"]
	b.must(200, "POST", "/password_reset", obj{"username": "ann", "totp": code, "password": "a new password"})
}
