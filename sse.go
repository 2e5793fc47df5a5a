package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// hub commits inserted events and delivers them to the live streams of their tenant.
//
// One committer goroutine takes every insert waiting at that moment and commits them in
// one transaction (group commit: one pair of fsyncs however many inserts), then publishes
// them in ID order. Publishing never waits for a client: it appends the frame, encoded
// once, to each subscriber's bounded buffer, and queues the subscriber for a few writer
// goroutines. While they work through the queue, later events join the buffers of the
// subscribers still waiting, so under load each write carries several events: the write
// system call is most of the cost of a delivery. HTTP/1.1 streams are hijacked, so an idle
// stream holds no goroutine and no net/http buffers, only its socket and a subscriber; a
// sweep every few seconds sends keep-alives, whose writes fail for clients that have gone.
type hub struct {
	db             *store
	log            *slog.Logger
	cfg            config // maxStreams, maxUserStreams, heartbeat
	inserts        chan *event
	work           chan *subscriber // subscribers with something to write, each once
	stop           chan struct{}
	loops, streams sync.WaitGroup // the hub's goroutines; open streams

	mu      sync.Mutex                      // guards the fields below
	subs    map[string]map[*subscriber]bool // by tenant
	perUser map[string]int
	total   int               // open streams
	lastID  map[string]uint64 // the last published event ID of each tenant
	closed  bool
}

const (
	maxPending   = 256 << 10       // bytes a subscriber may fall behind before it is dropped
	maxPage      = 256 << 10       // bytes of backlog read at once by a stream
	backlogTurns = 32              // pages read and written at once
	userPages    = 2               // of them for one user
	maxEventData = 64 << 10        // bytes of an event's data, as stored and sent
	writeTimeout = 5 * time.Second // a write that takes longer ends the stream
)

func newHub(db *store, log *slog.Logger, cfg config) (*hub, error) {
	seqs, err := db.sequences()
	h := &hub{
		db: db, log: log, cfg: cfg,
		inserts: make(chan *event, 1000), work: make(chan *subscriber, cfg.maxStreams), stop: make(chan struct{}),
		subs: map[string]map[*subscriber]bool{}, perUser: map[string]int{}, lastID: seqs,
	}
	h.loops.Go(func() { loop(h, h.inserts, h.commit) })
	h.loops.Go(func() { loop(h, time.NewTicker(min(5*time.Second, cfg.heartbeat/2)).C, h.sweep) })
	for range runtime.GOMAXPROCS(0) { // a writer per core: fewer writers than streams are what lets events batch
		h.loops.Go(func() { loop(h, h.work, (*subscriber).flush) })
	}
	return h, cmp.Or(err, db.join(h, cfg.cluster))
}

// loop calls f with every value from c until the hub stops.
func loop[T any](h *hub, c <-chan T, f func(T)) {
	for {
		select {
		case v := <-c:
			f(v)
		case <-h.stop:
			return
		}
	}
}

// insert commits ev durably and returns its ID.
func (h *hub) insert(ev *event) (uint64, error) {
	ev.done = make(chan error, 1)
	h.inserts <- ev
	err := <-ev.done
	return ev.ID, err
}

// commit commits ev and every insert waiting behind it in one transaction, then
// publishes them and answers their inserts.
func (h *hub) commit(ev *event) {
	evs := []*event{ev}
	for len(evs) < cap(h.inserts) && len(h.inserts) > 0 {
		evs = append(evs, <-h.inserts)
	}
	var err error
	defer func() {
		if v := recover(); v != nil { // bbolt panics on some corrupt pages: the batch fails, not the process
			err = fmt.Errorf("hub: commit: %v", v)
		}
		for _, ev := range evs {
			ev.done <- err
		}
	}()
	err = h.db.appendEvents(evs, h.publish)
}

