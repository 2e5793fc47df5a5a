package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
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
// them in ID order. Publishing never waits for a client: it appends the encoded frame to
// each subscriber's bounded buffer and queues the subscriber for a small pool of writer
// goroutines. HTTP/1.1 streams are hijacked, so an idle stream costs no goroutine and no
// net/http buffers, only its socket and a subscriber; a heartbeat sweep finds idle and
// dead ones.
type hub struct {
	db      *store
	log     *slog.Logger
	inserts chan *commitReq
	work    chan *subscriber // subscribers with something to do, each queued at most once
	stop    chan struct{}
	loops   sync.WaitGroup // committer, writers and heartbeat
	streams sync.WaitGroup // open streams

	maxStreams, maxUserStreams int

	mu      sync.Mutex                          // guards the fields below
	subs    map[string]map[*subscriber]struct{} // by tenant
	perUser map[string]int
	lastID  map[string]uint64 // last published event ID of each tenant
	closed  bool
}

const (
	maxPending   = 256 << 10        // bytes a subscriber may lag behind before it is dropped
	writeTimeout = 5 * time.Second  // a write that takes longer ends the stream
	heartbeat    = 30 * time.Second // silence after which a comment line is sent
	sweepEvery   = 5 * time.Second
	writers      = 32
)

type commitReq struct {
	ev   *event
	done chan error
}

func newHub(db *store, log *slog.Logger, maxStreams, maxUserStreams int) (*hub, error) {
	seqs, err := db.sequences()
	if err != nil {
		return nil, err
	}
	h := &hub{
		db: db, log: log, inserts: make(chan *commitReq), work: make(chan *subscriber, maxStreams),
		stop: make(chan struct{}), maxStreams: maxStreams, maxUserStreams: maxUserStreams,
		subs: map[string]map[*subscriber]struct{}{}, perUser: map[string]int{}, lastID: seqs,
	}
	h.loops.Add(writers + 2)
	go h.commitLoop()
	go h.sweepLoop()
	for range writers {
		go h.writeLoop()
	}
	return h, nil
}

// insert commits ev durably and returns its ID.
func (h *hub) insert(ev *event) (uint64, error) {
	req := &commitReq{ev: ev, done: make(chan error, 1)}
	select {
	case h.inserts <- req:
	case <-h.stop:
		return 0, errors.New("hub: stopped")
	}
	return ev.ID, <-req.done
}

