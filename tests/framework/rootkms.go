package framework

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// Regionctl is the identity that may create and rotate regions.
const Regionctl = "regionctl/global/regionctl"

// infoRegionKey is the HPKE info label of UnwrapRegionKey replies
// (rootkms.proto).
const infoRegionKey = "cairn/rootkms/v1/region-key"

// pollRPCTimeout bounds one status poll, so that a wait notices its
// deadline even when a replica hangs (paused, or accepting connections it
// never serves).
const pollRPCTimeout = time.Second

// RootKMSOptions are the flags every replica of a cluster shares.
type RootKMSOptions struct {
	// Manifest is the genesis manifest the replicas pin
	// (World.ManifestPath after World.Genesis).
	Manifest string
	// Distributors are the addresses the replicas fetch the RMK from.
	Distributors []string
	// HeartbeatTimeout, ElectionTimeout and LeaderLeaseTimeout are Raft's
	// timing; zero leaves the binary's defaults (1s, 1s, 500ms).
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout time.Duration
	// SafetyWindow is the propagation window of the Safety Condition
	// checks on keyset lifecycle steps (--safety-window); zero leaves the
	// binary's default (10m).
	SafetyWindow time.Duration
}

// FastRaft is RootKMSOptions with timeouts short enough for fault tests:
// 300ms heartbeat and election timeouts, a 150ms leader lease. A lost leader
// is replaced in about a second.
func FastRaft(manifest string, distributors ...string) RootKMSOptions {
	return RootKMSOptions{Manifest: manifest, Distributors: distributors,
		HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond, LeaderLeaseTimeout: 150 * time.Millisecond}
}

// ReplicaSpec names one root KMS replica.
type ReplicaSpec struct {
	// ID is its Raft server ID, e.g. "rootkms-1".
	ID string
	// Identity is its name, e.g. "rootkms/global/rootkms-1"; Mint it
	// first unless `cairn dev certs` made it.
	Identity string
	// NonVoter makes it join as a non-voting read replica.
	NonVoter bool
}

// Voter is the spec of voter i: rootkms-i, running as
// rootkms/global/rootkms-i (which `cairn dev certs` makes for i = 1..3).
func Voter(i int) ReplicaSpec {
	return ReplicaSpec{ID: fmt.Sprintf("rootkms-%d", i), Identity: fmt.Sprintf("rootkms/global/rootkms-%d", i)}
}

// Replica is one cmd/rootkms process of a World: a root KMS replica.
type Replica struct {
	*Process
	ReplicaSpec
	w *World
	// API and RaftAddr are its 127.0.0.1:port listeners, fixed across
	// restarts.
	API, RaftAddr string
	// DataDir holds raft.db, snapshots/ and audit.log.
	DataDir string

	conns connCache
}

// RootKMSCluster describes a cluster of replicas on ports chosen now. The
// first spec bootstraps the cluster; every other one joins through the API
// of every other voter. None is started: start the first, wait for it to
// lead (WaitLeader), then start the others.
func (w *World) RootKMSCluster(opts RootKMSOptions, specs ...ReplicaSpec) []*Replica {
	w.T.Helper()
	ports := FreePorts(w.T, 2*len(specs))
	var out []*Replica
	for i, s := range specs {
		out = append(out, &Replica{ReplicaSpec: s, w: w,
			API:      fmt.Sprintf("127.0.0.1:%d", ports[i]),
			RaftAddr: fmt.Sprintf("127.0.0.1:%d", ports[len(specs)+i]),
			DataDir:  filepath.Join(w.Dir, "state", s.ID),
		})
	}
	for i, r := range out {
		args := append(w.IDFlags(r.Identity), "--id", r.ID, "--listen", r.API, "--raft-listen", r.RaftAddr,
			"--data-dir", r.DataDir, "--manifest", opts.Manifest, "--distributors", strings.Join(opts.Distributors, ","), "-v")
		for flag, d := range map[string]time.Duration{
			"--heartbeat-timeout": opts.HeartbeatTimeout, "--election-timeout": opts.ElectionTimeout, "--leader-lease-timeout": opts.LeaderLeaseTimeout,
			"--safety-window": opts.SafetyWindow,
		} {
			if d > 0 {
				args = append(args, flag, d.String())
			}
		}
		if i == 0 {
			args = append(args, "--bootstrap")
		} else {
			var join []string
			for j, o := range out {
				if j != i && !o.NonVoter {
					join = append(join, o.API)
				}
			}
			args = append(args, "--join", strings.Join(join, ","))
			if r.NonVoter {
				args = append(args, "--non-voter")
			}
		}
		r.Process = NewProcess(w.T, r.ID, w.Logs, w.Bin.RootKMS, args)
	}
	return out
}

