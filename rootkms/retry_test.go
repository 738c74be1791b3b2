package rootkms_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// stallingLogStore is a Raft log store whose StoreLogs can be made to stall
// once, like a disk whose fsync hangs, before the batch that holds a chosen
// command.
type stallingLogStore struct {
	raft.LogStore

	mu     sync.Mutex
	match  func(*statev1.Command) bool // armed while not nil
	stall  time.Duration
	stalls atomic.Int32
}

// arm makes the next StoreLogs of a batch with a command match accepts
// stall for d (once).
func (s *stallingLogStore) arm(d time.Duration, match func(*statev1.Command) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stall, s.match = d, match
}

func (s *stallingLogStore) StoreLog(l *raft.Log) error { return s.StoreLogs([]*raft.Log{l}) }

func (s *stallingLogStore) StoreLogs(logs []*raft.Log) error {
	if d := s.take(logs); d > 0 {
		s.stalls.Add(1)
		time.Sleep(d)
	}
	return s.LogStore.StoreLogs(logs)
}

// take disarms the store and returns the stall if logs hold a matching
// command, else 0.
func (s *stallingLogStore) take(logs []*raft.Log) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.match == nil {
		return 0
	}
	for _, l := range logs {
		var cmd statev1.Command
		if l.Type != raft.LogCommand || proto.Unmarshal(l.Data, &cmd) != nil || !s.match(&cmd) {
			continue
		}
		s.match = nil
		return s.stall
	}
	return 0
}

// stallCluster is three voters on real TCP Raft, each with a stallable log
// store.
type stallCluster struct {
	c      *chain
	rs     []*replica
	stores map[string]*stallingLogStore
}

func newStallCluster(t *testing.T) *stallCluster {
	t.Helper()
	sc := &stallCluster{c: newChain(t), stores: map[string]*stallingLogStore{}}
	var first string
	for i := range 3 {
		id := fmt.Sprintf("rootkms-%d", i+1)
		var join []string
		if i > 0 {
			join = []string{first}
		}
		r := sc.startReplica(id, i == 0, join)
		if i == 0 {
			first = r.api
		}
		sc.rs = append(sc.rs, r)
	}
	ctx := bg(t)
	for _, r := range sc.rs {
		if err := r.srv.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		f := sc.rs[0].srv.Raft().GetConfiguration()
		if f.Error() == nil && len(f.Configuration().Servers) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cluster never reached 3 members")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return sc
}

// startReplica is chain.startReplica with a stallable log store.
func (sc *stallCluster) startReplica(id string, bootstrap bool, join []string) *replica {
	c := sc.c
	c.t.Helper()
	dir := filepath.Join(c.dir, id)
	log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		c.t.Fatal(err)
	}
	store := &stallingLogStore{}
	sc.stores[id] = store
	srv, err := rootkms.New(rootkms.Config{
		ID: id, DataDir: filepath.Join(dir, "raft"), Bootstrap: bootstrap, Join: join,
		Manifest: c.manifest, Distributors: []string{c.distAddr},
		Source: c.pki.Source("spiffe://cairn.test/rootkms/global/" + id), Audit: log,
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond, LeaderLeaseTimeout: 100 * time.Millisecond,
		WrapLogStore: func(s raft.LogStore) raft.LogStore { store.LogStore = s; return store },
	})
	if err != nil {
		c.t.Fatal(err)
	}
	apiLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	raftLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	if err := srv.Start(apiLis, raftLis); err != nil {
		c.t.Fatal(err)
	}
	r := &replica{srv: srv, id: id, api: apiLis.Addr().String(), dataDir: filepath.Join(dir, "raft"), auditLog: filepath.Join(dir, "audit.log")}
	c.t.Cleanup(func() { r.stop(); log.Close() })
	return r
}

