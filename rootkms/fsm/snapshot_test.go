package fsm_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/timestamppb"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

func decodeSnapshot(t testing.TB, b []byte) *statev1.Snapshot {
	t.Helper()
	var s statev1.Snapshot
	if err := proto.Unmarshal(b, &s); err != nil {
		t.Fatalf("Unmarshal(snapshot) = %v", err)
	}
	return &s
}

func marshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatalf("Marshal(%v) = %v", m, err)
	}
	return b
}

func TestPersist(t *testing.T) {
	got := decodeSnapshot(t, rootkmstest.SnapshotBytes(t, setupFSM(t)))
	ts := timestamppb.New
	rec := func(region string, v uint32, hasKey bool, s cryptov1.KeyStatus, created, since, superseded, retired *timestamppb.Timestamp) *statev1.RegionKeyVersionRecord {
		r := &statev1.RegionKeyVersionRecord{Info: &cryptov1.KeyVersionInfo{
			KeyId: v, Status: s, TypeUrl: fsm.TypeURL,
			CreatedAt: created, PrimarySince: since, SupersededAt: superseded, RetiredAt: retired,
		}}
		if hasKey {
			r.Key = key(region, v)
		}
		return r
	}
	want := &statev1.Snapshot{
		FormatVersion: 1,
		GenesisId:     rootkmstest.GenesisID,
		RmkKcv:        kcv,
		Regions: []*statev1.RegionRecord{
			{Name: "eu", CreatedAt: ts(at(0)), Versions: []*statev1.RegionKeyVersionRecord{
				rec("eu", 1, true, enabled, ts(at(0)), ts(at(0)), ts(at(10)), nil),
				rec("eu", 2, true, primary, ts(at(10)), ts(at(10)), nil, nil),
				rec("eu", 3, true, disabled, ts(at(20)), nil, nil, nil),
				rec("eu", 4, false, destroyed, ts(at(40)), nil, nil, ts(at(42))),
				rec("eu", 5, true, enabled, ts(at(50)), nil, nil, nil),
			}},
			{Name: "us", CreatedAt: ts(at(60)), Versions: []*statev1.RegionKeyVersionRecord{
				rec("us", 1, true, primary, ts(at(60)), ts(at(60)), nil, nil),
			}},
		},
		Members: []*statev1.MemberRecord{{Id: "node-1", ApiAddress: "10.0.0.1:8443"}},
	}
	if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
		t.Errorf("Persist() wrote (-want +got):\n%s", diff)
	}
}

// failingSink fails Write or Close.
type failingSink struct {
	rootkmstest.Sink
	writeErr, closeErr error
}

func (s *failingSink) Write(p []byte) (int, error) {
	if s.writeErr != nil {
		return 0, s.writeErr
	}
	return s.Sink.Write(p)
}

func (s *failingSink) Close() error {
	s.Closed = true
	return s.closeErr
}

func TestPersistErrors(t *testing.T) {
	boom := errors.New("disk full")
	tests := []struct {
		name                     string
		sink                     *failingSink
		wantClosed, wantCanceled bool
	}{
		{"write fails", &failingSink{writeErr: boom}, false, true},
		{"close fails", &failingSink{closeErr: boom}, true, false},
	}
	for _, tt := range tests {
		snap, err := setupFSM(t).Snapshot()
		if err != nil {
			t.Fatalf("Snapshot() = %v", err)
		}
		if err := snap.Persist(tt.sink); !errors.Is(err, boom) {
			t.Errorf("Persist(%s) = %v, want %v", tt.name, err, boom)
		}
		if tt.sink.Closed != tt.wantClosed || tt.sink.Canceled != tt.wantCanceled {
			t.Errorf("Persist(%s): sink closed=%v canceled=%v, want closed=%v canceled=%v",
				tt.name, tt.sink.Closed, tt.sink.Canceled, tt.wantClosed, tt.wantCanceled)
		}
		snap.Release()
	}
}

