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
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/mail"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/pquerna/otp/totp"
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

// endTokens makes every JWT issued so far invalid (password change, revocation, two-factor
// turned on); new tokens are issued with iat >= NotBefore. Many in one second move
// NotBefore ahead of the clock, which only moves the iat of new tokens (verifyJWT does not
// refuse an iat in the future).
func (u *user) endTokens(now time.Time) { u.NotBefore = max(now.Unix(), u.NotBefore) + 1 }

// Bounds of the fields of a user (CONTRACT §2), so every user gets a JWT the verifier
// accepts (maxJWT) and /verify stays cheap.
const (
	maxScopes     = 32
	maxScopeBytes = 64
	maxPassword   = 1024     // bytes
	zxcvbnBytes   = 64       // bytes of a password that zxcvbn scores
	maxEmail      = 254      // bytes (RFC 5321)
	maxUserData   = 64 << 10 // bytes of a user's data
)

// disposableDomains is the throwaway-mail domain list, one lower-case domain per line, from
// github.com/disposable-email-domains/disposable-email-domains (CC0-1.0), as packaged in the
// npm module disposable-email-domains-js 1.26.0.
//
//go:embed disposable_domains.txt
var disposableDomains string

var scopeRE = regexp.MustCompile(`^[A-Za-z0-9_.*-]+:[A-Za-z0-9_.*-]+$`)

// domainRE is a domain name of at least two labels whose last has a letter (no IP literal).
var domainRE = regexp.MustCompile(`^([\p{L}\p{N}-]+\.)+[\p{L}\p{N}-]*\p{L}[\p{L}\p{N}-]*$`)

// userFields are the settable fields of create and update; nil means "not given".
type userFields struct {
	Tenant    *string          `json:"tenant_name"`
	Password  *string          `json:"password"`
	Email     *string          `json:"email"`
	TwoFactor *bool            `json:"two_factor"`
	Scopes    *[]string        `json:"scopes"`
	Data      *json.RawMessage `json:"data"`
}

// validName: 1-64 characters of valid UTF-8 without control or invisible formatting
// characters (bidirectional overrides, zero-width joiners) and, for a username, without
// spaces or ':' (HTTP Basic splits at the first ':').
func validName(s string, username bool) bool {
	n := utf8.RuneCountInString(s)
	return n >= 1 && n <= 64 && utf8.ValidString(s) && !strings.ContainsFunc(s, func(r rune) bool {
		return unicode.IsControl(r) || unicode.Is(unicode.Cf, r) || username && (unicode.IsSpace(r) || r == ':')
	})
}

// validate checks the given fields by the rules of CONTRACT §2 and hashes a new password,
// before the database's write lock is taken.
func (s *server) validate(ctx context.Context, username string, f userFields) (hash string, err error) {
	scopes, data := deref(f.Scopes), deref(f.Data)
	switch {
	case !validName(username, true):
		err = fmt.Errorf("%w: username must be 1-64 characters without spaces, control characters or ':'", errInvalid)
	case f.Tenant != nil && !validName(*f.Tenant, false):
		err = fmt.Errorf("%w: tenant_name must be 1-64 characters without control characters", errInvalid)
	case len(scopes) > maxScopes || slices.ContainsFunc(scopes, func(sc string) bool { return len(sc) > maxScopeBytes || !scopeRE.MatchString(sc) }):
		err = fmt.Errorf("%w: scopes: at most %d of at most %d bytes, each resource:operation", errInvalid, maxScopes, maxScopeBytes)
	case len(data) > maxUserData || !utf8.Valid(data):
		err = fmt.Errorf("%w: data must be JSON in UTF-8 of at most %d bytes", errInvalid, maxUserData)
	case f.Email != nil && !validEmail(*f.Email):
		err = fmt.Errorf("%w: email must be a plain address whose domain is not a throwaway-mail domain", errInvalid)
	case f.Password != nil:
		hash, err = s.hashPassword(ctx, *f.Password, username, deref(f.Email))
	}
	return hash, err
}

// deref is *p, or the zero value when p is nil (a field not given).
func deref[T any](p *T) T { return *cmp.Or(p, new(T)) }

// validEmail accepts a plain local@domain.tld address of at most maxEmail bytes whose
// domain (or a parent of it) is not a throwaway-mail domain.
func validEmail(email string) bool {
	a, err := mail.ParseAddress(email)
	_, domain, _ := strings.Cut(email, "@")
	if err != nil || len(email) > maxEmail || a.Name != "" || a.Address != email || !domainRE.MatchString(domain) {
		return false
	}
	for d := strings.ToLower(domain); strings.Contains(d, "."); _, d, _ = strings.Cut(d, ".") {
		if strings.HasPrefix(disposableDomains, d+"\n") || strings.Contains(disposableDomains, "\n"+d+"\n") {
			return false
		}
	}
	return true
}

// checkPassword refuses empty and over-long passwords (never truncated) and, with
// --password_checker, passwords that zxcvbn scores under 3. zxcvbn's cost grows steeply with
// length (a random 256-byte password takes seconds), so it scores the first zxcvbnBytes
// bytes: a password is at least as strong as its beginning.
func (s *server) checkPassword(ctx context.Context, password string, inputs ...string) error {
	if password == "" || len(password) > maxPassword {
		return fmt.Errorf("%w: password must be 1-%d bytes", errInvalid, maxPassword)
	} else if !s.cfg.passwordChecker {
		return nil
	} else if err := ctx.Err(); err != nil {
		return err
	} else if r := zxcvbn.PasswordStrength(strings.ToValidUTF8(password[:min(len(password), zxcvbnBytes)], ""), inputs); r.Score < 3 {
		return fmt.Errorf("%w: weak password: strength %d of 4, 3 needed; use a longer, less predictable password", errInvalid, r.Score)
	}
	return nil
}

