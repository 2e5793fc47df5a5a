//go:build cluster

package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"slices"
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

// errLost: the log is not the one the view was built from, or lacks messages it needs.
var errLost = errors.New("the log no longer matches this node's view")

// logKey (meta) holds where the view is: the log position it reflects, the bbolt
// transaction that applied it (a later one was made without the log) and the log's identity.
var logKey = []byte("log")

// replica follows the log into a view and proposes changes to it.
type replica struct {
	h       *hub
	log     *slog.Logger
	nc      *nats.Conn
	js      jetstream.JetStream
	subject string                    // and stream name
	id      string                    // the stream's identity: its name and creation time
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
	applied, viewID, err := st.seal()
	if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	opts := []nats.Option{nats.Name("broker"), nats.MaxReconnects(-1)}
	if c.creds != "" {
		opts = append(opts, nats.UserCredentials(c.creds))
	}
	nc, err := nats.Connect(c.nats, opts...)
	if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	r := &replica{h: h, log: h.log, nc: nc, subject: c.stream, applied: applied, quit: make(chan struct{}), done: make(chan struct{}), waiting: map[string]*waiter{}, moved: make(chan struct{})}
	last, err := st.start(r, c, viewID)
	if err == nil {
		err = r.consume()
	}
	if err != nil {
		nc.Close()
		return fmt.Errorf("cluster: %w", err)
	}
	r.log.Info("cluster: catching up with the log", "from", r.applied, "to", last)
	st.log, st.db.NoSync = r, true
	go r.follow(st)
	return r.reach(last, nil)
}

// seal reads where the view is: its position in the log and the log's identity ("" for a
// new view). Opening the database is one write transaction (createBuckets): any other since the view
// last recorded its place was made without the log, and the view is refused (errLost).
// Otherwise it records its place again, so that this opening does not count at the next.
func (st *store) seal() (applied uint64, id string, err error) {
	err = st.db.Update(func(tx *bolt.Tx) error {
		mark := bytes.Clone(tx.Bucket(bucketMeta).Get(logKey))
		if len(mark) < 16 { // made without the log: the other nodes lack its users, events and biscuit key
			for _, b := range [][]byte{bucketUsers, bucketEvents, bucketMeta} {
				if k, _ := tx.Bucket(b).Cursor().First(); k != nil {
					return fmt.Errorf("%w: the database in --db was not built from the log", errLost)
				}
			}
			return nil
		} else if uint64(tx.ID()) > binary.BigEndian.Uint64(mark[8:])+3 { // one more: an opening that wrote nothing, or died before sealing
			return fmt.Errorf("%w: the database in --db was written without the log", errLost)
		}
		applied, id = binary.BigEndian.Uint64(mark), string(mark[16:])
		return tx.Bucket(bucketMeta).Put(logKey, placeMark(applied, tx.ID(), id))
	})
	return applied, id, err
}

// placeMark is the value of logKey.
func placeMark(seq uint64, tx int, id string) []byte {
	return append(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, seq), uint64(tx)), id...)
}

// start opens the log's stream, creating it if there is none (a stream that exists is
// left as it is), checks that it is the log of the view (of identity viewID), and returns
// its last position. (consume checks that it holds the next message.)
func (st *store) start(r *replica, c clusterConfig, viewID string) (last uint64, err error) {
	if r.js, err = jetstream.New(r.nc); err != nil {
		return 0, err
	}
	var info *jetstream.StreamInfo
	// Nodes starting together race to create the stream; a second's pause after each try
	// (also after success) lets a stream just made reach every server before it is consumed.
	for deadline := time.Now().Add(30 * time.Second); info == nil; time.Sleep(time.Second) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		stream, err := r.js.Stream(ctx, c.stream)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			stream, err = r.js.CreateStream(ctx, jetstream.StreamConfig{Name: c.stream, Subjects: []string{c.stream}, Replicas: c.replicas, Storage: jetstream.FileStorage, DenyDelete: true, DenyPurge: true})
		}
		cancel()
		if err == nil {
			info = stream.CachedInfo()
		} else if time.Now().After(deadline) {
			return 0, err
		}
	}
	if info.Config.Replicas != c.replicas {
		r.log.Warn("cluster: the log's stream exists with another number of replicas, which broker leaves as it is", "replicas", info.Config.Replicas, "nats_replicas", c.replicas)
	}
	r.id = fmt.Sprint(c.stream, "@", info.Created.UnixNano())
	if last = info.State.LastSeq; viewID != "" && viewID != r.id || r.applied > last {
		return 0, fmt.Errorf("%w: the database in --db was built from another log than %q (its view is at %d of %d): move it away, and the node rebuilds its view from the log", errLost, c.stream, r.applied, last)
	}
	return last, nil
}

