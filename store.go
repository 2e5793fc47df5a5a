package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
)

// store is broker's embedded database: one bbolt file in the --db folder. It is the only
// code that knows about bbolt. Every successful write has been fsync'd when it returns.
type store struct {
	db *bolt.DB
}

var (
	bucketUsers  = []byte("users")  // username -> JSON user
	bucketEvents = []byte("events") // tenant -> (big-endian seq -> name "\n" JSON data)
	bucketLatest = []byte("latest") // tenant -> (event name -> big-endian seq)
	bucketMeta   = []byte("meta")   // settings generated once, e.g. the biscuit root key
)

// openStore opens (or creates) the database in dir. A second process on the same folder
// fails after one second instead of waiting forever for bbolt's file lock.
func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: create folder: %w", err)
	}
	path := filepath.Join(dir, "broker.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("store: %s is locked: another broker process is using --db %s", path, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketUsers, bucketEvents, bucketLatest, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("store: create buckets: %w", err)
	}
	return &store{db: db}, nil
}

func (st *store) close() error { return st.db.Close() }

// getUser returns the user named name, or errNotFound.
func (st *store) getUser(name string) (*user, error) {
	var u *user
	err := st.db.View(func(tx *bolt.Tx) error {
		var err error
		u, err = decodeUser(tx.Bucket(bucketUsers).Get([]byte(name)))
		return err
	})
	return u, err
}

func decodeUser(v []byte) (*user, error) {
	if v == nil {
		return nil, errNotFound
	}
	var u user
	if err := json.Unmarshal(v, &u); err != nil {
		return nil, fmt.Errorf("store: decode user: %w", err)
	}
	return &u, nil
}

// createUser stores a new user; a taken username is errInvalid.
func (st *store) createUser(u *user) error {
	return st.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketUsers)
		if b.Get([]byte(u.Username)) != nil {
			return fmt.Errorf("%w: username taken", errInvalid)
		}
		return putUser(b, u)
	})
}

func putUser(b *bolt.Bucket, u *user) error {
	v, err := json.Marshal(u)
	if err != nil {
		return fmt.Errorf("store: encode user: %w", err)
	}
	return b.Put([]byte(u.Username), v)
}

// updateUser reads user name, lets change modify it and writes it back in one transaction,
// so check-and-set rules (one-time codes) cannot race. An error from change aborts the
// update and is returned together with the unmodified user; an unknown name is errNotFound.
func (st *store) updateUser(name string, change func(*user) error) (*user, error) {
	var u *user
	var changeErr error
	err := st.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketUsers)
		var err error
		if u, err = decodeUser(b.Get([]byte(name))); err != nil {
			return err
		}
		if changeErr = change(u); changeErr != nil {
			return nil
		}
		return putUser(b, u)
	})
	if err != nil {
		return nil, err
	}
	return u, changeErr
}

// listUsers returns every user, or those of one tenant when tenant is not empty.
func (st *store) listUsers(tenant string) ([]*user, error) {
	users := []*user{}
	err := st.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketUsers).ForEach(func(_, v []byte) error {
			u, err := decodeUser(v)
			if err == nil && (tenant == "" || u.Tenant == tenant) {
				users = append(users, u)
			}
			return err
		})
	})
	return users, err
}

// rootKey returns the biscuit root private key, generated on first use and kept in the
// database, so services that pinned the public key keep working across restarts.
func (st *store) rootKey() (ed25519.PrivateKey, error) {
	var key ed25519.PrivateKey
	err := st.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		if v := b.Get([]byte("biscuit_root")); len(v) == ed25519.PrivateKeySize {
			key = bytes.Clone(v)
			return nil
		}
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		key = k
		return b.Put([]byte("biscuit_root"), k)
	})
	if err != nil {
		return nil, fmt.Errorf("store: biscuit root key: %w", err)
	}
	return key, nil
}

// event is one inserted event. ID is the tenant's sequence number, set by appendEvents.
type event struct {
	Tenant, Name string
	Data         []byte // compact JSON
	ID           uint64
}

// appendEvents commits a batch of events in one transaction (one pair of fsyncs for the
// whole batch) and sets each event's ID to the next number of its tenant's sequence.
// On error nothing is stored and the IDs are meaningless.
func (st *store) appendEvents(evs []*event) error {
	return st.db.Update(func(tx *bolt.Tx) error {
		for _, ev := range evs {
			events, err := tx.Bucket(bucketEvents).CreateBucketIfNotExists([]byte(ev.Tenant))
			if err != nil {
				return err
			}
			latest, err := tx.Bucket(bucketLatest).CreateBucketIfNotExists([]byte(ev.Tenant))
			if err != nil {
				return err
			}
			if ev.ID, err = events.NextSequence(); err != nil {
				return err
			}
			key := binary.BigEndian.AppendUint64(nil, ev.ID)
			if err := events.Put(key, append([]byte(ev.Name+"\n"), ev.Data...)); err != nil {
				return err
			}
			if err := latest.Put([]byte(ev.Name), key); err != nil {
				return err
			}
		}
		return nil
	})
}

// sequences returns the last event ID of every tenant.
func (st *store) sequences() (map[string]uint64, error) {
	seqs := map[string]uint64{}
	err := st.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketEvents).ForEachBucket(func(k []byte) error {
			seqs[string(k)] = tx.Bucket(bucketEvents).Bucket(k).Sequence()
			return nil
		})
	})
	return seqs, err
}

// eventsAfter returns up to limit events of tenant with after < ID <= upto, in order.
func (st *store) eventsAfter(tenant string, after, upto uint64, limit int) ([]*event, error) {
	var evs []*event
	err := st.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketEvents).Bucket([]byte(tenant))
		if b == nil {
			return nil
		}
		c := b.Cursor()
		for k, v := c.Seek(binary.BigEndian.AppendUint64(nil, after+1)); k != nil && len(evs) < limit; k, v = c.Next() {
			id := binary.BigEndian.Uint64(k)
			if id > upto {
				break
			}
			evs = append(evs, decodeEvent(tenant, id, v))
		}
		return nil
	})
	return evs, err
}

// latestEvents returns the latest event of every name of tenant with ID <= upto, oldest first.
// A name whose latest event is newer than upto is left out: that event is delivered live.
func (st *store) latestEvents(tenant string, upto uint64) ([]*event, error) {
	var evs []*event
	err := st.db.View(func(tx *bolt.Tx) error {
		latest := tx.Bucket(bucketLatest).Bucket([]byte(tenant))
		if latest == nil {
			return nil
		}
		events := tx.Bucket(bucketEvents).Bucket([]byte(tenant))
		return latest.ForEach(func(_, key []byte) error {
			if id := binary.BigEndian.Uint64(key); id <= upto {
				evs = append(evs, decodeEvent(tenant, id, events.Get(key)))
			}
			return nil
		})
	})
	sort.Slice(evs, func(i, j int) bool { return evs[i].ID < evs[j].ID })
	return evs, err
}

func decodeEvent(tenant string, id uint64, v []byte) *event {
	name, data, _ := bytes.Cut(v, []byte("\n"))
	return &event{Tenant: tenant, Name: string(name), Data: bytes.Clone(data), ID: id}
}

// backup writes a consistent snapshot of the whole database to w while writes go on.
func (st *store) backup(w io.Writer) error {
	return st.db.View(func(tx *bolt.Tx) error {
		_, err := tx.WriteTo(w)
		return err
	})
}
