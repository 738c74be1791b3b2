package rootkms_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// This file holds the disk-fault tests of the root KMS's Raft storage:
// lost un-fsynced writes at a crash (TestCrashLosesOnlyUnsyncedWrites) and a
// leader whose disk is full or whose fsync fails (TestLeaderDiskFault*). They
// run real replicas with real Raft over TCP on 127.0.0.1, whose bolt store
// is wrapped (rootkms.Config.WrapLogStore and WrapStableStore) by a
// crashStore.
//
// The storage model. raft-boltdb commits (and so fsyncs) every StoreLogs
// and every Set/SetUint64 before it returns: what a call has returned for
// is durable, and a kill -9 can lose only a write still in flight. Bolt
// commits a batch as one transaction, so it loses such a batch whole; a
// log store without atomic batches (an append-only log, a torn write) can
// instead keep a prefix of it, and Raft must cope with both. A crashStore
// can hold one write in flight and then "crash": drop the held batch, or
// keep a prefix of it, and from that instant on let nothing more reach the
// bolt file.

// errCrashed is what a crashed store answers writes with.
var errCrashed = errors.New("crashStore: the replica crashed; nothing written")

// heldWrite is one write held in flight by a crashStore.
type heldWrite struct {
	batch []*raft.Log // the StoreLogs batch (nil for a stable write)
	key   string      // the stable-store key (empty for StoreLogs)
	// decide gets n once the store has crashed keeping the first n
	// entries of the batch.
	decide chan int
}

// stableJournal is what one replica's bolt file holds of its term and vote,
// across the replica's restarts, as the crashStore saw the writes return. A
// vote is what raft reads back after a restart: LastVoteTerm and
// LastVoteCand as they are on disk together.
type stableJournal struct {
	mu       sync.Mutex
	term     uint64            // CurrentTerm on disk
	voteTerm uint64            // LastVoteTerm on disk
	cand     string            // LastVoteCand on disk
	votes    map[uint64]string // term -> the candidate the disk says it voted for
	// tentative is the term of a vote whose LastVoteCand write is pending
	// (0: none).
	tentative uint64
	problems  []string // a term going backwards, two votes in one term
}

func (j *stableJournal) wrote(key string, val []byte, n uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	switch key {
	case "CurrentTerm":
		if n < j.term {
			j.problems = append(j.problems, fmt.Sprintf("CurrentTerm written %d after %d", n, j.term))
		}
		j.term = n
		return
	case "LastVoteTerm":
		// raft writes a vote as LastVoteTerm, then LastVoteCand. Between
		// the two the disk says "voted for the previous candidate in this
		// term", and that is what raft acts on if it crashes there: a
		// tentative vote, which the LastVoteCand write replaces.
		j.voteTerm = n
		if j.cand != "" {
			if _, ok := j.votes[n]; !ok {
				j.votes[n] = j.cand
				j.tentative = n
			}
		}
		return
	case "LastVoteCand":
		j.cand = string(val)
	default:
		return
	}
	if j.voteTerm == 0 {
		return
	}
	if prev, ok := j.votes[j.voteTerm]; ok && prev != j.cand && j.tentative != j.voteTerm {
		j.problems = append(j.problems, fmt.Sprintf("voted for %s and %s in term %d", prev, j.cand, j.voteTerm))
	}
	j.votes[j.voteTerm] = j.cand
	j.tentative = 0
}

// settle makes a tentative vote final: the replica crashed between the two
// writes of a vote and restarts with it on disk.
func (j *stableJournal) settle() {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.tentative = 0
}

// crashStore is one incarnation of a replica's Raft log and stable store: the
// bolt store, with a stall, a crash and a failpoint in front of its writes.
// It implements raft.LogStore and raft.StableStore (their methods do not
// clash).
type crashStore struct {
	logs    raft.LogStore
	stable  raft.StableStore
	journal *stableJournal

	mu       sync.Mutex
	crashed  bool
	matchLog func([]*raft.Log) bool // stall the next StoreLogs it accepts
	matchKey string                 // stall the next stable write of this key
	stalls   chan *heldWrite        // the stalled write (one at a time)
	current  *heldWrite
	failLogs error                  // failpoint: StoreLogs answers it and writes nothing
	failFrom func([]*raft.Log) bool // the failpoint waits for a batch it accepts
	failures int                    // StoreLogs calls the failpoint refused
}

