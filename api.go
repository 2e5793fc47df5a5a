package main

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// The errors that fail maps to status codes.
var (
	errInvalid      = errors.New("invalid request")
	errUnauthorized = errors.New("unauthorized")
	errNotFound     = errors.New("not found")
	errTooMany      = errors.New("too many requests")
)

// routes returns broker's whole HTTP API.
func (s *server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		s.reply(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("POST /create_user", handle(s, s.saveUser(true)))
	mux.HandleFunc("POST /login", handle(s, s.loginUser))
	mux.HandleFunc("POST /list_users", handle(s, s.listUsers))
	mux.HandleFunc("POST /get_user", handle(s, s.getUser))
	mux.HandleFunc("POST /update_user", handle(s, s.saveUser(false)))
	mux.HandleFunc("POST /revoke_user", handle(s, s.revoke(true)))
	mux.HandleFunc("POST /unrevoke_user", handle(s, s.revoke(false)))
	mux.HandleFunc("POST /create_qr", handle(s, s.createQR))
	mux.HandleFunc("POST /create_totp", handle(s, s.createTOTP))
	mux.HandleFunc("POST /password_reset", handle(s, s.passwordReset))
	mux.HandleFunc("POST /insert", handle(s, s.insert))
	mux.HandleFunc("GET /verify", handle(s, s.verify))
	mux.HandleFunc("GET /sse", s.handleSSE)
	mux.HandleFunc("POST /backup", s.handleBackup)
	mux.Handle("GET /admin/", console())
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { s.fail(w, r, errNotFound) })
	return s.cors(mux)
}