// consume starts a consumer of the log from the position after the view's. It lives on one
// NATS server: when that server goes, follow starts another. (JetStream's ordered consumer
// does the same, but its first attempt waits 10 s for a server that has gone.) A stream
// that was replaced, or lost the messages the view needs, is errLost.
func (r *replica) consume() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	stream, err := r.js.Stream(ctx, r.subject)
	if err != nil {
		return err
	} else if fmt.Sprint(r.subject, "@", stream.CachedInfo().Created.UnixNano()) != r.id {
		return fmt.Errorf("%w: its stream was made again", errLost)
	} else if _, err = stream.GetMsg(ctx, r.applied+1); errors.Is(err, jetstream.ErrMsgNotFound) && stream.CachedInfo().State.LastSeq > r.applied {
		return fmt.Errorf("%w: message %d, which the view needs next, is gone", errLost, r.applied+1)
	}
	cons, err := stream.CreateConsumer(ctx, jetstream.ConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: r.applied + 1,
		AckPolicy: jetstream.AckNonePolicy, MemoryStorage: true, Replicas: 1, InactiveThreshold: time.Minute,
	})
	if err != nil {
		return err
	}
	it, err := cons.Messages(jetstream.PullExpiry(2 * time.Second)) // heartbeats every second: a consumer lost with its server is noticed within 2 s
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil && closed(r.quit) {
		it.Stop()
		err = jetstream.ErrMsgIteratorClosed
	} else if err == nil {
		r.it = it
	}
	return err
}

// closed reports whether c is closed.
func closed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// follow applies the log's messages in order until the store closes, or until the view
// cannot go on: the log was replaced, or the database fails to write (a full disk).
func (r *replica) follow(st *store) {
	defer close(r.done)
	var failed time.Time
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
			it.Stop()
			for pause := time.Since(failed) < 5*time.Second; !closed(r.quit) && !errors.Is(err, errLost); pause = true {
				if failed = time.Now(); pause {
					time.Sleep(time.Second) // an error again soon: a line a second at most
				}
				r.log.Warn("cluster: following the log again", "from", r.applied+1, "err", err)
				if err = r.consume(); err == nil {
					break
				}
			}
			if errors.Is(err, errLost) {
				r.log.Error("cluster: this node stops following the log; GET / answers 503", "err", err)
			}
			if err != nil {
				return
			}
			continue
		}
		var e entry
		if err := json.Unmarshal(msg.Data(), &e); err != nil || !e.valid() { // applied as an empty entry: it moves the view's position
			r.log.Error("cluster: skipping a malformed message of the log", "seq", meta.Sequence.Stream, "err", err)
			e = entry{}
		}
		r.mu.Lock()
		id := msg.Headers().Get(jetstream.MsgIDHeader)
		w := r.waiting[id]
		delete(r.waiting, id) // this node's proposal is answered here, whatever happens
		r.mu.Unlock()
		if w != nil && w.evs != nil && len(w.evs) == len(e.Events) {
			e.Events = w.evs // the same events, as every node applies them: the insert gets their IDs
		}
		old, err := st.apply(&e, meta.Sequence.Stream)
		if w != nil {
			w.done <- err
		}
		if err != nil && !errors.Is(err, errConflict) { // the view must not skip a message
			r.log.Error("cluster: the view cannot apply the log: this node stops following it, and GET / answers 503; restart it once fixed", "seq", meta.Sequence.Stream, "err", err)
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
	}
}