// publish hands committed events, in ID order, to their tenants' subscribers. Each frame
// is encoded once and shared: subscribers hold references to it, not copies.
func (h *hub) publish(evs []*event) {
	frames := make([][]byte, len(evs))
	for i, ev := range evs {
		frames[i] = appendFrame(nil, ev.ID, []byte(ev.Name), ev.Data)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, ev := range evs {
		h.lastID[ev.Tenant] = ev.ID
		for s := range h.subs[ev.Tenant] {
			s.enqueue(frames[i])
		}
	}
}

// appendFrame appends the wire form of an event, as the broker-client npm parser reads it
// byte by byte: no space after the colons, LF only, one data line (data is compact ASCII
// JSON).
func appendFrame(b []byte, id uint64, name, data []byte) []byte {
	b = append(append(slices.Grow(b, len(name)+len(data)+32), "event:"...), name...)
	b = strconv.AppendUint(append(b, "\nid:"...), id, 10)
	return append(append(append(b, "\ndata:"...), data...), "\n\n"...)
}

// compactASCII validates raw as JSON and returns it compacted, with every non-ASCII
// character escaped as \uXXXX (broker-client decodes bytes as Latin-1) and "retry:"
// written "retr\u0079:" (broker-client would cut the data at that field name). Data over
// maxEventData bytes once escaped is refused.
func compactASCII(raw []byte) ([]byte, error) {
	var buf bytes.Buffer
	if len(raw) == 0 {
		raw = []byte("null")
	}
	if !utf8.Valid(raw) || json.Compact(&buf, raw) != nil {
		return nil, fmt.Errorf("%w: data must be valid JSON in UTF-8", errInvalid)
	}
	out := make([]byte, 0, min(buf.Len(), maxEventData+1))
	for b := buf.Bytes(); len(b) > 0 && len(out) <= maxEventData; {
		r, n := utf8.DecodeRune(b)
		if b = b[n:]; r < utf8.RuneSelf {
			out = append(out, byte(r))
		} else {
			for _, c := range utf16.Encode([]rune{r}) {
				out = fmt.Appendf(out, `\u%04x`, c)
			}
		}
	}
	if out = bytes.ReplaceAll(out, []byte("retry:"), []byte(`retr\u0079:`)); len(out) > maxEventData {
		return nil, fmt.Errorf("%w: data over %d bytes (non-ASCII characters count as escaped, 6 bytes each)", errTooLarge, maxEventData)
	}
	return out, nil
}

// subscriber is one open event stream.
//
// Its states, under mu:
//   - syncing: the stream's handler writes the backlog, holding queued as a writer would;
//     live frames collect in pending. When the backlog is out it calls written, like a writer.
//   - idle (!queued): enqueue (from publish, under h.mu, or the sweep) adds a frame
//     and queues s on h.work, setting queued.
//   - queued: one writer owns the write: flush takes what is pending, writes it (or hands
//     the write to a goroutine of its own) and, in written, clears queued and queues s again
//     if frames arrived meanwhile.
//   - ending: no frame is added any more. end (shutdown, HTTP/2 client gone, credentials
//     expired) writes what is pending first; dropLocked (fell behind, user revoked, moved or given
//     a new password) discards it and closes the socket at once, which fails a write in
//     progress. Whoever then sees ending calls finish: the writer after its write, or the
//     handler while syncing.
//   - finished: finish (once) removes s from the hub, closes the connection and done.
type subscriber struct {
	h            *hub
	tenant, user string              // user is "" on an admin's stream (no username is empty)
	expires      time.Time           // the credentials' expiry, on the local clock
	w            http.ResponseWriter // HTTP/2 streams are written through w; set while syncing
	done         chan struct{}       // closed once the stream has ended
	once         sync.Once

	mu        sync.Mutex  // guards the fields below
	conn      net.Conn    // the hijacked connection (HTTP/1.1), or nil
	pending   net.Buffers // frames not yet written, shared with the tenant's other streams
	size      int         // bytes in pending
	queued    bool        // syncing, on h.work or being written
	ending    bool        // end the stream once pending is written
	lastWrite time.Time
}

// subscribe registers a stream of u's tenant whose credentials expire at expires, and
// returns it with the last ID published so far: the backlog is read up to that ID and
// every later event arrives live.
func (h *hub) subscribe(u *user, expires time.Time) (*subscriber, uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, 0, &retryError{after: time.Second, error: fmt.Errorf("%w: shutting down", errBusy)}
	} else if h.total >= h.cfg.maxStreams || h.perUser[u.Username] >= h.cfg.maxUserStreams {
		return nil, 0, &retryError{after: time.Second, error: fmt.Errorf("%w: too many open streams", errTooMany)}
	}
	s := &subscriber{h: h, tenant: u.Tenant, user: u.Username, expires: expires, done: make(chan struct{}), queued: true, lastWrite: time.Now()}
	if h.subs[u.Tenant] == nil {
		h.subs[u.Tenant] = map[*subscriber]bool{}
	}
	h.subs[u.Tenant][s] = true
	h.perUser[u.Username]++
	h.total++
	h.streams.Add(1)
	return s, h.lastID[u.Tenant], nil
}

