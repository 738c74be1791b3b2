package rootkmstest_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/goleak"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func at(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }

// mustApply applies each command on n and fails t if the FSM refuses one.
func mustApply(t *testing.T, n *rootkmstest.Node, results ...*fsm.Result) {
	t.Helper()
	for i, res := range results {
		if res.Err != nil {
			t.Fatalf("%s: command %d: Result.Err = %v, want nil", n.ID, i, res.Err)
		}
	}
}

// workload creates regions and rotates their keys through the leader.
func workload(t *testing.T, l *rootkmstest.Node, regions ...string) {
	t.Helper()
	kcv := rootkmstest.KCV()
	for i, r := range regions {
		mustApply(t, l,
			l.Apply(t, rootkmstest.CreateRegion(r, rootkmstest.Wrapped(r, 1), kcv, at(10*i))),
			l.Apply(t, rootkmstest.AddVersion(r, 2, rootkmstest.Wrapped(r, 2), kcv, true, at(10*i+1))),
			l.Apply(t, rootkmstest.AddVersion(r, 3, rootkmstest.Wrapped(r, 3), kcv, false, at(10*i+2))),
			l.Apply(t, rootkmstest.SetStatus(r, 1, cryptov1.KeyStatus_KEY_STATUS_DISABLED, at(10*i+3))),
			l.Apply(t, rootkmstest.SetStatus(r, 1, cryptov1.KeyStatus_KEY_STATUS_DESTROYED, at(10*i+4))),
		)
	}
}

// converged waits until every connected node applied the leader's last
// command, then checks that all of them persist the same snapshot bytes.
func converged(t *testing.T, c *rootkmstest.Cluster) []byte {
	t.Helper()
	l := c.Leader(t)
	c.WaitApplied(t, l.FSM.AppliedIndex())
	want := rootkmstest.SnapshotBytes(t, l.FSM)
	for _, n := range c.Nodes() {
		if got := rootkmstest.SnapshotBytes(t, n.FSM); !bytes.Equal(got, want) {
			t.Errorf("SnapshotBytes(%s) = %x, want the leader's (%s) %x", n.ID, got, l.ID, want)
		}
	}
	return want
}

// primary returns region's primary version on n.
func primary(t *testing.T, n *rootkmstest.Node, region string) uint32 {
	t.Helper()
	r, ok := n.FSM.State().Region(region)
	if !ok {
		t.Fatalf("%s: Region(%q) = _, false, want true", n.ID, region)
	}
	v, _ := r.Primary()
	return v.Version
}

func TestClusterReplicates(t *testing.T) {
	c := rootkmstest.NewCluster(t, 3)
	l := c.Leader(t)
	workload(t, l, "eu", "us", "ap")
	res := l.Apply(t, rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), rootkmstest.KCV(), at(100)))
	if !errors.Is(res.Err, fsm.ErrRegionExists) {
		t.Errorf("Apply(create eu again).Err = %v, want %v", res.Err, fsm.ErrRegionExists)
	}
	converged(t, c)
	for _, n := range c.Nodes() {
		if got := primary(t, n, "us"); got != 2 {
			t.Errorf("%s: primary of us = %d, want 2", n.ID, got)
		}
		if err := rootkmstest.CheckInvariants(n.FSM.State(), rootkmstest.KCV()); err != nil {
			t.Errorf("%s: CheckInvariants = %v", n.ID, err)
		}
	}
}

func TestFollowerApplyFails(t *testing.T) {
	c := rootkmstest.NewCluster(t, 3)
	l := c.Leader(t)
	b, err := fsm.EncodeCommand(rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), rootkmstest.KCV(), at(0)))
	if err != nil {
		t.Fatalf("EncodeCommand = %v", err)
	}
	followers := 0
	for _, n := range c.Nodes() {
		if n == l {
			continue
		}
		followers++
		if err := n.Raft.Apply(b, time.Second).Error(); !errors.Is(err, raft.ErrNotLeader) {
			t.Errorf("%s (follower): Raft.Apply = %v, want %v", n.ID, err, raft.ErrNotLeader)
		}
	}
	if followers != 2 {
		t.Fatalf("%d followers, want 2", followers)
	}
	for _, n := range c.Nodes() {
		if _, ok := n.FSM.State().Region("eu"); ok {
			t.Errorf("%s: Region(eu) exists after only followers were asked", n.ID)
		}
	}
}

func TestNewNonvoterCatchesUpBySnapshot(t *testing.T) {
	// TrailingLogs 0: a snapshot compacts the whole log, so a new node can
	// only catch up through InstallSnapshot.
	c := rootkmstest.NewCluster(t, 3, rootkmstest.WithConfig(func(cfg *raft.Config) { cfg.TrailingLogs = 0 }))
	l := c.Leader(t)
	workload(t, l, "eu", "us")
	if err := l.Raft.Snapshot().Error(); err != nil {
		t.Fatalf("%s: Raft.Snapshot() = %v", l.ID, err)
	}
	if err := l.Logs.GetLog(1, new(raft.Log)); !errors.Is(err, raft.ErrLogNotFound) {
		t.Fatalf("%s: GetLog(1) after snapshot = %v, want %v (the log compacted)", l.ID, err, raft.ErrLogNotFound)
	}
	n := c.AddNonvoter(t, "node-4")
	// A command after the join moves the new node's AppliedIndex past the
	// snapshot (which does not carry its index).
	l = c.Leader(t)
	mustApply(t, l, l.Apply(t, rootkmstest.AddVersion("eu", 4, rootkmstest.Wrapped("eu", 4), rootkmstest.KCV(), true, at(100))))
	converged(t, c)
	snaps, err := n.Snapshots.List()
	if err != nil || len(snaps) == 0 {
		t.Errorf("node-4: Snapshots.List() = %v, %v, want the installed snapshot", snaps, err)
	}
	if got := primary(t, n, "eu"); got != 4 {
		t.Errorf("node-4: primary of eu = %d, want 4", got)
	}
	if _, ok := n.FSM.State().Region("us"); !ok {
		t.Errorf("node-4: Region(us) = _, false, want true (from the snapshot)")
	}
}

