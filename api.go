package main

import (
	"bytes"
	"cmp"
	"crypto/ed25519"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/skip2/go-qrcode"
)

// The errors that fail maps to status codes.
var (
	errInvalid      = errors.New("invalid request")
	errUnauthorized = errors.New("unauthorized")
	errNotFound     = errors.New("not found")
	errMethod       = errors.New("method not allowed")
	errTooLarge     = errors.New("too large")
	errTooMany      = errors.New("too many requests")
	errBusy         = errors.New("server busy")
)

// retryError is errTooMany or errBusy with the pause the client must wait (Retry-After).
type retryError struct {
	error
	after time.Duration
}

func (e *retryError) Unwrap() error { return e.error }

// access says who may call an endpoint.
type access int

const (
	anyone   access = iota
	admin           // with --admin_token in the body's admin_token
	signedIn        // a user, by Authorization: Bearer or Basic, checked before the body is read
)

// routes returns broker's whole HTTP API.
func (s *server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", handle(s, anyone, func(*http.Request, caller, *struct{}) (any, error) {
		return map[string]string{"status": "ok"}, s.db.ready()
	}))
	mux.HandleFunc("POST /create_user", handle(s, admin, s.saveUser(true)))
	mux.HandleFunc("POST /login", handle(s, anyone, s.loginUser))
	mux.HandleFunc("POST /list_users", handle(s, admin, s.listUsers))
	mux.HandleFunc("POST /get_user", handle(s, admin, func(_ *http.Request, _ caller, req *userReq) (any, error) { return s.db.getUser(req.Username) }))
	mux.HandleFunc("POST /update_user", handle(s, admin, s.saveUser(false)))
	mux.HandleFunc("POST /revoke_user", handle(s, admin, s.setRevoked(true)))
	mux.HandleFunc("POST /unrevoke_user", handle(s, admin, s.setRevoked(false)))
	mux.HandleFunc("POST /create_qr", handle(s, admin, s.createQR))
	mux.HandleFunc("POST /create_totp", handle(s, admin, s.createTOTP))
	mux.HandleFunc("POST /password_reset", handle(s, anyone, s.passwordReset))
	mux.HandleFunc("POST /insert", handle(s, signedIn, s.insert))
	mux.HandleFunc("GET /verify", handle(s, signedIn, s.verify))
	mux.HandleFunc("GET /sse", s.handleSSE) // signed in, by a header or ?access_token=
	mux.HandleFunc("POST /backup", handle(s, admin, s.backup))
	// The console, under a strict Content-Security-Policy: scripts and styles only from its
	// own files, images also as data: URLs (the QR code).
	web, _ := fs.Sub(webFiles, "web")
	files := http.StripPrefix("/admin/", http.FileServerFS(web))
	mux.HandleFunc("GET /admin/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
		w.Header().Set("X-Frame-Options", "DENY")
		files.ServeHTTP(w, r)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { // 404, or 405 naming the methods the path has
		err := errNotFound
		for _, m := range []string{"GET", "HEAD", "POST"} {
			if _, p := mux.Handler(&http.Request{Method: m, URL: r.URL, Host: r.Host}); p != "/" {
				w.Header().Set("Allow", strings.TrimPrefix(w.Header().Get("Allow")+", "+m, ", "))
				err = errMethod
			}
		}
		s.fail(w, r, err)
	})
	return s.common(mux)
}

