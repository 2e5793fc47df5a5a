package main

import (
	"net/http"
	"strings"
	"testing"
)

// TestMethodNotAllowed: a known path with another method is 405 naming the methods it has;
// an unknown path is 404. Both answer JSON errors and change nothing.
func TestMethodNotAllowed(t *testing.T) {
	b := newTestBroker(t)
	cases := []struct{ method, path, allow string }{
		{"GET", "/insert", "POST"},
		{"GET", "/create_user", "POST"},
		{"PUT", "/login", "POST"},
		{"DELETE", "/sse", "GET, HEAD"},
		{"POST", "/", "GET, HEAD"},
		{"POST", "/verify", "GET, HEAD"},
		{"POST", "/admin/app.js", "GET, HEAD"},
	}
	for _, c := range cases {
		req, _ := http.NewRequest(c.method, b.ts.URL+c.path, strings.NewReader(`{"admin_token":"letmein","username":"x","password":"correct horse battery","tenant_name":"t"}`))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 405 || resp.Header.Values("Allow")[0] != c.allow || len(resp.Header.Values("Allow")) != 1 {
			t.Errorf("%s %s: got %d Allow %q; want 405 Allow %q", c.method, c.path, resp.StatusCode, resp.Header.Values("Allow"), c.allow)
		}
	}
	for _, path := range []string{"/nope", "/insert/x", "/sse/x"} {
		code, _ := b.do("GET", path, nil)
		if code != 404 {
			t.Errorf("GET %s: got %d; want 404", path, code)
		}
	}
	if n := b.userCount(); n != 0 {
		t.Errorf("%d users after refused requests; want 0", n)
	}
}

// admin is the admin token as an Authorization header, as the console sends it for a
// tenant's stream.
var adminBearer = []string{"Authorization", "Bearer letmein"}

// TestAdminStream: with ?tenant= and the admin token, the admin watches any tenant's stream
// (backlog, live events, resume by Last-Event-ID) without a user's credentials, and only
// that tenant's events; the stream outlives revocations of the tenant's users.
func TestAdminStream(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	b.createUser("carl", "B")
	ja, jc := b.login("alice"), b.login("carl")
	b.insert(ja, "a", 1)
	b.insert(ja, "b", 2)
	b.insert(ja, "a", 3)
	b.insert(jc, "other", "B's")

	url := b.ts.URL + "/sse?tenant=A"
	s := openStream(t, url, http.DefaultClient, adminBearer...)
	expect(t, s.next(), "b", "2", "2") // the latest of every name, oldest first
	expect(t, s.next(), "a", "3", "3")
	b.insert(jc, "other", "B's again")
	b.insert(ja, "live", true)
	expect(t, s.next(), "live", "4", "true") // B's events never arrive

	lower := openStream(t, url, http.DefaultClient, "Authorization", "bearer letmein") // the scheme in any case
	expect(t, lower.next(), "b", "2", "2")
	resumed := openStream(t, url, http.DefaultClient, append([]string{"Last-Event-ID", "1"}, adminBearer...)...)
	for i, want := range []string{"b", "a", "live"} {
		if ev := resumed.next(); ev.name != want || ev.id != []string{"2", "3", "4"}[i] {
			t.Errorf("resumed event %d: %+v; want %s", i, ev, want)
		}
	}
	// Revoking a user of the tenant ends the user's streams, not the admin's.
	sa := b.stream(bearer(ja)...)
	b.must(200, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": "alice"})
	sa.ended()
	b.must(200, "POST", "/create_user", obj{"admin_token": "letmein", "username": "amy", "password": "pw-amy", "tenant_name": "A"})
	b.insert(b.login("amy"), "after", 5)
	expect(t, s.next(), "after", "5", "5")
	if n := b.openStreams(""); n != 3 {
		t.Errorf("admin streams open: %d; want 3", n)
	}
}

// TestAdminStreamRefused: a tenant's stream needs the admin token in the header; a user's
// own credentials, the token in the URL, a wrong token or a bad tenant name open nothing.
func TestAdminStreamRefused(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	b.createUser("carl", "B")
	jc := b.login("carl")
	cases := []struct {
		query string
		hdr   []string
		want  int
	}{
		{"?tenant=A", nil, 401},
		{"?tenant=A", bearer(jc), 401},               // carl's JWT does not open tenant A
		{"?tenant=A", basic("carl", "pw-carl"), 401}, // nor do his password
		{"?tenant=A&access_token=letmein", nil, 401}, // the admin token is never taken from a URL
		{"?tenant=A", []string{"Authorization", "Bearer letmei"}, 401},
		{"?tenant=A", []string{"Authorization", "letmein"}, 401}, // the scheme is required
		{"?tenant=A", []string{"Authorization", "Basic letmein"}, 401},
		{"?tenant=", adminBearer, 400},
		{"?tenant=" + strings.Repeat("x", 65), adminBearer, 400},
		{"?tenant=%0A", adminBearer, 400},
	}
	for _, c := range cases {
		code, out := b.do("GET", "/sse"+c.query, nil, c.hdr...)
		if code != c.want {
			t.Errorf("GET /sse%s %v: got %d %s; want %d", c.query, c.hdr, code, out, c.want)
		}
	}
	if n := b.openStreams(""); n != 0 {
		t.Errorf("%d admin streams open after refusals", n)
	}
}

// TestRevokeUnknownKeepsAdminStreams: revoking a user that does not exist (even the empty
// name, under which admin streams are counted) is 404 and ends no stream.
func TestRevokeUnknownKeepsAdminStreams(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	s := openStream(t, b.ts.URL+"/sse?tenant=A", http.DefaultClient, adminBearer...)
	for _, name := range []string{"", "nobody"} {
		b.must(404, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": name})
	}
	b.insert(b.login("alice"), "still", 1)
	expect(t, s.next(), "still", "1", "1")
}

// TestSecurityEventsLogged: a throttled attempt, a wrong admin token and a revocation each
// leave a log line with who and what, and no log line holds a password or token.
func TestSecurityEventsLogged(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("alice", "A")
	jwt := b.login("alice")
	b.must(200, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": "alice"})
	b.must(401, "POST", "/list_users", obj{"admin_token": "letmein-not"})
	for range 25 {
		b.do("POST", "/login", obj{"username": "alice", "password": "guess"})
	}
	logs := b.logs.String()
	for _, want := range []string{
		`msg="user revoked or let in again" username=alice revoked=true`,
		`msg="wrong admin token" addr=127.0.0.1 path=/list_users`,
		`level=WARN msg="request failed" method=POST path=/login addr=127.0.0.1 status=429`,
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("no log line with %q:\n%s", want, logs)
		}
	}
	for _, secret := range []string{jwt, "pw-alice", "letmein", "guess"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the logs hold %q:\n%s", secret, logs)
		}
	}
}