func TestRestoreRoundTrip(t *testing.T) {
	src := setupFSM(t)
	b := rootkmstest.SnapshotBytes(t, src)
	dst := rootkmstest.NewFSM()
	// Restore replaces whatever dst held.
	mustApply(t, dst, rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(0)),
		rootkmstest.RegisterMember("node-9", "x:1", at(1)))
	rc := &readCloser{Reader: bytes.NewReader(b)}
	if err := dst.Restore(rc); err != nil {
		t.Fatalf("Restore(Persist()) = %v", err)
	}
	if !rc.closed {
		t.Errorf("Restore did not close its reader")
	}
	if diff := cmp.Diff(src.State().Regions(), dst.State().Regions(), protocmp.Transform()); diff != "" {
		t.Errorf("Regions() after Restore differ (-src +dst):\n%s", diff)
	}
	if diff := cmp.Diff(src.State().Members(), dst.State().Members()); diff != "" {
		t.Errorf("Members() after Restore differ (-src +dst):\n%s", diff)
	}
	if got := rootkmstest.SnapshotBytes(t, dst); !bytes.Equal(got, b) {
		t.Errorf("Persist() after Restore = %x, want %x", got, b)
	}
	if err := rootkmstest.CheckInvariants(dst.State(), kcv); err != nil {
		t.Errorf("CheckInvariants after Restore = %v", err)
	}
	// The restored FSM goes on applying commands.
	mustApply(t, dst, rootkmstest.AddVersion("eu", 6, rootkmstest.Wrapped("eu", 6), kcv, true, at(100)))
}

// errReader fails every Read.
type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

