package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// maxDuration keeps the largest duration stored into it, from any goroutine.
type maxDuration struct{ v atomic.Int64 }

func (m *maxDuration) add(d time.Duration) {
	for old := m.v.Load(); int64(d) > old && !m.v.CompareAndSwap(old, int64(d)); old = m.v.Load() {
	}
}

func (m *maxDuration) ms() int64 { return time.Duration(m.v.Load()).Milliseconds() }

// randomPrintable returns n random printable ASCII characters (space to '~').
func randomPrintable(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	for i := range b {
		b[i] = ' ' + b[i]%95
	}
	return string(b)
}

// attackZxcvbn: 60 concurrent password resets with a wrong code and a 1024-character
// random password, which the broker should refuse cheaply (401/429) rather than
// estimating the password's strength first.
func attackZxcvbn(ctx context.Context, e *env, r *report) error {
	c := e.client(50 * time.Second)
	defer c.close()
	a, err := c.newAccount(ctx, "zx", "zx", nil)
	if err != nil {
		return err
	}
	var counts counter
	var lat maxDuration
	sent := parallel(ctx, 60, 60, func(int) {
		start := time.Now()
		status, _, err := c.postJSON(ctx, "/password_reset", map[string]string{"username": a.name, "totp": "000000", "password": randomPrintable(1024)})
		counts.add(status, err)
		lat.add(time.Since(start))
	})
	r.note("resets=%d statuses{%s} latency_max=%dms", sent, &counts, lat.ms())
	if n := counts.others("401", "429"); n > 0 {
		r.problem("%d answers other than 401/429", n)
	}
	return nil
}

// attackThrottle: 10,000 failed logins with 1 MB usernames, 32 at once: each would be a
// 1 MB throttle key if the broker counted it instead of refusing it with 400.
func attackThrottle(ctx context.Context, e *env, r *report) error {
	c := e.client(30 * time.Second)
	defer c.close()
	prefix := []byte(`{"username":"` + strings.Repeat("x", 1_000_000))
	var counts counter
	sendCtx, cancel := context.WithTimeout(ctx, 45*time.Second) // in-flight requests get the rest
	defer cancel()
	start := time.Now()
	sent := parallel(sendCtx, 10_000, 32, func(i int) {
		suffix := fmt.Sprintf(`%d","password":"x"}`, i)
		body := io.MultiReader(bytes.NewReader(prefix), strings.NewReader(suffix))
		status, _, err := c.do(ctx, http.MethodPost, "/login", "", body, int64(len(prefix)+len(suffix)))
		counts.add(status, err)
	})
	r.note("logins=%d in %.1fs statuses{%s}", sent, time.Since(start).Seconds(), &counts)
	if n := counts.others("400"); n > 0 {
		r.problem("%d of %d not refused with 400", n, sent)
	}
	return nil
}

// attackBacklog: ~200 events of the largest accepted size, then 40 streams replaying all
// of them (Last-Event-ID: 0) to clients that read 1 KiB every 100 ms, for 15 s.
func attackBacklog(ctx context.Context, e *env, r *report) error {
	c := e.client(30 * time.Second)
	defer c.close()
	a, err := c.newAccount(ctx, "backlog", "backlog", nil)
	if err != nil {
		return err
	}
	size, err := c.largestData(ctx, a.jwt, "big", 60<<10)
	if err != nil {
		return err
	}
	data := jsonString(size)
	var ins counter
	parallel(ctx, 199, 8, func(int) { ins.add(c.insert(ctx, a.jwt, "big", data)) })
	r.note("history=%d events of %d bytes (inserts{%s})", 1+ins.get("200"), size, &ins)

	readCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var streams counter
	var read atomic.Int64
	var ended atomic.Int32
	var wg sync.WaitGroup
	for range 40 {
		wg.Go(func() {
			conn, err := c.rawRequest(readCtx, http.MethodGet, "/sse", map[string]string{"Authorization": "Bearer " + a.jwt, "Last-Event-ID": "0"}, nil)
			if err != nil {
				streams.add(0, err)
				return
			}
			defer conn.Close()
			status, n, err := slowRead(readCtx, conn)
			streams.add(status, nil)
			read.Add(n)
			if err != nil {
				ended.Add(1)
			}
		})
	}
	wg.Wait()
	r.note("streams{%s} ended_by_broker=%d read=%.1fMiB", &streams, ended.Load(), mib(read.Load()))
	return nil
}

