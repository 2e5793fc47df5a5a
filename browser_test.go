package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestHTTP2StreamStaysUp: an HTTP/2 stream over TLS stays open through silences longer
// than the write timeout (which would reset it if a write's deadline were left behind),
// carries keep-alives, and still delivers events afterwards.
func TestHTTP2StreamStaysUp(t *testing.T) {
	cfg := testConfig(t)
	cfg.heartbeat = writeTimeout + time.Second
	s, err := newServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Now)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(s.routes())
	ts.EnableHTTP2 = true
	ts.StartTLS()
	t.Cleanup(func() { s.hub.closeStreams(); ts.Close(); s.close() })
	b := &testBroker{t: t, s: s, ts: ts, client: ts.Client()}
	b.createUser("alice", "A")
	jwt := b.login("alice")
	req, _ := http.NewRequest("GET", ts.URL+"/sse", nil)
	req.Header.Set("Authorization", "Bearer "+jwt)
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("stream over HTTP/%d; want HTTP/2", resp.ProtoMajor)
	}
	lines := make(chan string, 100)
	go func() {
		defer close(lines)
		for r := bufio.NewReader(resp.Body); ; {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			lines <- line
		}
	}()
	want := func(what string, ok func(string) bool) {
		t.Helper()
		for deadline := time.After(3 * cfg.heartbeat); ; {
			select {
			case l, open := <-lines:
				if !open {
					t.Fatalf("stream ended waiting for %s", what)
				} else if ok(l) {
					return
				}
			case <-deadline:
				t.Fatalf("no %s within %s", what, 3*cfg.heartbeat)
			}
		}
	}
	b.insert(jwt, "first", 1)
	want("the first event", func(l string) bool { return l == "event:first\n" })
	for i := range 2 { // two silences longer than writeTimeout, each ended by a keep-alive
		want(fmt.Sprint("keep-alive ", i+1), func(l string) bool { return l == ":\n" })
	}
	b.insert(jwt, "after", 2)
	want("the event after the silences", func(l string) bool { return l == "event:after\n" })
}

// TestEventSourceResumesAcrossRestart: the browser's own EventSource, given the JWT as
// ?access_token=, receives the backlog and live events and, when the broker restarts,
// reconnects by itself with Last-Event-ID and misses nothing, twice nothing.
func TestEventSourceResumesAcrossRestart(t *testing.T) {
	ctx := browser(t)
	db := t.TempDir()
	b := startBroker(t, "--db", db, "--port", "0")
	base, port := "http://"+b.addr, portOf(b.addr)
	postJSON(t, base+"/create_user", `{"username":"eve","password":"pw","admin_token":"letmein","tenant_name":"t"}`)
	jwt := postJSON(t, base+"/login", `{"username":"eve","password":"pw"}`)["jwt"].(string)
	insert := func(n int) {
		req, _ := http.NewRequest("POST", base+"/insert", strings.NewReader(fmt.Sprintf(`{"event":"n","data":%d}`, n)))
		req.Header.Set("Authorization", "Bearer "+jwt)
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("insert %d: %v %v", n, resp, err)
		}
		resp.Body.Close()
	}
	insert(1)
	// The page comes from another origin, as an application's would.
	page := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `<!doctype html><script>
			window.got = [];
			const es = new EventSource(%q + '/sse?access_token=' + %q);
			es.addEventListener('n', (e) => window.got.push(e.lastEventId + '=' + e.data));
		</script>`, base, jwt)
	}))
	defer page.Close()
	wantGot := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			got, err := chromedp.Run(sctx, chromedp.Evaluate[[]string](`window.got || []`))
			cancel()
			if err == nil && strings.Join(got, " ") == want {
				return
			} else if time.Now().After(deadline) {
				t.Fatalf("events in the page: got %q (%v); want %q", strings.Join(got, " "), err, want)
			}
		}
	}
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := chromedp.Do(sctx, chromedp.Navigate(page.URL)); err != nil {
		t.Fatal(err)
	}
	wantGot("1=1")
	insert(2)
	wantGot("1=1 2=2")
	if err := b.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}
	// On the same port, which the page's EventSource reconnects to: again while another
	// socket holds it for a moment.
	b = startBrokerRetry(t, func() []string { return []string{"--db", db, "--port", port} })
	insert(3) // while the page is away: it comes with the resume
	wantGot("1=1 2=2 3=3")
	insert(4)
	wantGot("1=1 2=2 3=3 4=4")
}
