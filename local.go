//go:build !cluster

package main

import (
	"flag"

	bolt "go.etcd.io/bbolt"
)

// store is broker's embedded database: one bbolt file in the --db folder, opened with
// bbolt's defaults (never NoSync), so a write that returned has been fsync'd. In this build
// it is the only copy: cluster mode, where it is a node's view of a replicated log, is
// built with -tags cluster (cluster.go).
type store struct{ db *bolt.DB }

type clusterConfig struct{}

func (*clusterConfig) flags(*flag.FlagSet) {}

func (st *store) join(*hub, clusterConfig) error { return nil }

// put sets key in bucket to fn of its value (nil: none) in one transaction; an error from
// fn changes nothing.
func (st *store) put(bucket, key []byte, fn func([]byte) ([]byte, error)) error {
	return st.db.Update(func(tx *bolt.Tx) error {
		v, err := fn(tx.Bucket(bucket).Get(key))
		if err != nil {
			return err
		}
		return tx.Bucket(bucket).Put(key, v)
	})
}

// appendEvents commits a batch of events in one transaction (one pair of fsyncs for the
// whole batch), then hands them to published.
func (st *store) appendEvents(evs []*event, published func([]*event)) error {
	err := st.db.Update(func(tx *bolt.Tx) error { return appendTx(tx, evs) })
	if err == nil {
		published(evs)
	}
	return err
}

// await returns at once: the database holds every event there is.
func (st *store) await(tenant string, id uint64) error { return nil }

// ready is nil: the database is always ready (GET /).
func (st *store) ready() error { return nil }

func (st *store) close() error { return st.db.Close() }
