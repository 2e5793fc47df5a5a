//go:build cluster

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	bolt "go.etcd.io/bbolt"
)

// Cluster mode (go build -tags cluster, then --nats): several brokers share one replicated
// log, a NATS JetStream stream, and each keeps a view of it in its own database. Every
// change of state is a message on the log: a batch of inserted events, or a value (a user,
// the biscuit key) put on the condition that the value it was computed from is still
// there. Each node applies the log in order with the same code, so all compute the same
// event IDs and the same users, with no coordination of their own. A write is answered
// once JetStream has stored it on its replicas and this node's view has applied it, with
// the result of that apply; reads are local. Without --nats this build works as the default one.

type clusterConfig struct {
	nats, creds, stream string
	replicas            int
}

func (c *clusterConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.nats, "nats", "", "NATS server URLs, comma-separated: run as a node of a cluster sharing their JetStream log (empty: this database alone)")
	fs.StringVar(&c.creds, "nats_creds", "", "NATS credentials file")
	fs.StringVar(&c.stream, "nats_stream", "broker", "JetStream stream (and subject) of the log")
	fs.IntVar(&c.replicas, "nats_replicas", 3, "copies JetStream keeps of the log (1, 3 or 5)")
}

// store is broker's database. In cluster mode it is this node's view of the log, written
// without fsync: the log is the durable copy, and a view that is lost or damaged is
// rebuilt from it.
type store struct {
	db  *bolt.DB
	log *replica // nil without --nats
}

// entry is one message of the log: Events, or Key of Bucket set to New if the SHA-256 of
// its value is still Old (nil: it has none).
type entry struct {
	Events                []*event `json:",omitempty"`
	Bucket, Key, Old, New []byte
}

// errConflict is the result of a put whose value changed since it was read.
var errConflict = errors.New("changed meanwhile")

var logSeq = []byte("log_seq") // meta: the position in the log the view reflects

// replica follows the log into a view and proposes changes to it.
type replica struct {
	h       *hub
	log     *slog.Logger
	nc      *nats.Conn
	js      jetstream.JetStream
	subject string                    // and stream name
	quit    chan struct{}             // closed when the store closes
	done    chan struct{}             // closed once follow has returned
	mu      sync.Mutex                // guards the fields below
	it      jetstream.MessagesContext // the messages of the current consumer
	waiting map[string]*waiter
	applied uint64        // the log position the view reflects
	moved   chan struct{} // closed, and replaced, whenever applied moves
}

// waiter is a change of this node waiting for its apply; an insert's events get their IDs.
type waiter struct {
	evs  []*event
	done chan error
}

// join makes the store a node of the cluster of c (nothing without --nats): it connects,
// creates the log's stream if it is new, and applies what the view lacks of the log
// before it returns, so the node serves only once it has caught up.
func (st *store) join(h *hub, c clusterConfig) error {
	if c.nats == "" {
		return nil
	}
	opts := []nats.Option{nats.Name("broker"), nats.MaxReconnects(-1)}
	if c.creds != "" {
		opts = append(opts, nats.UserCredentials(c.creds))
	}
	nc, err := nats.Connect(c.nats, opts...)
	if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	r := &replica{h: h, log: h.log, nc: nc, subject: c.stream, quit: make(chan struct{}), done: make(chan struct{}), waiting: map[string]*waiter{}, moved: make(chan struct{})}
	last, err := st.start(r, c)
	if err != nil {
		nc.Close()
		return fmt.Errorf("cluster: %w", err)
	}
	r.log.Info("cluster: catching up with the log", "from", r.applied, "to", last)
	st.log, st.db.NoSync = r, true
	go r.follow(st)
	return r.reach(last, nil)
}

// start opens the log's stream (creating it if it is new) and a consumer of it from the
// position after the view's, and returns the log's last position.
func (st *store) start(r *replica, c clusterConfig) (last uint64, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if r.js, err = jetstream.New(r.nc); err != nil {
		return 0, err
	}
	stream, err := r.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: c.stream, Subjects: []string{c.stream}, Replicas: c.replicas, Storage: jetstream.FileStorage})
	if err != nil {
		return 0, err
	}
	foreign := false
	st.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(logSeq); v != nil {
			r.applied = binary.BigEndian.Uint64(v)
		} else { // made without the log: the other nodes lack its users, events and biscuit key
			for _, b := range [][]byte{bucketUsers, bucketEvents, bucketMeta} {
				k, _ := tx.Bucket(b).Cursor().First()
				foreign = foreign || k != nil
			}
		}
		return nil
	})
	if last = stream.CachedInfo().State.LastSeq; foreign || r.applied > last {
		return 0, fmt.Errorf("the database in --db was not built from log %q (it is at position %d of %d): move it away, and the node rebuilds its view from the log", c.stream, r.applied, last)
	}
	return last, r.consume()
}

