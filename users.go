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
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/trustelem/zxcvbn"
	"golang.org/x/crypto/argon2"
)

// user is an account as stored. Secrets (hash, TOTP secret, reset code) never leave the
// server: answers use userView.
type user struct {
	ID          string          `json:"id"`
	Username    string          `json:"username"`
	Tenant      string          `json:"tenant_name"`
	Email       *string         `json:"email"`
	TwoFactor   bool            `json:"two_factor"`
	Scopes      []string        `json:"scopes"`
	Data        json.RawMessage `json:"data"`
	Revoked     bool            `json:"revoked"`
	Hash        string          `json:"hash"`
	TOTPSecret  string          `json:"totp_secret,omitempty"`  // base32, set while two-factor is on
	TOTPStep    int64           `json:"totp_step,omitempty"`    // last accepted time step (replay guard)
	ResetCode   string          `json:"reset_code,omitempty"`   // pending password-reset code
	ResetExpiry int64           `json:"reset_expiry,omitempty"` // unix seconds
	// NotBefore (unix seconds): JWTs issued earlier are refused. Moved forward when the
	// password changes or the user is revoked.
	NotBefore int64 `json:"not_before"`
}

// userView is the user object of the API (CONTRACT §2).
type userView struct {
	ID        string          `json:"id"`
	Username  string          `json:"username"`
	Tenant    string          `json:"tenant_name"`
	Email     *string         `json:"email"`
	TwoFactor bool            `json:"two_factor"`
	Scopes    []string        `json:"scopes"`
	Data      json.RawMessage `json:"data"`
	Revoked   bool            `json:"revoked"`
	Password  string          `json:"password"`
	TOTP      string          `json:"totp"`
}

// endTokens makes every JWT issued so far invalid: tokens with iat < NotBefore are refused
// and new ones are issued with iat >= NotBefore.
func (u *user) endTokens(now time.Time) { u.NotBefore = max(now.Unix(), u.NotBefore) + 1 }

func (u *user) view() userView {
	return userView{u.ID, u.Username, u.Tenant, u.Email, u.TwoFactor, u.Scopes, u.Data, u.Revoked, "***", "***"}
}

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

// validate checks the given fields by the rules of CONTRACT §2.
func (s *server) validate(username string, f userFields) error {
	bad := func(msg string) error { return fmt.Errorf("%w: %s", errInvalid, msg) }
	if n := utf8.RuneCountInString(username); n < 1 || n > 64 || !utf8.ValidString(username) ||
		strings.ContainsFunc(username, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) || r == ':' }) {
		return bad("username must be 1-64 characters without spaces, control characters or colons")
	}
	if t := f.Tenant; t != nil && (utf8.RuneCountInString(*t) < 1 || utf8.RuneCountInString(*t) > 64 || !utf8.ValidString(*t) || strings.ContainsFunc(*t, unicode.IsControl)) {
		return bad("tenant_name must be 1-64 characters")
	}
	if f.Scopes != nil {
		for _, sc := range *f.Scopes {
			if !scopeRE.MatchString(sc) {
				return bad(fmt.Sprintf("invalid scope %q: want resource:operation", sc))
			}
		}
	}
	if f.Email != nil {
		if err := checkEmail(*f.Email); err != nil {
			return err
		}
	}
	if f.Password != nil {
		email := ""
		if f.Email != nil {
			email = *f.Email
		}
		return s.checkPassword(*f.Password, username, email)
	}
	return nil
}