func newCrashStore(j *stableJournal) *crashStore {
	return &crashStore{journal: j, stalls: make(chan *heldWrite, 1)}
}

// armLogs stalls the next StoreLogs whose batch match accepts.
func (s *crashStore) armLogs(match func([]*raft.Log) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.matchLog = match
}

// armStable stalls the next stable-store write of key.
func (s *crashStore) armStable(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.matchKey = key
}

// setFail makes StoreLogs fail with err and write nothing, like a full
// disk or a failing fsync (nil: clears the failpoint). The failpoint starts
// at the first batch from accepts (nil: at once), and from then on every
// StoreLogs fails.
func (s *crashStore) setFail(err error, from func([]*raft.Log) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failLogs, s.failFrom = err, from
}

func (s *crashStore) failed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failures
}

// waitStall waits for the armed write to stall.
func (s *crashStore) waitStall(t *testing.T, what string) *heldWrite {
	t.Helper()
	select {
	case st := <-s.stalls:
		return st
	case <-time.After(20 * time.Second):
		t.Fatalf("no %s stalled within 20s", what)
		return nil
	}
}

// crash is the crash instant: nothing written from now on reaches the bolt
// file, the stalled write (if any) persists only its first keep entries
// (a stable write: nothing) and fails, and every later write fails or
// is discarded (see stableWrite).
func (s *crashStore) crash(keep int) {
	s.mu.Lock()
	s.crashed = true
	st := s.current
	s.current = nil
	s.mu.Unlock()
	if st == nil {
		return
	}
	keep = min(max(keep, 0), len(st.batch))
	if keep > 0 {
		if err := s.logs.StoreLogs(st.batch[:keep]); err != nil {
			panic(fmt.Sprintf("crashStore: writing the kept prefix: %v", err))
		}
	}
	st.decide <- keep
}

// hold holds a write if the store is armed for it (match), until the store
// crashes. It reports whether the store crashed: then the write must fail,
// having written nothing but the prefix crash kept.
func (s *crashStore) hold(match func(*crashStore) bool, batch []*raft.Log, key string) (crashed bool) {
	s.mu.Lock()
	if s.crashed {
		s.mu.Unlock()
		return true
	}
	if !match(s) {
		s.mu.Unlock()
		return false
	}
	st := &heldWrite{batch: batch, key: key, decide: make(chan int, 1)}
	select {
	case s.stalls <- st:
	default: // an earlier held write was never collected: do not hold this one
		s.mu.Unlock()
		return false
	}
	s.current = st
	s.mu.Unlock()
	<-st.decide
	return true
}

func (s *crashStore) FirstIndex() (uint64, error)        { return s.logs.FirstIndex() }
func (s *crashStore) LastIndex() (uint64, error)         { return s.logs.LastIndex() }
func (s *crashStore) GetLog(i uint64, l *raft.Log) error { return s.logs.GetLog(i, l) }
func (s *crashStore) StoreLog(l *raft.Log) error         { return s.StoreLogs([]*raft.Log{l}) }
func (s *crashStore) Get(k []byte) ([]byte, error)       { return s.stable.Get(k) }
func (s *crashStore) GetUint64(k []byte) (uint64, error) { return s.stable.GetUint64(k) }

func (s *crashStore) DeleteRange(lo, hi uint64) error {
	return s.writeMatch(nil, "", func() error { return s.logs.DeleteRange(lo, hi) })
}

func (s *crashStore) Set(k, v []byte) error {
	return s.stableWrite(k, v, 0, func() error { return s.stable.Set(k, v) })
}