// common answers CORS preflights, marks every answer with the allowed origin (CONTRACT §5)
// and, with --secure, HSTS, and answers a request that panicked with 500: what it held is
// released by its deferred calls, and the server goes on.
func (s *server) common(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v == http.ErrAbortHandler {
				panic(v) // net/http cuts the connection without an answer
			} else if v != nil {
				s.fail(w, r, fmt.Errorf("panic: %v\n%s", v, debug.Stack()))
			}
		}()
		w.Header().Set("Access-Control-Allow-Origin", s.cfg.origin)
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if s.cfg.secure {
			w.Header().Set("Strict-Transport-Security", "max-age=31536000")
		}
		if r.Method == http.MethodOptions {
			w.Header().Set("Access-Control-Allow-Methods", "GET, POST, HEAD")
			w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID")
			w.Header().Set("Access-Control-Max-Age", "7200")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// adminReq is embedded in the requests of admin endpoints.
type adminReq struct {
	AdminToken string `json:"admin_token"`
}

func (a *adminReq) token() string { return a.AdminToken }

// userReq names the user an admin request is about.
type userReq struct {
	adminReq
	Username string `json:"username"`
}

// caller is the signed-in user of a request and the expiry of its credentials (unix).
type caller struct {
	*user
	exp int64
}

const maxBody = 1 << 20 // bytes of a request body

// handle is the one shape of a JSON endpoint: check who calls (a signed-in user before the
// body is read), read and decode the body into a T, check the admin token, act, and answer
// the result as JSON, or the error.
func handle[T any](s *server, who access, act func(r *http.Request, c caller, req *T) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var c caller
		var err error
		req := new(T)
		if who == signedIn {
			c.user, c.exp, err = s.authenticate(r)
		}
		if err == nil && r.Method == http.MethodPost {
			var release func()
			release, err = s.readJSON(w, r, deref(c.user).Username, req)
			defer release() // the turn lasts while the request holds its body: until it is answered
		}
		if err == nil && who == admin {
			err = s.checkAdmin(r, any(req).(interface{ token() string }).token())
		}
		if err != nil {
			s.fail(w, r, err)
		} else if out, err := act(r, c, req); err != nil {
			s.fail(w, r, err)
		} else if d, ok := out.(http.Handler); ok { // an answer that writes itself (the backup)
			d.ServeHTTP(w, r)
		} else {
			s.reply(w, http.StatusOK, out)
		}
	}
}

// decodeJSON decodes the JSON object raw into v, refusing unknown keys and data after the
// object, and what encoding/json would let pass: a repeated key (it keeps the last) and a
// key in another case (it matches keys to fields regardless of case; every key broker
// reads is lower case). Errors name JSON fields, never Go types.
func decodeJSON(raw []byte, v any) error {
	keys, seen := json.NewDecoder(bytes.NewReader(raw)), map[string]bool{}
	for open, _ := keys.Token(); open == json.Delim('{') && keys.More(); { // each key of an object
		t, err := keys.Token()
		k, _ := t.(string)
		if err != nil || seen[k] || k != strings.ToLower(k) || keys.Decode(new(json.RawMessage)) != nil {
			return fmt.Errorf("%w: malformed, repeated or unknown field %q", errInvalid, k)
		}
		seen[k] = true
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.Decode(new(json.RawMessage)) != io.EOF {
		err = errors.New("unexpected data after the JSON object")
	}
	if typeErr, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
		return fmt.Errorf("%w: wrong JSON type at %q", errInvalid, cmp.Or(typeErr.Field, "the body"))
	} else if err != nil {
		return fmt.Errorf("%w: %s", errInvalid, strings.TrimPrefix(err.Error(), "json: "))
	}
	return nil
}

// Request bodies are read in turns, so the bodies held at once, with their decoded copies,
// stay bounded. Signed-in users' bodies (inserts) take one of smallBodies turns up to
// smallBody bytes, one of largeBodies beyond (or of unknown length). Other bodies over
// smallBody bytes take one of publicBodies turns, so anonymous clients cannot hold the
// inserts' turns; smaller ones take none, so they are bounded only by the connections (up to
// 64 KiB each, held for at most bodyTime).
// A request waits up to 5 s for a turn, then is answered 503. One user holds at most a
// quarter of the inserts' turns of a size (over that: 429 at once), so one user's stalled
// uploads cannot hold them all.
const smallBody, smallBodies, largeBodies, publicBodies, bodyTime = 64 << 10, 256, 32, 8, 10 * time.Second

