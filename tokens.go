package main

import (
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
	"github.com/biscuit-auth/biscuit-go/v2/parser"
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

// jwtHeader is base64url of {"alg":"HS256","typ":"JWT"}, the header of the JWTs broker signs.
const jwtHeader = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"

const maxJWT = 8 << 10 // bytes; the JWT of a user with every field at its maximum is under 4 KiB

var b64 = base64.RawURLEncoding.Strict()

func hs256(signingInput string, key []byte) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(signingInput))
	return mac.Sum(nil)
}

// signJWT returns the HS256 JWT of c.
func signJWT(c claims, key []byte) string {
	payload, _ := json.Marshal(c) // claims holds nothing that fails to marshal
	input := jwtHeader + "." + b64.EncodeToString(payload)
	return input + "." + b64.EncodeToString(hs256(input, key))
}

var errBadToken = fmt.Errorf("%w: invalid or expired token", errUnauthorized)

// verifyJWT checks token's form, signature, header and claims and its expiry at now, and
// returns its claims. The JSON is decoded only after the MAC is good, so it was written by
// someone holding the key (broker, or a JWT library): any key order and whitespace are
// accepted, while repeated, case-variant or unknown keys, an alg other than HS256, another
// iss, and a missing sub or exp are refused.
func verifyJWT(token string, key []byte, now time.Time) (claims, error) {
	var c claims
	var head struct {
		Alg string  `json:"alg"`
		Typ *string `json:"typ"`
	}
	header, rest, _ := strings.Cut(token, ".")
	payload, sig, ok := strings.Cut(rest, ".")
	mac, err := b64.DecodeString(sig)
	rawHead, err1 := b64.DecodeString(header)
	rawClaims, err2 := b64.DecodeString(payload)
	// Size and alphabet are checked before the MAC (the alphabet because base64 decoders
	// skip CR and LF), the MAC before the JSON.
	if len(token) > maxJWT || strings.Trim(token, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.") != "" ||
		!ok || err != nil || !hmac.Equal(mac, hs256(header+"."+payload, key)) ||
		err1 != nil || err2 != nil || decodeJSON(rawHead, &head) != nil || decodeJSON(rawClaims, &c) != nil ||
		head.Alg != "HS256" || head.Typ != nil && *head.Typ != "JWT" || c.Iss != "Broker" || c.Sub == "" || now.Unix() >= c.Exp {
		return claims{}, errBadToken
	}
	return c, nil
}

// parseBasic reads an "Authorization: Basic" value. Only the first colon splits, so a
// password may contain colons (RFC 7617); control characters and invalid usernames are
// refused, before anything is counted or hashed.
func parseBasic(h string) (username, password string, ok bool) {
	username, password, ok = (&http.Request{Header: http.Header{"Authorization": {h}}}).BasicAuth()
	if !ok || !validName(username, true) || strings.ContainsFunc(password, unicode.IsControl) || strings.ContainsAny(h, "\r\n") {
		return "", "", false
	}
	return username, password, true
}

// bearerToken is the token of an "Authorization: Bearer" header (the scheme in any case), or "".
func bearerToken(r *http.Request) string {
	if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return h[7:]
	}
	return ""
}

// authenticate returns the current user behind the request's Authorization header, and
// the expiry of its credentials. The user is read on every request, so revocation,
// deletion and a new password apply at once.
func (s *server) authenticate(r *http.Request) (*user, int64, error) {
	if tok := bearerToken(r); tok != "" {
		c, err := verifyJWT(tok, []byte(s.cfg.jwtSecret), s.now())
		u, err2 := s.db.getUser(c.Sub) // after a failed verification c is empty: no user is named ""
		if err != nil || err2 != nil || u.Revoked || c.Iat < u.NotBefore {
			return nil, 0, errBadToken
		}
		return u, c.Exp, nil
	}
	name, password, ok := parseBasic(r.Header.Get("Authorization"))
	if !ok {
		return nil, 0, fmt.Errorf("%w: missing or malformed credentials", errUnauthorized)
	}
	u, err := s.login(r, name, password, nil)
	return u, s.now().Unix() + s.cfg.jwtExpiry, err
}

// checkAdmin compares token with --admin_token through SHA-256 digests, so the comparison
// takes the same time whatever the token's length or content. Wrong tokens are throttled
// per client address like logins, and logged.
func (s *server) checkAdmin(r *http.Request, token string) error {
	end, err := s.throttle.begin(s.now(), addrKey("admin", r))
	if err != nil {
		return err
	}
	got := sha256.Sum256([]byte(token))
	wrong := !hmac.Equal(got[:], s.adminHash[:]) // in constant time
	if end(wrong); wrong {
		s.log.Warn("wrong admin token", "addr", clientAddr(r), "path", r.URL.Path)
		return fmt.Errorf("%w: wrong admin token", errUnauthorized)
	}
	return nil
}

// issueJWT returns a JWT for u. iat is never before u.NotBefore, so tokens issued before
// a password change or revocation are refused and tokens issued after are not.
func (s *server) issueJWT(u *user) string {
	iat := max(s.now().Unix(), u.NotBefore)
	return signJWT(claims{Iss: "Broker", Sub: u.Username, Tenant: u.Tenant, Scopes: u.Scopes, Iat: iat, Exp: iat + s.cfg.jwtExpiry}, []byte(s.cfg.jwtSecret))
}

// mintBiscuit returns a biscuit signed by root whose authority block states who u is,
// one right per scope, and a check that it expires at exp. Values go in as parameters,
// never into the datalog text.
func mintBiscuit(root ed25519.PrivateKey, u *user, exp time.Time) ([]byte, error) {
	code := `user({user}); tenant({tenant}); check if time($t), $t <= {exp};`
	params := parser.ParametersMap{"user": biscuit.String(u.Username), "tenant": biscuit.String(u.Tenant), "exp": biscuit.Date(exp)}
	for i, sc := range u.Scopes {
		res, op, _ := strings.Cut(sc, ":")
		code += fmt.Sprintf(" right({r%d}, {o%d});", i, i)
		params[fmt.Sprint("r", i)], params[fmt.Sprint("o", i)] = biscuit.String(res), biscuit.String(op)
	}
	block, err := parser.FromStringBlockWithParams(code, params)
	b := biscuit.NewBuilder(root)
	if err == nil {
		err = b.AddBlock(block)
	}
	if err != nil {
		return nil, err
	}
	tok, err := b.Build()
	if err != nil {
		return nil, err
	}
	return tok.Serialize()
}
