package main

import (
	"bytes"
	"context"
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

// TestConsole drives the admin console in a real browser through every feature: sign in,
// users, revocation, the QR code, and the live view with an insert.
func TestConsole(t *testing.T) {
	b := newTestBroker(t)
	ctx := browser(t)
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
	poll := func(step, expr string) {
		t.Helper()
		if _, err := chromedp.Run(ctx, chromedp.Poll[bool](expr, chromedp.WithPollingTimeout(10*time.Second))); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
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

	run("open", chromedp.Navigate(b.ts.URL+"/admin/"), chromedp.WaitVisible(chromedp.CSS("#admin-token")))
	run("wrong token", chromedp.SendKeys(chromedp.CSS("#admin-token"), "nope"), chromedp.SendKeys(chromedp.CSS("#admin-token"), "\r"),
		chromedp.WaitVisible(chromedp.CSS("#signin-error")))
	if got := text("#signin-error"); got != "Wrong admin token." {
		t.Errorf("wrong token message: %q", got)
	}
	run("sign in", chromedp.SetValue(chromedp.CSS("#admin-token"), "letmein"), chromedp.SendKeys(chromedp.CSS("#admin-token"), "\r"),
		chromedp.WaitVisible(chromedp.CSS("#user-table")))

	// Create a user: invalid JSON data is flagged inline before anything is sent.
	run("new user", chromedp.Click(chromedp.CSS("#new-user")), chromedp.WaitVisible(chromedp.CSS("#f-username")),
		chromedp.SendKeys(chromedp.CSS("#f-username"), "carol"), chromedp.SendKeys(chromedp.CSS("#f-tenant"), "acme"),
		chromedp.SendKeys(chromedp.CSS("#f-password"), "pw-carol"), chromedp.SendKeys(chromedp.CSS("#f-email"), "carol@example.com"),
		chromedp.SendKeys(chromedp.CSS("#f-scopes"), "news:get news:post"), chromedp.SendKeys(chromedp.CSS("#f-data"), `{"name": `),
		chromedp.Click(chromedp.CSS("#f-two-factor")), chromedp.Click(chromedp.CSS("#save-user")),
		chromedp.WaitVisible(chromedp.CSS(`.error[data-for=data]`)))
	if b.userCount() != 0 {
		t.Error("a user was created with invalid data")
	}
	run("fix data and save", chromedp.SetValue(chromedp.CSS("#f-data"), `{"name": "Carol"}`), chromedp.Click(chromedp.CSS("#save-user")),
		chromedp.WaitVisible(chromedp.CSS(`#user-table tr[data-username="carol"]`)))
	// A server-side refusal is shown next to its field.
	run("throwaway email", chromedp.Click(chromedp.CSS("#new-user")), chromedp.SendKeys(chromedp.CSS("#f-username"), "dave"),
		chromedp.SendKeys(chromedp.CSS("#f-tenant"), "acme"), chromedp.SendKeys(chromedp.CSS("#f-password"), "pw-dave"),
		chromedp.SendKeys(chromedp.CSS("#f-email"), "dave@mailinator.com"), chromedp.Click(chromedp.CSS("#save-user")),
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

	// Open carol, show her QR, create a reset code, revoke her.
	run("open carol", chromedp.Click(chromedp.CSS(`#user-table tr[data-username="carol"]`)), chromedp.WaitVisible(chromedp.CSS("#show-qr")),
		chromedp.Click(chromedp.CSS("#show-qr")), chromedp.WaitVisible(chromedp.CSS("#qr")))
	poll("QR rendered", `document.querySelector('#qr').src.startsWith('data:image/png;base64,') && document.querySelector('#qr').naturalWidth > 100`)
	run("reset code", chromedp.Click(chromedp.CSS("#create-code")), chromedp.WaitVisible(chromedp.CSS("#reset-code")))
	poll("reset code shown", `/^\d{6} — valid \d:\d\d more$/.test(document.querySelector('#reset-code').textContent)`)
	run("revoke", chromedp.Click(chromedp.CSS("#revoke")), chromedp.WaitVisible(chromedp.CSS(`#user-table tr[data-username="carol"] td.revoked`)))
	if u, _ := b.s.db.getUser("carol"); !u.Revoked {
		t.Error("carol not revoked")
	}
	run("close", chromedp.Click(chromedp.CSS("#cancel-user")), chromedp.WaitVisible(chromedp.CSS(`#user-table tr[data-username="frank"]`)))
	shot1 := screenshot(t, ctx)

	// Watch dave's tenant and insert from the page.
	b.insert(b.login("dave"), "greeting", map[string]string{"text": "earlier"})
	run("events tab", chromedp.Click(chromedp.CSS(`#tabs [data-tab=events]`)), chromedp.WaitVisible(chromedp.CSS("#w-username")),
		chromedp.SendKeys(chromedp.CSS("#w-username"), "dave"), chromedp.SendKeys(chromedp.CSS("#w-password"), "pw-dave"),
		chromedp.SendKeys(chromedp.CSS("#w-username"), "\r"), chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="greeting"]`)))
	run("insert", chromedp.SendKeys(chromedp.CSS("#i-event"), "news"), chromedp.SendKeys(chromedp.CSS("#i-data"), `{"title": "héllo"}`),
		chromedp.SendKeys(chromedp.CSS("#i-event"), "\r"), chromedp.WaitVisible(chromedp.CSS(`#event-table tr[data-event="news"]`)))
	if got := text(`#event-table tr[data-event="news"] td.data`); got != `{"title":"héllo"}` {
		t.Errorf("news row data %q", got)
	}
	b.insert(b.login("dave"), "news", map[string]string{"title": "again"})
	poll("updated in place", `document.querySelectorAll('#event-table tr[data-event="news"]').length === 1 &&
		document.querySelector('#event-table tbody tr').dataset.event === 'news' &&
		document.querySelector('#event-table tr[data-event="news"] td.data').textContent.includes('again')`)
	shot2 := screenshot(t, ctx)
	if os.Getenv("BROKER_SCREENSHOT") != "" {
		os.WriteFile("web/screenshot.png", stack(t, shot1, shot2), 0o644)
	}
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