func (s *crashStore) SetUint64(k []byte, v uint64) error {
	return s.stableWrite(k, nil, v, func() error { return s.stable.SetUint64(k, v) })
}

func (s *crashStore) StoreLogs(logs []*raft.Log) error {
	s.mu.Lock()
	if fail := s.failLogs; fail != nil && !s.crashed && (s.failFrom == nil || s.failFrom(logs)) {
		s.failFrom = nil
		s.failures++
		s.mu.Unlock()
		return fail
	}
	s.mu.Unlock()
	return s.writeMatch(logs, "", func() error { return s.logs.StoreLogs(logs) })
}

// writeMatch runs a log write f unless the store crashed (before or while
// the write was stalled).
func (s *crashStore) writeMatch(logs []*raft.Log, key string, f func() error) error {
	crashed := s.hold(func(s *crashStore) bool {
		if logs == nil || s.matchLog == nil || !s.matchLog(logs) {
			return false
		}
		s.matchLog = nil
		return true
	}, logs, key)
	if crashed {
		return errCrashed
	}
	return f()
}

// stableWrite runs a stable write f unless the store crashed, and journals
// it once bolt returned. After the crash a CurrentTerm write is discarded
// but answered nil: raft panics on a failed term write ("failed to save
// current term"), which would kill the test binary, and the discarded term
// only lives on in the memory of a replica that is already dead to the
// model (it is being shut down, and cannot vote: vote writes fail). Every
// other stable write fails, so the dead replica grants no vote.
func (s *crashStore) stableWrite(k, v []byte, n uint64, f func() error) error {
	key := string(k)
	crashed := s.hold(func(s *crashStore) bool {
		if s.matchKey == "" || s.matchKey != key {
			return false
		}
		s.matchKey = ""
		return true
	}, nil, key)
	if crashed {
		if key == "CurrentTerm" {
			return nil
		}
		return errCrashed
	}
	if err := f(); err != nil {
		return err
	}
	s.journal.wrote(key, v, n)
	return nil
}

// crashNode is one replica of a crashCluster, across its restarts (same
// data dir, API and Raft addresses).
type crashNode struct {
	id                string
	api, raft         string
	journal           *stableJournal
	store             *crashStore // the running incarnation's
	rep               *replica    // nil while down
	incarnation       int
	startTerm, lastIn uint64 // term read back at the last restart, and the journal's before it
}

type observedLeadership struct {
	id   string
	term uint64
}

// crashCluster is three voters whose Raft stores are crashStores, a load of
// region key rotations and the acknowledgements it got.
type crashCluster struct {
	t     *testing.T
	c     *chain
	nodes []*crashNode
	cl    *rootkmsclient.Client

	formed      atomic.Bool
	lmu         sync.Mutex
	leaderships []observedLeadership // every node that took leadership after the cluster formed, with its term
}

