package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
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
// sweep every few seconds sends heartbeats and finds clients that have gone.
type hub struct {
	db                         *store
	log                        *slog.Logger
	maxStreams, maxUserStreams int
	inserts                    chan *commitReq
	work                       chan *subscriber // subscribers with something to write, each once
	stop                       chan struct{}
	loops, streams             sync.WaitGroup // the hub's goroutines; open streams

	mu      sync.Mutex                      // guards the fields below
	subs    map[string]map[*subscriber]bool // by tenant
	perUser map[string]int
	lastID  map[string]uint64 // the last published event ID of each tenant
	closed  bool
}

const (
	maxPending   = 256 << 10        // bytes a subscriber may fall behind before it is dropped
	writeTimeout = 5 * time.Second  // a write that takes longer ends the stream
	heartbeat    = 30 * time.Second // silence after which a comment line is sent
)

type commitReq struct {
	ev   *event
	done chan error
}

func newHub(db *store, log *slog.Logger, maxStreams, maxUserStreams int) (*hub, error) {
	seqs, err := db.sequences()
	h := &hub{
		db: db, log: log, maxStreams: maxStreams, maxUserStreams: maxUserStreams,
		inserts: make(chan *commitReq, 1000), work: make(chan *subscriber, maxStreams), stop: make(chan struct{}),
		subs: map[string]map[*subscriber]bool{}, perUser: map[string]int{}, lastID: seqs,
	}
	// A writer per core: fewer writers than streams are what lets events batch.
	writers := runtime.GOMAXPROCS(0)
	h.loops.Add(writers + 2)
	go loop(h, h.inserts, h.commit)
	go loop(h, time.NewTicker(5*time.Second).C, h.sweep)
	for range writers {
		go loop(h, h.work, (*subscriber).flush)
	}
	return h, err
}

// loop calls f with every value from c until the hub stops.
func loop[T any](h *hub, c <-chan T, f func(T)) {
	defer h.loops.Done()
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
	req := &commitReq{ev: ev, done: make(chan error, 1)}
	h.inserts <- req
	return ev.ID, <-req.done
}

// commit commits req and every insert waiting behind it in one transaction, then
// publishes them and answers their requests.
func (h *hub) commit(req *commitReq) {
	batch := []*commitReq{req}
	for len(batch) < cap(h.inserts) && len(h.inserts) > 0 {
		batch = append(batch, <-h.inserts)
	}
	evs := make([]*event, len(batch))
	for i, req := range batch {
		evs[i] = req.ev
	}
	err := h.db.appendEvents(evs)
	if err == nil {
		h.publish(evs)
	}
	for _, req := range batch {
		req.done <- err
	}
}

