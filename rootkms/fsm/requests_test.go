package fsm_test

import (
	"errors"
	"fmt"
	"testing"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

const (
	alice = "spiffe://cairn.test/regionctl/alice"
	bob   = "spiffe://cairn.test/regionctl/bob"
)

func TestDuplicateRequest(t *testing.T) {
	x := newKeysetFixture(t)
	f := x.f
	k2 := x.k.add()
	add := withRequest(updateKeyset(ledger, 1, stepAdd, k2, x.k.copies(euUS, usable), at(200)), alice, "add-k2")
	tests := []struct {
		name  string
		first *statev1.Command
		retry *statev1.Command // sent with the same identity and request ID
		check func(t *testing.T, res *fsm.Result)
	}{
		{"update_keyset", add, add, func(t *testing.T, res *fsm.Result) {
			if k, _ := f.State().Keyset(ledger); res.Keyset != k || res.Region != nil {
				t.Errorf("duplicate Result = %+v, want the current keyset record", res)
			}
		}},
		{"create_region", withRequest(rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(300)), alice, "ap"),
			withRequest(rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(301)), alice, "ap"),
			func(t *testing.T, res *fsm.Result) {
				if r, _ := f.State().Region("ap"); res.Region != r || res.Keyset != nil {
					t.Errorf("duplicate Result = %+v, want the current region ap", res)
				}
			}},
		{"register_member", withRequest(rootkmstest.RegisterMember("node-2", "b:1", at(400)), alice, "m"),
			withRequest(rootkmstest.RegisterMember("node-2", "b:1", at(401)), alice, "m"),
			func(t *testing.T, res *fsm.Result) {
				if res.Region != nil || res.Keyset != nil {
					t.Errorf("duplicate Result = %+v, want no record", res)
				}
			}},
	}
	for _, tt := range tests {
		res := apply(t, f, tt.first)
		if res.Err != nil || res.Duplicate {
			t.Fatalf("%s: first Apply = %+v, want applied", tt.name, res)
		}
		index := f.AppliedIndex()
		want, ok := f.State().Request(tt.first.GetIdentity(), tt.first.GetRequestId())
		if !ok || want.Index != index {
			t.Fatalf("%s: Request() after the first Apply = %+v, %v, want index %d", tt.name, want, ok, index)
		}
		before := f.State()
		res = apply(t, f, tt.retry)
		if res.Err != nil || !res.Duplicate {
			t.Errorf("%s: retry = %+v, want Duplicate and no error", tt.name, res)
		}
		tt.check(t, res)
		if f.State() != before {
			t.Errorf("%s: retry changed the State", tt.name)
		}
		if f.AppliedIndex() != index+1 {
			t.Errorf("%s: AppliedIndex() after the retry = %d, want %d", tt.name, f.AppliedIndex(), index+1)
		}
	}
	if r, _ := f.State().Request(alice, "add-k2"); r != (fsm.RequestRecord{Identity: alice, RequestID: "add-k2", Index: r.Index, Subject: "keyset/" + ledger, KeyID: k2, Operation: "update_keyset/ADD_VERSION"}) {
		t.Errorf("Request(add-k2) = %+v", r)
	}
	if r, _ := f.State().Request(alice, "ap"); r.Subject != "region/ap" || r.KeyID != 1 {
		t.Errorf("Request(ap) = %+v, want subject region/ap, key 1", r)
	}

	// The same request ID from another identity is another request.
	res := apply(t, f, withRequest(rootkmstest.CreateRegion("bb", rootkmstest.Wrapped("bb", 1), kcv, at(500)), bob, "ap"))
	if res.Err != nil || res.Duplicate {
		t.Errorf("Apply(bob's ap) = %+v, want applied", res)
	}
	// No request ID: never a duplicate.
	mustApply(t, f, rootkmstest.RegisterMember("n", "a:1", at(600)), rootkmstest.RegisterMember("n", "a:1", at(601)))
	if _, ok := f.State().Request(alice, ""); ok {
		t.Errorf("Request(alice, \"\") = _, true, want false")
	}
}