// suffrage returns the suffrage of each server in the leader's latest
// configuration.
func suffrage(t *testing.T, c *rootkmstest.Cluster) map[string]raft.ServerSuffrage {
	t.Helper()
	f := c.Leader(t).Raft.GetConfiguration()
	if err := f.Error(); err != nil {
		t.Fatalf("GetConfiguration() = %v", err)
	}
	out := map[string]raft.ServerSuffrage{}
	for _, s := range f.Configuration().Servers {
		out[string(s.ID)] = s.Suffrage
	}
	return out
}

func TestMembership(t *testing.T) {
	c := rootkmstest.NewCluster(t, 3)
	workload(t, c.Leader(t), "eu")
	c.AddVoter(t, "node-4")
	c.AddNonvoter(t, "node-5")
	got := suffrage(t, c)
	want := map[string]raft.ServerSuffrage{"node-1": raft.Voter, "node-2": raft.Voter, "node-3": raft.Voter, "node-4": raft.Voter, "node-5": raft.Nonvoter}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("configuration after adds = %v, want %v", got, want)
	}

	// Remove a follower voter.
	l := c.Leader(t)
	var follower string
	for _, n := range c.Nodes() {
		if n != l && got[n.ID] == raft.Voter {
			follower = n.ID
			break
		}
	}
	c.Remove(t, follower)
	if _, ok := suffrage(t, c)[follower]; ok {
		t.Fatalf("configuration after Remove(%s) still holds it", follower)
	}

	// Remove the leader: another voter takes over.
	old := c.Leader(t)
	c.Remove(t, old.ID)
	nl := c.Leader(t)
	if nl.ID == old.ID || nl.ID == "node-5" {
		t.Fatalf("leader after removing %s = %s, want another voter", old.ID, nl.ID)
	}
	if got := len(suffrage(t, c)); got != 3 {
		t.Errorf("configuration after two removals has %d servers, want 3", got)
	}
	workload(t, nl, "us")
	converged(t, c)
	if got := len(c.Nodes()); got != 3 {
		t.Errorf("len(Nodes()) = %d, want 3", got)
	}
}

func TestPartitionedLeader(t *testing.T) {
	c := rootkmstest.NewCluster(t, 3)
	old := c.Leader(t)
	workload(t, old, "eu")
	c.WaitApplied(t, old.FSM.AppliedIndex())

	c.Disconnect(old.ID)
	nl := c.Leader(t)
	if nl.ID == old.ID {
		t.Fatalf("leader after partitioning %s = %s, want another node", old.ID, nl.ID)
	}
	// The old leader cannot commit: no majority acknowledges the entry.
	b, err := fsm.EncodeCommand(rootkmstest.CreateRegion("lost", rootkmstest.Wrapped("lost", 1), rootkmstest.KCV(), at(200)))
	if err != nil {
		t.Fatalf("EncodeCommand = %v", err)
	}
	if err := old.Raft.Apply(b, time.Second).Error(); !errors.Is(err, raft.ErrNotLeader) && !errors.Is(err, raft.ErrLeadershipLost) {
		t.Errorf("%s (partitioned old leader): Raft.Apply = %v, want %v or %v", old.ID, err, raft.ErrNotLeader, raft.ErrLeadershipLost)
	}
	workload(t, nl, "us")

	c.Reconnect(old.ID)
	converged(t, c)
	for _, n := range c.Nodes() {
		if _, ok := n.FSM.State().Region("lost"); ok {
			t.Errorf("%s: Region(lost), proposed only to the partitioned leader, exists", n.ID)
		}
		if _, ok := n.FSM.State().Region("us"); !ok {
			t.Errorf("%s: Region(us) = _, false, want true", n.ID)
		}
	}
}

func TestLineageOption(t *testing.T) {
	c := rootkmstest.NewCluster(t, 1, rootkmstest.WithLineage("other", []byte{7}), rootkmstest.WithLogOutput(io.Discard))
	l := c.Leader(t)
	if res := l.Apply(t, rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), rootkmstest.KCV(), at(0))); !errors.Is(res.Err, fsm.ErrWrongRMK) {
		t.Errorf("Apply(create under the default KCV) on lineage other = %v, want %v", res.Err, fsm.ErrWrongRMK)
	}
	if res := l.Apply(t, rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), []byte{7}, at(0))); res.Err != nil {
		t.Errorf("Apply(create under the lineage's KCV) = %v, want nil", res.Err)
	}
}
