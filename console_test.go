package main

import (
	"bytes"
	"context"
	"fmt"
	"image"
	"image/draw"
	"image/png"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// browser starts headless Chromium for the test, or skips (fails under CI) without it.
func browser(t *testing.T) context.Context {
	t.Helper()
	path := ""
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("chromium is missing: apt-get install -y chromium")
		}
		t.Skip("needs Chromium: apt-get install -y chromium")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(path), chromedp.NoSandbox,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.Flag("disable-quic", true), chromedp.WindowSize(1100, 760))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancel)
	ctx, cancel2 := chromedp.NewContext(actx)
	t.Cleanup(cancel2)
	if err := chromedp.Do(ctx); err != nil { // starts the browser: no timeout on this first call
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// TestConsole drives the admin console in a real browser through every feature: what is
// hidden before sign-in, sign in, users, revocation, the QR code, and the live view of a
// tenant with the admin token alone: long data shortened, reconnection by Last-Event-ID,
// inserts as a user.
func TestConsole(t *testing.T) {
	// Keep-alives every 300 ms: the page reads them between the events, and a stream the
	// page has left is found (and counted out) within two of them.
	b := newTestBroker(t, func(c *config) { c.heartbeat = 300 * time.Millisecond })
	ctx := browser(t)
	// The page logs no exception and no error (a CSP violation, say), but for the requests
	// refused on purpose (the network's).
	cctx, stopConsole := context.WithCancel(ctx)
	defer stopConsole()
	messages, pageErrors := chromedp.Console(cctx), make(chan []string, 1) // subscribed from here on
	go func() {
		var errs []string
		for m, err := range messages {
			if err != nil {
				break
			} else if m.IsException() || m.Type == chromedp.ConsoleError && m.Source != "network" {
				errs = append(errs, m.String())
			}
		}
		pageErrors <- errs
	}()
	run := func(step string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := chromedp.Do(sctx, actions...); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("read %s: %v", sel, err)
		}
		return s
	}
	eval := func(expr string) string { return string(js[[]byte](t, ctx, expr)) } // expr's value, as JSON
	// poll waits for expr to be true, or fails showing the value of each of show.
	poll := func(step, expr string, show ...string) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		if _, err := chromedp.Run(sctx, chromedp.Poll[bool](expr, chromedp.WithPollingTimeout(10*time.Second))); err != nil {
			var seen []string
			for _, e := range append(show, `document.querySelector('main').innerText.slice(0, 1500)`) {
				seen = append(seen, e+" = "+eval(e))
			}
			t.Fatalf("%s: %v\n%s", step, err, strings.Join(seen, "\n"))
		}
	}
	// shown is true when sel's element takes room on the page (the CSS display, the hidden
	// attribute and the ancestors' included).
	shown := func(sel string) string {
		return fmt.Sprintf(`((e) => e !== null && e.getClientRects().length > 0)(document.querySelector(%q))`, sel)
	}
	// Every element with the hidden attribute is display: none, whatever the style sheet.
	const hiddenShown = `[...document.querySelectorAll('[hidden]')].filter((e) => getComputedStyle(e).display !== 'none').map((e) => e.id || e.tagName)`
	noHiddenShown := func(step string) {
		t.Helper()
		if got := eval(hiddenShown); got != "[]" {
			t.Errorf("%s: elements with the hidden attribute displayed: %s", step, got)
		}
	}
	// oneLine: each of sel's elements is on one line of text, with white-space: nowrap.
	oneLine := func(sel string) string {
		return fmt.Sprintf(`[...document.querySelectorAll(%q)].every((e) => {
			const r = document.createRange();
			r.selectNodeContents(e);
			return getComputedStyle(e).whiteSpace === 'nowrap' && r.getClientRects().length === 1;
		})`, sel)
	}
	rowHeight := func(event string) string {
		return fmt.Sprintf(`document.querySelector('#event-table tr[data-event=%q]').getBoundingClientRect().height`, event)
	}

	// The console's headers.
	resp, err := http.Get(b.ts.URL + "/admin/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") ||
		resp.Header.Get("X-Frame-Options") != "DENY" || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
		t.Errorf("console headers: %v", resp.Header)
	}

	// Before sign-in, only the sign-in form shows: not the nav, not the tabs' content, not
	// the QR image (CSS display rules of nav and #qr once beat their hidden attribute).
	run("open", chromedp.Navigate(b.ts.URL+"/admin/"), chromedp.WaitVisible(chromedp.CSS("#admin-token")))
	noHiddenShown("before sign-in")
	for _, sel := range []string{"#tabs", "#signout", `#tabs [data-tab=events]`, "#users", "#user-table", "#events", "#event-table", "#qr", "#as-user"} {
		if got := eval(shown(sel)); got != "false" {
			t.Errorf("before sign-in, %s is shown", sel)
		}
	}
	if got := eval(`[getComputedStyle(document.querySelector('#tabs')).display, getComputedStyle(document.querySelector('#qr')).display,
		document.querySelector('#tabs').offsetParent, document.querySelector('#qr').offsetParent]`); got != `["none","none",null,null]` {
		t.Errorf("before sign-in, nav and QR display, offsetParent: %s", got)
	}
	run("wrong token", chromedp.Focus(chromedp.CSS("#admin-token")), chromedp.KeyEvent("nope"), chromedp.Focus(chromedp.CSS("#admin-token")), chromedp.KeyEvent("\r"),
		chromedp.WaitVisible(chromedp.CSS("#signin-error")))
	if got := text("#signin-error"); got != "Wrong admin token." {
		t.Errorf("wrong token message: %q", got)
	}
	if got := eval(shown("#tabs")); got != "false" {
		t.Error("the nav shows after a wrong token")
	}
	run("sign in", chromedp.SetValue(chromedp.CSS("#admin-token"), "letmein"), chromedp.Focus(chromedp.CSS("#admin-token")), chromedp.KeyEvent("\r"),
		chromedp.WaitVisible(chromedp.CSS("#user-table")), chromedp.WaitVisible(chromedp.CSS("#tabs")))
	noHiddenShown("signed in")
	if got := eval(shown("#signin")); got != "false" {
		t.Error("the sign-in form shows once signed in")
	}

	// Create a user: invalid JSON data is flagged inline before anything is sent.
	run("new user", chromedp.Click(chromedp.CSS("#new-user")), chromedp.WaitVisible(chromedp.CSS("#f-username")),
		chromedp.Focus(chromedp.CSS("#f-username")), chromedp.KeyEvent("carol"), chromedp.Focus(chromedp.CSS("#f-tenant")), chromedp.KeyEvent("acme"),
		chromedp.Focus(chromedp.CSS("#f-password")), chromedp.KeyEvent("pw-carol"), chromedp.Focus(chromedp.CSS("#f-email")), chromedp.KeyEvent("carol@example.com"),
		chromedp.Focus(chromedp.CSS("#f-scopes")), chromedp.KeyEvent("news:get news:post"), chromedp.Focus(chromedp.CSS("#f-data")), chromedp.KeyEvent(`{"name": `),
		chromedp.Click(chromedp.CSS("#f-two-factor")), chromedp.Click(chromedp.CSS("#save-user")),
		chromedp.WaitVisible(chromedp.CSS(`.error[data-for=data]`)))
	if b.userCount() != 0 {
		t.Error("a user was created with invalid data")
	}
	run("fix data and save", chromedp.SetValue(chromedp.CSS("#f-data"), `{"name": "Carol"}`), chromedp.Click(chromedp.CSS("#save-user")),
		chromedp.WaitVisible(chromedp.CSS(`#user-table tr[data-username="carol"]`)))
	// A server-side refusal is shown next to its field.
	// Keys are sent with Focus and KeyEvent throughout: chromedp 0.23's SendKeys reads a node's
	// attributes without its lock while the event loop updates them (a data race inside
	// chromedp, seen when the form drops its readonly attribute).
	run("throwaway email", chromedp.Click(chromedp.CSS("#new-user")), chromedp.WaitVisible(chromedp.CSS("#f-username")),
		chromedp.Focus(chromedp.CSS("#f-username")), chromedp.KeyEvent("dave"),
		chromedp.Focus(chromedp.CSS("#f-tenant")), chromedp.KeyEvent("acme"), chromedp.Focus(chromedp.CSS("#f-password")), chromedp.KeyEvent("pw-dave"),
		chromedp.Focus(chromedp.CSS("#f-email")), chromedp.KeyEvent("dave@mailinator.com"), chromedp.Click(chromedp.CSS("#save-user")),
		chromedp.WaitVisible(chromedp.CSS(`.error[data-for=email]`)))
	run("valid email", chromedp.SetValue(chromedp.CSS("#f-email"), "dave@example.com"), chromedp.Click(chromedp.CSS("#save-user")),
		chromedp.WaitVisible(chromedp.CSS(`#user-table tr[data-username="dave"]`)))
	for _, name := range []string{"erin", "frank"} {
		b.createUser(name, "globex", obj{"scopes": []string{"files:get"}})
	}
	u, err := b.s.db.getUser("carol")
	if err != nil || u.Tenant != "acme" || !u.TwoFactor || len(u.Scopes) != 2 || string(u.Data) != `{"name":"Carol"}` || *u.Email != "carol@example.com" {
		t.Fatalf("carol as stored: %+v %v", u, err)
	}

	// Open carol: her two-factor tools show, but no QR image (no broken-image box) until it
	// is asked for. Show her QR, create a reset code, revoke her.
	run("open carol", chromedp.Click(chromedp.CSS(`#user-table tr[data-username="carol"]`)), chromedp.WaitVisible(chromedp.CSS("#show-qr")))
	noHiddenShown("carol open")
	if got := eval(`[` + shown("#two-factor-tools") + `, ` + shown("#qr") + `, getComputedStyle(document.querySelector('#qr')).display]`); got != `[true,false,"none"]` {
		t.Errorf("before the QR is asked for: two-factor tools shown, QR shown, QR display = %s; want [true,false,\"none\"]", got)
	}
	run("show QR", chromedp.Click(chromedp.CSS("#show-qr")), chromedp.WaitVisible(chromedp.CSS("#qr")))
	poll("QR rendered", `document.querySelector('#qr').src.startsWith('data:image/png;base64,') && document.querySelector('#qr').naturalWidth > 100`)
	run("reset code", chromedp.Click(chromedp.CSS("#create-code")), chromedp.WaitVisible(chromedp.CSS("#reset-code")))
	poll("reset code shown", `/^\d{6} — valid \d:\d\d more$/.test(document.querySelector('#reset-code').textContent)`)
	run("revoke", chromedp.Click(chromedp.CSS("#revoke")), chromedp.WaitVisible(chromedp.CSS(`#user-table tr[data-username="carol"] td.revoked`)))
	if u, _ := b.s.db.getUser("carol"); !u.Revoked {
		t.Error("carol not revoked")
	}
	run("close", chromedp.Click(chromedp.CSS("#cancel-user")), chromedp.WaitVisible(chromedp.CSS(`#user-table tr[data-username="frank"]`)))
	shot1 := screenshot(t, ctx)

	// Events: the admin picks a tenant among those of the users and watches its stream with
	// the admin token alone; the events are inserted by users through the HTTP API.
	jd, je := b.login("dave"), b.login("erin")
	b.insert(jd, "greeting", map[string]string{"text": "earlier"})
	b.insert(je, "other", "globex's")
	run("events tab", chromedp.Click(chromedp.CSS(`#tabs [data-tab=events]`)), chromedp.WaitVisible(chromedp.CSS("#w-tenant")))
	poll("tenants offered", `[...document.querySelectorAll('#tenant-list option')].map((o) => o.value).join() === 'acme,globex'`,
		`document.querySelector('#tenant-list').innerHTML`)
	noHiddenShown("events tab")
	if got := eval(`[` + shown("#live") + `, ` + shown("#stop-watch") + `, ` + shown("#u-username") + `]`); got != "[false,false,false]" {
		t.Errorf("events tab before watching: live, stop, user form shown = %s; want all false", got)
	}
	run("watch acme", chromedp.SetValue(chromedp.CSS("#w-tenant"), "acme"), chromedp.Click(chromedp.CSS(`#watch-form button[type=submit]`)),
		chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="greeting"]`)))
	poll("live", `document.querySelector('#stream-status').textContent === 'Live: events of tenant acme.'`, `document.querySelector('#stream-status').textContent`)
	waitFor(t, 10*time.Second, "one admin stream", func() bool { return b.openStreams("") == 1 })
	// No user signed in and no user's credential stored. (The admin token was not in the
	// URL: the server refuses it there.)
	if got := eval(`[Object.keys(sessionStorage), localStorage.length, document.cookie, ` + shown("#as-user-on") + `, location.pathname + location.search]`); got != `[["adminToken"],0,"",false,"/admin/"]` {
		t.Errorf("storage, cookies, user signed in, page address: %s", got)
	}
	b.insert(jd, "news", map[string]string{"title": "first"})
	run("live event", chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="news"]`)))
	b.insert(jd, "news", map[string]string{"title": "again"})
	poll("updated in place", `document.querySelectorAll('#event-table tr[data-event="news"]').length === 1 &&
		document.querySelector('#event-table tbody tr').dataset.event === 'news' &&
		document.querySelector('#event-table tr[data-event="news"] td.data').textContent === '{"title":"again"}'`)

	// The largest event the server accepts (a 700 KB one is refused, 413) shows as one line,
	// its beginning; the whole is one click away, in a box of bounded height.
	big := strings.Repeat("x", maxEventData-2) // as JSON: maxEventData bytes
	b.insert(jd, "big", big)
	run("big event", chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="big"] details.long summary`)))
	poll("big event shortened", rowHeight("big")+` < 60 && document.querySelector('#event-table tr[data-event="big"] summary').textContent.length < 300 &&
		!document.querySelector('#event-table tr[data-event="big"] details').open && `+oneLine(`#event-table td.received`),
		rowHeight("big"), `document.querySelector('#event-table tr[data-event="big"] summary').textContent.length`)
	if got, want := js[string](t, ctx, `document.querySelector('#event-table tr[data-event="big"] summary').textContent`),
		`65,536 characters "`+strings.Repeat("x", 199)+`…`; got != want {
		t.Errorf("big event summary: %q; want %q", got, want)
	}
	if got := js[float64](t, ctx, `document.documentElement.scrollHeight`); got > 760 {
		t.Errorf("page height with a big event: %v px; want the window's", got)
	}
	// The same on a phone's width: still one line per row, the time of reception unwrapped.
	size := js[[]int64](t, ctx, `[innerWidth, innerHeight]`)
	run("narrow", chromedp.EmulateViewport(390, 760))
	poll("narrow: big event shortened", `innerWidth === 390 && `+rowHeight("big")+` < 60 && `+oneLine(`#event-table td.received`), rowHeight("big"))
	run("wide", chromedp.EmulateViewport(size[0], size[1])) // as before (ResetViewport keeps 390)
	poll("wide again", fmt.Sprintf(`innerWidth === %d`, size[0]), `innerWidth`)
	poll("highlights over", `document.getAnimations().length === 0`) // for the screenshot
	shot2 := screenshot(t, ctx)

	run("expand", chromedp.Click(chromedp.CSS(`#event-table tr[data-event="big"] summary`)),
		chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="big"] pre.full`)))
	full := `document.querySelector('#event-table tr[data-event="big"] pre.full')`
	poll("big event whole", fmt.Sprintf(`%s.textContent === '"' + 'x'.repeat(%d) + '"' && %s.clientHeight > 100 && %s.clientHeight <= 320 &&
		%s.scrollHeight > 10 * %s.clientHeight && %s < 420`, full, maxEventData-2, full, full, full, full, rowHeight("big")),
		full+`.clientHeight`, full+`.scrollHeight`, rowHeight("big"))
	// A newer event of the name replaces the data and stays open.
	b.insert(jd, "big", strings.Repeat("y", maxEventData-2))
	poll("big event updated open", fmt.Sprintf(`document.querySelector('#event-table tr[data-event="big"] details').open &&
		%s.textContent === '"' + 'y'.repeat(%d) + '"'`, full, maxEventData-2))
	run("collapse", chromedp.Click(chromedp.CSS(`#event-table tr[data-event="big"] summary`)))
	poll("big event collapsed", rowHeight("big")+` < 60`, rowHeight("big"))

	// Event data is text, never HTML.
	b.insert(jd, "html", `<img src=x onerror="document.title='owned'">`)
	run("html event", chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="html"]`)))
	if got, want := js[string](t, ctx, `document.querySelector('#event-table tr[data-event="html"] td.data').textContent`),
		`"<img src=x onerror=\"document.title='owned'\">"`; got != want {
		t.Errorf("html event shown as %q; want %q", got, want)
	}
	if got := eval(`[document.querySelectorAll('#event-table img').length, document.title]`); got != `[0,"broker console"]` {
		t.Errorf("html event: images, title: %s", got)
	}

	// When the stream ends the page reconnects with Last-Event-ID: it gets the event
	// inserted meanwhile, and not the latest of every name again (the greeting row it is
	// made to forget stays away).
	eval(`document.querySelector('#event-table tr[data-event="greeting"]').remove()`)
	for _, s := range b.s.hub.all() {
		if s.user == "" {
			s.end()
		}
	}
	b.insert(jd, "during", "the gap")
	run("resumed", chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="during"]`)))
	poll("resumed live", `document.querySelector('#stream-status').textContent === 'Live: events of tenant acme.' &&
		!document.querySelector('#event-table tr[data-event="greeting"]')`)
	if got := eval(`[...document.querySelectorAll('#event-table tbody tr')].map((r) => r.dataset.event + '#' + r.cells[1].textContent)`); got != `["during#7","html#6","big#5","news#3"]` {
		t.Errorf("rows after resuming: %s", got)
	}

	// Inserting is a user's act: the separate box signs in as one, without storing the JWT.
	run("as user", chromedp.Click(chromedp.CSS("#as-user summary")), chromedp.WaitVisible(chromedp.CSS("#u-username")),
		chromedp.Focus(chromedp.CSS("#u-username")), chromedp.KeyEvent("dave"), chromedp.Focus(chromedp.CSS("#u-password")), chromedp.KeyEvent("pw-dave"),
		chromedp.Click(chromedp.CSS(`#as-user-form button[type=submit]`)), chromedp.WaitVisible(chromedp.CSS("#i-event")))
	if got := text("#as-user-status"); got != "Inserting as dave, into tenant acme." {
		t.Errorf("as user: %q", got)
	}
	run("insert", chromedp.Focus(chromedp.CSS("#i-event")), chromedp.KeyEvent("news"), chromedp.Focus(chromedp.CSS("#i-data")), chromedp.KeyEvent(`{"title": "héllo"}`),
		chromedp.Focus(chromedp.CSS("#i-event")), chromedp.KeyEvent("\r"))
	poll("inserted", `document.querySelector('#event-table tbody tr').dataset.event === 'news' &&
		document.querySelector('#event-table tr[data-event="news"] td.data').textContent === '{"title":"héllo"}'`)
	if got := eval(`[Object.keys(sessionStorage), localStorage.length, document.cookie]`); got != `[["adminToken"],0,""]` {
		t.Errorf("storage after signing in as a user: %s", got)
	}

	// Another tenant: its own events only, and a warning that dave's inserts go elsewhere.
	run("watch globex", chromedp.SetValue(chromedp.CSS("#w-tenant"), "globex"), chromedp.Click(chromedp.CSS(`#watch-form button[type=submit]`)),
		chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="other"]`)), chromedp.WaitVisible(chromedp.CSS("#as-user-warning")))
	if got := eval(`[...document.querySelectorAll('#event-table tbody tr')].map((r) => r.dataset.event)`); got != `["other"]` {
		t.Errorf("globex rows: %s", got)
	}
	waitFor(t, 10*time.Second, "the acme stream closed", func() bool { return b.openStreams("") == 1 })
	run("stop", chromedp.Click(chromedp.CSS("#stop-watch")), chromedp.WaitNotVisible(chromedp.CSS("#live")))
	waitFor(t, 10*time.Second, "no admin stream", func() bool { return b.openStreams("") == 0 })

	// Signing out hides everything again and forgets the user's token.
	run("sign out", chromedp.Click(chromedp.CSS("#signout")), chromedp.WaitVisible(chromedp.CSS("#admin-token")))
	noHiddenShown("signed out")
	for _, sel := range []string{"#tabs", "#users", "#events", "#qr"} {
		if got := eval(shown(sel)); got != "false" {
			t.Errorf("after sign-out, %s is shown", sel)
		}
	}
	if got := eval(`[Object.keys(sessionStorage), document.querySelectorAll('#event-table tbody tr').length, ` + shown("#as-user-on") + `]`); got != `[[],0,false]` {
		t.Errorf("after sign-out: storage, event rows, user signed in: %s", got)
	}
	stopConsole()
	if errs := <-pageErrors; len(errs) > 0 {
		t.Errorf("the page's console:\n%s", strings.Join(errs, "\n"))
	}
	if os.Getenv("BROKER_SCREENSHOT") != "" {
		os.WriteFile("web/screenshot.png", stack(t, shot1, shot2), 0o644)
	}
}

// js evaluates expr in the page and decodes its value into T.
func js[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(sctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

func screenshot(t *testing.T, ctx context.Context) image.Image {
	t.Helper()
	buf, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(buf))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// stack puts two screenshots one above the other as one PNG.
func stack(t *testing.T, a, b image.Image) []byte {
	out := image.NewRGBA(image.Rect(0, 0, max(a.Bounds().Dx(), b.Bounds().Dx()), a.Bounds().Dy()+b.Bounds().Dy()))
	draw.Draw(out, a.Bounds(), a, image.Point{}, draw.Src)
	draw.Draw(out, b.Bounds().Add(image.Pt(0, a.Bounds().Dy())), b, image.Point{}, draw.Src)
	var buf bytes.Buffer
	if err := png.Encode(&buf, out); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