// zeros is an endless reader of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func TestRestoreRefuses(t *testing.T) {
	base := decodeSnapshot(t, rootkmstest.SnapshotBytes(t, setupFSM(t)))
	// In base, Regions[0] is eu with versions 1 ENABLED, 2 PRIMARY,
	// 3 DISABLED, 4 DESTROYED, 5 ENABLED; Regions[1] is us.
	eu := func(s *statev1.Snapshot) *statev1.RegionRecord { return s.Regions[0] }
	ver := func(s *statev1.Snapshot, v int) *statev1.RegionKeyVersionRecord {
		return s.Regions[0].Versions[v-1]
	}
	readErr := errors.New("read failed")
	tests := []struct {
		name   string
		mutate func(*statev1.Snapshot) // applied to a copy of base, or
		raw    []byte                  // these bytes, or
		reader io.Reader               // this reader
		want   error                   // nil: any error
	}{
		{name: "other genesis", mutate: func(s *statev1.Snapshot) { s.GenesisId = "other" }, want: fsm.ErrWrongRMK},
		{name: "no genesis", mutate: func(s *statev1.Snapshot) { s.GenesisId = "" }, want: fsm.ErrWrongRMK},
		{name: "other KCV", mutate: func(s *statev1.Snapshot) { s.RmkKcv = []byte{1, 2, 3} }, want: fsm.ErrWrongRMK},
		{name: "no KCV", mutate: func(s *statev1.Snapshot) { s.RmkKcv = nil }, want: fsm.ErrWrongRMK},
		{name: "truncated", raw: marshal(t, base)[:len(marshal(t, base))/2], want: fsm.ErrInvalidSnapshot},
		{name: "garbage", raw: []byte("this is not a snapshot at all"), want: fsm.ErrInvalidSnapshot},
		{name: "empty", raw: []byte{}, want: fsm.ErrInvalidSnapshot},
		{name: "format 2", mutate: func(s *statev1.Snapshot) { s.FormatVersion = 2 }, want: fsm.ErrInvalidSnapshot},
		{name: "format 0", mutate: func(s *statev1.Snapshot) { s.FormatVersion = 0 }, want: fsm.ErrInvalidSnapshot},
		{name: "oversize", reader: io.LimitReader(zeros{}, fsm.MaxSnapshotSize+1), want: fsm.ErrInvalidSnapshot},
		{name: "read error", reader: errReader{readErr}, want: readErr},

		{name: "duplicate region", mutate: func(s *statev1.Snapshot) {
			s.Regions = slices.Insert(s.Regions, 1, proto.Clone(s.Regions[0]).(*statev1.RegionRecord))
		}, want: fsm.ErrInvalidSnapshot},
		{name: "regions not sorted", mutate: func(s *statev1.Snapshot) { s.Regions[0], s.Regions[1] = s.Regions[1], s.Regions[0] }, want: fsm.ErrInvalidSnapshot},
		{name: "invalid region name", mutate: func(s *statev1.Snapshot) { eu(s).Name = "EU" }, want: fsm.ErrInvalidName},
		{name: "region without created_at", mutate: func(s *statev1.Snapshot) { eu(s).CreatedAt = nil }, want: fsm.ErrInvalidSnapshot},
		{name: "region without versions", mutate: func(s *statev1.Snapshot) { eu(s).Versions = nil }, want: fsm.ErrInvalidSnapshot},
		{name: "gap in versions", mutate: func(s *statev1.Snapshot) { eu(s).Versions = slices.Delete(eu(s).Versions, 2, 3) }, want: fsm.ErrInvalidSnapshot},
		{name: "versions out of order", mutate: func(s *statev1.Snapshot) {
			vs := eu(s).Versions
			vs[2], vs[4] = vs[4], vs[2]
		}, want: fsm.ErrInvalidSnapshot},
		{name: "key numbered differently", mutate: func(s *statev1.Snapshot) { ver(s, 3).Key.Version = 9 }, want: fsm.ErrBadVersion},
		{name: "two primaries", mutate: func(s *statev1.Snapshot) {
			ver(s, 5).Info.Status = primary
			ver(s, 5).Info.PrimarySince = ver(s, 5).Info.CreatedAt
		}, want: fsm.ErrInvalidSnapshot},
		{name: "no primary", mutate: func(s *statev1.Snapshot) { ver(s, 2).Info.Status = enabled }, want: fsm.ErrInvalidSnapshot},
		{name: "destroyed with material", mutate: func(s *statev1.Snapshot) { ver(s, 4).Key = key("eu", 4) }, want: fsm.ErrInvalidSnapshot},
		{name: "destroyed without retired_at", mutate: func(s *statev1.Snapshot) { ver(s, 4).Info.RetiredAt = nil }, want: fsm.ErrInvalidSnapshot},
		{name: "disabled without material", mutate: func(s *statev1.Snapshot) { ver(s, 3).Key = nil }, want: fsm.ErrBadVersion},
		{name: "empty wrapped key", mutate: func(s *statev1.Snapshot) { ver(s, 5).Key.WrappedKey = nil }, want: fsm.ErrBadVersion},
		{name: "key under other RMK", mutate: func(s *statev1.Snapshot) { ver(s, 5).Key.RmkKcv = []byte{1, 2, 3} }, want: fsm.ErrWrongRMK},
		{name: "no info", mutate: func(s *statev1.Snapshot) { ver(s, 1).Info = nil }, want: fsm.ErrInvalidSnapshot},
		{name: "other type_url", mutate: func(s *statev1.Snapshot) {
			ver(s, 1).Info.TypeUrl = "type.googleapis.com/google.crypto.tink.AesSivKey"
		}, want: fsm.ErrInvalidSnapshot},
		{name: "version without created_at", mutate: func(s *statev1.Snapshot) { ver(s, 1).Info.CreatedAt = nil }, want: fsm.ErrInvalidSnapshot},
		{name: "primary without primary_since", mutate: func(s *statev1.Snapshot) { ver(s, 2).Info.PrimarySince = nil }, want: fsm.ErrInvalidSnapshot},
		{name: "invalid superseded_at", mutate: func(s *statev1.Snapshot) { ver(s, 1).Info.SupersededAt.Nanos = 2e9 }, want: fsm.ErrInvalidSnapshot},
		{name: "status unspecified", mutate: func(s *statev1.Snapshot) { ver(s, 5).Info.Status = unspecified }, want: fsm.ErrInvalidSnapshot},
		{name: "status unknown", mutate: func(s *statev1.Snapshot) { ver(s, 5).Info.Status = 99 }, want: fsm.ErrInvalidSnapshot},

		{name: "duplicate member", mutate: func(s *statev1.Snapshot) { s.Members = append(s.Members, s.Members[0]) }, want: fsm.ErrInvalidSnapshot},
		{name: "members not sorted", mutate: func(s *statev1.Snapshot) {
			s.Members = append(s.Members, &statev1.MemberRecord{Id: "a", ApiAddress: "a:1"})
		}, want: fsm.ErrInvalidSnapshot},
		{name: "member without address", mutate: func(s *statev1.Snapshot) { s.Members[0].ApiAddress = "" }, want: fsm.ErrInvalidSnapshot},
		{name: "member without id", mutate: func(s *statev1.Snapshot) { s.Members[0].Id = "" }, want: fsm.ErrInvalidSnapshot},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := setupFSM(t)
			mustApply(t, f, rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(100)))
			before := f.State()
			r := tt.reader
			if r == nil {
				b := tt.raw
				if b == nil {
					s := proto.Clone(base).(*statev1.Snapshot)
					tt.mutate(s)
					b = marshal(t, s)
				}
				r = bytes.NewReader(b)
			}
			rc := &readCloser{Reader: r}
			err := f.Restore(rc)
			if err == nil || !errors.Is(err, tt.want) {
				t.Errorf("Restore(%s) = %v, want %v", tt.name, err, tt.want)
			}
			if f.State() != before {
				t.Errorf("State() after refused Restore(%s) = %p, want the same %p", tt.name, f.State(), before)
			}
			if !rc.closed {
				t.Errorf("Restore(%s) did not close its reader", tt.name)
			}
		})
	}
}