// RootKMSReplica describes one more replica, on ports chosen now, that
// neither bootstraps a cluster nor joins one by itself: started, it fetches
// the root key and waits, not a member, until an operator adds it (the Join
// RPC, `regionctl cluster add`) at its RaftAddr and API. It is not started.
func (w *World) RootKMSReplica(opts RootKMSOptions, spec ReplicaSpec) *Replica {
	w.T.Helper()
	r := w.RootKMSCluster(opts, spec)[0]
	// RootKMSCluster makes its first replica bootstrap a cluster; this one
	// must not.
	var args []string
	for _, a := range r.Process.args {
		if a != "--bootstrap" {
			args = append(args, a)
		}
	}
	r.Process = NewProcess(w.T, r.ID, w.Logs, w.Bin.RootKMS, args)
	return r
}

// Addrs returns the API addresses of rs.
func Addrs(rs ...*Replica) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.API)
	}
	return out
}

// conn returns a connection to the replica as name, made once and closed
// when the test ends. It accepts only a root KMS replica on the other end and
// reconnects quickly: replicas are killed and restarted on purpose.
func (r *Replica) conn(name string) *grpc.ClientConn {
	r.w.T.Helper()
	return r.conns.get(r.w, r.API, name, "rootkms/*/*")
}

// Client returns a raw client of this one replica, calling as name: no
// redirects, no retries.
func (r *Replica) Client(name string) rootkmsv1.RootKMSClient {
	r.w.T.Helper()
	return rootkmsv1.NewRootKMSClient(r.conn(name))
}

// Status asks for the replica's view of the cluster (as Observer).
func (r *Replica) Status() (*rootkmsv1.ClusterStatus, error) {
	r.w.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pollRPCTimeout)
	defer cancel()
	return r.Client(Observer).GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
}

// WaitStatus polls GetClusterStatus until ok accepts the reply, and returns
// the reply and how long it took. It fails the test after WaitTimeout, or at
// once if the process exits.
func (r *Replica) WaitStatus(what string, ok func(*rootkmsv1.ClusterStatus) bool) (*rootkmsv1.ClusterStatus, time.Duration) {
	r.w.T.Helper()
	return waitStatus(r.w.T, r.Process, r.ID, what, r.Status, ok)
}

// WaitServing waits until the replica holds the root key and is a member of
// a cluster with a known leader.
func (r *Replica) WaitServing() *rootkmsv1.ClusterStatus {
	r.w.T.Helper()
	st, _ := r.WaitStatus("serving (root key, a member, leader known, caught up: ready)", func(st *rootkmsv1.ClusterStatus) bool {
		if !st.GetHasRootKey() || st.GetLeaderApiAddress() == "" || st.GetNotReadyReason() != "" {
			return false
		}
		for _, m := range st.GetMembers() {
			if m.GetId() == r.ID {
				return true
			}
		}
		return false
	})
	return st
}

// WaitApplied waits until the replica has applied the log up to index and
// holds the root key; it returns how long that took.
func (r *Replica) WaitApplied(index uint64) time.Duration {
	r.w.T.Helper()
	_, took := r.WaitStatus(fmt.Sprintf("applied up to index %d", index), func(st *rootkmsv1.ClusterStatus) bool {
		return st.GetHasRootKey() && st.GetAppliedIndex() >= index
	})
	return took
}

// WaitLeader waits until one of rs (those still running) leads: it says
// it is the leader, holds the root key and has registered its API address,
// so that followers can send callers to it. It returns the leader and how
// long the wait took, and fails the test after WaitTimeout.
func WaitLeader(rs ...*Replica) (*Replica, *rootkmsv1.ClusterStatus, time.Duration) {
	if len(rs) == 0 {
		panic("framework: WaitLeader of no replicas")
	}
	t := rs[0].w.T
	t.Helper()
	start := time.Now()
	deadline := start.Add(WaitTimeout)
	for attempt := 0; ; attempt++ {
		var seen []string
		for _, r := range rs {
			if !r.Running() {
				seen = append(seen, r.ID+": not running")
				continue
			}
			st, err := r.Status()
			if err != nil {
				seen = append(seen, fmt.Sprintf("%s: %v", r.ID, err))
				continue
			}
			if st.GetState() == rootkmsv1.ReplicaState_REPLICA_STATE_LEADER && st.GetHasRootKey() && st.GetLeaderApiAddress() == r.API {
				return r, st, time.Since(start)
			}
			seen = append(seen, fmt.Sprintf("%s: %v term %d leader %q root key %v", r.ID, st.GetState(), st.GetTerm(), st.GetLeaderId(), st.GetHasRootKey()))
		}
		if time.Now().After(deadline) {
			t.Fatalf("no leader among %d replicas after %s (%d polls):\n%s", len(rs), WaitTimeout, attempt+1, strings.Join(seen, "\n"))
		}
		time.Sleep(pollInterval)
	}
}

