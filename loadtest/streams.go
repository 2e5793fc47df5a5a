package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// stream is one subscriber: GET /sse on a connection of its own, read by a goroutine of its
// own, as browsers hold them.
type stream struct {
	mu     sync.Mutex
	conn   net.Conn // nil until dialled
	closed bool     // set by streams.close: a connection dialled later is closed at once

	// Only the stream's goroutine touches these until it has ended.
	opened bool // the handshake succeeded: the stream expects every event
	tally  tally
}

// attach records the stream's connection, unless the streams are being closed.
func (st *stream) attach(conn net.Conn) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return false
	}
	st.conn = conn
	return true
}

// close ends the stream with a reset (SO_LINGER 0) rather than a FIN, so no local port stays
// in TIME_WAIT for the next run; its goroutine's read then fails.
func (st *stream) close() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.closed = true
	if st.conn == nil {
		return
	}
	if tcp, ok := st.conn.(*net.TCPConn); ok {
		tcp.SetLinger(0)
	}
	st.conn.Close()
}

var errClosing = errors.New("closing")

// streams are the subscribers of a run, all signed in as its account.
type streams struct {
	t              target
	jwt            string
	srcIPs         []net.IP // the source address of stream i is srcIPs[i%len]; nil: the kernel's choice
	connectTimeout time.Duration
	readBuf        int
	events         int // inserts the run makes: the room reserved for each stream's latencies

	list     []*stream
	wg       sync.WaitGroup // one per stream goroutine
	closing  atomic.Bool
	accepted atomic.Int64 // events accepted by all the streams so far
	dropped  atomic.Int64 // open streams that ended before close
	errs     *errorCounts
}

// newStreams prepares streams to t for cfg. Against IPv4 loopback they come from
// cfg.srcIPs source addresses 127.0.0.1, 127.0.0.2 ..., each with its own range of about
// 28,000 local ports, so neither a large run nor ports left from the last one run out.
func newStreams(t target, jwt string, cfg *config, errs *errorCounts) *streams {
	s := &streams{t: t, jwt: jwt, connectTimeout: cfg.connectTimeout, readBuf: cfg.readBuf,
		events: cfg.events, errs: errs, srcIPs: []net.IP{nil}}
	if t.ip.To4() != nil && cfg.srcIPs > 0 {
		s.srcIPs = nil
		for i := 1; i <= cfg.srcIPs; i++ {
			s.srcIPs = append(s.srcIPs, net.IPv4(127, 0, 0, byte(i)))
		}
	}
	return s
}

// open starts n streams, at most conc handshakes at once, and returns when each of them is
// open or has failed, or when ctx ends (the streams not open by then count as failed).
// progress, every 2 s, says how far it got.
func (s *streams) open(ctx context.Context, n, conc int, progress func(open, failed int)) (opened, failed int) {
	ctx, cancel := context.WithCancel(ctx) // ends the dials in progress when open returns
	defer cancel()
	results := make(chan error, n) // buffered: a stream never waits for open to read its result
	turns := make(chan struct{}, conc)
	for i := range n {
		st := &stream{}
		s.list = append(s.list, st)
		src := s.srcIPs[i%len(s.srcIPs)]
		s.wg.Go(func() { s.run(ctx, st, src, turns, results) })
	}
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for opened+failed < n {
		select {
		case err := <-results:
			if err != nil {
				failed++
				s.errs.add("stream: " + errKind(err))
			} else {
				opened++
			}
		case <-tick.C:
			progress(opened, failed)
		case <-ctx.Done():
			return opened, n - opened
		}
	}
	return opened, failed
}

// run opens one stream, sends open's result and then reads the stream until it ends.
func (s *streams) run(ctx context.Context, st *stream, src net.IP, turns chan struct{}, results chan<- error) {
	select {
	case turns <- struct{}{}:
	case <-ctx.Done():
		results <- ctx.Err()
		return
	}
	body, err := s.handshake(ctx, st, src)
	<-turns
	results <- err
	if err != nil {
		return
	}
	st.opened = true
	st.tally.latencies = make([]time.Duration, 0, s.events)
	fr := newFrameReader(body, s.readBuf)
	for {
		f, err := fr.next()
		if err != nil {
			if !s.closing.Load() {
				s.dropped.Add(1)
				s.errs.add("stream ended: " + errKind(err))
			}
			return
		}
		if st.tally.add(f, time.Now()) {
			s.accepted.Add(1)
		}
	}
}

// handshake dials from src, sends GET /sse and reads the answer's header, within
// connectTimeout, and returns the body: the frames. broker registers a stream before it
// answers, so once the header is here the stream gets every later event.
func (s *streams) handshake(ctx context.Context, st *stream, src net.IP) (io.Reader, error) {
	d := net.Dialer{Timeout: s.connectTimeout}
	if src != nil {
		d.LocalAddr = &net.TCPAddr{IP: src}
	}
	conn, err := d.DialContext(ctx, "tcp", s.t.addr)
	if err != nil {
		return nil, err
	}
	if !st.attach(conn) {
		conn.Close()
		return nil, errClosing
	}
	conn.SetDeadline(time.Now().Add(s.connectTimeout))
	req, err := http.NewRequest(http.MethodGet, s.t.base+"/sse", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+s.jwt)
	req.Header.Set("Accept", "text/event-stream")
	if err := req.Write(conn); err != nil {
		return nil, err
	}
	// A small buffer for the header only: frames are read through the body into the
	// frameReader's own buffer, so 20,000 streams do not hold two large buffers each.
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 1024), req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, &statusError{resp.StatusCode}
	}
	return resp.Body, conn.SetDeadline(time.Time{})
}

// close ends every stream and waits, at most limit, for their goroutines. Only when it
// returns nil may the tallies be read.
func (s *streams) close(limit time.Duration) error {
	s.closing.Store(true)
	for _, st := range s.list {
		st.close()
	}
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-time.After(limit):
		return fmt.Errorf("streams still running %s after they were closed", limit)
	}
}
