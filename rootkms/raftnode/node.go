package raftnode

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
)

// Config configures a Raft node.
type Config struct {
	// ID is the node's Raft server ID (its name, e.g. "rootkms-1").
	ID string
	// Dir holds raft.db (log and stable store) and snapshots/. Created 0700.
	Dir string
	// FSM is the state machine.
	FSM raft.FSM
	// Transport carries Raft traffic (NewTransport over a StreamLayer in
	// production, an InmemTransport in tests).
	Transport raft.Transport
	// Bootstrap makes this node the first voter of a new cluster if it has
	// no Raft state yet. Ignored when state exists.
	Bootstrap bool
	// HeartbeatTimeout, ElectionTimeout and LeaderLeaseTimeout (0: 1s, 1s,
	// 500ms, raft's defaults).
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout time.Duration
	// SnapshotThreshold is how many log entries trigger a snapshot (0: 8192).
	SnapshotThreshold uint64
	// Logger receives raft's logs.
	Logger *slog.Logger
	// WrapLogStore, if not nil, wraps the Raft log store Raft runs with (the
	// bolt store): a seam for tests and fault injection (a slow or failing
	// StoreLogs). Bootstrap and the start-up checks use the bolt store
	// directly. Nil in production.
	WrapLogStore func(raft.LogStore) raft.LogStore
	// WrapStableStore, if not nil, wraps the Raft stable store (the bolt
	// store, which keeps the current term and the last vote) that Raft runs
	// with. It is for tests and fault injection only (a lost or failing term
	// or vote write), like WrapLogStore. Bootstrap and the start-up checks
	// use the bolt store directly. Nil in production.
	WrapStableStore func(raft.StableStore) raft.StableStore
}

// Node is an open Raft node and the stores it owns.
type Node struct {
	Raft  *raft.Raft
	store *raftboltdb.BoltStore
}

// NewTransport makes a Raft network transport over a stream layer.
//
// Pipelined replication is off (MaxRPCsInFlight 1): hashicorp/raft v1.8.0's
// pipeline can deadlock (seen in our fault tests as a deposed leader that
// never shuts down, and reported elsewhere as replication to a follower
// stalling while heartbeats go on, which would leave a replica serving stale
// keys). The root KMS writes rarely; synchronous AppendEntries costs nothing
// that matters here.
func NewTransport(layer raft.StreamLayer, log *slog.Logger) *raft.NetworkTransport {
	return raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: layer, MaxPool: 3, MaxRPCsInFlight: 1, Timeout: 10 * time.Second, Logger: NewLogger(log, "raft-net"),
	})
}

// Open opens (or creates) the node's stores and starts Raft. A corrupt
// bolt file or an unreadable snapshot makes it fail with an error that says
// which file: the node never serves from state it cannot trust.
func Open(cfg Config) (*Node, error) {
	if cfg.ID == "" || cfg.Dir == "" || cfg.FSM == nil || cfg.Transport == nil {
		return nil, errors.New("raftnode: ID, Dir, FSM and Transport are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("raftnode: %w", err)
	}
	dbPath := filepath.Join(cfg.Dir, "raft.db")
	store, err := openStore(dbPath)
	if err != nil {
		return nil, fmt.Errorf("raftnode: %s is corrupt or unreadable (move it aside and rejoin this node to the cluster to rebuild it from its peers): %w", dbPath, err)
	}
	hlog := NewLogger(cfg.Logger, "raft")
	// The store keeps its snapshots in Dir/snapshots/.
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.Dir, 3, hlog)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("raftnode: snapshot store: %w", err)
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = hlog
	if cfg.HeartbeatTimeout > 0 {
		rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	}
	if cfg.ElectionTimeout > 0 {
		rc.ElectionTimeout = cfg.ElectionTimeout
	}
	if cfg.LeaderLeaseTimeout > 0 {
		rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	}
	if cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = cfg.SnapshotThreshold
	}
	if err := raft.ValidateConfig(rc); err != nil {
		store.Close()
		return nil, fmt.Errorf("raftnode: %w", err)
	}
	if cfg.Bootstrap {
		has, err := raft.HasExistingState(store, store, snaps)
		if err != nil {
			store.Close()
			return nil, fmt.Errorf("raftnode: %w", err)
		}
		if !has {
			conf := raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: rc.LocalID, Address: cfg.Transport.LocalAddr()}}}
			if err := raft.BootstrapCluster(rc, store, store, snaps, cfg.Transport, conf); err != nil {
				store.Close()
				return nil, fmt.Errorf("raftnode: bootstrap: %w", err)
			}
		}
	}
	var logs raft.LogStore = store
	if cfg.WrapLogStore != nil {
		logs = cfg.WrapLogStore(store)
	}
	var stable raft.StableStore = store
	if cfg.WrapStableStore != nil {
		stable = cfg.WrapStableStore(store)
	}
	r, err := newRaft(rc, cfg, logs, stable, snaps)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("raftnode: starting raft (a snapshot in %s may be corrupt or of another cluster): %w", filepath.Join(cfg.Dir, "snapshots"), err)
	}
	return &Node{Raft: r, store: store}, nil
}

