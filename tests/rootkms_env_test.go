package tests

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// nonVoter is the read replica's spec: a replica of another region than the
// voters, with an identity that `cairn dev certs` does not make.
var nonVoter = framework.ReplicaSpec{ID: "replica-east", Identity: "rootkms/us-east/replica-east", NonVoter: true}

// regionNames are the regions the root KMS tests use: r00..r39. Each has a
// KMS identity kms/<region>/x, minted before anything starts.
var regionNames = func() []string {
	var out []string
	for i := range 40 {
		out = append(out, fmt.Sprintf("r%02d", i))
	}
	return out
}()

// kmsOf is the KMS identity that may unwrap region's key.
func kmsOf(region string) string { return "kms/" + region + "/x" }

// rootKMSEnv is the chain under a root KMS cluster: dev certs, three
// insecure-file safes holding a 2-of-3 split of the RMK, one distributor
// provisioned at genesis, and the replicas.
type rootKMSEnv struct {
	w     *framework.World
	safes []framework.SafeConfig
	m     *safev1.GenesisManifest
	d     *framework.Distributor
	// voters are rootkms-1..3 (rootkms-1 bootstraps); replicas are the
	// voters and, if asked for, the non-voter last.
	voters, replicas []*framework.Replica
}

// newRootKMSEnv builds the chain and starts the cluster with fast Raft
// timeouts: rootkms-1 bootstraps, then rootkms-2 and -3 (and the non-voter)
// join. It returns once every replica holds the root key and is a member,
// and a leader is known.
func newRootKMSEnv(t *testing.T, withNonVoter bool) *rootKMSEnv {
	t.Helper()
	start := time.Now()
	e := &rootKMSEnv{w: framework.NewWorld(t, bin)}
	var mint []string
	for _, r := range regionNames {
		mint = append(mint, kmsOf(r))
	}
	specs := []framework.ReplicaSpec{framework.Voter(1), framework.Voter(2), framework.Voter(3)}
	if withNonVoter {
		specs = append(specs, nonVoter)
		mint = append(mint, nonVoter.Identity)
	}
	e.w.Mint(mint...)
	e.safes = e.w.FileSafes(3)
	e.d = e.w.Distributors(1, false)[0]
	e.d.Start()
	e.d.WaitState(sealed)
	e.m = e.w.Genesis(2, e.safes, e.d)
	waitUnsealed(t, e.d, e.m)

	e.replicas = e.w.RootKMSCluster(framework.FastRaft(e.w.ManifestPath(), e.d.Addr), specs...)
	e.voters = e.replicas[:3]
	e.replicas[0].Start()
	framework.WaitLeader(e.replicas[0])
	for _, r := range e.replicas[1:] {
		r.Start()
	}
	for _, r := range e.replicas {
		r.WaitServing()
	}
	// Every member is in the configuration the leader replicates.
	_, st, _ := framework.WaitLeader(e.voters...)
	if got := len(st.GetMembers()); got != len(specs) {
		t.Fatalf("leader's configuration has %d members, want %d: %v", got, len(specs), st.GetMembers())
	}
	for _, m := range st.GetMembers() {
		wantNonVoter := m.GetId() == nonVoter.ID
		if (m.GetSuffrage() == rootkmsv1.Suffrage_SUFFRAGE_NONVOTER) != wantNonVoter {
			t.Fatalf("member %s has suffrage %v", m.GetId(), m.GetSuffrage())
		}
	}
	t.Logf("chain up (dev certs, 3 safes, genesis, distributor, %d replicas) in %s", len(specs), time.Since(start).Round(time.Millisecond))
	return e
}

// requireNoSecrets ends a test of the cluster: it stops every replica and
// the distributor still running (SIGTERM, a clean exit) and scans every
// file of the world for the RMK, the shares, the safes' passphrases and the
// region keys (keys, by region, as requireReplicaState returns them; they
// are cleared).
func (e *rootKMSEnv) requireNoSecrets(t *testing.T, keys map[string]regionKeys) {
	t.Helper()
	for _, r := range e.replicas {
		if r.Running() {
			r.Stop()
		}
	}
	if e.d.Running() {
		e.d.Stop()
	}
	requireNoSecrets(t, e.w, e.m, e.safes, nil, regionKeySecrets(t, keys))
}

