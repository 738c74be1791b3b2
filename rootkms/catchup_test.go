package rootkms_test

import (
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cairnkms/cairn/rootkms"
	"github.com/hashicorp/raft"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestartedReplicaDoesNotDenyWhatExists: a voter restarted while its
// peers are down holds the root key but has applied nothing of its log yet
// (Raft applies the entries after the last snapshot only once a leader
// commits them). Asked for a region's key from its own state, it must not
// answer NotFound for a region the cluster has: it answers Unavailable,
// saying it is catching up, and serves the region once a leader is back
// and it has caught up. A region that does not exist is NotFound then.
func TestRestartedReplicaDoesNotDenyWhatExists(t *testing.T) {
	c := newChain(t)
	rs, r1 := c.restartedAlone()
	_, err := c.unwrap(kmsEast, r1.api, "us-east")
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "still catching up with the cluster") {
		t.Fatalf("UnwrapRegionKey(us-east) from a voter restarted alone = %v, want Unavailable saying it is catching up (not NotFound: the region exists)", err)
	}

	c.restart(rs[1])
	deadline := time.Now().Add(20 * time.Second)
	for {
		m, err := c.unwrap(kmsEast, r1.api, "us-east")
		if err == nil {
			if len(m.GetVersions()) == 0 {
				t.Fatalf("UnwrapRegionKey(us-east) after catching up gave no key version")
			}
			break
		}
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			t.Fatalf("UnwrapRegionKey(us-east) from the restarted voter with a peer back = %v, want the region's key once caught up", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := c.unwrap("spiffe://cairn.test/kms/eu-west/kms-1", r1.api, "eu-west"); status.Code(err) != codes.NotFound {
		t.Errorf("UnwrapRegionKey(eu-west, never created) once caught up = %v, want NotFound", err)
	}
}

// restartedAlone starts the cluster, creates us-east, stops every replica
// once all have applied it, and restarts the first voter alone (holding the
// root key, with no peer to learn a leader or the commit index from).
func (c *chain) restartedAlone() (rs []*replica, r1 *replica) {
	c.t.Helper()
	rs = c.cluster()
	createRegion(c.t, c.client(regionctlID, addrs(rs)...), "us-east")
	waitCaughtUp(c.t, rs)
	for _, r := range rs {
		r.stop()
	}
	r1 = c.restart(rs[0])
	if err := r1.srv.WaitReady(bg(c.t)); err != nil {
		c.t.Fatal(err)
	}
	return rs, r1
}

// TestReadyOnlyOnceCaughtUp: a restarted voter that knows its leader but
// has not applied what the leader committed (its FSM is held back here by a
// log store whose reads stall, as a slow disk or a long snapshot install
// would) is not ready: health would send callers to a replica answering
// from a state that lacks what the cluster has. Once it has applied up to
// the commit index it is ready, and stays so.
func TestReadyOnlyOnceCaughtUp(t *testing.T) {
	c := newChain(t)
	stalled := &stallingReads{}
	c.configure = func(id string, cfg *rootkms.Config) {
		if id == "rootkms-1" {
			cfg.WrapLogStore = func(s raft.LogStore) raft.LogStore { stalled.LogStore = s; return stalled }
		}
	}
	// Restarted alone, it knows no leader; then its log reads stall, and a
	// peer comes back.
	rs, r1 := c.restartedAlone()
	raft1 := r1.srv.Raft()
	start := raft1.LastIndex() // its log at start, not applied yet
	release := stalled.stall()
	defer release()
	c.restart(rs[1])

	// It learns its leader (the peer, or itself once elected), and applies
	// nothing of its log.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, leader := raft1.LeaderWithID(); leader != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the restarted voter learned of no leader in 20s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for range 20 {
		if ok, why := r1.srv.Readiness(); ok || !strings.Contains(why, "still catching up") {
			t.Fatalf("Readiness of a voter that knows its leader (it is a %s) but applied %d of the %d entries of its log = %t, %q; want not ready, catching up",
				raft1.State(), raft1.AppliedIndex(), start, ok, why)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if stalled.stalls.Load() == 0 {
		t.Fatal("no log read stalled: the test did not hold the replica back")
	}

	release()
	c.requireReadyAndServing(r1, "after its log reads resumed")
}

// requireReadyAndServing waits up to 20s for r to be ready, then has it
// unwrap us-east's key.
func (c *chain) requireReadyAndServing(r *replica, when string) {
	c.t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ok, why := r.srv.Readiness()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s is not ready 20s %s: %s", r.id, when, why)
		}
	}
	if _, err := c.unwrap(kmsEast, r.api, "us-east"); err != nil {
		c.t.Errorf("UnwrapRegionKey(us-east) from %s, ready %s = %v", r.id, when, err)
	}
}

// stallingReads is a log store whose GetLog waits, while stalled, until it
// is released.
type stallingReads struct {
	raft.LogStore
	mu     sync.Mutex
	gate   chan struct{} // nil: reads pass
	stalls atomic.Int64
}

// stall makes every GetLog wait until the returned release is called (once
// or more).
func (s *stallingReads) stall() (release func()) {
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate = gate
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.gate = nil
			s.mu.Unlock()
			close(gate)
		})
	}
}