// slowRead reads 1 KiB every 100 ms until ctx ends. It returns the answer's status, the
// bytes read and the error that ended the stream early (nil if it lasted).
func slowRead(ctx context.Context, conn net.Conn) (status int, n int64, err error) {
	buf := make([]byte, 1024)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return status, n, nil
		case <-tick.C:
		}
		conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		m, err := conn.Read(buf)
		if n == 0 && m > 0 {
			status, _ = parseStatusLine(string(buf[:m]))
		}
		n += int64(m)
		if err != nil && errKind(err) != "timeout" {
			return status, n, err
		}
	}
}

// attackInserts: 600 concurrent inserts of ~1 MB of non-ASCII data (each "é" becomes
// the 6 bytes \u00e9 in the stored and streamed JSON).
func attackInserts(ctx context.Context, e *env, r *report) error {
	c := e.client(50 * time.Second)
	defer c.close()
	a, err := c.newAccount(ctx, "inserts", "inserts", nil)
	if err != nil {
		return err
	}
	body := insertBody("big", []byte(`"`+strings.Repeat("é", 499_980)+`"`))
	var counts counter
	var lat maxDuration
	var wg sync.WaitGroup
	for range 600 {
		wg.Go(func() {
			start := time.Now()
			status, _, err := c.do(ctx, http.MethodPost, "/insert", "Bearer "+a.jwt, bytes.NewReader(body), int64(len(body)))
			counts.add(status, err)
			lat.add(time.Since(start))
		})
	}
	wg.Wait()
	r.note("inserts=600 of %d bytes statuses{%s} latency_max=%dms", len(body), &counts, lat.ms())
	return nil
}