// leaderStore returns the log store of the current leader.
func (sc *stallCluster) leaderStore(t *testing.T) (*replica, *stallingLogStore) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, r := range sc.rs {
			if r.srv.Raft().State() == raft.Leader {
				return r, sc.stores[r.id]
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("no leader")
	return nil, nil
}

// regionOp is one region write through rootkmsclient.Do that counts its
// attempts and records the error of each.
func regionOp(ctx context.Context, cl *rootkmsclient.Client, op func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.Region, error)) (*rootkmsv1.Region, []error, error) {
	var out *rootkmsv1.Region
	var attempts []error
	err := cl.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
		var err error
		out, err = op(ctx, rc)
		attempts = append(attempts, err)
		return err
	})
	return out, attempts, err
}

func rotateOp(region string) func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.Region, error) {
	return func(ctx context.Context, rc rootkmsv1.RootKMSClient) (*rootkmsv1.Region, error) {
		return rc.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: region})
	}
}

func createOp(region string) func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.Region, error) {
	return func(ctx context.Context, rc rootkmsv1.RootKMSClient) (*rootkmsv1.Region, error) {
		return rc.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: region})
	}
}

// versions reads a region (linearizably) and returns its version numbers.
func versions(t *testing.T, cl *rootkmsclient.Client, region string) []uint32 {
	t.Helper()
	r, _, err := regionOp(bg(t), cl, func(ctx context.Context, rc rootkmsv1.RootKMSClient) (*rootkmsv1.Region, error) {
		return rc.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: region})
	})
	if err != nil {
		t.Fatalf("GetRegion(%s) = %v", region, err)
	}
	var out []uint32
	for _, v := range r.GetVersions() {
		out = append(out, v.GetKeyId())
	}
	return out
}

// stall is longer than the client's attempt timeout: the first attempt is
// cut short while the leader still commits it.
const stall = rootkmsclient.AttemptTimeout + time.Second

// TestStalledWriteAppliedOnce: a write stalled past the client's attempt
// timeout (a slow StoreLogs on the leader) is applied exactly once: the
// client's retry, with the same request ID, is answered from the first
// attempt's effect. RotateRegionKey never rotates twice, and a retried
// CreateRegion succeeds rather than finding its own region (AlreadyExists).
func TestStalledWriteAppliedOnce(t *testing.T) {
	sc := newStallCluster(t)
	cl := sc.c.client(regionctlID, addrs(sc.rs)...)

	t.Run("RotateRegionKey", func(t *testing.T) {
		const region = "us-east"
		createRegion(t, cl, region)
		leader, store := sc.leaderStore(t)
		store.arm(stall, func(c *statev1.Command) bool { return c.GetAddRegionKeyVersion().GetRegion() == region })
		start := time.Now()
		r, attempts, err := regionOp(bg(t), cl, rotateOp(region))
		t.Logf("RotateRegionKey(%s) with %s's StoreLogs stalled %s: %s, attempts %v", region, leader.id, stall, time.Since(start).Round(time.Millisecond), attempts)
		if err != nil {
			t.Fatalf("RotateRegionKey(%s) = %v, want success", region, err)
		}
		requireRetriedAfterTimeout(t, store, attempts)
		if r.GetPrimaryVersion() != 2 {
			t.Errorf("RotateRegionKey(%s) = primary v%d, want v2", region, r.GetPrimaryVersion())
		}
		if got := versions(t, cl, region); len(got) != 2 {
			t.Errorf("region %s has versions %v after one rotation, want [1 2] (rotated %d times)", region, got, len(got)-1)
		}
		// Every replica's own state holds the two versions (UnwrapRegionKey
		// serves from local state).
		waitCaughtUp(t, sc.rs)
		for _, rep := range sc.rs {
			m, err := sc.c.unwrap(kmsEast, rep.api, region)
			if err != nil {
				t.Fatalf("UnwrapRegionKey(%s) on %s = %v", region, rep.id, err)
			}
			var got []uint32
			for _, v := range m.GetVersions() {
				got = append(got, v.GetVersion())
				clear(v.GetKey())
			}
			if len(got) != 2 {
				t.Errorf("%s serves versions %v of %s, want [1 2]", rep.id, got, region)
			}
		}
	})

	t.Run("CreateRegion", func(t *testing.T) {
		const region = "eu-west"
		_, store := sc.leaderStore(t)
		store.arm(stall, func(c *statev1.Command) bool { return c.GetCreateRegion().GetRegion() == region })
		r, attempts, err := regionOp(bg(t), cl, createOp(region))
		t.Logf("CreateRegion(%s) attempts: %v", region, attempts)
		if err != nil {
			t.Fatalf("CreateRegion(%s) = %v, want success (not AlreadyExists: the region is the call's own)", region, err)
		}
		requireRetriedAfterTimeout(t, store, attempts)
		if r.GetPrimaryVersion() != 1 {
			t.Errorf("CreateRegion(%s) = primary v%d, want v1", region, r.GetPrimaryVersion())
		}
		if got := versions(t, cl, region); len(got) != 1 {
			t.Errorf("region %s has versions %v, want [1]", region, got)
		}
	})
}