// newRaft is raft.NewRaft with a panic turned into an error. NewRaft
// writes the term it starts in, and hashicorp/raft panics when that write
// fails: a full or failing disk would kill the node at start with a stack
// trace instead of a message. (A failed term write once the node runs
// still panics, on raft's own goroutine: fail-stop, the safe answer.)
func newRaft(rc *raft.Config, cfg Config, logs raft.LogStore, stable raft.StableStore, snaps raft.SnapshotStore) (r *raft.Raft, err error) {
	defer func() {
		if p := recover(); p != nil {
			r, err = nil, fmt.Errorf("raft panicked starting (is the disk under %s full or failing?): %v", cfg.Dir, p)
		}
	}()
	return raft.NewRaft(rc, cfg.FSM, logs, stable, snaps, cfg.Transport)
}

// openStore opens the bolt store and reads it through once. bbolt panics on
// some kinds of page corruption, and faults on a truncated file (its mmap
// ends before a page it follows); both are turned into an error here, so the
// node refuses to start with a message instead of dying on a signal.
func openStore(path string) (store *raftboltdb.BoltStore, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if store != nil {
				store.Close()
			}
			store, err = nil, fmt.Errorf("bolt panicked reading it: %v", r)
		}
	}()
	if err := checkBoltFile(path); err != nil {
		return nil, err
	}
	store, err = raftboltdb.New(raftboltdb.Options{Path: path, BoltOptions: &bbolt.Options{Timeout: 2 * time.Second}})
	if err != nil {
		return nil, err
	}
	if err := checkStore(store); err != nil {
		store.Close()
		return nil, err
	}
	return store, nil
}

// checkStore reads every log entry once, so that a damaged log is found at
// start, not when a follower asks for an old entry.
func checkStore(s *raftboltdb.BoltStore) error {
	first, err := s.FirstIndex()
	if err != nil {
		return err
	}
	last, err := s.LastIndex()
	if err != nil {
		return err
	}
	if first == 0 && last == 0 {
		return nil
	}
	var l raft.Log
	for i := first; i <= last; i++ {
		if err := s.GetLog(i, &l); err != nil {
			return fmt.Errorf("log entry %d of %d..%d: %w", i, first, last, err)
		}
	}
	return nil
}

// LogTerm returns the term of the entry at index in the node's log store,
// and false if the store holds no entry there (never written, compacted
// into a snapshot, or truncated away as an uncommitted entry the leader
// replaced).
func (n *Node) LogTerm(index uint64) (term uint64, ok bool, err error) {
	var l raft.Log
	switch err := n.store.GetLog(index, &l); {
	case errors.Is(err, raft.ErrLogNotFound):
		return 0, false, nil
	case err != nil:
		return 0, false, err
	}
	return l.Term, true, nil
}

// Close shuts Raft down and closes the stores.
func (n *Node) Close() error {
	err := n.Raft.Shutdown().Error()
	return errors.Join(err, n.store.Close())
}