// writeOK does one write through the cluster client as regionctl and fails
// the test unless it succeeds, recording it in h if h is not nil.
func writeOK(t *testing.T, c *rootkmsclient.Client, h *framework.History, client int, op framework.RegionOp, region string) *rootkmsv1.Region {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reply, err := recordedDo(ctx, c, h, client, framework.RegionInput{Op: op, Region: region})
	if err != nil {
		t.Fatalf("%s(%s) = %v", op, region, err)
	}
	return reply
}

// attemptTimeout bounds one attempt of a call: a replica that accepts
// connections but does not answer (paused) must not hold the caller for
// the whole call. It is shorter than rootkmsclient.AttemptTimeout, so that
// calls move on from a paused leader sooner.
const attemptTimeout = time.Second

// recordedDo does one operation through the cluster client and records it
// in h (if not nil) as one operation, from the first attempt's call to Do's
// return: every attempt carries the call's request ID
// (rootkmsclient.WithRequestID), so the root KMS applies a retried write at
// most once, whichever attempts reached it.
func recordedDo(ctx context.Context, c *rootkmsclient.Client, h *framework.History, client int, in framework.RegionInput) (*rootkmsv1.Region, error) {
	var call *framework.Call
	if h != nil {
		call = h.Begin(client, in)
		ctx = rootkmsclient.WithRequestID(ctx, call.RequestID())
	}
	var reply *rootkmsv1.Region
	err := c.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
		if call != nil {
			call.Attempt()
		}
		var err error
		reply, err = attempt(ctx, rc, in)
		return err
	})
	if err != nil {
		reply = nil
	}
	if call != nil {
		call.End(reply, err)
	}
	return reply, err
}

// attempt makes one attempt of op on one replica. An attempt that runs out
// of its own time is reported to Do as Unavailable, so that Do tries the
// next replica (with the same request ID).
func attempt(ctx context.Context, rc rootkmsv1.RootKMSClient, in framework.RegionInput) (*rootkmsv1.Region, error) {
	actx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	var r *rootkmsv1.Region
	var err error
	switch in.Op {
	case framework.OpCreate:
		r, err = rc.CreateRegion(actx, &rootkmsv1.CreateRegionRequest{Region: in.Region})
	case framework.OpRotate:
		r, err = rc.RotateRegionKey(actx, &rootkmsv1.RotateRegionKeyRequest{Region: in.Region})
	case framework.OpGet:
		r, err = rc.GetRegion(actx, &rootkmsv1.GetRegionRequest{Region: in.Region})
	}
	if err != nil && ctx.Err() == nil && actx.Err() != nil {
		return nil, status.Errorf(codes.Unavailable, "attempt timed out after %s: %v", attemptTimeout, err)
	}
	return r, err
}

// finalReads reads every region through the cluster client after the
// faults (recording the reads in h) and returns the primary version of each
// (0: no such region).
func finalReads(t *testing.T, c *rootkmsclient.Client, h *framework.History, client int, regions []string) map[string]uint32 {
	t.Helper()
	out := map[string]uint32{}
	for _, region := range regions {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		reply, err := recordedDo(ctx, c, h, client, framework.RegionInput{Op: framework.OpGet, Region: region})
		cancel()
		switch status.Code(err) {
		case codes.OK:
			out[region] = reply.GetPrimaryVersion()
		case codes.NotFound:
			out[region] = 0
		default:
			t.Fatalf("final GetRegion(%s) = %v", region, err)
		}
	}
	return out
}

// regionKeys is what one replica serves of one region: the key of each
// version it unwraps, by version.
type regionKeys map[uint32][]byte

