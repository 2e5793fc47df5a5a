package main

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"image"
	"image/png"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/makiuchi-d/gozxing/common"
	"github.com/makiuchi-d/gozxing/qrcode/decoder"
)

// TestTOTPRFC6238 checks the code generator against RFC 6238 appendix B (SHA1, 6-digit
// form of the 8-digit table: leading zeros kept, times beyond 2038).
func TestTOTPRFC6238(t *testing.T) {
	secret := "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ" // "12345678901234567890"
	for unix, want := range map[int64]string{59: "287082", 1111111109: "081804", 1111111111: "050471", 1234567890: "005924", 2000000000: "279037", 20000000000: "353130"} {
		if got := totpCode(secret, unix/30); got != want {
			t.Errorf("code at %d: got %s; want %s", unix, got, want)
		}
	}
}

// readQR returns the text of a QR code drawn as go-qrcode draws it: n×n modules (with a
// quiet zone of 4), each pixel the colour of the module under it, so at 320 px modules
// are unevenly 5 or 6 pixels wide (nearest-neighbour scaling). It samples the middle of
// every module and decodes the modules, with error correction, trying each symbol size.
//
// gozxing's QRCodeReader, made for photos, misreads some of these images: its detector
// (finder and alignment patterns, grid estimate) fails on about 1.3 % of these valid
// codes, at 320 px or at whole pixels per module alike, and its PURE_BARCODE mode samples
// at a single module width, which the uneven scaling defeats (under the issuer "My App":
// most codes for a 1-character username, every one for 19 to 48 characters).
func readQR(img image.Image) (string, error) {
	r := img.Bounds()
	size := r.Dx()
	if r.Dy() != size {
		return "", fmt.Errorf("QR image is %d×%d px; want a square", r.Dx(), r.Dy())
	}
	dark := func(x, y int) bool {
		red, green, blue, _ := img.At(r.Min.X+x, r.Min.Y+y).RGBA()
		return red+green+blue < 3*0x8000
	}
	var err error
	for version := 1; version <= 40; version++ {
		n := 17 + 4*version + 8 // modules across, with the quiet zone
		if 2*n > size {         // under 2 px a module, the middle pixel may be the next module's
			break
		}
		modules := make([][]bool, n-8)
		for y := range modules {
			modules[y] = make([]bool, n-8)
			for x := range modules[y] {
				modules[y][x] = dark((2*(x+4)+1)*size/(2*n), (2*(y+4)+1)*size/(2*n))
			}
		}
		var res *common.DecoderResult
		if res, err = decoder.NewDecoder().DecodeBoolMap(modules, nil); err == nil {
			return res.GetText(), nil
		}
	}
	return "", fmt.Errorf("no QR version decodes: %v", err)
}

// enrol turns two-factor on for a new user and returns the secret read back from the QR.
func (b *testBroker) enrol(name string) string {
	b.t.Helper()
	b.createUser(name, "t", obj{"two_factor": true})
	qr := b.must(200, "POST", "/create_qr", obj{"admin_token": "letmein", "username": name, "issuer": "My App"})["qr"].(string)
	raw, err := base64.StdEncoding.DecodeString(qr)
	if err != nil {
		b.t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(raw))
	if err != nil {
		b.t.Fatal(err)
	}
	if w := img.Bounds().Dx(); w < 200 {
		b.t.Errorf("QR is %d px wide; too small to scan off a screen", w)
	}
	text, err := readQR(img)
	if err != nil {
		b.t.Fatalf("decode QR: %v", err)
	}
	u, err := url.Parse(text)
	if err != nil {
		b.t.Fatal(err)
	}
	stored, _ := b.s.db.getUser(name)
	if want := otpauthURL("My App", name, stored.TOTPSecret); text != want {
		b.t.Errorf("QR text %s; want %s", text, want)
	}
	q := u.Query()
	if u.Scheme != "otpauth" || u.Host != "totp" || u.Path != "/My App:"+name || q.Get("issuer") != "My App" || q.Get("algorithm") != "SHA1" || q.Get("digits") != "6" || q.Get("period") != "30" {
		b.t.Errorf("otpauth URL %s", text)
	}
	return q.Get("secret")
}

func (b *testBroker) code(secret string, shift time.Duration) string {
	return totpCode(secret, b.s.now().Add(shift).Unix()/30)
}

func TestTwoFactorLogin(t *testing.T) {
	b := newTestBroker(t)
	secret := b.enrol("tim")
	pw := "pw-tim"
	b.must(401, "POST", "/login", obj{"username": "tim", "password": pw})
	b.must(401, "POST", "/login", obj{"username": "tim", "password": pw, "totp": "000000x"})
	b.must(401, "GET", "/verify", nil, basic("tim", pw)...) // Basic cannot carry a code
	code := b.code(secret, 0)
	b.must(401, "POST", "/login", obj{"username": "tim", "password": "wrong", "totp": code})
	jwt := b.must(200, "POST", "/login", obj{"username": "tim", "password": pw, "totp": code})["jwt"].(string)
	b.must(200, "GET", "/verify", nil, bearer(jwt)...)
	b.must(401, "POST", "/login", obj{"username": "tim", "password": pw, "totp": code}) // replayed
	// The previous step's code is older than the accepted one: refused too. The next
	// step's code (one step of skew) is accepted once.
	b.must(401, "POST", "/login", obj{"username": "tim", "password": pw, "totp": b.code(secret, -30*time.Second)})
	b.must(200, "POST", "/login", obj{"username": "tim", "password": pw, "totp": b.code(secret, 30*time.Second)})
	b.must(401, "POST", "/login", obj{"username": "tim", "password": pw, "totp": b.code(secret, 90*time.Second)})

	// Off and on again: a new secret.
	b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "tim", "two_factor": false})
	b.must(200, "POST", "/login", obj{"username": "tim", "password": pw})
	b.must(200, "POST", "/update_user", obj{"admin_token": "letmein", "username": "tim", "two_factor": true})
	if u, _ := b.s.db.getUser("tim"); u.TOTPSecret == "" || u.TOTPSecret == secret {
		t.Error("turning two-factor on again kept the old secret")
	}
	b.createUser("plain", "t")
	b.must(400, "POST", "/create_qr", obj{"admin_token": "letmein", "username": "plain", "issuer": "x"})
	b.must(404, "POST", "/create_qr", obj{"admin_token": "letmein", "username": "nobody", "issuer": "x"})
}