// cors answers preflights and marks every answer with the allowed origin (CONTRACT §5).
func (s *server) cors(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", s.cfg.origin)
		h.Set("X-Content-Type-Options", "nosniff")
		if s.cfg.origin != "*" {
			h.Set("Vary", "Origin")
		}
		if r.Method == http.MethodOptions {
			h.Set("Access-Control-Allow-Methods", "GET, POST, HEAD")
			h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID")
			h.Set("Access-Control-Max-Age", "7200")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// adminReq is embedded in the requests of admin endpoints; handle checks its token.
type adminReq struct {
	AdminToken string `json:"admin_token"`
}

// checkAdmin compares the token with --admin_token through SHA-256 digests, so the
// comparison takes the same time whatever the token's length or content.
func (a *adminReq) checkAdmin(s *server) error {
	if got := sha256.Sum256([]byte(a.AdminToken)); subtle.ConstantTimeCompare(got[:], s.adminHash[:]) != 1 {
		return fmt.Errorf("%w: wrong admin token", errUnauthorized)
	}
	return nil
}

// userReq names the user an admin request is about.
type userReq struct {
	adminReq
	Username string `json:"username"`
}

// handle is the one shape of a JSON endpoint: decode the body into a T (at most 1 MiB, no
// unknown fields, no trailing data), check the admin token when T embeds adminReq, act,
// and answer the result as JSON, or the error.
func handle[T any](s *server, act func(r *http.Request, req *T) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		req := new(T)
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		dec.DisallowUnknownFields()
		var err error
		if r.Method != http.MethodGet { // GET /verify has no body
			err = dec.Decode(req)
		}
		if err == nil && r.Method != http.MethodGet && dec.Decode(&struct{}{}) != io.EOF {
			err = errors.New("unexpected data after the JSON object")
		}
		var tooBig *http.MaxBytesError
		if err != nil && !errors.As(err, &tooBig) {
			err = fmt.Errorf("%w: %s", errInvalid, strings.TrimPrefix(err.Error(), "json: "))
		}
		if a, ok := any(req).(interface{ checkAdmin(*server) error }); ok && err == nil {
			err = a.checkAdmin(s)
		}
		var out any
		if err == nil {
			out, err = act(r, req)
		}
		if err != nil {
			s.fail(w, r, err)
		} else if out != nil { // nil: act has answered itself
			s.reply(w, http.StatusOK, out)
		}
	}
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

// fail answers err as {"error": "..."} with its status. Internal errors are logged and
// reach the client only as "internal error".
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := http.StatusInternalServerError, "internal error"
	for code, sentinel := range map[int]error{400: errInvalid, 401: errUnauthorized, 404: errNotFound, 429: errTooMany} {
		if errors.Is(err, sentinel) {
			status, msg = code, err.Error()
		}
	}
	var tooBig *http.MaxBytesError
	var retry *retryError
	if errors.As(err, &tooBig) {
		status, msg = http.StatusRequestEntityTooLarge, "request body too large"
	} else if errors.As(err, &retry) {
		w.Header().Set("Retry-After", strconv.Itoa(int(retry.after.Seconds()+0.999)))
	} else if status == http.StatusInternalServerError {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	s.reply(w, status, map[string]string{"error": msg})
}

type createReq struct {
	userReq
	userFields
}

// saveUser creates a user, or updates one: absent fields stay as they are.
func (s *server) saveUser(create bool) func(*http.Request, *createReq) (any, error) {
	return func(r *http.Request, req *createReq) (any, error) {
		if create && (req.Password == nil || req.Tenant == nil) {
			return nil, fmt.Errorf("%w: username, password and tenant_name are required", errInvalid)
		}
		err := s.validate(req.Username, req.userFields)
		hash := ""
		if err == nil && req.Password != nil {
			hash, err = s.hashPassword(r.Context(), *req.Password)
		}
		if err != nil { // refused before taking the database's write lock
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
		if err == nil && !create && (u.Tenant != old.Tenant || hash != "") {
			s.hub.kick(u.Username) // streams of the old tenant, or opened with the old password, end
		}
		if create && err == nil {
			return map[string]string{"id": u.ID}, nil
		}
		return u, err
	}
}

type loginReq struct {
	Username string `json:"username"`
	Password string `json:"password"`
	TOTP     string `json:"totp"`
}

func (s *server) loginUser(r *http.Request, req *loginReq) (any, error) {
	u, err := s.login(r, req.Username, req.Password, &req.TOTP)
	if err != nil {
		return nil, err
	}
	return map[string]string{"jwt": s.issueJWT(u)}, nil
}

func (s *server) listUsers(r *http.Request, req *struct {
	adminReq
	Tenant string `json:"tenant_name"`
}) (any, error) {
	return s.db.listUsers(req.Tenant)
}

func (s *server) getUser(r *http.Request, req *userReq) (any, error) {
	return s.db.getUser(req.Username)
}

func (s *server) revoke(revoked bool) func(*http.Request, *userReq) (any, error) {
	return func(r *http.Request, req *userReq) (any, error) {
		_, err := s.db.updateUser(req.Username, false, func(u *user) error {
			if u.Revoked = revoked; revoked {
				u.endTokens(s.now()) // tokens issued before stay dead after an unrevoke
			}
			return nil
		})
		if revoked && err == nil {
			s.hub.kick(req.Username)
		}
		return struct{}{}, err
	}
}

func (s *server) createQR(r *http.Request, req *struct {
	userReq
	Issuer string `json:"issuer"`
}) (any, error) {
	u, err := s.db.getUser(req.Username)
	if err == nil && (!u.TwoFactor || req.Issuer == "" || strings.Contains(req.Issuer, ":")) {
		err = fmt.Errorf("%w: the user needs two_factor on, and issuer must be non-empty without ':'", errInvalid)
	}
	if err != nil {
		return nil, err
	}
	png, err := qrPNG(otpauthURL(req.Issuer, u.Username, u.TOTPSecret))
	return map[string][]byte{"qr": png}, err
}

// createTOTP answers the reset code and, beside the contract's field, its expiry (unix).
func (s *server) createTOTP(r *http.Request, req *userReq) (any, error) {
	code, expiry := newResetCode(), s.now().Unix()+s.cfg.totpDuration
	_, err := s.db.updateUser(req.Username, false, func(u *user) error {
		u.ResetCode, u.ResetExpiry = hashCode(code), expiry
		return nil
	})
	return map[string]any{"totp": code, "expiry": expiry}, err
}

var errBadCode = fmt.Errorf("%w: invalid or expired code", errUnauthorized)

// passwordReset checks the new password first (a weak one changes nothing and leaves the
// code usable) and hashes it outside the transaction that consumes the code and sets it.
func (s *server) passwordReset(r *http.Request, req *loginReq) (any, error) {
	keys := []string{"user:" + req.Username, "addr:" + clientAddr(r)}
	err := s.throttle.check(s.now(), keys...)
	if err == nil {
		err = s.checkPassword(req.Password, req.Username, "")
	}
	hash := ""
	if err == nil {
		hash, err = s.hashPassword(r.Context(), req.Password)
	}
	if err == nil {
		_, err = s.db.updateUser(req.Username, false, func(u *user) error {
			if !useResetCode(u, req.TOTP, s.now()) {
				return errBadCode
			}
			s.apply(u, userFields{}, hash)
			return nil
		})
	}
	if errors.Is(err, errBadCode) || errors.Is(err, errNotFound) {
		s.throttle.fail(s.now(), keys...)
		return nil, errBadCode
	} else if err == nil {
		s.throttle.succeed(req.Username)
		s.hub.kick(req.Username)
	}
	return struct{}{}, err
}

func (s *server) verify(r *http.Request, _ *struct{}) (any, error) {
	u, exp, err := s.authenticate(r)
	var tok []byte
	if err == nil {
		tok, err = mintBiscuit(s.rootKey, u, time.Unix(exp, 0))
	}
	if err != nil {
		return nil, err
	}
	// key and token are arrays of numbers, as the original broker answered them.
	return map[string]any{
		"key": numbers(s.rootKey.Public().(ed25519.PublicKey)), "token": numbers(tok),
		"expiry": exp, "username": u.Username, "scopes": append([]string{}, u.Scopes...),
	}, nil
}

func numbers(b []byte) []int {
	a := make([]int, len(b))
	for i, c := range b {
		a[i] = int(c)
	}
	return a
}

var eventNameRE = regexp.MustCompile(`^[A-Za-z0-9_./-]{1,128}$`)

func (s *server) insert(r *http.Request, req *struct {
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
}) (any, error) {
	u, _, err := s.authenticate(r)
	if err != nil {
		return nil, err
	}
	if !eventNameRE.MatchString(req.Event) {
		return nil, fmt.Errorf("%w: event must be 1-128 ASCII letters, digits or _ - . /", errInvalid)
	}
	data, err := compactASCII(req.Data)
	if err != nil {
		return nil, err
	}
	id, err := s.hub.insert(&event{Tenant: u.Tenant, Name: req.Event, Data: data})
	return map[string]uint64{"id": id}, err
}

// webFiles is the admin console: static files calling the same JSON API.
//
//go:embed web/index.html web/app.js web/style.css
var webFiles embed.FS

// console serves the admin console under a strict Content-Security-Policy: scripts and
// styles only from its own files, images also as data: URLs (the QR code).
func console() http.Handler {
	web, _ := fs.Sub(webFiles, "web")
	files := http.StripPrefix("/admin/", http.FileServerFS(web))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("Referrer-Policy", "no-referrer")
		files.ServeHTTP(w, r)
	})
}

// handleBackup streams a consistent snapshot of the live database.
func (s *server) handleBackup(w http.ResponseWriter, r *http.Request) {
	handle(s, func(r *http.Request, req *adminReq) (any, error) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Disposition", `attachment; filename="broker.db"`)
		if err := s.db.backup(w); err != nil {
			// The status line is gone: the client sees a short download, the log says why.
			s.log.Error("backup failed", "err", err)
		}
		return nil, nil
	})(w, r)
}