// consume starts a consumer of the log from the position after the view's. It lives on one
// NATS server: when that server goes, follow starts another. (JetStream's ordered consumer
// does the same, but its first attempt waits 10 s for a server that has gone.)
func (r *replica) consume() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cons, err := r.js.CreateConsumer(ctx, r.subject, jetstream.ConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: r.applied + 1,
		AckPolicy: jetstream.AckNonePolicy, MemoryStorage: true, Replicas: 1, InactiveThreshold: time.Minute,
	})
	var it jetstream.MessagesContext
	if err == nil { // heartbeats every second: a consumer lost with its server is noticed within 2 s
		it, err = cons.Messages(jetstream.PullExpiry(2 * time.Second))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil && r.isQuitting() {
		it.Stop()
		err = jetstream.ErrMsgIteratorClosed
	} else if err == nil {
		r.it = it
	}
	return err
}

func (r *replica) isQuitting() bool {
	select {
	case <-r.quit:
		return true
	default:
		return false
	}
}

// follow applies the log's messages in order until the store closes.
func (r *replica) follow(st *store) {
	defer close(r.done)
	for {
		r.mu.Lock()
		it := r.it
		r.mu.Unlock()
		msg, err := it.Next()
		var meta *jetstream.MsgMetadata
		if err == nil {
			meta, err = msg.Metadata()
		}
		if err == nil && meta.Sequence.Stream != r.applied+1 {
			err = fmt.Errorf("message %d after %d", meta.Sequence.Stream, r.applied)
		}
		if err != nil { // a lost consumer or message: a new consumer from where the view is
			for it.Stop(); !r.isQuitting(); time.Sleep(time.Second) {
				r.log.Warn("cluster: following the log again", "from", r.applied+1, "err", err)
				if err = r.consume(); err == nil {
					break
				}
			}
			if r.isQuitting() {
				return
			}
			continue
		}
		var e entry
		if err := json.Unmarshal(msg.Data(), &e); err != nil { // applied as an empty entry: it moves the view's position
			r.log.Error("cluster: skipping a malformed message of the log", "seq", meta.Sequence.Stream, "err", err)
		}
		r.mu.Lock()
		w := r.waiting[msg.Headers().Get(jetstream.MsgIDHeader)]
		r.mu.Unlock()
		if w != nil && w.evs != nil {
			e.Events = w.evs // the same events: the insert gets their IDs
		}
		old, err := st.apply(&e, meta.Sequence.Stream)
		if err != nil && !errors.Is(err, errConflict) { // a full disk, say: the view must not skip a message
			r.log.Error("cluster: the view cannot apply the log: this node stops following it; restart it once fixed", "seq", meta.Sequence.Stream, "err", err)
			return
		}
		if e.Bucket == nil {
			r.h.publish(e.Events)
		} else if err == nil && bytes.Equal(e.Bucket, bucketUsers) && accessChanged(old, e.New) {
			r.h.kick(string(e.Key)) // a revocation, new tenant or new password made on any node
		}
		r.mu.Lock()
		r.applied = meta.Sequence.Stream
		close(r.moved)
		r.moved = make(chan struct{})
		r.mu.Unlock()
		if w != nil {
			w.done <- err
		}
	}
}

// accessChanged reports whether a user's change ends its streams: a tenant or token
// boundary (revocation, new password) that moved.
func accessChanged(old, new []byte) bool {
	a, err := decodeUser(old)
	b, err2 := decodeUser(new)
	return err == nil && (err2 != nil || a.Tenant != b.Tenant || a.NotBefore != b.NotBefore)
}

// reach waits until the view has applied the log up to position seq, or until done fires.
func (r *replica) reach(seq uint64, done <-chan time.Time) error {
	for {
		r.mu.Lock()
		applied, moved := r.applied, r.moved
		r.mu.Unlock()
		if applied >= seq {
			return nil
		}
		select {
		case <-moved:
		case <-r.done:
			return errors.New("cluster: stopped following the log")
		case <-done:
			return errors.New("cluster: the view is behind the log")
		}
	}
}

// apply applies e in one transaction of the view, at log position seq (0: there is no
// log), and returns the value a put replaced. A put whose condition fails is errConflict
// and changes nothing but the position.
func (st *store) apply(e *entry, seq uint64) (old []byte, err error) {
	conflict := false
	err = st.db.Update(func(tx *bolt.Tx) error {
		if seq > 0 {
			if err := tx.Bucket(bucketMeta).Put(logSeq, binary.BigEndian.AppendUint64(nil, seq)); err != nil {
				return err
			}
		}
		if e.Bucket == nil {
			return appendTx(tx, e.Events)
		} else if b := tx.Bucket(e.Bucket); b == nil {
			return nil // no such bucket: a malformed entry
		} else if old = bytes.Clone(b.Get(e.Key)); !bytes.Equal(digest(old), e.Old) {
			conflict = true
			return nil
		} else {
			return b.Put(e.Key, e.New)
		}
	})
	if err == nil && conflict {
		err = errConflict
	}
	return old, err
}