// attackFanout: 4,000 streams of one tenant (8 users, 500 each) whose clients never read,
// then 20 events of the largest accepted size.
func attackFanout(ctx context.Context, e *env, r *report) error {
	c := e.client(30 * time.Second)
	defer c.close()
	users := make([]account, 8)
	for i := range users {
		var err error
		if users[i], err = c.newAccount(ctx, fmt.Sprint("fanout", i), "fanout", nil); err != nil {
			return err
		}
	}
	var mu sync.Mutex
	var conns []net.Conn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	var opened counter
	openCtx, cancel := context.WithTimeout(ctx, 25*time.Second)
	defer cancel()
	parallel(openCtx, 4000, 64, func(i int) {
		conn, status, err := c.openStream(openCtx, users[i%len(users)].jwt, "")
		opened.add(status, err)
		if err == nil && status != http.StatusOK {
			conn.Close()
		} else if err == nil {
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
	})
	r.note("streams{%s}", &opened)
	size, err := c.largestData(ctx, users[0].jwt, "big", 60<<10)
	if err != nil {
		return err
	}
	data := jsonString(size)
	var ins counter
	var lat maxDuration
	for range 19 {
		start := time.Now()
		ins.add(c.insert(ctx, users[0].jwt, "big", data))
		lat.add(time.Since(start))
	}
	r.note("20 events of %d bytes (inserts{%s} latency_max=%dms)", size, &ins, lat.ms())
	select { // the broker's writers work on the full sockets meanwhile
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
	}
	return nil
}

// attackBackup: a backup download whose client reads one byte and stalls, while 2,000
// inserts of 4 KiB go on for up to 30 s; they must not wait on the backup.
func attackBackup(ctx context.Context, e *env, r *report) error {
	c := e.client(10 * time.Second)
	defer c.close()
	a, err := c.newAccount(ctx, "backup", "backup", nil)
	if err != nil {
		return err
	}
	// ~10 MiB more data, so the snapshot cannot fit in the socket buffers.
	size, err := c.largestData(ctx, a.jwt, "fill", 60<<10)
	if err != nil {
		return err
	}
	fill := jsonString(size)
	var pre counter
	parallel(ctx, min(10<<20/size, 2000), 16, func(int) { pre.add(c.insert(ctx, a.jwt, "fill", fill)) })
	conn, err := c.rawRequest(ctx, http.MethodPost, "/backup", nil, fmt.Appendf(nil, `{"admin_token":%q}`, e.admin))
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err != nil {
		return fmt.Errorf("backup: no first byte: %w", err)
	}
	small := jsonString(4096)
	insCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var ins counter
	var lat maxDuration
	for i := 0; i < 2000 && insCtx.Err() == nil; i++ {
		start := time.Now()
		ins.add(c.insert(insCtx, a.jwt, "small", small))
		lat.add(time.Since(start))
	}
	conn.Close()
	start := time.Now()
	status, err := c.insert(ctx, a.jwt, "after", small)
	after := fmt.Sprintf("%d in %dms", status, time.Since(start).Milliseconds())
	if err != nil {
		after = errKind(err)
	}
	r.note("prefill{%s} inserts_done=%d/2000 statuses{%s} insert_max=%dms insert_after_backup_closed=%s",
		&pre, ins.get("200"), &ins, lat.ms(), after)
	if lat.ms() > 5000 || ins.others("200") > 0 {
		r.problem("inserts blocked or failed while a backup download stalled")
	}
	return nil
}

// attackHashSlots: 40 clients, each from its own address, log in to one account in a loop
// for 15 s; meanwhile another user, from another address, logs in once a second and should
// still get in quickly.
func attackHashSlots(ctx context.Context, e *env, r *report) error {
	c := e.client(20 * time.Second)
	defer c.close()
	a, err := c.newAccount(ctx, "slots-a", "slots", nil)
	if err != nil {
		return err
	}
	b, err := c.newAccount(ctx, "slots-b", "slots", nil)
	if err != nil {
		return err
	}
	loadCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	login := func(c *client, acc account) (int, error) {
		status, _, err := c.postJSON(ctx, "/login", map[string]string{"username": acc.name, "password": acc.password})
		return status, err
	}
	var load, other counter
	var lat maxDuration
	var wg sync.WaitGroup
	for range 40 {
		wg.Go(func() {
			lc := e.client(20 * time.Second)
			defer lc.close()
			for loadCtx.Err() == nil {
				load.add(login(lc, a))
			}
		})
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for loadCtx.Err() == nil {
		start := time.Now()
		other.add(login(c, b))
		lat.add(time.Since(start))
		select {
		case <-loadCtx.Done():
		case <-tick.C:
		}
	}
	wg.Wait()
	r.note("load{%s} other_user{%s} other_max=%dms", &load, &other, lat.ms())
	if n := other.others("200"); n > 0 {
		r.problem("%d logins of the other user failed", n)
	}
	return nil
}

// attackScopes: a user with 20,000 scopes (expect 400), then /verify for a user with the
// most scopes accepted (32 of 60 characters, halved while refused).
func attackScopes(ctx context.Context, e *env, r *report) error {
	c := e.client(30 * time.Second)
	defer c.close()
	many := make([]string, 20_000)
	for i := range many {
		many[i] = fmt.Sprintf("r%d:get", i)
	}
	start := time.Now()
	big, status, _, err := c.createUser(ctx, "scopes-many", "scopes", many)
	if err != nil {
		return err
	}
	r.note("create_20000_scopes=%d in %dms", status, time.Since(start).Milliseconds())
	if status == http.StatusOK {
		r.problem("a user with 20000 scopes was created")
		// Its JWT would be too large for a header: HTTP Basic makes /verify mint its biscuit.
		basic := "Basic " + base64.StdEncoding.EncodeToString([]byte(big.name+":"+big.password))
		start = time.Now()
		status, body, err := c.do(ctx, http.MethodGet, "/verify", basic, nil, 0)
		if err != nil {
			r.note("verify_20000_scopes=%s after %dms", errKind(err), time.Since(start).Milliseconds())
		} else {
			r.note("verify_20000_scopes=%d in %dms (%.1f KiB)", status, time.Since(start).Milliseconds(), float64(len(body))/1024)
		}
	}
	for n := 32; n >= 1; n /= 2 {
		scopes := make([]string, n)
		for i := range scopes {
			scopes[i] = fmt.Sprintf("r%02d%s:get", i, strings.Repeat("x", 53)) // 60 characters
		}
		acc, err := c.newAccount(ctx, fmt.Sprint("scopes-", n), "scopes", scopes)
		if err != nil && strings.Contains(err.Error(), ": 400 ") {
			continue
		} else if err != nil {
			return err
		}
		var lat maxDuration
		var verify counter
		for range 3 {
			start := time.Now()
			status, _, err := c.do(ctx, http.MethodGet, "/verify", "Bearer "+acc.jwt, nil, 0)
			verify.add(status, err)
			lat.add(time.Since(start))
		}
		r.note("verify_%d_scopes{%s} max=%dms", n, &verify, lat.ms())
		return nil
	}
	return fmt.Errorf("no user with 1 to 32 scopes of 60 characters accepted")
}