// requireReplicaState checks that every replica serves, from its local
// state, exactly the versions want implies for each region: versions
// 1..want[region] with the last one primary (none and NotFound for 0), and
// that all replicas hold the same key for each version. It waits (bounded)
// for replicas still applying the log. It returns the keys, by region, for
// the secret scan; the caller clears them.
func requireReplicaState(t *testing.T, rs []*framework.Replica, want map[string]uint32) map[string]regionKeys {
	t.Helper()
	regions := make([]string, 0, len(want))
	for r := range want {
		regions = append(regions, r)
	}
	slices.Sort(regions)
	keys := map[string]regionKeys{}
	for _, r := range rs {
		for _, region := range regions {
			got, problem := waitRegionState(r, region, want[region])
			if problem != "" {
				t.Errorf("%s: region %s: %s", r.ID, region, problem)
				continue
			}
			if want[region] == 0 {
				continue
			}
			if keys[region] == nil {
				keys[region] = got
				continue
			}
			for v, k := range got {
				if !bytes.Equal(k, keys[region][v]) {
					t.Errorf("%s: region %s version %d: another key than %s's", r.ID, region, v, rs[0].ID)
				}
				clear(k)
			}
		}
	}
	return keys
}

// regionStateTimeout bounds how long a replica may take to apply what the
// leader committed before its state is judged.
const regionStateTimeout = 10 * time.Second

// waitRegionState polls r's UnwrapRegionKey for region until it shows want
// versions (see requireReplicaState) or regionStateTimeout passes; it
// returns the keys, or what was wrong the last time.
func waitRegionState(r *framework.Replica, region string, want uint32) (regionKeys, string) {
	deadline := time.Now().Add(regionStateTimeout)
	for {
		keys, problem := regionState(r, region, want)
		if problem == "" || time.Now().After(deadline) {
			return keys, problem
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func regionState(r *framework.Replica, region string, want uint32) (regionKeys, string) {
	m, meta, err := r.UnwrapRegionKey(kmsOf(region), region)
	if want == 0 {
		for _, v := range m.GetVersions() {
			clear(v.GetKey())
		}
		if status.Code(err) != codes.NotFound {
			return nil, fmt.Sprintf("UnwrapRegionKey = %v, want NotFound (no write of it was acknowledged)", err)
		}
		return nil, ""
	}
	if err != nil {
		return nil, fmt.Sprintf("UnwrapRegionKey = %v, want versions 1..%d", err, want)
	}
	keys := regionKeys{}
	var versions []uint32
	for _, v := range m.GetVersions() {
		versions = append(versions, v.GetVersion())
		keys[v.GetVersion()] = v.GetKey()
		wantStatus := cryptov1.KeyStatus_KEY_STATUS_ENABLED
		if v.GetVersion() == want {
			wantStatus = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		}
		if v.GetStatus() != wantStatus || len(v.GetKey()) == 0 {
			return nil, fmt.Sprintf("version %d: status %v with %d key bytes, want %v with a key", v.GetVersion(), v.GetStatus(), len(v.GetKey()), wantStatus)
		}
	}
	var wantVersions []uint32
	for v := uint32(1); v <= want; v++ {
		wantVersions = append(wantVersions, v)
	}
	if !slices.Equal(versions, wantVersions) || meta.GetPrimaryVersion() != want {
		for _, k := range keys {
			clear(k)
		}
		return nil, fmt.Sprintf("serves versions %v (primary %d), want %v (primary %d)", versions, meta.GetPrimaryVersion(), wantVersions, want)
	}
	return keys, ""
}

// checkHistory stops every replica (SIGTERM, clean exit), tells the history
// which writes the last leader's log committed up to commitIndex, and checks
// it for linearizability.
func checkHistory(t *testing.T, h *framework.History, leader *framework.Replica, commitIndex uint64, rs ...*framework.Replica) framework.HistoryStats {
	t.Helper()
	for _, r := range rs {
		if r.Running() {
			r.Stop()
		}
	}
	h.Resolve(leader.CommittedRequestIDs(commitIndex))
	return framework.CheckLinearizable(t, h)
}
