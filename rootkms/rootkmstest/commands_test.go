package rootkmstest_test

import (
	"testing"
	"time"

	"github.com/hashicorp/raft"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// invariantFSM returns an FSM whose region "eu" has versions 1 (ENABLED),
// 2 (PRIMARY) and 3 (DESTROYED), and one member.
func invariantFSM(t *testing.T) *fsm.FSM {
	t.Helper()
	f := rootkmstest.NewFSM()
	kcv := rootkmstest.KCV()
	for i, cmd := range []*statev1.Command{
		rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, at(0)),
		rootkmstest.AddVersion("eu", 2, rootkmstest.Wrapped("eu", 2), kcv, true, at(1)),
		rootkmstest.AddVersion("eu", 3, rootkmstest.Wrapped("eu", 3), kcv, false, at(2)),
		rootkmstest.SetStatus("eu", 3, cryptov1.KeyStatus_KEY_STATUS_DISABLED, at(3)),
		rootkmstest.SetStatus("eu", 3, cryptov1.KeyStatus_KEY_STATUS_DESTROYED, at(4)),
		rootkmstest.RegisterMember("node-1", "a:1", at(5)),
	} {
		b, err := fsm.EncodeCommand(cmd)
		if err != nil {
			t.Fatalf("EncodeCommand(%v) = %v", cmd, err)
		}
		if res := f.Apply(&raft.Log{Type: raft.LogCommand, Index: uint64(i + 1), Data: b}).(*fsm.Result); res.Err != nil {
			t.Fatalf("Apply(%v).Err = %v", cmd, res.Err)
		}
	}
	return f
}

// TestCheckInvariantsCatches breaks one invariant at a time, by writing to a
// published Region (which only a test may do), and expects CheckInvariants
// to report it.
func TestCheckInvariantsCatches(t *testing.T) {
	const (
		enabled = cryptov1.KeyStatus_KEY_STATUS_ENABLED
		primary = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
	)
	tests := []struct {
		name    string
		corrupt func(r *fsm.Region)
	}{
		{"no primary", func(r *fsm.Region) { r.Versions[1].Status = enabled }},
		{"two primaries", func(r *fsm.Region) {
			r.Versions[0].Status = primary
			r.Versions[0].PrimarySince = r.Versions[0].CreatedAt
		}},
		{"primary without PrimarySince", func(r *fsm.Region) { r.Versions[1].PrimarySince = time.Time{} }},
		{"version misnumbered", func(r *fsm.Region) { r.Versions[0].Version = 7 }},
		{"version without CreatedAt", func(r *fsm.Region) { r.Versions[0].CreatedAt = time.Time{} }},
		{"region without CreatedAt", func(r *fsm.Region) { r.CreatedAt = time.Time{} }},
		{"destroyed with material", func(r *fsm.Region) {
			r.Versions[2].Key = &statev1.WrappedRegionKeyVersion{Version: 3, WrappedKey: []byte{1}, RmkKcv: rootkmstest.KCV()}
		}},
		{"destroyed without RetiredAt", func(r *fsm.Region) { r.Versions[2].RetiredAt = time.Time{} }},
		{"enabled without material", func(r *fsm.Region) { r.Versions[0].Key = nil }},
		{"material under another RMK", func(r *fsm.Region) {
			r.Versions[0].Key = &statev1.WrappedRegionKeyVersion{Version: 1, WrappedKey: []byte{1}, RmkKcv: []byte{9}}
		}},
		{"unknown status", func(r *fsm.Region) { r.Versions[0].Status = 42 }},
		{"no versions", func(r *fsm.Region) { r.Versions = r.Versions[:0] }},
		{"invalid name", func(r *fsm.Region) { r.Name = "EU" }},
	}
	if err := rootkmstest.CheckInvariants(invariantFSM(t).State(), rootkmstest.KCV()); err != nil {
		t.Fatalf("CheckInvariants(valid state) = %v, want nil", err)
	}
	for _, tt := range tests {
		f := invariantFSM(t)
		r, _ := f.State().Region("eu")
		tt.corrupt(r)
		if err := rootkmstest.CheckInvariants(f.State(), rootkmstest.KCV()); err == nil {
			t.Errorf("CheckInvariants(%s) = nil, want an error", tt.name)
		}
	}
}

func TestSnapshotBytesDiffer(t *testing.T) {
	a := rootkmstest.SnapshotBytes(t, rootkmstest.NewFSM())
	b := rootkmstest.SnapshotBytes(t, invariantFSM(t))
	c := rootkmstest.SnapshotBytes(t, invariantFSM(t))
	if string(a) == string(b) {
		t.Errorf("SnapshotBytes(empty) = SnapshotBytes(non-empty) = %x, want different bytes", a)
	}
	if string(b) != string(c) {
		t.Errorf("SnapshotBytes of equal states = %x and %x, want equal", b, c)
	}
}