func newCrashCluster(t *testing.T) *crashCluster {
	t.Helper()
	cc := &crashCluster{t: t, c: newChain(t)}
	for i := range 3 {
		n := &crashNode{id: fmt.Sprintf("rootkms-%d", i+1), journal: &stableJournal{votes: map[uint64]string{}}}
		cc.nodes = append(cc.nodes, n)
		var join []string
		if i > 0 {
			join = []string{cc.nodes[0].api}
		}
		cc.start(n, i == 0, join, nil)
	}
	ctx := bg(t)
	for _, n := range cc.nodes {
		if err := n.rep.srv.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		f := cc.nodes[0].rep.srv.Raft().GetConfiguration()
		if f.Error() == nil && len(f.Configuration().Servers) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cluster never reached 3 members")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cc.formed.Store(true)
	var api []string
	for _, n := range cc.nodes {
		api = append(api, n.api)
	}
	cc.cl = cc.c.client(regionctlID, api...)
	return cc
}

// start starts (or restarts) n on its data dir and addresses; arm, if not
// nil, arms the new incarnation's store before Raft opens it.
func (cc *crashCluster) start(n *crashNode, bootstrap bool, join []string, arm func(*crashStore)) {
	t := cc.t
	t.Helper()
	n.incarnation++
	dir := filepath.Join(cc.c.dir, n.id)
	log, err := audit.Open(filepath.Join(dir, fmt.Sprintf("audit-%d.log", n.incarnation)), audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	store := newCrashStore(n.journal)
	if arm != nil {
		arm(store)
	}
	srv, err := rootkms.New(rootkms.Config{
		ID: n.id, DataDir: filepath.Join(dir, "raft"), Bootstrap: bootstrap, Join: join,
		Manifest: cc.c.manifest, Distributors: []string{cc.c.distAddr},
		Source: cc.c.pki.Source("spiffe://cairn.test/rootkms/global/" + n.id), Audit: log,
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond, LeaderLeaseTimeout: 100 * time.Millisecond,
		WrapLogStore:    func(s raft.LogStore) raft.LogStore { store.logs = s; return store },
		WrapStableStore: func(s raft.StableStore) raft.StableStore { store.stable = s; return store },
	})
	if err != nil {
		t.Fatal(err)
	}
	apiLis, raftLis := listenAt(t, n.api), listenAt(t, n.raft)
	n.api, n.raft = apiLis.Addr().String(), raftLis.Addr().String()
	n.journal.settle()
	n.journal.mu.Lock()
	n.lastIn = n.journal.term
	n.journal.mu.Unlock()
	if err := srv.Start(apiLis, raftLis); err != nil {
		t.Fatal(err)
	}
	n.startTerm = srv.Raft().CurrentTerm()
	id := n.id
	srv.Raft().RegisterObserver(raft.NewObserver(nil, false, func(o *raft.Observation) bool {
		// The filter runs on raft's goroutine as the node takes
		// leadership, so CurrentTerm is the term it leads in.
		if lo, ok := o.Data.(raft.LeaderObservation); ok && lo.LeaderID == raft.ServerID(id) && cc.formed.Load() {
			cc.lmu.Lock()
			cc.leaderships = append(cc.leaderships, observedLeadership{id: id, term: o.Raft.CurrentTerm()})
			cc.lmu.Unlock()
		}
		return false
	}))
	n.store = store
	r := &replica{srv: srv, id: n.id, api: n.api, dataDir: filepath.Join(dir, "raft")}
	n.rep = r
	t.Cleanup(func() {
		store.crash(0) // releases a write still stalled, so Close cannot hang on it
		r.stop()
		log.Close()
	})
}

// listenAt listens on addr, or on a new loopback port if addr is empty. A
// restarted replica must come back on its addresses: the others know it by
// them.
func listenAt(t *testing.T, addr string) net.Listener {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var err error
	for range 50 {
		var lis net.Listener
		if lis, err = net.Listen("tcp", addr); err == nil {
			return lis
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("listening on %s: %v", addr, err)
	return nil
}

// kill crashes n at the instant its stalled write (if any) was in flight,
// keeping keep entries of it, and shuts the replica down without a
// snapshot (Close: gRPC stopped, Raft shut down, bolt closed; none of them
// writes to the bolt file, which the crashed store no longer lets through).
func (cc *crashCluster) kill(n *crashNode, keep int) {
	n.store.crash(keep)
	n.rep.stop()
	n.rep = nil
}

// lastDurableIndex opens a stopped replica's bolt file and returns its last
// log index.
func (cc *crashCluster) lastDurableIndex(n *crashNode) uint64 {
	cc.t.Helper()
	s, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cc.c.dir, n.id, "raft", "raft.db"), BoltOptions: &bbolt.Options{ReadOnly: true, Timeout: 2 * time.Second}})
	if err != nil {
		cc.t.Fatal(err)
	}
	defer s.Close()
	last, err := s.LastIndex()
	if err != nil {
		cc.t.Fatal(err)
	}
	return last
}

func (cc *crashCluster) node(id string) *crashNode {
	for _, n := range cc.nodes {
		if n.id == id {
			return n
		}
	}
	return nil
}

// leader waits for a running node that leads and is not one of not.
func (cc *crashCluster) leader(not ...*crashNode) *crashNode {
	cc.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		for _, n := range cc.nodes {
			if n.rep != nil && !slices.Contains(not, n) && n.rep.srv.Raft().State() == raft.Leader {
				return n
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	cc.t.Fatal("no leader within 20s")
	return nil
}

func (cc *crashCluster) follower() *crashNode {
	l := cc.leader()
	for _, n := range cc.nodes {
		if n != l && n.rep != nil {
			return n
		}
	}
	cc.t.Fatal("no running follower")
	return nil
}

// hasCommand reports whether a batch holds a client command (not a
// barrier or no-op).
func hasCommand(b []*raft.Log) bool {
	return slices.ContainsFunc(b, func(l *raft.Log) bool { return l.Type == raft.LogCommand })
}

// crashAck is an acknowledged region key rotation or creation: the version it
// returned and that version's creation time, which tells it from a version
// of the same number made by a later write if the first were lost.
type crashAck struct {
	region  string
	version uint32
	created time.Time
}

// writeLoad is a bounded write load: one writer per region, each rotating its
// region's key (one writer per region, so a retried write's answer, the
// region as it is now, is that write's own version), and one creating
// regions.
type writeLoad struct {
	mu       sync.Mutex
	acks     []crashAck
	created  []string // every region a CreateRegion was sent for
	failures []error
	gate     sync.RWMutex // writers hold it read-locked for each write; pause takes it
	stop     chan struct{}
	once     sync.Once
	wg       sync.WaitGroup
}

// maxLoadOps bounds each writer's writes.
const maxLoadOps = 2000

func (cc *crashCluster) startLoad(regions ...string) *writeLoad {
	l := &writeLoad{stop: make(chan struct{})}
	for _, region := range regions {
		createRegion(cc.t, cc.cl, region)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for range maxLoadOps {
				select {
				case <-l.stop:
					return
				default:
				}
				l.gate.RLock()
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				r, _, err := regionOp(ctx, cc.cl, rotateOp(region))
				cancel()
				l.gate.RUnlock()
				l.mu.Lock()
				if err != nil {
					l.failures = append(l.failures, err)
				} else {
					l.acks = append(l.acks, ackOf(region, r))
				}
				l.mu.Unlock()
				if err != nil {
					time.Sleep(50 * time.Millisecond) // an election is running: do not spin
				}
			}
		}()
	}
	// One writer creates regions, each under a new name: a create whose
	// outcome stayed unknown is not retried under its name.
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for i := range maxLoadOps {
			select {
			case <-l.stop:
				return
			default:
			}
			region := fmt.Sprintf("made-%d", i)
			l.gate.RLock()
			l.mu.Lock()
			l.created = append(l.created, region)
			l.mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			r, _, err := regionOp(ctx, cc.cl, createOp(region))
			cancel()
			l.gate.RUnlock()
			l.mu.Lock()
			if err != nil {
				l.failures = append(l.failures, err)
			} else {
				l.acks = append(l.acks, ackOf(region, r))
			}
			l.mu.Unlock()
			if err != nil {
				time.Sleep(50 * time.Millisecond)
			} else {
				time.Sleep(20 * time.Millisecond) // fewer creates than rotations
			}
		}
	}()
	cc.t.Cleanup(l.halt)
	return l
}

func ackOf(region string, r *rootkmsv1.Region) crashAck {
	a := crashAck{region: region, version: r.GetPrimaryVersion()}
	for _, v := range r.GetVersions() {
		if v.GetKeyId() == a.version {
			a.created = v.GetCreatedAt().AsTime()
		}
	}
	return a
}

func (l *writeLoad) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acks)
}