func TestRestoreAcceptsMaxSize(t *testing.T) {
	// A valid snapshot padded with an unknown field to exactly
	// MaxSnapshotSize bytes is read whole and accepted.
	b := rootkmstest.SnapshotBytes(t, setupFSM(t))
	padded := protowire.AppendTag(slices.Clone(b), 1000, protowire.BytesType)
	n := fsm.MaxSnapshotSize - len(padded) - 4 // a 4-byte length varint
	padded = protowire.AppendVarint(padded, uint64(n))
	padded = append(padded, make([]byte, n)...)
	if len(padded) != fsm.MaxSnapshotSize {
		t.Fatalf("padded snapshot is %d bytes, want %d", len(padded), fsm.MaxSnapshotSize)
	}
	f := rootkmstest.NewFSM()
	if err := restoreBytes(f, padded); err != nil {
		t.Fatalf("Restore(%d-byte snapshot) = %v, want nil", len(padded), err)
	}
	if got := rootkmstest.SnapshotBytes(t, f); !bytes.Equal(got, b) {
		t.Errorf("Persist() after Restore(padded) = %x, want %x", got, b)
	}
}

// bigFSM returns an FSM holding n regions, restored from a snapshot.
func bigFSM(t testing.TB, n int) *fsm.FSM {
	t.Helper()
	snap := &statev1.Snapshot{FormatVersion: 1, GenesisId: rootkmstest.GenesisID, RmkKcv: kcv}
	for i := range n {
		name := fmt.Sprintf("r%05d", i)
		snap.Regions = append(snap.Regions, &statev1.RegionRecord{
			Name: name, CreatedAt: timestamppb.New(at(0)),
			Versions: []*statev1.RegionKeyVersionRecord{{Key: key(name, 1), Info: &cryptov1.KeyVersionInfo{
				KeyId: 1, Status: primary, TypeUrl: fsm.TypeURL, CreatedAt: timestamppb.New(at(0)), PrimarySince: timestamppb.New(at(0)),
			}}},
		})
	}
	f := rootkmstest.NewFSM()
	if err := restoreBytes(f, marshal(t, snap)); err != nil {
		t.Fatalf("Restore(%d regions) = %v", n, err)
	}
	return f
}

func TestSnapshotIsConstantTime(t *testing.T) {
	f := bigFSM(t, 10000)
	if got := len(f.State().Regions()); got != 10000 {
		t.Fatalf("len(Regions()) = %d, want 10000", got)
	}
	allocs := testing.AllocsPerRun(100, func() {
		s, err := f.Snapshot()
		if err != nil {
			t.Fatalf("Snapshot() = %v", err)
		}
		s.Release()
	})
	// One allocation: the FSMSnapshot holding the State pointer. Encoding
	// 10000 regions would take tens of thousands.
	if allocs > 1 {
		t.Errorf("Snapshot() of 10000 regions allocates %v times, want <= 1 (no encoding before Persist)", allocs)
	}
}
