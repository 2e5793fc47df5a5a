package main

import (
	"crypto/sha256"
	"net"
	"net/http"
	"sync"
	"time"
)

// throttle slows down guessing of passwords, two-factor and reset codes and the admin
// token. An attempt is counted against its keys (an account, a client address) before it
// is evaluated, so a burst of concurrent guesses is refused like a sequence of them: a key
// lets through its free attempts (5 for an account, 20 for an address), then, once they
// have failed, one attempt at a time, each failure locking the key for 1 s, 2 s, 4 s ... up
// to 15 minutes. A locked key is answered 429 even with the right secret. A key also lets
// only a few attempts run at once (2 for password hashing), so one client or one account
// cannot hold every hash slot.
//
// Keys are SHA-256 digests, so an entry has the same small size (about 100 bytes with the
// map's overhead) whatever a client sends; at most maxKeys are held (about 10 MiB).
type throttle struct {
	maxKeys int
	mu      sync.Mutex // guards strikes and rescan
	strikes map[tkey]strike
	rescan  time.Time // when a full map may be scanned for keys to forget again
}

// tkey is what a throttle counts attempts against.
type tkey struct {
	digest         [32]byte // of the kind and value of the key
	free, parallel int      // failures before the first lock; attempts evaluated at once
}

type strike struct {
	fails, inflight int
	until, last     time.Time // locked until; the last failure
}

// The throttle holds at most throttleKeys keys; forget is the longest lock, and how long a
// key's failures are remembered after its last failure and lock.
const throttleKeys, forget = 100_000, 15 * time.Minute

// accountKey counts attempts against one account: kind "login" (passwords and two-factor
// codes, also over HTTP Basic) or "reset" (password-reset codes).
func accountKey(kind, username string) tkey {
	return tkey{sha256.Sum256([]byte(kind + "\x00" + username)), 5, 2}
}

// addrKey counts attempts from one client address (an IPv6 client by its /48, the most a
// site is usually given, so one client cannot fill the throttle with its addresses); kind "login" for passwords and codes, "admin" for admin tokens.
func addrKey(kind string, r *http.Request) tkey {
	// Admin tokens are compared, not hashed: 20 may be checked at once.
	return tkey{sha256.Sum256([]byte(kind + "\x00" + clientAddr(r))), 20, map[bool]int{true: 20, false: 2}[kind == "admin"]}
}

// clientAddr is the client's IP address as the server sees it, an IPv6 address as its /48.
// Proxy headers are not trusted: any client can set them.
func clientAddr(r *http.Request) string {
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	if ip := net.ParseIP(host); ip != nil && ip.To4() == nil {
		return ip.Mask(net.CIDRMask(48, 128)).String() + "/48"
	}
	return host
}

// begin counts an attempt against keys at now and returns the function that ends it
// (failed: the secret was wrong), or a *retryError when a key is locked or busy.
func (t *throttle) begin(now time.Time, keys ...tkey) (end func(failed bool), err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	fresh := 0 // keys the map does not hold
	for _, k := range keys {
		st, held := t.strikes[k]
		if now.Before(st.until) || st.inflight >= k.parallel || st.inflight > 0 && st.fails+st.inflight >= k.free {
			return nil, &retryError{after: max(st.until.Sub(now), time.Second), error: errTooMany}
		} else if !held {
			fresh++
		}
	}
	// Room for the fresh keys: a full map forgets keys without an attempt in flight whose
	// last failure and lock ended over forget ago. Failures are never forgotten earlier, or
	// a flood of new keys would reset everyone's count: with no room, attempts with a new
	// key are refused, and the map is not scanned again for a second.
	for k, st := range t.strikes {
		if len(t.strikes)+fresh <= t.maxKeys || now.Before(t.rescan) {
			break
		} else if st.inflight == 0 && now.After(st.until.Add(forget)) && now.After(st.last.Add(forget)) {
			delete(t.strikes, k)
		}
	}
	if fresh > 0 && len(t.strikes)+fresh > t.maxKeys {
		t.rescan = now.Add(time.Second)
		return nil, &retryError{after: time.Second, error: errTooMany}
	}
	for _, k := range keys {
		st := t.strikes[k]
		st.inflight++
		t.strikes[k] = st
	}
	return func(failed bool) {
		t.mu.Lock()
		defer t.mu.Unlock()
		for _, k := range keys {
			st := t.strikes[k]
			st.inflight-- // a key with an attempt in flight is never forgotten
			if failed {
				st.fails, st.last = st.fails+1, now
				if st.fails >= k.free {
					st.until = now.Add(min(time.Second<<min(st.fails-k.free, 20), forget))
				}
			}
			t.strikes[k] = st
		}
	}, nil
}

// clear forgets the failures of keys: an account's after its owner got in, or when the
// admin unlocks it.
func (t *throttle) clear(keys ...tkey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		if st, held := t.strikes[k]; held { // a key it does not hold has nothing to forget
			st.fails, st.until = 0, time.Time{}
			t.strikes[k] = st
		}
	}
}
