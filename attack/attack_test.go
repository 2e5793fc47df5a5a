package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestParseStatusLine(t *testing.T) {
	if got, err := parseStatusLine("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"); err != nil || got != 429 {
		t.Errorf("parseStatusLine = %d, %v", got, err)
	}
	if _, err := parseStatusLine("event:x\nid:1\n"); err == nil {
		t.Error("parseStatusLine accepted an event frame")
	}
}

func TestJSONString(t *testing.T) {
	for _, n := range []int{2, 3, 61440} {
		b := jsonString(n)
		var s string
		if len(b) != n || json.Unmarshal(b, &s) != nil || len(s) != n-2 {
			t.Errorf("jsonString(%d): %d bytes, %q", n, len(b), b[:min(len(b), 10)])
		}
	}
	body := insertBody("big", jsonString(10))
	var v struct{ Event, Data string }
	if err := json.Unmarshal(body, &v); err != nil || v.Event != "big" || len(v.Data) != 8 {
		t.Errorf("insertBody = %s (%v)", body, err)
	}
}

func TestRandomPrintable(t *testing.T) {
	s := randomPrintable(1024)
	if len(s) != 1024 {
		t.Fatalf("len = %d", len(s))
	}
	for _, c := range []byte(s) {
		if c < ' ' || c > '~' {
			t.Fatalf("non-printable byte %#x", c)
		}
	}
}

func TestCounter(t *testing.T) {
	var c counter
	if c.String() != "none" {
		t.Errorf("empty counter = %q", c.String())
	}
	c.add(200, nil)
	c.add(413, nil)
	c.add(413, nil)
	c.add(0, fmt.Errorf("post: %w", syscall.ECONNRESET))
	c.add(0, context.DeadlineExceeded)
	if got, want := c.String(), "200:1 413:2 reset:1 timeout:1"; got != want {
		t.Errorf("counter = %q, want %q", got, want)
	}
	if c.get("413") != 2 || c.others("200", "413") != 2 {
		t.Errorf("get/others: %d %d", c.get("413"), c.others("200", "413"))
	}
}

func TestErrKind(t *testing.T) {
	for err, want := range map[error]string{
		io.ErrUnexpectedEOF:                "eof",
		fmt.Errorf("x: %w", syscall.EPIPE): "reset",
		syscall.ECONNREFUSED:               "refused",
		os.ErrDeadlineExceeded:             "timeout",
		context.Canceled:                   "canceled",
		errors.New("odd"):                  "error",
	} {
		if got := errKind(err); got != want {
			t.Errorf("errKind(%v) = %q, want %q", err, got, want)
		}
	}
}

func TestParallel(t *testing.T) {
	var calls atomic.Int32
	if n := parallel(context.Background(), 100, 7, func(int) { calls.Add(1) }); n != 100 || calls.Load() != 100 {
		t.Errorf("parallel: started %d, called %d", n, calls.Load())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	n := parallel(ctx, 1_000_000, 4, func(int) { time.Sleep(10 * time.Millisecond) })
	if n >= 1000 {
		t.Errorf("parallel did not stop at the deadline: %d started", n)
	}
}

func TestMaxDuration(t *testing.T) {
	var m maxDuration
	for _, d := range []time.Duration{3, 9, 2} {
		m.add(d * time.Millisecond)
	}
	if m.ms() != 9 {
		t.Errorf("max = %d ms", m.ms())
	}
}

func TestSelectAttacks(t *testing.T) {
	all, err := selectAttacks("")
	if err != nil || len(all) != len(attacks) {
		t.Errorf("all: %d, %v", len(all), err)
	}
	two, err := selectAttacks("scopes, backlog")
	if err != nil || len(two) != 2 || two[0].name != "scopes" || two[1].name != "backlog" {
		t.Errorf("two: %v, %v", two, err)
	}
	if _, err := selectAttacks("backlog,nope"); err == nil {
		t.Error("unknown attack accepted")
	}
}

func TestLoopbackBase(t *testing.T) {
	if got, err := loopbackBase("http://127.0.0.1:8080/"); err != nil || got != "http://127.0.0.1:8080" {
		t.Errorf("loopbackBase = %q, %v", got, err)
	}
	for _, bad := range []string{"http://192.0.2.1:8080", "https://127.0.0.1", "127.0.0.1:8080"} {
		if _, err := loopbackBase(bad); err == nil {
			t.Errorf("loopbackBase(%q) accepted", bad)
		}
	}
}