// checkEmail accepts a plain local@domain.tld address whose domain (or a parent of it)
// is not a throwaway-mail domain.
func checkEmail(email string) error {
	a, err := mail.ParseAddress(email)
	_, domain, _ := strings.Cut(email, "@")
	if err != nil || a.Name != "" || a.Address != email || !strings.Contains(domain, ".") || strings.HasSuffix(domain, ".") {
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
	if s.cfg.passwordChecker {
		if r := zxcvbn.PasswordStrength(password, []string{username, email}); r.Score < 3 {
			return fmt.Errorf("%w: weak password: strength %d of 4, 3 needed; use a longer, less predictable password", errInvalid, r.Score)
		}
	}
	return nil
}

// apply sets the given fields on u. The password must already be hashed into hash.
func (s *server) apply(u *user, f userFields, hash string) error {
	if f.Tenant != nil {
		u.Tenant = *f.Tenant
	}
	if f.Email != nil {
		u.Email = f.Email
	}
	if f.Scopes != nil {
		u.Scopes = *f.Scopes
	}
	if f.Data != nil {
		u.Data = *f.Data
	}
	if hash != "" {
		if u.Hash != "" {
			u.endTokens(s.now())
		}
		u.Hash = hash
	}
	if f.TwoFactor != nil && *f.TwoFactor != u.TwoFactor {
		u.TwoFactor, u.TOTPSecret, u.TOTPStep = *f.TwoFactor, "", 0
		if u.TwoFactor {
			u.TOTPSecret = newTOTPSecret()
		}
	}
	return nil
}

// Argon2id parameters (OWASP: m=19 MiB, t=2, p=1). They are written into every hash, so
// raising them later keeps old hashes verifiable.
const argonMemory, argonTime, argonThreads = 19 * 1024, 2, 1

// hashPassword returns the argon2id PHC string of password with a fresh salt.
func (s *server) hashPassword(ctx context.Context, password string) (string, error) {
	salt := make([]byte, 16)
	rand.Read(salt)
	key, err := s.argon(ctx, password, salt, argonMemory, argonTime, argonThreads)
	if err != nil {
		return "", err
	}
	enc := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=19$m=%d,t=%d,p=%d$%s$%s", argonMemory, argonTime, argonThreads,
		enc.EncodeToString(salt), enc.EncodeToString(key)), nil
}

// verifyPassword reports whether password matches the PHC string phc. Parameters are
// bounded so a tampered hash cannot make the server allocate gigabytes.
func (s *server) verifyPassword(ctx context.Context, phc, password string) (bool, error) {
	var m, t uint32
	var p uint8
	parts := strings.Split(phc, "$")
	if len(parts) != 6 || parts[1] != "argon2id" || parts[2] != "v=19" {
		return false, fmt.Errorf("users: unknown hash format")
	}
	_, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &m, &t, &p)
	salt, err1 := base64.RawStdEncoding.DecodeString(parts[4])
	want, err2 := base64.RawStdEncoding.DecodeString(parts[5])
	if err != nil || err1 != nil || err2 != nil || m < 8 || m > 256*1024 || t < 1 || t > 10 || p < 1 || p > 8 || len(want) < 16 {
		return false, fmt.Errorf("users: malformed hash")
	}
	got, err := s.argon(ctx, password, salt, m, t, p, uint32(len(want)))
	return err == nil && subtle.ConstantTimeCompare(got, want) == 1, err
}

// argon runs one argon2id hash, waiting for one of the few hashing slots: each hash
// allocates its whole memory cost, so unbounded parallel logins could exhaust memory.
func (s *server) argon(ctx context.Context, password string, salt []byte, m, t uint32, p uint8, keyLen ...uint32) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	select {
	case s.hashSlots <- struct{}{}:
		defer func() { <-s.hashSlots }()
	case <-ctx.Done():
		return nil, &retryError{after: time.Second}
	}
	n := uint32(32)
	if len(keyLen) > 0 {
		n = keyLen[0]
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

// login checks a username and password (and, for two-factor users, a code when totp is
// not nil) under the brute-force throttle. Unknown users are hashed against a dummy hash,
// so they take as long as a wrong password.
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
	if err != nil {
		return nil, err
	}
	ok = ok && u != nil && !u.Revoked
	if ok && u.TwoFactor {
		if totp == nil {
			return nil, errBadLogin // HTTP Basic cannot carry a code
		}
		if ok, err = s.checkTOTP(u, *totp); err != nil {
			return nil, err
		}
	}
	if !ok {
		s.throttle.fail(s.now(), keys...)
		return nil, errBadLogin
	}
	s.throttle.succeed(keys...)
	return u, nil
}

// clientAddr is the client's IP address as the server sees it (no proxy headers are
// trusted: they are set by the client unless a proxy strips them).
func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// retryError is errTooMany with the pause the client must wait (Retry-After).
type retryError struct{ after time.Duration }

func (e *retryError) Error() string { return "too many attempts, retry later" }
func (e *retryError) Unwrap() error { return errTooMany }
func (e *retryError) seconds() string {
	return strconv.Itoa(int((e.after + time.Second - 1) / time.Second))
}
