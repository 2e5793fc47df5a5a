package main

import (
	"fmt"
	"testing"
	"time"
)

// event is a frame as broker sends the publisher's event id, stamped at sent.
func event(id uint64, sent time.Time) frame {
	return frame{name: []byte("bench"), id: fmt.Appendf(nil, "%d", id), data: fmt.Appendf(nil, `{"ts":%d}`, sent.UnixNano())}
}

func TestTallyInOrder(t *testing.T) {
	var tl tally
	sent := time.Unix(1_700_000_000, 0)
	for id := uint64(1); id <= 5; id++ {
		if !tl.add(event(id, sent), sent.Add(time.Duration(id)*time.Millisecond)) {
			t.Fatalf("event %d not accepted", id)
		}
	}
	if tl.received != 5 || tl.skipped != 0 || tl.repeated != 0 || tl.missing(5) != 0 {
		t.Fatalf("tally %+v, missing %d", tl, tl.missing(5))
	}
	if tl.latencies[0] != time.Millisecond || tl.latencies[4] != 5*time.Millisecond {
		t.Errorf("latencies %v", tl.latencies)
	}
	if tl.missing(8) != 3 {
		t.Errorf("missing(8) = %d, want 3 (6, 7 and 8 never came)", tl.missing(8))
	}
}

func TestTallyGapsAndDuplicates(t *testing.T) {
	var tl tally
	now := time.Now()
	for _, id := range []uint64{2, 3, 3, 6, 4, 7} { // 1 lost, 3 repeated, 4 and 5 skipped, 4 late
		tl.add(event(id, now), now)
	}
	if tl.received != 4 || tl.skipped != 3 || tl.repeated != 2 {
		t.Fatalf("received %d skipped %d repeated %d; want 4, 3, 2", tl.received, tl.skipped, tl.repeated)
	}
	if got := tl.missing(9); got != 5 {
		t.Errorf("missing(9) = %d, want 5 (1, 4, 5, 8, 9)", got)
	}
}

func TestTallyMalformed(t *testing.T) {
	var tl tally
	now := time.Now()
	bad := []frame{
		{id: []byte("x1"), data: []byte(`{"ts":1}`)},
		{id: nil, data: []byte(`{"ts":1}`)},
		{id: []byte("1"), data: []byte(`{"other":1}`)},
		{id: []byte("1"), data: []byte(`{"ts":"1"}`)},
		{id: []byte("99999999999999999999"), data: []byte(`{"ts":1}`)},
	}
	for _, f := range bad {
		if tl.add(f, now) {
			t.Errorf("accepted %q %q", f.id, f.data)
		}
	}
	if tl.malformed != int64(len(bad)) || tl.received != 0 || tl.missing(2) != 2 {
		t.Errorf("tally %+v", tl)
	}
}

func TestStamp(t *testing.T) {
	for data, want := range map[string]int64{
		`{"ts":1700000000123456789}`:   1700000000123456789,
		`{"a":[1,2],"ts":42,"b":true}`: 42,
		`{"ts":0}`:                     0,
	} {
		if got, ok := stamp([]byte(data)); !ok || got != want {
			t.Errorf("stamp(%s) = %d, %v; want %d", data, got, ok, want)
		}
	}
	for _, data := range []string{`{}`, `{"ts":}`, `{"ts":-1}`, `{"ts":9999999999999999999}`} {
		if got, ok := stamp([]byte(data)); ok {
			t.Errorf("stamp(%s) = %d, want none", data, got)
		}
	}
}

func TestPercentile(t *testing.T) {
	var hundred []time.Duration
	for i := 100; i >= 1; i-- { // unsorted: spreadOf sorts
		hundred = append(hundred, time.Duration(i))
	}
	s := spreadOf(hundred)
	if s.n != 100 || s.p50 != 50 || s.p99 != 99 || s.max != 100 {
		t.Errorf("1..100: %+v, want p50 50, p99 99, max 100", s)
	}
	if got := percentile(hundred, 100); got != 100 {
		t.Errorf("p100 = %d", got)
	}
	four := []time.Duration{10, 20, 30, 40}
	if p50, p99 := percentile(four, 50), percentile(four, 99); p50 != 20 || p99 != 40 {
		t.Errorf("10,20,30,40: p50 %d p99 %d, want 20 and 40 (nearest rank, no interpolation)", p50, p99)
	}
	if s := spreadOf([]time.Duration{7}); s.p50 != 7 || s.p99 != 7 || s.max != 7 {
		t.Errorf("one sample: %+v", s)
	}
	if s := spreadOf(nil); s != (spread{}) {
		t.Errorf("no sample: %+v", s)
	}
	// 1,000 samples of which the 10 largest are slow: p99 is the last fast one.
	var tail []time.Duration
	for i := range 1000 {
		d := time.Millisecond
		if i >= 990 {
			d = time.Second
		}
		tail = append(tail, d)
	}
	if s := spreadOf(tail); s.p99 != time.Millisecond || s.max != time.Second {
		t.Errorf("tail: %+v", s)
	}
}
