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
	"math"
	"os"
	"path/filepath"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// store is broker's embedded database: one bbolt file in the --db folder, opened with
// bbolt's defaults (never NoSync), so a write that returned has been fsync'd.
type store struct {
	db *bolt.DB
}

var (
	bucketUsers  = []byte("users")  // username -> JSON user with its secrets
	bucketEvents = []byte("events") // tenant -> (big-endian ID -> name "\n" JSON data)
	bucketLatest = []byte("latest") // tenant -> (event name -> big-endian ID)
	bucketMeta   = []byte("meta")   // values generated once, e.g. the biscuit root key
)

// openStore opens (or creates) the database in dir. A second process on the same folder
// fails after one second instead of waiting forever for bbolt's file lock.
func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	path := filepath.Join(dir, "broker.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("store: %s is locked: another broker process is using --db %s", path, dir)
	} else if err != nil {
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

// storedUser is a user as kept in the database: the answer fields and the secrets.
type storedUser struct {
	*user
	Secrets *secrets `json:"secrets"`
}

func decodeUser(v []byte) (*user, error) {
	if v == nil {
		return nil, errNotFound
	}
	u := &user{}
	if err := json.Unmarshal(v, &storedUser{u, &u.secrets}); err != nil {
		return nil, fmt.Errorf("store: decode user: %w", err)
	}
	u.Password, u.TOTP = "***", "***"
	return u, nil
}

// getUser returns the user named name, or errNotFound.
func (st *store) getUser(name string) (u *user, err error) {
	err = st.db.View(func(tx *bolt.Tx) error {
		u, err = decodeUser(tx.Bucket(bucketUsers).Get([]byte(name)))
		return err
	})
	return u, err
}

// updateUser reads user name (a new user when create is set: a taken name is errInvalid),
// lets change modify it and writes it back, all in one transaction, so check-and-set rules
// such as one-time codes cannot race. An error from change aborts the update; an unknown
// name is errNotFound.
func (st *store) updateUser(name string, create bool, change func(*user) error) (u *user, err error) {
	err = st.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketUsers)
		v := b.Get([]byte(name))
		if u, err = decodeUser(v); create && v != nil {
			return fmt.Errorf("%w: username taken", errInvalid)
		} else if create {
			u = &user{Username: name}
		} else if err != nil {
			return err
		}
		if err := change(u); err != nil {
			return err
		}
		v, err := json.Marshal(storedUser{u, &u.secrets})
		if err != nil {
			return err
		}
		return b.Put([]byte(name), v)
	})
	return u, err
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
// database, so services that pinned its public key keep working across restarts.
func (st *store) rootKey() (key ed25519.PrivateKey, err error) {
	err = st.db.Update(func(tx *bolt.Tx) error {
		if key = bytes.Clone(tx.Bucket(bucketMeta).Get([]byte("biscuit_root"))); len(key) == ed25519.PrivateKeySize {
			return nil
		}
		_, key, _ = ed25519.GenerateKey(rand.Reader)
		return tx.Bucket(bucketMeta).Put([]byte("biscuit_root"), key)
	})
	return key, err
}

// event is one inserted event; ID is its number in its tenant's sequence.
type event struct {
	Tenant, Name string
	Data         []byte // compact JSON
	ID           uint64
}

// appendEvents commits a batch of events in one transaction (one pair of fsyncs for the
// whole batch) and sets each event's ID to the next number of its tenant's sequence.
func (st *store) appendEvents(evs []*event) error {
	return st.db.Update(func(tx *bolt.Tx) error {
		for _, ev := range evs {
			events, err1 := tx.Bucket(bucketEvents).CreateBucketIfNotExists([]byte(ev.Tenant))
			latest, err2 := tx.Bucket(bucketLatest).CreateBucketIfNotExists([]byte(ev.Tenant))
			if err := errors.Join(err1, err2); err != nil {
				return err
			}
			ev.ID, _ = events.NextSequence() // fails only in a read-only transaction
			key := binary.BigEndian.AppendUint64(nil, ev.ID)
			if err := errors.Join(events.Put(key, append([]byte(ev.Name+"\n"), ev.Data...)), latest.Put([]byte(ev.Name), key)); err != nil {
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

// readEvents returns events of tenant with IDs up to upto: with resume, up to limit events
// after the ID after, in order; otherwise the latest event of every name, oldest first (a
// name whose latest event is newer than upto is left out: that event is delivered live).
func (st *store) readEvents(tenant string, resume bool, after, upto uint64, limit int) ([]*event, error) {
	var evs []*event
	if !resume {
		limit = math.MaxInt // one event per name
	}
	add := func(k, v []byte) bool {
		id := binary.BigEndian.Uint64(k)
		if id <= upto && len(evs) < limit {
			name, data, _ := bytes.Cut(v, []byte("\n"))
			evs = append(evs, &event{Tenant: tenant, Name: string(name), Data: bytes.Clone(data), ID: id})
		}
		return id < upto && len(evs) < limit
	}
	err := st.db.View(func(tx *bolt.Tx) error {
		events, latest := tx.Bucket(bucketEvents).Bucket([]byte(tenant)), tx.Bucket(bucketLatest).Bucket([]byte(tenant))
		if events == nil || latest == nil {
			return nil
		}
		if !resume {
			return latest.ForEach(func(_, k []byte) error { add(k, events.Get(k)); return nil })
		}
		c := events.Cursor()
		for k, v := c.Seek(binary.BigEndian.AppendUint64(nil, after+1)); k != nil && add(k, v); k, v = c.Next() {
		}
		return nil
	})
	sort.Slice(evs, func(i, j int) bool { return evs[i].ID < evs[j].ID })
	return evs, err
}

// backup writes a consistent snapshot of the whole database to w while writes go on.
func (st *store) backup(w io.Writer) error {
	return st.db.View(func(tx *bolt.Tx) error {
		_, err := tx.WriteTo(w)
		return err
	})
}