// enqueue adds a frame. A subscriber too far behind is dropped (it resumes from its last
// ID), so it can neither hold memory nor slow the others. An event larger than maxPending
// still reaches a subscriber with nothing pending.
func (s *subscriber) enqueue(frame []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ending {
		return
	} else if s.size > 0 && s.size+len(frame) > maxPending {
		s.h.log.Info("dropping a stream that does not keep up", "user", s.user, "tenant", s.tenant)
		s.dropLocked()
		return
	}
	s.pending, s.size = append(s.pending, frame), s.size+len(frame)
	s.schedule()
}

// schedule queues s for a writer unless it is queued; s.mu must be held.
func (s *subscriber) schedule() {
	if !s.queued {
		s.queued = true
		s.h.work <- s // never blocks: work has room for every stream
	}
}

// end closes the stream once what is pending has been written.
func (s *subscriber) end() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ending = true
	s.schedule()
}

// dropLocked closes the stream at once, discarding what is pending; s.mu must be held.
func (s *subscriber) dropLocked() {
	s.ending, s.pending, s.size = true, nil, 0
	s.closeConn()
	s.schedule()
}

// flush writes everything pending in one write (writev for plain TCP). A plain TCP stream
// is written by the writer itself with a short deadline; if the client's socket is full,
// or the stream is TLS or HTTP/2 (whose writes cannot resume after a timeout), the write
// finishes in a goroutine of its own, so one slow client never holds up the others.
func (s *subscriber) flush() {
	s.mu.Lock()
	bufs, ending := s.pending, s.ending
	s.pending, s.size = nil, 0
	s.mu.Unlock()
	if tcp, ok := s.conn.(*net.TCPConn); ok {
		tcp.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
		if _, err := bufs.WriteTo(tcp); !errors.Is(err, os.ErrDeadlineExceeded) {
			s.written(err, ending)
			return
		} // bufs holds what is left
	}
	go func() { s.written(s.write(bufs), ending) }()
}