func TestPasswordReset(t *testing.T) {
	b := newTestBroker(t, func(c *config) { c.passwordChecker = true })
	strong, newer := "correct horse battery staple 93", "violet tractor ocean mumble 17"
	b.must(200, "POST", "/create_user", obj{"username": "rosa", "password": strong, "admin_token": "letmein", "tenant_name": "t"})
	old := b.must(200, "POST", "/login", obj{"username": "rosa", "password": strong})["jwt"].(string)
	code := b.must(200, "POST", "/create_totp", obj{"admin_token": "letmein", "username": "rosa"})["totp"].(string)
	if len(code) != 6 {
		t.Fatalf("reset code %q", code)
	}
	wrong := strconv.Itoa((mustAtoi(t, code) + 1) % 1000000)
	b.must(401, "POST", "/password_reset", obj{"username": "rosa", "totp": wrong, "password": newer})
	b.must(400, "POST", "/password_reset", obj{"username": "rosa", "totp": code, "password": "password1"})
	b.must(200, "POST", "/login", obj{"username": "rosa", "password": strong}) // nothing changed
	b.must(200, "POST", "/password_reset", obj{"username": "rosa", "totp": code, "password": newer})
	b.must(401, "POST", "/password_reset", obj{"username": "rosa", "totp": code, "password": strong}) // used
	b.must(401, "GET", "/verify", nil, bearer(old)...)                                                // issued before the reset
	b.must(401, "POST", "/login", obj{"username": "rosa", "password": strong})
	b.must(200, "POST", "/login", obj{"username": "rosa", "password": newer})
	// An expired code is refused.
	code = b.must(200, "POST", "/create_totp", obj{"admin_token": "letmein", "username": "rosa"})["totp"].(string)
	b.offset.Add(int64(301 * time.Second))
	b.must(401, "POST", "/password_reset", obj{"username": "rosa", "totp": code, "password": strong})
	b.must(401, "POST", "/password_reset", obj{"username": "nobody", "totp": code, "password": strong})
}

func mustAtoi(t *testing.T, s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestLoginThrottle(t *testing.T) {
	b := newTestBroker(t)
	b.createUser("vic", "t")
	b.createUser("other", "t")
	for i := 0; i < 5; i++ {
		b.must(401, "POST", "/login", obj{"username": "vic", "password": "guess"})
	}
	code, _ := b.do("POST", "/login", obj{"username": "vic", "password": "pw-vic"})
	resp, err := b.ts.Client().Post(b.ts.URL+"/login", "", bytes.NewReader([]byte(`{"username":"vic","password":"pw-vic"}`)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if code != 429 || resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
		t.Errorf("locked login with the right password: got %d, Retry-After %q; want 429 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	b.must(429, "GET", "/verify", nil, basic("vic", "pw-vic")...)
	b.login("other") // other users are unaffected
	b.offset.Add(int64(2 * time.Second))
	b.login("vic")
	// Spraying many usernames from one address locks the address.
	for i := 0; i < 20; i++ {
		b.do("POST", "/login", obj{"username": "spray" + strconv.Itoa(i), "password": "guess"})
	}
	b.must(429, "POST", "/login", obj{"username": "other", "password": "pw-other"})
}

// TestThrottleBounded: the throttle holds at most maxKeys fixed-size keys whatever it is
// fed. A flood of new keys neither grows it nor makes it forget recent failures: it
// forgets only failures older than forget, and refuses new keys while it cannot.
func TestThrottleBounded(t *testing.T) {
	th := &throttle{maxKeys: 100, strikes: map[tkey]strike{}}
	now := time.Now()
	victim := accountKey("login", "victim")
	for range 4 {
		end, _ := th.begin(now, victim)
		end(true)
	}
	refused := 0
	for i := range 10000 {
		end, err := th.begin(now, accountKey("login", strings.Repeat("x", 1000)+strconv.Itoa(i)))
		if err != nil {
			refused++
			continue
		}
		end(true)
		if len(th.strikes) > th.maxKeys {
			t.Fatalf("throttle holds %d keys; max %d", len(th.strikes), th.maxKeys)
		}
	}
	if refused < 9000 || th.strikes[victim].fails != 4 {
		t.Errorf("flooded with 10,000 new keys: %d refused, victim's failures %d; want most refused and 4 kept", refused, th.strikes[victim].fails)
	}
	if end, err := th.begin(now.Add(2*time.Second), victim); err != nil { // a held key needs no room
		t.Errorf("a key the full throttle holds: %v; want its attempt evaluated", err)
	} else {
		end(false)
	}
	later := now.Add(forget + time.Minute) // every failure is old enough to forget
	if end, err := th.begin(later, accountKey("login", "new")); err != nil {
		t.Errorf("new key after the failures were forgotten: %v", err)
	} else {
		end(false)
	}
	addr := tkey{digest: [32]byte{1}, free: 20, parallel: 2}
	for range 25 {
		if end, err := th.begin(later, addr); err == nil {
			end(true)
		}
	}
	if _, err := th.begin(later, addr); err == nil {
		t.Error("address not locked after 25 failures")
	}
}
