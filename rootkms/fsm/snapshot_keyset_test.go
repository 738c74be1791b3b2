package fsm_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

// keysetFSM returns an FSM holding lifecycleFixture's keyset (a version in
// every state), a second keyset, a TTL change, observations of both regions
// and remembered requests.
func keysetFSM(t testing.TB) (*fsm.FSM, map[statev1.KeysetVersionState]uint32) {
	t.Helper()
	x, ids := lifecycleFixture(t)
	other, oid := newTinkKeyset(t, "a/other")
	mustApply(t, x.f,
		withRequest(createKeyset(createKeysetRecord("a/other", []string{"us"}, oid, other.copies([]string{"us"}, usable)), at(5000)), alice, "other"),
		withRequest(setPolicy(ledger, x.rev(t), nil, ttlHour, at(5001)), bob, "ttl"),
		recordPropagation("eu", []uint32{2, 5}, []*statev1.KeysetObservation{{Keyset: ledger, Versions: []*statev1.VersionObservation{
			{KeyId: ids[ksPrimary], ServedByAll: true, EncryptCount: 3, LastUse: ts(at(4990))},
			{KeyId: ids[ksEnabled], ServedByAll: true, DecryptCount: 2},
		}}}, at(5002)),
		withRequest(recordPropagation("us", []uint32{1}, []*statev1.KeysetObservation{{Keyset: ledger, Versions: []*statev1.VersionObservation{
			{KeyId: ids[ksPrimary], EncryptCount: 4},
		}}}, at(5003)), alice, "prop-us"),
	)
	return x.f, ids
}

var ttlHour = dur(time.Hour)

func TestKeysetSnapshotRoundTrip(t *testing.T) {
	src, ids := keysetFSM(t)
	b := rootkmstest.SnapshotBytes(t, src)
	snap := decodeSnapshot(t, b)
	for _, v := range snap.GetKeysets()[1].GetVersions() {
		// Golden ciphertexts on the versions added, none on the one created
		// before them or on the one destroyed.
		if want := v.GetKeyId() != ids[ksPrimary] && v.GetKeyId() != ids[ksDestroyed]; (v.GetGolden() != nil) != want {
			t.Errorf("snapshot: version %d (%v) has golden ciphertext %v, want one: %t", v.GetKeyId(), v.GetState(), v.GetGolden(), want)
		}
	}
	if len(snap.GetKeysets()) != 2 || snap.GetKeysets()[0].GetName() != "a/other" || len(snap.GetRequests()) != 3 {
		t.Fatalf("snapshot holds keysets %d (first %q) and %d requests, want 2 sorted and 3", len(snap.GetKeysets()), snap.GetKeysets()[0].GetName(), len(snap.GetRequests()))
	}
	if got := snap.GetRegions()[0].GetServedKeyVersions(); !cmp.Equal(got, []uint32{2, 5}) {
		t.Errorf("snapshot region eu served_key_versions = %v, want [2 5]", got)
	}
	dst := rootkmstest.NewFSM()
	if err := restoreBytes(dst, b); err != nil {
		t.Fatalf("Restore(Persist()) = %v", err)
	}
	if diff := cmp.Diff(src.State().Keysets(), dst.State().Keysets(), protocmp.Transform()); diff != "" {
		t.Errorf("Keysets() after Restore differ (-src +dst):\n%s", diff)
	}
	if diff := cmp.Diff(src.State().Regions(), dst.State().Regions(), protocmp.Transform()); diff != "" {
		t.Errorf("Regions() after Restore differ (-src +dst):\n%s", diff)
	}
	for _, r := range []struct{ identity, id string }{{alice, "other"}, {bob, "ttl"}, {alice, "prop-us"}} {
		want, _ := src.State().Request(r.identity, r.id)
		if got, ok := dst.State().Request(r.identity, r.id); !ok || got != want {
			t.Errorf("Request(%s) after Restore = %+v, %v, want %+v", r.id, got, ok, want)
		}
	}
	if got, want := dst.State().Latest(), src.State().Latest(); !got.Equal(want) {
		t.Errorf("Latest() after Restore = %v, want %v", got, want)
	}
	if got := rootkmstest.SnapshotBytes(t, dst); !bytes.Equal(got, b) {
		t.Errorf("Persist() after Restore differs from the snapshot restored")
	}
	// The restored FSM deduplicates the remembered requests.
	res := apply(t, dst, withRequest(setPolicy(ledger, 1, nil, ttlHour, at(6000)), bob, "ttl"))
	if !res.Duplicate || res.Keyset == nil {
		t.Errorf("retry after Restore = %+v, want Duplicate with the keyset", res)
	}
}

