package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode"

	"github.com/biscuit-auth/biscuit-go/v2"
)

// claims are the JWT claims broker issues (CONTRACT §3).
type claims struct {
	Iss    string   `json:"iss"`
	Sub    string   `json:"sub"`
	Tenant string   `json:"tenant"`
	Scopes []string `json:"scopes"`
	Iat    int64    `json:"iat"`
	Exp    int64    `json:"exp"`
}

// jwtHeader is base64url of {"alg":"HS256","typ":"JWT"}. The verifier compares the header
// segment with it byte for byte, which refuses alg:none, algorithm confusion, kid/jku/crit
// tricks and duplicate header keys without ever parsing attacker-controlled JSON.
const jwtHeader = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"

var b64 = base64.RawURLEncoding.Strict()

func hs256(signingInput string, key []byte) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(signingInput))
	return mac.Sum(nil)
}

// signJWT returns the HS256 JWT of c.
func signJWT(c claims, key []byte) string {
	payload, _ := json.Marshal(c) // claims has no type that can fail to marshal
	input := jwtHeader + "." + b64.EncodeToString(payload)
	return input + "." + b64.EncodeToString(hs256(input, key))
}

// verifyJWT checks token's form, header, signature and expiry at now, and returns its claims.
// The payload is decoded only after the MAC is good, and it must be exactly what signJWT
// writes (re-encoding must give the same bytes), so duplicate or case-variant keys are refused.
func verifyJWT(token string, key []byte, now time.Time) (claims, error) {
	var c claims
	bad := fmt.Errorf("%w: invalid token", errUnauthorized)
	if len(token) > 4096 || strings.Trim(token, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.") != "" {
		return c, bad // base64 decoders skip CR/LF, so the alphabet is checked here
	}
	header, rest, _ := strings.Cut(token, ".")
	payload, sig, ok := strings.Cut(rest, ".")
	if !ok || header != jwtHeader || strings.Contains(sig, ".") {
		return c, bad
	}
	mac, err := b64.DecodeString(sig)
	if err != nil || len(mac) != sha256.Size || !hmac.Equal(mac, hs256(header+"."+payload, key)) {
		return c, bad
	}
	raw, err := b64.DecodeString(payload)
	if err != nil || json.Unmarshal(raw, &c) != nil {
		return claims{}, bad
	}
	if canon, _ := json.Marshal(c); !bytes.Equal(canon, raw) || c.Iss != "Broker" || c.Sub == "" {
		return claims{}, bad
	}
	if now.Unix() >= c.Exp || c.Iat > now.Unix()+60 {
		return claims{}, fmt.Errorf("%w: token expired", errUnauthorized)
	}
	return c, nil
}

// parseBasic reads an "Authorization: Basic" value. Only the first colon splits, so a
// password may contain colons (RFC 7617); control characters and an empty user are refused.
func parseBasic(h string) (username, password string, ok bool) {
	const prefix = "basic "
	if len(h) < len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return "", "", false
	}
	enc := h[len(prefix):]
	if strings.ContainsAny(enc, "\r\n") {
		return "", "", false
	}
	raw, err := base64.StdEncoding.Strict().DecodeString(enc)
	if err != nil {
		return "", "", false
	}
	username, password, ok = strings.Cut(string(raw), ":")
	if !ok || username == "" || strings.IndexFunc(string(raw), unicode.IsControl) >= 0 {
		return "", "", false
	}
	return username, password, true
}

// authenticate returns the current user behind the request's Authorization header. Every
// request re-reads the user, so revocation, deletion and password changes apply at once.
func (s *server) authenticate(r *http.Request) (*user, error) {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		c, err := verifyJWT(h[7:], s.jwtKey, s.now())
		if err != nil {
			return nil, err
		}
		u, err := s.db.getUser(c.Sub)
		if err != nil || u.Revoked || c.Iat < u.NotBefore {
			return nil, fmt.Errorf("%w: invalid token", errUnauthorized)
		}
		return u, nil
	}
	name, password, ok := parseBasic(h)
	if !ok {
		return nil, fmt.Errorf("%w: missing or malformed credentials", errUnauthorized)
	}
	// Basic carries no one-time code: login refuses two-factor users (after the password
	// check, so the answer does not reveal who has two-factor on).
	return s.login(r, name, password, nil)
}

// issueJWT returns a JWT for u. iat is never earlier than the second after u's last
// password change, so tokens issued before a change are refused and tokens after it are not.
func (s *server) issueJWT(u *user) (string, claims) {
	iat := max(s.now().Unix(), u.NotBefore)
	c := claims{Iss: "Broker", Sub: u.Username, Tenant: u.Tenant, Scopes: u.Scopes, Iat: iat, Exp: iat + s.cfg.jwtExpiry}
	return signJWT(c, s.jwtKey), c
}

// mintBiscuit returns a biscuit signed by root whose authority block states who u is,
// one right per scope, and a check that it expires with the JWT.
func mintBiscuit(root ed25519.PrivateKey, u *user, exp time.Time) ([]byte, error) {
	b := biscuit.NewBuilder(root)
	facts := []biscuit.Fact{
		{Predicate: biscuit.Predicate{Name: "user", IDs: []biscuit.Term{biscuit.String(u.Username)}}},
		{Predicate: biscuit.Predicate{Name: "tenant", IDs: []biscuit.Term{biscuit.String(u.Tenant)}}},
	}
	for _, sc := range u.Scopes {
		res, op, _ := strings.Cut(sc, ":")
		facts = append(facts, biscuit.Fact{Predicate: biscuit.Predicate{Name: "right", IDs: []biscuit.Term{biscuit.String(res), biscuit.String(op)}}})
	}
	for _, f := range facts {
		if err := b.AddAuthorityFact(f); err != nil {
			return nil, err
		}
	}
	err := b.AddAuthorityCheck(biscuit.Check{Queries: []biscuit.Rule{{
		Head: biscuit.Predicate{Name: "query"},
		Body: []biscuit.Predicate{{Name: "time", IDs: []biscuit.Term{biscuit.Variable("time")}}},
		Expressions: []biscuit.Expression{{
			biscuit.Value{Term: biscuit.Variable("time")},
			biscuit.Value{Term: biscuit.Date(exp)},
			biscuit.BinaryLessOrEqual,
		}},
	}}})
	if err != nil {
		return nil, err
	}
	tok, err := b.Build()
	if err != nil {
		return nil, err
	}
	return tok.Serialize()
}
