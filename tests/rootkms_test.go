package tests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	tinkaesgcm "github.com/tink-crypto/tink-go/v2/proto/aes_gcm_go_proto"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// The load of TestRootKMSLeaderKillUnderLoad.
const (
	loadClients  = 3
	loadDuration = 7 * time.Second
	// loadMaxOps bounds each client's operations in startLoad (at loadRate
	// a client does about 350 in loadDuration).
	loadMaxOps = 1000
	// killAfter is when the leader dies; restartAfter when it comes back.
	killAfter    = 2500 * time.Millisecond
	restartAfter = 4500 * time.Millisecond
	// killWait bounds how long the kill waits for a write in flight, so
	// that it lands on a write under way, not between two (it must land
	// before restartAfter).
	killWait = 1500 * time.Millisecond
	// maxFailover is how soon after kill -9 of the leader a write must
	// succeed again.
	maxFailover = 5 * time.Second
)

// loadKeysets are the keysets the open-loop load creates and updates.
var loadKeysets = []string{"load/ks-0", "load/ks-1", "load/ks-2", "load/ks-3", "load/ks-4", "load/ks-5"}

// setupClient is the history's client number for the operations made
// before and after the load (the load's are 0..openLoadSlots-1).
const setupClient = openLoadSlots

// TestRootKMSLeaderKillUnderLoad: three voters and a non-voter under an
// open-loop load of 150 operations per second (region creates, rotations
// and reads; keyset creates, version adds and rewraps, with and without an
// expected revision, and keyset reads) from up to 512 concurrent calls; the
// leader is killed with -9 while writes are in flight, a new leader takes
// writes within seconds, the killed node comes back and catches up. Every
// offered operation was issued; every acknowledged region write is then
// served by every replica from its own state, every acknowledged write
// (region or keyset) is in every replica's log, the final reads show every
// acknowledged version and revision, the recorded history of regions and
// keysets is linearizable, and nothing on disk or in any log holds key
// material.
func TestRootKMSLeaderKillUnderLoad(t *testing.T) {
	e := newRootKMSEnv(t, true)
	regions := regionNames[:20]
	h := framework.NewHistory()
	var clients []*rootkmsclient.Client
	for range loadClients {
		clients = append(clients, e.w.RootKMSClient(framework.Regionctl, e.voters...))
	}
	// The keysets' regions exist before the load: a keyset create names
	// regions that exist, so that its NotFound can only mean no keyset.
	ks := &keysetLoad{names: loadKeysets, regions: regions[:2], seen: map[string]uint64{}}
	for _, r := range ks.regions {
		writeOK(t, clients[0], h, setupClient, framework.OpCreate, r)
	}
	oldLeader, _, _ := framework.WaitLeader(e.voters...)

	l := startOpenLoad(t, h, clients, regions, ks, openLoadRate, loadDuration)
	sleepUntil(l.start.Add(killAfter))
	waitInFlightWrites(l, killWait)
	killedAt := time.Now()
	// Sampled as the signal goes out: the write counter is raised before a
	// write's RPC and lowered after its answer, so a write it counts now
	// was sent and not yet answered when the leader died.
	writesAtKill := l.inFlightWrites.Load()
	oldLeader.Kill()
	var survivors []*framework.Replica
	for _, r := range e.voters {
		if r != oldLeader {
			survivors = append(survivors, r)
		}
	}
	newLeader, _, _ := framework.WaitLeader(survivors...)
	elected := time.Since(killedAt)
	firstWrite, ok := l.waitOKWrites(killedAt, 1, 2*maxFailover)
	if !ok {
		t.Fatalf("no write succeeded within %s of kill -9 of the leader %s", 2*maxFailover, oldLeader.ID)
	}
	failover := firstWrite.Sub(killedAt)
	t.Logf("kill -9 of leader %s at %s into the load: %s leads after %s; first successful write %s after the kill",
		oldLeader.ID, killedAt.Sub(l.start).Round(time.Millisecond), newLeader.ID, elected.Round(time.Millisecond), failover.Round(time.Millisecond))
	if failover > maxFailover {
		t.Errorf("first successful write %s after kill -9 of the leader, want at most %s", failover, maxFailover)
	}

	sleepUntil(l.start.Add(restartAfter))
	restartedAt := time.Now()
	oldLeader.Restart()
	st, err := newLeader.Status()
	if err != nil {
		t.Fatalf("GetClusterStatus(%s) = %v", newLeader.ID, err)
	}
	oldLeader.WaitApplied(st.GetCommitIndex())
	t.Logf("%s restarted under load: applied the leader's commit index %d %s after the restart",
		oldLeader.ID, st.GetCommitIndex(), time.Since(restartedAt).Round(time.Millisecond))

	// Counts, not speeds: every offered operation was issued, and writes
	// were in flight when the leader died. The rates are reported.
	l.wait()
	loadEnd := time.Now()
	issued := l.issued.Load()
	if issued != int64(l.offered) {
		t.Errorf("the load issued %d operations, want the %d offered (%d/s for %s)", issued, l.offered, openLoadRate, loadDuration)
	}
	inFlight, inFlightWrites := l.inFlightAt(killedAt)
	if writesAtKill == 0 {
		t.Errorf("no write was in flight when the kill was sent (waited up to %s for one; %d operations, %d writes span the kill by their recorded times): the kill landed between writes", killWait, inFlight, inFlightWrites)
	}
	baseline, baselineAnswered := l.rate(l.start, killedAt)
	after, afterAnswered := l.rate(killedAt, loadEnd)
	total, answered := l.count()
	t.Logf("load: %d operations offered at %d/s, %d issued (%d more than %s late, the latest %s; at most %d in flight), %d finished in %s (%d answered, the rest failed); %d in flight at the kill, %d of them writes",
		l.offered, openLoadRate, issued, l.late.Load(), openLateAfter, time.Duration(l.maxLate.Load()).Round(time.Millisecond), l.maxInFlight.Load(),
		total, loadEnd.Sub(l.start).Round(time.Millisecond), answered, inFlight, inFlightWrites)
	t.Logf("load: before the kill %.0f ops/s finished (%.0f answered), after it %.0f ops/s (%.0f answered)", baseline, baselineAnswered, after, afterAnswered)

	// The final state, read through the leader and recorded with the rest.
	final := finalReads(t, clients[0], h, setupClient, regions)
	finalKeysets := finalKeysetReads(t, clients[0], h, ks)
	leader, st, _ := framework.WaitLeader(e.voters...)
	for _, r := range e.replicas {
		r.WaitApplied(st.GetCommitIndex())
	}
	acked := h.LastAcked()
	for _, region := range regions {
		if final[region] < acked[region] {
			t.Errorf("region %s: final primary version %d, but version %d was acknowledged", region, final[region], acked[region])
		}
	}
	for name, a := range h.LastAckedKeysets() {
		if f := finalKeysets[name]; f.Revision < a.Revision || f.Versions < a.Versions {
			t.Errorf("keyset %s: final revision %d with %d versions, but revision %d with %d versions was acknowledged", name, f.Revision, f.Versions, a.Revision, a.Versions)
		}
	}
	keys := requireReplicaState(t, e.replicas, final)
	t.Logf("final state (leader %s, commit index %d): regions %v; keysets %v", leader.ID, st.GetCommitIndex(), final, finalKeysets)

	// Snapshots go to disk too (for the scan below), then the history is
	// checked against what the leader's log committed.
	for _, r := range e.replicas {
		snapshot(t, e.w, r)
	}
	stats := checkHistory(t, h, leader, st.GetCommitIndex(), e.replicas...)
	for _, what := range []string{"keyset create ok", "keyset add-version ok", "keyset rewrap ok", "keyset get ok", "rotate ok"} {
		if stats.ByOutcome[what] == 0 {
			t.Errorf("the checked history has no %q: the load did not mix region and keyset writes", what)
		}
	}
	// Every acknowledged write, region or keyset, is in every replica's
	// log (the replicas are stopped now).
	ackedWrites := h.AckedWrites()
	for _, r := range e.replicas {
		logged := r.CommittedRequestIDs(st.GetCommitIndex())
		missing := 0
		for _, id := range ackedWrites {
			if !logged[id] {
				missing++
				if missing <= 3 {
					t.Errorf("%s: acknowledged write %s is not in its log up to index %d", r.ID, id, st.GetCommitIndex())
				}
			}
		}
		if missing > 3 {
			t.Errorf("%s: %d acknowledged writes in all are not in its log", r.ID, missing)
		}
	}
	t.Logf("every replica's log holds the %d acknowledged writes", len(ackedWrites))

	// No plaintext on disk.
	e.d.Stop()
	for _, r := range e.replicas {
		for _, f := range []string{"raft.db", "audit.log", "snapshots"} {
			if _, err := os.Stat(filepath.Join(r.DataDir, f)); err != nil {
				t.Errorf("%s: %v (the secret scan must read it)", r.ID, err)
			}
		}
	}
	requireNoSecrets(t, e.w, e.m, e.safes, nil, regionKeySecrets(t, keys))
}

