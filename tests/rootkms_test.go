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
	// loadMaxOps bounds each client's operations (at loadRate a client does
	// about 350 in loadDuration).
	loadMaxOps = 1000
	// killAfter is when the leader dies; restartAfter when it comes back.
	killAfter    = 2500 * time.Millisecond
	restartAfter = 4500 * time.Millisecond
	// minBaselineRate is the least the load must do before the fault, in
	// client operations per second, for the test to mean something.
	minBaselineRate = 50
	// maxFailover is how soon after kill -9 of the leader a write must
	// succeed again.
	maxFailover = 5 * time.Second
)

// TestRootKMSLeaderKillUnderLoad: three voters and a non-voter under a
// steady mix of creates, rotations and linearizable reads from three
// clients; the leader is killed with -9, a new leader takes writes within
// seconds, the killed node comes back and catches up. Every acknowledged
// write is then served by every replica from its own state, the recorded
// history is linearizable, and nothing on disk or in any log holds key
// material.
func TestRootKMSLeaderKillUnderLoad(t *testing.T) {
	e := newRootKMSEnv(t, true)
	regions := regionNames[:20]
	h := framework.NewHistory()
	var clients []*rootkmsclient.Client
	for range loadClients {
		clients = append(clients, e.w.RootKMSClient(framework.Regionctl, e.voters...))
	}
	oldLeader, _, _ := framework.WaitLeader(e.voters...)

	l := startLoad(t, h, clients, regions, loadDuration, loadMaxOps)
	sleepUntil(l.start.Add(killAfter))
	killedAt := time.Now()
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
	t.Logf("kill -9 of leader %s: %s leads after %s; first successful write %s after the kill",
		oldLeader.ID, newLeader.ID, elected.Round(time.Millisecond), failover.Round(time.Millisecond))
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

	l.wait()
	loadEnd := time.Now()
	baseline, baselineAnswered := l.rate(l.start, killedAt)
	after, afterAnswered := l.rate(killedAt, loadEnd)
	total, answered := l.count()
	t.Logf("load: %d clients, %d operations in %s (%d answered, the rest failed); before the kill %.0f ops/s (%.0f answered), after %.0f ops/s (%.0f answered)",
		loadClients, total, loadEnd.Sub(l.start).Round(time.Millisecond), answered, baseline, baselineAnswered, after, afterAnswered)
	if baselineAnswered < minBaselineRate {
		t.Errorf("baseline load %.0f answered ops/s, want at least %d: the test would prove little", baselineAnswered, minBaselineRate)
	}

	// The final state, read through the leader and recorded with the rest.
	final := finalReads(t, clients[0], h, loadClients, regions)
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
	keys := requireReplicaState(t, e.replicas, final)
	t.Logf("final state (leader %s, commit index %d): %v", leader.ID, st.GetCommitIndex(), final)

	// Snapshots go to disk too (for the scan below), then the history is
	// checked against what the leader's log committed.
	for _, r := range e.replicas {
		snapshot(t, e.w, r)
	}
	checkHistory(t, h, leader, st.GetCommitIndex(), e.replicas...)

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
