package main

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base32"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/pquerna/otp"
	"github.com/pquerna/otp/hotp"
	"github.com/skip2/go-qrcode"
)

// throttle slows down guessing: after a few failures for a key (a username or a client
// address) every further failure locks the key for a pause that doubles up to 15 minutes,
// and a locked key is answered 429 even with the right password. It holds at most max keys.
type throttle struct {
	mu      sync.Mutex // guards strikes
	strikes map[string]*strike
	max     int
}

type strike struct {
	fails       int
	last, until time.Time
}

func newThrottle(max int) *throttle { return &throttle{strikes: map[string]*strike{}, max: max} }

// check returns a *retryError when one of keys is locked at now.
func (t *throttle) check(now time.Time, keys ...string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		if st := t.strikes[k]; st != nil && now.Before(st.until) {
			return &retryError{after: st.until.Sub(now)}
		}
	}
	return nil
}

// fail counts a failure for each key. Usernames get 5 free failures; client addresses,
// which many users may share behind one NAT or proxy, get 20.
func (t *throttle) fail(now time.Time, keys ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		st := t.strikes[k]
		if st == nil {
			t.makeRoom(now)
			st = &strike{}
			t.strikes[k] = st
		}
		st.fails++
		st.last = now
		free := 5
		if strings.HasPrefix(k, "addr:") {
			free = 20
		}
		if n := st.fails - free; n > 0 {
			st.until = now.Add(min(time.Second<<min(n-1, 20), 15*time.Minute))
		}
	}
}

// makeRoom keeps the map bounded: it forgets keys idle for an hour, and if none are, an
// arbitrary unlocked one (an attacker spraying usernames still meets the address key).
func (t *throttle) makeRoom(now time.Time) {
	if len(t.strikes) < t.max {
		return
	}
	for k, st := range t.strikes {
		if now.Sub(st.last) > time.Hour {
			delete(t.strikes, k)
		}
	}
	for k, st := range t.strikes {
		if len(t.strikes) < t.max {
			return
		}
		if !now.Before(st.until) {
			delete(t.strikes, k)
		}
	}
}

// succeed clears the counter of a username after a success. Address keys are left alone:
// an attacker's own successful logins must not reset the count of their guesses.
func (t *throttle) succeed(keys ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		if strings.HasPrefix(k, "user:") {
			delete(t.strikes, k)
		}
	}
}

// newTOTPSecret returns a random 160-bit secret in unpadded base32 (RFC 4226 §4).
func newTOTPSecret() string {
	b := make([]byte, 20)
	rand.Read(b)
	return base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b)
}

// totpCode is the RFC 6238 code (SHA1, 6 digits) of secret at time step step (30 s).
func totpCode(secret string, step int64) string {
	code, err := hotp.GenerateCodeCustom(secret, uint64(step), hotp.ValidateOpts{Digits: otp.DigitsSix, Algorithm: otp.AlgorithmSHA1})
	if err != nil {
		return "" // never equal to a 6-digit code
	}
	return code
}

var errReplay = errors.New("code already used")

// checkTOTP reports whether code is u's current code (one step of skew either way) and
// not one already accepted: the matched step must be later than the last accepted one,
// recorded in the same transaction that checks it, so a code works only once.
func (s *server) checkTOTP(u *user, code string) (bool, error) {
	now := s.now().Unix() / 30
	matched := int64(-1)
	for step := now - 1; step <= now+1; step++ {
		if len(code) == 6 && subtle.ConstantTimeCompare([]byte(totpCode(u.TOTPSecret, step)), []byte(code)) == 1 {
			matched = step
		}
	}
	if matched <= u.TOTPStep {
		return false, nil
	}
	_, err := s.db.updateUser(u.Username, func(cur *user) error {
		if cur.TOTPSecret != u.TOTPSecret || matched <= cur.TOTPStep {
			return errReplay
		}
		cur.TOTPStep = matched
		return nil
	})
	if errors.Is(err, errReplay) {
		return false, nil
	}
	return err == nil, err
}

// otpauthURL is the enrolment URL authenticator apps read from the QR code.
func otpauthURL(issuer, username, secret string) string {
	q := url.Values{"secret": {secret}, "issuer": {issuer}, "algorithm": {"SHA1"}, "digits": {"6"}, "period": {"30"}}
	return "otpauth://totp/" + url.PathEscape(issuer) + ":" + url.PathEscape(username) + "?" + q.Encode()
}

// qrPNG renders text as a PNG QR code of 320 px with a quiet zone, easy to scan off a screen.
func qrPNG(text string) ([]byte, error) {
	return qrcode.Encode(text, qrcode.Medium, 320)
}

// newResetCode returns a random 6-digit password-reset code and the hash that is stored.
func newResetCode() (code, stored string) {
	n, _ := rand.Int(rand.Reader, big.NewInt(1_000_000))
	code = fmt.Sprintf("%06d", n)
	return code, hashResetCode(code)
}

func hashResetCode(code string) string {
	h := sha256.Sum256([]byte(code))
	return hex.EncodeToString(h[:])
}

// useResetCode consumes u's reset code if code matches and has not expired at now.
func useResetCode(u *user, code string, now time.Time) bool {
	ok := u.ResetCode != "" && now.Unix() < u.ResetExpiry &&
		subtle.ConstantTimeCompare([]byte(u.ResetCode), []byte(hashResetCode(code))) == 1
	if ok {
		u.ResetCode, u.ResetExpiry = "", 0
	}
	return ok
}
