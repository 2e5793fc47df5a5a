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
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pquerna/otp"
	"github.com/pquerna/otp/hotp"
	"github.com/skip2/go-qrcode"
)

// throttle slows down guessing. After a few failures for a key (a username, or a client
// address) each further failure locks the key for a pause that doubles up to 15 minutes;
// a locked key is answered 429 even with the right password. It holds at most max keys.
type throttle struct {
	max     int
	mu      sync.Mutex // guards strikes
	strikes map[string]*strike
}

type strike struct {
	fails int
	until time.Time
}

// retryError is errTooMany with the pause the client must wait (Retry-After).
type retryError struct{ after time.Duration }

func (e *retryError) Error() string { return "too many attempts, retry later" }
func (e *retryError) Unwrap() error { return errTooMany }

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

// fail counts a failure for each key. A username gets 5 free failures; a client address,
// which many users may share behind one NAT or proxy, 20. A full map forgets its unlocked
// keys, and if all are locked, everything.
func (t *throttle) fail(now time.Time, keys ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.strikes) >= t.max {
		for k, st := range t.strikes {
			if !now.Before(st.until) {
				delete(t.strikes, k)
			}
		}
		if len(t.strikes) >= t.max {
			clear(t.strikes)
		}
	}
	for _, k := range keys {
		st := t.strikes[k]
		if st == nil {
			st = &strike{}
			t.strikes[k] = st
		}
		st.fails++
		free := 5
		if strings.HasPrefix(k, "addr:") {
			free = 20
		}
		if n := st.fails - free; n > 0 {
			st.until = now.Add(min(time.Second<<min(n-1, 20), 15*time.Minute))
		}
	}
}

// succeed clears the counter of a username. Address counters stay: an attacker's own
// successful logins must not reset the count of their guesses.
func (t *throttle) succeed(username string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.strikes, "user:"+username)
}

// newTOTPSecret returns a random 160-bit secret in unpadded base32 (RFC 4226 §4).
func newTOTPSecret() string {
	return base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(randomBytes(20))
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand)
	return b
}

// totpCode is the RFC 6238 code (SHA1, 6 digits) of secret at time step step (30 s).
func totpCode(secret string, step int64) string {
	code, _ := hotp.GenerateCodeCustom(secret, uint64(step), hotp.ValidateOpts{Digits: otp.DigitsSix, Algorithm: otp.AlgorithmSHA1})
	return code // "" for a malformed secret: never equal to a code
}

var errReplay = errors.New("code already used")

// checkTOTP reports whether code is u's code at the current step or one step either side,
// and newer than the last accepted one. The matched step is recorded in the transaction
// that checks it, so a code is accepted only once.
func (s *server) checkTOTP(u *user, code string) (bool, error) {
	now, matched := s.now().Unix()/30, int64(-1)
	for step := now - 1; step <= now+1; step++ {
		if len(code) == 6 && subtle.ConstantTimeCompare([]byte(totpCode(u.TOTPSecret, step)), []byte(code)) == 1 {
			matched = step
		}
	}
	if matched <= u.TOTPStep {
		return false, nil
	}
	_, err := s.db.updateUser(u.Username, false, func(cur *user) error {
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

// otpauthURL is the enrolment URL that authenticator apps read from the QR code.
func otpauthURL(issuer, username, secret string) string {
	q := url.Values{"secret": {secret}, "issuer": {issuer}, "algorithm": {"SHA1"}, "digits": {"6"}, "period": {"30"}}
	return "otpauth://totp/" + url.PathEscape(issuer) + ":" + url.PathEscape(username) + "?" + q.Encode()
}

// qrPNG renders text as a 320-pixel PNG QR code with a quiet zone, easy to scan off a screen.
func qrPNG(text string) ([]byte, error) { return qrcode.Encode(text, qrcode.Medium, 320) }

// newResetCode returns a random 6-digit password-reset code.
func newResetCode() string {
	n, _ := rand.Int(rand.Reader, big.NewInt(1_000_000))
	return fmt.Sprintf("%06d", n)
}

func hashCode(code string) string {
	h := sha256.Sum256([]byte(code))
	return hex.EncodeToString(h[:])
}

// useResetCode consumes u's reset code if code matches and has not expired at now.
func useResetCode(u *user, code string, now time.Time) bool {
	ok := u.ResetCode != "" && now.Unix() < u.ResetExpiry && subtle.ConstantTimeCompare([]byte(u.ResetCode), []byte(hashCode(code))) == 1
	if ok {
		u.ResetCode, u.ResetExpiry = "", 0
	}
	return ok
}

func retryAfter(err *retryError) string {
	return strconv.Itoa(int((err.after + time.Second - 1) / time.Second))
}
