package rootkms_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/audit"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
)

// values returns every cairn_rootkms_ gauge of reg, and of the apply
// histogram its sample count (as apply_duration_seconds_count) and sum.
func values(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather() = %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		name := mf.GetName()
		if !strings.HasPrefix(name, "cairn_rootkms_") || len(mf.GetMetric()) != 1 {
			continue
		}
		m := mf.GetMetric()[0]
		if h := m.GetHistogram(); h != nil {
			out[name+"_count"] = float64(h.GetSampleCount())
			out[name+"_sum"] = h.GetSampleSum()
			continue
		}
		out[name] = m.GetGauge().GetValue()
	}
	return out
}

// allMetrics are the series every replica exposes.
var allMetrics = []string{
	"cairn_rootkms_raft_leader", "cairn_rootkms_raft_has_leader", "cairn_rootkms_raft_term", "cairn_rootkms_raft_commit_index",
	"cairn_rootkms_raft_applied_index", "cairn_rootkms_raft_last_contact_seconds", "cairn_rootkms_snapshot_age_seconds",
	"cairn_rootkms_regions", "cairn_rootkms_keysets", "cairn_rootkms_ready",
	"cairn_rootkms_apply_duration_seconds_count", "cairn_rootkms_apply_duration_seconds_sum",
}

// waitReadiness polls r's Readiness until it is want (or fails the test).
func waitReadiness(t *testing.T, r *replica, want bool) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ok, reason := r.srv.Readiness()
		if ok == want {
			return reason
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: Readiness() = %v, %q; want %v", r.id, ok, reason, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMetricsAndReadiness drives a cluster (three voters and a non-voter)
// through writes, a snapshot and the loss of its quorum, checking each
// replica's series and readiness.
func TestMetricsAndReadiness(t *testing.T) {
	c := newChain(t)
	regs := map[string]*prometheus.Registry{}
	c.configure = func(id string, cfg *rootkms.Config) {
		regs[id] = prometheus.NewRegistry()
		cfg.Registry = regs[id]
	}
	rs := c.cluster()
	clusterUp := time.Now()
	for _, r := range rs {
		if reason := waitReadiness(t, r, true); reason != "" {
			t.Errorf("%s: Readiness() = true, %q; want no reason", r.id, reason)
		}
	}
	var leader *replica
	for _, r := range rs {
		if r.srv.Raft().State() == raft.Leader {
			leader = r
		}
	}
	if leader == nil {
		t.Fatal("no leader among the replicas")
	}
	// A replica that has just joined (the non-voter, last) is ready
	// before it has applied its first entry: wait until every replica has
	// applied the leader's log, so the indices below are meaningful.
	waitCaughtUp(t, rs)
	for _, r := range rs {
		v := values(t, regs[r.id])
		for _, name := range allMetrics {
			if _, ok := v[name]; !ok {
				t.Errorf("%s: no series %s", r.id, name)
			}
		}
		isLeader := 0.0
		if r == leader {
			isLeader = 1
		}
		if v["cairn_rootkms_raft_leader"] != isLeader || v["cairn_rootkms_raft_has_leader"] != 1 || v["cairn_rootkms_ready"] != 1 {
			t.Errorf("%s: leader %v, has_leader %v, ready %v; want %v, 1, 1", r.id, v["cairn_rootkms_raft_leader"], v["cairn_rootkms_raft_has_leader"], v["cairn_rootkms_ready"], isLeader)
		}
		if v["cairn_rootkms_raft_term"] < 1 || v["cairn_rootkms_raft_commit_index"] < 1 || v["cairn_rootkms_raft_applied_index"] < 1 {
			t.Errorf("%s: term %v, commit index %v, applied index %v; want each >= 1", r.id, v["cairn_rootkms_raft_term"], v["cairn_rootkms_raft_commit_index"], v["cairn_rootkms_raft_applied_index"])
		}
		lc := v["cairn_rootkms_raft_last_contact_seconds"]
		if (r == leader && lc != 0) || lc < 0 || lc > 2 {
			t.Errorf("%s: last contact %vs, want 0 on the leader, under 2s on followers (heartbeats every 200ms)", r.id, lc)
		}
		if v["cairn_rootkms_regions"] != 0 || v["cairn_rootkms_keysets"] != 0 {
			t.Errorf("%s: regions %v, keysets %v; want 0, 0", r.id, v["cairn_rootkms_regions"], v["cairn_rootkms_keysets"])
		}
	}
	before := values(t, regs[leader.id])

	// Writes: the leader times them; every replica counts the state.
	admin := c.client(regionctlID, addrs(rs)...)
	createRegion(t, admin, "us-east")
	createRegion(t, admin, "eu-west")
	if _, err := keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: "payments/ledger", Regions: []string{"us-east", "eu-west"},
			CiphertextTtl: durationpb.New(time.Hour)})
	}); err != nil {
		t.Fatalf("CreateKeyset = %v", err)
	}
	waitCaughtUp(t, rs)
	after := values(t, regs[leader.id])
	t.Logf("leader %s after the writes: %v", leader.id, after)
	if got, want := after["cairn_rootkms_apply_duration_seconds_count"], before["cairn_rootkms_apply_duration_seconds_count"]+3; got < want || after["cairn_rootkms_apply_duration_seconds_sum"] <= before["cairn_rootkms_apply_duration_seconds_sum"] {
		t.Errorf("leader apply_duration_seconds count %v sum %v, want count >= %v and the sum grown from %v",
			got, after["cairn_rootkms_apply_duration_seconds_sum"], want, before["cairn_rootkms_apply_duration_seconds_sum"])
	}
	if after["cairn_rootkms_raft_commit_index"] < before["cairn_rootkms_raft_commit_index"]+3 {
		t.Errorf("leader commit index %v after 3 writes, want >= %v", after["cairn_rootkms_raft_commit_index"], before["cairn_rootkms_raft_commit_index"]+3)
	}
	for _, r := range rs {
		v := values(t, regs[r.id])
		if v["cairn_rootkms_regions"] != 2 || v["cairn_rootkms_keysets"] != 1 {
			t.Errorf("%s: regions %v, keysets %v after the writes; want 2, 1", r.id, v["cairn_rootkms_regions"], v["cairn_rootkms_keysets"])
		}
		if r != leader && v["cairn_rootkms_apply_duration_seconds_count"] != 0 {
			t.Errorf("%s (a follower): apply_duration_seconds count %v, want 0 (only the leader proposes)", r.id, v["cairn_rootkms_apply_duration_seconds_count"])
		}
	}

	// A snapshot resets the snapshot age; before it, the age counts from
	// the start.
	time.Sleep(300 * time.Millisecond)
	if age := values(t, regs[leader.id])["cairn_rootkms_snapshot_age_seconds"]; age < time.Since(clusterUp).Seconds()-0.05 {
		t.Errorf("snapshot age before any snapshot = %vs, want at least the %v since the cluster came up", age, time.Since(clusterUp))
	}
	snapStart := time.Now()
	if err := leader.srv.Raft().Snapshot().Error(); err != nil {
		t.Fatalf("Snapshot() = %v", err)
	}
	if age := values(t, regs[leader.id])["cairn_rootkms_snapshot_age_seconds"]; age > time.Since(snapStart).Seconds() {
		t.Errorf("snapshot age after a snapshot = %vs, want at most %v", age, time.Since(snapStart))
	}

	// Without a quorum the last voter knows no leader: not ready.
	var voters []*replica
	for _, r := range rs[:3] {
		if r != leader {
			voters = append(voters, r)
		}
	}
	last := voters[1]
	leader.stop()
	voters[0].stop()
	reason := waitReadiness(t, last, false)
	if !strings.HasPrefix(reason, "no Raft leader known") {
		t.Errorf("%s without a quorum: Readiness() reason %q, want no Raft leader known", last.id, reason)
	}
	v := values(t, regs[last.id])
	if v["cairn_rootkms_ready"] != 0 || v["cairn_rootkms_raft_has_leader"] != 0 || v["cairn_rootkms_raft_leader"] != 0 {
		t.Errorf("%s without a quorum: ready %v, has_leader %v, leader %v; want 0, 0, 0", last.id, v["cairn_rootkms_ready"], v["cairn_rootkms_raft_has_leader"], v["cairn_rootkms_raft_leader"])
	}
	if lc := v["cairn_rootkms_raft_last_contact_seconds"]; lc <= 0 {
		t.Errorf("%s without a quorum: last contact %vs, want > 0", last.id, lc)
	}
	last.stop()
	if ok, reason := last.srv.Readiness(); ok || reason != "shut down" {
		t.Errorf("Readiness() after Close = %v, %q, want false, \"shut down\"", ok, reason)
	}
}