// waitInFlightWrites waits until a write of l is in flight, or until
// timeout; it is how a fault is aimed at writes under way.
func waitInFlightWrites(l *openLoad, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for l.inFlightWrites.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}

// finalKeysetReads reads every keyset of ks through the cluster client
// after the faults (recording the reads in h) and returns what each showed
// (zero: no such keyset).
func finalKeysetReads(t *testing.T, c *rootkmsclient.Client, h *framework.History, ks *keysetLoad) map[string]framework.KeysetAck {
	t.Helper()
	out := map[string]framework.KeysetAck{}
	for _, name := range ks.names {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		reply, err := recordedKeysetDo(ctx, c, h, setupClient, framework.KeysetInput{Op: framework.KeysetGet, Keyset: name}, ks.regions)
		cancel()
		switch status.Code(err) {
		case codes.OK:
			out[name] = framework.KeysetAck{Revision: reply.GetRecord().GetRevision(), Versions: len(reply.GetRecord().GetVersions())}
		case codes.NotFound:
		default:
			t.Fatalf("final GetKeyset(%s) = %v", name, err)
		}
	}
	return out
}

// operator is the identity snapshots are taken as: replicas are not
// operators.
const operator = "operator/global/operator"

// snapshot makes r take a Raft snapshot (as an operator).
func snapshot(t *testing.T, w *framework.World, r *framework.Replica) *rootkmsv1.SnapshotResponse {
	t.Helper()
	w.Mint(operator)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := r.Client(operator).Snapshot(ctx, &rootkmsv1.SnapshotRequest{})
	// Raft refuses a snapshot until the latest configuration entry is
	// applied (a replica that just joined): retry that, briefly.
	for err != nil && strings.Contains(err.Error(), "cannot take snapshot now") && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
		resp, err = r.Client(operator).Snapshot(ctx, &rootkmsv1.SnapshotRequest{})
	}
	if err != nil {
		t.Fatalf("Snapshot(%s) = %v", r.ID, err)
	}
	return resp
}

