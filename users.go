package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/mail"
	"regexp"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

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
	salt := make([]byte, 16)
	rand.Read(salt)
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
	b := make([]byte, 16)
	rand.Read(b)
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
	if ok = ok && u != nil && !u.Revoked; ok && u.TwoFactor && totp == nil {
		return nil, errBadLogin
	} else if ok && u.TwoFactor && err == nil {
		ok, err = s.checkTOTP(u, *totp)
	}
	if err != nil {
		return nil, err
	} else if !ok {
		s.throttle.fail(s.now(), keys...)
		return nil, errBadLogin
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