func TestRestoreRefusesKeysets(t *testing.T) {
	src, ids := keysetFSM(t)
	base := decodeSnapshot(t, rootkmstest.SnapshotBytes(t, src))
	// Keysets[0] is a/other (us only); Keysets[1] is the ledger, versions in
	// the order primary, enabled, disabled, destroyed, destroy scheduled.
	lg := func(s *statev1.Snapshot) *statev1.KeysetRecord { return s.Keysets[1] }
	ver := func(s *statev1.Snapshot, st statev1.KeysetVersionState) *statev1.KeysetVersionRecord {
		for _, v := range lg(s).Versions {
			if v.GetKeyId() == ids[st] {
				return v
			}
		}
		t.Fatalf("no version in state %v", st)
		return nil
	}
	tests := []struct {
		name   string
		mutate func(*statev1.Snapshot)
	}{
		{"keysets not sorted", func(s *statev1.Snapshot) { s.Keysets[0], s.Keysets[1] = s.Keysets[1], s.Keysets[0] }},
		{"keyset twice", func(s *statev1.Snapshot) { s.Keysets = append(s.Keysets, s.Keysets[1]) }},
		{"invalid keyset name", func(s *statev1.Snapshot) { s.Keysets[0].Name = "A" }},
		{"unknown region", func(s *statev1.Snapshot) { s.Keysets[0].Regions = []string{"zz"}; s.Keysets[0].Copies[0].Region = "zz" }},
		{"no regions", func(s *statev1.Snapshot) { s.Keysets[0].Regions = nil }},
		{"revision 0", func(s *statev1.Snapshot) { lg(s).Revision = 0 }},
		{"no created_at", func(s *statev1.Snapshot) { lg(s).CreatedAt = nil }},
		{"negative rotation", func(s *statev1.Snapshot) { lg(s).RotationPeriod = dur(-time.Hour) }},
		{"no ttl history", func(s *statev1.Snapshot) { lg(s).TtlHistory = nil }},
		{"ttl in force with an end", func(s *statev1.Snapshot) { lg(s).TtlHistory[1].Until = ts(at(9999)) }},
		{"ttl periods not contiguous", func(s *statev1.Snapshot) { lg(s).TtlHistory[1].From = ts(at(9999)) }},
		{"ttl zero", func(s *statev1.Snapshot) { lg(s).TtlHistory[0].Ttl = dur(0) }},
		{"no primary", func(s *statev1.Snapshot) { ver(s, ksPrimary).State = ksEnabled }},
		{"two primaries", func(s *statev1.Snapshot) {
			ver(s, ksEnabled).State = ksPrimary
			ver(s, ksEnabled).PrimarySince = ts(at(1))
		}},
		{"state unspecified", func(s *statev1.Snapshot) { ver(s, ksEnabled).State = 0 }},
		{"state unknown", func(s *statev1.Snapshot) { ver(s, ksEnabled).State = 9 }},
		{"key ID twice", func(s *statev1.Snapshot) { ver(s, ksEnabled).KeyId = ids[ksPrimary] }},
		{"destroyed without destroyed_at", func(s *statev1.Snapshot) { ver(s, ksDestroyed).DestroyedAt = nil }},
		{"scheduled without destroy_after", func(s *statev1.Snapshot) { ver(s, ksDestroyScheduled).DestroyAfter = nil }},
		{"disabled without disabled_at", func(s *statev1.Snapshot) { ver(s, ksDisabled).DisabledAt = nil }},
		{"version without created_at", func(s *statev1.Snapshot) { ver(s, ksEnabled).CreatedAt = nil }},
		{"encrypt_count not the sum", func(s *statev1.Snapshot) { ver(s, ksPrimary).EncryptCount++ }},
		{"usage not sorted", func(s *statev1.Snapshot) {
			u := ver(s, ksPrimary).Usage
			u[0], u[1] = u[1], u[0]
		}},
		{"usage of another region", func(s *statev1.Snapshot) { ver(s, ksPrimary).Usage[0].Region = "ap" }},
		{"propagated twice", func(s *statev1.Snapshot) {
			v := ver(s, ksPrimary)
			v.Propagated = append(v.Propagated, v.Propagated[0])
		}},
		{"propagated without time", func(s *statev1.Snapshot) { ver(s, ksPrimary).Propagated[0].At = nil }},
		{"copy missing", func(s *statev1.Snapshot) { lg(s).Copies = lg(s).Copies[:1] }},
		{"copy misnamed", func(s *statev1.Snapshot) { lg(s).Copies[0].Name = "x" }},
		{"copy under a missing region key", func(s *statev1.Snapshot) { lg(s).Copies[0].RegionKeyVersion = 99 }},
		{"copy status not the state", func(s *statev1.Snapshot) { ver(s, ksDisabled).State = ksEnabled }},
		{"copy holding a destroyed key", func(s *statev1.Snapshot) {
			lg(s).Copies[0].Versions = append(lg(s).Copies[0].Versions, &cryptov1.KeyVersionInfo{KeyId: ids[ksDestroyed], Status: disabled})
		}},
		{"golden without plaintext_sha256", func(s *statev1.Snapshot) { ver(s, ksEnabled).Golden.PlaintextSha256 = nil }},
		{"golden of another key", func(s *statev1.Snapshot) { ver(s, ksDisabled).Golden = ver(s, ksEnabled).Golden }},
		{"golden on a destroyed version", func(s *statev1.Snapshot) {
			v := ver(s, ksDestroyed)
			v.Golden = proto.Clone(ver(s, ksEnabled).Golden).(*statev1.GoldenCiphertext)
			binary.BigEndian.PutUint32(v.Golden.Ciphertext[1:5], v.GetKeyId())
		}},
		{"served version unknown", func(s *statev1.Snapshot) { s.Regions[0].ServedKeyVersions = []uint32{2, 6} }},
		{"served versions not sorted", func(s *statev1.Snapshot) { s.Regions[0].ServedKeyVersions = []uint32{5, 2} }},
		{"served versions without time", func(s *statev1.Snapshot) { s.Regions[0].ServedObservedAt = nil }},
		{"request without id", func(s *statev1.Snapshot) { s.Requests[0].RequestId = "" }},
		{"request twice", func(s *statev1.Snapshot) {
			r := proto.Clone(s.Requests[0]).(*statev1.RequestRecord)
			r.Index = 1 << 40
			s.Requests = append(s.Requests, r)
		}},
		{"requests not oldest first", func(s *statev1.Snapshot) { s.Requests[0], s.Requests[1] = s.Requests[1], s.Requests[0] }},
		{"request with an error", func(s *statev1.Snapshot) { s.Requests[0].ErrorKind = "region_exists" }},
		{"request with a bad subject", func(s *statev1.Snapshot) { s.Requests[0].Subject = "thing/x" }},
		{"request without index", func(s *statev1.Snapshot) { s.Requests[0].Index = 0 }},
		{"too many requests", func(s *statev1.Snapshot) {
			s.Requests = nil
			for i := range fsm.MaxRequests + 1 {
				s.Requests = append(s.Requests, &statev1.RequestRecord{Identity: alice, RequestId: fmt.Sprint(i), Index: uint64(i + 1), Subject: "member/a"})
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			before := f.State()
			s := proto.Clone(base).(*statev1.Snapshot)
			tt.mutate(s)
			if err := restoreBytes(f, marshal(t, s)); !errors.Is(err, fsm.ErrInvalidSnapshot) {
				t.Errorf("Restore(%s) = %v, want %v", tt.name, err, fsm.ErrInvalidSnapshot)
			}
			if f.State() != before {
				t.Errorf("State() after refused Restore(%s) changed", tt.name)
			}
		})
	}
	// Restore takes what Apply allows: copies under a region key version
	// disabled since.
	t.Run("copies under a since disabled region key", func(t *testing.T) {
		f, _ := keysetFSM(t)
		mustApply(t, f, rootkmstest.SetStatus("eu", 5, disabled, at(7000)))
		k, _ := f.State().Keyset(ledger)
		if got := k.GetCopies()[0].GetRegionKeyVersion(); got != 2 {
			t.Fatalf("fixture: the first copy is under region key version %d, want 2 (the test disables version 2)", got)
		}
		mustApply(t, f, rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), kcv, true, at(7001)),
			rootkmstest.SetStatus("eu", 2, disabled, at(7002)))
		if err := restoreBytes(rootkmstest.NewFSM(), rootkmstest.SnapshotBytes(t, f)); err != nil {
			t.Errorf("Restore(copies under a disabled region key) = %v, want nil", err)
		}
	})
}
