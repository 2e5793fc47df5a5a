package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/biscuit-auth/biscuit-go/v2"
	"github.com/biscuit-auth/biscuit-go/v2/datalog"
	"github.com/biscuit-auth/biscuit-go/v2/parser"
)

// testBroker is a real broker on loopback with a temp database and a clock tests can move.
type testBroker struct {
	t       *testing.T
	s       *server
	ts      *httptest.Server
	offset  atomic.Int64 // added to the real clock, nanoseconds
	stopped bool
	client  *http.Client // nil: http.DefaultClient
	logs    *syncBuffer  // what the broker logged
}

func testConfig(t testing.TB) config {
	t.Helper()
	cfg, err := parseConfig(nil, noEnv, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	cfg.db, cfg.ntpServer = t.TempDir(), ""
	return cfg
}

func newTestBroker(t *testing.T, change ...func(*config)) *testBroker {
	t.Helper()
	cfg := testConfig(t)
	for _, c := range change {
		c(&cfg)
	}
	b := &testBroker{t: t, logs: &syncBuffer{}}
	log := slog.New(slog.NewTextHandler(b.logs, nil))
	s, err := newServer(cfg, log, func() time.Time { return time.Now().Add(time.Duration(b.offset.Load())) })
	if err != nil {
		t.Fatal(err)
	}
	b.s, b.ts = s, httptest.NewServer(s.routes())
	t.Cleanup(b.stop)
	return b
}

// stop shuts the broker down (again: a no-op).
func (b *testBroker) stop() {
	if b.stopped {
		return
	}
	b.stopped = true
	b.s.hub.closeStreams()
	b.ts.Close()
	b.s.close()
}

// do sends a request and returns the status and body. body is JSON-encoded unless it is
// a string; hdr holds header name/value pairs.
func (b *testBroker) do(method, path string, body any, hdr ...string) (int, []byte) {
	b.t.Helper()
	var rd io.Reader
	switch v := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(v)
	default:
		j, err := json.Marshal(v)
		if err != nil {
			b.t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, b.ts.URL+path, rd)
	if err != nil {
		b.t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := cmp.Or(b.client, http.DefaultClient).Do(req)
	if err != nil {
		b.t.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		b.t.Fatal(err)
	}
	if resp.StatusCode >= 400 && !json.Valid(out) {
		b.t.Errorf("%s %s: error body %q is not JSON", method, path, out)
	}
	return resp.StatusCode, out
}

// must sends a request that must answer want and decodes the answer into a map.
func (b *testBroker) must(want int, method, path string, body any, hdr ...string) map[string]any {
	b.t.Helper()
	code, out := b.do(method, path, body, hdr...)
	if code != want {
		b.t.Fatalf("%s %s: got %d %s; want %d", method, path, code, out, want)
	}
	var m map[string]any
	json.Unmarshal(out, &m)
	return m
}

type obj = map[string]any

func (b *testBroker) createUser(name, tenant string, extra ...obj) {
	b.t.Helper()
	body := obj{"username": name, "password": "pw-" + name, "admin_token": "letmein", "tenant_name": tenant}
	for _, e := range extra {
		for k, v := range e {
			body[k] = v
		}
	}
	b.must(200, "POST", "/create_user", body)
}

func (b *testBroker) login(name string) string {
	b.t.Helper()
	return b.must(200, "POST", "/login", obj{"username": name, "password": "pw-" + name})["jwt"].(string)
}

func bearer(jwt string) []string { return []string{"Authorization", "Bearer " + jwt} }

func basic(user, pass string) []string {
	return []string{"Authorization", "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))}
}

func (b *testBroker) userCount() int {
	b.t.Helper()
	_, out := b.do("POST", "/list_users", obj{"admin_token": "letmein"})
	var users []obj
	if err := json.Unmarshal(out, &users); err != nil {
		b.t.Fatal(err)
	}
	return len(users)
}

func TestHealth(t *testing.T) {
	b := newTestBroker(t)
	for _, m := range []string{"GET", "HEAD"} {
		if code, _ := b.do(m, "/", nil); code != 200 {
			t.Errorf("%s /: got %d; want 200", m, code)
		}
	}
	b.must(404, "GET", "/nope", nil)
}

func TestAccountsFlow(t *testing.T) {
	b := newTestBroker(t)
	id := b.must(200, "POST", "/create_user", obj{
		"username": "bob", "password": "pa:ss:word", "admin_token": "letmein", "tenant_name": "t1",
		"email": "bob@example.com", "scopes": []string{"news:get", "news:post"}, "data": obj{"name": "Robert"},
	})["id"].(string)
	if len(id) != 36 {
		t.Errorf("id %q is not a UUID", id)
	}
	jwt := b.must(200, "POST", "/login", obj{"username": "bob", "password": "pa:ss:word"})["jwt"].(string)
	c, err := verifyJWT(jwt, []byte("secret"), time.Now())
	if err != nil || c.Sub != "bob" || c.Tenant != "t1" || c.Iss != "Broker" || c.Exp != c.Iat+86400 || len(c.Scopes) != 2 {
		t.Errorf("claims %+v, %v", c, err)
	}

	u := b.must(200, "POST", "/get_user", obj{"admin_token": "letmein", "username": "bob"})
	if u["password"] != "***" || u["totp"] != "***" || u["tenant_name"] != "t1" || u["email"] != "bob@example.com" || u["revoked"] != false {
		t.Errorf("get_user: %v", u)
	}
	if _, ok := u["hash"]; ok {
		t.Errorf("get_user leaks the hash: %v", u)
	}
	b.must(404, "POST", "/get_user", obj{"admin_token": "letmein", "username": "nobody"})

	b.createUser("amy", "t2")
	if n := b.userCount(); n != 2 {
		t.Errorf("list_users: got %d users; want 2", n)
	}
	_, out := b.do("POST", "/list_users", obj{"admin_token": "letmein", "tenant_name": "t2"})
	if !strings.Contains(string(out), `"amy"`) || strings.Contains(string(out), `"bob"`) {
		t.Errorf("list_users with tenant t2: %s", out)
	}

	// Bearer and Basic (password with colons) both authenticate.
	b.must(200, "GET", "/verify", nil, bearer(jwt)...)
	b.must(200, "GET", "/verify", nil, basic("bob", "pa:ss:word")...)
	b.must(401, "GET", "/verify", nil, basic("bob", "wrong")...)
	b.must(401, "GET", "/verify", nil)
	b.must(401, "POST", "/login", obj{"username": "bob", "password": "wrong"})
	b.must(401, "POST", "/login", obj{"username": "ghost", "password": "x"})

	// update: absent fields stay, given ones change, a tenant move applies to the next request.
	u = b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "bob", "tenant_name": "t9"})
	if u["email"] != "bob@example.com" || u["tenant_name"] != "t9" || len(u["scopes"].([]any)) != 2 || u["data"].(obj)["name"] != "Robert" {
		t.Errorf("update_user: %v", u)
	}
	b.must(404, "POST", "/update_user", obj{"admin_token": "letmein", "username": "nobody", "email": "x@example.com"})
	// a new password ends tokens issued before it
	b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "bob", "password": "new:pw"})
	b.must(401, "GET", "/verify", nil, bearer(jwt)...)
	jwt2 := b.must(200, "POST", "/login", obj{"username": "bob", "password": "new:pw"})["jwt"].(string)
	b.must(200, "GET", "/verify", nil, bearer(jwt2)...)
}

