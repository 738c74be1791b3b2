package rootkms

// Every use of Prometheus in this package is in this file (and the type of
// Config.Registry).

import (
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairnkms/cairn/rootkms/fsm"
)

// metrics are a replica's Prometheus metrics, in a registry of its own. The
// gauges are read from Raft and the FSM at scrape time (raft's lock-free
// getters, not Stats, which formats every value and the configuration);
// only the apply latency and the snapshot time are recorded as they happen.
type metrics struct {
	// reg is the server's registry, which its gRPC server's own metrics
	// (grpcserver.Options.Registerer) join.
	reg   *prometheus.Registry
	apply prometheus.Histogram
	// snapshotAt is when this replica last took or restored a snapshot
	// (unix nanoseconds; 0: not since it started).
	snapshotAt atomic.Int64
}

// newMetrics registers s's metrics in reg (nil: a new registry).
func newMetrics(s *Server, reg *prometheus.Registry) (*metrics, error) {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		reg: reg,
		apply: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "cairn", Subsystem: "rootkms", Name: "apply_duration_seconds",
			Help: "Time a write takes on the leader from proposal to applied by its state machine (writes Raft accepted; refusals before proposing are not counted).",
			// 250µs .. ~8s: a commit takes a quorum round trip and an fsync;
			// ApplyTimeout (5s) bounds it.
			Buckets: prometheus.ExponentialBuckets(250e-6, 2, 16)}),
	}
	for _, c := range []prometheus.Collector{m.apply, &raftCollector{s: s}} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("rootkms: registering metrics: %w", err)
		}
	}
	return m, nil
}

// applied records a write that took from start to now to apply.
func (m *metrics) applied(start time.Time) { m.apply.Observe(time.Since(start).Seconds()) }

// snapshotted records a snapshot taken or restored now.
func (m *metrics) snapshotted() { m.snapshotAt.Store(time.Now().UnixNano()) }

// timedFSM is the replica's FSM as Raft sees it: it records when a snapshot
// was persisted or restored (for snapshot_age_seconds) and otherwise is the
// FSM itself.
type timedFSM struct {
	*fsm.FSM
	m *metrics
}

// Snapshot implements raft.FSM.
func (f timedFSM) Snapshot() (raft.FSMSnapshot, error) {
	snap, err := f.FSM.Snapshot()
	if err != nil {
		return nil, err
	}
	return timedSnapshot{FSMSnapshot: snap, m: f.m}, nil
}

// Restore implements raft.FSM.
func (f timedFSM) Restore(rc io.ReadCloser) error {
	if err := f.FSM.Restore(rc); err != nil {
		return err
	}
	f.m.snapshotted()
	return nil
}

type timedSnapshot struct {
	raft.FSMSnapshot
	m *metrics
}

// Persist implements raft.FSMSnapshot: the snapshot is taken once it is
// persisted.
func (s timedSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := s.FSMSnapshot.Persist(sink); err != nil {
		return err
	}
	s.m.snapshotted()
	return nil
}

var (
	descLeader = prometheus.NewDesc("cairn_rootkms_raft_leader",
		"1 if this replica is the Raft leader.", nil, nil)
	descHasLeader = prometheus.NewDesc("cairn_rootkms_raft_has_leader",
		"1 if this replica knows a Raft leader (itself or another).", nil, nil)
	descTerm = prometheus.NewDesc("cairn_rootkms_raft_term",
		"This replica's current Raft term.", nil, nil)
	descCommit = prometheus.NewDesc("cairn_rootkms_raft_commit_index",
		"The highest Raft log index this replica knows committed.", nil, nil)
	descApplied = prometheus.NewDesc("cairn_rootkms_raft_applied_index",
		"The highest Raft log index handed to this replica's state machine (commit_index - applied_index is its apply lag).", nil, nil)
	descLastContact = prometheus.NewDesc("cairn_rootkms_raft_last_contact_seconds",
		"Seconds since this replica last heard from a leader (since it started, if never); 0 on the leader.", nil, nil)
	descSnapshotAge = prometheus.NewDesc("cairn_rootkms_snapshot_age_seconds",
		"Seconds since this replica last took or restored a Raft snapshot (since it started, if neither).", nil, nil)
	descRegions = prometheus.NewDesc("cairn_rootkms_regions",
		"Regions in this replica's state.", nil, nil)
	descKeysets = prometheus.NewDesc("cairn_rootkms_keysets",
		"Keysets in this replica's state.", nil, nil)
	descReady = prometheus.NewDesc("cairn_rootkms_ready",
		"1 when the replica is ready (root key loaded, a member of a cluster with a known leader), as Readiness reports.", nil, nil)
)

// raftCollector reads the replica's Raft and FSM state at scrape time.
type raftCollector struct {
	s *Server
}

func (c *raftCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLeader, descHasLeader, descTerm, descCommit, descApplied, descLastContact,
		descSnapshotAge, descRegions, descKeysets, descReady} {
		ch <- d
	}
}

func (c *raftCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	gauge := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	var leader, hasLeader, term, commit, applied, lastContact, snapshotAge float64
	if r := s.running.Load(); r != nil {
		now, started := time.Now(), time.Unix(0, s.startedAt.Load())
		state := r.State()
		addr, _ := r.LeaderWithID()
		leader, hasLeader = b(state == raft.Leader), b(addr != "")
		term, commit, applied = float64(r.CurrentTerm()), float64(r.CommitIndex()), float64(r.AppliedIndex())
		if state != raft.Leader {
			last := r.LastContact()
			if last.IsZero() {
				last = started
			}
			lastContact = max(0, now.Sub(last).Seconds())
		}
		snap := started
		if at := s.metrics.snapshotAt.Load(); at != 0 {
			snap = time.Unix(0, at)
		}
		snapshotAge = max(0, now.Sub(snap).Seconds())
	}
	st := s.fsm.State()
	ready, _ := s.Readiness()
	gauge(descLeader, leader)
	gauge(descHasLeader, hasLeader)
	gauge(descTerm, term)
	gauge(descCommit, commit)
	gauge(descApplied, applied)
	gauge(descLastContact, lastContact)
	gauge(descSnapshotAge, snapshotAge)
	gauge(descRegions, float64(st.NumRegions()))
	gauge(descKeysets, float64(st.NumKeysets()))
	gauge(descReady, b(ready))
}