// UnwrapRegionKey asks this replica for region's key material as name
// (which must be a KMS identity of that region to be served) and opens the
// sealed reply with the info bound to the region and the caller. The caller
// clears the key bytes.
func (r *Replica) UnwrapRegionKey(name, region string) (*rootkmsv1.RegionKeyMaterial, *rootkmsv1.Region, error) {
	r.w.T.Helper()
	rcpt, err := hpkeseal.NewRecipient()
	if err != nil {
		r.w.T.Fatal(err)
	}
	defer rcpt.Close()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	resp, err := r.Client(name).UnwrapRegionKey(ctx, &rootkmsv1.UnwrapRegionKeyRequest{Region: region, Recipient: rcpt.PublicKey()})
	if err != nil {
		return nil, nil, err
	}
	info, err := hpkeseal.Info(infoRegionKey, region, SPIFFEID(name))
	if err != nil {
		r.w.T.Fatal(err)
	}
	plain, err := rcpt.Open(resp.GetSealedKeys(), info)
	if err != nil {
		return nil, resp.GetRegion(), fmt.Errorf("opening the sealed region key of %s from %s: %w", region, r.ID, err)
	}
	defer plain.Wipe()
	b := plain.Data()
	defer clear(b)
	var m rootkmsv1.RegionKeyMaterial
	if err := proto.Unmarshal(b, &m); err != nil {
		return nil, resp.GetRegion(), fmt.Errorf("region key material of %s from %s: %w", region, r.ID, err)
	}
	return &m, resp.GetRegion(), nil
}

// Audit reads the replica's audit log.
func (r *Replica) Audit() []audit.Record {
	r.w.T.Helper()
	recs, err := audit.ReadFile(filepath.Join(r.DataDir, "audit.log"))
	if err != nil {
		r.w.T.Fatalf("audit.ReadFile(%s) = %v", r.ID, err)
	}
	return recs
}

// CommittedRequestIDs reads the Raft log the stopped replica left in
// raft.db and returns the request IDs of the commands in entries 1..upTo:
// pass the commit index the replica reported (as leader) after the last
// write, and the result is every write the cluster committed. It fails the
// test if the replica still runs (bolt locks the file), or if the log no
// longer starts at entry 1 (a snapshot compacted it).
func (r *Replica) CommittedRequestIDs(upTo uint64) map[string]bool {
	r.w.T.Helper()
	if r.Running() {
		r.w.T.Fatalf("%s: reading raft.db of a running replica", r.ID)
	}
	path := filepath.Join(r.DataDir, "raft.db")
	store, err := raftboltdb.New(raftboltdb.Options{Path: path, BoltOptions: &bbolt.Options{ReadOnly: true, Timeout: 2 * time.Second}})
	if err != nil {
		r.w.T.Fatalf("opening %s: %v", path, err)
	}
	defer store.Close()
	first, err := store.FirstIndex()
	if err != nil {
		r.w.T.Fatal(err)
	}
	last, err := store.LastIndex()
	if err != nil {
		r.w.T.Fatal(err)
	}
	if first != 1 || last < upTo {
		r.w.T.Fatalf("%s: raft.db holds entries %d..%d, want 1..%d (at least)", r.ID, first, last, upTo)
	}
	out := map[string]bool{}
	for i := first; i <= upTo; i++ {
		var l raft.Log
		if err := store.GetLog(i, &l); err != nil {
			r.w.T.Fatalf("%s: log entry %d: %v", path, i, err)
		}
		if l.Type != raft.LogCommand {
			continue
		}
		var cmd statev1.Command
		if err := proto.Unmarshal(l.Data, &cmd); err != nil {
			r.w.T.Fatalf("%s: log entry %d: %v", path, i, err)
		}
		if id := cmd.GetRequestId(); id != "" {
			out[id] = true
		}
	}
	return out
}

// RootKMSClient returns a cluster client (rootkmsclient.New: follows
// NOT_LEADER redirects, tries the next replica when one is down) calling as
// name; it is closed when the test ends.
func (w *World) RootKMSClient(name string, rs ...*Replica) *rootkmsclient.Client {
	w.T.Helper()
	c := rootkmsclient.New(w.Source(name), Addrs(rs...))
	w.T.Cleanup(c.Close)
	return c
}