// publish hands committed events, in ID order, to their tenants' subscribers.
func (h *hub) publish(evs []*event) {
	frames := make([][]byte, len(evs))
	for i, ev := range evs {
		frames[i] = frame(ev)
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

// frame is the wire form of ev, as the broker-client npm parser reads it byte by byte:
// no space after the colons, LF only, one data line (ev.Data is compact ASCII JSON).
func frame(ev *event) []byte {
	b := append(append(make([]byte, 0, len(ev.Name)+len(ev.Data)+32), "event:"...), ev.Name...)
	b = strconv.AppendUint(append(b, "\nid:"...), ev.ID, 10)
	return append(append(append(b, "\ndata:"...), ev.Data...), "\n\n"...)
}

// compactASCII validates raw as JSON and returns it compacted, with every non-ASCII
// character escaped as \uXXXX (broker-client decodes bytes as Latin-1) and "retry:"
// written "retr\u0079:" (broker-client would cut the data at that field name).
func compactASCII(raw []byte) ([]byte, error) {
	var buf bytes.Buffer
	if len(raw) == 0 {
		raw = []byte("null")
	}
	if !utf8.Valid(raw) || json.Compact(&buf, raw) != nil {
		return nil, fmt.Errorf("%w: data must be valid JSON in UTF-8", errInvalid)
	}
	out := make([]byte, 0, buf.Len())
	for _, r := range buf.String() {
		if r < utf8.RuneSelf {
			out = append(out, byte(r))
			continue
		}
		for _, c := range utf16.Encode([]rune{r}) {
			out = fmt.Appendf(out, `\u%04x`, c)
		}
	}
	return bytes.ReplaceAll(out, []byte("retry:"), []byte(`retr\u0079:`)), nil
}

// subscriber is one open event stream.
type subscriber struct {
	h            *hub
	tenant, user string
	conn         net.Conn            // the hijacked connection (HTTP/1.1), or nil
	w            http.ResponseWriter // otherwise the stream is written through w (HTTP/2)
	done         chan struct{}       // closed once the stream has ended
	once         sync.Once

	mu        sync.Mutex // guards the fields below
	pending   []byte     // frames not yet written
	ready     bool       // the backlog is written: live frames may follow
	queued    bool       // on h.work or being written
	ending    bool       // end the stream once pending is written
	lastWrite time.Time
}

// subscribe registers a stream of u's tenant and returns it with the last ID published
// so far: the backlog is read up to that ID and every later event arrives live.
func (h *hub) subscribe(u *user) (*subscriber, uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	total := 0
	for _, set := range h.subs {
		total += len(set)
	}
	if h.closed {
		return nil, 0, &retryError{after: time.Second, msg: "shutting down"}
	} else if total >= h.maxStreams || h.perUser[u.Username] >= h.maxUserStreams {
		return nil, 0, &retryError{after: time.Second, msg: "too many open streams"}
	}
	s := &subscriber{h: h, tenant: u.Tenant, user: u.Username, done: make(chan struct{})}
	if h.subs[u.Tenant] == nil {
		h.subs[u.Tenant] = map[*subscriber]bool{}
	}
	h.subs[u.Tenant][s] = true
	h.perUser[u.Username]++
	h.streams.Add(1)
	return s, h.lastID[u.Tenant], nil
}

// enqueue appends a frame. A subscriber too far behind is dropped (it resumes from its
// last ID), so it can neither hold memory nor slow the others.
func (s *subscriber) enqueue(frame []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ending {
		return
	}
	if s.ending = len(s.pending) > 0 && len(s.pending)+len(frame) > maxPending; s.ending {
		s.h.log.Info("dropping a stream that does not keep up", "user", s.user, "tenant", s.tenant)
		s.pending = nil
		if s.conn != nil {
			s.conn.Close() // at once: a write stalled on the full socket fails and frees its goroutine
		}
	} else {
		s.pending = append(s.pending, frame...)
	}
	s.schedule()
}

// schedule queues s for a writer unless it is queued; s.mu must be held.
func (s *subscriber) schedule() {
	if s.ready && !s.queued {
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

// flush writes everything pending in one write. A plain TCP stream is written by the
// writer itself with a short deadline; if the client's socket is full, or the stream is TLS
// or HTTP/2 (whose writes cannot resume after a timeout), the write finishes in a goroutine
// of its own, so one slow client never holds up the others.
func (s *subscriber) flush() {
	s.mu.Lock()
	buf, ending := s.pending, s.ending
	s.pending, s.lastWrite = nil, time.Now()
	s.mu.Unlock()
	if tcp, ok := s.conn.(*net.TCPConn); ok {
		tcp.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
		n, err := tcp.Write(buf)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			s.written(err, ending)
			return
		}
		buf = buf[n:]
	}
	go func() { s.written(s.write(buf), ending) }()
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
	if s.queued = false; len(s.pending) > 0 || s.ending {
		s.schedule()
	}
}

func (s *subscriber) write(b []byte) error {
	if s.conn != nil {
		s.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		_, err := s.conn.Write(b)
		return err
	}
	rc := http.NewResponseController(s.w)
	rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := s.w.Write(b); err != nil {
		return err
	}
	return rc.Flush()
}

// finish removes the stream from the hub and closes it.
func (s *subscriber) finish() {
	s.once.Do(func() {
		h := s.h
		h.mu.Lock()
		if delete(h.subs[s.tenant], s); len(h.subs[s.tenant]) == 0 {
			delete(h.subs, s.tenant)
		}
		if h.perUser[s.user]--; h.perUser[s.user] == 0 {
			delete(h.perUser, s.user)
		}
		h.mu.Unlock()
		if s.conn != nil {
			s.conn.Close()
		}
		close(s.done)
		h.streams.Done()
	})
}

// kick ends every stream of a user (revoked, moved to another tenant, new password).
func (h *hub) kick(username string) {
	for _, s := range h.all() {
		if s.user == username {
			s.end()
		}
	}
}

func (h *hub) all() []*subscriber {
	h.mu.Lock()
	defer h.mu.Unlock()
	var all []*subscriber
	for _, set := range h.subs {
		for s := range set {
			all = append(all, s)
		}
	}
	return all
}

// sweep sends the heartbeat comment to streams silent for 30 s at now and ends hijacked
// streams whose client has gone (nothing else reads those sockets).
func (h *hub) sweep(now time.Time) {
	for _, s := range h.all() {
		s.mu.Lock()
		silent := s.ready && now.Sub(s.lastWrite) >= heartbeat
		s.mu.Unlock()
		if s.conn != nil && peerClosed(s.conn) {
			s.end()
		} else if silent {
			s.enqueue([]byte(":\n\n"))
		}
	}
}

// peerClosed peeks at the socket without blocking: end of file means the client has gone.
func peerClosed(c net.Conn) bool {
	if t, ok := c.(interface{ NetConn() net.Conn }); ok {
		c = t.NetConn() // TLS: look at the TCP socket beneath
	}
	raw, err := c.(syscall.Conn).SyscallConn()
	closed := err != nil
	if err == nil {
		raw.Read(func(fd uintptr) bool {
			n, _, err := syscall.Recvfrom(int(fd), make([]byte, 1), syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			closed = n == 0 && err == nil || err != nil && err != syscall.EAGAIN && err != syscall.EINTR
			return true
		})
	}
	return closed
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

// handleSSE streams the tenant's events (CONTRACT §4): the backlog (the latest event of
// every name, or everything after Last-Event-ID), then live events, with no gap and no
// duplicate between the two.
func (s *server) handleSSE(w http.ResponseWriter, r *http.Request) {
	u, _, err := s.authenticate(r)
	var sub *subscriber
	var upto uint64
	if err == nil && r.Method == http.MethodGet {
		sub, upto, err = s.hub.subscribe(u)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	if sub == nil { // HEAD
		return
	}
	buf := &bytes.Buffer{}
	if hj, ok := w.(http.Hijacker); ok && r.ProtoMajor == 1 {
		if sub.conn, _, err = hj.Hijack(); err != nil {
			sub.finish()
			return
		}
		h.Set("Connection", "close") // the body ends when the connection does
		buf.WriteString("HTTP/1.1 200 OK\r\n")
		h.Write(buf)
		buf.WriteString("\r\n")
	} else {
		sub.w = w
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
	}
	after, resume := lastEventID(r)
	for resume = resume && after <= upto; ; {
		// In pages, so a long history neither holds a read transaction open during slow
		// writes nor fills memory.
		evs, err := s.db.readEvents(sub.tenant, resume, after, upto, 1000)
		for _, ev := range evs {
			buf.Write(frame(ev))
		}
		if err == nil {
			err = sub.write(buf.Bytes())
		}
		if err != nil {
			sub.finish()
			return
		}
		if buf.Reset(); !resume || len(evs) < 1000 {
			break
		}
		after = evs[len(evs)-1].ID
	}
	sub.mu.Lock()
	sub.ready, sub.lastWrite = true, time.Now()
	sub.schedule()
	sub.mu.Unlock()
	if sub.conn == nil {
		select {
		case <-sub.done:
		case <-r.Context().Done():
			sub.end()
			<-sub.done
		}
	}
}

// lastEventID reads Last-Event-ID (or ?last_event_id=). Browsers resend the header on their
// own, so a malformed value is treated as absent rather than refused.
func lastEventID(r *http.Request) (uint64, bool) {
	v := r.Header.Get("Last-Event-ID")
	if v == "" {
		v = r.URL.Query().Get("last_event_id")
	}
	id, err := strconv.ParseUint(v, 10, 64)
	return id, err == nil
}