// readJSON reads r's body, in a turn, and decodes it into v. It returns the function that
// gives the turn back. A body must arrive within bodyTime once it has a turn.
// user is the signed-in user's name, "" for others.
func (s *server) readJSON(w http.ResponseWriter, r *http.Request, user string, v any) (func(), error) {
	turns, release := s.smallBodies, func() {}
	if r.ContentLength < 0 || r.ContentLength > smallBody {
		turns = map[bool]chan struct{}{true: s.largeBodies, false: s.publicBodies}[user != ""]
	} else if user == "" {
		turns = nil
	}
	if user != "" {
		mine := s.userTurns(user, turns, cap(turns)/4)
		select {
		case mine <- struct{}{}:
			release = func() { <-mine }
		default:
			return release, &retryError{after: time.Second, error: fmt.Errorf("%w: too many of your requests with bodies at once", errTooMany)}
		}
	}
	if turns != nil {
		select {
		case turns <- struct{}{}:
			releaseMine := release
			release = func() {
				<-turns
				releaseMine()
			}
		case <-time.After(5 * time.Second):
			return release, &retryError{after: time.Second, error: fmt.Errorf("%w: too many requests with bodies at once", errBusy)}
		case <-r.Context().Done():
			return release, r.Context().Err()
		}
	}
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyTime))
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
		return release, fmt.Errorf("%w: request body over %d bytes", errTooLarge, maxBody)
	} else if err != nil {
		return release, fmt.Errorf("%w: reading the body: %v", errInvalid, err)
	}
	return release, decodeJSON(body, v)
}