// waitAcks waits until the load has n more acknowledgements than now.
func (l *writeLoad) waitAcks(t *testing.T, n int, what string) {
	t.Helper()
	want := l.count() + n
	deadline := time.Now().Add(30 * time.Second)
	for l.count() < want {
		if time.Now().After(deadline) {
			l.mu.Lock()
			t.Fatalf("%s: %d writes acknowledged, want %d within 30s; last failures: %v", what, len(l.acks), want, l.failures[max(0, len(l.failures)-3):])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// halt stops the writers and waits for them.
func (l *writeLoad) halt() {
	l.once.Do(func() { close(l.stop) })
	l.wg.Wait()
}

// crashRegionView is one replica's own copy of a region: each version's
// creation time and a digest of its key (never the key).
type crashRegionView struct {
	created map[uint32]time.Time
	digest  map[uint32][32]byte
}

// view reads region from n's local state (UnwrapRegionKey, as a KMS of the
// region).
func (cc *crashCluster) view(n *crashNode, region string) (crashRegionView, bool) {
	kmsID := "spiffe://cairn.test/kms/" + region + "/kms-1"
	cc.t.Helper()
	conn, err := grpc.NewClient(n.api, grpc.WithTransportCredentials(cc.c.pki.ClientCredentials(kmsID)))
	if err != nil {
		cc.t.Fatal(err)
	}
	defer conn.Close()
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		cc.t.Fatal(err)
	}
	defer r.Close()
	resp, err := rootkmsv1.NewRootKMSClient(conn).UnwrapRegionKey(bg(cc.t), &rootkmsv1.UnwrapRegionKeyRequest{Region: region, Recipient: r.PublicKey()})
	if status.Code(err) == codes.NotFound {
		return crashRegionView{}, false
	}
	if err != nil {
		cc.t.Fatalf("UnwrapRegionKey(%s) on %s = %v", region, n.id, err)
	}
	info, _ := hpkeseal.Info("cairn/rootkms/v1/region-key", region, kmsID)
	plain, err := r.Open(resp.GetSealedKeys(), info)
	if err != nil {
		cc.t.Fatal(err)
	}
	defer plain.Wipe()
	b := plain.Data()
	defer clear(b)
	var m rootkmsv1.RegionKeyMaterial
	if err := proto.Unmarshal(b, &m); err != nil {
		cc.t.Fatal(err)
	}
	v := crashRegionView{created: map[uint32]time.Time{}, digest: map[uint32][32]byte{}}
	for _, ki := range resp.GetRegion().GetVersions() {
		v.created[ki.GetKeyId()] = ki.GetCreatedAt().AsTime()
	}
	for _, k := range m.GetVersions() {
		v.digest[k.GetVersion()] = sha256.Sum256(k.GetKey())
		clear(k.GetKey())
	}
	return v, true
}

// waitConverged waits until every node runs and has applied the same
// index, the last one any of them has.
func (cc *crashCluster) waitConverged() {
	cc.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var lo, hi uint64 = ^uint64(0), 0
		for _, n := range cc.nodes {
			a := n.rep.srv.AppliedIndex()
			lo, hi = min(lo, a), max(hi, a)
		}
		if lo == hi && lo > 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, n := range cc.nodes {
				cc.t.Logf("%s applied %d (%s)", n.id, n.rep.srv.AppliedIndex(), n.rep.srv.Raft().State())
			}
			cc.t.Fatalf("replicas did not converge within 60s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkAcksEverywhere asserts the load's outcome on every replica's own
// state: the same versions 1..N of each region, each version with the same
// creation time and key digest on every replica, and every acknowledged
// version among them with the creation time its acknowledgement carried.
func (cc *crashCluster) checkAcksEverywhere(l *writeLoad, rotated ...string) {
	t := cc.t
	t.Helper()
	cc.waitConverged()
	l.mu.Lock()
	acks := slices.Clone(l.acks)
	regions := append(slices.Clone(rotated), l.created...)
	nfail := len(l.failures)
	if nfail > 0 {
		t.Logf("last failure: %v", l.failures[nfail-1])
	}
	l.mu.Unlock()
	t.Logf("%d writes acknowledged, %d failed after the client's retries (outcome unknown to the writer; not counted as acknowledged), %d regions created or tried", len(acks), nfail, len(l.created))
	acked := map[string][]crashAck{}
	for _, a := range acks {
		acked[a.region] = append(acked[a.region], a)
	}
	for _, region := range regions {
		var ref crashRegionView
		var refFound bool
		for i, n := range cc.nodes {
			v, found := cc.view(n, region)
			if i == 0 {
				ref, refFound = v, found
			} else if found != refFound {
				t.Errorf("region %s: on %s %v, on %s %v (want the same on every replica)", region, cc.nodes[0].id, refFound, n.id, found)
				continue
			}
			for want := uint32(1); want <= uint32(len(v.created)); want++ {
				if _, ok := v.created[want]; !ok {
					t.Errorf("%s: %s's versions are not 1..%d: %d is missing", n.id, region, len(v.created), want)
				}
			}
			if len(v.digest) != len(v.created) {
				t.Errorf("%s: %s serves %d keys for %d versions", n.id, region, len(v.digest), len(v.created))
			}
			if i == 0 {
				continue
			}
			if len(v.created) != len(ref.created) {
				t.Errorf("%s has %d versions of %s, %s has %d", n.id, len(v.created), region, cc.nodes[0].id, len(ref.created))
			}
			for ver, c := range ref.created {
				if !v.created[ver].Equal(c) || v.digest[ver] != ref.digest[ver] {
					t.Errorf("%s's version %d of %s differs from %s's (created %v vs %v, or another key)", n.id, ver, region, cc.nodes[0].id, v.created[ver], c)
				}
			}
		}
		for _, a := range acked[region] {
			if c, ok := ref.created[a.version]; !ok || !c.Equal(a.created) {
				t.Errorf("acknowledged write lost: %s version %d created %v; the replicas' version %d: created %v (zero: absent)", region, a.version, a.created, a.version, c)
			}
		}
	}
}

// checkTermsAndVotes asserts the stable-store invariants across every
// crash and restart: no node's term on disk went backwards, no node voted
// for two candidates in one term, each restarted node came back in at
// least the term its disk held, and every leadership taken after the
// cluster formed was won with a majority (2 of 3) of votes that were on
// disk.
func (cc *crashCluster) checkTermsAndVotes() {
	t := cc.t
	t.Helper()
	byAddr := map[string]string{}
	for _, n := range cc.nodes {
		byAddr[n.raft] = n.id
		n.journal.mu.Lock()
		for _, p := range n.journal.problems {
			t.Errorf("%s: %s", n.id, p)
		}
		n.journal.mu.Unlock()
	}
	cc.lmu.Lock()
	defer cc.lmu.Unlock()
	if len(cc.leaderships) == 0 {
		t.Errorf("no leadership observed after the cluster formed; the observer is not working")
	}
	for _, l := range cc.leaderships {
		votes := 0
		for _, n := range cc.nodes {
			n.journal.mu.Lock()
			if byAddr[n.journal.votes[l.term]] == l.id {
				votes++
			}
			n.journal.mu.Unlock()
		}
		if votes < 2 {
			t.Errorf("%s led term %d with %d vote(s) on disk, want a majority of 2", l.id, l.term, votes)
		}
	}
	t.Logf("leaderships after formation: %v", cc.leaderships)
}

// checkRestartTerm asserts a restarted node came back in at least the term
// its disk held when it crashed (the term is read back from bolt).
func (cc *crashCluster) checkRestartTerm(n *crashNode) {
	cc.t.Helper()
	if n.startTerm < n.lastIn {
		cc.t.Errorf("%s restarted in term %d, below the term %d its disk held: a term write was lost", n.id, n.startTerm, n.lastIn)
	}
}

// TestCrashLosesOnlyUnsyncedWrites (reliability row 19): under a bounded
// load of region key rotations, replicas crash with a write in flight and
// restart from their data dirs. Each crash loses exactly the write in
// flight, or keeps a prefix of its batch, as the model says (checked on the
// bolt file). The crashes, in order: a follower mid-StoreLogs (the batch
// dropped); the same follower, restarted, mid-StoreLogs of its catch-up
// batch (a prefix kept); the leader mid-StoreLogs (the batch dropped),
// and, while no leader can be elected without it, one of the two survivors
// mid-vote (its LastVoteCand write dropped). After all restart: every
// replica catches up; every acknowledged write is on every replica, with
// the version, creation time and key the acknowledgement named (versions
// 1..N, the same on every replica); no term on disk went backwards, no
// node voted twice in a term, each restarted node came back in the term its
// disk held, and every leader won its term with a majority of votes that
// were on disk.
func TestCrashLosesOnlyUnsyncedWrites(t *testing.T) {
	cc := newCrashCluster(t)
	l := cc.startLoad("us-east", "eu-west")
	l.waitAcks(t, 5, "before any crash")

	// 1. A follower crashes while fsyncing an entry: the entry is lost.
	f := cc.follower()
	f.store.armLogs(hasCommand)
	st := f.store.waitStall(t, "follower StoreLogs")
	first := st.batch[0].Index
	cc.kill(f, 0)
	if got := cc.lastDurableIndex(f); got != first-1 {
		t.Fatalf("%s crashed in StoreLogs of %d..%d; its log ends at %d, want %d (the batch dropped)", f.id, first, st.batch[len(st.batch)-1].Index, got, first-1)
	}
	t.Logf("%s crashed in StoreLogs of entries %d..%d, dropped", f.id, first, st.batch[len(st.batch)-1].Index)
	l.waitAcks(t, 5, "with "+f.id+" down")

	// 2. It restarts behind, and crashes while fsyncing the batch that
	// catches it up: only a prefix of that batch persists.
	cc.start(f, false, nil, func(s *crashStore) { s.armLogs(func(b []*raft.Log) bool { return len(b) >= 2 }) })
	cc.checkRestartTerm(f)
	st = f.store.waitStall(t, "catch-up StoreLogs")
	keep := len(st.batch) / 2
	first = st.batch[0].Index
	cc.kill(f, keep)
	if got, want := cc.lastDurableIndex(f), first+uint64(keep)-1; got != want {
		t.Fatalf("%s crashed in StoreLogs of %d entries from %d keeping %d; its log ends at %d, want %d", f.id, len(st.batch), first, keep, got, want)
	}
	t.Logf("%s crashed in its catch-up StoreLogs of %d entries from %d, kept %d", f.id, len(st.batch), first, keep)
	cc.start(f, false, nil, nil)
	cc.checkRestartTerm(f)
	cc.waitConverged()
	l.waitAcks(t, 5, "after "+f.id+" came back")

	// 3. The leader crashes while fsyncing an entry, and one survivor
	// crashes while writing its vote in the election that follows.
	leader := cc.leader()
	var survivor *crashNode
	for _, n := range cc.nodes {
		if n != leader {
			survivor = n
		}
	}
	survivor.store.armStable("LastVoteCand")
	leader.store.armLogs(hasCommand)
	st = leader.store.waitStall(t, "leader StoreLogs")
	first = st.batch[0].Index
	cc.kill(leader, 0)
	if got := cc.lastDurableIndex(leader); got != first-1 {
		t.Fatalf("leader %s crashed in StoreLogs of %d..; its log ends at %d, want %d", leader.id, first, got, first-1)
	}
	t.Logf("leader %s crashed in StoreLogs of entries %d..%d, dropped", leader.id, first, st.batch[len(st.batch)-1].Index)
	vote := survivor.store.waitStall(t, "survivor's vote write")
	cc.kill(survivor, 0)
	t.Logf("%s crashed writing its vote (%s)", survivor.id, vote.key)
	cc.start(leader, false, nil, nil)
	cc.start(survivor, false, nil, nil)
	cc.checkRestartTerm(leader)
	cc.checkRestartTerm(survivor)
	l.waitAcks(t, 5, "after the leader and a survivor came back")

	l.halt()
	cc.checkAcksEverywhere(l, "us-east", "eu-west")
	cc.checkTermsAndVotes()
}