// valid reports whether e is something broker writes, so every node applies it alike:
// events of valid tenants and names, or a user or the biscuit key.
func (e *entry) valid() bool {
	if e.Bucket == nil {
		return !slices.ContainsFunc(e.Events, func(ev *event) bool {
			return ev == nil || !validName(ev.Tenant, false) || !eventNameRE.MatchString(ev.Name) || len(ev.Data) > maxEventData || !json.Valid(ev.Data) || bytes.ContainsAny(ev.Data, "\r\n")
		})
	}
	_, err := decodeUser(e.New)
	return len(e.Key) > 0 && len(e.Key) <= bolt.MaxKeySize && (bytes.Equal(e.Bucket, bucketUsers) && err == nil ||
		bytes.Equal(e.Bucket, bucketMeta) && string(e.Key) == "biscuit_root" && len(e.New) == ed25519.PrivateKeySize)
}

// accessChanged reports whether a user's change ends its streams: a tenant or token
// boundary (revocation, new password) that moved.
func accessChanged(old, new []byte) bool {
	a, err := decodeUser(old)
	b, err2 := decodeUser(new)
	return err == nil && (err2 != nil || a.Tenant != b.Tenant || a.NotBefore != b.NotBefore)
}

// reach waits until the view has applied the log up to position seq, or until done closes.
func (r *replica) reach(seq uint64, done <-chan struct{}) error {
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
			if err := tx.Bucket(bucketMeta).Put(logKey, placeMark(seq, tx.ID(), st.log.id)); err != nil {
				return err
			}
		}
		if e.Bucket == nil {
			return appendTx(tx, e.Events)
		} else if old = bytes.Clone(tx.Bucket(e.Bucket).Get(e.Key)); !bytes.Equal(digest(old), e.Old) {
			conflict = true
			return nil
		}
		return tx.Bucket(e.Bucket).Put(e.Key, e.New)
	})
	if err == nil && conflict {
		err = errConflict
	}
	return old, err
}

// digest is the SHA-256 of v. Values are never empty, so that of nil stands for no value.
func digest(v []byte) []byte {
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
// Batches go to the log in messages of about a quarter of NATS's payload limit.
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
	if closed(r.done) { // nothing will apply it here
		return &retryError{after: time.Second, error: fmt.Errorf("%w: this node stopped following the cluster's log", errBusy)}
	}
	r.mu.Lock()
	r.waiting[id] = w
	r.mu.Unlock()
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
				return r.abandon(id, w, "this node's view is behind the cluster's log")
			case <-r.done:
				return r.abandon(id, w, "this node stopped following the cluster's log")
			}
		}
		r.log.Warn("cluster: the log did not take a change: retrying", "err", err)
		select {
		case <-deadline:
			return r.abandon(id, w, "the cluster's log did not take the change")
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// abandon gives up waiting for a proposal, unless follow has taken it to apply it: then
// its result comes at once.
func (r *replica) abandon(id string, w *waiter, why string) error {
	r.mu.Lock()
	_, waiting := r.waiting[id]
	delete(r.waiting, id)
	r.mu.Unlock()
	if !waiting {
		return <-w.done
	}
	return &retryError{after: time.Second, error: fmt.Errorf("%w: %s", errBusy, why)}
}

// await returns once the view holds tenant's event id, or everything the log held when it
// was called: a stream that resumes here may have seen, on another node, events this view
// has yet to apply. A view still behind after writeTimeout is errBusy, rather than a
// backlog that would repeat events.
func (st *store) await(tenant string, id uint64) error {
	r := st.log
	if r == nil {
		return nil
	}
	r.h.mu.Lock()
	last := r.h.lastID[tenant]
	r.h.mu.Unlock()
	if last >= id {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	stream, err := r.js.Stream(ctx, r.subject)
	if err == nil {
		err = r.reach(stream.CachedInfo().State.LastSeq, ctx.Done())
	}
	if err != nil {
		return &retryError{after: time.Second, error: fmt.Errorf("%w: this node's view is behind the cluster's log", errBusy)}
	}
	return nil
}

// ready is errBusy once the node has stopped following the log (GET /).
func (st *store) ready() error {
	if st.log != nil && closed(st.log.done) {
		return &retryError{after: time.Second, error: fmt.Errorf("%w: this node stopped following the cluster's log", errBusy)}
	}
	return nil
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