// requireRetriedAfterTimeout checks that the stall happened and the first
// attempt ran out of time, so the answer came from a retry.
func requireRetriedAfterTimeout(t *testing.T, store *stallingLogStore, attempts []error) {
	t.Helper()
	if store.stalls.Load() != 1 {
		t.Fatalf("the leader's StoreLogs stalled %d times, want 1", store.stalls.Load())
	}
	store.stalls.Store(0)
	if len(attempts) < 2 || status.Code(attempts[0]) != codes.DeadlineExceeded {
		t.Fatalf("attempts = %v, want a first one cut short (DeadlineExceeded) and a retry", attempts)
	}
}

// TestRetryAnsweredFromFirstWrite: a write sent again with the same request
// ID (WithRequestID over two Do calls) is answered as a success without
// being applied again; the same request ID for a write of another region is
// refused; a caller with less time than a write needs is refused before
// anything is proposed.
func TestRetryAnsweredFromFirstWrite(t *testing.T) {
	sc := newStallCluster(t)
	cl := sc.c.client(regionctlID, addrs(sc.rs)...)
	createRegion(t, cl, "us-east")
	createRegion(t, cl, "eu-west")

	ctx := rootkmsclient.WithRequestID(bg(t), "regionctl-rotate-us-east-1")
	first, _, err := regionOp(ctx, cl, rotateOp("us-east"))
	if err != nil || first.GetPrimaryVersion() != 2 {
		t.Fatalf("RotateRegionKey(us-east) = %v, %v; want v2", first, err)
	}
	again, _, err := regionOp(ctx, cl, rotateOp("us-east"))
	if err != nil || again.GetPrimaryVersion() != 2 {
		t.Errorf("RotateRegionKey(us-east) again with the same request ID = %v, %v; want the first answer, v2", again, err)
	}
	if got := versions(t, cl, "us-east"); len(got) != 2 {
		t.Errorf("us-east has versions %v after a rotation sent twice with one request ID, want [1 2]", got)
	}
	create, _, err := regionOp(rootkmsclient.WithRequestID(bg(t), "regionctl-create-us-east"), cl, createOp("us-east"))
	if status.Code(err) != codes.AlreadyExists {
		t.Errorf("CreateRegion(us-east) with a new request ID = %v, %v; want AlreadyExists", create, err)
	}

	other, _, err := regionOp(ctx, cl, rotateOp("eu-west"))
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("RotateRegionKey(eu-west) with us-east's request ID = %v, %v; want InvalidArgument", other, err)
	}
	if got := versions(t, cl, "eu-west"); len(got) != 1 {
		t.Errorf("eu-west has versions %v, want [1]", got)
	}

	// Straight to the leader, with too little time left: refused at once.
	leader, _ := sc.leaderStore(t)
	short, cancel := context.WithTimeout(context.Background(), 60*time.Millisecond)
	defer cancel()
	conn, err := grpc.NewClient(leader.api, grpc.WithTransportCredentials(sc.c.pki.ClientCredentials(regionctlID)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rc := rootkmsv1.NewRootKMSClient(conn)
	_, err = rc.RotateRegionKey(short, &rootkmsv1.RotateRegionKeyRequest{Region: "eu-west"})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("RotateRegionKey(eu-west) with 60ms left = %v, want DeadlineExceeded", err)
	}
	if got := versions(t, cl, "eu-west"); len(got) != 1 {
		t.Errorf("eu-west has versions %v after a refused rotation, want [1]", got)
	}
}