func (h *hub) commitLoop() {
	defer h.loops.Done()
	for {
		var batch []*commitReq
		select {
		case req := <-h.inserts:
			batch = append(batch, req)
		case <-h.stop:
			return
		}
	gather:
		for len(batch) < 1000 {
			select {
			case req := <-h.inserts:
				batch = append(batch, req)
			default:
				break gather
			}
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
}

// publish hands committed events, in ID order, to their tenants' subscribers. Each event is
// encoded once; subscribers share the frame.
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

// frame is the wire form of ev that the broker-client npm parser reads byte by byte: no
// space after the colons, LF only, one data line (Data is compact JSON in ASCII).
func frame(ev *event) []byte {
	b := make([]byte, 0, len(ev.Name)+len(ev.Data)+32)
	b = append(append(b, "event:"...), ev.Name...)
	b = strconv.AppendUint(append(b, "\nid:"...), ev.ID, 10)
	b = append(append(b, "\ndata:"...), ev.Data...)
	return append(b, "\n\n"...)
}

// compactASCII validates raw as JSON and returns it compacted with every non-ASCII
// character escaped as \uXXXX (broker-client decodes bytes as Latin-1) and "retry:"
// written as "retr\u0079:" (broker-client would cut the data at that field name).
func compactASCII(raw []byte) ([]byte, error) {
	if len(raw) == 0 {
		return []byte("null"), nil
	}
	var buf bytes.Buffer
	if !utf8.Valid(raw) || json.Compact(&buf, raw) != nil {
		return nil, fmt.Errorf("%w: data must be valid JSON in UTF-8", errInvalid)
	}
	out := make([]byte, 0, buf.Len())
	for _, r := range buf.String() {
		switch {
		case r < utf8.RuneSelf:
			out = append(out, byte(r))
		case r > 0xFFFF:
			r1, r2 := utf16.EncodeRune(r)
			out = fmt.Appendf(out, `\u%04x\u%04x`, r1, r2)
		default:
			out = fmt.Appendf(out, `\u%04x`, r)
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
	ready     bool       // the backlog is written, live frames may follow
	queued    bool       // on h.work or being written
	ending    bool       // end the stream once pending is written
	lastWrite time.Time
}

// subscribe registers a stream of u's tenant and returns it with the last ID published
// so far: the backlog is read up to that ID and every later event arrives live.
func (h *hub) subscribe(u *user) (*subscriber, uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, 0, fmt.Errorf("%w: shutting down", errTooMany)
	}
	total := 0
	for _, set := range h.subs {
		total += len(set)
	}
	if total >= h.maxStreams || h.perUser[u.Username] >= h.maxUserStreams {
		return nil, 0, fmt.Errorf("%w: too many open streams", errTooMany)
	}
	s := &subscriber{h: h, tenant: u.Tenant, user: u.Username, done: make(chan struct{})}
	if h.subs[u.Tenant] == nil {
		h.subs[u.Tenant] = map[*subscriber]struct{}{}
	}
	h.subs[u.Tenant][s] = struct{}{}
	h.perUser[u.Username]++
	h.streams.Add(1)
	return s, h.lastID[u.Tenant], nil
}

// enqueue appends a frame; a subscriber too far behind is dropped (it resumes from its
// last ID) so it cannot hold memory or slow the others.
func (s *subscriber) enqueue(frame []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ending {
		return
	}
	if len(s.pending)+len(frame) > maxPending {
		s.h.log.Info("dropping slow stream", "user", s.user, "tenant", s.tenant)
		s.pending, s.ending = nil, true
	} else {
		s.pending = append(s.pending, frame...)
	}
	s.scheduleLocked()
}

func (s *subscriber) scheduleLocked() {
	if s.ready && !s.queued {
		s.queued = true
		s.h.work <- s // never blocks: work has room for every subscriber
	}
}

// end closes the stream after what is pending has been written.
func (s *subscriber) end() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ending = true
	s.scheduleLocked()
}

// start lets live frames flow once the backlog has been written.
func (s *subscriber) start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ready, s.lastWrite = true, time.Now()
	if len(s.pending) > 0 || s.ending {
		s.scheduleLocked()
	}
}

func (h *hub) writeLoop() {
	defer h.loops.Done()
	for {
		select {
		case s := <-h.work:
			s.flush()
		case <-h.stop:
			return
		}
	}
}

// flush writes everything pending in one write (a backlog goes out in one flush).
func (s *subscriber) flush() {
	s.mu.Lock()
	buf, ending := s.pending, s.ending
	s.pending = nil
	s.mu.Unlock()
	var err error
	if len(buf) > 0 {
		err = s.write(buf)
	}
	if err != nil || ending {
		s.finish()
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queued, s.lastWrite = false, time.Now()
	if len(s.pending) > 0 || s.ending {
		s.scheduleLocked()
	}
}

func (s *subscriber) write(b []byte) error {
	deadline := time.Now().Add(writeTimeout)
	if s.conn != nil {
		s.conn.SetWriteDeadline(deadline)
		_, err := s.conn.Write(b)
		return err
	}
	rc := http.NewResponseController(s.w)
	rc.SetWriteDeadline(deadline)
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
		delete(h.subs[s.tenant], s)
		if len(h.subs[s.tenant]) == 0 {
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

// sweepLoop runs sweep every few seconds.
func (h *hub) sweepLoop() {
	defer h.loops.Done()
	t := time.NewTicker(sweepEvery)
	defer t.Stop()
	for {
		select {
		case now := <-t.C:
			h.sweep(now)
		case <-h.stop:
			return
		}
	}
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

// peerClosed peeks at the socket without blocking: end of file means the client is gone.
func peerClosed(c net.Conn) bool {
	if t, ok := c.(interface{ NetConn() net.Conn }); ok {
		c = t.NetConn() // TLS: look at the TCP socket beneath
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	closed := false
	raw.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = (n == 0 && err == nil) || (err != nil && err != syscall.EAGAIN && err != syscall.EINTR)
		return true
	})
	return closed
}

// closeStreams ends every stream and refuses new ones, waiting until ctx is done at most.
func (h *hub) closeStreams(ctx context.Context) {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	for _, s := range h.all() {
		s.end()
	}
	done := make(chan struct{})
	go func() { h.streams.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// close stops the hub's goroutines; call it after the HTTP server has stopped.
func (h *hub) close() {
	close(h.stop)
	h.loops.Wait()
}

// handleSSE streams the tenant's events (CONTRACT §4): the backlog (latest event of every
// name, or everything after Last-Event-ID), then live events, without gap or duplicate.
func (s *server) handleSSE(w http.ResponseWriter, r *http.Request) {
	u, err := s.authenticate(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if r.Method == http.MethodHead {
		w.Header().Set("Content-Type", "text/event-stream")
		return
	}
	after, resume := lastEventID(r)
	sub, upto, err := s.hub.subscribe(u)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	var head []byte
	if hj, ok := w.(http.Hijacker); ok && r.ProtoMajor == 1 {
		if sub.conn, _, err = hj.Hijack(); err != nil {
			sub.finish()
			s.log.Error("sse: hijack", "err", err)
			return
		}
		h.Set("Connection", "close") // the body ends when the connection does
		buf := bytes.NewBufferString("HTTP/1.1 200 OK\r\n")
		h.Write(buf)
		head = append(buf.Bytes(), "\r\n"...)
	} else {
		sub.w = w
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
	}
	if err := s.writeBacklog(sub, head, after, upto, resume && after <= upto); err != nil {
		sub.finish()
		return
	}
	sub.start()
	if sub.conn == nil {
		select {
		case <-sub.done:
		case <-r.Context().Done():
			sub.end()
			<-sub.done
		}
	}
}

// writeBacklog writes head and the events the stream starts with, in pages, so a long
// history neither holds a read transaction open during slow writes nor fills memory.
func (s *server) writeBacklog(sub *subscriber, head []byte, after, upto uint64, resume bool) error {
	buf := head
	for {
		var evs []*event
		var err error
		if resume {
			evs, err = s.db.eventsAfter(sub.tenant, after, upto, 1000)
		} else {
			evs, err = s.db.latestEvents(sub.tenant, upto)
		}
		if err != nil {
			s.log.Error("sse: read backlog", "err", err)
			return err
		}
		for _, ev := range evs {
			buf = append(buf, frame(ev)...)
		}
		if len(buf) > 0 {
			if err := sub.write(buf); err != nil {
				return err
			}
		}
		if !resume || len(evs) < 1000 {
			return nil
		}
		buf, after = buf[:0], evs[len(evs)-1].ID
	}
}

// lastEventID reads Last-Event-ID (or ?last_event_id=). Browsers resend the header on their
// own, so a malformed value is treated as absent rather than refused.
func lastEventID(r *http.Request) (uint64, bool) {
	v := r.Header.Get("Last-Event-ID")
	if v == "" {
		v = r.URL.Query().Get("last_event_id")
	}
	if len(v) == 0 || len(v) > 20 || v[0] < '0' || v[0] > '9' {
		return 0, false
	}
	id, err := strconv.ParseUint(v, 10, 64)
	return id, err == nil
}
