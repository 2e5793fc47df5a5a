package main

import (
	"bytes"
	"crypto/ed25519"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

var (
	bucketUsers  = []byte("users")  // username -> JSON user with its secrets
	bucketEvents = []byte("events") // tenant -> (big-endian ID -> name "\n" JSON data)
	bucketLatest = []byte("latest") // tenant -> (event name -> big-endian ID)
	bucketSync   = []byte("sync")   // tenant -> (big-endian ID -> event name): the latest of each name
	bucketMeta   = []byte("meta")   // values generated once, e.g. the biscuit root key
)

// openStore opens (or creates) the database in dir. A second process on the same folder
// fails after one second instead of waiting forever for bbolt's file lock. An empty file
// is refused rather than made a new database: it would get a new biscuit key.
func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	path := filepath.Join(dir, "broker.db")
	if fi, err := os.Stat(path); err == nil && fi.Size() == 0 {
		return nil, fmt.Errorf("store: %s is empty: restore a backup or remove it", path)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("store: %s is locked: another broker process is using --db %s", path, dir)
	} else if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	if err = db.Update(createBuckets); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: create buckets: %w", err)
	}
	return &store{db: db}, nil
}

// createBuckets creates the top-level buckets.
func createBuckets(tx *bolt.Tx) error {
	for _, b := range [][]byte{bucketUsers, bucketEvents, bucketLatest, bucketSync, bucketMeta} {
		if _, err := tx.CreateBucketIfNotExists(b); err != nil {
			return err
		}
	}
	return nil
}

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
// lets change modify it and writes it back as one change (store.put), so check-and-set
// rules such as one-time codes cannot race. An error from change aborts the update; an
// unknown name is errNotFound.
func (st *store) updateUser(name string, create bool, change func(*user) error) (u *user, err error) {
	err = st.put(bucketUsers, []byte(name), func(v []byte) ([]byte, error) {
		if u, err = decodeUser(v); create && v != nil {
			return nil, fmt.Errorf("%w: username taken", errInvalid)
		} else if create {
			u = &user{Username: name}
		} else if err != nil {
			return nil, err
		}
		if err = change(u); err != nil {
			return nil, err
		}
		return json.Marshal(storedUser{u, &u.secrets})
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
	err = st.put(bucketMeta, []byte("biscuit_root"), func(v []byte) ([]byte, error) {
		if key = bytes.Clone(v); len(key) != ed25519.PrivateKeySize {
			_, key, _ = ed25519.GenerateKey(nil) // nil: the system's secure random source
		}
		return key, nil
	})
	return key, err
}

// event is one inserted event; ID is its number in its tenant's sequence.
type event struct {
	Tenant, Name string
	Data         []byte // compact JSON
	ID           uint64
	done         chan error // the hub answers the insert here once the event is committed
}

// appendTx writes events in tx, setting each event's ID to the next number of its
// tenant's sequence.
func appendTx(tx *bolt.Tx, evs []*event) error {
	for _, ev := range evs {
		t := []byte(ev.Tenant)
		events, err1 := tx.Bucket(bucketEvents).CreateBucketIfNotExists(t)
		latest, err2 := tx.Bucket(bucketLatest).CreateBucketIfNotExists(t)
		index, err3 := tx.Bucket(bucketSync).CreateBucketIfNotExists(t)
		if err := errors.Join(err1, err2, err3); err != nil {
			return err
		}
		ev.ID, _ = events.NextSequence() // fails only in a read-only transaction
		key, name := binary.BigEndian.AppendUint64(nil, ev.ID), []byte(ev.Name)
		if prev := latest.Get(name); prev != nil {
			if err := index.Delete(prev); err != nil {
				return err
			}
		}
		v := append(append(append(make([]byte, 0, len(name)+1+len(ev.Data)), name...), '\n'), ev.Data...)
		if err := errors.Join(events.Put(key, v), latest.Put(name, key), index.Put(key, name)); err != nil {
			return err
		}
	}
	return nil
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

// eachEvent calls fn with tenant's events after the ID after and up to upto, in ID order,
// until fn returns false: every event, or with latest only the latest of each name (a name
// whose latest event is newer than upto is left out: that event is delivered live). name
// and data are valid only during the call.
func (st *store) eachEvent(tenant string, latest bool, after, upto uint64, fn func(id uint64, name, data []byte) bool) error {
	return st.db.View(func(tx *bolt.Tx) error {
		events, index := tx.Bucket(bucketEvents).Bucket([]byte(tenant)), tx.Bucket(bucketEvents).Bucket([]byte(tenant))
		if latest {
			index = tx.Bucket(bucketSync).Bucket([]byte(tenant))
		}
		if events == nil || index == nil {
			return nil
		}
		c := index.Cursor()
		for k, v := c.Seek(binary.BigEndian.AppendUint64(nil, after+1)); k != nil && binary.BigEndian.Uint64(k) <= upto; k, v = c.Next() {
			if latest {
				v = events.Get(k)
			}
			name, data, _ := bytes.Cut(v, []byte("\n"))
			if !fn(binary.BigEndian.Uint64(k), name, data) {
				break
			}
		}
		return nil
	})
}

// snapshot copies a consistent snapshot of the database into an unnamed temporary file
// beside it and returns the file and its size. The read transaction lasts
// as long as a local copy, whatever the speed of the client that downloads it: while it is
// open, bbolt cannot grow the file, so inserts would wait.
func (st *store) snapshot() (*os.File, int64, error) {
	f, err := os.CreateTemp(filepath.Dir(st.db.Path()), "backup-*")
	if err != nil {
		return nil, 0, fmt.Errorf("store: backup: %w", err)
	}
	os.Remove(f.Name()) // the open file stays readable; nothing is left behind
	var size int64
	err = st.db.View(func(tx *bolt.Tx) (err error) {
		size, err = tx.WriteTo(f)
		return err
	})
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("store: backup: %w", err)
	}
	return f, size, nil
}
