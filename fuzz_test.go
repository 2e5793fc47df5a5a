package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"
)

var fuzzKey = []byte("0123456789abcdef0123456789abcdef")

// FuzzVerifyJWT: the verifier never panics and accepts only what signJWT produces for the
// claims it returns.
func FuzzVerifyJWT(f *testing.F) {
	now := time.Unix(1700000300, 0)
	good := signJWT(claims{Iss: "Broker", Sub: "alice", Tenant: "t", Scopes: []string{"a:b"}, Iat: 1700000000, Exp: 1700000900}, fuzzKey)
	for _, s := range []string{good, good + "x", "", "a.b.c", "..", strings.Repeat(".", 100), "Bearer " + good,
		"eyJhbGciOiJub25lIn0.eyJpc3MiOiJqb2UifQ.",
		"eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := verifyJWT(tok, fuzzKey, now)
		if err == nil && signJWT(c, fuzzKey) != tok {
			t.Fatalf("accepted %q, which is not the token of its claims", tok)
		}
	})
}

// FuzzParseBasic: no panic; an accepted header has a non-empty user without ':' or control
// characters, and encoding the pair again parses back to it.
func FuzzParseBasic(f *testing.F) {
	for _, s := range []string{"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "basic dGVzdDoxMjPCow==", "Basic dXNlcjpwYTpzcw==",
		"Basic Om5vdXNlcg==", "Basic bm9jb2xvbg==", "Basic ", "basic", "Basic\tQQ==", "Basic ===="} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, h string) {
		u, p, ok := parseBasic(h)
		if !ok {
			return
		}
		if u == "" || strings.Contains(u, ":") || strings.ContainsFunc(u+p, unicode.IsControl) {
			t.Fatalf("accepted user %q password %q from %q", u, p, h)
		}
		u2, p2, ok2 := parseBasic("Basic " + base64.StdEncoding.EncodeToString([]byte(u+":"+p)))
		if !ok2 || u2 != u || p2 != p {
			t.Fatalf("round trip of %q:%q gave %q:%q %v", u, p, u2, p2, ok2)
		}
	})
}

// FuzzDecodeRequest: the request decoder of every JSON endpoint answers any body with 200
// (a valid object) or a JSON 400/401/413, never anything else.
func FuzzDecodeRequest(f *testing.F) {
	s := &server{log: slog.New(slog.NewTextHandler(io.Discard, nil)), adminHash: sha256.Sum256([]byte("letmein")), now: time.Now,
		throttle: &throttle{maxKeys: 10, strikes: map[tkey]strike{}}, largeBodies: make(chan struct{}, largeBodies)}
	h := handle(s, admin, func(r *http.Request, _ caller, req *createReq) (any, error) { return req, nil })
	for _, b := range []string{`{"admin_token":"letmein","username":"a","password":"b","tenant_name":"t"}`, `{}`, `{"a":1}{}`,
		`{"admin_token":"letmein"} x`, strings.Repeat("[", 10001), "\xff", `{"admin_token":"letmein","data":{"x":[1,2,{"y":null}]}}`,
		`{"admin_token":"letmein","scopes":"x"}`, `{"ADMIN_TOKEN":"letmein"}`, `{"admin_token":"letmein","username":"a","username":"b"}`} {
		f.Add([]byte(b))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		w := httptest.NewRecorder()
		h(w, httptest.NewRequest("POST", "/x", bytes.NewReader(body)))
		switch w.Code {
		case 200:
			if !json.Valid(body) && !json.Valid(bytes.TrimSpace(body)) {
				t.Fatalf("accepted invalid JSON %q", body)
			}
		case 400, 401, 413, 429: // 429: wrong admin tokens are throttled
			var e struct{ Error string }
			if json.Unmarshal(w.Body.Bytes(), &e) != nil || e.Error == "" {
				t.Fatalf("error answer %q is not {\"error\": ...}", w.Body)
			}
		default:
			t.Fatalf("status %d for %q", w.Code, body)
		}
	})
}

// parseSSE is a reference event-stream parser (WHATWG HTML §9.2.6): lines end at CRLF, CR
// or LF; "field:value" with one optional leading space removed; a blank line dispatches.
func parseSSE(stream string) (events []sseEvent) {
	var ev sseEvent
	var data []string
	for _, line := range strings.Split(strings.NewReplacer("\r\n", "\n", "\r", "\n").Replace(stream), "\n") {
		if line == "" {
			if data != nil {
				ev.data = strings.Join(data, "\n")
				events = append(events, ev)
			}
			ev, data = sseEvent{id: ev.id}, nil
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "event":
			ev.name = value
		case "id":
			ev.id = value
		case "data":
			data = append(data, value)
		}
	}
	return events
}

// FuzzFrame: every accepted event encodes to a frame that parses back to exactly one event
// with the same name, id and data, in ASCII with LF line ends only.
func FuzzFrame(f *testing.F) {
	for _, d := range []string{`{"a":"x\nevent: injected\n\ndata: y"}`, `"x\revent: injected"`, `"retry: 5"`, `"héllo 😀 \u2028"`,
		`[1, 2.5e10, null, true]`, `"\u0000"`, `"a\r\nb"`, `null`, `{"nested":{"deep":[{"x":"\ud83d\ude00"}]}}`} {
		f.Add("news", uint64(7), []byte(d))
	}
	f.Fuzz(func(t *testing.T, name string, id uint64, raw []byte) {
		if !eventNameRE.MatchString(name) {
			return // refused by /insert
		}
		data, err := compactASCII(raw)
		if err != nil {
			if json.Valid(raw) && utf8.Valid(raw) && len(raw) > 0 {
				t.Fatalf("refused valid JSON %q: %v", raw, err)
			}
			return
		}
		fr := string(appendFrame(nil, id, []byte(name), data))
		if strings.ContainsAny(fr, "\r") || strings.IndexFunc(fr, func(r rune) bool { return r > 127 }) >= 0 {
			t.Fatalf("frame %q has CR or non-ASCII", fr)
		}
		evs := parseSSE(fr)
		if len(evs) != 1 || evs[0].name != name || evs[0].id != strconv.FormatUint(id, 10) || evs[0].data != string(data) {
			t.Fatalf("frame %q parsed as %+v", fr, evs)
		}
		var in, out any
		if len(raw) > 0 && (json.Unmarshal(raw, &in) != nil || json.Unmarshal(data, &out) != nil || !reflect.DeepEqual(in, out)) {
			t.Fatalf("data %q came back as %q", raw, data)
		}
	})
}
