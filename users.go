package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/base32"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/mail"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/pquerna/otp"
	"github.com/pquerna/otp/hotp"
	"github.com/skip2/go-qrcode"
	"github.com/trustelem/zxcvbn"
	"golang.org/x/crypto/argon2"
)

// user is an account as the API shows it (CONTRACT §2); its secrets are stored beside it
// (storedUser) and never leave the server.
type user struct {
	ID        string          `json:"id"`
	Username  string          `json:"username"`
	Tenant    string          `json:"tenant_name"`
	Email     *string         `json:"email"`
	TwoFactor bool            `json:"two_factor"`
	Scopes    []string        `json:"scopes"`
	Data      json.RawMessage `json:"data"`
	Revoked   bool            `json:"revoked"`
	Password  string          `json:"password"` // always "***"
	TOTP      string          `json:"totp"`     // always "***"
	secrets   `json:"-"`
}

type secrets struct {
	Hash        string // argon2id, PHC string
	TOTPSecret  string // base32, while two-factor is on
	TOTPStep    int64  // last accepted TOTP time step: a code is accepted once
	ResetCode   string // SHA-256 of the pending password-reset code
	ResetExpiry int64  // unix seconds
	NotBefore   int64  // JWTs issued (iat) earlier are refused
}

// endTokens makes every JWT issued so far invalid (password change, revocation); new
// tokens are issued with iat >= NotBefore.
func (u *user) endTokens(now time.Time) { u.NotBefore = max(now.Unix(), u.NotBefore) + 1 }

// disposableDomains is the throwaway-mail domain list, one lower-case domain per line, from
// github.com/disposable-email-domains/disposable-email-domains (CC0-1.0), as packaged in the
// npm module disposable-email-domains-js 1.26.0.
//
//go:embed disposable_domains.txt
var disposableDomains string

var scopeRE = regexp.MustCompile(`^[A-Za-z0-9_.*-]+:[A-Za-z0-9_.*-]+$`)

// userFields are the settable fields of create and update; nil means "not given".
type userFields struct {
	Tenant    *string          `json:"tenant_name"`
	Password  *string          `json:"password"`
	Email     *string          `json:"email"`
	TwoFactor *bool            `json:"two_factor"`
	Scopes    *[]string        `json:"scopes"`
	Data      *json.RawMessage `json:"data"`
}

// validName: 1-64 characters of valid UTF-8 without control characters and, for a
// username, without spaces or ':' (HTTP Basic splits at the first ':').
func validName(s string, username bool) bool {
	n := utf8.RuneCountInString(s)
	return n >= 1 && n <= 64 && utf8.ValidString(s) && !strings.ContainsFunc(s, func(r rune) bool {
		return unicode.IsControl(r) || username && (unicode.IsSpace(r) || r == ':')
	})
}

// validate checks the given fields by the rules of CONTRACT §2.
func (s *server) validate(username string, f userFields) error {
	if !validName(username, true) {
		return fmt.Errorf("%w: username must be 1-64 characters without spaces, control characters or ':'", errInvalid)
	}
	if f.Tenant != nil && !validName(*f.Tenant, false) {
		return fmt.Errorf("%w: tenant_name must be 1-64 characters", errInvalid)
	}
	for _, sc := range deref(f.Scopes) {
		if !scopeRE.MatchString(sc) {
			return fmt.Errorf("%w: invalid scope %q: want resource:operation", errInvalid, sc)
		}
	}
	if f.Email != nil {
		if err := checkEmail(*f.Email); err != nil {
			return err
		}
	}
	if f.Password != nil {
		return s.checkPassword(*f.Password, username, deref(f.Email))
	}
	return nil
}

func deref[T any](p *T) (v T) {
	if p != nil {
		v = *p
	}
	return v
}