// reply answers v as JSON with status.
func (s *server) reply(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		s.log.Error("encode answer", "err", err)
		status, b = http.StatusInternalServerError, []byte(`{"error":"internal error"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(b)
}

// fail answers err as {"error": "..."} with its status. Internal errors reach the client
// only as "internal error". Answers 5xx and 429 (throttled, over a cap) are logged.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := http.StatusInternalServerError, "internal error"
	for code, sentinel := range map[int]error{400: errInvalid, 401: errUnauthorized, 404: errNotFound, 405: errMethod, 413: errTooLarge, 429: errTooMany, 503: errBusy} {
		if errors.Is(err, sentinel) {
			status, msg = code, err.Error()
		}
	}
	if retry, ok := errors.AsType[*retryError](err); ok {
		w.Header().Set("Retry-After", strconv.Itoa(int(retry.after.Seconds()+0.999)))
	}
	// 5xx at level ERROR, not when the client has gone; 429 at WARN.
	if status >= 500 && r.Context().Err() == nil || status == http.StatusTooManyRequests {
		s.log.Log(r.Context(), slog.LevelWarn+slog.Level(status/500*4), "request failed", "method", r.Method, "path", r.URL.Path, "addr", clientAddr(r), "status", status, "err", err)
	}
	s.reply(w, status, map[string]string{"error": msg})
}

type createReq struct {
	userReq
	userFields
}

// saveUser answers /create_user (a new user; password and tenant required) and
// /update_user (the given fields change; absent fields stay as they are).
func (s *server) saveUser(create bool) func(*http.Request, caller, *createReq) (any, error) {
	return func(r *http.Request, _ caller, req *createReq) (any, error) {
		if create && (req.Password == nil || req.Tenant == nil) {
			return nil, fmt.Errorf("%w: username, password and tenant_name are required", errInvalid)
		}
		hash, err := s.validate(r.Context(), req.Username, req.userFields)
		if err != nil {
			return nil, err
		}
		var old user
		u, err := s.db.updateUser(req.Username, create, func(u *user) error {
			if old = *u; create {
				u.ID = newID()
			}
			s.apply(u, req.userFields, hash)
			return nil
		})
		if err == nil && create {
			return map[string]string{"id": u.ID}, nil
		} else if err == nil && (u.Tenant != old.Tenant || u.NotBefore != old.NotBefore) {
			s.hub.kick(u.Username) // streams of the old tenant, or of ended tokens, end
		}
		return u, err
	}
}

func (s *server) loginUser(r *http.Request, _ caller, req *struct {
	Username string  `json:"username"`
	Password *string `json:"password"`
	TOTP     string  `json:"totp"`
}) (any, error) {
	if req.Password == nil {
		return nil, fmt.Errorf("%w: username and password are required", errInvalid)
	}
	u, err := s.login(r, req.Username, *req.Password, &req.TOTP)
	if err != nil {
		return nil, err
	}
	return map[string]string{"jwt": s.issueJWT(u)}, nil
}

func (s *server) listUsers(r *http.Request, _ caller, req *struct {
	adminReq
	Tenant string `json:"tenant_name"`
}) (any, error) {
	return s.db.listUsers(req.Tenant)
}

// setRevoked answers /revoke_user (refuse the user's logins, end its tokens and streams)
// or /unrevoke_user (let the user log in again, and clear its lockout).
func (s *server) setRevoked(revoked bool) func(*http.Request, caller, *userReq) (any, error) {
	return func(r *http.Request, _ caller, req *userReq) (any, error) {
		_, err := s.db.updateUser(req.Username, false, func(u *user) error {
			if u.Revoked = revoked; revoked {
				u.endTokens(s.now()) // tokens issued before stay dead after an unrevoke
			}
			return nil
		})
		s.log.Warn("user revoked or let in again", "username", req.Username, "revoked", revoked, "err", err)
		if revoked && err == nil {
			s.hub.kick(req.Username)
		} else if !revoked {
			s.throttle.clear(accountKey("login", req.Username), accountKey("reset", req.Username)) // an unknown user has none
		}
		return struct{}{}, err
	}
}

func (s *server) createQR(r *http.Request, _ caller, req *struct {
	userReq
	Issuer string `json:"issuer"`
}) (any, error) {
	if !validName(req.Issuer, false) || strings.Contains(req.Issuer, ":") {
		return nil, fmt.Errorf("%w: issuer must be 1-64 characters without ':'", errInvalid)
	}
	u, err := s.db.getUser(req.Username)
	if err != nil {
		return nil, err
	} else if !u.TwoFactor {
		return nil, fmt.Errorf("%w: the user needs two_factor on", errInvalid)
	}
	// 320 pixels with a quiet zone: easy to scan off a screen.
	png, err := qrcode.Encode(otpauthURL(req.Issuer, u.Username, u.TOTPSecret), qrcode.Medium, 320)
	return map[string][]byte{"qr": png}, err
}

// createTOTP answers a password-reset code and, beside the contract's field, its expiry
// (unix). It clears the user's lockout, so an attacker's guesses cannot block the reset.
func (s *server) createTOTP(r *http.Request, _ caller, req *userReq) (any, error) {
	code, expiry := newResetCode(), s.now().Unix()+s.cfg.totpDuration
	_, err := s.db.updateUser(req.Username, false, func(u *user) error {
		u.ResetCode, u.ResetExpiry = hashCode(code), expiry
		return nil
	})
	s.throttle.clear(accountKey("login", req.Username), accountKey("reset", req.Username)) // an unknown user has none
	return map[string]any{"totp": code, "expiry": expiry}, err
}

var errBadCode = fmt.Errorf("%w: invalid or expired code", errUnauthorized)

// passwordReset checks the code first, under the throttle of reset codes (not of logins,
// so a locked login does not block a reset), then the new password (a weak one changes
// nothing and leaves the code usable), and hashes it outside the transaction that
// consumes the code and sets it.
func (s *server) passwordReset(r *http.Request, _ caller, req *struct {
	Username string  `json:"username"`
	TOTP     *string `json:"totp"`
	Password *string `json:"password"`
}) (any, error) {
	if !validName(req.Username, true) || req.TOTP == nil || req.Password == nil {
		return nil, fmt.Errorf("%w: username, totp and password are required", errInvalid)
	}
	keys := []tkey{accountKey("reset", req.Username), addrKey("reset", r)} // not locked by failed logins
	end, err := s.throttle.begin(s.now(), keys...)
	if err != nil {
		return nil, err
	}
	u, err := s.db.getUser(req.Username)
	wrong := errors.Is(err, errNotFound) || err == nil && !validResetCode(u, *req.TOTP, s.now())
	if end(wrong); wrong {
		return nil, errBadCode
	} else if err != nil {
		return nil, err
	}
	hash, err := s.hashPassword(r.Context(), *req.Password, u.Username, deref(u.Email))
	if err == nil {
		_, err = s.db.updateUser(req.Username, false, func(u *user) error {
			if !validResetCode(u, *req.TOTP, s.now()) {
				return errBadCode // used meanwhile
			}
			u.ResetCode, u.ResetExpiry = "", 0
			s.apply(u, userFields{}, hash)
			return nil
		})
	}
	if err == nil {
		s.throttle.clear(keys[0], accountKey("login", req.Username))
		s.hub.kick(req.Username)
	}
	return struct{}{}, err
}

func (s *server) verify(r *http.Request, c caller, _ *struct{}) (any, error) {
	tok, err := mintBiscuit(s.rootKey, c.user, time.Unix(c.exp, 0))
	// key and token are arrays of numbers, as the original broker answered them.
	return map[string]any{
		"key": numbers(s.rootKey.Public().(ed25519.PublicKey)), "token": numbers(tok),
		"expiry": c.exp, "username": c.Username, "scopes": append([]string{}, c.Scopes...),
	}, err
}

// numbers is b as a JSON array of numbers, where encoding/json would write base64: fmt
// prints a byte slice as "[1 2 3]".
func numbers(b []byte) json.RawMessage {
	return json.RawMessage(strings.ReplaceAll(fmt.Sprint(b), " ", ","))
}

var eventNameRE = regexp.MustCompile(`^[A-Za-z0-9_./-]{1,128}$`)

func (s *server) insert(r *http.Request, c caller, req *struct {
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
}) (any, error) {
	if !eventNameRE.MatchString(req.Event) {
		return nil, fmt.Errorf("%w: event must be 1-128 ASCII letters, digits or _ - . /", errInvalid)
	}
	data, err := compactASCII(req.Data)
	if err != nil {
		return nil, err
	}
	id, err := s.hub.insert(&event{Tenant: c.Tenant, Name: req.Event, Data: data})
	return map[string]uint64{"id": id}, err
}

// webFiles is the admin console: static files calling the same JSON API.
//
//go:embed web/index.html web/app.js web/style.css
var webFiles embed.FS

// backup answers a consistent snapshot of the live database. It is copied to a
// temporary file first, so a slow download does not hold the database's read transaction
// (which would stall inserts that grow the file); a download that stops reading for
// writeTimeout is abandoned.
func (s *server) backup(r *http.Request, _ caller, _ *adminReq) (any, error) {
	f, size, err := s.db.snapshot()
	if err != nil {
		return nil, err
	}
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		defer f.Close()
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Disposition", `attachment; filename="broker.db"`)
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		w.Header().Set("Cache-Control", "no-store")
		io.Copy(deadlineWriter{w}, io.NewSectionReader(f, 0, size)) // on failure the status line is gone: the client sees a short download
		http.NewResponseController(w).SetWriteDeadline(time.Time{})
	}), nil
}

// deadlineWriter gives each write writeTimeout: a client that stops reading is let go.
type deadlineWriter struct{ http.ResponseWriter }

func (d deadlineWriter) Write(b []byte) (int, error) {
	http.NewResponseController(d.ResponseWriter).SetWriteDeadline(time.Now().Add(writeTimeout))
	return d.ResponseWriter.Write(b)
}