// digest is the SHA-256 of v, nil for no value.
func digest(v []byte) []byte {
	if v == nil {
		return nil
	}
	d := sha256.Sum256(v)
	return d[:]
}

// put sets key in bucket to fn of its value (nil: none); an error from fn changes nothing.
// fn may run again: when the value changed between its read and the log's apply, on any
// node, the put is computed again from the new value.
func (st *store) put(bucket, key []byte, fn func([]byte) ([]byte, error)) error {
	for range 10 {
		e := &entry{Bucket: bucket, Key: key}
		err := st.db.View(func(tx *bolt.Tx) (err error) {
			v := tx.Bucket(bucket).Get(key)
			e.Old = digest(v)
			e.New, err = fn(v)
			return err
		})
		if err != nil || bytes.Equal(digest(e.New), e.Old) { // unchanged: nothing to write
			return err
		} else if err = st.propose(e, nil); !errors.Is(err, errConflict) {
			return err
		}
	}
	return &retryError{after: time.Second, error: fmt.Errorf("%w: the record changes too often", errBusy)}
}

// appendEvents commits evs, setting their IDs, and hands them to published; in cluster
// mode the log's apply hands them on, with the events of every node, in log order.
// Batches go to the log in messages of at most half NATS's payload limit.
func (st *store) appendEvents(evs []*event, published func([]*event)) error {
	if st.log == nil {
		_, err := st.apply(&entry{Events: evs}, 0)
		if err == nil {
			published(evs)
		}
		return err
	}
	for len(evs) > 0 {
		n, size := 0, 0
		for ; n < len(evs) && (n == 0 || size < int(st.log.nc.MaxPayload())/4); n++ {
			size += len(evs[n].Tenant) + len(evs[n].Name) + len(evs[n].Data) // under 2 bytes each in JSON's base64
		}
		if err := st.propose(&entry{Events: evs[:n]}, evs[:n]); err != nil {
			return err
		}
		evs = evs[n:]
	}
	return nil
}

// proposeTime bounds how long a write waits for the log to store and apply it.
const proposeTime = 30 * time.Second

// propose applies e: at once without a log; in cluster mode by publishing it to the log,
// where it is stored on the replicas, and waiting until this node's view has applied it.
// A publish that fails is retried with the same message ID, which JetStream stores once.
func (st *store) propose(e *entry, evs []*event) error {
	r := st.log
	if r == nil {
		_, err := st.apply(e, 0)
		return err
	}
	data, err := json.Marshal(e)
	if err != nil {
		return err
	}
	id, w := hex.EncodeToString(randomBytes(16)), &waiter{evs: evs, done: make(chan error, 1)}
	r.mu.Lock()
	r.waiting[id] = w
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.waiting, id)
		r.mu.Unlock()
	}()
	deadline := time.After(proposeTime)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = r.js.Publish(ctx, r.subject, data, jetstream.WithMsgID(id))
		cancel()
		if err == nil {
			select {
			case err = <-w.done:
				return err
			case <-deadline:
				return &retryError{after: time.Second, error: fmt.Errorf("%w: this node's view is behind the cluster's log", errBusy)}
			}
		}
		r.log.Warn("cluster: the log did not take a change: retrying", "err", err)
		select {
		case <-deadline:
			return &retryError{after: time.Second, error: fmt.Errorf("%w: the cluster's log did not take the change", errBusy)}
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// await waits, up to writeTimeout, until the view holds tenant's event id: a stream that
// resumes here may have seen, on another node, events this view has yet to apply.
func (st *store) await(tenant string, id uint64) {
	deadline := time.After(writeTimeout)
	for st.log != nil {
		st.log.mu.Lock()
		moved := st.log.moved
		st.log.mu.Unlock()
		st.log.h.mu.Lock()
		last := st.log.h.lastID[tenant]
		st.log.h.mu.Unlock()
		if last >= id {
			return
		}
		select {
		case <-moved:
		case <-deadline:
			return
		}
	}
}

// close stops following the log, then closes the view.
func (st *store) close() error {
	if r := st.log; r != nil {
		r.mu.Lock()
		close(r.quit)
		r.it.Stop()
		r.mu.Unlock()
		<-r.done
		st.log.nc.Close()
	}
	return st.db.Close()
}