// TestReadinessBeforeRootKey: a replica not started, and one whose
// distributor has no root key, say so.
func TestReadinessBeforeRootKey(t *testing.T) {
	c := newChain(t)
	c.distAddr = c.startDistributor(false) // unprovisioned: sealed
	reg := prometheus.NewRegistry()
	c.configure = func(_ string, cfg *rootkms.Config) { cfg.Registry = reg }
	r := c.startReplica("rootkms-1", true, false)
	reason := waitReadiness(t, r, false)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(reason, "distributor") || !strings.Contains(reason, "sealed") {
		if time.Now().After(deadline) {
			t.Fatalf("Readiness() reason %q, want it to name the sealed distributor", reason)
		}
		time.Sleep(20 * time.Millisecond)
		_, reason = r.srv.Readiness()
	}
	if v := values(t, reg); v["cairn_rootkms_ready"] != 0 {
		t.Errorf("cairn_rootkms_ready = %v, want 0", v["cairn_rootkms_ready"])
	}

	// Built, not started.
	dir := t.TempDir()
	alog, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer alog.Close()
	reg2 := prometheus.NewRegistry()
	s, err := rootkms.New(rootkms.Config{ID: "rootkms-2", DataDir: filepath.Join(dir, "raft"), Manifest: c.manifest, Distributors: []string{c.distAddr},
		Source: c.pki.Source("spiffe://cairn.test/rootkms/global/rootkms-2"), Audit: alog, Registry: reg2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ok, reason := s.Readiness(); ok || reason != "not started" {
		t.Errorf("Readiness() before Start = %v, %q, want false, \"not started\"", ok, reason)
	}
	v := values(t, reg2)
	for _, name := range allMetrics {
		if got, ok := v[name]; !ok || got != 0 {
			t.Errorf("%s before Start = %v (present %v), want 0", name, got, ok)
		}
	}
	// The registry is the replica's own: a second replica cannot register
	// in it.
	if _, err := rootkms.New(rootkms.Config{ID: "rootkms-3", DataDir: filepath.Join(dir, "raft3"), Manifest: c.manifest, Distributors: []string{c.distAddr},
		Source: c.pki.Source("spiffe://cairn.test/rootkms/global/rootkms-3"), Audit: alog, Registry: reg2}); err == nil || !strings.Contains(err.Error(), "rootkms: registering metrics") {
		t.Errorf("New with a registry already used = %v, want a registration error", err)
	}
}