// checkEmail accepts a plain local@domain.tld address whose domain (or a parent of it)
// is not a throwaway-mail domain.
func checkEmail(email string) error {
	a, err := mail.ParseAddress(email)
	_, domain, _ := strings.Cut(email, "@")
	if err != nil || a.Name != "" || a.Address != email || !strings.Contains(strings.Trim(domain, "."), ".") {
		return fmt.Errorf("%w: invalid email", errInvalid)
	}
	for d := strings.ToLower(domain); strings.Contains(d, "."); _, d, _ = strings.Cut(d, ".") {
		if strings.HasPrefix(disposableDomains, d+"\n") || strings.Contains(disposableDomains, "\n"+d+"\n") {
			return fmt.Errorf("%w: throwaway email domains are not accepted", errInvalid)
		}
	}
	return nil
}

// checkPassword refuses empty and over-long passwords (never truncated) and, with
// --password_checker, passwords that zxcvbn scores under 3.
func (s *server) checkPassword(password, username, email string) error {
	if password == "" || len(password) > 1024 {
		return fmt.Errorf("%w: password must be 1-1024 bytes", errInvalid)
	}
	if r := zxcvbn.PasswordStrength(password, []string{username, email}); s.cfg.passwordChecker && r.Score < 3 {
		return fmt.Errorf("%w: weak password: strength %d of 4, 3 needed; use a longer, less predictable password", errInvalid, r.Score)
	}
	return nil
}

// apply sets the given fields on u; the password must already be hashed into hash.
func (s *server) apply(u *user, f userFields, hash string) {
	set(&u.Tenant, f.Tenant)
	set(&u.Scopes, f.Scopes)
	set(&u.Data, f.Data)
	if f.Email != nil {
		u.Email = f.Email
	}
	if hash != "" {
		if u.Hash != "" {
			u.endTokens(s.now())
		}
		u.Hash = hash
	}
	if f.TwoFactor != nil && *f.TwoFactor != u.TwoFactor {
		// Turning two-factor on (again) enrols a new secret.
		u.TwoFactor, u.TOTPSecret, u.TOTPStep = *f.TwoFactor, "", 0
		if u.TwoFactor {
			u.TOTPSecret = newTOTPSecret()
		}
	}
}

// set copies *p to *dst when p is given.
func set[T any](dst, p *T) {
	if p != nil {
		*dst = *p
	}
}

// Argon2id parameters (OWASP: m=19 MiB, t=2, p=1). They are written into every hash, so
// raising them later keeps old hashes verifiable.
const argonMemory, argonTime, argonThreads = 19 * 1024, 2, 1

// hashPassword returns the argon2id PHC string of password with a fresh salt.
func (s *server) hashPassword(ctx context.Context, password string) (string, error) {
	salt := randomBytes(16)
	key, err := s.argon(ctx, password, salt, argonMemory, argonTime, argonThreads, 32)
	enc := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=19$m=%d,t=%d,p=%d$%s$%s", argonMemory, argonTime, argonThreads,
		enc.EncodeToString(salt), enc.EncodeToString(key)), err
}

// verifyPassword reports whether password matches the PHC string phc. The parameters are
// bounded so a tampered hash cannot make the server allocate gigabytes.
func (s *server) verifyPassword(ctx context.Context, phc, password string) (bool, error) {
	var m, t uint32
	var p uint8
	var rest string
	_, err := fmt.Sscanf(phc, "$argon2id$v=19$m=%d,t=%d,p=%d$%s", &m, &t, &p, &rest)
	salt, hash, _ := strings.Cut(rest, "$")
	saltB, err1 := base64.RawStdEncoding.DecodeString(salt)
	want, err2 := base64.RawStdEncoding.DecodeString(hash)
	if err != nil || err1 != nil || err2 != nil || m < 8 || m > 256*1024 || t < 1 || t > 10 || p < 1 || p > 8 || len(want) < 16 {
		return false, errors.New("users: malformed password hash")
	}
	got, err := s.argon(ctx, password, saltB, m, t, p, uint32(len(want)))
	return err == nil && subtle.ConstantTimeCompare(got, want) == 1, err
}