// written ends the stream after an error or when it was ending, else queues what arrived
// during the write.
func (s *subscriber) written(err error, ending bool) {
	if err != nil || ending {
		s.finish()
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.queued, s.lastWrite = false, time.Now(); len(s.pending) > 0 || s.ending {
		s.schedule()
	}
}

// write writes bufs within writeTimeout. The deadline is cleared afterwards: an HTTP/2
// stream whose deadline passes is reset, even while idle.
func (s *subscriber) write(bufs net.Buffers) error {
	if s.conn != nil {
		s.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		_, err := bufs.WriteTo(s.conn)
		return err
	}
	_, err := bufs.WriteTo(deadlineWriter{s.w})
	rc := http.NewResponseController(s.w)
	if err == nil {
		err = rc.Flush()
	}
	rc.SetWriteDeadline(time.Time{})
	return err
}

// finish removes the stream from the hub and closes it.
func (s *subscriber) finish() {
	s.once.Do(func() {
		s.h.mu.Lock()
		delete(s.h.subs[s.tenant], s)
		s.h.perUser[s.user]-- // an entry per tenant and per user at most
		s.h.total--
		s.h.mu.Unlock()
		s.closeConn() // s.conn is set by the caller (the stream's handler), or before the stream was queued
		close(s.done)
		s.h.streams.Done()
	})
}

// kick ends every stream of a user at once (revoked, moved to another tenant, new password).
func (h *hub) kick(username string) {
	for _, s := range h.all() {
		if s.user == username {
			s.mu.Lock()
			s.dropLocked()
			s.mu.Unlock()
		}
	}
}

func (h *hub) all() []*subscriber {
	h.mu.Lock()
	defer h.mu.Unlock()
	var all []*subscriber
	for _, set := range h.subs {
		all = slices.AppendSeq(all, maps.Keys(set))
	}
	return all
}

// keepAlive is sent after --heartbeat of silence: a comment line without the blank line
// that would end a message. An EventSource ignores it. broker-client drops a line feed that
// is not followed by another in the same read and keeps the ":" as a harmless prefix of
// the next message; a ":\n\n" or a lone "\n" (after the previous frame's "\n\n") would
// reach its onmessage as an empty message, which breaks the usual JSON.parse.
var keepAlive = []byte(":\n")

// sweep, at now, ends streams whose credentials have expired and sends keep-alives to
// streams silent for --heartbeat. Nothing reads a hijacked stream's socket: a client that
// has gone is noticed when a keep-alive's write fails, within two heartbeats.
func (h *hub) sweep(now time.Time) {
	for _, s := range h.all() {
		s.mu.Lock()
		silent := !s.queued && now.Sub(s.lastWrite) >= h.cfg.heartbeat
		s.mu.Unlock()
		if now.After(s.expires) {
			s.end()
		} else if silent {
			s.enqueue(keepAlive)
		}
	}
}

// closeConn closes a hijacked connection's socket, beneath TLS: closing the TLS connection
// would first try to send a close_notify, which can wait on a full socket.
func (s *subscriber) closeConn() {
	if t, ok := s.conn.(interface{ NetConn() net.Conn }); ok {
		t.NetConn().Close()
	} else if s.conn != nil {
		s.conn.Close()
	}
}

// closeStreams ends every stream and refuses new ones. It returns when all have ended,
// which takes at most writeTimeout.
func (h *hub) closeStreams() {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	for _, s := range h.all() {
		s.end()
	}
	h.streams.Wait()
}

// close stops the hub's goroutines; call it after the HTTP server has stopped.
func (h *hub) close() {
	close(h.stop)
	h.loops.Wait()
}

// page writes the page of sub's backlog after the ID after (about maxPage bytes) and
// returns the ID of its last event, 0 at the end, or an error once the stream is ending.
// Pages keep a long history from holding a read transaction open during slow writes. A
// page is held while its write waits for the client, so only backlogTurns are read and
// written at once, at most userPages of them for one user, so one user's stalled streams
// cannot hold every turn; a stream that waits for a turn longer than writeTimeout ends (it
// resumes by ID).
func (s *server) page(sub *subscriber, latest bool, after, upto uint64) (last uint64, err error) {
	sub.mu.Lock()
	ending := sub.ending // dropped or ended meanwhile
	sub.mu.Unlock()
	if ending {
		return 0, errBusy
	}
	for _, turns := range []chan struct{}{s.userTurns(sub.user, s.backlogTurns, userPages), s.backlogTurns} {
		select {
		case turns <- struct{}{}:
			defer func() { <-turns }()
		case <-time.After(writeTimeout):
			return 0, errBusy
		}
	}
	var buf []byte
	err = s.db.eachEvent(sub.tenant, latest, after, upto, func(id uint64, name, data []byte) bool {
		buf, last = appendFrame(buf, id, name, data), id
		return len(buf) < maxPage
	})
	if err == nil && len(buf) > 0 {
		err = sub.write(net.Buffers{buf})
	}
	return last, err
}

// handleSSE streams the tenant's events (CONTRACT §4): the backlog (the latest event of
// every name, or everything after Last-Event-ID), then live events, with no gap and no
// duplicate between the two.
//
// With ?tenant=NAME and the admin token as "Authorization: Bearer", it streams that
// tenant's events to the admin (the console): a stream of no user, which never expires.
func (s *server) handleSSE(w http.ResponseWriter, r *http.Request) {
	q, u, exp, err := r.URL.Query(), &user{}, int64(1<<40), error(nil)
	if u.Tenant = q.Get("tenant"); q.Has("tenant") { // the admin token is never taken from the URL
		if err = s.checkAdmin(r, bearerToken(r)); err == nil && !validName(u.Tenant, false) {
			err = fmt.Errorf("%w: tenant must be 1-64 characters", errInvalid)
		}
	} else {
		if tok := q.Get("access_token"); tok != "" && r.Header.Get("Authorization") == "" {
			r.Header.Set("Authorization", "Bearer "+tok) // RFC 6750 §2.3: the browser's EventSource sends no headers
		}
		u, exp, err = s.authenticate(r)
	}
	// Last-Event-ID, or ?last_event_id=: browsers resend it on their own, so a malformed value
	// is taken as absent rather than refused.
	after, perr := strconv.ParseUint(cmp.Or(r.Header.Get("Last-Event-ID"), q.Get("last_event_id")), 10, 64)
	if err == nil {
		err = s.db.await(u.Tenant, after)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	if r.Method == http.MethodHead {
		return
	}
	// The credentials' expiry, moved from the NTP clock to the local one of the sweep.
	sub, upto, err := s.hub.subscribe(u, time.Now().Add(time.Unix(exp, 0).Sub(s.now())))
	if errors.Is(err, errBusy) {
		// Shutting down: cut without an answer, so an EventSource reconnects, to the next
		// process (it gives up for good on any answer but 200).
		panic(http.ErrAbortHandler)
	} else if err != nil {
		s.fail(w, r, err)
		return
	}
	live := false
	defer func() { // on every way out before the stream is live, a panic included
		if !live {
			sub.finish()
		}
	}()
	// u is read again now that its stream is registered: a revocation, tenant move or new
	// password committed while the request was authenticated is seen here, and one
	// committed later ends the registered stream (hub.kick).
	if cur, err := s.db.getUser(u.Username); u.Username != "" && (err != nil || cur.Revoked || cur.Tenant != u.Tenant || cur.NotBefore != u.NotBefore || cur.Hash != u.Hash) {
		s.fail(w, r, errBadToken)
		return
	}
	// HTTP/1.1 without chunks: the body ends when the connection does (net/http adds
	// Connection: close; HTTP/2 drops the header).
	h.Set("Transfer-Encoding", "identity")
	w.WriteHeader(http.StatusOK)
	if hj, ok := w.(http.Hijacker); ok && r.ProtoMajor == 1 {
		conn, _, err := hj.Hijack() // sends the header
		if err != nil {
			return
		}
		sub.mu.Lock()
		sub.conn = conn
		sub.mu.Unlock()
	} else {
		sub.w = w
		http.NewResponseController(w).Flush()
	}
	latest := perr != nil || after > upto
	if latest {
		after = 0
	}
	for {
		if after, err = s.page(sub, latest, after, upto); err != nil {
			return
		} else if after == 0 {
			break
		}
	}
	live = true
	sub.written(nil, false) // the backlog is out: live frames follow
	// An HTTP/2 stream lives as long as this handler: it ends with the client's request.
	if sub.conn == nil {
		stop := context.AfterFunc(r.Context(), sub.end)
		<-sub.done
		stop()
	}
}