// regionKeySecrets turns region keys into secrets for the scan: each
// version's serialized keyset and the AES key inside it. It clears keys.
func regionKeySecrets(t *testing.T, keys map[string]regionKeys) []framework.Secret {
	t.Helper()
	var out []framework.Secret
	regions := make([]string, 0, len(keys))
	for r := range keys {
		regions = append(regions, r)
	}
	slices.Sort(regions)
	for _, region := range regions {
		for v, k := range keys[region] {
			name := fmt.Sprintf("region %s key v%d", region, v)
			out = append(out, framework.Secret{Name: name + " (keyset)", Value: k})
			var ks tinkpb.Keyset
			if err := proto.Unmarshal(k, &ks); err != nil || len(ks.GetKey()) != 1 {
				t.Fatalf("%s: not a serialized keyset of one key (%v)", name, err)
			}
			var aes tinkaesgcm.AesGcmKey
			if err := proto.Unmarshal(ks.GetKey()[0].GetKeyData().GetValue(), &aes); err != nil || len(aes.GetKeyValue()) != 32 {
				t.Fatalf("%s: not an AES-256-GCM key (%v)", name, err)
			}
			clear(ks.GetKey()[0].GetKeyData().GetValue())
			out = append(out, framework.Secret{Name: name + " (AES key)", Value: aes.GetKeyValue()})
		}
	}
	if len(out) == 0 {
		t.Fatal("no region keys to scan for")
	}
	return out
}