// TestReusedRequestIDRefused: a request ID already used by an accepted
// write, sent with another write, is refused rather than answered with the
// first write's result (which would report a write that never happened).
func TestReusedRequestIDRefused(t *testing.T) {
	x := newKeysetFixture(t)
	f := x.f
	k2 := x.k.add()
	mustApply(t, f, withRequest(updateKeyset(ledger, 1, stepAdd, k2, x.k.copies(euUS, usable), at(200)), alice, "r"))
	mustApply(t, f, withRequest(rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(201)), alice, "c"))
	for _, tt := range []struct {
		name string
		cmd  *statev1.Command
	}{
		{"another step on the same keyset", withRequest(updateKeyset(ledger, 2, stepPromote, k2, x.k.copies(euUS, usable), at(300)), alice, "r")},
		{"another operation", withRequest(rootkmstest.RegisterMember("node-9", "a:1", at(300)), alice, "c")},
		{"the same operation on another subject", withRequest(rootkmstest.CreateRegion("zz", rootkmstest.Wrapped("zz", 1), kcv, at(300)), alice, "c")},
	} {
		before := f.State()
		if res := apply(t, f, tt.cmd); !errors.Is(res.Err, fsm.ErrInvalidCommand) || res.Duplicate || f.State() != before {
			t.Errorf("%s: Apply = %+v, want ErrInvalidCommand, no Duplicate, State unchanged", tt.name, res)
		}
	}
}

func TestRefusedRequestIsNotRemembered(t *testing.T) {
	f := setupFSM(t)
	res := apply(t, f, withRequest(rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, at(100)), alice, "r"))
	if !errors.Is(res.Err, fsm.ErrRegionExists) {
		t.Fatalf("Apply(create existing) = %v, want %v", res.Err, fsm.ErrRegionExists)
	}
	if r, ok := f.State().Request(alice, "r"); ok {
		t.Errorf("Request() after a refusal = %+v, true, want false", r)
	}
	// Fixed and retried with the same ID, it is applied.
	res = apply(t, f, withRequest(rootkmstest.CreateRegion("ap", rootkmstest.Wrapped("ap", 1), kcv, at(101)), alice, "r"))
	if res.Err != nil || res.Duplicate {
		t.Errorf("Apply(corrected retry) = %+v, want applied", res)
	}
}

func TestRequestTableBound(t *testing.T) {
	f := setupFSM(t)
	const extra = 100
	id := func(i int) string { return fmt.Sprintf("req-%05d", i) }
	var first uint64
	for i := range fsm.MaxRequests + extra {
		mustApply(t, f, withRequest(rootkmstest.RegisterMember(fmt.Sprintf("node-%d", i%7), "a:1", at(100+i)), alice, id(i)))
		if i == 0 {
			first = f.AppliedIndex()
		}
	}
	s := f.State()
	for i := range fsm.MaxRequests + extra {
		r, ok := s.Request(alice, id(i))
		if wantOK := i >= extra; ok != wantOK || ok && (r.Index != first+uint64(i) || r.Subject != fmt.Sprintf("member/node-%d", i%7)) {
			t.Fatalf("Request(%s) = %+v, %v, want found=%v at index %d", id(i), r, ok, wantOK, first+uint64(i))
		}
	}
	snap := decodeSnapshot(t, rootkmstest.SnapshotBytes(t, f))
	if got := len(snap.GetRequests()); got != fsm.MaxRequests {
		t.Errorf("snapshot holds %d requests, want %d", got, fsm.MaxRequests)
	}
	if got := snap.GetRequests()[0].GetRequestId(); got != id(extra) {
		t.Errorf("oldest request in the snapshot = %s, want %s", got, id(extra))
	}
	// An evicted request is applied again.
	if res := apply(t, f, withRequest(rootkmstest.RegisterMember("node-0", "a:1", at(1e6)), alice, id(0))); res.Err != nil || res.Duplicate {
		t.Errorf("Apply(evicted request) = %+v, want applied", res)
	}
	// which evicted the oldest, id(extra). A retry of the oldest remembered
	// one (the same command) is a Duplicate.
	if res := apply(t, f, withRequest(rootkmstest.RegisterMember(fmt.Sprintf("node-%d", (extra+1)%7), "a:1", at(1e6)), alice, id(extra+1))); !res.Duplicate {
		t.Errorf("Apply(oldest remembered request) = %+v, want Duplicate", res)
	}
	if _, ok := f.State().Request(alice, id(extra)); ok {
		t.Errorf("Request(%s) = _, true after one more request, want evicted", id(extra))
	}
}

// BenchmarkApplyRequest measures an Apply with a request ID against a full
// request table: the cost the table adds to every write.
func BenchmarkApplyRequest(b *testing.B) {
	f := setupFSM(b)
	for i := range fsm.MaxRequests {
		mustApply(b, f, withRequest(rootkmstest.RegisterMember("n", "a:1", at(100)), alice, fmt.Sprint(i)))
	}
	data := make([][]byte, b.N)
	for i := range data {
		data[i] = encode(b, withRequest(rootkmstest.RegisterMember("n", "a:1", at(100)), alice, fmt.Sprint("b", i)))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		applyBytes(f, data[i])
	}
}
