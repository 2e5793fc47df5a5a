package main

import (
	"bytes"
	"math"
	"slices"
	"time"
)

// tally is what one stream received, checked against what broker promises: every event of
// the tenant once, in order, IDs 1, 2, 3, ... (each run inserts into a tenant of its own,
// so its first event is 1). Only the stream's goroutine touches its tally until that
// goroutine has ended.
type tally struct {
	next      uint64 // the ID expected next
	received  int64  // events accepted: the expected one, or a later one after a gap
	skipped   int64  // IDs jumped over: events lost by the stream
	repeated  int64  // events whose ID is not above one already accepted: duplicates
	malformed int64  // frames without a numeric id or without a "ts" stamp in their data
	latencies []time.Duration
	last      time.Time // when the last event was accepted
}

// add checks one frame received at now and reports whether it was accepted (a new event).
// Its latency is now minus the insert's start, stamped by the publisher as "ts" in the data.
func (t *tally) add(f frame, now time.Time) bool {
	id, ok := parseUint(f.id)
	sent, stamped := stamp(f.data)
	if !ok || !stamped {
		t.malformed++
		return false
	}
	if t.next == 0 {
		t.next = 1
	}
	if id < t.next {
		t.repeated++
		return false
	}
	t.skipped += int64(id - t.next)
	t.next = id + 1
	t.received++
	t.latencies = append(t.latencies, now.Sub(time.Unix(0, sent)))
	t.last = now
	return true
}

// missing is how many of the events 1..lastID the stream did not get: those it skipped, and
// those after the last one it accepted.
func (t *tally) missing(lastID uint64) int64 {
	seen := max(t.next, 1) - 1 // the highest ID accepted, 0 for none
	if seen >= lastID {
		return t.skipped
	}
	return t.skipped + int64(lastID-seen)
}

// parseUint parses a decimal ID; broker's IDs are plain digits, without sign or spaces.
func parseUint(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 19 { // 19 digits always fit in a uint64
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return v, true
}

// stampKey is how the publisher's data {"ts":N} starts; broker stores data compacted, so it
// arrives in the same form.
var stampKey = []byte(`"ts":`)

// stamp returns the Unix time in nanoseconds that the publisher put in an event's data.
func stamp(data []byte) (int64, bool) {
	i := bytes.Index(data, stampKey)
	if i < 0 {
		return 0, false
	}
	digits := data[i+len(stampKey):]
	end := 0
	for end < len(digits) && digits[end] >= '0' && digits[end] <= '9' {
		end++
	}
	v, ok := parseUint(digits[:end])
	if !ok || v > math.MaxInt64 {
		return 0, false
	}
	return int64(v), true
}

// spread is the distribution of a set of durations.
type spread struct {
	n             int
	p50, p99, max time.Duration
}

// spreadOf sorts samples (in place) and returns their median, 99th percentile and maximum.
func spreadOf(samples []time.Duration) spread {
	slices.Sort(samples)
	s := spread{n: len(samples), p50: percentile(samples, 50), p99: percentile(samples, 99)}
	if len(samples) > 0 {
		s.max = samples[len(samples)-1]
	}
	return s
}

// percentile returns the p-th percentile (0 < p <= 100) of sorted samples by the
// nearest-rank method: the smallest sample that at least p percent of the samples do not
// exceed. It is always one of the samples, never an interpolation between two.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p * float64(len(sorted)) / 100))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}