func (s *stallingReads) GetLog(index uint64, l *raft.Log) error {
	s.mu.Lock()
	gate := s.gate
	s.mu.Unlock()
	if gate != nil {
		s.stalls.Add(1)
		<-gate
	}
	return s.LogStore.GetLog(index, l)
}

// TestReadyAfterUncommittedTailReplaced: a leader appends entries it cannot
// commit (its followers' log stores refuse them) and stops. The others
// elect a leader whose log ends before them, and the cluster goes quiet.
// Restarted, the old leader's log ends past anything the cluster will
// write soon; the new leader replaces that uncommitted tail. The replica
// must become ready without another write: the index its log ended at when
// it started will not be reached.
func TestReadyAfterUncommittedTailReplaced(t *testing.T) {
	c := newChain(t)
	stores := map[string]*refusingLogs{}
	c.configure = func(id string, cfg *rootkms.Config) {
		s := &refusingLogs{}
		stores[id] = s
		cfg.WrapLogStore = func(l raft.LogStore) raft.LogStore { s.LogStore = l; return s }
	}
	rs := c.cluster()
	createRegion(t, c.client(regionctlID, addrs(rs)...), "us-east")
	waitCaughtUp(t, rs)

	var old *replica
	var others []*replica
	for _, r := range rs[:3] { // the voters
		if r.srv.Raft().State() == raft.Leader {
			old = r
		} else {
			others = append(others, r)
		}
	}
	if old == nil {
		t.Fatal("no voter leads")
	}
	for _, r := range others {
		stores[r.id].refuse.Store(true)
	}
	// Entries the leader appends and cannot commit. Every write through the
	// API starts with a Raft barrier and holds the write lock until it is
	// applied, so the API appends one at most: the test proposes two
	// barriers itself, as a leader's no-op and a write's barrier would be.
	before := old.srv.Raft().LastIndex()
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() { _ = old.srv.Raft().Barrier(time.Second).Error() })
	}
	deadline := time.Now().Add(10 * time.Second)
	for old.srv.Raft().LastIndex() < before+2 {
		if time.Now().After(deadline) {
			t.Fatalf("the leader's log reached %d, want %d: it did not append both barriers", old.srv.Raft().LastIndex(), before+2)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if a := old.srv.Raft().AppliedIndex(); a > before {
		t.Fatalf("the leader applied up to %d with its followers storing nothing past %d", a, before)
	}
	oldLast := old.srv.Raft().LastIndex()
	old.stop()
	wg.Wait()
	for _, r := range others {
		stores[r.id].refuse.Store(false)
	}

	// The others elect a leader, which commits its no-op; nothing else is
	// written.
	var leader *replica
	deadline = time.Now().Add(20 * time.Second)
	for leader == nil {
		for _, r := range others {
			if r.srv.Raft().State() == raft.Leader {
				leader = r
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the remaining voters elected no leader in 20s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for nr := leader.srv.Raft(); nr.AppliedIndex() < nr.LastIndex(); { // its no-op, committed
		if time.Now().After(deadline) {
			t.Fatalf("the new leader applied %d of its log's %d entries in 20s", nr.AppliedIndex(), nr.LastIndex())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := leader.srv.Raft().LastIndex(); got >= oldLast {
		t.Fatalf("the new leader's log reaches %d, the old leader's %d: the old leader's tail is not past the cluster's log, so the test shows nothing", got, oldLast)
	}

	c.requireReadyAndServing(c.restart(old), "after its restart on a quiet cluster")
}

// refusingLogs is a log store whose StoreLogs fails, storing nothing, while
// refuse is set.
type refusingLogs struct {
	raft.LogStore
	refuse atomic.Bool
}

func (s *refusingLogs) StoreLogs(logs []*raft.Log) error {
	if s.refuse.Load() {
		return errors.New("refusingLogs: refused")
	}
	return s.LogStore.StoreLogs(logs)
}

func (s *refusingLogs) StoreLog(l *raft.Log) error { return s.StoreLogs([]*raft.Log{l}) }