// apply sets the given fields on u; the password must already be hashed into hash.
func (s *server) apply(u *user, f userFields, hash string) {
	// A given field (a non-nil pointer) replaces the current value.
	u.Tenant = *cmp.Or(f.Tenant, &u.Tenant)
	u.Scopes = *cmp.Or(f.Scopes, &u.Scopes)
	u.Data = *cmp.Or(f.Data, &u.Data)
	u.Email = cmp.Or(f.Email, u.Email)
	if hash != "" && u.Hash != "" { // a new password ends the tokens issued with the old one
		u.endTokens(s.now())
	}
	u.Hash = cmp.Or(hash, u.Hash)
	if f.TwoFactor != nil && *f.TwoFactor != u.TwoFactor {
		// Turning two-factor on (again) enrols a new secret and ends the tokens issued
		// without a code.
		u.TwoFactor, u.TOTPSecret, u.TOTPStep = *f.TwoFactor, "", 0
		if u.TwoFactor {
			// A random 160-bit secret in unpadded base32 (RFC 4226 §4).
			u.TOTPSecret = base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(randomBytes(20))
			u.endTokens(s.now())
		}
	}
}

// Argon2id parameters (OWASP: m=19 MiB, t=2, p=1). They are written into every hash, so
// raising them later keeps old hashes verifiable.
const argonMemory, argonTime, argonThreads = 19 * 1024, 2, 1

// hashPassword checks a new password (checkPassword, with inputs such as the username and
// email) and returns its argon2id PHC string with a fresh salt.
func (s *server) hashPassword(ctx context.Context, password string, inputs ...string) (string, error) {
	if err := s.checkPassword(ctx, password, inputs...); err != nil {
		return "", err
	}
	salt := randomBytes(16)
	key, err := s.argon(ctx, password, salt, argonMemory, argonTime, argonThreads, 32)
	return fmt.Sprintf("$argon2id$v=19$m=%d,t=%d,p=%d$%s$%s", argonMemory, argonTime, argonThreads,
		base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(key)), err
}

// verifyPassword reports whether password matches the PHC string phc. The parameters are
// bounded so a tampered hash cannot make the server allocate gigabytes.
func (s *server) verifyPassword(ctx context.Context, phc, password string) (bool, error) {
	var m, t, p uint32
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
func (s *server) argon(ctx context.Context, password string, salt []byte, m, t, p, n uint32) ([]byte, error) {
	select {
	case s.hashSlots <- struct{}{}:
		defer func() { <-s.hashSlots }()
	case <-time.After(10 * time.Second):
		return nil, &retryError{after: time.Second, error: errBusy}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return argon2.IDKey([]byte(password), salt, t, m, uint8(p), n), nil // p is at most 8
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
func (s *server) login(r *http.Request, name, password string, totp *string) (_ *user, err error) {
	if !validName(name, true) { // before anything is counted or hashed
		return nil, fmt.Errorf("%w: username must be 1-64 characters", errInvalid)
	}
	keys := []tkey{accountKey("login", name), addrKey("login", r)}
	end, err := s.throttle.begin(s.now(), keys...)
	if err != nil {
		return nil, err
	}
	defer func() { // counts a wrong secret; a success clears the account's count
		end(errors.Is(err, errBadLogin))
		if err == nil {
			s.throttle.clear(keys[0])
		}
	}()
	u, err := s.db.getUser(name)
	if errors.Is(err, errNotFound) { // a stand-in, hashed like a real user and refused like a revoked one
		u = &user{Revoked: true, secrets: secrets{Hash: s.dummyHash}}
	} else if err != nil {
		return nil, err
	}
	if ok, err := s.verifyPassword(r.Context(), u.Hash, password); err != nil {
		return nil, err
	} else if !ok || u.Revoked || u.TwoFactor && totp == nil { // HTTP Basic cannot carry a code
		return nil, errBadLogin
	} else if u.TwoFactor {
		return u, s.checkTOTP(u, *totp)
	}
	return u, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand)
	return b
}

// totpCode is the RFC 6238 code (SHA1, 6 digits) of secret at time step step (30 s).
func totpCode(secret string, step int64) string {
	code, _ := totp.GenerateCode(secret, time.Unix(step*30, 0))
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

// newResetCode returns a random 6-digit password-reset code.
func newResetCode() string {
	n, _ := rand.Int(rand.Reader, big.NewInt(1_000_000))
	return fmt.Sprintf("%06d", n)
}

func hashCode(code string) string {
	h := sha256.Sum256([]byte(code))
	return base64.RawStdEncoding.EncodeToString(h[:])
}

// validResetCode reports whether code is u's reset code and has not expired at now.
func validResetCode(u *user, code string, now time.Time) bool {
	return u.ResetCode != "" && now.Unix() < u.ResetExpiry && subtle.ConstantTimeCompare([]byte(u.ResetCode), []byte(hashCode(code))) == 1
}