func TestRevokeRefusesAtOnce(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("eve", "t")
	jwt := b.login("eve")
	b.must(200, "POST", "/insert", obj{"event": "x", "data": 1}, bearer(jwt)...)
	b.must(200, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": "eve"})
	b.must(401, "POST", "/insert", obj{"event": "x", "data": 1}, bearer(jwt)...)
	b.must(401, "POST", "/insert", obj{"event": "x", "data": 1}, basic("eve", "pw-eve")...)
	b.must(401, "GET", "/sse", nil, bearer(jwt)...)
	b.must(401, "POST", "/login", obj{"username": "eve", "password": "pw-eve"})
	if u := b.must(200, "POST", "/get_user", obj{"admin_token": "letmein", "username": "eve"}); u["revoked"] != true {
		t.Errorf("revoked: got %v; want true", u["revoked"])
	}
	b.must(404, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": "nobody"})
	b.must(200, "POST", "/unrevoke_user", obj{"admin_token": "letmein", "username": "eve"})
	b.must(401, "GET", "/verify", nil, bearer(jwt)...) // issued before the revocation
	b.must(200, "GET", "/verify", nil, bearer(b.login("eve"))...)
}

// TestBadInputChangesNothing sends each bad input the contract names and checks the status
// and that no user was added or changed.
func TestBadInputChangesNothing(t *testing.T) {
	b := newTestBroker(t, func(c *config) { c.passwordChecker = true })
	strong := "correct horse battery staple 93"
	b.must(200, "POST", "/create_user", obj{"username": "bob", "password": strong, "admin_token": "letmein", "tenant_name": "t"})
	ok := obj{"username": "new", "password": strong, "admin_token": "letmein", "tenant_name": "t"}
	with := func(k string, v any) obj {
		m := obj{}
		for k2, v2 := range ok {
			m[k2] = v2
		}
		if v == nil {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	cases := []struct {
		name string
		body any
		want int
	}{
		{"wrong admin token", with("admin_token", "nope"), 401},
		{"missing admin token", with("admin_token", nil), 401},
		{"missing password", with("password", nil), 400},
		{"missing tenant", with("tenant_name", nil), 400},
		{"missing username", with("username", nil), 400},
		{"unknown field", with("role", "admin"), 400},
		{"wrong type", with("two_factor", "yes"), 400},
		{"trailing data", `{"username":"new","password":"x","admin_token":"letmein","tenant_name":"t"} {}`, 400},
		{"not json", "hello", 400},
		{"oversized body", `{"username":"` + strings.Repeat("a", 1<<20) + `"}`, 413},
		{"duplicate username", with("username", "bob"), 400},
		{"username with space", with("username", "a b"), 400},
		{"username too long", with("username", strings.Repeat("a", 65)), 400},
		{"tenant too long", with("tenant_name", strings.Repeat("a", 65)), 400},
		{"scope without colon", with("scopes", []string{"news"}), 400},
		{"scope with two colons", with("scopes", []string{"a:b:c"}), 400},
		{"scope empty side", with("scopes", []string{"news:"}), 400},
		{"invalid email", with("email", "not-an-email"), 400},
		{"email with name", with("email", "Bob <bob@example.com>"), 400},
		{"throwaway email", with("email", "x@mailinator.com"), 400},
		{"throwaway subdomain email", with("email", "x@a.mailinator.com"), 400},
		{"weak password", with("password", "password1"), 400},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, out := b.do("POST", "/create_user", c.body)
			if code != c.want {
				t.Errorf("got %d %s; want %d", code, out, c.want)
			}
		})
	}
	if n := b.userCount(); n != 1 {
		t.Errorf("users after bad creates: got %d; want 1", n)
	}
	code, out := b.do("POST", "/create_user", with("password", "password1"))
	if !strings.Contains(string(out), "weak password") {
		t.Errorf("weak password answer %d %s does not give the reason", code, out)
	}
	// A bad update changes nothing either.
	for _, body := range []obj{
		{"admin_token": "letmein", "username": "bob", "email": "x@mailinator.com", "tenant_name": "moved"},
		{"admin_token": "letmein", "username": "bob", "scopes": []string{"bad"}, "tenant_name": "moved"},
		{"admin_token": "nope", "username": "bob", "tenant_name": "moved"},
		{"admin_token": "letmein", "username": "bob", "password": "123456", "tenant_name": "moved"},
	} {
		if code, _ := b.do("POST", "/update_user", body); code != 400 && code != 401 {
			t.Errorf("update %v: got %d; want 400 or 401", body, code)
		}
	}
	if u := b.must(200, "POST", "/get_user", obj{"admin_token": "letmein", "username": "bob"}); u["tenant_name"] != "t" {
		t.Errorf("bad update changed the user: %v", u)
	}
	// Every admin endpoint refuses a wrong token.
	for _, p := range []string{"/get_user", "/update_user", "/revoke_user", "/unrevoke_user", "/create_qr", "/create_totp"} {
		b.must(401, "POST", p, obj{"admin_token": "wrong", "username": "bob"})
	}
	b.must(401, "POST", "/list_users", obj{"admin_token": "wrong"})
	b.must(401, "POST", "/backup", obj{"admin_token": "wrong"})
}

func TestCORS(t *testing.T) {
	b := newTestBroker(t)
	req, _ := http.NewRequest("OPTIONS", b.ts.URL+"/insert", nil)
	req.Header.Set("Origin", "https://app.example")
	req.Header.Set("Access-Control-Request-Method", "POST")
	req.Header.Set("Access-Control-Request-Headers", "content-type, authorization")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	h := resp.Header
	if resp.StatusCode != 204 || h.Get("Access-Control-Allow-Origin") != "*" ||
		!strings.Contains(h.Get("Access-Control-Allow-Headers"), "Content-Type") ||
		!strings.Contains(h.Get("Access-Control-Allow-Headers"), "Authorization") ||
		!strings.Contains(h.Get("Access-Control-Allow-Methods"), "POST") {
		t.Errorf("preflight: %d %v", resp.StatusCode, h)
	}
	resp, err = http.Get(b.ts.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Errorf("GET / has no Access-Control-Allow-Origin")
	}
}

// TestHS256RFC7515 checks the signing primitive against RFC 7515 appendix A.1; the verifier
// must still refuse that token, whose header is not broker's.
func TestHS256RFC7515(t *testing.T) {
	key, _ := base64.RawURLEncoding.DecodeString("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
	input := "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
	mac := hs256(input, key)
	if got := hex.EncodeToString(mac); got != "7418dfb49799e0254ffa607dd8adbbba16d4254d69d6bff05b58055853848d79" {
		t.Errorf("HMAC: got %s", got)
	}
	if got := b64.EncodeToString(mac); got != "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk" {
		t.Errorf("signature: got %s", got)
	}
	if _, err := verifyJWT(input+".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk", key, time.Unix(1300819000, 0)); err == nil {
		t.Error("verifier accepted the RFC token, whose header is not broker's")
	}
}

func TestVerifyJWT(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	now := time.Unix(1700000300, 0)
	good := signJWT(claims{Iss: "Broker", Sub: "alice", Tenant: "t", Iat: 1700000000, Exp: 1700000900}, key)
	if c, err := verifyJWT(good, key, now); err != nil || c.Sub != "alice" {
		t.Fatalf("good token: %v %v", c, err)
	}
	h, p, _ := strings.Cut(good, ".")
	p, sig, _ := strings.Cut(p, ".")
	resign := func(header, payload string) string {
		return header + "." + payload + "." + b64.EncodeToString(hs256(header+"."+payload, key))
	}
	enc := func(s string) string { return b64.EncodeToString([]byte(s)) }
	flip := sig[:len(sig)-1] + map[bool]string{true: "A", false: "B"}[sig[len(sig)-1] != 'A']
	cases := map[string]string{
		"expired at exp":     signJWT(claims{Iss: "Broker", Sub: "alice", Iat: 1700000000, Exp: 1700000300}, key),
		"exp zero":           signJWT(claims{Iss: "Broker", Sub: "alice", Iat: 1700000000}, key),
		"other key":          signJWT(claims{Iss: "Broker", Sub: "alice", Iat: 1700000000, Exp: 1700000900}, []byte("secret")),
		"tampered signature": h + "." + p + "." + flip,
		"tampered payload":   h + "." + enc(`{"iss":"Broker","sub":"admin","tenant":"t","scopes":null,"iat":1700000000,"exp":1700000900}`) + "." + sig,
		"alg none":           enc(`{"alg":"none","typ":"JWT"}`) + "." + p + ".",
		"alg none no sig":    enc(`{"alg":"none"}`) + "." + p,
		"alg lowercase":      resign(enc(`{"alg":"hs256","typ":"JWT"}`), p),
		"padded signature":   good + "=",
		"newline":            h + "." + p + "\n." + sig,
		"std alphabet":       h + "." + p + "." + strings.NewReplacer("-", "+", "_", "/").Replace(sig) + "+",
		"four segments":      good + ".x",
		"bearer inside":      "Bearer " + good,
		"empty":              "",
		"dots":               strings.Repeat(".", 5000),
		"duplicate claim":    resign(h, enc(`{"iss":"Broker","sub":"alice","sub":"admin","tenant":"t","scopes":null,"iat":1700000000,"exp":1700000900}`)),
		"case-variant claim": resign(h, enc(`{"iss":"Broker","SUB":"admin","tenant":"t","scopes":null,"iat":1700000000,"exp":1700000900}`)),
		"exp as string":      resign(h, enc(`{"iss":"Broker","sub":"alice","tenant":"t","scopes":null,"iat":1700000000,"exp":"1700000900"}`)),
		"no exp":             resign(h, enc(`{"iss":"Broker","sub":"alice","tenant":"t","scopes":null,"iat":1700000000}`)),
		"trailing payload":   resign(h, enc(`{"iss":"Broker","sub":"alice","tenant":"t","scopes":null,"iat":1700000000,"exp":1700000900}{}`)),
		"payload array":      resign(h, enc(`[1,2]`)),
		"other issuer":       signJWT(claims{Iss: "Mallory", Sub: "alice", Iat: 1700000000, Exp: 1700000900}, key),
	}
	for name, tok := range cases {
		if _, err := verifyJWT(tok, key, now); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// What JWT libraries write is accepted: other key orders, whitespace, no typ, an iat
	// ahead of the clock (after many revocations in one second, broker issues those).
	for name, tok := range map[string]string{
		"key order":  resign(enc(`{"typ":"JWT","alg":"HS256"}`), enc(`{"exp":1700000900,"sub":"alice","iss":"Broker","iat":1700000000}`)),
		"whitespace": resign(enc("{ \"alg\" : \"HS256\" }"), enc("{\n \"sub\": \"alice\",\n \"iss\": \"Broker\",\n \"exp\": 1700000900\n}")),
		"future iat": signJWT(claims{Iss: "Broker", Sub: "alice", Iat: 1700009000, Exp: 1700009900}, key),
	} {
		if c, err := verifyJWT(tok, key, now); err != nil || c.Sub != "alice" {
			t.Errorf("%s: got %v %v; want alice", name, c, err)
		}
	}
}

func TestParseBasic(t *testing.T) {
	cases := []struct {
		in         string
		user, pass string
		ok         bool
	}{
		{"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "Aladdin", "open sesame", true},
		{"basic dGVzdDoxMjPCow==", "test", "123£", true},
		{"Basic dXNlcjpwYTpzcw==", "user", "pa:ss", true},
		{"Basic Om5vdXNlcg==", "", "", false},                   // empty user
		{"Basic bm9jb2xvbg==", "", "", false},                   // no colon
		{"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ", "", "", false},     // unpadded
		{"Basic QWxhZGRp\nbjpvcGVuIHNlc2FtZQ==", "", "", false}, // newline
		{"Bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "", "", false},
		{"Basic " + base64.StdEncoding.EncodeToString([]byte("a:b\x00c")), "", "", false},
		{"", "", "", false},
	}
	for _, c := range cases {
		u, p, ok := parseBasic(c.in)
		if u != c.user || p != c.pass || ok != c.ok {
			t.Errorf("parseBasic(%q) = %q, %q, %v; want %q, %q, %v", c.in, u, p, ok, c.user, c.pass, c.ok)
		}
	}
}

func TestVerifyBiscuit(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("bob", "t1", obj{"scopes": []string{"news:get", "files:put"}})
	b.createUser("nos", "t1")
	jwt := b.login("bob")
	var v struct {
		Key, Token []byte
		Expiry     int64
		Username   string
		Scopes     []string
	}
	_, out := b.do("GET", "/verify", nil, bearer(jwt)...)
	var raw struct {
		Key, Token []int
		Expiry     int64
		Username   string
		Scopes     []string
	}
	if err := json.Unmarshal(out, &raw); err != nil {
		t.Fatalf("verify answer %s: %v", out, err)
	}
	for _, n := range raw.Key {
		v.Key = append(v.Key, byte(n))
	}
	for _, n := range raw.Token {
		v.Token = append(v.Token, byte(n))
	}
	c, _ := verifyJWT(jwt, []byte("secret"), time.Now())
	if len(v.Key) != 32 || raw.Username != "bob" || raw.Expiry != c.Exp || len(raw.Scopes) != 2 {
		t.Fatalf("verify: %s", out)
	}
	tok, err := biscuit.Unmarshal(v.Token)
	if err != nil {
		t.Fatal(err)
	}
	authorize := func(at time.Time, policy string) error {
		// The default 1 ms datalog time limit is flaky under -race on a busy machine.
		a, err := tok.Authorizer(ed25519.PublicKey(v.Key), biscuit.WithWorldOptions(datalog.WithMaxDuration(time.Minute)))
		if err != nil {
			return err
		}
		pol, err := parser.FromStringAuthorizerWithParams(policy, map[string]biscuit.Term{"now": biscuit.Date(at)})
		if err != nil {
			t.Fatal(err)
		}
		a.AddAuthorizer(pol)
		return a.Authorize()
	}
	if err := authorize(time.Now(), `time({now}); allow if user("bob"), tenant("t1"), right("news", "get"), right("files", "put");`); err != nil {
		t.Errorf("biscuit does not authorize bob: %v\n%s", err, tok.String())
	}
	if err := authorize(time.Now(), `time({now}); allow if right("news", "delete");`); err == nil {
		t.Error("biscuit grants a right bob does not have")
	}
	if err := authorize(time.Unix(c.Exp+1, 0), `time({now}); allow if user("bob");`); err == nil {
		t.Error("biscuit still valid after the JWT expired")
	}
	// The key stays the same for every token and across restarts (it is in the database).
	_, out2 := b.do("GET", "/verify", nil, basic("nos", "pw-nos")...)
	if !bytes.Contains(out2, []byte(`"scopes":[]`)) || !bytes.Contains(out2, []byte(fmt.Sprint(raw.Key[0]))) {
		t.Errorf("verify without scopes: %s", out2)
	}
	b.stop()
	s2, err := newServer(b.s.cfg, b.s.log, time.Now)
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	defer s2.close()
	if !bytes.Equal(s2.rootKey.Public().(ed25519.PublicKey), v.Key) {
		t.Error("biscuit root key changed across a restart")
	}
}

func TestSecondProcessRefused(t *testing.T) {
	dir := t.TempDir()
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	if st.db.NoSync {
		t.Error("bbolt opened with NoSync: a crash could lose acknowledged writes")
	}
	start := time.Now()
	_, err = openStore(dir)
	if err == nil || !strings.Contains(err.Error(), "another broker process") {
		t.Errorf("second open: got %v; want a clear lock error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("second open took %v", d)
	}
}

// noEnv is an environment without BROKER_ variables.
func noEnv(string) (string, bool) { return "", false }

// envOf is an environment of the variables in m.
func envOf(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestConfig(t *testing.T) {
	env := envOf(map[string]string{"BROKER_JWT_SECRET": "from-env", "BROKER_PORT": "9000", "BROKER_NTP_SERVER": ""})
	cfg, err := parseConfig([]string{"--port", "9100"}, env, io.Discard)
	if err != nil || cfg.jwtSecret != "from-env" || cfg.port != 9100 || cfg.adminToken != "letmein" || cfg.totpDuration != 300 {
		t.Errorf("config: %+v %v", cfg, err)
	}
	if cfg.ntpServer != "" {
		t.Errorf("an empty BROKER_NTP_SERVER left --ntp_server %q", cfg.ntpServer)
	}
	if _, err := parseConfig([]string{"--secure"}, noEnv, io.Discard); err == nil {
		t.Error("--secure with the default secrets started")
	}
	if _, err := parseConfig([]string{"--secure", "--jwt_secret=a-long-secret", "--admin_token=tok"}, noEnv, io.Discard); err == nil {
		t.Error("--secure --auto_cert without --domain started")
	}
	if _, err := parseConfig(nil, envOf(map[string]string{"BROKER_PORT": "x"}), io.Discard); err == nil {
		t.Error("a malformed BROKER_PORT was accepted")
	}
	// A stray argument stops flag parsing: the flags after it would be ignored.
	for _, args := range [][]string{{"serve"}, {"--port", "9100", "extra", "--secure"}} {
		if _, err := parseConfig(args, noEnv, io.Discard); err == nil {
			t.Errorf("%q was accepted", args)
		}
	}
}

// TestHelpHidesEnvironment: --help and flag errors print the built-in defaults, never the
// values taken from the environment (secrets).
func TestHelpHidesEnvironment(t *testing.T) {
	env := envOf(map[string]string{"BROKER_JWT_SECRET": "env-secret-3f9a", "BROKER_ADMIN_TOKEN": "env-token-77c1"})
	for _, args := range [][]string{{"--help"}, {"--no_such_flag"}, {"--port", "x"}} {
		var out bytes.Buffer
		run(context.Background(), args, env, &out, &out)
		if o := out.String(); !strings.Contains(o, "-admin_token") || strings.Contains(o, "env-secret-3f9a") || strings.Contains(o, "env-token-77c1") {
			t.Errorf("%q printed:\n%s", args, o)
		}
	}
}

func TestVersionFlag(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--version"}, noEnv, &out, io.Discard); err != nil || out.String() != "broker "+version+"\n" || version == "" {
		t.Errorf("--version printed %q to standard output: %v", out.String(), err)
	}
}

// TestExpiredAndForgedTokensOverHTTP: an expired JWT, an alg:none token and a token signed
// with another key are refused by every authenticated endpoint.
func TestExpiredAndForgedTokensOverHTTP(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("bob", "t")
	jwt := b.login("bob")
	c, _ := verifyJWT(jwt, []byte("secret"), time.Now())
	none := b64.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + strings.Split(jwt, ".")[1] + "."
	other := signJWT(c, []byte("not the secret"))
	for _, tok := range []string{none, other, jwt + "x"} {
		b.must(401, "GET", "/verify", nil, bearer(tok)...)
		b.must(401, "POST", "/insert", obj{"event": "x", "data": 1}, bearer(tok)...)
		b.must(401, "GET", "/sse", nil, bearer(tok)...)
	}
	b.must(200, "GET", "/verify", nil, bearer(jwt)...)
	b.offset.Store(int64(86401 * time.Second)) // past exp on the server's clock
	b.must(401, "GET", "/verify", nil, bearer(jwt)...)
	b.must(401, "POST", "/insert", obj{"event": "x", "data": 1}, bearer(jwt)...)
}