// argon runs one argon2id hash in one of the few hashing slots: each hash allocates its
// whole memory cost, so unbounded parallel logins could exhaust memory.
func (s *server) argon(ctx context.Context, password string, salt []byte, m, t uint32, p uint8, n uint32) ([]byte, error) {
	select {
	case s.hashSlots <- struct{}{}:
		defer func() { <-s.hashSlots }()
	case <-time.After(10 * time.Second):
		return nil, &retryError{after: time.Second}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return argon2.IDKey([]byte(password), salt, t, m, p, n), nil
}

// newID returns a random (version 4) UUID.
func newID() string {
	b := randomBytes(16)
	b[6], b[8] = b[6]&0x0f|0x40, b[8]&0x3f|0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// errBadLogin is the one answer to every failed login, whatever failed.
var errBadLogin = fmt.Errorf("%w: invalid username, password or code", errUnauthorized)

// login checks a username, password and, for two-factor users, the code totp (nil for
// HTTP Basic, which cannot carry one), under the brute-force throttle. Unknown users are
// hashed against a dummy hash, so they take as long as a wrong password.
func (s *server) login(r *http.Request, name, password string, totp *string) (*user, error) {
	keys := []string{"user:" + name, "addr:" + clientAddr(r)}
	if err := s.throttle.check(s.now(), keys...); err != nil {
		return nil, err
	}
	u, err := s.db.getUser(name)
	if err != nil && !errors.Is(err, errNotFound) {
		return nil, err
	}
	phc := s.dummyHash
	if u != nil {
		phc = u.Hash
	}
	ok, err := s.verifyPassword(r.Context(), phc, password)
	if ok = ok && u != nil && !u.Revoked; err != nil {
		return nil, err
	} else if ok && u.TwoFactor && totp == nil {
		return nil, errBadLogin // HTTP Basic cannot carry a code
	} else if ok && u.TwoFactor {
		err = s.checkTOTP(u, *totp)
	} else if !ok {
		err = errBadLogin
	}
	if errors.Is(err, errBadLogin) {
		s.throttle.fail(s.now(), keys...)
	}
	if err != nil {
		return nil, err
	}
	s.throttle.succeed(name)
	return u, nil
}

// clientAddr is the client's IP address as the server sees it. Proxy headers are not
// trusted: any client can set them.
func clientAddr(r *http.Request) string {
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	return host
}

// throttle slows down guessing. After a few failures for a key (a username, or a client
// address) each further failure locks the key for a pause that doubles up to 15 minutes;
// a locked key is answered 429 even with the right password. It holds at most max keys.
type throttle struct {
	max     int
	mu      sync.Mutex // guards strikes
	strikes map[string]strike
}

type strike struct {
	fails int
	until time.Time
}

// retryError is errTooMany with the pause the client must wait (Retry-After).
type retryError struct {
	after time.Duration
	msg   string
}

func (e *retryError) Error() string { return cmp.Or(e.msg, "too many attempts, retry later") }
func (e *retryError) Unwrap() error { return errTooMany }

// check returns a *retryError when one of keys is locked at now.
func (t *throttle) check(now time.Time, keys ...string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		if st := t.strikes[k]; now.Before(st.until) {
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
		st, free := t.strikes[k], 5
		if strings.HasPrefix(k, "addr:") {
			free = 20
		}
		if st.fails++; st.fails > free {
			st.until = now.Add(min(time.Second<<min(st.fails-free-1, 20), 15*time.Minute))
		}
		t.strikes[k] = st
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

// checkTOTP accepts code if it is u's code at the current step or one step either side,
// and newer than the last accepted one; else it is errBadLogin. The matched step is
// recorded in the transaction that checks it, so a code is accepted only once.
func (s *server) checkTOTP(u *user, code string) error {
	now, matched := s.now().Unix()/30, int64(-1)
	for step := now - 1; step <= now+1; step++ {
		if len(code) == 6 && subtle.ConstantTimeCompare([]byte(totpCode(u.TOTPSecret, step)), []byte(code)) == 1 {
			matched = step
		}
	}
	_, err := s.db.updateUser(u.Username, false, func(cur *user) error {
		if matched <= cur.TOTPStep || cur.TOTPSecret != u.TOTPSecret {
			return errBadLogin
		}
		cur.TOTPStep = matched
		return nil
	})
	return err
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
